"""Tracer and ActivityCube against an independent float64 per-token reference (plain torch hooks)
on small random GPT-2, Llama, GPT-NeoX and BERT models; hook hygiene, padding, generate(), bad
inputs, optional captures."""

import numpy as np
import pytest
import torch
from torch import nn

from recon_fast import ActivityCube, RawSlices, Tracer
from recon_fast.kernels.token_stats import STATS
from recon_fast.trace import presets

from tiny_models import ARCHS, VOCAB, capture_outputs, make_model, per_token_float64, tracer_hooks_on


def assert_cube_layer_close(cube_stats: np.ndarray, tensor: torch.Tensor, metrics=STATS):
    """cube_stats [batch, tokens, metrics] vs the float64 statistics of `tensor` [batch, tokens, D]."""
    ref = per_token_float64(tensor).numpy()[..., [STATS.index(m) for m in metrics]]
    rms = np.sqrt(ref[..., 0:1] ** 2 / tensor.shape[-1]) if metrics[0] == "energy" else 1.0
    scale = np.maximum(np.abs(ref), rms)  # the mean is held to the row's RMS (see test_ops)
    err = np.abs(cube_stats - ref) / np.maximum(scale, 1e-30)
    assert np.nanmax(err) < 2e-5, f"worst relative error {np.nanmax(err):.3g}"


def all_module_hooks(model: nn.Module) -> int:
    return tracer_hooks_on(model)


def ids(batch=1, length=9, seed=0):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_add_hooks_all_matches_float64_reference(arch):
    model = make_model(arch)
    tokens = ids(batch=2, length=11)
    tracer = Tracer(model)
    tracer.add_hooks_all()
    assert list(tracer.hooks) == presets.select_all(model)
    tracer.run(tokens)
    cube = tracer.cube
    seen = capture_outputs(model, list(tracer.hooks), lambda: model(tokens))
    usable = [(n, t) for n, t in seen if t.is_floating_point() and t.dim() == 3]
    assert cube.layer_names == [n for n, _ in usable if t_shape_ok(_, tokens)]
    for i, (name, t) in enumerate((n, t) for n, t in usable if t_shape_ok(t, tokens)):
        assert_cube_layer_close(cube.data[i], t.expand(tokens.shape[0], -1, -1))
    assert cube.data.shape == (len(cube.layer_names), 2, 11, 5)
    assert cube.tokens == [[str(v) for v in row] for row in tokens.tolist()]
    assert all_module_hooks(model) == len(tracer.hooks)
    tracer.clear_hooks()
    assert all_module_hooks(model) == 0


def t_shape_ok(t, tokens):
    return t.shape[:2] in (tokens.shape, (1, tokens.shape[1]))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("preset", ["residual", "attn", "mlp", "components", "blocks+components"])
def test_presets_find_blocks_attention_and_mlp(arch, preset):
    model = make_model(arch)
    names = presets.select_preset(model, preset)
    blocks = presets.find_blocks(model)
    assert len(blocks) == 2
    per_block = {"residual": 1, "attn": 1, "mlp": 1, "components": 2, "blocks+components": 3}[preset]
    assert len(names) == 2 * per_block
    with Tracer(model, layers=preset) as tracer:
        tokens = ids(length=6)
        tracer.run(tokens)
        seen = dict(capture_outputs(model, names, lambda: model(tokens)))
        for i, name in enumerate(tracer.cube.layer_names):
            assert_cube_layer_close(tracer.cube.data[i], seen[name])
    assert all_module_hooks(model) == 0


