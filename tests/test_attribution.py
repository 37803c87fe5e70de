"""Direct logit attribution, logit lens and chain of thought, against independent references:
the model's own logits (terms must add up to them), a decomposition written here from residual
differences with plain torch hooks, and TransformerLens's decompose_resid / apply_ln_to_stack."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import CAUSAL_ARCHS, VOCAB, make_model, perturb_vectors, residual_pieces

from recon_fast.attribution import attribute_positions, direct_logit_attribution
from recon_fast.attribution.anatomy import anatomy
from recon_fast.attribution.chain_of_thought import chain_of_thought, split_steps
from recon_fast.attribution.logit_lens import logit_lens
from recon_fast.attribution.position_capture import PositionCapture

# float32 models: the terms are summed in float64 from float32 activations, so they differ from
# the model's own float32 logit by its rounding (~1e-7 relative); the bound is 1e-4.
SUM_RTOL = 1e-4


def causal_model(arch: str, *, seed: int = 0, dtype=torch.float32, attn_implementation="sdpa"):
    return perturb_vectors(make_model(arch, seed=seed, attn_implementation=attn_implementation), seed=seed + 1).to(dtype)


def assert_sums_to_logit(attribution, rtol=SUM_RTOL):
    logit = attribution.logit
    assert bool((logit.abs() > 1e-3).all()), f"logit {logit} too close to 0 for a relative check"
    error = ((attribution.total() - logit).abs() / logit.abs()).max()
    assert error <= rtol, f"terms sum to {attribution.total()} but the model's logit is {logit} (rel {error:.2e})"


# ---- the invariant: terms add up to the model's logit --------------------------------------------
@pytest.mark.parametrize("per_head", [False, True], ids=["components", "heads"])
@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_terms_sum_to_the_models_logit(arch, per_head):
    model = causal_model(arch, seed=3)
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(5))
    for position in (-1, 0, 6):
        attribution = direct_logit_attribution(model, ids, position=position, per_head=per_head)
        assert attribution.values.shape == (2, len(attribution.labels))
        assert_sums_to_logit(attribution)
        # The target defaults to the model's prediction there.
        with torch.no_grad():
            expected = model(ids).logits[:, position].argmax(-1)
        assert torch.equal(attribution.target_id, expected)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_a_chosen_target_also_sums_to_its_logit(arch):
    model = causal_model(arch, seed=7)
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    target = int(logits.argmin())  # the least likely token: a negative logit
    attribution = direct_logit_attribution(model, ids, target=target)
    assert int(attribution.target_id[0]) == target
    assert float(attribution.logit[0]) == pytest.approx(float(logits[target]), rel=1e-6)
    assert_sums_to_logit(attribution)


def test_labels_name_every_part_in_residual_order():
    gpt2 = direct_logit_attribution(causal_model("gpt2"), torch.arange(6))
    assert gpt2.labels == ["embed", "pos_embed", "L0.attn", "L0.mlp", "L1.attn", "L1.mlp", "norm_bias"]
    heads = direct_logit_attribution(causal_model("gpt2"), torch.arange(6), per_head=True)
    assert heads.labels[:7] == ["embed", "pos_embed", "L0.H0", "L0.H1", "L0.H2", "L0.H3", "L0.attn_bias"]
    llama = direct_logit_attribution(causal_model("llama"), torch.arange(6))  # RMSNorm, no biases
    assert llama.labels == ["embed", "L0.attn", "L0.mlp", "L1.attn", "L1.mlp"]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox", "qwen2"])
def test_heads_add_up_to_the_attention_term_minus_its_bias(arch):
    model = causal_model(arch, seed=11)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(12))
    whole = direct_logit_attribution(model, ids, position=-2)
    heads = direct_logit_attribution(model, ids, position=-2, per_head=True)
    for layer in range(2):
        head_sum = sum(heads.values[:, heads.labels.index(f"L{layer}.H{h}")] for h in range(4))
        bias = (heads.values[:, heads.labels.index(f"L{layer}.attn_bias")]
                if f"L{layer}.attn_bias" in heads.labels else torch.zeros(2, dtype=torch.float64))
        attn = whole.values[:, whole.labels.index(f"L{layer}.attn")]
        torch.testing.assert_close(head_sum, attn - bias, rtol=1e-5, atol=1e-7)
        assert bool((heads.values[:, heads.labels.index(f"L{layer}.H0")] != head_sum).all())  # not all one value


# ---- an independent decomposition: residual differences captured with plain hooks ---------------
@torch.no_grad()
def decompose_by_differences(model, ids, position: int, target: torch.Tensor):
    """{"embeddings", "L{i}.attn", "L{i}.mlp"} -> [B] logit terms, from the residual stream before,
    between and after each block's two parts (no recon_fast code involved)."""
    arch = model.config.model_type
    if arch == "gpt2":
        blocks, mid_norm, final_norm, unembed = model.transformer.h, "ln_2", model.transformer.ln_f, model.lm_head
    elif arch == "gpt_neox":
        blocks, mid_norm, final_norm, unembed = (model.gpt_neox.layers, "post_attention_layernorm",
                                                 model.gpt_neox.final_layer_norm, model.lm_head)
    else:
        blocks, mid_norm, final_norm, unembed = model.model.layers, "post_attention_layernorm", model.model.norm, model.lm_head
    parallel = getattr(model.config, "use_parallel_residual", False)
    vectors, h = residual_pieces(model, ids, blocks, final_norm, position,
                                 attention_of=(lambda block: block.attention) if parallel else None,
                                 midpoint_of=lambda block: getattr(block, mid_norm))
    weight = final_norm.weight.double()
    u = unembed.weight.double()[target] * weight  # [B, d]
    if isinstance(final_norm, torch.nn.LayerNorm):
        scale = torch.sqrt(torch.var(h, dim=-1, unbiased=False) + final_norm.eps)
        return {k: ((v - v.mean(-1, keepdim=True)) * u).sum(-1) / scale for k, v in vectors.items()}
    scale = torch.sqrt(h.pow(2).mean(-1) + final_norm.variance_epsilon)
    return {k: (v * u).sum(-1) / scale for k, v in vectors.items()}


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-4), (torch.float64, 1e-9)], ids=["float32", "float64"])
@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_components_match_an_independent_decomposition(arch, dtype, rtol):
    model = causal_model(arch, seed=21, dtype=dtype)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(22))
    ours = direct_logit_attribution(model, ids, position=-4)
    reference = decompose_by_differences(model, ids, -4, ours.target_id)
    embeddings = sum(ours.values[:, ours.labels.index(k)] for k in ("embed", "pos_embed") if k in ours.labels)
    largest = max(float(v.abs().max()) for v in reference.values())
    torch.testing.assert_close(embeddings, reference.pop("embeddings"), rtol=rtol, atol=rtol * largest)
    for label, expected in reference.items():
        torch.testing.assert_close(ours.values[:, ours.labels.index(label)], expected, rtol=rtol,
                                   atol=rtol * largest, msg=lambda m: f"{arch} {label}: {m}")
    if dtype == torch.float64:  # Llama-family RMSNorms compute in float32 even for float64 input
        assert_sums_to_logit(ours, rtol=1e-6)


