"""Soft-capped attention output (Gemma2's logit soft-cap) in blocks of queries: the family's eager
math, softmax(cap * tanh(q k^T * scaling / cap) + mask) v, without its [B, H, Tq, Tk] scores or a
[B, 1, Tq, Tk] mask, so memory beyond q, k, v and the output is one bounded tile. sdpa refuses a
soft-cap; the attention-stats capture runs this in its place on a model set to sdpa.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from recon_fast.kernels.attention_stats import visible_keys

# Bytes of one block's float32 score tile [B, H, q_block, Tk]. A block holds a few tiles at once
# (the scores, soft-capped in place; the masked sum; the float32 softmax and its cast back), so its
# peak is a few times this: a few hundred MiB, small beside the weights and KV cache of any model
# long enough to need it, while a block still spans a hundred query rows or more (Gemma2-9B, 16
# heads at its 8192 keys: 128 rows), which keeps the matmuls large and the Python loop short.
BLOCK_BYTES = 64 * 2**20


def query_block(batch: int, heads: int, key_length: int, block_bytes: int = BLOCK_BYTES) -> int:
    """Query rows per block: the float32 tile [batch, heads, rows, key_length] within block_bytes
    (at least one row, whatever the budget)."""
    return max(1, block_bytes // (4 * max(1, batch * heads * key_length)))


def softcap_attention(
    query: torch.Tensor,  # [B, H, Tq, D]
    key: torch.Tensor,  # [B, Hkv, Tk, D], H a multiple of Hkv
    value: torch.Tensor,  # [B, Hkv, Tk, Dv]
    *,
    softcap: float | None,
    scaling: float | None = None,
    causal: bool = True,
    window: int | None = None,
    key_padding_mask: torch.Tensor | None = None,  # bool [B, Tk], True = keep
    mask_dtype: torch.dtype | None = None,
    dropout: float = 0.0,
    training: bool = False,
    block_bytes: int | None = None,
) -> torch.Tensor:  # [B, Tq, H, Dv], query's dtype
    """The attention output of transformers' Gemma2 `eager_attention_forward`, computed a block of
    query rows at a time, in the same order and dtypes: scores in the input dtype, * scaling, then
    / softcap, tanh, * softcap, then + the additive mask (0 where kept, finfo(mask_dtype).min where
    not, as transformers' eager mask), softmax in float32, cast back, dropout, @ value.

    Masks follow attention_stats' convention (`visible_keys`): queries are the last Tq of the Tk
    positions (a KV cache), causal keeps j <= i', window keeps j > i' - window (without causal
    also j < i' + window), key_padding_mask keeps the True keys. mask_dtype is the dtype
    transformers built the eager mask in (the model's dtype; default query's).
    Grouped-query attention: head h reads key/value head h // (H / Hkv), never repeated.
    dropout applies only when training, as eager's; each block draws its own dropout mask, so the
    dropped weights differ from eager's single draw though their distribution is the same.
    Rows that see no key get what eager gives them, not NaN: the min added to every key swamps
    the soft-capped scores (|s| <= softcap, far below the spacing of floats near finfo.min in
    float32 and bfloat16), so the row is constant and its weights uniform over all Tk keys.
    block_bytes: the float32 score tile's budget per block (default BLOCK_BYTES).
    """
    _check_args(query, key, value, softcap, window, key_padding_mask)
    batch, heads, q_len, head_dim = query.shape
    kv_heads, k_len, v_dim = key.shape[1], key.shape[2], value.shape[3]
    group = heads // kv_heads
    if scaling is None:
        scaling = head_dim**-0.5  # eager's default: module.head_dim ** -0.5
    mask_dtype = query.dtype if mask_dtype is None else mask_dtype
    masked = torch.finfo(mask_dtype).min
    zero = torch.zeros((), dtype=mask_dtype, device=query.device)
    positions = torch.arange(q_len, device=query.device) + (k_len - q_len)
    keys = torch.arange(k_len, device=query.device)
    needs_mask = causal or window is not None or key_padding_mask is not None
    key_t = key.transpose(-1, -2)  # [B, Hkv, D, Tk]
    output = query.new_empty(batch, q_len, heads, v_dim)
    rows = query_block(batch, heads, k_len, BLOCK_BYTES if block_bytes is None else block_bytes)
    for i0 in range(0, q_len, rows):
        i1 = min(q_len, i0 + rows)
        n = i1 - i0
        # [B, Hkv, G * n, D]: the G query heads of a kv head share one matmul with its keys.
        q = query[:, :, i0:i1].reshape(batch, kv_heads, group * n, head_dim)
        scores = torch.matmul(q, key_t).view(batch, heads, n, k_len)
        scores.mul_(scaling)
        if softcap is not None:  # in place, but the same three operations as eager's
            scores.div_(softcap).tanh_().mul_(softcap)
        if needs_mask:
            keep = visible_keys(positions[i0:i1], keys, causal, window)[None, None]  # [1, 1, n, Tk]
            if key_padding_mask is not None:
                keep = keep & key_padding_mask[:, None, None, :]  # [B, 1, n, Tk]
            # Added, not filled: eager's sum, with its dtype promotion and its fully masked rows.
            scores = scores + torch.where(keep, zero, masked)
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        del scores
        weights = F.dropout(weights, p=dropout, training=training)
        out = torch.matmul(weights.view(batch, kv_heads, group * n, k_len), value)  # [B, Hkv, G * n, Dv]
        output[:, i0:i1] = out.view(batch, heads, n, v_dim).transpose(1, 2)
    return output


def _check_args(query, key, value, softcap, window, key_padding_mask) -> None:
    def fail(msg: str):
        raise ValueError(f"softcap_attention: {msg}")

    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if tensor.dim() != 4:
            fail(f"{name} must be 4-D [batch, heads, length, head_dim], got shape {list(tensor.shape)}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        fail(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    batch, heads, _, head_dim = query.shape
    if key.shape[0] != batch or key.shape[3] != head_dim:
        fail(f"key {list(key.shape)} does not match query {list(query.shape)} in batch and head_dim")
    if value.shape[:3] != key.shape[:3]:
        fail(f"value {list(value.shape)} does not match key {list(key.shape)} in batch, heads and length")
    if key.shape[1] == 0 or heads % key.shape[1] != 0:
        fail(f"query has {heads} heads, not a multiple of key's {key.shape[1]}")
    if softcap is not None and not softcap > 0:
        fail(f"softcap must be positive, got {softcap}")
    if window is not None and window < 1:
        fail(f"window must be at least 1 (keys a query sees, itself included), got {window}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or tuple(key_padding_mask.shape) != (batch, key.shape[2])):
        fail(f"key_padding_mask must be bool [{batch}, {key.shape[2]}], got {key_padding_mask.dtype} "
             f"{list(key_padding_mask.shape)}")
