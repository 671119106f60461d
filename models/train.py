"""Training and evaluation of the AE / VAE / VQ-VAE: loops, checkpoints, metrics, figures, CLI hooks.

Python API: :func:`train` (a :class:`TrainConfig` or a dict) and :func:`evaluate`.
Command line: ``configure_train_parser`` / ``train_main`` and ``configure_evaluate_parser`` /
``evaluate_main`` back ``vqfast train {ae,vae,vqvae}`` and ``vqfast evaluate RUN``
(also reachable as ``python -m vqfast.models``).

Reported numbers: the per-epoch "Average loss" is the summed squared error per image (plus
``kl_weight`` x KL per image for the VAE), with pixels in [0, 1], accumulated over the epoch's
training batches, which is the quantity the article tabulates; MSE is per pixel and PSNR = 10 log10(1 / MSE).

A run folder holds ``config.json``, ``checkpoint.pt`` (rewritten atomically after every epoch),
``metrics.jsonl``, ``train.log``, ``summary.json`` (for the VQ-VAE also ``codebook_usage.json``) and the
figures. ``resume`` continues from the checkpoint exactly:
model, optimizer, epoch and batch position, RNG states and the shuffling generator are all restored.
Ctrl-C stops at the end of the current batch and saves a mid-epoch checkpoint (a second Ctrl-C
aborts at once, leaving the last complete checkpoint).

Under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` set) the model is wrapped in DistributedDataParallel
(NCCL on CUDA, Gloo on CPU), each rank reads its DistributedSampler shard, and rank 0 writes outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler

from vqfast import reference
from vqfast.layer import _bincount
from vqfast.models.autoencoders import MODEL_NAMES, build_model, count_parameters
from vqfast.models.data import DatasetUnavailable, dataset_label, describe_source, load_dataset

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "evaluate",
    "evaluate_model",
    "mean_image",
    "mean_image_mse",
    "load_run",
    "save_checkpoint",
    "load_checkpoint",
    "train_step",
    "configure_train_parser",
    "train_main",
    "configure_evaluate_parser",
    "evaluate_main",
    "ARTICLE_EPOCHS",
]

CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
_FORMAT = "vqfast-run-1"
# Epoch counts the article trains for; used when no epoch count is given.
ARTICLE_EPOCHS = {"ae": 20, "vae": 10, "vqvae": 30}
_PIXELS = 3 * 32 * 32


@dataclass
class TrainConfig:
    """Every option of a training run (the command line maps one-to-one onto these fields)."""

    model: str = "vqvae"
    epochs: int | None = None  # None: the article's count for the model (ARTICLE_EPOCHS)
    batch_size: int = 64
    lr: float = 1e-3
    latent_dim: int = 1024
    num_codes: int = 4096
    code_dim: int = 128
    beta: float | None = None  # None: the VQ preset's (0.25 for "vqfast", 1.0 for "article")
    vq_preset: str = "vqfast"  # vqfast: the layer's defaults; article: beta 1, no dead-code restarts
    vq_impl: str = "vqfast"  # vqfast: VectorQuantizer; article: the article's VQ step (fixed), for comparison
    kl_weight: float = 0.1
    codebook_init: str | None = "xavier_normal"  # None: the layer's own initialisation
    vq_kwargs: dict[str, Any] = field(default_factory=dict)
    backend: str = "auto"  # auto | torch | triton (sets VQFAST_BACKEND)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    data: str = "cifar10"  # cifar10 | svhn | sample | synthetic | path to a folder / .npz
    data_root: str = "data"
    download: bool = True
    out: str | None = None  # run folder; None: runs/<model>-<timestamp>
    amp: bool = False  # bf16 autocast (CUDA only)
    limit: int | None = None  # at most this many training images
    resume: bool = False
    overwrite: bool = False  # start afresh even if the run folder holds a checkpoint
    num_workers: int = 0
    threads: int | None = None  # CPU intra-op threads (None: PyTorch's default)
    progress: bool = True
    eval_data: str | None = None  # end-of-run evaluation source (None: the test split of ``data``)
    eval_limit: int | None = 2000  # test images for the end-of-run evaluation (None: all)
    grid_images: int = 16

    def resolved_epochs(self) -> int:
        """The number of epochs to train to."""
        return ARTICLE_EPOCHS[self.model] if self.epochs is None else int(self.epochs)


# Fields that define the model and the data stream; on resume the saved values win over new ones.
_FROZEN_ON_RESUME = ("model", "batch_size", "latent_dim", "num_codes", "code_dim", "beta", "vq_preset", "vq_impl", "kl_weight",
                     "codebook_init", "vq_kwargs", "seed", "data", "limit")


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    run_dir: Path
    model: nn.Module
    config: TrainConfig
    history: list[dict[str, Any]]
    test_metrics: dict[str, Any] | None
    step_losses: list[float]
    interrupted: bool = False


# ----------------------------------------------------------------------------------------- utilities


def _as_config(config: TrainConfig | Mapping[str, Any] | argparse.Namespace) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return dataclasses.replace(config, vq_kwargs=dict(config.vq_kwargs))
    if isinstance(config, argparse.Namespace):
        config = vars(config)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(config) - names
    if unknown:
        raise ValueError(f"unknown training options: {sorted(unknown)}")
    cfg = TrainConfig(**dict(config))
    cfg.vq_kwargs = dict(cfg.vq_kwargs or {})
    return cfg


def _validate(cfg: TrainConfig) -> None:
    if cfg.model not in MODEL_NAMES:
        raise ValueError(f"model must be one of {MODEL_NAMES}, got {cfg.model!r}")
    if cfg.backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be auto, torch or triton, got {cfg.backend!r}")
    if cfg.resolved_epochs() < 0 or cfg.batch_size <= 0 or cfg.lr <= 0:
        raise ValueError("epochs must be >= 0, batch_size and lr > 0")
    if cfg.limit is not None and cfg.limit <= 0:
        raise ValueError(f"limit must be positive, got {cfg.limit}")


def apply_backend(backend: str) -> None:
    """Select the VQ backend through ``VQFAST_BACKEND`` (``auto`` leaves the environment alone)."""
    if backend in ("torch", "triton"):
        os.environ["VQFAST_BACKEND"] = backend


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> the local CUDA device when there is one, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but no CUDA device is available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def _psnr(mse: float) -> float:
    return 10.0 * math.log10(1.0 / mse) if mse > 0 else float("inf")


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _model_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    return dict(latent_dim=cfg.latent_dim, num_codes=cfg.num_codes, code_dim=cfg.code_dim, beta=cfg.beta,
                kl_weight=cfg.kl_weight, codebook_init=cfg.codebook_init, vq_kwargs=cfg.vq_kwargs,
                vq_preset=cfg.vq_preset, vq_impl=cfg.vq_impl)


def _print(msg: str, log_path: Path | None = None) -> None:
    print(msg, flush=True)
    if log_path is not None:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(msg + "\n")


# ------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``state`` with ``torch.save`` atomically: to a temporary file, fsync, then ``os.replace``.

    A crash or exception mid-write leaves the previous file at ``path`` untouched (and no temporary).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``path``: the file or its run folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a vqfast training checkpoint")
    return state


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------ distribution


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            t = t.clone()
            torch.distributed.all_reduce(t)
        return t

    def any(self, flag: bool, device: torch.device) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def _init_distributed(device_spec: str) -> _Dist:
    """Join the process group described by torchrun's environment, if any."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return _Dist()
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if world <= 1 and not dist.is_initialized():
        return _Dist(rank=0, world_size=1, local_rank=local_rank)
    owns = False
    if not dist.is_initialized():
        use_cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    return _Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                 enabled=True, owns_group=owns)