# ---- TransformerLens ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """A word-level tokenizer over the tiny models' vocabulary, saved and reloaded (TransformerLens
    reloads tokenizers from their folder)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="t0", eos_token="t0", unk_token="t1",
                                        pad_token="t0")
    folder = tmp_path_factory.mktemp("word_tokenizer")
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("position", [-1, 4])
def test_gpt2_components_and_heads_agree_with_transformer_lens(word_tokenizer, position):
    pytest.importorskip("transformer_lens")
    import transformer_lens.model_bridge.sources.transformers  # noqa: F401  (attaches boot_transformers)
    from transformer_lens.model_bridge import TransformerBridge

    model = causal_model("gpt2", seed=31, attn_implementation="eager")
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(32))
    ours = direct_logit_attribution(model, ids, position=position)
    ours_heads = direct_logit_attribution(model, ids, position=position, per_head=True)
    bridge = TransformerBridge.boot_transformers("gpt2", hf_model=copy.deepcopy(model), tokenizer=word_tokenizer)
    # Fold the final LayerNorm's weight into W_U and its bias into b_U (TransformerLens's own way of
    # applying the norm's affine part); centring the unembedding would shift every term, so not that.
    bridge.enable_compatibility_mode(disable_warnings=True, center_unembed=False, fold_value_biases=False)
    target = int(ours.target_id[0])
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids)
        direction = bridge.tokens_to_residual_directions(target)
        stack, labels = cache.decompose_resid(layer=-1, pos_slice=position, return_labels=True)
        tl = (cache.apply_ln_to_stack(stack, layer=-1, pos_slice=position)[:, 0] @ direction).double()
        heads, head_labels = cache.stack_head_results(layer=-1, pos_slice=position, return_labels=True)
        tl_heads = (cache.apply_ln_to_stack(heads, layer=-1, pos_slice=position)[:, 0] @ direction).double()
        tl_bias = float(bridge.b_U[target])
    assert labels == ["embed", "pos_embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
    mine = ["embed", "pos_embed", "L0.attn", "L0.mlp", "L1.attn", "L1.mlp"]
    ours_values = ours.values[0, [ours.labels.index(k) for k in mine]]
    largest = float(ours_values.abs().max())
    torch.testing.assert_close(ours_values, tl, rtol=1e-4, atol=1e-4 * largest)
    assert float(ours.values[0, ours.labels.index("norm_bias")]) == pytest.approx(tl_bias, rel=1e-4, abs=1e-4 * largest)
    head_values = ours_heads.values[0, [ours_heads.labels.index(f"L{l[1]}.H{l[3]}") for l in head_labels]]
    torch.testing.assert_close(head_values, tl_heads, rtol=1e-4, atol=1e-4 * largest)


# ---- the real model ------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_smollm2_terms_sum_to_its_logit_at_several_positions(smollm2):
    model, tokenizer = smollm2
    prompt = "The bees buzz because their wings beat two hundred times every second, said the teacher."
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    positions = [-1, -5, 3, 0]
    for attribution in attribute_positions(model, ids, positions, tokenizer=tokenizer):
        assert len(attribution.labels) == 1 + 2 * 30  # embed + attn and MLP of 30 layers
        assert_sums_to_logit(attribution)
    heads = direct_logit_attribution(model, ids, position=-2, per_head=True, tokenizer=tokenizer)
    assert len(heads.labels) == 1 + 30 * (9 + 1)
    assert_sums_to_logit(heads)
    assert heads.target_text[0] == tokenizer.decode([int(heads.target_id[0])])


# ---- positions, batches, targets, memory --------------------------------------------------------
def test_several_positions_from_one_pass_equal_separate_runs_on_prefixes():
    """What one pass gives at position p is what a run on the prefix [0, p] gives at its end."""
    model = causal_model("llama", seed=41, attn_implementation="eager")
    ids = torch.randint(0, VOCAB, (1, 14), generator=torch.Generator().manual_seed(42))
    positions = [2, 7, 13]
    together = attribute_positions(model, ids, positions, per_head=True)
    for position, attribution in zip(positions, together):
        alone = direct_logit_attribution(model, ids[:, :position + 1], per_head=True)
        assert attribution.labels == alone.labels and attribution.index == position
        assert torch.equal(attribution.target_id, alone.target_id)
        torch.testing.assert_close(attribution.values, alone.values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "neox"])
