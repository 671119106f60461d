"""Small helpers for vqfast's ``torch.autograd.Function`` classes."""

from __future__ import annotations

import inspect
from typing import Any, TypeVar

import torch

FunctionClass = TypeVar("FunctionClass", bound=type)


def signature_kept(cls: FunctionClass) -> FunctionClass:
    """Class decorator for an autograd Function with ``setup_context``: keeps its ``forward``'s signature
    on the function (``__signature__``), which ``inspect.signature`` returns as it is. PyTorch binds
    the arguments of such a Function's every ``apply`` to that signature, and building it afresh took
    ~20 of the ~37 us of host time per call that the binding costs."""
    assert issubclass(cls, torch.autograd.Function)
    forward = cls.__dict__["forward"].__func__  # (a staticmethod)
    forward.__signature__ = inspect.signature(forward)
    return cls


def intercepted() -> bool:
    """True while anything traces or intercepts calls: torch.compile and torch.export, fake tensors and
    other dispatch modes (profilers' counters), torch.jit.trace, torch.func transforms (vmap, grad).
    Those must see the custom ops (a transform's wrapped tensors have no storage a kernel could read)
    and the Functions' setup_context form."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._are_functorch_transforms_active())


_EAGER_FORMS: dict[type, type] = {}


def apply_function(function: type, *args: Any) -> Any:
    """``function.apply(*args)`` for a Function with ``setup_context``, all arguments positional. In a
    plain eager call it applies the same Function in the ctx-in-forward form (forward, then
    setup_context on the same ctx, the same backward), which PyTorch applies without binding the
    arguments to forward's signature: 3.6 against 17.7 us of host time per apply on a 2-core EPYC.
    Whatever traces or transforms the call (torch.compile, export and fake tensors, other dispatch
    modes, torch.jit.trace, torch.func: :func:`intercepted`) gets the setup_context form, which those
    need."""
    if intercepted():
        return function.apply(*args)
    eager = _EAGER_FORMS.get(function)
    if eager is None:
        eager = _EAGER_FORMS[function] = _eager_form(function)
    return eager.apply(*args)


def _eager_form(function: type) -> type:
    """``function`` in the ctx-in-forward form, under the same name (so its backward node is named as
    the original's)."""
    forward, setup_context = function.forward, function.setup_context

    def eager_forward(ctx: object, *args: object) -> object:
        output = forward(*args)
        setup_context(ctx, args, output)
        return output

    return type(function.__name__, (torch.autograd.Function,),
                {"forward": staticmethod(eager_forward), "backward": function.__dict__["backward"],
                 "__module__": function.__module__, "__qualname__": function.__qualname__,
                 "__doc__": function.__doc__})
