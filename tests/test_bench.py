"""The benchmark suite's helpers, providers and command line, on CPU (plus one run on a GPU when there is one)."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from vqfast import bench, reference

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    # Tiny ops on a busy machine: intra-op threads only add synchronisation.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---- command line ----------------------------------------------------------------------------------


def test_cli_bench_exits_2_without_cuda(monkeypatch, capsys):
    from vqfast import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err


def test_run_script_exits_2_without_cuda():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "needs a CUDA GPU" in proc.stderr


def test_import_and_parser_do_not_query_cuda():
    code = (
        "import torch\n"
        "def boom(*a, **k):\n"
        "    raise AssertionError('CUDA queried at import time')\n"
        "for name in ('is_available', 'device_count', 'current_device', 'get_device_name',\n"
        "             'get_device_properties', 'init', 'synchronize'):\n"
        "    setattr(torch.cuda, name, boom)\n"
        "import argparse\n"
        "from vqfast import bench\n"
        "p = argparse.ArgumentParser()\n"
        "bench.configure_parser(p)\n"
        "a = p.parse_args(['--quick', '--only', 'layer,headline'])\n"
        "assert a.only == ('headline', 'layer'), a.only\n"
        "print('clean')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "clean" in proc.stdout


def test_parse_parts_orders_and_rejects():
    assert bench.parse_parts("train, nearest") == ("nearest", "train")
    assert bench.parse_parts("headline") == ("headline",)
    with pytest.raises(argparse.ArgumentTypeError, match="unknown part"):
        bench.parse_parts("nearest,bogus")
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_parts(" , ")
    parser = argparse.ArgumentParser()
    bench.configure_parser(parser)
    for argv in (["--only", "bogus"], ["--rep", "-5"], ["--rep", "0"], ["--budget", "nan"], ["--budget", "inf"],
                 ["--budget", "ten"]):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(argv)
        assert exc.value.code == 2
    assert parser.parse_args([]).only == bench.PARTS
    args = parser.parse_args(["--rep", "25", "--budget", "0.5"])
    assert (args.rep, args.budget) == (25.0, 0.5)


# ---- pure helpers ----------------------------------------------------------------------------------


def test_tflops_and_gbps():
    assert bench.tflops(1024, 4096, 128, 1.0) == pytest.approx(2 * 1024 * 4096 * 128 / 1e-3 / 1e12)
    # N = K = 65,536, D = 256 at 709 TFLOP/s (an H100's bf16 ceiling) takes about 3.1 ms.
    assert bench.tflops(65536, 65536, 256, 3.1) == pytest.approx(709, rel=0.01)
    assert bench.gbps(3e9, 1000.0) == pytest.approx(3.0)
    assert bench.gbps(2 * 2**30, 1.0) == pytest.approx(2147.483648)
    with pytest.raises(ValueError):
        bench.tflops(1, 1, 1, 0.0)
    with pytest.raises(ValueError):
        bench.gbps(1, -1.0)
    assert bench.nearest_bytes(10, 20, 4, 2) == (10 * 4 + 20 * 4) * 2 + 80
    # The bare product writes its N x K output (in the inputs' dtype); the searches write N indices.
    assert bench.bare_product_bytes(10, 20, 4, 2) == (10 * 4 + 20 * 4 + 10 * 20) * 2
    assert bench.search_bytes("z@c.T (cuBLAS)", 10, 20, 4, 2) == bench.bare_product_bytes(10, 20, 4, 2)
    for provider in ("vqfast", "matmul+argmin", "cdist+argmin", bench.GRAPH_PROVIDER):
        assert bench.search_bytes(provider, 10, 20, 4, 2) == bench.nearest_bytes(10, 20, 4, 2)
    # At the goal shape the output is nearly all of the bare product's traffic.
    assert bench.bare_product_bytes(65536, 65536, 256, 2) > 60 * bench.nearest_bytes(65536, 65536, 256, 2)


def test_tolerance_follows_the_precision_rule():
    assert bench.tolerance("fp32") == bench.tolerance("tf32") == 1e-5  # tf32 + fp32 re-check: exact
    for p in ("bf16", "fp16"):
        assert bench.tolerance(p) == 1e-5  # exact products: an fp32 search of the 16-bit values
    with pytest.raises(ValueError):
        bench.tolerance("fp8")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_search_that_picks_the_runner_up_fails_the_check(dtype, one_thread):
    """A 1e-2 bound let the runner-up code pass on many rows of a large codebook; the fp32 bound over the
    16-bit values themselves, and the every-row comparison, catch it on every row."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(400, 32, generator=gen).to(dtype)
    c = torch.randn(4096, 32, generator=gen).to(dtype)
    d = torch.cdist(z.double(), c.double()) ** 2  # exact over the 16-bit values
    best, second = d.topk(2, dim=1, largest=False).indices.unbind(1)
    gap = (d.gather(1, second[:, None])[:, 0] - d.gather(1, best[:, None])[:, 0]) / (
        z.double().pow(2).sum(1) + d.min(1).values)
    assert (gap <= 1e-2).float().mean() > 0.2  # what the old bound let through (a quarter of the rows)
    assert bench.chosen_distance_error(z, c, best, rows=400) <= bench.tolerance("bf16")
    assert bench.chosen_distance_error(z, c, second, rows=400) > bench.tolerance("bf16")
    right = bench.agreement_with_fp32(z, c, best)
    assert right.wrong == 0 and right.differ <= 2
    wrong = bench.agreement_with_fp32(z, c, second)
    assert wrong.rows == 400 and wrong.wrong >= 398 and "indices on all 400 rows" in wrong.note()


def test_the_every_row_reference_is_a_plain_torch_fp32_search(monkeypatch, one_thread):
    z, c, target = _separated(n=300, k=70)
    assert torch.equal(bench.fp32_reference_indices(z, c), target)
    # Row blocks of any size (here 2 rows of 70 scores) give the same indices.
    assert torch.equal(bench.fp32_reference_indices(z, c, block=140), target)
    assert torch.equal(bench.fp32_reference_indices(z.bfloat16(), c.bfloat16()),
                       torch.cdist(z.bfloat16().double(), c.bfloat16().double()).argmin(1))
    assert bench.fp32_reference_indices(z[:0], c).shape == (0,)
    # fp32 products whatever the caller's matmul precision, which is restored afterwards; blocks of at
    # most ``block`` scores.
    seen = []
    addmm = torch.addmm

    def spy(*args, **kwargs):
        out = addmm(*args, **kwargs)
        seen.append((torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32, out.numel()))
        return out

    monkeypatch.setattr(torch, "addmm", spy)
    with bench.matmul_precision("high"):
        bench.fp32_reference_indices(z, c, block=700)
        assert torch.get_float32_matmul_precision() == "high"
    assert len(seen) == 30 and all(p == "highest" and not tf32 and size <= 700 for p, tf32, size in seen)
    # agreement_with_fp32 compares with it, not with a vqfast kernel.
    monkeypatch.setattr(torch, "addmm", addmm)
    shifted = target.clone()
    shifted[:4] = (target[:4] + 1) % c.shape[0]
    monkeypatch.setattr(bench, "fp32_reference_indices", lambda z, c: shifted)
    report = bench.agreement_with_fp32(z, c, target)
    assert (report.differ, report.wrong) == (4, 0)  # the reference's picks are the farther ones here


