"""Host (Python) time of vqfast's eager calls, measured without a GPU.

A small search is bound by the time Python takes to launch its kernels, not by the GPU (goal 3 of the
benchmarks: (1,024, 4,096, 128) in 25 us). This runs the real launchers, Triton's own launch path
included (autotuner cache, argument binding and specialisation, the compiled kernel's launcher
call), on CPU tensors with the compile-only driver of ``compile_check.py``: kernels are compiled for
sm_90 on first use and every launch stops just before the CUDA driver. What it leaves out is the
driver's ``cuLaunchKernel`` (a few us per launch) and CUDA allocations (``torch.empty`` on the GPU).
Each case repeats one problem, as a training or inference loop does: after the warm-up calls it runs
on the launchers' cached plans and prepared launches (tuning notes 17 and 21 of benchmarks/README.md).
The layer's case is a training step; its CPU tensor arithmetic (the rows' copies, the gradient
accumulation) is real work here that a GPU would do asynchronously, so it stays small.

    python benchmarks/host_cost.py [--calls 50] [--repeats 40] [--case TEXT] [--profile]

``--case`` keeps the cases whose name contains TEXT; ``--profile`` profiles the first case kept.
Prints, per case, the best time per call over ``--repeats`` runs of ``--calls`` calls, with the direct
launches of ``vqfast.kernels._launch`` and with Triton's own launch path, measured in turn (short runs,
best of many: the shared machines this runs on are noisy).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Callable

os.environ["TRITON_INTERPRET"] = "0"
os.environ["VQFAST_BACKEND"] = "triton"

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402

import compile_check  # noqa: E402


def _cases() -> list[tuple[str, Callable[[], object]]]:
    import vqfast

    torch.manual_seed(0)
    out = []
    for name, dtype, precision in (("bf16", torch.bfloat16, "high"), ("fp16", torch.float16, "high"),
                                   ("fp32 highest", torch.float32, "highest"), ("fp32 tf32", torch.float32, "high")):
        z = torch.randn(1024, 128).to(dtype)
        c = torch.randn(4096, 128).to(dtype)
        out.append((f"nearest_code {name} (1024, 4096, 128)",
                    lambda z=z, c=c, p=precision: vqfast.nearest_code(z, c, precision=p)))
    # The plain fp32 search (fp32 products for every code), through the kernel's entry point.
    from vqfast import kernels

    z = torch.randn(1024, 128)
    c = torch.randn(4096, 128)
    out.append(("kernels.nearest_code fp32 ieee (1024, 4096, 128)",
                lambda: kernels.nearest_code(z, c, precision="ieee")))
    z = torch.randn(1024, 128)
    c = torch.randn(4096, 128)
    out.append(("quantize fp32 highest, forward (1024, 4096, 128)",
                lambda: vqfast.quantize(z, c, 0.25, precision="highest")))
    # A training step of the layer, forward and backward, defaults: as many launches as at the article's
    # shape (4,096 codes of 128), but small, so that the CPU's own arithmetic (which a GPU does
    # asynchronously) stays out of the host time.
    layer = vqfast.VectorQuantizer(64, 8)
    x = torch.randn(64, 8, 4, 4, requires_grad=True)

    def layer_step():
        z_q, loss, _ = layer(x)
        (z_q.sum() + loss).backward()

    out.append(("VectorQuantizer(64, 8) forward + backward, x (64, 8, 4, 4)", layer_step))
    # The same step with a padding mask (the fused kernels leave the padding out), and with the rotation
    # trick (quantize's fused kernels, then the rotation's backward kernel).
    mask = torch.rand(64, 4, 4) < 0.75

    def masked_step():
        z_q, loss, _ = layer(x, mask=mask)
        (z_q.sum() + loss).backward()

    out.append(("VectorQuantizer(64, 8) with a padding mask, forward + backward", masked_step))
    rotation = vqfast.VectorQuantizer(64, 8, gradient="rotation")

    def rotation_step():
        z_q, loss, _ = rotation(x)
        (z_q.sum() + loss).backward()

    out.append(("VectorQuantizer(64, 8, gradient='rotation') forward + backward", rotation_step))
    # The same for a residual VQ of 4 such stages (sequences (B, C, T), as audio codecs use it): its host
    # time is about one layer step per stage.
    residual = vqfast.ResidualVectorQuantizer(4, 64, 8, channel_dim=1)
    seq = torch.randn(16, 8, 16, requires_grad=True)

    def residual_step():
        z_q, loss, _ = residual(seq)
        (z_q.sum() + loss).backward()

    out.append(("ResidualVectorQuantizer(4, 64, 8) forward + backward, x (16, 8, 16)", residual_step))
    return out


def measure(fn: Callable[[], object], calls: int, repeats: int) -> dict[str, float]:
    """Best time per call in microseconds, with direct launches and with Triton's path, in turn."""
    from vqfast.kernels import _launch

    best = {"direct": float("inf"), "triton": float("inf")}
    for _ in range(5):
        fn()  # compile and fill every cache first
    for _ in range(repeats):
        for mode in best:
            with _launch.launch_path(direct=mode == "direct"):
                start = time.process_time()
                for _ in range(calls):
                    fn()
                best[mode] = min(best[mode], (time.process_time() - start) / calls * 1e6)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--profile", action="store_true", help="cProfile of the first case measured")
    parser.add_argument("--case", action="append", default=None, metavar="TEXT",
                        help="measure only the cases whose name contains TEXT (repeatable)")
    args = parser.parse_args(argv)
    sms = compile_check.SM_LIMITS[90]["sms"]
    triton.runtime.driver.set_active(compile_check.StandInDriver(90, lambda exc: None))
    compile_check._patch_launch_checks(sms, 90)
    import vqfast.functional
    import vqfast.layer

    # CPU tensors stand for CUDA ones here: route them to the kernels.
    vqfast.functional.resolve_backend = lambda device, dtype=None: "triton"
    vqfast.layer.resolve_backend = vqfast.functional.resolve_backend
    torch.set_num_threads(1)
    cases = _cases()
    if args.case:
        cases = [(name, fn) for name, fn in cases if any(text in name for text in args.case)]
    print("host time per call, launches stubbed (us): direct launches / Triton's launch path")
    for name, fn in cases:
        best = measure(fn, args.calls, args.repeats)
        print(f"{name}: {best['direct']:.1f} / {best['triton']:.1f}", flush=True)
    if args.profile:
        name, fn = cases[0]
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.calls):
            fn()
        profile.disable()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
        print(f"\ncProfile of {args.calls} calls of {name}:\n{text.getvalue()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