# ------------------------------------------------------------------------------------ data stream


class _ResumableBatchSampler(Sampler[list[int]]):
    """Batches from ``sampler``, able to skip the first ``skip`` batches of its next pass.

    Skipping happens on indices, before any image is loaded, so resuming mid-epoch costs nothing.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int) -> None:
        self.batches = BatchSampler(sampler, batch_size, drop_last=False)
        self.skip = 0

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        for i, batch in enumerate(self.batches):
            if i >= skip:
                yield batch

    def __len__(self) -> int:
        return len(self.batches) - self.skip


class _LossModule(nn.Module):
    """Makes ``loss_terms`` the ``forward`` so that DistributedDataParallel sees every call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.loss_terms(x)


def train_step(loss_module: nn.Module, x: torch.Tensor, optimizer: torch.optim.Optimizer,
               amp: bool = False) -> dict[str, torch.Tensor]:
    """One optimisation step on batch ``x``; returns the model's loss terms."""
    optimizer.zero_grad(set_to_none=True)
    with _autocast(x.device, amp):
        terms = loss_module(x)
    terms["loss"].backward()
    optimizer.step()
    return terms


class _StopRequest:
    """First Ctrl-C: finish the current batch, checkpoint, stop. Second Ctrl-C: KeyboardInterrupt now."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nInterrupt received: stopping after this batch and saving a checkpoint "
              "(press Ctrl-C again to abort at once).", file=sys.stderr, flush=True)

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)


# ----------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset: Dataset, device: torch.device | str = "cpu", batch_size: int = 256,
                   amp: bool = False, keep_images: int = 0) -> dict[str, Any]:
    """Deterministic reconstruction of every image of ``dataset``.

    Returns ``sse`` (N,) float64 per-image summed squared error, ``labels`` (N,), ``mse`` (per pixel,
    over the set), ``psnr``, for the VQ-VAE ``indices`` (N, h, w), and the first ``keep_images``
    originals/reconstructions as ``originals`` / ``reconstructions``.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    sse_list, labels, indices = [], [], []
    originals, recons = [], []
    kept = 0
    try:
        for x, y in loader:
            x = x.to(device)
            with _autocast(device, amp):
                if hasattr(model, "quantize"):
                    z_q, _, idx = model.quantize(model.encode(x))
                    recon = model.decode(z_q)
                    indices.append(idx.cpu())
                else:
                    recon = model.reconstruct(x)
            recon = recon.float()
            sse_list.append((recon - x).pow(2).flatten(1).sum(1).double().cpu())
            labels.append(torch.as_tensor(y).cpu())
            if kept < keep_images:
                take = min(keep_images - kept, x.shape[0])
                originals.append(x[:take].cpu())
                recons.append(recon[:take].cpu())
                kept += take
    finally:
        model.train(was_training)
    sse = torch.cat(sse_list)
    pixels = _PIXELS if len(dataset) == 0 else int(dataset[0][0].numel())
    mse = float(sse.sum() / (len(sse) * pixels))
    out: dict[str, Any] = {"sse": sse, "labels": torch.cat(labels), "mse": mse, "psnr": _psnr(mse), "n": len(sse)}
    if indices:
        out["indices"] = torch.cat(indices)
    if keep_images:
        out["originals"] = torch.cat(originals)
        out["reconstructions"] = torch.cat(recons)
    return out


