"""AE, VAE and VQ-VAE for 32 x 32 images, their datasets, training loops and figures.

Installed as ``vqfast.models``. Heavy pieces (torchvision datasets, matplotlib) load on first use.
"""

from vqfast.models.autoencoders import MODEL_NAMES, ConvAE, ConvVAE, ConvVQVAE, build_model, count_parameters
from vqfast.models.data import load_dataset

__all__ = [
    "ConvAE",
    "ConvVAE",
    "ConvVQVAE",
    "MODEL_NAMES",
    "build_model",
    "count_parameters",
    "load_dataset",
    "TrainConfig",
    "evaluate",
]


def __getattr__(name: str):
    # ``train`` is the submodule's own name, so only these are forwarded; the training module
    # pulls in DataLoader machinery and the VQ layer, so it loads only when asked.
    if name in ("TrainConfig", "evaluate"):
        from vqfast.models import train as _train_module

        return getattr(_train_module, name)
    raise AttributeError(f"module 'vqfast.models' has no attribute {name!r}")