def _separated(n: int = 48, k: int = 96, d: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows near distinct codes: every search form must find the same, unambiguous nearest code."""
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(k, d, generator=g) * 3
    target = torch.randint(0, k, (n,), generator=g)
    z = codebook[target] + 0.01 * torch.randn(n, d, generator=g)
    return z, codebook, target


def test_chosen_distance_error_passes_right_and_flags_wrong():
    z, c, target = _separated()
    idx = reference.nearest_code(z, c)[0]
    assert torch.equal(idx, target)
    assert bench.chosen_distance_error(z, c, idx) <= 1e-12
    # Chunking over the codebook gives the same minimum.
    assert bench.chosen_distance_error(z, c, idx, code_chunk=7) <= 1e-12
    wrong = (idx + 1) % c.shape[0]
    err = bench.chosen_distance_error(z, c, wrong)
    assert err > 1e-2
    # One wrong row among many is still caught when it is sampled.
    one_wrong = idx.clone()
    one_wrong[5] = wrong[5]
    assert bench.chosen_distance_error(z, c, one_wrong, rows=z.shape[0]) > 1e-2
    assert bench.chosen_distance_error(z[:0], c, idx[:0]) == 0.0


def test_out_of_range_indices_fail_the_checks_without_indexing(one_thread):
    # What a CUDA graph that replayed nothing leaves (its output poisoned with -1), or a kernel that did
    # not write some rows: counted wrong, never used to index (on a GPU that would assert on the device).
    z, c, _ = _separated()
    idx = reference.nearest_code(z, c)[0]
    for bad in (-1, c.shape[0]):
        poisoned = idx.clone()
        poisoned[3] = bad
        assert bench.chosen_distance_error(z, c, poisoned) == math.inf
        report = bench.agreement_with_fp32(z, c, poisoned)
        assert (report.differ, report.wrong, report.outside) == (1, 1, 1)
        assert "1 outside [0, K)" in report.note()


def test_chosen_distance_error_accepts_a_tied_alternative():
    c = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [5.0, 5.0]])
    z = torch.zeros(1, 2)  # codes 0 and 1 are exactly tied
    assert bench.chosen_distance_error(z, c, torch.tensor([1])) == 0.0
    assert bench.chosen_distance_error(z, c, torch.tensor([2])) > 1.0


def test_tf32_recheck_shares_name_both_classes(kernel_device):
    z = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)).to(kernel_device)
    c = torch.randn(40, 16, generator=torch.Generator().manual_seed(1)).to(kernel_device)
    z[:8] = c[3]  # eight rows on an exact tie of two equal codes: decided between the two
    c[30] = c[3]
    c[31] = c[5]  # and one row on a tie of three equal codes: searched again
    c[32] = c[5]
    z[8] = c[5]
    note = bench.tf32_recheck_shares(z, c)
    match = re.fullmatch(r"tf32 re-check: ([0-9.]+) % of rows decided between two codes, "
                         r"([0-9.]+) % searched again \(tf32x3\)", note)
    assert match, note
    pair, again = float(match.group(1)), float(match.group(2))
    assert 12.5 <= pair <= 100 - again and again >= 100 / 64


def test_format_markdown_table():
    out = bench.format_markdown_table(["name", "ms"], [["a|b", "1.50"], ["c", "OOM"]])
    assert out == (
        "| name | ms |\n"
        "| --- | --- |\n"
        "| a\\|b | 1.50 |\n"
        "| c | OOM |\n"
    )
    numeric = bench.format_markdown_table(["x", "y"], [[1, "2.5x"], [3, ""]])
    assert numeric.splitlines()[1] == "| ---: | ---: |"
    with pytest.raises(ValueError):
        bench.format_markdown_table(["a", "b"], [["only one"]])


def test_format_ms():
    assert bench.format_ms(123.456) == "123"
    assert bench.format_ms(12.345) == "12.3"
    assert bench.format_ms(1.2345) == "1.23"
    assert bench.format_ms(0.012345) == "0.012"
    assert bench.format_ms(None) == "–"


def test_gpu_slug():
    assert bench.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert bench.gpu_slug("  ") == "unknown-device"


def test_write_csv_round_trip(tmp_path):
    env = {"gpu": "Test GPU", "driver": "555.1", "cuda": "12.4", "torch": "2.x", "triton": "3.x", "vqfast": "0.1"}
    records = [
        bench.Record("nearest", "K sweep", "vqfast", "bf16", 8, 16, 4, time_ms=1.5, tflops=2.0, gbps=3.0,
                     peak_mem_mb=4.0, check="pass", check_error=1e-7, runs=12, time_min_ms=1.25, time_max_ms=2.5),
        bench.Record("nearest", "K sweep", "article (broadcast)", "bf16", 8, 16, 4, status="OOM (est. 99.0 GB)"),
    ]
    path = tmp_path / "sub" / "results.csv"
    bench.write_csv(path, records, env)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0].keys()) == list(bench.CSV_FIELDS)
    assert rows[0]["provider"] == "vqfast" and rows[0]["N"] == "8" and float(rows[0]["time_ms"]) == 1.5
    # The timed runs behind the median, and their spread.
    assert (rows[0]["runs"], rows[0]["time_min_ms"], rows[0]["time_max_ms"]) == ("12", "1.25", "2.5")
    assert rows[0]["check"] == "pass" and float(rows[0]["check_error"]) == pytest.approx(1e-7)
    assert rows[1]["status"] == "OOM (est. 99.0 GB)" and rows[1]["time_ms"] == "" and rows[1]["runs"] == ""
    assert all(r["gpu"] == "Test GPU" and r["driver"] == "555.1" and r["triton"] == "3.x" for r in rows)
    assert bench.read_csv(path)[0] == records
    # A file from before these columns reads back without them.
    old_fields = [f for f in bench.CSV_FIELDS if f not in ("runs", "time_min_ms", "time_max_ms")]
    with open(tmp_path / "old.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    back, _ = bench.read_csv(tmp_path / "old.csv")
    assert back[0].time_ms == 1.5 and (back[0].runs, back[0].time_min_ms, back[0].time_max_ms) == (None, None, None)


def test_every_measured_row_records_its_timed_runs(tmp_path, one_thread):
    # (On the CPU one run each; on a GPU at least MIN_TIMED_RUNS.)
    records = bench.run_benchmarks(_tiny_plan(), ("headline", "gather", "usage"), tmp_path,
                                   device=torch.device("cpu"), log=lambda s: None, plots=False)
    timed = [r for r in records if r.ok]
    assert timed and all(r.runs == 1 and r.time_min_ms == r.time_max_ms == r.time_ms for r in timed)
    with open(tmp_path / "results.csv", newline="") as f:
        assert all(row["runs"] == "1" for row in csv.DictReader(f) if row["status"] == "ok")
    bare = [r for r in records if r.provider == "z@c.T (cuBLAS)" and r.ok]
    assert bare and all(r.gbps == pytest.approx(bench.gbps(bench.bare_product_bytes(r.n, r.k, r.d,
                                                                                   bench.element_size(r.precision)),
                                                           r.time_ms)) for r in bare)


def test_agreement_with_fp32_counts_rows_whose_code_is_farther(one_thread):
    gen = torch.Generator().manual_seed(0)
    z, c = torch.randn(300, 16, generator=gen), torch.randn(50, 16, generator=gen)
    exact = torch.cdist(z.double(), c.double()).argmin(1)
    same = bench.agreement_with_fp32(z, c, exact)
    assert (same.rows, same.differ, same.wrong) == (300, 0, 0) and "0 differ" in same.note()
    d = torch.cdist(z.double(), c.double()) ** 2
    second = d.topk(2, dim=1, largest=False).indices[:, 1]
    wrong = exact.clone()
    wrong[:7] = second[:7]
    # A tie: another copy of row 10's code, picked in its place, differs from fp32's pick but is not wrong.
    c_tie = torch.cat([c, c[exact[10:11]]])
    tied = exact.clone()
    tied[10] = 50
    report = bench.agreement_with_fp32(z, c, wrong)
    assert (report.differ, report.wrong) == (7, 7) and report.worst > bench.EXACT_CHECK_SLACK
    assert "7 differ, 7 farther" in report.note()
    near = bench.agreement_with_fp32(z, c_tie, tied)
    assert (near.differ, near.wrong, near.worst) == (1, 0, 0.0)


def test_wall_clock_timing_counts_the_host_time_of_back_to_back_calls(monkeypatch):
    meter = bench.Meter(torch.device("cpu"), rep_ms=50)
    monkeypatch.setattr(meter, "sync", lambda: None)  # as on a GPU that keeps up with the host
    # A clock that only the calls move (2 ms of host time each, 3 ms for one call of the third round):
    # what is measured is exact, whatever else the machine runs.
    now = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    calls = []

    def slow_host():
        calls.append(1)
        now[0] += 0.003 if len(calls) == 1 + 2 * 5 + 1 else 0.002

    timing = meter._wall_ms(slow_host)
    # 50 ms / 5 per round at 2 ms a call: 5 calls per round, after one call to size the rounds. The
    # third round took 11 ms for 5 calls; the median of the rounds is 2 ms.
    assert len(calls) == 1 + 5 * 5
    assert timing.median_ms == pytest.approx(2.0)
    assert timing.runs == 25 and timing.min_ms == pytest.approx(2.0) and timing.max_ms == pytest.approx(2.2)
    # A call longer than a fifth of the rep still makes rounds of 2 calls: 10 timed calls in all.
    calls.clear()
    meter.rep_ms = 1.0
    assert meter._wall_ms(slow_host).runs == 10 and len(calls) == 1 + 5 * 2


def test_headline_and_report_tables():
    recs = [
        bench.Record("headline", "headline", "vqfast", "bf16", 8192, 16384, 256, time_ms=2.0, tflops=34.4,
                     check="pass", check_error=1e-4),
        bench.Record("headline", "headline", bench.WALL_PROVIDER, "bf16", 8192, 16384, 256, time_ms=2.1),
        bench.Record("headline", "headline", bench.GRAPH_PROVIDER, "bf16", 8192, 16384, 256, time_ms=1.9),
        bench.Record("headline", "headline", "cdist+argmin", "bf16", 8192, 16384, 256, time_ms=10.0),
        bench.Record("headline", "headline", "matmul+argmin", "bf16", 8192, 16384, 256, status="OOM"),
        bench.Record("headline", "headline", "z@c.T (cuBLAS)", "bf16", 8192, 16384, 256, time_ms=4.0),
    ]
    table = bench.headline_table(recs)
    row = table.splitlines()[2]
    assert row.startswith("| 8,192 | 16,384 | 256 | bf16 | 2.00 | 2.10 | 1.90 | 10.0 | OOM | 4.00 | 5.00x | 0.50x | 34.4 "
                          "| pass")
    md = bench.render_markdown(recs, {"gpu": "Test GPU"})
    assert "## Headline" in md and "Test GPU" in md and table in md
    # Measured goal points first, the table still reads small to large, fp32 before tf32 before bf16.
    first = [bench.Record("headline", "headline", "vqfast", p, *shape, time_ms=1.0)
             for shape, p in (((65536, 65536, 256), "bf16"), ((1024, 4096, 128), "bf16"),
                              ((1024, 4096, 128), "tf32"), ((1024, 4096, 128), "fp32"))]
    keys = [line.split("|")[1:5] for line in bench.headline_table(first + recs).splitlines()[2:]]
    assert [[cell.strip() for cell in key] for key in keys] == [
        ["1,024", "4,096", "128", "fp32"], ["1,024", "4,096", "128", "tf32"], ["1,024", "4,096", "128", "bf16"],
        ["8,192", "16,384", "256", "bf16"], ["65,536", "65,536", "256", "bf16"]]


def test_budget_splits_time_and_rolls_over():
    now = [0.0]
    b = bench.Budget(100.0, ["a", "b"], clock=lambda: now[0])
    b.start_part("a")  # weights default to 0.1 each: half of the remaining 100 s
    assert b.deadline == pytest.approx(50.0)
    assert b.allow()
    now[0] = 10.0
    assert b.allow()
    now[0] = 60.0
    assert not b.allow()  # past the part's deadline
    b.start_part("b")  # all that is left goes to the last part
    assert b.deadline == pytest.approx(100.0)
    assert b.allow()  # the first point of a part always runs
    now[0] = 101.0
    b.start_part("c")
    assert not b.allow()  # nothing runs once the whole budget is spent
    assert b.remaining() == 0.0
    fresh = bench.Budget(100.0, ["a"], clock=lambda: now[0])
    now[0] += 30.0
    assert fresh.remaining() == pytest.approx(70.0)
    fresh.stop()  # (the hard time limit): no point may run after it, not even a part's first
    fresh.start_part("a")
    assert fresh.remaining() == 0.0 and not fresh.allow()


# ---- providers -------------------------------------------------------------------------------------


def test_search_forms_match_reference():
    z, c, target = _separated()
    expected = reference.nearest_code(z, c)[0]
    for fn in (bench.search_broadcast, bench.search_matmul, bench.search_cdist):
        assert torch.equal(fn(z, c), expected), fn.__name__
    prod = bench.bare_product(z, c)
    assert prod.shape == (z.shape[0], c.shape[0])
    torch.testing.assert_close(prod, (z[:, None, :] * c[None, :, :]).sum(-1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("search", ["broadcast", "matmul"])
def test_article_vq_matches_reference_quantize(search):
    g = torch.Generator().manual_seed(1)
    layer = bench.ArticleVQ(32, 8, beta=0.25, search=search)
    with torch.no_grad():
        layer.embeddings.weight.copy_(torch.randn(32, 8, generator=g))
    z = torch.randn(2, 8, 3, 3, generator=g, requires_grad=True)
    z_q, loss, idx = layer(z)
    (z_q.square().sum() + loss).backward()

    z_ref = z.detach().clone().requires_grad_()
    cb_ref = layer.embeddings.weight.detach().clone().requires_grad_()
    zq_ref, loss_ref, idx_ref = reference.quantize(z_ref.movedim(1, -1), cb_ref, beta=0.25)
    (zq_ref.square().sum() + loss_ref).backward()

    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(z_q, zq_ref.movedim(-1, 1))
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(z.grad, z_ref.grad)
    torch.testing.assert_close(layer.embeddings.weight.grad, cb_ref.grad)
    with pytest.raises(ValueError):
        bench.ArticleVQ(4, 2, search="cosine")


def test_build_vqvae_variants_run_a_step(one_thread):
    x = torch.rand(2, 3, 32, 32)
    for variant in ("vqfast", "article (fixed)", "no VQ"):
        model, origin = bench.build_vqvae(variant, 16, 8)
        recon, vq_loss, _ = model(x)
        assert recon.shape == x.shape, (variant, origin)
        (torch.nn.functional.mse_loss(recon, x) + vq_loss).backward()
        first = next(model.parameters())
        assert first.grad is not None and first.grad.abs().sum() > 0, (variant, origin)
    with pytest.raises(ValueError):
        bench.build_vqvae("bogus", 16, 8)


# ---- measuring -------------------------------------------------------------------------------------


def test_meter_statuses():
    meter = bench.Meter(torch.device("cpu"), cpu_memory_limit=1e9)
    calls = []

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")

    def fails():
        raise ValueError("boom\nsecond line")

    assert meter.measure(oom).status == "OOM"
    assert meter.measure(fails).status == "error: ValueError: boom"
    guarded = meter.measure(lambda: calls.append(1), est_bytes=5e9)
    assert guarded.status == "OOM (est. 5.0 GB)" and guarded.time_ms is None and calls == []
    ok = meter.measure(lambda: torch.ones(100).sum())
    assert ok.status == "ok" and ok.time_ms is not None and ok.time_ms >= 0


def test_meter_cuda_path_uses_do_bench_median_and_peak_memory(monkeypatch):
    # The CUDA calls are faked, so this runs anywhere; it checks how their results are combined.
    import triton.testing

    seen = {}

    def fake_do_bench(fn, warmup, rep, grad_to_none=None, return_mode="mean"):
        seen.update(warmup=warmup, rep=rep, return_mode=return_mode, grad_to_none=grad_to_none)
        fn()
        # As do_bench times a call of 1.25 ms: rep / 1.25 runs.
        return [1.0, 1.5] + [1.25] * (int(rep / 1.25) - 2)

    class Props:
        total_memory = 100 * 2**20

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Props())
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 10 * 2**20)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 42 * 2**20)
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None: None)
    meter = bench.Meter(torch.device("cuda", 0), warmup_ms=5, rep_ms=20)
    assert meter.memory_limit() == pytest.approx(0.8 * 100 * 2**20 - 10 * 2**20)
    t = torch.zeros(1, requires_grad=True)
    m = meter.measure(lambda: None, est_bytes=1e6, grad_to_none=[t])
    assert (m.status, m.time_ms, m.peak_mem_mb) == ("ok", 1.25, 32.0)
    assert (m.runs, m.time_min_ms, m.time_max_ms) == (16, 1.0, 1.5)
    # Every run comes back, so that their number and spread can be recorded; a fast call keeps the rep.
    assert seen == {"warmup": 5, "rep": 20, "return_mode": "all", "grad_to_none": [t]}
    assert meter.measure(lambda: None, est_bytes=80e6).status == "OOM (est. 0.1 GB)"

    def fake_do_bench_cudagraph(fn, rep, grad_to_none=None, return_mode="mean"):
        seen.update(graph_rep=rep, graph_return_mode=return_mode)
        fn()
        return [0.5] * 9 + [0.7]  # one per replay

    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", fake_do_bench_cudagraph)
    graphed = meter.measure(lambda: None, est_bytes=1e6, graph=True)
    # do_bench_cudagraph replays its graph ten times over ``rep``: a fifth keeps its cost near the others'.
    assert graphed.time_ms == 0.5 and seen["graph_rep"] == 4 and seen["graph_return_mode"] == "all"
    assert (graphed.runs, graphed.time_min_ms, graphed.time_max_ms) == (10, 0.5, 0.7)


class _FakeDoBench:
    """``triton.testing.do_bench`` timing a call of ``call_ms`` (plus ``flush_ms`` in its own estimate, as
    its L2 flush adds): max(1, rep / estimate) runs, as the real one."""

    def __init__(self, call_ms: float, flush_ms: float = 0.0, all_mode: bool = True):
        self.call_ms, self.flush_ms, self.all_mode = call_ms, flush_ms, all_mode
        self.reps: list[float] = []

    def __call__(self, fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
        assert return_mode in (("min", "max", "mean", "median", "all") if self.all_mode
                               else ("min", "max", "mean", "median"))
        self.reps.append(rep)
        runs = [self.call_ms * (1 + 0.01 * i) for i in range(max(1, int(rep / (self.call_ms + self.flush_ms))))]
        if quantiles is not None:
            return [torch.tensor(runs).quantile(q).item() for q in quantiles]
        return runs if return_mode == "all" else sorted(runs)[len(runs) // 2]


@pytest.mark.parametrize("call_ms", [0.01, 3.0, 30.0, 150.0, 1000.0])
def test_every_median_rests_on_at_least_ten_timed_runs(monkeypatch, call_ms):
    """do_bench times a call max(1, rep / time) times: at the default rep of 100 ms, once for a call of
    100 ms or more. The meter raises the rep to fit ten runs, and asks again if do_bench's own estimate
    (which counts its L2 flush) left fewer."""
    import triton.testing

    meter = bench.Meter(torch.device("cpu"), rep_ms=100)
    for flush_ms in (0.0, 0.5 * call_ms):
        fake = _FakeDoBench(call_ms, flush_ms)
        monkeypatch.setattr(triton.testing, "do_bench", fake)
        timing = meter._do_bench(lambda: None, None, estimate_ms=call_ms)
        assert timing.runs >= bench.MIN_TIMED_RUNS and len(timing.samples) == timing.runs, (call_ms, flush_ms)
        assert timing.min_ms == pytest.approx(call_ms) and timing.max_ms > timing.min_ms
        assert call_ms <= timing.median_ms <= timing.max_ms
        assert len(fake.reps) <= 3 and fake.reps[0] >= 100  # never below the plan's rep
        # Not many more runs than needed when the call is long: the rep stays about 12.5 calls.
        if call_ms >= 30:
            assert timing.runs <= 13
    # A Triton whose do_bench cannot return every run: its median, minimum and maximum, runs unknown.
    monkeypatch.setattr(triton.testing, "do_bench", _FakeDoBench(call_ms, all_mode=False))
    old = meter._do_bench(lambda: None, None, estimate_ms=call_ms)
    assert old.runs is None and old.min_ms <= old.median_ms <= old.max_ms


def test_timed_rep_and_timing_cost():
    assert bench.timed_rep_ms(100, None) == 100 and bench.timed_rep_ms(100, 0.0) == 100
    assert bench.timed_rep_ms(100, 1.0) == 100  # 100 runs of 1 ms fit in the rep
    assert bench.timed_rep_ms(100, 100.0) == pytest.approx(1250)  # ten runs and a quarter more
    assert bench.timed_rep_ms(0, 10.0, runs=3) == pytest.approx(37.5)
    # A 100 ms call: do_bench's 5 estimate calls, one warm-up call and 12.5 timed ones.
    assert bench.timing_cost_s(100, 25, 100) == pytest.approx((500 + 100 + 1250) / 1e3)
    # A fast call costs about warm-up + rep; the graph's 10 replays of rep / 5; 5 wall rounds of 2+ calls.
    assert bench.timing_cost_s(0.01, 25, 100) == pytest.approx(0.125, rel=0.01)
    assert bench.timing_cost_s(100, 25, 100, "graph") == pytest.approx((600 + 1000) / 1e3)
    assert bench.timing_cost_s(0.01, 25, 100, "graph") == pytest.approx(0.2, rel=0.01)
    assert bench.timing_cost_s(50, 25, 100, "wall") == pytest.approx((50 + 5 * 100) / 1e3)
    with pytest.raises(ValueError):
        bench.timing_cost_s(1, 1, 1, "bogus")
    timing = bench.Timing.of([3.0, 1.0, 2.0, 10.0])
    assert (timing.median_ms, timing.runs, timing.min_ms, timing.max_ms) == (2.5, 4, 1.0, 10.0)
    with pytest.raises(ValueError):
        bench.Timing.of([])


def test_bench_samples_falls_back_only_when_return_mode_is_refused():
    """An older do_bench refuses return_mode="all" (an assertion before any run): the quantiles then; an
    assertion raised by the timed function itself is an error, never a reason to time it again."""
    def old_bench(fn, return_mode="mean", quantiles=None, **kwargs):
        assert return_mode != "all"
        fn()
        return [1.0, 2.0, 3.0]

    def new_bench(fn, return_mode="mean", **kwargs):
        return [fn() or 2.0, 4.0]

    assert bench._bench_samples(old_bench, lambda: None) == bench.Timing(2.0, None, 1.0, 3.0)
    assert bench._bench_samples(new_bench, lambda: None).runs == 2

    calls = []

    def failing():  # (once: a second timing would pass and hide it)
        calls.append(1)
        if len(calls) == 1:
            raise AssertionError("wrong result")

    with pytest.raises(AssertionError, match="wrong result"):
        bench._bench_samples(new_bench, failing)


def test_a_point_whose_timing_would_not_fit_the_budget_is_skipped(monkeypatch):
    """Ten runs of a long call can take seconds: where they would not fit in what is left of the
    budget, the point is listed as skipped rather than the run running past its time."""
    left = [100.0]
    meter = _MemoryMeter(torch.device("cpu"), warmup_ms=25, rep_ms=100, time_left=lambda: left[0])
    calls = []
    ok = meter.measure(lambda: calls.append(1))
    assert ok.status == "ok" and ok.time_ms is not None
    assert ok.runs == 1 and len(calls) == 3  # untimed, memory (the estimate), timed
    left[0] = 0.05  # below the ~0.125 s that do_bench's warm-up and rep take even for a fast call
    calls.clear()
    skipped = meter.measure(lambda: calls.append(1))
    assert skipped.status == bench.SKIPPED and skipped.time_ms is None and len(calls) == 2
    # Without a budget to answer to (time_left None), nothing is skipped.
    assert _MemoryMeter(torch.device("cpu")).measure(lambda: None).status == "ok"


def test_kept_scratch_buffers_are_released_before_the_memory_run(monkeypatch):
    """vqfast's search plans keep scratch buffers between calls; left alive, they would count as memory
    allocated before the call, so the memory run would not see them."""
    from vqfast import kernels

    assert callable(kernels.release_scratch)
    order = []
    monkeypatch.setattr(kernels, "release_scratch", lambda: order.append("release"))

    class Meter(_MemoryMeter):
        def reset_peak(self):
            order.append("reset")
            return 0.0

    Meter(torch.device("cpu")).measure(lambda: order.append("call"))
    assert order == ["call", "release", "reset", "call", "call"]


def test_plans_cover_the_spec():
    plan = bench.default_plan()
    headline = {(p.n, p.k, p.d, p.precision) for p in plan.headline}
    assert {(n, k, d) for n, k, d, _ in headline} == {(1024, 4096, 128), (8192, 16384, 256), (65536, 65536, 256),
                                                     (1024, 262144, 64)}
    # Every point a speed goal is judged at: tf32 at the large shape, the small one in every dtype.
    assert {(65536, 65536, 256, p) for p in ("bf16", "fp32", "tf32")} <= headline
    assert {(1024, 4096, 128, p) for p in bench.PRECISIONS} <= headline
    assert (1024, 262144, 64, "bf16") in headline
    swept = [p for _, points in plan.sweeps for p in points]
    assert min(p.k for p in swept) == 1024 and max(p.k for p in swept) == 262144
    assert min(p.d for p in swept) == 8 and max(p.d for p in swept) == 1024
    assert {p.precision for p in swept} == set(bench.PRECISIONS)
    assert len({p.n for p in swept}) >= 3
    assert sorted(plan.layer) == [(32, 256, 16, 16, 16384), (64, 128, 4, 4, 4096), (128, 256, 16, 16, 65536)]
    # The points the goals are judged at come first in each list, so a budget cut cannot drop them.
    goal_points = {(65536, 65536, 256, "bf16"), (65536, 65536, 256, "tf32"), (1024, 262144, 64, "bf16"),
                   *((1024, 4096, 128, p) for p in bench.PRECISIONS)}
    first = [(p.n, p.k, p.d, p.precision) for p in plan.headline[:len(goal_points) + 1]]
    assert goal_points <= set(first) and first[0] == (65536, 65536, 256, "bf16")
    assert plan.gather[0][0] >= 10**6 and plan.usage[0][0] >= 10**6
    assert plan.layer[:2] == [(128, 256, 16, 16, 65536), (64, 128, 4, 4, 4096)]
    assert plan.train == [64, 256] and (plan.train_codes, plan.train_dim) == (4096, 128)
    assert plan.kmeans == [(131072, 65536, 256)]  # "K = 65,536 initialises in seconds"
    quick = bench.quick_plan()
    assert quick.budget_s < plan.budget_s and quick.mode == "quick"
    assert len(quick.headline) + sum(len(p) for _, p in quick.sweeps) <= 6


def _tiny_plan(**overrides) -> bench.Plan:
    kw = dict(
        headline=bench._points([(32, 64, 8)], ["fp32", "tf32", "bf16"]),
        sweeps=[("K sweep (N=32, D=8)", bench._points([(32, 16, 8), (32, 64, 8), (32, 256, 8)], ["fp32"]))],
        gather=[(64, 16, 8, "fp32")], usage=[(100, 10)], layer=[(2, 8, 2, 2, 16)], train=[2], kmeans=[(64, 16, 8)],
        rvq=[(2, 8, 6, 16, 3)],
        train_codes=16, train_dim=8, ceiling_size=64, copy_bytes=1 << 16,
        nearest_providers=tuple(p for p in bench.NEAREST_PROVIDERS if p != "torch.compile(matmul)"),
        budget_s=120, mode="test",
    )
    kw.update(overrides)
    return bench.Plan(**kw)


class _MemoryMeter(bench.Meter):
    """A CPU meter that reports a peak memory, as the CUDA one does, so that every record kind is
    checked for carrying it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tracks_memory = True

    def reset_peak(self) -> float:
        return 0.0

    def peak_mib(self, base: float) -> float:
        return 0.0


def test_run_benchmarks_end_to_end_on_cpu(tmp_path, one_thread, monkeypatch):
    monkeypatch.setattr(bench, "Meter", _MemoryMeter)
    # 2 * 32 * 256 * 8 * 4 bytes = 524 kB for the broadcast form at K=256: above the limit, so skipped.
    records = bench.run_benchmarks(_tiny_plan(), bench.PARTS, tmp_path, device=torch.device("cpu"),
                                   log=lambda s: None, cpu_memory_limit=3e5)
    # Every measured record has its peak memory where the meter gives one (on a GPU: always).
    assert all(r.peak_mem_mb is not None for r in records if r.ok and r.part != "ceiling")
    parts = {r.part for r in records}
    assert parts == {"ceiling", *bench.PARTS}
    fused = [r for r in records if r.provider in ("vqfast", bench.GRAPH_PROVIDER) and r.part in ("headline", "nearest")]
    assert fused and all(r.ok and r.check == "pass" for r in fused)
    assert any(r.provider == bench.GRAPH_PROVIDER for r in fused)
    # Small points are timed back to back too; the indices of fp32 data (tf32 or fp32 rows, both searched
    # with the tf32 pass) and of 16-bit data are compared with a plain fp32 search's on every row.
    assert {r.precision for r in records if r.provider == bench.WALL_PROVIDER and r.ok} == {"fp32", "tf32", "bf16"}
    checked = [r for r in fused if r.provider == "vqfast"]
    assert {r.precision for r in checked} == {"tf32", "fp32", "bf16"}
    assert all("indices on all 32 rows vs fp32 products: 0 differ" in r.note for r in checked), [r.note for r in checked]
    broadcast = {r.k: r.status for r in records if r.provider == "article (broadcast)"}
    assert broadcast[16] == "ok" and broadcast[256].startswith("OOM (est.")
    assert all(r.ok for r in records if r.part in ("gather", "usage", "train"))
    kmeans = [r for r in records if r.case.startswith("k-means init (64 rows")]
    assert len(kmeans) == 1 and kmeans[0].ok and (kmeans[0].k, kmeans[0].d) == (16, 8)
    residual = [r for r in records if r.case.startswith("residual VQ, 3 x 16 codes")]
    assert [(r.provider, r.ok, r.n, r.k, r.d) for r in residual] == [("vqfast", True, 12, 16, 8)]
    names = {p.name for p in tmp_path.iterdir()}
    assert {"results.csv", "results.md", "nearest_time_vs_k.png", "nearest_tflops_vs_k.png"} <= names
    with open(tmp_path / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(records)
    md = (tmp_path / "results.md").read_text()
    for title in ("## Ceilings", "## Headline", "### K sweep (N=32, D=8)", "## Gather", "## Code usage",
                  "## VectorQuantizer", "## VQ-VAE training step"):
        assert title in md


def test_a_plan_without_autotuning_runs_with_fixed_configurations(tmp_path, monkeypatch):
    """--quick runs the launchers' fixed configurations (VQFAST_AUTOTUNE=0: one compile per kernel variant
    on a cold cache), says so in its results, and leaves the environment as it was; a value the user
    set, or --autotune, wins."""
    seen = []
    monkeypatch.setitem(bench.PART_RUNNERS, "usage", lambda ctx: seen.append(os.environ.get("VQFAST_AUTOTUNE")))
    monkeypatch.delenv("VQFAST_AUTOTUNE", raising=False)
    run = dict(device=torch.device("cpu"), log=lambda s: None, plots=False)
    bench.run_benchmarks(_tiny_plan(autotune=False), ("usage",), tmp_path, **run)
    assert seen == ["0"] and "VQFAST_AUTOTUNE" not in os.environ
    assert "| autotune | 0 |" in (tmp_path / "results.md").read_text()
    bench.run_benchmarks(_tiny_plan(), ("usage",), tmp_path, **run)
    assert seen[-1] is None and "| autotune | 1 |" in (tmp_path / "results.md").read_text()
    monkeypatch.setenv("VQFAST_AUTOTUNE", "1")
    bench.run_benchmarks(_tiny_plan(autotune=False), ("usage",), tmp_path, **run)
    assert seen[-1] == "1"
    assert not bench.quick_plan().autotune and bench.default_plan().autotune
    plans = []
    monkeypatch.setattr(bench, "run_benchmarks", lambda plan, *a, **k: plans.append(plan) or [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    for argv in (["--quick"], ["--quick", "--autotune"]):
        parser = argparse.ArgumentParser()
        bench.configure_parser(parser)
        bench.main(parser.parse_args([*argv, "--out", str(tmp_path)]))
    assert [p.autotune for p in plans] == [False, True]


def test_a_failing_part_is_recorded_and_the_rest_still_runs(tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("bug in the gather part")

    def broken_headline(ctx):
        raise ValueError("bug in the headline part")

    monkeypatch.setitem(bench.PART_RUNNERS, "gather", broken)
    monkeypatch.setitem(bench.PART_RUNNERS, "headline", broken_headline)
    records = bench.run_benchmarks(_tiny_plan(), ("headline", "gather", "usage"), tmp_path,
                                   device=torch.device("cpu"), log=lambda s: None, plots=False)
    crashed = [r for r in records if r.case == bench.CRASHED]
    assert [(r.part, r.status) for r in crashed] == [("headline", "error: ValueError: bug in the headline part"),
                                                     ("gather", "error: RuntimeError: bug in the gather part")]
    assert any(r.part == "usage" and r.ok for r in records)
    # The report says so above its tables, and no table holds an empty point for it (N = K = D = 0).
    md = (tmp_path / "results.md").read_text()
    assert "**The gather part stopped on an error (error: RuntimeError: bug in the gather part)" in md
    assert "bug in the headline part" in md
    tma = bench.Record("headline", bench.CRASHED, bench.TMA_PROVIDER, "-", status="error: illegal access")
    assert bench.crash_sentence(tma).startswith("The opt-in VQFAST_TMA_SEARCH=1 step stopped on an error "
                                                "(error: illegal access)")
    assert "| 0 | 0 | 0 |" not in md and bench.CRASHED not in md and "## Headline" not in md
    assert "| 0 | 0 | 0 |" not in bench.headline_table(records)  # (the README's table, benchmarks/publish.py)


def test_time_budget_marks_points_skipped(tmp_path):
    records = bench.run_benchmarks(_tiny_plan(budget_s=0.0), ("nearest",), tmp_path, device=torch.device("cpu"),
                                   log=lambda s: None, plots=False)
    nearest = [r for r in records if r.part == "nearest"]
    assert nearest and all(r.status == "skipped (time budget)" for r in nearest)


def test_sigterm_writes_what_was_measured(tmp_path, monkeypatch):
    """A time limit's SIGTERM must not lose the parts already measured."""
    import signal

    def killed(ctx):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives long before this ends
        raise AssertionError("SIGTERM was not turned into a stop")

    monkeypatch.setitem(bench.PART_RUNNERS, "usage", killed)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        bench.run_benchmarks(_tiny_plan(), ("gather", "usage"), tmp_path, device=torch.device("cpu"),
                             log=lambda s: None, plots=False)
    assert signal.getsignal(signal.SIGTERM) == before
    rows, _ = bench.read_csv(tmp_path / "results.csv")
    assert any(r.part == "gather" and r.ok for r in rows)


def test_each_record_is_in_the_tables_before_the_next_point_starts(tmp_path, monkeypatch):
    """A point that hangs the GPU is killed with its process (no signal reaches Python then): what was
    measured before it must already be on disk."""
    seen = []

    def part(ctx):
        ctx.add(bench.Record("usage", "first", "vqfast", "int64", status="ok", time_ms=1.0))
        rows, _ = bench.read_csv(tmp_path / "results.csv")
        seen.append([(r.case, r.time_ms) for r in rows if r.part == "usage"])
        assert "first" in (tmp_path / "results.md").read_text()

    monkeypatch.setitem(bench.PART_RUNNERS, "usage", part)
    bench.run_benchmarks(_tiny_plan(), ("usage",), tmp_path, device=torch.device("cpu"), log=lambda s: None,
                         plots=False)
    assert seen == [[("first", 1.0)]]


def test_the_opt_in_tma_search_is_timed_after_every_other_part(tmp_path, monkeypatch):
    """The least proven kernel goes last, so a failure there (a hang ends the process) loses nothing
    else; its records still belong to the headline, and a skipped point says so there."""
    order = []

    def fake_measure(ctx, point, providers):
        order.append(("headline", point.precision, tuple(providers)))
        return [bench.Record("nearest", "", p, point.precision, point.n, point.k, point.d, 1.0, tflops=1.0)
                for p in providers]

    def part(name):
        return lambda ctx: order.append((name,))

    monkeypatch.setattr(bench, "measure_nearest", fake_measure)
    monkeypatch.setattr(bench, "TMA_POINTS", ((32, 64, 8),))
    for name in ("gather", "layer"):
        monkeypatch.setitem(bench.PART_RUNNERS, name, part(name))
    plan = _tiny_plan()
    records = bench.run_benchmarks(plan, ("headline", "gather", "layer"), tmp_path, device=torch.device("cpu"),
                                   log=lambda s: None, plots=False)
    others = tuple(p for p in bench.HEADLINE_PROVIDERS if p != bench.TMA_PROVIDER)
    assert order == [("headline", "fp32", others), ("headline", "tf32", others), ("headline", "bf16", others),
                     ("gather",), ("layer",),
                     ("headline", "tf32", (bench.TMA_PROVIDER,)), ("headline", "bf16", (bench.TMA_PROVIDER,))]
    tma = [r for r in records if r.provider == bench.TMA_PROVIDER]
    assert [(r.part, r.case, r.precision) for r in tma] == [("headline", "headline", "tf32"),
                                                           ("headline", "headline", "bf16")]
    # Without the headline, or with no TMA point in it, there is no TMA step.
    order.clear()
    bench.run_benchmarks(plan, ("gather",), tmp_path, device=torch.device("cpu"), log=lambda s: None, plots=False)
    assert order == [("gather",)]
    # Past the budget, its points are listed as skipped under the headline.
    records = bench.run_benchmarks(_tiny_plan(budget_s=0.0), ("headline",), tmp_path, device=torch.device("cpu"),
                                   log=lambda s: None, plots=False)
    skipped = [(r.precision, r.status) for r in records if r.provider == bench.TMA_PROVIDER]
    assert skipped == [("tf32", "skipped (time budget)"), ("bf16", "skipped (time budget)")]


def test_torch_compile_is_measured_in_the_first_sweep_only(tmp_path, monkeypatch):
    asked = []

    def fake_measure(ctx, point, providers):
        asked.append(tuple(providers))
        return []

    monkeypatch.setattr(bench, "measure_nearest", fake_measure)
    sweeps = [("first", bench._points([(32, 16, 8)], ["bf16"])), ("second", bench._points([(32, 16, 8)], ["fp32"]))]
    plan = _tiny_plan(sweeps=sweeps, nearest_providers=bench.NEAREST_PROVIDERS)
    bench.run_benchmarks(plan, ("nearest",), tmp_path, device=torch.device("cpu"), log=lambda s: None, plots=False)
    assert len(asked) == 2
    assert bench.COMPILE_PROVIDER in asked[0] and bench.COMPILE_PROVIDER not in asked[1]
    assert bench.COMPILE_PROVIDER not in bench.quick_plan().nearest_providers


def test_vector_quantize_pytorch_provider_runs(tmp_path, monkeypatch):
    """The optional provider's code paths, with a stand-in for the package (not installed here)."""

    class FakeCodebook(nn.Module):  # its codebook module: embed (num_codebooks, K, D)
        def __init__(self, dim, codebook_size):
            super().__init__()
            self.embed = nn.Parameter(torch.randn(1, codebook_size, dim))

    class FakeVectorQuantize(nn.Module):  # vector_quantize_pytorch.VectorQuantize's interface
        def __init__(self, dim, codebook_size, accept_image_fmap=False):
            super().__init__()
            self._codebook = FakeCodebook(dim, codebook_size)
            self.image = accept_image_fmap

        @property
        def codebook(self):
            return self._codebook.embed[0]

        def forward(self, x):
            if self.image:
                searched.append(self.codebook.detach().clone())
            rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) if self.image else x.reshape(-1, x.shape[-1])
            idx = torch.cdist(rows, self.codebook).argmin(1)
            q = self.codebook[idx]
            loss = ((q.detach() - rows) ** 2).mean()
            q = rows + (q - rows).detach()
            q = q.reshape(x.shape[0], x.shape[2], x.shape[3], -1).permute(0, 3, 1, 2) if self.image else q.reshape(x.shape)
            return q, idx.reshape(x.shape[:-1] if not self.image else (x.shape[0], *x.shape[2:])), loss

    class FakeResidualVQ(nn.Module):  # vector_quantize_pytorch.ResidualVQ's interface, on (B, T, C)
        def __init__(self, dim, num_quantizers, codebook_size):
            super().__init__()
            self.stages = nn.ModuleList(FakeVectorQuantize(dim, codebook_size) for _ in range(num_quantizers))

        def forward(self, x):
            residual, out, indices, losses = x, 0, [], []
            for stage in self.stages:
                q, idx, loss = stage(residual)
                residual, out = residual - q.detach(), out + q
                indices.append(idx)
                losses.append(loss)
            return out, torch.stack(indices, -1), torch.stack(losses)

    fakes = {"VectorQuantize": FakeVectorQuantize, "ResidualVQ": FakeResidualVQ}
    monkeypatch.setattr(bench, "_vq_pytorch_class", lambda name="VectorQuantize": fakes[name])
    searched: list[torch.Tensor] = []
    built: dict[str, nn.Module] = {}
    layer_module = bench._layer_module

    def keep(provider, k, c):
        built[provider] = layer_module(provider, k, c)
        return built[provider]

    monkeypatch.setattr(bench, "_layer_module", keep)
    records = bench.run_benchmarks(_tiny_plan(nearest_providers=("vqfast", "vector-quantize-pytorch")),
                                   ("nearest", "layer"), tmp_path, device=torch.device("cpu"), log=lambda s: None,
                                   plots=False)
    # Its layer searched the codebook the others did (the matmul form's layer keeps it: no optimizer step).
    assert searched and all(torch.equal(cb, built["matmul+argmin"].embeddings.weight) for cb in searched)
    note = next(r.note for r in records if r.part == "layer" and r.provider == "vector-quantize-pytorch"
                and not r.case.startswith("residual"))
    assert "copied into its _codebook.embed" in note and bench.THEIR_SEARCH_NOTE in note
    theirs = [r for r in records if r.provider == "vector-quantize-pytorch"]
    assert {r.part for r in theirs} == {"nearest", "layer"}
    assert any(r.case.startswith("residual VQ") for r in theirs)
    assert all(r.ok for r in theirs), [r.status for r in theirs]
    # vqfast's layer was checked before it was timed.
    ours = [r for r in records if r.part == "layer" and r.provider == "vqfast" and r.case.startswith("(")]
    assert ours and all(r.check == "pass" and "check: indices on all" in r.note for r in ours), ours
    # Its search runs on the benchmark's codebook: its chosen distances are checked like vqfast's.
    assert all(r.check == "pass" for r in theirs if r.part == "nearest"), [r.check for r in theirs]


def test_failed_vqfast_rows_are_reported():
    good = bench.Record("headline", "headline", "vqfast", "bf16", 8, 16, 4, time_ms=1.0, check="pass")
    others = [bench.Record("headline", "headline", "cdist+argmin", "bf16", 8, 16, 4, status="error: X"),
              bench.Record("headline", "headline", "vqfast", "fp32", 8, 16, 4, status="OOM")]
    assert bench.vqfast_failures([good, *others]) == []
    wrong = dataclasses.replace(good, check="fail")
    broken = bench.Record("nearest", "K", bench.GRAPH_PROVIDER, "bf16", 8, 16, 4, status="error: RuntimeError: x")
    assert bench.vqfast_failures([good, wrong, broken, *others]) == [wrong, broken]


# ---- on a GPU ---------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_small_suite_on_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    plan = _tiny_plan(
        headline=bench._points([(256, 1024, 64)], ["fp32", "bf16"]),
        sweeps=[("K sweep (N=256, D=64)", [bench.NearestPoint(256, 512, 64, "bf16"),
                                           bench.NearestPoint(256, 2048, 64, "tf32")])],
        gather=[(4096, 512, 64, "bf16")], usage=[(4096, 512)], layer=[(4, 64, 4, 4, 512)], train=[4],
        train_codes=256, train_dim=32, ceiling_size=1024, copy_bytes=1 << 24,
        # A generous budget: a cold machine compiles and autotunes every kernel here, and the test is
        # about completeness, not speed.
        nearest_providers=bench.NEAREST_PROVIDERS, warmup_ms=5, rep_ms=10, budget_s=300,
    )
    records = bench.run_benchmarks(plan, bench.PARTS, tmp_path, log=lambda s: None)
    bad = [r for r in records if not r.ok and r.provider != "vector-quantize-pytorch"]
    assert not bad, bad
    fused = [r for r in records if r.provider in ("vqfast", bench.GRAPH_PROVIDER) and r.part in ("headline", "nearest")]
    assert fused and all(r.check == "pass" for r in fused), fused
    assert all(r.peak_mem_mb is not None for r in records if r.part != "ceiling")
    assert (tmp_path / "results.md").read_text().count("|") > 50


def test_csv_reads_back_and_publishes_the_headline_into_a_readme(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    env = {"gpu": "Test GPU", "driver": "555.1", "cuda": "12.4", "torch": "2.x", "triton": "3.x", "vqfast": "0.1"}
    recs = [
        bench.Record("headline", "headline", "vqfast", "bf16", 8192, 16384, 256, time_ms=2.0, tflops=34.4,
                     check="pass", check_error=1e-4),
        bench.Record("headline", "headline", "cdist+argmin", "bf16", 8192, 16384, 256, time_ms=10.0),
        bench.Record("headline", "headline", "matmul+argmin", "bf16", 8192, 16384, 256, status="OOM"),
        bench.Record("headline", "headline", "z@c.T (cuBLAS)", "bf16", 8192, 16384, 256, time_ms=4.0),
    ]
    results = tmp_path / "benchmarks" / "results" / "test-gpu"
    bench.write_csv(results / "results.csv", recs, env)
    back, back_env = bench.read_csv(results / "results.csv")
    assert back == recs and back_env == env

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- headline-results:start -->\nold text\n<!-- headline-results:end -->\nafter\n")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "publish.py"
    proc = subprocess.run([sys.executable, str(script), str(results), "--readme", str(readme)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    text = readme.read_text()
    assert "old text" not in text and text.startswith("intro\n") and text.endswith("after\n")
    assert "Measured on Test GPU (driver 555.1" in text and "benchmarks/results/test-gpu/results.md" in text
    # A folder without the headline plot (a run from before it was drawn) gets it from results.csv.
    assert (results / bench.HEADLINE_PLOT).read_bytes().startswith(b"\x89PNG")
    assert f"benchmarks/results/test-gpu/{bench.HEADLINE_PLOT})" in text
    assert bench.headline_table(recs).splitlines()[2] in text
    # "back to back" is defined only where the table has that column.
    assert "back to back" not in text
    wall = bench.Record("headline", "headline", bench.WALL_PROVIDER, "bf16", 8192, 16384, 256, time_ms=2.5)
    bench.write_csv(results / "results.csv", recs + [wall], env)
    assert subprocess.run([sys.executable, str(script), str(results), "--readme", str(readme)],
                          capture_output=True, text=True, check=False).returncode == 0
    assert readme.read_text().count("back to back") == 2  # the definition and the column
    assert "commit" not in readme.read_text() and "cut short" not in readme.read_text()
    # The commit where the run records it; a run cut short by its time limit says so.
    stop = bench.Record(bench.RUN_PART, bench.CUT_SHORT, "-", "-", status="stopped at the hard time limit (550 s)")
    bench.write_csv(results / "results.csv", recs + [stop], {**env, "commit": "abc1234"})
    assert subprocess.run([sys.executable, str(script), str(results), "--readme", str(readme)],
                          capture_output=True, text=True, check=False).returncode == 0
    text = readme.read_text()
    assert "vqfast 0.1 (commit abc1234)" in text and "cut short by its hard time limit" in text
    bare = tmp_path / "NO_MARKERS.md"
    bare.write_text("nothing here\n")
    proc = subprocess.run([sys.executable, str(script), str(results), "--readme", str(bare)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and bare.read_text() == "nothing here\n"


def test_published_precision_note_says_how_the_runs_fp32_search_ran(tmp_path):
    """A results file from a version that searched fp32 inputs with fp32 products throughout must not be
    published under the note of the tf32 pass; this version's runs record which search they timed."""
    recs = [bench.Record("headline", "headline", "vqfast", "fp32", 64, 64, 8, time_ms=1.0, tflops=1.0, check="pass")]
    fresh = bench.collect_env(torch.device("cpu"), "quick")
    assert fresh["fp32_search"] == bench.FP32_SEARCH
    older = {k: v for k, v in fresh.items() if k != "fp32_search"}
    for env, expected, other in ((fresh, bench.PRECISION_NOTE, "does not record"),
                                 (older, "fp32 products for every code", "re-checks near ties with fp32")):
        bench.write_csv(tmp_path / "results.csv", recs, env)
        _, back_env = bench.read_csv(tmp_path / "results.csv")
        note = bench.precision_note(back_env)
        assert expected in note and other not in note
        assert note in bench.render_markdown(recs, back_env)


def test_gpu_run_script_parses_and_refuses_unknown_modes():
    """The one-shot GPU script is only ever run on a rented GPU: a syntax error there costs the run."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_run.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    proc = subprocess.run(["bash", str(script), "no-such-mode"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage:" in proc.stderr


def _fake_gpu_run(tmp_path: Path, name: str, mode: str = "all", data: bool = False,
                  extra_env: dict | None = None, returncode: int = 0) -> list[str]:
    """benchmarks/gpu_run.sh run from a copy in ``tmp_path/repo`` with stand-ins for python3, timeout and
    date (a clock that only the stand-ins move: pip 25 s, tests 165 s, the TMA search's tests 25 s, a bench
    its budget, a training run 60 s): the commands it ran, each with the time limit it got, as
    "LIMIT ARGS..." lines."""
    repo = tmp_path / "repo"
    if not repo.exists():
        (repo / "benchmarks").mkdir(parents=True)
        src = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_run.sh"
        (repo / "benchmarks" / "gpu_run.sh").write_text(src.read_text())
        (repo / "data").mkdir()
        for f in ("cifar10_train_10k.npz", "cifar10_test_1k.npz"):
            (repo / "data" / f).write_bytes(b"")
        stubs = tmp_path / "stubs"
        stubs.mkdir()
        clock = tmp_path / "clock"
        clock.write_text("1000")
        stand_ins = {
            "date": f"cat {clock}",
            "timeout": """args=("$@"); while [[ "${args[0]}" == -* ]]; do
  [[ "${args[0]}" == -k || "${args[0]}" == -s ]] && args=("${args[@]:2}") || args=("${args[@]:1}"); done
echo "${args[0]} ${args[*]:1}" >> "$FAKE_LOG"; exec "${args[@]:1}"
""",
            "python3": f"""adv() {{ echo $(( $(cat {clock}) + $1 )) > {clock}; }}
echo "autotuning=${{TRITON_CACHE_AUTOTUNING-unset}} cache=${{TRITON_CACHE_DIR-unset}} :: $*" >> "$FAKE_LOG.env"
case "$*" in
  *"-m pip install"*) adv 25 ;;
  *"-m pytest"*"-m tma"*) adv 25 ;;
  *"-m pytest"*) adv 165 ;;
  *"-m vqfast bench"*) b="${{*##*--budget }}"; adv "${{b%% *}}" ;;
  *"-m vqfast train"*) adv 60; mkdir -p "${{@: -1}}" ;;
  *"gpu_probe.py"*) adv 170 ;;
  *) adv 1 ;;
esac""",
        }
        for tool, body in stand_ins.items():
            (stubs / tool).write_text("#!/bin/bash\n" + body + "\n")
            (stubs / tool).chmod(0o755)
    log = tmp_path / f"{name}.log"
    env = {**os.environ, "PATH": f"{tmp_path / 'stubs'}:{os.environ['PATH']}", "FAKE_LOG": str(log),
           "OUT": str(tmp_path / f"out-{name}"), "GPU_DATA": str(repo / ("data" if data else "none"))}
    env.pop("GPU_WORK", None)
    env.update(extra_env or {})
    proc = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_run.sh"), mode], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == returncode, proc.stdout + proc.stderr
    return log.read_text().splitlines() if log.exists() else []


def _bench_call(lines: list[str]) -> tuple[int, int]:
    """(time limit, budget) of the one bench command among ``lines``."""
    (line,) = [ln for ln in lines if "-m vqfast bench" in ln]
    return int(line.split()[0]), int(line.split("--budget ")[1].split()[0])


def test_gpu_run_script_budgets_fit_the_bench_time_limit_and_the_training_reserve(tmp_path):
    total = 570
    for mode in ("all", "bench", "quick", "tma"):
        limit, budget = _bench_call(_fake_gpu_run(tmp_path, f"{mode}-nodata", mode))
        # The bench's own hard limit (budget + max(10 s, 10 %)) ends before the script's, with room for
        # start-up and the plots; and the bench's limit fits the run's time.
        assert limit >= budget + max(10, budget / 10) + 40, (mode, limit, budget)
        assert budget >= {"all": 250, "bench": 400, "quick": 85, "tma": 250}[mode], (mode, budget)
    lines = _fake_gpu_run(tmp_path, "all-data", "all", data=True)
    limit, budget = _bench_call(lines)
    start_of_bench = 1000 + 25 + 165 + 25 + 3  # pip, tests, the TMA tests and a few other commands at 1 s
    # The TMA search's tests run apart from the others, after them (a fault ends a process's CUDA context).
    tests = [ln for ln in lines if "-m pytest" in ln]
    assert len(tests) == 2 and '-m not tma' in tests[0] and "-m tma tests/test_nearest_tma.py" in tests[1]
    assert start_of_bench + limit <= 1000 + total - 115  # about two minutes kept for the first training run
    trains = [ln for ln in lines if "-m vqfast train" in ln]
    assert trains and int(trains[0].split()[0]) >= 60
    # Without the training data nothing is kept back for it.
    _, budget_without = _bench_call(_fake_gpu_run(tmp_path, "all-nodata-again", "all"))
    assert budget_without > budget + 80
    # Each command writes to a folder of its own (a machine keeps ignored folders between commands).
    runs = sorted(p.name for p in (tmp_path / "repo" / "gpu-out").iterdir())
    assert len(runs) == 6 and len(set(runs)) == 6


def test_gpu_run_script_keeps_the_training_reserve_with_the_probe_and_skips_tests_without_time(tmp_path):
    # GPU_PROBE=1 in the all mode: the probe runs only in time the bench left over, never in the
    # training's reserve (the first training run still gets its two minutes).
    lines = _fake_gpu_run(tmp_path, "all-probe", "all", data=True, extra_env={"GPU_PROBE": "1"})
    trains = [ln for ln in lines if "-m vqfast train" in ln]
    assert trains and int(trains[0].split()[0]) >= 60
    lines = _fake_gpu_run(tmp_path, "all-probe-short-bench", "all", data=True,
                          extra_env={"GPU_PROBE": "1", "BENCH_SECONDS": "60"})
    (probe,) = [ln for ln in lines if "gpu_probe.py" in ln]
    assert int(probe.split()[0]) >= 100
    trains = [ln for ln in lines if "-m vqfast train" in ln]
    assert trains and int(trains[0].split()[0]) >= 60
    # The GPU tests of the layer variants run in the all mode too.
    (tests,) = [ln for ln in lines if "-m pytest" in ln and "not tma" in ln]
    assert all(f"tests/{name}.py" in tests for name in ("test_product", "test_residual", "test_projected"))
    # Too little time left for the tests: skipped with a message, never a negative time limit.
    lines = _fake_gpu_run(tmp_path, "tests-short", "tests", extra_env={"GPU_RUN_SECONDS": "50"}, returncode=1)
    assert not [ln for ln in lines if "-m pytest" in ln]
    skipped = next((tmp_path / "repo" / "gpu-out").glob("run-*/pytest_gpu.log")).read_text()
    assert "tests for" in skipped and "skipped" in skipped


def test_gpu_run_script_trains_every_run_in_order_and_leaves_out_the_ones_asked(tmp_path):
    def runs(lines):
        return [ln.split("--out ")[1].split()[0].rsplit("/", 1)[1] for ln in lines if "-m vqfast train" in ln]

    every = ["vqvae-vqfast-b64", "vqvae-article-b64", "vqvae-vqfast-b256", "vqvae-article-b256", "ae-b64", "vae-b64",
             "vqvae-vqfast-article-settings-b64", "vqvae-vqfast-article-settings-b256", "ae-b256", "vae-b256"]
    extra = {"GPU_RUN_SECONDS": "3000"}
    assert runs(_fake_gpu_run(tmp_path, "train-all", "train", data=True, extra_env=extra)) == every
    extra["TRAIN_SKIP"] = "vqvae-vqfast-b64 ae-b64"
    left = runs(_fake_gpu_run(tmp_path, "train-skip", "train", data=True, extra_env=extra))
    assert left == [r for r in every if r not in ("vqvae-vqfast-b64", "ae-b64")]


def _goal_records(fast: bool) -> list[bench.Record]:
    """A run's records at the goal shapes; ``fast`` meets every goal, otherwise each misses."""
    R = bench.Record
    large, small, few = (65536, 65536, 256), (1024, 4096, 128), (1024, 262144, 64)
    f = 1.0 if fast else 2.0
    recs = [
        R("ceiling", "matmul 8192³", "torch", "bf16", 8192, 8192, 8192, 1.0, tflops=700.0),
        R("ceiling", "device copy 1024 MiB", "torch", "fp32", time_ms=1.0, gbps=3000.0),
        R("headline", "headline", "z@c.T (cuBLAS)", "bf16", *large, 4.4),
        R("headline", "headline", "cdist+argmin", "fp32", *large, 76.0),
        R("layer", "(128, 256, 16, 16)", "vector-quantize-pytorch", "fp32", 32768, 65536, 256, 125.0,
          peak_mem_mb=49000.0),
        R("layer", "(64, 128, 4, 4)", "vector-quantize-pytorch", "fp32", 1024, 4096, 128, 3.0, peak_mem_mb=300.0),
    ]
    for prec, ms in (("bf16", 3.5), ("tf32", 6.0)):
        recs.append(R("headline", "headline", "vqfast", prec, *large, ms * f,
                      tflops=bench.tflops(*large, ms * f), check="pass",
                      note=bench.Agreement(65536, 2, 0, 0.0).note() if prec == "tf32" else ""))
    for prec in bench.PRECISIONS:
        # do_bench's figure below the back-to-back one: the goal is judged on the latter.
        recs.append(R("headline", "headline", "vqfast", prec, *small, 0.015, check="pass"))
        recs.append(R("headline", "headline", bench.WALL_PROVIDER, prec, *small, 0.02 * f))
        recs.append(R("headline", "headline", bench.GRAPH_PROVIDER, prec, *small, 0.01))
    recs.append(R("headline", "headline", "vqfast", "bf16", *few, 0.08 * f, tflops=bench.tflops(*few, 0.08 * f),
                  check="pass"))
    recs.append(R("layer", "(128, 256, 16, 16)", "vqfast", "fp32", 32768, 65536, 256, 10.0 * f,
                  peak_mem_mb=500.0 * f * f, check="pass"))
    recs.append(R("layer", "(64, 128, 4, 4)", "vqfast", "fp32", 1024, 4096, 128, 0.9 * f, peak_mem_mb=10.0,
                  check="pass"))
    for case in ("fwd", "fwd+bwd"):
        recs.append(R("gather", case, "vqfast", "fp32", 1048576, 65536, 128, 1.0, gbps=2400.0 / f, check="pass"))
    recs.append(R("usage", "bincount+entropy", "vqfast", "int64", 1048576, 65536, 0, 1.0, gbps=2200.0 / f,
                  check="pass"))
    return recs


def test_goals_table_says_what_is_met_and_by_how_much_the_rest_misses():
    met = bench.goals_table(_goal_records(fast=True))
    rows = [line for line in met.splitlines() if line.startswith("| ") and "verdict" not in line
            and "---" not in line]
    assert len(rows) == 8 and all(row.rstrip().endswith("| met |") for row in rows), met
    missed = bench.goals_table(_goal_records(fast=False))
    rows = {line.split("|")[1].strip()[:3]: line for line in missed.splitlines()
            if line.startswith("| ") and "---" not in line}
    # bf16 at 7 ms: 314 TFLOP/s is 43 % short of 550, and slower than the 4.4 ms bare product.
    assert "missed by 43%" in rows["1. "] and "1.59x the bare product's time" in rows["1. "]
    assert "missed by 39%" in rows["2. "] and "6.3x, not 10x" in rows["2. "]
    assert "missed by 60%" in rows["3a."] and "graph 10" in rows["3a."] and "do_bench 15" in rows["3a."]
    assert "indices on all 65,536 rows vs fp32 products: 2 differ, 0 farther" in rows["2. "]
    assert "missed by" in rows["3b."]
    assert missed.count("missed") >= 8
    # Nothing measured: every goal says so instead of passing.
    empty = bench.goals_table([])
    assert "met |" not in empty.replace("not met |", "")
    assert "not measured in this run" in empty


def test_a_fast_wrong_answer_meets_no_goal():
    recs = _goal_records(fast=True)
    for r in recs:
        if r.provider == "vqfast" and r.part in ("headline", "gather", "usage") and (r.precision, r.n) != ("tf32", 65536):
            r.check = "fail" if r.part != "usage" else ""
    table = bench.goals_table(recs)
    rows = {line.split("|")[1].strip()[:3]: line for line in table.splitlines()
            if line.startswith("| ") and "---" not in line}
    assert rows["1. "].rstrip().endswith("| check fail |")
    assert all(f"{prec} check fail" in rows["3a."] for prec in bench.PRECISIONS)
    assert rows["3b."].rstrip().endswith("| check fail |")
    gather_row, usage_row = (line for line in table.splitlines() if line.startswith("| 5."))
    assert gather_row.rstrip().endswith("| fwd fp32 N=1,048,576 K=65,536 D=128 check fail; "
                                        "fwd+bwd fp32 N=1,048,576 K=65,536 D=128 check fail |")
    assert usage_row.rstrip().endswith("| bincount+entropy int64 N=1,048,576 K=65,536 check missing |")
    assert rows["2. "].rstrip().endswith("| met |")  # its own check passed
    # Nor is goal 4 met on speed alone where the memory it also sets was not measured.
    for r in recs:
        if r.part == "layer" and r.provider == "vqfast":
            r.peak_mem_mb = None
    layer_rows = [line for line in bench.goals_table(recs).splitlines() if line.startswith("| 4.")]
    assert layer_rows[0].rstrip().endswith("| memory not measured |") and layer_rows[1].rstrip().endswith("| met |")
    # The layer's output is checked too: a missing or failed check is no goal met.
    fast_layer, slow_layer = (r for r in recs if r.part == "layer" and r.provider == "vqfast")
    fast_layer.peak_mem_mb, fast_layer.check, slow_layer.check = 10.0, "", "fail"
    layer_rows = [line for line in bench.goals_table(recs).splitlines() if line.startswith("| 4.")]
    assert layer_rows[0].rstrip().endswith("| check missing (speed and memory met) |")
    assert layer_rows[1].rstrip().endswith("| check fail (speed met) |")
    slow_layer.time_ms = 2.0  # 1.5x their 3 ms, where the goal is 3x
    layer_rows = [line for line in bench.goals_table(recs).splitlines() if line.startswith("| 4.")]
    assert layer_rows[1].rstrip().endswith("| check fail; missed by 50% |")


def test_the_scatter_add_goal_needs_its_own_rows():
    # A gather part that stopped after the forward rows: the goal names the scatter-add too.
    recs = [r for r in _goal_records(fast=True) if not (r.part == "gather" and r.case == "fwd+bwd")]
    row = next(line for line in bench.goals_table(recs).splitlines() if line.startswith("| 5. gather"))
    assert row.rstrip().endswith("| fwd+bwd fp32 N=1,048,576: not measured |")


def test_near_misses_are_not_rounded_to_zero():
    assert bench._shortfall(549.9, 550) == "missed by < 0.1%"
    assert bench._shortfall(0.699, 0.7) == "missed by 0.1%"
    assert bench._shortfall(0.69, 0.7) == "missed by 1%"
    assert bench._shortfall(26.0, 25.0, higher_is_better=False) == "missed by 4%"
    assert bench._shortfall(math.nan, 0.7) == "missed (nan)"
    assert bench._shortfall(0.7, 0.7) == "met"


@pytest.mark.parametrize("sabotage", [None, "indices", "values"])
def test_the_layer_check_catches_wrong_codes_and_wrong_outputs(sabotage, monkeypatch):
    from vqfast import VectorQuantizer

    monkeypatch.setenv("VQFAST_BACKEND", "torch")
    torch.manual_seed(0)
    layer = VectorQuantizer(64, 8)
    z = torch.randn(4, 8, 3, 5)
    if sabotage is not None:
        forward = layer.forward

        def wrong(z, mask=None):
            z_q, loss, indices = forward(z, mask)
            if sabotage == "indices":  # another code, and z_q the value of that code
                indices = (indices + 1) % 64
                z_q = layer.embeddings.weight[indices].movedim(-1, 1)
            else:
                z_q = z_q + 1e-3
            return z_q, loss, indices

        layer.forward = wrong
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    check, note = bench.layer_check(layer, z)
    assert check == ("pass" if sabotage is None else "fail"), note
    assert layer.training and all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())
    if sabotage is None:
        assert "indices on all 60 rows vs fp32 products: 0 differ" in note


