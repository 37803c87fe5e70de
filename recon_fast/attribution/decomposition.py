"""The decomposition behind direct logit attribution, step by step: what each component wrote into
the residual stream at the attributed positions (checked to add up to the residual the final norm
saw), the direction that reads a write's share of the target's logit (the unembedding row pulled
back through the final norm, its scale frozen at the actual residual), and each write's term along
it. Split terms go through the same frozen maps, a post-norm's scale frozen at its own input, so a
component's parts add up to its term: heads (the output projection read per head), their sources
(the attention rows of recon_fast.attribution.source_capture), neurons (the down projection read
per hidden unit). direct.py runs the forward pass that fills the capture and calls these.

Shapes: B sequences, P attributed positions, d the model width, H heads of dh, Tk keys, d_mlp."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from recon_fast.attribution.anatomy import Anatomy, Block
from recon_fast.attribution.position_capture import PositionCapture
from recon_fast.attribution.source_capture import SourceCapture
from recon_fast.attribution_labels import (ATTN, ATTN_BIAS, EMBED, HEAD, MLP, MLP_BIAS, NEURON, NORM_BIAS,
                                           NORM_BIAS_OF, POS_EMBED, SOURCE, SOURCE_REST, UNEMBED_BIAS)
from recon_fast.dispatch import weight as real_weight
from recon_fast.trace.model_inputs import model_dtype

# How far the sum of the captured parts may be from the captured residual, relative to the
# largest of them, before we call the architecture undecomposable: a few roundings of the
# model's own dtype per layer, far below what a missing or extra term would cause.
RECONSTRUCTION_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}

# What the capture keeps beyond each component's write (kept under the write's term label):
FINAL_RESIDUAL = "final_residual"  # the final norm's input


def heads_key(layer: int) -> str:  # the output projection's input: every head's output side by side
    return f"L{layer}.heads"


def neurons_key(layer: int) -> str:  # the down projection's input: the MLP's hidden neurons
    return f"L{layer}.neurons"


def post_norm_input_key(layer: int, part: str) -> str:  # what enters an attn/mlp post-norm
    return f"L{layer}.{part}_raw"


def tolerance_of(model: nn.Module) -> float:
    return RECONSTRUCTION_TOLERANCE.get(model_dtype(model), 1e-4)


# ---- the writes, and that they add up to the residual ----------------------------------------------
def component_writes(capture: PositionCapture, parts: Anatomy, device: torch.device) -> dict[str, torch.Tensor]:
    """label -> [B, P, d] float64 on `device`: what the embeddings and each attention and MLP wrote
    into the residual stream at the captured positions (layers of a model split across GPUs are
    gathered there)."""

    def rows(key: str) -> torch.Tensor:
        return capture.rows(key).to(device, torch.float64)

    batch = capture.rows(FINAL_RESIDUAL).shape[0]
    writes = {EMBED.label(): rows(EMBED.label())}
    if parts.pos_embed is not None:  # GPT-2's position embedding is [1, T, d]: the same for every row
        pos = rows(POS_EMBED.label())
        writes[POS_EMBED.label()] = pos.expand(batch, *pos.shape[1:])
    for i in range(len(parts.blocks)):
        for kind in (ATTN, MLP):
            writes[kind.label(layer=i)] = rows(kind.label(layer=i)) * parts.residual_multiplier
    return writes


def check_reconstruction(model: nn.Module, writes: dict[str, torch.Tensor], residual: torch.Tensor,
                         indices: list[int]) -> None:
    """The writes [B, P, d] must add up to the residual [B, P, d] the final norm saw; if they do
    not, this model's architecture writes something we do not know about, and every number would
    be wrong."""
    total = torch.zeros_like(residual)
    largest = residual.norm(dim=-1)
    for vector in writes.values():
        sizes = vector.norm(dim=-1)
        if vector.dim() == 4:  # [B, P, H, d]: the heads add up to the attention output
            vector, sizes = vector.sum(-2), sizes.amax(-1)
        total += vector
        largest = torch.maximum(largest, sizes)
    _check_finite(model, writes, residual, indices)
    error = ((total - residual).norm(dim=-1) / largest.clamp_min(torch.finfo(torch.float64).tiny))
    tolerance = tolerance_of(model)
    worst = float(error.max())
    if not worst <= tolerance:
        raise ValueError(
            f"the residual stream of {type(model).__name__} at positions {indices} is not the sum of its "
            f"embedding, attention and MLP outputs (relative error {worst:.3g} > {tolerance:g}): this "
            "architecture needs its own adapter in recon_fast.attribution.anatomy"
        )


def _check_finite(model: nn.Module, writes: dict[str, torch.Tensor], residual: torch.Tensor,
                  indices: list[int]) -> None:
    """NaN or Inf in the residual stream is the model's own (weights, overflow), not a missing
    term: name the first part, in residual order, that carries it."""
    if bool(torch.isfinite(residual).all()):
        return
    for label, vector in writes.items():
        bad = ~torch.isfinite(vector).flatten(2).all(-1)  # [B, P]
        if bool(bad.any()):
            row, column = bad.nonzero()[0].tolist()
            raise ValueError(f"non-finite values (NaN/Inf) in the residual stream of {type(model).__name__}: "
                             f"first written by {label} at position {indices[column]} (sequence {row}); "
                             "check the model's weights and dtype")
    raise ValueError(f"non-finite values (NaN/Inf) in the residual stream of {type(model).__name__} at "
                     f"positions {indices}; check the model's weights and dtype")


# ---- the terms, in residual order ------------------------------------------------------------------
class TermColumns:
    """The terms as they are computed, in residual order: label lists with [B, P, n] columns that
    every position shares, or (top-k sources) each position's own labels and [B, n_p] columns."""

    def __init__(self) -> None:
        self._pieces: list[tuple[list, torch.Tensor | list[torch.Tensor]]] = []

    def add(self, labels: list[str], column: torch.Tensor) -> None:  # column [B, P, len(labels)]
        self._pieces.append((labels, column))

    def add_per_position(self, labels: list[list[str]], columns: list[torch.Tensor]) -> None:  # [B, n_p] each
        self._pieces.append((labels, columns))

    def per_position(self, positions: int) -> list[tuple[list[str], torch.Tensor]]:
        """(labels, [B, terms]) per position."""
        pieces = self._pieces
        if all(torch.is_tensor(column) for _, column in pieces):  # one label list for every position
            labels = [name for names, _ in pieces for name in names]
            values = torch.cat([column for _, column in pieces], dim=-1)
            return [(labels, values[:, p]) for p in range(positions)]
        result = []
        for p in range(positions):
            own = [(names[p], column[p]) if isinstance(column, list) else (names, column[:, p])
                   for names, column in pieces]
            result.append(([name for names, _ in own for name in names],
                           torch.cat([column for _, column in own], dim=-1)))
        return result


