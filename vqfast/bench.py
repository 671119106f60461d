"""Benchmark suite behind ``vqfast bench``: vqfast's kernels against the plain PyTorch code they replace.

Parts (``--only``): ``headline`` (the project's summary table), ``nearest`` (nearest-code search swept
over N, K, D and precision), ``gather`` (gather + scatter-add backward), ``usage`` (bincount + entropy),
``layer`` (VectorQuantizer forward + backward), ``train`` (a VQ-VAE training step). The matmul and copy
ceilings of the GPU are always measured first, so achieved TFLOP/s and GB/s can be judged in the same run.

Every measurement is one :class:`Record`; the results go to ``results.csv``, ``results.md`` and PNG plots
in the output folder, rewritten after each part so an interrupted run keeps what it measured.
Nothing here asks CUDA anything at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import functools
import gc
import itertools
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vqfast._checks import env_switch
from vqfast.models.article import ArticleVQ, search_broadcast, search_matmul

__all__ = [
    "PARTS", "PRECISIONS", "Record", "NearestPoint", "Plan", "Meter", "Budget",
    "default_plan", "quick_plan", "run_benchmarks", "configure_parser", "main",
    "tflops", "gbps", "tolerance", "chosen_distance_error", "format_markdown_table",
    "write_csv", "render_markdown", "search_broadcast", "search_matmul", "search_cdist", "bare_product",
    "ArticleVQ", "gpu_slug",
]

PARTS = ("headline", "nearest", "gather", "usage", "layer", "train")

# name -> (input dtype, torch.set_float32_matmul_precision value). "fp32" and "tf32" are both fp32 data,
# which vqfast searches with tf32 products and an fp32 re-check either way (the listed rows again with
# fp32 or tf32x3 products), and the torch forms with fp32 or tf32 products; 16-bit inputs ignore the
# matmul precision.
PRECISIONS: dict[str, tuple[torch.dtype, str]] = {
    "fp32": (torch.float32, "highest"),
    "tf32": (torch.float32, "high"),
    "bf16": (torch.bfloat16, "highest"),
    "fp16": (torch.float16, "highest"),
}

# Default wall-clock budgets (seconds of measuring, after start-up): a full run must finish within
# 10 minutes on an H100, a quick one within 2.
DEFAULT_BUDGET_S = 500.0
QUICK_BUDGET_S = 85.0

# Share of the remaining budget each part may use; time a part leaves unused goes to the later ones.
PART_WEIGHTS = {"headline": 0.25, "nearest": 0.34, "gather": 0.05, "usage": 0.04, "layer": 0.12, "train": 0.12,
                "headline (TMA)": 0.05}
# The headline's opt-in TMA search (see TMA_PROVIDER) is timed after every other part: the least
# proven kernel, so that if it fails badly (a hang is only ended by killing the process), the rest of
# the run is already written. Its records belong to the headline.
TMA_STEP = "headline (TMA)"

COMPILE_PROVIDER = "torch.compile(matmul)"
NEAREST_PROVIDERS = (
    "vqfast", COMPILE_PROVIDER, "matmul+argmin", "cdist+argmin", "article (broadcast)",
    "z@c.T (cuBLAS)", "vector-quantize-pytorch",
)
# The same search replayed from a CUDA graph: GPU time without Python's launch cost, which is what
# dominates small problems in eager mode (what torch.compile(mode="reduce-overhead") would give).
GRAPH_PROVIDER = "vqfast (CUDA graph)"
# The same search called back to back in eager mode and timed by the wall clock over many calls: what
# a loop of eager calls gets, max(host time, GPU time) per call. do_bench's figure can hide host time:
# while the GPU clears L2 before each timed call, the host is already launching that call's kernels.
# Measured at small problems only (WALL_MAX_FLOP), where host time can matter.
WALL_PROVIDER = "vqfast (back to back)"
WALL_MAX_FLOP = 2.0**31
# The opt-in search with TMA loads and warp specialisation (VQFAST_TMA_SEARCH=1, kernels/nearest_tma.py),
# at the shapes of goals 1, 2 (tf32) and 3b (each new shape autotunes its candidates: compile time).
TMA_PROVIDER = "vqfast (VQFAST_TMA_SEARCH=1)"
TMA_POINTS = ((65536, 65536, 256), (1024, 262144, 64))
HEADLINE_PROVIDERS = ("vqfast", WALL_PROVIDER, GRAPH_PROVIDER, "cdist+argmin", "matmul+argmin", "z@c.T (cuBLAS)",
                      TMA_PROVIDER)
# The layer's training step (forward and backward) replayed from a CUDA graph as well: what capturing
# a training step (torch.cuda.graph, torch.compile(mode="reduce-overhead")) leaves of its cost.
# The rotation trick too: vector-quantize-pytorch's VectorQuantize may use it by default (see the row's note).
ROTATION_PROVIDER = "vqfast (rotation trick)"
LAYER_PROVIDERS = ("vqfast", GRAPH_PROVIDER, ROTATION_PROVIDER, "matmul+argmin", "article (fixed)",
                   "vector-quantize-pytorch")
# Input batches the layer and training-step benchmarks feed in turn: with one batch fed over and over,
# dead-code restarts would soon put codes on its very rows and make the search unlike a real one.
INPUT_BATCHES = 4
TRAIN_PROVIDERS = ("vqfast", "article (fixed)", "no VQ")

# ``case`` of the record left by a part that stopped on an unexpected exception.
CRASHED = "(part stopped by an error)"
# ``part`` and ``case`` of the record left by a run that its hard time limit cut short.
RUN_PART = "run"
CUT_SHORT = "(run stopped at its hard time limit)"
# Exit status of ``vqfast bench`` for a run cut short by its hard time limit (1: failures, 2: no GPU).
EXIT_CUT_SHORT = 3
# Status of a point not measured for lack of time: the budget had passed, its timing would not have
# fitted in what was left, or the run's hard time limit stopped the run before it.
SKIPPED = "skipped (time budget)"
# Status of the opt-in TMA search on a GPU it does not run on (not a failure: nothing to measure there).
TMA_NOT_HERE = "n/a (needs sm_90)"

# Fewest timed runs a median rests on: do_bench times a call max(1, rep / its time) times, once for a
# call that takes longer than ``rep``, so the repetition time is raised to fit this many.
MIN_TIMED_RUNS = 10

CSV_FIELDS = (
    "part", "case", "provider", "precision", "N", "K", "D", "time_ms", "runs", "time_min_ms", "time_max_ms",
    "tflops", "gbps", "peak_mem_mb", "status", "check", "check_error", "note", "gpu", "driver", "cuda", "torch",
    "triton", "vqfast", "vector_quantize_pytorch", "commit", "gpu_memory", "python", "date", "mode", "autotune",
    "fp32_search",
)
# The run's environment and settings, repeated on every row (read back from the first).
_ENV_FIELDS = ("gpu", "driver", "cuda", "torch", "triton", "vqfast", "vector_quantize_pytorch", "commit", "gpu_memory",
               "python", "date", "mode", "autotune", "fp32_search")
# How this version searches fp32 inputs under "highest", recorded with each run: results files without it
# come from versions that searched them with fp32 products for every code.
FP32_SEARCH = "tf32 pass, near ties re-checked with fp32-accurate products"


# --------------------------------------------------------------------------------------------------
# Pure helpers (tested on CPU)
# --------------------------------------------------------------------------------------------------


def tflops(n: int, k: int, d: int, time_ms: float) -> float:
    """Achieved TFLOP/s of a nearest-code search: 2·N·K·D floating-point operations in ``time_ms``."""
    if time_ms <= 0:
        raise ValueError(f"time_ms must be positive, got {time_ms}")
    return 2.0 * n * k * d / (time_ms * 1e-3) / 1e12


def gbps(num_bytes: float, time_ms: float) -> float:
    """Achieved GB/s (10^9 bytes per second) for ``num_bytes`` moved in ``time_ms``."""
    if time_ms <= 0:
        raise ValueError(f"time_ms must be positive, got {time_ms}")
    return num_bytes / (time_ms * 1e-3) / 1e9


def element_size(precision: str) -> int:
    return torch.empty((), dtype=PRECISIONS[precision][0]).element_size()


def nearest_bytes(n: int, k: int, d: int, elt: int) -> int:
    """Least traffic of a search: read z (N·D) and the codebook (K·D) once, write N int64 indices."""
    return (n * d + k * d) * elt + 8 * n


def bare_product_bytes(n: int, k: int, d: int, elt: int) -> int:
    """Least traffic of ``z @ c.T``: read z (N·D) and the codebook (K·D) once, write the N×K product."""
    return (n * d + k * d + n * k) * elt


def search_bytes(provider: str, n: int, k: int, d: int, elt: int) -> int:
    """The byte count behind a nearest-code row's GB/s: the bare product writes its N×K output, every
    search form the N indices."""
    return bare_product_bytes(n, k, d, elt) if provider == "z@c.T (cuBLAS)" else nearest_bytes(n, k, d, elt)


def tolerance(precision: str) -> float:
    """Bound of the precision rule (README, "Precision") for a vqfast search done at ``precision``: the fp32 one
    everywhere. tf32: vqfast settles near ties in fp32 (the direct form, or a re-search with fp32 or
    tf32x3 products) and so claims the fp32 indices; bf16 and fp16: their products are exact in fp32, so
    over the 16-bit values themselves the search is an fp32 search."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    return 1e-5


def timed_rep_ms(rep_ms: float, estimate_ms: float | None, runs: int = MIN_TIMED_RUNS) -> float:
    """The repetition time to hand ``do_bench`` so that a call of about ``estimate_ms`` is timed at least
    ``runs`` times: ``rep_ms``, raised to ``runs`` calls and a quarter more (do_bench's own estimate also
    counts its L2 flush, and divides rounding down)."""
    if estimate_ms is None or not math.isfinite(estimate_ms) or estimate_ms <= 0:
        return rep_ms
    return max(rep_ms, 1.25 * runs * estimate_ms)


def timing_cost_s(estimate_ms: float, warmup_ms: float, rep_ms: float, mode: str = "do_bench") -> float:
    """Seconds that timing a call of ``estimate_ms`` takes (``mode``: "do_bench", "graph" or "wall"), for
    the budget to skip a point that would not fit: do_bench's 5 calls of its own estimate, its warm-up
    and at least MIN_TIMED_RUNS timed calls; do_bench_cudagraph's 6 eager calls and 10 replays of
    ``rep_ms / 5`` (at least one call each); the wall clock's 5 rounds of at least 2 calls."""
    est = max(estimate_ms, 0.0)
    if mode == "graph":
        ms = 6 * est + 10 * max(est, rep_ms / 5)
    elif mode == "wall":
        ms = est + 5 * max(2 * est, min(2000 * est, rep_ms / 5))
    elif mode == "do_bench":
        ms = 5 * est + max(est, warmup_ms) + timed_rep_ms(rep_ms, est)
    else:
        raise ValueError(f"unknown timing mode {mode!r}")
    return ms / 1e3


def tma_unavailable(capability: tuple[int, int]) -> str | None:
    """Why the opt-in TMA search cannot run on a GPU of compute ``capability`` (its status there), or None
    where it can (compute capability 9.x)."""
    return None if capability[0] == 9 else TMA_NOT_HERE


@torch.no_grad()
def _out_of_range(indices: torch.Tensor, k: int) -> int:
    """How many of ``indices`` fall outside [0, k) (what a search that left rows unwritten returns)."""
    return int(((indices < 0) | (indices >= k)).sum())


def chosen_distance_error(
    z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, rows: int = 256, code_chunk: int = 65536
) -> float:
    """Largest (d_chosen − d_min) / (‖z‖² + d_min) over an evenly spaced subsample of rows, in float64.

    ``z`` (N, D), ``codebook`` (K, D) and ``indices`` (N,) as returned by a search; d_min is the exact
    minimum over all codes, so a wrong pick shows as a positive error whatever the search's precision.
    """
    n = z.shape[0]
    if n == 0:
        return 0.0
    if _out_of_range(indices, codebook.shape[0]):
        # A wrong answer, and index_select on a GPU would assert on it and end the CUDA context.
        return math.inf
    sel = torch.linspace(0, n - 1, steps=min(rows, n), device=z.device).round().long()
    zs = z.index_select(0, sel).double()
    z_sq = zs.pow(2).sum(1)
    d_min = torch.full_like(z_sq, math.inf)
    for start in range(0, codebook.shape[0], code_chunk):
        c = codebook[start:start + code_chunk].double()
        # Expanded form in float64: its cancellation error (~1e-16 relative) is far below the rule.
        d = (z_sq[:, None] - 2.0 * zs @ c.t() + c.pow(2).sum(1)[None, :]).clamp_min(0.0)
        d_min = torch.minimum(d_min, d.min(1).values)
    chosen = codebook.index_select(0, indices.reshape(-1).index_select(0, sel).long()).double()
    d_chosen = (zs - chosen).pow(2).sum(1)
    err = (d_chosen - d_min) / (z_sq + d_min).clamp_min(1e-300)
    return float(err.max())


# Largest problem (2·N·K·D) whose indices are compared on every row with those of a plain fp32 search
# (every precision: fp32 data searched with the tf32 pass, and 16-bit data, whose products are exact in
# fp32). 2^41 is the size of goals 1 and 2.
EXACT_CHECK_MAX_FLOP = 2.0**41
# A pick counts as wrong when its code is farther than the fp32 search's by more than this, relative
# to ||z||^2 + d: far above fp32's rounding of the scores (~1e-8 for randn data at D = 64 to 256) and
# below what tf32 rounding alone makes of a near tie (up to ~1e-4), which the distance check's 1e-5
# tolerance can let through.
EXACT_CHECK_SLACK = 1e-6
# Elements of the N x K score block that the fp32 reference search holds at once (512 MiB in fp32).
REFERENCE_BLOCK = 1 << 27