def test_results_without_back_to_back_timing_are_judged_on_do_bench_and_say_so():
    old = [r for r in _goal_records(fast=True) if r.provider != bench.WALL_PROVIDER]
    row = next(line for line in bench.goals_table(old).splitlines() if line.startswith("| 3a."))
    assert "judged on do_bench's time" in row and "| met |" not in row and "fp32 15 µs" in row
    assert "back to back" not in bench.headline_table(old)
    assert "back to back" in bench.headline_table(_goal_records(fast=True))


def test_the_opt_in_tma_search_is_a_column_and_a_note_beside_the_default_search():
    recs = _goal_records(fast=False)
    assert "VQFAST_TMA_SEARCH" not in bench.headline_table(recs) + bench.goals_table(recs)
    large, few = (65536, 65536, 256), (1024, 262144, 64)
    recs += [bench.Record("headline", "headline", bench.TMA_PROVIDER, "bf16", *large, 4.0,
                          tflops=bench.tflops(*large, 4.0), check="pass"),
             bench.Record("headline", "headline", bench.TMA_PROVIDER, "bf16", *few, status="OOM")]
    table = bench.headline_table(recs)
    assert "VQFAST_TMA_SEARCH=1 (ms, TFLOP/s, check)" in table.splitlines()[0]
    row = next(line for line in table.splitlines() if line.startswith("| 65,536 | 65,536 | 256 | bf16"))
    assert row.rstrip().endswith(f"| 4.00, {bench.tflops(*large, 4.0):.1f}, pass |")
    goals = {line[2:5]: line for line in bench.goals_table(recs).splitlines() if line.startswith("| ")}
    # The verdicts judge the default search (7 ms here); the opt-in one is quoted beside it.
    assert "VQFAST_TMA_SEARCH=1: 4.00 ms, 550 TFLOP/s, check pass" in goals["1. "]
    assert "missed by 43%" in goals["1. "]
    assert "VQFAST_TMA_SEARCH=1: OOM" in goals["3b."]
    assert "VQFAST_TMA_SEARCH" not in goals["2. "]
    recs.append(bench.Record("headline", "headline", bench.TMA_PROVIDER, "tf32", *large, 8.0,
                             tflops=bench.tflops(*large, 8.0), check="pass",
                             note=bench.Agreement(65536, 1, 0, 0.0).note() + "; search tile 128x32"))
    row = next(line for line in bench.goals_table(recs).splitlines() if line.startswith("| 2. "))
    assert ("VQFAST_TMA_SEARCH=1: 8.00 ms, 275 TFLOP/s, check pass (indices on all 65,536 rows vs fp32 products: "
            "1 differ, 0 farther by more than") in row and "search tile" not in row
    # Measured only at those points, in 16-bit, on a GPU: elsewhere the provider has nothing to run.
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    for point, device, runs in (((*large, "bf16"), gpu, True), ((*few, "fp16"), gpu, True),
                                ((*large, "tf32"), gpu, True), ((*large, "bf16"), cpu, False),
                                ((*large, "fp32"), gpu, False), ((1024, 4096, 128, "bf16"), gpu, False)):
        assert (bench._nearest_fn(bench.TMA_PROVIDER, bench.NearestPoint(*point), device) is not None) == runs, point