@torch.no_grad()
def mean_image(dataset: Dataset, batch_size: int = 1024) -> torch.Tensor:
    """The per-pixel mean (3, H, W) of ``dataset``'s images, in float64."""
    total, n = None, 0
    for x, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        s = x.double().sum(0)
        total = s if total is None else total + s
        n += x.shape[0]
    if total is None:
        raise ValueError("empty dataset")
    return total / n


@torch.no_grad()
def mean_image_mse(dataset: Dataset, mean: torch.Tensor, batch_size: int = 1024) -> float:
    """Per-pixel MSE of predicting every image of ``dataset`` by ``mean``: the bar a model must clear."""
    total, count = 0.0, 0
    for x, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        total += float((x.double() - mean).pow(2).sum())
        count += x.numel()
    return total / count


def load_run(run: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, TrainConfig, dict[str, Any]]:
    """Rebuild the model of a run folder (or checkpoint file): ``(model, config, checkpoint)``."""
    state = load_checkpoint(run)
    cfg = _as_config(state["config"])
    model = build_model(cfg.model, **_model_kwargs(cfg))
    model.load_state_dict(state["model_state"])
    model.to(device).eval()
    return model, cfg, state


# ------------------------------------------------------------------------------------- training


def _default_run_dir(model: str) -> Path:
    return Path("runs") / f"{model}-{time.strftime('%Y%m%d-%H%M%S')}"


def _merge_resumed(cfg: TrainConfig, saved: Mapping[str, Any]) -> TrainConfig:
    saved_cfg = _as_config(saved)
    changes = {}
    for name in _FROZEN_ON_RESUME:
        new, old = getattr(cfg, name), getattr(saved_cfg, name)
        if new != old:
            changes[name] = (new, old)
        setattr(cfg, name, old)
    if changes:
        described = ", ".join(f"{k}={v[0]!r} (run has {v[1]!r})" for k, v in changes.items())
        print(f"resume: keeping the run's settings; ignored {described}", file=sys.stderr)
    if cfg.epochs is None:
        cfg.epochs = saved_cfg.resolved_epochs()
    return cfg


