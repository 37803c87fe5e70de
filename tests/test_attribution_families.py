"""Direct logit attribution on the families with terms of their own (issue 13 item 1): Gemma's
(1 + w) norms and scaled embeddings, Gemma2/3 and OLMo2 post-norms, soft-capped logits, Granite's
multipliers, Cohere's logit scale, Phi/Cohere/Falcon parallel blocks, Phi3's fused projections.
Each family is checked against the model's own logits and against a decomposition written here
from residual differences, with every split (heads, neurons, sources) adding up to its part."""

from __future__ import annotations

import functools
import importlib
import inspect

import pytest
import torch
from attribution_families import FAMILIES, make_family_model
from tiny_models import VOCAB, residual_pieces

from recon_fast.attribution import attribute_positions, direct_logit_attribution
from recon_fast.attribution.anatomy import anatomy

@functools.lru_cache(maxsize=None)
def family_model(family: str, seed: int = 3, dtype=torch.float32):
    """Built once per test module: attribution leaves a model as it found it."""
    return make_family_model(family, seed=seed, dtype=dtype)


SPLITS = {"components": {}, "heads": {"per_head": True}, "neurons": {"per_neuron": True},
          "sources": {"by_source": True}}


def _attention_through_interface(family: str) -> bool:
    """Whether the installed transformers routes this family's attention through its attention
    functions (by_source needs them): Falcon's did not in older releases and does in 5.25."""
    module = importlib.import_module(type(family_model(family)).__module__)
    attention = [cls for name, cls in vars(module).items() if name.endswith("Attention") and isinstance(cls, type)]
    return any("attention_interface" in inspect.getsource(cls.forward) for cls in attention)


# Families whose by_source must refuse, on the installed transformers.
NO_SOURCES = {family for family in ("falcon",) if not _attention_through_interface(family)}


def ids_for(seed: int, batch: int = 2, length: int = 13) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def model_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.double()


