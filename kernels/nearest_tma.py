"""The nearest-code search pass with TMA loads and warp specialisation (sm_90), opt-in.

The search kernel of ``nearest.py`` runs each code tile's product and then its argmin in the same
warps: on sm_90 the tensor cores wait while the argmin issues, and the argmin waits for the product
(benchmarks/README.md, tuning notes 15 and 20). This kernel loads its tiles through tensor
descriptors (TMA, the loads take no registers or address arithmetic) and asks Triton to specialise
the warps of the code loop: one group of warps issues the loads, and two groups of four warps each
take half of the row block, each with its own products and argmin, so that one group's argmin can
run while the other's product is on the tensor cores (what FlashAttention-3 calls ping-pong).
The warp-specialised tiles fault at run time with Triton 3.6 on an H200 and are left out of the
candidates (``_WARP_SPECIALISED_CANDIDATES``): what runs is the kernel with TMA loads and software
pipelining only, autotuned over unspecialised tiles.

It covers what the goal shapes need: bf16/fp16 rows (exact products), and fp32 rows in the tf32
pass with its re-check (the same lower bounds, each slot's two lowest, the same settling and list of
rows for the re-search); D up to 256 in one tile; rows and codes whose layout TMA can read (last
stride 1, rows that do not overlap, row strides and base addresses multiples of 16 bytes).
``VQFAST_TMA_SEARCH=1`` turns it on for such searches on GPUs of compute capability 9.x with Triton
3.6 or newer (tensor descriptors, warp specialisation); other searches, and calls whose inputs are not
16-byte aligned, take the usual kernel. The results are the usual kernel's: the same scores or bounds,
slot-wise minima and ties to the lowest index, the same split winners for ``_reduce_splits_kernel``
and the same epilogues. Two
things Triton 3.6's warp specialisation cannot take are moved out of this kernel in the tf32 pass: the
rows' norms for the bound (a reduction before the loop) come from a launch before it, and the rows are
settled (the epilogue that appends to the list) by the reduction kernel, with one split too.
"""

from __future__ import annotations

import functools
import inspect

import torch
import triton
import triton.language as tl

from vqfast.kernels._common import autotuning, cdiv, interpreting, max_shared_memory, next_power_of_2
from vqfast.kernels._launch import PreparedLaunch, triton_launch
from vqfast.kernels.nearest import (
    _SEARCH_TENSORS, _code_norms_kernel, _reduce_slots, _row_error_factors, _shared_memory_bytes, _store_choice,
    _store_split_winners, _tile_scores, _update_slots, _upper_bound, tma_search_enabled,
)

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older Triton
    TensorDescriptor = None

# Searches that took this kernel so far (the benchmark checks that its provider timed this kernel).
launches = 0

# One tile holds a whole D: TMA boxes are at most 256 elements along each dimension.
MAX_D = 256
_TMA_ALIGN_BYTES = 16


@functools.lru_cache(maxsize=None)
def _triton_supports_it() -> bool:
    """Tensor descriptors and ``tl.range(warp_specialize=...)``, in a Triton this kernel was compiled with
    (3.6 and 3.8; older ones are untried)."""
    try:
        version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    return (version >= (3, 6) and TensorDescriptor is not None
            and "warp_specialize" in inspect.signature(tl.range.__init__).parameters)


@functools.lru_cache(maxsize=None)
def _device_supports_it(index: int) -> bool:
    # sm_90 only: the candidates are sized for its 227 KiB of shared memory (sm_120 has ~99 KiB) and
    # compiled for it (benchmarks/compile_check.py); other TMA-capable GPUs are untried.
    return torch.cuda.get_device_capability(index)[0] == 9


def _tma_layout(t: torch.Tensor) -> bool:
    """Whether TMA can read the (rows, D) matrix ``t`` as laid out (the base address is checked per call)."""
    # (Rows that overlap, e.g. an expanded tensor with stride 0, are left to the default kernel.)
    return (t.stride(1) == 1 and t.stride(0) >= t.shape[1]
            and (t.stride(0) * t.element_size()) % _TMA_ALIGN_BYTES == 0)


def suits(z: torch.Tensor, codebook: torch.Tensor, input_precision: str, recheck: bool) -> bool:
    """Whether a search pass of ``z`` against ``codebook`` (as ``_SearchPlan`` sees them) may use this
    kernel: 16-bit rows, or fp32 rows in the tf32 pass with its re-check (``recheck``)."""
    if not tma_search_enabled() or not _triton_supports_it() or codebook.dtype != z.dtype:
        return False
    if recheck:
        if z.dtype != torch.float32 or input_precision != "tf32":
            return False
    elif z.dtype not in (torch.float16, torch.bfloat16):
        return False
    d = z.shape[1]
    if d > MAX_D or not (_tma_layout(z) and _tma_layout(codebook)):
        return False
    return interpreting() or _gpu_supports_it(z.device)


