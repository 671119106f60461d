"""Every registered op (``torch.ops.vqfast.*``) passes ``torch.library.opcheck``: its schema (what it
mutates is declared), its fake implementation (shapes, dtypes and strides as the real kernel gives
them, which torch.compile relies on) and its behaviour under AOT dispatch with dynamic shapes.

The ops run the real Triton kernels (through the interpreter without a GPU). Autograd is not part of
these ops (vqfast's autograd Functions wrap them), so their inputs here do not require grad.
"""

from __future__ import annotations

import pytest
import torch

import vqfast.layer as layer
import vqfast.ops as ops
import vqfast.ops_layer as ops_layer
import vqfast.reference as reference

K, D = 11, 5


def _cases(device: torch.device) -> dict[str, tuple]:
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    z, c = randn(7, D), randn(K, D)
    idx = torch.randint(0, K, (7,), generator=gen).to(device)
    counts = torch.cat([torch.bincount(idx, minlength=K), torch.tensor([7], device=device)])
    row_max, log_sum, ent, _ = ops_layer.soft_entropy_forward(z, c, 0.5, "ieee")
    strided_z = randn(7, 2 * D)[:, ::2]  # rows with a column stride of 2
    return {
        "nearest_code": (ops.nearest_code, (z, c, "ieee", 0)),
        "nearest_code fp16 split": (ops.nearest_code, (z.half(), c.half(), "ieee", 2)),
        "nearest_code strided": (ops.nearest_code, (strided_z, c, "ieee", 0)),
        "gather_rows": (ops.gather_rows, (c, idx)),
        "scatter_add_rows": (ops.scatter_add_rows, (randn(7, D).half(), idx, K, torch.float32)),
        "code_usage": (ops.code_usage, (idx, K)),
        "bincount": (ops.bincount, (idx, K)),
        "quantize_forward": (ops.quantize_forward, (z, c, idx, 0.25)),
        "quantize_backward": (ops.quantize_backward, (randn(7, D), torch.tensor(1.0, device=device), z, c, idx,
                                                      0.25, True)),
        "quantize_backward no codebook grad": (ops.quantize_backward, (None, torch.tensor(1.0, device=device), z, c,
                                                                       idx, 0.25, False)),
        "soft_entropy_forward": (ops_layer.soft_entropy_forward, (z, c, 0.5, "ieee")),
        "soft_entropy_backward": (ops_layer.soft_entropy_backward, (z, c, row_max, log_sum, ent, randn(K),
                                                                    torch.tensor(0.3, device=device), 0.5, "ieee",
                                                                    True)),
        "finite_row_counts": (ops_layer.finite_row_counts, (idx, randn(7).abs(), K)),
        "update_code_usage": (ops_layer.update_code_usage, (
            counts, torch.rand(K, generator=gen).to(device), torch.zeros(K, device=device),
            torch.zeros(K, dtype=torch.int64, device=device), torch.tensor(3.0, device=device), 0.99, 0.5,
            randn(4, D), randn(K, D), None)),
        "ema_update": (ops_layer.ema_update, (randn(K, D), torch.rand(K, generator=gen).to(device) + 0.5,
                                              randn(K, D), counts, 0.99, 1e-5)),
        # The CPU search (its data-dependent re-check stays out of compiled graphs) and the layer's copy
        # of the codebook that the compiler may not fold away.
        "reference_nearest_code": (reference._nearest_code_rows, (z.cpu(), c.cpu(), "l2", torch.float32)),
        "reference_nearest_code cosine float64": (reference._nearest_code_rows,
                                                  (z.cpu(), c.cpu(), "cosine", torch.float64)),
        "snapshot": (layer._snapshot_op, (c,)),
    }


NAMES = ["nearest_code", "nearest_code fp16 split", "nearest_code strided", "gather_rows", "scatter_add_rows",
         "code_usage", "bincount", "quantize_forward", "quantize_backward", "quantize_backward no codebook grad",
         "soft_entropy_forward", "soft_entropy_backward", "finite_row_counts", "update_code_usage", "ema_update",
         "reference_nearest_code", "reference_nearest_code cosine float64", "snapshot"]


def test_every_registered_op_is_covered():
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("vqfast::")}
    assert registered == {name.split()[0] for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_opcheck(name, kernel_device):
    op, args = _cases(kernel_device)[name]
    results = torch.library.opcheck(op, args)
    assert set(results.values()) == {"SUCCESS"}, results
