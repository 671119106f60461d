"""Training loop, checkpoints, resume, interruption, evaluation, CLI hooks and distributed training."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import os
import signal
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from vqfast.models import train as train_mod
from vqfast.models.train import (
    TrainConfig,
    configure_evaluate_parser,
    configure_train_parser,
    evaluate,
    evaluate_main,
    load_checkpoint,
    load_run,
    save_checkpoint,
    train,
    train_main,
)

# A VAE small enough for a few-second run; its noise draws make RNG restoration matter on resume.
# On the CPU even where there is a GPU: the resume tests compare weights bit for bit, which cuDNN's and
# the atomic scatter-adds' run-to-run differences would break.
TINY_VAE = dict(model="vae", data="sample", limit=96, batch_size=32, latent_dim=16, epochs=2, progress=False,
                eval_limit=64, grid_images=8, device="cpu")
TINY_VQ = dict(model="vqvae", data="sample", limit=64, batch_size=16, num_codes=32, code_dim=16, epochs=1,
               progress=False, eval_limit=32, grid_images=4, device="cpu")


pytestmark = pytest.mark.usefixtures("single_thread")


def _cfg(base: dict[str, Any], out: Path, **changes: Any) -> TrainConfig:
    return TrainConfig(**{**base, "out": str(out), **changes})


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def vae_reference(tmp_path_factory: pytest.TempPathFactory) -> train_mod.TrainResult:
    """The uninterrupted two-epoch tiny VAE run the resume tests compare against."""
    return train(_cfg(TINY_VAE, tmp_path_factory.mktemp("vae_ref")))


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory: pytest.TempPathFactory) -> train_mod.TrainResult:
    """A short VQ-VAE run with the article's architecture (4,096 codes of 128 dims) on real images."""
    return train(TrainConfig(model="vqvae", data="sample", limit=512, batch_size=16, epochs=2, progress=False,
                             eval_limit=500, device="cpu", out=str(tmp_path_factory.mktemp("vq_run"))))


def test_short_vqvae_run_reconstructs_better_than_the_mean_image(vq_run: train_mod.TrainResult) -> None:
    sample = np.load(Path(train_mod.__file__).parent / "assets" / "cifar10_sample_2k.npz")
    train_x = sample["x_train"][:512].astype(np.float64) / 255.0
    test_x = sample["x_test"].astype(np.float64) / 255.0
    mean_image_mse = float(((test_x - train_x.mean(0)) ** 2).mean())
    test = vq_run.test_metrics
    assert test is not None and test["images"] == 500
    assert test["mean_image_mse"] == pytest.approx(mean_image_mse, rel=1e-6)
    assert test["mse"] < 0.8 * mean_image_mse, (test["mse"], mean_image_mse)
    # the training loss went down over the run
    assert vq_run.history[-1]["avg_loss"] < vq_run.history[0]["avg_loss"]


def test_vqvae_run_outputs(vq_run: train_mod.TrainResult) -> None:
    d = vq_run.run_dir
    for name in ("config.json", "checkpoint.pt", "metrics.jsonl", "loss_curve.png", "reconstructions.png",
                 "codebook_usage.png", "codebook_usage.json", "train.log", "summary.json"):
        assert (d / name).is_file(), name
    for png in d.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    lines = [json.loads(s) for s in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("epoch") for r in lines] == [1, 2, 2] and lines[-1]["event"] == "test"
    for r in lines[:2]:
        assert r["images"] == 512 and r["batches"] == 512 // 16
        # the article's "Average loss" for the VQ-VAE: squared error summed per image
        assert r["avg_loss"] == pytest.approx(r["mse"] * 3072, rel=1e-9)
        assert r["psnr"] == pytest.approx(10 * np.log10(1 / r["mse"]))
        assert 1 <= r["codes_used"] <= 4096 and 1.0 <= r["perplexity"] <= r["codes_used"]
    usage = json.loads((d / "codebook_usage.json").read_text())
    assert usage["assignments"] == 500 * 16 and sum(usage["counts"]) == 500 * 16
    assert usage["codes_used"] == sum(c > 0 for c in usage["counts"])
    assert 1.0 <= usage["perplexity"] <= usage["codes_used"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model"] == "vqvae" and cfg["num_codes"] == 4096 and cfg["epochs"] == 2
    epoch_lines = [line for line in (d / "train.log").read_text().splitlines() if line.startswith("====> Epoch")]
    assert len(epoch_lines) == 2
    for line in epoch_lines:
        assert "Average loss" in line and "MSE/pixel" in line and "PSNR" in line and "dB" in line, line


def test_vae_run_outputs_and_metrics(vae_reference: train_mod.TrainResult) -> None:
    d = vae_reference.run_dir
    for name in ("samples.png", "blend.png", "reconstructions.png", "loss_curve.png"):
        assert (d / name).is_file(), name
    rec = vae_reference.history[-1]
    assert rec["avg_loss"] == pytest.approx(rec["sse_per_image"] + 0.1 * rec["kl_per_image"], rel=1e-6)
    assert rec["sse_per_image"] == pytest.approx(rec["mse"] * 3072, rel=1e-9)
    assert len(vae_reference.step_losses) == 2 * 3


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path: Path,
                                                         vae_reference: train_mod.TrainResult) -> None:
    first = train(_cfg(TINY_VAE, tmp_path, epochs=1))
    assert load_checkpoint(tmp_path)["epoch"] == 1
    resumed = train(_cfg(TINY_VAE, tmp_path, epochs=2, resume=True))
    assert [h["avg_loss"] for h in resumed.history] == [h["avg_loss"] for h in vae_reference.history]
    assert resumed.step_losses == vae_reference.step_losses
    _assert_same_weights(resumed.model.state_dict(), vae_reference.model.state_dict())
    assert first.history[0] == {**resumed.history[0], "seconds": first.history[0]["seconds"],
                                "images_per_s": first.history[0]["images_per_s"]}
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1 + 1 + 1 + 1  # 2 epochs, 2 tests


