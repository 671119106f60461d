"""Compile every Triton kernel for an NVIDIA GPU on a machine that has none, and report its resources.

The real launchers run on CPU tensors with a stand-in Triton driver: each kernel they launch is
compiled for the target architecture (Triton -> PTX -> ptxas -> cubin), exactly as on the GPU and with
the same autotuning configurations, but nothing executes, so the launchers' outputs are meaningless.
What comes out is what the interpreter cannot show: that every variant compiles for the real target,
and the registers, spills and shared memory of each, with the occupancy they allow.

    python benchmarks/compile_check.py [--arch 90] [--quick] [--out DIR]

Writes ``compile_report.json`` and ``compile_report.md`` to ``--out`` (default: print only); exits
non-zero if any variant fails to compile. Needs ``TRITON_INTERPRET`` unset (it is cleared here before
Triton is imported) and Triton's bundled ``ptxas``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

# Per-SM limits of the architectures this tool knows (CUDA occupancy calculator values).
SM_LIMITS = {
    80: dict(regs=65536, smem=167936, threads=2048, blocks=32, sms=108),
    86: dict(regs=65536, smem=101376, threads=1536, blocks=16, sms=84),
    89: dict(regs=65536, smem=101376, threads=1536, blocks=24, sms=128),
    90: dict(regs=65536, smem=232448, threads=2048, blocks=32, sms=132),
}


@dataclass
class Variant:
    kernel: str
    case: str
    constants: dict
    num_warps: int
    num_stages: int
    shared_bytes: int
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    blocks_per_sm: int = -1
    occupancy: float = float("nan")
    mma: str = ""
    # SASS instructions in the innermost loop that holds a warpgroup MMA (the search's main loop), per
    # thread and iteration; -1 where there is none.
    loop_instructions: int = -1
    # Of those, argmin instructions issued while the loop's MMA is in flight (see _mma_loop_instructions).
    argmin_in_flight: int = -1


@dataclass
class Report:
    arch: int
    triton: str
    torch: str
    variants: list[Variant] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    # Launches made through vqfast's direct launch path that were compared with Triton's own path.
    direct_launches_compared: int = 0
    seconds: float = 0.0


class _Utils:
    def __init__(self, limits: dict):
        self.limits = limits

    def get_device_properties(self, device):
        return {"max_shared_mem": self.limits["smem"], "multiprocessor_count": self.limits["sms"],
                "max_num_regs": self.limits["regs"], "warpSize": 32}

    def load_binary(self, name, kernel, shared, device):
        # (module, function, registers, spills, max threads per block): nothing is loaded. The module
        # is not None, as on a GPU, so that Triton sets a compiled kernel's launcher up only once.
        return "stand-in module", None, 0, 0, 1024

    def unload_module(self, module):
        pass


class _NoLaunch:
    """A compiled kernel's launcher that launches nothing; while ``record`` is a list, it notes each
    call: which compiled kernel, the grid and the arguments (tensors by dtype, shape and alignment)."""

    record: list | None = None

    def __init__(self, src, metadata):
        pass

    def __call__(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata, enter_hook,
                 exit_hook, *args):
        if _NoLaunch.record is not None:
            _NoLaunch.record.append((id(self), (grid_x, grid_y, grid_z), _describe(args)))


def _describe(args: tuple) -> tuple:
    """The arguments with each tensor as (dtype, shape, address mod 16, which distinct tensor of the call
    it is), so that two runs on fresh tensors compare equal, swapped or aliased tensors do not."""
    order: dict[int, int] = {}
    out = []
    for value in args:
        if isinstance(value, torch.Tensor):
            which = order.setdefault(value.data_ptr(), len(order))
            out.append((str(value.dtype), tuple(value.shape), value.data_ptr() % 16, which))
        else:
            out.append(value)
    return tuple(out)


class StandInDriver:
    """Enough of a Triton driver to compile for ``target`` and skip every launch."""

    def __init__(self, arch: int, on_bench_error: Callable[[BaseException], None]):
        self.target = GPUTarget("cuda", arch, 32)
        self.utils = _Utils(SM_LIMITS[arch])
        self.launcher_cls = _NoLaunch
        self.on_bench_error = on_bench_error

    def is_active(self):
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_empty_cache_for_benchmark(self):
        return torch.empty(0)

    def clear_cache(self, cache):
        pass

    def get_benchmarker(self):
        def bench(kernel_call, quantiles=None, **kwargs):
            # Autotuning: compile every candidate configuration (the call compiles, then launches nothing).
            try:
                kernel_call()
            except Exception as exc:
                self.on_bench_error(exc)
                raise
            return [1.0, 1.0, 1.0] if quantiles else 1.0
        return bench


def _bundled_tool(name: str) -> Path | None:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return path if path.exists() else None


def _ptxas() -> str:
    found = _bundled_tool("ptxas") or shutil.which("ptxas")
    if not found:
        raise SystemExit("no ptxas found (Triton's bundled one or on PATH)")
    return str(found)


def _resources(kernel, arch: int) -> tuple[int, int, int]:
    """(registers, spill stores, spill loads) of a compiled kernel.

    Read from the cubin Triton built (``cuobjdump -res-usage``, milliseconds): ptxas run again on the
    PTX takes longer and, without Triton's own ptxas options, may allocate registers differently. A
    kernel with neither a stack frame nor local memory has no spills (spilled registers live in the
    stack frame: ``STACK``, not ``LOCAL``); for one with either, ptxas -v gives the spills' bytes."""
    tool = _bundled_tool("cuobjdump")
    regs = None
    if tool is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "k.cubin"
            path.write_bytes(kernel.asm["cubin"])
            usage = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True).stdout
        regs, local, stack = (re.search(rf"{field}:(\d+)", usage) for field in ("REG", "LOCAL", "STACK"))
        if regs and local and stack and int(local.group(1)) == 0 and int(stack.group(1)) == 0:
            return int(regs.group(1)), 0, 0
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(kernel.asm["ptx"])
        log = subprocess.run([_ptxas(), "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    if not regs:
        regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(regs.group(1)) if regs else -1,
            int(spills.group(1)) if spills else -1, int(spills.group(2)) if spills else -1)


def _mma_loop_instructions(cubin: bytes) -> tuple[int, int]:
    """Instructions in the innermost loop that contains an HGMMA, from ``nvdisasm`` of the cubin: what
    one thread issues per tile of the search (MMA, loads, addresses and the epilogue's argmin), a
    static measure of the epilogue's cost beside the tensor-core work; and how many of the loop's
    argmin instructions (FSETP, FSEL, FMNMX) are issued while its MMA is in flight (between the
    warpgroup's arrive and its wait): none where the argmin waits for this tile's product, about a tile
    of scores' worth where the next tile's product is issued first (PIPELINE). (-1, -1) without such a
    loop."""
    tool = _bundled_tool("nvdisasm")
    if tool is None:
        return -1, -1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        # No dataflow analysis (-ndf): a quarter of the time, the same instructions.
        sass = subprocess.run([str(tool), "-c", "-ndf", str(path)], capture_output=True, text=True).stdout
    instructions: list[tuple[int, str]] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    for line in sass.splitlines():
        text = line.strip()
        label = re.match(r"\.L_x_(\d+):", text)
        if label:
            pending.append(label.group(1))
            continue
        found = re.match(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", text)
        if found:
            address = int(found.group(1), 16)
            for name in pending:
                labels[name] = address
            pending = []
            instructions.append((address, found.group(2)))
    best: list[str] | None = None
    for address, text in instructions:
        branch = re.search(r"BRA\s.*?\.L_x_(\d+)", text)
        start = labels.get(branch.group(1)) if branch else None
        if start is None or start >= address:
            continue  # not a backward branch
        body = [t for a, t in instructions if start <= a <= address]
        if any("HGMMA" in t for t in body) and (best is None or len(body) < len(best)):
            best = body
    if best is None:
        return -1, -1
    # (One pass in program order from the loop's top: it assumes the loop waits for its MMA in the same
    # iteration, as Triton's loops do; an MMA left pending across the back-edge would not be counted.)
    in_flight, overlapped = False, 0
    for text in best:
        opcode = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]
        if opcode.startswith("WARPGROUP.ARRIVE"):
            in_flight = True
        elif opcode.startswith("WARPGROUP.DEPBAR"):
            in_flight = False
        elif in_flight and opcode.split(".")[0] in ("FSETP", "FSEL", "FMNMX"):
            overlapped += 1
    return len(best), overlapped


def _mma_kind(ptx: str) -> str:
    """Which tensor-core instructions the kernel uses: Hopper's warpgroup MMA, the older per-warp MMA, or none."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma.sync"
    return "-"


def _blocks_per_sm(regs: int, warps: int, shared: int, limits: dict) -> int:
    threads = 32 * warps
    # Registers are allocated per warp in units of 256.
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = limits["regs"] // (regs_per_warp * warps)
    by_smem = limits["smem"] // (shared + 1024) if shared else limits["blocks"]  # 1 KiB reserved per block
    return max(0, min(by_regs, by_smem, limits["threads"] // threads, limits["blocks"]))


def _cases(quick: bool) -> list[tuple[str, Callable[[], object]]]:
    from vqfast.bench import environment
    from vqfast.kernels import gather, nearest, quantize, rotation, soft_entropy, upkeep, usage

    def rows(n, d, dtype):
        return torch.randn(n, d).to(dtype)

    def search(n, k, d, dtype, precision, splits=None):
        return lambda: nearest.nearest_code(rows(n, d, dtype), rows(k, d, dtype), precision=precision,
                                            num_splits=splits)

    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    def with_env(name, value, launch):
        def run():
            with environment(name, value):
                return launch()
        return run

    def fixed_config(launch):
        return with_env("VQFAST_AUTOTUNE", "0", launch)

    def tma(launch):
        return with_env("VQFAST_TMA_SEARCH", "1", launch)

    cases = [
        ("nearest bf16 (65536, 65536, 256)", search(65536, 65536, 256, bf16, "high")),
        ("nearest fp32 tf32, VQFAST_AUTOTUNE=0 (4096, 8192, 64)", fixed_config(search(4096, 8192, 64, fp32, "high"))),
        ("nearest fp32 tf32 + tf32x3 re-search (8192, 16384, 256)", search(8192, 16384, 256, fp32, "high")),
        # The same tf32 pass; the listed rows searched again with fp32 products.
        ("nearest fp32 highest: tf32 + fp32 re-search (8192, 16384, 256)", search(8192, 16384, 256, fp32, "highest")),
        ("nearest bf16 split codebook (1024, 262144, 64)", search(1024, 262144, 64, bf16, "high")),
        # The opt-in PIPELINE candidates of the 16-bit search (tuning note 29), at D = 256 and 64. (Shapes
        # of their own: the flag is read when a problem size is first tuned.)
        ("nearest bf16, VQFAST_PIPELINED_SEARCH=1 (32768, 32768, 256)",
         with_env("VQFAST_PIPELINED_SEARCH", "1", search(32768, 32768, 256, bf16, "high"))),
        ("nearest bf16 split codebook, VQFAST_PIPELINED_SEARCH=1 (2048, 262144, 64)",
         with_env("VQFAST_PIPELINED_SEARCH", "1", search(2048, 262144, 64, bf16, "high"))),
        # The opt-in TMA kernel (kernels/nearest_tma.py) at the shapes of goals 1 and 3b.
        ("nearest bf16 TMA search (65536, 65536, 256)", tma(search(65536, 65536, 256, bf16, "high"))),
        ("nearest bf16 TMA search, split codebook (1024, 262144, 64)",
         tma(search(1024, 262144, 64, bf16, "high"))),
        # ... and its tf32 pass with the re-check (goal 2's shape), then the tf32x3 re-search as usual.
        ("nearest fp32 tf32 TMA search (65536, 65536, 256)", tma(search(65536, 65536, 256, fp32, "high"))),
    ]
    if not quick:
        cases += [
            ("nearest fp16 (8192, 16384, 128)", search(8192, 16384, 128, fp16, "high")),
            ("nearest fp32 products, ieee (8192, 16384, 256)", search(8192, 16384, 256, fp32, "ieee")),
            ("nearest fp32 products, ieee (4096, 4096, 17)", search(4096, 4096, 17, fp32, "ieee")),
            ("nearest fp32 highest, odd D (4096, 4096, 17)", search(4096, 4096, 17, fp32, "highest")),
            ("nearest bf16 odd D (5000, 3000, 100)", search(5000, 3000, 100, bf16, "high")),
            ("nearest bf16 D loop (8192, 8192, 1024)", search(8192, 8192, 1024, bf16, "high")),
            ("nearest fp32 tf32 small (1024, 4096, 128)", search(1024, 4096, 128, fp32, "high")),
            ("nearest fp32 tf32 + tf32x3 re-search, one split (65536, 4096, 128)",
             search(65536, 4096, 128, fp32, "high")),
            # Masked tiles (K and D fill no tile), where the tf32 pass is tightest on registers.
            ("nearest fp32 tf32, odd K and D (4096, 3001, 200)", search(4096, 3001, 200, fp32, "high")),
            ("nearest fp16 TMA search, odd K and D (5000, 3001, 200)",
             tma(search(5000, 3001, 200, fp16, "high"))),
            ("nearest bf16 TMA search, VQFAST_AUTOTUNE=0 (8192, 16384, 128)",
             tma(fixed_config(search(8192, 16384, 128, bf16, "high")))),
            ("nearest fp32 tf32 TMA search, one split (65536, 4096, 128)", tma(search(65536, 4096, 128, fp32, "high"))),
            ("nearest fp32 tf32 TMA search, odd K and D (4096, 3001, 200)", tma(search(4096, 3001, 200, fp32, "high"))),
        ]
    idx = lambda n, k: torch.randint(0, k, (n,))  # noqa: E731
    soft_entropy_tf32 = lambda: _soft_entropy(soft_entropy, rows, 8192, 4096, 128, fp32, "tf32")  # noqa: E731
    cases += [
        ("gather + scatter-add fp32 (65536, 4096, 128)",
         lambda: (gather.gather_rows(rows(4096, 128, fp32), idx(65536, 4096)),
                  gather.scatter_add_rows(rows(65536, 128, fp32), idx(65536, 4096), 4096))),
        ("code usage (1000000, 65536)", lambda: usage.code_usage(idx(10**6, 65536), 65536)),
        ("fused VQ step fp32 (32768, 4096, 128)",
         lambda: quantize.quantize_backward(rows(32768, 128, fp32), torch.ones(()), rows(32768, 128, fp32),
                                            rows(4096, 128, fp32), idx(32768, 4096), 0.25)
         + quantize.quantize_forward(rows(32768, 128, fp32), rows(4096, 128, fp32), idx(32768, 4096), 0.25)),
        ("fused VQ step bf16, padding left out (32768, 4096, 256)",
         lambda: quantize.quantize_backward(rows(32768, 256, bf16), torch.ones(()), rows(32768, 256, bf16),
                                            rows(4096, 256, bf16), idx(32768, 4096) - 1, 0.25, left_out=True)
         + quantize.quantize_forward(rows(32768, 256, bf16), rows(4096, 256, bf16), idx(32768, 4096) - 1, 0.25,
                                     left_out=True)),
        ("rotation trick backward bf16 (32768, 256)",
         lambda: rotation.rotate_gradient(rows(32768, 256, bf16), rows(32768, 256, bf16), rows(32768, 256, bf16),
                                          1e-6)),
        # (--quick: the fixed tiles only; the full check compiles every candidate.)
        ("soft entropy fp32 tf32 (8192, 4096, 128)" + (", VQFAST_AUTOTUNE=0" if quick else ""),
         fixed_config(soft_entropy_tf32) if quick else soft_entropy_tf32),
        ("codebook upkeep: counts, statistics, restarts with EMA (32768 rows, 65536 codes of 256)",
         lambda: _upkeep(usage, upkeep, rows, 32768, 65536, 256)),
    ]
    if not quick:
        cases += [
            ("gather + scatter-add bf16 (65536, 4096, 100)",
             lambda: (gather.gather_rows(rows(4096, 100, bf16), idx(65536, 4096)),
                      gather.scatter_add_rows(rows(65536, 100, bf16), idx(65536, 4096), 4096))),
            ("fused VQ step bf16, no codebook grad (32768, 4096, 256)",
             lambda: quantize.quantize_backward(None, torch.ones(()), rows(32768, 256, bf16),
                                                rows(4096, 256, bf16), idx(32768, 4096), 0.25,
                                                need_grad_codebook=False)),
            ("soft entropy fp32 ieee (8192, 4096, 128)",
             lambda: _soft_entropy(soft_entropy, rows, 8192, 4096, 128, fp32, "ieee")),
            ("soft entropy bf16, tf32 gradients (8192, 4096, 256)",
             lambda: _soft_entropy(soft_entropy, rows, 8192, 4096, 256, bf16, "tf32")),
            ("soft entropy bf16, fp32 gradients (8192, 4096, 256)",
             lambda: _soft_entropy(soft_entropy, rows, 8192, 4096, 256, bf16, "ieee")),
        ]
    return cases


def _soft_entropy(module, rows, n, k, d, dtype, precision):
    z, c = rows(n, d, dtype), rows(k, d, dtype)
    row_max, log_sum, ent, _ = module.soft_entropy_forward(z, c, 0.5, precision=precision)
    return module.soft_entropy_backward(z, c, row_max, log_sum, ent, torch.ones(k), torch.ones(1), 0.5,
                                        precision=precision)


def _upkeep(usage, upkeep, rows, n, k, d):
    counts = usage.finite_row_counts(torch.randint(0, k, (n,)), torch.rand(n), k)
    state = dict(usage=torch.zeros(k), grace=torch.zeros(k), batch_counts=torch.zeros(k, dtype=torch.int64),
                 steps=torch.zeros(()))
    upkeep.update_code_usage(counts, *state.values(), 0.99)
    upkeep.update_code_usage(counts, *state.values(), 0.99, 0.01 / k, rows(1024, d, torch.float32),
                             rows(k, d, torch.float32), torch.ones(k))
    upkeep.ema_update(rows(k, d, torch.float32), torch.ones(k), rows(k, d, torch.float32), counts, 0.99, 1e-5)


def _compiled_kernels() -> dict[int, tuple[str, object]]:
    """Every compiled kernel so far, by identity: ``{id: (kernel name, CompiledKernel)}``."""
    from triton.runtime.jit import JITFunction

    from vqfast.kernels import _common, gather, nearest, nearest_tma, quantize, rotation, soft_entropy, upkeep, usage

    found = {}
    for module in (_common, gather, nearest, nearest_tma, quantize, rotation, soft_entropy, upkeep, usage):
        for value in vars(module).values():
            fn = value if isinstance(value, JITFunction) else getattr(value, "fn", None)  # autotuners wrap one
            if isinstance(fn, JITFunction):
                for caches in fn.device_caches.values():
                    for kernel in caches[0].values():
                        found[id(kernel)] = (fn.fn.__name__, kernel)
    return found


def _constants(kernel) -> dict:
    from vqfast.kernels._launch import compiled_constants

    # The tl.constexpr parameters (upper case); lower-case ones are specialised values (1, None).
    return {name: value if isinstance(value, (int, float, str, bool)) else str(value)
            for name, value in compiled_constants(kernel).items() if name.isupper()}


def _patch_launch_checks(sms: int, arch: int) -> None:
    """The launchers insist on CUDA tensors and ask the GPU for its size; answer for the target."""
    from vqfast.kernels import _common, gather, nearest, nearest_tma, quantize, rotation, soft_entropy, upkeep, usage

    for module in (_common, gather, quantize, rotation, upkeep, usage):
        module.check_launchable = lambda *tensors: None
    for module in (nearest, soft_entropy):
        module.multiprocessor_count = lambda device: sms
    nearest_tma._gpu_supports_it = lambda device: arch >= 90
    # The cases are small (to run quickly on a CPU), but every candidate, the streaming twins of the
    # memory-bound tiles included, must compile for the target.
    _common.STREAMING_MIN_BYTES = usage.STREAMING_MIN_BYTES = 0


def run(arch: int, quick: bool) -> Report:
    start = time.perf_counter()
    report = Report(arch=arch, triton=triton.__version__, torch=torch.__version__)
    limits = SM_LIMITS[arch]
    errors: list[BaseException] = []
    triton.runtime.driver.set_active(StandInDriver(arch, errors.append))
    _patch_launch_checks(limits["sms"], arch)
    torch.manual_seed(0)
    seen: set[int] = set()
    for case, launch in _cases(quick):
        errors.clear()
        try:
            launch()
        except Exception as exc:
            report.failures.append({"case": case, "error": f"{type(exc).__name__}: {exc}"[:2000]})
        for exc in errors:  # autotuning candidates that failed (the autotuner skips them silently)
            report.failures.append({"case": case, "error": f"autotune candidate: {type(exc).__name__}: {exc}"[:2000]})
        for key, (name, kernel) in _compiled_kernels().items():
            if key in seen:
                continue
            seen.add(key)
            meta = kernel.metadata
            v = Variant(kernel=name, case=case, constants=_constants(kernel), num_warps=meta.num_warps,
                        num_stages=meta.num_stages, shared_bytes=meta.shared)
            v.registers, v.spill_stores, v.spill_loads = _resources(kernel, arch)
            v.mma = _mma_kind(kernel.asm["ptx"])
            if v.mma == "wgmma" and arch >= 90:
                v.loop_instructions, v.argmin_in_flight = _mma_loop_instructions(kernel.asm["cubin"])
            v.blocks_per_sm = _blocks_per_sm(v.registers, v.num_warps, v.shared_bytes, limits)
            v.occupancy = v.blocks_per_sm * v.num_warps * 32 / limits["threads"]
            report.variants.append(v)
        print(f"{case}: {sum(v.case == case for v in report.variants)} variants", file=sys.stderr)
    # (The TMA search launches through Triton's path only: its descriptors are made per call.)
    _check_direct_launches(report, [c for c in _cases(quick) if " TMA" not in c[0]] + _misaligned_cases())
    report.seconds = time.perf_counter() - start
    return report


def _misaligned_cases() -> list[tuple[str, Callable[[], object]]]:
    """Inputs whose addresses are not multiples of 16 bytes: Triton compiles other variants for them."""
    from vqfast.kernels import gather, nearest

    def search():
        z = torch.randn(1025, 100).to(torch.bfloat16)[1:]  # 200 bytes in
        c = torch.randn(3001, 100).to(torch.bfloat16)[1:]
        return nearest.nearest_code(z, c)

    return [("nearest bf16 misaligned (1024, 3000, 100)", search),
            ("gather misaligned (1000, 300, 37)",
             lambda: gather.gather_rows(torch.randn(301, 37)[1:], torch.randint(0, 300, (1000,))))]


def _check_direct_launches(report: Report, cases: list[tuple[str, Callable[[], object]]]) -> None:
    """Each case through Triton's launch path, then through vqfast's direct one (kernels/_launch.py):
    every launch must reach the same compiled kernel with the same grid and arguments. A failure goes
    to ``report.failures``."""
    from vqfast.kernels import _launch

    try:
        for case, run_case in cases:
            records = {}
            for mode in ("warm-up", "triton", "direct"):
                _NoLaunch.record = records[mode] = []
                torch.manual_seed(0)
                before = _launch.direct_launches
                try:
                    with _launch.launch_path(direct=mode != "triton"):
                        run_case()
                except Exception as exc:
                    report.failures.append({"case": f"{case} ({mode} launches)", "error": repr(exc)[:2000]})
                    break
                taken = _launch.direct_launches - before
            else:
                if not records["direct"] or records["direct"] != records["triton"]:
                    report.failures.append({"case": case, "error": "direct launches differ from Triton's: "
                                            f"{records['direct'][:3]} against {records['triton'][:3]}"[:2000]})
                elif taken != len(records["direct"]):
                    # Otherwise the comparison would hold trivially, Triton's path against itself.
                    report.failures.append({"case": case, "error": f"only {taken} of {len(records['direct'])} "
                                            "launches went through the direct path after a warm-up run"})
                report.direct_launches_compared += len(records["direct"])
    finally:
        _NoLaunch.record = None


def markdown(report: Report) -> str:
    lines = [
        f"Kernels compiled for sm_{report.arch} without a GPU (Triton {report.triton}, torch {report.torch}); "
        "registers from the cubin (cuobjdump), spills from ptxas -v, occupancy = resident warps / maximum "
        "from registers, shared memory and threads; MMA loop instr. = SASS instructions per thread in the "
        "innermost loop holding a warpgroup MMA (nvdisasm), the search's main loop (its loop over D slices "
        "where D is looped over, without the epilogue); in flight = of those, argmin instructions issued "
        "while the loop's MMA runs.",
        "",
        f"Direct launches (kernels/_launch.py) compared with Triton's launch path: "
        f"{report.direct_launches_compared}, all the same compiled kernel, grid and arguments unless listed "
        "under Failures.",
        "",
        "| kernel | case | constants | warps | stages | MMA | regs | spill st/ld (B) | smem (KiB) | blocks/SM | occupancy "
        "| MMA loop instr. | in flight |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in report.variants:
        consts = ", ".join(f"{k}={val}" for k, val in sorted(v.constants.items()) if k.startswith("BLOCK")
                           or k in ("INPUT_PRECISION", "SINGLE_D", "SLOTS", "PIPELINE", "K_ALIGN", "EVEN_D", "HAS_FLAGS", "TRACK_SECOND", "WRITE_FLAGS", "NEED_GRAD_C",
                                         "FINITE_ONLY", "FIND_DEAD", "HAS_EMA", "CODES_PER_PROGRAM", "STREAM", "WARP_SPECIALIZE"))
        lines.append(f"| {v.kernel} | {v.case} | {consts} | {v.num_warps} | {v.num_stages} | {v.mma} | {v.registers} | "
                     f"{v.spill_stores}/{v.spill_loads} | {v.shared_bytes / 1024:.1f} | {v.blocks_per_sm} | "
                     f"{v.occupancy:.0%} | {v.loop_instructions if v.loop_instructions >= 0 else ''} | "
                     f"{v.argmin_in_flight if v.argmin_in_flight >= 0 else ''} |")
    if report.failures:
        lines += ["", "Failures:", ""] + [f"- {f['case']}: {f['error'].splitlines()[0]}" for f in report.failures]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SM_LIMITS),
                        help="compute capability as an integer (90 = H100)")
    parser.add_argument("--quick", action="store_true", help="one case per kernel family")
    parser.add_argument("--out", type=Path, help="folder for compile_report.json / .md")
    args = parser.parse_args(argv)
    report = run(args.arch, args.quick)
    text = markdown(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compile_report.json").write_text(json.dumps(asdict(report), indent=1))
        (args.out / "compile_report.md").write_text(text)
    print(text)
    print(f"{len(report.variants)} variants compiled, {len(report.failures)} failures, "
          f"{report.direct_launches_compared} direct launches compared with Triton's, {report.seconds:.0f} s",
          file=sys.stderr)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
