"""Training and evaluation CLI: option checks, run folders, unreadable checkpoints, what evaluations say they scored."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from vqfast.models import train as train_mod
from vqfast.models.train import (
    CheckpointError,
    TrainConfig,
    configure_evaluate_parser,
    configure_train_parser,
    evaluate,
    evaluate_main,
    load_checkpoint,
    save_checkpoint,
    train,
    train_main,
)

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_AE = dict(model="ae", data="sample", limit=32, batch_size=16, latent_dim=16, epochs=1, progress=False,
               eval_limit=16, grid_images=4, device="cpu")


def _train_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure_train_parser(parser)
    return parser.parse_args(list(argv))


def _evaluate_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure_evaluate_parser(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch tiny AE run to evaluate."""
    return train(TrainConfig(**TINY_AE, out=str(tmp_path_factory.mktemp("ae_run") / "run"))).run_dir


# ------------------------------------------------------------------------------------ option checks


@pytest.mark.parametrize("chosen_by", ["--backend", "VQFAST_BACKEND"])
def test_the_triton_backend_on_the_cpu_is_refused_before_anything_is_written(chosen_by, ae_run, tmp_path,
                                                                             monkeypatch, capsys) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read when the check runs; the kernels stay interpreted
    if chosen_by == "--backend":
        monkeypatch.delenv("VQFAST_BACKEND", raising=False)
        option, named = ["--backend", "triton"], "backend triton"
    else:
        monkeypatch.setenv("VQFAST_BACKEND", "triton")
        option, named = ["--backend", "auto"], "VQFAST_BACKEND=triton"
    out = tmp_path / "run"
    assert train_main(_train_args("vqvae", *option, "--device", "cpu", "--out", str(out), "--no-progress")) == 2
    assert f"{named} runs on CUDA devices" in capsys.readouterr().err
    assert not out.exists()
    assert evaluate_main(_evaluate_args(str(ae_run), *option, "--device", "cpu", "--no-progress")) == 2
    assert f"{named} runs on CUDA devices" in capsys.readouterr().err


