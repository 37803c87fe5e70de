"""ActivityCube: tokens x layers x metrics from one traced forward pass, with access by metric and
by layer (numpy or torch), the established JSON schema, a binary form, and loading of both.

An encoder-decoder's cube has two token axes: `tokens` (the encoder's input) and `decoder_tokens`;
each layer says which it is on (`token_axis(i)`, the JSON's "token_axis"), and the data's token
dim is the longer of the two, NaN past a layer's own axis."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from recon_fast.atomic_files import check_writable
from recon_fast.cube import export
from recon_fast.file_errors import reading
from recon_fast.kernels.attention_stats import ATTENTION_STATS
from recon_fast.kernels.token_stats import STATS
from recon_fast.view import html as view_html


@dataclass(repr=False)
class ActivityCube:
    tokens: list[list[str]]  # [batch][tokens]: decoded text, or str(id) without a tokenizer
    layer_names: list[str]  # one per layer entry (a module that fired twice appears twice)
    metrics: tuple[str, ...]  # names from recon_fast.kernels.token_stats.STATS
    data: np.ndarray  # [layers, batch, tokens, metrics] float32; padding positions are NaN
    padding_mask: np.ndarray | None = None  # [batch, tokens] bool, True at padding
    meta: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    # JSON entries appended after the layers, e.g. {"layer_name": "attention.0", ...}.
    attention: list[dict] = field(default_factory=list)
    # Extra keys of individual layer entries, by layer index (kept from loaded files).
    layer_extras: dict[int, dict] = field(default_factory=dict)
    # Raw activation slices by layer index: {"array": [batch, tokens, dims], "token_range",
    # "dim_range"}; written to a sidecar file "<cube file>.raw.npz" and referenced from the layer.
    raw: dict[int, dict] = field(default_factory=dict)
    # An encoder-decoder's second token axis ([batch][decoder tokens]); layers on it say so with
    # layer_extras[i]["token_axis"] == "decoder_tokens".
    decoder_tokens: list[list[str]] | None = None
    # Attention statistics (Tracer(attention="stats")): the attention modules, e.g.
    # model.layers.3.self_attn, and [attn_layers, batch, heads, tokens, statistics] float32, the
    # channels named by ATTENTION_STATS; padded queries are NaN. JSON: `attention.{i}` entries.
    attention_layers: list[str] = field(default_factory=list)
    attention_data: np.ndarray | None = None

    def __post_init__(self):
        self.data = np.asarray(self.data, dtype=np.float32)
        if self.attention_data is not None:
            self.attention_data = np.asarray(self.attention_data, dtype=np.float32)
            expected = (len(self.attention_layers), len(self.tokens), self.axis_length("tokens"), len(ATTENTION_STATS))
            got = self.attention_data.shape
            if self.attention_data.ndim != 5 or (got[0], got[1], got[3], got[4]) != expected:
                raise ValueError(f"ActivityCube attention_data shape {got} does not match attention layers x batch x "
                                 f"heads x tokens x statistics = {expected[:2]} + (heads,) + {expected[2:]}")
        if self.data.ndim != 4:
            raise ValueError(f"ActivityCube data must be [layers, batch, tokens, metrics], got {self.data.shape}")
        unknown = [m for m in self.metrics if m not in STATS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; known: {list(STATS)}")
        length = max(self.axis_length("tokens"), self.axis_length("decoder_tokens"))
        expected = (len(self.layer_names), len(self.tokens), length, len(self.metrics))
        if self.data.shape != expected:
            raise ValueError(f"ActivityCube data shape {self.data.shape} does not match "
                             f"layers x batch x tokens x metrics = {expected}")

    def __repr__(self) -> str:
        names = self.layer_names[:3]
        more = f", ... +{len(self.layer_names) - 3}" if len(self.layer_names) > 3 else ""
        decoder = f", decoder_tokens={self.axis_length('decoder_tokens')}" if self.decoder_tokens else ""
        return (f"ActivityCube(layers={self.num_layers}, batch={len(self.tokens)}, "
                f"tokens={self.axis_length('tokens')}{decoder}, metrics=({', '.join(self.metrics)}), "
                f"layer_names=[{', '.join(names)}{more}])")

    def axis_length(self, axis: str) -> int:
        """The length of a token axis: "tokens" or "decoder_tokens" (0 where the cube has none)."""
        rows = self.tokens if axis == "tokens" else self.decoder_tokens
        return len(rows[0]) if rows else 0

    def token_axis(self, index: int) -> str:
        """Which token axis layer `index` is on: "tokens", or "decoder_tokens" (encoder-decoders)."""
        return self.layer_extras.get(index, {}).get("token_axis", "tokens")

    # ---- shape and access -------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.data.shape)

    @property
    def num_layers(self) -> int:
        return self.data.shape[0]

    def metric(self, name: str) -> np.ndarray:  # -> [layers, batch, tokens]
        if name not in self.metrics:
            raise KeyError(f"metric {name!r} not in this cube; it has {list(self.metrics)}")
        return self.data[..., self.metrics.index(name)]

    def layer(self, key: int | str) -> np.ndarray:  # -> [batch, tokens of its axis, metrics]
        """A layer entry by index or name (the first entry of that name), over its own token axis."""
        if isinstance(key, str):
            if key not in self.layer_names:
                raise KeyError(f"layer {key!r} not in this cube")
            key = self.layer_names.index(key)
        return self.data[key, :, : self.axis_length(self.token_axis(key))]

    def attention_stat(self, name: str) -> np.ndarray:  # -> [attn_layers, batch, heads, tokens]
        """One attention statistic (a name of recon_fast.kernels.attention_stats.ATTENTION_STATS,
        e.g. "entropy") of every attention layer (`attention_layers`), per head and query."""
        if name not in ATTENTION_STATS:
            raise KeyError(f"unknown attention statistic {name!r}; known: {list(ATTENTION_STATS)}")
        if self.attention_data is None:
            raise KeyError("this cube has no attention statistics: trace with Tracer(model, attention='stats')")
        return self.attention_data[..., ATTENTION_STATS.index(name)]

    def attention_head_means(self, name: str, batch: int = 0, from_token: int = 0) -> np.ndarray:
        """[attn_layers, heads]: a statistic averaged over the real (not padded) queries of one
        sequence, from query `from_token` on (NaN where no query is left)."""
        values = self.attention_stat(name)[:, batch, :, from_token:]
        counted = np.isfinite(values)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counted, values, 0).sum(-1) / counted.sum(-1)

    def attention_objects(self) -> Iterator[dict]:
        """The `attention.{i}` entries of the attention statistics, built one at a time."""
        for i, name in enumerate(self.attention_layers):
            yield export.attention_stats_object(i, self.num_layers + i, name, self.attention_data[i], ATTENTION_STATS)

    def torch(self) -> torch.Tensor:
        """The data as a torch tensor (sharing memory)."""
        return torch.from_numpy(self.data)

    # ---- serialisation ----------------------------------------------------------------------
    def layer_objects(self, path: str | os.PathLike | None = None) -> Iterator[dict]:
        """The schema's `layers` entries, built one at a time (raw references relative to path)."""
        flat = len(self.tokens) == 1
        for i, name in enumerate(self.layer_names):
            extra = {**self.layer_extras.get(i, {}), **self.raw_reference(path, i)}
            yield export.layer_object(i, name, self.layer(i), self.metrics, flat, extra)
        yield from self.attention
        yield from self.attention_objects()

    @staticmethod
    def raw_sidecar(path: str | os.PathLike) -> Path:
        return Path(f"{path}.raw.npz")

    def raw_reference(self, path: str | os.PathLike | None, index: int) -> dict:
        """The "raw_tensors" key of layer `index`: where its slice lies in the sidecar."""
        if index not in self.raw or path is None:
            return {}
        entry = self.raw[index]
        return {"raw_tensors": {"file": self.raw_sidecar(path).name, "key": f"layer_{index}",
                                "shape": list(entry["array"].shape), "token_range": entry["token_range"],
                                "dim_range": entry["dim_range"]}}

    def write_raw_sidecar(self, path: str | os.PathLike) -> None:
        if self.raw:
            export.write_npz(self.raw_sidecar(path), header={},
                             arrays={f"layer_{i}": e["array"] for i, e in self.raw.items()})

    def meta_for_export(self) -> dict:
        meta = dict(self.meta)
        meta["metrics"] = [export.METRIC_KEYS[m] for m in self.metrics]
        if self.padding_mask is not None:
            meta["padding_mask"] = self.padding_mask.astype(np.uint8)
        return meta

    def to_dict(self) -> dict:
        """The JSON document as Python objects (numpy arrays where lists of numbers go)."""
        flat = len(self.tokens) == 1
        doc = {"meta": self.meta_for_export(), "tokens": self.tokens[0] if flat else self.tokens}
        if self.decoder_tokens is not None:
            doc["decoder_tokens"] = self.decoder_tokens[0] if flat else self.decoder_tokens
        doc["layers"] = list(self.layer_objects())
        doc["provenance"] = self.provenance
        return doc

    def export_json(self, path: str | os.PathLike) -> int:
        """Streams the cube to `path` as JSON (gzipped for a .gz name), atomically; returns the
        bytes of JSON written."""
        self.write_raw_sidecar(path)
        return export.write_json(path, meta=self.meta_for_export(), tokens=self.tokens,
                                 layers=self.layer_objects(path), provenance=self.provenance,
                                 decoder_tokens=self.decoder_tokens)

    def export_npz(self, path: str | os.PathLike) -> None:
        """The binary form: exact float32 data beside the same metadata."""
        header = {"meta": self.meta_for_export(), "tokens": self.tokens, "layer_names": self.layer_names,
                  "metrics": list(self.metrics), "provenance": self.provenance,
                  "attention": self.attention, "layer_extras": {str(k): v for k, v in self.layer_extras.items()},
                  "decoder_tokens": self.decoder_tokens, "attention_layers": self.attention_layers}
        header["raw"] = {str(i): {k: v for k, v in e.items() if k != "array"} for i, e in self.raw.items()}
        arrays = {"data": self.data, **{f"raw_{i}": e["array"] for i, e in self.raw.items()}}
        if self.padding_mask is not None:
            arrays["padding_mask"] = self.padding_mask
        if self.attention_data is not None:
            arrays["attention_data"] = self.attention_data
        export.write_npz(path, header=header, arrays=arrays)

    def export(self, path: str | os.PathLike, format: str | None = None) -> None:
        """JSON or npz, by the file's suffix (.json, .json.gz, .npz); `format`, if given, must agree."""
        format = export.cube_format(path, format)
        check_writable(path)
        if format == "npz":
            self.export_npz(path)
        else:
            self.export_json(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ActivityCube":
        """Reads a cube written by export_json, export_npz or a streaming Tracer."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no cube file {str(path)!r}")
        with open(path, "rb") as f:
            head = f.read(2)
        # By content, not name: a renamed file still reads, and the error says what it looked like.
        kind = "npz" if head == b"PK" else "json.gz" if head == b"\x1f\x8b" else "json"
        with reading(path, f"recon-fast cube (.{kind})"):
            cube = cls._from_npz(path) if kind == "npz" else cls._from_json(path)
        return cube

    @classmethod
    def _from_npz(cls, path: Path) -> "ActivityCube":
        header, arrays = export.read_npz(path)
        meta = header["meta"]
        # The header says which arrays were written: a damaged zip directory can rename or drop a
        # member and still read, which would silently lose the padding mask or a raw slice.
        expected = {"data", *(f"raw_{i}" for i in header.get("raw", {}))}
        expected |= {"padding_mask"} if "padding_mask" in meta else set()
        expected |= {"attention_data"} if header.get("attention_layers") else set()
        if set(arrays) != expected:
            raise ValueError(f"its arrays are {sorted(arrays)}, its header lists {sorted(expected)}")
        meta.pop("padding_mask", None)
        meta.pop("metrics", None)
        return cls(tokens=header["tokens"], layer_names=header["layer_names"],
                   metrics=tuple(header["metrics"]), data=arrays["data"],
                   padding_mask=arrays.get("padding_mask"), meta=meta,
                   provenance=header["provenance"], attention=header["attention"],
                   layer_extras={int(k): v for k, v in header["layer_extras"].items()},
                   raw={int(i): {**e, "array": arrays[f"raw_{i}"]} for i, e in header.get("raw", {}).items()},
                   decoder_tokens=header.get("decoder_tokens"),
                   attention_layers=header.get("attention_layers", []), attention_data=arrays.get("attention_data"))

    @classmethod
    def _from_json(cls, path: Path) -> "ActivityCube":
        doc = export.read_json(path)
        meta = doc["meta"]
        tokens = doc["tokens"]
        if tokens and not isinstance(tokens[0], list):
            tokens = [tokens]
        decoder_tokens = doc.get("decoder_tokens")
        if decoder_tokens and not isinstance(decoder_tokens[0], list):
            decoder_tokens = [decoder_tokens]
        batch = len(tokens)
        lengths = {"tokens": len(tokens[0]) if tokens else 0,
                   "decoder_tokens": len(decoder_tokens[0]) if decoder_tokens else 0}
        length = max(lengths.values())
        metric_keys = meta.pop("metrics", None)
        names, blocks, attention, extras, references = [], [], [], {}, {}
        attention_layers, attention_blocks = [], []
        for entry in doc["layers"]:
            core = entry.get("core_metrics")
            if "attention_stats" in entry:
                attention_layers.append(entry.get("module_name", entry["layer_name"]))
                attention_blocks.append(np.stack([export.as_float32(entry["attention_stats"][k])
                                                  for k in ATTENTION_STATS], axis=-1))
                continue
            if core is None:  # attention entries carry no core metrics
                attention.append(entry)
                continue
            if metric_keys is None:
                metric_keys = list(core)
            stats = np.stack([export.as_float32(core[k]) for k in metric_keys], axis=-1)
            own = lengths[entry.get("token_axis", "tokens")]
            block = np.full((batch, length, len(metric_keys)), np.nan, np.float32)
            block[:, :own] = stats.reshape(batch, own, len(metric_keys))
            blocks.append(block)
            extra = {k: v for k, v in entry.items() if k not in ("layer_index", "layer_name", "core_metrics")}
            reference = extra.pop("raw_tensors", None)
            if isinstance(reference, dict) and "key" in reference:
                references[len(names)] = reference
            elif reference is not None:  # the original tool's inline raw tensors
                extra["raw_tensors"] = reference
            if extra:
                extras[len(names)] = extra
            names.append(entry["layer_name"])
        metrics = tuple(export.METRIC_NAMES[k] for k in (metric_keys or []))
        data = np.stack(blocks) if blocks else np.zeros((0, batch, length, len(metrics)), np.float32)
        mask = meta.pop("padding_mask", None)
        raw = {}
        if references:
            sidecar = cls.raw_sidecar(path)
            with reading(sidecar, "raw-slice sidecar (.raw.npz) of a cube"):
                _, arrays = export.read_npz(sidecar)
            raw = {i: {"array": arrays[r["key"]], "token_range": r["token_range"], "dim_range": r["dim_range"]}
                   for i, r in references.items()}
        return cls(tokens=tokens, layer_names=names, metrics=metrics, data=data,
                   padding_mask=None if mask is None else np.asarray(mask, dtype=bool), meta=meta,
                   provenance=doc.get("provenance", {}), attention=attention, layer_extras=extras, raw=raw,
                   decoder_tokens=decoder_tokens, attention_layers=attention_layers,
                   attention_data=cls._stacked_heads(attention_blocks))

    @staticmethod
    def _stacked_heads(blocks: list[np.ndarray]) -> np.ndarray | None:
        """[batch, heads, tokens, 8] blocks as one array, heads NaN-padded to the widest."""
        if not blocks:
            return None
        heads = max(b.shape[1] for b in blocks)
        data = np.full((len(blocks), blocks[0].shape[0], heads, *blocks[0].shape[2:]), np.nan, np.float32)
        for i, b in enumerate(blocks):
            data[i, :, : b.shape[1]] = b
        return data

    def _token_labels(self, index: int, length: int) -> np.ndarray:
        """[batch * length] the token text of layer `index`'s axis ("" past its end)."""
        rows = self.tokens if self.token_axis(index) == "tokens" else self.decoder_tokens
        return np.array([t for seq in rows for t in seq + [""] * (length - len(seq))], dtype=object)

    def to_pandas(self):
        """A tidy DataFrame: one row per (layer, batch, token), one column per metric."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("ActivityCube.to_pandas needs pandas: pip install pandas") from None
        layers, batch, length, _ = self.data.shape
        index = pd.MultiIndex.from_product([range(layers), range(batch), range(length)],
                                           names=["layer_index", "batch", "position"])
        frame = pd.DataFrame(self.data.reshape(-1, len(self.metrics)), index=index, columns=list(self.metrics))
        frame.insert(0, "layer_name", np.repeat(np.array(self.layer_names, dtype=object), batch * length))
        frame.insert(1, "token", np.concatenate([self._token_labels(i, length) for i in range(layers)])
                     if layers else np.zeros(0, dtype=object))
        return frame.reset_index()

    def to_html(self, path: str | os.PathLike, compare: "ActivityCube | None" = None) -> int:
        """A self-contained HTML viewer of the cube (heatmaps, profiles, token strip; with `compare`,
        a second cube beside it and their difference), written to `path`; returns its size in bytes."""
        return view_html.cube_html(self, path, compare=compare)

    def _repr_html_(self) -> str:
        """The viewer inline in a notebook (Jupyter's rich display)."""
        return view_html.cube_fragment(self)
