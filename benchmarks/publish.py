"""Put a benchmark run's headline table and plots into README.md.

    python benchmarks/publish.py benchmarks/results/<gpu-name> [--readme README.md]

Reads ``results.csv`` from the results folder that `vqfast bench` wrote and replaces the part of the
README between ``<!-- headline-results:start -->`` and ``<!-- headline-results:end -->`` with the GPU,
driver and versions, the headline table (vqfast next to cdist + argmin, the matmul form and the bare
cuBLAS product), the speed goals with what the run measured, the headline plot (achieved TFLOP/s of
each provider beside the run's matmul ceilings; drawn again from results.csv into the folder) and the
achieved-TFLOP/s-against-K plot when the folder has it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

START = "<!-- headline-results:start -->"
END = "<!-- headline-results:end -->"


def headline_section(results: Path, readme: Path) -> str:
    from vqfast import bench

    records, env = bench.read_csv(results / "results.csv")
    if not any(r.part == "headline" for r in records):
        raise SystemExit(f"{results / 'results.csv'} has no headline measurements")
    link = Path(os.path.relpath(results, readme.parent)).as_posix()
    # The definition only where the table has the column (runs before it was measured do not).
    wall = any(r.part == "headline" and r.provider == bench.WALL_PROVIDER for r in records)
    graph = any(r.part == "headline" and r.provider == bench.GRAPH_PROVIDER for r in records)
    timing = "medians of `triton.testing.do_bench`"
    if graph:
        timing += "; the CUDA-graph column: `triton.testing.do_bench_cudagraph` (replays, no L2 flush)"
    if wall:
        timing += "; \"back to back\": the wall-clock time per call of eager calls one after another"
    mode, fixed = env.get("mode") or "default", bench.fixed_tiles(env)
    run = ""
    if mode != "default" or fixed:
        run = (f" A `{mode}` run" + (" with fixed tiles (`VQFAST_AUTOTUNE=0`)" if fixed else "")
               + ": fewer points or untuned kernels, not the full benchmark.")
    theirs = env.get("vector_quantize_pytorch")
    if theirs is None:
        theirs = " This run does not record the vector-quantize-pytorch version it compared with."
    elif theirs == "not installed":
        theirs = " vector-quantize-pytorch was not installed for this run."
    else:
        theirs = f" vector-quantize-pytorch {theirs}."
    commit = f" (commit {env['commit']})" if env.get("commit") else ""
    stopped = (" This run was cut short by its hard time limit: points it did not reach show `skipped (time budget)`."
               if bench.cut_short(records) else "")
    # A part that stopped on an error has no rows for the points it had not reached: say so here too.
    stopped += "".join(f" {bench.crash_sentence(r)}." for r in records if r.case == bench.CRASHED)
    lines = [
        f"Measured on {env.get('gpu') or 'an unnamed GPU'} (driver {env.get('driver', '?')}, CUDA "
        f"{env.get('cuda', '?')}), torch {env.get('torch', '?')}, Triton {env.get('triton', '?')}, vqfast "
        f"{env.get('vqfast', '?')}{commit}; times in ms ({timing}), all results in "
        f"[{link}/results.md]({link}/results.md)." + run + stopped + theirs + " " + bench.precision_note(env),
        "",
        bench.headline_table(records).rstrip(),
        "",
        "Speed goals (targets set for an H100; peaks and copy bandwidth measured in the same run; \"missed by\" "
        "in percent of the target):",
        "",
        bench.goals_table(records).rstrip(),
    ]
    # The headline plot is drawn again from results.csv (so it always shows the table's run; runs from
    # before the plot get one); a plot that cannot be drawn is left out, not the table.
    try:
        drawn = bench.plot_headline(records, results / bench.HEADLINE_PLOT, env)
    except Exception as exc:  # noqa: BLE001 - the table still gets published
        print(f"warning: could not draw {bench.HEADLINE_PLOT}: {exc}", file=sys.stderr)
        drawn = None
    if drawn is not None:
        lines += ["", f"![achieved TFLOP/s of each provider at the headline shapes]({link}/{bench.HEADLINE_PLOT})"]
    # The K-sweep plot only beside the run that drew it (one without K sweeps draws none).
    if (results / "nearest_tflops_vs_k.png").is_file() and any(r.part == "nearest" for r in records):
        lines += ["", f"![achieved TFLOP/s against K]({link}/nearest_tflops_vs_k.png)"]
    return "\n".join(lines)


def publish(results: Path, readme: Path) -> None:
    text = readme.read_text()
    if START not in text or END not in text or text.index(START) > text.index(END):
        raise SystemExit(f"{readme} has no {START} ... {END} section")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{headline_section(results, readme)}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a folder written by vqfast bench (holds results.csv)")
    parser.add_argument("--readme", type=Path, default=Path(__file__).resolve().parents[1] / "README.md")
    args = parser.parse_args(argv)
    publish(args.results, args.readme)
    print(f"updated {args.readme} from {args.results / 'results.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