def test_the_tma_provider_fails_where_the_default_kernel_would_run_in_its_place(monkeypatch):
    # (Inputs the TMA kernel cannot read: fp32 rows go to the default search, which must not be timed
    # under the TMA search's name.)
    run = bench._nearest_fn(bench.TMA_PROVIDER, bench.NearestPoint(65536, 65536, 256, "bf16"), torch.device("cuda"))
    z, c = torch.randn(8, 16), torch.randn(5, 16)
    with pytest.raises(RuntimeError, match="does not run here"):
        run(z, c)


def test_results_markdown_has_the_goals_section():
    md = bench.render_markdown(_goal_records(fast=True), {"gpu": "test"})
    assert "## Speed goals" in md and "3b. bf16 search 1,024 x 262,144 x 64" in md


def test_goals_with_failed_or_missing_points_are_never_met():
    recs = [r for r in _goal_records(fast=True)
            if not (r.part == "headline" and r.provider == bench.WALL_PROVIDER and r.precision in ("fp16", "tf32")
                    and (r.n, r.k, r.d) == (1024, 4096, 128))]
    R = bench.Record
    recs += [R("headline", "headline", bench.WALL_PROVIDER, "fp16", 1024, 4096, 128, status="error: RuntimeError: boom"),
             R("headline", "headline", bench.WALL_PROVIDER, "tf32", 1024, 4096, 128, status="OOM"),
             R("gather", "fwd+bwd", "vqfast", "fp32", 1048576, 65536, 128, status="error: RuntimeError: bad"),
             R("usage", "bincount+entropy", "vqfast", "int64", 16777216, 262144, 0, status="skipped (time budget)")]
    table = bench.goals_table(recs)
    rows = {line.split("|")[1].strip()[:3]: line for line in table.splitlines()
            if line.startswith("| ") and "---" not in line}
    # The dtypes that were measured are fast enough, but the goal covers every dtype.
    assert "| met |" not in rows["3a."] and "fp16: not met (error: RuntimeError: boom)" in rows["3a."]
    assert "tf32: not met (OOM)" in rows["3a."]
    lines = table.splitlines()
    gather_row = next(line for line in lines if "gather / scatter-add" in line)
    assert "| met |" not in gather_row and "not met (error: RuntimeError: bad)" in gather_row
    usage_row = next(line for line in lines if "code usage" in line)
    assert "not measured (skipped (time budget))" in usage_row
    # A run of one part only: the other goals were not measured, which is not a miss.
    layer_only = bench.goals_table([r for r in _goal_records(fast=True) if r.part == "layer"])
    verdicts = [line.rsplit("|", 2)[1].strip() for line in layer_only.splitlines()
                if line.startswith("| ") and "---" not in line and "verdict" not in line]
    assert verdicts == ["not measured"] * 4 + ["met", "met"] + ["not measured"] * 2


