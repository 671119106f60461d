"""Triton kernels and their launchers (no autograd). Installed as ``vqfast.kernels``.

Every launcher takes plain tensors and returns plain tensors; nothing here asks CUDA anything at import
time. With ``TRITON_INTERPRET=1`` set before Triton is imported, the same kernels run on CPU tensors.
"""

from vqfast.kernels._common import release_scratch
from vqfast.kernels.gather import gather_rows, scatter_add_rows
from vqfast.kernels.nearest import nearest_code
from vqfast.kernels.quantize import quantize_backward, quantize_forward
from vqfast.kernels.rotation import rotate_gradient
from vqfast.kernels.soft_entropy import soft_entropy_backward, soft_entropy_forward
from vqfast.kernels.upkeep import ema_update, update_code_usage
from vqfast.kernels.usage import bincount, code_usage, code_usage_stats, finite_row_counts

__all__ = ["nearest_code", "gather_rows", "scatter_add_rows", "bincount", "code_usage", "code_usage_stats", "quantize_forward", "quantize_backward",
           "soft_entropy_forward", "soft_entropy_backward", "finite_row_counts", "update_code_usage", "ema_update",
           "rotate_gradient", "release_scratch"]
