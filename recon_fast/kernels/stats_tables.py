"""The statistics each compiled op writes, one table per op: a row is a statistic's name, its
channel (the index the C++ kernels write it at) and what it means. Every other copy is made from
these tables: STATS and ATTENTION_STATS, the channel counts, the JSON keys of a cube's
core_metrics, the ops' docstrings, the references' channel order (`StatsTable.stack`).

csrc names the same channels, in index order, next to each op's count (kTokenStatNames in
csrc/token_stats_problem.h, kAttentionStatNames in csrc/attention_stats_problem.h); the compiled
library reports them (`channel_names()`, csrc/ops.cpp), and kernels/_library.py does not use a
library whose channels differ from these tables in any op: every op, its direct launchers and the
C++ recorder then take the plain-PyTorch fallback, whose one-time warning names both lists
(tests/test_stats_tables.py). A library built before it reported its channels is used as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

# Where a docstring takes its op's channel list (StatsTable.documented).
CHANNELS_MARKER = "{channels}"


@dataclass(frozen=True)
class Statistic:
    name: str  # the channel's name: STATS / ATTENTION_STATS, cube.metrics, Parquet columns
    index: int  # its channel in the op's output: the C++ index (csrc's names array lists it there)
    doc: str  # what it is, for docstrings
    json_key: str | None = None  # token_stats only: its key in a cube's JSON core_metrics


class StatsTable:
    """One op's statistics in channel order."""

    def __init__(self, op: str, rows: tuple[Statistic, ...]):
        self.op = op  # the op's name, as in torch.ops.recon_fast and csrc
        self.rows = rows
        self.names: tuple[str, ...] = tuple(row.name for row in rows)
        for position, row in enumerate(rows):
            if row.index != position:
                raise ValueError(f"{op}: the statistic {row.name!r} is row {position} of its table but says "
                                 f"channel {row.index}; rows are in channel order")
        for what, values in (("names", self.names), ("JSON keys", [r.json_key for r in rows if r.json_key])):
            if len(set(values)) != len(values):
                raise ValueError(f"{op}: the statistics' {what} repeat: {list(values)}")

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Statistic]:
        return iter(self.rows)

    def json_keys(self) -> dict[str, str]:
        """{name: JSON key}, in channel order: a row without one is an error naming it."""
        missing = [row.name for row in self.rows if not row.json_key]
        if missing:
            raise ValueError(f"{self.op}: the statistics {missing} have no JSON key (Statistic.json_key in "
                             "recon_fast/kernels/stats_tables.py)")
        return {row.name: row.json_key for row in self.rows}

    def stack(self, channels: Mapping[str, torch.Tensor], *, by: str) -> torch.Tensor:
        """The tensors of `channels` (one per statistic, by name) stacked along a new last
        dimension in channel order. `by` names what computed them, for the error when the table
        and that function disagree (a row added to the table without its formula, or the reverse)."""
        missing = [name for name in self.names if name not in channels]
        extra = [name for name in channels if name not in self.names]
        if missing or extra:
            raise NotImplementedError(
                f"{by} computes the {self.op} statistics {list(channels)} but the table "
                f"(recon_fast/kernels/stats_tables.py) lists {list(self.names)}: "
                + "; ".join(filter(None, (missing and f"no formula for {missing}",
                                          extra and f"{extra} not in the table"))))
        return torch.stack([channels[name] for name in self.names], dim=-1)

    def doc_lines(self, indent: str) -> str:
        """The channels as docstring lines, one per statistic: "i name: what it is"."""
        return "\n".join(f"{indent}{row.index} {row.name}: {row.doc}" for row in self.rows)

    def documented(self, function: Callable) -> Callable:
        """Decorator: the function's docstring with its CHANNELS_MARKER line made from the table
        (the marker's own indentation kept)."""
        doc = function.__doc__
        if doc is None:  # python -OO
            return function
        for line in doc.splitlines():
            if line.strip() == CHANNELS_MARKER:
                indent = line[: len(line) - len(line.lstrip())]
                function.__doc__ = doc.replace(line, self.doc_lines(indent))
                return function
        raise ValueError(f"{function.__qualname__}'s docstring has no {CHANNELS_MARKER} line")


def column_picker(columns: list[int]) -> slice | list[int]:
    """An index for the channels `columns` of a statistics tensor's last dimension: a slice where
    they are consecutive (basic indexing, a view; a list is a gather, and on CUDA a host-to-device
    copy of the index, on every call), else the list."""
    consecutive = bool(columns) and columns == list(range(columns[0], columns[0] + len(columns)))
    return slice(columns[0], columns[0] + len(columns)) if consecutive else list(columns)


TOKEN_STATS_TABLE = StatsTable("token_stats", (
    Statistic("energy", 0, "L2 norm of the row (sqrt of the sum of squares)", json_key="energy"),
    Statistic("mean", 1, "mean", json_key="mean_activation"),
    Statistic("std", 2, "standard deviation, unbiased (divides by D - 1, as torch.std); NaN for D == 1",
              json_key="std_activation"),
    Statistic("min", 3, "smallest element", json_key="min_activation"),
    Statistic("max", 4, "largest element", json_key="max_activation"),
))

ATTENTION_STATS_TABLE = StatsTable("attention_stats", (
    Statistic("entropy", 0, "-sum p log p, in nats"),
    Statistic("max_weight", 1, "max p"),
    Statistic("argmax", 2, "key index of the max p (the first at ties), as a float"),
    Statistic("sink_mass", 3, "sum of p over the first sink_tokens keys"),
    Statistic("mean_distance", 4, "sum p_j (i' - j): how far back the query looks, in tokens"),
    Statistic("self_weight", 5, "p at j = i'"),
    Statistic("prev_weight", 6, "p at j = i' - 1"),
    Statistic("lse", 7, "log sum exp of the scores"),
))

TABLES: tuple[StatsTable, ...] = (TOKEN_STATS_TABLE, ATTENTION_STATS_TABLE)


def library_mismatch(library_names: Mapping[str, object]) -> str | None:
    """Why a compiled library whose channel_names() gave `library_names` ({op: names in index
    order}) cannot serve these tables, or None when every table matches."""
    for table in TABLES:
        built = tuple(library_names.get(table.op, ()))
        if built != table.names:
            return (f"its {table.op} channels are {list(built)} (csrc) but the table lists {list(table.names)} "
                    "(recon_fast/kernels/stats_tables.py): change both, then rebuild it "
                    "(python setup.py build_ext --inplace)")
    return None
