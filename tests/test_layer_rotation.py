"""The rotation trick (``VectorQuantizer(gradient="rotation")``, :func:`vqfast.rotate_to_codes`): the value
is the code exactly, and the gradient reaching z is that of the rotation and scaling that carries z onto
its code, held constant (Fifty et al., 2024); the losses, indices and codebook gradients are the
straight-through layer's."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from helpers import triton_usable
from vqfast import ResidualVectorQuantizer, VectorQuantizer, reference, rotate_to_codes


def _rotation_matrices(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per row, lambda M with M = I - 2 r r^T + 2 q^ z^T and lambda = |q| / |z|: (N, D, D), float64."""
    z, q = z.double(), q.double()
    z_norm, q_norm = z.norm(dim=-1, keepdim=True), q.norm(dim=-1, keepdim=True)
    z_unit, q_unit = z / z_norm, q / q_norm
    r = (z_unit + q_unit) / (z_unit + q_unit).norm(dim=-1, keepdim=True)
    eye = torch.eye(z.shape[-1], dtype=torch.float64, device=z.device)
    m = eye - 2 * r[:, :, None] * r[:, None, :] + 2 * q_unit[:, :, None] * z_unit[:, None, :]
    return (q_norm / z_norm)[:, :, None] * m


def test_the_value_is_the_code_and_the_gradient_the_rotations():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.randn(9, 5, generator=g, dtype=torch.float64)
    upstream = torch.randn(9, 5, generator=g, dtype=torch.float64)
    out = rotate_to_codes(z, q)
    assert torch.equal(out, q)
    out.mul(upstream).sum().backward()
    rotation = _rotation_matrices(z.detach(), q)
    # The rotation itself carries z onto q ...
    torch.testing.assert_close(torch.einsum("nij,nj->ni", rotation, z.detach()), q)
    # ... and the gradient is its transpose applied to the upstream one.
    torch.testing.assert_close(z.grad, torch.einsum("nji,nj->ni", rotation, upstream))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reduced_precision_rows_are_rotated_in_fp32(dtype):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 8, generator=g).to(dtype).requires_grad_(True)
    q = torch.randn(6, 8, generator=g).to(dtype)
    upstream = torch.randn(6, 8, generator=g).to(dtype)
    rotate_to_codes(z, q).backward(upstream)
    assert z.grad.dtype == dtype
    expected = torch.einsum("nji,nj->ni", _rotation_matrices(z.detach(), q), upstream.double())
    torch.testing.assert_close(z.grad.double(), expected.to(dtype).double(), rtol=1e-3 if dtype == torch.float16 else 1e-5,
                               atol=1e-3 if dtype == torch.float16 else 1e-6)


def test_rows_without_a_rotation_take_the_straight_through_gradient():
    z = torch.tensor([[0.0, 0.0], [1.0, 2.0], [1.0, 0.0], [float("nan"), 1.0], [3.0, 4.0]], requires_grad=True)
    q = torch.tensor([[1.0, 1.0], [0.0, 0.0], [-2.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    upstream = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 10.0]])
    out = rotate_to_codes(z, q)
    out.backward(upstream)
    assert torch.equal(out, q)
    # z = 0, q = 0, q opposite z, a NaN row: straight through. z = q: the identity rotation.
    assert torch.equal(z.grad, upstream)