def _gpu_supports_it(device: torch.device) -> bool:
    """A CUDA device of compute capability 9.x (TMA; warp specialisation)."""
    if device.type != "cuda":
        return False
    return _device_supports_it(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit(do_not_specialize=["N", "codes_per_split", "N_BUCKET", "stride_sn", "err_resid", "err_dot", "err_norm",
                               "err_tiny"])
def _nearest_code_tma_kernel(
    z_desc, c_desc, z_norm_ptr, z_resid_ptr,
    z_ptr, c_ptr, c_sqnorm_ptr, c_norm_ptr, c_resid_ptr,
    score_ptr, index_ptr, dist_ptr, second_ptr, second_index_ptr, third_ptr, upper_ptr,
    status_ptr, count_ptr, list_ptr, packed_ptr,
    N, K, D, codes_per_split, N_BUCKET, err_resid, err_dot, err_norm, err_tiny,
    stride_zn, stride_zd, stride_ck, stride_cd, stride_sn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DIST_BLOCK_D: tl.constexpr,
    WRITE_DISTANCE: tl.constexpr, RECHECK: tl.constexpr, K_ALIGN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """``_nearest_code_kernel`` (the same parameters after four more, the same outputs) with the code
    tiles read through TMA and the code loop warp-specialised: one block of rows against one split of
    the codebook, slot-wise running minima of ``||c||^2 - 2 z.c`` (with RECHECK, fp32 rows with tf32
    products: of its lower bound, keeping each slot's two lowest, from the rows' norms in ``z_norm_ptr``
    and ``z_resid_ptr``). With RECHECK it always writes split winners, which ``_reduce_splits_kernel``
    settles (see the module's docstring). TMA fills rows past N, codes past K and columns past D with
    zeros; codes past the split's end score +inf through their norm, so they never win."""
    tl.static_assert(not (RECHECK and WRITE_DISTANCE), "the tf32 pass leaves the rows to _reduce_splits_kernel")
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    row0 = pid_n * BLOCK_N
    offs_n = row0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    z_rows = z_ptr + offs_n.to(tl.int64)[:, None] * stride_zn
    k_begin = pid_s * codes_per_split
    # (Not k_begin + codes_per_split: rounded up, the last split's end can pass 2**31.)
    k_end = k_begin + tl.minimum(codes_per_split, K - k_begin)
    row_err = tl.zeros([BLOCK_N], tl.float32)
    row_resid_err = tl.zeros([BLOCK_N], tl.float32)
    if RECHECK:
        # The factors of _row_errors from the rows' norms, computed by a launch before this one:
        # Triton 3.6's warp specialisation fails on a kernel that reduces over rows before its loop.
        row_err, row_resid_err = _row_error_factors(tl.load(z_norm_ptr + offs_n, mask=mask_n, other=0.0),
                                                    tl.load(z_resid_ptr + offs_n, mask=mask_n, other=0.0),
                                                    err_resid, err_dot)
    z_block = z_desc.load([row0, 0])
    slot_best = tl.full([BLOCK_N, BLOCK_K], float("inf"), tl.float32)
    slot_start = tl.zeros([BLOCK_N, BLOCK_K], tl.int32) + k_begin
    slot_second = tl.full([BLOCK_N, BLOCK_K], float("inf"), tl.float32)
    full_tiles: tl.constexpr = K_ALIGN % BLOCK_K == 0
    for k0 in tl.range(k_begin, k_end, BLOCK_K, warp_specialize=WARP_SPECIALIZE):
        c_tile = c_desc.load([k0, 0])
        acc = tl.dot(z_block, c_tile.T, input_precision="tf32")
        offs_k = k0 + tl.arange(0, BLOCK_K)
        score, _ = _tile_scores(acc, k0, offs_k < k_end, c_sqnorm_ptr, c_norm_ptr, c_resid_ptr, row_err,
                                row_resid_err, err_norm, err_tiny, full_tiles, RECHECK)
        # (Two selects on the compare: with one, Triton 3.6 gives the 128 x 64 tile at D = 64 130 registers,
        # one program per SM instead of two.)
        slot_best, slot_start, slot_second = _update_slots(score, k0, slot_best, slot_start, slot_second, RECHECK,
                                                           False)
    best, best_index, second, second_index, third = _reduce_slots(slot_best, slot_start, slot_second, k_end,
                                                                  BLOCK_K, RECHECK)
    upper = best  # (read with RECHECK only)
    if RECHECK:
        upper = _upper_bound(best, best_index, mask_n, row_err, row_resid_err, c_sqnorm_ptr, c_norm_ptr,
                             c_resid_ptr, err_norm, err_tiny)
    if WRITE_DISTANCE:
        _store_choice(offs_n, best_index, mask_n, z_rows, c_ptr, D, stride_zd, stride_ck, stride_cd,
                      index_ptr, dist_ptr, BLOCK_N, DIST_BLOCK_D)
    else:
        _store_split_winners(offs_n, mask_n, pid_s, stride_sn, best, best_index, second, second_index, third, upper,
                             score_ptr, index_ptr, second_ptr, second_index_ptr, third_ptr, upper_ptr, RECHECK)


def _set_block_shapes(nargs: dict) -> None:
    """A candidate's tile sizes are its descriptors' block shapes (set before each launch)."""
    nargs["z_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_D"]]
    nargs["c_desc"].block_shape = [nargs["BLOCK_K"], nargs["BLOCK_D"]]


# (BLOCK_N, BLOCK_K, warps, stages, warp-specialised). With warp specialisation `num_warps` is each
# group's: Triton adds the loading warps, and two groups of four take 64 rows each (12 warps in all,
# checked with Triton 3.6 for sm_90; with 8 it does not specialise). The unspecialised TMA tiles are
# there for comparison and as a fallback the autotuner may prefer. 16-bit rows:
_SPECIALISED_16 = ((128, 64, 4, 3, True), (128, 64, 4, 4, True), (128, 128, 4, 2, True), (128, 128, 4, 3, True))
_UNSPECIALISED_16 = ((128, 64, 8, 3, False), (128, 128, 8, 2, False))
# fp32 rows with tf32 products and the re-check (each slot keeps two bounds and a start): 4-byte tiles,
# so at D = 256 only 32-code tiles leave room for two stages beside the row block.
_SPECIALISED_TF32 = ((128, 64, 4, 2, True), (128, 64, 4, 3, True), (128, 32, 4, 2, True), (128, 32, 4, 3, True))
_UNSPECIALISED_TF32 = ((128, 64, 8, 2, False), (128, 32, 8, 2, False))


# Whether the warp-specialised tiles are autotuning candidates: not at present. Triton 3.6 compiles them
# for sm_90 (benchmarks/compile_check.py), but on an H200 (driver 580, CUDA 13.0) every one of them faults
# at run time, at any shape, from 1 x 1 x 8 up (an illegal memory access; compute-sanitizer: an
# out-of-range shared-memory address in the kernel), while the unspecialised TMA tiles return the default
# kernel's indices and distances. Triton 3.8's pass fails on the kernel at compile time ("descriptor
# block and tensor must have the same number of elements": it splits the row block between the two
# groups but not its descriptor). The tiles stay listed for a Triton that runs them.
_WARP_SPECIALISED_CANDIDATES = False


def _config(block_n: int, block_k: int, warps: int, stages: int, specialised: bool) -> triton.Config:
    return triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k, "WARP_SPECIALIZE": specialised},
                         num_warps=warps, num_stages=stages, pre_hook=_set_block_shapes)


