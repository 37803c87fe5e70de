"""The Parquet files of a traced dataset, one shard at a time, and checking them on resume.

A shard k of rank r is two or three files, each written atomically (temporary + rename;
dataset.writing's atomic_write, which names a file it cannot write):
`documents/rank{r}/part-{k:05d}.parquet` (one row per document: doc_id, source_row, tokens,
token_ids, text_sha256); with attention statistics,
`attention/rank{r}/part-{k:05d}.parquet` (one row per attention layer, document and head: doc_id,
layer, layer_name, head, tokens, and a list<float32> column per statistic of ATTENTION_STATS);
then `activations/rank{r}/part-{k:05d}.parquet` (one row per layer and document: doc_id, layer,
layer_name, tokens, and a list<float32> column per metric). Both value tables are layer-major with
one row group per layer, their lists holding the document's real tokens only. The activations file
is the commit: it exists only once the others are complete. Its key-value metadata holds the run's
config hash, the shard's documents, its row counts and its partial profile, so a resumed run
merges exactly what the first run computed.

One folder per table: each is then one table that `pandas.read_parquet("DIR/activations")` (or
polars, DuckDB, HF datasets) reads in one line; temporaries start with "." and readers skip them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recon_fast.dataset.batching import Document
from recon_fast.dataset.profile import Profile
from recon_fast.dataset.writing import atomic_write
from recon_fast.kernels.attention_stats import ATTENTION_STATS

META_KEY = b"recon_fast"
ACTIVATIONS = "activations"
ATTENTION = "attention"
DOCUMENTS = "documents"


def shard_path(out_dir: Path, table: str, rank: int, k: int) -> Path:
    return Path(out_dir) / table / f"rank{rank}" / f"part-{k:05d}.parquet"


@dataclass
class ShardBuffer:
    """One shard's documents and values while they are being traced (memory: one shard).
    attention_layers: the attention modules when the run traces attention statistics, else None."""
    layer_names: list[str]
    metrics: tuple[str, ...]
    attention_layers: list[str] | None = None

    def __post_init__(self):
        self.docs: list[Document] = []
        # values[l]: [real tokens, metrics] arrays of the batches, in (document, token) order
        self.values = [[] for _ in self.layer_names]
        # attention[l]: [real tokens x heads, statistics] arrays, in (document, head, token) order
        # (heads as the cube has them: a layer with fewer than the widest has NaN rows for the rest)
        self.attention = [[] for _ in self.attention_layers or ()]
        self.heads: int | None = None
        self.profile = Profile(list(self.layer_names), self.metrics)

    def add_batch(self, docs, data: np.ndarray, mask: np.ndarray, attention: np.ndarray | None = None) -> None:
        """data: [layers, batch, tokens, metrics] of one batch; mask: [batch, tokens] bool, True at
        real tokens (right-padded); attention: [attention layers, batch, heads, tokens, statistics]
        when the run has them. Padding positions are dropped here and go nowhere."""
        _check_layers(data.shape[0], len(self.layer_names), "layers")
        self.docs.extend(docs)
        for layer in range(len(self.layer_names)):
            self.values[layer].append(data[layer][mask])
        positions = np.broadcast_to(np.arange(mask.shape[1]), mask.shape)[mask]  # right-padded: index = position
        self.profile.add(data[:, mask], documents=len(docs), positions=positions)
        if self.attention_layers is not None:
            if attention is None or not self.attention_layers:
                raise RuntimeError("attention='stats' recorded no attention layer in this model's forward")
            _check_layers(attention.shape[0], len(self.attention_layers), "attention layers")
            if self.heads not in (None, attention.shape[2]):
                raise RuntimeError(f"a batch gave {attention.shape[2]} attention heads, the shard has {self.heads}")
            self.heads = attention.shape[2]
            queries = np.broadcast_to(mask[:, None], attention.shape[1:4])  # [batch, heads, tokens]
            for layer in range(len(self.attention_layers)):
                self.attention[layer].append(attention[layer][queries])

    def write(self, out_dir: Path, rank: int, k: int, config_sha256: str) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq

        lengths = np.array([len(d.ids) for d in self.docs], np.int64)
        ids = np.array([d.doc_id for d in self.docs], np.int64)
        documents = pa.table({
            "doc_id": ids,
            "source_row": np.array([d.row for d in self.docs], np.int64),
            "tokens": lengths.astype(np.int32),
            "token_ids": pa.ListArray.from_arrays(_offsets(lengths), np.concatenate([d.ids for d in self.docs])),
            "text_sha256": [d.text_sha256 for d in self.docs],
        })
        info = {"config_sha256": config_sha256, "rank": rank, "shard": k, "documents": len(ids),
                "rows": len(ids) * len(self.layer_names), "tokens": int(lengths.sum()),
                "layer_names": list(self.layer_names), "profile": profile_state(self.profile)}
        # Documents first, then attention: the activations file, written last, commits the shard.
        # One table at a time is built: the attention table is `heads` times the activations'.
        with atomic_write(shard_path(out_dir, DOCUMENTS, rank, k)) as f:
            pq.write_table(documents, f)
        if self.attention_layers is not None:
            attention = _layered_table(self.attention_layers, ids, lengths, self.attention, ATTENTION_STATS,
                                       heads=self.heads)
            info.update(attention_rows=attention.num_rows, attention_layers=list(self.attention_layers),
                        heads=self.heads)
            _write_layered(attention, shard_path(out_dir, ATTENTION, rank, k), len(self.attention_layers))
            del attention
        activations = _layered_table(self.layer_names, ids, lengths, self.values, self.metrics)
        activations = activations.replace_schema_metadata({META_KEY: json.dumps(info).encode()})
        _write_layered(activations, shard_path(out_dir, ACTIVATIONS, rank, k), len(self.layer_names))
        return info


def _check_layers(got: int, want: int, what: str) -> None:
    if got != want:
        raise RuntimeError(f"a batch gave {got} {what}, the run has {want}: a layer that fires a varying "
                           "number of times cannot be traced over a dataset")


def _layered_table(layer_names: list[str], ids: np.ndarray, lengths: np.ndarray, values: list[list[np.ndarray]],
                   columns: tuple[str, ...], heads: int | None = None):
    """Layer-major rows: per layer, each document (each of its `heads` heads, when given: a `head`
    column), with a list<float32> column per name of `columns`. values[l]: that layer's batches'
    [rows' tokens, columns] arrays, in row order."""
    import pyarrow as pa

    layers = len(layer_names)
    per_head = 1 if heads is None else heads
    row_lengths = np.tile(np.repeat(lengths, per_head), layers)
    rows = len(ids) * per_head  # per layer
    offsets = pa.array(_offsets(row_lengths), pa.int32() if row_lengths.sum() < 2**31 else pa.int64())
    list_type = pa.ListArray if offsets.type == pa.int32() else pa.LargeListArray
    layer_index = np.repeat(np.arange(layers, dtype=np.int32), rows)
    table = {"doc_id": np.tile(np.repeat(ids, per_head), layers), "layer": layer_index,
             "layer_name": pa.DictionaryArray.from_arrays(pa.array(layer_index), pa.array(layer_names))}
    if heads is not None:
        table["head"] = np.tile(np.arange(heads, dtype=np.int32), len(ids) * layers)
    table["tokens"] = row_lengths.astype(np.int32)
    for c, name in enumerate(columns):
        flat = np.concatenate([batch[:, c] for layer in values for batch in layer]).astype(np.float32)
        table[name] = list_type.from_arrays(offsets, pa.array(flat, pa.float32()))
    return pa.table(table)


def _write_layered(table, path: Path, layers: int) -> None:
    import pyarrow.parquet as pq

    with atomic_write(path) as f:  # one row group per layer: a reader of one layer reads only it
        pq.write_table(table, f, row_group_size=max(table.num_rows // max(layers, 1), 1))


def _offsets(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64 if lengths.sum() >= 2**31 else np.int32)


def committed(out_dir: Path, rank: int, k: int, config_sha256: str, docs: list[Document],
              full_read: bool, attention: bool = False, metrics: tuple[str, ...] = ()) -> dict | None:
    """The shard's info if shard k of `rank` is complete and holds exactly `docs` (the plan's),
    else None (then it is to be traced again). A shard of another configuration is an error: its
    folder belongs to a different run. full_read reads every value (a file cut short by a crash
    or a full disk can still have a footer that parses), the rest check footers and documents.
    attention: the run traces attention statistics, so the shard's attention file is checked too.
    metrics: the run's, to check the shard's partial profile against before it is merged."""
    import pyarrow.parquet as pq

    path = shard_path(out_dir, ACTIVATIONS, rank, k)
    doc_path = shard_path(out_dir, DOCUMENTS, rank, k)
    rows = _intact_rows(path, full_read)
    if rows is None or not doc_path.exists():
        return None
    try:
        info = json.loads(pq.read_schema(path).metadata[META_KEY])
        listed = pq.read_table(doc_path, columns=["doc_id", "text_sha256"])
        # A damaged footer can parse and still lack what a merge needs: such a shard is redone,
        # never merged (its partial profile is checked here, before anything counts on it).
        int(info["rows"]), int(info["documents"]), int(info["tokens"])
        if metrics:
            profile_from_state(info["layer_names"], metrics, info["profile"]).check_shapes()
    except Exception:  # pyarrow's (and a damaged footer's) errors are of several kinds
        return None
    if not isinstance(info, dict) or info.get("config_sha256") != config_sha256:
        raise ValueError(f"{path} was written by a run with other settings (model, layers, metrics, attention, "
                         "max_tokens, batch_tokens or number of ranks); resume with the same ones or use a new --out")
    if rows != info["rows"] or listed.num_rows != info["documents"]:
        return None
    if attention and _intact_rows(shard_path(out_dir, ATTENTION, rank, k), full_read) != info["attention_rows"]:
        return None
    if (listed.column("doc_id").to_pylist() != [d.doc_id for d in docs]
            or listed.column("text_sha256").to_pylist() != [d.text_sha256 for d in docs]):
        raise ValueError(f"{doc_path} holds other documents than the source gives now: the data changed "
                         "since the first run; use a new --out")
    return info


def _intact_rows(path: Path, full_read: bool) -> int | None:
    """A Parquet file's row count from its footer (after reading every value, with full_read);
    None when it is missing or does not read."""
    import pyarrow.parquet as pq

    try:
        rows = pq.read_metadata(path).num_rows
        if full_read and pq.read_table(path).num_rows != rows:
            return None
        return rows
    except Exception:  # missing, truncated or corrupt: pyarrow's errors are of several kinds
        return None


def profile_state(profile: Profile) -> dict:
    """A compact JSON form of a partial profile (sparse histogram) for a shard's metadata."""
    return profile.to_state()


def profile_from_state(layers: list[str], metrics: tuple[str, ...], state: dict) -> Profile:
    return Profile.from_state(layers, metrics, state)
