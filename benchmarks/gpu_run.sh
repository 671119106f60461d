#!/usr/bin/env bash
# One-shot run on a GPU machine: install vqfast (offline), then the GPU tests, the benchmark and the
# training runs, each within its own time budget, the whole within GPU_RUN_SECONDS (default 570, so it
# fits a 10-minute command limit).
#
#   bash benchmarks/gpu_run.sh [all]  the GPU-facing tests (GPU_TEST_SECONDS, default 150; the opt-in TMA
#                                     search's, marked tma, after them in a process of their own:
#                                     GPU_TMA_TEST_SECONDS, default 40; logs pytest_gpu.log and
#                                     pytest_gpu_tma.log), the benchmark
#                                     without its nearest-code sweeps (budget BENCH_SECONDS, default 300,
#                                     less when fewer than TRAIN_RESERVE_SECONDS=120 would be left after
#                                     its time limit while $GPU_DATA holds the training data; BENCH_PARTS),
#                                     then training runs in what is left when it does (see train)
#   bash benchmarks/gpu_run.sh tests  the whole test suite (compiled kernels on the GPU; the tma-marked
#                                     tests in a second process, with the last minute)
#   bash benchmarks/gpu_run.sh bench  the full benchmark
#   bash benchmarks/gpu_run.sh quick  `vqfast bench --quick`
#   bash benchmarks/gpu_run.sh probe  benchmarks/gpu_probe.py: each 16-bit search candidate timed on its
#                                     own (the pipelined one of tuning note 29 against the plain ones),
#                                     the tf32 search's stages, the layer step under torch.profiler, the
#                                     eager cost of a small search (about two minutes; in `all` mode
#                                     too when GPU_PROBE=1, in the time the benchmark left over, never
#                                     in the training's reserve)
#   bash benchmarks/gpu_run.sh tma    the opt-in TMA search (VQFAST_TMA_SEARCH=1, tuning note 26): its GPU
#                                     tests (every candidate alone; GPU_TEST_SECONDS, default 200), then
#                                     the benchmark's headline, which times it beside the default search
#   bash benchmarks/gpu_run.sh train  the article's models trained on cifar10_train_10k.npz and evaluated
#                                     on cifar10_test_1k.npz from $GPU_DATA (default ./gpu_data), most
#                                     wanted first: VQ-VAE with vqfast's layer and with the article's VQ
#                                     step at batch 64, the same at batch 256, AE and VAE (batch 64), then
#                                     vqfast's layer with the article's settings at batch 64 and 256,
#                                     then AE and VAE at batch 256;
#                                     TRAIN_SKIP="name ..." leaves out runs an earlier command finished
#
# Extra arguments after the mode go to `vqfast bench` (e.g. `bash benchmarks/gpu_run.sh bench --only headline`).
# Everything is written under $GPU_WORK (default ./gpu-out/run-<start time>: a machine keeps ignored
# folders between commands, and a second run must not mix its files with the first's, nor find its
# training runs' folders taken) and packed, after every stage, into
# $OUT/gpu-run.tar.gz (default ./gpu-out): one file, and a run stopped part-way keeps the stages it
# finished. $GPU_WORK/benchmarks/results/<gpu-name>/ is the folder to copy into benchmarks/results/.
set -uo pipefail

MODE="${1:-all}"
[ $# -gt 0 ] && shift
case "$MODE" in
  all|tests|bench|quick|probe|train|tma) ;;
  *) echo "usage: $0 [all|tests|bench|quick|probe|train|tma] [vqfast bench options]" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
