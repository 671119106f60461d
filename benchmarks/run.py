"""Run the vqfast benchmark suite: ``python benchmarks/run.py [--quick] [--only PARTS] [--out DIR]``.

The same as ``vqfast bench``; needs vqfast installed (``pip install -e .``) and a CUDA GPU.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from vqfast import bench

    parser = argparse.ArgumentParser(prog="benchmarks/run.py")
    bench.configure_parser(parser)
    return bench.main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
