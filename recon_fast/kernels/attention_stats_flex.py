"""attention_stats by FlexAttention (issue 18, route b): the statistics that are linear in the
probabilities ride on flex_attention's own P.V, with V = [K | j | 1 | j < sink_tokens]; the rest
comes from its auxiliary outputs and two small passes. For measuring against the compiled op
(benchmarks/bench_attention_stats.py); attention_stats stays the one the tracer uses.

  pass 1 (flex): out = softmax(s) [K | j | 1 | sink]: E_p[s] = scaling q.E_p[k], so
      entropy = lse - E_p[s], mean_distance = i' - E_p[j], sink_mass; on CUDA its aux gives lse
      and the row max (max_weight = exp(max - lse)). CPU flex returns neither (torch 2.13: "CPU
      only supports inference and return_lse is not supported yet"): there a blocked plain-PyTorch
      pass computes them, so CPU timings say little about the route on a GPU.
  pass 2 (flex): the argmax, as a running index cannot ride on P.V: score_mod keeps only the keys
      whose score is within delta of the row max and scores them -30 j, so softmax puts all its
      weight on the first of them; out = E[j] over those is the first index (ties: the first).
  O(T d): self and previous weights, exp(s - lse) at j = i' and i' - 1.

Numerics. flex rounds P to V's dtype before P.V (torch/_inductor/kernel/flex/templates:
p.to(MATMUL_PRECISION)); a 16-bit P misses the tolerances (mean_distance's 1e-3 tokens above all),
so precision="float32" (the default) runs q, k and V in float32: exact for 16-bit inputs, and on
the GPU float32 matmuls (slow without tf32). precision="input" keeps the input dtype: faster,
inexact (j is not even representable in bf16 beyond 256), for timing only. E_p[s] from q.E_p[k]
shares route (a)'s limit at the sharpest heads (kernels/attention_stats_linear.py). No soft-cap
and no general mask here: their scores are not linear in k (attention_stats serves them).
"""

from __future__ import annotations

import functools
import math

import torch
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

from recon_fast.kernels.stats_tables import ATTENTION_STATS_TABLE

# Pass 2 scores its candidates -30 j: the second candidate gets e^-30 of the first's weight.
_INDEX_SLOPE = 30.0
# Candidates for the argmax: scores within this (relative, nats) of the row max, wide enough for
# two compilations' float32 rounding of the same score, narrow enough that a key it admits has a
# weight within ~1e-5 of the max weight (the tests' tie tolerance).
_ARGMAX_SLACK = 4e-6


@functools.cache
def _compiled_flex():
    # Static shapes: a new shape compiles anew. torch 2.13's CPU flex template, once dynamo turns
    # to dynamic shapes (the second shape), emits C++ that does not compile ('cur_kvSplitSize4'
    # was not declared).
    compiled = torch.compile(flex_attention, dynamic=False)

    def flex(*args, **kwargs):
        # Two graphs per shape: past dynamo's default 8 recompiles flex would fall back to its
        # unfused eager form, which materialises [Tq, Tk].
        with torch._dynamo.config.patch(recompile_limit=64):
            return compiled(*args, **kwargs)

    return flex


def _mask_mod(q_len: int, k_len: int, causal: bool, window: int | None, keep: torch.Tensor | None):
    """The op's visibility (kernels.attention_stats.visible_keys) as a flex mask_mod."""
    offset = k_len - q_len  # query i sits at position i + offset

    def mask_mod(b, h, q_idx, kv_idx):
        pos = q_idx + offset
        visible = kv_idx >= 0
        if causal:
            visible = visible & (kv_idx <= pos)
        if window is not None:
            visible = visible & (kv_idx > pos - window)
            if not causal:
                visible = visible & (kv_idx < pos + window)
        if keep is not None:
            visible = visible & keep[b, kv_idx]
        return visible

    return mask_mod


