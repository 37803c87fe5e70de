"""attention_stats with the linear statistics on a P.V product (issue 18, route a), in plain
PyTorch: the numerics the CUDA kernel's tensor-core path is to use, checkable without a GPU.

Per key block, relative to the running max m (base 2, s2 = scaling * log2(e) * q.k):
  w = 2^(s2 - m); l = sum w (float32, exact weights);
  [P K | P col | P 1] = w~ @ [K | j - j0 | 1], with w~ = hi + lo, hi = w rounded to the input's
  16-bit type and lo = (w - hi) rounded again (two mma's on the GPU: ~16 bits of the weight, so
  mean_distance keeps its 1e-3-token tolerance; float16 splits w * 2^15, see _split16),
  accumulated in float32 and rescaled on a new max; u_far = sum over blocks of (i' - j0) * sum w.
Then E_w[s2 - m] = (q.(P K) * scale2 - m * (P 1)) / (P 1) (the cancellation happens between two
float32 numbers near m * l), entropy = ln2 (log2 l - E_w[s2 - m]),
mean_distance = (u_far - P col) / l.
Only valid for scores linear in k: no soft-cap, no additive mask (those keep the exact per-score
path of attention_stats). This module validates numerics; it is not faster than the C++ CPU op.
csrc/cuda/attention_stats_mma_kernel.cu (RECON_FAST_ATTENTION_KERNEL=mma) is this arithmetic on
the tensor cores; tests/test_attention_stats_linear.py runs both against the float64 reference.

The limit of the formulation: E_w[s2] comes from q.(P K), a float32 dot whose rounding scales with
|q| |k| scaling rather than with s2 - m, so a very sharp head (|q| |k| scaling ~ 100 nats, entropy
~ 1e-3) misses the entropy's 1e-4 relative tolerance by ~1e-5 absolute (test_the_limit_...); the
per-score kernels, which sum w (s2 - m) directly, do not.
"""

from __future__ import annotations

import math

import torch

from recon_fast.kernels.attention_stats import visible_keys
from recon_fast.kernels.stats_tables import ATTENTION_STATS_TABLE

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def _split16(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w as the sum of two values of `dtype` (what two mma's see), back in float32. float16 takes
    w * 2^15 (exact; below 65504): its 5 exponent bits would otherwise lose the bits of weights
    below 2^-14, and a sharp head's many tiny weights times their large s2 - m cost the entropy
    ~1e-5. bfloat16 has float32's range."""
    if dtype not in (torch.bfloat16, torch.float16):
        return w
    scale = 2.0 ** 15 if dtype == torch.float16 else 1.0
    ws = w * scale
    hi = ws.to(dtype)
    return (hi.float() + (ws - hi.float()).to(dtype).float()) / scale


def attention_stats_linear(q, k, *, scaling=None, causal=True, window=None, key_padding_mask=None,
                           sink_tokens=4, key_block=64):
    """float32 [B, H, Tq, NUM_ATTENTION_STATS] (channels as ATTENTION_STATS) by the linear
    formulation above."""
    batch, heads, q_len, dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scaling = dim ** -0.5 if scaling is None else scaling
    scale2 = scaling * _LOG2E
    dev = q.device
    qf = q.float().reshape(batch, kv_heads, group * q_len, dim)  # exact for 16-bit inputs
    pos = torch.arange(q_len, device=dev) + (k_len - q_len)
    shape = (batch, heads, q_len)
    m = torch.full(shape, -math.inf, device=dev)
    l, u_far, sink, self_w, prev_w = (torch.zeros(shape, device=dev) for _ in range(5))
    pk = torch.zeros(*shape, dim, device=dev)
    pcol, pone = torch.zeros(shape, device=dev), torch.zeros(shape, device=dev)
    argmax = torch.zeros(shape, dtype=torch.long, device=dev)
    for j0 in range(0, k_len, key_block):
        j1 = min(k_len, j0 + key_block)
        j = torch.arange(j0, j1, device=dev)
        kb = k[:, :, j0:j1].float()
        s2 = ((qf @ kb.transpose(-1, -2)) * scale2).reshape(batch, heads, q_len, j1 - j0)
        s2 = s2.masked_fill(~visible_keys(pos, j, causal, window), -math.inf)
        if key_padding_mask is not None:
            s2 = s2.masked_fill(~key_padding_mask[:, None, None, j0:j1], -math.inf)
        block_max = s2.amax(-1)
        m_new = torch.maximum(m, block_max)
        shift = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        alpha = torch.exp2(m - shift)
        w = torch.exp2((s2 - shift[..., None]).clamp_min(-200.0))
        w = torch.where(torch.isneginf(s2), torch.zeros_like(w), w)
        wt = _split16(w, q.dtype)
        l = alpha * l + w.sum(-1)
        u_far = alpha * u_far + (pos - j0).float() * w.sum(-1)
        wg = wt.reshape(batch, kv_heads, group * q_len, j1 - j0)
        pk = alpha[..., None] * pk + (wg @ kb).reshape(*shape, dim)
        pcol = alpha * pcol + (wt * (j - j0).float()).sum(-1)
        pone = alpha * pone + wt.sum(-1)
        sink = alpha * sink + w[..., : max(0, sink_tokens - j0)].sum(-1)
        self_w = alpha * self_w + (w * (j[None] == pos[:, None])).sum(-1)
        prev_w = alpha * prev_w + (w * (j[None] == pos[:, None] - 1)).sum(-1)
        argmax = torch.where(block_max > m, j0 + s2.argmax(-1), argmax)
        m = m_new
    dot = (q.float() * pk).sum(-1) * scale2  # sum w~ s2, then centred on m
    centred = (dot - m * pone) / pone
    log2_l = torch.log2(l)
    stats = ATTENTION_STATS_TABLE.stack({
        "entropy": _LN2 * (log2_l - centred), "max_weight": 1 / l, "argmax": argmax.float(), "sink_mass": sink / l,
        "mean_distance": (u_far - pcol) / l, "self_weight": self_w / l, "prev_weight": prev_w / l,
        "lse": _LN2 * (m + log2_l)}, by="attention_stats_linear")
    return torch.where((l > 0)[..., None], stats, torch.full_like(stats, math.nan))
