"""Direct logit attribution on unmodified Hugging Face models: the final residual stream at a
position is split into what the embeddings, each attention (or each head) and each MLP wrote into
it, and each part is carried through the final norm, with the norm's scale frozen at the actual
residual, onto the unembedding row of the target token. What belongs to no component (norm bias,
unembedding bias) is a term of its own, so the terms add up to the model's logit.

One forward pass serves any number of positions; only [batch, d_model] rows at those positions
are kept (recon_fast.attribution.position_capture).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
from torch import nn

from recon_fast.attribution.anatomy import Anatomy, anatomy
from recon_fast.attribution.position_capture import PositionCapture
from recon_fast.trace.model_inputs import forward_takes, model_dtype, prepare_inputs, token_texts

# How far the sum of the captured parts may be from the captured residual, relative to the
# largest of them, before we call the architecture undecomposable: a few roundings of the
# model's own dtype per layer, far below what a missing or extra term would cause.
RECONSTRUCTION_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}

_LAYER_LABEL = re.compile(r"L(\d+)\.(attn|mlp|attn_bias|H\d+)$")


def layer_term(label: str) -> tuple[int, str] | None:
    """(layer, part) of a per-layer term label ("L3.mlp" -> (3, "mlp"), "L3.H7" -> (3, "H7")),
    or None for the others (embed, pos_embed, norm_bias, unembed_bias)."""
    match = _LAYER_LABEL.match(label)
    return (int(match.group(1)), match.group(2)) if match else None


@dataclass
class Attribution:
    """Direct logit attribution of one position for each sequence of a batch.

    labels:      term names: "embed", "pos_embed", "L{i}.attn" or "L{i}.H{h}" and "L{i}.attn_bias",
                 "L{i}.mlp", then "norm_bias" and "unembed_bias" where the model has them.
    values:      [batch, terms] float64; values[b].sum() is the model's logit for target_id[b].
    target_id:   [batch] the token attributed (by default the model's prediction there).
    target_text: the decoded target token per sequence.
    logit:       [batch] the model's own logit for target_id, from its forward pass.
    position:    the position as asked (may be negative); index: the same, counted from 0.
    """

    labels: list[str]
    values: torch.Tensor
    target_id: torch.Tensor
    target_text: list[str]
    logit: torch.Tensor
    position: int
    index: int
    n_layers: int
    n_heads: int
    per_head: bool

    def __repr__(self) -> str:
        top = ", ".join(f"{label} {value:+.3g}" for label, value, _ in self.top(3))
        return (f"Attribution(position={self.position}, batch={self.values.shape[0]}, terms={len(self.labels)}, "
                f"target={self.target_text[0]!r}, logit={float(self.logit[0]):.4g}, top: {top})")

    def total(self) -> torch.Tensor:
        """[batch] the sum of all terms (equals `logit` up to float rounding)."""
        return self.values.sum(-1)

    def top(self, k: int = 10, row: int = 0, share: str = "top") -> list[tuple[str, float, float]]:
        """The k terms of largest magnitude as (label, value, percent). percent is HexRay's
        |value| / sum of |value| over these k (share="top"), or over all terms (share="total")."""
        if share not in ("top", "total"):
            raise ValueError(f"share must be 'top' or 'total', got {share!r}")
        values = self.values[row]
        magnitude = values.abs()
        order = torch.argsort(magnitude, descending=True, stable=True)[:max(k, 0)]
        denominator = float(magnitude[order].sum() if share == "top" else magnitude.sum())
        denominator = denominator or 1.0
        return [(self.labels[i], float(values[i]), 100.0 * float(magnitude[i]) / denominator) for i in order.tolist()]

    def grid(self, row: int = 0) -> tuple[list[str], list[str], torch.Tensor]:
        """(row labels, column labels, [layers, columns]): attn and MLP per layer, or with
        per_head the heads of each layer (for a heatmap)."""
        columns = [f"H{h}" for h in range(self.n_heads)] if self.per_head else ["attn", "mlp"]
        grid = torch.zeros(self.n_layers, len(columns), dtype=self.values.dtype)
        for label, value in zip(self.labels, self.values[row].tolist()):
            term = layer_term(label)
            if term is not None and term[1] in columns:  # the output bias has no cell of its own
                grid[term[0], columns.index(term[1])] = value
        return [f"L{i}" for i in range(self.n_layers)], columns, grid

    def to_dict(self) -> dict:
        return {
            "position": self.position,
            "index": self.index,
            "per_head": self.per_head,
            "labels": list(self.labels),
            "sequences": [
                {"target_id": int(self.target_id[b]), "target_text": self.target_text[b],
                 "logit": float(self.logit[b]), "total": float(self.values[b].sum()),
                 "values": self.values[b].tolist()}
                for b in range(self.values.shape[0])
            ],
        }


def direct_logit_attribution(model: nn.Module, input_ids, position: int = -1, target=None,
                             per_head: bool = False, *, tokenizer=None, **model_kwargs) -> Attribution:
    """Direct logit attribution at `position` (see Attribution for the terms).

    input_ids: token ids ([T] or [batch, T]), a dict/BatchEncoding, or text with `tokenizer`.
    target:    None (the model's argmax at that position), a token id, a [batch] tensor of ids,
               or a token's text (needs `tokenizer`; it must be a single token).
    per_head:  split each attention output into its heads (and the output-projection bias).
    """
    return attribute_positions(model, input_ids, [position], target, per_head, tokenizer=tokenizer,
                               **model_kwargs)[0]


@torch.no_grad()
def attribute_positions(model: nn.Module, input_ids, positions: list[int], target=None,
                        per_head: bool = False, *, tokenizer=None, **model_kwargs) -> list[Attribution]:
    """direct_logit_attribution at several positions from one forward pass (a causal model's
    prefix up to each position is the same as a separate run on that prefix)."""
    parts = anatomy(model)
    _check_eval_mode(model)
    inputs = prepare_inputs(model, tokenizer, input_ids, dict(model_kwargs), caller="direct_logit_attribution()")
    ids = inputs["input_ids"]
    length = ids.shape[1]
    indices = [_index(p, length) for p in positions]
    where = torch.tensor(indices, dtype=torch.long, device=ids.device)
    _check_not_padding(inputs.get("attention_mask"), where, positions)
    kept = forward_takes(model, "logits_to_keep")
    if kept:  # only the rows we need: no [batch, tokens, vocab] logits
        inputs["logits_to_keep"] = where
    with PositionCapture(where) as capture:
        _hook_terms(capture, parts, per_head)
        output = model(**inputs)
    logits = _logits_at(output.logits, where, length, kept)  # [B, P, V]
    residual = capture.rows("final_residual").double()  # [B, P, d]; the math happens on its device
    terms = _vector_terms(capture, parts, per_head, residual.device)  # label -> [B, P, d] or [B, P, H, d] float64
    _check_reconstruction(model, terms, residual, indices)
    targets = _targets(target, logits, tokenizer)  # [B, P]
    labels, values = _logit_terms(parts, terms, residual, targets)  # [B, P, terms]
    actual = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double().cpu()
    texts = token_texts(tokenizer, targets.tolist())
    return [
        Attribution(labels=labels, values=values[:, j].cpu(), target_id=targets[:, j].cpu(),
                    target_text=[row[j] for row in texts], logit=actual[:, j], position=positions[j],
                    index=indices[j], n_layers=len(parts.blocks), n_heads=parts.n_heads, per_head=per_head)
        for j in range(len(indices))
    ]


def _check_eval_mode(model: nn.Module) -> None:
    """Training mode is refused outright: dropout hides in nn.Dropout modules, in config fields
    (attention_dropout, attn_pdrop, ...) applied functionally inside attention kernels, and in
    whatever a future family invents; any of it makes the terms random."""
    training = next((name or type(model).__name__ for name, m in model.named_modules() if m.training), None)
    if training is not None:
        raise ValueError(f"{type(model).__name__} is in training mode ({training!r}): its dropout (modules or "
                         "attention_dropout) would make the terms random and they would not add up; "
                         "call model.eval() first")


def _index(position: int, length: int) -> int:
    if isinstance(position, bool):
        raise TypeError("position must be an int, got bool")
    try:
        position = operator.index(position)  # ints, numpy integers, 0-d integer tensors
    except TypeError:
        raise TypeError(f"position must be an int, got {type(position).__name__}") from None
    if not -length <= position < length:
        raise ValueError(f"position {position} is outside the input's {length} tokens")
    return position % length


def _check_not_padding(attention_mask, where: torch.Tensor, positions: list[int]) -> None:
    """Positions are shared by the batch: one that is padding in some sequence would attribute a
    pad token's prediction."""
    if not torch.is_tensor(attention_mask):
        return
    padded = (attention_mask.index_select(1, where.to(attention_mask.device)) == 0).nonzero().tolist()
    if padded:
        row, column = padded[0]
        raise ValueError(f"position {positions[column]} is padding in sequence {row}; pad on the left "
                         "(tokenizer.padding_side = 'left') or attribute the sequences one by one")


def _logits_at(logits: torch.Tensor, where: torch.Tensor, length: int, kept: bool) -> torch.Tensor:
    """[B, P, V] logits at `where`, whether the model kept only those rows (in that order) or all."""
    if kept and logits.shape[1] == where.numel():
        return logits
    if logits.shape[1] == length:
        return logits.index_select(1, where)
    raise RuntimeError(f"the model returned logits for {logits.shape[1]} positions; expected {length} or {where.numel()}")


def _hook_terms(capture: PositionCapture, parts: Anatomy, per_head: bool) -> None:
    capture.output_of("embed", parts.embed)
    if parts.pos_embed is not None:
        capture.output_of("pos_embed", parts.pos_embed)
    for i, block in enumerate(parts.blocks):
        if per_head:
            capture.input_of(f"L{i}.heads", block.out_proj)
        else:
            capture.output_of(f"L{i}.attn", block.attn)
        capture.output_of(f"L{i}.mlp", block.mlp)
    capture.input_of("final_residual", parts.final_norm.module)


def _vector_terms(capture: PositionCapture, parts: Anatomy, per_head: bool,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """What each component wrote into the residual stream at the captured positions, float64 on
    `device` (layers of a model split across GPUs are gathered there)."""

    def rows(key: str) -> torch.Tensor:
        return capture.rows(key).to(device, torch.float64)

    batch = capture.rows("final_residual").shape[0]
    terms = {"embed": rows("embed")}
    if parts.pos_embed is not None:  # GPT-2's position embedding is [1, T, d]: the same for every row
        pos = rows("pos_embed")
        terms["pos_embed"] = pos.expand(batch, *pos.shape[1:])
    for i, block in enumerate(parts.blocks):
        if per_head:
            heads = rows(f"L{i}.heads")  # [B, P, H * dh]
            weight = parts.out_proj_weight(block).to(device, torch.float64)  # [d, H * dh]
            split_heads = heads.unflatten(-1, (parts.n_heads, parts.head_dim))  # [B, P, H, dh]
            split_weight = weight.unflatten(-1, (parts.n_heads, parts.head_dim))  # [d, H, dh]
            terms[f"L{i}.heads"] = torch.einsum("bphk,dhk->bphd", split_heads, split_weight)
            bias = parts.out_proj_bias(block)
            if bias is not None:
                terms[f"L{i}.attn_bias"] = bias.to(device, torch.float64).expand_as(terms["embed"])
        else:
            terms[f"L{i}.attn"] = rows(f"L{i}.attn")
        terms[f"L{i}.mlp"] = rows(f"L{i}.mlp")
    return terms


def _check_reconstruction(model: nn.Module, terms: dict[str, torch.Tensor], residual: torch.Tensor,
                          indices: list[int]) -> None:
    """The parts must add up to the residual the final norm saw; if they do not, this model's
    architecture writes something we do not know about, and every number would be wrong."""
    total = torch.zeros_like(residual)
    largest = residual.norm(dim=-1)
    for vector in terms.values():
        sizes = vector.norm(dim=-1)
        if vector.dim() == 4:  # [B, P, H, d]: the heads add up to the attention output
            vector, sizes = vector.sum(-2), sizes.amax(-1)
        total += vector
        largest = torch.maximum(largest, sizes)
    _check_finite(model, terms, residual, indices)
    error = ((total - residual).norm(dim=-1) / largest.clamp_min(torch.finfo(torch.float64).tiny))
    tolerance = RECONSTRUCTION_TOLERANCE.get(model_dtype(model), 1e-4)
    worst = float(error.max())
    if not worst <= tolerance:
        raise ValueError(
            f"the residual stream of {type(model).__name__} at positions {indices} is not the sum of its "
            f"embedding, attention and MLP outputs (relative error {worst:.3g} > {tolerance:g}): this "
            "architecture needs its own adapter in recon_fast.anatomy"
        )


def _check_finite(model: nn.Module, terms: dict[str, torch.Tensor], residual: torch.Tensor,
                  indices: list[int]) -> None:
    """NaN or Inf in the residual stream is the model's own (weights, overflow), not a missing
    term: name the first part, in residual order, that carries it."""
    if bool(torch.isfinite(residual).all()):
        return
    for label, vector in terms.items():
        bad = ~torch.isfinite(vector).flatten(2).all(-1)  # [B, P]
        if bool(bad.any()):
            row, column = bad.nonzero()[0].tolist()
            raise ValueError(f"non-finite values (NaN/Inf) in the residual stream of {type(model).__name__}: "
                             f"first written by {label} at position {indices[column]} (sequence {row}); "
                             "check the model's weights and dtype")
    raise ValueError(f"non-finite values (NaN/Inf) in the residual stream of {type(model).__name__} at "
                     f"positions {indices}; check the model's weights and dtype")


def _targets(target, logits: torch.Tensor, tokenizer) -> torch.Tensor:
    """[B, P] token ids to attribute."""
    batch, positions = logits.shape[:2]
    if target is None:
        return logits.argmax(-1)
    if isinstance(target, str):
        if tokenizer is None:
            raise ValueError("a target given as text needs a tokenizer")
        ids = tokenizer.encode(target, add_special_tokens=False)
        if len(ids) != 1:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise ValueError(f"target {target!r} is {len(ids)} tokens {pieces}, not one; pass a single token or its id")
        target = ids[0]
    ids = torch.as_tensor(target, dtype=torch.long, device=logits.device)
    if ids.dim() == 0:
        ids = ids.expand(batch)
    if ids.shape != (batch,):
        raise ValueError(f"target must be one id or one per sequence ({batch}), got shape {tuple(ids.shape)}")
    vocab = logits.shape[-1]
    if bool(((ids < 0) | (ids >= vocab)).any()):
        raise ValueError(f"target id out of range for a vocabulary of {vocab}: {ids.tolist()}")
    return ids.unsqueeze(1).expand(batch, positions)


def _logit_terms(parts: Anatomy, terms: dict[str, torch.Tensor], residual: torch.Tensor,
                 targets: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """Each vector term through the final norm (scale frozen at `residual`) onto the unembedding
    rows of `targets`: (labels, [B, P, terms] float64)."""
    norm = parts.final_norm
    device = residual.device
    weight = parts.unembed.weight
    unembed_rows = weight.index_select(0, targets.flatten().to(weight.device)).to(device, torch.float64)
    unembed_rows = unembed_rows.view(*targets.shape, -1)  # [B, P, d]
    direction = unembed_rows
    if norm.weight is not None:
        direction = direction * norm.weight.to(device, torch.float64)
    if norm.kind == "layernorm":
        centred = residual - residual.mean(-1, keepdim=True)
        scale = (centred.pow(2).mean(-1) + norm.eps).sqrt()  # [B, P]
        # LayerNorm centres every part; centring the direction instead gives the same dot product.
        direction = direction - direction.mean(-1, keepdim=True)
    else:
        scale = (residual.pow(2).mean(-1) + norm.eps).sqrt()
    labels, columns = [], []
    for label, vector in terms.items():
        if vector.dim() == 4:  # [B, P, H, d]: one term per head
            layer = label.split(".")[0]
            labels += [f"{layer}.H{h}" for h in range(vector.shape[2])]
            columns.append((vector * direction.unsqueeze(2)).sum(-1) / scale.unsqueeze(-1))
        else:
            labels.append(label)
            columns.append(((vector * direction).sum(-1) / scale).unsqueeze(-1))
    if norm.bias is not None:
        labels.append("norm_bias")
        bias = norm.bias.to(device, torch.float64)
        columns.append((unembed_rows * bias).sum(-1, keepdim=True))
    unembed_bias = getattr(parts.unembed, "bias", None)
    if unembed_bias is not None:
        labels.append("unembed_bias")
        picked = unembed_bias[targets.to(unembed_bias.device)]
        columns.append(picked.to(device, torch.float64).unsqueeze(-1))
    return labels, torch.cat(columns, dim=-1)
