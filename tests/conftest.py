"""Test setup: without a GPU, run the Triton kernels on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before triton is imported (kernels are wrapped at definition time).
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # One configuration per kernel variant instead of compiling and timing every autotuning candidate for
    # each of the suite's many shapes; test_gpu.py checks the autotuned path on its own.
    os.environ.setdefault("VQFAST_AUTOTUNE", "0")
    # Tests in deterministic mode reach cuBLAS (the torch backend's search on CUDA tensors), which refuses
    # to run there without this (read when cuBLAS starts, so before any test).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402


class _NoChanges:
    def restore(self) -> None:
        pass


def _patch_language_once_per_launch() -> None:
    """Triton's interpreter replaces the builtins of ``triton.language`` at every launch (undone at its
    end), and again, by scanning the whole module, at every call of a ``@triton.jit`` helper inside the
    launch, where they are already replaced (the scan changes nothing): a third of the interpreted
    kernels' time. This skips a helper's patch when its modules (``tl``, ``tl.core``) were patched in
    the running launch; a helper that sees a module the launch did not patch is patched as before."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if original is None or executor is None or getattr(original, "once_per_launch", False):
        return
    import triton.language as tl

    state: dict = {"patched": None}  # ids of the modules patched in the running launch, None outside one

    def patch_lang(fn):
        modules = {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}
        if state["patched"] is not None and modules <= state["patched"]:
            return _NoChanges()
        scope = original(fn)
        if state["patched"] is not None:
            state["patched"] |= modules
            return scope
        state["patched"] = modules  # a launch starts; it ends when its patches are undone
        undo = scope.restore

        def restore() -> None:
            state["patched"] = None
            undo()

        scope.restore = restore
        return scope

    patch_lang.once_per_launch = True
    interpreter._patch_lang = patch_lang


if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") == "1":
    _patch_language_once_per_launch()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def kernel_device() -> torch.device:
    """Where kernel tests run: the GPU when there is one, else the CPU through the interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the public ops onto the Triton kernels (interpreted on CPU)."""
    monkeypatch.setenv("VQFAST_BACKEND", "triton")
    yield "triton"


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("VQFAST_BACKEND", "torch")
    yield "torch"


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread: on a busy 2-core machine, OpenMP threads waiting for each other make small
    convolutions ten times slower, while one thread costs little."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tf32_rounding_interpreter(monkeypatch):
    """Triton's interpreter computes a ``tl.dot`` with ``input_precision="tf32"`` in full fp32, which
    hides what the tf32 re-check is for. This truncates fp32 operands of such products to tf32's 10
    mantissa bits (truncation: the worst case the re-check's error bound covers); counts the products."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot
    calls = []

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        # Plain tf32 only (not tf32x3), and only for fp32 operands: 16-bit products ignore the setting.
        if str(input_precision).upper().endswith(".TF32") and a.dtype.scalar == tl.float32:
            calls.append(a.data.shape)
            a, b = (interpreter.TensorHandle(
                (x.data.astype(np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32),
                x.dtype.scalar) for x in (a, b))
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    return calls


@pytest.fixture(params=["default", pytest.param("tma", marks=pytest.mark.tma)])
def search_kernel(request, monkeypatch):
    """Runs a search test twice: with the default search kernel, and with the opt-in TMA one
    (``VQFAST_TMA_SEARCH=1``, kernels/nearest_tma.py), which must then have run."""
    if request.param == "default":
        monkeypatch.delenv("VQFAST_TMA_SEARCH", raising=False)
        yield request.param
        return
    if HAS_CUDA and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the TMA search needs a GPU of compute capability 9.x")
    from vqfast.kernels import nearest_tma

    monkeypatch.setenv("VQFAST_TMA_SEARCH", "1")
    before = nearest_tma.launches
    yield request.param
    assert nearest_tma.launches > before, "the TMA search never ran"


@pytest.fixture
def deterministic_on_cuda():
    """Deterministic algorithms for the test on a GPU, where sums by atomics come in no fixed order: tests
    that compare such sums bit for bit need the ordered kernels (nothing changes on the CPU)."""
    if not HAS_CUDA:
        yield
        return
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.fixture(params=["torch", "triton"])
def device(request, monkeypatch) -> torch.device:
    """Each backend in turn (VQFAST_BACKEND), with the device its tensors live on: the CPU for the
    reference, CUDA for the kernels (the CPU under the interpreter). Test files may define their own."""
    from helpers import triton_usable

    if request.param == "triton" and not triton_usable():
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("VQFAST_BACKEND", request.param)
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return torch.device("cuda" if request.param == "triton" and not interp else "cpu")
