"""torch.func transforms (vmap, grad, per-sample gradients), the older vmap of
``torch.autograd.functional.jacobian(vectorize=True)``, and tensors made under inference mode, on
both backends: the results equal those of plain loops and plain autograd."""

import pytest
import torch

import vqfast

BACKENDS = ["torch", "triton"]


@pytest.fixture(params=BACKENDS)
def device(request, monkeypatch, kernel_device):
    monkeypatch.setenv("VQFAST_BACKEND", request.param)
    return kernel_device if request.param == "triton" else torch.device("cpu")


def _data(device, batch=3, n=5, k=7, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, n, d, generator=g).to(device)
    c = torch.randn(k, d, generator=g).to(device)
    return z, c


def test_vmap_of_the_ops_equals_a_loop(device):
    z, c = _data(device)
    idx = torch.func.vmap(lambda r: vqfast.nearest_code(r, c, precision="highest")[0])(z)
    assert torch.equal(idx, torch.stack([vqfast.nearest_code(r, c, precision="highest")[0] for r in z]))
    assert torch.equal(torch.func.vmap(lambda i: vqfast.gather(c, i))(idx), c[idx])
    counts = torch.func.vmap(lambda i: vqfast.code_usage(i, c.shape[0])[0])(idx)
    assert torch.equal(counts, torch.stack([torch.bincount(i, minlength=c.shape[0]) for i in idx]))
    z_q = torch.func.vmap(lambda r, i: vqfast.quantize(r, c, indices=i)[0])(z, idx)
    assert torch.equal(z_q, c[idx])


@pytest.mark.parametrize("bad", [-1, 7])
def test_vmap_still_checks_the_index_range(device, bad):
    _, c = _data(device)
    idx = torch.tensor([[0, 1], [2, bad]], device=device)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 7\)"):
        torch.func.vmap(lambda i: vqfast.gather(c, i))(idx)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 7\)"):
        torch.func.vmap(lambda i: vqfast.code_usage(i, c.shape[0])[0])(idx)


def test_vmap_of_an_eval_layer_and_its_decoding(device):
    z, _ = _data(device)
    vq = vqfast.VectorQuantizer(7, 6, channel_dim=-1).to(device).eval()
    z_q = torch.func.vmap(lambda r: vq(r)[0])(z)
    assert torch.equal(z_q, torch.stack([vq(r)[0] for r in z]))
    tokens = vq.encode(z)
    assert torch.equal(torch.func.vmap(vq.codes_from_indices)(tokens), vq.codes_from_indices(tokens))
    with pytest.raises(ValueError, match="must be -1"):
        torch.func.vmap(vq.codes_from_indices)(torch.full((2, 3), -2, device=device))
    residual = vqfast.ResidualVectorQuantizer(2, 7, 6, channel_dim=-1).to(device).eval()
    assert torch.equal(torch.func.vmap(lambda r: residual(r)[0])(z), torch.stack([residual(r)[0] for r in z]))
    heads = vqfast.VectorQuantizer(7, 3, channel_dim=-1, heads=2).to(device).eval()
    assert torch.equal(torch.func.vmap(lambda r: heads(r)[2])(z), torch.stack([heads(r)[2] for r in z]))


def test_per_sample_codebook_gradients(device):
    """vmap of grad: each row's own gradient of the VQ loss with respect to the codebook."""
    z, c = _data(device)
    rows = z[0]

    def loss_of_row(row, codebook):
        return vqfast.quantize(row[None], codebook, beta=0.4)[1]

    per_row = torch.func.vmap(torch.func.grad(loss_of_row, argnums=1), in_dims=(0, None))(rows, c)
    expected = []
    for row in rows:
        codebook = c.clone().requires_grad_()
        expected.append(torch.autograd.grad(loss_of_row(row, codebook), codebook)[0])
    torch.testing.assert_close(per_row, torch.stack(expected), rtol=1e-6, atol=1e-7)
    assert per_row.abs().sum() > 0


def test_grad_transform_equals_autograd(device):
    z, c = _data(device)
    rows = z[0]

    def step(x):
        z_q, loss, _ = vqfast.quantize(x, c, beta=0.3)
        sample, batch = vqfast.soft_assignment_entropy(x, c, temperature=0.7)
        rotated = vqfast.rotate_to_codes(x, c[:5])
        return (z_q * torch.arange(6.0, device=device)).sum() + loss + sample - batch + rotated.pow(2).sum()

    x = rows.clone().requires_grad_()
    step(x).backward()
    torch.testing.assert_close(torch.func.grad(step)(rows), x.grad, rtol=1e-5, atol=1e-6)


