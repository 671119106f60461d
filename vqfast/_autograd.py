"""Small helpers for vqfast's ``torch.autograd.Function`` classes."""

from __future__ import annotations

import inspect
from typing import TypeVar

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
