"""Tracer(attention="stats") on the real SmolLM2-135M-Instruct (CPU): the forward with attention
statistics on all 30 layers against the plain sdpa forward (the baseline) at T = 2048 and 8192
(targets <= 1.3x and <= 1.6x), eager attention with output_attentions at 2048 for comparison,
and peak resident memory growth (target <= 1.25x the sdpa forward's), each measured in a fresh
subprocess (`python benchmarks/bench_attention_tracing.py IMPL T [LAYERS]` prints the growth in
bytes and the seconds of the one call). Every forward keeps only the last position's logits
(logits_to_keep=1), so the [T, vocab] logits (1.6 GB at 8k) do not hide the attention's memory.

The long run: T = 32768 on SmolLM2 cut to its first LAYERS=4 layers (a full 30-layer CPU forward
at 32k is many minutes on two cores), at 8k, 16k and 32k: memory growth linear in T."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import resident_memory

LENGTHS = [int(t) for t in os.environ.get("RECON_BENCH_ATTENTION_TOKENS", "2048,8192").split(",")]
LONG_LENGTHS = [int(t) for t in os.environ.get("RECON_BENCH_ATTENTION_LONG", "8192,16384,32768").split(",")]
LONG_LAYERS = 4
IMPLS = ("sdpa forward", "stats (all layers)", "eager + output_attentions")


def smollm2(layers: int | None = None):
    from recon_fast.models import load_model

    model, tokenizer = load_model()
    if layers is not None:  # the first `layers` decoder layers only
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:layers]
    return model, tokenizer


def token_ids(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(100, 40000, (1, length), generator=torch.Generator().manual_seed(seed))


def approach(name: str, model):
    """A callable ids -> None running one forward the named way."""
    from recon_fast import Tracer

    if name == "sdpa forward":
        def forward(ids):
            with torch.no_grad():
                model(ids, logits_to_keep=1)
        return forward
    if name == "stats (all layers)":
        tracer = Tracer(model, attention="stats")
        return lambda ids: tracer.run(ids, logits_to_keep=1)
    if name == "eager + output_attentions":
        def eager(ids):
            model.set_attn_implementation("eager")
            try:
                with torch.no_grad():
                    model(ids, logits_to_keep=1, output_attentions=True)
            finally:
                model.set_attn_implementation("sdpa")
        return eager
    raise ValueError(f"unknown approach {name!r}; one of {IMPLS}")


def peak_growth(name: str, length: int, layers: int | None = None) -> tuple[int, float]:
    """(peak resident memory growth in bytes, seconds) of one call at `length` tokens, after a
    short warm-up call so that one-off allocations do not count."""
    model, _ = smollm2(layers)
    run = approach(name, model)
    run(token_ids(16))
    ids = token_ids(length)
    before = resident_memory.reset_peak()
    start = time.perf_counter()
    run(ids)
    seconds = time.perf_counter() - start
    return resident_memory.peak() - before, seconds


def measure_in_subprocess(name: str, length: int, layers: int | None = None) -> tuple[int, float]:
    command = [sys.executable, str(Path(__file__).resolve()), name, str(length)] + ([str(layers)] if layers else [])
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()
    return int(out[-2]), float(out[-1])


@pytest.fixture(scope="module")
def model():
    return smollm2()[0]


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("name", IMPLS)
def test_forward_time(record, model, name, length):
    if name.startswith("eager") and length > 2048:
        pytest.skip("eager with maps: +5 GiB per layer at 8k, for comparison at 2048 only")
    ids = token_ids(length)
    record(f"SmolLM2 forward, T={length} (CPU)", name, lambda: approach(name, model)(ids),
           baseline=name == "sdpa forward", rounds=3)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("name", IMPLS[:2])
def test_peak_memory(benchmark, record_measure, name, length):
    benchmark.group = f"attention stats peak-memory runs (whole process), T={length}"
    growth, _ = benchmark.pedantic(lambda: measure_in_subprocess(name, length), rounds=1, iterations=1)
    record_measure(f"SmolLM2 peak RSS growth, T={length}", name, growth / 2**20, "MiB", baseline=name == "sdpa forward")


@pytest.mark.parametrize("length", LONG_LENGTHS)
@pytest.mark.parametrize("name", IMPLS[:2])
def test_long_context_memory_is_linear(benchmark, record_measure, name, length):
    benchmark.group = f"attention stats at long context, SmolLM2 first {LONG_LAYERS} layers, T={length}"
    growth, seconds = benchmark.pedantic(lambda: measure_in_subprocess(name, length, LONG_LAYERS),
                                         rounds=1, iterations=1)
    record_measure(f"SmolLM2 ({LONG_LAYERS} layers) peak RSS growth, T={length}", name, growth / 2**20, "MiB",
                   baseline=name == "sdpa forward")
    record_measure(f"SmolLM2 ({LONG_LAYERS} layers) one forward, T={length}", name, seconds, "s",
                   baseline=name == "sdpa forward")


if __name__ == "__main__":
    growth, seconds = peak_growth(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
    print(growth, seconds)
