"""The pure-PyTorch reference: exactness against float64 brute force, bounded memory, entropy terms."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import fp64_distances, unambiguous_rows
from vqfast import reference


@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (33, 70, 5), (500, 1000, 3)])
def test_nearest_code_matches_brute_force(n, k, d, monkeypatch):
    monkeypatch.setattr(reference, "_BLOCK_ELEMENTS", 4096)  # many row blocks
    g = torch.Generator().manual_seed(0)
    z, c = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    idx, dist = reference.nearest_code(z, c)
    full = fp64_distances(z, c)
    clear = unambiguous_rows(z, c)
    assert torch.equal(idx[clear], full.argmin(1)[clear])
    torch.testing.assert_close(dist.double(), full.gather(1, idx[:, None])[:, 0], rtol=1e-5, atol=1e-6)


def test_nearest_code_float64_and_ties():
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    z = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    idx, dist = reference.nearest_code(z, c, compute_dtype=torch.float64)
    assert idx.tolist() == [0, 0]  # both rows tie: lowest index
    assert dist.tolist() == [0.0, 0.5]


def test_nearest_code_nan_rows_get_a_valid_index():
    z = torch.tensor([[float("nan"), 0.0], [1.0, 1.0]])
    c = torch.tensor([[float("nan"), 1.0], [1.0, 1.0], [0.0, 0.0]])
    idx, dist = reference.nearest_code(z, c)
    assert idx.tolist() == [0, 1]
    assert torch.isnan(dist[0]) and dist[1] == 0


def test_runs_a_65536_codebook_in_bounded_memory():
    # 16,384 rows: the full fp32 distance matrix would take 4.3 GB; the chunked reference must stay far
    # below.
    script = textwrap.dedent(
        """
        import resource, torch
        from vqfast import reference
        g = torch.Generator().manual_seed(0)
        z = torch.randn(16384, 8, generator=g); c = torch.randn(65536, 8, generator=g)
        idx, dist = reference.nearest_code(z, c)
        rows = torch.arange(0, 16384, 1021)
        full = ((z[rows, None].double() - c[None].double()) ** 2).sum(-1)
        assert torch.equal(full.min(1).values.float(), dist[rows]) or \
            torch.allclose(full.min(1).values, dist[rows].double(), rtol=1e-5, atol=1e-6)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    peak_kib = int(out.stdout.strip().splitlines()[-1])
    assert peak_kib < 2 * 1024 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"


def test_soft_assignment_entropy_matches_dense_formula():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(37, 6, generator=g, dtype=torch.float64).float().requires_grad_()
    c = torch.randn(11, 6, generator=g).requires_grad_()
    sample, batch = reference.soft_assignment_entropy(z, c, temperature=2.0)
    d = torch.cdist(z, c) ** 2
    p = torch.softmax(-d / 2.0, dim=1)
    exp_sample = -(p * p.log()).sum(1).mean()
    avg = p.mean(0)
    exp_batch = -(avg * avg.log()).sum()
    torch.testing.assert_close(sample, exp_sample, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batch, exp_batch, rtol=1e-4, atol=1e-5)
    (sample - batch).backward()
    assert z.grad is not None and c.grad is not None and torch.isfinite(z.grad).all()


def test_soft_assignment_entropy_gradient_is_finite_at_low_temperature():
    g = torch.Generator().manual_seed(2)
    z = (3 * torch.randn(50, 70, generator=g)).requires_grad_()
    c = (3 * torch.randn(40, 70, generator=g)).requires_grad_()
    sample, batch = reference.soft_assignment_entropy(z, c, temperature=0.05)
    (sample - batch).backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(c.grad).all()