def test_search_tile_note_names_the_autotuners_choice(monkeypatch):
    import triton

    from vqfast.kernels import _launch, nearest

    class Tuner:
        best_config = triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3)

    class WideTuner:
        best_config = triton.Config({"BLOCK_N": 64, "BLOCK_K": 32, "SINGLE_D": True, "BLOCK_D": 256},
                                    num_warps=4, num_stages=4)

    def search(tuner):
        direct_during_run.append(_launch._DIRECT)
        nearest._last_search_autotuner = tuner  # as a search pass records the autotuner it launched

    monkeypatch.setattr(nearest, "_last_search_autotuner", None)
    monkeypatch.delenv("VQFAST_AUTOTUNE", raising=False)
    direct_during_run = []
    note = bench.search_tile_note(lambda: search(Tuner()))
    assert note == "search tile 128x64, 8 warps, 3 stages"
    assert direct_during_run == [False]  # through the autotuner, which reports its choice
    # A run without an autotuned pass (no rows) has no tile to report, whatever ran before.
    assert bench.search_tile_note(lambda: search(None)) == ""
    # The search names the autotuner it launched through; those candidates say how D is covered.
    note = bench.search_tile_note(lambda: search(WideTuner()))
    assert note == "search tile 64x32, whole D, 4 warps, 4 stages"
    WideTuner.best_config = nearest._config(128, 64, 8, 3, slots=True, pipeline=True)
    note = bench.search_tile_note(lambda: search(WideTuner()))
    assert note == "search tile 128x64, 8 warps, 3 stages, next tile's product before the argmin"
    assert _launch._DIRECT is (_launch._native_specialize is not None)
    monkeypatch.setenv("VQFAST_AUTOTUNE", "0")
    assert bench.search_tile_note(lambda: None) == ""


