"""attention_stats: per query, the softmax(q k^T) row summarised as the statistics of
ATTENTION_STATS_TABLE (entropy, max weight, argmax, ...), in one online pass over key blocks, so
that attention is visible at any context length without a [T, T] matrix.

The op is declared in csrc/ops.cpp and implemented per backend (csrc/cpu/attention_stats_*,
csrc/cuda/attention_stats_*); this module is its typed Python face, its fake implementation for
torch.compile, and the plain-PyTorch blocked reference `attention_stats_ref`, which serves (with a
one-time warning) when the compiled library is missing.
"""

from __future__ import annotations

import math

import torch

from recon_fast.kernels import _library
from recon_fast.kernels.stats_tables import ATTENTION_STATS_TABLE

# The channels of attention_stats' last dimension, in order: the table's names.
ATTENTION_STATS: tuple[str, ...] = ATTENTION_STATS_TABLE.names
NUM_ATTENTION_STATS = len(ATTENTION_STATS_TABLE)

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_OP = "recon_fast::attention_stats"

_COMPILED = _library.CompiledOp(_OP, "blocked matmuls, several times slower")


def backend(device: torch.device | str = "cpu") -> str:
    """Which implementation attention_stats uses on `device`: "cpp", "cuda" or "torch" (fallback)."""
    return _COMPILED.backend(device)


@ATTENTION_STATS_TABLE.documented
def attention_stats(
    q: torch.Tensor,  # [B, H, Tq, D]
    k: torch.Tensor,  # [B, Hkv, Tk, D], H a multiple of Hkv
    *,
    scaling: float | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    key_padding_mask: torch.Tensor | None = None,  # bool [B, Tk], True = keep
    mask: torch.Tensor | None = None,  # bool (True = keep) or additive [B|1, H|1, Tq, Tk]
    sink_tokens: int = 4,
) -> torch.Tensor:  # float32 [B, H, Tq, NUM_ATTENTION_STATS]
    """Statistics of every query's attention distribution softmax(q k^T * scaling), per head.

    q, k: float32/float64/float16/bfloat16 on the same device; any strides (a strided head_dim is
    copied once). Grouped-query attention: head h reads k's head h // (H / Hkv); k is never
    repeated. Queries are the last Tq of the Tk positions (a KV cache): query i sits at
    i' = i + Tk - Tq.
    scaling: multiplies q k^T; default 1 / sqrt(D).
    causal: key j visible only when j <= i'.
    window: sliding window of `window` keys, i' itself included: j > i' - window (HF's
        Mistral/Qwen2 convention; flash-attention's window_size=(window - 1, 0)); without causal
        also j < i' + window.
    softcap: Gemma2's logit soft-cap, s = softcap * tanh(s / softcap), before any mask.
    key_padding_mask: bool [B, Tk], True for real tokens.
    mask: a general mask, the slow path: bool (True = keep) or floating (added to the scores).
    sink_tokens: how many leading keys count as attention sinks for `sink_mass`.

    Returns float32 [B, H, Tq, NUM_ATTENTION_STATS], its channels (`ATTENTION_STATS` names them):
        {channels}
    Rows that see no key are NaN in every channel. Accumulates in float32; runs on the current
    CUDA stream without synchronising. On CUDA, 16-bit q and k without soft-cap or general mask
    take the linear-case kernel (csrc/cuda/attention_stats_mma_kernel.cu);
    RECON_FAST_ATTENTION_KERNEL=fma (default), mma or score chooses it, read once per process.
    """
    if scaling is None:
        if q.dim() < 1 or q.shape[-1] == 0:
            _check_args(q, k, 1.0, causal, window, softcap, key_padding_mask, mask, sink_tokens)
        scaling = 1.0 / math.sqrt(q.shape[-1])
    if _COMPILED.serves(q.device.type):
        return torch.ops.recon_fast.attention_stats(
            q, k, float(scaling), bool(causal), window, softcap, key_padding_mask, mask,
            int(sink_tokens),
        )
    _COMPILED.warn_fallback_once(q.device.type)
    _check_args(q, k, scaling, causal, window, softcap, key_padding_mask, mask, sink_tokens)
    return attention_stats_ref(
        q, k, scaling=scaling, causal=causal, window=window, softcap=softcap,
        key_padding_mask=key_padding_mask, mask=mask, sink_tokens=sink_tokens,
    )