def _ctrl_c_after_step(monkeypatch: pytest.MonkeyPatch, step: int) -> Any:
    """Make training send itself SIGINT (as Ctrl-C) right after its ``step``-th train step (from 1);
    returns the real ``train_step``, to put back."""
    real_step = train_mod.train_step
    calls = {"n": 0}

    def step_then_ctrl_c(*args: Any, **kwargs: Any) -> Any:
        out = real_step(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(train_mod, "train_step", step_then_ctrl_c)
    return real_step


def test_ctrl_c_mid_epoch_checkpoints_and_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          vae_reference: train_mod.TrainResult,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    real_step = _ctrl_c_after_step(monkeypatch, 5)  # epoch 2, batch 2 of 3
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in the background
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(TINY_VAE, tmp_path))
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    state = load_checkpoint(tmp_path)
    assert (state["epoch"], state["batch"]) == (1, 2)
    assert state["epoch_seconds"] > 0  # the interrupted epoch's time so far
    # evaluated as it stands, the run says how far it got
    parser = argparse.ArgumentParser()
    configure_evaluate_parser(parser)
    assert evaluate_main(parser.parse_args([str(tmp_path), "--limit", "4", "--worst", "0", "--no-progress",
                                            "--out", str(tmp_path / "eval")])) == 0
    assert "vae (1 epoch and 2 batches) on sample test" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval" / "eval-sample-test.json").read_text())["batches_trained"] == 2
    monkeypatch.setattr(train_mod, "train_step", real_step)
    # As an older vqfast's checkpoint: its shuffling differed, which the resume warns of (here the order
    # is in fact the same: only the record is changed).
    state["shuffle"] = "an older scheme"
    save_checkpoint(state, tmp_path / "checkpoint.pt")
    capsys.readouterr()
    resumed = train(_cfg(TINY_VAE, tmp_path, resume=True))
    printed = capsys.readouterr()
    assert f"Resuming {tmp_path} at epoch 2 of 2, after batch 2 of 3\n" in printed.out
    assert "shuffled differently" in printed.err and "shuffled differently" in (tmp_path / "train.log").read_text()
    assert [h["avg_loss"] for h in resumed.history] == [h["avg_loss"] for h in vae_reference.history]
    _assert_same_weights(resumed.model.state_dict(), vae_reference.model.state_dict())
    # The resumed epoch's time is both parts', and its speed counts all 96 images over it.
    last = resumed.history[1]
    assert last["images"] == 96 and last["seconds"] > state["epoch_seconds"]
    assert last["images_per_s"] * last["seconds"] == pytest.approx(96)