def test_positions_in_any_order_covering_every_token(arch):
    """Asking for as many positions as there are tokens, out of order, must not confuse the rows
    the model kept with the whole sequence."""
    model = causal_model(arch, seed=45)
    ids = torch.randint(0, VOCAB, (2, 3), generator=torch.Generator().manual_seed(46))
    with torch.no_grad():
        logits = model(ids).logits
    for position, attribution in zip([2, 0, 1], attribute_positions(model, ids, [2, 0, 1])):
        assert torch.equal(attribution.target_id, logits[:, position].argmax(-1))
        torch.testing.assert_close(attribution.logit, logits[:, position].amax(-1).double())
        assert_sums_to_logit(attribution)


def test_only_rows_at_the_requested_positions_are_kept(monkeypatch):
    kept = []
    original = PositionCapture._keep

    def recording(self, key, tensor, what):
        original(self, key, tensor, what)
        kept.append(tuple(self._rows[key].shape))

    monkeypatch.setattr(PositionCapture, "_keep", recording)
    model = causal_model("gpt2")
    direct_logit_attribution(model, torch.randint(0, VOCAB, (3, 40)), position=-1)
    assert kept and all(shape[1:] == (1, 48) for shape in kept)  # [batch or 1, 1 position, d_model]


def test_hooks_are_removed_after_success_and_failure():
    model = causal_model("gpt2")

    def hook_count():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    direct_logit_attribution(model, torch.arange(5), per_head=True)
    assert hook_count() == 0
    with pytest.raises(ValueError, match="outside"):
        direct_logit_attribution(model, torch.arange(5), position=5)
    block = model.transformer.h[0]
    handle = block.register_forward_hook(lambda m, a, out: (out + 1.0) if torch.is_tensor(out) else (out[0] + 1.0,) + tuple(out[1:]))
    try:
        with pytest.raises(ValueError, match="not the sum of its embedding"):
            direct_logit_attribution(model, torch.arange(5))
    finally:
        handle.remove()
    assert hook_count() == 0


def test_text_input_and_a_target_given_as_text(word_tokenizer):
    model = causal_model("gpt2", seed=51)
    attribution = direct_logit_attribution(model, "t5 t9 t2 t7", target="t3", tokenizer=word_tokenizer)
    assert int(attribution.target_id[0]) == 3 and attribution.target_text == ["t3"]
    assert_sums_to_logit(attribution)
    with pytest.raises(ValueError, match="2 tokens"):
        direct_logit_attribution(model, "t5 t9", target="t3 t4", tokenizer=word_tokenizer)


def test_a_position_that_is_padding_is_refused_and_left_padding_works(word_tokenizer):
    model = causal_model("llama", seed=55)
    word_tokenizer.padding_side = "right"
    try:
        with pytest.raises(ValueError, match="position -1 is padding in sequence 1; pad on the left"):
            direct_logit_attribution(model, ["t5 t9 t2 t7", "t4 t8"], tokenizer=word_tokenizer)
        word_tokenizer.padding_side = "left"
        batch = direct_logit_attribution(model, ["t5 t9 t2 t7", "t4 t8"], tokenizer=word_tokenizer)
    finally:
        word_tokenizer.padding_side = "right"
    alone = direct_logit_attribution(model, torch.tensor([[4, 8]]))
    torch.testing.assert_close(batch.values[1:], alone.values, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"position": 9}, ValueError, "outside the input's 6 tokens"),
    ({"position": -7}, ValueError, "outside"),
    ({"position": 1.5}, TypeError, "position must be an int"),
    ({"target": VOCAB}, ValueError, "out of range"),
    ({"target": [1, 2, 3]}, ValueError, "one per sequence"),
    ({"target": "hello"}, ValueError, "needs a tokenizer"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        direct_logit_attribution(causal_model("gpt2"), torch.arange(6), **kwargs)


def test_numpy_positions_work_and_training_mode_is_refused():
    import numpy as np

    model = causal_model("gpt2", seed=57)
    assert direct_logit_attribution(model, torch.arange(6), position=np.int64(-2)).index == 4
    model.train()
    with pytest.raises(ValueError, match=r"training mode.*model.eval\(\)"):
        direct_logit_attribution(model, torch.arange(6))


def test_models_without_an_adapter_or_a_head_get_a_clear_error():
    with pytest.raises(ValueError, match=r"no attribution adapter for BertModel \(model_type 'bert'\).*gpt2"):
        direct_logit_attribution(make_model("bert"), torch.arange(6))
    from transformers import GPT2Config, GPT2Model

    headless = GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB)).eval()
    with pytest.raises(ValueError, match="no unembedding 'lm_head'.*AutoModelForCausalLM"):
        anatomy(headless)


