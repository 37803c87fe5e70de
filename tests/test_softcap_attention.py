"""softcap_attention: Gemma2's eager attention output in blocks of queries, checked against the
family's own eager_attention_forward with transformers' own eager mask (float64 inputs for the
reference; the same dtype for bit-level agreement), then through the Tracer on a Gemma2 set to
sdpa, and for memory: no allocation of T x T floats at T = 4096."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from test_attention_tracing import assert_matches_eager, build, eager_twin, left_padded
from tiny_models import VOCAB

from recon_fast import Tracer
from recon_fast.kernels import softcap_attention as softcap_module
from recon_fast.kernels.softcap_attention import query_block, softcap_attention
from recon_fast.trace import attention_intercept

SOFTCAP = 2.0  # low enough to bite: the raw scores below reach several times the cap

# (name, batch, heads, kv_heads, q_len, k_len, head_dim, causal, window, left padding per batch row)
CASES = [
    ("heads_1_to_1", 2, 4, 4, 13, 13, 16, True, None, (0, 3)),
    ("gqa_2", 2, 4, 2, 13, 13, 16, True, None, (0, 5)),
    ("gqa_4_kv_cache", 2, 4, 1, 5, 23, 8, True, None, (0, 4)),
    ("window", 2, 4, 2, 17, 17, 8, True, 4, (0, 6)),
    ("window_kv_cache", 1, 4, 1, 3, 11, 8, True, 4, (0,)),
    ("decode_step", 2, 2, 1, 1, 9, 8, True, None, (0, 2)),
    ("bidirectional", 2, 4, 2, 9, 9, 8, False, None, (0, 3)),
]
# fp32: against float64, a few roundings of scores (|s| <= softcap after the cap) and of sums
# of <= 23 weighted values of size ~1 at eps 1.2e-7; measured worst 4.4e-7 over 20 seeds.
# bf16: eps 2^-8 on the scores moves each weight ~1% and the cast of the weights ~0.4%; the
# family's eager in bfloat16 itself is 1.1e-2 off float64 at worst over 20 seeds.
ATOL_VS_FLOAT64 = {torch.float32: 2e-6, torch.bfloat16: 4e-2}


def sample_inputs(case, dtype, seed=0):
    _, batch, heads, kv_heads, q_len, k_len, head_dim, causal, window, pads = case
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=generator) * 2
    k = torch.randn(batch, kv_heads, k_len, head_dim, generator=generator) * 2
    v = torch.randn(batch, kv_heads, k_len, head_dim, generator=generator)
    padding = torch.ones(batch, k_len, dtype=torch.bool)
    for row, pad in enumerate(pads):
        padding[row, :pad] = False
    return q.to(dtype), k.to(dtype), v.to(dtype), dict(causal=causal, window=window, key_padding_mask=padding)


def eager_mask_of(q, k, causal, window, key_padding_mask, dtype):
    """transformers' own eager mask [B, 1, Tq, Tk] for queries that are the last Tq of Tk keys."""
    from transformers.masking_utils import (bidirectional_mask_function, causal_mask_function, eager_mask,
                                            sliding_window_causal_mask_function)

    assert causal or window is None
    function = (causal_mask_function if window is None else sliding_window_causal_mask_function(window)) if causal \
        else bidirectional_mask_function
    q_len, k_len = q.shape[2], k.shape[2]
    return eager_mask(q.shape[0], q_len, k_len, q_offset=k_len - q_len, mask_function=function,
                      attention_mask=key_padding_mask, dtype=dtype)