def test_regex_selection_and_metric_subset():
    model = make_model("llama")
    tracer = Tracer(model, layers=r"model\.layers\.\d+\.mlp\.down_proj", metrics=("energy", "max"))
    tokens = ids()
    tracer.run(tokens)
    assert tracer.cube.layer_names == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    seen = dict(capture_outputs(model, tracer.cube.layer_names, lambda: model(tokens)))
    assert_cube_layer_close(tracer.cube.layer("model.layers.1.mlp.down_proj"), seen["model.layers.1.mlp.down_proj"],
                            metrics=("energy", "max"))
    with pytest.raises(KeyError, match="not in this cube"):
        tracer.cube.metric("std")
    with pytest.raises(ValueError, match="no module name matches"):
        tracer.add_hooks(r"nothing\.like\.this")


def test_unknown_module_names_the_closest():
    tracer = Tracer(make_model("gpt2"))
    with pytest.raises(KeyError, match=r"closest: transformer\.h\.0\.attn"):
        tracer.add_hook("transformer.h.0.atn")


def test_hooks_removed_after_an_exception_inside_forward():
    model = make_model("gpt2")
    tracer = Tracer(model)
    tracer.add_hooks_all()
    assert all_module_hooks(model) > 0
    with pytest.raises(ValueError, match="vocabulary size"):  # checked before the forward
        tracer.run(torch.tensor([[VOCAB + 50]]))
    assert all_module_hooks(model) == 0 and not tracer.hooks
    model.transformer.wte.register_forward_pre_hook(lambda *a: 1 / 0)  # fails inside the forward
    with pytest.raises(ZeroDivisionError):
        tracer.run(torch.tensor([[1]]))
    assert all_module_hooks(model) == 0 and not tracer.hooks


def test_context_manager_removes_hooks():
    model = make_model("neox")
    with Tracer(model, layers="residual") as tracer:
        assert all_module_hooks(model) == 2
        tracer.run(ids())
    assert all_module_hooks(model) == 0


def test_hooks_are_silent_outside_run():
    model = make_model("llama")
    tracer = Tracer(model, layers="residual")
    model(ids())  # an untraced forward must not leave records behind
    tracer.run(ids(length=4))
    assert tracer.cube.shape[:3] == (2, 1, 4)


def test_module_firing_twice_gives_two_entries_in_order():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, input_ids):
            x = torch.nn.functional.one_hot(input_ids, 8).float()
            return self.proj(self.proj(x) * 3)

    model = Twice()
    tracer = Tracer(model, layers=["proj"])
    tokens = torch.tensor([[1, 2, 3]])
    tracer.run(tokens)
    assert tracer.cube.layer_names == ["proj", "proj"]
    seen = capture_outputs(model, ["proj"], lambda: model(tokens))
    assert_cube_layer_close(tracer.cube.data[0], seen[0][1])
    assert_cube_layer_close(tracer.cube.data[1], seen[1][1])


def test_padding_is_marked_not_mixed_in():
    model = make_model("llama")
    a, b = ids(length=7, seed=1)[0], ids(length=4, seed=2)[0]
    batch = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    batch[0], mask[0] = a, 1
    batch[1, :4], mask[1, :4] = b, 1  # right padding
    tracer = Tracer(model, layers="residual")
    tracer.run({"input_ids": batch, "attention_mask": mask})
    cube = tracer.cube
    assert cube.padding_mask.tolist() == (mask == 0).tolist()
    assert np.isnan(cube.data[:, 1, 4:]).all()
    alone = Tracer(model, layers="residual")
    alone.run(b.unsqueeze(0))
    # The real positions of the padded sequence match the sequence traced alone.
    np.testing.assert_allclose(cube.data[:, 1, :4], alone.cube.data[:, 0], rtol=1e-4, atol=1e-5)
    doc = cube.to_dict()
    assert doc["meta"]["padding_mask"].tolist() == (mask == 0).int().tolist()


