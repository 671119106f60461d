"""``python -m vqfast.models train {ae,vae,vqvae} ...`` / ``python -m vqfast.models evaluate RUN``."""

import sys

from vqfast.models.train import main

if __name__ == "__main__":
    sys.exit(main())
