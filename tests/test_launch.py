"""The direct launch path (kernels/_launch.py) keys compiled kernels at least as finely as Triton does.

That the direct launches reach the same compiled kernels with the same arguments as Triton's own path is
checked by benchmarks/compile_check.py (tests/test_compile_check.py), which compiles for sm_90.
"""

import itertools

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
    before = len(_launch._ENTRIES)
    first = nearest.nearest_code(z, c, precision="highest")
    again = nearest.nearest_code(z, c, precision="highest")  # through the entries, on a GPU
    assert (len(_launch._ENTRIES) > before) is (device == "cuda")
    monkeypatch.setattr(_launch, "_DIRECT", False)
    triton_path = nearest.nearest_code(z, c, precision="highest")
    for a, b, t in zip(first, again, triton_path):
        assert torch.equal(a, b) and torch.equal(a, t)
    assert torch.equal(first[0].cpu(), torch.cdist(z.double().cpu(), c.double().cpu()).argmin(1))
