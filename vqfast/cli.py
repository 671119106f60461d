"""The ``vqfast`` command: train, evaluate, bench."""

from __future__ import annotations

import argparse
import os
import select
import sys

from vqfast._version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqfast",
        description="Fast vector quantization for PyTorch: train AE / VAE / VQ-VAE models, evaluate them, benchmark the kernels.",
    )
    parser.add_argument("--version", action="version", version=f"vqfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # Imported here, not at module level: importing vqfast.cli needs no torch, and CUDA is never queried.
    from vqfast import bench as bench_mod
    from vqfast.models import train as train_mod

    p = sub.add_parser("train", help="train an AE, VAE or VQ-VAE on CIFAR-10 (or another source)")
    train_mod.configure_train_parser(p)
    p.set_defaults(handler=train_mod.train_main)
    p = sub.add_parser("evaluate", help="reconstruction error and anomaly scores of a trained run")
    train_mod.configure_evaluate_parser(p)
    p.set_defaults(handler=train_mod.evaluate_main)
    p = sub.add_parser("bench", help="time the kernels and a training step against plain PyTorch (needs a GPU)")
    bench_mod.configure_parser(p)
    p.set_defaults(handler=bench_mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    except KeyboardInterrupt:
        # Ctrl-C before a command's own handling starts (while torch is imported, a few seconds): the
        # commands print their own line and return 130 once running.
        print("Interrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # A broken pipe elsewhere (a socket, a worker) is an error of its own.
        if not _stdout_reader_gone():
            raise
        # The reader of the output went away (``vqfast evaluate RUN | head -1``): the files are written;
        # stdout goes to /dev/null so that Python's flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe or socket whose reader has closed it (poll reports an error on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll here, or no file behind sys.stdout
        return False


def _run(argv: list[str] | None) -> int:
    # --version first, on its own: the full parser imports the training and benchmark code (and torch).
    early = argparse.ArgumentParser(prog="vqfast", add_help=False)
    early.add_argument("--version", action="version", version=f"vqfast {__version__}")
    early.parse_known_args(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    return int(handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
