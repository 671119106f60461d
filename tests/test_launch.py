"""The direct launch path (kernels/_launch.py) keys compiled kernels at least as finely as Triton does.

That the direct launches reach the same compiled kernels with the same arguments as Triton's own path is
checked by benchmarks/compile_check.py (tests/test_compile_check.py), which compiles for sm_90.
"""

import itertools
import threading
import time

import pytest
import torch

from vqfast.kernels import _launch

native = pytest.importorskip("triton._C.libtriton").native_specialize_impl
from triton.backends.compiler import BaseBackend  # noqa: E402


def _values():
    ints = [0, 1, 2, 15, 16, 17, 32, -1, -16, -17, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, 2**32, 2**63 - 1, 2**63,
            2**63 + 16, -2**31, -2**31 - 1, -2**31 - 16, -2**63]
    base = torch.zeros(64, dtype=torch.float32)
    tensors = [base, base[1:], base[4:], base[3:], base.half(), base.half()[8:], base.half()[1:], base.bfloat16(),
               base.bfloat16()[2:], base.long(), base.long()[1:], base.int(), base.to(torch.int8)[1:],
               base.to(torch.int8)[16:]]
    return ints + tensors + [0.0, 1.0, 0.5, True, False, None]


def _triton_key(value):
    return native(BaseBackend, value, False, True, True)


def test_equal_signatures_mean_equal_triton_specialisations():
    values = _values()
    for a, b in itertools.product(values, repeat=2):
        if _launch._signature([a]) == _launch._signature([b]):
            assert _triton_key(a) == _triton_key(b), (a, b)


def test_signatures_tell_apart_what_triton_does():
    # Not vacuous: the values above fall into many Triton specialisations, and ours separate them all.
    values = _values()
    assert len({_triton_key(v) for v in values}) >= 12
    by_signature = {}
    for v in values:
        by_signature.setdefault(_launch._signature([v]), set()).add(_triton_key(v))
    assert all(len(keys) == 1 for keys in by_signature.values())


def test_launches_give_the_same_results_either_way(monkeypatch):
    """Under the interpreter every launch takes Triton's path; on a GPU the second call of a search goes
    through the direct path, with the results of Triton's."""
    from vqfast.kernels import nearest
    from vqfast.kernels._common import interpreting

    device = "cpu" if interpreting() else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1")
    info = _launch._KernelInfo(nearest._nearest_code_kernel)
    assert info.direct is (device == "cuda")
    torch.manual_seed(0)
    z, c = torch.randn(300, 37, device=device), torch.randn(501, 37, device=device)
    # Fresh entries and plans: an earlier search in this process may have made those of this problem.
    from vqfast.kernels._common import PlanCache

    monkeypatch.setattr(_launch, "_ENTRIES", {})
    monkeypatch.setattr(nearest, "_PLANS", PlanCache())
    first = nearest.nearest_code(z, c, precision="highest")
    again = nearest.nearest_code(z, c, precision="highest")  # through the entries, on a GPU
    assert (len(_launch._ENTRIES) > 0) is (device == "cuda")
    monkeypatch.setattr(_launch, "_DIRECT", False)
    triton_path = nearest.nearest_code(z, c, precision="highest")
    for a, b, t in zip(first, again, triton_path):
        assert torch.equal(a, b) and torch.equal(a, t)
    assert torch.equal(first[0].cpu(), torch.cdist(z.double().cpu(), c.double().cpu()).argmin(1))


class _FakeDriver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


class _FakeCompiled:
    function = packed_metadata = None

    def __init__(self, runs):
        self.runs = runs

    def run(self, *launch):
        self.runs.append(launch)


def _fake_direct_launches(monkeypatch):
    """A direct launch path without a GPU: a driver that names device 0, and a launch_kernel that makes
    the entry of each launch it is given (with a compiled kernel that records its launches) and notes
    that the call came through it."""
    import types

    from triton.runtime.jit import JITFunction

    def kernel_fn(x_ptr, y_ptr, n, BLOCK):
        pass

    kernel = JITFunction(kernel_fn)
    info = _launch._KernelInfo.__new__(_launch._KernelInfo)
    info.direct, info.fn, info.arg_names, info.value_positions = True, kernel, ("x_ptr", "y_ptr", "n", "BLOCK"), ()
    monkeypatch.setitem(_launch._KERNELS, id(kernel), info)
    monkeypatch.setattr(_launch, "_direct_now", lambda info: True)
    monkeypatch.setattr(_launch, "triton", types.SimpleNamespace(
        runtime=types.SimpleNamespace(driver=types.SimpleNamespace(active=_FakeDriver()))))
    monkeypatch.setattr(_launch, "_ENTRIES", {})
    slow, runs = [], []

    def launch_kernel(kernel, grid, *args, **meta):
        slow.append(args)
        key = _launch._entry_key(kernel, info, 0, args, meta)
        _launch._ENTRIES[key] = _launch._Entry(_FakeCompiled(runs), ("BLOCK",), None)

    monkeypatch.setattr(_launch, "launch_kernel", launch_kernel)
    return kernel, slow, runs


