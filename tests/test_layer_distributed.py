"""Under torch.distributed (2 CPU processes, gloo), EMA statistics, k-means init and dead-code restarts are
synchronised, so every rank holds the same codebook (on the torch backend, and on the Triton kernels
where the interpreter runs them); without the sync they drift apart. The same holds
for a torch.compile'd DDP model, which trains exactly like the eager one. And the codebook they share
is the right one: ranks fed the halves of each batch end where one process fed the whole batches does."""

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


class _ResidualModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from vqfast import ResidualVectorQuantizer

        self.encoder = nn.Linear(6, 4)
        self.rvq = ResidualVectorQuantizer(3, 12, 4, quantizer_dropout=0.5, init="kmeans", kmeans_iters=2,
                                           dead_code_threshold=0.5, usage_decay=0.5)

    def forward(self, x):
        z_q, loss, indices = self.rvq(self.encoder(x))
        return (z_q - 1).pow(2).mean() + loss, int((indices[0] >= 0).sum())


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

        # A residual VQ with quantizer dropout under DDP: the ranks must draw the same stages (the used
        # stages synchronise their statistics, so different draws would hang the collectives) and keep
        # identical codebooks in every stage.
        torch.manual_seed(0)
        model = _ResidualModel()
        ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False, find_unused_parameters=True)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        torch.manual_seed(4000 + rank)
        used = []
        for _ in range(6):
            loss, stages = ddp(torch.randn(16, 6) * (1 + rank) + 3 * rank)
            opt.zero_grad()
            loss.backward()
            opt.step()
            used.append(stages)
        results["residual"] = {"used": used, "weights": [q.embeddings.weight.detach().clone() for q in model.rvq.quantizers]}

        # Restart candidates: every code but one is far from both ranks' data, so all but one are
        # re-seeded after one step, from rows gathered from both ranks.
        results["restart"] = _restart_step(8, 16, 2000 + rank, rank)
        # Batches of different sizes (4 rows on rank 0, 3 on rank 1) for 15 dead codes: the ranks gather
        # seed rows of one shape and re-seed the same 7 codes, one from each row.
        results["restart-uneven"] = _restart_step(16, 4 - rank, 3000 + rank, rank)
        # The same with 6 rows on each rank, of which a padding mask keeps 4 and 3.
        results["restart-masked"] = _restart_step(16, 6, 3500 + rank, rank, kept=4 - rank)
        # A rank with no rows on some steps (the end of an uneven shard, say) still joins the collectives.
        results["empty-rank"] = _empty_rank_run(rank)

        # A copy (say, an EMA model's) of a layer on a group of its own shares the group and keeps syncing.
        results["deepcopy-group"] = _deepcopied_group_run(rank, world)

        # Rank r trains on the r-th half of every batch (test_synced_statistics_match_one_process).
        half = 32 // world
        batches = [x[rank * half:(rank + 1) * half] for x in _value_batches()]
        # same_on_all_ranks compares bits: the same NaN is the same, 0.0 and -0.0 are not.
        nan_everywhere = torch.tensor([1.0, float("nan")])
        zero_by_rank = torch.tensor([0.0 if rank == 0 else -0.0])
        results["bits"] = {"nan": same_on_all_ranks(nan_everywhere), "signed-zero": same_on_all_ranks(zero_by_rank),
                           "rank-value": same_on_all_ranks(torch.tensor([float(rank)]))}

        results["values"] = {}
        for backend, name in _value_runs():
            os.environ["VQFAST_BACKEND"] = backend
            results["values"][backend, name] = _value_run(VALUE_CONFIGS[name], batches, rank, ddp=True)
        os.environ["VQFAST_BACKEND"] = "torch"
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks leave together: a rank that tears gloo down while its peer is still reading the
        # last collective makes the peer abort.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _empty_rank_run(rank: int) -> dict:
    """Training forwards of an EMA layer with k-means over two batches and restarts, where rank 1 has no
    rows on steps 0 and 2; after each, a collective of the caller's, which a collective the layer
    skipped on one rank would pair with (gloo then aborts)."""
    from vqfast import VectorQuantizer

    torch.manual_seed(0)
    vq = VectorQuantizer(16, 3, ema=True, init="kmeans", kmeans_batches=2, dead_code_threshold=0.5)
    torch.manual_seed(5000 + rank)
    for step in range(4):
        rows = 0 if rank == 1 and step in (0, 2) else 12
        vq(torch.randn(rows, 3) + rank)
        dist.all_reduce(torch.ones(1))
    return {"weight": vq.embeddings.weight.detach().clone(),
            "buffers": {k: v.clone() for k, v in vq.named_buffers()}, "initialized": bool(vq.initialized)}


