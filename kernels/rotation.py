"""The rotation trick's backward (``vqfast.rotate_to_codes``) in one launch: each row's incoming gradient
g rotated and scaled the way the row z is carried onto its code c,

    dz = |c| / |z| * (g - 2 r (r.g) + 2 z^ (c^.g)),   r = (z^ + c^) / |z^ + c^|,

and g itself where that is not defined (a zero row or code, a code opposite its row, a row or code that
is not finite, |c| / |z| beyond fp32). Three passes over each block of rows: the rows' largest
magnitudes, then five dot products of the rows scaled by them (in float64), then the write (in fp32,
as the PyTorch ops compute it: near opposite codes the rounding of z^ + c^ limits both alike).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from vqfast._checks import check_number
from vqfast.kernels._common import (
    cdiv, check_column_count, check_kernel_floats, check_launchable, next_power_of_2, resolves_negative_views,
)
from vqfast.kernels._launch import PreparedLaunch


@triton.jit
def _rotate_grad_kernel(z_ptr, c_ptr, g_ptr, out_ptr, N, D, halfway_min,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Rows of D contiguous elements (the launcher makes them so); 64-bit row offsets.
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = offs_n[:, None] * D
    z_big = tl.zeros([BLOCK_N], tl.float32)
    c_big = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_n[:, None] & (offs_d[None, :] < D)
        z = tl.load(z_ptr + rows + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + rows + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        z_big = tl.maximum(z_big, tl.max(tl.abs(z), axis=1))
        c_big = tl.maximum(c_big, tl.max(tl.abs(c), axis=1))
    # Rows scaled to a largest magnitude of 1: their squares neither overflow nor underflow.
    z_big = tl.where(z_big > 0, z_big, 1.0)
    c_big = tl.where(c_big > 0, c_big, 1.0)
    zz = tl.zeros([BLOCK_N], tl.float64)
    cc = tl.zeros([BLOCK_N], tl.float64)
    zc = tl.zeros([BLOCK_N], tl.float64)
    zg = tl.zeros([BLOCK_N], tl.float64)
    cg = tl.zeros([BLOCK_N], tl.float64)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_n[:, None] & (offs_d[None, :] < D)
        z = (tl.load(z_ptr + rows + offs_d[None, :], mask=mask, other=0.0).to(tl.float32) / z_big[:, None]).to(tl.float64)
        c = (tl.load(c_ptr + rows + offs_d[None, :], mask=mask, other=0.0).to(tl.float32) / c_big[:, None]).to(tl.float64)
        g = tl.load(g_ptr + rows + offs_d[None, :], mask=mask, other=0.0).to(tl.float64)
        zz += tl.sum(z * z, axis=1)
        cc += tl.sum(c * c, axis=1)
        zc += tl.sum(z * c, axis=1)
        zg += tl.sum(z * g, axis=1)
        cg += tl.sum(c * g, axis=1)
    # (Zero norms are replaced in the divisions; such rows are not defined below.)
    z_norm = tl.sqrt(zz)
    c_norm = tl.sqrt(cc)
    z_div = tl.where(z_norm > 0, z_norm, 1.0)
    c_div = tl.where(c_norm > 0, c_norm, 1.0)
    halfway = tl.sqrt(tl.maximum(2.0 + 2.0 * zc / (z_div * c_div), 0.0))
    h_div = tl.where(halfway > halfway_min, halfway, 1.0)
    scale = (c_big / z_big).to(tl.float64) * (c_norm / z_div)
    # (NaN fails every comparison: rows or codes holding NaN or inf are not defined.)
    defined = ((z_norm > 0) & (c_norm > 0) & (halfway > halfway_min) & (halfway < 3.0) & (scale > 0)
               & (scale < 3.4028234663852886e38))
    # Per row, the factors of the write, replaced where the rotation is not defined.
    # z^ = (z / largest) / |z / largest|: the second factor lies in [1 / sqrt(D), 1], so neither
    # overflows fp32 (1 / (largest |z / largest|) would, for rows below ~3e-39).
    z_unit = tl.where(defined, 1.0 / z_div, 0.0).to(tl.float32)
    c_unit = tl.where(defined, 1.0 / c_div, 0.0).to(tl.float32)
    inv_halfway = tl.where(defined, 1.0 / h_div, 0.0).to(tl.float32)
    r_g = tl.where(defined, (zg / z_div + cg / c_div) / h_div, 0.0).to(tl.float32)
    c_g = tl.where(defined, cg / c_div, 0.0).to(tl.float32)
    scale = tl.where(defined, scale, 1.0).to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_n[:, None] & (offs_d[None, :] < D)
        z = tl.load(z_ptr + rows + offs_d[None, :], mask=mask, other=0.0).to(tl.float32) / z_big[:, None] * z_unit[:, None]
        c = tl.load(c_ptr + rows + offs_d[None, :], mask=mask, other=0.0).to(tl.float32) / c_big[:, None] * c_unit[:, None]
        g = tl.load(g_ptr + rows + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        r = (z + c) * inv_halfway[:, None]
        rotated = scale[:, None] * (g - 2.0 * r * r_g[:, None] + 2.0 * z * c_g[:, None])
        out = tl.where(defined[:, None], rotated, g)
        tl.store(out_ptr + rows + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@resolves_negative_views
def rotate_gradient(z: torch.Tensor, codes: torch.Tensor, grad: torch.Tensor, halfway_min: float) -> torch.Tensor:
    """The rotation trick's gradient for rows ``z``, ``codes`` and ``grad`` (N, D) of one shape, in
    ``z``'s dtype (see the module docstring): what ``vqfast.rotate_to_codes``'s backward computes with
    PyTorch ops, in one launch. Rows whose |z^ + c^| is at most ``halfway_min`` are not rotated."""
    check_launchable(z, codes, grad)
    # The kernel computes in fp32: a float64 row would be rounded (and one past fp32's range not rotated).
    check_kernel_floats(("z", z), ("codes", codes), ("grad", grad))
    if not z.device == codes.device == grad.device:
        raise ValueError(f"z, codes and grad must be on one device, got {z.device}, {codes.device} and {grad.device}")
    # NaN would rotate no row and a negative bound every row, halfway vectors of norm 0 included.
    halfway_min = check_number(halfway_min, "halfway_min", minimum=0)
    if z.dim() != 2 or z.shape != codes.shape or z.shape != grad.shape:
        raise ValueError(f"z, codes and grad must be (N, D) of one shape, got {tuple(z.shape)}, "
                         f"{tuple(codes.shape)} and {tuple(grad.shape)}")
    n, d = z.shape
    check_column_count(d, "z")
    # z's dtype, autograd's for z's gradient: rounded to a 16-bit grad's, |c| / |z| times it could overflow.
    out = torch.empty((n, d), dtype=z.dtype, device=grad.device)
    if n == 0 or d == 0:
        return out.copy_(grad)
    _launch(n, d, float(halfway_min))(z.contiguous(), codes.contiguous(), grad.contiguous(), out)
    return out


@functools.lru_cache(maxsize=256)
def _launch(n: int, d: int, halfway_min: float) -> PreparedLaunch:
    block_d = min(128, max(16, next_power_of_2(d)))
    # 16 rows by 128 columns: 16 elements of each of three tiles per thread with 4 warps, and five
    # float64 sums per row.
    block_n = 16
    return PreparedLaunch(_rotate_grad_kernel, (cdiv(n, block_n),), (n, d, halfway_min),
                          dict(BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4))
