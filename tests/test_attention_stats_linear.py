"""The linear formulation (statistics on a P.V product, kernels/attention_stats_linear.py) against
the dense float64 softmax at test_attention_stats' tolerances, fp32/bf16/fp16, sharp heads: the
numerics the CUDA tensor-core path uses. (The CUDA kernel itself is verified only on a GPU.)"""

import pytest
import torch

from recon_fast.kernels.attention_stats_linear import attention_stats_linear

from test_attention_stats import CASES, assert_attention_close, make_qk

LINEAR_CASES = {name: c for name, c in CASES.items() if "softcap" not in c[6]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_route_matches_dense_float64(dtype, case):
    batch, heads, kv_heads, q_len, k_len, dim, options, sharpness = LINEAR_CASES[case]
    q, k = make_qk(batch, heads, kv_heads, q_len, k_len, dim, dtype, "cpu", sharpness=sharpness,
                   seed=q_len + dim)
    got = attention_stats_linear(q, k, **options)
    assert_attention_close(got, q, k, scaling=dim ** -0.5, **options)


def test_linear_route_very_sharp_heads_and_padding():
    q, k = make_qk(2, 4, 2, 96, 96, 64, torch.bfloat16, "cpu", sharpness=12.0, seed=3)
    keep = torch.ones(2, 96, dtype=torch.bool)
    keep[0, :10] = False
    got = attention_stats_linear(q, k, key_padding_mask=keep)
    assert_attention_close(got, q, k, scaling=0.125, key_padding_mask=keep)
