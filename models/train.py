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
figures. A fresh run needs a new or empty folder (or ``overwrite``); options and data are checked
before the folder is made. ``resume`` continues from the checkpoint exactly: model, optimizer, epoch
and batch position and RNG states are restored, and each epoch's shuffling order depends only on
(seed, epoch). Ctrl-C stops at the end of the current batch and saves a mid-epoch checkpoint (a second Ctrl-C
aborts at once, leaving the last complete checkpoint); once the last batch has run, the run writes its
summary and pictures first.

Under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` set) the model is wrapped in DistributedDataParallel
(NCCL on CUDA, Gloo on CPU), each rank reads its DistributedSampler shard, and rank 0 writes outputs.
``batch_size`` is per process, as in PyTorch's own DDP examples: the global batch is ``batch_size`` times
the number of processes. The shards are equal, so up to ``world_size - 1`` images (a different few each
epoch) are left out of an epoch rather than repeated.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import hashlib
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
import warnings
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, Subset

from vqfast import reference
from vqfast.layer import _bincount
from vqfast.models.autoencoders import (MODEL_NAMES, VQ_IMPLS, VQ_PRESETS, build_model, count_parameters,
                                       vq_layer_options)
from vqfast.models.data import (BUILTIN_SOURCES, DatasetUnavailable, checked_source, dataset_label, describe_source,
                                evenly_spaced, has_test_split, image_files, load_dataset, source_indices,
                                source_of)

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
    "CheckpointError",
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
    """Every option of a training run (the command line maps one-to-one onto these fields; ``--eval-limit
    0`` is ``eval_limit=None``)."""

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
    backend: str = "auto"  # auto | torch | triton (VQFAST_BACKEND while train() runs)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    data: str = "cifar10"  # cifar10 | svhn | sample | synthetic | path to a folder / .npz
    data_root: str = "data"
    download: bool = True
    out: str | None = None  # run folder; None: runs/<model>-<timestamp>
    amp: bool = False  # bf16 autocast (CUDA only)
    deterministic: bool = False  # torch.use_deterministic_algorithms(True) while training
    limit: int | None = None  # at most this many training images
    resume: bool = False
    overwrite: bool = False  # start afresh even if the run folder holds a checkpoint
    num_workers: int = 0
    threads: int | None = None  # CPU intra-op threads (None: PyTorch's default)
    progress: bool = True
    eval_data: str | None = None  # end-of-run evaluation source (None: the test split of ``data``)
    eval_limit: int | None = 2000  # test images for the end-of-run evaluation (None: all)
    grid_images: int = 16  # images in the end-of-run reconstruction grid

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


def _count(n: int, one: str, many: str) -> str:
    """``n`` with its noun: "1 process", "2 processes"."""
    return f"{n:,} {one if n == 1 else many}"


def _refuse_empty_sources(*options: tuple[str, str | None]) -> None:
    """An empty data option would be read as the current folder (a path of ""), or skipped."""
    for option, source in options:
        if source is not None:
            checked_source(source, option)


def _validate(cfg: TrainConfig) -> None:
    """Reject impossible options before anything is loaded or written; messages name the CLI option."""
    if cfg.model not in MODEL_NAMES:
        raise ValueError(f"model must be one of {MODEL_NAMES}, got {cfg.model!r}")
    if cfg.backend not in ("auto", "torch", "triton"):
        raise ValueError(f"--backend must be auto, torch or triton, got {cfg.backend!r}")
    if cfg.vq_preset not in VQ_PRESETS:
        raise ValueError(f"--vq-preset must be one of {VQ_PRESETS}, got {cfg.vq_preset!r}")
    if cfg.vq_impl not in VQ_IMPLS:
        raise ValueError(f"--vq-impl must be one of {VQ_IMPLS}, got {cfg.vq_impl!r}")
    if cfg.resolved_epochs() < 0:
        raise ValueError(f"--epochs must be >= 0, got {cfg.epochs}")
    _refuse_empty_sources(("--data", cfg.data), ("--eval-data", cfg.eval_data))
    for option, value in (("--batch-size", cfg.batch_size), ("--latent-dim", cfg.latent_dim),
                          ("--codes", cfg.num_codes), ("--code-dim", cfg.code_dim)):
        if value < 1:
            raise ValueError(f"{option} must be >= 1, got {value}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ValueError(f"--lr must be a positive number, got {cfg.lr}")
    # inf passes ">= 0": it would train to a NaN or inf loss and then be blamed on the learning rate.
    if cfg.beta is not None and not (cfg.beta >= 0 and math.isfinite(cfg.beta)):
        raise ValueError(f"--beta must be a finite number >= 0, got {cfg.beta}")
    if not (cfg.kl_weight >= 0 and math.isfinite(cfg.kl_weight)):
        raise ValueError(f"--kl-weight must be a finite number >= 0, got {cfg.kl_weight}")
    if cfg.limit is not None and cfg.limit <= 0:
        raise ValueError(f"--limit must be positive, got {cfg.limit}")
    if cfg.eval_limit is not None and cfg.eval_limit <= 0:
        raise ValueError(f"--eval-limit must be positive (0 on the command line: all images), got {cfg.eval_limit}")
    if not 0 <= cfg.seed < 2**32:
        raise ValueError(f"--seed must be between 0 and 2**32 - 1, got {cfg.seed}")
    if cfg.num_workers < 0:
        raise ValueError(f"--workers must be >= 0, got {cfg.num_workers}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {cfg.threads}")
    if cfg.grid_images < 1:
        raise ValueError(f"--grid-images must be >= 1, got {cfg.grid_images}")
    resolve_device(cfg.device)
    if cfg.vq_kwargs:
        _validate_vq_kwargs(cfg)


# Set through their own options (--codes, --code-dim), not expressible on the command line, or not the
# article's model (heads: its encoder gives one code's channels per position; channel_dim: it feeds
# (B, C, H, W)), with why, for the message.
_VQ_OPTIONS_EXCLUDED = {
    "self": "", "num_embeddings": "set by --codes", "embedding_dim": "set by --code-dim",
    "process_group": "not a command-line value (torchrun runs use the default group)",
    "heads": "the VQ-VAE's encoder gives one code's channels per position",
    "channel_dim": "the VQ-VAE feeds (B, C, H, W)",
}


def _validate_vq_kwargs(cfg: TrainConfig) -> None:
    if cfg.model != "vqvae":
        raise ValueError(f"--vq-option configures the VQ-VAE's quantizer; the {cfg.model} has none")
    if cfg.vq_impl == "article":
        raise ValueError("--vq-option configures vqfast's VectorQuantizer, which --vq-impl article replaces "
                         "(the article's VQ step takes --beta only)")
    import inspect

    from vqfast import VectorQuantizer

    known = [n for n in inspect.signature(VectorQuantizer.__init__).parameters if n not in _VQ_OPTIONS_EXCLUDED]
    excluded = sorted(set(cfg.vq_kwargs) & set(_VQ_OPTIONS_EXCLUDED) - {"self"})
    if excluded:
        raise ValueError("--vq-option: " + "; ".join(f"{name} is a VectorQuantizer option the training tool does not "
                                                      f"take ({_VQ_OPTIONS_EXCLUDED[name]})" for name in excluded))
    unknown = sorted(set(cfg.vq_kwargs) - set(known))
    if unknown:
        raise ValueError(f"--vq-option: unknown VectorQuantizer option(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(known)}")
    # --beta would win without a word (as --codebook-init would over init=, which is refused too).
    if "beta" in cfg.vq_kwargs and cfg.beta is not None and cfg.vq_kwargs["beta"] != cfg.beta:
        raise ValueError(f"--beta {cfg.beta:g} and --vq-option beta={cfg.vq_kwargs['beta']} both set the commitment "
                         "weight: give one of them")
    # Building one checks the values; the fork keeps the global random stream as it was.
    kwargs = {**cfg.vq_kwargs, **({} if cfg.beta is None else {"beta": cfg.beta})}
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            VectorQuantizer(cfg.num_codes, cfg.code_dim, **kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--vq-option: {exc}") from None
    # An option without effect (decay= without ema=true) is a mistake on the command line: refused.
    unused = [str(w.message).removeprefix("VectorQuantizer: ") for w in caught
              if str(w.message).startswith("VectorQuantizer: ")]
    if unused:
        raise ValueError(f"--vq-option: {'; '.join(unused)}")


@contextmanager
def selected_backend(backend: str | None) -> Iterator[None]:
    """Select the VQ backend through ``VQFAST_BACKEND`` for the duration of the block, then restore the
    caller's setting (``auto`` or None leaves the environment alone)."""
    if backend not in ("torch", "triton"):
        yield
        return
    previous = os.environ.get("VQFAST_BACKEND")
    os.environ["VQFAST_BACKEND"] = backend
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("VQFAST_BACKEND", None)
        else:
            os.environ["VQFAST_BACKEND"] = previous


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` for the block when ``enabled``, with the cuBLAS
    setting that mode requires on CUDA (``CUBLAS_WORKSPACE_CONFIG=:4096:8``, unless already set); the
    caller's settings are restored afterwards. vqfast's kernels then sum in a fixed order too."""
    if not enabled:
        yield
        return
    was_enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if workspace is None:
        if torch.cuda.is_initialized():
            # PyTorch reads the setting once, when it first sizes a cuBLAS workspace.
            print("--deterministic: CUDA was already in use in this process, so CUBLAS_WORKSPACE_CONFIG=:4096:8 "
                  "may come too late for cuBLAS; set it before starting Python", file=sys.stderr)
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_enabled, warn_only=warn_only)
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def _check_backend_on(backend: str | None, device: torch.device) -> None:
    """Refuse the Triton backend on the CPU (outside Triton's interpreter) before anything is loaded or
    written: chosen by ``backend``, or by ``VQFAST_BACKEND`` where ``backend`` is auto or None."""
    named = "backend triton"
    if backend in (None, "auto"):
        backend = os.environ.get("VQFAST_BACKEND", "").strip().lower()
        named = "VQFAST_BACKEND=triton"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise ValueError(f"{named} runs on CUDA devices; on the CPU use backend torch (or auto), or set "
                         "TRITON_INTERPRET=1 to run the kernels in Triton's (slow) interpreter")


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> the local CUDA device when there is one, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    # torch.device also names meta, mps, xpu, ...: the training and evaluation code is written for these
    # two, and the others failed mid-run with a traceback (meta tensors hold no data to report).
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r} requested but no CUDA device is available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _psnr(mse: float) -> float:
    """PSNR in dB of images in [0, 1]: inf for a perfect reconstruction, NaN for a NaN or inf error."""
    if not math.isfinite(mse):
        return math.nan
    return 10.0 * math.log10(1.0 / mse) if mse > 0 else math.inf


def _json(obj: Any, indent: int | None = None) -> str:
    """``json.dumps`` that writes valid JSON: NaN and +-inf (a diverged run's numbers, the PSNR of a
    perfect reconstruction) become null."""
    def finite(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, Mapping):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [finite(v) for v in x]
        return x

    return json.dumps(finite(obj), indent=indent, allow_nan=False)


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _model_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    return dict(latent_dim=cfg.latent_dim, num_codes=cfg.num_codes, code_dim=cfg.code_dim, beta=cfg.beta,
                kl_weight=cfg.kl_weight, codebook_init=cfg.codebook_init, vq_kwargs=cfg.vq_kwargs,
                vq_preset=cfg.vq_preset, vq_impl=cfg.vq_impl)


def _print(msg: str, log_path: Path | None = None, file: Any = None) -> None:
    """``msg`` on stdout (or ``file``, e.g. stderr for a warning), and appended to the run's log."""
    print(msg, flush=True, file=file)
    if log_path is not None:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(msg + "\n")


@contextmanager
def _errors_logged(log_path: Path | None) -> Iterator[None]:
    """An error that stops the training (an image that fails to decode, divergence, out of memory) is
    also written to the run's log, which otherwise ends at the last epoch as if the run were going on;
    the caller still reports it and exits."""
    try:
        yield
    except Exception as exc:
        if log_path is not None:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(f"error: {_error_text(exc)}\n")
        raise


# ------------------------------------------------------------------------------------- checkpoints


class RankZeroFailed(ValueError):
    """Raised on the other ranks of a distributed run when rank 0 could not start it (bad options or
    data): rank 0 reports the problem itself, and ``vqfast train`` exits quietly on the others."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or was not written by vqfast's training."""


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
    _remove_stale_temporaries(path)
    return path


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files of ``path`` left by processes killed mid-write (SIGKILL, power loss): a
    checkpoint's can be hundreds of MB. A file whose writer is still alive is left alone."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:-len(".tmp")]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except OSError:  # alive under another user (PermissionError), or not ours to judge
            pass


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``path``: the file or its run folder)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # torch's remarks on a foreign file's pickle protocol: noise here
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except (PermissionError, MemoryError):
        raise
    except Exception as exc:  # truncated zip, foreign pickle, not a torch file: all the same to the caller
        # Not torch's own message: for a foreign pickle it suggests weights_only=False, which runs its code.
        raise CheckpointError(f"{path} is corrupt or not a vqfast checkpoint (torch.load failed with "
                              f"{type(exc).__name__}); it cannot be resumed or evaluated") from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is corrupt or not a vqfast checkpoint (no {_FORMAT!r} format tag)")
    return state


