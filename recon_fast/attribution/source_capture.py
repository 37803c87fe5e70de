"""Attention rows of the attributed queries only, for splitting a head's term over the source
tokens it read from. The transformers attention function (sdpa, eager, ...) is wrapped for the
length of one forward pass (trace/attention_intercept.py's wrapped_attention_functions, the mask
read by its key_mask): it still computes the model's attention, and beside it, for the
queries at the chosen positions, the softmax row over every key (O(T) per query and head, never
[T, T]) from the very query and key states the model uses (after RoPE, q/k norms, scaling). The
values of each layer are kept to be projected once the logit direction is known."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from recon_fast.trace.attention_intercept import key_mask, wrapped_attention_functions


class SourceCapture:
    """with SourceCapture(attention_modules, positions) as sources:   # {module: layer}
           model(**inputs)
       sources.rows[layer]    # [B, H, P, Tk] float64 attention probabilities of the chosen queries
       sources.values[layer]  # [B, Hkv, Tk, dh] the value states (model dtype)
       sources.outputs[layer] # [B, P, H, dh] float64 the rows recomputed: sum_j p_ij v_j
    """

    def __init__(self, modules: dict[nn.Module, int], positions: torch.Tensor):
        self.layers = {id(module): layer for module, layer in modules.items()}
        self.positions = positions  # [P] absolute indices into the query axis
        self.rows: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._wrapping = contextlib.ExitStack()

    def __enter__(self) -> "SourceCapture":
        self._wrapping.enter_context(wrapped_attention_functions(self._observe))
        return self

    def __exit__(self, *exc) -> None:
        self._wrapping.close()

    def _observe(self, module, query, key, value, attention_mask, kwargs) -> None:
        layer = self.layers.get(id(module))
        if layer is not None:
            self._keep(layer, module, query, key, value, attention_mask, kwargs)

    def _keep(self, layer: int, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              mask, kwargs: dict) -> None:
        """query [B, H, Tq, dh], key/value [B, Hkv, Tk, dh], mask as the attention function got it."""
        if kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None:
            raise ValueError(f"by_source: layer {layer}'s attention has sink logits, which are not split over sources")
        batch, heads, length, _ = query.shape
        kv_heads, keys = key.shape[1], key.shape[2]
        where = self.positions.to(query.device)
        q = query.index_select(2, where).double()  # [B, H, P, dh]
        q = q.unflatten(1, (kv_heads, heads // kv_heads))  # [B, Hkv, G, P, dh]
        scores = torch.einsum("bgnpk,bgtk->bgnpt", q, key.double()).flatten(1, 2)  # [B, H, P, Tk]
        scaling = kwargs.get("scaling")
        scores = scores * (query.shape[-1] ** -0.5 if scaling is None else scaling)
        softcap = kwargs.get("softcap")
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        query_at = where + (keys - length)  # a query's position on the key axis
        scores = key_mask(mask, module, kwargs, keys).mask_scores(scores, where, query_at)
        probs = torch.softmax(scores, dim=-1)  # [B, H, P, Tk]
        grouped = probs.unflatten(1, (kv_heads, heads // kv_heads))
        outputs = torch.einsum("bgnpt,bgtk->bpgnk", grouped, value.double()).flatten(2, 3)  # [B, P, H, dh]
        self.rows[layer], self.values[layer], self.outputs[layer] = probs, value.detach(), outputs
