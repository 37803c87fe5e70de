"""README's Python usage block runs as written (on the real SmolLM2), and the README says what
the numbers mean."""

import copy
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


@pytest.mark.slow
def test_the_usage_block_runs_as_written(smollm2, monkeypatch, tmp_path):
    import recon_fast.models

    model, tokenizer = smollm2

    def load_model(*args, attn_implementation=None, **kwargs):
        if attn_implementation != "eager":
            return smollm2
        eager = copy.deepcopy(model)  # the session's model stays as it is
        eager.set_attn_implementation("eager")
        return eager, tokenizer

    monkeypatch.setattr(recon_fast.models, "load_model", load_model)
    monkeypatch.chdir(tmp_path)
    block = python_blocks()[0]
    for needed in ("load_model", "with Tracer(", "RawSlices", "stream_to=", "attention=", "to_pandas"):
        assert needed in block, needed
    def hooks():  # the session's model may carry hooks of earlier tests (the original tool's)
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    before = hooks()
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["cube"].num_layers == 30 and namespace["probabilities"].shape[:2] == (1, 9)
    assert namespace["entropy"].shape[:3] == (30, 1, 9)
    assert hooks() == before


def test_the_metrics_and_the_summary_columns_are_explained():
    text = README.read_text()
    for words in ("energy", "L2 norm", "unbiased", "batch item 0", "peak energy", "at token", "mean std",
                  "padding", "float32"):
        assert words in text, words
