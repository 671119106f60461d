"""Helpers shared by the launchers."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from vqfast._checks import INTERPRETER_BF16_REFUSAL, env_switch
from vqfast.kernels._launch import PreparedLaunch


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1`` when the kernels
    were defined)."""
    return _INTERPRETED


def autotuning() -> bool:
    """False when ``VQFAST_AUTOTUNE=0`` or under ``torch.use_deterministic_algorithms(True)``: launchers
    then use one fixed configuration per problem instead of compiling and timing every candidate (faster
    first calls; the test suite uses it on a GPU). Deterministic mode needs it because the tile decides
    the order of some fp32 sums (the loss's partial sums, the distance epilogue's reductions), and a
    choice by timing may differ from one process to the next."""
    return not deterministic() and env_switch("VQFAST_AUTOTUNE", True)


def deterministic() -> bool:
    """``torch.are_deterministic_algorithms_enabled()``: launchers whose kernels add floats atomically
    (the codebook gradients, the EMA sums) then sum in a fixed order instead."""
    return torch.are_deterministic_algorithms_enabled()


def index_add_rows(rows: torch.Tensor, indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """``torch.zeros(K, D).index_add_(0, indices, rows.float())`` in fp32, rows whose index lies outside
    [0, K) dropped, without a host synchronisation: the fixed-order sum of deterministic mode, by
    PyTorch's own ``index_add_`` (deterministic on CUDA in that mode)."""
    # Rows with an index out of range go to one spare row, cut off afterwards (a mask would need a sync).
    spare = torch.where((indices >= 0) & (indices < num_codes), indices, num_codes)
    acc = torch.zeros((num_codes + 1, rows.shape[1]), dtype=torch.float32, device=rows.device)
    acc.index_add_(0, spare, rows.to(torch.float32))
    return acc[:num_codes]


@functools.lru_cache(maxsize=None)
def _interpreter_problem() -> str | None:
    """Why this Triton's CPU interpreter cannot run the kernels, or None when it can.

    Interpreters of Triton 3.6 and older turn loop bounds into Python ints through 1-element NumPy
    arrays, which NumPy 2.4 refuses; every kernel with a loop would then fail with an obscure error.
    """
    import numpy as np
    import triton
    import triton.language as tl

    @triton.jit
    def _loop_probe(out_ptr, n):
        total = 0
        for _ in range(0, n):
            total += 1
        tl.store(out_ptr, total)

    # The verdict is cached for the process: the probe must not depend on the caller's context (a
    # torch.func transform, a default device, inference mode), in which its own tensor could not be run.
    with torch._C._DisableFuncTorch(), torch.inference_mode(False), torch.device("cpu"):
        out = torch.zeros(1, dtype=torch.int32, device="cpu")
        try:
            _loop_probe[(1,)](out, 3)
        except Exception as exc:  # the interpreter wraps the NumPy TypeError in its own error type
            if tuple(int(part) for part in np.__version__.split(".")[:2]) >= (2, 4):
                return (f"Triton {triton.__version__}'s CPU interpreter fails with NumPy {np.__version__} ({exc}); "
                        "install 'numpy<2.4' or a newer Triton to run the kernels on CPU")
            return (f"Triton {triton.__version__}'s CPU interpreter fails ({exc}); reinstall Triton, or run on "
                    "the CPU with the torch backend (VQFAST_BACKEND=torch)")
    if int(out.item()) != 3:
        return f"Triton {triton.__version__}'s CPU interpreter ran a test loop wrongly"
    return None


_INDEX_DTYPES = (torch.int32, torch.int64)


def check_row_indices(indices: torch.Tensor, rows: int | None, device: torch.device) -> None:
    """``indices``: 1-D int32 or int64 on ``device``, with ``rows`` entries when given (one per row of
    the other input). The kernels read exactly that many whole numbers, so anything else would be
    truncated or read past the end."""
    if (indices.dtype not in _INDEX_DTYPES or indices.dim() != 1 or (rows is not None and indices.shape[0] != rows)
            or indices.device != device):
        wanted = "1-D int32 or int64" + (f" with {rows} entries" if rows is not None else "") + f" on {device}"
        raise ValueError(f"indices must be {wanted}, got {indices.dtype} of shape {tuple(indices.shape)} "
                         f"on {indices.device}")


def check_matrices(*named: tuple[str, torch.Tensor]) -> None:
    """Each tensor 2-D, all with the same number of columns and on the same device."""
    for name, t in named:
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.shape[1] != first.shape[1]:
            raise ValueError(f"{name} and {first_name} must have the same number of columns, got "
                             f"{tuple(t.shape)} and {tuple(first.shape)}")
        if t.device != first.device:
            raise ValueError(f"{name} and {first_name} must be on the same device, got {t.device} and {first.device}")
    check_column_count(first.shape[1], first_name)


def resolves_negative_views(launcher: Callable) -> Callable:
    """``launcher`` run on its tensor arguments with their negative bit resolved (``t.resolve_neg()``, a
    no-op for other tensors): a lazily negated view (``x.conj().imag``, ``torch._neg_view(x)``) holds the
    memory of the values before the negation, which a kernel would read as they are. For launchers that
    only read their tensors (one that writes in place refuses such a view, see :func:`check_launchable`)."""

    @functools.wraps(launcher)
    def call(*args, **kwargs):
        args = tuple(a.resolve_neg() if isinstance(a, torch.Tensor) else a for a in args)
        if kwargs:
            kwargs = {k: v.resolve_neg() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return launcher(*args, **kwargs)

    return call


def check_launchable(*tensors: torch.Tensor) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors under the interpreter, and the tensors' memory
    as their values (no lazily negated view: see :func:`resolves_negative_views`)."""
    for t in tensors:
        if t.is_neg():
            raise ValueError("the Triton kernels cannot take a lazily negated view (x.conj().imag, "
                             "torch._neg_view(x)): call .resolve_neg() on it first")
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and interpreting():
            problem = _interpreter_problem()
            if problem is not None:
                raise RuntimeError(problem)
            if t.dtype == torch.bfloat16:
                # NumPy has no bfloat16: the interpreter's bf16 products come out wrong (off by orders of
                # magnitude), which would be a silent wrong answer.
                raise RuntimeError(INTERPRETER_BF16_REFUSAL)
            continue
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors (got a tensor on {t.device}); "
            "set TRITON_INTERPRET=1 before importing triton to run them on CPU, or use the torch backend"
        )


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Row and code offsets inside a tile are int32 (pid * BLOCK + arange): the compute-bound kernels keep
# them narrow for registers, so the row and code counts they accept stay below 2**31 by a block margin.
MAX_ROWS = 2**31 - 2**16
# CUDA limits the second and third grid dimensions to 65,535 programs.
MAX_GRID_YZ = 65535


def check_code_count(num_codes: object) -> None:
    """A launcher's ``num_codes``: a Python int >= 0. The kernels count into a buffer of ``num_codes``
    (+ 1) slots, so a negative count would have them write outside it."""
    if type(num_codes) is not int or num_codes < 0:
        raise ValueError(f"num_codes must be a Python int >= 0, got {num_codes!r}")


def check_kernel_floats(*named: tuple[str, torch.Tensor]) -> None:
    """Each tensor float32, float16 or bfloat16: the kernels' pointer types (anything else would be read
    as another type, or fail inside Triton)."""
    for name, t in named:
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16 for the kernels, got {t.dtype}")


def check_beta(beta: object) -> None:
    """The VQ kernels' ``beta``: a finite number >= 0 (the loss is (1 + beta) * mse)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")


def check_row_count(count: int, what: str) -> None:
    """ValueError when ``count`` rows or codes would overflow the kernels' int32 tile offsets."""
    if count > MAX_ROWS:
        raise ValueError(f"{what} has {count} rows; the kernels take at most {MAX_ROWS} (2**31 - 2**16) per call: "
                         "process it in chunks")


def check_column_count(count: int, what: str) -> None:
    """ValueError for rows of more than MAX_ROWS columns: the kernels' loops over D count in int32 below
    2**31 columns, and a last step within a block of 2**31 would wrap to a negative offset."""
    if count > MAX_ROWS:
        raise ValueError(f"{what} has rows of {count} columns; the kernels take at most {MAX_ROWS} (2**31 - 2**16)")


def check_grid_yz(programs: int, what: str) -> None:
    """ValueError when a launch would need more than CUDA's 65,535 programs along grid y or z."""
    if programs > MAX_GRID_YZ:
        raise ValueError(f"{what} needs {programs} column blocks; CUDA allows at most {MAX_GRID_YZ}")


def check_rows_and_codes(z: torch.Tensor, codebook: torch.Tensor) -> None:
    """The launchers' contract for a search: z (N, D) and a non-empty codebook (K, D) of one kernel
    dtype, on a device the kernels can run on."""
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"expected z (N, D) and codebook (K, D), got {tuple(z.shape)} and {tuple(codebook.shape)}")
    if z.dtype != codebook.dtype or z.dtype not in KERNEL_DTYPES:
        raise TypeError(f"z and codebook must share a dtype in float32/float16/bfloat16, got {z.dtype}, {codebook.dtype}")
    if codebook.shape[0] == 0:
        raise ValueError("the codebook must have at least one code")
    if z.device != codebook.device:
        # The kernel would run on z's device with a pointer into the other one's memory.
        raise ValueError(f"z and codebook must be on the same device, got {z.device} and {codebook.device}")
    check_row_count(z.shape[0], "z")
    check_row_count(codebook.shape[0], "the codebook")
    check_column_count(z.shape[1], "z")
    check_launchable(z, codebook)


