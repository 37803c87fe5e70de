"""Attention, the capture of the probabilities an eager attention returns (`output_attentions`):
"full" keeps every probability, "summary" per head and query the entropy, max weight and argmax.
Its buffer is the model's own `attentions` output; its part of the cube is the `attention.{i}`
entries after the layers."""

from __future__ import annotations

from torch import nn

from recon_fast.trace.model_state import returns_attentions

MODES = (None, "full", "summary")


def check_mode(attention: str | None) -> None:
    if attention not in MODES:
        raise ValueError(f"attention must be None, 'full' or 'summary', got {attention!r}")


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


def cube_part(model: nn.Module, mode: str, attentions, first_index: int) -> list[dict]:
    """The cube's attention entries, numbered after the `first_index` layers."""
    if not attentions or any(a is None for a in attentions):
        raise _no_attentions(model, "returned")
    entries = []
    for i, att in enumerate(attentions):  # [batch, heads, queries, keys]
        entry = {"layer_index": first_index + i, "layer_name": f"attention.{i}"}
        probs = att.detach().float()
        if mode == "full":
            entry["attention_scores"] = probs.cpu().numpy()
        else:
            entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
            top, where = probs.max(dim=-1)
            entry["attention_summary"] = {"entropy": entropy.cpu().numpy(), "max_weight": top.cpu().numpy(),
                                          "argmax": where.cpu().numpy()}
        entries.append(entry)
    return entries