def test_layer_goal_shows_the_graph_replay_beside_the_eager_step():
    records = _goal_records(fast=False)
    records.append(bench.Record("layer", "(64, 128, 4, 4)", bench.GRAPH_PROVIDER, "fp32", 1024, 4096, 128, 0.5))
    row = next(line for line in bench.goals_table(records).splitlines() if "(64, 128, 4, 4)" in line)
    # The verdict is the eager step's (1.8 ms against 3.0: missed); the graph replay is reported beside it.
    assert "1.80 ms vs 3.00 ms (1.7x); in a CUDA graph 0.50 ms (6.0x)" in row and "| met |" not in row
    assert bench.GRAPH_PROVIDER in bench.LAYER_PROVIDERS


def test_memory_tile_note_names_the_choices_made_during_a_measurement(monkeypatch):
    from vqfast.kernels import _common

    tuned = {("gather", 1024, 128): _common.LaunchConfig(32, 4)}
    monkeypatch.setattr(_common, "_TUNED", tuned)
    before = set(tuned)
    assert bench.tiles_tuned_since(before) == ""
    tuned[("scatter_add", 1024, 64, 128)] = _common.LaunchConfig(64, 8, True)
    tuned[("bincount", False, 1024, 64)] = _common.LaunchConfig(2048, 4)
    tuned[("soft_entropy_rows", 1024)] = (64, 64, 64, 4)  # the soft-entropy passes' tuples are left out
    assert bench.tiles_tuned_since(before) == ("scatter_add: 64 rows x 8 warps, streaming hints; "
                                               "bincount: 2048 indices x 4 warps")