def test_bad_arguments():
    with pytest.raises(ValueError, match="same shape"):
        rotate_to_codes(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(TypeError, match="floating"):
        rotate_to_codes(torch.ones(3, 4, dtype=torch.int64), torch.randn(3, 4))
    with pytest.raises(ValueError, match="gradient must be one of"):
        VectorQuantizer(8, 4, gradient="ste")
    with pytest.raises(ValueError, match="gradient must be one of"):
        ResidualVectorQuantizer(2, 8, 4, gradient="rotate")


def _layer_step(layer, z, mask=None):
    z = z.detach().clone().requires_grad_(True)
    z_q, loss, indices = layer(z) if mask is None else layer(z, mask=mask)
    upstream = torch.linspace(-1.0, 1.0, z_q.numel(), device=z.device).reshape(z_q.shape)
    (z_q * upstream).sum().backward(retain_graph=True)
    grad_from_zq = z.grad.clone()
    z.grad = None
    loss.backward()
    grad_c = layer.embeddings.weight.grad
    return z_q.detach(), loss.detach(), indices, grad_from_zq, z.grad, None if grad_c is None else grad_c.clone(), upstream


@pytest.mark.parametrize("options", [dict(), dict(ema=True), dict(metric="cosine")], ids=["codebook-loss", "ema", "cosine"])
def test_layer_rotates_only_the_gradient_that_reaches_z_through_z_q(device, options):
    torch.manual_seed(2)
    straight = VectorQuantizer(16, 4, dead_code_threshold=0.0, **options).to(device)
    rotated = copy.deepcopy(straight)
    rotated.gradient = "rotation"
    z = torch.randn(3, 5, 4, device=device)

    z_q, loss, indices, from_zq, from_loss, grad_c, upstream = _layer_step(rotated, z)
    z_q1, loss1, indices1, from_zq1, from_loss1, grad_c1, _ = _layer_step(straight, z)
    assert torch.equal(z_q, z_q1) and torch.equal(indices, indices1) and torch.equal(loss, loss1)
    torch.testing.assert_close(from_loss, from_loss1)
    if grad_c1 is not None:
        torch.testing.assert_close(grad_c, grad_c1)
    # Through z_q: the rotation from z's rows (unit rows for the cosine metric) to their codes.
    rows = z.reshape(-1, 4).double().requires_grad_(True)
    source = reference.unit_rows(rows) if options.get("metric") == "cosine" else rows
    rotation = _rotation_matrices(source.detach(), z_q.reshape(-1, 4))
    torch.einsum("nij,nj->ni", rotation, source).mul(upstream.reshape(-1, 4).double()).sum().backward()
    torch.testing.assert_close(from_zq.reshape(-1, 4).double(), rows.grad, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(from_zq, from_zq1)  # (the straight-through gradient is the upstream one)


def test_channels_first_input_is_rotated_per_position(device):
    torch.manual_seed(3)
    vq = VectorQuantizer(8, 3, dead_code_threshold=0.0, gradient="rotation").to(device)
    x = torch.randn(2, 3, 4, 5, device=device)
    z_q, _, _, from_zq, _, _, upstream = _layer_step(vq, x)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 3)
    codes = z_q.permute(0, 2, 3, 1).reshape(-1, 3)
    expected = torch.einsum("nji,nj->ni", _rotation_matrices(rows, codes), upstream.permute(0, 2, 3, 1).reshape(-1, 3).double())
    torch.testing.assert_close(from_zq.permute(0, 2, 3, 1).reshape(-1, 3).double(), expected, rtol=1e-4, atol=1e-5)


def test_masked_rows_pass_their_gradient_straight_through(device):
    torch.manual_seed(4)
    vq = VectorQuantizer(16, 4, dead_code_threshold=0.0, gradient="rotation").to(device)
    z = torch.randn(2, 6, 4, device=device)
    mask = torch.arange(6, device=device)[None, :] < torch.tensor([[6], [2]], device=device)
    z_q, _, _, from_zq, _, _, upstream = _layer_step(vq, z, mask)
    assert torch.equal(from_zq[~mask], upstream[~mask])
    expected = torch.einsum("nji,nj->ni", _rotation_matrices(z[mask], z_q[mask]), upstream[mask].double())
    torch.testing.assert_close(from_zq[mask].double(), expected, rtol=1e-4, atol=1e-5)


def test_rotation_step_compiles_without_graph_breaks(device):
    torch.manual_seed(5)
    vq = VectorQuantizer(16, 4, dead_code_threshold=0.5, gradient="rotation").to(device)
    twin = copy.deepcopy(vq)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    z = torch.randn(3, 5, 4, device=device)
    for step in range(2):
        grads = []
        for layer in (vq, compiled):
            x = z.clone().requires_grad_(True)
            torch.manual_seed(10 + step)
            z_q, loss, _ = layer(x)
            (z_q.square().sum() + loss).backward()
            grads.append(x.grad)
        torch.testing.assert_close(grads[1], grads[0])
    torch.testing.assert_close(twin.embeddings.weight, vq.embeddings.weight)


def test_residual_chain_rotates_z_onto_the_sum_of_its_codes(device):
    torch.manual_seed(6)
    straight = ResidualVectorQuantizer(3, 16, 4, dead_code_threshold=0.0, channel_dim=1).to(device)
    rotated = ResidualVectorQuantizer(3, 16, 4, dead_code_threshold=0.0, channel_dim=1, gradient="rotation").to(device)
    rotated.load_state_dict(straight.state_dict())
    z = torch.randn(2, 4, 5, device=device)
    mask = torch.arange(5, device=device)[None, :] < torch.tensor([[5], [3]], device=device)
    outs = []
    for layer in (straight, rotated):
        x = z.clone().requires_grad_(True)
        z_q, loss, indices = layer(x, mask=mask)
        upstream = torch.linspace(-1.0, 1.0, z_q.numel(), device=device).reshape(z_q.shape)
        (z_q * upstream).sum().backward()
        outs.append((z_q.detach(), indices, x.grad, upstream))
    (z_q, indices, grad, upstream), (z_q1, indices1, grad1, _) = outs
    assert torch.equal(z_q, z_q1) and torch.equal(indices, indices1)
    assert torch.equal(grad, upstream)
    rows, codes = z.movedim(1, -1), z_q.movedim(1, -1)
    expected = torch.einsum("nji,nj->ni", _rotation_matrices(rows[mask], codes[mask]), upstream.movedim(1, -1)[mask].double())
    torch.testing.assert_close(grad1.movedim(1, -1)[mask].double(), expected, rtol=1e-4, atol=1e-5)
    # Padding (z_q = z there): the upstream gradient itself.
    assert torch.equal(grad1.movedim(1, -1)[~mask], upstream.movedim(1, -1)[~mask])


def test_double_backward_holds_the_rotation_constant_and_stays_finite():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64)
    z[1] = 0.0                      # no rotation: a zero row
    q = torch.randn(6, 5, generator=g, dtype=torch.float64)
    q[2] = -3.0 * z[2]              # no rotation: a code opposite its row
    q[3] = 0.0                      # no rotation: a zero code
    upstream = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    x = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((rotate_to_codes(x, q) * upstream).sum(), x, create_graph=True)
    grad.square().sum().backward()  # a gradient penalty
    rotation = _rotation_matrices(z, q)
    defined = torch.tensor([True, False, False, False, True, True])
    expected_grad = torch.where(defined[:, None], torch.einsum("nji,nj->ni", rotation.nan_to_num(), upstream.detach()),
                                upstream.detach())
    torch.testing.assert_close(grad.detach(), expected_grad)
    # d|A^T u|^2 / du = 2 A A^T u (A^T = I where undefined); the rotation is constant: nothing reaches z.
    expected = 2 * torch.where(defined[:, None], torch.einsum("nij,nj->ni", rotation.nan_to_num(), expected_grad),
                               expected_grad)
    torch.testing.assert_close(upstream.grad, expected)
    assert x.grad is None or bool((x.grad == 0).all())