def test_top_uses_hexrays_percent_or_the_share_of_the_total():
    attribution = direct_logit_attribution(causal_model("gpt2", seed=61), torch.arange(8))
    top = attribution.top(3)
    values = attribution.values[0]
    magnitudes = sorted(values.abs().tolist(), reverse=True)
    assert [abs(v) for _, v, _ in top] == pytest.approx(magnitudes[:3])
    assert sum(p for _, _, p in top) == pytest.approx(100.0)
    total = attribution.top(3, share="total")
    assert total[0][2] == pytest.approx(100 * magnitudes[0] / sum(magnitudes))
    document = attribution.to_dict()
    assert document["labels"] == attribution.labels
    assert document["sequences"][0]["total"] == pytest.approx(float(attribution.total()[0]))


def test_grid_places_each_layer_term():
    attribution = direct_logit_attribution(causal_model("neox", seed=62), torch.arange(8), per_head=True)
    rows, columns, grid = attribution.grid()
    assert rows == ["L0", "L1"] and columns == ["H0", "H1", "H2", "H3"]
    assert float(grid[1, 2]) == float(attribution.values[0, attribution.labels.index("L1.H2")])


# ---- logit lens --------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_logit_lens_matches_hidden_states_through_the_final_norm(arch):
    model = causal_model(arch, seed=71)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(72))
    lens = logit_lens(model, ids, k=3)
    with torch.no_grad():
        output = model(ids, output_hidden_states=True)
    parts = anatomy(model)
    assert lens.layers == ["embed", "L0", "L1"] and lens.token_ids.shape == (3, 2, 9, 3)
    # HF's last hidden state already went through the final norm; the earlier ones did not.
    for i, hidden in enumerate(output.hidden_states[:-1]):
        expected = torch.log_softmax(parts.unembed(parts.final_norm.module(hidden)).float(), -1).topk(3, -1)
        torch.testing.assert_close(lens.logprobs[i], expected.values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lens.norms[i], hidden.double().norm(dim=-1).float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(lens.token_ids[-1, ..., 0], output.logits.argmax(-1))


def test_logit_lens_at_chosen_positions_equals_those_columns_of_the_full_lens():
    model = causal_model("gpt2", seed=75)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(76))
    full = logit_lens(model, ids, k=3)
    some = logit_lens(model, ids, k=3, positions=[-1, 2])
    assert some.positions == [10, 2] and some.token_ids.shape == (3, 2, 2, 3)
    assert torch.equal(some.token_ids, full.token_ids[:, :, [10, 2]])
    torch.testing.assert_close(some.logprobs, full.logprobs[:, :, [10, 2]])
    assert torch.equal(some.norms, full.norms)  # norms at every token either way
    with pytest.raises(ValueError, match=r"positions \[11\] are outside the input's 11 tokens"):
        logit_lens(model, ids, positions=[0, 11])


def test_logit_lens_chunks_long_inputs(monkeypatch):
    import recon_fast.attribution.logit_lens as module

    model = causal_model("llama", seed=73)
    ids = torch.randint(0, VOCAB, (1, 50), generator=torch.Generator().manual_seed(74))
    whole = logit_lens(model, ids, k=2)
    monkeypatch.setattr(module, "LENS_CHUNK", 7)
    chunked = logit_lens(model, ids, k=2)
    assert torch.equal(whole.token_ids, chunked.token_ids)


# ---- chain of thought --------------------------------------------------------------------------
@pytest.mark.parametrize("text, steps", [
    ("If John has 3 apples...", ["If John has 3 apples..."]),
    ("John has 3.5 apples. He eats one! How many are left?", ["John has 3.5 apples.", "He eats one!", "How many are left?"]),
    ("Step 1: he has 3. He buys 2.\nStep 2: 3 + 2 = 5.\nSo: 5", ["Step 1: he has 3. He buys 2.", "Step 2: 3 + 2 = 5.", "So: 5"]),
    ("Step 1: a. b. Step 2: c.", ["Step 1: a. b.", "Step 2: c."]),
    ("first line\n\n  second line  \n", ["first line", "second line"]),
    ("Think.\n1. add\n2) carry", ["Think.", "1. add", "2) carry"]),
    ("   ", []),
])
def test_split_steps(text, steps):
    assert [text[a:b] for a, b in split_steps(text)] == steps


