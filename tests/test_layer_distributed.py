"""Under torch.distributed (2 CPU processes, gloo), EMA statistics, k-means init and dead-code restarts are
synchronised, so every rank holds the same codebook (on the torch backend, and on the Triton kernels
where the interpreter runs them); without the sync they drift apart. The same holds
for a torch.compile'd DDP model, which trains exactly like the eager one."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

CONFIGS = {
    "ema": dict(ema=True, init="kmeans", kmeans_iters=3, dead_code_threshold=0.5, usage_decay=0.5),
    "codebook-loss": dict(init="kmeans", kmeans_iters=3, dead_code_threshold=0.5, usage_decay=0.5),
    "ema-unsynced": dict(ema=True, init="kmeans", kmeans_iters=3, dead_code_threshold=0.5, usage_decay=0.5,
                         sync_distributed=False),
}


class _Model(nn.Module):
    def __init__(self, **vq_kwargs) -> None:
        super().__init__()
        from vqfast import VectorQuantizer

        self.encoder = nn.Linear(6, 4)
        self.vq = VectorQuantizer(12, 4, **vq_kwargs)

    def forward(self, x):
        z_q, loss, _ = self.vq(self.encoder(x))
        return (z_q - 1).pow(2).mean() + loss


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["VQFAST_BACKEND"] = "torch"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from vqfast.distributed import same_on_all_ranks

        results = {}
        # The Triton kernels too (interpreted) where the interpreter runs them: the statistics kernels
        # take the all-reduced counts.
        backends = ["torch", "triton"] if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else ["torch"]
        for backend in backends:
            os.environ["VQFAST_BACKEND"] = backend
            for name, kwargs in CONFIGS.items():
                if backend == "triton" and name == "ema-unsynced":
                    continue
                torch.manual_seed(0)  # same initial weights everywhere
                model = _Model(**kwargs)
                # No buffer broadcast from rank 0: the layer itself must keep the ranks identical.
                ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
                opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
                torch.manual_seed(1000 + rank)  # different data and random draws on every rank
                for step in range(4):
                    x = torch.randn(16, 6) * (1 + rank) + 3 * rank
                    loss = ddp(x)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                vq = model.vq
                results[name if backend == "torch" else f"{name} (triton)"] = {
                    "weight": vq.embeddings.weight.detach().clone(),
                    "buffers": {k: v.clone() for k, v in vq.named_buffers()},
                    "same": same_on_all_ranks(vq.embeddings.weight),
                    "steps": int(vq.usage_steps),
                }
        os.environ["VQFAST_BACKEND"] = "torch"
        # torch.compile of the DDP model (k-means init, restarts and statistics all synchronised inside
        # the compiled step) trains exactly like the eager DDP model.
        import copy

        runs = {}
        torch.manual_seed(0)
        eager_model = _Model(**CONFIGS["codebook-loss"])
        models = {"eager": eager_model, "compiled": copy.deepcopy(eager_model)}
        for mode, model in models.items():
            step = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
            if mode == "compiled":
                torch._dynamo.reset()
                step = torch.compile(step, backend="aot_eager")
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            torch.manual_seed(1000 + rank)
            losses = []
            for _ in range(4):
                loss = step(torch.randn(16, 6) * (1 + rank) + 3 * rank)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.detach())
            runs[mode] = (torch.stack(losses), model.vq.embeddings.weight.detach().clone(),
                          same_on_all_ranks(model.vq.embeddings.weight))
        results["compile"] = runs

        # Restart candidates: every code but one is far from both ranks' data, so all but one are
        # re-seeded after one step, from rows gathered from both ranks.
        from vqfast import VectorQuantizer

        torch.manual_seed(0)
        vq = VectorQuantizer(8, 2, dead_code_threshold=0.5, usage_decay=0.5)
        with torch.no_grad():
            vq.embeddings.weight.fill_(100.0)
            vq.embeddings.weight[0] = 0.0
        torch.manual_seed(2000 + rank)
        batch = torch.randn(16, 2) + (5.0 if rank == 0 else -5.0)
        vq(batch)
        results["restart"] = {"weight": vq.embeddings.weight.detach().clone(), "batch": batch}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks leave together: a rank that tears gloo down while its peer is still reading the
        # last collective makes the peer abort.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_codebooks_identical_across_ranks(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    names = ["ema", "codebook-loss"]
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):  # set by conftest.py without a GPU
        names += ["ema (triton)", "codebook-loss (triton)"]
    for name in names:
        assert r0[name]["steps"] == r1[name]["steps"] == 4
        assert torch.equal(r0[name]["weight"], r1[name]["weight"]), name
        assert r0[name]["same"] and r1[name]["same"]
        for key, value in r0[name]["buffers"].items():
            assert torch.equal(value, r1[name]["buffers"][key]), (name, key)
        # Statistics count both ranks' rows: 16 rows per rank per step.
        assert int(r0[name]["buffers"]["batch_counts"].sum()) == 32
    for r in (r0, r1):
        eager_losses, eager_weight, _ = r["compile"]["eager"]
        compiled_losses, compiled_weight, compiled_same = r["compile"]["compiled"]
        torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(compiled_weight, eager_weight, rtol=1e-5, atol=1e-6)
        assert compiled_same
    weight = r0["restart"]["weight"]
    assert torch.equal(weight, r1["restart"]["weight"])
    source = []
    for code in weight[1:]:
        hits = [r for r, res in enumerate((r0, r1)) if (res["restart"]["batch"] - code).abs().sum(1).min() < 1e-6]
        assert len(hits) == 1, code  # each restarted code is an encoder output of one rank's batch
        source += hits
    assert set(source) == {0, 1}
    # The control: without the sync the ranks' codebooks differ (so the check above can fail).
    assert not torch.equal(r0["ema-unsynced"]["weight"], r1["ema-unsynced"]["weight"])
    assert not r0["ema-unsynced"]["same"]
