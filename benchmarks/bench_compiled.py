"""Tracing a compiled model (issue 17, part 3): the traced compiled forward against the untraced
compiled forward of the same model, interleaved round by round (medians of per-round ratios), and
the compile time of the traced model against the untraced one's (each compiled from a fresh
dynamo state). Models: a 4-layer Llama at T=128 and the host-bound proxy of bench_hook_path
(30 layers, hidden 64, T=8), one thread. CPU here (inductor's C++ backend)."""

import statistics
import time

import pytest
import torch
import torch._inductor.config

from recon_fast import Tracer

ROUNDS = 20

SHAPES = {
    "llama 4 layers, hidden 256, T=128": (dict(num_hidden_layers=4, hidden_size=256, intermediate_size=688,
                                                num_attention_heads=8, num_key_value_heads=4), 128),
    "host-bound llama 30 layers, hidden 64, T=8": (dict(num_hidden_layers=30, hidden_size=64, intermediate_size=128,
                                                         num_attention_heads=4, num_key_value_heads=2), 8),
}


def _model(shape: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, **shape)).eval()


def _compile_seconds(model, call) -> float:
    """From a fresh dynamo state and without inductor's caches (on disk across processes too),
    so that neither side reuses what the other compiled."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        start = time.perf_counter()
        call()
        return time.perf_counter() - start


@pytest.mark.parametrize("name", list(SHAPES))
def test_compiled_traced_over_untraced(benchmark, record_measure, alternating, name):
    shape, tokens = SHAPES[name]
    ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    plain, traced_model = _model(shape), _model(shape)
    plain.compile()
    traced_model.compile()
    tracer = Tracer(traced_model)
    tracer.add_hooks_all()
    group = f"compiled {name}, traced/untraced compiled forward, interleaved"
    rounds = []

    def untraced():
        with torch.no_grad():
            plain(ids)

    timed_round = alternating({"untraced": untraced, "traced": lambda: tracer.run(ids)})

    def one_round():
        seconds = timed_round()
        rounds.append((seconds["untraced"], seconds["traced"]))

    try:
        # The first compile of a process also pays inductor's one-time start-up: a throwaway first.
        warm = _model(dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                           num_key_value_heads=1))
        warm.compile()
        _compile_seconds(warm, lambda: warm(ids[:, :4]))
        compile_untraced = _compile_seconds(plain, untraced)
        compile_traced = _compile_seconds(traced_model, lambda: tracer.run(ids))
        for _ in range(3):
            one_round()
        rounds.clear()
        benchmark.group = group
        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    finally:
        tracer.clear_hooks()
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    ratios = [traced / free for free, traced in rounds]
    record_measure(group, "untraced compiled forward: median", statistics.median(r[0] for r in rounds) * 1e3, "ms")
    record_measure(group, "traced/untraced: lowest", min(ratios), "x")
    record_measure(group, "traced/untraced: median", statistics.median(ratios), "x")
    record_measure(group, "traced/untraced: highest", max(ratios), "x")
    record_measure(group, "compile time traced/untraced", compile_traced / compile_untraced, "x")
    record_measure(group, "compile time untraced", compile_untraced, "s")