@pytest.mark.parametrize("factor", [1e20, 1e-24])
def test_rows_far_from_unit_length_are_rotated_too(factor):
    g = torch.Generator().manual_seed(8)
    z = torch.randn(4, 6, generator=g)
    q = torch.randn(4, 6, generator=g)
    upstream = torch.randn(4, 6, generator=g)
    x = z.clone().requires_grad_(True)
    rotate_to_codes(x, q).backward(upstream)
    far = (z * factor).requires_grad_(True)
    rotate_to_codes(far, q).backward(upstream)
    # Scaling z by s scales |c| / |z| by 1 / s and leaves the rotation alone.
    torch.testing.assert_close(far.grad * factor, x.grad, rtol=1e-5, atol=1e-6)
    codes_far = (q * factor).requires_grad_(False)
    y = z.clone().requires_grad_(True)
    rotate_to_codes(y, codes_far).backward(upstream)
    torch.testing.assert_close(y.grad / factor, x.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,d", [(1, 1), (37, 5), (19, 150), (32, 128), (64, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_kernel_gives_the_pytorch_backward(monkeypatch, n, d, dtype):
    """kernels/rotation.py (the Triton backend's backward, here interpreted) against the PyTorch ops of
    the other backends, on odd shapes (D past one 128-column block) and round ones (whole blocks), and
    on rows without a rotation."""
    if not triton_usable():
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    device = "cpu" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "cuda"
    g = torch.Generator().manual_seed(9)
    z = torch.randn(n, d, generator=g) * torch.logspace(-3, 3, n)[:, None]
    q = torch.randn(n, d, generator=g)
    if n > 4:
        z[1] = 0.0                            # a zero row
        q[2] = -2.0 * z[2]                    # a code opposite its row
        z[3, 0] = float("nan")                # a row holding NaN
        q[4] = z[4] * 3.0                     # a code along its row: a scaling
    upstream = torch.randn(n, d, generator=g)
    z, q, upstream = (t.to(dtype).to(device) for t in (z, q, upstream))
    grads = {}
    calls = []
    from vqfast import kernels

    monkeypatch.setattr(kernels, "rotate_gradient", lambda *a, f=kernels.rotate_gradient: calls.append(1) or f(*a))
    for backend in ("triton", "torch"):
        monkeypatch.setenv("VQFAST_BACKEND", backend)
        x = z.clone().requires_grad_(True)
        rotate_to_codes(x, q).backward(upstream)
        grads[backend] = x.grad
    assert calls == [1]  # the Triton backend ran the kernel, the torch backend did not
    # Both against the rotation in float64, relative to each row's gradient (rows scaled over 6 decades
    # make elementwise tolerances meaningless); rows without a rotation get the upstream gradient.
    undefined = [1, 2, 3] if n > 4 else []
    expected = torch.einsum("nji,nj->ni", _rotation_matrices(z.cpu().float(), q.cpu().float()),
                            upstream.cpu().double())
    defined = torch.ones(n, dtype=torch.bool)
    defined[undefined] = False
    bound = 1e-5 if dtype == torch.float32 else 3e-3
    for backend, grad in grads.items():
        grad = grad.cpu()
        error = (grad.double() - expected).norm(dim=1) / expected.norm(dim=1)
        assert float(error[defined].max()) < bound, backend
        for row in undefined:
            assert torch.equal(grad[row], upstream[row].cpu()), (backend, row)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("create_graph", [False, True])
def test_the_gradient_has_zs_dtype_not_the_codes(monkeypatch, backend, create_graph):
    """fp32 rows, fp16 codes 1e5 times longer: the gradient, |c| / |z| times the upstream one, is
    beyond fp16 but a plain fp32 number."""
    if backend == "triton" and not triton_usable():
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("VQFAST_BACKEND", backend)
    device = "cpu" if backend == "torch" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "cuda"
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(4, 8, generator=g) * 1e-3).to(device).requires_grad_(True)
    q = (torch.randn(4, 8, generator=g) * 100).half().to(device)
    upstream = torch.randn(4, 8, generator=g).half().to(device)
    (grad,) = torch.autograd.grad(rotate_to_codes(z, q), z, upstream, create_graph=create_graph)
    expected = torch.einsum("nji,nj->ni", _rotation_matrices(z.detach().cpu(), q.cpu()), upstream.cpu().double())
    assert grad.dtype == torch.float32 and float(expected.abs().max()) > 65504
    torch.testing.assert_close(grad.cpu().double(), expected, rtol=1e-4, atol=0)


