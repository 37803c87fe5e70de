#!/usr/bin/env bash
# Everything recon-fast checks on a CUDA machine, in one go: build the extension with its CUDA
# kernels against the machine's torch, run the tests (CUDA cases included), the GPU benchmarks and
# an ncu look at the token_stats kernel. Logs go to $LOGS (default ./gpu-logs).
#   bash benchmarks/run_gpu.sh [build] [tests] [bench-ops] [bench-tracer] [bench-attention] [bench-dataset] [ncu] [diagnose]
# With no argument it does all of them but diagnose (the argument-error SIGSEGV kit,
# benchmarks/gpu_diagnostics/README.md). Wheels of packages the machine lacks (orjson) may wait in
# ./.whl; they are installed into a private target first. bench-dataset needs pyarrow there:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl orjson pyarrow
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=${LOGS:-gpu-logs}
mkdir -p "$LOGS"
steps=${*:-build tests bench-ops bench-tracer bench-attention bench-dataset ncu}
want() { [[ " $steps " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/recon-site .whl/*.whl && export PYTHONPATH=/tmp/recon-site${PYTHONPATH:+:$PYTHONPATH}
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
fi
if want bench-ops; then
  $BENCH benchmarks/bench_ops.py -k cuda 2>&1 | tee "$LOGS/bench_ops.log" | sed -n '/ratios within each group/,$p'
fi
if want bench-tracer; then
  $BENCH benchmarks/bench_tracer_gpu.py 2>&1 | tee "$LOGS/bench_tracer_gpu.log" | grep -E '^\[|^  |passed|failed|Error' | tail -60
fi
if want bench-attention && [ -f benchmarks/bench_attention_stats.py ]; then
  $BENCH benchmarks/bench_attention_stats.py -k cuda 2>&1 | tee "$LOGS/bench_attention.log" | sed -n '/ratios within each group/,$p'
fi
if want diagnose; then
  PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} timeout 480 python3 benchmarks/gpu_diagnostics/diagnose_check_crash.py \
    --probe --bindings --gdb >"$LOGS/diagnose.log" 2>&1; head -60 "$LOGS/diagnose.log"
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
