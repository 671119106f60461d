"""torch.export: an exported layer or VQ-VAE gives the eager outputs, and a saved program loads in a
fresh process once ``vqfast.register_ops()`` has registered the ops it names."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import vqfast
from vqfast import ResidualVectorQuantizer, VectorQuantizer
from vqfast.models import ConvVQVAE


def _run(code: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "VQFAST_BACKEND": "torch"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _trained_eval_modules() -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    modules = {"layer": (VectorQuantizer(16, 8, channel_dim=1), torch.randn(2, 8, 3, 5)),
               "residual": (ResidualVectorQuantizer(3, 16, 8), torch.randn(12, 8)),
               "vqvae": (ConvVQVAE(num_embeddings=32, embedding_dim=8), torch.rand(2, 3, 32, 32))}
    for module, x in modules.values():
        module(x.clone())  # a training step first: codes and statistics as a trained model holds them
        module.eval()
    return modules


def test_exported_programs_give_the_eager_outputs_also_loaded_in_a_fresh_process(tmp_path, torch_backend):
    for name, (module, x) in _trained_eval_modules().items():
        program = torch.export.export(module, (x,))
        expected = module(x)
        for a, b in zip(program.module()(x), expected):
            assert torch.equal(a, b), name
        torch.export.save(program, tmp_path / f"{name}.pt2")
        torch.save((x, expected), tmp_path / f"{name}.pt")
    # A fresh process: a bare import registers no op; register_ops registers every op that importing
    # all of the package does, and the saved programs then load and run.
    out = _run("""
        import torch, vqfast
        before = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("vqfast::")]
        names = vqfast.register_ops()
        for name in ("layer", "residual", "vqvae"):
            program = torch.export.load(name + ".pt2")
            x, expected = torch.load(name + ".pt")
            print(name, all(torch.equal(a, b) for a, b in zip(program.module()(x), expected)))
        import vqfast.functional, vqfast.layer, vqfast.ops, vqfast.ops_layer, vqfast.reference, vqfast.residual
        import vqfast.models
        after = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("vqfast::"))
        print(len(before), names == after, len(names))
    """, tmp_path)
    lines = out.splitlines()
    assert lines[:3] == ["layer True", "residual True", "vqvae True"]
    before, same, count = lines[3].split()
    assert before == "0" and same == "True" and int(count) >= 10


def test_exported_training_layer_steps_as_the_eager_one(torch_backend):
    # A training forward rewrites statistics and codes (restarts) in place: the exported program does
    # what the eager layer does, buffers included.
    torch.manual_seed(0)
    eager = VectorQuantizer(16, 8)
    exported = VectorQuantizer(16, 8)
    exported.load_state_dict(eager.state_dict())
    program = torch.export.export(exported, (torch.randn(32, 8),)).module()
    for step in range(3):
        z = torch.randn(32, 8, requires_grad=True)
        torch.manual_seed(step)
        expected = eager(z)
        torch.manual_seed(step)
        got = program(z)
        for a, b in zip(got, expected):
            assert torch.equal(a, b)
    eager_state = eager.state_dict()
    for name, value in program.state_dict().items():
        assert torch.equal(value, eager_state[name]), name
    assert vqfast.register_ops()
