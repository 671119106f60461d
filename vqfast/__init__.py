"""vqfast: exact, fast vector quantization for PyTorch (fused Triton kernels, drop-in VQ layer)."""

from vqfast._version import __version__
from vqfast.functional import code_usage, gather, nearest_code, quantize, resolve_backend
from vqfast.layer import VectorQuantizer, soft_assignment_entropy

__all__ = ["__version__", "nearest_code", "gather", "code_usage", "quantize", "resolve_backend", "VectorQuantizer", "soft_assignment_entropy"]
