"""The kernels compile for the H100 (sm_90) through the real launchers, without a GPU.

The interpreter checks what the kernels compute; only the real compiler shows whether every variant
compiles for the target and uses its tensor cores.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {
    "_row_sqnorm_kernel", "_nearest_code_kernel", "_reduce_splits_kernel", "_gather_rows_kernel", "_scatter_add_rows_kernel", "_bincount_kernel",
    "_entropy_kernel", "_vq_forward_kernel", "_vq_backward_kernel", "_row_stats_kernel", "_col_sum_kernel",
    "_grad_rows_kernel", "_grad_codes_kernel", "_update_usage_kernel", "_restart_codes_kernel",
    "_ema_update_kernel", "_code_norms_kernel", "_research_listed_rows_kernel", "_write_listed_rows_kernel",
    "_nearest_code_tma_kernel", "_rotate_grad_kernel",
}


def _has_ptxas() -> bool:
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists() or bool(
        shutil.which("ptxas"))


@pytest.mark.skipif(not _has_ptxas(), reason="needs ptxas (bundled with Triton's Linux wheels)")
def test_every_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_check.py"), "--quick",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "compile_report.json").read_text())
    assert report["arch"] == 90 and not report["failures"]
    # The direct launch path (kernels/_launch.py) reached the compiled kernels Triton's path reaches, with
    # the same grids and arguments, aligned and misaligned inputs alike (a difference is a failure).
    assert report["direct_launches_compared"] >= 20
    variants = report["variants"]
    assert {v["kernel"] for v in variants} == KERNELS
    assert all(v["registers"] > 0 and v["blocks_per_sm"] >= 1 for v in variants)
    # Every autotuning candidate of the search was compiled, and the 16-bit and tf32 searches run on
    # Hopper's warpgroup tensor-core instructions.
    search = [v for v in variants if v["kernel"] == "_nearest_code_kernel"]
    assert len(search) >= 8
    tensor_core = [v for v in search if v["constants"].get("INPUT_PRECISION") == "tf32"]
    assert tensor_core and all(v["mma"] == "wgmma" for v in tensor_core)
    # Their main loop is found in the SASS and counted (tuning note 15 compares these counts).
    assert all(v["loop_instructions"] > 0 for v in tensor_core)
    # The 16-bit search's PIPELINE variants compile without spilling, and part of their argmin is issued
    # while the next tile's MMA is in flight (of a tile of 32 scores per thread, a compare and a select
    # each), where the plain variants' argmin waits for the product (tuning note 29).
    sixteen = [v for v in tensor_core if "bf16" in v["case"] and " TMA" not in v["case"]]
    pipelined = [v for v in sixteen if v["constants"].get("PIPELINE")]
    assert len(pipelined) >= 2 and all(v["spill_stores"] == 0 for v in pipelined)
    assert all(v["argmin_in_flight"] >= 24 for v in pipelined), [v["argmin_in_flight"] for v in pipelined]
    plain = [v for v in sixteen if not v["constants"].get("PIPELINE")]
    assert plain and all(v["argmin_in_flight"] <= 8 for v in plain), [v["argmin_in_flight"] for v in plain]
    # The listed rows' re-search compiles with fp32 products ("highest") and with tf32x3 ("high").
    research = {v["constants"].get("INPUT_PRECISION") for v in variants if v["kernel"] == "_research_listed_rows_kernel"}
    assert research == {"ieee", "tf32x3"}
    # VQFAST_AUTOTUNE=0: one configuration per pass (tf32 search, fp32 re-search), not eight.
    fixed = [v for v in search if "VQFAST_AUTOTUNE=0" in v["case"]]
    assert 1 <= len(fixed) <= 2
    assert "| _nearest_code_kernel |" in (tmp_path / "compile_report.md").read_text()
    # The opt-in TMA search (VQFAST_TMA_SEARCH=1) compiles its candidates on the tensor cores, none of
    # them warp-specialised (those fault at run time: kernels/nearest_tma.py).
    tma = [v for v in variants if v["kernel"] == "_nearest_code_tma_kernel"]
    assert tma and all(v["mma"] == "wgmma" and v["loop_instructions"] > 0 and v["spill_stores"] == 0 for v in tma)
    assert not any(v["constants"]["WARP_SPECIALIZE"] for v in tma)
    # The memory-bound kernels compile every tile their launchers time (5 each), each within the
    # register file without spilling.
    for kernel, candidates in (("_gather_rows_kernel", 10), ("_scatter_add_rows_kernel", 10), ("_vq_forward_kernel", 10),
                               ("_vq_backward_kernel", 10), ("_bincount_kernel", 10)):
        compiled = [v for v in variants if v["kernel"] == kernel]
        assert len(compiled) >= candidates, kernel
        assert {v["constants"].get("STREAM") for v in compiled} == {False, True}, kernel  # the streaming twins
        assert all(v["spill_stores"] == 0 for v in compiled), kernel


@pytest.mark.skipif(not _has_ptxas(), reason="needs ptxas (bundled with Triton's Linux wheels)")
def test_host_cost_script_runs(tmp_path):
    """benchmarks/host_cost.py (host time of eager calls, launches stubbed) runs on compile_check's driver."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    # One configuration per kernel: compiling every autotuning candidate for sm_90 (a minute on two cores)
    # is test_every_kernel_compiles_for_sm90's job; this one checks that the script runs.
    env["VQFAST_AUTOTUNE"] = "0"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_cost.py"), "--calls", "1", "--repeats", "1",
                           "--case", "fp32 ieee", "--case", "VectorQuantizer(64"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    timed = [line for line in proc.stdout.splitlines() if line.endswith(tuple("0123456789"))]
    assert len(timed) == 4 and all(" / " in line for line in timed), proc.stdout  # ieee search, 3 layer steps


