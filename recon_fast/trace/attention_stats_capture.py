"""Attention statistics under any attention implementation: for one run the model is switched to
"recon_fast_stats" (trace/attention_intercept.py: the model's own attention still runs, logits
bit-identical, and no [T, T] mask is built where the model would build none), and every attention
call hands (query, key) as it received them (post-RoPE, KV cache included, heads not repeated) and
its mask, read as key padding [B, Tk] + causal + window, to the attention_stats op. Its buffers:
one float32 [B, H, Tq, NUM_ATTENTION_STATS] tensor per attention call, on the device; its part of
the cube: [layers, batch, heads, tokens, NUM_ATTENTION_STATS].
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from recon_fast.cube import export
from recon_fast.kernels.attention_stats import ATTENTION_STATS, NUM_ATTENTION_STATS, attention_stats
from recon_fast.trace.attention_intercept import key_mask, switched_attention
from recon_fast.trace.model_state import model_state_kept
from recon_fast.trace.session import Capture, Layout, Session, TracerSettings

SINK_TOKENS = 4  # StreamingLLM's attention sinks: the first four keys
# transformers model_type of the families checked against eager output_attentions (tests).
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gpt2", "gpt_neox", "bert")
_ARGMAX = ATTENTION_STATS.index("argmax")


@dataclass
class AttentionCall:
    name: str  # the attention module, e.g. model.layers.3.self_attn
    stats: torch.Tensor  # float32 [B, H, Tq, NUM_ATTENTION_STATS] on the device


def check_model(model: nn.Module) -> None:
    """Before the run: a family whose attention goes through AttentionInterface, checked here."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES or not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"attention='stats' supports the model types {', '.join(FAMILIES)}; this model is "
                         f"{model_type or type(model).__name__!r}")


class AttentionStatsCapture(Capture):
    """Statistics of every attention call of one run (or generate()), kept on the device."""

    hookless = True  # the switched attention function records: a run needs no hooks

    def __init__(self, model: nn.Module, sink_tokens: int = SINK_TOKENS):
        check_model(model)
        self.model = model
        self.sink_tokens = sink_tokens
        self.calls: list[AttentionCall] = []

    @contextlib.contextmanager
    def recording(self):
        """For the pass: the model under "recon_fast_stats", its implementation restored afterwards
        (also when the forward raises), and its hooks and transformers' flags as they were."""
        names = {id(m): n for n, m in self.model.named_modules()}

        def observe(module, query, key, value, mask, kwargs):
            self.record(module, names[id(module)], query, key, mask, kwargs)

        with model_state_kept(self.model), switched_attention(self.model, observe):
            yield self

    def record(self, module: nn.Module, name: str, query: torch.Tensor, key: torch.Tensor, mask, kwargs: dict) -> None:
        # query [B, H, Tq, D], key [B, Hkv, Tk, D]
        seen = key_mask(mask, module, kwargs, key.shape[2])
        stats = attention_stats(query.detach(), key.detach(), scaling=kwargs.get("scaling"), causal=seen.causal,
                                window=seen.window, softcap=kwargs.get("softcap"), key_padding_mask=seen.key_padding,
                                mask=seen.general, sink_tokens=max(0, self.sink_tokens - seen.kv_offset))
        if seen.kv_offset:  # a sliding-window cache dropped the first keys: argmax as a position
            stats[..., _ARGMAX] += seen.kv_offset
        self.calls.append(AttentionCall(name, stats))

    # ---- its part of the cube ---------------------------------------------------------------------
    streams = True  # [layers, batch, heads, tokens, NUM_ATTENTION_STATS]: streamed layer by layer

    def cube_part(self, layout: Layout) -> dict:
        names, data = self.data(layout.mode, layout.token_length, layout.padding)
        return {"attention_layers": names, "attention_data": data}

    def stream_part(self, layout: Layout, shell, path: str):
        """After the token statistics' layers: one object per attention layer, off the device in turn."""
        first = len(layout.layers)
        for i, (name, stats) in enumerate(self.layers(layout.mode, layout.token_length, layout.padding)):
            yield export.attention_stats_object(i, first + i, name, stats, ATTENTION_STATS)

    def layer_names(self, mode: str) -> list[str]:
        if mode == "forward":
            return [c.name for c in self.calls]
        return list(dict.fromkeys(c.name for c in self.calls))

    def layers(self, mode: str, length: int, padding: np.ndarray | None):
        """(name, float32 [batch, heads, length, NUM_ATTENTION_STATS]) per attention layer, one at
        a time off the device: in forward mode a call per layer, under generate() a module's calls
        in order along the token axis. Padded queries and positions no call covered are NaN."""
        groups: dict = {}
        for i, call in enumerate(self.calls):
            groups.setdefault(i if mode == "forward" else call.name, []).append(call)
        for calls in groups.values():
            batch, heads = calls[0].stats.shape[:2]
            out = np.full((batch, heads, length, NUM_ATTENTION_STATS), np.nan, np.float32)
            start = 0
            for call in calls:
                n = min(call.stats.shape[2], length - start)
                out[:, :, start:start + n] = call.stats[:, :, :n].cpu().numpy()
                start += call.stats.shape[2]
            if padding is not None:
                cols = min(padding.shape[1], length)
                out[:, :, :cols][np.broadcast_to(padding[:, None, :cols], out.shape[:2] + (cols,))] = np.nan
            yield calls[0].name, out

    def data(self, mode: str, length: int, padding: np.ndarray | None) -> tuple[list[str], np.ndarray | None]:
        """All layers at once: names and [layers, batch, heads, length, NUM_ATTENTION_STATS]
        (heads NaN-padded to the widest layer)."""
        layers = list(self.layers(mode, length, padding))
        if not layers:
            return [], None
        heads = max(a.shape[1] for _, a in layers)
        batch = layers[0][1].shape[0]
        data = np.full((len(layers), batch, heads, length, NUM_ATTENTION_STATS), np.nan, np.float32)
        for i, (_, array) in enumerate(layers):
            data[i, :, : array.shape[1]] = array
        return [name for name, _ in layers], data


def attention_stats_kind(tracer: TracerSettings, session: Session) -> AttentionStatsCapture | None:
    """The capture kind of attention statistics, in runs of a Tracer with attention="stats"."""
    return AttentionStatsCapture(tracer.model) if tracer.attention == "stats" else None
