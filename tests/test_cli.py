"""The ``vqfast`` console script."""

import subprocess
import sys

import pytest

import vqfast
from vqfast.cli import main


def test_version_and_help(capsys):
    # One real process for the `python -m vqfast` entry point; --help in this one (a fresh interpreter
    # costs seconds of importing torch).
    out = subprocess.run([sys.executable, "-m", "vqfast", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"vqfast {vqfast.__version__}"
    # ... without importing torch (seconds): the public names load on first use.
    code = ("import sys, vqfast, vqfast.cli\n"
            "try:\n    vqfast.cli.main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'triton', 'vqfast.layer') if m in sys.modules))\n"
            # The submodules, reachable as attributes after that bare import (loaded then).
            "print(vqfast.reference.__name__, vqfast.kernels.__name__, vqfast.models.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-2:] == ["[]", "vqfast.reference vqfast.kernels vqfast.models"], out.stdout
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for command in ("train", "evaluate", "bench"):
        assert command in help_text


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: vqfast" in capsys.readouterr().out


def test_a_reader_that_goes_away_ends_the_command_without_a_traceback(monkeypatch):
    """``vqfast evaluate RUN | head -1``: the pipe's reader is gone while the command still writes (here
    from the start, and the command is a stand-in that writes a lot)."""
    import os

    from vqfast import bench, cli

    read_end, write_end = os.pipe()
    os.close(read_end)
    pipe = os.fdopen(write_end, "w")

    def writes_a_lot(args):
        print("x" * 1_000_000)
        return 0

    monkeypatch.setattr(bench, "main", writes_a_lot)
    monkeypatch.setattr(sys, "stdout", pipe)
    try:
        assert cli.main(["bench"]) == 1
        print("more")  # stdout now leads nowhere, without another error (nor one at exit)
        pipe.flush()
    finally:
        pipe.close()

    # A broken pipe that is not stdout's (a socket, a worker) is not taken for a reader gone away.
    def breaks_another_pipe(args):
        raise BrokenPipeError("a worker's pipe")

    monkeypatch.setattr(sys, "stdout", sys.__stdout__)
    monkeypatch.setattr(bench, "main", breaks_another_pipe)
    with pytest.raises(BrokenPipeError, match="a worker's pipe"):
        cli.main(["bench"])


def test_ctrl_c_while_the_command_starts_is_one_line_and_status_130(monkeypatch, capsys):
    # Ctrl-C during the seconds of importing torch, before a command handles it itself: no traceback.
    from vqfast import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["train", "vqvae"]) == 130
    assert capsys.readouterr().err.strip() == "Interrupted."