def test_a_backward_that_builds_a_graph_uses_the_pytorch_ops(monkeypatch):
    if not triton_usable():
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    from vqfast import kernels

    monkeypatch.setenv("VQFAST_BACKEND", "triton")
    monkeypatch.setattr(kernels, "rotate_gradient", lambda *a: pytest.fail("the kernel has no second derivative"))
    device = "cpu" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "cuda"
    x = torch.randn(4, 3, device=device, requires_grad=True)
    (grad,) = torch.autograd.grad(rotate_to_codes(x, torch.randn(4, 3, device=device)).sum(), x, create_graph=True)
    assert grad.requires_grad is False or grad.grad_fn is not None


@pytest.mark.parametrize("row_scale,code_scale", [(1.0, 1e-40), (1e-40, 1e-40), (1e-40, 1e-30), (1e-38, 1e-40),
                                                  (1e30, 1e-30), (1e-30, 1e30)])
def test_rows_and_codes_of_any_finite_size_in_both_paths(monkeypatch, row_scale, code_scale):
    """fp32 rows and codes down to subnormal sizes (and up to 1e30): the kernel's gradient is the PyTorch
    path's, finite where |c| / |z| is."""
    if not triton_usable():
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    device = "cpu" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "cuda"
    g = torch.Generator().manual_seed(10)
    z = (torch.randn(5, 8, generator=g).double() * row_scale).float().to(device)
    q = (torch.randn(5, 8, generator=g).double() * code_scale).float().to(device)
    upstream = torch.randn(5, 8, generator=g).to(device)
    grads = []
    for backend in ("triton", "torch"):
        monkeypatch.setenv("VQFAST_BACKEND", backend)
        x = z.clone().requires_grad_(True)
        rotate_to_codes(x, q).backward(upstream)
        grads.append(x.grad)
    assert bool(torch.isfinite(grads[0]).all()) and bool(torch.isfinite(grads[1]).all())
    ratio = (q.double().norm(dim=1) / z.double().norm(dim=1)).cpu()
    error = (grads[0].double() - grads[1].double()).norm(dim=1).cpu() / grads[1].double().norm(dim=1).cpu()
    # Relative to each row's gradient; rows whose gradient underflows fp32 are compared absolutely.
    assert bool(((error < 1e-5) | (ratio * upstream.norm(dim=1).cpu() < 1e-30)).all())


def test_zero_dimensional_inputs_on_the_triton_backend(monkeypatch):
    monkeypatch.setenv("VQFAST_BACKEND", "triton")
    x = torch.tensor(2.0, requires_grad=True)
    rotate_to_codes(x, torch.tensor(-3.0)).backward()
    assert float(x.grad) == 1.0  # a code opposite its row: straight through