def test_generate_records_prompt_and_every_new_token():
    model = make_model("llama")
    prompt = ids(length=5, seed=3)
    tracer = Tracer(model, layers="blocks+components")
    out = tracer.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    cube = tracer.cube
    assert out.shape == (1, 9)
    assert cube.shape == (6, 1, 8, 5)  # the 9th token was produced, never fed back
    assert cube.tokens == [[str(t) for t in out[0, :8].tolist()]]
    # With the KV cache each step sees one token; the statistics must equal one forward over
    # the whole sequence.
    full = Tracer(model, layers="blocks+components")
    full.run(out[:, :8])
    np.testing.assert_allclose(cube.data, full.cube.data, rtol=1e-4, atol=1e-5)
    assert cube.meta["mode"] == "generate"


def test_text_input_decodes_tokens():
    tokenizer = pytest.importorskip("transformers").AutoTokenizer
    from recon_fast.models import smollm2_location

    try:
        folder, gguf = smollm2_location()
    except Exception:
        pytest.skip("SmolLM2 package not installed")
    tok = tokenizer.from_pretrained(str(folder), gguf_file=gguf)
    model = make_model("llama")
    model.resize_token_embeddings(len(tok))
    tracer = Tracer(model, tok, layers="residual")
    tracer.run(["Hello world", "Hi"])
    assert tracer.cube.tokens[0] == tok.batch_decode([[t] for t in tok("Hello world")["input_ids"]])
    assert tracer.cube.padding_mask is not None and tracer.cube.padding_mask[1].any()