WORK="${GPU_WORK:-$PWD/gpu-out/run-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT" "$WORK"
# matplotlib's font cache, where it can be written and is kept between the processes of this run.
export MPLCONFIGDIR="${MPLCONFIGDIR:-${TMPDIR:-/tmp}/vqfast-mpl}"
# Compiled kernels are reused by later stages and commands on the same machine.
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$PWD/.triton-cache}"
# Autotuning results on disk too, so each training process does not tune the same sizes again. Not for
# the tests, whose xdist workers share the GPU (tiles timed under that contention must not be kept), nor
# for the benchmark, which tunes every kernel afresh, alone on the GPU, whatever the cache holds (each
# stage sets TRITON_CACHE_AUTOTUNING=0 for its command; compiled kernels still come from the cache).
export TRITON_CACHE_AUTOTUNING=1
export PYTHONUNBUFFERED=1
START=$(date +%s)
TOTAL="${GPU_RUN_SECONDS:-570}"
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( TOTAL - $(elapsed) )); }
# Seconds for the next step: at most $1, and at most what is left minus a margin of $2.
up_to() { local rest=$(( $(left) - $2 )); echo $(( rest < $1 ? rest : $1 )); }
# The wall time a bench of budget $1 may take: its own hard limit (budget + max(10 s, 10 %), counted from
# after its start-up) plus start-up before it and the plots after it.
bench_limit() { local extra=$(( $1 / 10 )); echo $(( $1 + (extra > 10 ? extra : 10) + 45 )); }
# The largest bench budget, at most $1, whose wall time fits in what is left minus a margin of $2.
bench_budget() {
  local room=$(( $(left) - $2 )) budget=$1
  while [ "$budget" -gt 0 ] && [ "$(bench_limit "$budget")" -gt "$room" ]; do budget=$(( budget - 5 )); done
  echo "$budget"
}
TRAIN_NPZ="${GPU_DATA:-$PWD/gpu_data}/cifar10_train_10k.npz"
TEST_NPZ="${GPU_DATA:-$PWD/gpu_data}/cifar10_test_1k.npz"
have_training_data() { [ -f "$TRAIN_NPZ" ] && [ -f "$TEST_NPZ" ]; }
pack() {
  # Checkpoints are large and say nothing the summaries, metrics and pictures do not.
  tar czf "$OUT/gpu-run.tar.gz.part" --exclude='checkpoint*.pt' --exclude='.checkpoint*' -C "$WORK" . \
    && mv "$OUT/gpu-run.tar.gz.part" "$OUT/gpu-run.tar.gz"
}
STATUS=0

{ timeout 20 nvidia-smi || echo "nvidia-smi not available or stuck"; } > "$WORK/nvidia-smi.txt" 2>&1
python3 - > "$WORK/versions.txt" 2>&1 <<'EOF'
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
cat "$WORK/versions.txt"