@pytest.mark.parametrize("argv, option", [
    (["vqvae", "--vq-option", "foo=1"], "--vq-option"),
    (["vqvae", "--vq-option", "heads=2"], "heads is a VectorQuantizer option the training tool does not take "
                                           "(the VQ-VAE's encoder gives one code's channels per position)"),
    (["vqvae", "--vq-option", "embedding_dim=4"], "embedding_dim is a VectorQuantizer option the training tool "
                                                  "does not take (set by --code-dim)"),
    (["vqvae", "--vq-option", "init=bogus"], "--vq-option"),
    (["ae", "--vq-option", "init=uniform"], "--vq-option"),
    (["vae", "--vq-option", "ema=true"], "--vq-option"),
    (["vqvae", "--vq-impl", "article", "--vq-option", "init=uniform"], "--vq-option"),
    (["vqvae", "--threads", "-1"], "--threads"),
    (["vqvae", "--threads", "0"], "--threads"),
    (["vqvae", "--device", "gpu"], "--device"),
    # device types torch knows but the training code does not run on
    (["vqvae", "--device", "meta"], "--device"),
    (["vqvae", "--device", "mps"], "--device"),
    # infinite weights: refused up front rather than reported as a divergence to cure with a lower --lr
    (["vae", "--kl-weight", "inf"], "--kl-weight"),
    (["vqvae", "--beta", "inf"], "--beta"),
    (["vqvae", "--vq-impl", "article", "--beta", "inf"], "--beta"),
    (["vqvae", "--eval-limit", "-5"], "--eval-limit"),
    (["vqvae", "--grid-images", "0"], "--grid-images"),
    (["vqvae", "--epochs", "-1"], "--epochs"),
    (["vqvae", "--batch-size", "0"], "--batch-size"),
    (["vqvae", "--lr", "0"], "--lr"),
    (["vqvae", "--codes", "0"], "--codes"),
    (["vqvae", "--workers", "-1"], "--workers"),
    (["vqvae", "--limit", "0"], "--limit"),
    (["vqvae", "--seed", "-1"], "--seed"),
    (["vqvae", "--seed", str(2**32)], "--seed"),
    (["vqvae", "--resume", "--out", ""], "--resume needs --out"),
    (["vqvae", "--resume", "--overwrite"], "--overwrite"),
    # Options of another model: an error, not silently ignored (and then frozen on resume).
    (["ae", "--codes", "7"], "--codes"),
    (["ae", "--kl-weight", "5"], "--kl-weight"),
    (["vae", "--vq-impl", "article"], "--vq-impl"),
    (["vqvae", "--latent-dim", "7"], "--latent-dim"),
    # The model feeds (B, C, H, W): another channel dimension could only fail at the first step.
    (["vqvae", "--vq-option", "channel_dim=2"], "channel_dim is a VectorQuantizer option"),
    (["vqvae", "--codebook-init", "xavier_normal", "--vq-option", "init=kmeans"], "--codebook-init"),
    # Two commitment weights: one of them would be dropped without a word.
    (["vqvae", "--beta", "0.3", "--vq-option", "beta=0.5"], "--beta 0.3 and --vq-option beta=0.5"),
    # An option that does nothing without another (vector-quantize-pytorch's decay, without EMA).
    (["vqvae", "--vq-option", "decay=0.8"], "--vq-option: decay=0.8 has no effect without ema=True"),
    (["vqvae", "--vq-option", "kmeans_iters=3", "--vq-option", "entropy_temperature=0.5"],
     "kmeans_iters=3 has no effect without init='kmeans'; entropy_temperature=0.5"),
    # The article's VQ step has no restarts: the preset that asks for them would be dropped unsaid.
    (["vqvae", "--vq-impl", "article", "--vq-preset", "vqfast"], "--vq-preset article"),
])
def test_bad_options_fail_before_anything_is_written(argv: list[str], option: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    # argparse keeps the last value: the case's own options win over these small, quick settings
    safe = ["--data", "sample", "--limit", "32", "--epochs", "0", "--out", str(out)]
    assert train_main(_train_args(*safe, *argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and option in err, err
    assert "Traceback" not in err
    assert not out.exists()
    assert torch.get_num_threads() == threads


def test_zero_epochs_says_it_writes_the_initialised_models_outputs(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert train_main(_train_args("ae", "--data", "sample", "--limit", "8", "--eval-limit", "8", "--latent-dim", "8",
                                  "--epochs", "0", "--out", str(out), "--no-progress")) == 0
    text = capsys.readouterr().out
    assert "--epochs 0: no training" in text and "Training ae" not in text
    assert "--epochs 0: no training" in (out / "train.log").read_text()
    assert (out / "checkpoint.pt").is_file() and (out / "reconstructions.png").is_file()


@pytest.mark.parametrize("option", ["--data", "--eval-data"])
def test_an_empty_data_option_is_refused_not_read_as_the_current_folder(option: str, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert train_main(_train_args("ae", "--data", "sample", option, "", "--out", str(out))) == 2
    assert f"{option} is empty" in capsys.readouterr().err and not out.exists()


def test_evaluate_under_torchrun_runs_on_rank_0_only(ae_run: Path, tmp_path: Path, monkeypatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(ae_run), "--data", "sample", "--limit", "8", "--worst", "0", "--no-progress"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert evaluate_main(_evaluate_args(*args, "--out", str(tmp_path / "rank1"))) == 0
    assert not (tmp_path / "rank1").exists() and capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert evaluate_main(_evaluate_args(*args, "--out", str(tmp_path / "rank0"))) == 0
    assert "rank 0 scores the images" in capsys.readouterr().err
    assert (tmp_path / "rank0" / "eval-sample-test.json").is_file()


@pytest.mark.parametrize("option", ["--data", "--ood"])
def test_evaluate_refuses_an_empty_data_option(option: str, ae_run: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval"
    assert evaluate_main(_evaluate_args(str(ae_run), option, " ", "--out", str(out))) == 2
    assert f"{option} is empty" in capsys.readouterr().err and not out.exists()


def test_a_vq_option_without_a_key_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        _train_args("vqvae", "--vq-option", "=3")
    assert exited.value.code == 2 and "expected KEY=VALUE, got '=3' (no KEY)" in capsys.readouterr().err


def test_bad_data_leaves_no_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert train_main(_train_args("ae", "--data", str(tmp_path / "missing.npz"), "--out", str(out))) == 2
    assert "missing.npz" in capsys.readouterr().err and not out.exists()
    # the evaluation source is checked before training, not after it
    assert train_main(_train_args("ae", "--data", "sample", "--eval-data", str(tmp_path / "missing.npz"),
                                  "--out", str(out))) == 2
    assert "missing.npz" in capsys.readouterr().err and not out.exists()


def test_a_model_too_large_for_memory_is_an_error_line_and_leaves_no_run_folder(tmp_path: Path, monkeypatch,
                                                                               capsys) -> None:
    # (The allocator's failure is stood in for: a real one could, with overcommit, start paging instead.)
    def allocation_fails(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1638400000000 bytes")

    monkeypatch.setattr(train_mod, "build_model", allocation_fails)
    out = tmp_path / "run"
    assert train_main(_train_args("ae", "--data", "sample", "--latent-dim", "100000000", "--out", str(out))) == 2
    err = capsys.readouterr().err
    assert "does not fit in memory" in err and "--latent-dim 100000000" in err and "Traceback" not in err
    assert not out.exists()


def test_vq_option_values_parse_as_json_or_python_constants() -> None:
    args = _train_args("vqvae", "--vq-option", "ema=True", "--vq-option", "decay=0.9", "--vq-option", "init=uniform",
                       "--vq-option", "dead_code_threshold=0", "--vq-option", "sync_distributed=false")
    cfg = train_mod._config_from_args(args)
    assert cfg.vq_kwargs == {"ema": True, "decay": 0.9, "init": "uniform", "dead_code_threshold": 0,
                             "sync_distributed": False}
    train_mod._validate(cfg)  # no error


def test_vq_options_that_exist_are_accepted() -> None:
    cfg = TrainConfig(model="vqvae", vq_kwargs={"init": "uniform", "dead_code_threshold": 0.0}, num_codes=8,
                      code_dim=4)
    train_mod._validate(cfg)  # no error
    state = torch.get_rng_state()
    train_mod._validate(cfg)
    assert torch.equal(state, torch.get_rng_state())  # the check builds a layer without touching the seed
    # The same commitment weight twice says one thing: accepted.
    train_mod._validate(dataclasses.replace(cfg, beta=0.5, vq_kwargs={"beta": 0.5}))
    train_mod._validate(dataclasses.replace(cfg, beta=1.0, vq_kwargs={"beta": 1}))


# -------------------------------------------------------------------------------------- run folders


def test_a_folder_with_other_files_is_not_written_into(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "train.log").write_text("my own notes\n")
    (out / "summary.json").write_text("{\"mine\": true}\n")
    with pytest.raises(FileExistsError, match="not empty"):
        train(TrainConfig(**TINY_AE, out=str(out)))
    assert (out / "train.log").read_text() == "my own notes\n"
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "train.log"]
    assert train_main(_train_args("ae", "--data", "sample", "--out", str(out))) == 2
    # On the command line the options are named as options alone (the API's message names both).
    err = capsys.readouterr().err
    assert "pass --overwrite to train into it" in err and "=True" not in err
    # --overwrite is the explicit way in; files the run does not write stay
    (out / "keep.txt").write_text("x")
    train(TrainConfig(**TINY_AE, out=str(out), overwrite=True))
    assert (out / "keep.txt").read_text() == "x"
    assert "my own notes" not in (out / "train.log").read_text()
    assert json.loads((out / "summary.json").read_text())["model"] == "ae"


def test_an_out_under_a_file_is_an_error_line_naming_the_file(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("x")
    assert train_main(_train_args("ae", "--data", "synthetic", "--out", str(tmp_path / "afile" / "sub"))) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'afile'} is a file, so no folder can be made under it" in err and "Errno" not in err
    assert train_main(_train_args("ae", "--data", "synthetic", "--out", str(tmp_path / "afile"))) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "x"


def _image_folder(folder: Path, n: int = 6, seed: int = 3) -> Path:
    """``n`` random 32x32 PNGs in two class subfolders of ``folder`` (ImageFolder layout)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        (folder / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"class{i % 2}" / f"{i}.png")
    return folder


@pytest.mark.parametrize("option", ["--data", "--eval-data"])
def test_an_out_inside_an_image_folder_is_refused_before_anything_is_written(option: str, tmp_path: Path,
                                                                             capsys) -> None:
    # The run's PNGs would become images of the folder: a resume would then find its data changed.
    images = _image_folder(tmp_path / "imgs")
    before = sorted(images.rglob("*"))
    data = ["--data", str(images)] if option == "--data" else ["--data", "synthetic", "--eval-data", str(images)]
    for out in (images / "class0" / "run", images / "run", images):
        assert train_main(_train_args("ae", *data, "--limit", "4", "--out", str(out), "--no-progress")) == 2
        err = capsys.readouterr().err
        assert f"--out {out} is inside the {option} image folder {images}" in err, err
    assert sorted(images.rglob("*")) == before
    # Beside the folder is fine.
    assert train_main(_train_args("ae", *data, "--limit", "4", "--latent-dim", "8", "--eval-limit", "4",
                                  "--out", str(tmp_path / "run"), "--no-progress")) == 0


def test_evaluate_refuses_to_write_into_a_folder_it_scores(ae_run: Path, tmp_path: Path) -> None:
    images = _image_folder(tmp_path / "imgs")
    for kwargs in (dict(data=str(images)), dict(data="sample", ood=str(images))):
        with pytest.raises(ValueError, match="is inside the --(data|ood) image folder"):
            evaluate(ae_run, **kwargs, limit=4, out_dir=images / "scores", progress=False)
    assert not (images / "scores").exists()


def test_out_and_the_evaluated_run_may_start_with_a_tilde(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert train_main(_train_args("ae", "--data", "synthetic", "--limit", "4", "--latent-dim", "8",
                                  "--eval-limit", "4", "--out", "~/run", "--no-progress")) == 0
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and not Path("~").exists()
    assert evaluate_main(_evaluate_args("~/run", "--data", "synthetic", "--limit", "4", "--worst", "0",
                                        "--out", "~/scores", "--no-progress")) == 0
    assert (tmp_path / "scores" / "eval-synthetic-test.json").is_file()


def test_resume_takes_the_runs_checkpoint_file_for_its_folder(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    train(TrainConfig(**TINY_AE, out=str(out)))
    assert train_main(_train_args("ae", "--resume", "--epochs", "2", "--out", str(out / "checkpoint.pt"),
                                  "--no-progress")) == 0
    assert load_checkpoint(out)["epoch"] == 2 and not (out / "checkpoint.pt" / "checkpoint.pt").exists()
    assert train_main(_train_args("ae", "--resume", "--epochs", "3", "--out", str(out / "config.json"),
                                  "--no-progress")) == 2
    assert "is a file: --resume takes the folder of the run to continue" in capsys.readouterr().err


class _RankOne(train_mod._Dist):
    """Rank 1 of two, hearing from rank 0 that it could not start."""

    def __init__(self) -> None:
        super().__init__(rank=1, world_size=2)

    def broadcast_object(self, obj):
        return ("ValueError: --limit is wrong", None)


def test_other_ranks_exit_quietly_when_rank_0_cannot_start(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(train_mod, "_init_distributed", lambda device: _RankOne())
    with pytest.raises(train_mod.RankZeroFailed, match="rank 0 could not start the run: ValueError"):
        train(TrainConfig(**TINY_AE, out=str(tmp_path / "run")))
    assert train_main(_train_args("ae", "--data", "sample", "--out", str(tmp_path / "run"), "--no-progress")) == 2
    assert capsys.readouterr().err == ""  # rank 0 says what went wrong
    assert not (tmp_path / "run").exists()


def test_one_ctrl_c_under_torchrun_is_announced_by_rank_0_only(monkeypatch, capsys) -> None:
    for speak in (True, False):
        stop = train_mod._StopRequest(speak=speak)
        stop._handler(signal.SIGINT, None)
        assert stop.requested and ("Interrupt received" in capsys.readouterr().err) == speak

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train", interrupted)
    for rank, says in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        assert train_main(_train_args("ae")) == 130
        assert ("Training interrupted." in capsys.readouterr().err) == says


def test_an_empty_existing_folder_is_fine(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    assert len(train(TrainConfig(**TINY_AE, out=str(out))).history) == 1


def test_overwrite_removes_the_previous_runs_outputs(tmp_path: Path) -> None:
    (tmp_path / "samples.png").write_bytes(b"from an older VAE run")
    (tmp_path / "eval-sample-test.json").write_text('{"model": "vae"}')  # written by vqfast evaluate
    (tmp_path / "eval-notes").mkdir()  # a folder of the user's that matches the pattern
    train(TrainConfig(**TINY_AE, out=str(tmp_path), overwrite=True))
    assert not (tmp_path / "samples.png").exists()  # an AE writes none: a VAE's would be misleading
    assert not (tmp_path / "eval-sample-test.json").exists() and (tmp_path / "eval-notes").is_dir()


def test_a_run_stopped_before_its_first_checkpoint_leaves_a_usable_folder(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "run"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**TINY_AE, out=str(out)))
    assert list(out.iterdir()) == []  # not a config.json that neither a new run nor --resume would take
    monkeypatch.undo()
    assert len(train(TrainConfig(**TINY_AE, out=str(out))).history) == 1


# ------------------------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def npz_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A one-epoch tiny AE run on an .npz given by a relative path, and that file."""
    folder = tmp_path_factory.mktemp("npz_run")
    rng = np.random.default_rng(0)
    np.savez(folder / "small.npz", x=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),
             y=np.arange(40) % 10)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        run = train(TrainConfig(**{**TINY_AE, "data": "small.npz", "eval_data": "small.npz", "lr": 2e-3},
                                out=str(folder / "run"))).run_dir
    return run, folder / "small.npz"


def test_resume_from_another_folder_finds_data_given_by_a_relative_path(npz_run, tmp_path, monkeypatch) -> None:
    run, data = npz_run
    saved = json.loads((run / "config.json").read_text())
    assert saved["data"] == str(data.resolve()) and saved["eval_data"] == str(data.resolve())
    monkeypatch.chdir(tmp_path)
    options = {k: v for k, v in TINY_AE.items() if k != "data"}  # left at its default: the run's
    result = train(TrainConfig(**{**options, "epochs": 2}, out=str(run), resume=True))
    assert len(result.history) == 2 and result.config.data == str(data.resolve())
    assert result.config.lr == 2e-3  # the run's learning rate, not the default


@pytest.mark.parametrize("argv, named", [
    (["vae"], "the model vae"),
    (["ae", "--batch-size", "8"], "--batch-size 8"),
    (["ae", "--batch-size", "64"], "--batch-size 64"),  # the default value, but given: still a contradiction
    (["ae", "--data", "synthetic"], "--data 'synthetic'"),
])
def test_resume_refuses_options_that_contradict_the_run(npz_run, argv, named, capsys) -> None:
    run, _ = npz_run
    before = (run / "checkpoint.pt").read_bytes()
    assert train_main(_train_args(*argv, "--resume", "--epochs", "3", "--out", str(run), "--no-progress")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume") and named in err, err
    assert (run / "checkpoint.pt").read_bytes() == before


def test_resume_applies_a_new_learning_rate(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    train(TrainConfig(**TINY_AE, out=str(out)))
    result = train(TrainConfig(**{**TINY_AE, "epochs": 2, "lr": 1e-4}, out=str(out), resume=True))
    # Said on the resume line, which train.log keeps too.
    assert "learning rate 0.0001 from here on (the run used 0.001)" in capsys.readouterr().out
    assert "learning rate 0.0001 from here on" in (out / "train.log").read_text()
    state = load_checkpoint(out / "checkpoint.pt")
    assert [g["lr"] for g in state["optimizer_state"]["param_groups"]] == [1e-4]
    assert result.config.lr == 1e-4 and json.loads((out / "config.json").read_text())["lr"] == 1e-4


def test_resume_applies_a_learning_rate_given_on_the_command_line_even_the_default(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    train(TrainConfig(**{**TINY_AE, "lr": 3e-4}, out=str(out)))
    assert train_main(_train_args("ae", "--resume", "--epochs", "2", "--lr", "0.001", "--out", str(out),
                                  "--no-progress", "--data", "sample", "--limit", "32", "--batch-size", "16",
                                  "--latent-dim", "16", "--eval-limit", "16")) == 0
    assert "learning rate 0.001 from here on (the run used 0.0003)" in capsys.readouterr().out
    state = load_checkpoint(out / "checkpoint.pt")
    assert [g["lr"] for g in state["optimizer_state"]["param_groups"]] == [1e-3]
    # Left out, it is the run's.
    assert train_main(_train_args("ae", "--resume", "--epochs", "3", "--out", str(out), "--no-progress")) == 0
    assert load_checkpoint(out / "checkpoint.pt")["config"]["lr"] == 1e-3


def test_resume_accepts_the_runs_own_beta_and_names_layer_init_as_given(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    tiny_vq = dict(model="vqvae", data="sample", limit=32, batch_size=16, num_codes=16, code_dim=8, epochs=1,
                   progress=False, eval_limit=16, grid_images=4, device="cpu")
    train(TrainConfig(**tiny_vq, out=str(out)))  # beta left to the vqfast preset: 0.25
    common = ["--out", str(out), "--no-progress", "--eval-limit", "16"]
    assert train_main(_train_args("vqvae", "--resume", "--epochs", "2", "--beta", "0.25", *common)) == 0
    assert train_main(_train_args("vqvae", "--resume", "--epochs", "3", "--beta", "1.0", *common)) == 2
    assert "--beta 1.0 (the run has 0.25)" in capsys.readouterr().err
    assert train_main(_train_args("vqvae", "--resume", "--epochs", "3", "--codebook-init", "layer", *common)) == 2
    assert "--codebook-init 'layer' (the run has 'xavier_normal')" in capsys.readouterr().err


def test_resume_refuses_fewer_epochs_than_done(npz_run, capsys) -> None:
    run, _ = npz_run
    assert train_main(_train_args("ae", "--resume", "--epochs", "0", "--out", str(run))) == 2
    assert "below the" in capsys.readouterr().err


def test_resume_refuses_to_end_a_run_stopped_mid_epoch_without_finishing_the_epoch(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    train(TrainConfig(**TINY_AE, out=str(out)))
    state = load_checkpoint(out / "checkpoint.pt")
    state.update(epoch=0, batch=1)  # as a checkpoint written by Ctrl-C after the first batch
    save_checkpoint(state, out / "checkpoint.pt")
    assert train_main(_train_args("ae", "--resume", "--epochs", "0", "--out", str(out), "--no-progress")) == 2
    assert "stopped in epoch 1, after batch 1" in capsys.readouterr().err
    # Later in the run: whatever the total given, the first answer names the least one that works.
    state.update(epoch=3, batch=5)
    save_checkpoint(state, out / "checkpoint.pt")
    for epochs in ("2", "3"):
        assert train_main(_train_args("ae", "--resume", "--epochs", epochs, "--out", str(out), "--no-progress")) == 2
        assert "stopped in epoch 4, after batch 5; give the new total, at least 4" in capsys.readouterr().err


def test_resume_keeps_the_runs_data_evaluation_and_precision_settings(tmp_path: Path) -> None:
    train_npz = _write_npz(tmp_path / "train.npz", 32, seed=0)
    held_out = _write_npz(tmp_path / "held_out.npz", 20, seed=1)
    out = tmp_path / "run"
    first = ["ae", "--data", str(train_npz), "--eval-data", str(held_out), "--eval-limit", "12", "--amp",
             "--no-download", "--data-root", str(tmp_path / "root"), "--batch-size", "16", "--latent-dim", "16",
             "--epochs", "1", "--out", str(out), "--no-progress"]
    assert train_main(_train_args(*first)) == 0
    before = json.loads((out / "config.json").read_text())
    assert train_main(_train_args("ae", "--resume", "--epochs", "2", "--out", str(out), "--no-progress")) == 0
    after = json.loads((out / "config.json").read_text())
    for name in ("eval_data", "eval_limit", "amp", "download", "data_root"):
        assert after[name] == before[name], name
    assert after["eval_limit"] == 12 and after["amp"] is True and after["download"] is False
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test"]["held_out"] is True and summary["test"]["images"] == 12
    # Given anew, they apply.
    assert train_main(_train_args("ae", "--resume", "--epochs", "3", "--eval-limit", "0", "--out", str(out),
                                  "--no-progress")) == 0
    assert json.loads((out / "config.json").read_text())["eval_limit"] is None
    # ... and each can be undone: the run's --amp and --no-download are not for good.
    assert train_main(_train_args("ae", "--resume", "--epochs", "4", "--no-amp", "--download", "--out", str(out),
                                  "--no-progress")) == 0
    undone = json.loads((out / "config.json").read_text())
    assert undone["amp"] is False and undone["download"] is True
    assert train_main(_train_args("ae", "--resume", "--epochs", "5", "--amp", "--no-download", "--out", str(out),
                                  "--no-progress")) == 0
    redone = json.loads((out / "config.json").read_text())
    assert redone["amp"] is True and redone["download"] is False


def test_a_resumed_cifar10_run_does_not_fall_back_to_the_sample(tmp_path: Path, monkeypatch, capsys) -> None:
    from torch.utils.data import TensorDataset

    from vqfast.models import data as data_mod

    images = torch.rand(24, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(data_mod, "load_cifar10",
                        lambda root, train=True, download=True: TensorDataset(images, torch.zeros(24, dtype=torch.long)))
    out = tmp_path / "run"
    train(TrainConfig(**{**TINY_AE, "data": "cifar10", "limit": None}, out=str(out)))
    assert json.loads((out / "config.json").read_text())["data"] == "cifar10"

    def unavailable(root, train=True, download=True):
        raise data_mod.DatasetUnavailable(f"CIFAR-10 is not in {root}")

    monkeypatch.setattr(data_mod, "load_cifar10", unavailable)
    before = (out / "checkpoint.pt").read_bytes()
    assert train_main(_train_args("ae", "--resume", "--epochs", "2", "--out", str(out), "--no-progress")) == 2
    assert "does not switch to the bundled sample" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before


def test_resuming_a_run_that_fell_back_with_data_cifar10_says_why_it_differs(tmp_path: Path, monkeypatch,
                                                                            capsys) -> None:
    from vqfast.models import data as data_mod

    def unavailable(root, train=True, download=True):
        raise data_mod.DatasetUnavailable(f"CIFAR-10 is not in {root}")

    monkeypatch.setattr(data_mod, "load_cifar10", unavailable)
    out = tmp_path / "run"
    train(TrainConfig(**{**TINY_AE, "data": "cifar10"}, out=str(out)))
    assert json.loads((out / "config.json").read_text())["data"] == "sample"
    assert train_main(_train_args("ae", "--resume", "--data", "cifar10", "--epochs", "2", "--out", str(out))) == 2
    assert "CIFAR-10 was unavailable when it started" in capsys.readouterr().err


def test_a_mistyped_path_given_on_resume_is_named_rather_than_taken_for_moved_data(tmp_path: Path,
                                                                                   capsys) -> None:
    data = _write_npz(tmp_path / "mine.npz", 40, seed=0, y=np.arange(40) % 10)
    out = tmp_path / "run"
    train(TrainConfig(**{**TINY_AE, "data": str(data), "limit": None}, out=str(out)))
    common = ["--resume", "--epochs", "2", "--out", str(out), "--no-progress"]
    typo = str(tmp_path / "mnie.npz")

    assert train_main(_train_args("ae", "--data", typo, *common)) == 2
    err = capsys.readouterr().err
    assert f"--data {typo!r} does not exist or cannot be read" in err and str(data) in err, err
    assert "give its new place" not in err, err
    assert train_main(_train_args("ae", "--eval-data", typo, *common)) == 2
    err = capsys.readouterr().err
    assert f"--eval-data {typo!r} does not exist or cannot be read" in err and "give its new place" not in err, err
    assert train_main(_train_args("ae", *common)) == 0


def test_a_run_whose_data_has_moved_resumes_from_its_new_place_if_it_holds_the_same_images(tmp_path: Path,
                                                                                           capsys) -> None:
    old_home, new_home = tmp_path / "old", tmp_path / "new"
    old_home.mkdir()
    data = _write_npz(old_home / "mine.npz", 40, seed=0, y=np.arange(40) % 10)
    out = tmp_path / "run"
    train(TrainConfig(**{**TINY_AE, "data": str(data), "eval_data": str(data), "limit": None}, out=str(out)))
    old_home.rename(new_home)
    moved = new_home / "mine.npz"
    common = ["--out", str(out), "--no-progress"]

    assert train_main(_train_args("ae", "--resume", "--epochs", "2", *common)) == 2
    assert "If the run's data has moved, give its new place with --data" in capsys.readouterr().err
    # Other images at the new place: as many, or fewer, are refused, and the checkpoint is left alone.
    before = (out / "checkpoint.pt").read_bytes()
    for n, why in ((40, "40 images, as the run's had, but other ones"), (39, "39 images where the run's had 40")):
        other = _write_npz(tmp_path / f"other{n}.npz", n, seed=1, y=np.arange(n) % 10)
        assert train_main(_train_args("ae", "--resume", "--epochs", "2", "--data", str(other), *common)) == 2
        err = capsys.readouterr().err
        assert "does not hold the run's training data" in err and why in err, err
        assert (out / "checkpoint.pt").read_bytes() == before
    # The same file moved: resumed, and read from there from now on (the evaluation too, which read it).
    assert train_main(_train_args("ae", "--resume", "--epochs", "2", "--data", str(moved), *common)) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["data"] == saved["eval_data"] == str(moved.resolve())
    assert f"the run's data is now read from {moved.resolve()}" in (out / "train.log").read_text()
    assert train_main(_train_args("ae", "--resume", "--epochs", "3", *common)) == 0

    # A checkpoint from before fingerprints were recorded: the image count is what can be compared.
    state = load_checkpoint(out)
    assert state["data_fingerprint"]["images"] == 40
    del state["data_fingerprint"]
    save_checkpoint(state, out / "checkpoint.pt")
    new_home.rename(old_home)
    assert train_main(_train_args("ae", "--resume", "--epochs", "4", "--data", str(tmp_path / "other39.npz"),
                                  *common)) == 2
    assert "39 images where the run's had 40" in capsys.readouterr().err
    assert train_main(_train_args("ae", "--resume", "--epochs", "4", "--data", str(data), *common)) == 0
    assert "no more of them to compare" in (out / "train.log").read_text()
    # A named dataset is not a place: switching to or from one is still refused.
    assert train_main(_train_args("ae", "--resume", "--epochs", "5", "--data", "sample", *common)) == 2
    assert "--data 'sample'" in capsys.readouterr().err


def test_a_run_whose_data_changed_in_place_is_not_resumed_on_other_images(tmp_path: Path, capsys) -> None:
    data = _write_npz(tmp_path / "mine.npz", 40, seed=0, y=np.arange(40) % 10)
    out = tmp_path / "run"
    train(TrainConfig(**{**TINY_AE, "data": str(data), "limit": None}, out=str(out)))
    common = ["--resume", "--out", str(out), "--no-progress"]
    original = data.read_bytes()
    before = (out / "checkpoint.pt").read_bytes()
    for n, why in ((40, "40 images, as the run's had, but other ones"), (41, "41 images where the run's had 40")):
        _write_npz(data, n, seed=1, y=np.arange(n) % 10)
        assert train_main(_train_args("ae", "--epochs", "2", *common)) == 2
        err = capsys.readouterr().err
        assert f"The run's training data {str(data.resolve())!r} has changed" in err and why in err, err
        assert (out / "checkpoint.pt").read_bytes() == before
    data.write_bytes(original)
    assert train_main(_train_args("ae", "--epochs", "2", *common)) == 0
    assert "now read from" not in (out / "train.log").read_text()
    # A checkpoint from before fingerprints, of a torchrun run whose ranks' shards were padded (42 images
    # counted of 40 on 3 ranks), resumes where its data is: there is nothing sure to compare.
    state = load_checkpoint(out / "checkpoint.pt")
    del state["data_fingerprint"]
    state["world_size"] = 3
    state["history"][0]["images"] = 42
    save_checkpoint(state, out / "checkpoint.pt")
    assert train_main(_train_args("ae", "--epochs", "3", *common)) == 0


def test_the_fingerprint_of_local_data_follows_the_images_not_the_path(tmp_path: Path) -> None:
    from PIL import Image

    from vqfast.models.data import load_dataset

    folder = tmp_path / "folder"
    for i in range(4):
        (folder / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(folder / f"class{i % 2}" / f"{i}.png")
    first = train_mod._data_fingerprint(load_dataset(str(folder)))
    folder.rename(tmp_path / "moved")
    assert train_mod._data_fingerprint(load_dataset(str(tmp_path / "moved"))) == first
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        tmp_path / "moved" / "class0" / "0.png")
    assert train_mod._data_fingerprint(load_dataset(str(tmp_path / "moved")))["sha256"] != first["sha256"]
    # An .npz cut by --limit: the images trained on, whatever follows them in the file
    a = _write_npz(tmp_path / "a.npz", 12, seed=0)
    x = np.load(a)["x"].copy()
    x[10:] = 0
    np.savez(tmp_path / "b.npz", x=x)
    fa, fb = (train_mod._data_fingerprint(load_dataset(str(p), limit=10)) for p in (a, tmp_path / "b.npz"))
    assert fa == fb and fa["images"] == 10
    assert train_mod._data_fingerprint(load_dataset(str(a)))["sha256"] != fa["sha256"]


def test_a_diverging_run_stops_with_its_last_good_checkpoint(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["vae", "--data", "sample", "--limit", "64", "--batch-size", "16", "--latent-dim", "8", "--lr", "100",
            "--epochs", "3", "--eval-limit", "16", "--out", str(out), "--no-progress"]
    assert train_main(_train_args(*argv)) == 2
    assert "training diverged in epoch" in capsys.readouterr().err
    # The run's log says so too, as its last line (not only the terminal).
    assert (out / "train.log").read_text().splitlines()[-1].startswith("error: training diverged in epoch")
    state = load_checkpoint(out / "checkpoint.pt")
    assert all(torch.isfinite(t).all() for t in state["model_state"].values() if t.is_floating_point())
    assert not (out / "summary.json").exists()
    for line in (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []:
        json.loads(line)  # valid JSON, whatever the numbers


def test_a_run_interrupted_after_diverging_keeps_its_last_good_checkpoint(tmp_path: Path, monkeypatch,
                                                                         capsys) -> None:
    real_step = train_mod.train_step
    calls = {"n": 0}

    def poison_then_ctrl_c(module, x, optimizer, amp=False):
        out = real_step(module, x, optimizer, amp)
        calls["n"] += 1
        if calls["n"] == 1:  # the weights go NaN mid-epoch ...
            with torch.no_grad():
                next(module.parameters()).fill_(float("nan"))
        if calls["n"] == 2:  # ... and Ctrl-C comes before the epoch's end would notice
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(train_mod, "train_step", poison_then_ctrl_c)
    out = tmp_path / "run"
    with pytest.raises((ValueError, KeyboardInterrupt)) as stopped:  # (a KeyboardInterrupt would end pytest)
        train(TrainConfig(**{**TINY_AE, "batch_size": 8}, out=str(out)))
    assert stopped.type is ValueError and "diverged in epoch 1" in str(stopped.value)
    state = load_checkpoint(out)
    assert (state["epoch"], state["batch"]) == (0, 0)  # the initial one, not the NaN weights
    assert all(torch.isfinite(t).all() for t in state["model_state"].values() if t.is_floating_point())


def test_a_last_update_that_breaks_the_weights_is_caught_before_its_checkpoint(tmp_path: Path, monkeypatch) -> None:
    # The epoch's average comes from the losses before each update: weights broken by its last update
    # would pass it and be saved as the last good state.
    real_step = train_mod.train_step
    calls = {"n": 0}

    def break_the_last_update(module, x, optimizer, amp=False):
        out = real_step(module, x, optimizer, amp)
        calls["n"] += 1
        if calls["n"] == 2:  # the second and last step of the epoch
            with torch.no_grad():
                next(module.parameters()).fill_(float("inf"))
        return out

    monkeypatch.setattr(train_mod, "train_step", break_the_last_update)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="diverged in epoch 1.*weights after its last update") as stopped:
        train(TrainConfig(**TINY_AE, out=str(out)))
    assert str(out / "checkpoint.pt") in str(stopped.value)
    state = load_checkpoint(out)
    assert (state["epoch"], state["batch"]) == (0, 0)  # the initial one, not the broken weights
    assert all(torch.isfinite(t).all() for t in state["model_state"].values() if t.is_floating_point())
    assert not (out / "summary.json").exists()


def test_folder_names_that_are_not_utf8_are_fingerprinted_and_written(tmp_path: Path) -> None:
    from PIL import Image

    from vqfast.models.data import image_files, load_dataset, source_indices

    folder = tmp_path / "folder"
    (folder / "a").mkdir(parents=True)
    for i, name in enumerate([b"caf\xe9.png", b"plain.png"]):  # a Latin-1 name, as older file systems hold
        Image.fromarray(np.full((32, 32, 3), 60 * i, dtype=np.uint8)).save(os.path.join(os.fsencode(folder / "a"), name))
    ds = load_dataset(str(folder))
    assert train_mod._data_fingerprint(ds)["images"] == 2
    result = {"sse": torch.tensor([1.0, 2.0]), "labels": torch.tensor([0, 0])}
    path = tmp_path / "scores.csv"
    train_mod._write_scores_csv(path, "folder", result, 1.5, indices=source_indices(ds), files=image_files(ds))
    rows = path.read_bytes().splitlines()
    assert len(rows) == 3 and rows[1].endswith(b"a/caf\xe9.png") and rows[2].endswith(b"a/plain.png")
    assert rows[1].startswith(b"folder,0,") and rows[2].startswith(b"folder,1,")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "scores.csv"]  # no partial file left


def test_a_run_stopped_mid_epoch_resumes_only_with_its_own_number_of_processes(tmp_path: Path, monkeypatch,
                                                                                 capsys) -> None:
    # The batch position counts batches of the saved sharding and the epoch's partial sums are per saved
    # rank: another number of processes would skip or repeat images and misreport the epoch.
    real_step = train_mod.train_step
    calls = {"n": 0}

    def ctrl_c_after_the_first_batch(module, x, optimizer, amp=False):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(module, x, optimizer, amp)

    monkeypatch.setattr(train_mod, "train_step", ctrl_c_after_the_first_batch)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**{**TINY_AE, "batch_size": 8}, out=str(out)))
    monkeypatch.setattr(train_mod, "train_step", real_step)
    state = load_checkpoint(out)
    assert (state["epoch"], state["batch"]) == (0, 1)
    state["world_size"] = 2  # as if saved by two torchrun processes
    save_checkpoint(state, out / "checkpoint.pt")
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert train_main(_train_args("ae", "--resume", "--out", str(out), "--no-progress")) == 2
    err = capsys.readouterr().err
    assert "stopped in epoch 1, after batch 1, with 2 processes" in err and "torchrun --nproc_per_node 2" in err
    assert (out / "checkpoint.pt").read_bytes() == before
    # Stopped at an epoch's end, it resumes with any number.
    state["batch"], state["epoch"] = 0, 1
    save_checkpoint(state, out / "checkpoint.pt")
    assert train_main(_train_args("ae", "--resume", "--epochs", "2", "--out", str(out), "--no-progress")) == 0
    assert "saved with 2 processes, now 1" in capsys.readouterr().err


def test_psnr_and_json_outputs_of_nonfinite_errors() -> None:
    assert np.isnan(train_mod._psnr(float("nan"))) and np.isnan(train_mod._psnr(float("inf")))
    assert train_mod._psnr(0.0) == float("inf") and train_mod._psnr(0.01) == pytest.approx(20.0)
    text = train_mod._json({"psnr": float("inf"), "mse": float("nan"), "rows": [1.0, float("-inf")]})
    assert json.loads(text) == {"psnr": None, "mse": None, "rows": [1.0, None]}


def test_a_run_that_ends_before_kmeans_has_pooled_its_batches_says_so(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    common = ["vqvae", "--data", "sample", "--limit", "32", "--batch-size", "16", "--codes", "16", "--code-dim", "8",
              "--vq-option", "init=kmeans", "--vq-option", "kmeans_batches=5", "--eval-limit", "16", "--out",
              str(out), "--no-progress"]
    assert train_main(_train_args(*common, "--epochs", "1")) == 0  # 2 batches an epoch
    assert "k-means pools 5 training batches" in capsys.readouterr().out
    assert "k-means pools" in (out / "train.log").read_text()
    assert not bool(load_checkpoint(out / "checkpoint.pt")["model_state"]["quantizer.initialized"])
    # --vq-option init= implies --codebook-init layer: so the run records it, and a resume checks it.
    assert json.loads((out / "config.json").read_text())["codebook_init"] is None
    assert train_main(_train_args("vqvae", "--resume", "--epochs", "3", "--out", str(out), "--no-progress",
                                  "--codebook-init", "xavier_normal")) == 2
    assert "--codebook-init 'xavier_normal' (the run has 'layer')" in capsys.readouterr().err
    # Resumed for 2 more epochs (4 batches), the pool of 2 completes: no note.
    assert train_main(_train_args("vqvae", "--resume", "--epochs", "3", "--out", str(out), "--no-progress",
                                  "--codebook-init", "layer")) == 0
    assert "k-means pools" not in capsys.readouterr().out
    assert bool(load_checkpoint(out / "checkpoint.pt")["model_state"]["quantizer.initialized"])


# ------------------------------------------------------------------------------- broken checkpoints


def _broken_checkpoints(folder: Path) -> dict[str, Path]:
    good = folder / "good.pt"
    save_checkpoint({"format": "vqfast-run-1", "w": torch.arange(10_000.0)}, good)
    data = good.read_bytes()
    files = {"truncated": data[: len(data) // 2], "garbage": b"\x00\x01not a checkpoint" * 10,
             "empty": b"", "foreign pickle": pickle.dumps({"format": "vqfast-run-1", "x": {1, 2}})}
    paths = {}
    for name, content in files.items():
        path = folder / name.replace(" ", "_") / "checkpoint.pt"
        path.parent.mkdir()
        path.write_bytes(content)
        paths[name] = path
    path = folder / "foreign_torch" / "checkpoint.pt"
    path.parent.mkdir()
    torch.save({"state_dict": {}}, path)
    paths["foreign torch file"] = path
    return paths


def test_unreadable_checkpoints_are_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, path in _broken_checkpoints(tmp_path).items():
        with pytest.raises(CheckpointError, match="corrupt or not a vqfast checkpoint") as info:
            load_checkpoint(path)
        assert str(path) in str(info.value), name
        assert "weights_only" not in str(info.value), name
        # evaluate and train --resume: a message and exit status 2, no traceback
        assert evaluate_main(_evaluate_args(str(path.parent), "--data", "sample", "--no-progress")) == 2
        err = capsys.readouterr().err
        assert "corrupt or not a vqfast checkpoint" in err and "Traceback" not in err, name
        assert train_main(_train_args("ae", "--resume", "--data", "sample", "--out", str(path.parent))) == 2
        assert "corrupt or not a vqfast checkpoint" in capsys.readouterr().err, name


def test_a_checkpoint_that_does_not_fit_its_model_is_a_clear_error(tmp_path: Path, ae_run: Path) -> None:
    state = load_checkpoint(ae_run)
    state["model_state"] = {k: v[..., :1] for k, v in state["model_state"].items()}
    save_checkpoint(state, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="does not match"):
        train_mod.load_run(tmp_path)


@pytest.mark.parametrize("damage", ["no model_state", "no epoch", "no history", "epoch as text", "no rng",
                                    "weights of another shape", "another latent size"])
def test_a_damaged_checkpoint_is_refused_cleanly_by_resume_and_evaluate(
        tmp_path: Path, ae_run: Path, capsys: pytest.CaptureFixture[str], damage: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(ae_run, run)
    state = load_checkpoint(run)
    if damage.startswith("no "):
        del state[damage[3:]]
    elif damage == "epoch as text":
        state["epoch"] = "1"
    elif damage == "weights of another shape":
        name = next(iter(state["model_state"]))
        state["model_state"][name] = state["model_state"][name][..., :1].clone()
    else:
        state["config"]["latent_dim"] = state["config"]["latent_dim"] * 2
    save_checkpoint(state, run / "checkpoint.pt")
    assert train_main(_train_args("ae", "--resume", "--epochs", "3", "--out", str(run), "--no-progress")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("corrupt or not a vqfast checkpoint" in err or "does not match" in err), err
    assert evaluate_main(_evaluate_args(str(run), "--data", "sample", "--limit", "8", "--no-progress")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("corrupt or not a vqfast checkpoint" in err or "does not match" in err), err


# ------------------------------------------------------------------- data without a test split


def _write_npz(path: Path, n: int, seed: int, **extra: np.ndarray) -> Path:
    x = np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    np.savez(path, x=x, **extra)
    return path


def test_data_without_a_test_split_is_evaluated_on_training_images_and_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _write_npz(tmp_path / "mine.npz", 32, seed=0)
    result = train(TrainConfig(**{**TINY_AE, "data": str(data), "limit": None}, out=str(tmp_path / "a")))
    out = capsys.readouterr().out
    assert "no test split" in out and "TRAINING images" in out and "\nTest (" not in out
    assert result.test_metrics is not None and result.test_metrics["held_out"] is False
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["test"]["held_out"] is False
    assert "no test split" in (tmp_path / "a" / "train.log").read_text()
    # Only the images the run trained on (--limit), at most --eval-limit of them: the last 12 of the
    # file, which a run limited to 20 never saw, are not reported as training images.
    for eval_limit, n in ((None, 20), (5, 5)):
        result = train(TrainConfig(**{**TINY_AE, "data": str(data), "limit": 20, "eval_limit": eval_limit},
                                   out=str(tmp_path / f"limited{eval_limit}")))
        assert "TRAINING images" in capsys.readouterr().out and result.test_metrics["images"] == n
        assert result.test_metrics["held_out"] is False

    # with its held-out partner the result is a test again
    held_out = _write_npz(tmp_path / "held_out.npz", 16, seed=1)
    result = train(TrainConfig(**{**TINY_AE, "data": str(data), "limit": None}, eval_data=str(held_out),
                               out=str(tmp_path / "b")))
    out = capsys.readouterr().out
    assert "Test (held_out.npz, 16 images)" in out and "TRAINING" not in out
    assert result.test_metrics is not None and result.test_metrics["held_out"] is True


def test_a_vae_with_a_single_evaluation_image_blends_training_images_and_says_so(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "one_test.npz"
    np.savez(data, x_train=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
             x_test=rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8))
    vae = dict(model="vae", data=str(data), batch_size=8, latent_dim=16, epochs=1, progress=False, device="cpu",
               grid_images=4)
    train(TrainConfig(**vae, out=str(tmp_path / "a")))
    assert (tmp_path / "a" / "blend.png").is_file()
    assert "blend.png blends training images: the evaluation set (one_test.npz) has only 1 image" in (
        tmp_path / "a" / "train.log").read_text()
    # One training image as well: there is no pair to blend, and the log says why there is no picture.
    train(TrainConfig(**vae, limit=1, out=str(tmp_path / "b")))
    assert not (tmp_path / "b" / "blend.png").exists() and (tmp_path / "b" / "samples.png").is_file()
    assert "blend.png not written: it blends between two images" in (tmp_path / "b" / "train.log").read_text()


def test_eval_data_naming_the_training_source_is_not_a_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = _write_npz(tmp_path / "mine.npz", 32, seed=0)
    monkeypatch.chdir(tmp_path)  # the same file, spelled another way
    result = train(TrainConfig(**{**TINY_AE, "data": str(data), "limit": None}, eval_data="mine.npz",
                               out=str(tmp_path / "a")))
    out = capsys.readouterr().out
    assert "TRAINING images" in out and "\nTest (" not in out
    assert result.test_metrics is not None and result.test_metrics["held_out"] is False
    # --eval-data was given: the reason is that it names the training data, not a missing --eval-data.
    log = (tmp_path / "a" / "train.log").read_text()
    for text in (out, log):
        assert "--eval-data mine.npz is the training data itself" in text, text
        assert "no test split" not in text and "pass --eval-data" not in text, text


def test_an_image_damaged_past_its_header_read_by_a_worker_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    from PIL import Image

    (tmp_path / "data" / "cats").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "data" / "cats" / "good.png")
    whole = (tmp_path / "data" / "cats" / "good.png").read_bytes()
    (tmp_path / "data" / "cats" / "cut.png").write_bytes(whole[: len(whole) // 2])
    argv = ["ae", "--data", str(tmp_path / "data"), "--latent-dim", "4", "--epochs", "1", "--workers", "1",
            "--out", str(tmp_path / "run"), "--no-progress"]
    assert train_main(_train_args(*argv)) == 2
    err = capsys.readouterr().err
    assert "cut.png: " in err and "remove or replace this image" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_images_that_are_not_32x32_rgb_are_rejected_up_front(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "big.npz", x=np.zeros((4, 64, 64, 3), dtype=np.uint8))
    out = tmp_path / "run"
    assert train_main(_train_args("ae", "--data", str(tmp_path / "big.npz"), "--out", str(out))) == 2
    err = capsys.readouterr().err
    assert "(4, 64, 64, 3)" in err and "32 x 32" in err
    assert not out.exists()


# ----------------------------------------------------------------------------------------- evaluate


def test_evaluate_names_its_outputs_after_the_data_it_really_used(ae_run: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval"
    # CIFAR-10 is not under tmp_path and may not be downloaded: the bundled sample is scored instead
    summary = evaluate(ae_run, data="cifar10", data_root=str(tmp_path / "no-data"), download=False, limit=20,
                       out_dir=out, worst=2, progress=False)
    assert summary["data"] == "sample" and summary["requested_data"] == "cifar10"
    assert any("bundled CIFAR-10 sample" in note for note in summary["notes"])
    assert sorted(p.name for p in out.iterdir()) == ["eval-sample-test-worst.png", "eval-sample-test.csv",
                                                     "eval-sample-test.json"]
    assert json.loads((out / "eval-sample-test.json").read_text())["data"] == "sample"
    rows = (out / "eval-sample-test.csv").read_text().splitlines()
    assert rows[1].startswith("sample,0,")

    assert evaluate_main(_evaluate_args(str(ae_run), "--data", "cifar10", "--data-root", str(tmp_path / "no-data"),
                                        "--no-download", "--limit", "10", "--out", str(tmp_path / "e2"),
                                        "--no-progress")) == 0
    printed = capsys.readouterr().out
    assert " on sample test:" in printed and "cifar10 was unavailable" in printed


def test_evaluate_scores_the_runs_own_test_source_by_default(npz_run, tmp_path: Path) -> None:
    run, data = npz_run
    summary = evaluate(run, out_dir=tmp_path / "e", worst=0, progress=False)
    assert summary["data"] == str(data.resolve()) and summary["images"] == 40
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        evaluate(run, out_dir=tmp_path / "a_file", worst=0, progress=False)
    with pytest.raises(FileExistsError, match=r"a_file is a file, so no folder can be made under it"):
        evaluate(run, out_dir=tmp_path / "a_file" / "sub" / "deeper", worst=0, progress=False)


def test_evaluate_of_the_train_split_scores_the_runs_training_data(tmp_path: Path) -> None:
    run = train(TrainConfig(**TINY_AE, eval_data="synthetic", out=str(tmp_path / "run"))).run_dir
    assert evaluate(run, split="train", limit=8, out_dir=tmp_path / "e", worst=0, progress=False)["data"] == "sample"
    assert evaluate(run, limit=8, out_dir=tmp_path / "e", worst=0, progress=False)["data"] == "synthetic"
    # The images it trained on: the sample's 2,000 training images cut to the run's 32 (--limit), not all.
    summary = evaluate(run, split="train", out_dir=tmp_path / "e", worst=0, progress=False)
    assert summary["images"] == 32 and any("the 32 its --limit kept" in note for note in summary["notes"])
    assert evaluate(run, split="train", limit=8, out_dir=tmp_path / "e", worst=0, progress=False)["images"] == 8
    # Named explicitly, the source is scored as asked.
    assert evaluate(run, data="sample", split="train", out_dir=tmp_path / "e", worst=0, progress=False)["images"] == 2000


def test_evaluate_of_the_train_split_picks_from_the_runs_images_as_its_own_evaluation_did(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A run without --limit on an .npz without a test split: its end-of-run evaluation scored evenly
    # spaced training images, and `evaluate --split train --limit` scores those, as for a run with a
    # --limit that kept every image (the same model gets the same images either way).
    import csv

    data = _write_npz(tmp_path / "mine.npz", 20, seed=4)
    common = {**TINY_AE, "data": str(data), "batch_size": 10, "eval_limit": 5}
    runs = [train(TrainConfig(**{**common, "limit": limit}, out=str(tmp_path / f"run{limit}"))).run_dir
            for limit in (None, 20)]
    picked = []
    for run in runs:
        summary = evaluate(run, split="train", limit=5, out_dir=tmp_path / run.name, worst=0, progress=False)
        with open(tmp_path / run.name / "eval-mine-all.csv", newline="") as f:
            picked.append([int(r["index"]) for r in csv.DictReader(f)])
        assert any("scored the images the run trained on" in note and "evenly spaced" in note
                   for note in summary["notes"]), summary["notes"]
    assert picked[0] == picked[1] == [0, 4, 8, 12, 16]
    # Its own images at a new place (after a move): still cut as the run cut them.
    folder = tmp_path / "imgs"
    from PIL import Image

    rng = np.random.default_rng(1)
    for i in range(18):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"c{i % 2}" / f"{i}.png")
    run = train(TrainConfig(**{**TINY_AE, "data": str(folder), "limit": 9, "batch_size": 4, "eval_limit": 4},
                            out=str(tmp_path / "folder-run"))).run_dir
    folder.rename(tmp_path / "moved")
    reads = []
    real_load = train_mod.load_dataset
    monkeypatch.setattr(train_mod, "load_dataset", lambda src, *a, **k: reads.append(src) or real_load(src, *a, **k))
    summary = evaluate(run, data=str(tmp_path / "moved"), split="train", out_dir=tmp_path / "fe", worst=0,
                       progress=False)
    assert summary["images"] == 9 and any("the 9 its --limit kept" in note for note in summary["notes"])
    assert reads == [str(tmp_path / "moved")]  # read once: the images recognised are the ones scored


def test_a_finished_run_evaluated_again_with_new_settings_keeps_them_in_its_checkpoint(tmp_path: Path,
                                                                                        capsys) -> None:
    out = tmp_path / "run"
    train(TrainConfig(**TINY_AE, out=str(out)))
    noise = _write_npz(tmp_path / "noise.npz", 6, seed=9)
    assert train_main(_train_args("ae", "--resume", "--out", str(out), "--eval-data", str(noise), "--lr", "0.01",
                                  "--no-progress")) == 0
    saved = load_checkpoint(out)["config"]
    assert saved["lr"] == 0.01 and saved["eval_data"] == str(noise.resolve())
    assert json.loads((out / "config.json").read_text())["lr"] == 0.01
    assert evaluate(out, worst=0, progress=False, out_dir=tmp_path / "e")["data"] == str(noise.resolve())
    capsys.readouterr()
    # Trained on later, at that learning rate and without a note that it changed.
    assert train_main(_train_args("ae", "--resume", "--out", str(out), "--epochs", "2", "--no-progress")) == 0
    assert "learning rate" not in capsys.readouterr().out
    assert load_checkpoint(out)["config"]["lr"] == 0.01


def test_an_earlier_ood_evaluation_leaves_no_scores_beside_a_later_one(ae_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "e"
    evaluate(ae_run, data="sample", limit=8, ood="synthetic", out_dir=out, worst=0, progress=False)
    assert [p.name for p in out.glob("*-ood-*.csv")] == ["eval-sample-test-ood-synthetic-test.csv"]
    summary = evaluate(ae_run, data="sample", limit=4, out_dir=out, worst=0, progress=False)
    assert "ood" not in summary and not list(out.glob("*-ood-*.csv"))
    assert (out / "eval-sample-test.csv").is_file()


def test_evaluate_of_data_without_a_split_says_all(ae_run: Path, tmp_path: Path) -> None:
    data = _write_npz(tmp_path / "mine.npz", 12, seed=2)
    summary = evaluate(ae_run, data=str(data), out_dir=tmp_path / "e", worst=0, progress=False)
    assert summary["split"] == "all" and summary["images"] == 12
    assert any("no separate train/test split: scored all its images" in note for note in summary["notes"])
    assert (tmp_path / "e" / "eval-mine-all.json").is_file()
    # Cut by a limit, the note says how many it scored.
    summary = evaluate(ae_run, data=str(data), limit=5, out_dir=tmp_path / "e", worst=0, progress=False)
    assert summary["images"] == 5
    assert any("split: scored 5 of its images (--limit 5)" in note for note in summary["notes"]), summary["notes"]


def test_evaluate_of_a_folder_names_each_images_file(ae_run: Path, tmp_path: Path) -> None:
    import csv

    from PIL import Image

    folder = tmp_path / "my, imgs"  # a comma in the name: the CSV quotes it
    rng = np.random.default_rng(3)
    for i in range(6):
        (folder / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"class{i % 2}" / f"{i}.png")
    out = tmp_path / "e"
    summary = evaluate(ae_run, data=str(folder), limit=4, out_dir=out, worst=2, progress=False)
    with open(out / "eval-my, imgs-all.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == summary["images"] == 4
    assert all(r["source"] == "my, imgs" for r in rows)
    # --limit 4 keeps evenly spaced images of the class-sorted folder: both classes, not the first one only.
    files = [r["file"] for r in rows]
    assert len(set(files)) == 4 and {f.split(os.sep)[0] for f in files} == {"class0", "class1"}
    # The index is the image's place in the folder's sorted file list, also when --limit picks from it.
    listed = sorted(os.path.relpath(p, folder) for p in folder.rglob("*.png"))
    assert [listed[int(r["index"])] for r in rows] == files and [int(r["index"]) for r in rows] != [0, 1, 2, 3]
    # Each row's score is that file's: re-score one image alone (the worst, named by that index).
    worst_i, worst_sse = summary["worst"][0]
    alone = tmp_path / "alone" / "c"
    alone.mkdir(parents=True)
    (folder / listed[worst_i]).rename(alone / "x.png")
    again = evaluate(ae_run, data=str(alone.parent), out_dir=tmp_path / "e2", worst=0, progress=False)
    assert again["score_max"] == pytest.approx(worst_sse, rel=1e-5)
    assert "notes" not in again or not any("replaced" in n for n in again["notes"])
    # Another folder of the same base name, into the same --out: its files replace the first's, and it says so.
    other = tmp_path / "elsewhere" / "alone"
    (other / "c").mkdir(parents=True)
    (alone / "x.png").rename(other / "c" / "y.png")
    third = evaluate(ae_run, data=str(other), out_dir=tmp_path / "e2", worst=0, progress=False)
    assert any(f"replaced the evaluation of {alone.parent}" in n for n in third["notes"])
    # The same folder again, by another spelling of its path: nothing replaced.
    fourth = evaluate(ae_run, data=str(other / "c" / ".."), out_dir=tmp_path / "e2", worst=0, progress=False)
    assert not any("replaced" in n for n in fourth.get("notes", []))


def test_evaluate_of_a_run_whose_data_moved_says_to_give_data(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    data = _write_npz(tmp_path / "mine.npz", 20, seed=4)
    run = train(TrainConfig(**{**TINY_AE, "data": str(data), "limit": None}, out=str(tmp_path / "run"))).run_dir
    data.rename(tmp_path / "moved.npz")
    for split in ("test", "train"):
        assert evaluate_main(_evaluate_args(str(run), "--split", split, "--no-progress")) == 2
        err = capsys.readouterr().err
        assert f"the run's training data, {data}, is not there any more" in err and "with --data" in err
    summary = evaluate(run, data=str(tmp_path / "moved.npz"), out_dir=tmp_path / "e", worst=0, progress=False)
    assert summary["images"] == 20
    # A path given on the command line that does not exist gets the plain message.
    assert evaluate_main(_evaluate_args(str(run), "--data", str(tmp_path / "nowhere.npz"), "--no-progress")) == 2
    assert "is not there any more" not in capsys.readouterr().err


def test_evaluate_with_worst_0_removes_an_earlier_grid(ae_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "e"
    evaluate(ae_run, data="sample", limit=10, out_dir=out, worst=3, progress=False)
    assert (out / "eval-sample-test-worst.png").is_file()
    summary = evaluate(ae_run, data="sample", limit=10, out_dir=out, worst=0, progress=False)
    assert summary["worst"] == []
    assert sorted(p.name for p in out.iterdir()) == ["eval-sample-test.csv", "eval-sample-test.json"]
    # No file column for a source that is not files
    assert (out / "eval-sample-test.csv").read_text().splitlines()[0] == "source,index,label,sse,mse,psnr,anomalous"


def test_evaluate_writes_nothing_when_the_ood_source_is_missing(ae_run: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval"
    assert evaluate_main(_evaluate_args(str(ae_run), "--data", "sample", "--ood", "svhn", "--no-download",
                                        "--data-root", str(tmp_path / "no-data"), "--out", str(out))) == 2
    assert "SVHN" in capsys.readouterr().err
    assert not out.exists()
    before = sorted(p.name for p in ae_run.iterdir())
    assert evaluate_main(_evaluate_args(str(ae_run), "--data", "sample", "--ood", "svhn", "--no-download",
                                        "--data-root", str(tmp_path / "no-data"))) == 2
    assert sorted(p.name for p in ae_run.iterdir()) == before


@pytest.mark.parametrize("argv, option", [(["--limit", "-1"], "--limit"), (["--batch-size", "0"], "--batch-size"),
                                          (["--worst", "-1"], "--worst"), (["--device", "gpu"], "--device"),
                                          (["--device", "meta"], "--device")])
def test_evaluate_rejects_bad_options(ae_run: Path, tmp_path: Path, argv: list[str], option: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval"
    assert evaluate_main(_evaluate_args(str(ae_run), "--data", "sample", "--out", str(out), *argv)) == 2
    assert option in capsys.readouterr().err and not out.exists()


def test_evaluate_shows_a_progress_bar_unless_told_not_to(ae_run: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(ae_run), "--data", "sample", "--limit", "20", "--batch-size", "8", "--worst", "0",
            "--out", str(tmp_path)]
    assert evaluate_main(_evaluate_args(*args)) == 0
    assert "sample test" in capsys.readouterr().err
    assert evaluate_main(_evaluate_args(*args, "--no-progress")) == 0
    assert capsys.readouterr().err == ""


def test_the_articles_vq_step_is_never_given_more_images_than_its_training_batches(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    # Its search builds a (rows x codes x dims) tensor: the evaluation's default 256 images would need
    # four times the memory of training batches of 64.
    from vqfast.models import article

    real_search, rows = article.search_broadcast, []

    def search(z, codebook):
        rows.append(z.shape[0])
        return real_search(z, codebook)

    monkeypatch.setattr(article, "search_broadcast", search)
    cfg = dict(model="vqvae", vq_impl="article", num_codes=8, code_dim=4, data="sample", limit=16, batch_size=8,
               epochs=1, eval_limit=40, grid_images=4, progress=False, device="cpu")
    run = train(TrainConfig(**cfg, out=str(tmp_path / "run"))).run_dir
    # (The default preset's restarts do not apply to it, and the run says so.)
    assert "no dead-code restarts; of the vqfast preset only its beta (0.25)" in (run / "train.log").read_text()
    evaluate(run, limit=40, worst=20, device="cpu", progress=False, out_dir=tmp_path / "e")
    assert rows and max(rows) == 8 * 16  # 8 images of 4 x 4 latents
    rows.clear()
    evaluate(run, limit=40, worst=0, batch_size=40, device="cpu", progress=False, out_dir=tmp_path / "e")
    assert max(rows) == 40 * 16  # unless asked for


def test_amp_on_the_cpu_says_so_and_trains_in_fp32(tmp_path: Path, capsys) -> None:
    result = train(TrainConfig(**TINY_AE, amp=True, out=str(tmp_path / "run")))
    assert "--amp: bf16 autocast is used on CUDA only" in capsys.readouterr().err
    assert len(result.history) == 1 and np.isfinite(result.history[0]["avg_loss"])
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    evaluate(result.run_dir, limit=4, worst=0, amp=True, device="cpu", progress=False, out_dir=tmp_path / "e")
    assert "--amp: bf16 autocast is used on CUDA only" in capsys.readouterr().err


def test_evaluate_on_svhn_the_articles_generalisation_experiment(ae_run: Path, tmp_path: Path, monkeypatch) -> None:
    # SVHN's own test file, written here in its .mat layout (no download); CIFAR-10 training, SVHN test.
    import torchvision.datasets.svhn as svhn
    from scipy.io import savemat

    monkeypatch.setattr(svhn, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    savemat(tmp_path / "test_32x32.mat", {"X": x.transpose(1, 2, 3, 0), "y": (np.arange(20) % 10 + 1)[:, None]})
    summary = evaluate(ae_run, data="svhn", data_root=str(tmp_path), download=False, device="cpu",
                       out_dir=tmp_path / "eval", progress=False, ood="sample")
    assert summary["data"] == "svhn" and summary["images"] == 20
    scores = np.loadtxt(tmp_path / "eval" / "eval-svhn-test.csv", delimiter=",", skiprows=1, usecols=3)  # sse
    assert len(scores) == 20 and summary["score_mean"] == pytest.approx(scores.mean(), rel=1e-5)
    assert summary["mse"] == pytest.approx(scores.mean() / 3072, rel=1e-5)
    assert 0.0 <= summary["ood"]["auroc"] <= 1.0


def test_deterministic_trains_in_torchs_deterministic_mode_and_restores_it(tmp_path: Path, monkeypatch) -> None:
    seen = []
    real_build = train_mod.build_model

    def spy(*args, **kwargs):  # the mode while the run builds its model
        seen.append((torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return real_build(*args, **kwargs)

    monkeypatch.setattr(train_mod, "build_model", spy)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    out = tmp_path / "run"
    args = _train_args("vqvae", "--data", "sample", "--limit", "32", "--batch-size", "16", "--codes", "16",
                       "--code-dim", "8", "--epochs", "1", "--eval-limit", "16", "--device", "cpu", "--no-progress",
                       "--deterministic", "--out", str(out))
    assert train_main(args) == 0
    assert seen == [(True, ":4096:8")]
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert json.loads((out / "config.json").read_text())["deterministic"] is True
    # A resumed run keeps its setting unless given anew.
    seen.clear()
    resume = _train_args("vqvae", "--epochs", "2", "--eval-limit", "16", "--device", "cpu", "--no-progress",
                         "--resume", "--out", str(out))
    assert train_main(resume) == 0
    assert seen == [(True, ":4096:8")]
    assert not torch.are_deterministic_algorithms_enabled()
    assert json.loads((out / "config.json").read_text())["deterministic"] is True
    # ... and gives it up when told.
    seen.clear()
    assert train_main(_train_args("vqvae", "--epochs", "3", "--eval-limit", "16", "--device", "cpu", "--no-progress",
                                  "--resume", "--no-deterministic", "--out", str(out))) == 0
    assert seen == [(False, None)]
    assert json.loads((out / "config.json").read_text())["deterministic"] is False
    # Without the option the run leaves the mode as it found it (off here).
    seen.clear()
    assert train_main(_train_args("ae", "--data", "sample", "--limit", "16", "--batch-size", "16", "--latent-dim", "8",
                                  "--epochs", "1", "--eval-limit", "16", "--device", "cpu", "--no-progress",
                                  "--out", str(tmp_path / "plain"))) == 0
    assert seen == [(False, None)]


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 62.50 GiB. GPU 0 has a total capacity of 79 GiB"),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 67108864000 bytes."),
])
def test_running_out_of_memory_names_the_batch_size(error: RuntimeError, ae_run: Path, tmp_path: Path, monkeypatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # A training step or an evaluation batch too large for the device: an error line that names the
    # option to change, not a traceback from deep inside the model.
    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(train_mod, "train_step", out_of_memory)
    argv = ["ae", "--data", "sample", "--limit", "32", "--batch-size", "16", "--latent-dim", "16", "--epochs", "1",
            "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run")]
    assert train_main(_train_args(*argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory in a training step with --batch-size 16 on cpu: ")
    assert str(error).splitlines()[0] in err and "smaller --batch-size" in err and "Traceback" not in err
    # The article's VQ step: the tensor its search builds is named too.
    article = ["vqvae", "--vq-impl", "article", "--vq-preset", "article", "--codes", "16", "--code-dim", "8",
               "--data", "sample", "--limit", "32", "--batch-size", "16", "--epochs", "1", "--device", "cpu",
               "--no-progress", "--out", str(tmp_path / "article")]
    assert train_main(_train_args(*article)) == 2
    assert "(--vq-impl article's search holds a batch x 16 positions x codes x code-dim tensor)" in capsys.readouterr().err
    monkeypatch.setattr(train_mod, "evaluate_model", out_of_memory)
    assert evaluate_main(_evaluate_args(str(ae_run), "--batch-size", "8", "--device", "cpu", "--no-progress")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory scoring batches of 8 images on cpu: ") and "--batch-size" in err
    # Other errors are not taken for a lack of memory.
    monkeypatch.setattr(train_mod, "train_step", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        train_main(_train_args(*argv[:-1], str(tmp_path / "other")))


def test_counts_of_one_image_read_as_such() -> None:
    summary = dict(epochs_trained=1, model="ae", data="mine.npz", split="all", images=1, mse=0.01, psnr=20.0,
                   score_mean=1.0, score_p50=1.0, score_p90=1.0, score_p99=1.0, score_max=1.0, worst=[])
    text = train_mod._format_eval(summary)
    assert "all: 1 image, MSE/pixel" in text and "1 images" not in text
    assert "all: 2 images," in train_mod._format_eval({**summary, "images": 2})
