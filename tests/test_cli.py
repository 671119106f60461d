"""The ``vqfast`` console script."""

import subprocess
import sys

import vqfast
from vqfast.cli import main


def test_version_and_help():
    out = subprocess.run([sys.executable, "-m", "vqfast", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"vqfast {vqfast.__version__}"
    out = subprocess.run([sys.executable, "-m", "vqfast", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("train", "evaluate", "bench"):
        assert command in out.stdout


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: vqfast" in capsys.readouterr().out