@pytest.mark.parametrize("vq_kwargs, stop_after", [
    (None, 3),  # the defaults: restarts draw from the RNG and read the running usage
    ({"init": "kmeans", "kmeans_batches": 2, "kmeans_iters": 2}, 1),  # stopped while k-means pools batches
], ids=["defaults", "kmeans-pooling"])
def test_vqvae_ctrl_c_mid_epoch_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 vq_kwargs: dict[str, Any] | None, stop_after: int) -> None:
    changes = dict(epochs=2, eval_limit=16, **({"vq_kwargs": vq_kwargs} if vq_kwargs else {}))
    reference = train(_cfg(TINY_VQ, tmp_path / "reference", **changes))
    real_step = _ctrl_c_after_step(monkeypatch, stop_after)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(TINY_VQ, tmp_path / "run", **changes))
    state = load_checkpoint(tmp_path / "run")
    assert (state["epoch"], state["batch"]) == (0, stop_after)
    if vq_kwargs:
        assert state["model_state"]["quantizer.kmeans_pool_batches"] == 1
        assert state["model_state"]["quantizer.kmeans_pool"].shape == (16 * 4 * 4, 16)  # one batch of 4 x 4 latent grids
    monkeypatch.setattr(train_mod, "train_step", real_step)
    resumed = train(_cfg(TINY_VQ, tmp_path / "run", resume=True, **changes))
    assert resumed.step_losses == reference.step_losses
    _assert_same_weights(resumed.model.state_dict(), reference.model.state_dict())


def test_ctrl_c_in_the_last_batch_of_an_epoch_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              vae_reference: train_mod.TrainResult) -> None:
    # Epoch 1, batch 3 of 3: the loop stops before the sampler's pass ends.
    real_step = _ctrl_c_after_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(TINY_VAE, tmp_path))
    state = load_checkpoint(tmp_path)
    assert (state["epoch"], state["batch"]) == (1, 0)
    monkeypatch.setattr(train_mod, "train_step", real_step)
    resumed = train(_cfg(TINY_VAE, tmp_path, resume=True))
    assert resumed.step_losses == vae_reference.step_losses
    _assert_same_weights(resumed.model.state_dict(), vae_reference.model.state_dict())


@pytest.mark.parametrize("when", ["last batch", "summary"])
def test_ctrl_c_after_the_last_step_lets_the_run_finish(when: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str],
                                                       vae_reference: train_mod.TrainResult) -> None:
    # The training is complete: the run writes its summary and pictures instead of stopping without them.
    if when == "last batch":
        _ctrl_c_after_step(monkeypatch, 6)  # epoch 2, batch 3 of 3
    else:
        real_finish = train_mod._finish_run

        def ctrl_c_then_finish(*args: Any, **kwargs: Any) -> Any:
            os.kill(os.getpid(), signal.SIGINT)
            return real_finish(*args, **kwargs)

        monkeypatch.setattr(train_mod, "_finish_run", ctrl_c_then_finish)
    before = signal.getsignal(signal.SIGINT)
    result = train(_cfg(TINY_VAE, tmp_path))
    assert signal.getsignal(signal.SIGINT) is before
    assert result.test_metrics is not None and (tmp_path / "summary.json").is_file()
    assert (tmp_path / "samples.png").is_file()
    assert [h["avg_loss"] for h in result.history] == [h["avg_loss"] for h in vae_reference.history]
    assert load_checkpoint(tmp_path)["epoch"] == 2
    err = capsys.readouterr().err
    assert "finishing the run and its summary" in err and "stopping after this batch" not in err


def test_progress_bar_does_not_change_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    quiet = train(_cfg(TINY_VQ, tmp_path / "quiet", eval_limit=16))
    with_bar = train(_cfg(TINY_VQ, tmp_path / "bar", eval_limit=16, progress=True))
    assert "epoch 1/1" in capsys.readouterr().err  # the bar was really drawn
    assert with_bar.step_losses == quiet.step_losses
    assert with_bar.history[0]["avg_loss"] == quiet.history[0]["avg_loss"]
    _assert_same_weights(with_bar.model.state_dict(), quiet.model.state_dict())


