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

This module checks the inputs, hooks the model, runs it once and picks the targets; the math is
recon_fast.attribution.decomposition, the result recon_fast.attribution.result, the labels
recon_fast.attribution_labels.
"""

from __future__ import annotations

import contextlib
import operator

import torch
from torch import nn

from recon_fast.attribution import decomposition
from recon_fast.attribution.anatomy import Anatomy, anatomy
from recon_fast.attribution.decomposition import FINAL_RESIDUAL, heads_key, neurons_key, post_norm_input_key
from recon_fast.attribution.position_capture import PositionCapture
from recon_fast.attribution.result import Attribution
from recon_fast.attribution.source_capture import SourceCapture
from recon_fast.attribution_labels import ATTN, EMBED, MLP, POS_EMBED
from recon_fast.trace.model_inputs import forward_takes, prepare_inputs, token_texts


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
    residual = capture.rows(FINAL_RESIDUAL).double()  # [B, P, d]; the math happens on its device
    writes = decomposition.component_writes(capture, parts, residual.device)  # label -> [B, P, d] float64
    decomposition.check_reconstruction(model, writes, residual, indices)
    targets, versus = _targets(target, logits, tokenizer, descending=parts.logit_multiplier >= 0)  # [B, P] each
    terms, rest_magnitude = decomposition.logit_terms(model, parts, capture, sources, writes, residual, targets,
                                                      versus, per_head=per_head, per_neuron=per_neuron,
                                                      source_top_k=source_top_k)
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
    """Keeps, at the attributed positions, each component's write under its term label and what
    decomposition reads besides (heads, neurons, a post-norm's input, the final residual)."""
    if parts.embed is not None:
        capture.output_of(EMBED.label(), parts.embed)
    else:  # what enters block 0: the embedding with any scale or multiplier the model applies
        capture.input_of(EMBED.label(), parts.blocks[0].module)
    if parts.pos_embed is not None:
        capture.output_of(POS_EMBED.label(), parts.pos_embed)
    for i, block in enumerate(parts.blocks):
        for part, kind, post_norm in (("attn", ATTN, block.attn_post_norm), ("mlp", MLP, block.mlp_post_norm)):
            if post_norm is not None:  # the write is what leaves the post-norm
                capture.output_of(kind.label(layer=i), post_norm.module)
                if per_head if part == "attn" else per_neuron:
                    capture.input_of(post_norm_input_key(i, part), post_norm.module)
            else:
                capture.output_of(kind.label(layer=i), getattr(block, part))
        if per_head:
            capture.input_of(heads_key(i), block.out_proj)
        if per_neuron:
            capture.input_of(neurons_key(i), block.down_proj)
    capture.input_of(FINAL_RESIDUAL, parts.final_norm.module)