# Optional packages for an offline machine (vector-quantize-pytorch and what it needs, as wheels; see
# benchmarks/README.md): installed beside the system's, first on the path.
WHEELS="${GPU_WHEELS:-$PWD/.whl}"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  echo "== extra wheels from $WHEELS"
  SITE="${TMPDIR:-/tmp}/vqfast-gpu-site"
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check --upgrade --target "$SITE" \
      "$WHEELS"/*.whl > "$WORK/wheels.log" 2>&1; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    python3 -c "import vector_quantize_pytorch as v; print('vector-quantize-pytorch', v.__file__)" 2>&1 | tail -1
  else
    tail -5 "$WORK/wheels.log"
  fi
fi

echo "== install"
if ! python3 -m pip install --no-deps --no-build-isolation --disable-pip-version-check -e . > "$WORK/install.log" 2>&1; then
  tail -20 "$WORK/install.log"
  echo "install failed; see install.log" >&2
  pack
  exit 1
fi
pack

run_tests() {  # seconds, log name, then pytest arguments
  local limit=$1 log="$WORK/$2"; shift 2
  if [ "$limit" -lt 20 ]; then
    echo "only $(left) s left; tests for $log skipped" | tee "$log"
    STATUS=1
    return
  fi
  echo "== tests on the GPU (at most $limit s): $log"
  # With CUDA present the kernel, op and layer tests run the compiled kernels on the GPU (not the
  # interpreter), and the tests marked gpu run too.
  # -v: each result is in the log as it happens, so a run stopped at its limit still says what failed.
  # With pytest-xdist, several workers compile the kernels side by side (compiling, not the GPU, is
  # what takes the time); GPU_TEST_WORKERS=0 runs them in one process.
  local workers=()
  if [ "${GPU_TEST_WORKERS:-4}" -gt 0 ] && python3 -c "import xdist" 2>/dev/null; then
    workers=(-n "${GPU_TEST_WORKERS:-4}")
  fi
  TRITON_CACHE_AUTOTUNING=0 timeout -k 15 "$limit" python3 -m pytest -v --tb=short -p no:cacheprovider --durations=25 ${workers[@]+"${workers[@]}"} \
    "$@" > "$log" 2>&1
  local rc=$?
  tail -15 "$log"; echo  # (a log cut mid-line has no newline of its own)
  echo "-- failed so far:"; grep -E " (FAILED|ERROR)" "$log" | head -30
  echo "pytest exit code: $rc (124 = stopped after $limit s)" | tee -a "$log"
  [ "$rc" -ne 0 ] && STATUS=1
  pack
}

run_bench() {  # budget in seconds, then vqfast bench arguments
  local budget=$1; shift
  echo "== benchmark (budget $budget s)"
  if [ "$budget" -lt 30 ]; then
    echo "only $(left) s left; benchmark skipped" | tee "$WORK/bench.log"
    STATUS=1
    return
  fi
  # The bench stops itself at its hard limit and writes its tables and plots; this one is for a bench
  # that cannot (on SIGTERM it writes what it measured; -k kills it if it cannot do that either).
  local limit
  limit=$(up_to "$(bench_limit "$budget")" 5)
  (cd "$WORK" && TRITON_CACHE_AUTOTUNING=0 timeout -k 15 "$limit" python3 -m vqfast bench --budget "$budget" "$@") 2>&1 \
    | tee "$WORK/bench.log"
  local rc=${PIPESTATUS[0]}
  echo "vqfast bench exit code: $rc (1 = a failure, 3 = cut short by its hard time limit, 124 = stopped after $limit s)" \
    | tee -a "$WORK/bench.log"
  [ "$rc" -ne 0 ] && STATUS=1
  pack
}

run_probe() {  # seconds
  if [ "$1" -lt 30 ]; then
    echo "only $(left) s left; probe skipped" | tee "$WORK/probe-skipped.txt"
    return
  fi
  echo "== probe (at most $1 s)"
  mkdir -p "$WORK/probe"
  OUT="$WORK/probe" timeout -k 15 "$1" python3 benchmarks/gpu_probe.py > "$WORK/probe/probe.log" 2>&1
  local rc=$?
  tail -25 "$WORK/probe/probe.log"
  echo "gpu_probe exit code: $rc" | tee -a "$WORK/probe/probe.log"
  [ "$rc" -ne 0 ] && STATUS=1
  pack
}

run_training() {
  local train_npz="$TRAIN_NPZ" test_npz="$TEST_NPZ"
  if ! have_training_data; then
    echo "no training runs: missing $train_npz or $test_npz" | tee "$WORK/training-skipped.txt"
    [ "$MODE" = train ] && STATUS=2
    return
  fi
  echo "== training runs"
  local runs="$WORK/training"
  mkdir -p "$runs"
  local common=(--data "$train_npz" --eval-data "$test_npz" --eval-limit 0 --seed 0 --no-progress --no-download)
  local vq_epochs="${VQ_EPOCHS:-10}"
  train_run() {  # name, then vqfast train arguments
    local name=$1; shift
    local remaining
    case " ${TRAIN_SKIP:-} " in *" $name "*) echo "skipped $name (TRAIN_SKIP)" | tee -a "$runs/skipped.txt"; return ;; esac
    remaining=$(left)
    if [ "$remaining" -lt 60 ]; then echo "skipped $name (time)" | tee -a "$runs/skipped.txt"; return; fi
    # SIGINT, as Ctrl-C: the run finishes its batch, saves a checkpoint and keeps the finished epochs.
    # --foreground: to the run alone (without it timeout signals the process group too, and a second
    # SIGINT aborts the run at once).
    timeout --foreground -s INT -k 30 $(( remaining - 35 )) python3 -m vqfast train "$@" "${common[@]}" --out "$runs/$name" \
      > "$runs/$name.log" 2>&1
    echo "$name: exit $? after $(elapsed) s"; tail -3 "$runs/$name.log"
  }
  for batch in 64 256; do
    train_run "vqvae-vqfast-b$batch" vqvae --epochs "$vq_epochs" --batch-size "$batch"
    train_run "vqvae-article-b$batch" vqvae --epochs "$vq_epochs" --batch-size "$batch" \
      --vq-impl article --vq-preset article
  done
  train_run "ae-b64" ae --epochs "${AE_EPOCHS:-20}"
  train_run "vae-b64" vae --epochs "${VAE_EPOCHS:-20}"
  for batch in 64 256; do
    train_run "vqvae-vqfast-article-settings-b$batch" vqvae --epochs "$vq_epochs" --batch-size "$batch" \
      --vq-preset article
  done
  train_run "ae-b256" ae --epochs "${AE_EPOCHS:-20}" --batch-size 256
  train_run "vae-b256" vae --epochs "${VAE_EPOCHS:-20}" --batch-size 256
  # One table (time per epoch, losses, test PSNR, codebook usage) and one loss-curve plot for all runs.
  python3 benchmarks/training_table.py "$runs" > "$runs/training_table.log" 2>&1 || cat "$runs/training_table.log"
  pack
}

case "$MODE" in
  all)
    # The opt-in TMA search's tests (marked tma) in a process of their own, after the others: a kernel
    # that faults ends its process's CUDA context, and every later test of that process fails with it.
    run_tests "${GPU_TEST_SECONDS:-150}" pytest_gpu.log -m "not tma" tests/test_gpu.py tests/test_deterministic.py tests/test_kernels.py tests/test_functional.py \
      tests/test_layer_mask.py tests/test_layer_rotation.py tests/test_layer.py tests/test_layer_soft_entropy.py \
      tests/test_layer_compile.py tests/test_upkeep.py tests/test_layer_reentry.py tests/test_custom_ops.py \
      tests/test_product.py tests/test_residual.py tests/test_projected.py tests/test_layer_heads.py \
      tests/test_layer_encode.py tests/test_func_transforms.py tests/test_launch.py
    run_tests "${GPU_TMA_TEST_SECONDS:-40}" pytest_gpu_tma.log -m tma tests/test_nearest_tma.py tests/test_kernels.py
    # The nearest-code sweeps (each new K and D autotunes afresh) are left to the bench mode.
    # At most BENCH_SECONDS, and, when there is training data, a budget whose time limit leaves ~2
    # minutes of training (one VQ-VAE run); without it the bench may use the time.
    reserve=10
    have_training_data && reserve="${TRAIN_RESERVE_SECONDS:-120}"
    run_bench "$(bench_budget "${BENCH_SECONDS:-300}" "$reserve")" --only "${BENCH_PARTS:-headline,gather,usage,layer,train}" "$@"
    # The probe only in time the bench left over: never out of the training's reserve.
    if [ "${GPU_PROBE:-0}" = 1 ]; then run_probe "$(up_to 180 "$reserve")"; fi
    run_training
    ;;
  tests)  # the TMA search's tests in a process of their own (see all)
    run_tests $(( $(left) - 60 )) pytest_gpu.log -m "not tma"
    run_tests $(( $(left) - 10 )) pytest_gpu_tma.log -m tma tests/test_nearest_tma.py tests/test_kernels.py ;;
  tma)
    run_tests "$(up_to "${GPU_TEST_SECONDS:-200}" 150)" pytest_gpu_tma.log -m tma tests/test_nearest_tma.py tests/test_kernels.py
    run_bench "$(bench_budget "${BENCH_SECONDS:-300}" 5)" --only headline "$@"
    ;;
  bench) run_bench "$(bench_budget 500 5)" "$@" ;;
  quick) run_bench "$(bench_budget 85 5)" --quick "$@" ;;
  probe) run_probe "$(up_to 300 10)" ;;
  train) run_training ;;
esac

echo "== done in $(elapsed) s; results in $WORK, packed into $OUT/gpu-run.tar.gz"
exit $STATUS
