"""Reading a traced dataset back: `open(DIR)` gives a DatasetReader; a document's ActivityCube,
one layer x metric across every document, or one attention layer x statistic, each reading only
the rows and columns it needs (Parquet filters and column projection: one row group per layer in
every shard)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from recon_fast.cube.cube import ActivityCube
from recon_fast.dataset.profile import Profile
from recon_fast.dataset.tracing import MANIFEST, PROFILE
from recon_fast.file_errors import reading


class DatasetReader:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.exists():
            raise ValueError(f"{self.path} has no {MANIFEST}: not a traced dataset, or its run has not finished "
                             "(recon-fast trace-dataset --resume completes it)")
        with reading(manifest, "recon-fast dataset manifest"):
            self.manifest = json.loads(manifest.read_bytes())
            self.layers: list[str] = list(self.manifest["layers"])
            self.metrics: tuple[str, ...] = tuple(self.manifest["metrics"])
            for key in ("documents", "shards"):
                self.manifest[key]  # noqa: B018 - a manifest without them is not one: fail here, naming it
        # Attention statistics (traced with attention="stats"), else empty.
        self.attention_layers: list[str] = self.manifest.get("attention_layers", [])
        self.attention_statistics: tuple[str, ...] = tuple(self.manifest.get("attention_statistics", []))
        self.heads: int = self.manifest.get("attention_heads", 0)
        self._where: dict[int, dict] | None = None

    def __repr__(self) -> str:
        return (f"DatasetReader({str(self.path)!r}, documents={self.manifest['documents']}, "
                f"layers={len(self.layers)}, metrics=({', '.join(self.metrics)}))")

    def __len__(self) -> int:
        return self.manifest["documents"]

    def _files(self, key: str) -> list[str]:
        return [str(self.path / s[key]) for s in self.manifest["shards"]]

    def documents(self, columns: list[str] | None = None):
        """The documents table (pyarrow.Table: doc_id, source_row, tokens, token_ids, text_sha256),
        sorted by doc_id; `columns` reads only those."""
        import pyarrow as pa

        tables = [_read_shard(f, columns=columns) for f in self._files("documents_file")]
        table = pa.concat_tables(tables)
        return table.sort_by("doc_id") if "doc_id" in table.column_names else table

    @property
    def doc_ids(self) -> np.ndarray:
        return self.documents(["doc_id"]).column("doc_id").to_numpy()

    def profile(self) -> Profile:
        return Profile.load(self.path / PROFILE)

    def _shard_of(self, doc_id: int) -> dict:
        """The manifest's entry of the shard holding `doc_id` (its files under their keys)."""
        if self._where is None:  # doc_id -> shard, from the small documents files
            self._where = {}
            for s in self.manifest["shards"]:
                for i in _read_shard(self.path / s["documents_file"], columns=["doc_id"]).column(0).to_pylist():
                    self._where[i] = s
        if doc_id not in self._where:
            raise KeyError(f"document {doc_id} is not in {self.path}")
        return self._where[doc_id]

    def cube(self, doc_id: int, tokenizer=None) -> ActivityCube:
        """Document `doc_id` as an ActivityCube (batch 1): its layers, metrics and tokens (their
        text with a tokenizer, else the ids as strings), and its attention statistics when the
        dataset has them."""
        doc_id = int(doc_id)
        shard = self._shard_of(doc_id)
        table = _read_shard(self.path / shard["activations"], columns=["layer", *self.metrics],
                              filters=[("doc_id", "==", doc_id)]).sort_by("layer")
        docs = _read_shard(self.path / shard["documents_file"], filters=[("doc_id", "==", doc_id)]).to_pylist()[0]
        data = _stacked(table, self.metrics)  # [layers, tokens, metrics]
        attention = {}
        if self.attention_layers:
            rows = _read_shard(self.path / shard["attention"], columns=["layer", "head", *self.attention_statistics],
                                 filters=[("doc_id", "==", doc_id)])
            rows = rows.sort_by([("layer", "ascending"), ("head", "ascending")])
            values = _stacked(rows, self.attention_statistics)  # [layers x heads, tokens, statistics]
            attention = {"attention_layers": list(self.attention_layers),
                         "attention_data": values.reshape(len(self.attention_layers), 1, self.heads,
                                                          *values.shape[1:])}
        ids = docs["token_ids"]
        tokens = [tokenizer.decode([i]) for i in ids] if tokenizer is not None else [str(i) for i in ids]
        meta = {"model_name": self.manifest["model"], "doc_id": doc_id, "source_row": docs["source_row"],
                "text_sha256": docs["text_sha256"], "mode": "dataset", "metrics": list(self.metrics)}
        return ActivityCube(tokens=[tokens], layer_names=list(self.layers), metrics=self.metrics,
                            data=data[:, None].astype(np.float32), meta=meta,
                            provenance=self.manifest.get("provenance", {}), **attention)

    def layer_metric(self, layer: int | str, metric: str) -> dict[int, np.ndarray]:
        """{doc_id: [tokens] float32} of one layer (index or name) and metric over every document,
        ordered by doc_id; reads that layer's row group and that metric's column only."""
        import pyarrow.dataset as ds

        if metric not in self.metrics:
            raise KeyError(f"metric {metric!r} not in this dataset; it has {list(self.metrics)}")
        layer = _index(layer, self.layers, "layer")
        table = _scan(self._files("activations"), columns=["doc_id", metric],
                      filter=ds.field("layer") == layer).sort_by("doc_id")
        values = table.column(metric).to_numpy(zero_copy_only=False)
        return {int(i): np.asarray(v, np.float32) for i, v in zip(table.column("doc_id").to_numpy(), values)}

    def attention_stat(self, layer: int | str, statistic: str, head: int | None = None) -> dict[int, np.ndarray]:
        """{doc_id: [heads, tokens] float32, or [tokens] for one `head`} of one attention layer
        (index among the attention layers, or name) and statistic (ATTENTION_STATS) over every
        document, ordered by doc_id; reads that layer's row group and that statistic's column only."""
        import pyarrow.dataset as ds

        if not self.attention_layers:
            raise KeyError(f"{self.path} has no attention statistics: trace it with attention='stats' "
                           "(--attention stats)")
        if statistic not in self.attention_statistics:
            raise KeyError(f"attention statistic {statistic!r} unknown; known: {list(self.attention_statistics)}")
        layer = _index(layer, self.attention_layers, "attention layer")
        where = ds.field("layer") == layer
        if head is not None:
            if not 0 <= head < self.heads:
                raise KeyError(f"head {head} out of range: the attention layers have {self.heads} heads")
            where &= ds.field("head") == head
        table = _scan(self._files("attention"), columns=["doc_id", "head", statistic], filter=where).sort_by([("doc_id", "ascending"), ("head", "ascending")])
        ids = table.column("doc_id").to_numpy()
        values = table.column(statistic).to_numpy(zero_copy_only=False)
        if head is not None:
            return {int(i): np.asarray(v, np.float32) for i, v in zip(ids, values)}
        # Every document has a row per head, sorted: each run of `heads` rows is one document.
        return {int(ids[r]): np.stack(values[r: r + self.heads]).astype(np.float32)
                for r in range(0, len(ids), self.heads)}