class Weird(nn.Module):
    """Outputs that are not activations: a dict, None, an integer tensor."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.to_dict = nn.Linear(6, 6)
        self.to_ints = nn.Linear(6, 6)

    def forward(self, input_ids):
        x = self.emb(input_ids)
        self.to_dict(x)
        self.to_ints(x)
        return x


def test_non_tensor_and_integer_outputs_are_skipped_and_recorded():
    model = Weird()
    model.to_dict.register_forward_hook(lambda m, i, o: {"not": "a tensor"})
    model.to_ints.register_forward_hook(lambda m, i, o: o.long())
    tracer = Tracer(model, layers=["emb", "to_dict", "to_ints"])
    tracer.run(torch.tensor([[1, 2, 3]]))
    assert tracer.cube.layer_names == ["emb"]
    reasons = {s["layer_name"]: s["reason"] for s in tracer.cube.meta["skipped"]}
    assert "not a tensor" in reasons["to_dict"] and "int64" in reasons["to_ints"]


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (torch.zeros(1, 0, dtype=torch.long), ValueError, "at least one token"),
        (torch.zeros(1, 3), TypeError, "integer token ids"),
        ("some text", ValueError, "needs a tokenizer"),
        (3.5, TypeError, "takes token ids"),
    ],
    ids=["empty", "float-ids", "text-no-tokenizer", "number"],
)
def test_bad_inputs_are_named(bad, error, message):
    model = make_model("gpt2")
    tracer = Tracer(model, layers="residual")
    with pytest.raises(error, match=message):
        tracer.run(bad)
    with pytest.raises(RuntimeError, match="call run"):
        tracer.cube


def test_no_hooks_and_bad_options_are_named():
    model = make_model("gpt2")
    with pytest.raises(RuntimeError, match="no hooks"):
        Tracer(model).run(ids())
    with pytest.raises(ValueError, match="unknown or no metrics"):
        Tracer(model, metrics=("energy", "kurtosis"))
    with pytest.raises(ValueError, match="unknown preset|no module name matches"):
        Tracer(model, layers="resid")


def test_attention_full_with_eager_attention_and_stats_beside_it():
    model = make_model("llama", attn_implementation="eager")
    tokens = ids(length=6)
    full = Tracer(model, layers="residual", attention="full")
    output = full.run(tokens)
    entries = full.cube.attention
    assert [e["layer_name"] for e in entries] == ["attention.0", "attention.1"]
    np.testing.assert_allclose(entries[1]["attention_scores"], output.attentions[1].numpy(), rtol=1e-6)
    stats = Tracer(model, layers="residual", attention="stats")
    stats.run(tokens)
    p = output.attentions[0].double()
    np.testing.assert_allclose(stats.cube.attention_stat("entropy")[0], -torch.special.xlogy(p, p).sum(-1).numpy(),
                               rtol=1e-4)
    assert (stats.cube.attention_stat("argmax")[0] == p.argmax(-1).numpy()).all()


def test_attention_without_eager_says_how_to_get_it():
    tracer = Tracer(make_model("llama", attn_implementation="sdpa"), layers="residual", attention="full")
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        tracer.run(ids())


def test_raw_slices_go_to_a_sidecar_and_come_back(tmp_path):
    model = make_model("gpt2")
    tokens = ids(length=8)
    tracer = Tracer(model, layers="residual", raw=RawSlices(r"transformer\.h\.1", tokens=(2, 6), dims=(4, 10)))
    tracer.run(tokens)
    path = tmp_path / "cube.json"
    tracer.cube.export_json(path)
    loaded = ActivityCube.load(path)
    seen = dict(capture_outputs(model, ["transformer.h.1"], lambda: model(tokens)))
    np.testing.assert_array_equal(loaded.raw[1]["array"], seen["transformer.h.1"][:, 2:6, 4:10].numpy())
    doc = loaded.to_dict()
    assert "raw_tensors" not in doc["layers"][0]
    assert loaded.meta == tracer.cube.meta


@pytest.mark.cuda
def test_cuda_hooks_never_sync():
    # The hook path alone (the model's own code may sync; that is not ours to judge).
    from recon_fast.trace.session import Session
    from recon_fast.trace.stats_arena import StatsArena
    from recon_fast.trace.stats_capture import record_call

    session = Session(StatsArena(), token_ids=True)
    activations = [torch.randn(2, 64, 48, device="cuda", dtype=dt) for dt in (torch.float32, torch.bfloat16)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, a in enumerate(activations * 50):  # enough calls to grow the arena several times
            record_call(session, f"layer{i}", (a, None))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    host = session.arena.to_host()
    for call, a in zip(session.calls, activations * 50):
        assert_cube_layer_close(host.read(call.slot).view(2, 64, 5).numpy(), a.float().cpu())


# ---- issue 10: nothing dropped quietly, failures that leave the Tracer usable, hygiene ------------
import gc  # noqa: E402
import warnings  # noqa: E402


def test_skipped_outputs_warn_once_per_run_with_a_count_and_first_names():
    model = Weird()
    model.to_dict.register_forward_hook(lambda m, i, o: {"not": "a tensor"})
    model.to_ints.register_forward_hook(lambda m, i, o: o.long())
    tracer = Tracer(model, layers=["emb", "to_dict", "to_ints"])
    with pytest.warns(UserWarning) as record:
        tracer.run(torch.tensor([[1, 2, 3]]))
    messages = [str(w.message) for w in record if "not traced" in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in record]
    assert "2 module outputs" in messages[0] and "to_dict" in messages[0] and "to_ints" in messages[0]
    assert "meta['skipped']" in messages[0]


def test_per_head_norms_are_traced_over_heads_and_head_dim():
    model = make_model("qwen3")  # q_norm / k_norm: [B, T, heads, head_dim]
    tokens = ids(batch=2, length=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Tracer(model, layers=r"model\.layers\.\d+\.self_attn\.[qk]_norm") as tracer:
            tracer.run(tokens)
    cube = tracer.cube
    assert cube.layer_names == ["model.layers.0.self_attn.q_norm", "model.layers.0.self_attn.k_norm",
                                "model.layers.1.self_attn.q_norm", "model.layers.1.self_attn.k_norm"]
    assert "skipped" not in cube.meta
    seen = dict(capture_outputs(model, cube.layer_names[:1], lambda: model(tokens)))
    q = seen[cube.layer_names[0]]  # [2, 5, 4, 12]
    assert q.dim() == 4
    assert_cube_layer_close(cube.data[0], q.flatten(2))
    assert cube.layer_extras[0]["feature_shape"] == [4, 12]
    assert cube.to_dict()["layers"][0]["feature_shape"] == [4, 12]


def test_generate_keeps_lm_head_with_its_one_token_decode_steps():
    model = make_model("llama")
    prompt = ids(length=5, seed=3)
    tracer = Tracer(model, layers=["lm_head", "model.norm"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = tracer.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    cube = tracer.cube
    assert cube.layer_names == ["model.norm", "lm_head"] and "skipped" not in cube.meta
    assert cube.shape == (2, 1, 8, 5)
    full = Tracer(model, layers=["lm_head", "model.norm"])
    full.run(out[:, :8])
    np.testing.assert_allclose(cube.data[0], full.cube.data[0], rtol=1e-4, atol=1e-5)
    # generate() asks for the logits of each pass's last position only (logits_to_keep=1): the
    # prompt's last token, then each decode step's [B, 1, V]; the prompt's other positions are NaN.
    np.testing.assert_allclose(cube.data[1, :, 4:], full.cube.data[1, :, 4:], rtol=1e-4, atol=1e-5)
    assert np.isnan(cube.data[1, :, :4]).all()


def test_a_failed_run_leaves_the_tracer_usable_and_names_the_cause():
    model = make_model("gpt2")
    tracer = Tracer(model, layers="residual")
    with pytest.raises(ValueError, match=r"token id 1000000000 >= vocabulary size 96"):
        tracer.run(torch.tensor([[1, 2, 10**9]]))
    tracer.run(torch.tensor([[1, 2, 3]]))  # the next valid run works
    assert tracer.cube.shape == (2, 1, 3, 5)
    # a failure inside the forward: hooks come off the model and are put back by the next run
    boom = model.transformer.h[1].register_forward_hook(lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        tracer.run(torch.tensor([[1, 2, 3]]))
    assert all_module_hooks(model) == 1  # only the failing hook, none of the tracer's
    boom.remove()
    tracer.run(torch.tensor([[4, 5]]))
    assert tracer.cube.shape == (2, 1, 2, 5) and all_module_hooks(model) == 2
    tracer.clear_hooks()
    assert all_module_hooks(model) == 0


def test_non_finite_activations_are_named_with_their_first_layer_and_token():
    model = make_model("llama")
    tokens = ids(length=6)

    def poison(module, inputs, output):  # NaN at token 3 of the first MLP's output only
        output = output.clone()
        output[:, 3] = float("nan")
        return output

    handle = model.model.layers[0].mlp.register_forward_hook(poison)
    try:
        with Tracer(model, layers="blocks+components") as tracer:
            with pytest.warns(UserWarning, match=r"non-finite.*model\.layers\.0\.mlp.*token 3") as record:
                tracer.run(tokens)
    finally:
        handle.remove()
    assert sum("non-finite" in str(w.message) for w in record) == 1
    first = tracer.cube.meta["nonfinite"]
    assert first["layer_name"] == "model.layers.0.mlp" and first["token"] == 3 and first["batch"] == 0
    assert first["layers"] == 5  # everything downstream of it
    assert np.isfinite(tracer.cube.data[0]).all()  # the attention before it is clean


def test_tracers_that_are_dropped_or_recreated_leave_no_hooks():
    model = make_model("gpt2")
    for _ in range(3):
        tracer = Tracer(model)
        tracer.add_hooks_all()
    gc.collect()
    assert all_module_hooks(model) == len(tracer.hooks)
    del tracer
    gc.collect()
    assert all_module_hooks(model) == 0


def test_reprs_are_short():
    model = make_model("llama")
    tracer = Tracer(model)
    tracer.add_hooks_all()
    tracer.run(ids(batch=2, length=40))
    text = repr(tracer.cube)
    assert len(text.splitlines()) == 1 and len(text) < 400, text
    assert "layers=" in text and "tokens=40" in text and "energy" in text and "model.embed_tokens" in text
    assert repr(tracer).startswith("Tracer(") and len(repr(tracer)) < 300
