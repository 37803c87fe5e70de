"""Direct logit attribution on unmodified Hugging Face models: the final residual stream at a
position is split into what the embeddings, each attention (or each head) and each MLP wrote into
it, and each part is carried through the final norm, with the norm's scale frozen at the actual
residual, onto the unembedding row of the target token. What belongs to no component (norm bias,
unembedding bias) is a term of its own, so the terms add up to the model's logit (or to a
difference of two logits). A component may be split further, its parts through the same frozen
maps: attention into heads, heads into the source positions they read from
(recon_fast.attribution.source_capture), MLPs into their hidden neurons. A source split may keep
only each head's k largest sources and one remainder term per head ("L{i}.H{h}.S_rest"), chosen
on the device, so that it stays small at thousands of tokens and still adds up.

One forward pass serves any number of positions; only rows at those positions are kept
([batch, positions, d_model], d_mlp for neurons; attention rows and values for sources).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import operator
import re
from dataclasses import dataclass

import torch
from torch import nn

from recon_fast.attribution.anatomy import Anatomy, anatomy
from recon_fast.attribution.position_capture import PositionCapture
from recon_fast.attribution.source_capture import SourceCapture
from recon_fast.dispatch import weight as real_weight
from recon_fast.trace.model_inputs import forward_takes, model_dtype, prepare_inputs, token_texts

# How far the sum of the captured parts may be from the captured residual, relative to the
# largest of them, before we call the architecture undecomposable: a few roundings of the
# model's own dtype per layer, far below what a missing or extra term would cause.
RECONSTRUCTION_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}

# The part of a head's source split that the top-k mode folds into one term: "L{i}.H{h}.S_rest".
SOURCE_REST = "S_rest"
_LAYER_LABEL = re.compile(r"L(\d+)\.(attn|mlp|attn_bias|mlp_bias|attn_norm_bias|mlp_norm_bias"
                          r"|H\d+(?:\.S(?:\d+|_rest))?|N\d+)$")


def layer_term(label: str) -> tuple[int, str] | None:
    """(layer, part) of a per-layer term label ("L3.mlp" -> (3, "mlp"), "L3.H7" -> (3, "H7"),
    "L3.N12" -> (3, "N12"), "L3.H7.S5" -> (3, "H7.S5"), "L3.H7.S_rest" -> (3, "H7.S_rest")), or None
    for the others (embed, pos_embed, norm_bias, unembed_bias)."""
    match = _LAYER_LABEL.match(label)
    return (int(match.group(1)), match.group(2)) if match else None


def _cell(part: str) -> str:
    """The grid column a per-layer term adds to: a source term to its head, a neuron to "mlp"."""
    return "mlp" if part.startswith("N") else part.split(".")[0]


@dataclass
class Attribution:
    """Direct logit attribution of one position for each sequence of a batch.

    labels:      term names, in residual order: "embed", "pos_embed"; per layer "L{i}.attn", or with
                 per_head "L{i}.H{h}" (with by_source "L{i}.H{h}.S{j}": head h's share read from
                 source position j, and with source_top_k a last "L{i}.H{h}.S_rest" per head: the
                 sum of its sources not kept) and "L{i}.attn_bias"; "L{i}.mlp", or with per_neuron "L{i}.N{n}"
                 and "L{i}.mlp_bias"; "L{i}.attn_norm_bias"/"L{i}.mlp_norm_bias" for a post-norm
                 with a bias; then "norm_bias" and "unembed_bias" where the model has them.
    values:      [batch, terms] float64; values[b].sum() is the model's logit for target_id[b]
                 (minus its logit for versus_id[b] when a difference was asked for).
    target_id:   [batch] the token attributed (by default the model's prediction there).
    target_text: the decoded target token per sequence.
    versus_id, versus_text: the token whose logit is subtracted, or None.
    logit:       [batch] the model's own logit (difference) for the target, from its forward pass
                 (before final soft-capping for Gemma2/3: see `note`).
    position:    the position as asked (may be negative); index: the same, counted from 0.
    note:        what the logit is, where it is not simply the model's output (soft-capping).
    source_top_k: by_source's top-k mode: each head keeps the sources that are among the k largest
                 |term| of any sequence of the batch (so the sequences share labels; a batch of one
                 keeps exactly k), in position order, then its "S_rest" term. None where every
                 source term is kept (also when k is at least the number of keys).
    rest_magnitude: [batch] with source_top_k, the sum of |term| over the source terms folded
                 into the "S_rest" terms (top(share="total") counts them as the full split would).
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
    versus_id: torch.Tensor | None = None
    versus_text: list[str] | None = None
    per_neuron: bool = False
    by_source: bool = False
    note: str | None = None
    source_top_k: int | None = None
    rest_magnitude: torch.Tensor | None = None

    def __repr__(self) -> str:
        top = ", ".join(f"{label} {value:+.3g}" for label, value, _ in self.top(3))
        versus = f", versus={self.versus_text[0]!r}" if self.versus_text else ""
        return (f"Attribution(position={self.position}, batch={self.values.shape[0]}, terms={len(self.labels)}, "
                f"target={self.target_text[0]!r}{versus}, logit={float(self.logit[0]):.4g}, top: {top})")

    def total(self) -> torch.Tensor:
        """[batch] the sum of all terms (equals `logit` up to float rounding)."""
        return self.values.sum(-1)

    def top(self, k: int = 10, row: int = 0, share: str = "top") -> list[tuple[str, float, float]]:
        """The k terms of largest magnitude as (label, value, percent). percent is HexRay's
        |value| / sum of |value| over these k (share="top"), or over all terms (share="total").
        The "S_rest" remainders are sums of many sources, not single terms: they are not listed,
        and share="total" counts the sources they hold, so for k <= source_top_k the list is the
        full split's (beyond, a head's (source_top_k + 1)-th source may be missing from it)."""
        if share not in ("top", "total"):
            raise ValueError(f"share must be 'top' or 'total', got {share!r}")
        values = self.values[row]
        single = self._single_terms
        magnitude = values.abs() if single is None else values[single].abs()
        order = torch.argsort(magnitude, descending=True, stable=True)[:max(k, 0)]
        denominator = float(magnitude[order].sum() if share == "top" else magnitude.sum())
        if share == "total" and self.rest_magnitude is not None:
            denominator += float(self.rest_magnitude[row])
        denominator = denominator or 1.0
        columns = order if single is None else single[order]
        return [(self.labels[i], float(values[i]), 100.0 * float(magnitude[o]) / denominator)
                for i, o in zip(columns.tolist(), order.tolist())]

    @functools.cached_property
    def _single_terms(self) -> torch.Tensor | None:  # columns other than "S_rest", None when all are
        if self.source_top_k is None:
            return None
        return torch.tensor([i for i, label in enumerate(self.labels) if not label.endswith(SOURCE_REST)],
                            dtype=torch.long)

    @functools.cached_property
    def _terms(self) -> list[tuple[int, str] | None]:  # layer_term of every label, parsed once
        return [layer_term(label) for label in self.labels]

    def _largest(self, wanted, k: int, row: int) -> list[tuple[str, float]]:
        columns = [i for i, term in enumerate(self._terms) if wanted(term)]
        values = self.values[row, columns]
        order = torch.argsort(values.abs(), descending=True, stable=True)[:max(k, 0)].tolist()
        return [(self.labels[columns[i]], float(values[i])) for i in order]

    def top_neurons(self, k: int = 10, layer: int | None = None, row: int = 0) -> list[tuple[str, float]]:
        """The k neuron terms ("L{i}.N{n}", value) of largest magnitude, overall or in one layer
        (needs per_neuron)."""
        if not self.per_neuron:
            raise ValueError("top_neurons() needs an attribution computed with per_neuron=True")
        return self._largest(lambda t: t is not None and t[1].startswith("N") and layer in (None, t[0]), k, row)

    def top_sources(self, layer: int, head: int, k: int = 5, row: int = 0) -> list[tuple[int, float]]:
        """The k source positions (j, value) that head `head` of `layer` moved the most logit
        from (needs by_source; with source_top_k, k may not exceed it)."""
        if not self.by_source:
            raise ValueError("top_sources() needs an attribution computed with by_source=True")
        if self.source_top_k is not None and k > self.source_top_k:
            raise ValueError(f"top_sources(k={k}): this attribution kept the {self.source_top_k} largest sources "
                             "of each head (source_top_k); compute it with a larger source_top_k, or None for all")
        prefix, rest = f"H{head}.S", f"H{head}.{SOURCE_REST}"
        found = self._largest(lambda t: t is not None and t[0] == layer and t[1].startswith(prefix) and t[1] != rest,
                              k, row)
        return [(int(label.rsplit(".S", 1)[1]), value) for label, value in found]

    def head_totals(self, row: int = 0) -> dict[str, float]:
        """"L{i}.H{h}" -> the head's term (its source terms, and "S_rest", summed under by_source)."""
        totals: dict[str, float] = {}
        for label, value in zip(self.labels, self.values[row].tolist()):
            term = layer_term(label)
            if term is not None and term[1].startswith("H"):
                key = f"L{term[0]}.{_cell(term[1])}"
                totals[key] = totals.get(key, 0.0) + value
        return totals

    def grid(self, row: int = 0) -> tuple[list[str], list[str], torch.Tensor]:
        """(row labels, column labels, [layers, columns]): attn and MLP per layer, or with
        per_head the heads of each layer (for a heatmap). Neurons add up into "mlp", sources
        into their head; output biases have no cell of their own."""
        columns = [f"H{h}" for h in range(self.n_heads)] if self.per_head else ["attn", "mlp"]
        grid = torch.zeros(self.n_layers, len(columns), dtype=self.values.dtype)
        for label, value in zip(self.labels, self.values[row].tolist()):
            term = layer_term(label)
            if term is not None and _cell(term[1]) in columns:
                grid[term[0], columns.index(_cell(term[1]))] += value
        return [f"L{i}" for i in range(self.n_layers)], columns, grid

    def to_dict(self) -> dict:
        document = {
            "position": self.position,
            "index": self.index,
            "per_head": self.per_head,
            "per_neuron": self.per_neuron,
            "by_source": self.by_source,
            **({"source_top_k": self.source_top_k} if self.by_source else {}),
            "labels": list(self.labels),
            "sequences": [
                {"target_id": int(self.target_id[b]), "target_text": self.target_text[b],
                 "logit": float(self.logit[b]), "total": float(self.values[b].sum()),
                 "values": self.values[b].tolist()}
                for b in range(self.values.shape[0])
            ],
        }
        if self.rest_magnitude is not None:
            for b, sequence in enumerate(document["sequences"]):
                sequence["rest_magnitude"] = float(self.rest_magnitude[b])
        if self.versus_id is not None:
            for b, sequence in enumerate(document["sequences"]):
                sequence["versus_id"], sequence["versus_text"] = int(self.versus_id[b]), self.versus_text[b]
        if self.note:
            document["note"] = self.note
        return document


def direct_logit_attribution(model: nn.Module, input_ids, position: int = -1, target=None,
                             per_head: bool = False, *, per_neuron: bool = False, by_source: bool = False,
                             source_top_k: int | None = None, tokenizer=None, **model_kwargs) -> Attribution:
    """Direct logit attribution at `position` (see Attribution for the terms).

    input_ids:  token ids ([T] or [batch, T]), a dict/BatchEncoding, or text with `tokenizer`.
    target:     None (the model's argmax at that position), a token id, a [batch] tensor of ids,
                or a token's text (needs `tokenizer`; it must be a single token); or a tuple
                (a, b) of two of these: the attribution of logit(a) - logit(b) (a None: the argmax).
    per_head:   split each attention output into its heads (and the output-projection bias).
    per_neuron: split each MLP output into its hidden neurons (and the down projection's bias).
    by_source:  split each head's term over the source positions it attended to (implies per_head).
    source_top_k: with by_source, keep per head only its k sources of largest |term| (chosen on
                the device) and one "L{i}.H{h}.S_rest" term, the sum of the others, so the terms
                still add up; None keeps all of them (layers x heads x tokens terms).
    """
    return attribute_positions(model, input_ids, [position], target, per_head, per_neuron=per_neuron,
                               by_source=by_source, source_top_k=source_top_k, tokenizer=tokenizer,
                               **model_kwargs)[0]


@torch.no_grad()
def attribute_positions(model: nn.Module, input_ids, positions: list[int], target=None,
                        per_head: bool = False, *, per_neuron: bool = False, by_source: bool = False,
                        source_top_k: int | None = None, tokenizer=None, **model_kwargs) -> list[Attribution]:
    """direct_logit_attribution at several positions from one forward pass (a causal model's
    prefix up to each position is the same as a separate run on that prefix). With source_top_k,
    each position keeps its own sources, so the positions' labels differ."""
    _check_source_top_k(source_top_k, by_source)
    parts = anatomy(model)
    _check_eval_mode(model)
    per_head = per_head or by_source  # sources split heads
    # The logits are taken from the unembedding's own output (before any scaling or soft-capping).
    inputs = prepare_inputs(model, tokenizer, input_ids, dict(model_kwargs), caller="direct_logit_attribution()")
    ids = inputs["input_ids"]
    length = ids.shape[1]
    indices = [_index(p, length) for p in positions]
    where = torch.tensor(indices, dtype=torch.long, device=ids.device)
    _check_not_padding(inputs.get("attention_mask"), where, positions)
    kept = forward_takes(model, "logits_to_keep")
    if kept:  # only the rows we need: no [batch, tokens, vocab] logits
        inputs["logits_to_keep"] = where
    sources = SourceCapture({block.attn: i for i, block in enumerate(parts.blocks)}, where) if by_source else None
    with PositionCapture(where) as capture, (sources or contextlib.nullcontext()):
        _hook_terms(capture, parts, per_head, per_neuron)
        capture.whole_output_of("logits", parts.unembed)
        model(**inputs)
    logits = _logits_at(capture.whole("logits"), where, length, kept)  # [B, P, V]
    residual = capture.rows("final_residual").double()  # [B, P, d]; the math happens on its device
    vectors = _vector_terms(capture, parts, residual.device)  # label -> [B, P, d] float64
    _check_reconstruction(model, vectors, residual, indices)
    targets, versus = _targets(target, logits, tokenizer, descending=parts.logit_multiplier >= 0)  # [B, P] each
    terms, rest_magnitude = _logit_terms(model, parts, capture, sources, vectors, residual, targets, versus,
                                         per_head=per_head, per_neuron=per_neuron, source_top_k=source_top_k)
    actual = _picked(logits, targets)
    if versus is not None:
        actual = actual - _picked(logits, versus)
    actual = (actual * parts.logit_multiplier).cpu()
    texts = token_texts(tokenizer, targets.tolist())
    versus_texts = token_texts(tokenizer, versus.tolist()) if versus is not None else None
    note = None
    if parts.logit_softcap is not None:
        note = (f"pre-soft-cap logit: the model outputs {parts.logit_softcap:g} * tanh(logit / "
                f"{parts.logit_softcap:g}) (final_logit_softcapping), which no sum of terms can be")
    if rest_magnitude is None:
        source_top_k = None  # k was at least the number of keys: every source term was kept
    return [
        Attribution(labels=terms[j][0], values=terms[j][1].cpu(), target_id=targets[:, j].cpu(),
                    target_text=[row[j] for row in texts], logit=actual[:, j], position=positions[j],
                    index=indices[j], n_layers=len(parts.blocks), n_heads=parts.n_heads, per_head=per_head,
                    versus_id=versus[:, j].cpu() if versus is not None else None,
                    versus_text=[row[j] for row in versus_texts] if versus_texts else None,
                    per_neuron=per_neuron, by_source=by_source, note=note, source_top_k=source_top_k,
                    rest_magnitude=rest_magnitude[:, j].cpu() if rest_magnitude is not None else None)
        for j in range(len(indices))
    ]


def _picked(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return logits.gather(-1, ids.unsqueeze(-1).to(logits.device)).squeeze(-1).double()


def _check_source_top_k(k, by_source: bool) -> None:
    if k is None:
        return
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"source_top_k must be a positive int or None (every source), got {k!r}")
    if not by_source:
        raise ValueError("source_top_k keeps the largest source terms of each head: it needs by_source=True")


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


def _hook_terms(capture: PositionCapture, parts: Anatomy, per_head: bool, per_neuron: bool) -> None:
    if parts.embed is not None:
        capture.output_of("embed", parts.embed)
    else:  # what enters block 0: the embedding with any scale or multiplier the model applies
        capture.input_of("embed", parts.blocks[0].module)
    if parts.pos_embed is not None:
        capture.output_of("pos_embed", parts.pos_embed)
    for i, block in enumerate(parts.blocks):
        for part, post_norm in (("attn", block.attn_post_norm), ("mlp", block.mlp_post_norm)):
            if post_norm is not None:  # the write is what leaves the post-norm
                capture.output_of(f"L{i}.{part}", post_norm.module)
                if per_head if part == "attn" else per_neuron:
                    capture.input_of(f"L{i}.{part}_raw", post_norm.module)
            else:
                capture.output_of(f"L{i}.{part}", getattr(block, part))
        if per_head:
            capture.input_of(f"L{i}.heads", block.out_proj)
        if per_neuron:
            capture.input_of(f"L{i}.neurons", block.down_proj)
    capture.input_of("final_residual", parts.final_norm.module)


def _vector_terms(capture: PositionCapture, parts: Anatomy, device: torch.device) -> dict[str, torch.Tensor]:
    """What the embeddings and each attention and MLP wrote into the residual stream at the
    captured positions, float64 on `device` (layers of a model split across GPUs are gathered
    there)."""

    def rows(key: str) -> torch.Tensor:
        return capture.rows(key).to(device, torch.float64)

    batch = capture.rows("final_residual").shape[0]
    terms = {"embed": rows("embed")}
    if parts.pos_embed is not None:  # GPT-2's position embedding is [1, T, d]: the same for every row
        pos = rows("pos_embed")
        terms["pos_embed"] = pos.expand(batch, *pos.shape[1:])
    for i in range(len(parts.blocks)):
        for part in ("attn", "mlp"):
            terms[f"L{i}.{part}"] = rows(f"L{i}.{part}") * parts.residual_multiplier
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
            "architecture needs its own adapter in recon_fast.attribution.anatomy"
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


def _targets(target, logits: torch.Tensor, tokenizer, descending: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[B, P] token ids to attribute, and [B, P] ids whose logit is subtracted (or None)."""
    if isinstance(target, tuple):
        if len(target) != 2:
            raise ValueError(f"a target tuple is (token, versus token), for logit(token) - logit(versus); "
                             f"got {len(target)} items (pass a list or tensor for one id per sequence)")
        chosen, versus = (_target_ids(t, logits, tokenizer, descending) for t in target)
        if torch.equal(chosen, versus):
            raise ValueError(f"target and versus are the same token ({chosen.flatten()[0].item()}): "
                             "their logit difference is 0 by definition")
        return chosen, versus
    return _target_ids(target, logits, tokenizer, descending), None


def _target_ids(target, logits: torch.Tensor, tokenizer, descending: bool) -> torch.Tensor:
    batch, positions = logits.shape[:2]
    if target is None:  # the prediction (a negative logit multiplier would turn the order round)
        return logits.argmax(-1) if descending else logits.argmin(-1)
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


def _logit_terms(model: nn.Module, parts: Anatomy, capture: PositionCapture, sources: SourceCapture | None,
                 vectors: dict[str, torch.Tensor], residual: torch.Tensor, targets: torch.Tensor,
                 versus: torch.Tensor | None, *, per_head: bool, per_neuron: bool, source_top_k: int | None = None
                 ) -> tuple[list[tuple[list[str], torch.Tensor]], torch.Tensor | None]:
    """Each term through the final norm (scale frozen at `residual`) onto the unembedding rows of
    `targets` (minus those of `versus`): per position (labels, [B, terms] float64), and with
    source_top_k [B, P] the magnitude folded into "S_rest" terms (None if nothing was). Split
    terms (heads, neurons, sources) go through the same frozen maps, and a post-norm's scale
    frozen at its own input, so a component's parts add up to its term."""
    device = residual.device
    tolerance = RECONSTRUCTION_TOLERANCE.get(model_dtype(model), 1e-4)

    unembed_weight = real_weight(parts.unembed)  # read in once where the unembedding is offloaded

    def unembedding(ids: torch.Tensor) -> torch.Tensor:  # [B, P] -> [B, P, d] float64
        weight = unembed_weight
        picked = weight.index_select(0, ids.flatten().to(weight.device)).to(device, torch.float64)
        return picked.view(*ids.shape, -1)

    unembed_rows = unembedding(targets)
    if versus is not None:
        unembed_rows = unembed_rows - unembedding(versus)
    unembed_rows = unembed_rows * parts.logit_multiplier
    direction = parts.final_norm.pull_back(unembed_rows, residual)  # [B, P, d]: reads a part's logit share
    pieces: list[tuple[list, torch.Tensor | list[torch.Tensor]]] = []  # see _per_position
    rest_magnitude = None

    def add(names: list[str], column: torch.Tensor) -> None:  # column [B, P, len(names)]
        pieces.append((names, column))

    def dot(vector: torch.Tensor, towards: torch.Tensor) -> torch.Tensor:
        return (vector * towards).sum(-1, keepdim=True)

    def rows(key: str) -> torch.Tensor:
        return capture.rows(key).to(device, torch.float64)

    def inside(block, part: str, i: int) -> tuple[torch.Tensor, list[str], list[torch.Tensor]]:
        """The direction as seen before the component's post-norm and residual multiplier, and
        the post-norm's bias term if it has one."""
        towards = direction * parts.residual_multiplier
        post_norm = block.attn_post_norm if part == "attn" else block.mlp_post_norm
        if post_norm is None:
            return towards, [], []
        names, extra = [], []
        if post_norm.bias is not None:
            names, extra = [f"L{i}.{part}_norm_bias"], [dot(post_norm.bias.to(device, torch.float64), towards)]
        return post_norm.pull_back(towards, rows(f"L{i}.{part}_raw")), names, extra

    add(["embed"], dot(vectors["embed"], direction))
    if "pos_embed" in vectors:
        add(["pos_embed"], dot(vectors["pos_embed"], direction))
    heads, head_dim = parts.n_heads, parts.head_dim
    for i, block in enumerate(parts.blocks):
        whole = {part: dot(vectors[f"L{i}.{part}"], direction) for part in ("attn", "mlp")}
        if per_head:
            towards, names, extra = inside(block, "attn", i)
            weight = parts.out_proj_weight(block).to(device, torch.float64).unflatten(-1, (heads, head_dim))
            reads = torch.einsum("bpd,dhk->bphk", towards, weight)  # [B, P, H, dh]: what a head's output is worth
            outputs = rows(f"L{i}.heads").unflatten(-1, (heads, head_dim))  # [B, P, H, dh]
            if sources is not None:
                split = _source_terms(sources, i, outputs, reads, tolerance)  # [B, P, H, Tk]
                keys = split.shape[-1]
                if source_top_k is not None and source_top_k < keys:
                    kept_labels, kept_values, folded = _top_source_terms(split, source_top_k, i)
                    pieces.append((kept_labels, kept_values))
                    rest_magnitude = folded if rest_magnitude is None else rest_magnitude + folded
                else:
                    add([f"L{i}.H{h}.S{j}" for h in range(heads) for j in range(keys)], split.flatten(2))
            else:
                split = (outputs * reads).sum(-1)
                add([f"L{i}.H{h}" for h in range(heads)], split)
            bias = parts.out_proj_bias(block)
            if bias is not None:
                names, extra = [f"L{i}.attn_bias"] + names, [dot(bias.to(device, torch.float64), towards)] + extra
            if names:
                add(names, torch.cat(extra, -1))
            _check_split(f"the heads of layer {i}", [split.flatten(2), *extra], whole["attn"], tolerance)
        else:
            add([f"L{i}.attn"], whole["attn"])
        if per_neuron:
            towards, names, extra = inside(block, "mlp", i)
            weight = parts.down_proj_weight(block).to(device, torch.float64)  # [d, d_mlp]
            split = rows(f"L{i}.neurons") * (towards @ weight)  # [B, P, d_mlp]
            add([f"L{i}.N{n}" for n in range(split.shape[-1])], split)
            bias = parts.down_proj_bias(block)
            if bias is not None:
                names, extra = [f"L{i}.mlp_bias"] + names, [dot(bias.to(device, torch.float64), towards)] + extra
            if names:
                add(names, torch.cat(extra, -1))
            _check_split(f"the neurons of layer {i}", [split, *extra], whole["mlp"], tolerance)
        else:
            add([f"L{i}.mlp"], whole["mlp"])
    norm = parts.final_norm
    if norm.bias is not None:
        add(["norm_bias"], dot(unembed_rows, norm.bias.to(device, torch.float64)))
    unembed_bias = real_weight(parts.unembed, "bias")
    if unembed_bias is not None:
        picked = unembed_bias[targets.to(unembed_bias.device)]
        if versus is not None:
            picked = picked - unembed_bias[versus.to(unembed_bias.device)]
        add(["unembed_bias"], (picked.to(device, torch.float64) * parts.logit_multiplier).unsqueeze(-1))
    return _per_position(pieces, residual.shape[1]), rest_magnitude


def _per_position(pieces: list[tuple[list, torch.Tensor | list[torch.Tensor]]],
                  positions: int) -> list[tuple[list[str], torch.Tensor]]:
    """(labels, [B, terms]) per position, from pieces that the positions share (labels, [B, P, n])
    or that are their own (labels per position, [B, n_p] per position: top-k sources)."""
    if all(torch.is_tensor(column) for _, column in pieces):  # one label list for every position
        labels = [name for names, _ in pieces for name in names]
        values = torch.cat([column for _, column in pieces], dim=-1)
        return [(labels, values[:, p]) for p in range(positions)]
    result = []
    for p in range(positions):
        own = [(names[p], column[p]) if isinstance(column, list) else (names, column[:, p]) for names, column in pieces]
        result.append(([name for names, _ in own for name in names], torch.cat([column for _, column in own], dim=-1)))
    return result


def _top_source_terms(split: torch.Tensor, k: int,
                      layer: int) -> tuple[list[list[str]], list[torch.Tensor], torch.Tensor]:
    """The top-k mode of a layer's source split [B, P, H, Tk]: per position, the labels and [B, n]
    values of each head's kept sources (the k of largest |term|, united over the batch so that
    the sequences share labels), in position order, each head's followed by its "S_rest" (the sum
    of those not kept); and [B, P] the summed |term| of those not kept. The choice is made on
    the device; only the kept indices come to the host, to name them."""
    batch, positions, heads, keys = split.shape
    chosen = split.abs().topk(k, dim=-1).indices  # [B, P, H, k]
    # A zero term carries nothing: the keys a query cannot see (later positions, padding) have
    # weight 0 and would fill a short row's k with arbitrary ties naming tokens after the query.
    # They are kept by nobody (S_rest does not change: they add 0).
    kept = (torch.zeros_like(split, dtype=torch.bool).scatter_(-1, chosen, True) & (split != 0)).any(0)  # [P, H, Tk]
    dropped = split.masked_fill(kept, 0.0)
    # Each head's kept columns, then one more: its remainder, at index Tk of the augmented axis.
    where = torch.cat([kept, kept.new_ones(positions, heads, 1)], dim=-1).nonzero()  # [n, 3] (p, h, j), sorted
    terms = torch.cat([split, dropped.sum(-1, keepdim=True)], dim=-1)[:, where[:, 0], where[:, 1], where[:, 2]]
    counts = torch.bincount(where[:, 0], minlength=positions).tolist()
    names = [f"L{layer}.H{h}.S{j}" if j < keys else f"L{layer}.H{h}.{SOURCE_REST}" for _, h, j in where.tolist()]
    starts = [0] + list(itertools.accumulate(counts))
    return ([names[a:b] for a, b in zip(starts, starts[1:])], list(terms.split(counts, dim=-1)),
            dropped.abs().sum((-2, -1)))


def _source_terms(sources: SourceCapture, layer: int, outputs: torch.Tensor, reads: torch.Tensor,
                  tolerance: float) -> torch.Tensor:
    """Head h's term at query p split over key positions j: p_hpj (v_j . reads_ph), [B, P, H, Tk].
    The recomputed attention rows must reproduce the heads' actual outputs, or they are not what
    the model computed."""
    if layer not in sources.rows:
        raise ValueError(f"by_source: the attention of layer {layer} did not go through the transformers "
                         "attention functions (ALL_ATTENTION_FUNCTIONS), so its attention rows cannot be "
                         "recomputed; this family supports per_head but not by_source")
    recomputed = sources.outputs[layer].to(outputs.device)  # [B, P, H, dh]
    error = float(((recomputed - outputs).norm(dim=-1) / outputs.norm(dim=-1).clamp_min(1e-30)).max())
    if not error <= tolerance * 10:  # softmax and p @ v in the model's dtype against float64
        raise ValueError(f"by_source: the attention rows of layer {layer} recomputed from its query and key "
                         f"states do not reproduce its heads' outputs (relative error {error:.3g}): this "
                         "attention (ALiBi, a bias, a custom kernel) is not split over sources")
    probs = sources.rows[layer].to(outputs.device)  # [B, H, P, Tk]
    values = sources.values[layer].to(outputs.device, torch.float64)  # [B, Hkv, Tk, dh]
    kv_heads = values.shape[1]
    grouped = reads.unflatten(2, (kv_heads, reads.shape[2] // kv_heads))  # [B, P, Hkv, G, dh]
    worth = torch.einsum("bgtk,bpgnk->bpgnt", values, grouped).flatten(2, 3)  # [B, P, H, Tk]
    return probs.transpose(1, 2) * worth


def _check_split(what: str, parts: list[torch.Tensor], whole: torch.Tensor, tolerance: float) -> None:
    """A component's split terms must add up to its term: if not, the adapter's output
    projection or post-norm is not what the model uses."""
    total = sum(part.sum(-1, keepdim=True) for part in parts)
    size = sum(part.abs().sum(-1, keepdim=True) for part in parts) + whole.abs()
    error = float(((total - whole).abs() / size.clamp_min(1e-30)).max())
    if not error <= tolerance:
        raise ValueError(f"{what} do not add up to its term (relative error {error:.3g} > {tolerance:g}): "
                         "this architecture needs its own adapter in recon_fast.attribution.anatomy")
