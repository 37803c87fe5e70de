"""Logit lens: what the residual stream after each layer would predict if it went straight through
the model's own final norm and unembedding, per position. Hooks reduce each layer's residual to
its top-k tokens (and its per-token norm, with token_stats) as the forward pass runs, a chunk of
positions at a time, so neither [tokens, d_model] per layer nor [tokens, vocab] is ever kept."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from recon_fast.attribution.anatomy import LensParts, lens_parts
from recon_fast.dispatch import execution_device
from recon_fast.kernels.token_stats import STATS, token_stats
from recon_fast.trace.model_inputs import forward_takes, prepare_inputs, token_texts
from recon_fast.trace.session import extract_tensor

LENS_CHUNK = 256  # positions unembedded at once: bounds the transient [chunk, vocab] logits


@dataclass
class LogitLens:
    """layers:    "embed" (the residual entering block 0), then "L0" ... (after each block).
    positions: the token positions the lens was computed at (every one by default).
    token_ids: [layers, batch, positions, k] the top-k predicted tokens per layer and position;
               -1 where the residual is not finite (NaN/Inf: there is nothing to predict).
    logprobs:  [layers, batch, positions, k] their log-probabilities (float32; NaN there).
    norms:     [layers, batch, tokens] L2 norm of the residual stream at every token (float32).
    shape:     the residual's shape, [batch, tokens, d_model].
    tokens:    the input tokens as text per sequence (ids as text without a tokenizer)."""

    layers: list[str]
    positions: list[int]
    token_ids: torch.Tensor
    logprobs: torch.Tensor
    norms: torch.Tensor
    shape: tuple[int, int, int]
    tokens: list[list[str]]
    predicted: list[list[list[str]]] | None = None  # [layers][batch][positions] top-1 text

    def __repr__(self) -> str:
        return (f"LogitLens(layers={len(self.layers)} [{', '.join(self.layers[:2])}, ...], shape={list(self.shape)}, "
                f"positions={len(self.positions)}, k={self.token_ids.shape[-1]})")

    def to_dict(self) -> dict:
        return {"layers": self.layers, "shape": list(self.shape), "tokens": self.tokens, "positions": self.positions,
                "token_ids": self.token_ids.tolist(), "logprobs": self.logprobs.tolist(),
                "norms": self.norms.tolist(), "top1_text": self.predicted}


@torch.no_grad()
def logit_lens(model: nn.Module, input_ids, k: int = 5, positions: list[int] | None = None, *,
               tokenizer=None, **model_kwargs) -> LogitLens:
    """The logit lens of every layer at `positions` (default: every position; negative ones count
    from the end), from one forward pass. Unembedding costs [tokens x vocab] per layer, so asking
    for the positions you will look at saves most of the work at long context."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    parts = lens_parts(model)  # its own lookup: any model with blocks, a final norm and an unembedding
    inputs = prepare_inputs(model, tokenizer, input_ids, dict(model_kwargs), caller="logit_lens()")
    length = inputs["input_ids"].shape[1]
    if positions is None:
        positions = list(range(length))
    bad = [p for p in positions if not -length <= p < length]
    if bad:
        raise ValueError(f"positions {bad} are outside the input's {length} tokens")
    positions = [p % length for p in positions]
    where = torch.tensor(positions, dtype=torch.long, device=inputs["input_ids"].device)
    if forward_takes(model, "logits_to_keep"):
        inputs["logits_to_keep"] = 1  # the lens computes its own logits; the model's are not needed
    k = min(k, parts.unembed.weight.shape[0])
    readings: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    shapes: list[tuple[int, ...]] = []

    def read(residual: torch.Tensor) -> None:
        shapes.append(tuple(residual.shape))
        readings.append(_read_residual(parts, residual.detach(), where, k))

    handles = [parts.blocks[0].register_forward_pre_hook(
        lambda mod, args, kwargs: read(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)]
    for block in parts.blocks:
        handles.append(block.register_forward_hook(lambda mod, args, out: read(extract_tensor(out))))
    try:
        model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    if len(readings) != len(parts.blocks) + 1:
        raise RuntimeError(f"expected {len(parts.blocks) + 1} residual readings, got {len(readings)}")

    def gathered(part: int) -> torch.Tensor:  # [layers, ...] on the CPU, from whichever devices
        return torch.stack([reading[part].cpu() for reading in readings])

    ids = gathered(0)
    lens = LogitLens(layers=["embed"] + [f"L{i}" for i in range(len(parts.blocks))], positions=positions,
                     token_ids=ids, logprobs=gathered(1), norms=gathered(2), shape=shapes[-1],
                     tokens=token_texts(tokenizer, inputs["input_ids"].tolist()))
    if tokenizer is not None:
        top1 = ids[..., 0]  # [layers, batch, positions]; -1 where the residual is not finite
        texts = [token_texts(tokenizer, layer) for layer in top1.clamp_min(0).tolist()]
        lens.predicted = [[["<non-finite>" if t < 0 else text for t, text in zip(id_row, text_row)]
                           for id_row, text_row in zip(layer_ids, layer_texts)]
                          for layer_ids, layer_texts in zip(top1.tolist(), texts)]
    bad = (ids[..., 0] < 0).nonzero()
    if len(bad):
        layer, row, column = bad[0].tolist()
        warnings.warn(f"non-finite residual stream (NaN/Inf): first after {lens.layers[layer]} at token "
                      f"{positions[column]} (sequence {row}); its lens is -1 / NaN", UserWarning, stacklevel=3)
    return lens


def _read_residual(parts: LensParts, residual: torch.Tensor, where: torch.Tensor, k: int):
    """[B, T, d] -> top-k ids [B, P, k] at positions `where`, their log-probs, and per-token
    norms [B, T]."""
    norms = token_stats(residual)[..., STATS.index("energy")]
    residual = residual.index_select(1, where.to(residual.device))
    # Models split across devices: each module's input where it computes (accelerate's hooks
    # would move it too; an offloaded module's weights are meta between calls).
    norm_device = execution_device(parts.final_norm) or residual.device
    unembed_device = execution_device(parts.unembed) or norm_device
    top_ids, top_logprobs = [], []
    for start in range(0, residual.shape[1], LENS_CHUNK):
        chunk = residual[:, start:start + LENS_CHUNK].to(norm_device)
        normed = parts.final_norm(chunk)
        logits = parts.unembed(normed.to(unembed_device)).float() * parts.logit_multiplier
        if parts.logit_softcap is not None:  # what the model does to its own logits (Gemma2/3)
            logits = torch.tanh(logits / parts.logit_softcap) * parts.logit_softcap
        logprobs = torch.log_softmax(logits, dim=-1)
        values, ids = logprobs.topk(k, dim=-1)
        finite = torch.isfinite(chunk).all(-1, keepdim=True).to(ids.device)  # [B, chunk, 1]
        top_ids.append(ids.masked_fill(~finite, -1))
        top_logprobs.append(values.masked_fill(~finite, float("nan")))
    return torch.cat(top_ids, 1), torch.cat(top_logprobs, 1), norms
