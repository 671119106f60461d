"""torch.compile(fullgraph=True) of a small VQ-VAE training step gives the eager losses: the layer has
no graph breaks (no .item(), no data-dependent Python branches) on either backend."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import triton_usable
from vqfast import VectorQuantizer


class TinyVQVAE(nn.Module):
    def __init__(self, **vq_kwargs) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
        self.vq = VectorQuantizer(16, 4, **vq_kwargs)
        self.decoder = nn.Sequential(nn.ConvTranspose2d(4, 3, 4, stride=2, padding=1), nn.Sigmoid())

    def forward(self, x):
        z_q, vq_loss, indices = self.vq(self.encoder(x))
        recon = self.decoder(z_q)
        return F.mse_loss(recon, x) + vq_loss, indices


def _train(model, step_fn, batches):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for i, x in enumerate(batches):
        torch.manual_seed(100 + i)  # the same random restart candidates in both runs
        loss, _ = step_fn(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


CONFIGS = {
    "defaults": dict(),
    "ema-kmeans-entropy": dict(ema=True, init="kmeans", kmeans_iters=2, sample_entropy_weight=0.1,
                               batch_entropy_weight=0.1, dead_code_threshold=0.5),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_compiled_training_step_matches_eager(monkeypatch, backend, config):
    if backend == "triton" and not triton_usable():
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    device = "cuda" if backend == "triton" and not interp else "cpu"
    monkeypatch.setenv("VQFAST_BACKEND", backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = TinyVQVAE(**CONFIGS[config]).to(device)
    compiled_model = copy.deepcopy(eager)
    g = torch.Generator().manual_seed(1)
    batches = [torch.rand(2, 3, 8, 8, generator=g).to(device) for _ in range(3)]

    eager_losses = _train(eager, eager, batches)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    compiled_losses = _train(compiled_model, compiled, batches)

    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_model.vq.embeddings.weight, eager.vq.embeddings.weight,
                               rtol=1e-5, atol=1e-6)
    for name, buf in eager.vq.named_buffers():
        torch.testing.assert_close(dict(compiled_model.vq.named_buffers())[name], buf, rtol=1e-5, atol=1e-6)
    assert int(compiled_model.vq.usage_steps) == 3


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_public_ops_compile_without_graph_breaks(monkeypatch, backend):
    """Each public op under torch.compile(fullgraph=True) gives its eager result: gather and code_usage
    included, whose eager range checks read the indices on the host."""
    import vqfast

    if backend == "triton" and not triton_usable():
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("VQFAST_BACKEND", backend)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(16, 4, generator=g).to(device)
    z = torch.randn(10, 4, generator=g).to(device)
    indices = torch.randint(0, 16, (2, 5), generator=g).to(device)
    layer = VectorQuantizer(16, 4).to(device)
    cases = {
        "nearest_code": lambda c: vqfast.nearest_code(z, c),
        "gather": lambda c: vqfast.gather(c, indices),
        "code_usage": lambda c: vqfast.code_usage(indices, 16),
        "quantize": lambda c: vqfast.quantize(z, c),
        "quantize with indices": lambda c: vqfast.quantize(z, c, indices=indices.reshape(-1)),
        "codes_from_indices": lambda c: layer.codes_from_indices(indices),
    }
    for name, op in cases.items():
        torch._dynamo.reset()
        eager = op(codebook)
        compiled = torch.compile(op, fullgraph=True, backend="aot_eager")(codebook)
        for e, c in zip(eager if isinstance(eager, tuple) else (eager,), compiled if isinstance(compiled, tuple) else
                        (compiled,)):
            torch.testing.assert_close(c, e, msg=name)
    if backend == "torch":  # compiled, the CPU backend checks the range where the graph runs
        # (On the CPU: on a GPU a bad index is a device-side assert, which ends the process's CUDA use.)
        cpu_codebook = codebook.cpu()
        for bad in (torch.tensor([0, 16]), torch.tensor([0, -1])):
            for op in (lambda i: vqfast.gather(cpu_codebook, i), lambda i: vqfast.code_usage(i, 16),
                       lambda i: vqfast.quantize(torch.zeros(2, 4), cpu_codebook, indices=i)):
                torch._dynamo.reset()
                with pytest.raises(RuntimeError, match=r"must lie in \[0, 16\)"):
                    torch.compile(op, fullgraph=True, backend="aot_eager")(bad)
        # Inductor's own index_add_ wraps a negative index into range (counting it as code 15): the
        # assertion must stop it there too.
        torch._dynamo.reset()
        with pytest.raises(RuntimeError, match=r"must lie in \[0, 16\)"):
            torch.compile(lambda i: vqfast.code_usage(i, 16), fullgraph=True)(torch.tensor([0, -1]))
    # The gradient of a compiled gather reaches the codebook as in eager.
    torch._dynamo.reset()
    leaf = codebook.clone().requires_grad_()
    torch.compile(lambda c: vqfast.gather(c, indices).sum(), fullgraph=True, backend="aot_eager")(leaf).backward()
    expected = torch.bincount(indices.reshape(-1).cpu(), minlength=16).float()[:, None].expand(16, 4)
    torch.testing.assert_close(leaf.grad.cpu(), expected)


@pytest.mark.parametrize("compiler,options", [
    ("aot_eager", dict(metric="cosine")),  # restarts rewrite codes the step's backward reads
    ("inductor", dict(ema=True)),  # the EMA update rewrites the codebook after the step
    ("inductor", dict(sample_entropy_weight=0.1, batch_entropy_weight=0.2)),
], ids=["aot_eager-cosine-restarts", "inductor-ema", "inductor-entropy"])
def test_compiled_gradients_see_the_codebook_the_step_searched(device, compiler, options):
    """The step's upkeep rewrites the codebook in place inside the compiled graph; the backward must
    still read the codes of the step (a plain clone of them the compiler may recompute afterwards, or
    drop), so z's and the codebook's gradients are the eager ones."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = VectorQuantizer(8, 4, **options).to(device)
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, backend=compiler, fullgraph=True)
    for step in range(2):
        x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1 + step)).to(device)
        grads = []
        for layer, call in ((eager, eager), (compiled_layer, compiled)):
            xx = x.clone().requires_grad_(True)
            layer.embeddings.weight.grad = None
            torch.manual_seed(100 + step)  # the same restart draws
            z_q, loss, _ = call(xx)
            (loss + z_q.square().sum()).backward()
            grads.append((xx.grad, layer.embeddings.weight.grad))
        (gz, gc), (gz1, gc1) = grads
        torch.testing.assert_close(gz1, gz, rtol=1e-4, atol=1e-6)
        if gc is None:
            assert gc1 is None
        else:
            torch.testing.assert_close(gc1, gc, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(compiled_layer.embeddings.weight, eager.embeddings.weight, rtol=1e-5, atol=1e-6)


def test_dynamic_shapes_compile_without_graph_breaks_or_a_graph_per_batch_size(device):
    """torch.compile(dynamic=True) makes numbers such as beta symbolic (their checks must not break the
    graph), and the CPU reference's soft-assignment entropy must not tie the graph to the batch size."""
    import vqfast
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    for metric in ("l2", "cosine"):
        z, c = torch.randn(2, 7, 3, device=device), torch.randn(5, 3, device=device)
        # (beta left at its default: dynamic=True makes it a symbolic float)
        compiled = torch.compile(lambda z, c: vqfast.quantize(z, c, metric=metric), fullgraph=True,
                                 dynamic=True, backend="aot_eager")
        for got, want in zip(compiled(z, c), vqfast.quantize(z, c, metric=metric)):
            torch.testing.assert_close(got, want)
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = VectorQuantizer(8, 4, sample_entropy_weight=0.1, batch_entropy_weight=0.1, ema=True).to(device)
    layer = copy.deepcopy(eager)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for n in range(9, 15):  # (more rows than codes: how the restarts draw seed rows depends on that)
        x = torch.randn(n, 4, device=device)
        torch.manual_seed(n)
        want = eager(x)
        torch.manual_seed(n)
        got = compiled(x)
        assert torch.equal(got[2], want[2])
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    # A static graph for the first size, then one dynamic one (forward graphs only: no backward here).
    assert counters["stats"]["unique_graphs"] <= 2, counters["stats"]


@pytest.mark.parametrize("ema", [False, True])
def test_dynamic_true_compile_of_a_training_layer_matches_eager(torch_backend, ema):
    """With dynamic=True the layer's decays are symbolic floats too: the CPU backend's statistics round
    them with torch ops (plain Python cannot pack a symbolic float, and Dynamo's struct recursed without
    end; the Triton kernels round them themselves)."""
    device = "cpu"
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = VectorQuantizer(8, 4, ema=ema, decay=0.7 if ema else 0.99, usage_decay=0.9,
                            dead_code_threshold=0.5).to(device)
    layer = copy.deepcopy(eager)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    for step, n in enumerate((5, 7, 9, 6, 11)):
        x = torch.randn(n, 4, device=device) * 3
        torch.manual_seed(step)
        want = eager(x)
        torch.manual_seed(step)
        got = compiled(x)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    for name, value in eager.state_dict().items():
        assert torch.equal(layer.state_dict()[name], value), name
    assert int(layer.usage_steps) == 5


_FRESH_PROCESS_COMPILE = """
import sys

import torch
import vqfast
from vqfast import ResidualVectorQuantizer, VectorQuantizer

device = sys.argv[1]
z = torch.randn(6, 4, device=device, requires_grad=True)
c = torch.randn(8, 4, device=device)
out = torch.compile(vqfast.quantize, fullgraph=True, backend="aot_eager")(z, c)
assert torch.equal(out[2], vqfast.quantize(z, c)[2])
for layer in (VectorQuantizer(8, 4), VectorQuantizer(8, 4, ema=True), ResidualVectorQuantizer(2, 8, 4)):
    z_q, loss, _ = torch.compile(layer.to(device), fullgraph=True, backend="aot_eager")(z)
    (z_q.sum() + loss).backward()
print("compiled")
"""


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fullgraph_compile_as_the_first_call_of_a_fresh_process(backend):
    """The modules that hold the custom ops are imported lazily, here inside the traced frame (the test
    suite imports them earlier); and the straight-through function used by the EMA loss and the
    residual chain must have no forward-mode rule while compiling (Dynamo refuses one)."""
    import subprocess
    import sys

    if backend == "triton" and not triton_usable():
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    device = "cuda" if backend == "triton" and not interp else "cpu"
    env = dict(os.environ, VQFAST_BACKEND=backend)
    done = subprocess.run([sys.executable, "-c", _FRESH_PROCESS_COMPILE, device], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("train", [True, False])
def test_default_compile_mode_finds_no_graph_break_in_the_layer(train, monkeypatch):
    """torch.compile as most users call it (fullgraph=False) breaks the graph silently where
    fullgraph=True would not always refuse (a Python float read from a tensor was one): count them."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("VQFAST_BACKEND", "torch")
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    layer = VectorQuantizer(32, 8, ema=True).train(train)
    z = torch.randn(64, 8, requires_grad=True)
    z_q, loss, _ = torch.compile(layer, backend="eager")(z)
    (z_q.sum() + loss).backward()
    assert dict(counters["graph_break"]) == {}
    assert int(layer.usage_steps) == (1 if train else 0)