def test_grad_of_grad_through_the_incoming_gradient(device):
    """A second derivative that reaches the backward only through its incoming gradient: exact on the
    torch backend, refused (not a silent 0) on the Triton one, as with create_graph=True in eager code."""
    z, c = _data(device)
    rows = z[0]

    def inner(s, cb):
        return s * vqfast.quantize(rows, cb, beta=0.3)[1]

    def outer(s):
        return torch.func.grad(inner, argnums=1)(s, c).sum()

    cb = c.clone().requires_grad_()
    exact = torch.autograd.grad(vqfast.quantize(rows, cb, beta=0.3)[1], cb)[0].sum()
    if vqfast.resolve_backend(device) == "triton":
        with pytest.raises(RuntimeError, match="not differentiable"):
            torch.func.grad(outer)(torch.tensor(1.5, device=device))
    else:
        torch.testing.assert_close(torch.func.grad(outer)(torch.tensor(1.5, device=device)), exact)
    assert exact.abs() > 0


def test_forward_mode_of_quantize(device):
    """jvp, jacfwd and hessian of quantize: on the torch backend z_q's tangent is z's (straight through)
    and the loss's tangent and Hessian are those of its plain-PyTorch formula at the chosen codes; the
    Triton backend's fused functions have no forward-mode rule and say so."""
    z, c = _data(device)
    rows, beta = z[0], 0.3
    tangent = torch.randn_like(rows)

    def loss_of(r):
        return vqfast.quantize(r, c, beta=beta)[1]

    if vqfast.resolve_backend(device) == "triton":
        with pytest.raises(NotImplementedError, match="jvp"):
            torch.func.jvp(loss_of, (rows,), (tangent,))
        return
    q = c[vqfast.reference.nearest_code(rows, c)[0]]

    def plain_loss(r):  # the same indices (piecewise constant in z), plain ops
        return torch.nn.functional.mse_loss(q, r.detach()) + beta * torch.nn.functional.mse_loss(r, q)

    value, loss_tangent = torch.func.jvp(loss_of, (rows,), (tangent,))
    torch.testing.assert_close(value, plain_loss(rows))
    torch.testing.assert_close(loss_tangent.float(), torch.func.jvp(plain_loss, (rows,), (tangent,))[1].float())
    assert loss_tangent.abs() > 0
    z_q, z_q_tangent = torch.func.jvp(lambda r: vqfast.quantize(r, c)[0], (rows,), (tangent,))
    assert torch.equal(z_q, q) and torch.equal(z_q_tangent, tangent)
    eye = torch.eye(rows.numel()).reshape(*rows.shape, *rows.shape)
    torch.testing.assert_close(torch.func.jacfwd(lambda r: vqfast.quantize(r, c)[0])(rows), eye)
    hessian = torch.func.hessian(loss_of)(rows)
    torch.testing.assert_close(hessian, torch.func.hessian(plain_loss)(rows))
    torch.testing.assert_close(hessian, eye * (2 * beta / rows.numel()))  # only the commitment term curves


def test_vectorized_jacobian(device):
    """torch.autograd.functional.jacobian(vectorize=True) batches the backward with the older vmap."""
    z, c = _data(device)
    rows = z[0]
    for fn, x in ((lambda cb: vqfast.quantize(rows, cb)[1], c), (lambda r: vqfast.quantize(r, c)[0], rows),
                  (lambda r: vqfast.rotate_to_codes(r, c[:5]), rows)):
        fast = torch.autograd.functional.jacobian(fn, x, vectorize=True)
        slow = torch.autograd.functional.jacobian(fn, x)
        torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-7)


def test_grad_of_a_functional_call_of_the_layer(device):
    z, _ = _data(device)
    vq = vqfast.VectorQuantizer(7, 6, channel_dim=-1).to(device).eval()
    params = {name: p.detach() for name, p in vq.named_parameters()}

    def objective(p):
        z_q, loss, _ = torch.func.functional_call(vq, p, (z,))
        return z_q.sum() + loss

    grads = torch.func.grad(objective)(params)
    z_q, loss, _ = vq(z)
    (z_q.sum() + loss).backward()
    torch.testing.assert_close(grads["embeddings.weight"], vq.embeddings.weight.grad, rtol=1e-6, atol=1e-7)