@pytest.mark.slow
def test_chain_of_thought_in_one_pass_equals_a_forward_per_step(smollm2):
    model, tokenizer = smollm2
    prompt = "John has 3 apples. He buys 2 more apples. How many apples does he have now?"
    steps = chain_of_thought(model, tokenizer, prompt)
    assert [s.text for s in steps] == ["John has 3 apples.", "He buys 2 more apples.", "How many apples does he have now?"]
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    for step in steps:
        # The step's last token is the one holding its last character.
        assert tokenizer.decode(ids[0, :step.token_index + 1]).endswith(step.text)
        alone = direct_logit_attribution(model, ids[:, :step.token_index + 1], tokenizer=tokenizer)
        assert torch.equal(step.attribution.target_id, alone.target_id)
        scale = float(alone.values.abs().max())
        torch.testing.assert_close(step.attribution.values, alone.values, rtol=1e-4, atol=1e-4 * scale)
        assert_sums_to_logit(step.attribution)


# ---- dtypes and devices --------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_half_precision_models_are_attributed_within_their_rounding(arch):
    """bfloat16 carries ~3 significant digits (eps 7.8e-3): the terms, summed in float64, land
    within a few of its roundings of the model's own bfloat16 logit (5e-3 seen), and the
    reconstruction check must not cry wolf."""
    model = causal_model(arch, seed=81, dtype=torch.bfloat16)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(82))
    attribution = direct_logit_attribution(model, ids, per_head=True)
    assert_sums_to_logit(attribution, rtol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cuda_attribution_equals_the_cpu_one(arch):
    model = causal_model(arch, seed=91, attn_implementation="eager")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(92))
    on_cpu = direct_logit_attribution(model, ids, per_head=True)
    on_gpu = direct_logit_attribution(model.to("cuda"), ids.to("cuda"), per_head=True)
    assert on_gpu.values.device.type == "cpu"  # results come back to the host, once
    assert torch.equal(on_cpu.target_id, on_gpu.target_id)
    assert_sums_to_logit(on_gpu)
    torch.testing.assert_close(on_gpu.values, on_cpu.values, rtol=1e-3, atol=1e-4)
    lens = logit_lens(model, ids.to("cuda"), k=2)
    assert torch.equal(lens.token_ids[-1, ..., 0], on_cpu.target_id.new_tensor(
        model(ids.to("cuda")).logits.argmax(-1).cpu()))


# ---- issue 10: NaN named, not misdiagnosed; every dropout in training mode refused; short reprs --------
def test_non_finite_weights_are_named_not_called_an_unknown_architecture():
    model = causal_model("llama", seed=71)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"non-finite.*L1\.mlp") as info:
        direct_logit_attribution(model, torch.arange(6))
    assert "adapter" not in str(info.value)
    lens = logit_lens(model, torch.arange(6), k=2)
    assert (lens.token_ids[:2] >= 0).all()  # embed and L0 are finite
    assert (lens.token_ids[2:] == -1).all() and torch.isnan(lens.logprobs[2:]).all()


def test_attention_dropout_in_training_mode_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=48, intermediate_size=96, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, attention_dropout=0.5, attn_implementation="eager")
    model = LlamaForCausalLM(config)
    model.train()
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())  # functional dropout only
    with pytest.raises(ValueError, match=r"training mode.*model.eval\(\)"):
        direct_logit_attribution(model, torch.arange(6))
    model.eval()
    direct_logit_attribution(model, torch.arange(6))


def test_reprs_are_short():
    model = causal_model("llama", seed=73)
    lens = logit_lens(model, torch.arange(40), k=5)
    attribution = direct_logit_attribution(model, torch.arange(40), per_head=True)
    for text in (repr(lens), repr(attribution)):
        assert len(text.splitlines()) == 1 and len(text) < 400, text
    assert "layers=3" in repr(lens) and "L0" in repr(attribution)


# ---- issue 13: logit differences, neurons, sources, the lens for any family -----------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_a_logit_difference_is_the_difference_of_two_attributions(arch):
    model = causal_model(arch, seed=101)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(102))
    with torch.no_grad():
        logits = model(ids).logits[:, -1].double()
    a, b = int(logits[0].argmax()), int(logits[0].argmin())
    for kwargs in ({}, {"per_head": True}, {"per_neuron": True}, {"by_source": True}):
        difference = direct_logit_attribution(model, ids, target=(a, b), **kwargs)
        first = direct_logit_attribution(model, ids, target=a, **kwargs)
        second = direct_logit_attribution(model, ids, target=b, **kwargs)
        assert difference.labels == first.labels and difference.versus_id.tolist() == [b, b]
        torch.testing.assert_close(difference.values, first.values - second.values, rtol=1e-9, atol=1e-9)
        expected = logits[:, a] - logits[:, b]
        torch.testing.assert_close(difference.logit, expected, rtol=1e-6, atol=1e-6)
        assert float(((difference.total() - expected).abs() / expected.abs()).max()) <= SUM_RTOL
    prediction = direct_logit_attribution(model, ids, target=(None, b))  # "why the prediction rather than b"
    assert torch.equal(prediction.target_id, logits.argmax(-1))


