"""vqfast: exact, fast vector quantization for PyTorch (fused Triton kernels, drop-in VQ layer)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vqfast._version import __version__

if TYPE_CHECKING:
    from vqfast._library import register_ops
    from vqfast.functional import code_usage, gather, nearest_code, quantize, resolve_backend, rotate_to_codes
    from vqfast.layer import VectorQuantizer, soft_assignment_entropy
    from vqfast.product import ProductVectorQuantizer
    from vqfast.projected import ProjectedVectorQuantizer
    from vqfast.residual import ResidualVectorQuantizer

__all__ = ["__version__", "nearest_code", "gather", "code_usage", "quantize", "rotate_to_codes", "resolve_backend",
           "VectorQuantizer", "ResidualVectorQuantizer", "ProjectedVectorQuantizer", "ProductVectorQuantizer",
           "soft_assignment_entropy",
           "register_ops"]

# The public names load on first use: importing torch takes seconds, which `vqfast --version`
# and a bare `import vqfast` need not pay.
_HOMES = {"nearest_code": "vqfast.functional", "gather": "vqfast.functional", "code_usage": "vqfast.functional",
          "quantize": "vqfast.functional", "rotate_to_codes": "vqfast.functional", "resolve_backend": "vqfast.functional",
          "VectorQuantizer": "vqfast.layer", "soft_assignment_entropy": "vqfast.layer",
          "ResidualVectorQuantizer": "vqfast.residual", "ProjectedVectorQuantizer": "vqfast.projected",
          "ProductVectorQuantizer": "vqfast.product",
          "register_ops": "vqfast._library"}


def __getattr__(name: str) -> Any:
    # The submodules, as `vqfast.reference` after a bare `import vqfast` (kernels needs triton, models
    # torchvision: imported only when asked for).
    if name in ("reference", "kernels", "models"):
        return importlib.import_module(f"vqfast.{name}")
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'vqfast' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    # The public names and the submodules loaded so far, not this module's own helpers.
    helpers = {"annotations", "importlib", "TYPE_CHECKING", "Any"}
    return sorted(set(__all__) | {n for n in globals() if not n.startswith("_") and n not in helpers})