def _restart_step(k: int, rows: int, seed: int, rank: int, kept: int | None = None) -> dict:
    """One training step of a layer with K codes of which only code 0 (at the origin) is near this rank's
    ``rows`` rows (around +5 on rank 0, -5 on rank 1): the codes after the step and the batch. ``kept``:
    a mask keeps the first ``kept`` rows, the others are padding (-77); the batch returned is the kept rows."""
    from vqfast import VectorQuantizer

    torch.manual_seed(0)
    vq = VectorQuantizer(k, 2, dead_code_threshold=0.5, usage_decay=0.5)
    with torch.no_grad():
        vq.embeddings.weight.fill_(100.0)
        vq.embeddings.weight[0] = 0.0
    torch.manual_seed(seed)
    batch = torch.randn(rows, 2) + (5.0 if rank == 0 else -5.0)
    if kept is None:
        vq(batch)
    else:
        mask = torch.arange(rows) < kept
        batch = torch.where(mask[:, None], batch, -77.0)
        vq(batch, mask=mask)
        batch = batch[:kept]
    return {"weight": vq.embeddings.weight.detach().clone(), "batch": batch}


def _deepcopied_group_run(rank: int, world: int) -> dict:
    import copy

    from vqfast import VectorQuantizer
    from vqfast.distributed import same_on_all_ranks

    group = dist.new_group(list(range(world)))
    torch.manual_seed(0)
    layer = VectorQuantizer(12, 4, ema=True, decay=0.5, process_group=group)
    twin = copy.deepcopy(layer)
    torch.manual_seed(5000 + rank)
    twin(torch.randn(16, 4) * (1 + rank) + 3 * rank)
    return {"shared": twin.process_group is group, "same": same_on_all_ranks(twin.embeddings.weight),
            "moved": not torch.equal(twin.embeddings.weight, layer.embeddings.weight),
            "weight": twin.embeddings.weight.detach().clone()}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_NEEDS_GLOO = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    """What each of the two ranks ends with (one spawn for the module: starting the ranks costs more
    than their runs)."""
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


@_NEEDS_GLOO
def test_codebooks_identical_across_ranks(rank_results):
    r0, r1 = rank_results
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


@_NEEDS_GLOO
def test_residual_stages_and_codebooks_identical_across_ranks(rank_results):
    r0, r1 = (r["residual"] for r in rank_results)
    assert r0["used"] == r1["used"] and len(set(r0["used"])) > 1  # dropout drew, the same on both ranks
    for stage, (w0, w1) in enumerate(zip(r0["weights"], r1["weights"])):
        assert torch.equal(w0, w1), stage


@_NEEDS_GLOO
def test_same_on_all_ranks_compares_bits(rank_results):
    for results in rank_results:
        assert results["bits"] == {"nan": True, "signed-zero": False, "rank-value": False}


@_NEEDS_GLOO
def test_a_rank_without_rows_keeps_step_with_the_others(rank_results):
    r0, r1 = (r["empty-rank"] for r in rank_results)
    assert r0["initialized"] and r1["initialized"]
    assert torch.equal(r0["weight"], r1["weight"]) and bool(torch.isfinite(r0["weight"]).all())
    for name, value in r0["buffers"].items():
        assert torch.equal(value, r1["buffers"][name]), name


@_NEEDS_GLOO
@pytest.mark.parametrize("case", ["restart-uneven", "restart-masked"])
def test_restarts_with_batches_of_different_sizes_on_the_ranks(rank_results, case):
    r0, r1 = (r[case] for r in rank_results)
    weight = r0["weight"]
    assert torch.equal(weight, r1["weight"])
    rows = torch.cat([r0["batch"], r1["batch"]])
    restarted = weight[1:][(weight[1:] != 100.0).any(1)]
    assert restarted.shape[0] == rows.shape[0] == 7
    hits = (restarted[:, None, :] - rows[None]).abs().sum(-1) < 1e-6  # (code, row)
    assert (hits.sum(0) == 1).all() and (hits.sum(1) == 1).all()


@_NEEDS_GLOO
def test_a_deepcopy_shares_the_process_group(rank_results):
    r0, r1 = (r["deepcopy-group"] for r in rank_results)
    assert r0["shared"] and r1["shared"] and r0["moved"]
    assert r0["same"] and r1["same"] and torch.equal(r0["weight"], r1["weight"])