_SPILL_SCRIPT = '''
import json, sys
sys.path.insert(0, {benchmarks!r})
import compile_check  # (clears TRITON_INTERPRET before Triton is imported)
import torch, triton, triton.language as tl


@triton.jit
def _outer_products(a_ptr, b_ptr, out_ptr, K, BLOCK: tl.constexpr):
    # A BLOCK x BLOCK accumulator held across a loop: BLOCK**2 / 32 floats per thread of one warp.
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k in range(K):
        acc += tl.load(a_ptr + offs * K + k)[:, None] * tl.load(b_ptr + offs * K + k)[None, :]
    tl.store(out_ptr + offs[:, None] * BLOCK + offs[None, :], acc)


triton.runtime.driver.set_active(compile_check.StandInDriver(90, lambda exc: None))
resources = {{}}
for block in (16, 128):
    a, out = torch.ones(block, 8), torch.empty(block, block)
    kernel = _outer_products[(1,)](a, a, out, 8, BLOCK=block, num_warps=1)
    resources[block] = compile_check._resources(kernel, 90)
print(json.dumps(resources))
'''


@pytest.mark.skipif(not _has_ptxas(), reason="needs ptxas (bundled with Triton's Linux wheels)")
def test_resources_report_spilled_registers(tmp_path):
    """The report's spill columns see spills: ptxas puts spilled registers in the stack frame, which
    cuobjdump lists as STACK (its LOCAL stays 0), so a report that looked at LOCAL alone read every
    kernel as spill-free and the no-spill checks above could not fail."""
    script = tmp_path / "spills.py"
    script.write_text(_SPILL_SCRIPT.format(benchmarks=str(ROOT / "benchmarks")))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resources = json.loads(proc.stdout.splitlines()[-1])
    registers, stores, loads = resources["16"]
    assert registers > 0 and (stores, loads) == (0, 0)  # 8 floats per thread fit
    registers, stores, loads = resources["128"]
    assert 0 < registers <= 255 and stores > 0 and loads > 0  # 512 floats per thread cannot
