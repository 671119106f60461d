"""benchmarks/training_table.py: one table and plot for a folder of training runs."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fake_run(folder: Path, model: str, impl: str, batch: int, losses: list[float], test_psnr: float | None,
              finished: bool = True, test_epoch: int | None = None, held_out: bool = True) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model": model, "vq_impl": impl, "vq_preset": "vqfast",
                                                    "batch_size": batch}))
    lines = [json.dumps({"epoch": i + 1, "avg_loss": loss, "psnr": 20.0 + i, "seconds": 2.0 + i,
                         "codes_used": 100 * (i + 1), "perplexity": 50.0 * (i + 1)})
             for i, loss in enumerate(losses)]
    if test_psnr is not None:
        lines.append(json.dumps({"event": "test", "epoch": test_epoch or len(losses), "psnr": test_psnr,
                                 "codes_used": 77, "held_out": held_out}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if finished:
        (folder / "summary.json").write_text("{}")


def test_table_and_plot_from_runs(tmp_path):
    _fake_run(tmp_path / "vq-b64", "vqvae", "vqfast", 64, [90.0, 50.0, 40.0], 21.5)
    _fake_run(tmp_path / "ae-b64", "ae", "vqfast", 64, [48.0, 20.0], 25.0)
    (tmp_path / "killed").mkdir()  # a run stopped before its first epoch: skipped
    (tmp_path / "killed" / "config.json").write_text("{}")
    # Stopped by a time limit after two epochs: listed with what it finished.
    _fake_run(tmp_path / "vae-b64", "vae", "vqfast", 64, [60.0, 40.0], None, finished=False)
    # Resumed for more epochs and stopped again: its test is the earlier part's, and says so.
    _fake_run(tmp_path / "vq-resumed", "vqvae", "vqfast", 64, [90.0, 50.0, 45.0], 19.0, finished=False,
              test_epoch=2)
    # Trained on a source without a test split: its "test" was run on training images, and says so.
    _fake_run(tmp_path / "ae-no-split", "ae", "vqfast", 64, [48.0], 18.25, held_out=False)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "training_table.py"), str(tmp_path)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "training_summary.md").read_text().splitlines()
    assert len(table) == 7  # header, rule, five runs
    assert "| 18.25 (training images) | 100 | 50 | 77 (training images) |" in next(
        line for line in table if line.startswith("| ae-no-split "))
    assert "| 19.00 (after epoch 2) |" in next(line for line in table if line.startswith("| vq-resumed "))
    assert any(line.startswith("| vae-b64 (stopped) | vae | 64 | 2 |") for line in table)
    vq = next(line for line in table if line.startswith("| vq-b64 "))
    assert "| vqvae, vqfast, vqfast settings | 64 | 3 | 3.00 | 40.000 | 22.00 | 21.50 | 300 | 150 | 77 |" in vq
    assert (tmp_path / "training_loss_curves.png").stat().st_size > 1000


def test_no_runs_is_an_error(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "training_table.py"), str(tmp_path)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1 and "no vqfast train runs" in proc.stderr
