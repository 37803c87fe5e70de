"""Direct logit attribution at the last token: time and peak memory of recon_fast (whole components,
heads, neurons, source positions) against caching
every activation (a hook cache of whole component outputs, and TransformerLens's run_with_cache),
with the plain forward pass as the baseline, at T = 512 and 2048 on a random-weight model of
SmolLM2-135M's shape. The approaches are in attribution_approaches.py."""

import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from attribution_approaches import APPROACHES, approach, smollm2_shaped_model, token_ids  # noqa: E402

LENGTHS = [int(t) for t in os.environ.get("RECON_BENCH_ATTRIBUTION_TOKENS", "512,2048").split(",")]
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def model():
    return smollm2_shaped_model()


def _needs(name):
    if name == "TransformerLens":
        pytest.importorskip("transformer_lens")


@pytest.mark.parametrize("name", APPROACHES)
@pytest.mark.parametrize("length", LENGTHS)
def test_attribution_time(record, model, name, length):
    _needs(name)
    run, ids = approach(name, model), token_ids(length)
    record(f"DLA time, SmolLM2-shaped Llama, T={length}", name, lambda: run(ids),
           baseline=name == "forward only", rounds=3)


@pytest.mark.parametrize("name", APPROACHES)
@pytest.mark.parametrize("length", LENGTHS)
def test_attribution_peak_memory(benchmark, record_measure, name, length):
    """Peak RSS growth of one call, each in a fresh process (attribution_approaches.py); the
    time pytest-benchmark shows for these is the whole process's, model building included."""
    _needs(name)
    command = [sys.executable, os.path.join(HERE, "attribution_approaches.py"), name, str(length)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    benchmark.group = f"DLA peak-memory runs (whole process), T={length}"
    out = benchmark.pedantic(lambda: subprocess.run(command, check=True, capture_output=True, text=True,
                                                    env=env).stdout, rounds=1, iterations=1)
    growth = int(out.split()[-1])
    record_measure(f"DLA peak RSS growth, SmolLM2-shaped Llama, T={length}", name, growth / 2**20, "MiB",
                   baseline=name == "forward only")


def test_the_approaches_agree(benchmark, model):
    """The memory and time figures compare like with like: all give the same terms."""
    from recon_fast.attribution import direct_logit_attribution

    ids = token_ids(256)
    ours = benchmark.pedantic(lambda: direct_logit_attribution(model, ids), rounds=1, iterations=1)
    components = ours.values[0, :61]  # embed, then attn and MLP of 30 layers: the cache's order
    cached = approach("cache components", model)(ids)
    torch.testing.assert_close(components, cached, rtol=1e-4, atol=1e-4 * float(cached.abs().max()))
    for name in ("recon_fast per-neuron", "recon_fast by-source"):  # the splits add up to the same total
        split = approach(name, model)(ids)
        torch.testing.assert_close(split.total(), ours.total(), rtol=1e-6, atol=1e-6)
    pytest.importorskip("transformer_lens")
    tl = approach("TransformerLens", model)(ids).double()
    torch.testing.assert_close(components, tl, rtol=1e-4, atol=1e-4 * float(tl.abs().max()))
