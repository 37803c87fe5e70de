"""Attention probabilities, the capture of what an eager attention returns (`output_attentions`):
attention="full" keeps every probability (short inputs: [batch, heads, T, T] per layer). Its
buffer is the model's own `attentions` output; its part of the cube is the `attention.{i}`
entries after the layers. attention="stats" (any implementation, any length) is
attention_stats_capture."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from recon_fast.trace.model_inputs import ModelCall
from recon_fast.trace.model_state import model_state_kept, returns_attentions
from recon_fast.trace.session import Capture, Layout, Session, TracerSettings

MODES = (None, "full", "stats")


def check_mode(attention: str | None) -> None:
    if attention == "summary":
        raise ValueError("attention='summary' is now attention='stats': entropy, max_weight, argmax and five more "
                         "per head and query, under any attention implementation (cube.attention_stat('entropy'))")
    if attention not in MODES:
        raise ValueError(f"attention must be None, 'full' or 'stats', got {attention!r}")


def _no_attentions(model: nn.Module, verb: str) -> ValueError:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", "unknown")
    return ValueError(
        f"the model {verb} no attention probabilities (attention implementation: {impl}); "
        "load it with attn_implementation='eager' or call model.set_attn_implementation('eager')"
    )


def check_returned(model: nn.Module) -> None:
    """Before the run: the model's attention implementation returns probabilities."""
    if not returns_attentions(model):
        raise _no_attentions(model, "returns")


def cube_part(model: nn.Module, attentions, first_index: int) -> list[dict]:
    """The cube's attention entries, numbered after the `first_index` layers."""
    if not attentions or any(a is None for a in attentions):
        raise _no_attentions(model, "returned")
    return [{"layer_index": first_index + i, "layer_name": f"attention.{i}",
             "attention_scores": att.detach().float().cpu().numpy()}  # [batch, heads, queries, keys]
            for i, att in enumerate(attentions)]


class FullAttentionCapture(Capture):
    """attention="full" as a capture: its buffer is the model's output; its part, the entries
    (streams = False: held in the cube's shell; its objects follow the layers in the stream)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def prepare(self, call: ModelCall, mode: str) -> None:
        if mode == "generate":
            raise ValueError("attention='full' works with run(), not generate(); attention='stats' works with both")
        check_returned(self.model)
        call.kwargs["output_attentions"] = True

    def recording(self):
        return model_state_kept(self.model)

    def cube_part(self, layout: Layout) -> dict:
        attentions = getattr(layout.output, "attentions", None)
        return {"attention": cube_part(self.model, attentions, len(layout.layers))}

    def stream_part(self, layout: Layout, shell, path: str) -> Iterator[dict]:
        yield from shell.attention


def full_attention_kind(tracer: TracerSettings, session: Session) -> FullAttentionCapture | None:
    """The capture kind of attention probabilities, in runs of a Tracer with attention="full"."""
    return FullAttentionCapture(tracer.model) if tracer.attention == "full" else None