@torch.no_grad()
def fp32_reference_indices(z: torch.Tensor, codebook: torch.Tensor, block: int = REFERENCE_BLOCK) -> torch.Tensor:
    """The nearest code of each row of ``z`` by plain torch, independent of vqfast's kernels:
    argmin of ``‖c‖² − 2·z·cᵀ`` in fp32 with fp32 products (matmul precision "highest", so no tf32),
    over row blocks of at most ``block`` scores. 16-bit inputs are cast to fp32 first, which their
    products are exact in."""
    zf, cf = z.float(), codebook.float()
    n, k = zf.shape[0], cf.shape[0]
    out = torch.empty(n, dtype=torch.long, device=zf.device)
    if n == 0 or k == 0:
        return out
    c_sq = cf.pow(2).sum(1)
    rows = max(1, block // k)
    with matmul_precision("highest"):
        for start in range(0, n, rows):
            scores = torch.addmm(c_sq[None, :], zf[start:start + rows], cf.t(), beta=1.0, alpha=-2.0)
            out[start:start + rows] = scores.argmin(1)
    return out


@dataclass
class Agreement:
    """How the indices of a search compare with those of the plain fp32 search on every row."""

    rows: int
    differ: int
    wrong: int
    worst: float  # largest relative excess distance among the rows that differ (0 if none)
    outside: int = 0  # indices outside [0, K): all counted wrong, and no distance is computed

    # How the note starts: the goals table finds it among a record's notes by this.
    NOTE_START = "indices on all"

    def note(self) -> str:
        text = f"{self.NOTE_START} {self.rows:,} rows vs fp32 products: {self.differ:,} differ"
        if self.outside:
            text += f", {self.outside:,} outside [0, K)"
        elif self.differ:
            text += (f", {self.wrong:,} farther by more than {EXACT_CHECK_SLACK:.0e} relative "
                     f"(largest excess {self.worst:.1e})")
        return text


@torch.no_grad()
def agreement_with_fp32(z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> Agreement:
    """Compare ``indices`` (a search of ``z`` in ``codebook``: fp32 data, or 16-bit data taken at its own
    values) with those of a plain fp32 search on every row (:func:`fp32_reference_indices`, torch's
    matmul with fp32 products, which shares no code with vqfast's kernels); rows that differ are settled
    in float64: the pick is wrong when its code is farther than the fp32 search's by more than
    ``EXACT_CHECK_SLACK`` (relative to ||z||^2 + d)."""
    if z.is_cuda:
        with torch.cuda.device(z.device):
            plain = fp32_reference_indices(z, codebook)
    else:
        plain = fp32_reference_indices(z, codebook)
    indices = indices.reshape(-1)
    rows = (indices != plain).nonzero().reshape(-1)
    if rows.numel() == 0:
        return Agreement(indices.numel(), 0, 0, 0.0)
    outside = _out_of_range(indices, codebook.shape[0])
    if outside:
        return Agreement(indices.numel(), int(rows.numel()), outside, math.inf, outside)
    zs = z.index_select(0, rows).double()
    mine = (zs - codebook.index_select(0, indices.index_select(0, rows)).double()).pow(2).sum(1)
    theirs = (zs - codebook.index_select(0, plain.index_select(0, rows)).double()).pow(2).sum(1)
    excess = (mine - theirs) / (zs.pow(2).sum(1) + theirs).clamp_min(1e-300)
    return Agreement(indices.numel(), int(rows.numel()), int((excess > EXACT_CHECK_SLACK).sum()),
                     max(0.0, float(excess.max())))


def format_ms(ms: float | None) -> str:
    """Milliseconds with three significant digits, no exponent."""
    if ms is None or not math.isfinite(ms):
        return "–"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def format_markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table; ``|`` in cells is escaped, numbers right-aligned."""

    def cell(v: object) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    def numeric(v: object) -> bool:
        return isinstance(v, (int, float)) or bool(re.fullmatch(r"[-+]?[\d,.]+[x%]?", str(v)))

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |"]
    aligns = []
    for j in range(len(headers)):
        col = [r[j] for r in rows if j < len(r) and str(r[j]) != ""]
        aligns.append("---:" if col and all(numeric(v) for v in col) else "---")
    lines.append("| " + " | ".join(aligns) + " |")
    for r in rows:
        if len(r) != len(headers):
            raise ValueError(f"row has {len(r)} cells for {len(headers)} headers: {r!r}")
        lines.append("| " + " | ".join(cell(v) for v in r) + " |")
    return "\n".join(lines) + "\n"


def gpu_slug(name: str | None = None) -> str:
    """File-system friendly name of a GPU ("NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3")."""
    if name is None:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown-device"


# --------------------------------------------------------------------------------------------------
# Records, CSV, Markdown
# --------------------------------------------------------------------------------------------------


@dataclass
class Record:
    """One measurement (or the reason there is none: ``status`` "OOM", "OOM (est. X GB)", "error: ...")."""

    part: str
    case: str
    provider: str
    precision: str
    n: int = 0
    k: int = 0
    d: int = 0
    time_ms: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    peak_mem_mb: float | None = None
    status: str = "ok"
    check: str = ""
    check_error: float | None = None
    note: str = ""
    # The timed runs ``time_ms`` is the median of (None: not known), and the fastest and slowest of them.
    runs: int | None = None
    time_min_ms: float | None = None
    time_max_ms: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.time_ms is not None

    def take(self, m: "Measurement") -> "Record":
        """This record with the status, times and peak memory of ``m``."""
        self.status, self.time_ms, self.peak_mem_mb = m.status, m.time_ms, m.peak_mem_mb
        self.runs, self.time_min_ms, self.time_max_ms = m.runs, m.time_min_ms, m.time_max_ms
        return self

    def cell(self) -> str:
        """What a table shows for this measurement: its time in ms, or why there is none."""
        return format_ms(self.time_ms) if self.ok else self.status


def _fmt_number(v: float | None) -> str:
    return "" if v is None else f"{v:.6g}"


def write_csv(path: Path, records: Sequence[Record], env: dict[str, str]) -> None:
    """All records, one row each, with the environment (GPU, driver, versions) on every row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in records:
            w.writerow({
                "part": r.part, "case": r.case, "provider": r.provider, "precision": r.precision,
                "N": r.n, "K": r.k, "D": r.d, "time_ms": _fmt_number(r.time_ms),
                "runs": "" if r.runs is None else str(r.runs), "time_min_ms": _fmt_number(r.time_min_ms),
                "time_max_ms": _fmt_number(r.time_max_ms), "tflops": _fmt_number(r.tflops),
                "gbps": _fmt_number(r.gbps), "peak_mem_mb": _fmt_number(r.peak_mem_mb), "status": r.status,
                "check": r.check, "check_error": _fmt_number(r.check_error), "note": r.note,
                **{key: env.get(key, "") for key in _ENV_FIELDS},
            })


def read_csv(path: Path) -> tuple[list[Record], dict[str, str]]:
    """The records and environment :func:`write_csv` wrote (the environment of the first row)."""
    def number(text: str | None) -> float | None:
        return float(text) if text else None

    records: list[Record] = []
    env: dict[str, str] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if not env:
                # (Files written before the settings were columns lack them: left out, not shown empty.)
                env = {key: row[key] for key in _ENV_FIELDS if row.get(key)}
            records.append(Record(
                row["part"], row["case"], row["provider"], row["precision"], int(row["N"] or 0),
                int(row["K"] or 0), int(row["D"] or 0), number(row["time_ms"]), number(row["tflops"]),
                number(row["gbps"]), number(row["peak_mem_mb"]), row["status"], row["check"],
                number(row["check_error"]), row["note"],
                # (Files written before the timed runs were columns lack them.)
                int(row["runs"]) if row.get("runs") else None, number(row.get("time_min_ms")),
                number(row.get("time_max_ms"))))
    return records, env


def _ordered(values: Sequence[str], preferred: Sequence[str]) -> list[str]:
    seen = list(dict.fromkeys(values))
    return [p for p in preferred if p in seen] + [p for p in seen if p not in preferred]


def _row_key(r: Record) -> tuple:
    return (r.case, r.precision, r.n, r.k, r.d)


def pivot(records: Sequence[Record], providers: Sequence[str], key_headers: Sequence[str],
          key_cells: Callable[[Record], list[object]], with_memory: bool = False,
          extra: Sequence[tuple[str, Callable[[dict[str, Record]], object]]] = ()) -> str:
    """Markdown table with one row per case and one column per provider (time in ms, or the status)."""
    groups: dict[tuple, dict[str, Record]] = {}
    for r in records:
        groups.setdefault(_row_key(r), {})[r.provider] = r
    cols = _ordered([r.provider for r in records], providers)
    headers = list(key_headers) + [f"{p} (ms{', MiB' if with_memory else ''})" for p in cols] + [h for h, _ in extra]
    rows = []
    for by_provider in groups.values():
        first = next(iter(by_provider.values()))
        row: list[object] = list(key_cells(first))
        for p in cols:
            r = by_provider.get(p)
            if r is None:
                row.append("")
            elif with_memory and r.ok and r.peak_mem_mb is not None:
                row.append(f"{r.cell()}, {r.peak_mem_mb:.0f} MiB")
            else:
                row.append(r.cell())
        row.extend(fn(by_provider) for _, fn in extra)
        rows.append(row)
    return format_markdown_table(headers, rows)


def _check_cell(by_provider: dict[str, Record]) -> str:
    r = by_provider.get("vqfast")
    if r is None or not r.check:
        return ""
    return r.check if r.check_error is None else f"{r.check} ({r.check_error:.1e})"


def _tflops_cell(by_provider: dict[str, Record]) -> str:
    r = by_provider.get("vqfast")
    return f"{r.tflops:.1f}" if r is not None and r.tflops is not None else ""


def _gbps_cell(by_provider: dict[str, Record]) -> str:
    r = by_provider.get("vqfast")
    return f"{r.gbps:.0f}" if r is not None and r.gbps is not None else ""


def _images_per_s(provider: str) -> Callable[[dict[str, Record]], str]:
    def cell(by_provider: dict[str, Record]) -> str:
        r = by_provider.get(provider)
        if r is None or not r.ok or not r.case.isdigit():
            return ""
        return f"{int(r.case) / (r.time_ms * 1e-3):,.0f}"
    return cell


def _ratio(num: Record | None, den: Record | None) -> str:
    if num is None or den is None or not (num.ok and den.ok):
        return ""
    return f"{num.time_ms / den.time_ms:.2f}x"


def headline_table(records: Sequence[Record]) -> str:
    """vqfast next to cdist+argmin, the matmul form and the bare cuBLAS product, per (N, K, D, precision)."""
    groups: dict[tuple, dict[str, Record]] = {}
    for r in records:
        if r.part == "headline" and r.case != CRASHED:  # (a part's error is no point of the table)
            groups.setdefault((r.n, r.k, r.d, r.precision), {})[r.provider] = r
    # The back-to-back column where the run has one (it is measured at small problems only).
    wall = [WALL_PROVIDER] if any(r.part == "headline" and r.provider == WALL_PROVIDER for r in records) else []
    # The opt-in TMA search, where the run measured it (at a few shapes, see TMA_POINTS).
    tma = [TMA_PROVIDER] if any(r.part == "headline" and r.provider == TMA_PROVIDER for r in records) else []
    headers = ["N", "K", "D", "precision", "vqfast (ms)", *(["vqfast, back to back (ms)"] if wall else []),
               "vqfast, CUDA graph (ms)", "cdist+argmin (ms)",
               "‖c‖²−2z·cᵀ+argmin (ms)", "z @ c.T alone (ms)", "speed-up vs cdist", "vqfast / z@c.T",
               "vqfast TFLOP/s", "check", *(["VQFAST_TMA_SEARCH=1 (ms, TFLOP/s, check)"] if tma else [])]
    rows = []
    # By problem size, then precision: the run measures goal points first, the table reads small to large.
    order = list(PRECISIONS)
    for (n, k, d, prec), g in sorted(groups.items(), key=lambda item: (
            item[0][0] * item[0][1] * item[0][2], item[0][:3], order.index(item[0][3]) if item[0][3] in order else 99)):
        fused = g.get("vqfast")
        rows.append([
            f"{n:,}", f"{k:,}", f"{d:,}", prec,
            *(g[p].cell() if p in g else "" for p in ("vqfast", *wall, GRAPH_PROVIDER, "cdist+argmin",
                                                      "matmul+argmin", "z@c.T (cuBLAS)")),
            _ratio(g.get("cdist+argmin"), fused), _ratio(fused, g.get("z@c.T (cuBLAS)")),
            _tflops_cell(g), _check_cell(g), *([_tma_cell(g.get(TMA_PROVIDER))] if tma else []),
        ])
    return format_markdown_table(headers, rows)


def _tma_cell(r: Record | None) -> str:
    if r is None:
        return ""
    if not r.ok:
        return r.cell()
    return f"{r.cell()}, {r.tflops:.1f}, {r.check or '?'}"


# Shapes the speed goals are judged at (see goals_table).
GOAL_LARGE = (65536, 65536, 256)
GOAL_SMALL = (1024, 4096, 128)
GOAL_FEW_ROWS = (1024, 262144, 64)
GOAL_LAYER = (128, 256, 16, 16, 65536)  # (B, C, H, W, K)
ARTICLE_LAYER = (64, 128, 4, 4, 4096)
SMALL_TARGET_MS = 0.025


def _layer_case(b: int, c: int, h: int, w: int) -> str:
    """The ``case`` of a layer record: its input shape (B, C, H, W)."""
    return f"({b}, {c}, {h}, {w})"


def _find(records: Sequence[Record], part: str, provider: str, shape: tuple[int, int, int] | None = None,
          precision: str | None = None, case: str | None = None, k: int | None = None) -> Record | None:
    for r in records:
        if (r.part == part and r.provider == provider and (shape is None or (r.n, r.k, r.d) == shape)
                and (precision is None or r.precision == precision) and (case is None or r.case == case)
                and (k is None or r.k == k)):
            return r
    return None


def _ceiling(records: Sequence[Record], precision: str | None = None, copy: bool = False) -> float | None:
    for r in records:
        if r.part == "ceiling" and r.ok:
            if copy and r.case.startswith("device copy"):
                return r.gbps
            if not copy and r.precision == precision and r.case.startswith("matmul"):
                return r.tflops
    return None


def _shortfall(value: float, target: float, higher_is_better: bool = True) -> str:
    """'met', or how far ``value`` is from ``target`` in percent of the target."""
    if (value >= target) if higher_is_better else (value <= target):
        return "met"
    if not math.isfinite(value):
        return f"missed ({value})"
    gap = abs(value - target) / target
    # (A near miss is still one: "0%" would read as met.)
    return f"missed by {gap:.0%}" if gap >= 0.01 else f"missed by {gap:.1%}" if gap >= 0.001 else "missed by < 0.1%"


def _absent(rec: Record | None) -> str:
    """The verdict of a goal whose measurement is missing (not run, skipped) or failed."""
    if rec is None:
        return "not measured"
    if rec.ok:
        return "not measured (the record lacks the figure the goal needs)"
    if rec.status.startswith("skipped"):
        return f"not measured ({rec.status})"
    return f"not met ({rec.status})"


def crash_sentence(rec: Record) -> str:
    """What a part's error record (case ``CRASHED``) says, for the reports."""
    if rec.provider == TMA_PROVIDER:
        return (f"The opt-in VQFAST_TMA_SEARCH=1 step stopped on an error ({rec.status}): the TMA points it had "
                "not reached are missing; the default search's rows are complete")
    if rec.part == "headline" and rec.provider == "-" and not rec.status.startswith("skipped"):
        # Runs from before the TMA step had its own mark recorded its error under the headline too.
        return (f"The headline part, or its opt-in VQFAST_TMA_SEARCH=1 step (recorded under it), stopped on an "
                f"error ({rec.status}): the points it had not reached are missing")
    return f"The {rec.part} part stopped on an error ({rec.status}): the points it had not reached are missing"


def _check_verdicts(rec: Record | None, what: str = "") -> list[str]:
    """No verdict (met) where ``rec``'s correctness check passed; otherwise what it says: a fast wrong
    answer meets no goal."""
    if rec is not None and rec.check == "pass":
        return []
    label = f"{what} " if what else ""
    return [f"{label}check {rec.check if rec is not None and rec.check else 'missing'}"]


def _combine(verdicts: Sequence[str]) -> str:
    misses = [v for v in verdicts if v != "met"]
    return "met" if not misses else "; ".join(misses)


def _tma_note(records: Sequence[Record], shape: tuple[int, int, int], peak: float | None = None,
              precision: str = "bf16") -> str:
    """The opt-in TMA search at a goal's shape, where measured: the verdicts judge the default search."""
    r = _find(records, "headline", TMA_PROVIDER, shape, precision)
    if r is None:
        return ""
    if not r.ok or not r.tflops:
        return f"; VQFAST_TMA_SEARCH=1: {r.status}"
    share = f" = {r.tflops / peak:.0%}" if peak else ""
    agreement = next((part for part in r.note.split("; ") if part.startswith(Agreement.NOTE_START)), "")
    return (f"; VQFAST_TMA_SEARCH=1: {r.time_ms:.2f} ms, {r.tflops:.0f} TFLOP/s{share}, check {r.check or '?'}"
            + (f" ({agreement})" if agreement else ""))


def goals_table(records: Sequence[Record]) -> str:
    """The speed goals, each with what this run measured and whether (or by how much) it falls short.

    Targets are the project's H100 goals; ceilings (peak TFLOP/s, copy bandwidth) come from this run,
    so on another GPU the ratio columns still say how close to that GPU's limits vqfast runs."""
    rows: list[list[str]] = []
    missing = "not measured in this run"

    # 1. bf16 search at the large shape: faster than cuBLAS's bare product, >= 550 TFLOP/s (aim 650).
    fused = _find(records, "headline", "vqfast", GOAL_LARGE, "bf16")
    bare = _find(records, "headline", "z@c.T (cuBLAS)", GOAL_LARGE, "bf16")
    if fused is not None and fused.ok and fused.tflops:
        verdicts = [_shortfall(fused.tflops, 550.0), *_check_verdicts(fused)]
        got = f"{fused.time_ms:.2f} ms, {fused.tflops:.0f} TFLOP/s, check {fused.check or '?'}"
        if bare is not None and bare.ok:
            got += f"; z@c.T {bare.time_ms:.2f} ms"
            if fused.time_ms >= bare.time_ms:
                verdicts.append(f"{fused.time_ms / bare.time_ms:.2f}x the bare product's time")
        else:
            verdicts.append("z@c.T not measured")
        got += _tma_note(records, GOAL_LARGE)
        rows.append(["1. bf16 search at 65,536 x 65,536 x 256", got,
                     "< z@c.T time, >= 550 TFLOP/s (aim 650)", _combine(verdicts)])
    else:
        rows.append(["1. bf16 search at 65,536 x 65,536 x 256",
                     (fused.status if fused else missing) + _tma_note(records, GOAL_LARGE),
                     "< z@c.T time, >= 550 TFLOP/s (aim 650)", _absent(fused)])

    # 2. fp32 data, tf32 products with the exact re-check: >= 300 TFLOP/s, >= 10x cdist + argmin (fp32).
    tf32 = _find(records, "headline", "vqfast", GOAL_LARGE, "tf32")
    cdist = _find(records, "headline", "cdist+argmin", GOAL_LARGE, "fp32")
    target = ">= 300 TFLOP/s, >= 10x faster than fp32 cdist+argmin, exact fp32 indices"
    if tf32 is not None and tf32.ok and tf32.tflops:
        verdicts = [_shortfall(tf32.tflops, 300.0)]
        got = f"{tf32.time_ms:.2f} ms, {tf32.tflops:.0f} TFLOP/s, check {tf32.check or '?'}"
        if cdist is not None and cdist.ok:
            speedup = cdist.time_ms / tf32.time_ms
            got += f"; {speedup:.1f}x cdist+argmin"
            verdicts.append("met" if speedup >= 10 else f"{speedup:.1f}x, not 10x, faster than cdist+argmin")
        else:
            verdicts.append(f"cdist+argmin: {cdist.status if cdist else missing}")
        agreement = next((part for part in tf32.note.split("; ") if part.startswith(Agreement.NOTE_START)), "")
        if agreement:
            got += f"; {agreement}"
        else:
            verdicts.append("indices not compared with the fp32 search's on every row")
        if tf32.check != "pass":
            verdicts.append(f"check {tf32.check or 'missing'} (distances, or indices farther than fp32's)")
        got += _tma_note(records, GOAL_LARGE, precision="tf32")
        rows.append(["2. tf32 search (exact indices) at 65,536 x 65,536 x 256", got, target, _combine(verdicts)])
    else:
        rows.append(["2. tf32 search (exact indices) at 65,536 x 65,536 x 256",
                     (tf32.status if tf32 else missing) + _tma_note(records, GOAL_LARGE, precision="tf32"),
                     target, _absent(tf32)])

    # 3a. latency of a small search in every dtype: eager calls back to back by the wall clock, which
    # counts host time (do_bench's figure and the CUDA-graph replay beside it).
    small, problems = [], []
    worst = None
    if any(x.provider == WALL_PROVIDER for x in records):
        judged, labels = WALL_PROVIDER, (("do_bench", "vqfast"), ("graph", GRAPH_PROVIDER))
    else:
        # Results from before the back-to-back timing: do_bench's figure, which may hide host time.
        judged, labels = "vqfast", (("graph", GRAPH_PROVIDER),)
    for prec in PRECISIONS:
        r = _find(records, "headline", judged, GOAL_SMALL, prec)
        if r is None or not r.ok:
            problems.append(f"{prec}: {_absent(r)}")
            continue
        timed = [(label, x) for label, x in ((label, _find(records, "headline", name, GOAL_SMALL, prec))
                                             for label, name in labels)
                 if x is not None and x.ok]
        beside = ", ".join(f"{label} {x.time_ms * 1000:.0f}" for label, x in timed)
        small.append(f"{prec} {r.time_ms * 1000:.0f} µs" + (f" ({beside})" if beside else ""))
        worst = r.time_ms if worst is None else max(worst, r.time_ms)
        # (The back-to-back timing has no check of its own: the do_bench row's searched the same problem.)
        problems += _check_verdicts(_find(records, "headline", "vqfast", GOAL_SMALL, prec), prec)
    if judged == "vqfast" and worst is not None:
        problems.insert(0, "judged on do_bench's time (no back-to-back timing in these results)")
    if worst is None:
        verdict = "not measured" if all("not measured" in p for p in problems) else "; ".join(problems)
    else:
        # Every dtype must be measured and fast enough: a missing one leaves the goal open.
        verdict = _combine([_shortfall(worst, SMALL_TARGET_MS, higher_is_better=False), *problems])
    rows.append(["3a. small search 1,024 x 4,096 x 128, any dtype", ", ".join(small) or missing, "<= 25 µs",
                 verdict])

    # 3b. few rows, huge codebook (split across programs): >= 50 % of this run's bf16 peak.
    few = _find(records, "headline", "vqfast", GOAL_FEW_ROWS, "bf16")
    peak = _ceiling(records, "bf16")
    if few is not None and few.ok and few.tflops and peak:
        rows.append(["3b. bf16 search 1,024 x 262,144 x 64", f"{few.tflops:.0f} TFLOP/s = "
                     f"{few.tflops / peak:.0%} of the measured {peak:.0f}, check {few.check or '?'}"
                     + _tma_note(records, GOAL_FEW_ROWS, peak),
                     ">= 50 % of the bf16 peak", _combine([_shortfall(few.tflops / peak, 0.5), *_check_verdicts(few)])])
    else:
        rows.append(["3b. bf16 search 1,024 x 262,144 x 64", few.status if few else missing,
                     ">= 50 % of the bf16 peak", _absent(few) if few is None or not few.ok else "not measured (no bf16 ceiling)"])

    # 4. layer forward + backward against vector-quantize-pytorch.
    for shape, speed in ((GOAL_LAYER, 10.0), (ARTICLE_LAYER, 3.0)):
        case, k = _layer_case(*shape[:4]), shape[4]
        label = f"4. layer fwd+bwd {case}, K {k:,}"
        ours = _find(records, "layer", "vqfast", case=case, k=k)
        theirs = _find(records, "layer", "vector-quantize-pytorch", case=case, k=k)
        target = f">= {speed:g}x faster than vector-quantize-pytorch" + (", <= 2 % of its extra memory"
                                                                        if speed == 10.0 else "")
        if ours is None or not ours.ok or theirs is None or not theirs.ok:
            why = "vqfast: " + (ours.status if ours else missing) + "; vector-quantize-pytorch: " + (
                theirs.status if theirs else "not installed or not measured")
            verdict = _absent(ours) if ours is None or not ours.ok else (
                "not measured (no vector-quantize-pytorch)" if theirs is None
                else f"not measured (vector-quantize-pytorch: {theirs.status})")
            rows.append([label, why, target, verdict])
            continue
        ratio = theirs.time_ms / ours.time_ms
        got = f"{ours.time_ms:.2f} ms vs {theirs.time_ms:.2f} ms ({ratio:.1f}x)"
        graphed = _find(records, "layer", GRAPH_PROVIDER, case=case, k=k)
        if graphed is not None and graphed.ok:
            got += f"; in a CUDA graph {graphed.time_ms:.2f} ms ({theirs.time_ms / graphed.time_ms:.1f}x)"
        verdicts = [_shortfall(ratio, speed)]
        if speed == 10.0 and ours.peak_mem_mb is not None and theirs.peak_mem_mb:
            share = ours.peak_mem_mb / theirs.peak_mem_mb
            got += f", memory {ours.peak_mem_mb:.0f} vs {theirs.peak_mem_mb:.0f} MiB ({share:.1%})"
            verdicts.append(_shortfall(share, 0.02, higher_is_better=False).replace("missed", "memory missed"))
        elif speed == 10.0:
            verdicts.append("memory not measured")
        got += f"; {THEIR_SEARCH_NOTE}"
        verdict, checks = _combine(verdicts), _check_verdicts(ours)
        if checks:
            # (What the timing met still said: only the layer's output was not shown right.)
            verdict = "; ".join(checks) + (f" ({'speed and memory' if speed == 10.0 else 'speed'} met)"
                                           if verdict == "met" else f"; {verdict}")
        rows.append([label, got, target, verdict])

    # 5. memory-bound kernels at N >= 10^6: >= 70 % of this run's copy bandwidth.
    copy = _ceiling(records, copy=True)
    for part, label in (("gather", "5. gather / scatter-add, N >= 10⁶"), ("usage", "5. code usage, N >= 10⁶")):
        points = [r for r in records if r.part == part and r.provider == "vqfast" and r.n >= 1_000_000]
        measured = [r for r in points if r.ok and r.gbps]
        problems = [f"{r.case} {r.precision} N={r.n:,}: {_absent(r)}" for r in points if not (r.ok and r.gbps)]
        if part == "gather":
            # The goal names the scatter-add too: a point with only one of its rows is not measured.
            for n, k, d, prec in sorted({(r.n, r.k, r.d, r.precision) for r in points}):
                for case in ("fwd", "fwd+bwd"):
                    if not any(r.case == case and (r.n, r.k, r.d, r.precision) == (n, k, d, prec) for r in points):
                        problems.append(f"{case} {prec} N={n:,}: not measured")
        if not measured or not copy:
            if not points:
                verdict = "not measured"
            elif not measured:
                verdict = "; ".join(problems)
            else:
                verdict = "not measured (no copy ceiling)"
            rows.append([label, missing if not measured else "no copy ceiling", ">= 70 % of the copy bandwidth",
                         verdict])
            continue
        def point(r: Record) -> str:
            return f"{r.case} {r.precision} N={r.n:,} K={r.k:,}" + (f" D={r.d}" if r.d else "")

        got = ", ".join(f"{point(r)} {r.gbps:.0f} GB/s ({r.gbps / copy:.0%}), check {r.check or '?'}" for r in measured)
        rows.append([label, got, f">= 70 % of the measured {copy:.0f} GB/s",
                     _combine([_shortfall(r.gbps / copy, 0.7) for r in measured]
                              + [v for r in measured for v in _check_verdicts(r, point(r))] + problems)])
    return format_markdown_table(["goal", "measured", "target", "verdict"], rows)


# What each precision column means for each provider (the comparisons are not all like for like).
_OTHER_PRECISIONS_NOTE = ("in `tf32` rows (\"high\") every provider uses tf32 products and only vqfast re-checks near "
                          "ties; in `bf16`/`fp16` rows the torch forms round their N x K scores to 16 bits before the "
                          "argmin, where vqfast keeps fp32 scores.")
PRECISION_NOTE = ("Precisions: in `fp32` rows (float32 matmul precision \"highest\") vqfast searches with tf32 "
                  "tensor cores and re-checks near ties with fp32-accurate products (the exact fp32 indices), the "
                  "torch forms use plain fp32 products; " + _OTHER_PRECISIONS_NOTE)
_PLAIN_FP32_NOTE = ("Precisions: this run does not record `fp32_search`, so it comes from a version of vqfast that "
                    "searched `fp32` rows (float32 matmul precision \"highest\") with fp32 products for every code, "
                    "as the torch forms do; " + _OTHER_PRECISIONS_NOTE)


def precision_note(env: dict[str, str]) -> str:
    """What each precision column means for each provider in the run whose environment is ``env``."""
    return PRECISION_NOTE if env.get("fp32_search") else _PLAIN_FP32_NOTE


def render_markdown(records: Sequence[Record], env: dict[str, str]) -> str:
    """The whole report: environment, ceilings, headline, then one table per part."""
    out = ["# vqfast benchmark results", ""]
    stop = next((r for r in records if r.part == RUN_PART and r.case == CUT_SHORT), None)
    if stop is not None:
        out += [f"**This run was cut short: {stop.status}.** Points it did not reach are listed as "
                "`skipped (time budget)`.", ""]
    # A part that stopped on an error is said here, not as an empty point in its table.
    for r in records:
        if r.case == CRASHED:
            out += [f"**{crash_sentence(r)}**; the log has the traceback.", ""]
    records = [r for r in records if r.case != CRASHED]
    out.append(format_markdown_table(["setting", "value"], [[k, v] for k, v in env.items()]))
    out.append(f"Times are medians of `triton.testing.do_bench` in ms over at least {MIN_TIMED_RUNS} timed runs "
               "(CUDA-graph rows: of 10 replays of its CUDA-graph variant; back-to-back rows: wall-clock time per "
               "call, median of 5 rounds; the k-means row: one timed run); the CSV has the number of timed runs and "
               "the fastest and slowest. MiB is the peak memory allocated beyond the inputs during one eager call "
               "(CUDA-graph rows too: the graph's own memory pool is not measured), vqfast's kept scratch buffers "
               "included. A status instead of a time: `OOM` ran out of GPU memory, "
               "`OOM (est. X GB)` was skipped because its estimated memory exceeds 80% of the GPU's memory less "
               "what is already allocated, `skipped (time budget)` was not reached within the run's time budget (or its "
               f"timing would not have fitted in what was left), `{TMA_NOT_HERE}`: the opt-in TMA search does not "
               "run on this GPU. `check` compares vqfast's chosen distances with the "
               "float64 minimum (the precision rule of the README: 1e-5 in every precision, 16-bit data taken at "
               "its own values), with the largest relative error, and, up to 2·N·K·D = 2⁴¹, its indices on every "
               "row with a plain fp32 torch search (farther by more than 1e-6: `fail`); vqfast's layer rows check "
               "the indices of the layer's eval-mode forward the same way, and its z_q against its codes. "
               "A goal's \"missed by\" is in percent of its target. "
               + precision_note(env) + "\n")
    ceil = [r for r in records if r.part == "ceiling"]
    if ceil:
        out += ["## Ceilings measured in this run", ""]
        out.append(format_markdown_table(
            ["what", "precision", "time (ms)", "TFLOP/s", "GB/s", "status"],
            [[r.case, r.precision, r.cell(), f"{r.tflops:.0f}" if r.tflops else "",
              f"{r.gbps:.0f}" if r.gbps else "", r.status] for r in ceil]))
    if any(r.part == "headline" for r in records):
        out += ["## Headline: nearest-code search", ""]
        out.append(headline_table(records))
    if any(r.part in ("headline", "layer", "gather", "usage") for r in records):
        out += ["## Speed goals", "",
                "Each goal with what this run measured; a goal that is not met says by how much (in percent "
                "of the target). Peak TFLOP/s and copy bandwidth are this run's ceilings.", ""]
        out.append(goals_table(records))
    nearest = [r for r in records if r.part == "nearest"]
    if nearest:
        out += ["## Nearest-code search sweeps", ""]
        for sweep in dict.fromkeys(r.case for r in nearest):
            sub = [r for r in nearest if r.case == sweep]
            out += [f"### {sweep}", ""]
            out.append(pivot(sub, NEAREST_PROVIDERS, ["N", "K", "D", "precision"],
                             lambda r: [r.n, r.k, r.d, r.precision],
                             extra=[("vqfast TFLOP/s", _tflops_cell), ("check", _check_cell)]))
    sections = (
        ("gather", "Gather and scatter-add backward", ["op", "N", "K", "D", "precision"],
         lambda r: [r.case, r.n, r.k, r.d, r.precision], False, [("vqfast GB/s", _gbps_cell)]),
        ("usage", "Code usage (bincount + entropy)", ["N", "K"], lambda r: [r.n, r.k], False,
         [("vqfast GB/s", _gbps_cell)]),
        ("layer", "VectorQuantizer forward + backward", ["(B, C, H, W)", "K", "precision"],
         lambda r: [r.case, r.k, r.precision], True, []),
        ("train", "VQ-VAE training step (forward, backward, Adam)", ["batch", "K", "D"],
         lambda r: [r.case, r.k, r.d], True, [(f"{p} img/s", _images_per_s(p)) for p in TRAIN_PROVIDERS]),
    )
    for part, title, key_headers, key_cells, with_mem, extra in sections:
        sub = [r for r in records if r.part == part]
        if sub:
            out += [f"## {title}", ""]
            providers = {"layer": LAYER_PROVIDERS, "train": TRAIN_PROVIDERS}.get(part, ("vqfast", "torch"))
            out.append(pivot(sub, providers, key_headers, key_cells, with_memory=with_mem, extra=extra))
            notes = sorted({f"{r.provider}: {r.note}" for r in sub if r.note})
            if notes:
                out.append("\n".join(f"- {n}" for n in notes) + "\n")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# The searches being compared (plain PyTorch, the forms people write)
# --------------------------------------------------------------------------------------------------


def search_cdist(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``torch.cdist(z, c).argmin(1)``."""
    return torch.cdist(z, codebook).argmin(1)


def bare_product(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``z @ c.T`` alone: the floor for any method that writes the N×K matrix."""
    return z @ codebook.t()


def _torch_code_usage(indices: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    counts = torch.bincount(indices, minlength=num_codes)
    p = counts.float() / counts.sum().clamp_min(1)
    entropy = -torch.special.xlogy(p, p).sum()
    return counts, entropy, entropy.exp()


class _NoQuantizer(nn.Module):
    """Passes latents through: the cost of the model without any VQ step."""

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return z, z.new_zeros(()), z.new_zeros((), dtype=torch.int64)


def build_vqvae(variant: str, num_codes: int, code_dim: int, beta: float = 1.0) -> tuple[nn.Module, str]:
    """The VQ-VAE with its VQ step swapped for ``variant`` ("vqfast", "article (fixed)", "no VQ").

    The model is ``vqfast.models.autoencoders.ConvVQVAE`` with its ``quantizer`` replaced. Returns
    ``(model, where it came from)``.
    """
    from vqfast import VectorQuantizer

    if variant == "vqfast":
        quantizer: nn.Module = VectorQuantizer(num_codes, code_dim, beta=beta)
    elif variant == "article (fixed)":
        quantizer = ArticleVQ(num_codes, code_dim, beta=beta, search="broadcast")
    elif variant == "no VQ":
        quantizer = _NoQuantizer()
    else:
        raise ValueError(f"unknown VQ variant {variant!r}")
    from vqfast.models.autoencoders import ConvVQVAE

    model = ConvVQVAE(num_codes, code_dim, beta=beta)
    model.quantizer = quantizer
    return model, "vqfast.models ConvVQVAE"


@functools.lru_cache(maxsize=None)
def _vq_pytorch_class(name: str = "VectorQuantize") -> type | None:
    try:
        import vector_quantize_pytorch
    except Exception:  # noqa: BLE001 - optional dependency, absent or broken
        return None
    return getattr(vector_quantize_pytorch, name, None)


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    status: str = "ok"
    time_ms: float | None = None
    peak_mem_mb: float | None = None
    runs: int | None = None  # the timed runs behind time_ms
    time_min_ms: float | None = None
    time_max_ms: float | None = None


@dataclass
class Timing:
    """A median over timed runs, how many there were (None: not known) and the fastest and slowest."""

    median_ms: float
    runs: int | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    samples: tuple[float, ...] = ()

    @classmethod
    def of(cls, samples: Sequence[float], runs: int | None = None) -> "Timing":
        """The median of ``samples`` (one time each; ``runs``: the calls behind them, if not one each)."""
        if not samples:
            raise ValueError("no timed runs")
        values = tuple(float(v) for v in samples)
        return cls(statistics.median(values), len(values) if runs is None else runs, min(values), max(values),
                   values)


def _error_status(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if "out of memory" in text.lower():
        return "OOM"
    return f"error: {type(exc).__name__}: {text[:160]}"


def _bench_samples(bench: Callable[..., Any], fn: Callable[[], Any], **kwargs: Any) -> Timing:
    """``bench(fn, ..., return_mode="all")`` (a function of ``triton.testing``) as a :class:`Timing`; with a
    Triton whose ``bench`` does not return every run, its minimum, median and maximum (runs unknown)."""
    ran = False

    def run() -> Any:
        nonlocal ran
        ran = True
        return fn()

    try:
        times = bench(run, return_mode="all", **kwargs)
    except AssertionError:
        if ran:  # raised by fn itself: not the refusal of return_mode, which comes before any run
            raise
        low, mid, high = bench(fn, quantiles=[0.0, 0.5, 1.0], **kwargs)
        return Timing(float(mid), None, float(low), float(high))
    if isinstance(times, (int, float)):
        return Timing.of([times])
    return Timing.of(list(times))


class Meter:
    """Times a callable and its peak extra memory; turns OOM and errors into a status.

    On CUDA: ``triton.testing.do_bench`` (median of at least MIN_TIMED_RUNS timed runs) and
    ``torch.cuda.max_memory_allocated``. On CPU (for the tests only): one ``perf_counter`` run, no
    memory figure. ``time_left`` (seconds, e.g. :meth:`Budget.remaining`): a point whose timing would
    take longer is skipped.
    """

    def __init__(self, device: torch.device, warmup_ms: float = 25, rep_ms: float = 100,
                 cpu_memory_limit: float = 4e9, time_left: Callable[[], float] | None = None) -> None:
        self.device = device
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms
        self.cpu_memory_limit = cpu_memory_limit
        self.time_left = time_left
        self.cuda = device.type == "cuda"
        # Whether measure() makes its extra run for the peak memory (the CUDA allocator's figure). That
        # run is timed too: the estimate that sizes the timing and checks it against the budget.
        self.tracks_memory = self.cuda

    def memory_limit(self) -> float:
        """Bytes an extra allocation may take before it is skipped as an obvious OOM."""
        if not self.cuda:
            return self.cpu_memory_limit
        total = torch.cuda.get_device_properties(self.device).total_memory
        return 0.8 * total - torch.cuda.memory_allocated(self.device)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> float:
        """Start a peak-memory window; returns the bytes allocated now (0 on CPU)."""
        if not self.cuda:
            return 0.0
        torch.cuda.reset_peak_memory_stats(self.device)
        return float(torch.cuda.memory_allocated(self.device))

    def peak_mib(self, base: float) -> float | None:
        """Peak MiB allocated beyond ``base`` since :meth:`reset_peak` (None on CPU)."""
        if not self.cuda:
            return None
        return (torch.cuda.max_memory_allocated(self.device) - base) / 2**20

    def free(self, collect: bool = False) -> None:
        if self.cuda:
            if collect:
                # After an error the traceback's frames keep tensors alive in reference cycles. (Not on
                # every call: with torch and inductor loaded, one collection takes ~0.3 s.)
                gc.collect()
            torch.cuda.empty_cache()

    def _wall_ms(self, fn: Callable[[], Any]) -> Timing:
        """Median over 5 rounds of the wall-clock time per call of ``fn`` called back to back (at least 2
        calls a round), the GPU synchronised before and after each round (one synchronisation shared by
        the round's calls)."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        single_ms = (time.perf_counter() - t0) * 1e3
        calls = max(2, min(2000, int(self.rep_ms / 5 / max(single_ms, 1e-3))))
        rounds = []
        for _ in range(5):
            self.sync()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            self.sync()
            rounds.append((time.perf_counter() - t0) * 1e3 / calls)
        return Timing.of(rounds, runs=5 * calls)

    def _do_bench(self, fn: Callable[[], Any], grad_to_none: Sequence[torch.Tensor] | None,
                  estimate_ms: float | None) -> Timing:
        """``triton.testing.do_bench`` over at least MIN_TIMED_RUNS runs: its repetition time raised to fit
        them, and, should its own estimate of the call leave fewer, called again for the rest."""
        import triton.testing

        samples: list[float] = []
        rep = timed_rep_ms(self.rep_ms, estimate_ms)
        for _ in range(4):
            timing = _bench_samples(triton.testing.do_bench, fn, warmup=self.warmup_ms, rep=rep,
                                    grad_to_none=grad_to_none)
            if timing.runs is None:  # (a Triton that does not return every run: its median as it is)
                return timing
            samples += timing.samples
            missing = MIN_TIMED_RUNS - len(samples)
            if missing <= 0:
                break
            rep = timed_rep_ms(0.0, statistics.median(samples), missing)
        return Timing.of(samples)

    def _time(self, fn: Callable[[], Any], grad_to_none: Sequence[torch.Tensor] | None, graph: bool,
              wall: bool = False, estimate_ms: float | None = None) -> Timing:
        if self.cuda and wall:
            return self._wall_ms(fn)
        if self.cuda:
            import triton.testing

            if graph:
                # It replays its graph 10 times over, each replay ``rep`` ms long: a fifth of the rep
                # keeps this column's cost near the others'. Each of the 10 replays is one timed run.
                return _bench_samples(triton.testing.do_bench_cudagraph, fn, rep=self.rep_ms / 5,
                                      grad_to_none=grad_to_none)
            return self._do_bench(fn, grad_to_none, estimate_ms)
        # CPU timing only serves the tests of this module: one run is enough.
        _clear_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        return Timing.of([(time.perf_counter() - t0) * 1e3])

    def measure(self, fn: Callable[[], Any], est_bytes: float = 0.0,
                grad_to_none: Sequence[torch.Tensor] | None = None, graph: bool = False,
                wall: bool = False) -> Measurement:
        """Run ``fn`` once untimed (compilation, autotuning), once for memory (and an estimate of its
        time), then time it (``graph``: replayed from a CUDA graph, so without the host's launch cost;
        ``wall``: called back to back and timed by the wall clock, host time included). A timing that
        would not fit in ``time_left`` is skipped."""
        if est_bytes > self.memory_limit():
            return Measurement(status=f"OOM (est. {est_bytes / 1e9:.1f} GB)")
        result = Measurement()
        failed = False
        try:
            fn()
            self.sync()
            _clear_grads(grad_to_none)
            self.free()
            estimate_ms = None
            if self.tracks_memory:
                # Kept scratch buffers would otherwise count as allocated before the call.
                _release_kept_scratch()
                base = self.reset_peak()
                t0 = time.perf_counter()
                fn()
                self.sync()
                estimate_ms = (time.perf_counter() - t0) * 1e3
                _clear_grads(grad_to_none)
                result.peak_mem_mb = self.peak_mib(base)
            if estimate_ms is not None and self.time_left is not None:
                mode = "wall" if wall and self.cuda else "graph" if graph and self.cuda else "do_bench"
                if timing_cost_s(estimate_ms, self.warmup_ms, self.rep_ms, mode) > self.time_left():
                    return Measurement(status=SKIPPED)
            timing = self._time(fn, grad_to_none, graph, wall, estimate_ms)
            result.time_ms, result.runs = timing.median_ms, timing.runs
            result.time_min_ms, result.time_max_ms = timing.min_ms, timing.max_ms
        except torch.cuda.OutOfMemoryError:
            result, failed = Measurement(status="OOM"), True
        except Exception as exc:  # noqa: BLE001 - one failing provider must not end the run
            result, failed = Measurement(status=_error_status(exc)), True
        finally:
            _clear_grads(grad_to_none)
            self.free(collect=failed)
        return result


def _release_kept_scratch() -> None:
    """Free the scratch buffers vqfast's search plans keep between calls (where vqfast has them)."""
    try:
        from vqfast.kernels import release_scratch
    except Exception:  # noqa: BLE001 - no kernels here (no triton, or a broken one): nothing kept
        return
    release_scratch()


def _clear_grads(tensors: Sequence[torch.Tensor] | None) -> None:
    for t in tensors or ():
        t.grad = None


class Budget:
    """Splits a wall-clock budget between parts; what a part leaves unused goes to the later ones."""

    def __init__(self, total_s: float, parts: Sequence[str], clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.end = clock() + total_s
        self.pending = list(parts)
        self.deadline = self.end
        self.points_in_part = 0

    def start_part(self, part: str) -> None:
        now = self.clock()
        if part in self.pending:
            weights = [PART_WEIGHTS.get(p, 0.1) for p in self.pending]
            share = PART_WEIGHTS.get(part, 0.1) / sum(weights)
            self.pending.remove(part)
        else:
            share = 1.0
        self.deadline = now + max(0.0, self.end - now) * share
        self.points_in_part = 0

    def allow(self) -> bool:
        """May the next point of the current part run? The first point of a part always may, unless the
        whole budget is spent."""
        now = self.clock()
        ok = now < self.end and (self.points_in_part == 0 or now < self.deadline)
        if ok:
            self.points_in_part += 1
        return ok

    def remaining(self) -> float:
        """Seconds left of the whole budget (0 once it is spent or stopped)."""
        return max(0.0, self.end - self.clock())

    def stop(self) -> None:
        """Spend the whole budget now: no later point may run."""
        self.end = self.deadline = -math.inf


@contextlib.contextmanager
def matmul_precision(value: str) -> Iterator[None]:
    """``torch.set_float32_matmul_precision(value)`` for the duration of the block."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


@contextlib.contextmanager
def environment(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` for the duration of the block."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


# --------------------------------------------------------------------------------------------------
# Plan: what to measure
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NearestPoint:
    n: int
    k: int
    d: int
    precision: str


def _points(shapes: Sequence[tuple[int, int, int]], precisions: Sequence[str]) -> list[NearestPoint]:
    return [NearestPoint(n, k, d, p) for (n, k, d) in shapes for p in precisions]


@dataclass
class Plan:
    """Shapes and settings of one run."""

    headline: list[NearestPoint]
    sweeps: list[tuple[str, list[NearestPoint]]]
    gather: list[tuple[int, int, int, str]]  # (N, K, D, precision)
    usage: list[tuple[int, int]]  # (N, K)
    layer: list[tuple[int, int, int, int, int]]  # (B, C, H, W, K)
    train: list[int]  # batch sizes
    # (N, K, D): a fresh layer's first training forward with init="kmeans" (k-means on N rows, then the step)
    kmeans: list[tuple[int, int, int]] = field(default_factory=list)
    # (B, C, T, K, stages): residual VQ on (B, C, T) sequences, as in audio codecs
    rvq: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    train_codes: int = 4096
    train_dim: int = 128
    ceiling_size: int = 8192
    copy_bytes: int = 1 << 30
    nearest_providers: tuple[str, ...] = NEAREST_PROVIDERS
    headline_providers: tuple[str, ...] = HEADLINE_PROVIDERS
    layer_providers: tuple[str, ...] = LAYER_PROVIDERS
    train_providers: tuple[str, ...] = TRAIN_PROVIDERS
    check_rows: int = 256
    warmup_ms: float = 25
    rep_ms: float = 100
    budget_s: float = DEFAULT_BUDGET_S
    mode: str = "default"
    # False: the launchers' fixed configurations (VQFAST_AUTOTUNE=0, unless set), one compile per
    # kernel variant on a cold Triton cache instead of one per autotuning candidate.
    autotune: bool = True


HEADLINE_SHAPES = [GOAL_SMALL, (8192, 16384, 256), GOAL_LARGE]
LAYER_SHAPES = [ARTICLE_LAYER, (32, 256, 16, 16, 16384), GOAL_LAYER]


def default_plan() -> Plan:
    """About 9 minutes on an H100 (the budget trims it if compilation is slower than expected)."""
    k_values = [1024, 4096, 16384, 65536, 262144]
    return Plan(
        # Every list puts the points a speed goal is judged at first: a budget cut (a cold Triton cache
        # compiles and autotunes for seconds per new kernel variant) loses the tail, and each part's
        # first point always runs. Headline: the large shape in bf16 (goal 1), tf32 (goal 2) and fp32,
        # few rows with a huge codebook (goal 3), the small shape in every dtype (goal 3), then the
        # middle shape, which no goal uses.
        headline=_points([GOAL_LARGE], ["bf16", "tf32", "fp32"]) + [NearestPoint(*GOAL_FEW_ROWS, "bf16")]
        + _points([GOAL_SMALL], ["bf16", "fp32", "tf32", "fp16"])
        + _points([HEADLINE_SHAPES[1]], ["bf16", "fp32"]),
        # Most telling sweeps first: a time budget cut loses the tail.
        sweeps=[
            ("K sweep (N=8192, D=256)", _points([(8192, k, 256) for k in k_values], ["bf16"])),
            ("precision (N=8192, K=16384, D=256)", _points([(8192, 16384, 256)], ["fp32", "tf32", "bf16", "fp16"])),
            ("K sweep (N=8192, D=256), fp32", _points([(8192, k, 256) for k in k_values], ["fp32"])),
            ("D sweep (N=8192, K=16384)", _points([(8192, 16384, d) for d in (8, 32, 128, 256, 1024)], ["bf16"])),
            ("N sweep (K=16384, D=256)", _points([(n, 16384, 256) for n in (1024, 8192, 65536)], ["bf16"])),
        ],
        gather=[(1048576, 65536, 128, "fp32"), (65536, 16384, 256, "fp32"), (65536, 16384, 256, "bf16")],
        usage=[(1048576, 65536), (16777216, 262144), (65536, 4096)],
        # Goal 4's two shapes (the largest against vector-quantize-pytorch, then the article's), then the middle one.
        layer=[GOAL_LAYER, ARTICLE_LAYER, LAYER_SHAPES[1]],
        train=[64, 256],
        kmeans=[(131072, 65536, 256)],
        # An EnCodec-sized residual VQ (8 stages of 1,024 codes, 128 dims) on 64 sequences of 256 frames.
        rvq=[(64, 128, 256, 1024, 8)],
    )


def quick_plan() -> Plan:
    """A few shapes (85 s of measuring, no torch.compile provider, fixed launch configurations): checks
    that everything runs."""
    return Plan(
        headline=_points([(1024, 4096, 128)], ["bf16", "fp32"]),
        # D=128 in bf16: the kernel variant the headline has already compiled.
        sweeps=[("K sweep (N=8192, D=128)", _points([(8192, 1024, 128), (8192, 16384, 128)], ["bf16"]))],
        gather=[(65536, 16384, 256, "fp32")],
        usage=[(1048576, 65536)],
        layer=[LAYER_SHAPES[0]],
        train=[64],
        # torch.compile's first compile alone takes 20-40 s.
        nearest_providers=tuple(p for p in NEAREST_PROVIDERS if p != COMPILE_PROVIDER),
        warmup_ms=10, rep_ms=40, budget_s=QUICK_BUDGET_S, mode="quick", autotune=False,
    )


# --------------------------------------------------------------------------------------------------
# The parts
# --------------------------------------------------------------------------------------------------


def _say(message: str) -> None:
    # Flushed: the log is usually piped into tee, and a run stopped by a time limit should keep it.
    print(message, flush=True)


@dataclass
class Context:
    device: torch.device
    plan: Plan
    meter: Meter
    budget: Budget
    log: Callable[[str], None] = _say
    records: list[Record] = field(default_factory=list)
    cache: dict[tuple[NearestPoint, str], Record | None] = field(default_factory=dict)
    # Called after each record: the run writes its tables then, so that a point that hangs the GPU
    # (where no signal reaches Python until the process is killed) loses only itself.
    on_record: Callable[[], None] | None = None

    def add(self, rec: Record) -> None:
        self.records.append(rec)
        extra = []
        if rec.tflops is not None:
            extra.append(f"{rec.tflops:.1f} TFLOP/s")
        if rec.gbps is not None:
            extra.append(f"{rec.gbps:.0f} GB/s")
        if rec.peak_mem_mb is not None:
            extra.append(f"+{rec.peak_mem_mb:.0f} MiB")
        if rec.check:
            extra.append(f"check {rec.check}")
        shape = f"N={rec.n} K={rec.k} D={rec.d}" if rec.n else ""
        self.log(f"[{rec.part}] {rec.case} | {rec.provider} | {rec.precision} {shape}: "
                 f"{rec.cell()}{' ms' if rec.ok else ''} {' '.join(extra)}".rstrip())
        if self.on_record is not None:
            self.on_record()

    def skipped(self, part: str, case: str, providers: Sequence[str], precision: str,
                n: int = 0, k: int = 0, d: int = 0) -> None:
        """Rows ``skipped (time budget)`` for ``providers`` at a point, but for those the run already has a
        row of (a part cut short by the hard time limit is listed again from its start)."""
        have = {(r.part, r.case, r.provider, r.precision, r.n, r.k, r.d) for r in self.records}
        for p in providers:
            if p == "vector-quantize-pytorch" and _vq_pytorch_class() is None:
                continue
            if part in ("nearest", "headline") and n and not _nearest_fn_applies(p, NearestPoint(n, k, d, precision)):
                continue  # a provider that does not run at this point has no row to skip
            if (part, case, p, precision, n, k, d) not in have:
                self.add(Record(part, case, p, precision, n, k, d, status=SKIPPED))


def _seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


def _nearest_estimate(provider: str, n: int, k: int, d: int, elt: int) -> float:
    """Extra bytes a search is expected to allocate (for the obvious-OOM guard)."""
    nk = float(n) * k
    return {
        "vqfast": 25.0 * n + 8.0 * k,  # indices, distances; tf32: row status and list of rows in doubt
        TMA_PROVIDER: 25.0 * n + 8.0 * k,
        GRAPH_PROVIDER: 25.0 * n + 8.0 * k,
        WALL_PROVIDER: 25.0 * n + 8.0 * k,
        COMPILE_PROVIDER: nk * elt + 8.0 * n,
        "matmul+argmin": 2 * nk * elt + 8.0 * n,
        "cdist+argmin": 1.5 * nk * elt + (n + k) * (d + 2) * elt,
        "article (broadcast)": 2 * nk * d * elt + nk * elt,
        "z@c.T (cuBLAS)": nk * elt,
        "vector-quantize-pytorch": 3 * nk * 4,
    }.get(provider, 0.0)


def _tma_point(point: NearestPoint) -> bool:
    """Whether the opt-in TMA search is measured at ``point`` (16-bit or tf32, at TMA_POINTS)."""
    return point.precision in ("bf16", "fp16", "tf32") and (point.n, point.k, point.d) in TMA_POINTS


def _nearest_fn_applies(provider: str, point: NearestPoint) -> bool:
    """Whether :func:`_nearest_fn` would give ``provider`` a search at ``point`` (without building it)."""
    if provider == WALL_PROVIDER:
        return 2.0 * point.n * point.k * point.d <= WALL_MAX_FLOP
    if provider == TMA_PROVIDER:
        return _tma_point(point)
    if provider == "vector-quantize-pytorch":
        return _vq_pytorch_class() is not None and point.precision in ("fp32", "tf32")
    return True


def _nearest_fn(provider: str, point: NearestPoint,
                device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], Any] | None:
    """The search ``provider`` runs for ``point``, or None when it is not available here."""
    if provider == WALL_PROVIDER and 2.0 * point.n * point.k * point.d > WALL_MAX_FLOP:
        return None
    if provider in ("vqfast", GRAPH_PROVIDER, WALL_PROVIDER):
        import vqfast

        precision = PRECISIONS[point.precision][1]
        return lambda z, c: vqfast.nearest_code(z, c, precision=precision)[0]
    if provider == TMA_PROVIDER:
        if not _tma_point(point) or device.type != "cuda":
            return None
        import vqfast
        from vqfast.kernels import nearest_tma

        precision = PRECISIONS[point.precision][1]

        def run_tma(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            before = nearest_tma.launches
            with environment("VQFAST_TMA_SEARCH", "1"):
                indices = vqfast.nearest_code(z, c, precision=precision)[0]
            if nearest_tma.launches == before:
                # (Not a GPU of compute capability 9.x, or a Triton without tensor descriptors.)
                raise RuntimeError("the TMA search does not run here; the default kernel ran instead")
            return indices

        return run_tma
    if provider == COMPILE_PROVIDER:
        # (Imported under its own name: "import torch._dynamo" would make torch a local of this function,
        # unbound in the other branches' closures.)
        import torch._dynamo as dynamo

        # A fresh compile per shape: recompilations would otherwise hit dynamo's limit and fall back.
        dynamo.reset()
        return torch.compile(search_matmul, dynamic=False)
    if provider == "vector-quantize-pytorch":
        cls = _vq_pytorch_class()
        if cls is None or point.precision not in ("fp32", "tf32"):
            return None
        vq = cls(dim=point.d, codebook_size=point.k).to(device).eval()
        loaded: list[torch.Tensor] = []

        def run(z: torch.Tensor, c: torch.Tensor) -> Any:
            # Its codebook is c (set on the first, untimed call), so that it searches what the others
            # search and its indices can be checked; timed is its whole eval forward (search, gather, loss).
            with torch.no_grad():
                if not loaded or loaded[0] is not c:
                    vq._codebook.embed.copy_(c[None].to(vq._codebook.embed.dtype))
                    loaded[:] = [c]
                return vq(z[None])[1]

        return run
    return {
        "matmul+argmin": search_matmul,
        "cdist+argmin": search_cdist,
        "article (broadcast)": search_broadcast,
        "z@c.T (cuBLAS)": bare_product,
    }.get(provider)


def _nearest_inputs(point: NearestPoint, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    _seeded(point.n * 31 + point.k * 7 + point.d)
    dtype = PRECISIONS[point.precision][0]
    z = torch.randn(point.n, point.d, device=device).to(dtype)
    c = torch.randn(point.k, point.d, device=device).to(dtype)
    return z, c


def measure_nearest(ctx: Context, point: NearestPoint, providers: Sequence[str]) -> list[Record]:
    """Records of ``providers`` at ``point`` (measured once per run, then reused by later tables)."""
    missing = [p for p in providers if (point, p) not in ctx.cache]
    if missing:
        mm_precision = PRECISIONS[point.precision][1]
        elt = element_size(point.precision)
        with matmul_precision(mm_precision):
            z, c = _nearest_inputs(point, ctx.device)
            for provider in missing:
                ctx.cache[(point, provider)] = _measure_one_search(ctx, provider, point, z, c, elt)
            del z, c
        ctx.meter.free()
    return [r for p in providers if (r := ctx.cache.get((point, p))) is not None]


def _measure_one_search(ctx: Context, provider: str, point: NearestPoint, z: torch.Tensor, c: torch.Tensor,
                        elt: int) -> Record | None:
    n, k, d = point.n, point.k, point.d
    rec = Record("nearest", "", provider, point.precision, n, k, d)
    est = _nearest_estimate(provider, n, k, d, elt)
    if est > ctx.meter.memory_limit():
        # Checked before building the provider, so a hopeless torch.compile is not even compiled.
        rec.status = f"OOM (est. {est / 1e9:.1f} GB)"
        return rec
    if provider == TMA_PROVIDER and z.is_cuda and _tma_point(point):
        unavailable = tma_unavailable(torch.cuda.get_device_capability(z.device))
        if unavailable:
            rec.status = unavailable
            return rec
    try:
        search = _nearest_fn(provider, point, z.device)
    except Exception as exc:  # noqa: BLE001
        rec.status = _error_status(exc)
        return rec
    if search is None:
        return None
    m = ctx.meter.measure(lambda: search(z, c), est, graph=provider == GRAPH_PROVIDER, wall=provider == WALL_PROVIDER)
    rec.take(m)
    if rec.ok:
        rec.tflops = tflops(n, k, d, rec.time_ms)
        rec.gbps = gbps(search_bytes(provider, n, k, d, elt), rec.time_ms)
    if provider in ("vqfast", GRAPH_PROVIDER, TMA_PROVIDER, "vector-quantize-pytorch") and rec.ok:
        try:
            rows = z
            if provider == GRAPH_PROVIDER and z.is_cuda:
                # The graph's own output, replayed on other rows than it was captured with.
                indices, rows = graph_replay_output(search, z, c)
            else:
                indices = search(z, c).reshape(-1)
            err = chosen_distance_error(rows, c, indices, rows=ctx.plan.check_rows)
            rec.check_error = err
            rec.check = "pass" if err <= tolerance(point.precision) else "fail"
            # Every row: fp32 data in either mode (the tf32 pass and its re-check) and 16-bit data (exact
            # products) must give the indices of a plain fp32 search of the same values.
            if provider in ("vqfast", TMA_PROVIDER) and 2.0 * n * k * d <= EXACT_CHECK_MAX_FLOP:
                agreement = agreement_with_fp32(z, c, indices)
                rec.note = agreement.note()
                if agreement.wrong:
                    rec.check = "fail"
        except Exception as exc:  # noqa: BLE001
            rec.check = "error"
            rec.note = _error_status(exc)
        finally:
            ctx.meter.free()
    if provider in ("vqfast", TMA_PROVIDER) and rec.ok and z.is_cuda and rec.check != "error":
        notes = [search_tile_note(lambda: search(z, c))]
        if point.precision in ("tf32", "fp32"):
            try:
                with environment("VQFAST_TMA_SEARCH", "1" if provider == TMA_PROVIDER else "0"):
                    notes.append(tf32_recheck_shares(z, c, PRECISIONS[point.precision][1]))
            except Exception as exc:  # noqa: BLE001
                notes.append(f"tf32 re-check shares: {_error_status(exc)}")
            finally:
                ctx.meter.free()
        rec.note = _joined(rec.note, *notes)
    return rec


def graph_replay_output(search: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], z: torch.Tensor,
                        c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``search`` captured in a CUDA graph on a copy of ``z``, then replayed after that copy was
    overwritten with ``z``'s rows in reverse order and the output poisoned with -1: ``(indices, rows)``,
    the replay's output and the rows it searched. A graph that replays nothing, or kernels that ran
    during capture instead of being recorded, leave indices that do not fit these rows."""
    static = z.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        search(static, c)  # warm-up on a side stream, as torch.cuda.graphs asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = search(static, c)
    static.copy_(z.flip(0))
    out.fill_(-1)
    graph.replay()
    torch.cuda.synchronize()
    return out.clone(), static


def search_tile_note(run_search: Callable[[], object]) -> str:
    """The search kernel's launch configuration that the autotuner chose for this problem, e.g.
    "search tile 128x64, 8 warps, 3 stages" (", next tile's product before the argmin" added for a
    PIPELINE candidate; empty with ``VQFAST_AUTOTUNE=0`` or on failure).

    Runs the search once more through Triton's own launch path, whose autotuner then reports the
    choice for this problem's key (direct launches skip the autotuner once it has chosen)."""
    from vqfast.kernels import _launch, nearest
    from vqfast.kernels._common import autotuning

    if not autotuning():
        return ""
    try:
        with _launch.launch_path(direct=False):
            run_search()
        tuner = nearest.last_search_autotuner()
        if tuner is None:  # no pass ran (no rows), or none was autotuned
            return ""
        cfg = tuner.best_config
        slices = ""
        if "SINGLE_D" in cfg.kwargs:  # the candidates that choose between a whole D and slices of it
            slices = ", whole D" if cfg.kwargs["SINGLE_D"] else f", D in slices of {cfg.kwargs['BLOCK_D']}"
        if cfg.kwargs.get("WARP_SPECIALIZE"):  # the TMA search: num_warps per group of consumer warps
            return (f"search tile {cfg.kwargs['BLOCK_N']}x{cfg.kwargs['BLOCK_K']}, warp-specialized, "
                    f"{cfg.num_warps} warps per group, {cfg.num_stages} stages")
        pipelined = ", next tile's product before the argmin" if cfg.kwargs.get("PIPELINE") else ""
        return (f"search tile {cfg.kwargs['BLOCK_N']}x{cfg.kwargs['BLOCK_K']}{slices}, {cfg.num_warps} warps, "
                f"{cfg.num_stages} stages{pipelined}")
    except Exception:  # noqa: BLE001 - a note only
        return ""


def tf32_recheck_shares(z: torch.Tensor, c: torch.Tensor, precision: str = "high") -> str:
    """How the tf32 pass of an fp32 search settled the rows of ``(z, c)``: the share decided between
    their two best codes and the share searched again, with fp32 products for ``precision`` "highest"
    and fp32-accurate tf32x3 products otherwise (the re-check's cost depends on them)."""
    from vqfast.kernels.nearest import _RESEARCH_PRECISION, _nearest_code_with_status

    status = _nearest_code_with_status(z, c, precision=precision)[2]
    counts = torch.bincount(status.long(), minlength=3).tolist()
    total = max(1, sum(counts))
    return (f"tf32 re-check: {100 * counts[1] / total:.2f} % of rows decided between two codes, "
            f"{100 * counts[2] / total:.3f} % searched again ({_RESEARCH_PRECISION[precision]})")


def run_ceilings(ctx: Context) -> None:
    """Dense matmul TFLOP/s in bf16 / tf32 / fp32 and device-copy bandwidth, in this run.

    Not subject to the time budget: a few seconds, and the plots need them."""
    size = ctx.plan.ceiling_size
    for prec in ("bf16", "tf32", "fp32"):
        dtype, mm_precision = PRECISIONS[prec]
        case = f"matmul {size}³"
        with matmul_precision(mm_precision):
            _seeded()
            a = torch.randn(size, size, device=ctx.device).to(dtype)
            b = torch.randn(size, size, device=ctx.device).to(dtype)
            m = ctx.meter.measure(lambda: a @ b, est_bytes=size * size * a.element_size())
            a = b = None  # dropped; not del, which closures above would see as unbound
        rec = Record("ceiling", case, "torch", prec, size, size, size).take(m)
        rec.peak_mem_mb = None  # (the product's output: nothing a ceiling says)
        if rec.ok:
            rec.tflops = tflops(size, size, size, rec.time_ms)
        ctx.add(rec)
    nbytes = ctx.plan.copy_bytes
    case = f"device copy {nbytes / 2**20:g} MiB"
    src = torch.empty(nbytes // 4, device=ctx.device)
    dst = torch.empty_like(src)
    m = ctx.meter.measure(lambda: dst.copy_(src))
    src = dst = None  # dropped; not del, which closures above would see as unbound
    rec = Record("ceiling", case, "torch", "fp32", note="GB/s counts the read and the write").take(m)
    rec.peak_mem_mb = None
    if rec.ok:
        rec.gbps = gbps(2 * nbytes, rec.time_ms)
    ctx.add(rec)
    ctx.meter.free()


def run_headline(ctx: Context) -> None:
    providers = [p for p in ctx.plan.headline_providers if p != TMA_PROVIDER]
    for point in ctx.plan.headline:
        if not ctx.budget.allow():
            ctx.skipped("headline", "headline", providers, point.precision, point.n, point.k, point.d)
            continue
        for rec in measure_nearest(ctx, point, providers):
            ctx.add(dataclasses.replace(rec, part="headline", case="headline"))


def _tma_points(plan: Plan) -> list[NearestPoint]:
    """The headline points at which the plan times the opt-in TMA search."""
    return [p for p in plan.headline if _tma_point(p)] if TMA_PROVIDER in plan.headline_providers else []


def run_headline_tma(ctx: Context) -> None:
    for point in _tma_points(ctx.plan):
        if not ctx.budget.allow():
            ctx.skipped("headline", "headline", [TMA_PROVIDER], point.precision, point.n, point.k, point.d)
            continue
        for rec in measure_nearest(ctx, point, (TMA_PROVIDER,)):
            ctx.add(dataclasses.replace(rec, part="headline", case="headline"))


def run_nearest(ctx: Context) -> None:
    for number, (sweep, points) in enumerate(ctx.plan.sweeps):
        providers = ctx.plan.nearest_providers
        if number > 0:
            # torch.compile compiles afresh for every shape (5-40 s each): the first sweep shows it.
            providers = tuple(p for p in providers if p != COMPILE_PROVIDER)
        for point in points:
            if not ctx.budget.allow():
                ctx.skipped("nearest", sweep, providers, point.precision, point.n, point.k, point.d)
                continue
            for rec in measure_nearest(ctx, point, providers):
                ctx.add(dataclasses.replace(rec, part="nearest", case=sweep))


def run_gather(ctx: Context) -> None:
    import vqfast

    for n, k, d, prec in ctx.plan.gather:
        if not ctx.budget.allow():
            for case in ("fwd", "fwd+bwd"):
                ctx.skipped("gather", case, ["vqfast", "torch"], prec, n, k, d)
            continue
        dtype = PRECISIONS[prec][0]
        elt = element_size(prec)
        _seeded()
        codebook = torch.randn(k, d, device=ctx.device).to(dtype).requires_grad_()
        indices = torch.randint(0, k, (n,), device=ctx.device)
        grad = torch.randn(n, d, device=ctx.device).to(dtype)
        # Indices, the rows written, and the codebook rows read: at most K distinct ones (repeats hit L2).
        fwd_bytes = 8 * n + n * d * elt + min(n, k) * d * elt
        bwd_bytes = 8 * n + n * d * elt + k * d * elt

        def fwd(gather: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
            def run() -> torch.Tensor:
                with torch.no_grad():
                    return gather()
            return run

        def fwd_bwd(gather: Callable[[], torch.Tensor]) -> Callable[[], None]:
            return lambda: gather().backward(grad)

        gathers = {"vqfast": lambda: vqfast.gather(codebook, indices, check_indices=False), "torch": lambda: F.embedding(indices, codebook)}
        # (The fwd+bwd row names the gather's tile too, chosen while the fwd row was measured.)
        tuned_before = set(_tuned_keys())
        for case, wrap, nbytes in (("fwd", fwd, fwd_bytes), ("fwd+bwd", fwd_bwd, fwd_bytes + bwd_bytes)):
            for provider, g in gathers.items():
                m = ctx.meter.measure(wrap(g), est_bytes=2 * n * d * elt + k * d * 4, grad_to_none=[codebook])
                rec = Record("gather", case, provider, prec, n, k, d,
                             note=_joined("check_indices=False", tiles_tuned_since(tuned_before))
                             if provider == "vqfast" else "").take(m)
                if rec.ok:
                    rec.gbps = gbps(nbytes, rec.time_ms)
                    if provider == "vqfast":
                        rec.check, rec.check_error, problem = gather_check(case, codebook, indices, grad)
                        rec.note = _joined(rec.note, problem)
                ctx.add(rec)
        codebook = indices = grad = None  # dropped; not del, which closures above would see as unbound
        ctx.meter.free()


def _joined(*notes: str) -> str:
    """The non-empty ``notes`` of a record, joined."""
    return "; ".join(x for x in notes if x)


# Relative error (of the largest summed gradient) that a scatter-add with fp32 sums may show: fp32 sums
# in another order, and for 16-bit codebooks their rounding to 16 bits (half an ulp: 2**-9 for bf16).
GRADIENT_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-8}


def gather_check(case: str, codebook: torch.Tensor, indices: torch.Tensor,
                 grad: torch.Tensor) -> tuple[str, float | None, str]:
    """Whether vqfast's gather gives torch's rows and, for "fwd+bwd", its scatter-add the codebook
    gradient of fp32 sums (``zeros(K, D).index_add_(0, indices, grad.float())``): ``(check, relative
    error of the gradient, what went wrong)``, the check "pass", "fail" or "error"."""
    import vqfast

    try:
        with torch.no_grad():
            if not torch.equal(vqfast.gather(codebook, indices, check_indices=False), F.embedding(indices, codebook)):
                return "fail", None, "gathered rows differ from torch's"
        if case == "fwd":
            return "pass", None, ""
        codebook.grad = None
        vqfast.gather(codebook, indices, check_indices=False).backward(grad)
        summed = torch.zeros(codebook.shape, dtype=torch.float32, device=codebook.device)
        summed.index_add_(0, indices, grad.float())
        err = float((codebook.grad.float() - summed).abs().max() / summed.abs().max().clamp_min(1e-30))
        ok = err <= GRADIENT_TOLERANCE[codebook.dtype]
        return ("pass" if ok else "fail"), err, "" if ok else "codebook gradient differs from fp32 sums"
    except Exception as exc:  # noqa: BLE001
        return "error", None, _error_status(exc)
    finally:
        codebook.grad = None


def usage_check(indices: torch.Tensor, num_codes: int) -> tuple[str, float | None, str]:
    """Whether vqfast's code usage gives ``torch.bincount``'s counts and their entropy (computed in
    float64) to fp32 rounding: ``(check, relative error of the entropy, what went wrong)``."""
    import vqfast

    try:
        counts, entropy, _ = vqfast.code_usage(indices, num_codes, check_indices=False)
        expected = torch.bincount(indices, minlength=num_codes)
        if not torch.equal(counts, expected):
            return "fail", None, "counts differ from torch.bincount's"
        p = expected.double() / expected.sum().clamp_min(1)
        exact = float(-torch.special.xlogy(p, p).sum())
        err = abs(float(entropy) - exact) / max(exact, 1e-30)
        ok = err <= 1e-5
        return ("pass" if ok else "fail"), err, "" if ok else "entropy differs from the counts' (float64)"
    except Exception as exc:  # noqa: BLE001
        return "error", None, _error_status(exc)


def _tuned_keys() -> list:
    from vqfast.kernels import _common

    return list(_common._TUNED)


def tiles_tuned_since(before: set) -> str:
    """The launch configurations that the memory-bound launchers chose by timing since ``before`` (the
    keys of their choices then), e.g. "scatter_add: 32 rows x 4 warps, streaming hints"."""
    from vqfast.kernels import _common

    chosen = []
    for key, cfg in list(_common._TUNED.items()):
        if key not in before and isinstance(cfg, _common.LaunchConfig):
            unit = "indices" if key[0] == "bincount" else "rows"
            chosen.append(f"{key[0]}: {cfg.block} {unit} x {cfg.num_warps} warps"
                          + (", streaming hints" if cfg.stream else ""))
    return "; ".join(chosen)


def run_usage(ctx: Context) -> None:
    import vqfast

    for n, k in ctx.plan.usage:
        if not ctx.budget.allow():
            ctx.skipped("usage", "bincount+entropy", ["vqfast", "torch"], "int64", n, k)
            continue
        _seeded()
        indices = torch.randint(0, k, (n,), device=ctx.device)
        for provider, fn in (("vqfast", lambda: vqfast.code_usage(indices, k, check_indices=False)),
                             ("torch", lambda: _torch_code_usage(indices, k))):
            tuned_before = set(_tuned_keys())
            m = ctx.meter.measure(fn, est_bytes=16 * k)
            rec = Record("usage", "bincount+entropy", provider, "int64", n, k, 0,
                         note=_joined("check_indices=False", tiles_tuned_since(tuned_before))
                         if provider == "vqfast" else "").take(m)
            if rec.ok:
                rec.gbps = gbps(8 * n + 16 * k, rec.time_ms)
                if provider == "vqfast":
                    rec.check, rec.check_error, problem = usage_check(indices, k)
                    rec.note = _joined(rec.note, problem)
            ctx.add(rec)
        indices = None  # dropped (not del: the closures above refer to it)
        ctx.meter.free()


def _layer_module(provider: str, k: int, c: int) -> nn.Module | None:
    """The VQ layer of ``provider`` for K codes of dimension C, or None when it is not installed."""
    from vqfast import VectorQuantizer

    if provider in ("vqfast", GRAPH_PROVIDER):
        return VectorQuantizer(k, c)
    if provider == ROTATION_PROVIDER:
        return VectorQuantizer(k, c, gradient="rotation")
    if provider == "article (fixed)":
        return ArticleVQ(k, c, search="broadcast")
    if provider == "matmul+argmin":
        return ArticleVQ(k, c, search="matmul")
    if provider == "vector-quantize-pytorch":
        cls = _vq_pytorch_class()
        if cls is None:
            return None
        return _TheirLayer(cls(dim=c, codebook_size=k, accept_image_fmap=True))
    raise ValueError(f"unknown layer provider {provider!r}")


class _TheirLayer(nn.Module):
    """A vector-quantize-pytorch layer (``(q, indices, losses)``) as ``(z_q, loss, indices)``; with
    ``channels_last`` it is given (B, C, T) input as the (B, T, C) it takes."""

    def __init__(self, inner: nn.Module, channels_last: bool = False) -> None:
        super().__init__()
        self.inner = inner
        self.channels_last = channels_last

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.channels_last:
            q, idx, losses = self.inner(z.transpose(1, 2))
            return q.transpose(1, 2), losses.sum(), idx
        q, idx, losses = self.inner(z)
        return q, losses.sum(), idx


def in_turn(items: Sequence[Any]) -> Callable[[], Any]:
    """A function that returns ``items`` one after another, starting over after the last."""
    if not items:
        raise ValueError("nothing to take in turn")
    steps = itertools.count()
    return lambda: items[next(steps) % len(items)]


def _fwd_bwd_step(layer: nn.Module, zs: list[torch.Tensor], g: torch.Tensor,
                  one: torch.Tensor) -> Callable[[], None]:
    """A training step of ``layer`` without the optimizer: the batches ``zs`` in turn, backward from
    ``g`` into z_q and 1 into the loss."""
    next_batch = in_turn(zs)

    def step() -> None:
        z_q, loss, _ = layer(next_batch())
        torch.autograd.backward([z_q, loss], [g, one.to(loss.dtype).expand_as(loss)])

    return step


def _built_on_device(ctx: Context, rec: Record, build: Callable[[], nn.Module | None]) -> nn.Module | None:
    """``build()`` on the run's device; None where the provider is not available here, or where building
    failed (``rec`` then holds the error and is added to the run)."""
    try:
        layer = build()
    except Exception as exc:  # noqa: BLE001 - one failing provider must not end the run
        rec.status = _error_status(exc)
        ctx.add(rec)
        return None
    return None if layer is None else layer.to(ctx.device)


# How vector-quantize-pytorch's layer searches in the layer part, next to vqfast's (the comparison is
# not like for like in precision: its fp32 search is the costlier one).
THEIR_SEARCH_NOTE = ("vector-quantize-pytorch searches with fp32 products (matmul precision \"highest\"), vqfast's "
                     "layer with tf32 products and an exact fp32 re-check of near ties (the same indices)")


def codebook_tensor(layer: nn.Module) -> torch.Tensor | None:
    """The (K, D) tensor holding ``layer``'s codebook: ``embeddings.weight`` (vqfast, the article's layer),
    or row 0 of vector-quantize-pytorch's ``_codebook.embed`` (1, K, D); None if it has neither."""
    weight = getattr(getattr(layer, "embeddings", None), "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight
    inner = getattr(layer, "inner", layer)
    embed = getattr(getattr(inner, "_codebook", None), "embed", None)
    if isinstance(embed, torch.Tensor) and embed.dim() == 3 and embed.shape[0] == 1:
        return embed[0]
    return None


@torch.no_grad()
def share_codebook(layer: nn.Module, codebook: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
    """Give ``layer`` the shared ``codebook``, or take a copy of its own as the shared one when there is
    none yet: ``(the shared codebook, whether the layer now holds it)``."""
    target = codebook_tensor(layer)
    if target is None:
        return codebook, False
    if codebook is None:
        return target.detach().clone(), True
    if target.shape != codebook.shape:
        return codebook, False
    target.copy_(codebook.to(target.dtype))
    # vector-quantize-pytorch's EMA update rebuilds the codes from embed_avg, which starts as a copy of
    # embed: without the same codes there, its first training step would bring its own codebook back.
    avg = getattr(getattr(getattr(layer, "inner", layer), "_codebook", None), "embed_avg", None)
    if isinstance(avg, torch.Tensor) and avg.shape == (1, *codebook.shape):
        avg.copy_(codebook[None].to(avg.dtype))
    return codebook, True


@torch.no_grad()
def layer_check(layer: nn.Module, z: torch.Tensor, check_rows: int = 256) -> tuple[str, str]:
    """``(check, note)`` of a vqfast layer's eval-mode forward on ``z`` (B, C, H, W), which changes no
    state: its z_q must be its codes exactly, and its indices those of the exact search (the distance
    check of the sampled rows, then every row against a plain fp32 search where that is affordable)."""
    codebook = codebook_tensor(layer)
    if codebook is None:
        return "error", "no codebook found to check against"
    mode = layer.training
    layer.eval()
    try:
        z_q, _, indices = layer(z)
    finally:
        layer.train(mode)
    rows = z.detach().movedim(1, -1).reshape(-1, z.shape[1])
    indices = indices.reshape(-1)
    n, k, d = rows.shape[0], codebook.shape[0], rows.shape[1]
    if chosen_distance_error(rows, codebook, indices, rows=check_rows) > tolerance("fp32"):
        return "fail", "the sampled rows' codes are not the nearest"
    if not torch.equal(z_q.detach().movedim(1, -1).reshape(-1, d), codebook.detach().index_select(0, indices).to(z_q.dtype)):
        return "fail", "z_q is not the chosen codes"
    if 2.0 * n * k * d > EXACT_CHECK_MAX_FLOP:
        return "pass", f"the nearest codes on {min(n, check_rows)} sampled rows, z_q the codes"
    agreement = agreement_with_fp32(rows, codebook.detach(), indices)
    return ("fail" if agreement.wrong else "pass"), agreement.note() + "; z_q the codes"


def run_layer(ctx: Context) -> None:
    for b, c, h, w, k in ctx.plan.layer:
        case = _layer_case(b, c, h, w)
        n = b * h * w
        if not ctx.budget.allow():
            ctx.skipped("layer", case, ctx.plan.layer_providers, "fp32", n, k, c)
            continue
        with matmul_precision("highest"):
            _seeded()
            zs = [torch.randn(b, c, h, w, device=ctx.device, requires_grad=True) for _ in range(INPUT_BATCHES)]
            g = torch.randn(b, c, h, w, device=ctx.device)
            one = torch.ones((), device=ctx.device)
            codebook = None
            for provider in ctx.plan.layer_providers:
                est = {"article (fixed)": 2.0 * n * k * c * 4 + n * k * 4, "matmul+argmin": 2.0 * n * k * 4,
                       "vector-quantize-pytorch": 3.0 * n * k * 4}.get(provider, 16.0 * n)
                rec = Record("layer", case, provider, "fp32", n, k, c)
                if provider == "vqfast":
                    rec.note = "fp32 data; search at the layer's default precision='tf32' (exact indices)"
                elif provider == GRAPH_PROVIDER:
                    rec.note = "the vqfast step captured in a CUDA graph and replayed (no host launch cost)"
                elif provider == ROTATION_PROVIDER:
                    rec.note = "gradient='rotation' (its backward: kernels/rotation.py), otherwise the defaults"
                if est > ctx.meter.memory_limit():
                    rec.status = f"OOM (est. {est / 1e9:.1f} GB)"
                    ctx.add(rec)
                    continue
                layer = _built_on_device(ctx, rec, lambda: _layer_module(provider, k, c))
                if layer is None:
                    continue
                # Same codebook for every provider, so each solves the same search.
                codebook, shared = share_codebook(layer, codebook)
                if provider == "vector-quantize-pytorch":  # (what its defaults are, known once it is built)
                    rotation = getattr(getattr(layer, "inner", None), "rotation_trick", None)
                    rec.note = ("its defaults" + ("" if rotation is None else f" (rotation_trick={rotation})")
                                + ("; the others' codebook, copied into its _codebook.embed" if shared
                                   else "; its own codebook (no _codebook.embed of shape (1, K, D) to copy into)")
                                + "; " + THEIR_SEARCH_NOTE)

                if provider in ("vqfast", GRAPH_PROVIDER, ROTATION_PROVIDER):
                    # Before timing, whose steps rewrite codes (restarts): a fast wrong answer meets no goal.
                    try:
                        rec.check, checked = layer_check(layer, zs[0], ctx.plan.check_rows)
                        rec.note += f"; check: {checked}"
                    except Exception as exc:  # noqa: BLE001
                        rec.check, rec.note = "error", rec.note + f"; check: {_error_status(exc)}"
                    ctx.meter.free()
                step = _fwd_bwd_step(layer, zs, g, one)
                m = ctx.meter.measure(step, est, grad_to_none=[*zs, *layer.parameters()],
                                      graph=provider == GRAPH_PROVIDER)
                rec.take(m)
                ctx.add(rec)
                del layer, step
                ctx.meter.free()
            zs = g = codebook = None  # dropped; not del, which closures above would see as unbound
        ctx.meter.free()
    for n, k, d in ctx.plan.kmeans:
        run_kmeans_init(ctx, n, k, d)
    for shape in ctx.plan.rvq:
        run_residual(ctx, *shape)


RVQ_PROVIDERS = ("vqfast", "vector-quantize-pytorch")


def _residual_module(provider: str, k: int, c: int, stages: int) -> nn.Module | None:
    """A residual VQ of ``stages`` x K codes of dimension C on (B, C, T) input: ``(z_q, loss, indices)``;
    None when the provider is not installed."""
    if provider == "vqfast":
        from vqfast import ResidualVectorQuantizer

        return ResidualVectorQuantizer(stages, k, c, channel_dim=1)
    cls = _vq_pytorch_class("ResidualVQ")
    if cls is None:
        return None
    return _TheirLayer(cls(dim=c, num_quantizers=stages, codebook_size=k), channels_last=True)


def run_residual(ctx: Context, b: int, c: int, t: int, k: int, stages: int) -> None:
    """Forward + backward of a residual VQ (layer part), vqfast's against vector-quantize-pytorch's
    ``ResidualVQ`` with its defaults, at fp32 and the stages' default settings."""
    case = f"residual VQ, {stages} x {k:,} codes, ({b}, {c}, {t})"
    n = b * t
    if not ctx.budget.allow():
        ctx.skipped("layer", case, list(RVQ_PROVIDERS), "fp32", n, k, c)
        return
    with matmul_precision("highest"):
        _seeded()
        zs = [torch.randn(b, c, t, device=ctx.device, requires_grad=True) for _ in range(INPUT_BATCHES)]
        g = torch.randn(b, c, t, device=ctx.device)
        one = torch.ones((), device=ctx.device)
        for provider in RVQ_PROVIDERS:
            rec = Record("layer", case, provider, "fp32", n, k, c)
            if provider == "vqfast":
                rec.note = "residual VQ: ResidualVectorQuantizer(channel_dim=1), every stage at its defaults"
            layer = _built_on_device(ctx, rec, lambda: _residual_module(provider, k, c, stages))
            if layer is None:
                continue
            step = _fwd_bwd_step(layer, zs, g, one)
            m = ctx.meter.measure(step, 3.0 * n * k * 4, grad_to_none=[*zs, *layer.parameters()])
            rec.take(m)
            ctx.add(rec)
            del layer, step
            ctx.meter.free()
        zs = g = None
    ctx.meter.free()


def run_kmeans_init(ctx: Context, n: int, k: int, d: int) -> None:
    """Wall time of a fresh ``VectorQuantizer(k, d, init="kmeans")``'s first training forward on n rows:
    the k-means initialisation (10 Lloyd iterations, exact fp32 search) and the step. It runs once per
    layer, so it is timed once (after one untimed run that compiles and autotunes the search)."""
    from vqfast import VectorQuantizer

    iterations = VectorQuantizer.__init__.__kwdefaults__["kmeans_iters"]
    case = f"k-means init ({n:,} rows, {iterations} iterations)"
    if not ctx.budget.allow():
        ctx.skipped("layer", case, ["vqfast"], "fp32", n, k, d)
        return
    rec = Record("layer", case, "vqfast", "fp32", n, k, d,
                 note="k-means init: one timed run of a fresh layer's first training forward")
    try:
        _seeded()
        rows = torch.randn(n, d, device=ctx.device)

        def fresh_layer() -> torch.nn.Module:
            return VectorQuantizer(k, d, init="kmeans").to(ctx.device)

        with matmul_precision("highest"):
            fresh_layer()(rows)
            layer = fresh_layer()  # built outside the timed region: only its first forward is timed
            ctx.meter.sync()
            _release_kept_scratch()  # (counted in the peak, as in every other row)
            base = ctx.meter.reset_peak()
            t0 = time.perf_counter()
            layer(rows)
            ctx.meter.sync()
            rec.time_ms = (time.perf_counter() - t0) * 1e3
            rec.runs, rec.time_min_ms, rec.time_max_ms = 1, rec.time_ms, rec.time_ms
            rec.peak_mem_mb = ctx.meter.peak_mib(base)
            layer = None
    except torch.cuda.OutOfMemoryError:
        rec.status = "OOM"
    except Exception as exc:  # noqa: BLE001
        rec.status = _error_status(exc)
    rows = None
    ctx.add(rec)
    ctx.meter.free(collect=not rec.ok)


def run_train(ctx: Context) -> None:
    k, d = ctx.plan.train_codes, ctx.plan.train_dim
    for batch in ctx.plan.train:
        case = f"{batch}"
        n = batch * 16  # a 4x4 latent grid per 32x32 image
        if not ctx.budget.allow():
            ctx.skipped("train", case, ctx.plan.train_providers, "fp32", n, k, d)
            continue
        with matmul_precision("highest"):
            _seeded()
            xs = [torch.rand(batch, 3, 32, 32, device=ctx.device) for _ in range(INPUT_BATCHES)]
            for provider in ctx.plan.train_providers:
                est = 2.0 * n * k * d * 4 + n * k * 4 if provider == "article (fixed)" else 0.0
                rec = Record("train", case, provider, "fp32", n, k, d)
                if est > ctx.meter.memory_limit():
                    rec.status = f"OOM (est. {est / 1e9:.1f} GB)"
                    ctx.add(rec)
                    continue
                _seeded()
                try:
                    model, origin = build_vqvae(provider, k, d)
                except Exception as exc:  # noqa: BLE001
                    rec.status = _error_status(exc)
                    ctx.add(rec)
                    continue
                model = model.to(ctx.device).train()
                opt = torch.optim.Adam(model.parameters(), lr=1e-3)

                def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt,
                         next_batch: Callable[[], torch.Tensor] = in_turn(xs)) -> None:
                    opt.zero_grad(set_to_none=True)
                    x = next_batch()
                    recon, vq_loss, _ = model(x)
                    loss = F.mse_loss(recon, x) + vq_loss
                    loss.backward()
                    opt.step()

                # The gradients cleared before the memory run: its peak includes them, as the layer part's.
                m = ctx.meter.measure(step, est, grad_to_none=list(model.parameters()))
                rec.take(m)
                rec.note = f"{origin}; {INPUT_BATCHES} image batches in turn; convolutions with cuDNN's default (TF32 allowed)"
                ctx.add(rec)
                del model, opt, step
                ctx.meter.free()
            xs = None  # dropped; not del, which closures above would see as unbound
        ctx.meter.free()


PART_RUNNERS: dict[str, Callable[[Context], None]] = {
    "headline": run_headline, "nearest": run_nearest, "gather": run_gather, "usage": run_usage,
    "layer": run_layer, "train": run_train, TMA_STEP: run_headline_tma,
}


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - plots are optional
        return None
    return plt


def _color(provider: str) -> str | None:
    # Same colour for a provider in every panel; C7-C9 are left for the ceiling lines.
    return f"C{NEAREST_PROVIDERS.index(provider)}" if provider in NEAREST_PROVIDERS else None


def _k_sweeps(records: Sequence[Record]) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {}
    for r in records:
        if r.part == "nearest" and r.case.startswith("K sweep") and r.ok:
            out.setdefault(r.case, []).append(r)
    return out


def fixed_tiles(env: dict[str, str]) -> bool:
    """Whether a run's kernels ran their fixed tiles (``VQFAST_AUTOTUNE=0``) rather than autotuned ones."""
    return env.get("autotune", "1") in ("", "0")


def run_label(env: dict[str, str] | None) -> str:
    """The GPU, driver, versions and mode of a run in one line (a plot's title)."""
    if not env:
        return ""
    mode = env.get("mode") or "default"
    return (f"{env.get('gpu') or 'unnamed GPU'}, driver {env.get('driver', '?')}, torch {env.get('torch', '?')}, "
            f"Triton {env.get('triton', '?')}, vqfast {env.get('vqfast', '?')}; {mode} run"
            + (", fixed tiles (VQFAST_AUTOTUNE=0)" if fixed_tiles(env) else ""))


def _plot_k_sweeps(records: Sequence[Record], path: Path, metric: str, ylabel: str,
                   ceilings: dict[str, float] | None = None, env: dict[str, str] | None = None) -> Path | None:
    """One panel per K sweep, one line per provider of ``metric`` ("time_ms" or "tflops") against K,
    titled with the run's GPU and versions (``env``)."""
    sweeps = _k_sweeps(records)
    if not sweeps:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(sweeps), figsize=(6.5 * len(sweeps), 4.5), squeeze=False)
    for ax, (sweep, recs) in zip(axes[0], sweeps.items()):
        for provider in _ordered([r.provider for r in recs], NEAREST_PROVIDERS):
            pts = sorted((r.k, getattr(r, metric)) for r in recs if r.provider == provider and getattr(r, metric))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider, color=_color(provider))
        for i, (prec, value) in enumerate(sorted((ceilings or {}).items())):
            ax.axhline(value, linestyle="--", color=f"C{7 + i % 3}", alpha=0.8,
                       label=f"{prec} matmul ceiling ({value:.0f} TFLOP/s)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("K (codes)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{sweep} [{recs[0].precision}]")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if env:
        fig.suptitle(run_label(env), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_time_vs_k(records: Sequence[Record], path: Path, env: dict[str, str] | None = None) -> Path | None:
    """Search time against K, one line per provider, one panel per K sweep."""
    return _plot_k_sweeps(records, path, "time_ms", "time (ms, median)", env=env)


def plot_tflops(records: Sequence[Record], path: Path, env: dict[str, str] | None = None) -> Path | None:
    """Achieved TFLOP/s (2·N·K·D / time) against K, with the matmul ceilings measured in the same run."""
    ceilings = {r.precision: r.tflops for r in records if r.part == "ceiling" and r.tflops}
    return _plot_k_sweeps(records, path, "tflops", "achieved TFLOP/s", ceilings, env=env)


PLOT_NAMES = ("nearest_time_vs_k.png", "nearest_tflops_vs_k.png")
HEADLINE_PLOT = "headline_tflops.png"
# The headline plot's bars, in this order and colour (the back-to-back time is the table's, not a bar).
_HEADLINE_BARS = ("vqfast", GRAPH_PROVIDER, "cdist+argmin", "matmul+argmin", "z@c.T (cuBLAS)")
_CEILING_LABEL = ("the precision's matmul ceiling (8192³ product, same run; vqfast's fp32 search runs on "
                  "tf32 tensor cores with an exact re-check, so it can pass the fp32 one)")


def plot_headline(records: Sequence[Record], path: Path, env: dict[str, str] | None = None) -> Path | None:
    """Achieved TFLOP/s (2·N·K·D / time) of every headline provider: one panel per (N, K, D), a group of
    bars per precision, and across each group the matmul ceiling of its precision measured in the same run
    (vqfast's fp32 search, on tf32 tensor cores with an exact re-check, can pass the fp32 one).
    None (nothing drawn) when the run has no headline measurement."""
    shapes: dict[tuple[int, int, int], dict[str, dict[str, float]]] = {}
    for r in records:
        if r.part == "headline" and r.ok and r.tflops and r.provider in _HEADLINE_BARS:
            shapes.setdefault((r.n, r.k, r.d), {}).setdefault(r.precision, {})[r.provider] = r.tflops
    if not shapes:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    ceilings = {r.precision: r.tflops for r in records if r.part == "ceiling" and r.ok and r.tflops}
    order = list(PRECISIONS)
    width = 0.8 / len(_HEADLINE_BARS)
    panels = sorted(shapes.items(), key=lambda item: (math.prod(item[0]), item[0]))
    # Panels as wide as their groups of bars, so that a bar is as wide in every panel.
    widths = [max(len(groups), 1.5) for _, groups in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.8 * sum(widths) + 1.5, 4.6), squeeze=False, sharey=True,
                             gridspec_kw={"width_ratios": widths})
    labelled: set[str] = set()
    for ax, (shape, groups) in zip(axes[0], panels):
        precisions = sorted(groups, key=lambda p: (order.index(p) if p in order else len(order), p))
        for x, prec in enumerate(precisions):
            for i, provider in enumerate(_HEADLINE_BARS):
                if provider in groups[prec]:
                    ax.bar(x - 0.4 + (i + 0.5) * width, groups[prec][provider], width, color=f"C{i}",
                           label=None if provider in labelled else provider)
                    labelled.add(provider)
            if prec in ceilings:
                ax.hlines(ceilings[prec], x - 0.45, x + 0.45, colors="k", linestyles="--",
                          label=None if _CEILING_LABEL in labelled else _CEILING_LABEL)
                ax.annotate(f"{ceilings[prec]:.0f}", (x + 0.45, ceilings[prec]), fontsize=7, ha="right",
                            va="bottom")
                labelled.add(_CEILING_LABEL)
        ax.set_xticks(range(len(precisions)), precisions)
        ax.set_yscale("log")
        ax.set_title(f"N={shape[0]:,}, K={shape[1]:,}, D={shape[2]:,}", fontsize=9)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0][0].set_ylabel("achieved TFLOP/s (2·N·K·D / median time)")
    fig.legend(loc="lower center", ncol=3, fontsize=8, frameon=False)
    if env:
        fig.suptitle(run_label(env), fontsize=9)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def _nvidia_smi_driver() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except Exception:  # noqa: BLE001
        return None
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return lines[0] if lines else None


def distribution_version(name: str) -> str:
    """The installed version of the distribution ``name`` (e.g. "vector-quantize-pytorch"), or "not installed"."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"
    except Exception:  # noqa: BLE001 - broken metadata: a settings cell only
        return "unknown"


def git_commit(where: Path | None = None) -> str:
    """``git rev-parse --short HEAD`` of the checkout holding ``where`` (default: this package's folder),
    followed by " (uncommitted changes)" when tracked files differ from it; "" without git or a checkout."""
    git = shutil.which("git")
    if git is None:
        return ""
    cwd = Path(where) if where is not None else Path(__file__).resolve().parent

    def run(*args: str) -> str:
        # --no-optional-locks: a status that refreshes nothing, so no lock is taken in the checkout.
        return subprocess.run([git, "--no-optional-locks", *args], cwd=cwd, capture_output=True, text=True,
                              timeout=20, check=True).stdout.strip()

    try:
        # Only vqfast's own checkout: an installed copy inside another project's repository would
        # otherwise record that project's commit.
        if where is None and Path(run("rev-parse", "--show-toplevel")).resolve() != cwd.parent:
            return ""
        head = run("rev-parse", "--short", "HEAD")
    except Exception:  # noqa: BLE001 - not a checkout, or git failed: no commit to record
        return ""
    try:
        changed = bool(run("status", "--porcelain", "--untracked-files=no"))
    except Exception:  # noqa: BLE001
        changed = False
    return head + (" (uncommitted changes)" if head and changed else "")


def collect_env(device: torch.device, mode: str = "") -> dict[str, str]:
    """GPU name, driver, CUDA, torch, triton, vqfast and vector-quantize-pytorch versions, the checkout's
    commit, date and mode of the run."""
    from vqfast import __version__ as vqfast_version

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = "not installed"
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        total = torch.cuda.get_device_properties(device).total_memory
        gpu_memory = f"{total / 2**30:.1f} GiB"
    else:
        gpu = f"cpu ({platform.processor() or platform.machine()})"
        gpu_memory = ""
    driver = _nvidia_smi_driver() or f"n/a (CUDA runtime {torch.version.cuda})"
    return {
        "gpu": gpu, "gpu_memory": gpu_memory, "driver": driver, "cuda": str(torch.version.cuda),
        "torch": torch.__version__, "triton": triton_version, "vqfast": vqfast_version,
        "vector_quantize_pytorch": distribution_version("vector-quantize-pytorch"), "commit": git_commit(),
        "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "mode": mode, "autotune": "1" if env_switch("VQFAST_AUTOTUNE", True) else "0", "fp32_search": FP32_SEARCH,
    }


def write_outputs(out_dir: Path, records: Sequence[Record], env: dict[str, str], plots: bool = True) -> list[Path]:
    """results.csv, results.md and the plots; returns the paths written. A plot this run does not draw
    (no K sweeps, or no headline) is removed: an earlier run's would sit beside these tables as if it
    were theirs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "results.csv", out_dir / "results.md"]
    write_csv(written[0], records, env)
    written[1].write_text(render_markdown(records, env))
    for fn, name in zip((plot_time_vs_k, plot_tflops, plot_headline), (*PLOT_NAMES, HEADLINE_PLOT)):
        p = None
        if plots:
            try:
                p = fn(records, out_dir / name, env)
            except Exception as exc:  # noqa: BLE001 - a plot must not lose the tables
                print(f"warning: could not draw {name}: {exc}", file=sys.stderr)
        if p is None:
            (out_dir / name).unlink(missing_ok=True)
        else:
            written.append(p)
    return written


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM (e.g. from ``timeout``) raises KeyboardInterrupt, so the results so far get written."""
    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _TimeLimit(KeyboardInterrupt):
    """The run's hard time limit passed: the point being measured is stopped, the rest skipped."""


def hard_time_limit_s(plan: Plan) -> float:
    """Seconds of measuring after which a run stops even inside a point (the budget only stops new
    points from starting, and one point, a cold compile say, can take long): the budget and a margin."""
    return plan.budget_s + max(10.0, 0.1 * plan.budget_s)


@contextlib.contextmanager
def _hard_time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`_TimeLimit` in the main thread after ``seconds`` (SIGALRM); None: no limit."""
    if seconds is None or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise _TimeLimit(f"time limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _frozen_gc(enabled: bool) -> Iterator[None]:
    """``gc.freeze()`` for the run: the objects of torch, Triton and inductor are then never scanned,
    so the collections that happen along the way stay short."""
    if enabled:
        gc.freeze()
    try:
        yield
    finally:
        if enabled:
            gc.unfreeze()


def list_unreached(ctx: Context, steps: Sequence[str], limit: str) -> None:
    """After the hard time limit: the budget is spent, so the runners of ``steps`` (the one the limit
    stopped, then those never started) only list their points as ``skipped (time budget)``, but for the
    rows already there; and a record that says the run was cut short."""
    ctx.budget.stop()
    for part in steps:
        try:
            PART_RUNNERS[part](ctx)
        except Exception:  # noqa: BLE001 - the listing must not lose the tables
            ctx.log(traceback.format_exc())
    ctx.add(Record(RUN_PART, CUT_SHORT, "-", "-", status=f"stopped at the hard time limit{f' ({limit})' if limit else ''}",
                   note="points not reached are listed as skipped (time budget)"))


def cut_short(records: Sequence[Record]) -> bool:
    """Whether the run of ``records`` was stopped by its hard time limit."""
    return any(r.part == RUN_PART and r.case == CUT_SHORT for r in records)


def run_benchmarks(plan: Plan, parts: Sequence[str], out_dir: Path, device: torch.device | None = None,
                   plots: bool = True, log: Callable[[str], None] | None = None,
                   cpu_memory_limit: float = 4e9) -> list[Record]:
    """Measure ``parts`` of ``plan`` on ``device`` (CUDA; CPU only for tests) and write the outputs.
    A plan without ``autotune`` runs with ``VQFAST_AUTOTUNE=0`` unless the variable is set."""
    if not plan.autotune and "VQFAST_AUTOTUNE" not in os.environ:
        with environment("VQFAST_AUTOTUNE", "0"):
            return run_benchmarks(plan, parts, out_dir, device, plots, log, cpu_memory_limit)
    log = log or _say
    device = device or torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    env = collect_env(device, plan.mode)
    meter = Meter(device, plan.warmup_ms, plan.rep_ms, cpu_memory_limit=cpu_memory_limit)
    steps = [*parts, TMA_STEP] if "headline" in parts and _tma_points(plan) else list(parts)
    budget = Budget(plan.budget_s, steps)
    meter.time_left = budget.remaining
    ctx = Context(device, plan, meter, budget, log=log,
                  on_record=lambda: write_outputs(out_dir, ctx.records, env, plots=False))
    log(f"vqfast bench ({plan.mode}): {env['gpu']}, driver {env['driver']}, torch {env['torch']}, "
        f"triton {env['triton']}; budget {plan.budget_s:.0f} s; writing to {out_dir}")
    # On the GPU a hard limit too (the budget only keeps new points from starting); the CPU runs of
    # the tests, through the interpreter, are not timed against it.
    limit = hard_time_limit_s(plan) if device.type == "cuda" else None
    reached = 0  # steps started
    stopped_at_limit = False
    with _stop_on_sigterm(), _hard_time_limit(limit), _frozen_gc(device.type == "cuda"):
        try:
            run_ceilings(ctx)
            for part in steps:
                reached += 1
                budget.start_part(part)
                t0 = time.monotonic()
                try:
                    PART_RUNNERS[part](ctx)
                except Exception as exc:  # noqa: BLE001 - a bug in one part must not cost the others
                    log(traceback.format_exc())
                    # (The TMA step's records belong to the headline; its provider says which step stopped.)
                    ctx.add(Record("headline" if part == TMA_STEP else part, CRASHED,
                                   TMA_PROVIDER if part == TMA_STEP else "-", "-", status=_error_status(exc)))
                    meter.free(collect=True)
                log(f"[{part}] done in {time.monotonic() - t0:.0f} s")
                write_outputs(out_dir, ctx.records, env, plots=False)  # tables now, plots once at the end
        except _TimeLimit:
            # The tables and plots of what was measured are written below, as after a complete run.
            log(f"hard time limit{f' ({limit:.0f} s)' if limit is not None else ''} reached: the point being "
                "measured was stopped, the rest skipped")
            meter.free(collect=True)
            stopped_at_limit = True
        except KeyboardInterrupt:
            # Ctrl-C, or SIGTERM from a time limit: keep what was measured.
            log("stopped: writing what was measured so far")
            write_outputs(out_dir, ctx.records, env, plots=plots)
            raise
    if stopped_at_limit:
        list_unreached(ctx, steps[max(0, reached - 1):], f"{limit:.0f} s" if limit is not None else "")
    written = write_outputs(out_dir, ctx.records, env, plots=plots)
    if any(r.part == "headline" for r in ctx.records):
        log("\n" + headline_table(ctx.records))
    log("wrote " + ", ".join(str(p) for p in written))
    return ctx.records


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def parse_parts(text: str) -> tuple[str, ...]:
    """``"nearest,layer"`` -> ("nearest", "layer"), in the suite's order; unknown names are an error."""
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in PARTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown part(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(PARTS)}")
    return tuple(p for p in PARTS if p in names)


def positive_number(text: str) -> float:
    """An option's value as a finite number above 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number above 0, got {text!r}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``vqfast bench`` / ``python benchmarks/run.py``."""
    parser.description = ("Time vqfast's kernels, layer and a VQ-VAE training step against plain PyTorch on a "
                          "CUDA GPU; write results.csv, results.md and PNG plots.")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: benchmarks/results/<gpu-name>/ under the current directory)")
    parser.add_argument("--quick", action="store_true",
                        help="a few shapes only (85 s of measuring; under 2 minutes in all once Triton's cache is warm), "
                             "with the launchers' fixed configurations (VQFAST_AUTOTUNE=0, unless set)")
    parser.add_argument("--autotune", action="store_true",
                        help="with --quick: autotune the launch configurations as the full run does "
                             "(every candidate compiles on a cold Triton cache); a full run autotunes anyway")
    parser.add_argument("--only", type=parse_parts, default=PARTS, metavar="PARTS",
                        help=f"comma-separated parts to run, from: {','.join(PARTS)} (default: all)")
    parser.add_argument("--budget", type=positive_number, default=None, metavar="SECONDS",
                        help=f"time budget for measuring; points past it are reported as skipped "
                             f"(default {DEFAULT_BUDGET_S:.0f}, --quick {QUICK_BUDGET_S:.0f})")
    parser.add_argument("--rep", type=positive_number, default=None, metavar="MS",
                        help="do_bench repetition time per measurement in ms (default 100, --quick 40)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def main(args: argparse.Namespace) -> int:
    """Entry point of ``vqfast bench``: 0 on success; 1 when a part stopped on an error, a vqfast row failed
    its check or raised, or the run was stopped (Ctrl-C, SIGTERM); 2 without a CUDA GPU; 3 (EXIT_CUT_SHORT)
    when its hard time limit cut the run short, with nothing failed before."""
    if not torch.cuda.is_available():
        print("vqfast bench needs a CUDA GPU, and torch.cuda.is_available() is False here "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}). Run it on a machine with an "
              "NVIDIA GPU; see benchmarks/README.md.", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("vqfast bench needs triton (pip install triton).", file=sys.stderr)
        return 2
    plan = quick_plan() if getattr(args, "quick", False) else default_plan()
    if getattr(args, "autotune", False):
        plan.autotune = True
    if getattr(args, "budget", None) is not None:
        plan.budget_s = float(args.budget)
    if getattr(args, "rep", None) is not None:
        plan.rep_ms = float(args.rep)
    parts = getattr(args, "only", None) or PARTS
    out = getattr(args, "out", None) or Path("benchmarks") / "results" / gpu_slug(torch.cuda.get_device_name())
    try:
        records = run_benchmarks(plan, parts, Path(out), plots=not getattr(args, "no_plots", False))
    except KeyboardInterrupt:
        print("vqfast bench stopped; the tables hold what was measured", file=sys.stderr)
        return 1
    return exit_status(records)


def exit_status(records: Sequence[Record]) -> int:
    """``vqfast bench``'s exit status for a run that ended with ``records`` (see :func:`main`)."""
    if any(r.case == CRASHED for r in records) or vqfast_failures(records):
        return 1
    return EXIT_CUT_SHORT if cut_short(records) else 0


def vqfast_failures(records: Sequence[Record]) -> list[Record]:
    """vqfast's own rows that failed their correctness check or raised an error (not OOM or skips)."""
    return [r for r in records if r.provider.startswith("vqfast")
            and (r.check in ("fail", "error") or r.status.startswith("error"))]