def test_the_hard_time_limit_stops_a_point_that_runs_past_it():
    import signal
    import time

    plan = bench.quick_plan()
    assert plan.budget_s < bench.hard_time_limit_s(plan) <= plan.budget_s + 15  # "--quick" stays under 2 minutes
    start = time.monotonic()
    with pytest.raises(bench._TimeLimit):
        with bench._hard_time_limit(0.2):
            while time.monotonic() - start < 30:  # a point that would run far past it
                sum(range(1000))
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # disarmed afterwards
    with bench._hard_time_limit(None):  # no limit: nothing armed
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


# ---- inputs, codebooks, environment, statuses ------------------------------------------------------


def test_in_turn_cycles_through_its_items():
    take = bench.in_turn(["a", "b", "c", "d"])
    assert [take() for _ in range(9)] == ["a", "b", "c", "d", "a", "b", "c", "d", "a"]
    with pytest.raises(ValueError):
        bench.in_turn([])
    assert bench.INPUT_BATCHES >= 4


def test_the_training_step_feeds_several_image_batches_in_turn(tmp_path, monkeypatch, one_thread):
    """Repeating one batch lets dead-code restarts put codes on its very rows: the timed steps take
    INPUT_BATCHES different batches in turn, as the layer part's do."""
    fed: dict[str, list[int]] = {}

    class Recording(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, x):
            fed.setdefault(self.name, []).append(x.data_ptr())
            return x * self.w, self.w * 0, torch.zeros((), dtype=torch.int64)

    class EightCalls(bench.Meter):
        def measure(self, fn, est_bytes=0.0, grad_to_none=None, graph=False, wall=False):
            for _ in range(8):
                fn()
            return bench.Measurement(time_ms=1.0, runs=8, time_min_ms=1.0, time_max_ms=1.0)

    monkeypatch.setattr(bench, "build_vqvae", lambda variant, k, d: (Recording(variant), "stand-in"))
    monkeypatch.setattr(bench, "Meter", EightCalls)
    records = bench.run_benchmarks(_tiny_plan(), ("train",), tmp_path, device=torch.device("cpu"),
                                   log=lambda s: None, plots=False)
    assert {r.provider for r in records if r.part == "train" and r.ok} == set(bench.TRAIN_PROVIDERS)
    for name, pointers in fed.items():
        assert len(set(pointers)) == bench.INPUT_BATCHES, name
        assert pointers[:4] == pointers[4:], name  # each batch in turn, then again
    assert all(f"{bench.INPUT_BATCHES} image batches in turn" in r.note for r in records if r.part == "train")


def test_share_codebook_reaches_vector_quantize_pytorchs_codebook():
    from vqfast import VectorQuantizer

    class TheirCodebook(nn.Module):  # as vector-quantize-pytorch's EuclideanCodebook keeps its codes
        def __init__(self, k, d):
            super().__init__()
            self.register_buffer("embed", torch.randn(1, k, d))
            self.register_buffer("embed_avg", self.embed.clone())

    class TheirVQ(nn.Module):
        def __init__(self, k, d):
            super().__init__()
            self._codebook = TheirCodebook(k, d)

    ours = VectorQuantizer(16, 8)
    theirs = bench._TheirLayer(TheirVQ(16, 8))
    assert bench.codebook_tensor(ours) is ours.embeddings.weight
    assert bench.codebook_tensor(theirs).shape == (16, 8)
    assert bench.codebook_tensor(nn.Linear(2, 2)) is None
    shared, held = bench.share_codebook(ours, None)
    assert held and torch.equal(shared, ours.embeddings.weight)
    assert not torch.equal(theirs.inner._codebook.embed[0], shared)
    again, held = bench.share_codebook(theirs, shared)
    assert held and again is shared and torch.equal(theirs.inner._codebook.embed[0], shared)
    assert torch.equal(theirs.inner._codebook.embed_avg[0], shared)  # what its EMA update starts from
    # A codebook of another shape, or none to write, is left alone and said so.
    assert bench.share_codebook(bench._TheirLayer(TheirVQ(4, 8)), shared)[1] is False
    assert bench.share_codebook(nn.Linear(2, 2), shared) == (shared, False)