def eager(q, k, v, mask, dtype, dropout=0.0, training=False):
    """Gemma2's eager_attention_forward on `dtype` copies: [B, Tq, H, D]."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    module = SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], head_dim=q.shape[-1], training=training)
    output, _ = eager_attention_forward(module, q.to(dtype), k.to(dtype), v.to(dtype), mask, dropout=dropout,
                                        scaling=q.shape[-1] ** -0.5, softcap=SOFTCAP)
    return output


def rows_budget(q, k, rows):
    """block_bytes that makes blocks of exactly `rows` query rows."""
    budget = 4 * q.shape[0] * q.shape[1] * k.shape[2] * rows
    assert query_block(q.shape[0], q.shape[1], k.shape[2], budget) == rows
    return budget


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [None, 3, 1], ids=lambda r: f"rows{r}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_equals_eager_in_float64_and_in_its_own_dtype(case, rows, dtype):
    """Blocks of 3 rows end mid-sequence (13, 17, 23... are not multiples), of 1 row are decoding."""
    q, k, v, masks = sample_inputs(case, dtype)
    budget = None if rows is None else rows_budget(q, k, rows)
    got = softcap_attention(q, k, v, softcap=SOFTCAP, scaling=q.shape[-1] ** -0.5, block_bytes=budget, **masks)
    assert got.shape == (q.shape[0], q.shape[2], q.shape[1], v.shape[-1]) and got.dtype == dtype

    reference = eager(q, k, v, eager_mask_of(q, k, **masks, dtype=torch.float64), torch.float64)
    # Rows that see no key are NaN in the float64 reference (its float32 softmax turns float64's
    # min into -inf): they are checked against eager in the input dtype below and in their own test.
    sees = (eager_mask_of(q, k, **masks, dtype=torch.float32) == 0).any(-1)[:, 0]  # [B, Tq]
    torch.testing.assert_close(got.double()[sees], reference[sees], atol=ATOL_VS_FLOAT64[dtype], rtol=0)

    # The same operations in the same dtype: equal but for the matmuls' shapes (query blocks, and
    # GQA's grouped heads in one matmul), which change BLAS's blocking: last-bit differences.
    same = eager(q, k, v, eager_mask_of(q, k, **masks, dtype=dtype), dtype)
    torch.testing.assert_close(got, same)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_that_see_no_key_average_every_value_as_eager_does(dtype):
    """eager adds finfo.min to every masked key; beside a soft-capped score the sum is finfo.min
    itself, so a row with no visible key is uniform over all Tk keys: the mean of v, not NaN."""
    q, k, v, masks = sample_inputs(CASES[1], dtype)  # row 1: five left-padded keys
    got = softcap_attention(q, k, v, softcap=SOFTCAP, block_bytes=rows_budget(q, k, 2), **masks)
    same = eager(q, k, v, eager_mask_of(q, k, **masks, dtype=dtype), dtype)
    blind = slice(0, 5)  # queries 0..4 of row 1 see only padded keys
    assert not got.isnan().any()
    torch.testing.assert_close(got[1, blind], same[1, blind], atol=0, rtol=0)
    mean = v[1].float().mean(1).repeat_interleave(q.shape[1] // k.shape[1], 0)  # [H, D]
    # bf16: the weight 1/13 rounds by 0.4% and the output once more, on values of size ~1-3.
    torch.testing.assert_close(got[1, blind].float(), mean.expand(5, -1, -1), atol=1e-2 if dtype == torch.bfloat16
                               else 1e-6, rtol=0)


def test_dropout_only_when_training():
    q, k, v, masks = sample_inputs(CASES[1], torch.float32)
    plain = softcap_attention(q, k, v, softcap=SOFTCAP, **masks)
    assert torch.equal(softcap_attention(q, k, v, softcap=SOFTCAP, dropout=0.5, training=False, **masks), plain)
    dropped = softcap_attention(q, k, v, softcap=SOFTCAP, dropout=1.0, training=True, **masks)
    assert torch.equal(dropped, torch.zeros_like(plain))  # as eager's F.dropout(p=1): every weight dropped


def test_bad_arguments_name_what_failed():
    q, k, v, masks = sample_inputs(CASES[1], torch.float32)
    with pytest.raises(ValueError, match="not a multiple"):
        softcap_attention(q, k[:, :1].expand(-1, 3, -1, -1), v[:, :1].expand(-1, 3, -1, -1), softcap=SOFTCAP)
    with pytest.raises(ValueError, match="share a dtype"):
        softcap_attention(q, k.double(), v, softcap=SOFTCAP)
    with pytest.raises(ValueError, match="window must be at least 1"):
        softcap_attention(q, k, v, softcap=SOFTCAP, window=0)
    with pytest.raises(ValueError, match=r"key_padding_mask must be bool \[2, 13\]"):
        softcap_attention(q, k, v, softcap=SOFTCAP, key_padding_mask=masks["key_padding_mask"].long())


# ---- through the Tracer: a Gemma2 set to sdpa -----------------------------------------------------------
needs_refusing_sdpa = pytest.mark.skipif(
    attention_intercept.sdpa_drops_softcap(),
    reason="this transformers' sdpa drops the soft-cap (< 5.21): the traced run follows the model's sdpa")


def gemma2_under_sdpa():
    model = build("gemma2")  # eager: transformers refuses sdpa for Gemma2 at construction
    model.config._attn_implementation_internal = "sdpa"
    return model


@needs_refusing_sdpa
def test_gemma2_under_sdpa_equals_eager_in_logits_and_statistics(monkeypatch):
    model = gemma2_under_sdpa()
    inputs = left_padded()  # 3 x 13 tokens, 4 heads: blocks of 4 query rows end mid-sequence
    monkeypatch.setattr(softcap_module, "BLOCK_BYTES", 4 * 3 * 4 * 13 * 4)
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs["window"])
        return softcap_attention(*args, **kwargs)

    monkeypatch.setattr(attention_intercept, "softcap_attention", counted)
    with torch.no_grad():
        eager = eager_twin(model)(**inputs, output_attentions=True)
    tracer = Tracer(model, attention="stats")
    traced = tracer.run(inputs).logits
    assert calls == [4, None]  # both layers, the sliding one and the full one, took the blocked path
    # Only the matmuls' blocking differs from eager: float32 roundings, far below 1e-5.
    torch.testing.assert_close(traced, eager.logits, atol=1e-5, rtol=0)
    assert_matches_eager(tracer.cube.attention_data, list(eager.attentions), inputs["attention_mask"].bool().numpy())
    assert model.config._attn_implementation == "sdpa"


@needs_refusing_sdpa
def test_gemma2_under_sdpa_generates_as_eager_with_its_cache():
    """Decoding: one query against a cache, the sliding layers' caches dropping their first keys."""
    model = gemma2_under_sdpa()
    prompt = left_padded(batch=2, length=6)
    tracer = Tracer(model, attention="stats")
    sequences = tracer.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = eager_twin(model).generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(sequences, expected)
    fed = sequences.shape[1] - 1
    mask = torch.cat([prompt["attention_mask"], torch.ones(2, sequences.shape[1] - 6, dtype=torch.long)], 1)[:, :fed]
    with torch.no_grad():
        eager = eager_twin(model)(input_ids=sequences[:, :fed], attention_mask=mask, output_attentions=True)
    assert_matches_eager(tracer.cube.attention_data, list(eager.attentions), mask.bool().numpy())