def test_a_logit_difference_from_texts_and_bad_pairs_are_named(word_tokenizer):
    model = causal_model("gpt2", seed=103)
    attribution = direct_logit_attribution(model, "t5 t9 t2", target=("t3", "t4"), tokenizer=word_tokenizer)
    assert attribution.target_text == ["t3"] and attribution.versus_text == ["t4"]
    assert attribution.to_dict()["sequences"][0]["versus_text"] == "t4"
    assert "versus='t4'" in repr(attribution)
    assert_sums_to_logit(attribution)
    with pytest.raises(ValueError, match="same token"):
        direct_logit_attribution(model, "t5 t9", target=("t3", 3), tokenizer=word_tokenizer)
    with pytest.raises(ValueError, match="a target tuple is \\(token, versus token\\).*got 3"):
        direct_logit_attribution(model, "t5 t9", target=(1, 2, 3), tokenizer=word_tokenizer)


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_neurons_and_sources_sum_to_their_component_and_head(arch):
    model = causal_model(arch, seed=105)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(106))
    heads = direct_logit_attribution(model, ids, position=-2, per_head=True)
    whole = direct_logit_attribution(model, ids, position=-2)
    both = direct_logit_attribution(model, ids, position=-2, per_neuron=True, by_source=True)
    assert_sums_to_logit(both)
    scale = float(whole.values.abs().max())
    for layer in range(2):
        neurons = [i for i, label in enumerate(both.labels) if label.startswith(f"L{layer}.N")]
        assert len(neurons) == anatomy(model).down_proj_weight(anatomy(model).blocks[layer]).shape[1]
        bias = both.values[:, both.labels.index(f"L{layer}.mlp_bias")] if f"L{layer}.mlp_bias" in both.labels else 0
        mlp = whole.values[:, whole.labels.index(f"L{layer}.mlp")]
        torch.testing.assert_close(both.values[:, neurons].sum(-1) + bias, mlp, rtol=1e-5, atol=1e-5 * scale)
        for head in range(4):
            sources = [i for i, label in enumerate(both.labels) if label.startswith(f"L{layer}.H{head}.S")]
            assert len(sources) == 11  # one per key; none after the query (position 9) carries anything
            assert bool((both.values[:, sources[10:]] == 0).all()) and bool((both.values[:, sources[:10]] != 0).all())
            torch.testing.assert_close(both.values[:, sources].sum(-1),
                                       heads.values[:, heads.labels.index(f"L{layer}.H{head}")], rtol=1e-5,
                                       atol=1e-5 * scale)
    top = both.top_neurons(3, layer=1)
    assert len(top) == 3 and all(label.startswith("L1.N") for label, _ in top)
    assert abs(top[0][1]) >= abs(top[1][1]) >= abs(top[2][1])
    overall = both.top_neurons(1)[0]
    assert abs(overall[1]) == max(abs(v) for _, v in both.top_neurons(1, layer=0) + both.top_neurons(1, layer=1))
    sources = both.top_sources(1, 2, k=3)
    assert len(sources) == 3 and all(0 <= j <= 9 for j, _ in sources)
    rows, columns, grid = both.grid()
    torch.testing.assert_close(grid[1, 2], torch.tensor(heads.values[0, heads.labels.index("L1.H2")].item(),
                                                        dtype=torch.float64), rtol=1e-5, atol=1e-5 * scale)


def test_by_source_keeps_attention_rows_of_the_attributed_queries_only(monkeypatch):
    from recon_fast.attribution.source_capture import SourceCapture

    shapes = []
    original = SourceCapture._keep

    def recording(self, layer, *args):
        original(self, layer, *args)
        shapes.append((tuple(self.rows[layer].shape), tuple(self.values[layer].shape)))

    monkeypatch.setattr(SourceCapture, "_keep", recording)
    model = causal_model("llama", seed=107)
    attribute_positions(model, torch.randint(0, VOCAB, (1, 40)), [5, -1], by_source=True)
    # [batch, heads, 2 queries, 40 keys] rows (never 40 x 40) and [batch, kv heads, 40, head_dim] values
    assert shapes == [((1, 4, 2, 40), (1, 2, 40, 12))] * 2
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    assert "eager" not in ALL_ATTENTION_FUNCTIONS._local_mapping  # the wrapping is undone


def test_an_attention_that_the_rows_do_not_reproduce_is_refused(monkeypatch):
    """If the recomputed rows missed something the model does (here: a scaling it is not told
    about), the split is refused rather than wrong."""
    from recon_fast.attribution import source_capture

    original = source_capture.SourceCapture._keep
    monkeypatch.setattr(source_capture.SourceCapture, "_keep",
                        lambda self, layer, module, q, k, v, mask, kwargs: original(self, layer, module, q * 1.5, k, v,
                                                                                  mask, kwargs))
    with pytest.raises(ValueError, match="do not reproduce its heads' outputs"):
        direct_logit_attribution(causal_model("gpt2", seed=108), torch.arange(8), by_source=True)