# Identical codebooks are not enough: a sync that scales the summed statistics (by the world size,
# say) keeps the ranks identical, and wrong. Two ranks fed the halves of each batch must end where one
# process fed the whole batches does. No restarts: their rows are random draws, which differ anyway.
# EMA decay 0.5: each step moves the codes far, so a wrong sum shows in the codes, not only in the
# last digits.
VALUE_CONFIGS = {
    "ema": dict(ema=True, decay=0.5, dead_code_threshold=0, usage_decay=0.5),
    "ema-kmeans": dict(ema=True, decay=0.5, init="kmeans", kmeans_iters=2, dead_code_threshold=0, usage_decay=0.5),
    "codebook-loss": dict(dead_code_threshold=0, usage_decay=0.5),
    "codebook-loss-kmeans": dict(init="kmeans", kmeans_iters=2, dead_code_threshold=0, usage_decay=0.5),
}
# Rank r draws its k-means seed rows after torch.manual_seed(_SEED_ROWS_SEED + r).
_SEED_ROWS_SEED = 100


def _value_runs() -> list[tuple[str, str]]:
    """(backend, config) pairs: the EMA statistics kernels too (interpreted) where the interpreter runs them."""
    runs = [("torch", name) for name in VALUE_CONFIGS]
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        runs += [("triton", name) for name in VALUE_CONFIGS if VALUE_CONFIGS[name].get("ema")]
    return runs


def _value_batches() -> list[torch.Tensor]:
    """Two fixed batches of 32 rows (rank r gets rows 16 r to 16 r + 15 of each)."""
    g = torch.Generator().manual_seed(7)
    return [torch.randn(32, 3, generator=g) * 2 + torch.tensor([1.0, -1.0, 0.5]) for _ in range(2)]


def _value_run(kwargs: dict, batches: list[torch.Tensor], rank: int = 0, ddp: bool = False,
               seed_rows: torch.Tensor | None = None) -> dict:
    """Trains a fresh layer (the same codes in every process) on ``batches``; returns its state."""
    from vqfast import VectorQuantizer

    torch.manual_seed(0)
    vq = VectorQuantizer(8, 3, **kwargs)
    if seed_rows is not None:
        # k-means seeds are random rows, drawn on each rank from its own half: given the rows the ranks
        # drew, one process must reach the same centroids.
        vq._random_rows = lambda x, count, prepare=None, prefer=None: seed_rows[:count]
    # The codebook-loss gradient is averaged by DDP, the EMA statistics by the layer.
    step = nn.parallel.DistributedDataParallel(vq, broadcast_buffers=False) if ddp and not vq.ema else vq
    opt = None if vq.ema else torch.optim.SGD(vq.parameters(), lr=0.5)
    torch.manual_seed(_SEED_ROWS_SEED + rank)
    indices = []
    for x in batches:
        _, loss, idx = step(x)
        if opt is not None:
            opt.zero_grad()
            loss.backward()
            opt.step()
        indices.append(idx)
    return {"weight": vq.embeddings.weight.detach().clone(),
            **{k: v.clone() for k, v in vq.named_buffers()},
            "indices": indices}


def _drawn_seed_rows(k: int, world: int) -> torch.Tensor:
    """The k-means seed rows of the distributed run: each rank draws ceil(k / world) of its own rows
    (distinct rows: it has enough) with its own seed, gathered interleaved (row i * world + r is rank
    r's row i)."""
    half = 32 // world
    x = _value_batches()[0]
    drawn = []
    for rank in range(world):
        torch.manual_seed(_SEED_ROWS_SEED + rank)
        drawn.append(x[rank * half:(rank + 1) * half][torch.randperm(half)[:-(-k // world)]])
    return torch.stack(drawn, 1).flatten(0, 1)[:k]


@_NEEDS_GLOO
def test_synced_statistics_match_one_process(rank_results, monkeypatch):
    batches = _value_batches()
    for backend, name in _value_runs():
        monkeypatch.setenv("VQFAST_BACKEND", backend)
        kwargs = VALUE_CONFIGS[name]
        seed_rows = _drawn_seed_rows(8, 2) if kwargs.get("init") == "kmeans" else None
        expected = _value_run(kwargs, batches, seed_rows=seed_rows)
        assert int(expected["batch_counts"].sum()) == 32 and int(expected["usage_steps"]) == 2
        runs = [r["values"][backend, name] for r in rank_results]
        # The ranks' codes for their halves are the codes of the whole batch.
        indices = [torch.cat(pair) for pair in zip(*(run["indices"] for run in runs))]
        for run in runs:
            # Sums over the ranks' halves are added in another order than one sum over the batch.
            torch.testing.assert_close({**run, "indices": indices}, expected, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, run_name=f"{name} ({backend})": f"{run_name}: {m}")