def capped(model, total: torch.Tensor) -> torch.Tensor:
    """What the model outputs for a pre-cap logit `total` (Gemma2/3 soft-cap the logits)."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(total / cap) * cap if cap else total


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("family", FAMILIES)
def test_terms_sum_to_the_models_own_logit(family, split):
    model = family_model(family)
    ids = ids_for(5)
    if split == "sources" and family in NO_SOURCES:
        with pytest.raises(ValueError, match="did not go through the transformers attention functions"):
            direct_logit_attribution(model, ids, by_source=True)
        return
    logits = model_logits(model, ids)
    for position in (-1, 4):
        attribution = direct_logit_attribution(model, ids, position=position, **SPLITS[split])
        expected = logits[:, position].gather(-1, attribution.target_id[:, None])[:, 0]
        assert torch.equal(attribution.target_id, logits[:, position].argmax(-1))
        error = relative(capped(model, attribution.total()), expected)
        assert error <= 1e-4, f"{family} {split}: terms give {attribution.total()}, the model {expected} ({error:.2e})"
        assert relative(attribution.total(), attribution.logit) <= 1e-4
    softcap = getattr(model.config, "final_logit_softcapping", None)
    assert (attribution.note is not None) == bool(softcap)  # a pre-cap logit says so


@pytest.mark.parametrize("family", FAMILIES)
def test_splits_add_up_to_their_component(family):
    model = family_model(family)
    ids = ids_for(14)
    whole = direct_logit_attribution(model, ids, position=-3)
    heads = direct_logit_attribution(model, ids, position=-3, per_head=True)
    neurons = direct_logit_attribution(model, ids, position=-3, per_neuron=True)
    scale = float(whole.values.abs().max())

    def summed(attribution, prefix: str, parts) -> torch.Tensor:
        return sum(attribution.values[:, i] for i, label in enumerate(attribution.labels)
                   if label.startswith(prefix) and parts(label[len(prefix):]))

    for layer in range(2):
        attn = whole.values[:, whole.labels.index(f"L{layer}.attn")]
        mlp = whole.values[:, whole.labels.index(f"L{layer}.mlp")]
        head_sum = summed(heads, f"L{layer}.", lambda rest: rest.startswith("H"))
        neuron_sum = summed(neurons, f"L{layer}.N", lambda rest: True)
        biases = {label: heads.values[:, heads.labels.index(f"L{layer}.{label}")]
                  for label in ("attn_bias", "attn_norm_bias") if f"L{layer}.{label}" in heads.labels}
        mlp_biases = [neurons.values[:, neurons.labels.index(f"L{layer}.{label}")]
                      for label in ("mlp_bias", "mlp_norm_bias") if f"L{layer}.{label}" in neurons.labels]
        torch.testing.assert_close(head_sum, attn - sum(biases.values(), torch.zeros(2, dtype=torch.float64)),
                                   rtol=1e-4, atol=1e-4 * scale)
        torch.testing.assert_close(neuron_sum, mlp - sum(mlp_biases, torch.zeros(2, dtype=torch.float64)),
                                   rtol=1e-4, atol=1e-4 * scale)
        assert len({round(float(v), 9) for v in neurons.values[0, [i for i, l in enumerate(neurons.labels)
                                                                     if l.startswith(f"L{layer}.N")]]}) > 10
    if family in NO_SOURCES:
        return
    sources = direct_logit_attribution(model, ids, position=-3, by_source=True)
    for label, value in sources.head_totals().items():
        expected = heads.values[0, heads.labels.index(label)]
        assert value == pytest.approx(float(expected), rel=1e-4, abs=1e-4 * scale), label


# ---- an independent decomposition: residual differences with plain hooks -----------------------------
# Where each family's residual stream stands between attention and MLP (the input of that module),
# or, for parallel blocks, the attention module whose output is its write.
MIDPOINT = {"gemma": "post_attention_layernorm", "gemma2": "pre_feedforward_layernorm",
            "gemma3": "pre_feedforward_layernorm", "phi3": "post_attention_layernorm",
            "granite": "post_attention_layernorm", "olmo2": "mlp"}
PARALLEL_ATTENTION = {"phi": "self_attn", "cohere": "self_attn", "falcon": "self_attention"}


@torch.no_grad()
def decompose_by_differences(family, model, ids, position: int, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"embeddings", "L{i}.attn", "L{i}.mlp"} -> [B] logit terms (pre-cap), written without
    recon_fast: residual differences, and the final norm at its actual scale restated here."""
    body = model.transformer if family == "falcon" else model.model
    blocks = body.h if family == "falcon" else body.layers
    final = body.ln_f if family == "falcon" else (body.final_layernorm if family == "phi" else body.norm)
    parallel = PARALLEL_ATTENTION.get(family)
    vectors, h = residual_pieces(model, ids, blocks, final, position,
                                 attention_of=(lambda block: getattr(block, parallel)) if parallel else None,
                                 midpoint_of=lambda block: getattr(block, MIDPOINT[family]))
    weight = final.weight.double() + (1.0 if family.startswith("gemma") else 0.0)  # Gemma's (1 + w)
    direction = model.lm_head.weight.double()[target] * weight
    eps = getattr(final, "eps", None) or getattr(final, "variance_epsilon", None)
    if family in ("phi", "cohere", "falcon"):  # LayerNorms: centre, divide by the std
        centre = lambda v: v - v.mean(-1, keepdim=True)  # noqa: E731
        scale = centre(h).pow(2).mean(-1).add(eps).sqrt()
    else:
        centre = lambda v: v  # noqa: E731
        scale = h.pow(2).mean(-1).add(eps).sqrt()
    factor = (1 / model.config.logits_scaling if family == "granite"
              else model.config.logit_scale if family == "cohere" else 1.0)
    return {k: (centre(v) * direction).sum(-1) / scale * factor for k, v in vectors.items()}


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-4), (torch.float64, 1e-9)], ids=["float32", "float64"])
@pytest.mark.parametrize("family", FAMILIES)
def test_components_match_an_independent_decomposition(family, dtype, rtol):
    model = family_model(family, dtype=dtype)
    ids = ids_for(22, length=12)
    ours = direct_logit_attribution(model, ids, position=-4)
    reference = decompose_by_differences(family, model, ids, -4, ours.target_id)
    largest = max(float(v.abs().max()) for v in reference.values())
    torch.testing.assert_close(ours.values[:, ours.labels.index("embed")], reference.pop("embeddings"),
                               rtol=rtol, atol=rtol * largest)
    for label, expected in reference.items():
        torch.testing.assert_close(ours.values[:, ours.labels.index(label)], expected, rtol=rtol,
                                   atol=rtol * largest, msg=lambda m: f"{family} {label}: {m}")


def test_sources_of_one_pass_equal_separate_runs_and_respect_causality():
    model = make_family_model("gemma2", seed=31)  # sliding window 4, attention soft-capping
    ids = ids_for(32, batch=1, length=12)
    together = attribute_positions(model, ids, [3, 11], by_source=True, per_neuron=True)
    for position, attribution in zip([3, 11], together):
        alone = direct_logit_attribution(model, ids[:, :position + 1], by_source=True, per_neuron=True)
        shared = [i for i, label in enumerate(attribution.labels) if ".S" not in label]
        torch.testing.assert_close(attribution.values[:, shared], alone.values[:, [alone.labels.index(attribution.labels[i])
                                                                                   for i in shared]], rtol=1e-5, atol=1e-6)
        for j in range(12):  # keys after the query, or outside its window of 4, carry nothing
            column = attribution.values[0, [i for i, l in enumerate(attribution.labels) if l.startswith("L0.") and l.endswith(f".S{j}")]]
            assert bool((column == 0).all()) == (j > position or j <= position - 4), (position, j)