def train(config: TrainConfig | Mapping[str, Any]) -> TrainResult:
    """Train one model as described by ``config`` (a :class:`TrainConfig` or a dict of its fields).

    Raises ``KeyboardInterrupt`` after saving a checkpoint when interrupted with Ctrl-C.
    """
    cfg = _as_config(config)
    _validate(cfg)
    apply_backend(cfg.backend)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = _init_distributed(cfg.device)
    try:
        return _train(cfg, dist)
    finally:
        if dist.owns_group:
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, dist: _Dist) -> TrainResult:
    device = resolve_device(cfg.device, dist.local_rank)
    if cfg.backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise ValueError("backend triton runs on CUDA devices; on the CPU use backend torch (or auto), or set "
                         "TRITON_INTERPRET=1 to run the kernels in Triton's (slow) interpreter")
    if cfg.amp and device.type != "cuda":
        print("--amp: bf16 autocast is used on CUDA only; training in fp32 on the CPU", file=sys.stderr)
    run_dir = Path(cfg.out) if cfg.out else dist.broadcast_object(_default_run_dir(cfg.model))
    ckpt_path = run_dir / CHECKPOINT_NAME

    state: dict[str, Any] | None = None
    if cfg.resume:
        state = load_checkpoint(ckpt_path)
        cfg = _merge_resumed(cfg, state["config"])
    elif ckpt_path.exists() and not cfg.overwrite:
        raise FileExistsError(f"{run_dir} already holds a run; pass resume=True (--resume) to continue it, "
                              f"overwrite=True (--overwrite) to replace it, or choose another folder")
    epochs = cfg.resolved_epochs()
    cfg.epochs = epochs
    log_path = run_dir / "train.log" if dist.is_main else None
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:
            for stale in (METRICS_NAME, "train.log"):
                (run_dir / stale).unlink(missing_ok=True)
        (run_dir / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")

    # Rank 0 fetches the data first so that the other ranks find it on disk.
    if not dist.is_main:
        dist.barrier()
    train_set = load_dataset(cfg.data, train=True, root=cfg.data_root, download=cfg.download,
                             limit=cfg.limit, seed=cfg.seed)
    if dist.is_main:
        dist.barrier()

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_model(cfg.model, **_model_kwargs(cfg)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    torch.manual_seed(cfg.seed + dist.rank)  # but independent noise (VAE draws) per rank

    shuffle_gen = torch.Generator().manual_seed(cfg.seed)
    if dist.enabled:
        sampler: Sampler[int] = torch.utils.data.DistributedSampler(
            train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=cfg.seed)
    else:
        sampler = RandomSampler(train_set, generator=shuffle_gen)
    batches = _ResumableBatchSampler(sampler, cfg.batch_size)
    loader = DataLoader(train_set, batch_sampler=batches, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda", generator=shuffle_gen)
    steps_per_epoch = len(batches)

    history: list[dict[str, Any]] = []
    step_losses: list[float] = []
    start_epoch, start_batch = 0, 0
    acc_init: torch.Tensor | None = None
    counts_init: torch.Tensor | None = None
    if state is not None:
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        start_epoch, start_batch = int(state["epoch"]), int(state["batch"])
        shuffle_gen.set_state(state["shuffle_state"])
        same_world = int(state.get("world_size", 1)) == dist.world_size
        if not same_world:
            print(f"resume: the run was saved with {state.get('world_size', 1)} processes, now "
                  f"{dist.world_size}; the continuation will not be bit-identical", file=sys.stderr)
        mine = dist.rank if same_world else 0
        _set_rng_state(state["rng"][mine])
        history = list(state["history"])
        step_losses = list(state["step_losses"])
        if start_batch:
            acc_init = state["acc"][mine].to(device)
            saved_counts = state["code_counts"][mine]
            counts_init = None if saved_counts is None else saved_counts.to(device)
        if dist.is_main:
            where = f"epoch {start_epoch + 1}, batch {start_batch}" if start_batch else f"epoch {start_epoch + 1}"
            _print(f"Resuming {run_dir} at {where} of {epochs}", log_path)

    train_module: nn.Module = _LossModule(model)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        train_module = DistributedDataParallel(train_module, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint_state(epoch: int, batch: int, shuffle_state: torch.Tensor, acc: torch.Tensor | None,
                         counts: torch.Tensor | None) -> dict[str, Any] | None:
        # Every rank's RNG state and partial sums, so that a resume is exact on every rank.
        rngs = dist.gather_objects(_rng_state())
        accs = dist.gather_objects(None if acc is None else acc.cpu())
        counts_all = dist.gather_objects(None if counts is None else counts.cpu())
        if not dist.is_main:
            return None
        return {
            "format": _FORMAT,
            "config": dataclasses.asdict(cfg),
            "model_state": model.state_dict(),
            "optimizer_state": optimizer.state_dict(),
            "epoch": epoch,
            "batch": batch,
            "shuffle_state": shuffle_state,
            "rng": rngs,
            "acc": accs,
            "code_counts": counts_all,
            "history": history,
            "step_losses": step_losses,
            "world_size": dist.world_size,
            "torch_version": str(torch.__version__),
        }

    def write_checkpoint(*args: Any) -> None:
        st = checkpoint_state(*args)
        if st is not None:
            save_checkpoint(st, ckpt_path)

    if state is None:
        # An initial checkpoint, so that even an interrupt during the first epoch leaves one to load.
        write_checkpoint(0, 0, shuffle_gen.get_state(), None, None)
    if dist.is_main:
        _print(f"Training {cfg.model} ({count_parameters(model):,} parameters) on {device} "
               f"[{dataset_label(train_set, cfg.data)}: {len(train_set):,} images, {steps_per_epoch} batches/epoch"
               f"{f' per rank x {dist.world_size} ranks' if dist.enabled else ''}] -> {run_dir}", log_path)

    is_vq = cfg.model == "vqvae"
    interrupted = False
    with _StopRequest() as stop:
        for epoch in range(start_epoch, epochs):
            model.train()
            if dist.enabled:
                sampler.set_epoch(epoch)  # type: ignore[attr-defined]
            epoch_shuffle_state = shuffle_gen.get_state()
            skip = start_batch if epoch == start_epoch else 0
            batches.skip = skip
            # [images, sse, objective, kl, vq_loss x images] accumulated on the device (no per-step sync)
            acc = acc_init if (skip and acc_init is not None) else torch.zeros(5, dtype=torch.float64, device=device)
            counts = None
            if is_vq:
                counts = counts_init if (skip and counts_init is not None) else torch.zeros(
                    cfg.num_codes, dtype=torch.int64, device=device)
            epoch_steps: list[torch.Tensor] = []
            t0 = time.perf_counter()
            done = skip
            bar = _progress(loader, cfg.progress and dist.is_main, f"epoch {epoch + 1}/{epochs}", initial=skip,
                            total=steps_per_epoch)
            for x, _ in bar:
                x = x.to(device, non_blocking=True)
                terms = train_step(train_module, x, optimizer, cfg.amp)
                n = x.shape[0]
                acc += torch.stack([
                    # torch.full, not torch.tensor: a host-to-device copy would sync every step.
                    torch.full((), float(n), dtype=torch.float64, device=device),
                    terms["sse"].double(),
                    terms["objective"].double(),
                    terms.get("kl", terms["sse"].new_zeros(())).double(),
                    terms.get("vq_loss", terms["sse"].new_zeros(())).double() * n,
                ])
                if counts is not None:
                    # Not torch.bincount: on CUDA it reads the indices' range on the host every step.
                    counts += _bincount(terms["indices"], cfg.num_codes)
                epoch_steps.append(terms["objective"].detach() / n)
                done += 1
                if hasattr(bar, "set_postfix") and (done % 10 == 0 or done == steps_per_epoch):
                    bar.set_postfix(loss=f"{float(acc[2] / acc[0]):.3f}")
                if dist.any(stop.requested, device):
                    interrupted = True
                    break
            if hasattr(bar, "close"):
                bar.close()
            if epoch_steps:
                step_losses.extend(torch.stack(epoch_steps).float().cpu().tolist())
            if interrupted and done < steps_per_epoch:
                write_checkpoint(epoch, done, epoch_shuffle_state, acc, counts)
                if dist.is_main:
                    _print(f"Interrupted in epoch {epoch + 1} after batch {done}/{steps_per_epoch}; "
                           f"checkpoint saved to {ckpt_path} (continue with --resume)", log_path)
                break
            record = _epoch_record(epoch, dist.all_sum(acc), None if counts is None else dist.all_sum(counts),
                                   cfg, time.perf_counter() - t0)
            history.append(record)
            write_checkpoint(epoch + 1, 0, shuffle_gen.get_state(), None, None)
            if dist.is_main:
                _print(_epoch_line(record, cfg), log_path)
                with open(run_dir / METRICS_NAME, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            if interrupted:
                if dist.is_main:
                    _print(f"Interrupted after epoch {epoch + 1}; checkpoint saved to {ckpt_path}", log_path)
                break

    if interrupted:
        raise KeyboardInterrupt

    test_metrics = None
    if dist.is_main:
        test_metrics = _finish_run(model, cfg, train_set, run_dir, device, history, step_losses, steps_per_epoch,
                                   log_path)
    dist.barrier()
    return TrainResult(run_dir=run_dir, model=model, config=cfg, history=history, test_metrics=test_metrics,
                       step_losses=step_losses)


def _progress(loader: DataLoader, enabled: bool, desc: str, initial: int, total: int):
    if not enabled:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=desc, initial=initial, total=total, leave=False, dynamic_ncols=True)


def _epoch_record(epoch: int, acc: torch.Tensor, counts: torch.Tensor | None, cfg: TrainConfig,
                  seconds: float) -> dict[str, Any]:
    n, sse, objective, kl, vq = (float(v) for v in acc.cpu())
    n = max(n, 1.0)
    mse = sse / (n * _PIXELS)
    rec: dict[str, Any] = {
        "epoch": epoch + 1,
        "images": int(n),
        "avg_loss": objective / n,
        "sse_per_image": sse / n,
        "mse": mse,
        "psnr": _psnr(mse),
        "seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else None,
    }
    if cfg.model == "vae":
        rec["kl_per_image"] = kl / n
    if counts is not None:
        counts = counts.cpu()
        _, perplexity = reference.histogram_entropy(counts, torch.float64)
        rec.update(vq_loss=vq / n, codes_used=int((counts > 0).sum()), perplexity=float(perplexity))
    return rec


def _epoch_line(rec: Mapping[str, Any], cfg: TrainConfig) -> str:
    line = (f"====> Epoch: {rec['epoch']}, Average loss: {rec['avg_loss']:.4f} | "
            f"MSE/pixel {rec['mse']:.5f} | PSNR {rec['psnr']:.2f} dB")
    if "kl_per_image" in rec:
        line += f" | KL/image {rec['kl_per_image']:.1f}"
    if "vq_loss" in rec:
        line += (f" | VQ loss {rec['vq_loss']:.4f} | codes used {rec['codes_used']}/{cfg.num_codes}"
                 f" | perplexity {rec['perplexity']:.1f}")
    return line + f" | {rec['seconds']:.1f} s"


def _finish_run(model: nn.Module, cfg: TrainConfig, train_set: Dataset, run_dir: Path, device: torch.device,
                history: list[dict[str, Any]], step_losses: list[float], steps_per_epoch: int,
                log_path: Path | None) -> dict[str, Any]:
    """Held-out evaluation and figures, written by rank 0 at the end of a run."""
    from vqfast.models import viz

    model.eval()
    test_set = load_dataset(cfg.eval_data or cfg.data, train=False, root=cfg.data_root, download=cfg.download,
                            limit=cfg.eval_limit, seed=cfg.seed)
    train_label, test_label = dataset_label(train_set, cfg.data), dataset_label(test_set, cfg.eval_data or cfg.data)
    result = evaluate_model(model, test_set, device, batch_size=256, amp=cfg.amp, keep_images=cfg.grid_images)
    baseline = mean_image_mse(test_set, mean_image(train_set))
    test = {"event": "test", "epoch": len(history), "data": test_label, "images": result["n"], "mse": result["mse"],
            "psnr": result["psnr"], "sse_per_image": float(result["sse"].mean()), "mean_image_mse": baseline}
    lines = [f"Test ({test_label}, {result['n']} images): MSE/pixel {test['mse']:.5f} | "
             f"PSNR {test['psnr']:.2f} dB | SSE/image {test['sse_per_image']:.3f} | predicting the mean "
             f"training image instead: MSE/pixel {baseline:.5f}"]

    viz.save_loss_curve(history, run_dir / "loss_curve.png", step_losses, steps_per_epoch,
                        title=f"{cfg.model} on {train_label}")
    viz.save_reconstruction_grid(result["originals"], result["reconstructions"], run_dir / "reconstructions.png")

    if "indices" in result:
        # Indices were collected on the CPU: count them there, whatever backend the model used.
        from vqfast.reference import code_usage

        idx = result["indices"].to(torch.int64)
        counts, entropy, perplexity = code_usage(idx, cfg.num_codes)
        counts = counts.cpu()
        used = int((counts > 0).sum())
        report = {"num_codes": cfg.num_codes, "codes_used": used, "perplexity": float(perplexity),
                  "entropy_nats": float(entropy), "assignments": int(idx.numel()),
                  "images": int(idx.shape[0]), "latent_grid": list(idx.shape[1:]),
                  "top_codes": [[int(i), int(counts[i])] for i in torch.argsort(counts, descending=True)[:20]
                                if counts[i] > 0],
                  "counts": counts.tolist()}
        (run_dir / "codebook_usage.json").write_text(json.dumps(report) + "\n")
        viz.save_code_histogram(counts, run_dir / "codebook_usage.png",
                                title=f"code usage on {result['n']} test images: perplexity {float(perplexity):.1f}")
        test.update(codes_used=used, perplexity=float(perplexity))
        lines.append(f"Codebook: {used}/{cfg.num_codes} codes used on the test images, perplexity {float(perplexity):.1f}")

    if cfg.model == "vae":
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        viz.save_image_grid(model.sample(32, device=device, generator=g), run_dir / "samples.png", nrow=8)
        originals = result["originals"]
        pairs = min(4, originals.shape[0] // 2)
        if pairs:
            x1, x2 = originals[:pairs].to(device), originals[pairs:2 * pairs].to(device)
            strip = model.blend(x1, x2, torch.linspace(0, 1, 9).tolist())  # (A, B, 3, H, W)
            # originals framing each row: x1 | blends | x2
            full = torch.cat([x1.unsqueeze(0), strip, x2.unsqueeze(0)])
            viz.save_blend_strip(full, run_dir / "blend.png")

    with open(run_dir / METRICS_NAME, "a", encoding="utf-8") as f:
        f.write(json.dumps(test) + "\n")
    summary = {"model": cfg.model, "parameters": count_parameters(model), "epochs": len(history),
               "train_data": train_label, "train_images": len(train_set),
               "final_train": history[-1] if history else None, "test": test}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for line in lines:
        _print(line, log_path)
    return test


# ------------------------------------------------------------------------------------ evaluation API


def _auroc(negatives: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve of ``score > t`` separating positives from negatives (ties count 1/2)."""
    scores = torch.cat([negatives, positives]).double()
    ranks = torch.empty_like(scores)
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    # average ranks over ties
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks[order] = avg[inverse]
    n_neg, n_pos = len(negatives), len(positives)
    u = ranks[n_neg:].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def _score_summary(sse: torch.Tensor) -> dict[str, float]:
    q = torch.quantile(sse.double(), torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
    return {"score_mean": float(sse.mean()), "score_p50": float(q[0]), "score_p90": float(q[1]),
            "score_p99": float(q[2]), "score_max": float(sse.max())}


def _write_scores_csv(path: Path, source: str, result: Mapping[str, Any], threshold: float | None) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("source,index,label,sse,mse,psnr" + (",anomalous" if threshold is not None else "") + "\n")
        for i, (s, y) in enumerate(zip(result["sse"].tolist(), result["labels"].tolist())):
            mse = s / _PIXELS
            row = f"{source},{i},{y},{s:.6f},{mse:.8f},{_psnr(mse):.3f}"
            if threshold is not None:
                row += f",{int(s > threshold)}"
            f.write(row + "\n")


def evaluate(run: str | Path, data: str = "cifar10", split: str = "test", ood: str | None = None,
             data_root: str = "data", download: bool = True, limit: int | None = None, batch_size: int = 256,
             device: str = "auto", backend: str | None = None, amp: bool = False, out_dir: str | Path | None = None,
             worst: int = 16) -> dict[str, Any]:
    """Reconstruction quality and anomaly scores of a trained run on a data source.

    The anomaly score of an image is its summed squared reconstruction error. Writes
    ``eval-<source>-<split>.csv`` (one row per image) and ``eval-<source>-<split>.json`` (the summary)
    and a grid of the ``worst`` reconstructed images to ``out_dir`` (default: the run folder).
    With ``ood`` (another source, e.g. ``svhn`` for a CIFAR-10 model) its images are scored too, and
    the summary gives the AUROC of the score separating them from ``data`` and the fraction of them
    above the 95th percentile of ``data``'s scores.
    """
    from vqfast.models import viz

    if backend:
        apply_backend(backend)  # a runtime choice: the backend a run was trained with is not reused
    dev = resolve_device(device)
    model, cfg, state = load_run(run, dev)
    run_dir = Path(run) if Path(run).is_dir() else Path(run).parent
    out = Path(out_dir) if out_dir else run_dir
    out.mkdir(parents=True, exist_ok=True)
    use_train_split = split == "train"

    ds = load_dataset(data, train=use_train_split, root=data_root, download=download, limit=limit)
    res = evaluate_model(model, ds, dev, batch_size=batch_size, amp=amp)
    name = describe_source(data)
    summary: dict[str, Any] = {"run": str(run_dir), "model": cfg.model, "epochs_trained": int(state["epoch"]),
                               "data": data, "split": split, "images": res["n"], "mse": res["mse"],
                               "psnr": res["psnr"], **_score_summary(res["sse"])}
    threshold = float(torch.quantile(res["sse"], 0.95))
    summary["threshold_p95"] = threshold
    if "indices" in res:
        from vqfast.reference import code_usage  # CPU indices, whatever backend the model used

        counts, _, perplexity = code_usage(res["indices"].to(torch.int64), cfg.num_codes)
        summary.update(codes_used=int((counts > 0).sum()), perplexity=float(perplexity))
    _write_scores_csv(out / f"eval-{name}-{split}.csv", name, res, threshold)
    worst_idx = torch.argsort(res["sse"], descending=True)[:worst]
    summary["worst"] = [[int(i), float(res["sse"][i])] for i in worst_idx]
    if worst > 0:
        xs = torch.stack([ds[int(i)][0] for i in worst_idx])
        with torch.no_grad(), _autocast(dev, amp):
            rec = model.reconstruct(xs.to(dev)).float().cpu()
        viz.save_reconstruction_grid(xs, rec, out / f"eval-{name}-{split}-worst.png")

    if ood:
        ood_ds = load_dataset(ood, train=use_train_split, root=data_root, download=download, limit=limit)
        ood_res = evaluate_model(model, ood_ds, dev, batch_size=batch_size, amp=amp)
        ood_name = describe_source(ood)
        _write_scores_csv(out / f"eval-{ood_name}-{split}.csv", ood_name, ood_res, threshold)
        summary["ood"] = {"data": ood, "images": ood_res["n"], "mse": ood_res["mse"], "psnr": ood_res["psnr"],
                          **_score_summary(ood_res["sse"]),
                          "auroc": _auroc(res["sse"], ood_res["sse"]),
                          "flagged_at_p95": float((ood_res["sse"] > threshold).double().mean())}
    (out / f"eval-{name}-{split}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ------------------------------------------------------------------------------------------ CLI


def _parse_kv(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def configure_train_parser(parser: argparse.ArgumentParser) -> None:
    """Add the training options (``model`` positional: ae, vae or vqvae) to ``parser``."""
    a = parser.add_argument
    a("model", choices=MODEL_NAMES, help="which autoencoder to train")
    a("--epochs", type=int, default=None,
      help="epochs to train (default: the article's: ae 20, vae 10, vqvae 30); with --resume, the new total")
    a("--batch-size", type=int, default=64)
    a("--lr", type=float, default=1e-3, help="Adam learning rate")
    a("--latent-dim", type=int, default=1024, help="latent size of the AE and VAE")
    a("--codes", dest="num_codes", type=int, default=4096, help="VQ-VAE codebook size")
    a("--code-dim", type=int, default=128, help="VQ-VAE code dimension")
    a("--beta", type=float, default=None,
      help="VQ commitment weight (default: the preset's, 0.25 for vqfast, 1.0 for article)")
    a("--vq-preset", choices=("vqfast", "article"), default="vqfast",
      help="VQ-VAE quantizer settings: vqfast (beta 0.25, dead-code restarts: keeps the codebook alive) or "
           "article (beta 1, no restarts: the article's settings with its defects fixed)")
    a("--vq-impl", choices=("vqfast", "article"), default="vqfast",
      help="VQ step: vqfast's VectorQuantizer, or the article's plain-PyTorch VQ step with its defects fixed "
           "(for comparing speed and results; use with --vq-preset article)")
    a("--kl-weight", type=float, default=0.1, help="VAE weight of the KL term")
    a("--codebook-init", choices=("xavier_normal", "layer"), default="xavier_normal",
      help="xavier_normal (the article's) or the VQ layer's own initialisation; "
           "--vq-option init=... implies the latter")
    a("--vq-option", dest="vq_kwargs", type=_parse_kv, action="append", default=[], metavar="KEY=VALUE",
      help="extra keyword argument for vqfast.VectorQuantizer (VALUE parsed as JSON when possible); repeatable")
    a("--backend", choices=("auto", "torch", "triton"), default="auto",
      help="VQ backend: auto picks triton on CUDA and the PyTorch reference on the CPU")
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    a("--seed", type=int, default=0)
    a("--data", default="cifar10",
      help="cifar10 (falls back to the bundled sample when unavailable), svhn, sample, synthetic, "
           "or a path to an ImageFolder directory or an .npz with x (N,32,32,3) uint8 and y")
    a("--data-root", default="data", help="where torchvision datasets live / are downloaded to")
    a("--no-download", dest="download", action="store_false", help="never download datasets")
    a("--out", default=None, help="run folder (default runs/<model>-<timestamp>)")
    a("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    a("--limit", type=int, default=None, help="use at most this many training images")
    a("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    a("--overwrite", action="store_true", help="replace an existing run in --out")
    a("--workers", dest="num_workers", type=int, default=0, help="DataLoader worker processes")
    a("--threads", type=int, default=None,
      help="CPU threads for PyTorch (default: its own choice; 1 is often fastest on a busy machine)")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    a("--eval-data", default=None,
      help="source for the end-of-run evaluation (default: the test split of --data; an .npz with only x/y "
           "has no separate test split, so pass its held-out partner here)")
    a("--eval-limit", type=int, default=2000, help="test images for the end-of-run evaluation (0: all)")


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["vq_kwargs"] = dict(values.get("vq_kwargs") or [])
    if values.get("codebook_init") == "layer":
        values["codebook_init"] = None
    if values.get("eval_limit") == 0:
        values["eval_limit"] = None
    return _as_config(values)


def train_main(args: argparse.Namespace) -> int:
    """Run ``vqfast train`` with parsed ``args``; returns the exit status (130 after Ctrl-C)."""
    try:
        cfg = _config_from_args(args)
        train(cfg)
    except KeyboardInterrupt:
        print("Training interrupted.", file=sys.stderr)
        return 130
    except (DatasetUnavailable, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def configure_evaluate_parser(parser: argparse.ArgumentParser) -> None:
    """Add the evaluation options (``run`` positional: a run folder or checkpoint) to ``parser``."""
    a = parser.add_argument
    a("run", help="run folder (or its checkpoint.pt)")
    a("--data", default="cifar10", help="cifar10, svhn, sample, synthetic, or a folder / .npz path")
    a("--split", choices=("test", "train"), default="test")
    a("--ood", default=None, help="a second source scored as out-of-distribution (e.g. svhn); reports AUROC")
    a("--data-root", default="data")
    a("--no-download", dest="download", action="store_false")
    a("--limit", type=int, default=None, help="use at most this many images per source")
    a("--batch-size", type=int, default=256)
    a("--device", default="auto")
    a("--backend", choices=("auto", "torch", "triton"), default=None)
    a("--amp", action="store_true")
    a("--out", dest="out_dir", default=None, help="folder for the CSV/JSON/PNG (default: the run folder)")
    a("--worst", type=int, default=16, help="how many worst-reconstructed images to show")


def _format_eval(summary: Mapping[str, Any]) -> str:
    lines = [f"{summary['model']} ({summary['epochs_trained']} epochs) on {summary['data']} {summary['split']}: "
             f"{summary['images']} images, MSE/pixel {summary['mse']:.5f}, PSNR {summary['psnr']:.2f} dB",
             f"  anomaly score (SSE/image): mean {summary['score_mean']:.3f}, median {summary['score_p50']:.3f}, "
             f"p90 {summary['score_p90']:.3f}, p99 {summary['score_p99']:.3f}, max {summary['score_max']:.3f}"]
    if "perplexity" in summary:
        lines.append(f"  codes used {summary['codes_used']}, perplexity {summary['perplexity']:.1f}")
    lines.append("  worst images: " + ", ".join(f"#{i} ({s:.2f})" for i, s in summary["worst"][:5]))
    if "ood" in summary:
        o = summary["ood"]
        lines.append(f"  {o['data']}: {o['images']} images, MSE/pixel {o['mse']:.5f}, PSNR {o['psnr']:.2f} dB, "
                     f"score mean {o['score_mean']:.3f}; AUROC {o['auroc']:.3f}, "
                     f"{100 * o['flagged_at_p95']:.1f}% above the in-distribution 95th percentile")
    return "\n".join(lines)


def evaluate_main(args: argparse.Namespace) -> int:
    """Run ``vqfast evaluate`` with parsed ``args``; prints a summary, returns the exit status."""
    try:
        summary = evaluate(args.run, data=args.data, split=args.split, ood=args.ood, data_root=args.data_root,
                           download=args.download, limit=args.limit, batch_size=args.batch_size,
                           device=args.device, backend=args.backend, amp=args.amp, out_dir=args.out_dir,
                           worst=args.worst)
    except (DatasetUnavailable, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(_format_eval(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vqfast.models {train,evaluate} ...``."""
    parser = argparse.ArgumentParser(prog="python -m vqfast.models")
    sub = parser.add_subparsers(dest="command", required=True)
    configure_train_parser(sub.add_parser("train", help="train an AE, VAE or VQ-VAE"))
    configure_evaluate_parser(sub.add_parser("evaluate", help="reconstruction error and anomaly scores of a run"))
    args = parser.parse_args(argv)
    return train_main(args) if args.command == "train" else evaluate_main(args)