def _configs(specialised: tuple, unspecialised: tuple) -> list[triton.Config]:
    return [_config(*c) for c in (specialised if _WARP_SPECIALISED_CANDIDATES else ()) + unspecialised]


_INTERPRETER_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 32, "WARP_SPECIALIZE": False}
# A margin for the tf32 pass's larger epilogue (three bounds and two indices per row; Triton 3.6 asks
# for 197,222 bytes at 128 x 32 tiles, 2 stages, D = 256, against 196,608 for the tiles).
_RECHECK_SHARED_BYTES = 8192


def shared_memory_bytes(block_n: int, block_k: int, stages: int, block_d: int, element_bytes: int,
                        recheck: bool = False) -> int:
    """As the default kernel with a whole D per tile (the row block once, a code tile per stage, 2 KiB
    for barriers and reductions), 8 KiB more with the re-check. Triton 3.6, sm_90: 164,544 bytes for
    16-bit 128 x 64 tiles, 3 stages, D = 256."""
    return (_shared_memory_bytes(block_n, block_k, stages, block_d, True, element_bytes)
            + (_RECHECK_SHARED_BYTES if recheck else 0))


def _prune(configs, named_args, **kwargs):
    meta = {**named_args, **kwargs}
    limit = max_shared_memory()
    element_bytes = meta["z_ptr"].element_size()

    def need(c: triton.Config) -> int:
        return shared_memory_bytes(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, meta["BLOCK_D"],
                                   element_bytes, meta["RECHECK"])

    # (On sm_90 every D up to 256 has candidates that fit; the smallest is the last resort.)
    return [c for c in configs if need(c) <= limit] or [min(configs, key=need)]


