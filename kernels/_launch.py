"""Kernel launches with less host time than ``kernel[grid](...)``.

A small search is bound by the time Python spends launching kernels, and much of that is in Triton's
generic launch path: per call it binds the arguments by name, builds the compiled-kernel cache key,
looks the autotuner's choice up through a dict of every argument, and prepares launch hooks.
``launch_kernel`` remembers, per launch signature, the compiled kernel (and the autotuner's choice) that
Triton's own path picked the first time, and from then on calls that compiled kernel's launcher directly
with the same arguments. The signature holds what Triton specialises on (dtype and 16-byte alignment of
tensors; the value 1, divisibility by 16 and width of integers; the values of constexprs and of an
autotuner's key arguments), at least as finely as Triton does, so two calls that Triton would compile
differently never share an entry.

Equivalent to ``kernel[grid](*args, **meta)``; Triton's path runs whenever the shortcut does not apply
(the interpreter, launch hooks installed, debug or instrumentation mode, arguments Triton cannot
specialise).
"""

from __future__ import annotations

import contextlib
import operator
import threading
from typing import Any, Callable, Iterator, Sequence

import torch
import triton

try:  # Triton 3.3 and later; without them every launch takes Triton's own path.
    from triton import knobs as _knobs
    from triton._C.libtriton import native_specialize_impl as _native_specialize
    from triton.backends.compiler import BaseBackend as _BaseBackend
    from triton.runtime.jit import JITFunction as _JITFunction
except ImportError:  # pragma: no cover - older Triton
    _knobs = _native_specialize = _BaseBackend = _JITFunction = None

# Switch for comparisons and tests of Triton's path (see ``launch_path``).
_DIRECT = _native_specialize is not None


@contextlib.contextmanager
def launch_path(direct: bool) -> Iterator[None]:
    """Within the block, launches go directly (where they can) or all through Triton's own path."""
    global _DIRECT
    saved = _DIRECT
    _DIRECT = saved and direct
    try:
        yield
    finally:
        _DIRECT = saved


class _KernelInfo:
    """What a direct launch needs to know of a kernel, found once."""

    __slots__ = ("direct", "fn", "arg_names", "value_positions")

    def __init__(self, kernel: Any):
        autotuner = hasattr(kernel, "configs")
        fn = kernel.fn if autotuner else kernel
        self.fn = fn
        # Under TRITON_INTERPRET=1 the decorator makes interpreted functions, which launch no compiled code;
        # other backends (ROCm) specialise on more than _signature sees.
        # (Not ``_DIRECT``: launch_kernel reads it per call, and a kernel first seen inside
        # ``launch_path(direct=False)`` must not stay on Triton's path afterwards.)
        self.direct = (_native_specialize is not None and isinstance(fn, _JITFunction)
                       and triton.runtime.driver.active.get_current_target().backend == "cuda")
        self.arg_names = tuple(fn.arg_names) if self.direct else ()
        # Arguments keyed by value: constexpr parameters given positionally (Triton compiles one kernel per
        # value), and an autotuner's key arguments (it chooses by their values).
        positions = {p.num for p in fn.params if p.is_constexpr} if self.direct else set()
        if autotuner and self.direct:
            positions |= {self.arg_names.index(k) for k in kernel.keys if k in self.arg_names}
        self.value_positions = tuple(sorted(positions))


class _Entry:
    __slots__ = ("compiled", "meta_names", "config")

    def __init__(self, compiled: Any, meta_names: tuple[str, ...], config: Any):
        self.compiled = compiled
        self.meta_names = meta_names  # the kernel's parameters after the positional ones, in order
        self.config = config  # the autotuner's choice, or None

    def launch_tail(self, grid: Any, meta: dict) -> tuple[tuple[int, int, int], list]:
        """The 3-D grid and the values of the parameters after the positional arguments."""
        config = self.config
        full_meta = meta if config is None else {**meta, **config.kwargs}
        if callable(grid):
            grid = grid(full_meta)
        grid = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        return grid, [full_meta[name] for name in self.meta_names]


# Triton's Autotuner keeps the arguments of the call it runs on itself, and between its timing runs
# zeroes the tensors its ``reset_to_zero`` names from there: two threads inside one autotuner at once
# (nn.DataParallel replicas, a threaded server) would time, reset or fail on each other's arguments,
# and a search could return another call's zeroed indices. Every launch through an autotuner holds this
# lock; the direct launches of an already tuned problem never enter an autotuner, so they do not.
AUTOTUNER_LOCK = threading.RLock()


def triton_launch(kernel: Any, grid: Any, *args: Any, **meta: Any) -> Any:
    """``kernel[grid](*args, **meta)`` through Triton's own path; an autotuner's under
    :data:`AUTOTUNER_LOCK`."""
    if hasattr(kernel, "configs"):
        with AUTOTUNER_LOCK:
            return kernel[grid](*args, **meta)
    return kernel[grid](*args, **meta)


