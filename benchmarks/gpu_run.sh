#!/usr/bin/env bash
# One-shot run on a GPU machine: install vqfast (offline), run the GPU tests, run the benchmark.
# Everything it produces goes under $OUT (default: ./gpu-out).
#
#   bash benchmarks/gpu_run.sh            install + test suite + benchmark, within ~9.5 minutes in all
#   bash benchmarks/gpu_run.sh tests      install + the test suite only (compiled kernels on the GPU)
#   bash benchmarks/gpu_run.sh bench      install + the full benchmark (its own ~8.5-minute budget)
#   bash benchmarks/gpu_run.sh quick      install + `vqfast bench --quick`
#   bash benchmarks/gpu_run.sh train      install + the article's models trained on CIFAR-10 .npz files in
#                                         $GPU_DATA (cifar10_train_10k.npz, cifar10_test_1k.npz): VQ-VAE with
#                                         vqfast (its defaults and the article's settings) and with the
#                                         article's VQ step at batch 64 and 256, then AE and VAE
#
# Extra arguments after the mode go to `vqfast bench` (e.g. `bash benchmarks/gpu_run.sh bench --only headline`).
# GPU_RUN_SECONDS (default 570) bounds the whole script, so that it fits a 10-minute command limit:
# the benchmark's --budget is what is left after installing and testing.
set -uo pipefail

MODE="${1:-all}"
[ $# -gt 0 ] && shift
case "$MODE" in
  all|tests|bench|quick|train) ;;
  *) echo "usage: $0 [all|tests|bench|quick|train] [vqfast bench options]" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
# Compiled kernels and autotuning results are reused by later commands on the same machine.
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$PWD/.triton-cache}"
START=$(date +%s)
TOTAL="${GPU_RUN_SECONDS:-570}"
elapsed() { echo $(( $(date +%s) - START )); }

{ nvidia-smi || echo "nvidia-smi not available"; } > "$OUT/nvidia-smi.txt" 2>&1
python3 - > "$OUT/versions.txt" 2>&1 <<'EOF'
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name())
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton missing:", exc)
EOF
cat "$OUT/versions.txt"

echo "== install"
if ! python3 -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1; then
  tail -20 "$OUT/install.log"
  echo "install failed; see $OUT/install.log" >&2
  exit 1
fi

STATUS=0
if [ "$MODE" = all ] || [ "$MODE" = tests ]; then
  # The whole suite: with CUDA present the kernel, op and layer tests run the compiled kernels on the GPU
  # (not the interpreter), and the tests marked gpu run too.
  echo "== test suite on the GPU"
  TEST_LIMIT="${GPU_TEST_SECONDS:-480}"
  timeout "$TEST_LIMIT" python3 -m pytest -q -p no:cacheprovider --durations=25 > "$OUT/pytest_gpu.log" 2>&1
  RC=$?
  tail -40 "$OUT/pytest_gpu.log"
  echo "pytest exit code: $RC (124 = stopped after ${TEST_LIMIT} s)" | tee -a "$OUT/pytest_gpu.log"
  if [ "$RC" -ne 0 ]; then STATUS=1; fi
fi

if [ "$MODE" = train ]; then
  echo "== training runs"
  DATA="${GPU_DATA:-$PWD/gpu_data}"
  TRAIN_NPZ="$DATA/cifar10_train_10k.npz"
  TEST_NPZ="$DATA/cifar10_test_1k.npz"
  if [ ! -f "$TRAIN_NPZ" ] || [ ! -f "$TEST_NPZ" ]; then
    echo "missing $TRAIN_NPZ or $TEST_NPZ" >&2
    exit 2
  fi
  RUNS="$OUT/training"
  mkdir -p "$RUNS"
  COMMON=(--data "$TRAIN_NPZ" --eval-data "$TEST_NPZ" --eval-limit 0 --seed 0 --no-progress --no-download)
  train_run() {  # name, then vqfast train arguments
    local name=$1; shift
    LEFT=$(( TOTAL - $(elapsed) ))
    if [ "$LEFT" -lt 30 ]; then echo "skipped $name (time)" | tee -a "$RUNS/skipped.txt"; return; fi
    timeout $(( LEFT - 10 )) python3 -m vqfast train "$@" "${COMMON[@]}" --out "$RUNS/$name" > "$RUNS/$name.log" 2>&1
    echo "$name: exit $? after $(elapsed) s"; tail -3 "$RUNS/$name.log"
  }
  for BATCH in 64 256; do
    train_run "vqvae-vqfast-b$BATCH" vqvae --epochs "${VQ_EPOCHS:-10}" --batch-size "$BATCH"
    train_run "vqvae-article-b$BATCH" vqvae --epochs "${VQ_EPOCHS:-10}" --batch-size "$BATCH" \
      --vq-impl article --vq-preset article
    train_run "vqvae-vqfast-article-settings-b$BATCH" vqvae --epochs "${VQ_EPOCHS:-10}" --batch-size "$BATCH" \
      --vq-preset article
  done
  train_run "ae-b64" ae --epochs "${AE_EPOCHS:-20}"
  train_run "vae-b64" vae --epochs "${VAE_EPOCHS:-20}"
  # Drop the checkpoints: the summaries, logs, metrics and pictures are what is kept.
  find "$RUNS" -name 'checkpoint*.pt' -delete
  # One table (time per epoch, losses, test PSNR, codebook usage) and one loss-curve plot for all runs.
  python3 benchmarks/training_table.py "$RUNS" > "$RUNS/training_table.log" 2>&1 || cat "$RUNS/training_table.log"
fi

if [ "$MODE" != tests ] && [ "$MODE" != train ]; then
  echo "== benchmark"
  SLUG=$(python3 -c "from vqfast.bench import gpu_slug; print(gpu_slug())")
  RESULTS="$OUT/benchmarks/results/$SLUG"
  LEFT=$(( TOTAL - $(elapsed) ))
  if [ "$MODE" = quick ]; then
    ARGS=(--quick)
    BUDGET=$(( LEFT - 40 < 85 ? LEFT - 40 : 85 ))
  else
    ARGS=()
    # Start-up (imports, CUDA context) and the point running when the budget ends need a margin.
    BUDGET=$(( LEFT - 60 < 500 ? LEFT - 60 : 500 ))
  fi
  if [ "$BUDGET" -lt 30 ]; then
    echo "only $LEFT s left; skipping the benchmark (run: bash benchmarks/gpu_run.sh bench)" | tee "$OUT/bench.log"
    STATUS=1
  else
    timeout $(( LEFT - 5 )) python3 -m vqfast bench --out "$RESULTS" --budget "$BUDGET" ${ARGS[@]+"${ARGS[@]}"} "$@" \
      2>&1 | tee "$OUT/bench.log"
    RC=${PIPESTATUS[0]}
    echo "vqfast bench exit code: $RC" | tee -a "$OUT/bench.log"
    if [ "$RC" -ne 0 ]; then STATUS=1; fi
  fi
fi

echo "== done in $(elapsed) s; outputs under $OUT"
exit $STATUS