_CONFIGS_16 = _configs(_SPECIALISED_16, _UNSPECIALISED_16)
_CONFIGS_TF32 = _configs(_SPECIALISED_TF32, _UNSPECIALISED_TF32)
_KEY = ["N_BUCKET", "K", "D", "codes_per_split", "WRITE_DISTANCE", "RECHECK"]
_tma_search_autotuned = triton.autotune(
    configs=_CONFIGS_16, key=_KEY, prune_configs_by={"early_config_prune": _prune},
)(_nearest_code_tma_kernel)
_tma_tf32_search_autotuned = triton.autotune(
    configs=_CONFIGS_TF32, key=_KEY, prune_configs_by={"early_config_prune": _prune},
)(_nearest_code_tma_kernel)


class TmaSearch:
    """The search pass of one problem through this kernel, in place of ``_SearchPlan``'s launch of
    ``_nearest_code_kernel``: the same scalars and tensors (``layout`` picks the kernel's 16 tensors
    from the pass's list, as ``PreparedLaunch`` does), plus the two descriptors made per call."""

    def __init__(self, z: torch.Tensor, codebook: torch.Tensor, splits: int, scalars: tuple, meta: dict,
                 layout: list[int]):
        n, d = z.shape
        k = codebook.shape[0]
        self.n, self.k, self.d = n, k, d
        self.block_d = max(16, next_power_of_2(d))
        self.scalars, self.layout = scalars, layout
        recheck = meta["RECHECK"]
        if recheck and meta["WRITE_DISTANCE"]:
            raise ValueError("the tf32 pass through the TMA kernel writes split winners (WRITE_DISTANCE=False)")
        self.meta = dict(meta, BLOCK_D=self.block_d)
        self.options: dict = {}
        tuner = _tma_tf32_search_autotuned if recheck else _tma_search_autotuned
        if interpreting():
            self.kernel = _nearest_code_tma_kernel
            self.meta.update(_INTERPRETER_CONFIG)
            self.blocks = (_INTERPRETER_CONFIG["BLOCK_N"], _INTERPRETER_CONFIG["BLOCK_K"])
            self.grid = (cdiv(n, self.blocks[0]), splits)
        elif not autotuning():
            first = _prune(tuner.configs, {"z_ptr": z}, BLOCK_D=self.block_d, RECHECK=recheck)[0]
            self.kernel = _nearest_code_tma_kernel
            self.meta.update(first.kwargs)
            self.options = dict(num_warps=first.num_warps, num_stages=first.num_stages)
            self.blocks = (first.kwargs["BLOCK_N"], first.kwargs["BLOCK_K"])
            self.grid = (cdiv(n, self.blocks[0]), splits)
        else:
            self.kernel = tuner
            self.blocks = (128, 64)  # replaced by the pre-hook of the candidate being launched
            self.grid = lambda cfg: (cdiv(n, cfg["BLOCK_N"]), splits)  # noqa: E731
        self.tuner = self.kernel if self.kernel is tuner else None
        self.row_norms = None
        if recheck:
            # ||z||, ||z - tf32(z)|| and ||z||^2 per row, as _row_errors sums them (blocks of DIST_BLOCK_D
            # columns, err_tiny under the roots); the launch also zeroes the list's length once more
            # (which the pass does not touch: _reduce_splits_kernel appends to it).
            err_tiny = scalars[8]
            self.row_norms = PreparedLaunch(_code_norms_kernel, (cdiv(n, 32),),
                                            (n, d, err_tiny, z.stride(0), z.stride(1)),
                                            dict(BLOCK_K=32, BLOCK_D=meta["DIST_BLOCK_D"]))

    def __call__(self, tensors: list[torch.Tensor]) -> None:
        global launches
        launches += 1
        z, codebook = tensors[0], tensors[1]
        if self.row_norms is not None:
            z_sqnorm, z_norm, z_resid = torch.empty((3, self.n), dtype=torch.float32, device=z.device)
            count = tensors[self.layout[_SEARCH_TENSORS.index("count")]]
            self.row_norms(z, z_sqnorm, z_norm, z_resid, count)
        else:
            z_norm = z_resid = tensors[2]  # (not read)
        block_n, block_k = self.blocks
        z_desc = TensorDescriptor(z, [self.n, self.d], [z.stride(0), 1], [block_n, self.block_d])
        c_desc = TensorDescriptor(codebook, [self.k, self.d], [codebook.stride(0), 1], [block_k, self.block_d])
        triton_launch(self.kernel, self.grid, z_desc, c_desc, z_norm, z_resid, *[tensors[i] for i in self.layout],
                      *self.scalars, **self.meta, **self.options)