SHARD = "recon-fast dataset shard (Parquet)"


def _read_shard(path, **kwargs):
    """pq.read_table, or FileFormatError naming the shard file (cut short, overwritten, ...)."""
    import pyarrow.parquet as pq

    with reading(path, SHARD):
        return pq.read_table(path, **kwargs)


def _scan(files: list[str], **kwargs):
    """One table from many shard files (pyarrow.dataset); a file that does not read is named."""
    import pyarrow.dataset as ds

    try:
        return ds.dataset(files, format="parquet").to_table(**kwargs)
    except Exception:  # which file? pyarrow's message does not always say: read each footer to find it
        import pyarrow.parquet as pq

        for f in files:
            with reading(f, SHARD):
                pq.read_table(f, columns=kwargs.get("columns"))
        raise


def _index(layer: int | str, names: list[str], what: str) -> int:
    """A layer's index from its name or index (negative counts from the end, as in a list)."""
    if isinstance(layer, str):
        if layer not in names:
            raise KeyError(f"{what} {layer!r} not in this dataset")
        return names.index(layer)
    if not -len(names) <= layer < len(names):
        raise KeyError(f"{what} {layer} out of range: this dataset has {len(names)} ({names[0]!r} .. {names[-1]!r})"
                       if names else f"{what} {layer}: this dataset has none")
    return layer % len(names)


def _stacked(table, columns: tuple[str, ...]) -> np.ndarray:
    """[rows, tokens, columns] of list columns whose rows are equally long (one document's)."""
    return np.stack([np.stack(table.column(c).to_numpy(zero_copy_only=False)) for c in columns], -1)


def open(path: str | os.PathLike) -> DatasetReader:  # noqa: A001 - the package's `recon_fast.dataset.open(DIR)`
    """A traced dataset folder (written by trace_dataset / recon-fast trace-dataset)."""
    return DatasetReader(path)