_KERNELS: dict[int, _KernelInfo] = {}
_ENTRIES: dict[tuple, _Entry] = {}
# Launches made through a cached compiled kernel (benchmarks/compile_check.py checks they happen).
direct_launches = 0


def _hooks_idle() -> bool:
    """No launch hooks (profilers such as Proton install them; a direct call would skip them), and no
    debug or instrumentation mode (they change what Triton compiles)."""
    runtime = _knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return (getattr(runtime, "add_stages_inspection_hook", None) is None and not runtime.debug
            and not getattr(_knobs.compilation, "instrumentation_mode", ""))


def _globals_unchanged(fn: Any) -> bool:
    """The globals the kernel read when compiled still hold their values (Triton's path raises if not)."""
    for (name, _), (value, namespace) in getattr(fn, "used_global_vals", {}).items():
        # Identity first: a ``tl.constexpr`` global compares through Python code (~3 us per launch).
        current = namespace.get(name, _MISSING)
        if current is not value and current != value:
            return False
    return True


_MISSING = object()


def _signature(args: Sequence[Any], tensor: type = torch.Tensor) -> tuple:
    """What Triton specialises a kernel on, per argument, at least as finely as Triton itself does
    (tests/test_launch.py holds it against ``native_specialize_impl``): for tensors the dtype and whether
    the address is a multiple of 16, for integers the value 1, divisibility by 16 and the width (i32,
    i64, u64); other values through Triton's own function. Written out for tensors and integers because
    Triton's function takes about 2 us per tensor, three times as long."""
    return tuple([(a.dtype, a.data_ptr() % 16 == 0) if type(a) is tensor else
                  (a == 1, a % 16 == 0, -0x80000000 <= a < 0x80000000, a < 0x8000000000000000) if type(a) is int else
                  _other_signature(a) for a in args])


def _other_signature(value: Any) -> Any:
    if value is None or type(value) is float or type(value) is bool:
        return type(value)
    return _native_specialize(_BaseBackend, value, False, True, True)


def _kernel_info(kernel: Any) -> _KernelInfo:
    info = _KERNELS.get(id(kernel))
    if info is None:
        info = _KERNELS[id(kernel)] = _KernelInfo(kernel)
    return info


def _direct_now(info: _KernelInfo) -> bool:
    """Whether a launch of this kernel may skip Triton's path at this moment."""
    return (info.direct and _DIRECT and _hooks_idle() and not info.fn.pre_run_hooks
            and _globals_unchanged(info.fn))


def _entry_key(kernel: Any, info: _KernelInfo, device: Any, args: Sequence[Any], meta: dict) -> tuple:
    """The key of ``_ENTRIES``; raises for a value Triton's specialisation does not take."""
    nargs = len(args)
    # (Those passed by name are among the meta items already.)
    return (id(kernel), device, _signature(args), tuple(meta.items()),
            tuple(args[i] for i in info.value_positions if i < nargs))


def launch_kernel(kernel: Any, grid: tuple | Callable[[dict], tuple], *args: Any, **meta: Any) -> None:
    """``kernel[grid](*args, **meta)``, through the compiled kernel's launcher once it is known.

    ``kernel`` is a ``triton.jit`` function or a ``triton.autotune`` of one. With an autotuner, ``grid``
    may be a function of the chosen configuration's meta-parameters, as for ``kernel[grid]``."""
    info = _kernel_info(kernel)
    if not _direct_now(info):
        triton_launch(kernel, grid, *args, **meta)
        return
    driver = triton.runtime.driver.active
    device = driver.get_current_device()
    try:
        key = _entry_key(kernel, info, device, args, meta)
    except Exception:  # a value Triton's specialisation does not take: its own path says what is wrong
        triton_launch(kernel, grid, *args, **meta)
        return
    entry = _ENTRIES.get(key)
    if entry is None:
        _first_launch(kernel, info, key, grid, args, meta)
        return
    grid, tail = entry.launch_tail(grid, meta)
    compiled = entry.compiled
    global direct_launches
    direct_launches += 1
    compiled.run(grid[0], grid[1], grid[2], driver.get_current_stream(device), compiled.function,
                 compiled.packed_metadata, None, None, None, *args, *tail)


