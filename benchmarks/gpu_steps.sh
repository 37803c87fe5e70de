# The steps of benchmarks/run_gpu.sh and the budgeted runner, sourced by it (and by
# tests/test_run_gpu_rehearsal.py, which checks the runner's budget logic on the CPU). Expects
# LOGS, BUDGET, STARTED (a $SECONDS value) and steps (the names wanted) to be set.
want() { [[ " $steps " == *" $1 "* ]]; }

# step NAME SECONDS COMMAND...: COMMAND under `timeout` for min(SECONDS, what is left), its exit
# status and seconds in steps.tsv; skipped with one line when fewer than 20 s are left.
step() {
  local name=$1 budget=$2; shift 2
  want "$name" || return 0
  local left=$((BUDGET - (SECONDS - STARTED)))
  if (( left < 20 )); then echo "== $name: skipped ($left s of the budget left)"; printf '%s\tskipped\t0\n' "$name" >>"$LOGS/steps.tsv"; return 0; fi
  (( budget > left - 5 )) && budget=$((left - 5))
  echo "== $name (up to $budget s)"
  local t0=$SECONDS
  STEP_BUDGET=$budget timeout --kill-after=5 "$budget" bash -o pipefail -c "$*"
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$LOGS/steps.tsv"
  echo "== $name: exit $rc in $((SECONDS - t0)) s"
  return 0
}
# pytest-xdist and pytest-timeout only where installed (gpu_wheels.sh carries them).
XDIST=""; python3 -c "import xdist" 2>/dev/null && XDIST="-n ${XDIST_WORKERS:-8}"
BENCH="python3 -m pytest -q -p no:cacheprovider --benchmark-only --benchmark-columns=median,iqr,rounds --benchmark-sort=name"

do_build() {
  # sm_90 only: the machine's own chip; MAX_JOBS: its cores.
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} RECON_FAST_CUDA=1 \
    python3 setup.py -q build_ext --inplace >"$LOGS/build.log" 2>&1 || { tail -40 "$LOGS/build.log"; return 1; }
  python3 -c "from recon_fast.kernels import ops; b = ops.backend('cuda'); print('backend(cuda) =', b); assert b == 'cuda'"
}
do_tests() {
  python3 -m pytest tests -q -p no:cacheprovider -k cuda -m "not slow" $XDIST 2>&1 | tee "$LOGS/tests.log" | tail -15
  python3 -m pytest -q -p no:cacheprovider tests/test_argument_errors.py 2>&1 | tee "$LOGS/argument_errors.log" | tail -3
  # attention_stats' CUDA cases again with the other kernels for the linear case (the pass above ran
  # the default, fma): RECON_FAST_ATTENTION_KERNEL is read once per process.
  for kernel in score mma; do
    RECON_FAST_ATTENTION_KERNEL=$kernel python3 -m pytest tests/test_attention_stats.py -q -p no:cacheprovider \
      -k cuda 2>&1 | tee "$LOGS/tests_attention_$kernel.log" | tail -3 | sed "s/^/[$kernel kernel] /"
  done
}
do_bench_tracer() {
  $BENCH benchmarks/bench_tracer_gpu.py 2>&1 | tee "$LOGS/bench_tracer_gpu.log" | grep -E '^\[|^  |passed|failed|Error' | tail -60
}
do_bench_nnsight() {
  python3 -c "import nnsight; print('nnsight', nnsight.__version__)" || { echo "no nnsight: run benchmarks/gpu_wheels.sh and carry .whl"; return 1; }
  $BENCH benchmarks/bench_nnsight.py -k cuda 2>&1 | tee "$LOGS/bench_nnsight.log" | grep -E '^\[|^  |passed|failed|skipped|Error' | tail -30
}
do_bench_attention() {
  # Issue 18's two routes side by side, each row in its own process (the kernel switch is read once
  # per process), each row appended to bench_attention_rows.jsonl as it comes.
  RECON_BENCH_ROWS="$LOGS/bench_attention_rows.jsonl" $BENCH benchmarks/bench_attention_stats.py -k cuda 2>&1 \
    | tee "$LOGS/bench_attention.log" | grep -E '^\[|^  |passed|failed|Error' | tail -60
}
do_bench_ops() {
  $BENCH benchmarks/bench_ops.py -k cuda 2>&1 | tee "$LOGS/bench_ops.log" | sed -n '/ratios within each group/,$p'
}
do_bench_compiled() {
  $BENCH benchmarks/bench_compiled.py 2>&1 | tee "$LOGS/bench_compiled.log" | grep -E '^\[|^  |passed|failed|Error' | tail -30
}
do_bench_dataset() {
  $BENCH benchmarks/bench_dataset.py -k gpu 2>&1 | tee "$LOGS/bench_dataset.log" | grep -E '^\[|^  |passed|failed|skipped|Error' | tail -20
}
do_bench_activation_cache() {
  $BENCH benchmarks/bench_activation_cache.py -k gpu 2>&1 | tee "$LOGS/bench_activation_cache.log" | tail -20
}
do_diagnose() {
  PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} python3 benchmarks/gpu_diagnostics/diagnose_check_crash.py \
    --probe --bindings --gdb >"$LOGS/diagnose.log" 2>&1; head -60 "$LOGS/diagnose.log"
}
do_ncu() {
  command -v ncu >/dev/null || { echo "no ncu on PATH"; return 0; }
  ncu --clock-control none -k regex:'token_stats|reduce_kernel' -c 2 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    python3 - >"$LOGS/ncu.log" 2>&1 <<'EOF'
import torch
from recon_fast.kernels.ops import token_stats
x = torch.randn(32768, 4096, device="cuda").bfloat16()
out = torch.empty(32768, 5, device="cuda")
x.sum(-1)
token_stats(x, out=out)
torch.cuda.synchronize()
EOF
  grep -E "token_stats|reduce_kernel|Memory Throughput|DRAM Throughput|Duration|Compute \(SM\)|Achieved Occupancy|Registers Per|Theoretical Occupancy|Block Size|Grid Size" "$LOGS/ncu.log" | head -40
}
# `timeout` runs a command, not a function: each step is a child bash that inherits these.
export -f do_build do_tests do_bench_tracer do_bench_nnsight do_bench_attention do_bench_ops do_bench_compiled do_bench_dataset \
  do_bench_activation_cache do_diagnose do_ncu
export LOGS BENCH XDIST

