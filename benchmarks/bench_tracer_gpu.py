"""The Tracer on a CUDA GPU: random-weight Llama models of SmolLM2-135M's shape and of a 1B-class
shape (Llama-3.2-1B: 16 layers, d_model 2048, GQA 32/8), bfloat16, sdpa, add_hooks_all().

Untraced and traced forwards alternate (pairs), each timed with a synchronize before and after, so
drift on a shared GPU hits both alike; the overhead is the median of per-pair ratios. "hooks"
times the forward with the hooks enqueuing token_stats, "run()" adds the host copy and the cube
assembly that Tracer.run() does after the pass. Peak memory: torch.cuda's peak allocation during
the call, above what was allocated before it (weights and inputs). Skipped without a GPU.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from recon_fast import Tracer
from recon_fast.trace.presets import default_filter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SHAPES = {
    "SmolLM2-135M shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                               num_attention_heads=9, num_key_value_heads=3, vocab_size=49152),
    "1B shape": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
}
LENGTHS = [int(t) for t in os.environ.get("RECON_GPU_TOKENS", "512,4096,32768").split(",")]
PAIRS = {512: 15, 4096: 7}  # longer runs: 3 pairs


def build_model(shape: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=262144, tie_word_embeddings=True,
                         rope_theta=500000.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model


_models: dict[str, torch.nn.Module] = {}


def model_of(shape: str):
    if shape not in _models:
        _models.clear()
        torch.cuda.empty_cache()
        _models[shape] = build_model(shape)
    return _models[shape]


def traced_forward(tracer: Tracer, ids: torch.Tensor) -> None:
    """The forward with the Tracer's hooks recording, without run()'s work after the pass (the host
    copy, the layout, the cube): Tracer.run() up to the end of the pass."""
    call = tracer._prepare((ids,), {})
    tracer._traced(lambda: call(tracer.model), call, mode="forward")


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_growth(fn) -> int:
    """Bytes allocated at the peak of fn, above what was allocated when it began."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_traced_over_untraced_gpu(benchmark, record_measure, alternating, shape, length):
    model = model_of(shape)
    ids = torch.randint(0, model.config.vocab_size, (1, length), device="cuda")
    tracer = Tracer(model)
    tracer.add_hooks_all()
    group = f"GPU {shape} bf16 add_hooks_all ({len(tracer.hooks)} hooks), T={length}"

    def untraced():
        with torch.no_grad():
            model(ids)

    def hooks_only():
        traced_forward(tracer, ids)

    def full_run():
        tracer.run(ids)

    times = {"untraced": [], "hooks": [], "run()": []}
    timed_round = alternating({"untraced": untraced, "hooks": hooks_only, "run()": full_run}, timer=timed)

    def pairs():
        for name, seconds in timed_round().items():
            times[name].append(seconds)

    try:
        pairs()  # warm-up: kernels chosen, caches filled
        for values in times.values():
            values.clear()
        benchmark.group = group
        benchmark.pedantic(pairs, rounds=PAIRS.get(length, 3), iterations=1)
        memory = {"untraced": peak_growth(untraced), "run()": peak_growth(full_run)}
    finally:
        tracer.clear_hooks()
    base = times["untraced"]
    record_measure(group, "untraced forward (median ms)", statistics.median(base) * 1e3, "ms", baseline=True)
    for name in ("hooks", "run()"):
        ratios = [t / b for t, b in zip(times[name], base)]
        record_measure(group, f"{name} / untraced, median pair", statistics.median(ratios), "x")
        record_measure(group, f"{name} / untraced, range", max(ratios) - min(ratios), "x")
    record_measure(group + " [peak memory]", "untraced forward", memory["untraced"] / 2**20, "MiB", baseline=True)
    record_measure(group + " [peak memory]", "Tracer.run()", memory["run()"] / 2**20, "MiB")


@pytest.mark.parametrize("shape", list(SHAPES))
def test_no_sync_added_by_tracing(benchmark, record_measure, shape):
    """Counts CUDA synchronisations (sync debug mode 'warn') in an untraced forward and in
    Tracer.run(): tracing may add exactly one, the wait for the host copy after the pass."""
    import warnings

    model = model_of(shape)
    ids = torch.randint(0, model.config.vocab_size, (1, 512), device="cuda")
    tracer = Tracer(model)
    tracer.add_hooks_all()

    def syncs(fn) -> int:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    counts = {}

    def count_all():
        with torch.no_grad():
            counts["plain"] = syncs(lambda: model(ids))
        counts["traced"] = syncs(lambda: tracer.run(ids))
        counts["hooks"] = syncs(lambda: traced_forward(tracer, ids))

    try:
        tracer.run(ids)  # warm-up
        benchmark.group = f"GPU sync count, {shape}"
        benchmark.pedantic(count_all, rounds=1, iterations=1)
    finally:
        tracer.clear_hooks()
    plain, traced, hooks = counts["plain"], counts["traced"], counts["hooks"]
    record_measure(f"GPU sync count, {shape}", "untraced forward", plain, "syncs", baseline=True)
    record_measure(f"GPU sync count, {shape}", "traced forward (hooks)", hooks, "syncs")
    record_measure(f"GPU sync count, {shape}", "Tracer.run()", traced, "syncs")
    # The model's own count varies between calls (transformers syncs on some first uses), so
    # the hooks may not add any: a traced forward syncs no more often than the plain one did.
    assert hooks <= plain, f"the hooks added {hooks - plain} synchronisations"
    assert traced <= plain + 1, f"Tracer.run() added {traced - plain} synchronisations (one is its host copy)"


LONG_CONTEXT = int(os.environ.get("RECON_GPU_LONG_TOKENS", "131072"))


def test_long_context_1b(benchmark, record_measure):
    """The 1B shape traced at LONG_CONTEXT tokens on one GPU: every module but lm_head (whose
    [T, 128256] logits alone would be 33 GB), logits kept for the last position only."""
    model = model_of("1B shape")
    ids = torch.randint(0, model.config.vocab_size, (1, LONG_CONTEXT), device="cuda")
    tracer = Tracer(model)
    tracer.add_hooks_all(lambda name, module: name != "lm_head" and default_filter(name, module))
    group = f"GPU 1B shape bf16, T={LONG_CONTEXT}, {len(tracer.hooks)} hooks (no lm_head)"
    seconds = {}

    def untraced():
        with torch.no_grad():
            model(ids, logits_to_keep=1)

    def traced():
        tracer.run(ids, logits_to_keep=1)

    try:
        untraced()  # warm-up
        memory = {"untraced": peak_growth(untraced), "run()": peak_growth(traced)}
        benchmark.group = group
        benchmark.pedantic(lambda: seconds.update(untraced=timed(untraced), traced=timed(traced)),
                           rounds=1, iterations=1)
    finally:
        tracer.clear_hooks()
    cube = tracer.cube
    assert cube.metric("energy").shape == (len(tracer.cube.layer_names), 1, LONG_CONTEXT)
    assert torch.isfinite(torch.from_numpy(cube.metric("energy"))).all()
    record_measure(group, "untraced forward", seconds["untraced"] * 1e3, "ms", baseline=True)
    record_measure(group, "Tracer.run()", seconds["traced"] * 1e3, "ms")
    record_measure(group + " [peak memory]", "untraced forward", memory["untraced"] / 2**20, "MiB", baseline=True)
    record_measure(group + " [peak memory]", "Tracer.run()", memory["run()"] / 2**20, "MiB")
