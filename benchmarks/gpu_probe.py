"""Where the time goes on a GPU: each 16-bit search candidate on its own at goals 1 and 3b's shapes,
the stages of the tf32 search, the search's modes at a small and a middle shape (kernel by kernel at
the small one), the layer's training step, the eager host cost of a small search.

    OUT=<folder> python benchmarks/gpu_probe.py

Writes ``probe.json`` (figures as they come), ``layer_profile_<K>.txt`` (torch.profiler, by CUDA
time) and ``small_profile.txt`` (cProfile of 300 small bf16 searches) to $OUT (default /tmp). About a
minute on an H200 with a cold Triton cache. Uses the search's internals (``vqfast.kernels.nearest``)
to time its stages apart; results from one run are in benchmarks/results/nvidia-h200/d94869b/probe/.
"""

from __future__ import annotations

import cProfile
import functools
import io
import itertools
import json
import os
import pstats
import time
from typing import Any

import torch
from triton.testing import do_bench as _do_bench, do_bench_cudagraph

# Medians, as the benchmark's (do_bench's default is the mean).
do_bench = functools.partial(_do_bench, return_mode="median")

OUT = os.environ.get("OUT", "/tmp")
RESULTS: dict[str, Any] = {}


def log(key: str, value: Any) -> None:
    RESULTS[key] = value
    print(key, value, flush=True)
    with open(os.path.join(OUT, "probe.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


def tf32_stages(n: int = 65536, k: int = 65536, d: int = 256) -> None:
    """The tf32 pass (norms, search, settling, list) apart from the re-search of the listed rows, and
    the re-search with fp32 and tf32x3 products and 16 or 64 codebook splits."""
    from vqfast.kernels import nearest

    torch.manual_seed(0)
    z = torch.randn(n, d, device="cuda")
    c = torch.randn(k, d, device="cuda")
    nearest.nearest_code(z, c, precision="high")
    torch.cuda.synchronize()
    log("tf32 full ms", do_bench(lambda: nearest.nearest_code(z, c, precision="high")))

    def first_pass():
        recheck = nearest._Recheck(z, c, 1.0)
        return nearest._search(z, c, recheck.c_sqnorm, "tf32", None, recheck)

    log("tf32 pass1 (norms + search + settle) ms", do_bench(first_pass))
    recheck = nearest._Recheck(z, c, 1.0)
    idx, dist = nearest._search(z, c, recheck.c_sqnorm, "tf32", None, recheck)
    listed_count = int(recheck.count.item())
    log("listed rows", listed_count)
    exact = nearest.nearest_code(z, c, precision="ieee")[0]
    listed = recheck.rows[:listed_count].long()
    saved = nearest._MAX_RESEARCH_SPLITS
    try:
        for products, splits in (("ieee", 16), ("ieee", 64), ("tf32x3", 16), ("tf32x3", 64)):
            nearest._MAX_RESEARCH_SPLITS = splits
            try:
                plan = nearest._ResearchPlan(z, c, products)
                recheck.packed.fill_(torch.iinfo(torch.int64).max)
                idx2, dist2 = idx.clone(), dist.clone()
                nearest._research_listed_rows(z, c, recheck, idx2, dist2, plan=plan)
                wrong = int((idx2[listed] != exact[listed]).sum())
                ms = do_bench(lambda: nearest._research_listed_rows(z, c, recheck, idx2, dist2, plan=plan))
                log(f"research {products} splits {splits}", {"ms": ms, "listed rows differing from ieee": wrong})
            except Exception as exc:  # noqa: BLE001 - report and go on with the next variant
                log(f"research {products} splits {splits}", repr(exc)[:400])
    finally:
        nearest._MAX_RESEARCH_SPLITS = saved
    zb, cb = z.bfloat16(), c.bfloat16()
    log("bf16 search ms", do_bench(lambda: nearest.nearest_code(zb, cb)))


def search_candidates(shapes: tuple[tuple[int, int, int], ...] = ((65536, 65536, 256), (1024, 262144, 64))) -> None:
    """Each autotuning candidate of the 16-bit search timed on its own (do_bench, median) at goals 1 and
    3b's shapes: what the pipelined candidate (PIPELINE, tuning note 29) does against the plain ones,
    whichever the autotuner keeps. Candidates that do not fit the GPU's shared memory are left out, as
    the autotuner leaves them out."""
    from vqfast.kernels import _launch, nearest

    tuner = nearest._nearest_code_autotuned
    saved = tuner.configs
    # (Opt-in candidates: the first, autotuned search of each shape times them too.)
    previous = os.environ.get("VQFAST_PIPELINED_SEARCH")
    os.environ["VQFAST_PIPELINED_SEARCH"] = "1"
    try:
        for n, k, d in shapes:
            torch.manual_seed(0)
            z = torch.randn(n, d, device="cuda").bfloat16()
            c = torch.randn(k, d, device="cuda").bfloat16()
            expected = nearest.nearest_code(z, c)[0]
            limit = nearest._shared_memory_for_tiles(False)
            for cfg in nearest._select_configs(saved, "tf32", max(16, d), True, 2, limit, True):
                kw = cfg.kwargs
                label = (f"candidate {n}x{k}x{d} {kw['BLOCK_N']}x{kw['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages}"
                         f"{' slots' if kw['SLOTS'] else ''}{' PIPELINE' if kw['PIPELINE'] else ''}")
                try:
                    tuner.configs = [cfg]
                    tuner.cache.clear()

                    def call():
                        return nearest.nearest_code(z, c)

                    with _launch.launch_path(direct=False):
                        same = bool(torch.equal(call()[0], expected))
                        ms = do_bench(call)
                    log(label, {"ms": round(ms, 4), "TFLOP/s": round(2 * n * k * d / ms / 1e9, 1),
                                "same indices": same})
                except Exception as exc:  # noqa: BLE001 - report and go on with the next candidate
                    log(label, repr(exc)[:400])
    finally:
        if previous is None:
            os.environ.pop("VQFAST_PIPELINED_SEARCH", None)
        else:
            os.environ["VQFAST_PIPELINED_SEARCH"] = previous
        tuner.configs = saved
        tuner.cache.clear()


def search_modes() -> None:
    """The search's modes side by side at a small and a middle shape: fp32 products ("ieee"), the
    tf32 pass with its re-check and an fp32 ("highest") or tf32x3 ("high") re-search, bf16;
    CUDA-graph and eager time, the rows the tf32 pass lists, and at the small shape each kernel's CUDA
    time (torch.profiler)."""
    from vqfast.kernels import nearest

    for n, k, d in ((1024, 4096, 128), (8192, 16384, 256)):
        torch.manual_seed(0)
        z = torch.randn(n, d, device="cuda")
        c = torch.randn(k, d, device="cuda")
        try:
            recheck = nearest._Recheck(z, c, 1.0)
            nearest._search(z, c, recheck.c_sqnorm, "tf32", None, recheck)
            log(f"modes {n}x{k}x{d} listed rows", int(recheck.count.item()))
        except Exception as exc:  # noqa: BLE001 - report and go on with the modes
            log(f"modes {n}x{k}x{d} listed rows", repr(exc)[:400])
        for label, zz, cc, precision in (("fp32 ieee", z, c, "ieee"), ("fp32 highest", z, c, "highest"),
                                         ("fp32 high", z, c, "high"),
                                         ("bf16", z.bfloat16(), c.bfloat16(), "highest")):
            def call(zz=zz, cc=cc, precision=precision):
                return nearest.nearest_code(zz, cc, precision=precision)

            try:
                call()
                torch.cuda.synchronize()
                # Replayed from a CUDA graph (no host cost), as the benchmark's graph column is timed.
                graph_ms = do_bench_cudagraph(call, return_mode="median")
                result = {"graph us": round(1000 * graph_ms, 1), "eager us": round(1000 * do_bench(call), 1)}
                if n == 1024:
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                        for _ in range(10):
                            call()
                        torch.cuda.synchronize()
                    result["kernels us per call"] = {
                        e.key[:40]: round(e.device_time_total / 10, 1) for e in prof.key_averages()
                        if e.device_time_total > 0}
                log(f"modes {n}x{k}x{d} {label}", result)
            except Exception as exc:  # noqa: BLE001 - report and go on with the next mode
                log(f"modes {n}x{k}x{d} {label}", repr(exc)[:400])


def layer_steps() -> None:
    """The benchmark's layer step (forward and backward of the default VectorQuantizer), timed and
    profiled."""
    from vqfast import VectorQuantizer

    for b, ch, h, w, k in ((128, 256, 16, 16, 65536), (64, 128, 4, 4, 4096)):
        torch.manual_seed(0)
        # Four batches in turn, as the benchmark's layer part feeds them.
        xs = [torch.randn(b, ch, h, w, device="cuda", requires_grad=True) for _ in range(4)]
        grad = torch.randn(b, ch, h, w, device="cuda")
        one = torch.ones((), device="cuda")
        layer = VectorQuantizer(k, ch).cuda()
        steps = itertools.count()

        def step(layer=layer, xs=xs, grad=grad, one=one, steps=steps):
            z_q, loss, _ = layer(xs[next(steps) % len(xs)])
            torch.autograd.backward([z_q, loss], [grad, one])

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        log(f"layer {b}x{ch}x{h}x{w} K={k} ms", do_bench(step, grad_to_none=[*xs, *layer.parameters()]))
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        with open(os.path.join(OUT, f"layer_profile_{k}.txt"), "w") as f:
            f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


def small_searches() -> None:
    """Host time per eager call of a small search, with vqfast's direct launches and with Triton's
    launch path (kernels/_launch.py), and where it goes (cProfile, bf16)."""
    import vqfast
    from vqfast.kernels import _launch

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        z = torch.randn(1024, 128, device="cuda").to(dtype)
        c = torch.randn(4096, 128, device="cuda").to(dtype)
        for mode in ("direct", "triton"):
            with _launch.launch_path(direct=mode == "direct"):
                for _ in range(20):
                    vqfast.nearest_code(z, c)
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(300):
                    vqfast.nearest_code(z, c)
                host = (time.perf_counter() - start) / 300 * 1e6
                torch.cuda.synchronize()
                total = (time.perf_counter() - start) / 300 * 1e6
            log(f"small {dtype} eager us per call, {mode} launches (host, with drain)",
                [round(host, 1), round(total, 1)])
        if dtype == torch.bfloat16:
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(300):
                vqfast.nearest_code(z, c)
            profile.disable()
            torch.cuda.synchronize()
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
            with open(os.path.join(OUT, "small_profile.txt"), "w") as f:
                f.write(text.getvalue())


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_probe.py needs a CUDA GPU")
    from vqfast.bench import collect_env

    # The GPU, driver and versions first: the figures below mean something only with them.
    log("environment", collect_env(torch.device("cuda"), "probe"))
    start = time.time()
    search_candidates()
    log("t after search candidates s", time.time() - start)
    tf32_stages()
    log("t after search stages s", time.time() - start)
    search_modes()
    log("t after search modes s", time.time() - start)
    layer_steps()
    log("t after layer s", time.time() - start)
    small_searches()
    log("t total s", time.time() - start)


if __name__ == "__main__":
    main()
