"""attention_stats (the op alone) against torch's sdpa forward on the same q, k, v (the baseline:
the attention the model runs anyway), the plain-PyTorch blocked reference (the fallback) and the
two routes of issue 18: (a) the CUDA linear-case kernel, (b) FlexAttention
(kernels/attention_stats_flex.py).

CPU (in process): SmolLM2-135M's attention shape (9 heads, 3 kv heads, head_dim 64, batch 1),
float32, causal, T = 2048 and 8192; the target is the op <= 0.55x sdpa. Route (b) on the CPU
computes lse and the row max in a plain-PyTorch stand-in (CPU flex returns neither), so its
"flex pass" row (pass 1 alone: the linear statistics) is the fairer view of FlexAttention there.

CUDA (skipped without a GPU): the 1B-class Llama shape (32 heads, 8 kv heads, head_dim 64), bf16,
causal, T = 4096 and 32768, and T = 131072 with peak memory. Each row runs in its own process
(`python benchmarks/bench_attention_stats.py op IMPL T`): the CUDA kernel for the linear case is
chosen by RECON_FAST_ATTENTION_KERNEL, read once per process, so score / mma / fma kernels each
need one; CUDA events, median of REPS calls (RECON_BENCH_ROWS=FILE also appends each row to FILE
as JSON lines). Target: the op <= 1.3x sdpa's forward. The whole
forward (1B shape, random weights, T = 32768): Tracer(attention="stats") on every layer against
the plain sdpa forward, per kernel (target <= 1.5x).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from recon_fast.kernels.attention_stats import attention_stats, attention_stats_ref

CPU_CASES = [
    # heads, kv_heads, head_dim, T
    (9, 3, 64, 2048),
    (9, 3, 64, 8192),
]
CUDA_SHAPE = (32, 8, 64)  # heads, kv_heads, head_dim
CUDA_LENGTHS = [int(t) for t in os.environ.get("RECON_BENCH_ATTENTION_CUDA_TOKENS", "4096,32768").split(",")]
CUDA_LONG = int(os.environ.get("RECON_BENCH_ATTENTION_CUDA_LONG", "131072"))
FORWARD_LENGTH = int(os.environ.get("RECON_BENCH_ATTENTION_FORWARD_TOKENS", "32768"))
REPS = 10
SUBPROCESS_TIMEOUT = 300


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _flex(precision):
    def run(q, k, v):
        from recon_fast.kernels.attention_stats_flex import attention_stats_flex
        return attention_stats_flex(q, k, precision=precision)
    return run


def _flex_pass_alone(q, k, v):
    """Route (b)'s pass 1 only: flex_attention with V = [K | j | 1 | sink] (padded to 80)."""
    from recon_fast.kernels import attention_stats_flex as route_b

    T, dim = k.shape[2], k.shape[3]
    block_mask = route_b._shared_block_mask(q.device, q.shape[2], T, True, None)
    values = torch.zeros(*k.shape[:3], -(-(dim + 3) // 16) * 16, device=k.device, dtype=torch.float32)
    values[..., :dim] = k
    return route_b._compiled_flex()(q.float(), k.float(), values, block_mask=block_mask,
                                    scale=dim ** -0.5, enable_gqa=True)


CPU_IMPLS = {
    "sdpa forward (causal)": _sdpa,
    "attention_stats (C++ op)": lambda q, k, v: attention_stats(q, k),
    "attention_stats_ref (blocked torch)": lambda q, k, v: attention_stats_ref(q, k),
    "route b: flex (CPU stand-ins for lse, max)": _flex("float32"),
    "route b: flex pass 1 alone": _flex_pass_alone,
}


def _inputs(heads, kv_heads, dim, T, dtype, device):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, h, T, dim, generator=g).to(dtype).to(device)
                 for h in (heads, kv_heads, kv_heads))


@pytest.mark.parametrize("impl", list(CPU_IMPLS))
@pytest.mark.parametrize("heads, kv_heads, dim, T", CPU_CASES, ids=lambda v: str(v))
def test_attention_stats_time_cpu(record, impl, heads, kv_heads, dim, T):
    if impl.startswith("attention_stats_ref") and T > 8192:
        pytest.skip("the blocked reference beyond 8k is minutes of matmuls")
    if impl.startswith("route b: flex (") and T > 2048:
        pytest.skip("route b's CPU stand-ins at 8k are ~2 minutes a row; its flex pass is timed")
    q, k, v = _inputs(heads, kv_heads, dim, T, torch.float32, "cpu")
    fn = CPU_IMPLS[impl]
    slow = T > 2048 or not impl.startswith(("sdpa", "attention_stats ("))
    record(f"attention_stats cpu H={heads} Hkv={kv_heads} D={dim} T={T} float32", impl,
           lambda: fn(q, k, v), device="cpu", baseline=impl.startswith("sdpa"), rounds=3 if slow else None)


# --- CUDA: one process per row ---------------------------------------------------------------------