@pytest.mark.parametrize("temperature", [1.0, 0.05])
def test_soft_assignment_entropy_first_and_second_derivatives(temperature):
    """gradcheck and gradgradcheck in float64, with a row on top of a code (a peaked row at the low
    temperature) and a code of no weight for one row."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(7, 3, generator=g, dtype=torch.float64)
    c = torch.randn(5, 3, generator=g, dtype=torch.float64)
    z[0] = c[2] + 1e-3
    z, c = z.requires_grad_(), c.requires_grad_()

    def loss(z, c):
        sample, batch = reference.soft_assignment_entropy(z, c, temperature=temperature)
        return 0.7 * sample - 1.3 * batch

    assert torch.autograd.gradcheck(loss, (z, c))
    assert torch.autograd.gradgradcheck(loss, (z, c))


def test_histogram_entropy_skips_unused_codes_and_empty_histograms():
    counts = torch.tensor([3, 0, 1, 0])
    entropy, perplexity = reference.histogram_entropy(counts, torch.float64)
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert entropy.item() == pytest.approx(expected, rel=1e-12)
    assert perplexity.item() == pytest.approx(math.exp(expected), rel=1e-12)
    entropy, perplexity = reference.histogram_entropy(torch.zeros(5, dtype=torch.int64))
    assert entropy.item() == 0.0 and perplexity.item() == 1.0


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("z_dtype, c_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float16),
                                              (torch.float64, torch.float32)])
def test_quantize_takes_mixed_dtypes_as_the_public_op_does(monkeypatch, metric, z_dtype, c_dtype):
    # The oracle searches in the wider dtype too (it used to refuse mixed dtypes without given indices).
    import vqfast

    monkeypatch.setenv("VQFAST_BACKEND", "torch")
    g = torch.Generator().manual_seed(12)
    z = torch.randn(30, 5, generator=g).to(z_dtype).requires_grad_()
    c = torch.randn(9, 5, generator=g).to(c_dtype)
    zq_ref, loss_ref, idx_ref = reference.quantize(z, c, metric=metric)
    zq, loss, idx = vqfast.quantize(z, c, metric=metric)
    assert torch.equal(idx_ref, idx) and zq_ref.dtype == zq.dtype == z_dtype
    torch.testing.assert_close(loss_ref, loss)
    # fp32 rows with an fp16 codebook: searched in fp16, the row overflows to inf and picks code 0.
    big = torch.tensor([[70000.0, 1.0]])
    codes = torch.tensor([[60000.0, 100.0], [60000.0, 0.0]]).half()
    assert reference.quantize(big, codes)[2].tolist() == [1]


def test_cosine_quantize_matches_the_public_op(monkeypatch):
    # The oracle's cosine step normalises z and the codes itself, as vqfast.quantize does.
    import vqfast

    monkeypatch.setenv("VQFAST_BACKEND", "torch")
    g = torch.Generator().manual_seed(9)
    z = (3 * torch.randn(20, 6, generator=g)).requires_grad_()
    c = (5 * torch.randn(7, 6, generator=g)).requires_grad_()
    zq_ref, loss_ref, idx_ref = reference.quantize(z, c, beta=0.5, metric="cosine")
    zq, loss, idx = vqfast.quantize(z, c, beta=0.5, metric="cosine")
    assert torch.equal(idx_ref, idx)
    torch.testing.assert_close(zq_ref, zq)
    torch.testing.assert_close(zq_ref.norm(dim=1), torch.ones(20))
    torch.testing.assert_close(loss_ref, loss)
    g_ref = torch.autograd.grad(loss_ref + zq_ref.sum(), (z, c))
    g_pub = torch.autograd.grad(loss + zq.sum(), (z, c))
    for a, b in zip(g_ref, g_pub):
        torch.testing.assert_close(a, b)


def _far_from_origin(g):
    z = 1000 + torch.randn(600, 4, generator=g)
    return z, 1000 + torch.randn(50, 4, generator=g)


def _two_clusters(g):
    # Codes half near 0, half near 2; rows near the first half (a shift towards the mean would hurt).
    codes = torch.cat([1e-3 * torch.randn(256, 8, generator=g), 2 + 1e-3 * torch.randn(256, 8, generator=g)])
    return 1e-3 * torch.randn(600, 8, generator=g), codes


def _outlier_code(g):
    z, codes = _far_from_origin(g)
    codes[7] = 1e5  # one far code must not spoil the search among the others
    return z, codes


def _nan_code(g):
    z, codes = _far_from_origin(g)
    codes[7] = float("nan")  # must not switch the re-check off (a NaN bound compares False)
    return z, codes


def _huge_offset(g):
    # 1e7 + randn: even float64's ||c||^2 - 2 z.c cancels here; the direct form does not.
    return 1e7 + torch.randn(300, 32, generator=g), 1e7 + torch.randn(40, 32, generator=g)


def _duplicated_codes(g):
    # Restarts seed several codes from one row: exact ties, which the lowest index must win.
    codes = torch.randn(64, 8, generator=g)
    codes[40:48] = codes[3]
    codes[50] = codes[9]
    z = torch.cat([codes[3:4] + 1e-3 * torch.randn(100, 8, generator=g), torch.randn(200, 8, generator=g)])
    return z, codes


@pytest.mark.parametrize("make", [_far_from_origin, _two_clusters, _outlier_code, _nan_code, _huge_offset,
                                  _duplicated_codes])
def test_fp32_search_picks_the_exactly_nearest_code(make):
    # The fp32 expanded form ||c||^2 - 2 z.c cancels on such data (the first case: a quarter of the rows
    # got a farther code); rows within its rounding bound of a tie are ranked again in float64.
    g = torch.Generator().manual_seed(12)
    z, codes = make(g)
    idx, dist = reference.nearest_code(z, codes)
    exact = torch.cdist(z.double(), codes.double()).pow(2)
    exact = torch.where(exact.isnan(), torch.inf, exact)
    chosen = exact.gather(1, idx[:, None])[:, 0]
    assert torch.equal(chosen, exact.min(1).values)
    assert torch.equal(idx, exact.argmin(1))  # ties (equal codes) go to the lowest index
    torch.testing.assert_close(dist.double(), chosen, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [1e19, 1e20, 3e21])
def test_fp32_rows_whose_squared_norm_overflows_get_the_nearest_code(scale):
    # ||z||^2 is inf in fp32 and ~1e40 in float64, where the direct form's squares no longer tell the
    # codes apart; the expanded form ||c||^2 - 2 z.c (finite, ~1e20) still ranks them exactly.
    g = torch.Generator().manual_seed(15)
    z = torch.randn(40, 5, generator=g) * scale
    codes = torch.randn(7, 5, generator=g)
    idx, _ = reference.nearest_code(z, codes)
    exact = (codes.double().pow(2).sum(1)[None] - 2 * z.double() @ codes.double().t()).argmin(1)
    assert torch.equal(idx, exact)


def test_float64_search_is_exact_far_from_the_origin():
    # float64 inputs always run here, on any device; 1e8 + randn cancels in float64's expanded form.
    import vqfast

    g = torch.Generator().manual_seed(14)
    z = 1e8 + torch.randn(300, 8, generator=g, dtype=torch.float64)
    codes = 1e8 + torch.randn(60, 8, generator=g, dtype=torch.float64)
    idx, _ = vqfast.nearest_code(z, codes)
    exact = ((z[:, None, :] - codes[None]) ** 2).sum(-1)
    assert torch.equal(idx, exact.argmin(1))


def test_reference_search_compiles_without_graph_breaks():
    # The float64 re-check of uncertain rows depends on the data; as a custom op it stays opaque to
    # torch.compile instead of breaking the graph.
    g = torch.Generator().manual_seed(13)
    z, codes = _far_from_origin(g)
    compiled = torch.compile(reference.nearest_code, fullgraph=True, backend="eager")
    idx, dist = compiled(z, codes)
    eager_idx, eager_dist = reference.nearest_code(z, codes)
    assert torch.equal(idx, eager_idx) and torch.equal(dist, eager_dist)


def test_reference_quantize_and_entropy_refuse_what_the_public_ops_refuse():
    """The reference is public too: given indices of another shape, a misspelled metric or a negative
    beta or temperature it raises as vqfast.quantize does, not broadcast or fall back to l2."""
    g = torch.Generator().manual_seed(0)
    z, c = torch.randn(6, 4, generator=g), torch.randn(5, 4, generator=g)
    value_errors = {
        "indices shape": (lambda: reference.quantize(z, c, indices=torch.tensor([2])), "shape of z"),
        "indices 2-D": (lambda: reference.quantize(z, c, indices=torch.zeros(2, 6, dtype=torch.long)), "shape of z"),
        "indices range": (lambda: reference.quantize(z, c, indices=torch.full((6,), 5)), r"\[0, 5\)"),
        "metric": (lambda: reference.quantize(z, c, metric="cosin"), "metric"),
        "metric with indices": (lambda: reference.quantize(z, c, metric="cosin", indices=torch.zeros(6, dtype=torch.long)),
                                "metric"),
        "beta": (lambda: reference.quantize(z, c, beta=-1.0), "beta"),
        "beta nan": (lambda: reference.quantize(z, c, beta=float("nan")), "beta"),
        "D": (lambda: reference.quantize(z, c[:, :3], indices=torch.zeros(6, dtype=torch.long)), "dimension"),
        "entropy metric": (lambda: reference.soft_assignment_entropy(z, c, metric="cosin"), "metric"),
        "temperature": (lambda: reference.soft_assignment_entropy(z, c, temperature=-1.0), "temperature"),
        "temperature 0": (lambda: reference.soft_assignment_entropy(z, c, temperature=0.0), "temperature"),
        "no codes": (lambda: reference.soft_assignment_entropy(z, c[:0]), "at least one code"),
    }
    for name, (call, message) in value_errors.items():
        with pytest.raises(ValueError, match=message):
            call()
            pytest.fail(name)
    with pytest.raises(TypeError, match="indices"):
        reference.quantize(z, c, indices=torch.zeros(6, dtype=torch.uint8))
    with pytest.raises(TypeError, match="floating-point"):
        reference.soft_assignment_entropy(z.long(), c.long())
    # Valid calls are unchanged: given indices give those codes, and the cosine entropy differs from l2's.
    idx = torch.tensor([0, 1, 2, 3, 4, 0])
    z_q, loss, out = reference.quantize(z, c, indices=idx.int())
    assert torch.equal(z_q, c[idx]) and torch.equal(out, idx.int())
    assert reference.soft_assignment_entropy(z, c, metric="cosine")[0] != reference.soft_assignment_entropy(z, c)[0]
