"""Bad inputs as a new user makes them, through the CLI's main() and the Python API. Each ends in
one clear line (on stderr, or as the exception's message) naming the problem, with no traceback,
no file left behind and the model's hooks as they were; checks of the command line come before
any model is loaded."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from recon_fast import ActivityCube, RawSlices, Tracer, cli, models
from recon_fast.attribution import direct_logit_attribution
from recon_fast.attribution.logit_lens import logit_lens
from recon_fast.cli import loading

from tiny_models import VOCAB, make_model, save_model_folder, tracer_hooks_on

CUDA = torch.cuda.is_available()


def hook_counts(model: torch.nn.Module) -> tuple[int, int]:
    return (tracer_hooks_on(model),
            sum(len(m._forward_pre_hooks) for m in model.modules()))


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return str(save_model_folder(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture
def loads(monkeypatch):
    """Counts model loads (the slow part): argument checks must come before it."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        return models.load_model(*args, **kwargs)

    monkeypatch.setattr(loading, "load_model", counting)  # every command loads through cli.loading
    return calls


def _cli_cases():
    empty = "{tmp}/empty_model"
    cuda_device = "cuda:99" if CUDA else "cuda"
    # (argv, words the line must hold, whether the model may have been loaded by then)
    return [
        (["trace", "--prompt", "t5 t9", "--out", "/sys/cube.json"], "cannot write", False),
        (["trace", "--prompt", "t5 t9", "--out", "/proc/nope/cube.json"], "cannot write", False),
        (["trace", "--prompt", "t5 t9", "--out", "{tmp}"], "is a directory", False),
        (["trace", "--prompt", "t5 t9", "--out", ""], "empty", False),
        (["trace", "--prompt", "t5 t9", "--device", cuda_device], "cuda", False),
        (["trace", "--prompt", "t5 t9", "--device", "banana"], "device", False),
        (["trace", "--prompt", "t5 t9", "--dtype", "float33"], "dtype", False),
        (["trace", "--prompt", "t5 t9", "--model", empty], "config.json", False),
        (["trace", "--prompt", "t5 t9", "--model", "{tmp}/no/such/folder"], "does not exist", False),
        (["trace", "--prompt", "t5 t9", "--model", "{tmp}/notes.txt"], "not a model", False),
        (["trace", "--prompt", ""], "prompt is empty", False),
        (["trace", "--prompt", "  \n "], "prompt is empty", False),
        (["trace", "--prompt", "t5 t9", "--out", "{tmp}/cube.csv"], "suffix", False),
        (["trace", "--prompt", "t5 t9", "--out", "{tmp}/cube.json", "--format", "npz"], "conflicts", False),
        (["trace", "--prompt", "t5 t9", "--rows", "-1"], "--rows", False),
        (["trace", "--prompt", "t5 t9", "--layers", "model.(["], "bad module pattern", False),
        (["trace", "--prompt-file", "{tmp}/missing.txt"], "missing.txt", False),
        (["trace", "--prompt-file", "{tmp}/blank.txt"], "no prompt", False),
        (["trace", "--prompt", "t5", "--prompt-file", "{tmp}/blank.txt"], "not allowed with", False),
        (["trace"], "--prompt", False),
        (["trace", "--prompt", "t5", "--rows", "many"], "invalid int", False),
        (["traec", "--prompt", "t5"], "invalid choice", False),
        (["attribute", "--prompt", "t5 t9", "--top-k", "0"], "--top-k must be at least 1", False),
        (["attribute", "--prompt", "", "--model", "{model}"], "prompt is empty", False),
        (["residual", "--prompt", "t5 t9", "--lens-k", "0"], "--lens-k", False),
        (["cot", "--prompt", "t5 t9", "--device", "banana"], "device", False),
        (["trace", "--prompt", "t5 t9", "--model", "{model}", "--layers", r"nothing\.here", "--out",
          "{tmp}/cube.json"], "no module name matches", False),
        (["trace", "--prompt", "t5 t9", "--model", "{model}", "--chat", "--out", "{tmp}/c.json",
          "--layers", "residual", "--device", "cpu", "--dtype", "float32", "--format", "json",
          "--rows", "2", "--prompt-file", "{tmp}/blank.txt"], "not allowed with", False),
        (["attribute", "--prompt", "t5 t9", "--model", "{model}", "--token-index", "40"], "outside", True),
        (["residual", "--prompt", "t5 t9", "--model", "{model}", "--report", "/proc/nope"], "cannot write", False),
    ]


CLI_CASES = _cli_cases()


