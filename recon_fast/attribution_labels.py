"""The names of direct-logit-attribution terms ("embed", "L3.mlp", "L3.H7", "L3.H7.S5", "L3.N12", ...):
one table of kinds, from which attribution.decomposition writes the labels, Attribution's queries and
the CLI read them, and the HTML viewer gets the same table as data in its page (page_table()).

It sits beside attribution/ rather than in it because the viewer, a layer below the cube, draws
attribution documents: it may import this module, not the package that imports the tracer."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

_FIELD = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class TermKind:
    """One kind of term label. Templates hold integer fields in braces; the rest is literal."""

    name: str  # the kind, as the viewer's table names it: "head", "source", ...
    template: str  # the label: "L{layer}.H{head}"
    cell: str | None  # the column of Attribution.grid it adds to ("H{head}", "mlp"); None: no layer, no cell
    word: str  # HexRay's name of the component ("Head", "MLP", "Attn", "Embed", ...)
    where: str | None  # HexRay's place after the word ("L{layer}.H{head}", "L{layer}.b"); None: the word alone

    @functools.cached_property
    def fields(self) -> tuple[str, ...]:
        return tuple(_FIELD.findall(self.template))

    @functools.cached_property
    def pattern(self) -> str:
        """The template as a regular expression, one group per field in order: written in the
        subset that Python's re and JavaScript's RegExp read alike (the viewer compiles it)."""
        literal = _FIELD.split(self.template)[::2]  # the text between the fields
        return "([0-9]+)".join(re.escape(piece) for piece in literal)

    def label(self, **fields: int) -> str:
        return self.template.format(**fields)

    def labels(self, varying: str, values: Iterable[int], **fixed: int) -> list[str]:
        """The labels for each value of one field, the others fixed: HEAD.labels("head", range(4), layer=1).
        (Formats the template once: a source split names layers x heads x tokens terms.)"""
        before, after = self.template.format(**fixed, **{varying: "\0"}).split("\0")
        return [f"{before}{value}{after}" for value in values]


EMBED = TermKind("embed", "embed", None, "Embed", None)
POS_EMBED = TermKind("pos_embed", "pos_embed", None, "PosEmbed", None)
ATTN = TermKind("attn", "L{layer}.attn", "attn", "Attn", "L{layer}")
HEAD = TermKind("head", "L{layer}.H{head}", "H{head}", "Head", "L{layer}.H{head}")
# A head's share read from source position j, and (by_source's top-k mode) the sum of the sources
# a head did not keep: a remainder, not a term of its own (Attribution.top does not list it).
SOURCE = TermKind("source", "L{layer}.H{head}.S{source}", "H{head}", "Head", "L{layer}.H{head}<-{source}")
SOURCE_REST = TermKind("source_rest", "L{layer}.H{head}.S_rest", "H{head}", "Head", "L{layer}.H{head}<-rest")
ATTN_BIAS = TermKind("attn_bias", "L{layer}.attn_bias", "attn_bias", "Attn", "L{layer}.b")
ATTN_NORM_BIAS = TermKind("attn_norm_bias", "L{layer}.attn_norm_bias", "attn_norm_bias", "Attn", "L{layer}.nb")
MLP = TermKind("mlp", "L{layer}.mlp", "mlp", "MLP", "L{layer}")
NEURON = TermKind("neuron", "L{layer}.N{neuron}", "mlp", "MLP", "L{layer}.N{neuron}")  # adds up to its MLP
MLP_BIAS = TermKind("mlp_bias", "L{layer}.mlp_bias", "mlp_bias", "MLP", "L{layer}.b")
MLP_NORM_BIAS = TermKind("mlp_norm_bias", "L{layer}.mlp_norm_bias", "mlp_norm_bias", "MLP", "L{layer}.nb")
NORM_BIAS = TermKind("norm_bias", "norm_bias", None, "NormBias", None)
UNEMBED_BIAS = TermKind("unembed_bias", "unembed_bias", None, "UnembedBias", None)

KINDS = (EMBED, POS_EMBED, ATTN, HEAD, SOURCE, SOURCE_REST, ATTN_BIAS, ATTN_NORM_BIAS, MLP, NEURON, MLP_BIAS,
         MLP_NORM_BIAS, NORM_BIAS, UNEMBED_BIAS)
HEAD_KINDS = (HEAD, SOURCE, SOURCE_REST)  # the terms Attribution.head_totals sums per head
# A post-norm's bias term and an output projection's bias, by the component they belong to.
NORM_BIAS_OF = {"attn": ATTN_NORM_BIAS, "mlp": MLP_NORM_BIAS}
# One expression for every kind, a named group around each (the kind's name): one match per label
# (a source split is read back label by label, and may have a million of them).
_ANY_LABEL = re.compile("|".join(f"(?P<{kind.name}>{kind.pattern})" for kind in KINDS))


class Term(NamedTuple):
    """A label read back: its kind and its fields (None where the kind has no such field)."""

    kind: TermKind
    layer: int | None = None
    head: int | None = None
    source: int | None = None
    neuron: int | None = None

    @property
    def cell(self) -> str | None:
        """The grid column the term adds to: a source (and S_rest) to its head, a neuron to "mlp"."""
        return None if self.kind.cell is None else self.kind.cell.format(**self._asdict())

    @property
    def where(self) -> str | None:
        """HexRay's place after the kind's word ("L3.H7<-5", "L3.b"); None for a model-wide term."""
        return None if self.kind.where is None else self.kind.where.format(**self._asdict())

    @property
    def part(self) -> str | None:
        """The label after "L{layer}." ("mlp", "H7", "H7.S5", "N12"); None for a term of no layer."""
        return None if self.layer is None else self.kind.label(**self._asdict()).split(".", 1)[1]


# kind name -> (kind, the group of its first field, each field's place among Term's fields after `kind`)
_READING = {kind.name: (kind, _ANY_LABEL.groupindex[kind.name] + 1, [Term._fields.index(f) - 1 for f in kind.fields])
            for kind in KINDS}


def parse_label(label: str) -> Term | None:
    """The term a label names, or None for a label of no kind here."""
    match = _ANY_LABEL.fullmatch(label)
    if match is None:
        return None
    kind, first, places = _READING[match.lastgroup]  # a kind's group closes after its fields': the last
    values = [None] * 4
    for k, place in enumerate(places):
        values[place] = int(match.group(first + k))
    return Term(kind, *values)


def layer_term(label: str) -> tuple[int, str] | None:
    """(layer, part) of a per-layer term label ("L3.mlp" -> (3, "mlp"), "L3.H7.S5" -> (3, "H7.S5")),
    or None for the others (embed, pos_embed, norm_bias, unembed_bias)."""
    term = parse_label(label)
    return None if term is None or term.layer is None else (term.layer, term.part)


def page_table() -> list[dict]:
    """The grammar as the viewer reads it from its page: per kind its name, the regular
    expression of its labels and the fields its groups hold, its grid cell and HexRay name."""
    return [{"name": kind.name, "pattern": kind.pattern, "fields": list(kind.fields), "cell": kind.cell,
             "word": kind.word, "where": kind.where} for kind in KINDS]