@needs_refusing_sdpa
def test_a_mask_beyond_causal_window_padding_gets_the_family_eager_function(monkeypatch):
    """Where the compact form does not describe the mask (static caches, packed sequences), the
    eager function runs on the eager mask: eager's output to the bit."""
    model = gemma2_under_sdpa()
    monkeypatch.setattr(attention_intercept.CompactMask, "_compact", lambda self, key_length: None)
    with torch.no_grad():
        eager = eager_twin(model)(**left_padded()).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the slow path's warning, once per process
        traced = Tracer(model, attention="stats").run(left_padded()).logits
    assert torch.equal(traced, eager)


def largest_allocation(run) -> tuple[object, int]:
    """(run(), the largest single CPU allocation in bytes while it ran), from the profiler's raw
    memory records (one per allocation and free; the per-op figures are net sums)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = run()
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert sizes, "the profiler recorded no allocation"
    return result, max(sizes)


@needs_refusing_sdpa
def test_no_square_allocation_at_4096_tokens(monkeypatch):
    """The traced Gemma2 under sdpa allocates nothing near T x T floats: its largest allocation is
    the score tile, under a 4 MiB budget (the default 64 MiB would equal T * T * 4 here, at 4096).
    The eager model on the same input, measured the same way, allocates its [1, 2, T, T] scores,
    so the measurement sees what the old fallback did."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    length, budget = 4096, 4 * 2**20
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=VOCAB, num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=length, sliding_window=512,
        attn_logit_softcapping=SOFTCAP, query_pre_attn_scalar=8, attn_implementation="eager", bos_token_id=0,
        eos_token_id=0, pad_token_id=0)).eval()
    ids = torch.randint(1, VOCAB, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager, eager_largest = largest_allocation(lambda: model(ids).logits)
    assert eager_largest >= 2 * length * length * 4

    model.config._attn_implementation_internal = "sdpa"
    monkeypatch.setattr(softcap_module, "BLOCK_BYTES", budget)
    traced, traced_largest = largest_allocation(lambda: Tracer(model, attention="stats").run(ids).logits)
    assert traced_largest <= budget < length * length * 4, f"largest allocation {traced_largest} bytes"
    torch.testing.assert_close(traced, eager, atol=1e-5, rtol=0)


def test_before_transformers_5_21_the_traced_run_drops_the_cap_as_sdpa_did(monkeypatch):
    """transformers < 5.21: sdpa took a soft-cap and dropped it. Simulated here on any version:
    the traced run must follow the model (uncapped, logits bit-identical, a warning) and its
    statistics describe the attention that ran: an uncapped eager twin's."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def sdpa_dropping_the_cap(module, query, key, value, attention_mask, **kwargs):
        return sdpa(module, query, key, value, attention_mask, **{**kwargs, "softcap": None})

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", sdpa_dropping_the_cap)
    monkeypatch.setattr(attention_intercept, "sdpa_drops_softcap", lambda: True)
    monkeypatch.setattr(attention_intercept, "_warned", set())
    model = gemma2_under_sdpa()
    inputs = left_padded()
    with torch.no_grad():
        untraced = model(**inputs).logits
        capped = eager_twin(model)(**inputs).logits
        uncapped_twin = eager_twin(model)
        for module in uncapped_twin.modules():
            if hasattr(module, "attn_logit_softcapping"):
                module.attn_logit_softcapping = None
        uncapped = uncapped_twin(**inputs, output_attentions=True)
    assert not torch.allclose(untraced, capped)  # the cap bites: dropping it shows
    tracer = Tracer(model, attention="stats")
    with pytest.warns(UserWarning, match="ignores the attention soft-cap"):
        traced = tracer.run(inputs).logits
    assert torch.equal(traced, untraced)
    assert_matches_eager(tracer.cube.attention_data, list(uncapped.attentions), inputs["attention_mask"].bool().numpy())
