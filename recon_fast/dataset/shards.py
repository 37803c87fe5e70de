"""The Parquet files of a traced dataset, one shard at a time, and checking them on resume.

A shard k of rank r is two files, each written atomically (temporary + rename, cube.export's
atomic_write): `documents/rank{r}/part-{k:05d}.parquet` (one row per document: doc_id,
source_row, tokens, token_ids, text_sha256), then `activations/rank{r}/part-{k:05d}.parquet`
(one row per layer and document, layer-major, one row group per layer: doc_id, layer,
layer_name, tokens, and a list<float32> column per metric holding the document's tokens). The
activations file is the commit: it exists only once both are complete. Its key-value metadata
holds the run's config hash, the shard's documents and its partial profile, so a resumed run
merges exactly what the first run computed.

Two folders, not one: each is then one table that `pandas.read_parquet("DIR/activations")` (or
polars, DuckDB, HF datasets) reads in one line; temporaries start with "." and readers skip them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recon_fast.cube.export import atomic_write
from recon_fast.dataset.batching import Document
from recon_fast.dataset.profile import Profile

META_KEY = b"recon_fast"
ACTIVATIONS = "activations"
DOCUMENTS = "documents"


def shard_path(out_dir: Path, table: str, rank: int, k: int) -> Path:
    return Path(out_dir) / table / f"rank{rank}" / f"part-{k:05d}.parquet"


@dataclass
class ShardBuffer:
    """One shard's documents and values while they are being traced (memory: one shard)."""
    layer_names: list[str]
    metrics: tuple[str, ...]

    def __post_init__(self):
        self.docs: list[Document] = []
        # values[m][l]: arrays of the batches' real tokens, in document order
        self.values = [[[] for _ in self.layer_names] for _ in self.metrics]
        self.profile = Profile(list(self.layer_names), self.metrics)

    def add_batch(self, docs, data: np.ndarray, mask: np.ndarray) -> None:
        """data: [layers, batch, tokens, metrics] of one batch; mask: [batch, tokens] bool, True at
        real tokens (right-padded). Padding positions are dropped here and go nowhere."""
        if data.shape[0] != len(self.layer_names):
            raise RuntimeError(f"a batch gave {data.shape[0]} layers, the run has {len(self.layer_names)}: "
                               "a layer that fires a varying number of times cannot be traced over a dataset")
        self.docs.extend(docs)
        for m in range(len(self.metrics)):
            for layer in range(len(self.layer_names)):
                self.values[m][layer].append(data[layer, :, :, m][mask])  # (doc, token) order
        self.profile.add(data[:, mask], documents=len(docs))

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
        layers = len(self.layer_names)
        row_lengths = np.tile(lengths, layers)
        offsets = pa.array(_offsets(row_lengths), pa.int32() if row_lengths.sum() < 2**31 else pa.int64())
        list_type = pa.ListArray if offsets.type == pa.int32() else pa.LargeListArray
        columns = {
            "doc_id": np.tile(ids, layers),
            "layer": np.repeat(np.arange(layers, dtype=np.int32), len(ids)),
            "layer_name": pa.DictionaryArray.from_arrays(
                pa.array(np.repeat(np.arange(layers, dtype=np.int32), len(ids))), pa.array(self.layer_names)),
            "tokens": row_lengths.astype(np.int32),
        }
        for m, name in enumerate(self.metrics):
            flat = np.concatenate([np.concatenate(per_batch) for per_batch in self.values[m]]).astype(np.float32)
            columns[name] = list_type.from_arrays(offsets, pa.array(flat, pa.float32()))
        info = {"config_sha256": config_sha256, "rank": rank, "shard": k, "documents": len(ids),
                "rows": len(ids) * layers, "tokens": int(lengths.sum()), "layer_names": list(self.layer_names),
                "profile": profile_state(self.profile)}
        activations = pa.table(columns).replace_schema_metadata({META_KEY: json.dumps(info).encode()})
        # Documents first: the activations file, written last, is what commits the shard.
        with atomic_write(shard_path(out_dir, DOCUMENTS, rank, k)) as f:
            pq.write_table(documents, f)
        with atomic_write(shard_path(out_dir, ACTIVATIONS, rank, k)) as f:
            pq.write_table(activations, f, row_group_size=max(len(ids), 1))  # one row group per layer
        return info


def _offsets(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64 if lengths.sum() >= 2**31 else np.int32)


def committed(out_dir: Path, rank: int, k: int, config_sha256: str, docs: list[Document],
              full_read: bool) -> dict | None:
    """The shard's info if shard k of `rank` is complete and holds exactly `docs` (the plan's),
    else None (then it is to be traced again). A shard of another configuration is an error: its
    folder belongs to a different run. full_read reads every value (a file cut short by a crash
    or a full disk can still have a footer that parses), the rest check footers and documents."""
    import pyarrow.parquet as pq

    path = shard_path(out_dir, ACTIVATIONS, rank, k)
    doc_path = shard_path(out_dir, DOCUMENTS, rank, k)
    if not path.exists() or not doc_path.exists():
        return None
    try:
        meta = pq.read_metadata(path)
        info = json.loads(pq.read_schema(path).metadata[META_KEY])
        listed = pq.read_table(doc_path, columns=["doc_id", "text_sha256"])
        if full_read:
            table = pq.read_table(path)
            if table.num_rows != meta.num_rows:
                return None
    except Exception:  # pyarrow's errors for a truncated or corrupt file are of several kinds
        return None
    if info.get("config_sha256") != config_sha256:
        raise ValueError(f"{path} was written by a run with other settings (model, layers, metrics, "
                         "max_tokens, batch_tokens or number of ranks); resume with the same ones or use a new --out")
    if meta.num_rows != info["rows"] or listed.num_rows != info["documents"]:
        return None
    if (listed.column("doc_id").to_pylist() != [d.doc_id for d in docs]
            or listed.column("text_sha256").to_pylist() != [d.text_sha256 for d in docs]):
        raise ValueError(f"{doc_path} holds other documents than the source gives now: the data changed "
                         "since the first run; use a new --out")
    return info


def profile_state(profile: Profile) -> dict:
    """A compact JSON form of a partial profile (sparse histogram) for a shard's metadata."""
    flat = profile.histogram.ravel()
    nonzero = np.flatnonzero(flat)
    return {"count": profile.count.tolist(), "mean": profile.mean.tolist(), "m2": profile.m2.tolist(),
            "min": profile.min.tolist(), "max": profile.max.tolist(), "nonfinite": profile.nonfinite.tolist(),
            "histogram": [nonzero.tolist(), flat[nonzero].tolist()], "documents": profile.documents,
            "tokens": profile.tokens}


def profile_from_state(layers: list[str], metrics: tuple[str, ...], state: dict) -> Profile:
    profile = Profile(list(layers), metrics, count=state["count"], mean=state["mean"], m2=state["m2"],
                      min=state["min"], max=state["max"], nonfinite=state["nonfinite"],
                      documents=state["documents"], tokens=state["tokens"])
    index, counts = state["histogram"]
    profile.histogram.ravel()[np.asarray(index, np.int64)] = counts
    return profile
