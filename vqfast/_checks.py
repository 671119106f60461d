"""Argument validation shared by every backend: clear errors instead of silent wrong answers."""

from __future__ import annotations

import math
import operator
import os

import torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
METRICS = ("l2", "cosine")
# torch.set_float32_matmul_precision's names, which the functional ops follow.
MATMUL_PRECISIONS = ("highest", "high", "medium")


# torch.autograd.functional's vectorize=True batches with the older vmap, whose batched tensors (no
# storage a kernel could read, no single value) functorch's transform check does not see.
is_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)


def host_values(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or under torch.func transforms the plain tensor beneath their wrappers (all of vmap's
    batch, grad's levels), whose values can be read (``int(t.min())``) where the wrapper's cannot."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_search_inputs(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2",
                        allow_mixed_dtypes: bool = False) -> None:
    check_tensor(z, "z")
    check_tensor(codebook, "codebook")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    # Shapes and dtypes read once: this runs on every call, and small calls are bound by host time.
    c_shape, z_shape = codebook.shape, z.shape
    if len(c_shape) != 2:
        raise ValueError(f"codebook must be 2-D (K, D), got {_describe(codebook)}")
    if c_shape[0] == 0:
        raise ValueError(f"codebook must have at least one code (K >= 1), got {_describe(codebook)}")
    if not z_shape:
        raise ValueError(f"z must have at least one dimension (..., D), got {_describe(z)}")
    if z_shape[-1] != c_shape[1]:
        raise ValueError(
            f"last dimension of z ({z_shape[-1]}) must equal the codebook dimension D ({c_shape[1]}); "
            f"z: {_describe(z)}, codebook: {_describe(codebook)}"
        )
    if c_shape[1] == 0:
        raise ValueError(f"code dimension D must be >= 1, got {_describe(codebook)}")
    z_dtype, c_dtype = z.dtype, codebook.dtype
    for name, dtype in (("z", z_dtype), ("codebook", c_dtype)):
        if dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16 or float64), got {dtype}")
    if z_dtype != c_dtype and not allow_mixed_dtypes:
        raise TypeError(
            f"z and codebook must have the same dtype, got z {z_dtype} and codebook {c_dtype}; "
            "cast one of them (e.g. codebook.to(z.dtype))"
        )
    if z.device != codebook.device:
        raise ValueError(f"z and codebook must be on the same device, got z on {z.device}, codebook on {codebook.device}")


# Both the backend choice (vqfast.functional, which must not import the kernels) and the kernels' own
# launch check refuse bfloat16 under Triton's CPU interpreter with this message: NumPy has no bfloat16,
# and the interpreter's bf16 products come out wrong.
INTERPRETER_BF16_REFUSAL = ("Triton's CPU interpreter computes bfloat16 kernels wrongly; run bfloat16 tensors on a "
                            "CUDA GPU, or on the CPU with the torch backend (VQFAST_BACKEND=torch)")


def check_gather_inputs(codebook: torch.Tensor, indices: torch.Tensor, check_range: bool = True) -> None:
    check_tensor(codebook, "codebook")
    check_tensor(indices, "indices")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be 2-D (K, D), got {_describe(codebook)}")
    if codebook.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"codebook must be a floating-point tensor, got {codebook.dtype}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be int64 or int32, got {indices.dtype}")
    if indices.device != codebook.device:
        raise ValueError(
            f"codebook and indices must be on the same device, got codebook on {codebook.device}, indices on {indices.device}"
        )
    # (Meta tensors have shapes but no values to check.)
    if check_range and indices.numel() > 0 and not indices.is_meta:
        values = host_values(indices)
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= codebook.shape[0]:
            raise ValueError(
                f"indices must lie in [0, {codebook.shape[0]}) for a codebook of {codebook.shape[0]} codes, "
                f"got values in [{lo}, {hi}]"
            )


def check_usage_inputs(indices: torch.Tensor, num_codes: int, check_range: bool = True) -> None:
    check_tensor(indices, "indices")
    num_codes = check_num_codes(num_codes)
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be int64 or int32, got {indices.dtype}")
    if check_range and indices.numel() > 0 and not indices.is_meta:
        values = host_values(indices)
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= num_codes:
            raise ValueError(f"indices must lie in [0, {num_codes}), got values in [{lo}, {hi}]")