def test_checkpoint_survives_a_crash_mid_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint.pt"
    good = {"format": "vqfast-run-1", "epoch": 3, "w": torch.arange(1000.0)}
    save_checkpoint(good, path)
    real_save = torch.save

    def half_written(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"PK\x03\x04 partial data")  # some bytes hit the disk, then the process "dies"
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint({"format": "vqfast-run-1", "epoch": 4, "w": torch.zeros(1000)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    back = load_checkpoint(path)
    assert back["epoch"] == 3 and torch.equal(back["w"], good["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary left behind


def test_temporaries_of_killed_writers_are_removed(tmp_path: Path) -> None:
    # A process killed mid-write (SIGKILL) leaves its temporary behind; the next save removes it, but
    # not one whose writer is still alive.
    import subprocess
    import sys

    dead_pid = subprocess.Popen([sys.executable, "-c", "pass"])  # its pid is free once it has exited
    dead_pid.wait()
    path = tmp_path / "checkpoint.pt"
    dead = tmp_path / f".checkpoint.pt.{dead_pid.pid}.tmp"
    alive = tmp_path / f".checkpoint.pt.{os.getppid()}.tmp"
    dead.write_bytes(b"\x00" * 100)
    alive.write_bytes(b"\x00" * 100)
    save_checkpoint({"format": "vqfast-run-1", "epoch": 1}, path)
    assert not dead.exists() and alive.exists()
    assert load_checkpoint(path)["epoch"] == 1


def test_interrupt_during_checkpoint_write_keeps_the_previous_one(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = torch.save
    calls = {"n": 0}

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the end-of-epoch-1 checkpoint (the first is the initial one)
            f.write(b"\x00" * 100)
            raise KeyboardInterrupt
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(TINY_VQ, tmp_path))
    monkeypatch.setattr(torch, "save", real_save)
    state = load_checkpoint(tmp_path)
    assert (state["epoch"], state["batch"]) == (0, 0)
    # ... and that checkpoint is a valid starting point
    result = train(_cfg(TINY_VQ, tmp_path, resume=True))
    assert len(result.history) == 1


def test_resuming_a_finished_run_evaluates_it_again_without_a_second_record(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    first = train(_cfg(TINY_VQ, tmp_path, eval_limit=16))
    capsys.readouterr()
    again = train(_cfg(TINY_VQ, tmp_path, eval_limit=16, resume=True))
    printed = capsys.readouterr().out
    assert "has already trained for 1 epoch" in printed and "Training vqvae" not in printed
    assert again.history == first.history
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(e.get("event", "epoch"), e["epoch"]) for e in events] == [("epoch", 1), ("test", 1)]
    assert events[1]["mse"] == pytest.approx(again.test_metrics["mse"])
    # Training on keeps the earlier test record: each epoch's test stays in the history.
    train(_cfg(TINY_VQ, tmp_path, eval_limit=16, resume=True, epochs=2))
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(e.get("event", "epoch"), e["epoch"]) for e in events] == [("epoch", 1), ("test", 1), ("epoch", 2), ("test", 2)]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_existing_run_is_not_overwritten_by_accident(tmp_path: Path) -> None:
    train(_cfg(TINY_VQ, tmp_path, eval_limit=16))
    with pytest.raises(FileExistsError, match="resume"):
        train(_cfg(TINY_VQ, tmp_path))
    again = train(_cfg(TINY_VQ, tmp_path, overwrite=True, eval_limit=16))
    assert len(again.history) == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_evaluate_reports_reconstruction_and_anomaly_scores(vq_run: train_mod.TrainResult, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    summary = evaluate(vq_run.run_dir, data="sample", ood="synthetic", limit=100, out_dir=tmp_path, worst=4)
    assert summary["images"] == 100 and summary["model"] == "vqvae" and summary["epochs_trained"] == 2
    assert summary["mse"] == pytest.approx(summary["score_mean"] / 3072)
    assert summary["psnr"] == pytest.approx(10 * np.log10(1 / summary["mse"]))
    assert 0.0 <= summary["ood"]["auroc"] <= 1.0 and summary["ood"]["images"] == 100
    rows = (tmp_path / "eval-sample-test.csv").read_text().splitlines()
    assert rows[0].startswith("source,index,label,sse,mse,psnr") and len(rows) == 101
    scores = [float(r.split(",")[3]) for r in rows[1:]]
    assert max(scores) == pytest.approx(summary["score_max"], rel=1e-6)
    assert summary["worst"][0][1] == pytest.approx(max(scores), rel=1e-6)
    ood_rows = (tmp_path / "eval-sample-test-ood-synthetic-test.csv").read_text().splitlines()
    ood_scores = [float(r.split(",")[3]) for r in ood_rows[1:]]
    assert len(ood_scores) == 100 and max(ood_scores) == pytest.approx(summary["ood"]["score_max"], rel=1e-6)
    # Flagged by the in-distribution threshold, as the summary's share says.
    flagged = [int(r.split(",")[6]) for r in ood_rows[1:]]
    assert sum(flagged) / 100 == pytest.approx(summary["ood"]["flagged_at_p95"])
    assert not list(tmp_path.glob("*.partial"))
    assert (tmp_path / "eval-sample-test-worst.png").is_file()
    assert json.loads((tmp_path / "eval-sample-test.json").read_text())["images"] == 100

    parser = argparse.ArgumentParser()
    configure_evaluate_parser(parser)
    args = parser.parse_args([str(vq_run.run_dir), "--data", "sample", "--limit", "50", "--out", str(tmp_path)])
    assert evaluate_main(args) == 0
    out = capsys.readouterr().out
    assert "PSNR" in out and "anomaly score" in out
    # the module's own entry point (python -m vqfast.models) reaches the same code
    assert train_mod.main(["evaluate", str(vq_run.run_dir), "--data", "sample", "--limit", "20", "--ood",
                           "synthetic", "--worst", "0", "--out", str(tmp_path / "m")]) == 0
    assert "AUROC" in capsys.readouterr().out
    assert train_mod.main(["evaluate", str(tmp_path / "no-such-run")]) == 2
    assert not any("--ood" in note for note in summary.get("notes", ()))
    # --ood of the very images of --data: the AUROC is 0.5 by construction, and the summary says so.
    assert train_mod.main(["evaluate", str(vq_run.run_dir), "--data", "sample", "--limit", "20", "--ood",
                           "sample", "--worst", "0", "--out", str(tmp_path / "same")]) == 0
    out = capsys.readouterr().out
    assert "AUROC 0.500" in out and "note: --ood scored the same images as --data (sample test)" in out
    # The run's training images (its --limit of the split) against images of the whole split: no such note.
    summary = evaluate(vq_run.run_dir, split="train", ood="sample", limit=20, out_dir=tmp_path / "train", worst=0)
    assert not any("--ood" in note for note in summary.get("notes", ()))


def test_evaluated_model_is_the_trained_one(vq_run: train_mod.TrainResult) -> None:
    model, cfg, state = load_run(vq_run.run_dir)
    _assert_same_weights(model.state_dict(), vq_run.model.state_dict())
    assert cfg.model == "vqvae" and state["epoch"] == 2


def test_cli_options_map_onto_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VQFAST_BACKEND", "auto")
    parser = argparse.ArgumentParser()
    configure_train_parser(parser)
    args = parser.parse_args(["vqvae", "--epochs", "1", "--batch-size", "16", "--lr", "2e-3", "--codes", "32",
                              "--code-dim", "8", "--beta", "0.25", "--codebook-init", "layer",
                              "--vq-option", "init=uniform", "--backend", "torch", "--device", "cpu",
                              "--data", "sample", "--limit", "32", "--out", str(tmp_path), "--no-progress",
                              "--eval-limit", "16", "--seed", "3", "--grid-images", "4"])
    cfg = train_mod._config_from_args(args)
    # Every field has its option (the parser's destinations are the fields' names).
    assert {f.name for f in dataclasses.fields(train_mod.TrainConfig)} <= set(vars(args))
    assert (cfg.model, cfg.epochs, cfg.batch_size, cfg.lr, cfg.grid_images) == ("vqvae", 1, 16, 2e-3, 4)
    assert (cfg.num_codes, cfg.code_dim, cfg.beta, cfg.codebook_init) == (32, 8, 0.25, None)
    assert cfg.vq_kwargs == {"init": "uniform"} and cfg.backend == "torch" and cfg.seed == 3
    seen = []
    inner = train_mod._train
    monkeypatch.setattr(train_mod, "_train", lambda *a, **k: (seen.append(os.environ.get("VQFAST_BACKEND")),
                                                               inner(*a, **k))[1])
    assert train_main(args) == 0
    # --backend holds while the run trains; afterwards the caller's setting is back.
    assert seen == ["torch"] and os.environ.get("VQFAST_BACKEND") == "auto"
    assert load_checkpoint(tmp_path)["epoch"] == 1
    defaults = train_mod._config_from_args(parser.parse_args(["ae"]))
    assert defaults.resolved_epochs() == 20 and defaults.latent_dim == 1024 and defaults.kl_weight == 0.1
    assert train_main(parser.parse_args(["ae", "--data", str(tmp_path / "missing.npz"), "--out",
                                         str(tmp_path / "x")])) == 2


def test_auroc_matches_pairwise_counting() -> None:
    g = torch.Generator().manual_seed(0)
    neg = torch.randint(0, 20, (40,), generator=g).double()
    pos = torch.randint(5, 25, (30,), generator=g).double()
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert train_mod._auroc(neg, pos) == pytest.approx(float(pairs.mean()))


def test_batch_sampler_skips_on_indices() -> None:
    gen = torch.Generator().manual_seed(0)
    sampler = torch.utils.data.RandomSampler(range(10), generator=gen)
    bs = train_mod._ResumableBatchSampler(sampler, 3)
    state = gen.get_state()
    full = list(bs)
    gen.set_state(state)
    bs.skip = 2
    assert len(bs) == 2
    assert list(bs) == full[2:]
    assert len(bs) == 4  # the skip applies to one pass only


# ------------------------------------------------------------------------------ distributed (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank: int, world: int, port: int, run_dir: str, result_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from vqfast.models.train import train as run

    # One process group for the runs below (a run that finds one uses it and leaves it up).
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # 63 images: the two equal shards hold 31 each, and one image sits the epoch out.
        result = run(TrainConfig(**{**TINY_VQ, "out": run_dir, "device": "cpu", "batch_size": 8, "limit": 63}))
        # k-means pooling 6 batches, 4 per epoch: the checkpoint after epoch 1 holds each rank's own pool
        # of 4, and the resumed run must match the uninterrupted one.
        pooling = {**TINY_VQ, "device": "cpu", "batch_size": 8, "eval_limit": 8,
                   "vq_kwargs": {"init": "kmeans", "kmeans_batches": 6, "kmeans_iters": 2}}
        whole = run(TrainConfig(**{**pooling, "out": run_dir + "-kmeans-whole", "epochs": 2}))
        run(TrainConfig(**{**pooling, "out": run_dir + "-kmeans-split", "epochs": 1}))
        resumed = run(TrainConfig(**{**pooling, "out": run_dir + "-kmeans-split", "epochs": 2, "resume": True}))
        torch.save({"state": result.model.state_dict(), "history": result.history,
                    "kmeans_whole": whole.model.state_dict(), "kmeans_resumed": resumed.model.state_dict(),
                    "kmeans_losses": (whole.step_losses, resumed.step_losses)},
                   Path(result_dir) / f"rank{rank}.pt")
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_gloo_training_keeps_ranks_identical(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    run_dir, result_dir = tmp_path / "run", tmp_path / "results"
    result_dir.mkdir()
    mp.spawn(_distributed_worker, args=(2, _free_port(), str(run_dir), str(result_dir)), nprocs=2, join=True)
    r0 = torch.load(result_dir / "rank0.pt", weights_only=True)
    r1 = torch.load(result_dir / "rank1.pt", weights_only=True)
    _assert_same_weights(r0["state"], r1["state"])
    for r in (r0, r1):  # resumed while k-means pooled: each rank got its own pool back
        _assert_same_weights(r["kmeans_resumed"], r["kmeans_whole"])
    assert r0["kmeans_losses"][0] == r0["kmeans_losses"][1]  # (the step losses kept are rank 0's)
    state = load_checkpoint(Path(str(run_dir) + "-kmeans-split"))
    assert state["kmeans_pools"] == [{}, {}]  # k-means ran: no rank pools any more
    # metrics are summed over both ranks' shards: 62 of the 63 images, none counted twice
    assert r0["history"][0]["images"] == 62 == r1["history"][0]["images"]
    assert r0["history"][0]["avg_loss"] == r1["history"][0]["avg_loss"]
    state = load_checkpoint(run_dir)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["epoch"] == 1
    # Rank 0 alone writes the outputs: one log line per event, one metrics record per epoch and test.
    log = (run_dir / "train.log").read_text()
    assert log.count("====> Epoch: 1") == 1 and log.count("Training vqvae") == 1
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    _assert_same_weights(state["model_state"], r0["state"])
    # training changed the weights
    torch.manual_seed(TINY_VQ.get("seed", 0))
    from vqfast.models import build_model

    init = build_model("vqvae", num_codes=32, code_dim=16).state_dict()
    assert not torch.equal(init["encoder.0.weight"], r0["state"]["encoder.0.weight"])


def _fallback_worker(rank: int, world: int, port: int, out: str, result_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from vqfast.models import data as data_mod
    from vqfast.models.train import train as run

    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    outcomes = {}
    try:
        # CIFAR-10 (a stand-in) on some ranks only, as on machines with different data folders.
        for case, found in (("rank0-has-it", rank == 0), ("rank0-lacks-it", rank != 0)):
            def load_cifar10(root, train=True, download=True, found=found):
                if not found:
                    raise data_mod.DatasetUnavailable(f"CIFAR-10 is not in {root}")
                return data_mod.synthetic_images(32, seed=7)

            data_mod.load_cifar10 = load_cifar10
            config = dict(model="ae", data="cifar10", limit=32, batch_size=8, latent_dim=16, epochs=1, progress=False,
                          eval_limit=8, grid_images=4, device="cpu", out=str(Path(out) / case))
            try:
                outcomes[case] = run(TrainConfig(**config)).config.data
            except Exception as exc:
                outcomes[case] = f"{type(exc).__name__}: {exc}"
        # The same source with other contents on rank 1 (another copy of the files): found before training,
        # whether it holds fewer images or as many other ones.
        sample = data_mod.load_sample
        for case, n in (("copies-differ", 40), ("copies-differ-in-pixels", 2000)):
            if rank == 1:
                data_mod.load_sample = lambda train=True, n=n: data_mod.synthetic_images(n, seed=3)
            try:
                run(TrainConfig(**{**config, "limit": None, "out": str(Path(out) / case)}))
            except ValueError as exc:
                outcomes[case] = str(exc)
        data_mod.load_sample = sample
        torch.save(outcomes, Path(result_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_train_on_the_data_rank_0_found_or_not_at_all(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    result_dir = tmp_path / "results"
    result_dir.mkdir()
    mp.spawn(_fallback_worker, args=(2, _free_port(), str(tmp_path), str(result_dir)), nprocs=2, join=True)
    r0, r1 = (torch.load(result_dir / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # Rank 0 found CIFAR-10 and rank 1 did not: rank 1 must not train on the sample while rank 0 trains on
    # CIFAR-10. Both stop, and nothing is written.
    assert r1["rank0-has-it"].startswith("DatasetUnavailable: rank 1: CIFAR-10 is not in"), r1
    assert "does not fall back to the bundled sample on its own" in r1["rank0-has-it"]
    assert r0["rank0-has-it"].startswith("DatasetUnavailable: rank 1 could not load the training data (cifar10)"), r0
    assert not (tmp_path / "rank0-has-it").exists()
    # Rank 0 fell back: every rank trains on the sample, also where CIFAR-10 is at hand.
    assert r0["rank0-lacks-it"] == r1["rank0-lacks-it"] == "sample"
    assert r0["copies-differ"] == r1["copies-differ"]
    assert "2,000 images on rank 0, 40 images on rank 1" in r0["copies-differ"]
    assert r0["copies-differ-in-pixels"] == r1["copies-differ-in-pixels"]
    assert "2,000 images on every rank, but other ones on rank 1 than on rank 0" in r0["copies-differ-in-pixels"]
    assert not (tmp_path / "copies-differ").exists() and not (tmp_path / "copies-differ-in-pixels").exists()


def test_fewer_images_than_processes_is_an_error_before_the_run_folder(tmp_path: Path) -> None:
    # Rank 0's checks alone (no process group): with 3 images, 4 ranks cannot each get one.
    four_ranks = train_mod._Dist(rank=0, world_size=4)
    with pytest.raises(ValueError, match="3 training images cannot be shared among 4 processes"):
        train_mod._train(_cfg(TINY_VQ, tmp_path / "run", limit=3), four_ranks)
    assert not (tmp_path / "run").exists()


def test_selected_backend_restores_the_callers_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VQFAST_BACKEND", raising=False)
    with train_mod.selected_backend("torch"):
        assert os.environ["VQFAST_BACKEND"] == "torch"
    assert "VQFAST_BACKEND" not in os.environ
    monkeypatch.setenv("VQFAST_BACKEND", "triton")
    with pytest.raises(RuntimeError), train_mod.selected_backend("torch"):
        raise RuntimeError("a failed run")
    assert os.environ["VQFAST_BACKEND"] == "triton"
    with train_mod.selected_backend("auto"):
        assert os.environ["VQFAST_BACKEND"] == "triton"


def test_a_run_that_fell_back_to_the_sample_resumes_on_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Trained offline on the bundled sample; CIFAR-10 then becomes available (here: a stand-in) and the
    # run is resumed from another working directory: it must go on with the same images.
    from vqfast.models import data as data_mod

    base = dict(model="ae", data="cifar10", data_root="nodata", download=False, latent_dim=32, batch_size=32,
                limit=64, epochs=1, progress=False, threads=1, out=str(tmp_path / "run"), eval_limit=32)
    monkeypatch.chdir(tmp_path)
    first = train_mod.train(base)
    assert first.history[-1]["images"] == 64
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"] == "sample" and Path(saved["data_root"]).is_absolute() and saved["download"] is False
    monkeypatch.setattr(data_mod, "load_cifar10",
                        lambda root, train=True, download=True: data_mod.synthetic_images(256, seed=7))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    resumed = train_mod.train(dict(model="ae", out=str(tmp_path / "run"), resume=True, epochs=2, progress=False,
                                   threads=1), given={"model", "out", "resume", "epochs", "progress", "threads"})
    assert resumed.history[-1]["images"] == 64
    log = (tmp_path / "run" / "train.log").read_text()
    assert "synthetic" not in log


def test_resume_makes_the_metrics_file_hold_the_checkpoints_epochs(tmp_path: Path) -> None:
    """A stop between the checkpoint and the epoch's metrics line (or inside that line) loses nothing on
    resume; metrics of other epochs than the checkpoint's are kept aside, not continued."""
    path = tmp_path / "metrics.jsonl"
    history = [{"epoch": 1, "avg_loss": 3.5, "psnr": float("inf")}, {"epoch": 2, "avg_loss": 2.25, "psnr": 20.0}]
    test = {"event": "test", "epoch": 1, "data": "sample", "psnr": 17.0}
    lines = [train_mod._json(history[0]), train_mod._json(test), train_mod._json(history[1])]
    path.write_text("\n".join(lines) + "\n")
    assert train_mod._metrics_matching_checkpoint(path, history) is None
    # Stopped after epoch 2's checkpoint, inside the append of its line.
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:9])
    note = train_mod._metrics_matching_checkpoint(path, history)
    assert note == "resume: metrics.jsonl rewritten from the checkpoint (1 epoch record it lacked, 1 unreadable line left out)"
    assert path.read_text() == "\n".join(lines) + "\n" and not list(tmp_path.glob("*.before-resume"))
    # Another run's file: its epochs and its later test differ from the checkpoint's.
    other = [{"epoch": 1, "avg_loss": 9.0}, {"epoch": 2, "avg_loss": 8.0}, {"epoch": 3, "avg_loss": 7.0},
             {"event": "test", "epoch": 3, "data": "sample"}]
    before = "".join(train_mod._json(r) + "\n" for r in other)
    path.write_text(before)
    note = train_mod._metrics_matching_checkpoint(path, history)
    assert note is not None and "does not hold the epochs of checkpoint.pt" in note
    assert (tmp_path / "metrics.jsonl.before-resume").read_text() == before
    assert path.read_text() == train_mod._json(history[0]) + "\n" + train_mod._json(history[1]) + "\n"
    # Another run's test at an epoch the checkpoint has is not kept either; an earlier backup stays.
    other = [{"epoch": 1, "avg_loss": 9.0}, {"event": "test", "epoch": 1, "data": "sample", "psnr": 5.0}]
    path.write_text("".join(train_mod._json(r) + "\n" for r in other))
    note = train_mod._metrics_matching_checkpoint(path, history)
    assert note is not None and note.endswith("kept as metrics.jsonl.before-resume.1")
    assert (tmp_path / "metrics.jsonl.before-resume").read_text() == before
    assert '"psnr": 5.0' not in path.read_text()
    # Two epochs missing (a file with only the test of an --epochs 0 run, say): not one lost line.
    path.write_text(train_mod._json({"event": "test", "epoch": 0, "data": "sample"}) + "\n")
    assert "does not hold the epochs" in train_mod._metrics_matching_checkpoint(path, history)
    # A file from before NaN and inf were written as null still matches its checkpoint.
    path.write_text('{"epoch": 1, "avg_loss": 3.5, "psnr": Infinity}\n{"epoch": 2, "avg_loss": 2.25, "psnr": 20.0}\n')
    assert train_mod._metrics_matching_checkpoint(path, history) is None
    # A complete last line without its newline is ended, so the next epoch's line does not join it.
    path.write_text(train_mod._json(history[0]) + "\n" + train_mod._json(history[1]))
    assert train_mod._metrics_matching_checkpoint(path, history).endswith("(its last line ended)")
    assert path.read_text() == train_mod._json(history[0]) + "\n" + train_mod._json(history[1]) + "\n"
    # A missing file is written from the checkpoint.
    path.unlink()
    assert "was missing" in train_mod._metrics_matching_checkpoint(path, history)
    assert path.read_text() == train_mod._json(history[0]) + "\n" + train_mod._json(history[1]) + "\n"


def test_a_checkpoint_copied_from_another_run_resumes_with_its_own_metrics(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    train(_cfg(TINY_VQ, a))
    train(_cfg(TINY_VQ, b, seed=1))
    b_metrics = (b / "metrics.jsonl").read_text()
    shutil.copy(a / "checkpoint.pt", b / "checkpoint.pt")
    (a / "metrics.jsonl").write_text("")  # (a's own file says nothing of b's)
    capsys.readouterr()
    resumed = train(_cfg(TINY_VQ, b, epochs=2, resume=True))
    assert "does not hold the epochs of checkpoint.pt" in capsys.readouterr().err
    assert (b / "metrics.jsonl.before-resume").read_text() == b_metrics
    epochs = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["avg_loss"] for r in epochs if "event" not in r] == [h["avg_loss"] for h in resumed.history]
