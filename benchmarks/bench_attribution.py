"""Direct logit attribution at the last token: time and peak memory of recon_fast (whole components,
heads, neurons, source positions: all of them or each head's top 8) against caching
every activation (a hook cache of whole component outputs, and TransformerLens's run_with_cache),
with the plain forward pass as the baseline, at T = 512 and 2048 on a random-weight model of
SmolLM2-135M's shape; and the source split as `attribute --sources` uses it (the call, the lines
it prints, the --json document), every source against each head's top 8. The approaches are in
attribution_approaches.py."""

import os
import subprocess
import sys

import orjson
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


BY_SOURCE = ["recon_fast by-source", "recon_fast by-source top-8"]


def sources_command(attribution, length: int) -> tuple[list[str], bytes]:
    """What `attribute --sources 5 --top-k 8` prints, and its --json document (the top 8 terms
    and the top 5 sources of a head are among its 8 largest: the top-8 split prints the same)."""
    from recon_fast.cli.attribution import contributor_lines, source_lines

    lines = contributor_lines(attribution.top(8)) + source_lines(attribution, 5, 8, [f"t{i}" for i in range(length)])
    return lines, orjson.dumps(attribution.to_dict(), option=orjson.OPT_INDENT_2)


@pytest.mark.parametrize("name", BY_SOURCE)
@pytest.mark.parametrize("length", LENGTHS)
def test_by_source_command(record, record_measure, model, name, length):
    """The call with what `attribute --sources` makes of it (sources_command): time, JSON size."""
    run, ids = approach(name, model), token_ids(length)
    baseline = name == BY_SOURCE[0]
    record(f"DLA by-source, call + printed lines + JSON, T={length}", name,
           lambda: sources_command(run(ids), length), baseline=baseline, rounds=3)
    size = len(sources_command(run(ids), length)[1])
    record_measure(f"DLA by-source JSON size, T={length}", name, size / 2**20, "MiB", baseline=baseline)


def test_the_approaches_agree(benchmark, model):
    """The memory and time figures compare like with like: all give the same terms."""
    from recon_fast.attribution import direct_logit_attribution

    ids = token_ids(256)
    ours = benchmark.pedantic(lambda: direct_logit_attribution(model, ids), rounds=1, iterations=1)
    components = ours.values[0, :61]  # embed, then attn and MLP of 30 layers: the cache's order
    cached = approach("cache components", model)(ids)
    torch.testing.assert_close(components, cached, rtol=1e-4, atol=1e-4 * float(cached.abs().max()))
    for name in ("recon_fast per-neuron", *BY_SOURCE):  # the splits add up to the same total
        split = approach(name, model)(ids)
        torch.testing.assert_close(split.total(), ours.total(), rtol=1e-6, atol=1e-6)
    full, top = (sources_command(approach(name, model)(ids), 256)[0] for name in BY_SOURCE)
    assert top == full  # the top-8 split prints what the full one prints
    pytest.importorskip("transformer_lens")
    tl = approach("TransformerLens", model)(ids).double()
    torch.testing.assert_close(components, tl, rtol=1e-4, atol=1e-4 * float(tl.abs().max()))
