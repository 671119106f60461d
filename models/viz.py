"""Figures for training runs: reconstruction grids, loss curves, code-usage histograms, VAE samples/blends.

Matplotlib is used through its object API on the Agg canvas, so nothing here touches pyplot's global
state or needs a display; it is imported only when a figure is drawn.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "upscale",
    "save_image_grid",
    "save_reconstruction_grid",
    "save_blend_strip",
    "save_loss_curve",
    "save_code_histogram",
]


def upscale(images: torch.Tensor, scale: int) -> torch.Tensor:
    """Nearest-neighbour enlargement: 32 x 32 thumbnails are hard to judge at their native size."""
    if scale <= 1:
        return images
    return F.interpolate(images.float(), scale_factor=scale, mode="nearest")


def _check_images(images: torch.Tensor, nrow: int, what: str = "images") -> torch.Tensor:
    """``images`` as (N, C, H, W) with N >= 1 (one (C, H, W) image gets its batch dimension)."""
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"{what} must be (N, C, H, W) with N >= 1 (or one (C, H, W) image), got {tuple(images.shape)}")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    return images


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, scale: int = 3, padding: int = 2) -> Path:
    """Save images (N, 3, H, W) (or one (3, H, W)) in [0, 1] as one PNG grid with ``nrow`` images per row
    (NaN pixels show as black)."""
    from torchvision.utils import save_image

    images = _check_images(images, nrow)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(upscale(images.detach().cpu().clamp(0, 1), scale), str(path), nrow=nrow, padding=padding,
               pad_value=1.0)
    return path


def save_reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path: str | Path,
                             nrow: int = 8, scale: int = 3) -> Path:
    """Originals and their reconstructions in alternating rows (row 1 originals, row 2 theirs, ...)."""
    originals = _check_images(originals.detach().cpu(), nrow, "originals")
    reconstructions = _check_images(reconstructions.detach().cpu(), nrow, "reconstructions")
    if originals.shape != reconstructions.shape:
        raise ValueError(f"shape mismatch: {tuple(originals.shape)} vs {tuple(reconstructions.shape)}")
    n = originals.shape[0]
    rows = []
    for start in range(0, n, nrow):
        o, r = originals[start:start + nrow], reconstructions[start:start + nrow]
        if o.shape[0] < nrow:  # pad the last pair of rows so originals and reconstructions stay aligned
            pad = torch.ones(nrow - o.shape[0], *o.shape[1:])
            o, r = torch.cat([o, pad]), torch.cat([r, pad])
        rows += [o, r]
    return save_image_grid(torch.cat(rows), path, nrow=nrow, scale=scale)


def save_blend_strip(strips: torch.Tensor, path: str | Path, scale: int = 3) -> Path:
    """Latent blends (A, B, 3, H, W) or (A, 3, H, W): one row per image pair, one column per alpha."""
    if strips.dim() == 4:
        strips = strips.unsqueeze(1)
    if strips.dim() != 5 or 0 in strips.shape[:2]:
        raise ValueError(f"strips must be (A, B, 3, H, W) or (A, 3, H, W) with A, B >= 1, got {tuple(strips.shape)}")
    a, b = strips.shape[:2]
    return save_image_grid(strips.transpose(0, 1).reshape(a * b, *strips.shape[2:]), path, nrow=a, scale=scale)


def _figure(width: float = 6.4, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_loss_curve(history: Sequence[dict], path: str | Path, step_losses: Sequence[float] | None = None,
                    steps_per_epoch: float | None = None, title: str = "") -> Path:
    """Per-epoch average loss (and PSNR on a second axis) with, optionally, the per-batch losses.

    ``history`` holds the per-epoch records (``epoch``, ``avg_loss``, optionally ``psnr`` and ``batches``);
    ``step_losses`` the per-batch loss per image, placed at fractional epochs: an epoch's ``batches`` of
    them where its record says how many, else ``steps_per_epoch`` (the epochs after the last record).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    if step_losses:
        spe = steps_per_epoch or len(step_losses)
        xs = _batch_positions(len(step_losses), history, spe)
        ax.plot(xs, list(step_losses), color="tab:blue", alpha=0.25, linewidth=0.8, label="batch")
        window = max(1, min(len(step_losses) // 10, int(spe) // 2 or 1))
        if window > 1:  # a running mean makes the trend readable through the batch-to-batch noise
            kernel = torch.ones(window, dtype=torch.float64) / window
            smooth = torch.nn.functional.conv1d(torch.tensor([[list(step_losses)]], dtype=torch.float64),
                                                kernel.view(1, 1, -1)).flatten().tolist()
            ax.plot(xs[window - 1:], smooth, color="tab:blue", linewidth=1.5, label=f"running mean ({window})")
    epochs = [h["epoch"] for h in history]
    losses = [h["avg_loss"] for h in history]
    if epochs:
        ax.plot(epochs, losses, "o-", color="tab:blue", label="epoch average")
    ax.set_xlabel("epoch")
    ax.set_ylabel("average loss per image")
    positive = [v for v in list(losses) + list(step_losses or []) if v > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing to label before the first epoch (--epochs 0)
        ax.legend(loc="upper left")
    psnr = [h.get("psnr") for h in history]
    if epochs and all(p is not None for p in psnr):
        ax2 = ax.twinx()
        ax2.plot(epochs, psnr, "s--", color="tab:orange", label="PSNR (train)")
        ax2.set_ylabel("PSNR [dB]", color="tab:orange")
        ax2.legend(loc="upper right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(str(path))
    return path


def _batch_positions(count: int, history: Sequence[dict], steps_per_epoch: float) -> list[float]:
    """The fractional epoch after each of ``count`` batches: epochs can differ in length (a run resumed
    with another number of processes), so each epoch's own batch count places its losses."""
    lengths = {h["epoch"]: h["batches"] for h in history if h.get("batches")}
    xs: list[float] = []
    epoch = 0
    while len(xs) < count:
        length = lengths.get(epoch + 1, steps_per_epoch)
        xs.extend(epoch + (j + 1) / length for j in range(min(math.ceil(length), count - len(xs))))
        epoch += 1
    return xs


def save_code_histogram(counts: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Code-usage histogram: counts of every code (K,), sorted by frequency, on a log scale where the
    counts span more than a factor of 50."""
    if counts.dim() != 1:
        raise ValueError(f"counts must be one count per code (K,), got shape {tuple(counts.shape)}")
    counts = counts.detach().cpu().to(torch.float64)
    if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
        raise ValueError("counts must be finite and >= 0")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = torch.sort(counts, descending=True).values
    used = int((counts > 0).sum())
    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    shown = ordered[: max(used, 1)]
    ax.bar(range(len(shown)), shown.tolist(), width=1.0, color="tab:green")
    ax.set_xlabel(f"code rank (used codes: {used} of {len(counts)})")
    ax.set_ylabel("assignments")
    if len(shown) and shown[0] > 0 and shown[0] / max(float(shown[-1]), 1.0) > 50:
        ax.set_yscale("log")
    ax.set_xlim(-0.5, max(len(shown), 1) - 0.5)
    ax.grid(True, axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(str(path))
    return path
