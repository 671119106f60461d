"""The codebook-upkeep kernels (usage statistics, dead-code restarts), run for real against vqfast.reference."""

import math

import pytest
import torch

from vqfast import VectorQuantizer, kernels, reference

DECAY = 0.99


def _upkeep_state(k, d, num_seeds, seed, device, weight_layout="rows"):
    """Running statistics of a codebook halfway through training, with about half its codes below a
    dead threshold of 0.5 / K, some of them used in this batch, and a few NaN or inf seed rows."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 5, (k + 1,), generator=g) * (torch.rand(k + 1, generator=g) < 0.4)
    counts[k] = counts[:k].sum()
    steps = torch.tensor(float(torch.randint(1, 60, (), generator=g)))
    # The kernel sees the bias correction of the next step; shares then spread over [0, 1 / K).
    correction = 1.0 - DECAY ** (steps + 1)
    usage = torch.rand(k, generator=g) * correction / k
    grace = torch.rand(k, generator=g) * correction / k * (torch.rand(k, generator=g) < 0.2)
    seeds = torch.randn(num_seeds, d, generator=g)
    if num_seeds > 2:
        seeds[1, d // 2] = float("nan")
        seeds[2, 0] = float("inf")
    if weight_layout == "columns":  # a column-major view: the kernel must follow both strides
        weight = torch.randn(d, k, generator=g).t()
    else:
        weight = torch.randn(k, d, generator=g)
    state = dict(counts=counts, usage=usage, grace=grace, batch_counts=torch.zeros(k, dtype=torch.int64),
                 steps=steps, seeds=seeds, weight=weight, ema_count=torch.rand(k, generator=g) + 0.5)
    return {name: t.to(device) for name, t in state.items()}


def _copy(state):
    return {name: t.clone() for name, t in state.items()}  # clone keeps the strides


def _run(fn, state, threshold, restarts=True, ema=True, decay=DECAY):
    fn(state["counts"], state["usage"], state["grace"], state["batch_counts"], state["steps"], decay,
       threshold if restarts else 0.0, state["seeds"] if restarts else None, state["weight"] if restarts else None,
       state["ema_count"] if ema and restarts else None)


def _assert_same_update(got, want):
    assert torch.equal(got["steps"].cpu(), want["steps"].cpu())
    assert torch.equal(got["batch_counts"].cpu(), want["batch_counts"].cpu())
    # Both take the bias correction 1 - decay ** steps in float64; a GPU may fuse a multiply-add (an ulp).
    torch.testing.assert_close(got["usage"].cpu(), want["usage"].cpu(), rtol=2.5e-7, atol=0)
    torch.testing.assert_close(got["grace"].cpu(), want["grace"].cpu(), rtol=2.5e-7, atol=0)
    assert torch.equal(got["weight"].cpu(), want["weight"].cpu())
    assert torch.equal(got["ema_count"].cpu(), want["ema_count"].cpu())


@pytest.mark.parametrize("k,d,num_seeds", [(1, 1, 1), (37, 40, 37), (300, 17, 20), (1000, 3, 1000), (2500, 130, 64)])
def test_update_and_restarts_match_reference(k, d, num_seeds, kernel_device):
    state = _upkeep_state(k, d, num_seeds, seed=k, device=kernel_device)
    before = state["weight"].clone()
    want = _copy(state)
    threshold = 0.5 / k
    _run(kernels.update_code_usage, state, threshold)
    _run(reference.update_code_usage, want, threshold)
    _assert_same_update(state, want)
    restarted = (state["weight"] != before).any(dim=1)
    assert torch.equal(restarted, (want["weight"] != before).any(dim=1))
    if k > 1:
        # The case is not vacuous: codes were restarted, and where the seed rows ran out, others stayed dead.
        assert 0 < int(restarted.sum()) <= num_seeds
        assert (state["usage"][restarted] == 0).all()


@pytest.mark.parametrize("k,d,num_seeds", [(37, 40, 37), (300, 17, 20)])
def test_restarts_into_a_float64_codebook_match_reference(k, d, num_seeds, kernel_device):
    """A float64 layer's codes: the kernel stores the float32 seed rows into them exactly as the
    reference does."""
    state = _upkeep_state(k, d, num_seeds, seed=k + 1, device=kernel_device)
    state["weight"] = state["weight"].double()
    before = state["weight"].clone()
    want = _copy(state)
    _run(kernels.update_code_usage, state, 0.5 / k)
    _run(reference.update_code_usage, want, 0.5 / k)
    _assert_same_update(state, want)
    assert state["weight"].dtype == torch.float64 and bool((state["weight"] != before).any())


def test_restarts_take_the_lowest_index_dead_codes_and_seed_rows_in_order(kernel_device):
    k, d = 40, 6
    state = _upkeep_state(k, d, 5, seed=1, device=kernel_device)
    state["seeds"] = torch.arange(5 * d, dtype=torch.float32, device=kernel_device).reshape(5, d)
    state["usage"].zero_()
    state["grace"].zero_()
    state["counts"].zero_()
    state["counts"][[3, 10]] = 2  # used in this batch: not dead
    state["counts"][k] = 4
    before = state["weight"].clone()
    _run(kernels.update_code_usage, state, 0.5 / k)
    restarted = [0, 1, 2, 4, 5]
    assert torch.equal(state["weight"][restarted].cpu(), state["seeds"].cpu())
    # Codes 3 and 10 were used; code 6 onwards are dead too, but this step had only five seed rows.
    assert torch.equal(state["weight"][[3] + list(range(6, k))].cpu(), before[[3] + list(range(6, k))].cpu())
    fresh = (1.0 - DECAY ** state["steps"].item()) / k
    torch.testing.assert_close(state["grace"][restarted].cpu(), torch.full((5,), fresh), rtol=1e-5, atol=0)


def test_an_unused_restarted_code_waits_less_in_the_first_steps():
    """Code 0 takes every row, code 1 none, with the defaults (decay 0.99, threshold 0.01 of the uniform
    share): code 1's credit is the uniform share times the bias correction of its restart, so it is
    restarted again 69 steps after the first step, 392 steps after the 70th, and then about every 459
    steps (0.99 ** 459 < 0.01 <= 0.99 ** 458), as the README says. (The kernel's decisions are the
    reference's: test_update_and_restarts_match_reference.)"""
    k = 2
    usage, grace = torch.zeros(k), torch.zeros(k)
    batch_counts = torch.zeros(k, dtype=torch.int64)
    steps = torch.zeros(())
    weight = torch.zeros(k, 3)
    counts = torch.tensor([8, 0, 8])
    restarted_at = []
    for step in range(1, 1000):
        seeds = torch.full((1, 3), float(step))
        reference.update_code_usage(counts, usage, grace, batch_counts, steps, DECAY, 0.01 / k, seeds, weight)
        if float(weight[1, 0]) == step:
            restarted_at.append(step)
    # The closed form: restarted at t0, unused, dead at the first t with
    # (1 - d ** t0) * d ** (t - t0) / (1 - d ** t) < threshold.
    expected = [1]
    while len(expected) < len(restarted_at):
        t0 = t = expected[-1]
        t += 1
        while (1 - DECAY**t0) * DECAY ** (t - t0) / (1 - DECAY**t) >= 0.01:
            t += 1
        expected.append(t)
    assert restarted_at == expected and len(expected) == 4  # 1, 70, 462, 920


@pytest.mark.parametrize("decay", [0.0, 0.9])
def test_statistics_only_update_and_weight_strides(decay, kernel_device):
    state = _upkeep_state(300, 9, 32, seed=5, device=kernel_device, weight_layout="columns")
    want = _copy(state)
    _run(kernels.update_code_usage, state, 0.0, restarts=False, decay=decay)
    _run(reference.update_code_usage, want, 0.0, restarts=False, decay=decay)
    _assert_same_update(state, want)
    assert torch.equal(state["weight"].cpu(), want["weight"].cpu())
    state = _upkeep_state(300, 9, 32, seed=6, device=kernel_device, weight_layout="columns")
    want = _copy(state)
    _run(kernels.update_code_usage, state, 0.5 / 300, ema=False, decay=decay)
    _run(reference.update_code_usage, want, 0.5 / 300, ema=False, decay=decay)
    _assert_same_update(state, want)


@pytest.mark.parametrize("decay", [0.0, 0.99])
def test_a_first_step_that_counts_no_row_restarts_with_no_credit(decay, kernel_device):
    """Steps stay 0, so the credit (1 - decay ** 0) / K is 0, also with decay 0 (0 ** 0 = 1)."""
    state = _upkeep_state(40, 5, 40, seed=3, device=kernel_device)
    state["counts"].zero_()
    state["steps"].zero_()
    state["usage"].zero_()
    state["grace"].zero_()
    want = _copy(state)
    _run(kernels.update_code_usage, state, 0.5 / 40, decay=decay)
    _run(reference.update_code_usage, want, 0.5 / 40, decay=decay)
    _assert_same_update(state, want)
    assert bool(torch.isfinite(state["grace"]).all()) and not bool(state["grace"].any())


@pytest.mark.parametrize("n,k", [(0, 5), (1, 1), (1000, 37), (257, 3000)])
def test_finite_row_counts(n, k, kernel_device):
    g = torch.Generator().manual_seed(n + k)
    indices = torch.randint(-2, k + 2, (n,), generator=g)
    distances = torch.rand(n, generator=g)
    distances[torch.rand(n, generator=g) < 0.1] = float("nan")
    distances[torch.rand(n, generator=g) < 0.1] = float("inf")
    got = kernels.finite_row_counts(indices.to(kernel_device), distances.to(kernel_device), k)
    want = reference.finite_row_counts(indices, distances, k)
    assert got.shape == (k + 1,) and got.dtype == torch.int64
    assert torch.equal(got.cpu(), want)
    ok = distances.isfinite() & (indices >= 0) & (indices < k)
    assert int(want[k]) == int(ok.sum()) and int(want[:k].sum()) == int(ok.sum())


def test_bad_arguments_are_rejected(kernel_device):
    state = _upkeep_state(10, 4, 3, seed=0, device=kernel_device)
    with pytest.raises(ValueError, match="counts"):
        kernels.update_code_usage(state["counts"][:10], state["usage"], state["grace"], state["batch_counts"],
                                  state["steps"], DECAY)
    with pytest.raises(ValueError, match="usage_decay"):
        kernels.update_code_usage(state["counts"], state["usage"], state["grace"], state["batch_counts"],
                                  state["steps"], 1.0)
    with pytest.raises(ValueError, match="seeds"):
        kernels.update_code_usage(state["counts"], state["usage"], state["grace"], state["batch_counts"],
                                  state["steps"], DECAY, 0.05, state["seeds"][:, :3], state["weight"])
    with pytest.raises(ValueError, match="float32 or float64"):  # fp16 could turn a finite seed into inf
        kernels.update_code_usage(state["counts"], state["usage"], state["grace"], state["batch_counts"],
                                  state["steps"], DECAY, 0.05, state["seeds"], state["weight"].half())
    with pytest.raises(ValueError, match="distances"):
        kernels.finite_row_counts(torch.zeros(3, dtype=torch.int64, device=kernel_device),
                                  torch.zeros(4, device=kernel_device), 5)


def _device_for(backend: str) -> torch.device:
    """Where the layer runs on ``backend``: the Triton kernels on the GPU when there is one (else
    interpreted on the CPU), the reference on the CPU."""
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the restarts draw rows from the device's random "
                    "generator, so the backends agree on one device only: the CPU, with the kernels interpreted; "
                    "test_gpu.py checks the kernels against the reference on the GPU")