@pytest.mark.parametrize("argv, words, may_load", CLI_CASES, ids=[f"{i}-{c[0][0]}-{c[1][:14]}" for i, c in enumerate(CLI_CASES)])
def test_cli_bad_input_is_one_line(argv, words, may_load, model_folder, loads, tmp_path, capsys):
    (tmp_path / "empty_model").mkdir()
    (tmp_path / "notes.txt").write_text("not a model\n")
    (tmp_path / "blank.txt").write_text("\n  \n")
    before = set(os.listdir(tmp_path))
    argv = [a.format(tmp=tmp_path, model=model_folder) for a in argv]
    code = cli.main(argv)
    captured = capsys.readouterr()
    # the error line; a load's own line ("model NAME loaded in N s") may come before it
    lines = [line for line in captured.err.strip().splitlines() if not (line.startswith("model ") and " loaded in " in line)]
    assert code != 0, captured
    assert len(lines) == 1, f"expected one line on stderr, got:\n{captured.err}"
    assert "Traceback" not in captured.err and lines[0].startswith("recon-fast")
    assert words.lower() in lines[0].lower(), lines[0]
    assert may_load or not loads, f"the model was loaded before {lines[0]!r}"
    assert set(os.listdir(tmp_path)) == before, "a file was left behind"
    assert not Path("/sys/cube.json").exists()


# ---- the Python API ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2():
    return make_model("gpt2")


def _api_cases(tmp: Path, model):
    ids = torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))

    def traced():
        tracer = Tracer(model, layers="residual")
        tracer.run(ids)
        return tracer

    def train_mode():
        model.train()
        try:
            direct_logit_attribution(model, ids)
        finally:
            model.eval()

    (tmp / "empty_model").mkdir(exist_ok=True)
    return [
        (lambda: Tracer(model).run(ids), "no hooks"),
        (lambda: Tracer(model, layers="residual").run(torch.tensor([[1, 2, 10**9]])), "vocabulary size 96"),
        (lambda: Tracer(model, layers="residual").run(torch.tensor([[1, -4]])), "negative"),
        (lambda: Tracer(model, layers="residual").run(torch.zeros(1, 0, dtype=torch.long)), "at least one token"),
        (lambda: Tracer(model, layers="residual").run("some text"), "needs a tokenizer"),
        (lambda: Tracer(model, layers="residual").run(3.5), "3.5"),
        (lambda: Tracer(model, metrics=("energy", "kurtosis")), "unknown or no metrics"),
        (lambda: Tracer(model, attention="everything"), "attention must be"),
        (lambda: Tracer(model, layers="resid"), "resid"),
        (lambda: Tracer(model).add_hook("transformer.h.0.atn"), "closest"),
        (lambda: Tracer(model, layers="residual", stream_to=str(tmp / "cube.csv")), "suffix"),
        (lambda: Tracer(model, layers="residual", stream_to=str(tmp)), "is a directory"),
        (lambda: Tracer(model, layers="residual", attention="full").generate(ids, max_new_tokens=2), "run()"),
        (lambda: Tracer(model, layers="residual", raw=RawSlices("([")), "bad module pattern"),
        (lambda: traced().cube.export(tmp / "cube.csv"), "suffix"),
        (lambda: traced().cube.export(tmp / "cube.json", "npz"), "conflicts"),
        (lambda: traced().cube.export("/proc/nope/cube.json"), "cannot write"),
        (lambda: ActivityCube.load(tmp / "missing.json"), "missing.json"),
        (lambda: direct_logit_attribution(model, ids, position=99), "outside"),
        (lambda: direct_logit_attribution(make_model("bert"), ids), "no attribution adapter"),
        (train_mode, "training mode"),
        (lambda: logit_lens(model, ids, k=0), "k must be at least 1"),
        (lambda: models.load_model(str(tmp / "empty_model")), "config.json"),
    ]


def test_python_api_bad_input_is_one_line_and_leaves_the_model_as_found(gpt2, tmp_path):
    cases = _api_cases(tmp_path, gpt2)
    assert len(cases) >= 20
    before_files = set(os.listdir(tmp_path))
    before_hooks = hook_counts(gpt2)
    for i, (call, words) in enumerate(cases):
        with pytest.raises(Exception) as info:
            call()
        message = str(info.value)
        assert "\n" not in message.strip(), f"case {i}: several lines: {message}"
        assert words.lower() in message.lower(), f"case {i}: {message!r} does not say {words!r}"
        assert hook_counts(gpt2) == before_hooks, f"case {i} ({words}) left hooks on the model"
        assert set(os.listdir(tmp_path)) == before_files, f"case {i} ({words}) left a file behind"
    # and the model still traces
    with Tracer(gpt2, layers="residual") as tracer:
        tracer.run(torch.tensor([[1, 2, 3]]))
        assert np.isfinite(tracer.cube.data).all()
    assert hook_counts(gpt2) == before_hooks