def test_prepared_launches_key_tensors_by_dtype_and_alignment(monkeypatch):
    """A prepared launch reuses a compiled kernel only for tensors of the dtypes and 16-byte alignment it
    was made for: other ones go through launch_kernel, which keys them as Triton does."""
    kernel, slow, runs = _fake_direct_launches(monkeypatch)
    launch = _launch.PreparedLaunch(kernel, (3,), (10,), {"BLOCK": 16})
    base = torch.zeros(64)
    launch(base, base[4:])
    assert len(slow) == 1 and not runs
    launch(torch.zeros(8), torch.zeros(8))  # the same dtypes and alignment: direct
    assert len(slow) == 1 and len(runs) == 1
    assert runs[0][:3] == (3, 1, 1) and runs[0][-2:] == (10, 16)
    for x, y in ((base[1:], base), (base, base[2:]), (base.half(), base), (base, base.long()),
                 (torch.nn.Parameter(base), base)):
        before = len(slow)
        launch(x, y)
        assert len(slow) == before + 1, (x, y)
        launch(x.detach().clone() if x.data_ptr() % 16 == 0 else x, y)  # now known: direct
        assert len(slow) == before + 1, (x, y)


def test_prepared_launch_layouts_place_each_tensor_where_the_kernel_takes_it(monkeypatch):
    kernel, slow, runs = _fake_direct_launches(monkeypatch)
    launch = _launch.PreparedLaunch(kernel, (lambda meta: (8 // meta["BLOCK"], 2)), (5,), {"BLOCK": 4},
                                    layout=(1, 1))
    a, b = torch.zeros(4), torch.ones(4)
    launch(a, b)
    assert len(slow) == 1 and slow[0][0] is b and slow[0][1] is b and slow[0][2:] == (5,)
    launch(b, a)
    assert len(slow) == 1 and runs[0][:3] == (2, 2, 1)
    assert runs[0][-4] is a and runs[0][-3] is a and runs[0][-2:] == (5, 4)
    launch(b, torch.zeros(8)[2:])  # the tensor the kernel takes is misaligned now
    assert len(slow) == 2


class _SharedStateAutotuner:
    """Stands in for triton.autotune's Autotuner as far as threads are concerned: it keeps the call's
    arguments on itself while the call runs, and reads them back at the end."""

    configs = ("one config",)

    def __init__(self):
        self.fn = object()
        self.nargs = None
        self.held_lock = []

    def __getitem__(self, grid):
        def run(out, value, *rest, **meta):
            self.held_lock.append(_launch.AUTOTUNER_LOCK._is_owned())
            self.nargs = value
            time.sleep(0.002)  # another thread, if let in, now overwrites nargs
            out.append(self.nargs == value)
            self.nargs = None
        return run


def test_launches_through_an_autotuner_hold_a_lock_and_threads_keep_their_own_arguments():
    tuner = _SharedStateAutotuner()
    prepared = _launch.PreparedLaunch(tuner, (1,))
    results = []

    def calls(worker):
        for i in range(15):
            value = (worker, i)
            _launch.triton_launch(tuner, (1,), results, value)
            _launch.launch_kernel(tuner, (1,), results, value)  # (Triton's path: not a compiled kernel)
            prepared(results, value)

    threads = [threading.Thread(target=calls, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 * 15 * 3 and all(results)
    assert len(tuner.held_lock) == len(results) and all(tuner.held_lock)
    # A plain kernel (no autotuner) is launched without it.
    held = []

    class Plain:
        def __getitem__(self, grid):
            return lambda: held.append(_launch.AUTOTUNER_LOCK._is_owned())

    _launch.triton_launch(Plain(), (1,))
    assert held == [False]
