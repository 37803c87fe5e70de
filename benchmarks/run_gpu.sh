#!/usr/bin/env bash
# Everything recon-fast checks on a CUDA machine, in ONE call of the device tool (run, timeout_s
# 600), within a time budget: the steps run in order of importance, each under `timeout` for the
# smaller of its own budget and what is left of BUDGET (default 560 s), so a slow step costs its
# budget, never the later steps' logs; a step that no longer fits is named and skipped. Every log
# goes to $LOGS (the device tool's $OUT), and $LOGS/steps.tsv gets one line per step (name, exit
# status, seconds): what the note reports. Before the call, on the CPU machine:
#   bash benchmarks/gpu_wheels.sh        # the wheels the GPU machine lacks, into .whl (gitignored)
# then the device tool's run with
#   command: set -o pipefail; LOGS=$OUT bash benchmarks/run_gpu.sh 2>&1 | tee $OUT/run_gpu.txt
#   carry:   [".whl"]
# Steps (no argument: all, in this order):
#   build          the extension with CUDA kernels for this chip only (sm_90), against its torch
#   tests          every CUDA case (-k cuda: token_stats, grouped op, direct launchers, tracer and
#                  its no-sync checks, compiled + reduce-overhead, attention kernels fma (default) /
#                  score / mma, flex, dispatch split, activation cache) and the argument errors
#                  (each in a child process: none may crash, issue 18's SIGSEGV)
#   bench-tracer   issue 17: hooks/untraced at the SmolLM2 and 1B shapes, eager; nnsight beside it
#   bench-nnsight  issue 17: recon-fast beside nnsight 0.8.1 and plain hooks, 1B T=4096, SmolLM2 shape T=512
#   bench-attention issue 18: sdpa vs the score / fma / mma kernels vs flex, 1B shape bf16
#   bench-ops      token_stats vs x.sum (bandwidth)
#   bench-compiled issue 17: compiled traced/untraced (reduce-overhead is in tests)
#   bench-dataset  dataset tracing on the GPU (nccl where torchrun is available)
#   bench-activation-cache  issue 19: activation caching vs the plain forward
#   diagnose       benchmarks/gpu_diagnostics: the crash kit (probe, bindings, gdb) if tests crashed
#   ncu            an ncu look at the token_stats kernel
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=${LOGS:-gpu-logs}
mkdir -p "$LOGS"
BUDGET=${BUDGET:-560}
STARTED=$SECONDS
steps=${*:-build tests bench-tracer bench-nnsight bench-attention bench-ops bench-compiled bench-dataset bench-activation-cache diagnose ncu}
source benchmarks/gpu_steps.sh  # want, step and the steps' functions
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

step build 240 do_build
if want build && ! python3 -c "import sys; from recon_fast.kernels import ops; sys.exit(ops.backend('cuda') != 'cuda')" 2>/dev/null; then
  echo "run_gpu.sh: the build gave no CUDA kernels ($LOGS/build.log); stopping"; exit 1
fi
step tests 150 do_tests
step bench-tracer 90 do_bench_tracer
step bench-nnsight 75 do_bench_nnsight
step bench-attention 150 do_bench_attention
step bench-ops 40 do_bench_ops
step bench-compiled 60 do_bench_compiled
step bench-dataset 45 do_bench_dataset
step bench-activation-cache 45 do_bench_activation_cache
step diagnose 60 do_diagnose
step ncu 40 do_ncu
echo "run_gpu.sh: done in $((SECONDS - STARTED)) s of $BUDGET; per step: $LOGS/steps.tsv"