# ---- by_source's top-k mode: each head's k largest sources and one remainder -----------------------
def assert_top_sources_of(top, full, k: int, heads=None) -> None:
    """`top` (source_top_k=k) against `full`, the full source split of the same call: every
    other term, and the kept source terms, bit for bit; each sequence's k largest |term| of each
    head kept (a batch keeps their union), in position order; "S_rest" the sum of the others, so
    that a head adds up to its term (and to `heads`' per-head term) and all terms to the logit."""
    assert top.source_top_k == k and full.source_top_k is None and full.rest_magnitude is None
    index = {label: i for i, label in enumerate(full.labels)}
    batch, keys = full.values.shape[0], sum(label.startswith("L0.H0.S") for label in full.labels)
    others = [label for label in top.labels if ".S" not in label]
    assert others == [label for label in full.labels if ".S" not in label]
    assert torch.equal(top.values[:, [top.labels.index(l) for l in others]], full.values[:, [index[l] for l in others]])
    scale = float(full.values.abs().max())
    folded = torch.zeros(batch, dtype=torch.float64)
    for layer in range(full.n_layers):
        for head in range(full.n_heads):
            prefix = f"L{layer}.H{head}.S"
            columns = [i for i, label in enumerate(top.labels) if label.startswith(prefix)]
            names = [top.labels[i] for i in columns]
            assert names[-1] == f"L{layer}.H{head}.S_rest" and all(n[len(prefix):].isdigit() for n in names[:-1])
            kept = [int(n[len(prefix):]) for n in names[:-1]]
            assert kept == sorted(set(kept)) and (len(kept) == k if batch == 1 else k <= len(kept) <= batch * k)
            whole = full.values[:, [index[f"{prefix}{j}"] for j in range(keys)]]  # [B, Tk]
            assert torch.equal(top.values[:, columns[:-1]], whole[:, kept])
            dropped = [j for j in range(keys) if j not in kept]
            # Each sequence's k largest are kept: nothing dropped is larger than its k-th (ties aside).
            kth = whole.abs().topk(k, dim=-1).values[:, -1:]
            assert bool((whole[:, dropped].abs() <= kth).all()), (prefix, kept)
            rest = top.values[:, columns[-1]]
            torch.testing.assert_close(rest, whole[:, dropped].sum(-1), rtol=1e-12, atol=1e-12 * scale)
            torch.testing.assert_close(top.values[:, columns].sum(-1), whole.sum(-1), rtol=1e-12, atol=1e-12 * scale)
            if heads is not None:
                torch.testing.assert_close(top.values[:, columns].sum(-1), heads.values[:, heads.labels.index(
                    f"L{layer}.H{head}")], rtol=1e-5, atol=1e-5 * scale)
            folded += whole[:, dropped].abs().sum(-1)
    torch.testing.assert_close(top.rest_magnitude, folded, rtol=1e-12, atol=1e-12 * scale)
    assert_sums_to_logit(top)
    torch.testing.assert_close(top.total(), full.total(), rtol=1e-12, atol=1e-12 * scale)
    for row in range(batch):  # the top k terms are the full split's: a remainder is not a single term
        for share in ("top", "total"):
            listed, expected = top.top(k, row, share), full.top(k, row, share)
            assert [(label, value) for label, value, _ in listed] == [(label, value) for label, value, _ in expected]
            assert [p for _, _, p in listed] == pytest.approx([p for _, _, p in expected], rel=1e-9)
        # Further down, the list is the full one's without the sources that were not kept.
        listed, kept = top.top(len(top.labels), row, "total"), set(top.labels)
        expected = [term for term in full.top(len(full.labels), row, "total") if term[0] in kept]
        assert [(label, value) for label, value, _ in listed] == [(label, value) for label, value, _ in expected]
        assert [p for _, _, p in listed] == pytest.approx([p for _, _, p in expected], rel=1e-9)
        assert top.head_totals(row) == pytest.approx(full.head_totals(row), rel=1e-9, abs=1e-12 * scale)
        torch.testing.assert_close(top.grid(row)[2], full.grid(row)[2], rtol=1e-9, atol=1e-12 * scale)
        for layer in range(full.n_layers):
            assert top.top_sources(layer, 1, k, row) == full.top_sources(layer, 1, k, row)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_top_k_sources_are_the_full_splits_largest_and_a_remainder(arch, k, batch):
    model = causal_model(arch, seed=121)
    ids = torch.randint(0, VOCAB, (batch, 11), generator=torch.Generator().manual_seed(122))
    full = direct_logit_attribution(model, ids, position=-2, by_source=True, per_neuron=True)
    top = direct_logit_attribution(model, ids, position=-2, by_source=True, per_neuron=True, source_top_k=k)
    heads = direct_logit_attribution(model, ids, position=-2, per_head=True)
    assert_top_sources_of(top, full, k, heads)
    assert len(top.labels) < len(full.labels)


def test_top_k_sources_at_several_positions_are_each_positions_own():
    model = causal_model("llama", seed=123)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(124))
    full = attribute_positions(model, ids, [3, -1], by_source=True)
    top = attribute_positions(model, ids, [3, -1], by_source=True, source_top_k=2)
    for one, whole in zip(top, full):
        assert_top_sources_of(one, whole, 2)
    assert top[0].labels != top[1].labels  # each query read its own sources


