"""The result of direct logit attribution: the Attribution of one position (its terms' labels and
values per sequence, the target, the model's own logit), its queries (the largest terms, neurons,
sources; per-head totals), the data of its figures (the per-layer grid, with the MLP column beside
the heads) and its JSON form (to_dict). Labels are read with recon_fast.attribution_labels."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from recon_fast.attribution_labels import HEAD, HEAD_KINDS, NEURON, SOURCE, SOURCE_REST, Term, parse_label


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
        return torch.tensor([i for i, term in enumerate(self._terms) if term is None or term.kind is not SOURCE_REST],
                            dtype=torch.long)

    @functools.cached_property
    def _terms(self) -> list[Term | None]:  # every label, parsed once
        return [parse_label(label) for label in self.labels]

    def _largest(self, wanted, k: int, row: int) -> list[tuple[str, float]]:
        columns = [i for i, term in enumerate(self._terms) if term is not None and wanted(term)]
        values = self.values[row, columns]
        order = torch.argsort(values.abs(), descending=True, stable=True)[:max(k, 0)].tolist()
        return [(self.labels[columns[i]], float(values[i])) for i in order]

    def top_neurons(self, k: int = 10, layer: int | None = None, row: int = 0) -> list[tuple[str, float]]:
        """The k neuron terms ("L{i}.N{n}", value) of largest magnitude, overall or in one layer
        (needs per_neuron)."""
        if not self.per_neuron:
            raise ValueError("top_neurons() needs an attribution computed with per_neuron=True")
        return self._largest(lambda t: t.kind is NEURON and layer in (None, t.layer), k, row)

    def top_sources(self, layer: int, head: int, k: int = 5, row: int = 0) -> list[tuple[int, float]]:
        """The k source positions (j, value) that head `head` of `layer` moved the most logit
        from (needs by_source; with source_top_k, k may not exceed it)."""
        if not self.by_source:
            raise ValueError("top_sources() needs an attribution computed with by_source=True")
        if self.source_top_k is not None and k > self.source_top_k:
            raise ValueError(f"top_sources(k={k}): this attribution kept the {self.source_top_k} largest sources "
                             "of each head (source_top_k); compute it with a larger source_top_k, or None for all")
        found = self._largest(lambda t: t.kind is SOURCE and t.layer == layer and t.head == head, k, row)
        return [(parse_label(label).source, value) for label, value in found]

    def head_totals(self, row: int = 0) -> dict[str, float]:
        """"L{i}.H{h}" -> the head's term (its source terms, and "S_rest", summed under by_source)."""
        totals: dict[str, float] = {}
        for term, value in zip(self._terms, self.values[row].tolist()):
            if term is not None and term.kind in HEAD_KINDS:
                key = HEAD.label(layer=term.layer, head=term.head)
                totals[key] = totals.get(key, 0.0) + value
        return totals

    def grid(self, row: int = 0) -> tuple[list[str], list[str], torch.Tensor]:
        """(row labels, column labels, [layers, columns]): attn and MLP per layer, or with
        per_head the heads of each layer (for a heatmap). Neurons add up into "mlp", sources
        into their head; output biases have no cell of their own."""
        columns = [f"H{h}" for h in range(self.n_heads)] if self.per_head else ["attn", "mlp"]
        grid = torch.zeros(self.n_layers, len(columns), dtype=self.values.dtype)
        for term, value in zip(self._terms, self.values[row].tolist()):
            if term is not None and term.cell in columns:
                grid[term.layer, columns.index(term.cell)] += value
        return [f"L{i}" for i in range(self.n_layers)], columns, grid

    def grid_with_mlp(self, row: int = 0) -> tuple[list[str], list[str], torch.Tensor]:
        """grid(), and with per_head an "mlp" column after the heads: the MLPs are often the
        largest terms, and a per-head picture without them hides the top contributor. The MLP
        column sums each layer's "mlp" or neuron terms (not its bias, as grid() leaves biases out)."""
        rows, columns, grid = self.grid(row)
        if not self.per_head:
            return rows, columns, grid
        mlp = torch.zeros(self.n_layers, 1, dtype=torch.float64)
        for term, value in zip(self._terms, self.values[row].tolist()):
            if term is not None and term.cell == "mlp":
                mlp[term.layer, 0] += value
        return rows, columns + ["mlp"], torch.cat([grid.double(), mlp], dim=1)

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