# Values a VQFAST_* on/off variable may take (any case, spaces ignored); unset means the switch's default.
_SWITCH_ON = ("1", "true", "yes", "on")
_SWITCH_OFF = ("", "0", "false", "no", "off")


def env_switch(name: str, default: bool) -> bool:
    """The on/off environment variable ``name``: 1/true/yes/on or 0/false/no/off (empty is off), ``default``
    when unset. Any other value is an error: ``VQFAST_AUTOTUNE=flase`` must not silently keep tuning."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _SWITCH_ON:
        return True
    if value in _SWITCH_OFF:
        return False
    raise ValueError(f"{name} must be 1 or 0 (or true/false, yes/no, on/off), got {raw!r}")


def check_matmul_precision(precision: str | None) -> None:
    """Checked on every backend, so a name the GPU path would refuse fails on the CPU too."""
    if precision is not None and precision not in MATMUL_PRECISIONS:
        raise ValueError(
            f"precision must be None or one of {MATMUL_PRECISIONS} (torch.set_float32_matmul_precision's "
            f"names), got {precision!r}; for a bf16 search pass bf16 tensors"
        )


def check_num_codes(num_codes: object) -> int:
    """``num_codes`` as a positive Python int (NumPy and 0-d tensor integers are accepted)."""
    try:
        return check_int(num_codes, "num_codes", minimum=1)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def check_int(value: object, name: str, minimum: int | None = None) -> int:
    """``value`` as a Python int (NumPy and 0-d tensor integers too; not bools or floats such as 2.5)."""
    try:
        # A one-element bool tensor converts to 0 or 1 (a mask passed in an int's place, say).
        if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        kind = "a positive int" if minimum == 1 else "an int"
        raise TypeError(f"{name} must be {kind}, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {number}")
    return number


# The smallest soft-assignment temperature: the Triton kernels scale by 2 / T in float32, which
# overflows from T = 2**-127 on (the reference refuses the same values, as a backend must).
SMALLEST_TEMPERATURE = 2.0 ** -126


def check_number(value: object, name: str, minimum: float | None = None, below: float | None = None) -> float:
    """``value`` as a finite Python float, ``>= minimum`` and ``< below`` (each where given)."""
    wanted = "a finite number"
    if minimum is not None:
        wanted += f" >= {minimum:g}"
    if below is not None:
        wanted += f" and < {below:g}" if minimum is not None else f" < {below:g}"
    if torch.compiler.is_compiling() and not isinstance(value, (bool, str, bytes)):
        # torch.compile(dynamic=True) makes numbers symbolic, whose checks would break the graph (eager
        # calls check them).
        return value  # type: ignore[return-value]
    if isinstance(value, torch.Tensor) and value.requires_grad:
        # It is read as a plain number: a learned value would silently get no gradient.
        raise TypeError(f"{name} must be {wanted}, not a tensor that requires grad (it would get no gradient "
                        f"through {name}); pass a number, or a detached tensor")
    try:
        if isinstance(value, (bool, str, bytes)):
            raise TypeError
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be {wanted}, got {value!r}") from None
    if (not math.isfinite(number) or (minimum is not None and number < minimum)
            or (below is not None and number >= below)):
        raise ValueError(f"{name} must be {wanted}, got {number}")
    return number


def check_bool(value: object, name: str) -> bool:
    """``value`` as a bool (True/False, 0/1 or NumPy bools), never the truthiness of a string."""
    if isinstance(value, (str, bytes)) or value not in (True, False):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_row_mask(mask: object, shape: tuple[int, ...], device: torch.device, where: str) -> torch.Tensor:
    """A padding mask: a bool tensor of ``shape`` (the rows' shape, without the channels) on ``device``;
    ``where`` says what the shape comes from, for the error."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor of dtype bool, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool (True for the rows to quantize), got {mask.dtype}")
    if mask.shape != shape:
        raise ValueError(f"mask must have the shape of z without its channel dimension {tuple(shape)} "
                         f"({where}); got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device}, z on {device}: they must be on the same device")
    return mask
