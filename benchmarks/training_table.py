"""One table and one loss-curve plot for a folder of `vqfast train` runs.

    python benchmarks/training_table.py RUNS_DIR [--out DIR]

Reads every ``RUNS_DIR/*/`` that holds ``config.json`` and ``metrics.jsonl`` with at least one epoch
(what `vqfast train` writes; `benchmarks/gpu_run.sh train` puts its runs in ``training/``; a run stopped
before its end, without ``summary.json``, is marked "stopped") and writes
``training_summary.md`` (model, VQ step and settings, batch size, epochs, median time per epoch, the
last epoch's "Average loss" and PSNR, test PSNR, codes used and perplexity; a run whose source had no
test split evaluated on training images, which its "test" columns say) and
``training_loss_curves.png`` (the article's "Average loss" per epoch, one line per run) to ``--out``
(default: RUNS_DIR).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Run:
    name: str
    config: dict
    epochs: list[dict] = field(default_factory=list)
    test: dict = field(default_factory=dict)
    finished: bool = True

    @property
    def label(self) -> str:
        c = self.config
        if c["model"] != "vqvae":
            return c["model"]
        step = "article's VQ step (fixed)" if c.get("vq_impl") == "article" else "vqfast"
        return f"vqvae, {step}, {c.get('vq_preset', 'vqfast')} settings"


def load_runs(root: Path) -> list[Run]:
    runs = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = [folder / n for n in ("config.json", "metrics.jsonl")]
        if not all(f.is_file() for f in files):
            continue
        # A run stopped by a time limit keeps the epochs it finished in metrics.jsonl.
        run = Run(folder.name, json.loads(files[0].read_text()), finished=(folder / "summary.json").is_file())
        for line in files[1].read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec.get("event") == "test":
                run.test = rec
            elif "event" not in rec and "avg_loss" in rec:
                run.epochs.append(rec)
        if run.epochs:
            runs.append(run)
    return runs


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _test_psnr(run: Run) -> str:
    """The test PSNR, with the epoch it was measured after when that is not the run's last (a run stopped
    after a resumed part keeps the earlier part's test)."""
    text = _fmt(run.test.get("psnr"), ".2f")
    epoch = run.test.get("epoch")
    if text and epoch is not None and epoch != run.epochs[-1].get("epoch"):
        text += f" (after epoch {epoch})"
    return text + _training_images_mark(run, text)


def _training_images_mark(run: Run, text: str) -> str:
    """A mark for a "test" column filled by a run whose source had no test split: it evaluated on
    training images (``held_out`` false in its test record)."""
    return " (training images)" if text and run.test.get("held_out") is False else ""


def markdown(runs: list[Run]) -> str:
    headers = ["run", "model / VQ", "batch", "epochs", "s / epoch (median)", "Average loss (last epoch)",
               "train PSNR (dB)", "test PSNR (dB)", "codes used (train)", "perplexity (train)",
               "codes used (test)"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in runs:
        last = r.epochs[-1]
        lines.append("| " + " | ".join([
            r.name + ("" if r.finished else " (stopped)"), r.label, str(r.config.get("batch_size", "")),
            str(len(r.epochs)),
            _fmt(statistics.median(e["seconds"] for e in r.epochs), ".2f"),
            _fmt(last.get("avg_loss"), ".3f"), _fmt(last.get("psnr"), ".2f"), _test_psnr(r),
            _fmt(last.get("codes_used"), ","), _fmt(last.get("perplexity"), ",.0f"),
            _fmt(r.test.get("codes_used"), ",") + _training_images_mark(r, _fmt(r.test.get("codes_used"), ",")),
        ]) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: list[Run], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in runs:
        ax.plot([e["epoch"] for e in r.epochs], [e["avg_loss"] for e in r.epochs], marker="o", ms=3,
                label=f"{r.name} ({r.label}, batch {r.config.get('batch_size')})")
    ax.set_xlabel("epoch")
    ax.set_ylabel('"Average loss" (summed squared error per image)')
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="folder whose subfolders are vqfast train runs")
    parser.add_argument("--out", type=Path, help="where to write the table and plot (default: RUNS)")
    args = parser.parse_args(argv)
    runs = load_runs(args.runs)
    if not runs:
        print(f"no vqfast train runs with metrics under {args.runs}", file=sys.stderr)
        return 1
    out = args.out or args.runs
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(runs)
    (out / "training_summary.md").write_text(table)
    plotted = plot(runs, out / "training_loss_curves.png")
    print(table)
    print(f"wrote {out / 'training_summary.md'}" + (f" and {out / 'training_loss_curves.png'}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
