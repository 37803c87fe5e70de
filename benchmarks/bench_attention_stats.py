"""attention_stats (the op alone) against torch's sdpa forward on the same q, k, v (the baseline:
the attention the model runs anyway) and the plain-PyTorch blocked reference (the fallback).

CPU: SmolLM2-135M's attention shape (9 heads, 3 kv heads, head_dim 64, batch 1), float32,
causal, at T = 2048 and 8192; the target is the op <= 0.7x sdpa. CUDA (skipped without a GPU): a
1B-class Llama shape (32 heads, 8 kv heads, head_dim 64), bf16, T = 4096 and 32768.
"""

import pytest
import torch
import torch.nn.functional as F

from recon_fast.kernels.attention_stats import attention_stats, attention_stats_ref

CASES = [
    # device, heads, kv_heads, head_dim, T, dtype
    ("cpu", 9, 3, 64, 2048, torch.float32),
    ("cpu", 9, 3, 64, 8192, torch.float32),
    ("cuda", 32, 8, 64, 4096, torch.bfloat16),
    ("cuda", 32, 8, 64, 32768, torch.bfloat16),
]


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


IMPLS = {
    "sdpa forward (causal)": lambda q, k, v: _sdpa(q, k, v),
    "attention_stats": lambda q, k, v: attention_stats(q, k),
    "attention_stats_ref (blocked torch)": lambda q, k, v: attention_stats_ref(q, k),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("device, heads, kv_heads, dim, T, dtype", CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_attention_stats_time(record, impl, device, heads, kv_heads, dim, T, dtype):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if impl.startswith("attention_stats_ref") and T > 8192:
        pytest.skip("the blocked reference at 32k is minutes of matmuls, not a useful baseline")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, T, dim, generator=g).to(dtype).to(device)
               for h in (heads, kv_heads, kv_heads))
    fn = IMPLS[impl]
    slow = device == "cpu" and (T > 2048 or impl.startswith("attention_stats_ref"))
    record(
        f"attention_stats {device} H={heads} Hkv={kv_heads} D={dim} T={T} "
        f"{str(dtype).removeprefix('torch.')}",
        impl,
        lambda: fn(q, k, v),
        device=device,
        baseline=impl.startswith("sdpa"),
        rounds=3 if slow else None,
    )