@triton.jit
def _row_sqnorm_kernel(c_ptr, out_ptr, K, D, stride_ck, stride_cd, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    rows = c_ptr + offs_k.to(tl.int64)[:, None] * stride_ck
    acc = tl.zeros([BLOCK_K], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(rows + offs_d[None, :] * stride_cd, mask=mask_k[:, None] & (offs_d[None, :] < D),
                    other=0.0).to(tl.float32)
        acc += tl.sum(x * x, axis=1)
    tl.store(out_ptr + offs_k, acc, mask=mask_k)


def int32_safe_columns(t: torch.Tensor) -> torch.Tensor:
    """``t`` (2-D), copied to a contiguous tensor when its column offsets ``(cols - 1) * stride(1)``
    could pass 2**31: the kernels compute row offsets in int64 but column offsets in int32, which only a
    column-major view of a huge tensor could overflow."""
    return t.contiguous() if int32_safe_strides(t)[0] else t


def int32_safe_strides(t: torch.Tensor) -> tuple[bool, tuple[int, ...]]:
    """Whether ``int32_safe_columns(t)`` copies ``t``, and the strides of the tensor it returns (a plan
    needs them without making the copy)."""
    if t.dim() == 2 and (t.shape[1] - 1) * abs(t.stride(1)) >= 2**31:
        return True, (t.shape[1], 1)
    return False, t.stride()


# Triton decides when it defines a kernel whether the interpreter runs it (reading TRITON_INTERPRET),
# so this is read off a kernel rather than the variable: a later change of the variable changes
# nothing, and reading it cost about 1 us per launcher call.
_INTERPRETED = not isinstance(_row_sqnorm_kernel, JITFunction)


def _sqnorm_blocks(d: int) -> tuple[int, int]:
    """``(BLOCK_D, BLOCK_K)`` of ``_row_sqnorm_kernel`` for codes of ``d`` columns."""
    block_d = row_block_d(d)
    return block_d, 16 if interpreting() else max(1, 4096 // block_d)


@functools.lru_cache(maxsize=256)
def _sqnorm_launch(k: int, d: int, stride_k: int, stride_d: int, interp: bool) -> PreparedLaunch:
    block_d, block_k = _sqnorm_blocks(d)
    return PreparedLaunch(_row_sqnorm_kernel, (cdiv(k, block_k),), (k, d, stride_k, stride_d),
                          dict(BLOCK_K=block_k, BLOCK_D=block_d))


def code_sqnorms(codebook: torch.Tensor) -> torch.Tensor:
    """Squared norms of the codebook rows in fp32: ``(codebook.float() ** 2).sum(1)``, in one launch
    (the search is latency-bound on small problems, where every launch counts)."""
    codebook = int32_safe_columns(codebook)
    k, d = codebook.shape
    out = torch.empty(k, dtype=torch.float32, device=codebook.device)
    _sqnorm_launch(k, d, codebook.stride(0), codebook.stride(1), interpreting())(codebook, out)
    return out


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small fixed number under the interpreter)."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index)


def max_shared_memory() -> int:
    """Bytes of shared memory one program may use on the current GPU, as Triton's driver reports it."""
    import triton

    active = triton.runtime.driver.active
    return _max_shared_memory(active, active.get_current_device())


@functools.lru_cache(maxsize=None)
def _max_shared_memory(active, device: int) -> int:
    return int(active.utils.get_device_properties(device)["max_shared_mem"])


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for the launchers. Not ``triton.cdiv``: that is a constexpr function, which costs
    about 4 us per call from host code (Triton 3.6-3.8), and a small search is bound by host time."""
    return -(-a // b)


# -- launch configurations of the memory-bound kernels --------------------------------------------------


@dataclass(frozen=True)
class LaunchConfig:
    """Rows (or elements) per program and warps of one launch; ``stream``: the kernel marks the data
    it passes through once as streaming (loads evicted first from L2, stores with the streaming cache
    hint), so that what it reuses (codebook rows, the targets of its atomics) stays in L2."""

    block: int
    num_warps: int
    stream: bool = False


def row_block_d(d: int) -> int:
    """Columns per program of the row kernels (gather, scatter-add, the fused VQ step); larger D takes
    several programs along grid y."""
    return min(128, max(16, next_power_of_2(d)))


# Data streamed through a kernel from which its tiles get twins with streaming cache hints: well over
# the L2 of an H100 or H200 (50-60 MB), where what passes through once would evict what is reused.
# Below it the hints would only push a small output out of L2 before the next kernel reads it, a cost
# that timing the kernel alone cannot see.
STREAMING_MIN_BYTES = 128 << 20


def row_tile_configs(block_d: int, streamed_bytes: int = 0) -> list[LaunchConfig]:
    """Candidates for the row kernels (gather, scatter-add, the fused VQ step): 2,048 to 8,192 elements
    per program, 4 or 8 warps, at most 32 elements per thread (with 64, ptxas gives the VQ backward 255
    registers and spills, at 12 % occupancy: benchmarks/compile_check.py); when ``streamed_bytes`` reach
    ``STREAMING_MIN_BYTES``, each also with the streaming cache hints. The first (4,096 elements, 4
    warps, no hints) is the fixed choice; under the interpreter, 16 rows keep the tests quick."""
    return list(_row_tile_configs(block_d, interpreting(), streamed_bytes >= STREAMING_MIN_BYTES))


def with_streaming_twins(configs: Sequence[LaunchConfig], streaming: bool = True) -> tuple[LaunchConfig, ...]:
    """``configs``, then (with ``streaming``) each of them with ``stream=True``."""
    return (*configs, *[LaunchConfig(c.block, c.num_warps, True) for c in configs if streaming])


@functools.lru_cache(maxsize=None)
def _row_tile_configs(block_d: int, interp: bool, streaming: bool) -> tuple[LaunchConfig, ...]:
    # Made once per block width: building the frozen dataclasses cost ~10 us per launcher call.
    if interp:
        return (LaunchConfig(16, 4),)
    fixed = LaunchConfig(max(1, 4096 // block_d), 4)
    others = [LaunchConfig(max(1, elements // block_d), warps) for elements in (2048, 4096, 8192) for warps in (4, 8)
              if elements <= 32 * 32 * warps]
    return with_streaming_twins((fixed, *[c for c in others if c != fixed]), streaming)


class KeptBuffers:
    """Scratch buffers of one plan (a search's codebook norms, split winners and re-check lists), made on
    a plan's first call on a device and stream and handed to its later calls there: a small search is
    bound by host time, and each ``torch.empty`` costs about as much as a prepared launch.

    A call takes the buffers (:meth:`take`) and gives them back when it has launched its kernels
    (:meth:`give_back`). Calls on one stream run in order on the GPU, so the next call's kernels start
    after the last one's are done with them; a call that finds them taken (another thread on the same
    stream) gets fresh ones. Nothing carries over between calls: every kernel writes what it later
    reads, as with fresh ``torch.empty``. Fresh buffers, never kept, while a CUDA graph is captured
    (the graph keeps their addresses), inside :func:`fresh_scratch` (the registered custom ops, which
    compiled code and CUDA-graph trees call, so that no kept buffer lands in a graph's private memory
    pool), above ``limit`` bytes (large problems are not bound by host time), beyond ``max_keys``
    streams per plan, and once the plans of a device keep ``KEPT_BUDGET`` bytes (a plan dropped from its
    cache gives its bytes back; :func:`release_scratch` frees them all)."""

    __slots__ = ("specs", "nbytes", "keep", "max_keys", "kept", "owned", "__weakref__")

    def __init__(self, specs: Sequence[tuple[tuple[int, ...], torch.dtype]], limit: int = 2 << 20, max_keys: int = 4):
        self.specs = tuple(specs)
        # As the caching allocator rounds them: 512-byte blocks.
        self.nbytes = sum(cdiv(math.prod(shape) * dtype.itemsize, 512) * 512 for shape, dtype in self.specs)
        self.keep = bool(self.specs) and self.nbytes <= limit
        self.max_keys = max_keys
        self.kept: dict[tuple, tuple[torch.Tensor, ...]] = {}  # the buffers not taken, by (device, stream)
        self.owned: dict[tuple, object] = {}  # every key this plan keeps buffers for -> its byte count's release
        _ALL_KEPT.add(self)

    def take(self, device: torch.device) -> tuple[tuple[torch.Tensor, ...], tuple | None]:
        """``(buffers, token)``: uninitialised buffers on ``device`` for one call, and what to hand
        :meth:`give_back` once the call has launched its kernels (None: fresh buffers, nothing to give)."""
        key = _scratch_key(device) if self.keep and _KEEP_SCRATCH.get() else None
        if key is None:
            return self._new(device), None
        buffers = self.kept.pop(key, None)  # (atomic: two threads never both get them)
        if buffers is not None:
            return buffers, key
        buffers = self._new(device)  # before any bookkeeping, which an out-of-memory error would leave wrong
        budget_key = key[0]
        with _KEPT_LOCK:
            if key in self.owned or len(self.owned) >= self.max_keys or \
                    _KEPT_BYTES.get(budget_key, 0) + self.nbytes > KEPT_BUDGET:
                return buffers, None  # taken by another thread, or no room to keep more
            _KEPT_BYTES[budget_key] = _KEPT_BYTES.get(budget_key, 0) + self.nbytes
            self.owned[key] = weakref.finalize(self, _release_bytes, budget_key, self.nbytes)
        return buffers, key

    def give_back(self, token: tuple | None, buffers: tuple[torch.Tensor, ...]) -> None:
        with _KEPT_LOCK:
            if token is not None and token in self.owned:
                self.kept[token] = buffers

    def release(self) -> None:
        """Drop every kept buffer (those taken right now are dropped when given back)."""
        with _KEPT_LOCK:
            owned, self.owned = self.owned, {}
            self.kept = {}
        for release in owned.values():
            release()

    def _new(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        return fresh_buffers(self.specs, device)


def fresh_buffers(specs: Sequence[tuple[tuple[int, ...], torch.dtype]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """``torch.empty`` of every (shape, dtype) in ``specs``."""
    return tuple(torch.empty(shape, dtype=dtype, device=device) for shape, dtype in specs)


# Bytes that the KeptBuffers of one device may keep together, and how many they keep (approximate
# when threads race).
KEPT_BUDGET = 256 << 20
_KEPT_BYTES: dict[object, int] = {}
_ALL_KEPT: "weakref.WeakSet[KeptBuffers]" = weakref.WeakSet()
_KEEP_SCRATCH: contextvars.ContextVar[bool] = contextvars.ContextVar("vqfast_keep_scratch", default=True)


# Guards the byte counts and each plan's set of keys (not the hot path: a call that finds its buffers
# kept takes them without it).
_KEPT_LOCK = threading.Lock()


def _release_bytes(budget_key: object, nbytes: int) -> None:
    with _KEPT_LOCK:
        _KEPT_BYTES[budget_key] = _KEPT_BYTES.get(budget_key, 0) - nbytes


@contextlib.contextmanager
def fresh_scratch() -> Iterator[None]:
    """Within the block, launchers allocate their scratch buffers per call instead of keeping them."""
    token = _KEEP_SCRATCH.set(False)
    try:
        yield
    finally:
        _KEEP_SCRATCH.reset(token)


def release_scratch() -> None:
    """Free the scratch buffers that search plans keep between calls (``KeptBuffers``), e.g. before
    ``torch.cuda.empty_cache()``; later calls allocate them again."""
    for kept in list(_ALL_KEPT):
        kept.release()


def _scratch_key(device: torch.device) -> tuple | None:
    """(device, current stream) for kept buffers; None while the current stream captures a CUDA graph,
    or when ``device`` is not the current device (Triton launches on the current device's stream; the
    public ops make the tensors' device current, a direct call of a launcher may not). Keyed by the raw
    stream handle: two ``torch.cuda.ExternalStream`` objects of one handle count as one stream."""
    if device.type != "cuda":
        return (device.type,), None
    index = torch.cuda.current_device()
    if (device.index is not None and device.index != index) or torch.cuda.is_current_stream_capturing():
        return None
    return ("cuda", index), torch._C._cuda_getCurrentRawStream(index)


class PlanCache:
    """Launch plans by problem, as ``kernels/nearest.py`` keeps its searches': what a launcher computes
    from a problem's shapes, strides, dtypes and arguments before it allocates and launches (block
    sizes, grids, prepared launches), so that a repeated small problem, which is bound by host time,
    computes it once. A plan holds only what its key determines, and scratch buffers (``KeptBuffers``)
    that no call reads before it writes them. Bounded, since a stream of
    distinct shapes (ragged batches) would otherwise grow it without end: the oldest goes first."""

    __slots__ = ("plans", "limit")

    def __init__(self, limit: int = 256):
        self.plans: dict[tuple, object] = {}
        self.limit = limit

    def get(self, key: tuple) -> object | None:
        return self.plans.get(key)

    def add(self, key: tuple, plan: object) -> object:
        """``plans[key] = plan``, first dropping the oldest plan when the cache is full.

        Launchers run in several threads at once (``nn.DataParallel`` replicas, threaded servers): two of
        them may pick the same oldest key, or one may add a plan while another looks for the oldest. The
        eviction then gives way (the cache may briefly exceed its limit by a plan per thread) rather than
        raise KeyError or "dictionary changed size during iteration" from a launcher call."""
        plans = self.plans
        if len(plans) >= self.limit:
            try:
                del plans[next(iter(plans))]
            except (KeyError, RuntimeError, StopIteration):
                pass
        plans[key] = plan
        return plan

    def clear(self) -> None:
        self.plans.clear()


class RowLaunches:
    """Prepared launches of one row kernel (gather, scatter-add, the fused VQ step) for one problem, one
    per launch configuration, made on first use: the configuration is chosen per call (``tuned_config``
    honours ``VQFAST_AUTOTUNE`` as it changes), the rest of the launch is fixed by the problem."""

    __slots__ = ("kernel", "rows", "grid_y", "scalars", "meta", "layout", "block_name", "_by_config")

    def __init__(self, kernel: object, rows: int, grid_y: int | None, scalars: Sequence[object], meta: dict,
                 layout: Sequence[int] | None = None, block_name: str = "BLOCK_N"):
        self.kernel, self.rows, self.grid_y = kernel, rows, grid_y
        self.scalars, self.meta, self.layout, self.block_name = tuple(scalars), meta, layout, block_name
        self._by_config: dict[LaunchConfig, PreparedLaunch] = {}

    def programs(self, cfg: LaunchConfig) -> int:
        return cdiv(self.rows, cfg.block)

    def __getitem__(self, cfg: LaunchConfig) -> PreparedLaunch:
        launch = self._by_config.get(cfg)
        if launch is None:
            grid = (self.programs(cfg),) if self.grid_y is None else (self.programs(cfg), self.grid_y)
            launch = self._by_config[cfg] = PreparedLaunch(
                self.kernel, grid, self.scalars,
                {**self.meta, self.block_name: cfg.block, "num_warps": cfg.num_warps, "STREAM": cfg.stream},
                self.layout)
        return launch


_TUNED: dict[tuple, LaunchConfig] = {}


def tuned_config(key: tuple, configs: Sequence[LaunchConfig], trial: Callable[[LaunchConfig], object]) -> LaunchConfig:
    """The configuration to launch with for problems of this ``key`` (name, size bucket, dtypes, device).

    The first candidate under the interpreter, when ``autotuning()`` is off or when it is the only one;
    otherwise the fastest by the driver's ``triton.testing.do_bench`` of ``trial(config)``, measured on the first
    call with this key and remembered (a candidate that does not compile or fit this GPU is skipped).
    ``trial`` launches the kernel on the real inputs but into
    scratch outputs, so that kernels that accumulate (atomics) leave the real output untouched; this
    is why the memory-bound kernels are tuned here rather than by ``triton.autotune``, whose timing runs
    would write the real output.
    """
    if len(configs) == 1 or interpreting() or not autotuning():
        return configs[0]
    if key not in _TUNED:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources, PTXASError

        bench = _benchmarker()
        times, failures = [], []
        for c in configs:
            try:
                times.append(bench(lambda c=c: trial(c), warmup=5, rep=20))
            except (OutOfResources, CompilationError, PTXASError) as exc:  # this GPU cannot run that candidate
                times.append(float("inf"))
                failures.append(exc)
        if len(failures) == len(configs):
            raise failures[0]
        _TUNED[key] = configs[min(range(len(configs)), key=times.__getitem__)]
    return _TUNED[key]


def _benchmarker() -> Callable[..., float]:
    """The active Triton driver's timer, as ``triton.autotune`` uses it: ``triton.testing.do_bench`` on an
    NVIDIA GPU (benchmarks/compile_check.py puts a compile-only stand-in there)."""
    return triton.runtime.driver.active.get_benchmarker()


def scratch_trial(launch: Callable[..., object], *outputs: torch.Tensor) -> Callable[[LaunchConfig], object]:
    """A ``trial`` for :func:`tuned_config` that calls ``launch(config, *scratch)`` with scratch tensors
    shaped like ``outputs`` (made on the first timing run only, so no memory is spent once tuned)."""
    scratch: list[torch.Tensor] = []

    def trial(cfg: LaunchConfig) -> object:
        if not scratch:
            scratch.extend(torch.zeros_like(t) for t in outputs)
        return launch(cfg, *scratch)

    return trial
