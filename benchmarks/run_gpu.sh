#!/usr/bin/env bash
# The next GPU session's one call (device tool `run`, timeout_s 600; carry [".whl"], the wheels of
# orjson/pyarrow/nnsight put there beforehand with the pip download line below):
#   command: set -o pipefail; LOGS=$OUT bash benchmarks/run_gpu.sh 2>&1 | tee $OUT/run_gpu.txt
#   carry:   [".whl"]
# Open (not done by h18 this session): per-step time budgets under `timeout` for every step, the
# torchrun/nccl dataset step, benchmarks/gpu_wheels.sh. Done: bench-attention times both routes of
# issue 18 side by side (score / mma / fma kernels, flex, sdpa; one process per row, ~5 min).
# Everything recon-fast checks on a CUDA machine, in one go: build the extension with its CUDA
# kernels against the machine's torch, run the tests (CUDA cases included), the GPU benchmarks and
# an ncu look at the token_stats kernel. Logs go to $LOGS (default ./gpu-logs).
#   bash benchmarks/run_gpu.sh [build] [tests] [bench-ops] [bench-tracer] [bench-attention] [bench-dataset] [ncu] [diagnose]
# With no argument it does all of them; diagnose (benchmarks/gpu_diagnostics/README.md) confirms the
# no-streamed-numbers fix (main b81312f): every case raises, none crashes. dispatch and
# bench-activation-cache skip with one line where their file is absent. Wheels of packages the machine lacks (orjson) may wait in
# ./.whl; they are installed into a private target first. bench-dataset needs pyarrow there:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl orjson pyarrow
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=${LOGS:-gpu-logs}
mkdir -p "$LOGS"
steps=${*:-build diagnose tests dispatch bench-ops bench-tracer bench-compiled bench-attention bench-dataset bench-activation-cache ncu}
want() { [[ " $steps " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/recon-site .whl/*.whl && export PYTHONPATH=/tmp/recon-site${PYTHONPATH:+:$PYTHONPATH}
fi
# Fail fast and say why where this is not a CUDA machine. REHEARSE=1 (the CPU machine's rehearsal,
# tests/test_run_gpu_rehearsal.py) instead runs only the steps that need no GPU (diagnose and the
# argument-error test, on CPU) and names each GPU step it skips.
gpu_missing=""
command -v nvidia-smi >/dev/null || gpu_missing="no nvidia-smi on PATH"
[ -z "$gpu_missing" ] && ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null \
  && gpu_missing="python3's torch sees no CUDA device"
if [ -n "$gpu_missing" ]; then
  if [ "${REHEARSE:-0}" != 1 ]; then echo "run_gpu.sh: not a GPU machine ($gpu_missing); stopping" >&2; exit 2; fi
  echo "rehearsal: $gpu_missing; GPU steps skipped"
  if want diagnose; then
    PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} timeout 300 python3 benchmarks/gpu_diagnostics/diagnose_check_crash.py \
      >"$LOGS/diagnose.log" 2>&1 && echo "rehearsal: diagnose ok (every case raised)" || { echo "rehearsal: diagnose FAILED"; exit 1; }
    PYTHONPATH=$PWD timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_argument_errors.py >"$LOGS/argument_errors.log" 2>&1 \
      && echo "rehearsal: argument-error test ok" || { echo "rehearsal: argument-error test FAILED"; exit 1; }
  fi
  for s in $steps; do [ "$s" = diagnose ] || echo "rehearsal: $s needs a GPU: skipped"; done
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"

BENCH="python3 -m pytest -q -p no:cacheprovider --benchmark-only --benchmark-columns=median,iqr,rounds --benchmark-sort=name"

if want build; then
  # sm_90 only: the machine's own chip; MAX_JOBS: its cores.
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} RECON_FAST_CUDA=1 \
    python3 setup.py -q build_ext --inplace >"$LOGS/build.log" 2>&1 || { tail -40 "$LOGS/build.log"; exit 1; }
  python3 -c "from recon_fast.kernels import ops; b = ops.backend('cuda'); print('backend(cuda) =', b); assert b == 'cuda'" || exit 1
fi
if want tests; then
  # Not the tests that load the embedded SmolLM2 (its GGUF reader is not installed there).
  python3 -m pytest tests -q -p no:cacheprovider -m "not slow" -n ${XDIST:-8} --timeout 600 2>&1 | tee "$LOGS/tests.log" | tail -15
  # attention_stats' CUDA cases again with the other kernels for the linear case (the pass above ran
  # the default, fma): RECON_FAST_ATTENTION_KERNEL is read once per process.
  for kernel in score mma; do
    RECON_FAST_ATTENTION_KERNEL=$kernel python3 -m pytest tests/test_attention_stats.py -q -p no:cacheprovider \
      -k cuda --timeout 300 2>&1 | tee "$LOGS/tests_attention_$kernel.log" | tail -3 | sed "s/^/[$kernel kernel] /"
  done
fi
if want bench-ops; then
  $BENCH benchmarks/bench_ops.py -k cuda 2>&1 | tee "$LOGS/bench_ops.log" | sed -n '/ratios within each group/,$p'
fi
if want bench-tracer; then
  $BENCH benchmarks/bench_tracer_gpu.py 2>&1 | tee "$LOGS/bench_tracer_gpu.log" | grep -E '^\[|^  |passed|failed|Error' | tail -60
fi
if want bench-compiled; then  # issue 17: compiled models, traced/untraced (eager vs reduce-overhead in the tests step)
  timeout 240 $BENCH benchmarks/bench_compiled.py 2>&1 | tee "$LOGS/bench_compiled.log" | grep -E '^\[|^  |passed|failed|Error' | tail -30
fi
if want bench-attention && [ -f benchmarks/bench_attention_stats.py ]; then
  # Issue 18's two routes side by side: sdpa, the score / mma / fma kernels, flex; the op per layer at
  # T = 4096, 32768, 131072 (memory), and the 1B forward with stats on every layer at 32768.
  RECON_BENCH_ROWS="$LOGS/bench_attention_rows.jsonl" timeout 540 $BENCH benchmarks/bench_attention_stats.py -k cuda 2>&1 \
    | tee "$LOGS/bench_attention.log" \
    | grep -E '^\[|^  |passed|failed|Error' | tail -60
fi
if want diagnose; then
  PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} timeout 480 python3 benchmarks/gpu_diagnostics/diagnose_check_crash.py \
    --probe --bindings --gdb >"$LOGS/diagnose.log" 2>&1; head -60 "$LOGS/diagnose.log"
fi
if want dispatch; then  # helper h20's device_map split
  if [ -f tests/test_dispatch.py ]; then
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_dispatch.py -m cuda 2>&1 | tee "$LOGS/dispatch.log" | tail -5
  else echo "dispatch: skipped (tests/test_dispatch.py absent)"; fi
fi
if want bench-activation-cache; then  # helper h19's activation cache
  if [ -f benchmarks/bench_activation_cache.py ]; then
    timeout 120 $BENCH benchmarks/bench_activation_cache.py -k gpu 2>&1 | tee "$LOGS/bench_activation_cache.log" | tail -20
  else echo "bench-activation-cache: skipped (benchmarks/bench_activation_cache.py absent)"; fi
fi
if want bench-dataset; then
  $BENCH benchmarks/bench_dataset.py -k gpu 2>&1 | tee "$LOGS/bench_dataset.log" | grep -E '^\[|^  |passed|failed|skipped|Error' | tail -20
fi
if want ncu && command -v ncu >/dev/null; then
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
fi
