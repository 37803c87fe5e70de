"""README's Python usage block runs as written (on the real SmolLM2) and prints what its comments
say; every console output the README shows (a block after `<!-- output of: recon-fast ... -->`)
is what that command prints now; and the README says what the numbers mean."""

import contextlib
import copy
import io
import re
import shlex
from pathlib import Path

import pytest
from tiny_models import tracer_hooks_on

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
        return tracer_hooks_on(model) + sum(len(m._forward_pre_hooks) for m in model.modules())

    before = hooks()
    namespace = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block, "README.md", "exec"), namespace)
    shown = re.findall(r"^print\(.*\)\s+# (.*)$", block, re.MULTILINE)  # what the README says each print shows
    assert shown, "the usage block prints nothing"
    assert_shows(shown, printed.getvalue().splitlines())
    assert namespace["cube"].num_layers == 30 and namespace["probabilities"].shape[:2] == (1, 9)
    assert namespace["entropy"].shape[:3] == (30, 1, 9)
    assert hooks() == before


def test_the_metrics_and_the_summary_columns_are_explained():
    text = README.read_text()
    for words in ("energy", "L2 norm", "unbiased", "batch item 0", "peak energy", "at token", "mean std",
                  "padding", "float32"):
        assert words in text, words


def printed_examples() -> list[tuple[str, list[str]]]:
    """(command line, the lines the README shows it printing) for every `output of:` block."""
    found = re.findall(r"<!-- output of: (recon-fast .*?) -->\n```\n(.*?)```", README.read_text(), re.DOTALL)
    return [(command, text.splitlines()) for command, text in found]


def assert_shows(shown: list[str], printed: list[str]) -> None:
    """The README's lines, in order, are the printed ones; a line "..." stands for any number of
    printed lines, and "..." inside a line for any text."""
    pattern = "".join("(?:.*\n)*?" if line == "..." else
                      ".*".join(re.escape(part) for part in line.split("...")) + "\n" for line in shown)
    text = "\n".join(printed) + "\n"
    assert re.fullmatch(pattern + ("(?:.*\n)*" if shown[-1] == "..." else ""), text), \
        "the README shows:\n" + "\n".join(shown) + "\n\nbut the code prints:\n" + text


def test_the_readme_shows_printed_output_of_commands():
    commands = [command for command, _ in printed_examples()]
    assert any("--versus" in c for c in commands) and any("attribute" in c for c in commands), commands


@pytest.mark.slow
@pytest.mark.parametrize("command, shown", printed_examples(), ids=lambda v: v if isinstance(v, str) else "")
def test_a_printed_example_is_what_the_command_prints(command, shown, smollm2, monkeypatch, capsys):
    from recon_fast import cli
    from recon_fast.cli import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: smollm2)  # the session's SmolLM2, loaded once
    argv = shlex.split(command)[1:]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert_shows(shown, capsys.readouterr().out.splitlines())