def test_environment_records_vector_quantize_pytorch_and_the_commit(tmp_path):
    env = bench.collect_env(torch.device("cpu"), "test")
    assert {"vector_quantize_pytorch", "commit"} <= set(env) <= set(bench.CSV_FIELDS)
    assert env["vector_quantize_pytorch"] == bench.distribution_version("vector-quantize-pytorch")
    assert bench.distribution_version("torch") == torch.__version__.split("+")[0] or \
        bench.distribution_version("torch") == torch.__version__
    assert bench.distribution_version("no-such-distribution-here") == "not installed"
    assert bench.git_commit(tmp_path) == ""  # not a checkout
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:
        assert env["commit"].split()[0] == head.stdout.strip()
    bench.write_csv(tmp_path / "results.csv", [bench.Record("usage", "x", "vqfast", "int64", time_ms=1.0)],
                    {**env, "vector_quantize_pytorch": "1.32.0", "commit": "abc1234"})
    _, back = bench.read_csv(tmp_path / "results.csv")
    assert (back["vector_quantize_pytorch"], back["commit"]) == ("1.32.0", "abc1234")


def test_the_tma_search_is_not_applicable_off_sm_90_and_that_is_no_failure():
    assert bench.tma_unavailable((9, 0)) is None
    for capability in ((8, 0), (10, 0), (12, 0), (7, 5)):
        assert bench.tma_unavailable(capability) == bench.TMA_NOT_HERE
    na = bench.Record("headline", "headline", bench.TMA_PROVIDER, "bf16", 65536, 65536, 256,
                      status=bench.TMA_NOT_HERE)
    assert bench.vqfast_failures([na]) == [] and bench.exit_status([na]) == 0
    assert "VQFAST_TMA_SEARCH=1: n/a (needs sm_90)" in bench.goals_table(_goal_records(fast=True) + [na])


def test_the_layer_goal_says_how_each_side_searches():
    row = next(line for line in bench.goals_table(_goal_records(fast=True)).splitlines() if "(64, 128, 4, 4)" in line)
    assert 'vector-quantize-pytorch searches with fp32 products (matmul precision "highest")' in row
    assert "tf32 products and an exact fp32 re-check" in row


def test_a_run_cut_short_by_its_hard_time_limit_lists_the_rest_and_says_so(tmp_path, monkeypatch):
    """The hard time limit stops the point being measured: the points of that part not yet measured and
    of every later part are listed as skipped, the results say the run was cut short, and so does the
    exit status."""
    def usage_then_limit(ctx):
        ctx.add(bench.Record("usage", "bincount+entropy", "vqfast", "int64", 100, 10, 0, time_ms=1.0))
        raise bench._TimeLimit("time limit")

    plan = _tiny_plan(usage=[(100, 10), (200, 20)])
    original_usage = bench.PART_RUNNERS["usage"]
    monkeypatch.setitem(bench.PART_RUNNERS, "usage", lambda ctx: (
        original_usage(ctx) if ctx.budget.remaining() == 0 else usage_then_limit(ctx)))
    records = bench.run_benchmarks(plan, ("gather", "usage", "train"), tmp_path, device=torch.device("cpu"),
                                   log=lambda s: None, plots=False)
    assert all(r.ok for r in records if r.part == "gather")
    usage = [(r.provider, r.n, r.status) for r in records if r.part == "usage"]
    # The row measured before the limit stays; every other planned row is there, once, as skipped.
    assert usage == [("vqfast", 100, "ok"), ("torch", 100, bench.SKIPPED), ("vqfast", 200, bench.SKIPPED),
                     ("torch", 200, bench.SKIPPED)]
    train = [(r.provider, r.status) for r in records if r.part == "train"]
    assert train == [(p, bench.SKIPPED) for p in bench.TRAIN_PROVIDERS]
    assert bench.cut_short(records) and bench.exit_status(records) == bench.EXIT_CUT_SHORT != 0
    assert "This run was cut short" in (tmp_path / "results.md").read_text()
    back, _ = bench.read_csv(tmp_path / "results.csv")
    assert bench.cut_short(back) and len(back) == len(records)
    # A failure outranks it; a complete run is 0.
    failed = records + [bench.Record("headline", "headline", "vqfast", "bf16", 8, 16, 4, time_ms=1.0, check="fail")]
    assert bench.exit_status(failed) == 1
    assert bench.exit_status([r for r in records if r.part != bench.RUN_PART and r.status == "ok"]) == 0


def test_a_cut_short_run_exits_with_its_own_status(tmp_path, monkeypatch):
    stopped = [bench.Record(bench.RUN_PART, bench.CUT_SHORT, "-", "-", status="stopped at the hard time limit")]
    monkeypatch.setattr(bench, "run_benchmarks", lambda *a, **k: stopped)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    parser = argparse.ArgumentParser()
    bench.configure_parser(parser)
    assert bench.main(parser.parse_args(["--quick", "--out", str(tmp_path)])) == bench.EXIT_CUT_SHORT


def test_gpu_run_script_tunes_the_benchmark_alone(tmp_path):
    """Tiles tuned while the tests' workers share the GPU must not reach the benchmark: the tests and the
    bench run with TRITON_CACHE_AUTOTUNING=0 (the bench tunes afresh, compiled kernels still cached), the
    training runs keep their tuning on disk."""
    _fake_gpu_run(tmp_path, "env", "all", data=True)
    seen = (tmp_path / "env.log.env").read_text().splitlines()

    def settings(marker):
        return {line.split(" :: ")[0] for line in seen if marker in line}

    cache = str(tmp_path / "repo" / ".triton-cache")
    assert settings("-m pytest") == {f"autotuning=0 cache={cache}"}
    assert settings("-m vqfast bench") == {f"autotuning=0 cache={cache}"}
    assert settings("-m vqfast train") == {f"autotuning=1 cache={cache}"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gather_and_usage_checks_pass_right_answers_and_fail_wrong_ones(dtype, monkeypatch):
    import vqfast

    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(37, 5, generator=g).to(dtype).requires_grad_()
    indices = torch.randint(0, 37, (300,), generator=g)
    grad = torch.randn(300, 5, generator=g).to(dtype)
    for case in ("fwd", "fwd+bwd"):
        check, err, problem = bench.gather_check(case, codebook, indices, grad)
        assert (check, problem) == ("pass", "") and (err is None) is (case == "fwd")
    assert codebook.grad is None
    assert bench.usage_check(indices, 37)[0] == "pass"
    real_gather, real_usage = vqfast.gather, vqfast.code_usage
    # A gather that reads the next row; one whose backward adds into the wrong rows; counts one short.
    monkeypatch.setattr(vqfast, "gather", lambda c, i, check_indices=True: real_gather(c, (i + 1) % 37))
    assert bench.gather_check("fwd", codebook, indices, grad)[::2] == ("fail", "gathered rows differ from torch's")

    class _WrongRows(torch.autograd.Function):
        @staticmethod
        def forward(ctx, c, i):
            ctx.save_for_backward(i)
            return c.detach()[i]

        @staticmethod
        def backward(ctx, grad_out):
            (i,) = ctx.saved_tensors
            return torch.zeros(37, 5, dtype=grad_out.dtype).index_add_(0, (i + 1) % 37, grad_out), None

    monkeypatch.setattr(vqfast, "gather", lambda c, i, check_indices=True: _WrongRows.apply(c, i))
    check, err, problem = bench.gather_check("fwd+bwd", codebook, indices, grad)
    assert check == "fail" and err > 0.1 and "gradient" in problem
    monkeypatch.setattr(vqfast, "code_usage", lambda i, k, check_indices=True: (
        lambda counts, e, p: (counts - (torch.arange(k) == 3).long(), e, p))(*real_usage(i, k)))
    assert bench.usage_check(indices, 37)[::2] == ("fail", "counts differ from torch.bincount's")
    monkeypatch.setattr(vqfast, "code_usage", lambda i, k, check_indices=True: 1 / 0)
    assert bench.usage_check(indices, 37)[0] == "error"


def test_published_runs_say_their_mode_and_competitor_and_plots_stay_with_their_run(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "publish.py"
    spec = importlib.util.spec_from_file_location("publish_under_test", script)
    publish = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(publish)
    env = {"gpu": "Test GPU", "driver": "555.1", "cuda": "12.4", "torch": "2.x", "triton": "3.x", "vqfast": "0.1",
           "mode": "default", "autotune": "1", "vector_quantize_pytorch": "1.22.0"}
    headline = [bench.Record("headline", "headline", "vqfast", "bf16", 64, 64, 8, time_ms=1.0, tflops=1.0,
                             check="pass"),
                bench.Record("headline", "headline", bench.GRAPH_PROVIDER, "bf16", 64, 64, 8, time_ms=0.5)]
    sweep = [bench.Record("nearest", "K sweep (N=64, D=8)", "vqfast", "bf16", 64, k, 8, time_ms=0.1 * k,
                          tflops=1.0) for k in (64, 128)]
    results, readme = tmp_path / "results", tmp_path / "README.md"
    written = bench.write_outputs(results, headline + sweep, env)
    assert {p.name for p in written} >= {*bench.PLOT_NAMES, bench.HEADLINE_PLOT}
    text = publish.headline_section(results, readme)
    assert "vector-quantize-pytorch 1.22.0." in text and "`triton.testing.do_bench_cudagraph`" in text
    assert "run:" not in text and "nearest_tflops_vs_k.png" in text
    assert "Test GPU, driver 555.1, torch 2.x, Triton 3.x, vqfast 0.1; default run" == bench.run_label(env)
    # A later run of the headline only, in quick mode with fixed tiles, into the same folder: the earlier
    # run's plots go, and the README says what kind of run it publishes.
    quick = {**env, "mode": "quick", "autotune": "0", "vector_quantize_pytorch": "not installed"}
    bench.write_outputs(results, headline, quick)
    assert not any((results / name).exists() for name in bench.PLOT_NAMES)
    text = publish.headline_section(results, readme)
    assert "A `quick` run with fixed tiles (`VQFAST_AUTOTUNE=0`): fewer points or untuned kernels" in text
    assert "vector-quantize-pytorch was not installed for this run." in text and "nearest_tflops_vs_k.png" not in text
    assert bench.HEADLINE_PLOT in text and (results / bench.HEADLINE_PLOT).is_file()
    # A run without a headline (the gather part alone) leaves no earlier run's headline plot beside it.
    gather = [bench.Record("gather", "fwd", "vqfast", "fp32", 4096, 512, 64, time_ms=0.01, gbps=100.0)]
    written = bench.write_outputs(results, gather, quick)
    assert not (results / bench.HEADLINE_PLOT).exists() and all(p.suffix != ".png" for p in written)
    assert bench.run_label(quick).endswith("; quick run, fixed tiles (VQFAST_AUTOTUNE=0)")
    # Results from before the version was recorded say so, rather than "not installed".
    bench.write_outputs(results, headline, {k: v for k, v in env.items() if k != "vector_quantize_pytorch"})
    assert "does not record the vector-quantize-pytorch version" in publish.headline_section(results, readme)


def test_headline_plot_draws_every_provider_and_ceiling_it_has(tmp_path, monkeypatch):
    """One panel per (N, K, D), a bar per measured provider and precision, a ceiling line per precision that
    the run measured; points that failed (OOM) and the back-to-back time are no bars."""
    import matplotlib.axes

    bars, lines = [], []
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", lambda self, x, h, *a, **k: bars.append(h))
    real_hlines = matplotlib.axes.Axes.hlines
    monkeypatch.setattr(matplotlib.axes.Axes, "hlines",
                        lambda self, y, *a, **k: (lines.append(y), real_hlines(self, y, *a, **k))[1])

    def rec(provider, prec, shape, tflops, **kw):
        return bench.Record("headline", "headline", provider, prec, *shape, time_ms=1.0, tflops=tflops, **kw)

    recs = [rec("vqfast", "bf16", (64, 128, 8), 3.0), rec("z@c.T (cuBLAS)", "bf16", (64, 128, 8), 4.0),
            rec("cdist+argmin", "bf16", (64, 128, 8), None, status="OOM"),
            rec(bench.WALL_PROVIDER, "bf16", (64, 128, 8), 2.0),
            rec("vqfast", "fp32", (64, 128, 8), 1.5), rec("vqfast", "bf16", (8, 16, 4), 0.5),
            bench.Record("ceiling", "matmul 8192³", "torch", "bf16", 8192, 8192, 8192, time_ms=1.0, tflops=700.0),
            bench.Record("ceiling", "device copy", "torch", "fp32", time_ms=1.0, gbps=3000.0)]
    assert bench.plot_headline(recs[6:], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    assert bench.plot_headline(recs, tmp_path / "h.png", {"gpu": "Test GPU"}) == tmp_path / "h.png"
    assert (tmp_path / "h.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(bars) == [0.5, 1.5, 3.0, 4.0]
    assert lines == [700.0, 700.0]  # bf16 in both panels; no fp32 ceiling was measured