if _library.loaded_from is not None:

    @torch.library.register_fake(_OP)
    def _attention_stats_fake(q, k, scaling, causal, window, softcap, key_padding_mask, mask,
                              sink_tokens):
        # The same checks as the kernels, so torch.compile and meta tensors reject what they would.
        _check_args(q, k, scaling, causal, window, softcap, key_padding_mask, mask, sink_tokens)
        return q.new_empty((q.shape[0], q.shape[1], q.shape[2], NUM_ATTENTION_STATS),
                           dtype=torch.float32)


def _check_args(q, k, scaling, causal, window, softcap, key_padding_mask, mask, sink_tokens) -> None:
    """The compiled op's argument checks (csrc/attention_stats_plan.cpp), same words."""

    def fail(msg: str):
        raise RuntimeError(f"attention_stats: {msg}")

    if q.dim() != 4:
        fail(f"q must be 4-D [batch, heads, q_len, head_dim], got shape {list(q.shape)}")
    if k.dim() != 4:
        fail(f"k must be 4-D [batch, kv_heads, k_len, head_dim], got shape {list(k.shape)}")
    if q.dtype != k.dtype:
        fail(f"q is {q.dtype} but k is {k.dtype}")
    if q.dtype not in _FLOAT_DTYPES:
        fail(f"q and k must be float32, float64, float16 or bfloat16, got {q.dtype}")
    if q.device != k.device:
        fail(f"q is on {q.device} but k is on {k.device}")
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    if k.shape[0] != batch:
        fail(f"q has batch {batch} but k has batch {k.shape[0]}")
    if k.shape[3] != head_dim:
        fail(f"q has head_dim {head_dim} but k has head_dim {k.shape[3]}")
    if head_dim == 0:
        fail("head_dim is empty (size 0)")
    if kv_heads == 0 or heads % kv_heads != 0:
        fail(f"q has {heads} heads, not a multiple of k's {kv_heads}")
    if not math.isfinite(scaling):
        fail(f"scaling must be finite, got {scaling}")
    if window is not None and window < 1:
        fail(f"window must be at least 1 (keys a query sees, itself included), got {window}")
    if softcap is not None and not (softcap > 0 and math.isfinite(softcap)):
        fail(f"softcap must be positive and finite, got {softcap}")
    if sink_tokens < 0:
        fail(f"sink_tokens must be >= 0, got {sink_tokens}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            fail(f"key_padding_mask must be bool (true = keep), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (batch, k_len):
            fail(f"key_padding_mask must have shape [{batch}, {k_len}] ([batch, k_len]), got "
                 f"{list(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            fail(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    if mask is not None:
        if not (mask.dtype == torch.bool or mask.is_floating_point()):
            fail(f"mask must be bool (true = keep) or floating (added to the scores), got {mask.dtype}")
        if (mask.dim() != 4 or mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, heads)
                or mask.shape[2] != q_len or mask.shape[3] != k_len):
            fail(f"mask must have shape [{batch} or 1, {heads} or 1, {q_len}, {k_len}], got "
                 f"{list(mask.shape)}")
        if mask.device != q.device:
            fail(f"mask is on {mask.device} but q is on {q.device}")


def visible_keys(positions: torch.Tensor, keys: torch.Tensor, causal: bool, window: int | None) -> torch.Tensor:
    """Which keys each query sees under the op's convention: [queries, keys] bool for query
    positions `positions` (absolute, lower-right aligned) and key positions `keys`. Causal: j <= i;
    window: j > i - window, and without causal also j < i + window (symmetric)."""
    visible = torch.ones(len(positions), len(keys), dtype=torch.bool, device=positions.device)
    if causal:
        visible &= keys[None] <= positions[:, None]
    if window is not None:
        visible &= keys[None] > positions[:, None] - window
        if not causal:
            visible &= keys[None] < positions[:, None] + window
    return visible


def attention_stats_ref(
    q: torch.Tensor,  # [B, H, Tq, D]
    k: torch.Tensor,  # [B, Hkv, Tk, D]
    *,
    scaling: float | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    sink_tokens: int = 4,
    key_block: int = 512,
    float64: bool = False,
) -> torch.Tensor:  # [B, H, Tq, NUM_ATTENTION_STATS]
    """Plain-PyTorch attention_stats: the fallback, and the benchmarks' blocked baseline.

    The same online softmax as the kernels, over blocks of `key_block` keys with batched matmuls,
    so memory is O(Tq * key_block) per head, never O(Tq * Tk). Computes in float32 (float64 for
    float64 input, or when float64=True, which also returns float64); returns float32 otherwise.
    """
    acc = torch.float64 if float64 or q.dtype == torch.float64 else torch.float32
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    if scaling is None:
        scaling = 1.0 / math.sqrt(head_dim)
    device = q.device
    # [B, Hkv, G * Tq, D]: the G query heads of a kv head share one matmul with its keys.
    qg = (q.to(acc) * scaling).reshape(batch, kv_heads, group * q_len, head_dim)
    pos = torch.arange(q_len, device=device) + (k_len - q_len)  # absolute query positions
    shape = (batch, heads, q_len)
    m = torch.full(shape, -math.inf, dtype=acc, device=device)
    l, t, u, sink, self_w, prev_w = (torch.zeros(shape, dtype=acc, device=device) for _ in range(6))
    argmax = torch.zeros(shape, dtype=torch.long, device=device)

    for j0 in range(0, k_len, key_block):
        j1 = min(k_len, j0 + key_block)
        j = torch.arange(j0, j1, device=device)
        s = (qg @ k[:, :, j0:j1].to(acc).transpose(-1, -2)).reshape(batch, heads, q_len, j1 - j0)
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~visible_keys(pos, j, causal, window), -math.inf)
        if key_padding_mask is not None:
            s = s.masked_fill(~key_padding_mask[:, None, None, j0:j1], -math.inf)
        if mask is not None:
            block = mask[..., j0:j1]
            s = s.masked_fill(~block, -math.inf) if block.dtype == torch.bool else s + block.to(acc)

        block_max = s.amax(-1)
        m_new = torch.maximum(m, block_max)
        shift = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        alpha = torch.exp(m - shift)
        delta = torch.where(l > 0, m - shift, torch.zeros_like(m))
        d = s - shift[..., None]
        e = torch.exp(d)
        d = torch.where(e > 0, d, torch.zeros_like(d))  # masked keys: 0, not 0 * -inf
        t = alpha * (t + delta * l) + (e * d).sum(-1)
        l = alpha * l + e.sum(-1)
        u = alpha * u + (e * (pos[:, None] - j).to(acc)).sum(-1)
        sink = alpha * sink + e[..., : max(0, sink_tokens - j0)].sum(-1)
        self_w = alpha * self_w + (e * (j[None] == pos[:, None])).sum(-1)
        prev_w = alpha * prev_w + (e * (j[None] == pos[:, None] - 1)).sum(-1)
        argmax = torch.where(block_max > m, j0 + s.argmax(-1), argmax)
        m = m_new

    log_l = torch.log(l)
    stats = ATTENTION_STATS_TABLE.stack({
        "entropy": log_l - t / l, "max_weight": 1 / l, "argmax": argmax.to(acc), "sink_mass": sink / l,
        "mean_distance": u / l, "self_weight": self_w / l, "prev_weight": prev_w / l, "lse": m + log_l,
    }, by="attention_stats_ref")
    stats = torch.where((l > 0)[..., None], stats, torch.full_like(stats, math.nan))
    return stats if float64 else stats.to(torch.float32)