def along(write: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """A write's share of the logit: [B, P, d] (or [d]) . [B, P, d] -> [B, P, 1]."""
    return (write * direction).sum(-1, keepdim=True)


def target_rows(parts: Anatomy, targets: torch.Tensor, versus: torch.Tensor | None,
                device: torch.device) -> torch.Tensor:
    """[B, P, d] float64: the unembedding rows of `targets` [B, P] (minus those of `versus`),
    times the logit multiplier: the direction the final norm's output is read along."""
    weight = real_weight(parts.unembed)  # read in once where the unembedding is offloaded

    def unembedding(ids: torch.Tensor) -> torch.Tensor:  # [B, P] -> [B, P, d] float64
        picked = weight.index_select(0, ids.flatten().to(weight.device)).to(device, torch.float64)
        return picked.view(*ids.shape, -1)

    rows = unembedding(targets)
    if versus is not None:
        rows = rows - unembedding(versus)
    return rows * parts.logit_multiplier


def logit_terms(model: nn.Module, parts: Anatomy, capture: PositionCapture, sources: SourceCapture | None,
                writes: dict[str, torch.Tensor], residual: torch.Tensor, targets: torch.Tensor,
                versus: torch.Tensor | None, *, per_head: bool, per_neuron: bool, source_top_k: int | None = None
                ) -> tuple[list[tuple[list[str], torch.Tensor]], torch.Tensor | None]:
    """Every term of `writes` (label -> [B, P, d]) through the final norm, its scale frozen at
    `residual` [B, P, d], onto the unembedding rows of `targets` [B, P] (minus those of `versus`):
    per position (labels, [B, terms] float64), and with source_top_k [B, P] the magnitude folded
    into "S_rest" terms (None if nothing was)."""
    device = residual.device
    tolerance = tolerance_of(model)
    unembed_rows = target_rows(parts, targets, versus, device)
    direction = parts.final_norm.pull_back(unembed_rows, residual)  # [B, P, d]: reads a part's logit share
    terms = TermColumns()
    rest_magnitude = None
    terms.add([EMBED.label()], along(writes[EMBED.label()], direction))
    if POS_EMBED.label() in writes:
        terms.add([POS_EMBED.label()], along(writes[POS_EMBED.label()], direction))
    for i, block in enumerate(parts.blocks):
        whole = {kind: along(writes[kind.label(layer=i)], direction) for kind in (ATTN, MLP)}  # [B, P, 1] each
        if per_head:
            folded = head_terms(terms, parts, block, i, capture, sources, direction, whole[ATTN],
                                tolerance=tolerance, source_top_k=source_top_k)
            if folded is not None:
                rest_magnitude = folded if rest_magnitude is None else rest_magnitude + folded
        else:
            terms.add([ATTN.label(layer=i)], whole[ATTN])
        if per_neuron:
            neuron_terms(terms, parts, block, i, capture, direction, whole[MLP], tolerance=tolerance)
        else:
            terms.add([MLP.label(layer=i)], whole[MLP])
    output_bias_terms(terms, parts, unembed_rows, targets, versus)
    return terms.per_position(residual.shape[1]), rest_magnitude


def direction_inside(parts: Anatomy, block: Block, part: str, layer: int, capture: PositionCapture,
                     direction: torch.Tensor) -> tuple[torch.Tensor, list[str], list[torch.Tensor]]:
    """The direction [B, P, d] as seen before the component's (`part`: "attn" or "mlp") post-norm
    and residual multiplier, and the post-norm's bias term ([label], [[B, P, 1]]) if it has one."""
    towards = direction * parts.residual_multiplier
    post_norm = block.attn_post_norm if part == "attn" else block.mlp_post_norm
    if post_norm is None:
        return towards, [], []
    names, extra = [], []
    device = direction.device
    if post_norm.bias is not None:
        names = [NORM_BIAS_OF[part].label(layer=layer)]
        extra = [along(post_norm.bias.to(device, torch.float64), towards)]
    raw = capture.rows(post_norm_input_key(layer, part)).to(device, torch.float64)  # [B, P, d]
    return post_norm.pull_back(towards, raw), names, extra


def head_terms(terms: TermColumns, parts: Anatomy, block: Block, layer: int, capture: PositionCapture,
               sources: SourceCapture | None, direction: torch.Tensor, whole: torch.Tensor, *, tolerance: float,
               source_top_k: int | None) -> torch.Tensor | None:
    """Adds layer `layer`'s attention term [B, P, 1] (`whole`) split into heads, or with `sources`
    into each head's source positions, then the output projection's and post-norm's bias terms;
    checks that they add up to `whole`. Returns [B, P] the magnitude folded into "S_rest" terms
    (top-k sources), or None."""
    device = direction.device
    heads, head_dim = parts.n_heads, parts.head_dim
    towards, names, extra = direction_inside(parts, block, "attn", layer, capture, direction)
    weight = parts.out_proj_weight(block).to(device, torch.float64).unflatten(-1, (heads, head_dim))  # [d, H, dh]
    reads = torch.einsum("bpd,dhk->bphk", towards, weight)  # [B, P, H, dh]: what a head's output is worth
    outputs = capture.rows(heads_key(layer)).to(device, torch.float64).unflatten(-1, (heads, head_dim))  # [B, P, H, dh]
    folded = None
    if sources is not None:
        split = source_terms(sources, layer, outputs, reads, tolerance)  # [B, P, H, Tk]
        keys = split.shape[-1]
        if source_top_k is not None and source_top_k < keys:
            kept_labels, kept_values, folded = top_source_terms(split, source_top_k, layer)
            terms.add_per_position(kept_labels, kept_values)
        else:
            labels_per_head = (SOURCE.labels("source", range(keys), layer=layer, head=h) for h in range(heads))
            terms.add(list(itertools.chain.from_iterable(labels_per_head)), split.flatten(2))  # [B, P, H * Tk]
    else:
        split = (outputs * reads).sum(-1)  # [B, P, H]
        terms.add(HEAD.labels("head", range(heads), layer=layer), split)
    bias = parts.out_proj_bias(block)
    if bias is not None:
        names, extra = [ATTN_BIAS.label(layer=layer)] + names, [along(bias.to(device, torch.float64), towards)] + extra
    if names:
        terms.add(names, torch.cat(extra, -1))
    check_split(f"the heads of layer {layer}", [split.flatten(2), *extra], whole, tolerance)
    return folded


def neuron_terms(terms: TermColumns, parts: Anatomy, block: Block, layer: int, capture: PositionCapture,
                 direction: torch.Tensor, whole: torch.Tensor, *, tolerance: float) -> None:
    """Adds layer `layer`'s MLP term [B, P, 1] (`whole`) split into its hidden neurons, then the
    down projection's and post-norm's bias terms; checks that they add up to `whole`."""
    device = direction.device
    towards, names, extra = direction_inside(parts, block, "mlp", layer, capture, direction)
    weight = parts.down_proj_weight(block).to(device, torch.float64)  # [d, d_mlp]
    split = capture.rows(neurons_key(layer)).to(device, torch.float64) * (towards @ weight)  # [B, P, d_mlp]
    terms.add(NEURON.labels("neuron", range(split.shape[-1]), layer=layer), split)
    bias = parts.down_proj_bias(block)
    if bias is not None:
        names, extra = [MLP_BIAS.label(layer=layer)] + names, [along(bias.to(device, torch.float64), towards)] + extra
    if names:
        terms.add(names, torch.cat(extra, -1))
    check_split(f"the neurons of layer {layer}", [split, *extra], whole, tolerance)


def output_bias_terms(terms: TermColumns, parts: Anatomy, unembed_rows: torch.Tensor, targets: torch.Tensor,
                      versus: torch.Tensor | None) -> None:
    """Adds what belongs to no component: the final norm's bias read along `unembed_rows` [B, P, d],
    and the unembedding's bias of `targets` [B, P] (minus `versus`), where the model has them."""
    device = unembed_rows.device
    norm = parts.final_norm
    if norm.bias is not None:
        terms.add([NORM_BIAS.label()], along(unembed_rows, norm.bias.to(device, torch.float64)))
    unembed_bias = real_weight(parts.unembed, "bias")
    if unembed_bias is not None:
        picked = unembed_bias[targets.to(unembed_bias.device)]
        if versus is not None:
            picked = picked - unembed_bias[versus.to(unembed_bias.device)]
        terms.add([UNEMBED_BIAS.label()], (picked.to(device, torch.float64) * parts.logit_multiplier).unsqueeze(-1))


# ---- heads over their sources ----------------------------------------------------------------------
def source_terms(sources: SourceCapture, layer: int, outputs: torch.Tensor, reads: torch.Tensor,
                 tolerance: float) -> torch.Tensor:
    """Head h's term at query p split over key positions j: p_hpj (v_j . reads_ph), [B, P, H, Tk],
    from the heads' outputs and what they are worth, [B, P, H, dh] each. The recomputed attention
    rows must reproduce the heads' actual outputs, or they are not what the model computed."""
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


def top_source_terms(split: torch.Tensor, k: int,
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
    names = [SOURCE.label(layer=layer, head=h, source=j) if j < keys else SOURCE_REST.label(layer=layer, head=h)
             for _, h, j in where.tolist()]
    starts = [0] + list(itertools.accumulate(counts))
    return ([names[a:b] for a, b in zip(starts, starts[1:])], list(terms.split(counts, dim=-1)),
            dropped.abs().sum((-2, -1)))


def check_split(what: str, parts: list[torch.Tensor], whole: torch.Tensor, tolerance: float) -> None:
    """A component's split terms ([B, P, n] each) must add up to its term [B, P, 1]: if not, the
    adapter's output projection or post-norm is not what the model uses."""
    total = sum(part.sum(-1, keepdim=True) for part in parts)
    size = sum(part.abs().sum(-1, keepdim=True) for part in parts) + whole.abs()
    error = float(((total - whole).abs() / size.clamp_min(1e-30)).max())
    if not error <= tolerance:
        raise ValueError(f"{what} do not add up to its term (relative error {error:.3g} > {tolerance:g}): "
                         "this architecture needs its own adapter in recon_fast.attribution.anatomy")