@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in NO_SOURCES])
def test_top_k_sources_add_up_in_every_family(family):
    """Each head's 2 largest sources and its remainder add up to the head's term, and all terms to
    the model's own logit, through every family's post-norms, multipliers and soft-caps."""
    model = family_model(family)
    ids = ids_for(33)
    logits = model_logits(model, ids)
    heads = direct_logit_attribution(model, ids, position=-2, per_head=True)
    full = direct_logit_attribution(model, ids, position=-2, by_source=True)
    top = direct_logit_attribution(model, ids, position=-2, by_source=True, source_top_k=2)
    expected = logits[:, -2].gather(-1, top.target_id[:, None])[:, 0]
    assert relative(capped(model, top.total()), expected) <= 1e-4
    scale = float(heads.values.abs().max())
    for row in range(2):
        totals = top.head_totals(row)
        assert totals == pytest.approx({label: float(heads.values[row, heads.labels.index(label)])
                                        for label in totals}, rel=1e-4, abs=1e-4 * scale)
    kept = [label for label in top.labels if ".S" in label and not label.endswith("S_rest")]
    assert len(kept) <= 2 * 4 * 2 * 2  # layers x heads x k for each of the 2 sequences (united)
    assert torch.equal(top.values[:, [top.labels.index(l) for l in kept]],
                       full.values[:, [full.labels.index(l) for l in kept]])

def test_unknown_families_keep_the_named_error():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(num_hidden_layers=1, hidden_size=16, ffn_dim=32, num_attention_heads=2,
                                     vocab_size=VOCAB, word_embed_proj_dim=16)).eval()
    with pytest.raises(ValueError, match=r"no attribution adapter for OPTForCausalLM \(model_type 'opt'\).*gemma2"):
        anatomy(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_logit_lens_of_the_last_layer_is_the_models_own_prediction(family):
    """The lens applies the family's logit scale and soft-cap, so its last reading is the model's
    own distribution."""
    from recon_fast.attribution.logit_lens import logit_lens

    model = family_model(family)
    ids = ids_for(42, length=9)
    lens = logit_lens(model, ids, k=3)
    logits = model_logits(model, ids).float()
    assert lens.layers == ["embed", "L0", "L1"]
    assert torch.equal(lens.token_ids[-1], logits.topk(3, -1).indices)
    torch.testing.assert_close(lens.logprobs[-1], torch.log_softmax(logits, -1).topk(3, -1).values,
                               rtol=1e-5, atol=1e-5)


def test_gemma_components_and_heads_agree_with_transformer_lens(tmp_path):
    """TransformerLens's bridge around the same random Gemma (its config read from a saved folder,
    offline): decompose_resid + apply_ln_to_stack onto the target's direction, per component and
    per head, against ours (Gemma's sqrt(d) embedding scale and (1 + w) norms included)."""
    pytest.importorskip("transformer_lens")
    import copy

    import transformer_lens.model_bridge.sources.transformers  # noqa: F401  (attaches boot_transformers)
    from transformer_lens.model_bridge import TransformerBridge

    model = family_model("gemma", seed=5)
    model.save_pretrained(tmp_path)
    ids = ids_for(6, batch=1, length=10)
    ours = direct_logit_attribution(model, ids)
    ours_heads = direct_logit_attribution(model, ids, per_head=True)
    bridge = TransformerBridge.boot_transformers(str(tmp_path), hf_model=copy.deepcopy(model), tokenizer=None)
    bridge.enable_compatibility_mode(disable_warnings=True, center_unembed=False, fold_value_biases=False)
    target = int(ours.target_id[0])
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids)
        direction = bridge.tokens_to_residual_directions(target)
        stack, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
        tl = (cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1)[:, 0] @ direction).double()
        heads, head_labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
        tl_heads = (cache.apply_ln_to_stack(heads, layer=-1, pos_slice=-1)[:, 0] @ direction).double()
    layers = model.config.num_hidden_layers
    assert labels == ["embed"] + [f"{i}_{part}_out" for i in range(layers) for part in ("attn", "mlp")]
    mine = ["embed"] + [f"L{i}.{part}" for i in range(layers) for part in ("attn", "mlp")]
    ours_values = ours.values[0, [ours.labels.index(k) for k in mine]]
    largest = float(ours_values.abs().max())
    torch.testing.assert_close(ours_values, tl, rtol=1e-4, atol=1e-4 * largest)
    head_values = ours_heads.values[0, [ours_heads.labels.index(f"L{l[1]}.H{l[3]}") for l in head_labels]]
    torch.testing.assert_close(head_values, tl_heads, rtol=1e-4, atol=1e-4 * largest)