def test_top_k_never_keeps_a_key_the_query_cannot_see():
    """At position 1 a causal query reads keys 0 and 1 only: the others weigh 0, and a top 4 must
    not fill up with them (ties, naming tokens after the query); the sums stay exact."""
    model = causal_model("llama", seed=123)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(124))
    full = attribute_positions(model, ids, [1], by_source=True)[0]
    top = attribute_positions(model, ids, [1], by_source=True, source_top_k=4)[0]
    kept = [int(label.rsplit(".S", 1)[1]) for label in top.labels if ".S" in label and not label.endswith("S_rest")]
    assert kept and max(kept) <= 1
    torch.testing.assert_close(top.total(), full.total(), rtol=1e-12, atol=1e-12)
    assert [j for j, _ in top.top_sources(0, 0, 4)] == [j for j, v in full.top_sources(0, 0, 4) if v != 0]


@pytest.mark.parametrize("k", [11, 50])
def test_top_k_sources_of_every_key_are_the_full_split(k):
    """k at least the number of keys (11) cuts nothing: no remainder terms, source_top_k None."""
    model = causal_model("gpt2", seed=125)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(126))
    full = direct_logit_attribution(model, ids, by_source=True)
    top = direct_logit_attribution(model, ids, by_source=True, source_top_k=k)
    assert top.labels == full.labels and torch.equal(top.values, full.values)
    assert top.source_top_k is None and top.rest_magnitude is None
    assert top.to_dict() == full.to_dict() and full.to_dict()["source_top_k"] is None


def test_top_k_sources_serialise_name_and_refuse_what_they_lack():
    from recon_fast.attribution_labels import layer_term
    from recon_fast.cli.attribution import display_names

    model = causal_model("neox", seed=127)
    top = direct_logit_attribution(model, torch.arange(9), by_source=True, source_top_k=2)
    document = top.to_dict()
    assert document["source_top_k"] == 2 and document["labels"] == top.labels
    assert document["sequences"][0]["rest_magnitude"] == float(top.rest_magnitude[0])
    assert layer_term("L1.H2.S_rest") == (1, "H2.S_rest") and layer_term("L1.H2.Srest") is None
    assert display_names(["L1.H2.S_rest", "L1.H2.S7"]) == {"L1.H2.S_rest": "Head L1.H2<-rest",
                                                           "L1.H2.S7": "Head L1.H2<-7   "}
    assert all(".S_rest" not in label for label, _, _ in top.top(len(top.labels)))
    assert len(top.top_sources(0, 0, k=2)) == 2
    with pytest.raises(ValueError, match=r"top_sources\(k=3\): this attribution kept the 2 largest sources"):
        top.top_sources(0, 0, k=3)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="source_top_k must be a positive int or None"):
            direct_logit_attribution(model, torch.arange(9), by_source=True, source_top_k=bad)
    with pytest.raises(ValueError, match="it needs by_source=True"):
        direct_logit_attribution(model, torch.arange(9), per_head=True, source_top_k=2)

@pytest.mark.parametrize("position", [-1, 3])
def test_gpt2_neurons_agree_with_transformer_lens(word_tokenizer, position):
    pytest.importorskip("transformer_lens")
    import transformer_lens.model_bridge.sources.transformers  # noqa: F401  (attaches boot_transformers)
    from transformer_lens.model_bridge import TransformerBridge

    model = causal_model("gpt2", seed=109, attn_implementation="eager")
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(110))
    ours = direct_logit_attribution(model, ids, position=position, per_neuron=True)
    bridge = TransformerBridge.boot_transformers("gpt2", hf_model=copy.deepcopy(model), tokenizer=word_tokenizer)
    bridge.enable_compatibility_mode(disable_warnings=True, center_unembed=False, fold_value_biases=False)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids)
        direction = bridge.tokens_to_residual_directions(int(ours.target_id[0]))
        neurons, labels = cache.stack_neuron_results(layer=-1, pos_slice=position, return_labels=True,
                                                     apply_ln=True, project_output_onto=direction)
    tl = neurons[:, 0].double().flatten()
    mine = ours.values[0, [ours.labels.index(f"L{l.split('N')[0][1:]}.N{l.split('N')[1]}") for l in labels]]
    assert len(labels) == 2 * 192
    largest = float(mine.abs().max())
    torch.testing.assert_close(mine, tl, rtol=1e-4, atol=1e-4 * largest)


def test_logit_lens_serves_families_without_an_attribution_adapter():
    """OPT has no attribution adapter, but a final norm and an unembedding are all the lens needs."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = perturb_vectors(OPTForCausalLM(OPTConfig(num_hidden_layers=2, hidden_size=16, ffn_dim=32,
                                                     num_attention_heads=2, vocab_size=VOCAB,
                                                     word_embed_proj_dim=16)).eval())
    ids = torch.randint(1, VOCAB, (1, 7), generator=torch.Generator().manual_seed(111))
    lens = logit_lens(model, ids, k=2)
    with torch.no_grad():
        output = model(ids)
    assert lens.layers == ["embed", "L0", "L1"]
    assert torch.equal(lens.token_ids[-1, ..., 0], output.logits.argmax(-1))
    torch.testing.assert_close(lens.logprobs[-1, ..., 0], torch.log_softmax(output.logits, -1).amax(-1))
    with pytest.raises(ValueError, match="no attribution adapter"):
        direct_logit_attribution(model, ids)
    with pytest.raises(ValueError, match=r"^the logit lens needs a final norm and an unembedding: BertModel "
                                         r"\(model_type 'bert'\) lacks an unembedding"):
        logit_lens(make_model("bert"), torch.arange(6))