CUDA_IMPLS = {
    # name: (what the child runs, RECON_FAST_ATTENTION_KERNEL)
    "sdpa forward (causal)": ("sdpa", None),
    "attention_stats, score kernel": ("op", "score"),
    "attention_stats, mma kernel (route a)": ("op", "mma"),
    "attention_stats, fma kernel": ("op", "fma"),
    "route b: flex, float32 (exact)": ("flex-float32", None),
    "route b: flex, bf16 P (inexact)": ("flex-input", None),
}


def _child(args, kernel=None):
    env = dict(os.environ)
    env.pop("RECON_FAST_ATTENTION_KERNEL", None)
    if kernel is not None:
        env["RECON_FAST_ATTENTION_KERNEL"] = kernel
    command = [sys.executable, str(Path(__file__).resolve()), *map(str, args)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=SUBPROCESS_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[2:])} (kernel={kernel}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _record_child(benchmark, record_measure, group, name, args, kernel, baseline):
    benchmark.group = group
    try:
        result = benchmark.pedantic(lambda: _child(args, kernel), rounds=1, iterations=1)
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        pytest.fail(str(err)[-2000:])
    benchmark.extra_info.update(result)
    if os.environ.get("RECON_BENCH_ROWS"):  # each row as it comes: a run cut short keeps its rows
        with open(os.environ["RECON_BENCH_ROWS"], "a") as rows:
            rows.write(json.dumps({"group": group, "name": name, **result}) + "\n")
    record_measure(group, name, result["ms"], "ms", baseline=baseline)
    if "peak_mib" in result:
        record_measure(group + " [peak memory above inputs]", name, result["peak_mib"], "MiB", baseline=baseline)
    return result


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@needs_cuda
@pytest.mark.parametrize("impl", list(CUDA_IMPLS))
@pytest.mark.parametrize("T", CUDA_LENGTHS + [CUDA_LONG])
def test_attention_stats_time_cuda(benchmark, record_measure, impl, T):
    what, kernel = CUDA_IMPLS[impl]
    if what.startswith("flex") and T == CUDA_LONG:
        pytest.skip("route b at the long context: float32 flex there is minutes; not a contender")
    if what == "flex-input" and T != max(CUDA_LENGTHS):
        pytest.skip("the inexact flex variant is a speed bound: one length")
    heads, kv_heads, dim = CUDA_SHAPE
    group = f"attention_stats cuda H={heads} Hkv={kv_heads} D={dim} T={T} bf16 causal (one process per row)"
    _record_child(benchmark, record_measure, group, impl, ["op", what, T], kernel, impl.startswith("sdpa"))


FORWARD_KERNELS = {"untraced sdpa forward": None, "stats on every layer, mma kernel": "mma",
                   "stats on every layer, fma kernel": "fma", "stats on every layer, score kernel": "score"}


@needs_cuda
@pytest.mark.parametrize("name", list(FORWARD_KERNELS))
def test_whole_forward_with_stats_cuda(benchmark, record_measure, name):
    group = f"GPU 1B shape bf16 forward, T={FORWARD_LENGTH}, Tracer(attention='stats') (one process per row)"
    kernel = FORWARD_KERNELS[name]
    _record_child(benchmark, record_measure, group, name,
                  ["forward", "plain" if kernel is None else "stats", FORWARD_LENGTH], kernel, kernel is None)


# --- the child processes ---------------------------------------------------------------------------

def _cuda_time(fn, reps=REPS):
    """Median and spread of fn's device time (CUDA events), after one warm-up call; peak memory
    allocated above what was allocated before the timed calls."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20,
            "kernel": os.environ.get("RECON_FAST_ATTENTION_KERNEL", "default"),
            "device": torch.cuda.get_device_name()}


def _child_op(what: str, T: int) -> dict:
    heads, kv_heads, dim = CUDA_SHAPE
    q, k, v = _inputs(heads, kv_heads, dim, T, torch.bfloat16, "cuda")
    fn = {"sdpa": lambda: _sdpa(q, k, v), "op": lambda: attention_stats(q, k),
          "flex-float32": lambda: _flex("float32")(q, k, v), "flex-input": lambda: _flex("input")(q, k, v)}[what]
    reps = REPS if T <= 32768 else 3
    return _cuda_time(fn, reps)


def _child_forward(mode: str, T: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_tracer_gpu import build_model

    from recon_fast import Tracer

    model = build_model("1B shape")
    ids = torch.randint(0, model.config.vocab_size, (1, T), device="cuda")
    if mode == "plain":
        def fn():
            with torch.no_grad():
                model(ids, logits_to_keep=1)
    else:
        tracer = Tracer(model, attention="stats")

        def fn():
            tracer.run(ids, logits_to_keep=1)
    return _cuda_time(fn, reps=3)


if __name__ == "__main__":
    kind, what, length = sys.argv[1], sys.argv[2], int(sys.argv[3])
    result = _child_op(what, length) if kind == "op" else _child_forward(what, length)
    print(json.dumps(result))