class PreparedLaunch:
    """``launch_kernel(kernel, grid, *tensors, *scalars, **meta)`` for a launcher that repeats one launch
    (one problem shape): the grid, the arguments after the tensors and the meta-parameters are fixed
    here, so a call keys only what can change, the tensors' dtypes and 16-byte alignment and the device,
    instead of every argument (launch_kernel's key of a 30-argument search costs ~10 us).

    ``layout`` (indices into the call's tensors) lets a kernel that takes one tensor in several places
    be called with each tensor once: its dtype and alignment are then read once.
    """

    __slots__ = ("kernel", "info", "grid", "scalars", "meta", "layout", "_ready")

    def __init__(self, kernel: Any, grid: tuple | Callable[[dict], tuple], scalars: Sequence[Any] = (),
                 meta: dict | None = None, layout: Sequence[int] | None = None):
        self.kernel = kernel
        self.info = _kernel_info(kernel)
        self.grid = grid
        self.scalars = tuple(scalars)
        self.meta = dict(meta or {})
        self.layout = None if layout is None else _picker(tuple(layout))
        # (device, dtypes and alignment of the tensors) -> (compiled kernel, 3-D grid, arguments after
        # the tensors, then the meta-parameters in the compiled kernel's order)
        self._ready: dict[tuple, tuple] = {}

    def __call__(self, *tensors: Any) -> None:
        args = tensors if self.layout is None else self.layout(tensors)
        if not _direct_now(self.info):
            triton_launch(self.kernel, self.grid, *args, *self.scalars, **self.meta)
            return
        driver = triton.runtime.driver.active
        device = driver.get_current_device()
        try:
            key = (device, tuple([(type(t), t.dtype, t.data_ptr() % 16 == 0) for t in tensors]))
            ready = self._ready.get(key)
        except Exception:  # not tensors: launch_kernel's path says what is wrong
            ready = key = None
        if ready is None:
            self._first_call(key, device, args)
            return
        compiled, grid, tail = ready
        global direct_launches
        direct_launches += 1
        compiled.run(grid[0], grid[1], grid[2], driver.get_current_stream(device), compiled.function,
                     compiled.packed_metadata, None, None, None, *args, *tail)

    def _first_call(self, key: tuple | None, device: Any, args: tuple) -> None:
        """launch_kernel's launch (which makes the entry, if it can), then the entry kept for this key."""
        full_args = (*args, *self.scalars)
        launch_kernel(self.kernel, self.grid, *full_args, **self.meta)
        if key is None:
            return
        try:
            entry = _ENTRIES.get(_entry_key(self.kernel, self.info, device, full_args, self.meta))
        except Exception:
            return
        if entry is not None:
            grid, tail = entry.launch_tail(self.grid, self.meta)
            self._ready[key] = (entry.compiled, grid, (*self.scalars, *tail))


def _picker(layout: tuple[int, ...]) -> Callable[[tuple], tuple]:
    if len(layout) == 1:
        index = layout[0]
        return lambda tensors: (tensors[index],)
    return operator.itemgetter(*layout)


def _first_launch(kernel: Any, info: _KernelInfo, key: tuple, grid: Any, args: tuple, meta: dict) -> None:
    """Triton's own launch (compiling, autotuning), then the entry for the next calls like it."""
    tuned = hasattr(kernel, "configs")
    with AUTOTUNER_LOCK if tuned else contextlib.nullcontext():
        compiled = kernel[grid](*args, **meta)
        # (Read under the lock: another thread's launch may move best_config.)
        config = getattr(kernel, "best_config", None) if tuned else None
    if hasattr(compiled, "result"):  # a compilation future (asynchronous compile mode)
        compiled = compiled.result()
    if compiled is None or (config is not None and config.pre_hook is not None):
        return
    full_meta = {**meta, **(config.kwargs if config is not None else {})}
    meta_names = info.arg_names[len(args):]
    if not all(name in full_meta for name in meta_names):
        return  # a parameter left to its default value: only Triton's path fills it in
    if config is not None and not _compiled_with(compiled, config):
        return  # another thread's launch moved the autotuner's best_config meanwhile
    _ENTRIES[key] = _Entry(compiled, meta_names, config)


def compiled_constants(compiled: Any) -> dict[str, Any]:
    """The values a compiled kernel was specialised on, by parameter name: its constexprs, and
    arguments compiled in as constants (an integer 1, None)."""
    names = compiled.src.fn.arg_names
    out = {}
    for key, value in compiled.src.constants.items():
        index = key[0] if isinstance(key, tuple) else key
        out[names[index] if isinstance(index, int) else str(index)] = value
    return out


def _compiled_with(compiled: Any, config: Any) -> bool:
    """Whether ``compiled`` was built with ``config``'s meta-parameters and warps."""
    try:
        constants = compiled_constants(compiled)
        return (all(constants.get(name, _MISSING) == value for name, value in config.kwargs.items())
                and compiled.metadata.num_warps == config.num_warps
                and compiled.metadata.num_stages == config.num_stages)
    except Exception:  # noqa: BLE001 - unknown layout: do not cache
        return False