def _exception_line(exc: BaseException) -> str:
    """``"KeyError: 'epoch'"``: the exception's type and the first line of its message."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _run_checkpoint(path: str | Path) -> dict[str, Any]:
    """:func:`load_checkpoint` of a training run's checkpoint, with every entry the resume and the
    evaluation read checked first."""
    state = load_checkpoint(path)
    problem = _checkpoint_problem(state)
    if problem is not None:
        raise CheckpointError(f"{path} is corrupt or not a vqfast checkpoint ({problem}); it cannot be resumed "
                              "or evaluated")
    return state


# What every checkpoint holds, and as what (save_checkpoint's state, as the training loop builds it).
_CHECKPOINT_ENTRIES = {"config": dict, "model_state": dict, "optimizer_state": dict, "epoch": int, "batch": int,
                       "rng": list, "history": list, "step_losses": list}


def _checkpoint_problem(state: dict[str, Any]) -> str | None:
    """What is missing or malformed in a tagged checkpoint ``state``, or None: a damaged file must be
    refused as such, not fail later with a KeyError deep in the resume."""
    for key, kind in _CHECKPOINT_ENTRIES.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{key!r} is {'missing' if key not in state else f'a {type(value).__name__}'}, not a {kind.__name__}"
    if state["epoch"] < 0 or state["batch"] < 0:
        return f"epoch {state['epoch']} and batch {state['batch']} must be >= 0"
    if not state["rng"]:
        return "'rng' holds no random state"
    if state["batch"] > 0 and not (isinstance(state.get("acc"), list) and isinstance(state.get("code_counts"), list)):
        return "a run stopped within an epoch needs its partial sums ('acc', 'code_counts')"
    return None


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


def _loss_after_updates(model: nn.Module, x: torch.Tensor, amp: bool) -> float:
    """The objective of the model's current weights on batch ``x`` (eval mode, no gradient, random state
    left as it was). An epoch's average comes from each step's loss before its update, so an update
    that broke the weights (outputs inf or NaN) shows only here, before a checkpoint keeps them."""
    was_training = model.training
    model.eval()
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), _autocast(x.device, amp):
            return float(model.loss_terms(x)["objective"])
    finally:
        model.train(was_training)


class _StopRequest:
    """First Ctrl-C: finish the current batch, checkpoint, stop. Second Ctrl-C: KeyboardInterrupt now.

    ``finishing`` (set for the run's last batch and its summary): the first Ctrl-C lets the run end
    normally, summary included.
    """

    def __init__(self, speak: bool = True) -> None:
        self.requested = False
        self.finishing = False
        # Under torchrun the terminal's Ctrl-C reaches every rank: one of them says what happens.
        self._speak = speak
        self._previous: Any = None
        self._installed = False
        self._pid = os.getpid()

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        # DataLoader workers forked from this process inherit the handler (and the terminal's Ctrl-C):
        # only the training process speaks.
        if self._speak and os.getpid() == self._pid:
            doing = ("finishing the run and its summary" if self.finishing
                     else "stopping after this batch and saving a checkpoint")
            print(f"\nInterrupt received: {doing} (press Ctrl-C again to abort at once).", file=sys.stderr,
                  flush=True)

    def __enter__(self) -> "_StopRequest":
        self._pid = os.getpid()
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
                   amp: bool = False, keep_images: int = 0, progress: bool = False,
                   desc: str = "evaluate") -> dict[str, Any]:
    """Deterministic reconstruction of every image of ``dataset``.

    Returns ``sse`` (N,) float64 per-image summed squared error, ``labels`` (N,), ``mse`` (per pixel,
    over the set), ``psnr``, for the VQ-VAE ``indices`` (N, h, w), and the first ``keep_images``
    originals/reconstructions as ``originals`` / ``reconstructions``. ``progress``: a progress bar
    (``desc``) on stderr.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    sse_list, labels, indices = [], [], []
    originals, recons = [], []
    kept = 0
    bar = _progress_bar(progress, desc, initial=0, total=len(loader))
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
            if bar is not None:
                bar.update(1)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
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
    state = _run_checkpoint(run)
    try:
        cfg = _as_config(state["config"])
        model = build_model(cfg.model, **_model_kwargs(cfg))
        model.load_state_dict(state["model_state"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{run}: the checkpoint's model does not match its configuration "
                              f"({_exception_line(exc)})") from None
    model.to(device).eval()
    return model, cfg, state


# ------------------------------------------------------------------------------------- training


def _default_run_dir(model: str) -> Path:
    return Path("runs") / f"{model}-{time.strftime('%Y%m%d-%H%M%S')}"


# What a fresh run writes besides the checkpoint and config; a replaced run's copies are removed first,
# so that none of them (a VAE's samples.png under a new AE run, say) outlives the run it belonged to.
_RUN_OUTPUTS = (METRICS_NAME, METRICS_NAME + ".tmp", "train.log", "summary.json", "loss_curve.png",
                "reconstructions.png", "codebook_usage.json", "codebook_usage.png", "samples.png", "blend.png")
# What `vqfast evaluate` writes into a run folder (eval-<data>-<split>.csv/.json, -worst.png).
_EVAL_OUTPUTS = "eval-*"
# Metrics a resume moved aside (see _metrics_matching_checkpoint).
_METRICS_BACKUPS = METRICS_NAME + ".before-resume*"


def _check_folder_can_be_made(path: Path, option: str = "--out") -> None:
    """Refuse, naming the file, a folder path that has a file where a folder should be: ``mkdir`` would
    fail only later, with a bare "Not a directory"."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{option} {path} is a file; give a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FileExistsError(f"{option} {path}: {parent} is a file, so no folder can be made under it")
            return


def _check_out_of_data(out: Path, sources: Sequence[tuple[str, str | None]], option: str = "--out",
                       advice: str = "choose a folder outside it") -> None:
    """Refuse an output folder at or under an image folder given as a source: the pictures written there
    would become images of that source (and a resumed run would find its training data changed)."""
    where = out.expanduser().resolve()
    for source_option, source in sources:
        if not _is_local(source) or not Path(source).expanduser().is_dir():
            continue
        folder = Path(source).expanduser().resolve()
        if where == folder or folder in where.parents:
            raise ValueError(f"{option} {out} is inside the {source_option} image folder {source}: the pictures "
                             f"written there would become images of it; {advice}")


def _check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """A fresh run goes into a new or empty folder; anything else needs ``overwrite``."""
    _check_folder_can_be_made(run_dir)
    if overwrite or not run_dir.exists():
        return
    if (run_dir / CHECKPOINT_NAME).exists():
        raise FileExistsError(f"{run_dir} already holds a run; pass resume=True (--resume) to continue it, "
                              f"overwrite=True (--overwrite) to replace it, or choose another folder")
    if any(run_dir.iterdir()):
        raise FileExistsError(f"{run_dir} is not empty and holds no vqfast run (no {CHECKPOINT_NAME}); choose "
                              f"another folder, or pass overwrite=True (--overwrite) to train into it anyway "
                              f"(the run's own files there, such as train.log and summary.json, are then replaced)")


def _load_eval_set(cfg: TrainConfig) -> tuple[Dataset, bool]:
    """The end-of-run evaluation images and whether they are held out from training.

    A source without a test split of its own gives back its training images for ``train=False``;
    the caller says so rather than report them as a test result.
    """
    source = cfg.eval_data or cfg.data
    has_split = has_test_split(source)
    # --eval-data naming the training source itself (a folder, an .npz with only x) gives back the
    # training images: reported as a test, they would pass for held-out ones.
    other = cfg.eval_data is not None and _absolute_source(cfg.eval_data) != _absolute_source(cfg.data)
    if has_split or other:
        return load_dataset(source, train=not has_split, root=cfg.data_root, download=cfg.download,
                            limit=cfg.eval_limit, seed=cfg.seed), True
    # The run's own training images: those it trained on (cut by --limit as the run cut them), at most
    # --eval-limit of them, evenly spaced (a folder lists its classes in turn). Cut by --eval-limit
    # alone, a run with a smaller --limit would have images it never saw counted as training ones.
    ds = load_dataset(source, train=True, root=cfg.data_root, download=cfg.download, limit=cfg.limit,
                      seed=cfg.seed)
    if cfg.eval_limit is not None and 0 < cfg.eval_limit < len(ds):
        ds = evenly_spaced(ds, cfg.eval_limit)
    return ds, False


# The recipe for each epoch's shuffling seed; stored in checkpoints so that a resume can tell whether
# a mid-epoch checkpoint's batch position refers to the same image order.
_SHUFFLE_SCHEME = "seed-sequence(seed, epoch)"


def _epoch_seed(seed: int, epoch: int) -> int:
    """The shuffling generator's seed for ``epoch``: independent streams for every (seed, epoch) pair."""
    state = np.random.SeedSequence([seed % 2**64, epoch]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _merge_resumed(cfg: TrainConfig, saved: Mapping[str, Any], given: Collection[str] | None = None) -> TrainConfig:
    """The run's own settings for everything that defines its model and data stream.

    An option not given takes the run's value; a given one that contradicts the run is an error (it
    used to be dropped with a note, so a mistyped model name or data path trained the old run on),
    except a folder or .npz ``data`` at another path: the run's data moved, which :func:`_train` checks
    against the run's record of its images once they are loaded. A
    given ``lr`` is applied (and said); the run's is kept otherwise. ``given`` None: the fields that
    differ from their defaults count as given.
    """
    saved_cfg = _as_config(saved)

    def was_given(name: str) -> bool:
        return _was_given(cfg, name, given)

    conflicts = []
    given_eval_data: str | None = None
    if cfg.model != saved_cfg.model:
        conflicts.append(f"the model {cfg.model} (the run trains an {saved_cfg.model})" if saved_cfg.model[0] in "aeiou"
                         else f"the model {cfg.model} (the run trains a {saved_cfg.model})")
    for name in _FROZEN_ON_RESUME:
        new, old = getattr(cfg, name), getattr(saved_cfg, name)
        if name == "data":
            new, old = _absolute_source(new), _absolute_source(old)
        elif name == "beta":
            # The run's None meant its preset's beta.
            old = vq_layer_options(saved_cfg.vq_preset, saved_cfg.beta, saved_cfg.vq_kwargs)["beta"]
        elif name == "codebook_init":
            # As the command line spells None; a --vq-option init= implies it (runs that recorded
            # "xavier_normal" beside one started from the layer's own init all the same).
            new = "layer" if new is None or "init" in cfg.vq_kwargs else new
            old = "layer" if old is None or "init" in saved_cfg.vq_kwargs else old
        if name == "data" and new != old and was_given(name) and _is_local(new) and _is_local(old):
            # The run's files at a new place: allowed, and checked against what the run recorded of
            # them once they are loaded (see _check_run_data).
            cfg.data = new
            if not was_given("eval_data") and saved_cfg.eval_data is not None and (
                    _absolute_source(saved_cfg.eval_data) == old):
                given_eval_data = new  # its end-of-run evaluation read the same file
            continue
        if name != "model" and new != old and was_given(name):
            why = (": CIFAR-10 was unavailable when it started, so it trains on the bundled sample"
                   if name == "data" and (new, old) == ("cifar10", "sample") else "")
            conflicts.append(f"{_OPTION_NAMES.get(name, name)} {new!r} (the run has {old!r}{why})")
        setattr(cfg, name, getattr(saved_cfg, name))
    if conflicts:
        raise ValueError("--resume continues a run with its own model and data settings, but these differ: "
                         + "; ".join(conflicts) + ". Leave them out, or start a new run in another --out")
    # Where the data came from too, unless given anew: data_root is stored absolute, and a run that
    # did not download must not start downloading (it could then train on other images).
    # deterministic, amp and the end-of-run evaluation too: a resumed run continues as it started
    # unless told otherwise.
    for name in ("data_root", "download", "deterministic", "amp", "eval_data", "eval_limit", "grid_images"):
        if not was_given(name):
            setattr(cfg, name, getattr(saved_cfg, name))
    if given_eval_data is not None:
        cfg.eval_data = given_eval_data
    if not was_given("lr"):
        cfg.lr = saved_cfg.lr
    if cfg.epochs is None:
        cfg.epochs = saved_cfg.resolved_epochs()
    return cfg


# How the frozen settings are spelled on the command line, for messages.
_OPTION_NAMES = {"batch_size": "--batch-size", "latent_dim": "--latent-dim", "num_codes": "--codes",
                 "code_dim": "--code-dim", "beta": "--beta", "vq_preset": "--vq-preset", "vq_impl": "--vq-impl",
                 "kl_weight": "--kl-weight", "codebook_init": "--codebook-init", "vq_kwargs": "--vq-option",
                 "seed": "--seed", "data": "--data", "limit": "--limit"}


def _is_local(source: str | None) -> bool:
    """Whether ``source`` is a path (a folder or an .npz) rather than a named dataset."""
    return source is not None and source not in BUILTIN_SOURCES


def _data_fingerprint(ds: Dataset) -> dict[str, Any]:
    """What a run records of its local training data, to recognise the same images at another path:
    their number, and a SHA-256 of the pixels and labels (of an .npz) or of the files' names relative
    to the folder, sizes and classes (of an image folder: cheap, no image is decoded; names that are not
    UTF-8 by their raw bytes). Other datasets
    get no digest: their count is all that is compared."""
    from vqfast.models.data import ImageArrayDataset

    base, indices = ds, None
    while isinstance(base, Subset):
        inner = list(base.indices)
        indices = inner if indices is None else [inner[i] for i in indices]
        base = base.dataset
    digest = None
    if isinstance(base, ImageArrayDataset):
        images, labels = base.images, base.labels
        if indices is not None:
            index = torch.as_tensor(indices, dtype=torch.int64)
            images, labels = images.index_select(0, index), labels.index_select(0, index)
        h = hashlib.sha256()
        h.update(images.contiguous().numpy().data)
        h.update(labels.contiguous().numpy().data)
        digest = h.hexdigest()
    elif hasattr(base, "samples") and hasattr(base, "root"):  # torchvision's ImageFolder
        samples = base.samples if indices is None else [base.samples[i] for i in indices]
        h = hashlib.sha256()
        for path, target in samples:
            h.update(f"{Path(path).relative_to(base.root).as_posix()}\t{os.path.getsize(path)}\t{target}\n".encode("utf-8", "surrogateescape"))
        digest = h.hexdigest()
    return {"images": len(ds), "sha256": digest}


def _missing_on_resume(exc: FileNotFoundError, option: str, what: str, path: str | None, given: bool,
                       was: str | None = None) -> FileNotFoundError:
    """The error for a resumed run's ``option`` source that cannot be found: a path that was given is
    named (not answered with advice to give one), otherwise the run's data may have moved."""
    if given:
        had = "" if was is None or was == path else f" (the run had {was})"
        return FileNotFoundError(f"{exc}. {option} {path!r} does not exist or cannot be read: check the path{had}")
    return FileNotFoundError(f"{exc}. If the run's {what} has moved, give its new place with {option}")


def _check_run_data(train_set: Dataset, state: Mapping[str, Any], path: str,
                    saved: str) -> tuple[str | None, dict[str, Any]]:
    """Refuse to resume on local data at ``path`` (the run's was at ``saved``) unless it holds the run's
    training images, whether the data has moved or changed where it was; returns the note to log when
    it has moved, and the fingerprint to keep. A checkpoint written before fingerprints were recorded
    has the first epoch's image count to compare (under torchrun, the images its equal shards held)."""
    found = _data_fingerprint(train_set)
    moved = path != saved
    recorded = state.get("data_fingerprint")
    n = found["images"]
    if recorded is not None:
        same = recorded["images"] == n and (recorded["sha256"] is None or found["sha256"] is None
                                            or recorded["sha256"] == found["sha256"])
        had = recorded["images"]
        checked = "the same ones"
    elif not moved:
        # A checkpoint from before fingerprints, resumed where its data was: taken as it is. (Its first
        # epoch's image count is no sure guide: torchrun runs of that time padded the ranks' shards.)
        return None, found
    elif state.get("history"):
        world = int(state.get("world_size", 1))
        had = int(state["history"][0]["images"])
        same = n // world * world == had
        checked = "as many as the run had; its checkpoint records no more of them to compare"
    else:
        raise ValueError(f"--data {path!r}: the run's checkpoint records nothing of its data {saved!r} (it stopped "
                         f"before its first epoch ended), so another path cannot be checked; put the data back "
                         f"at {saved}, or start a new run in another --out")
    if not same:
        what = (f"{_count(n, 'image', 'images')} where the run's had {had:,}" if n != had
                else f"{_count(n, 'image', 'images')}, as the run's had, but other ones")
        if moved:
            raise ValueError(f"--data {path!r} does not hold the run's training data ({saved!r}): {what}. A resumed "
                             "run trains on its own images: give the path they are at now, or start a new run in "
                             "another --out")
        raise ValueError(f"The run's training data {path!r} has changed since its last checkpoint: it holds {what}. "
                         "A resumed run trains on its own images: put them back, or start a new run in another --out")
    note = f"Resume: the run's data is now read from {path} (it was {saved}): {_count(n, 'image', 'images')}, {checked}"
    return (note if moved else None), found


def _absolute_source(source: str | None) -> str | None:
    """A data source that names an existing file or folder, as an absolute path (so that a run can be
    resumed or evaluated from another working directory); other sources unchanged."""
    # ("" is no path, though Path("") means the current folder: loading it says so.)
    if source is None or not source.strip() or source in BUILTIN_SOURCES or not Path(source).expanduser().exists():
        return source
    return str(Path(source).expanduser().resolve())


def train(config: TrainConfig | Mapping[str, Any], given: Collection[str] | None = None) -> TrainResult:
    """Train one model as described by ``config`` (a :class:`TrainConfig` or a dict of its fields).

    ``given``: the fields the caller set on purpose (the CLI passes the options on its command line).
    On resume, a given field that contradicts the run is an error and a given ``lr`` applies; without
    ``given``, every field that differs from its default counts as given.
    Raises ``KeyboardInterrupt`` after saving a checkpoint when interrupted with Ctrl-C before the last
    batch; a Ctrl-C in the last batch or during the summary lets the run finish (a second one aborts).
    """
    cfg = _as_config(config)
    _validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = _init_distributed(cfg.device)
    try:
        with selected_backend(cfg.backend), ExitStack() as settings:
            return _train(cfg, dist, given, settings)
    finally:
        if dist.owns_group:
            torch.distributed.destroy_process_group()


def _agree_on_training_data(dist: _Dist, source: str, problem: Exception | None,
                            found: dict[str, Any] | None) -> None:
    """Stop every rank, before anything is written, unless all of them loaded ``source`` (as rank 0
    did) and hold the same images (``found``: a rank's :func:`_data_fingerprint`): a rank that stopped
    alone would leave the others waiting in the first collective."""
    reports = dist.gather_objects((None if problem is None else f"{type(problem).__name__}: {problem}", found))
    if problem is not None:
        if isinstance(problem, DatasetUnavailable) and source == "cifar10":
            raise DatasetUnavailable(f"rank {dist.rank}: {problem}. Rank 0 found CIFAR-10, and a rank does not "
                                     "fall back to the bundled sample on its own (the ranks would train on "
                                     "different images)") from problem
        raise problem
    for rank, (failure, _) in enumerate(reports):
        if failure is not None:
            raise DatasetUnavailable(f"rank {rank} could not load the training data ({source}): {failure}")
    if not dist.enabled:
        return
    counts = [prints["images"] for _, prints in reports]
    if len(set(counts)) > 1:
        raise ValueError(f"the ranks hold different training data for {source}: "
                         + ", ".join(f"{n:,} images on rank {rank}" for rank, n in enumerate(counts))
                         + "; every rank must read the same images")
    # Copies of the same files on different machines can hold as many images but other ones.
    first = reports[0][1]["sha256"]
    other = [rank for rank, (_, prints) in enumerate(reports) if prints["sha256"] != first]
    if other:
        raise ValueError(f"the ranks hold different training data for {source}: {counts[0]:,} images on every "
                         f"rank, but other ones on rank{'s' if len(other) > 1 else ''} "
                         f"{', '.join(map(str, other))} than on rank 0; every rank must read the same images")


# The settings of one model only, by the models they apply to.
_MODEL_OPTIONS = {"latent_dim": ("ae", "vae"), "kl_weight": ("vae",), "num_codes": ("vqvae",), "code_dim": ("vqvae",),
                  "beta": ("vqvae",), "vq_preset": ("vqvae",), "vq_impl": ("vqvae",), "codebook_init": ("vqvae",),
                  "vq_kwargs": ("vqvae",)}


def _was_given(cfg: TrainConfig, name: str, given: Collection[str] | None) -> bool:
    """Whether the caller set field ``name`` on purpose: it is in ``given``, or with ``given`` None, it
    differs from its default."""
    if given is not None:
        return name in given
    return getattr(cfg, name) != getattr(TrainConfig(model=cfg.model), name)


def _check_model_options(cfg: TrainConfig, given: Collection[str] | None) -> None:
    """An option of another model is an error rather than silently ignored (and then frozen on resume).
    ``given`` as for :func:`train`."""
    wrong = [name for name, models in _MODEL_OPTIONS.items()
             if cfg.model not in models and _was_given(cfg, name, given)]
    if wrong:
        names = ", ".join(_OPTION_NAMES.get(name, name) for name in wrong)
        raise ValueError(f"{names} do{'es' if len(wrong) == 1 else ''} not apply to the {cfg.model} model")
    if "init" in cfg.vq_kwargs and cfg.codebook_init is not None and _was_given(cfg, "codebook_init", given):
        raise ValueError(f"--codebook-init {cfg.codebook_init} and --vq-option init={cfg.vq_kwargs['init']} both set "
                         "how the codebook starts: give one of them")
    if (cfg.model == "vqvae" and cfg.vq_impl == "article" and cfg.vq_preset == "vqfast"
            and _was_given(cfg, "vq_preset", given)):
        raise ValueError("--vq-preset vqfast's dead-code restarts are vqfast's VectorQuantizer's, which --vq-impl "
                         "article replaces (the article's VQ step takes --beta only); use --vq-preset article")


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says memory ran out: the host's (MemoryError, the CPU allocator's RuntimeError) or
    the GPU's (torch.OutOfMemoryError, a RuntimeError)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _built_model(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The run's model on ``device``; running out of memory for it is the options' fault, said as such."""
    try:
        return build_model(cfg.model, **_model_kwargs(cfg)).to(device)
    except (MemoryError, RuntimeError) as exc:
        text = str(exc)
        if not _out_of_memory(exc) and "alloc" not in text:
            raise
        sizes = (f"--codes {cfg.num_codes}, --code-dim {cfg.code_dim}" if cfg.model == "vqvae"
                 else f"--latent-dim {cfg.latent_dim}")
        raise ValueError(f"the {cfg.model} model does not fit in memory on {device} with {sizes} "
                         f"({_first_line(exc)})") from None


def _train(cfg: TrainConfig, dist: _Dist, given: Collection[str] | None = None,
           settings: ExitStack | None = None) -> TrainResult:
    """:func:`train` within its backend; ``settings`` holds what the run switches on for its duration
    (deterministic mode, once a resumed run's own setting is known)."""
    device = resolve_device(cfg.device, dist.local_rank)
    _check_backend_on(cfg.backend, device)
    if cfg.amp and device.type != "cuda":
        print("--amp: bf16 autocast is used on CUDA only; training in fp32 on the CPU", file=sys.stderr)
    if cfg.resume and not cfg.out:
        raise ValueError("--resume needs --out, the folder of the run to continue")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    _check_model_options(cfg, given)
    if "init" in cfg.vq_kwargs:
        cfg.codebook_init = None  # what the model does with it: the layer's own init (recorded as such)
    run_dir = Path(cfg.out).expanduser() if cfg.out else dist.broadcast_object(_default_run_dir(cfg.model))
    if cfg.resume and run_dir.is_file():
        if run_dir.name != CHECKPOINT_NAME:
            raise ValueError(f"--out {cfg.out} is a file: --resume takes the folder of the run to continue")
        run_dir = run_dir.parent  # the run's checkpoint names its folder
    ckpt_path = run_dir / CHECKPOINT_NAME

    state: dict[str, Any] | None = None
    # Read before the run's settings replace those not given: a resume that cannot find a path that
    # was given is told about that path, not advised to give one.
    data_given, eval_data_given = _was_given(cfg, "data", given), _was_given(cfg, "eval_data", given)
    if cfg.resume:
        state = _run_checkpoint(ckpt_path)
        cfg = _merge_resumed(cfg, state["config"], given)
        done = int(state["epoch"])
        if int(state.get("batch", 0)) > 0 and cfg.resolved_epochs() <= done:
            raise ValueError(f"--epochs {cfg.resolved_epochs()}: the run in {run_dir} stopped in epoch {done + 1}, "
                             f"after batch {int(state['batch'])}; give the new total, at least {done + 1}")
        if cfg.resolved_epochs() < done:
            raise ValueError(f"--epochs {cfg.resolved_epochs()} is below the {done} epoch{'s' if done != 1 else ''} the run in {run_dir} "
                             f"has done; give the new total, at least {done}")
    if settings is not None:
        settings.enter_context(deterministic_algorithms(cfg.deterministic))
    cfg.data = _absolute_source(cfg.data)
    cfg.eval_data = _absolute_source(cfg.eval_data)
    cfg.data_root = str(Path(cfg.data_root).expanduser().resolve())
    epochs = cfg.resolved_epochs()
    cfg.epochs = epochs

    # Everything that can fail on the options or the data is checked before the run folder is touched.
    # Rank 0 goes first (it may download the data, so that the other ranks find it on disk) and tells
    # the others whether it failed, so that they stop too instead of waiting for it.
    train_set: Dataset | None = None
    eval_set: Dataset | None = None
    held_out = True
    problem: Exception | None = None
    # Rank 0's record of local training data, kept in every checkpoint, and a note when it has moved.
    fingerprint: dict[str, Any] | None = None
    data_note: str | None = None
    if dist.is_main:
        try:
            _check_out_of_data(run_dir, (("--data", cfg.data), ("--eval-data", cfg.eval_data)))
            if not cfg.resume:
                _check_run_dir(run_dir, cfg.overwrite)
            try:
                train_set = load_dataset(cfg.data, train=True, root=cfg.data_root, download=cfg.download,
                                         limit=cfg.limit, seed=cfg.seed, fallback=not cfg.resume)
            except DatasetUnavailable as exc:
                if not cfg.resume:
                    raise
                raise DatasetUnavailable(f"{exc}. The run in {run_dir} trains on {cfg.data} (from {cfg.data_root}) "
                                         "and does not switch to the bundled sample when resumed: pass --data-root "
                                         "where its images are") from exc
            except FileNotFoundError as exc:
                if not cfg.resume:
                    raise
                raise _missing_on_resume(exc, "--data", "data", cfg.data, data_given,
                                         state["config"]["data"]) from exc
            if _is_local(cfg.data):
                if state is not None:
                    saved_data = str(_absolute_source(state["config"]["data"]))
                    data_note, fingerprint = _check_run_data(train_set, state, cfg.data, saved_data)
                else:
                    fingerprint = _data_fingerprint(train_set)
            if len(train_set) < dist.world_size:  # each process needs an image per epoch
                raise ValueError(f"{len(train_set)} training image{'s' if len(train_set) != 1 else ''} cannot be "
                                 f"shared among {dist.world_size} processes")
            try:
                eval_set, held_out = _load_eval_set(cfg)
            except FileNotFoundError as exc:
                if not cfg.resume:
                    raise
                raise _missing_on_resume(exc, "--eval-data", "evaluation data", cfg.eval_data,
                                         eval_data_given) from exc
        except (DatasetUnavailable, FileExistsError, FileNotFoundError, ValueError) as exc:
            problem = exc
    # With the source rank 0 really read: "sample" where CIFAR-10 fell back to it.
    failure, source = dist.broadcast_object(
        (None, source_of(train_set, cfg.data)) if problem is None else (f"{type(problem).__name__}: {problem}", None))
    if problem is not None:
        raise problem
    if failure is not None:
        raise RankZeroFailed(f"rank 0 could not start the run: {failure}")
    if train_set is None:
        # Rank 0 alone decides whether CIFAR-10 or the bundled sample is trained on: a rank deciding for
        # itself could fall back where rank 0 did not, and the ranks would train on different images.
        try:
            train_set = load_dataset(source, train=True, root=cfg.data_root, download=cfg.download,
                                     limit=cfg.limit, seed=cfg.seed, fallback=False)
        except Exception as exc:  # whatever it is, the other ranks must hear of it rather than wait
            problem = exc
    held = None
    if dist.enabled and train_set is not None and problem is None:
        try:
            held = fingerprint if fingerprint is not None else _data_fingerprint(train_set)
        except Exception as exc:  # (a file of a folder gone since it was listed): the others must hear of it
            problem = exc
    _agree_on_training_data(dist, source, problem, held)
    # A resumed run trains on its own images or stops (fallback=False above). One that fell back to the
    # bundled sample has "sample" as its data, and keeps training on it even where CIFAR-10 has become
    # available since.
    cfg.data = source

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    # Before the run folder exists: a model too large for memory leaves nothing behind.
    model = _built_model(cfg, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    log_path = run_dir / "train.log" if dist.is_main else None
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:
            for stale in _RUN_OUTPUTS:
                (run_dir / stale).unlink(missing_ok=True)
            for pattern in (_EVAL_OUTPUTS, _METRICS_BACKUPS):
                for stale in run_dir.glob(pattern):
                    if stale.is_file():  # a folder of the user's that happens to match is left alone
                        stale.unlink()

    torch.manual_seed(cfg.seed + dist.rank)  # but independent noise (VAE draws) per rank

    shuffle_gen = torch.Generator()
    if dist.enabled:
        # drop_last: without it the sampler pads the shards with repeated images, which the epoch's averages
        # would count twice. With it, at most world_size - 1 images (a different few each epoch) sit out.
        sampler: Sampler[int] = torch.utils.data.DistributedSampler(
            train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    else:
        sampler = RandomSampler(train_set, generator=shuffle_gen)
    batches = _ResumableBatchSampler(sampler, cfg.batch_size)
    loader = DataLoader(train_set, batch_sampler=batches, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda", generator=shuffle_gen)
    steps_per_epoch = len(batches)

    history: list[dict[str, Any]] = []
    step_losses: list[float] = []
    start_epoch, start_batch = 0, 0
    seconds_before = 0.0  # time already spent on a resumed epoch's earlier batches
    acc_init: torch.Tensor | None = None
    counts_init: torch.Tensor | None = None
    if state is not None:
        try:
            model.load_state_dict(state["model_state"])
            optimizer.load_state_dict(state["optimizer_state"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{ckpt_path}: the checkpoint's model or optimizer does not match its configuration "
                                  f"({_exception_line(exc)})") from None
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr  # the run's, or a new one given on resume
        start_epoch, start_batch = int(state["epoch"]), int(state["batch"])
        seconds_before = float(state.get("epoch_seconds", 0.0)) if start_batch else 0.0
        saved_world = int(state.get("world_size", 1))
        same_world = saved_world == dist.world_size
        if start_batch and not same_world:
            # The batch position counts batches of the saved sharding, and the epoch's partial sums are
            # per saved rank: another world would skip or repeat images and misreport the epoch.
            raise ValueError(
                f"the run in {run_dir} stopped in epoch {start_epoch + 1}, after batch {start_batch}, with "
                f"{_count(saved_world, 'process', 'processes')}; resume it with {_count(saved_world, 'process', 'processes')} "
                f"in all ({'without torchrun' if saved_world == 1 else f'e.g. torchrun --nproc_per_node {saved_world} on one machine'}) "
                f"to finish that epoch (a run that stopped at an epoch's end resumes with any number)")
        if not same_world and dist.is_main:
            _print(f"resume: the run was saved with {_count(saved_world, 'process', 'processes')}, now "
                   f"{dist.world_size}; the continuation will not be bit-identical", log_path, file=sys.stderr)
        if start_batch and state.get("shuffle") != _SHUFFLE_SCHEME and dist.is_main:
            _print("resume: the checkpoint was written by an older vqfast that shuffled differently; the rest "
                   "of this epoch sees a different image order than the interrupted run would have",
                   log_path, file=sys.stderr)
        mine = dist.rank if same_world else 0
        pools = state.get("kmeans_pools")
        if pools and pools[mine]:
            # This rank's own k-means pool: model_state holds rank 0's.
            model.load_state_dict(pools[mine], strict=False)
        try:
            _set_rng_state(state["rng"][mine])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{ckpt_path}: the checkpoint's random state cannot be restored "
                                  f"({_exception_line(exc)})") from None
        history = list(state["history"])
        step_losses = list(state["step_losses"])
        if start_batch:
            acc_init = state["acc"][mine].to(device)
            saved_counts = state["code_counts"][mine]
            counts_init = None if saved_counts is None else saved_counts.to(device)
        if dist.is_main:
            metrics_note = _metrics_matching_checkpoint(run_dir / METRICS_NAME, history)
            if metrics_note is not None:
                _print(metrics_note, log_path, file=sys.stderr)
            if start_epoch >= epochs and not start_batch:
                _print(f"{run_dir} has already trained for {epochs} epoch{'s' if epochs != 1 else ''} (give a larger "
                       f"--epochs to train on); evaluating it again", log_path)
            else:
                # (not "epoch 1, batch 6 of 3": the total is the epochs')
                after = f", after batch {start_batch} of {steps_per_epoch}" if start_batch else ""
                saved_lr = _as_config(state["config"]).lr
                lr_note = (f"; learning rate {cfg.lr:g} from here on (the run used {saved_lr:g})"
                           if cfg.lr != saved_lr else "")
                _print(f"Resuming {run_dir} at epoch {start_epoch + 1} of {epochs}{after}{lr_note}", log_path)
            if data_note is not None:
                _print(data_note, log_path)

    train_module: nn.Module = _LossModule(model)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        train_module = DistributedDataParallel(train_module, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint_state(epoch: int, batch: int, acc: torch.Tensor | None,
                         counts: torch.Tensor | None, epoch_seconds: float = 0.0) -> dict[str, Any] | None:
        # Every rank's RNG state and partial sums, so that a resume is exact on every rank.
        rngs = dist.gather_objects(_rng_state())
        # Every rank pools its own rows for k-means (while a k-means layer still collects batches).
        pools = dist.gather_objects(_kmeans_pools(model)) if dist.enabled else None
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
            "shuffle": _SHUFFLE_SCHEME,
            "rng": rngs,
            "kmeans_pools": pools,
            "acc": accs,
            "code_counts": counts_all,
            # The interrupted epoch's time so far, so that its record counts all of it.
            "epoch_seconds": epoch_seconds,
            "history": history,
            "step_losses": step_losses,
            "world_size": dist.world_size,
            "data_fingerprint": fingerprint,
            "torch_version": str(torch.__version__),
        }

    def write_checkpoint(*args: Any) -> None:
        st = checkpoint_state(*args)
        if st is not None:
            save_checkpoint(st, ckpt_path)

    if state is None:
        # An initial checkpoint, so that even an interrupt during the first epoch leaves one to load.
        write_checkpoint(0, 0, None, None)
    elif start_epoch >= epochs and not start_batch:
        # A finished run evaluated again with new settings (--lr, --eval-data, ...): the checkpoint takes
        # them too, as config.json below does, so that `vqfast evaluate` and a later --resume use them.
        write_checkpoint(start_epoch, 0, None, None)
    if dist.is_main:
        # Written after the checkpoint: a run stopped before it leaves an empty folder, which a new run
        # may use, rather than a config that neither a new run nor --resume would accept.
        (run_dir / CONFIG_NAME).write_text(_json(dataclasses.asdict(cfg), indent=2) + "\n")
        if not held_out:
            why, advice = _why_not_held_out(cfg, dataset_label(train_set, cfg.data))
            _print(f"Note: {why}, so the end-of-run evaluation uses its training images ({advice})", log_path)
        if cfg.model == "vqvae" and cfg.vq_impl == "article" and cfg.vq_preset == "vqfast":
            _print(f"Note: the article's VQ step has no dead-code restarts; of the vqfast preset only its beta "
                   f"({vq_layer_options(cfg.vq_preset, cfg.beta, cfg.vq_kwargs)['beta']:g}) applies (--vq-preset "
                   f"article: the article's beta 1)", log_path)
        note = _kmeans_pending_note(model, (epochs - start_epoch) * steps_per_epoch - start_batch)
        if note is not None:
            _print(note, log_path)
        if start_epoch < epochs or start_batch:  # (a finished run resumed is only evaluated again)
            _print(f"Training {cfg.model} ({count_parameters(model):,} parameters) on {device} "
                   f"[{dataset_label(train_set, cfg.data)}: {len(train_set):,} image{'s' if len(train_set) != 1 else ''}, "
                   f"{steps_per_epoch} batch{'es' if steps_per_epoch != 1 else ''}/epoch{f' of {cfg.batch_size} per rank x {dist.world_size} ranks' if dist.enabled else ''}]"
                   f" -> {run_dir}", log_path)
        elif state is None:
            _print(f"--epochs 0: no training; {run_dir} gets the outputs of the {cfg.model} model as initialised "
                   f"(seed {cfg.seed})", log_path)

    is_vq = cfg.model == "vqvae"
    interrupted = False
    with _StopRequest(speak=dist.is_main) as stop, _errors_logged(log_path):
        for epoch in range(start_epoch, epochs):
            model.train()
            if dist.enabled:
                sampler.set_epoch(epoch)  # type: ignore[attr-defined]
            # Seeded afresh each epoch: how far the previous epoch's sampler ran (an interrupt stops it
            # before its last draw) must not change this epoch's order, or a resume would not be exact.
            shuffle_gen.manual_seed(_epoch_seed(cfg.seed, epoch))
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
            timed_images: int | None = 0  # images trained in this process (a resumed epoch's earlier ones took no time here)
            last_batch: torch.Tensor | None = None
            bar = _progress_bar(cfg.progress and dist.is_main, f"epoch {epoch + 1}/{epochs}", initial=skip,
                                total=steps_per_epoch)
            try:
                for x, _ in loader:
                    # In the run's last batch a Ctrl-C no longer stops it short: say so if one comes.
                    stop.finishing = epoch + 1 == epochs and done + 1 == steps_per_epoch
                    x = x.to(device, non_blocking=True)
                    try:
                        terms = train_step(train_module, x, optimizer, cfg.amp)
                    except (MemoryError, RuntimeError) as exc:
                        if not _out_of_memory(exc):
                            raise
                        raise ValueError(_training_out_of_memory(cfg, device, exc)) from None
                    last_batch = x
                    n = x.shape[0]
                    timed_images += n
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
                    if bar is not None:
                        bar.update(1)
                        if done % 10 == 0 or done == steps_per_epoch:
                            bar.set_postfix(loss=f"{float(acc[2] / acc[0]):.3f}")
                    # Under torchrun the ranks agree through an all-reduce and a host sync: every 20
                    # steps (all ranks check at the same steps), not every step.
                    check = not dist.enabled or done % 20 == 0 or done == steps_per_epoch
                    if check and dist.any(stop.requested, device):
                        interrupted = True
                        break
            finally:
                if bar is not None:
                    bar.close()
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the epoch's time is the GPU's, not its launches'
            elapsed = time.perf_counter() - t0
            if skip and seconds_before > 0:
                # A resumed epoch: its earlier batches' time was saved with them.
                elapsed += seconds_before
                timed_images = None
            if epoch_steps:
                step_losses.extend(torch.stack(epoch_steps).float().cpu().tolist())
            # (Every rank checks its own last batch; all stop if one finds the weights broken.)
            after = math.nan if last_batch is None else _loss_after_updates(model, last_batch, cfg.amp)
            broken = dist.any(last_batch is not None and not math.isfinite(after), device)
            resume_advice = (f"{ckpt_path} keeps the last state saved before it; continue from there with --resume "
                             "and a lower --lr")
            if interrupted and done < steps_per_epoch:
                so_far = float(dist.all_sum(acc)[2])
                if not math.isfinite(so_far) or broken:
                    # As at the end of an epoch: NaN weights saved now would replace the last good checkpoint.
                    what = (f"its loss so far (batch {done} of {steps_per_epoch}) is {so_far}"
                            if not math.isfinite(so_far) else
                            f"the weights after its last update (batch {done} of {steps_per_epoch}) give a "
                            f"non-finite loss on that batch")
                    raise ValueError(f"training diverged in epoch {epoch + 1}: {what}, so no checkpoint was written. "
                                     f"{resume_advice}")
                write_checkpoint(epoch, done, acc, counts, elapsed)
                if dist.is_main:
                    _print(f"Interrupted in epoch {epoch + 1} after batch {done}/{steps_per_epoch}; "
                           f"checkpoint saved to {ckpt_path} (continue with --resume)", log_path)
                break
            timed = None if timed_images is None else float(
                dist.all_sum(torch.full((), float(timed_images), dtype=torch.float64, device=device)))
            record = _epoch_record(epoch, dist.all_sum(acc), None if counts is None else dist.all_sum(counts),
                                   cfg, steps_per_epoch, elapsed, timed)
            if not math.isfinite(record["avg_loss"]):
                # The weights are NaN or inf now: training on would waste the time, and its checkpoint would
                # replace the last good one. (Every rank sees the same summed record.)
                if dist.is_main:
                    _print(_epoch_line(record, cfg), log_path)
                raise ValueError(f"training diverged in epoch {epoch + 1}: its average loss is {record['avg_loss']}. "
                                 f"{resume_advice}")
            if broken:
                if dist.is_main:
                    _print(_epoch_line(record, cfg), log_path)
                raise ValueError(f"training diverged in epoch {epoch + 1}: its average loss ({record['avg_loss']:.4f}) "
                                 f"comes from each step's loss before its update, but the weights after its last "
                                 f"update give a non-finite loss on its last batch, so no checkpoint was written. "
                                 f"{resume_advice}")
            history.append(record)
            write_checkpoint(epoch + 1, 0, None, None)
            if dist.is_main:
                _print(_epoch_line(record, cfg), log_path)
                with open(run_dir / METRICS_NAME, "a", encoding="utf-8") as f:
                    f.write(_json(record) + "\n")
            if interrupted and epoch + 1 < epochs:
                if dist.is_main:
                    _print(f"Interrupted after epoch {epoch + 1}; checkpoint saved to {ckpt_path}", log_path)
                break

        # Interrupted before the last epoch ended: stop here. Interrupted in its last batch (or, from
        # here on, while the summary is written): the training is complete, so the run is finished.
        if interrupted and not (history and history[-1]["epoch"] == epochs):
            raise KeyboardInterrupt
        stop.finishing = True
        test_metrics = None
        if dist.is_main:
            assert eval_set is not None
            test_metrics = _finish_run(model, cfg, train_set, eval_set, held_out, run_dir, device, history,
                                       step_losses, steps_per_epoch, log_path)
        dist.barrier()
    return TrainResult(run_dir=run_dir, model=model, config=cfg, history=history, test_metrics=test_metrics,
                       step_losses=step_losses)


def _kmeans_pending_note(model: nn.Module, batches_left: int) -> str | None:
    """A note when a quantizer's k-means would still be pooling when the run ends (its codes would stay
    the initial ones until a resumed run completes it); None otherwise."""
    from vqfast.layer import VectorQuantizer

    for module in model.modules():
        if isinstance(module, VectorQuantizer) and module._needs_init:
            needed = module.kmeans_batches - module._kmeans_pool_batches
            if needed > max(batches_left, 0):
                return (f"Note: k-means pools {module.kmeans_batches} training batches (kmeans_batches) and this run "
                        f"has {max(batches_left, 0)} left to train, so its codes stay the initial ones unless the run "
                        f"is resumed with more --epochs")
    return None


def _kmeans_pools(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state-dict entries of the k-means pools of ``model``'s VectorQuantizers (on the CPU); a layer
    has them while it pools, whatever its ``init`` (see ``vqfast.layer._save_kmeans_pool``)."""
    from vqfast.layer import _KMEANS_POOL_KEYS, VectorQuantizer

    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, VectorQuantizer):
            prefix = f"{name}." if name else ""
            out.update({k: v.cpu() for k, v in module.state_dict(prefix=prefix).items()
                        if k[len(prefix):] in _KMEANS_POOL_KEYS})
    return out


def _progress_bar(enabled: bool, desc: str, initial: int, total: int):
    """A bar advanced by hand, or None.

    It is never given the DataLoader: some tqdm classes (``tqdm.auto``'s asyncio one) call ``iter`` on
    their iterable when built, and every DataLoader iterator draws a seed from the shuffling generator.
    """
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(desc=desc, initial=initial, total=total, leave=False, dynamic_ncols=True)


def _epoch_record(epoch: int, acc: torch.Tensor, counts: torch.Tensor | None, cfg: TrainConfig, batches: int,
                  seconds: float, timed_images: float | None = None) -> dict[str, Any]:
    """One epoch's metrics; ``batches`` per process; ``seconds`` is the time spent on ``timed_images`` of
    them (default: all)."""
    n, sse, objective, kl, vq = (float(v) for v in acc.cpu())
    timed = n if timed_images is None else timed_images
    n = max(n, 1.0)
    mse = sse / (n * _PIXELS)
    rec: dict[str, Any] = {
        "epoch": epoch + 1,
        "images": int(n),
        # Per process: a run resumed with another number of processes has other epochs of other lengths.
        "batches": batches,
        "avg_loss": objective / n,
        "sse_per_image": sse / n,
        "mse": mse,
        "psnr": _psnr(mse),
        "seconds": seconds,
        "images_per_s": timed / seconds if seconds > 0 else None,
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


def _record_test(path: Path, test: dict[str, Any]) -> None:
    """Append ``test`` to the metrics file, replacing a record of the same test at the same epoch.

    Resuming a finished run evaluates it again: its metrics keep one record of that test, the new one.
    """
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []

    def same_test(line: str) -> bool:
        try:
            old = json.loads(line)
        except json.JSONDecodeError:
            return False
        return (isinstance(old, dict) and old.get("event") == "test" and old.get("epoch") == test["epoch"]
                and old.get("data") == test["data"])

    kept = [line for line in lines if line.strip() and not same_test(line)]
    _replace_lines(path, [*kept, _json(test)])


def _replace_lines(path: Path, lines: Sequence[str]) -> None:
    """``path`` rewritten to hold ``lines``, each ended, atomically (a temp file, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


def _metrics_matching_checkpoint(path: Path, history: Sequence[dict[str, Any]]) -> str | None:
    """Make the metrics file hold the checkpoint's epoch records, as a resumed run continues from them.

    The checkpoint is written just before an epoch's line is appended, so a run stopped in between
    lacks that one line, and a stop inside the append leaves half of it: the file is then completed
    from ``history`` (its tests kept, after their epochs). A file whose epochs are not the checkpoint's
    (a checkpoint copied from another run, an earlier checkpoint of this one, more than one epoch
    missing) is moved aside to ``<name>.before-resume`` (``.1``, ``.2``, ... when that is taken) and a
    new one written from ``history`` alone; so is a missing file written anew. Returns a note for the
    log, or None when the file already matched."""
    if not path.exists():
        if not history:
            return None
        _replace_lines(path, [_json(r) for r in history])
        return (f"resume: {path.name} was missing; written from the checkpoint's "
                f"{_count(len(history), 'epoch', 'epochs')}")
    text = path.read_text(encoding="utf-8")
    # A last line without its newline (a stop just before it) would have the next epoch's line appended
    # to it: the file is written again then, even when its records match.
    torn = text != "" and not text.endswith("\n")
    epochs, tests, unreadable = [], [], 0
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            unreadable += line.strip() != ""
            continue
        if not isinstance(record, dict):
            unreadable += 1
            continue
        # (As written now: files from before NaN and inf were written as null hold them as literals.)
        record = json.loads(_json(record))
        (tests if record.get("event") == "test" else epochs).append(record)
    expected = [json.loads(_json(r)) for r in history]
    if epochs == expected and not unreadable and not torn:
        return None
    done = len(expected)
    # Only the last epoch's line can be lost between the checkpoint and its append.
    continues = len(expected) - len(epochs) <= 1 and epochs == expected[:len(epochs)]
    kept = [t for t in tests if isinstance(t.get("epoch"), int) and 0 <= t["epoch"] <= done] if continues else []
    ordered = [t for t in kept if t["epoch"] == 0]
    for r in expected:
        ordered += [r, *(t for t in kept if t["epoch"] == r.get("epoch"))]
    backup = path.with_name(path.name + ".before-resume")
    if not continues:
        number = 0
        while backup.exists():
            number += 1
            backup = path.with_name(f"{path.name}.before-resume.{number}")
        os.replace(path, backup)
    _replace_lines(path, [_json(r) for r in ordered])
    if continues:
        restored = len(expected) - len(epochs)
        what = [f"{_count(restored, 'epoch record', 'epoch records')} it lacked" if restored else "",
                f"{_count(unreadable, 'unreadable line', 'unreadable lines')} left out" if unreadable else "",
                "its last line ended" if torn and not (restored or unreadable) else ""]
        return f"resume: {path.name} rewritten from the checkpoint ({', '.join(w for w in what if w)})"
    return (f"resume: {path.name} does not hold the epochs of {CHECKPOINT_NAME} (a checkpoint from another run, or an "
            f"earlier one of this run?); it is rewritten from the checkpoint's {_count(done, 'epoch', 'epochs')}, "
            f"the earlier file kept as {backup.name}")


def _training_out_of_memory(cfg: TrainConfig, device: torch.device, exc: BaseException) -> str:
    """The error line for a training step that ran out of memory: the batch size is the option to change."""
    article = (" (--vq-impl article's search holds a batch x 16 positions x codes x code-dim tensor)"
               if cfg.model == "vqvae" and cfg.vq_impl == "article" else "")
    return (f"out of memory in a training step with --batch-size {cfg.batch_size} on {device}{article}: "
            f"{_first_line(exc)}. Train with a smaller --batch-size (a resumed run keeps its batch size: start it "
            f"anew with --overwrite, or in another --out)")


def _eval_batch_size(cfg: TrainConfig) -> int:
    """Images per evaluation batch: 256, or for the article's VQ step no more than training used, since its
    search builds a (rows x codes x dims) tensor: at 256 images, 4,096 x 128 codes, two of 8.6 GB each,
    four times what the training batches of 64 needed."""
    if cfg.model == "vqvae" and cfg.vq_impl == "article":
        return min(256, cfg.batch_size)
    return 256


def _why_not_held_out(cfg: TrainConfig, label: str) -> tuple[str, str]:
    """Why a run's end-of-run evaluation is on training images, and what would make it a test."""
    if cfg.eval_data is not None:
        # Only --eval-data naming the training source itself gets here (see _load_eval_set): that
        # source has no test split, or it would have been read.
        return (f"--eval-data {label} is the training data itself",
                "give --eval-data other images for a held-out set")
    return f"{label} has no test split", "pass --eval-data for a held-out set"


def _finish_run(model: nn.Module, cfg: TrainConfig, train_set: Dataset, test_set: Dataset, held_out: bool,
                run_dir: Path, device: torch.device, history: list[dict[str, Any]], step_losses: list[float],
                steps_per_epoch: int, log_path: Path | None) -> dict[str, Any]:
    """End-of-run evaluation on ``test_set`` and figures, written by rank 0.

    ``held_out`` False: ``test_set`` holds training images (the source has no test split, or
    ``eval_data`` names the training source), and every
    line and record says so.
    """
    from vqfast.models import viz

    model.eval()
    train_label, test_label = dataset_label(train_set, cfg.data), dataset_label(test_set, cfg.eval_data or cfg.data)
    result = evaluate_model(model, test_set, device, batch_size=_eval_batch_size(cfg), amp=cfg.amp,
                            keep_images=cfg.grid_images,
                            progress=cfg.progress, desc="test" if held_out else "evaluation")
    baseline = mean_image_mse(test_set, mean_image(train_set))
    test = {"event": "test", "epoch": len(history), "data": test_label, "held_out": held_out,
            "images": result["n"], "mse": result["mse"], "psnr": result["psnr"],
            "sse_per_image": float(result["sse"].mean()), "mean_image_mse": baseline}
    if held_out:
        head, which = f"Test ({test_label}, {result['n']} image{'s' if result['n'] != 1 else ''})", "test"
    else:
        why, advice = _why_not_held_out(cfg, test_label)
        head = f"Evaluation on {result['n']} TRAINING image{'s' if result['n'] != 1 else ''}, not a test ({why}; {advice})"
        which = "evaluated training"
    lines = [f"{head}: MSE/pixel {test['mse']:.5f} | PSNR {test['psnr']:.2f} dB | SSE/image "
             f"{test['sse_per_image']:.3f} | predicting the mean training image instead: MSE/pixel {baseline:.5f}"]

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
        (run_dir / "codebook_usage.json").write_text(_json(report) + "\n")
        viz.save_code_histogram(counts, run_dir / "codebook_usage.png",
                                title=f"code usage on {result['n']} {which} images: perplexity {float(perplexity):.1f}")
        test.update(codes_used=used, perplexity=float(perplexity))
        lines.append(f"Codebook: {used}/{cfg.num_codes} codes used on the {which} images, "
                     f"perplexity {float(perplexity):.1f}")

    if cfg.model == "vae":
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        viz.save_image_grid(model.sample(32, device=device, generator=g), run_dir / "samples.png", nrow=8)
        # Pairs of evaluation images; an evaluation set of one image has no pair, so training images
        # stand in, and the log says so.
        blend_set, blend_note = test_set, None
        if len(test_set) < 2:
            blend_set = train_set
            blend_note = (f"blend.png blends training images: the evaluation set ({test_label}) has only "
                          f"{len(test_set)} image")
        if len(blend_set) >= 2:
            pairs = min(4, len(blend_set) // 2)
            images = torch.stack([blend_set[i][0] for i in range(2 * pairs)]).to(device)
            x1, x2 = images[:pairs], images[pairs:]
            with torch.no_grad():
                strip = model.blend(x1, x2, torch.linspace(0, 1, 9).tolist())  # (A, B, 3, H, W)
            # originals framing each row: x1 | blends | x2
            full = torch.cat([x1.unsqueeze(0), strip, x2.unsqueeze(0)])
            viz.save_blend_strip(full, run_dir / "blend.png")
        else:
            # (Only a run on a single training image gets here.)
            blend_note = "blend.png not written: it blends between two images, and the run has only one"
        if blend_note is not None:
            lines.append(blend_note)

    _record_test(run_dir / METRICS_NAME, test)
    summary = {"model": cfg.model, "parameters": count_parameters(model), "epochs": len(history),
               "train_data": train_label, "train_images": len(train_set),
               "final_train": history[-1] if history else None, "test": test}
    (run_dir / "summary.json").write_text(_json(summary, indent=2) + "\n")
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


def _write_scores_csv(path: Path, source: str, result: Mapping[str, Any], threshold: float | None, *,
                      indices: Sequence[int], files: Sequence[str] | None = None) -> None:
    """One row per image: its index in the source (``indices``: an .npz's row, also where a limit picked
    images from it; for a folder, also its file inside the folder), label, score (summed squared error),
    MSE, PSNR, and whether it is above ``threshold``."""
    header = ["source", "index", "label", "sse", "mse", "psnr"]
    header += ["anomalous"] if threshold is not None else []
    header += ["file"] if files is not None else []
    # Written beside and then renamed: a failure midway leaves no partial file (nor half of an earlier one).
    partial = path.with_name(path.name + ".partial")
    try:
        # The csv module quotes a folder or file name holding a comma or a quote; a file name that is not
        # UTF-8 keeps its own bytes (surrogateescape), as the file system holds them.
        with open(partial, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            for i, (s, y) in enumerate(zip(result["sse"].tolist(), result["labels"].tolist())):
                mse = s / _PIXELS
                row = [source, indices[i], y, f"{s:.6f}", f"{mse:.8f}", f"{_psnr(mse):.3f}"]
                row += [int(s > threshold)] if threshold is not None else []
                row += [files[i]] if files is not None else []
                writer.writerow(row)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _earlier_evaluation_of_other_data(summary_path: Path, data: str) -> str | None:
    """The data an earlier evaluation summary at ``summary_path`` scored, where it is other data than
    ``data`` (two folders with one base name give the same file names); None otherwise."""
    try:
        earlier = json.loads(summary_path.read_text()).get("data")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(earlier, str) or _absolute_source(earlier) == _absolute_source(data):
        return None
    return earlier


def _load_eval_source(source: str, split: str, data_root: str, download: bool, limit: int | None, seed: int = 0,
                      run_cut: bool = False, run_limit: int | None = None,
                      run_images: Dataset | None = None) -> tuple[Dataset, dict[str, Any]]:
    """The images ``evaluate`` scores for ``source``, and what they really are: ``data`` (the source
    actually read: ``sample`` after CIFAR-10 fell back to it), ``split`` (``all`` for a source with a
    single set of images) and ``notes`` on any difference from what was asked for. ``run_cut``: the
    source is the run's training data, cut as the run cut it (its ``--limit``, ``run_limit``) before
    ``limit`` picks evenly spaced images from those, as the end-of-run evaluation does, so that only
    images the run trained on are scored as such, whatever the run's --limit was; ``run_images``: those
    images already read (not read again)."""
    has_split = has_test_split(source)
    # The run's seed: synthetic images are drawn from it (its test split from seed + 1), so another
    # seed would score other images, and the test split of seed - 1 is this run's training set.
    ds = run_images if run_images is not None else load_dataset(
        source, train=split == "train" or not has_split, root=data_root, download=download,
        limit=run_limit if run_cut else limit, seed=seed)
    trained_on = len(ds)
    if run_cut and limit is not None and limit < len(ds):
        ds = evenly_spaced(ds, limit)
    actual = source_of(ds, source)
    info: dict[str, Any] = {"data": actual, "split": split if has_split else "all", "notes": []}
    if actual != source:
        info["requested_data"] = source
        info["notes"].append(f"{source} was unavailable: scored the bundled CIFAR-10 sample ({split} split) instead")
    if run_cut:
        kept = f"the {trained_on:,} its --limit kept" if run_limit is not None else f"all {trained_on:,}"
        info["notes"].append(f"scored the images the run trained on: {kept}"
                             + ("" if len(ds) == trained_on else f", {len(ds):,} of them, evenly spaced"))
    elif not has_split:
        scored = ("all its images" if limit is None or len(ds) < limit
                  else f"{len(ds):,} of its images (--limit {limit})")
        info["notes"].append(f"{source} has no separate train/test split: scored {scored}")
    return ds, info


def evaluate(run: str | Path, data: str | None = None, split: str = "test", ood: str | None = None,
             data_root: str | Path | None = None, download: bool = True, limit: int | None = None,
             batch_size: int | None = None,
             device: str = "auto", backend: str | None = None, amp: bool = False, out_dir: str | Path | None = None,
             worst: int = 16, progress: bool = True) -> dict[str, Any]:
    """Reconstruction quality and anomaly scores of a trained run on a data source.

    ``data`` None: the run's own end-of-run test source (its ``eval_data``, else the test split of its
    ``data``), or with ``split="train"`` its training data; ``data_root`` None: the run's. The run's
    training images (``split="train"`` without ``data``, or ``data`` holding the very images it trained on
    at another place) are taken as the run cut them (its ``--limit``), and ``limit`` picks evenly spaced
    ones of those, as the end-of-run evaluation does.
    The anomaly score of an image is its summed squared reconstruction error. Writes
    ``eval-<source>-<split>.csv`` (one row per image, with its index in the source, also where a limit
    picked images from it; for a folder source with the image's file) and
    ``eval-<source>-<split>.json`` (the summary; its ``worst`` lists [index in the source, score]) and a grid of the ``worst`` reconstructed images (with
    ``worst=0`` none, and an earlier grid there is removed) to ``out_dir`` (default: the run folder), named
    after the data actually scored: ``sample`` when CIFAR-10 was unavailable and the bundled sample was
    used, split ``all`` for a source without a train/test split (an ``.npz`` with only ``x``, a folder).
    With ``ood`` (another source, e.g. ``svhn`` for a CIFAR-10 model) its images are scored too, and
    the summary gives the AUROC of the score separating them from ``data`` and the fraction of them
    above the 95th percentile of ``data``'s scores. Nothing is written unless every source loads.
    ``batch_size`` None: 256 images, or for a run with the article's VQ step (whose search builds a
    rows x codes x dims tensor) at most its training batch size.
    """
    from vqfast.models import viz

    if split not in ("test", "train"):
        raise ValueError(f"--split must be test or train, got {split!r}")
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit must be positive, got {limit}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if worst < 0:
        raise ValueError(f"--worst must be >= 0, got {worst}")
    _refuse_empty_sources(("--data", data), ("--ood", ood))
    dev = resolve_device(device)
    _check_backend_on(backend, dev)
    if amp and dev.type != "cuda":
        print("--amp: bf16 autocast is used on CUDA only; evaluating in fp32 on the CPU", file=sys.stderr)
    # A runtime choice, restored afterwards: the backend a run was trained with is not reused.
    run = Path(run).expanduser()
    with selected_backend(backend):
        model, cfg, state = load_run(run, dev)
        if batch_size is None:
            batch_size = _eval_batch_size(cfg)
        run_dir = run if run.is_dir() else run.parent
        out = Path(out_dir).expanduser() if out_dir else run_dir
        _check_folder_can_be_made(out)
        # The run's training images, as it cut them: with a smaller --limit, scoring the whole split would
        # count images it never saw as training ones.
        run_cut = data is None and split == "train"
        runs_own_data = data is None
        if data is None:
            # The run's --eval-data holds its test images; its training images are in --data.
            data = cfg.data if split == "train" else (cfg.eval_data or cfg.data)
        if data_root is None:
            data_root = cfg.data_root
        _check_out_of_data(out, (("--data", data), ("--ood", ood)), *(("--out",) if out_dir else
                           ("the run folder", "give --out outside it")))

        run_images = None
        if not run_cut and split == "train" and _is_local(data) and state.get("data_fingerprint"):
            # The run's own training images at another place (--data after they moved): cut as it cut them.
            try:
                candidate = load_dataset(data, train=True, root=data_root, download=False, limit=cfg.limit,
                                         seed=cfg.seed)
                if _data_fingerprint(candidate) == state["data_fingerprint"]:
                    run_cut, run_images = True, candidate
            except (DatasetUnavailable, OSError, ValueError):
                pass  # (the load below says what is wrong)
        try:
            ds, info = _load_eval_source(data, split, data_root, download, limit, cfg.seed, run_cut, cfg.limit,
                                         run_images)
        except FileNotFoundError as exc:
            if not runs_own_data or not _is_local(data):
                raise
            what = "training data" if split == "train" or not cfg.eval_data else "evaluation data (--eval-data)"
            raise FileNotFoundError(f"the run's {what}, {data}, is not there any more; if it moved, give its "
                                    f"new place with --data") from exc
        ood_ds, ood_info = (None, None) if ood is None else _load_eval_source(ood, split, data_root, download, limit,
                                                                          cfg.seed)

        def score(dataset: Dataset, desc: str) -> dict[str, Any]:
            try:
                return evaluate_model(model, dataset, dev, batch_size=batch_size, amp=amp, progress=progress,
                                      desc=desc)
            except (MemoryError, RuntimeError) as exc:
                if not _out_of_memory(exc):
                    raise
                raise ValueError(f"out of memory scoring batches of {batch_size} images on {dev}: "
                                 f"{_first_line(exc)}. Give a smaller --batch-size") from None

        res = score(ds, f"{info['data']} {info['split']}")
        name, split_label = describe_source(info["data"]), info["split"]
        notes = list(info["notes"])
        summary: dict[str, Any] = {"run": str(run_dir), "model": cfg.model, "epochs_trained": int(state["epoch"]),
                                   # a run stopped mid-epoch holds the weights of this many batches more
                                   "batches_trained": int(state.get("batch", 0)),
                                   "data": info["data"], "split": split_label, "images": res["n"], "mse": res["mse"],
                                   "psnr": res["psnr"], **_score_summary(res["sse"])}
        if "requested_data" in info:
            summary["requested_data"] = info["requested_data"]
        threshold = float(torch.quantile(res["sse"], 0.95))
        summary["threshold_p95"] = threshold
        if "indices" in res:
            from vqfast.reference import code_usage  # CPU indices, whatever backend the model used

            counts, _, perplexity = code_usage(res["indices"].to(torch.int64), cfg.num_codes)
            summary.update(codes_used=int((counts > 0).sum()), perplexity=float(perplexity))
        worst_idx = torch.argsort(res["sse"], descending=True)[:worst]
        positions = source_indices(ds)
        summary["worst"] = [[positions[int(i)], float(res["sse"][i])] for i in worst_idx]

        ood_res = None
        if ood_ds is not None and ood_info is not None:
            ood_res = score(ood_ds, f"{ood_info['data']} {ood_info['split']}")
            notes += ood_info["notes"]
            summary["ood"] = {"data": ood_info["data"], "split": ood_info["split"], "images": ood_res["n"],
                              "mse": ood_res["mse"], "psnr": ood_res["psnr"], **_score_summary(ood_res["sse"]),
                              "auroc": _auroc(res["sse"], ood_res["sse"]),
                              "flagged_at_p95": float((ood_res["sse"] > threshold).double().mean())}
            if "requested_data" in ood_info:
                summary["ood"]["requested_data"] = ood_info["requested_data"]
            if ((ood_info["data"], ood_info["split"]) == (info["data"], info["split"])
                    and list(source_indices(ood_ds)) == list(positions)):
                notes.append(f"--ood scored the same images as --data ({describe_source(info['data'])} "
                             f"{split_label}): an AUROC of 0.5 says nothing; give another source, e.g. svhn")
        earlier = _earlier_evaluation_of_other_data(out / f"eval-{name}-{split_label}.json", info["data"])
        if earlier is not None:
            notes.append(f"replaced the evaluation of {earlier} in {out} (its files have the same names; "
                         f"give --out to keep both)")
        if notes:
            summary["notes"] = notes

        out.mkdir(parents=True, exist_ok=True)
        _write_scores_csv(out / f"eval-{name}-{split_label}.csv", name, res, threshold, indices=positions,
                          files=image_files(ds))
        worst_png = out / f"eval-{name}-{split_label}-worst.png"
        if worst > 0:
            xs = torch.stack([ds[int(i)][0] for i in worst_idx])
            with torch.no_grad(), _autocast(dev, amp):
                rec = torch.cat([model.reconstruct(chunk.to(dev)).float().cpu() for chunk in xs.split(batch_size)])
            viz.save_reconstruction_grid(xs, rec, worst_png)
        else:
            # An earlier evaluation's grid would sit next to scores it does not show.
            worst_png.unlink(missing_ok=True)
        # An earlier evaluation's scores of another set beside this one's would carry its threshold.
        for stale in out.glob(glob.escape(f"eval-{name}-{split_label}-ood-") + "*.csv"):
            if stale.is_file():
                stale.unlink()
        if ood_res is not None and ood_info is not None:
            ood_name = describe_source(ood_info["data"])
            # Named after both sets: its anomalous column uses this evaluation's threshold, and a name of
            # its own cannot replace the files of an evaluation of the other set.
            ood_file = f"eval-{name}-{split_label}-ood-{ood_name}-{ood_info['split']}"
            _write_scores_csv(out / f"{ood_file}.csv", ood_name, ood_res, threshold, indices=source_indices(ood_ds),
                              files=image_files(ood_ds))
        (out / f"eval-{name}-{split_label}.json").write_text(_json(summary, indent=2) + "\n")
        return summary


# ------------------------------------------------------------------------------------------ CLI


def _parse_kv(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    if not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r} (no KEY)")
    # Python's spellings too: the layer's own messages ask for "True or False", and ema=True left as the
    # string 'True' was refused with "ema must be True or False, got 'True'".
    python = {"True": True, "False": False, "None": None}
    if value in python:
        return key, python[value]
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def configure_train_parser(parser: argparse.ArgumentParser) -> None:
    """Add the training options (``model`` positional: ae, vae or vqvae) to ``parser``."""
    a = parser.add_argument
    a("model", choices=MODEL_NAMES, help="which autoencoder to train")
    a("--epochs", type=int, default=None,
      help="epochs to train (default: the article's: ae 20, vae 10, vqvae 30; 0: no training, only the outputs "
           "of the initialised model); with --resume, the new total")
    a("--batch-size", type=int, default=None, help="images per batch (default 64; under torchrun, per process)")
    a("--lr", type=float, default=None, help="Adam learning rate (default 1e-3; with --resume: the run's, "
      "or this new one from here on)")
    a("--latent-dim", type=int, default=None, help="latent size of the AE and VAE (default 1024)")
    a("--codes", dest="num_codes", type=int, default=None, help="VQ-VAE codebook size (default 4096)")
    a("--code-dim", type=int, default=None, help="VQ-VAE code dimension (default 128)")
    a("--beta", type=float, default=None,
      help="VQ commitment weight (default: the preset's, 0.25 for vqfast, 1.0 for article)")
    a("--vq-preset", choices=("vqfast", "article"), default=None,
      help="VQ-VAE quantizer settings: vqfast (the default; beta 0.25, dead-code restarts: keeps the codebook "
           "alive) or article (beta 1, no restarts: the article's settings with its defects fixed)")
    a("--vq-impl", choices=("vqfast", "article"), default=None,
      help="VQ step: vqfast's VectorQuantizer (the default), or the article's plain-PyTorch VQ step with its "
           "defects fixed (for comparing speed and results; use with --vq-preset article)")
    a("--kl-weight", type=float, default=None, help="VAE weight of the KL term (default 0.1)")
    a("--codebook-init", choices=("xavier_normal", "layer"), default=None,
      help="xavier_normal (the article's, the default) or the VQ layer's own initialisation; "
           "--vq-option init=... implies the latter")
    a("--vq-option", dest="vq_kwargs", type=_parse_kv, action="append", default=[], metavar="KEY=VALUE",
      help="extra keyword argument for vqfast.VectorQuantizer (VALUE parsed as JSON when possible, True, False "
           "and None as in Python); repeatable; "
           "VQ-VAE with --vq-impl vqfast only")
    a("--backend", choices=("auto", "torch", "triton"), default="auto",
      help="VQ backend: auto picks triton on CUDA and the PyTorch reference on the CPU")
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    a("--seed", type=int, default=None, help="random seed (default 0)")
    a("--data", default=None,
      help="(default cifar10) cifar10 (falls back to the bundled sample when unavailable), svhn, sample, synthetic, "
           "or a path to an ImageFolder directory or an .npz with x (N,32,32,3) uint8 and an optional y")
    # (Options whose value a resumed run keeps unless given parse as None when left out.)
    a("--data-root", default=None, help="where torchvision datasets live / are downloaded to (default ./data; "
      "with --resume, the run's)")
    # BooleanOptionalAction: a resumed run keeps its setting unless given, so each setting needs a way
    # back (--download after --no-download, --no-amp after --amp).
    a("--download", action=argparse.BooleanOptionalAction, default=None,
      help="download CIFAR-10 / SVHN when missing (the default); --no-download never does (with --resume: "
           "as the run did, unless given)")
    a("--out", default=None,
      help="run folder (default runs/<model>-<timestamp>); must be new or empty unless --resume or --overwrite, "
           "and outside the image folders it reads")
    a("--amp", action=argparse.BooleanOptionalAction, default=None,
      help="bf16 autocast (CUDA only; default off; with --resume: as the run did, unless given)")
    a("--deterministic", action=argparse.BooleanOptionalAction, default=None,
      help="train under torch.use_deterministic_algorithms(True): the same seed gives the same bits on the same "
           "GPU and software (vqfast then sums its codebook gradients in a fixed order); a resumed run keeps "
           "its setting unless given")
    a("--limit", type=int, default=None, help="use at most this many training images")
    a("--resume", action="store_true", help="continue the run in --out (its folder or its checkpoint.pt)")
    a("--overwrite", action="store_true",
      help="start afresh in --out even if it holds a run or other files (a previous run's outputs are replaced)")
    a("--workers", dest="num_workers", type=int, default=0, help="DataLoader worker processes")
    a("--threads", type=int, default=None,
      help="CPU threads for PyTorch, >= 1 (default: its own choice; 1 is often fastest on a busy machine)")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    a("--eval-data", default=None,
      help="source for the end-of-run evaluation (default: the test split of --data; an .npz with only x/y or "
           "an image folder has none, so pass its held-out partner here, or the evaluation uses training images "
           "and says so)")
    a("--eval-limit", type=int, default=None,
      help="test images for the end-of-run evaluation (default 2000; 0: all; with --resume, the run's)")
    a("--grid-images", type=int, default=None,
      help="images in the end-of-run reconstruction grid (default 16; with --resume, the run's)")


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    # Options left out parse as None (or an empty list) and take TrainConfig's defaults.
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    values["vq_kwargs"] = dict(values.get("vq_kwargs") or [])
    if values.get("codebook_init") == "layer":
        values["codebook_init"] = None
    if values.get("eval_limit") == 0:
        values["eval_limit"] = None
    return _as_config(values)


def _given_options(args: argparse.Namespace) -> set[str]:
    """The TrainConfig fields set on the command line (the model positional always is)."""
    given = {k for k, v in vars(args).items() if v is not None and k != "vq_kwargs"}
    if getattr(args, "vq_kwargs", None):
        given.add("vq_kwargs")
    return given


def _error_text(exc: BaseException) -> str:
    """The message of ``exc`` for an ``error:`` line. One raised in a DataLoader worker (a damaged image
    with --workers) reaches the main process as "Caught ValueError in DataLoader worker process 0",
    then the worker's whole traceback: only its last line is the message."""
    # Messages written for both the Python API and the command line name an option both ways,
    # "resume=True (--resume)": on the command line only the option applies.
    text = re.sub(r"\b\w+=True \((--[\w-]+)\)", r"\1", str(exc))
    if "DataLoader worker process" in text and "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        prefix = f"{type(exc).__name__}: "
        return last[len(prefix):] if last.startswith(prefix) else last
    return text


def train_main(args: argparse.Namespace) -> int:
    """Run ``vqfast train`` with parsed ``args``; returns the exit status (130 after Ctrl-C)."""
    try:
        cfg = _config_from_args(args)
        train(cfg, given=_given_options(args))
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # (under torchrun, every rank gets the Ctrl-C)
            print("Training interrupted.", file=sys.stderr)
        return 130
    except RankZeroFailed:
        return 2  # rank 0 has printed the error
    except (DatasetUnavailable, OSError, ValueError) as exc:
        # OSError: the file system's own complaints (a file where a folder should be, an unreadable
        # image) name their path; a traceback would add nothing for the user.
        print(f"error: {_error_text(exc)}", file=sys.stderr)
        return 2
    return 0


def configure_evaluate_parser(parser: argparse.ArgumentParser) -> None:
    """Add the evaluation options (``run`` positional: a run folder or checkpoint) to ``parser``."""
    a = parser.add_argument
    a("run", help="run folder (or its checkpoint.pt)")
    a("--data", default=None, help="cifar10, svhn, sample, synthetic, or a folder / .npz path (default: the run's "
      "own test source, its --eval-data or else its --data; with --split train, its --data)")
    a("--split", choices=("test", "train"), default="test",
      help="which split of a source with one (cifar10, svhn, sample, synthetic, an .npz with x_test) to score "
           "(default: test)")
    a("--ood", default=None, help="a second source scored as out-of-distribution (e.g. svhn); reports AUROC")
    a("--data-root", default=None, help="where torchvision datasets live (default: the run's)")
    a("--no-download", dest="download", action="store_false", help="never download datasets")
    a("--limit", type=int, default=None, help="use at most this many images per source")
    a("--batch-size", type=int, default=None,
      help="images per batch (default 256; for a run with --vq-impl article, at most its training batch size)")
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    a("--backend", choices=("auto", "torch", "triton"), default=None,
      help="VQ backend: auto picks triton on CUDA and the PyTorch reference on the CPU")
    a("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    a("--out", dest="out_dir", default=None, help="folder for the CSV/JSON/PNG (default: the run folder)")
    a("--worst", type=int, default=16, help="how many worst-reconstructed images to show (default: 16; 0 for none)")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _format_eval(summary: Mapping[str, Any]) -> str:
    epochs = summary["epochs_trained"]
    trained = f"{epochs} epoch{'s' if epochs != 1 else ''}"
    if summary.get("batches_trained"):
        trained += f" and {summary['batches_trained']} batch{'es' if summary['batches_trained'] != 1 else ''}"
    lines = [f"{summary['model']} ({trained}) on {summary['data']} {summary['split']}: "
             f"{_count(summary['images'], 'image', 'images')}, MSE/pixel {summary['mse']:.5f}, PSNR {summary['psnr']:.2f} dB",
             f"  anomaly score (SSE/image): mean {summary['score_mean']:.3f}, median {summary['score_p50']:.3f}, "
             f"p90 {summary['score_p90']:.3f}, p99 {summary['score_p99']:.3f}, max {summary['score_max']:.3f}"]
    if "perplexity" in summary:
        lines.append(f"  codes used {summary['codes_used']}, perplexity {summary['perplexity']:.1f}")
    if summary["worst"]:
        lines.append("  worst images: " + ", ".join(f"#{i} ({s:.2f})" for i, s in summary["worst"][:5]))
    if "ood" in summary:
        o = summary["ood"]
        lines.append(f"  {o['data']} {o['split']}: {_count(o['images'], 'image', 'images')}, MSE/pixel {o['mse']:.5f}, PSNR "
                     f"{o['psnr']:.2f} dB, score mean {o['score_mean']:.3f}; AUROC {o['auroc']:.3f}, "
                     f"{100 * o['flagged_at_p95']:.1f}% above the in-distribution 95th percentile")
    lines += [f"  note: {note}" for note in summary.get("notes", ())]
    return "\n".join(lines)


def evaluate_main(args: argparse.Namespace) -> int:
    """Run ``vqfast evaluate`` with parsed ``args``; prints a summary, returns the exit status."""
    if os.environ.get("WORLD_SIZE", "1") != "1":
        # Launched by torchrun: evaluation runs in one process, and every rank would score the same
        # images and write the same files. Rank 0 does it (and says so).
        if os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) != "0":
            return 0
        print("evaluate runs in one process: rank 0 scores the images, the other ranks exit", file=sys.stderr)
    try:
        summary = evaluate(args.run, data=args.data, split=args.split, ood=args.ood, data_root=args.data_root,
                           download=args.download, limit=args.limit, batch_size=args.batch_size,
                           device=args.device, backend=args.backend, amp=args.amp, out_dir=args.out_dir,
                           worst=args.worst, progress=args.progress)
    except KeyboardInterrupt:
        print("Evaluation interrupted.", file=sys.stderr)
        return 130
    except (DatasetUnavailable, OSError, ValueError) as exc:
        print(f"error: {_error_text(exc)}", file=sys.stderr)
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