@pytest.mark.parametrize("ema", [False, True])
def test_layer_upkeep_is_the_same_on_both_backends(ema, monkeypatch):
    """Training steps with restarts: the Triton upkeep (interpreted on CPU) leaves the layer in the state
    the plain-PyTorch one does."""
    k, d = 60, 8
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, d, generator=g) * 3  # six clusters for 60 codes: most codes die and restart
    batches = [(centres[torch.randint(6, (50,), generator=g)] + 0.1 * torch.randn(50, d, generator=g))
               for _ in range(4)]
    states = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("VQFAST_BACKEND", backend)
        torch.manual_seed(1)
        vq = VectorQuantizer(k, d, ema=ema, dead_code_threshold=0.5)
        for rows in batches:
            vq(rows)
        states[backend] = {name: t.clone() for name, t in vq.state_dict().items()}
    torch_state, triton_state = states["torch"], states["triton"]
    assert torch_state.keys() == triton_state.keys()
    for name in torch_state:
        torch.testing.assert_close(triton_state[name], torch_state[name], rtol=1e-5, atol=1e-6, msg=name)
    # Restarts happened: some codes now sit on the data (within the noise of a cluster).
    near = torch.cdist(torch_state["embeddings.weight"], centres).min(dim=1).values < 1.0
    assert int(near.sum()) > 6
    assert math.isclose(float(torch_state["usage_steps"]), 4.0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_graph_that_saved_the_codebook_fails_after_a_restart(backend, monkeypatch):
    """Restarts rewrite the codebook in place; like any in-place op they must make autograd refuse a
    graph that saved the old codes, not let it use the new ones silently."""
    monkeypatch.setenv("VQFAST_BACKEND", backend)
    device = _device_for(backend)
    torch.manual_seed(0)
    vq = VectorQuantizer(40, 4).to(device)
    regulariser = (vq.embeddings.weight ** 2).sum()  # saves the codebook for its backward
    vq(torch.randn(30, 4, device=device) * 0.01 + 5.0)  # one far cluster: most codes unused, then restarted
    assert int(vq.codebook_usage()["steps"]) == 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        regulariser.backward()


@pytest.mark.parametrize("k,d,eps,decay,layout", [(1, 1, 1e-5, 0.9, "rows"), (37, 40, 1e-5, 0.9, "rows"),
                                                  (300, 17, 0.0, 0.9, "rows"), (100, 130, 1e-3, 0.9, "columns"),
                                                  (50, 128, 0.5, 0.0, "rows"), (20, 3, 0.5, 0.7, "rows")])
def test_ema_update_matches_reference(k, d, eps, decay, layout, kernel_device):
    g = torch.Generator().manual_seed(k + d)
    counts = torch.randint(1, 6, (k + 1,), generator=g) * (torch.rand(k + 1, generator=g) < 0.6)
    ema_count = torch.rand(k, generator=g) * 3 + 0.1
    if eps == 0:
        # Never used: smoothed count 0 before and after, so the code keeps its value; and unused for
        # thousands of steps, below the reference's floor of 1e-30 on the divisor.
        ema_count[::7] = 0.0
        counts[:k:7] = 0
        ema_count[3::7] = 1e-32
        counts[3:k:7] = 0
    counts[0 if k == 1 else 1] = 3  # at least one code is used and moves
    counts[k] = counts[:k].sum()
    sums = torch.randn(k, d, generator=g) * counts[:k, None]
    weight = torch.randn(d, k, generator=g).t() if layout == "columns" else torch.randn(k, d, generator=g)
    got = [t.clone().to(kernel_device) for t in (weight, ema_count, sums, counts)]
    want = [t.clone() for t in (weight, ema_count, sums, counts)]
    kernels.ema_update(*got, decay, eps)
    reference.ema_update(*want, decay, eps)
    # The kernel updates the total of the counts instead of summing the new counts: a few ulps apart.
    torch.testing.assert_close(got[1].cpu(), want[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(want[0], weight)  # the codes moved
    if eps == 0:
        assert torch.equal(got[0][::7].cpu(), weight[::7])


@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_ema_update_of_a_step_that_counted_no_row_changes_nothing(eps, kernel_device):
    # Every row masked out or NaN: the codes stay bit for bit (W * s / s rounded some by an ulp).
    g = torch.Generator().manual_seed(3)
    k, d = 64, 8
    weight = torch.randn(k, d, generator=g)
    ema_count = torch.rand(k, generator=g) + 0.5
    for update in (kernels.ema_update, reference.ema_update):
        w, count = weight.clone().to(kernel_device), ema_count.clone().to(kernel_device)
        update(w, count, torch.zeros(k, d, device=kernel_device), torch.zeros(k + 1, dtype=torch.int64,
               device=kernel_device), 0.9, eps)
        assert torch.equal(w.cpu(), weight), update
        assert torch.equal(count.cpu(), ema_count), update


@pytest.mark.parametrize("usage_decay", [0.9, 0.99999, 1 - 1e-7])
def test_usage_shares_sum_to_the_bias_correction(usage_decay, kernel_device):
    # The running shares decay by the float32 decay and gain 1 minus it, so after s steps that counted
    # rows they sum to 1 - d ** s: the bias correction, which both backends compute in float64.
    k = 7
    g = torch.Generator().manual_seed(5)
    results = []
    for update in (kernels.update_code_usage, reference.update_code_usage):
        usage, grace = torch.zeros(k, device=kernel_device), torch.zeros(k, device=kernel_device)
        batch_counts = torch.zeros(k, dtype=torch.int64, device=kernel_device)
        steps = torch.zeros((), device=kernel_device)
        g.manual_seed(5)
        for _ in range(5):
            counts = torch.randint(0, 9, (k + 1,), generator=g)
            counts[k] = counts[:k].sum()
            update(counts.to(kernel_device), usage, grace, batch_counts, steps, usage_decay)
        correction = reference.usage_correction(steps.cpu(), usage_decay)
        torch.testing.assert_close(usage.sum().cpu(), correction, rtol=2e-6, atol=0)
        results.append(usage.cpu())
    torch.testing.assert_close(results[0], results[1], rtol=2e-7, atol=0)


@pytest.mark.parametrize("moved", ["counts", "grace", "batch_counts", "steps", "seeds", "weight", "ema_count"])
def test_tensors_on_another_device_than_usage_are_refused(moved, kernel_device, monkeypatch):
    # Two devices the kernels could both run on need two GPUs; with the launch check stubbed out, the
    # meta device stands in for the second one.
    import vqfast.kernels.upkeep as upkeep
    monkeypatch.setattr(upkeep, "check_launchable", lambda *tensors: None)
    state = _upkeep_state(10, 4, 3, seed=0, device=kernel_device)
    state[moved] = state[moved].to("meta")
    with pytest.raises(ValueError, match=f"{moved} must be on usage's device"):
        _run(kernels.update_code_usage, state, 0.05)


def test_a_usage_decay_that_rounds_to_1_in_float32_is_refused(kernel_device):
    k = 3
    with pytest.raises(ValueError, match="below 1 in float32"):
        kernels.update_code_usage(torch.ones(k + 1, dtype=torch.int64, device=kernel_device),
                                  torch.zeros(k, device=kernel_device), torch.zeros(k, device=kernel_device),
                                  torch.zeros(k, dtype=torch.int64, device=kernel_device),
                                  torch.zeros((), device=kernel_device), 1 - 1e-8)


@pytest.mark.parametrize("eps", [float("nan"), float("inf"), -1e-5, 1e39])
def test_ema_update_refuses_an_eps_that_would_stop_the_codes(eps, kernel_device):
    # NaN or inf (1e39 is inf in float32) makes every smoothed count NaN: no code would ever move while
    # the counts went on.
    k, d = 4, 3
    weight = torch.randn(k, d, device=kernel_device)
    counts = torch.ones(k + 1, dtype=torch.int64, device=kernel_device)
    with pytest.raises(ValueError, match="eps >= 0"):
        kernels.ema_update(weight, torch.ones(k, device=kernel_device), torch.ones(k, d, device=kernel_device),
                           counts, 0.9, eps)


@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_ema_update_with_no_counts_yet_and_eps_0_stays_finite(decay, kernel_device):
    # All running counts 0 with eps = 0 (after a batch of NaN rows only): the smoothed counts are 0, not
    # 0 / 0, so the codes this step uses become their means and the others keep their values.
    k, d = 5, 3
    weight = torch.randn(k, d)
    counts = torch.tensor([2, 0, 1, 0, 0, 3])
    sums = torch.randn(k, d) * counts[:k, None]
    for update in (kernels.ema_update, reference.ema_update):
        w, ema_count = weight.clone().to(kernel_device), torch.zeros(k, device=kernel_device)
        update(w, ema_count, sums.to(kernel_device), counts.to(kernel_device), decay, 0.0)
        w = w.cpu()
        assert torch.isfinite(w).all(), update
        used = counts[:k] > 0
        torch.testing.assert_close(w[used], sums[used] / counts[:k][used, None].float(), msg=str(update))
        assert torch.equal(w[~used], weight[~used]), update


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's int32 overflow check; a GPU would need "
                    "a 16 GiB codebook for the same strides")
def test_ema_update_of_a_transposed_codebook_forms_no_int32_offset_that_wraps(monkeypatch):
    # weight = W.t() for a contiguous W (D, 2**22): column j is j * 2**22 elements away, past 2**31 from
    # column 512 on. With the interpreter's overflow check on (what TRITON_DEBUG=1 adds on a GPU), a
    # product of int32 offsets that wraps is an error. No element is read or written: a step that
    # counted no row leaves every code as it is, so the view may reach past its small storage.
    import numpy as np
    import triton.runtime.interpreter as interpreter

    monkeypatch.setattr(interpreter.interpreter_builder, "options", interpreter.InterpreterOptions(debug=True))
    k, d, column_stride = 32, 1024, 2**22
    storage = np.zeros(4096, dtype=np.float32)
    weight = torch.from_numpy(np.lib.stride_tricks.as_strided(storage, shape=(k, d), strides=(4, 4 * column_stride)))
    counts = torch.zeros(k + 1, dtype=torch.int64)
    kernels.ema_update(weight, torch.ones(k), torch.zeros(k, d), counts, 0.99, 1e-5)
    assert not storage.any()


def test_rows_of_more_columns_than_the_kernels_count_are_refused(kernel_device):
    # Expanded views: 2**31 columns that take no memory.
    wide = torch.zeros(1, 1, device=kernel_device).expand(3, 2**31)
    with pytest.raises(ValueError, match="2\\*\\*31 - 2\\*\\*16"):
        kernels.nearest_code(wide, wide)
    with pytest.raises(ValueError, match="2\\*\\*31 - 2\\*\\*16"):
        kernels.gather_rows(wide, torch.zeros(2, dtype=torch.int64, device=kernel_device))
    with pytest.raises(ValueError, match="2\\*\\*31 - 2\\*\\*16"):
        kernels.ema_update(wide, torch.ones(3, device=kernel_device), wide,
                           torch.zeros(4, dtype=torch.int64, device=kernel_device), 0.99, 1e-5)
