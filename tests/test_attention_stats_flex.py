"""Route (b), attention_stats by FlexAttention (kernels/attention_stats_flex.py), against the same
dense float64 softmax and tolerances as tests/test_attention_stats.py: fp32 and bf16, GQA, causal,
a window over a KV cache, sharp heads, key padding. FlexAttention compiles on the CPU (inductor C++,
seconds per shape), so the cases are few and small; the CUDA case exercises the aux outputs (lse,
row max) that CPU flex does not return."""

import pytest
import torch

from recon_fast.kernels.attention_stats_flex import attention_stats_flex

from test_attention_stats import CASES, assert_attention_close, make_qk

FLEX_CASES = ["gqa3-causal-130", "sharp-128", "window-100-kv-cache"]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", FLEX_CASES)
def test_flex_route_matches_dense_float64(dtype, case):
    batch, heads, kv_heads, q_len, k_len, dim, options, sharpness = CASES[case]
    q, k = make_qk(batch, heads, kv_heads, q_len, k_len, dim, dtype, "cpu", sharpness=sharpness,
                   seed=q_len + dim)
    got = attention_stats_flex(q, k, **options)
    assert got.shape == (batch, heads, q_len, 8) and got.dtype == torch.float32
    assert_attention_close(got, q, k, scaling=dim ** -0.5, **options)


@pytest.mark.slow
def test_flex_route_key_padding_and_rows_that_see_nothing():
    q, k = make_qk(3, 6, 3, 100, 100, 64, torch.bfloat16, "cpu", sharpness=2.0)
    keep = torch.ones(3, 100, dtype=torch.bool)
    keep[0, :37] = False  # left padding: the first 37 queries of row 0 see nothing
    keep[1, 60:] = False
    keep[2, ::3] = False  # holes, sink keys among them
    got = attention_stats_flex(q, k, key_padding_mask=keep)
    assert torch.isnan(got[0, :, :37]).all() and not torch.isnan(got[0, :, 37:]).any()
    assert_attention_close(got, q, k, scaling=0.125, key_padding_mask=keep)


def test_flex_route_rejects_what_it_cannot_do():
    q, k = make_qk(1, 3, 2, 8, 8, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="not a multiple of k's 2"):
        attention_stats_flex(q, k)
    with pytest.raises(ValueError, match="precision must be"):
        attention_stats_flex(q, k[:, :1], precision="tf32")


@pytest.mark.cuda
def test_flex_route_on_cuda_reads_lse_and_max_from_flex():
    batch, heads, kv_heads, q_len, k_len, dim, options, sharpness = CASES["gqa3-causal-130"]
    q, k = make_qk(batch, heads, kv_heads, q_len, k_len, dim, torch.bfloat16, "cuda", sharpness=sharpness)
    assert_attention_close(attention_stats_flex(q, k, **options), q, k, scaling=dim ** -0.5, **options)