@functools.lru_cache(maxsize=16)
def _shared_block_mask(device: torch.device, q_len: int, k_len: int, causal: bool, window: int | None):
    # Without padding the mask is the same for every layer and call of a shape: built once, as a
    # model's forward would.
    return create_block_mask(_mask_mod(q_len, k_len, causal, window, None), None, None, q_len, k_len,
                             device=device)


def _row_max_lse(q, k, scaling, causal, window, keep, block=512):
    """CPU stand-in for flex's aux outputs: per row, the max score and the logsumexp, in float32
    over [block, block] tiles, skipping the tiles no row of a query block sees."""
    from recon_fast.kernels.attention_stats import visible_keys

    batch, heads, q_len, dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    m = torch.full((batch, heads, q_len), -math.inf, device=q.device)
    lse = m.clone()
    for i0 in range(0, q_len, block):
        i1 = min(q_len, i0 + block)
        pos = torch.arange(i0, i1, device=q.device) + (k_len - q_len)
        lo = 0 if window is None else max(0, int(pos[0]) - window + 1)
        hi = min(k_len, int(pos[-1]) + 1) if causal else (
            k_len if window is None else min(k_len, int(pos[-1]) + window))
        qg = (q[:, :, i0:i1] * scaling).reshape(batch, kv_heads, group * (i1 - i0), dim)
        mb = torch.full((batch, heads, i1 - i0), -math.inf, device=q.device)
        lb = torch.zeros_like(mb)
        for j0 in range(lo - lo % block, hi, block):
            j1 = min(hi, j0 + block)
            s = (qg @ k[:, :, j0:j1].transpose(-1, -2)).reshape(batch, heads, i1 - i0, j1 - j0)
            s = s.masked_fill(~visible_keys(pos, torch.arange(j0, j1, device=q.device), causal, window), -math.inf)
            if keep is not None:
                s = s.masked_fill(~keep[:, None, None, j0:j1], -math.inf)
            m_new = torch.maximum(mb, s.amax(-1))
            shift = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
            lb = lb * torch.exp(mb - shift) + torch.exp(s - shift[..., None]).sum(-1)
            mb = m_new
        m[:, :, i0:i1] = mb
        lse[:, :, i0:i1] = mb + torch.log(lb)
    return m, lse


