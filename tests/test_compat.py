"""recon_fast.ReconTracer against a reimplementation of the original per-token method: the same
JSON (layer names, order, keys, values) on random GPT-2, Llama and GPT-NeoX models, and on the
real SmolLM2."""

import json

import numpy as np
import pytest
import torch

from recon_fast import ReconTracer

from original_recon_trace import OriginalReconTracer
from tiny_models import VOCAB, make_model


def assert_same_cube(ours: dict, theirs: dict, rtol=1e-5):
    assert list(ours) == list(theirs) == ["meta", "tokens", "layers", "provenance"]
    assert ours["tokens"] == theirs["tokens"]
    assert ours["meta"]["input_shape"] == theirs["meta"]["input_shape"]
    assert ours["meta"]["model_name"] == theirs["meta"]["model_name"]
    assert [l["layer_name"] for l in ours["layers"]] == [l["layer_name"] for l in theirs["layers"]]
    for a, b in zip(ours["layers"], theirs["layers"]):
        assert list(a) == list(b), a["layer_name"]
        assert a["layer_index"] == b["layer_index"]
        if "core_metrics" in b:
            assert list(a["core_metrics"]) == list(b["core_metrics"])
            for key in b["core_metrics"]:
                got, want = np.array(a["core_metrics"][key]), np.array(b["core_metrics"][key])
                # Both sides are float32 computations; a mean near zero is held to the row's spread.
                spread = np.array(b["core_metrics"]["std_activation"]) if key == "mean_activation" else 0
                scale = np.maximum(np.abs(want), spread)
                err = np.abs(got - want) / np.maximum(scale, 1e-30)
                assert err.max() <= rtol, f"{a['layer_name']} {key}: {err.max():.3g}"
        for key in ("attention_scores", "raw_tensors"):
            if key in b:
                np.testing.assert_allclose(np.array(_flat(a[key])), np.array(_flat(b[key])), rtol=1e-6)


def _flat(value):
    return value["hidden_states"] if isinstance(value, dict) else value


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_same_json_as_the_original(arch, tmp_path):
    model = make_model(arch)
    tokens = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(7))
    ours, theirs = ReconTracer(model), OriginalReconTracer(model)
    ours.add_hooks_all()
    ours.run(tokens)
    ours.clear_hooks()
    theirs.add_hooks_all()
    theirs.run(tokens)
    theirs.clear_hooks()
    ours.export_json(tmp_path / "ours.json")
    theirs.export_json(tmp_path / "theirs.json")
    assert_same_cube(json.loads((tmp_path / "ours.json").read_text()),
                     json.loads((tmp_path / "theirs.json").read_text()))
    assert len(ours.activity_cube["layers"]) > 10


def test_attention_entries_and_raw_tensors_like_the_original():
    model = make_model("gpt2", attn_implementation="eager")
    tokens = torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(8))
    ours = ReconTracer(model, include_raw_tensors=True)
    theirs = OriginalReconTracer(model, include_raw_tensors=True)
    for t in (ours, theirs):
        t.add_hooks_all(lambda name, m: name.endswith(".mlp"))
        t.run(tokens)
        t.clear_hooks()
    names = [l["layer_name"] for l in ours.activity_cube["layers"]]
    assert names == ["transformer.h.0.mlp", "transformer.h.1.mlp", "attention.0", "attention.1"]
    assert_same_cube(ours.activity_cube, theirs.activity_cube)


def test_user_metric_funcs_run_per_token():
    model = make_model("llama")
    funcs = {"l1": lambda t: t.abs().sum().item(), "peak": lambda t: t.max().item()}
    tokens = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(9))
    ours, theirs = ReconTracer(model, metric_funcs=funcs), OriginalReconTracer(model, metric_funcs=funcs)
    for t in (ours, theirs):
        t.add_hooks_all()
        t.run(tokens)
        t.clear_hooks()
    a, b = ours.activity_cube["layers"], theirs.activity_cube["layers"]
    assert [l["core_metrics"] for l in a] == [l["core_metrics"] for l in b]  # same code path: exact


def test_repeated_runs_accumulate_like_the_original():
    model = make_model("gpt2")
    tracer = ReconTracer(model)
    tracer.add_hook("transformer.h.0")
    tokens = torch.randint(1, VOCAB, (1, 4))
    tracer.run(tokens)
    tracer.run(tokens)
    assert [l["layer_index"] for l in tracer.activity_cube["layers"]] == [0, 1]


def test_plain_modules_and_errors():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
    tracer = ReconTracer(model)
    tracer.add_hooks_all()
    tracer.run(torch.tensor([[1, 2, 3]]))  # no HF keyword arguments for a plain module
    assert [l["layer_name"] for l in tracer.activity_cube["layers"]] == ["0", "1"]
    with pytest.raises(KeyError, match="closest"):
        tracer.add_hook("00")
    with pytest.raises(IndexError):
        tracer.run(torch.tensor([[11]]))
    assert not tracer.hooks and all(not m._forward_hooks for m in model.modules())


@pytest.mark.slow
def test_real_smollm2_matches_the_original(smollm2, tmp_path):
    model, tokenizer = smollm2
    tokens = tokenizer("Why do bees buzz? Because their wings beat fast.", return_tensors="pt")["input_ids"]
    ours, theirs = ReconTracer(model), OriginalReconTracer(model)
    for t in (ours, theirs):
        t.add_hooks_all()
        t.run(tokens)
        t.clear_hooks()
    ours.export_json(tmp_path / "ours.json")
    theirs.export_json(tmp_path / "theirs.json")
    a = json.loads((tmp_path / "ours.json").read_text())
    b = json.loads((tmp_path / "theirs.json").read_text())
    assert len(a["layers"]) > 300  # every module with parameters fires once
    assert_same_cube(a, b, rtol=1e-4)


# ---- issue 10: the user's model is left as found -------------------------------------------------
def model_state(model):
    """Everything a tracer could leave behind on a model: hooks, the attention implementation,
    the config, and transformers' output-capturing flag."""
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    return (hooks, model.config._attn_implementation, model.config.to_json_string(),
            [getattr(m, "_output_capturing_hooks_installed", None) for m in model.modules()])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_model_is_left_as_found_after_every_run(attn, caplog):
    model = make_model("llama", attn_implementation=attn)
    before = model_state(model)
    tokens = torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    tracer = ReconTracer(model)
    tracer.add_hooks_all(lambda name, m: name.endswith(".mlp"))
    for _ in range(2):
        tracer.run(tokens)
        hooks, *rest = model_state(model)
        assert rest == list(before[1:])
        assert sum(f for f, _ in hooks) == len(tracer.hooks)
    tracer.clear_hooks()
    assert model_state(model) == before
    names = [entry["layer_name"] for entry in tracer.activity_cube["layers"]]
    # attentions are asked for (and appended) only where the implementation returns them
    assert names.count("attention.0") == (2 if attn == "eager" else 0)
    assert "does not support" not in caplog.text


@pytest.mark.parametrize("attention", ["full", "stats"])
def test_the_tracer_leaves_the_model_as_found_with_attention_capture(attention):
    from recon_fast import Tracer

    model = make_model("llama", attn_implementation="eager")
    before = model_state(model)
    with Tracer(model, layers="residual", attention=attention) as tracer:
        tracer.run(torch.randint(1, VOCAB, (1, 5)))
    assert len(tracer.cube.attention if attention == "full" else tracer.cube.attention_layers) == 2
    assert model_state(model) == before
    assert model.config._attn_implementation == "eager"
