"""Attention rows of the attributed queries only, for splitting a head's term over the source
tokens it read from. The transformers attention function (sdpa, eager, ...) is wrapped for the
length of one forward pass: it still computes the model's attention, and beside it, for the
queries at the chosen positions, the softmax row over every key (O(T) per query and head, never
[T, T]) from the very query and key states the model uses (after RoPE, q/k norms, scaling). The
values of each layer are kept to be projected once the logit direction is known."""

from __future__ import annotations

import sys

import torch
from torch import nn


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
        self._saved: list[tuple[str, object]] = []

    def __enter__(self) -> "SourceCapture":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self._registry = ALL_ATTENTION_FUNCTIONS
        local = ALL_ATTENTION_FUNCTIONS._local_mapping
        for key in set(ALL_ATTENTION_FUNCTIONS) | {"eager"}:
            self._saved.append((key, local.get(key, _ABSENT)))
            original = ALL_ATTENTION_FUNCTIONS[key] if key in ALL_ATTENTION_FUNCTIONS else None
            local[key] = self._wrap(original)
        return self

    def __exit__(self, *exc) -> None:
        local = self._registry._local_mapping
        for key, previous in self._saved:
            if previous is _ABSENT:
                local.pop(key, None)
            else:
                local[key] = previous
        self._saved.clear()

    def _wrap(self, original):
        def attention(module, query, key, value, attention_mask, *args, **kwargs):
            function = original or sys.modules[type(module).__module__].eager_attention_forward
            output = function(module, query, key, value, attention_mask, *args, **kwargs)
            layer = self.layers.get(id(module))
            if layer is not None:
                self._keep(layer, module, query, key, value, attention_mask, kwargs)
            return output

        return attention

    def _keep(self, layer: int, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              mask: torch.Tensor | None, kwargs: dict) -> None:
        """query [B, H, Tq, dh], key/value [B, Hkv, Tk, dh], mask None or [B|1, 1|H, Tq, Tk]."""
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
        if torch.is_tensor(mask):
            rows = mask if mask.shape[2] == 1 else mask.index_select(2, where)
            scores = scores.masked_fill(~rows, float("-inf")) if rows.dtype == torch.bool else scores + rows.double()
        else:  # the attention function was told is_causal: keys up to the query's own position
            key_at = torch.arange(keys, device=query.device)
            allowed = key_at <= query_at.unsqueeze(-1)  # [P, Tk]
            window = kwargs.get("sliding_window")
            if window:
                allowed &= key_at > query_at.unsqueeze(-1) - window
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # [B, H, P, Tk]
        grouped = probs.unflatten(1, (kv_heads, heads // kv_heads))
        outputs = torch.einsum("bgnpt,bgtk->bpgnk", grouped, value.double()).flatten(2, 3)  # [B, P, H, dh]
        self.rows[layer], self.values[layer], self.outputs[layer] = probs, value.detach(), outputs


_ABSENT = object()