def frozen_rows_of(rows):
    with torch.inference_mode():
        return rows.clone()


@pytest.mark.usefixtures("deterministic_on_cuda")  # (bit-exact sums by atomics on a GPU)
def test_inference_mode_codebook_and_indices(device):
    """A codebook or indices made under torch.inference_mode serve a z that needs gradients, as in plain
    PyTorch (autograd cannot save inference tensors; the step saves copies of them)."""
    z, c = _data(device)
    rows = z[0]
    with torch.inference_mode():
        frozen = c.clone()
        frozen_indices = vqfast.nearest_code(rows, frozen)[0]
    mask = torch.tensor([True, False, True, True, False], device=device)
    for kwargs in ({}, {"indices": frozen_indices}, {"mask": mask}):
        grads = []
        for codebook in (frozen, c):
            x = rows.clone().requires_grad_()
            z_q, loss, _ = vqfast.quantize(x, codebook, beta=0.3, **kwargs)
            (z_q.sum() * 2 + loss).backward()
            grads.append(x.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    codebook = c.clone().requires_grad_()
    vqfast.gather(codebook, frozen_indices).sum().backward()
    assert torch.equal(codebook.grad.sum(1), 6 * torch.bincount(frozen_indices, minlength=7).float())
    # Stored indices, a codebook that trains (with and without a mask): the same codebook gradient.
    for kwargs in ({}, {"mask": mask}):
        grads = []
        for i in (frozen_indices, frozen_indices.clone()):
            codebook = c.clone().requires_grad_()
            vqfast.quantize(rows, codebook, beta=0.3, indices=i, **kwargs)[1].backward()
            grads.append(codebook.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    # Soft assignments of inference-mode rows or codes.
    for x, codes in ((frozen_rows_of(rows), c), (rows, frozen)):
        x, codes = (t if t.is_inference() else t.clone().requires_grad_() for t in (x, codes))
        sample, batch = vqfast.soft_assignment_entropy(x, codes)
        (sample - batch).backward()
        trained = codes if codes.requires_grad else x
        assert trained.grad is not None and trained.grad.abs().sum() > 0
    # Encoder outputs made in inference mode, a codebook that trains: the same codebook gradient.
    with torch.inference_mode():
        frozen_rows = rows.clone()
    for kwargs in ({}, {"mask": mask}, {"metric": "cosine"}):
        grads = []
        for x in (frozen_rows, rows):
            codebook = c.clone().requires_grad_()
            vqfast.quantize(x, codebook, beta=0.3, **kwargs)[1].backward()
            grads.append(codebook.grad)
        assert grads[1].abs().sum() > 0
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_a_layer_step_on_inference_mode_rows_with_entropy_terms(device):
    z, _ = _data(device)
    vq = vqfast.VectorQuantizer(7, 6, channel_dim=-1, sample_entropy_weight=0.1, batch_entropy_weight=0.1).to(device)
    vq(frozen_rows_of(z))[1].backward()
    assert vq.embeddings.weight.grad.abs().sum() > 0


@pytest.mark.usefixtures("deterministic_on_cuda")  # (bit-exact sums by atomics on a GPU)
def test_an_inference_mode_mask_in_a_step_that_needs_gradients(device):
    # A padding mask made under inference mode (e.g. by a data pipeline): the steps save a copy of it.
    z, c = _data(device)
    with torch.inference_mode():
        frozen_mask = torch.tensor([[True, False, True, True, False]] * z.shape[0], device=device)
    mask = frozen_mask.clone()
    results = []
    for m in (frozen_mask, mask):
        grads = []
        x = z.clone().requires_grad_()
        codebook = c.clone().requires_grad_()
        z_q, loss, _ = vqfast.quantize(x, codebook, beta=0.3, mask=m)
        (z_q.sum() + loss).backward()
        grads += [x.grad, codebook.grad]
        for layer in (vqfast.VectorQuantizer(7, 6, channel_dim=-1, dead_code_threshold=0),
                      vqfast.ResidualVectorQuantizer(2, 7, 6, channel_dim=-1, dead_code_threshold=0)):
            layer = layer.to(device)
            torch.manual_seed(0)
            for p, code in zip(layer.parameters(), (c, c * 0.5)):
                with torch.no_grad():
                    p.copy_(code)
            x = z.clone().requires_grad_()
            z_q, loss, _ = layer(x, mask=m)
            (z_q.sum() + loss).backward()
            grads += [x.grad, *(p.grad for p in layer.parameters())]
        results.append(grads)
    assert all(g is not None for g in results[1])
    for frozen_grad, grad in zip(*results):
        torch.testing.assert_close(frozen_grad, grad, rtol=0, atol=0)


def test_a_training_layer_under_torch_func_says_to_use_eval_mode(device):
    # Its in-place updates cannot be batched by vmap (either backend) nor traced by grad on the CPU
    # backend: the layer says so, instead of PyTorch naming an internal op.
    z, _ = _data(device)
    # (With quantizer dropout, before its draw, which vmap would refuse with advice of its own.)
    for layer in (vqfast.VectorQuantizer(7, 6, channel_dim=-1), vqfast.ResidualVectorQuantizer(2, 7, 6, channel_dim=-1),
                  vqfast.ResidualVectorQuantizer(2, 7, 6, channel_dim=-1, quantizer_dropout=0.5),
                  vqfast.ProductVectorQuantizer(2, 7, 3, channel_dim=-1)):
        layer = layer.to(device)
        with pytest.raises(RuntimeError, match=r"torch.func.vmap cannot do: transform the layer in eval mode"):
            torch.func.vmap(lambda x: layer(x)[1])(z)
        grad_of_loss = torch.func.grad(lambda x: layer(x)[1])
        if vqfast.resolve_backend(z.device, z.dtype) == "triton":
            assert grad_of_loss(z[0]).shape == z[0].shape
        else:
            with pytest.raises(RuntimeError, match=r"on the CPU backend cannot do: transform the layer in eval"):
                grad_of_loss(z[0])
        layer.eval()
        torch.testing.assert_close(torch.func.vmap(lambda x: layer(x)[1])(z),
                                   torch.stack([layer(x)[1] for x in z]))
    # Stages in eval mode under a residual layer in training mode without dropout: nothing to refuse.
    rvq = vqfast.ResidualVectorQuantizer(2, 7, 6, channel_dim=-1).to(device)
    rvq.quantizers.eval()
    assert torch.func.vmap(lambda x: rvq(x)[1])(z).shape == (z.shape[0],)


def test_vmap_over_an_empty_batch_is_an_error(device):
    _, c = _data(device)
    with pytest.raises((ValueError, RuntimeError)):
        torch.func.vmap(lambda i: vqfast.code_usage(i, 7)[0])(torch.zeros(0, 3, dtype=torch.int64, device=device))


def test_interpreter_check_ignores_the_callers_context():
    """The interpreter's self-check runs once per process and is cached: run first inside a transform or
    under a meta default device, it still judges the interpreter, not the caller's context."""
    from vqfast.kernels import _common

    if not _common.interpreting():
        pytest.skip("checks Triton's CPU interpreter")
    try:
        _common._interpreter_problem.cache_clear()
        verdicts = []
        torch.func.grad(lambda x: verdicts.append(_common._interpreter_problem()) or x.sum())(torch.zeros(2))
        assert verdicts == [None] and _common._interpreter_problem() is None
        _common._interpreter_problem.cache_clear()
        with torch.device("meta"):
            assert _common._interpreter_problem() is None
    finally:
        _common._interpreter_problem.cache_clear()


def test_vmap_folds_the_batch_into_the_rows_of_one_search(device, monkeypatch):
    """Only z batched: the batch's rows go to one search (and one gather), not one call per element."""
    from vqfast import kernels, reference

    z, c = _data(device, batch=4)
    calls = []
    target, name = (kernels, "nearest_code") if vqfast.resolve_backend(device) == "triton" else (
        reference, "_nearest_code_rows_exact")
    original = getattr(target, name)
    monkeypatch.setattr(target, name, lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    idx = torch.func.vmap(lambda r: vqfast.nearest_code(r, c, precision="highest")[0])(z)
    assert calls == [torch.Size([20, 6])]
    assert torch.equal(idx, torch.stack([vqfast.nearest_code(r, c, precision="highest")[0] for r in z]))