def attention_stats_flex(
    q: torch.Tensor,  # [B, H, Tq, D]
    k: torch.Tensor,  # [B, Hkv, Tk, D]
    *,
    scaling: float | None = None,
    causal: bool = True,
    window: int | None = None,
    key_padding_mask: torch.Tensor | None = None,  # bool [B, Tk], True = keep
    sink_tokens: int = 4,
    precision: str = "float32",
) -> torch.Tensor:  # float32 [B, H, Tq, NUM_ATTENTION_STATS], channels as ATTENTION_STATS
    """attention_stats (same conventions and channels) by FlexAttention; see the module doc.
    Synchronises once when some row's argmax candidates came out empty (then widens them)."""
    if precision not in ("float32", "input"):
        raise ValueError(f"attention_stats_flex: precision must be 'float32' or 'input', got {precision!r}")
    batch, heads, q_len, dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"attention_stats_flex: q has {heads} heads, not a multiple of k's {kv_heads}")
    scaling = dim ** -0.5 if scaling is None else float(scaling)
    device, on_cuda = q.device, q.device.type == "cuda"
    dtype = torch.float32 if precision == "float32" else q.dtype
    qc, kc = q.to(dtype), k.to(dtype)
    keep = None if key_padding_mask is None else key_padding_mask.to(device=device, dtype=torch.bool)
    if keep is None:
        block_mask = _shared_block_mask(device, q_len, k_len, bool(causal), window)
    else:
        block_mask = create_block_mask(_mask_mod(q_len, k_len, causal, window, keep), batch, None,
                                       q_len, k_len, device=device)
    flex = _compiled_flex()

    # Pass 1: V = [K | j | 1 | j < sink_tokens], padded to a multiple of 16 columns.
    j = torch.arange(k_len, device=device, dtype=dtype)
    extra = torch.stack((j, torch.ones_like(j), (j < sink_tokens).to(dtype)), -1)
    width = -(-(dim + 3) // 16) * 16
    v = torch.zeros(batch, kv_heads, k_len, width, device=device, dtype=dtype)
    v[..., :dim] = kc
    v[..., dim:dim + 3] = extra
    aux_request = AuxRequest(lse=True, max_scores=True) if on_cuda else None
    result = flex(qc, kc, v, block_mask=block_mask, scale=scaling, enable_gqa=True, return_aux=aux_request)
    out, aux = (result if on_cuda else (result, None))
    out = out.float()
    if on_cuda:
        lse, row_max = aux.lse.float(), aux.max_scores.float()
    else:
        row_max, lse = _row_max_lse(qc.float(), kc.float(), scaling, causal, window, keep)
    # Self-normalised by the ones column: exact in float32, and it absorbs part of P's rounding
    # with precision="input".
    ones = out[..., dim + 1]
    e_s = scaling * (q.float() * out[..., :dim]).sum(-1) / ones
    pos = (torch.arange(q_len, device=device) + (k_len - q_len)).float()

    # Pass 2: the first key within the slack of the row max.
    argmax = _first_index_near_max(flex, qc, kc, block_mask, scaling, row_max)

    # Self and previous weights: one score each per query.
    self_w, prev_w = (_weight_at(qc, kc, scaling, lse, shift, window, keep) for shift in (0, 1))

    stats = ATTENTION_STATS_TABLE.stack({
        "entropy": lse - e_s,
        "max_weight": torch.exp(row_max - lse),
        "argmax": argmax,
        "sink_mass": out[..., dim + 2] / ones,
        "mean_distance": pos - out[..., dim] / ones,
        "self_weight": self_w,
        "prev_weight": prev_w,
        "lse": lse,
    }, by="attention_stats_flex")
    sees_nothing = ~torch.isfinite(lse)
    return stats.masked_fill(sees_nothing[..., None], math.nan)


def _first_index_near_max(flex, q, k, block_mask, scaling, row_max):
    batch, kv_heads, k_len = k.shape[0], k.shape[1], k.shape[2]
    j = torch.arange(k_len, device=k.device, dtype=q.dtype)
    v = torch.zeros(batch, kv_heads, k_len, 16, device=k.device, dtype=q.dtype)
    v[..., 0] = j
    v[..., 1] = 1
    finite_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    slack = _ARGMAX_SLACK * (1 + finite_max.abs())
    for widen in (1.0, 1e3):
        threshold = (finite_max - slack * widen).contiguous()

        def near_max(score, b, h, q_idx, kv_idx):
            return torch.where(score >= threshold[b, h, q_idx], kv_idx * -_INDEX_SLOPE, float("-inf"))

        out = flex(q, k, v, score_mod=near_max, block_mask=block_mask, scale=scaling, enable_gqa=True).float()
        found = out[..., 1] > 0.5
        if widen > 1 or bool((found | ~torch.isfinite(row_max)).all()):
            break
    return torch.round(out[..., 0] / out[..., 1])


def _weight_at(q, k, scaling, lse, shift, window, keep):
    """p at key j = i' - shift for every query (0 where that key is not visible)."""
    batch, heads, q_len, dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    key = torch.arange(q_len, device=q.device) + (k_len - q_len) - shift
    visible = (key >= 0) & (key < k_len)
    if window is not None and shift >= window:
        visible = torch.zeros_like(visible)
    at = key.clamp(0, max(k_len - 1, 0))
    kk = k[:, :, at].float().repeat_interleave(heads // kv_heads, dim=1)  # [B, H, Tq, D]
    s = scaling * (q.float() * kk).sum(-1)
    weight = torch.exp(s - lse) * visible
    if keep is not None:
        weight = weight * keep[:, at][:, None, :]
    return torch.where(torch.isfinite(lse), weight, torch.zeros_like(weight))
