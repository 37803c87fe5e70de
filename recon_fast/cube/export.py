"""Writing and reading ActivityCube files.

JSON is written incrementally, layer by layer, with orjson serialising numpy slices, so peak
memory during export is the cube plus about one layer's text, never the whole document. Every
write is atomic (recon_fast.atomic_files: a temporary file renamed over the target when complete,
removed on SIGTERM, cleared by the next export when a SIGKILL left it).

The format follows the file name: .json, .json.gz (gzip-compressed JSON) or .npz.

JSON cannot hold NaN or Inf: they are written as null (orjson's rule) and read back as NaN.
Padding positions are NaN too, and listed in meta["padding_mask"]. The binary form (.npz: the
float32 array beside the same metadata) keeps every value exactly, Inf included.
"""

from __future__ import annotations

import contextlib
import gzip
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

import numpy as np
import orjson

# atomic_write is imported here for the writers below, and stays importable from here for the
# dataset writer (recon_fast.dataset.writing), which still imports it from this module.
from recon_fast.atomic_files import atomic_write
from recon_fast.kernels.stats_tables import TOKEN_STATS_TABLE

# The JSON names of token_stats' channels (core_metrics' keys): the table's JSON keys, the
# established schema's three (energy, mean_activation, std_activation), then min and max.
METRIC_KEYS = TOKEN_STATS_TABLE.json_keys()
METRIC_NAMES = {key: name for name, key in METRIC_KEYS.items()}

# File name endings and the format each means, longest first.
SUFFIXES = {".json.gz": "json", ".json": "json", ".npz": "npz"}

_NUMPY = orjson.OPT_SERIALIZE_NUMPY


def cube_format(path: str | os.PathLike, format: str | None = None) -> str:
    """"json" or "npz", from the file name's suffix; `format`, when given, must agree with it."""
    if format is not None and format not in ("json", "npz"):
        raise ValueError(f"unknown cube format {format!r}; use 'json' or 'npz'")
    name = Path(path).name.lower()
    by_suffix = next((fmt for suffix, fmt in SUFFIXES.items() if name.endswith(suffix)), None)
    if by_suffix is None:
        suffix = "".join(Path(path).suffixes) or "(none)"
        raise ValueError(f"unknown file suffix {suffix!r} in {str(path)!r}: use .json, .json.gz or .npz")
    if format is not None and format != by_suffix:
        raise ValueError(f"format {format!r} conflicts with the file name {str(path)!r} ({by_suffix}); "
                         "leave the format out or change the suffix")
    return by_suffix


def _per_sequence(values: np.ndarray, flat: bool) -> np.ndarray:
    """[batch, tokens] -> [tokens] for batch size 1 (the schema's flat lists)."""
    return np.ascontiguousarray(values[0] if flat else values)


def layer_object(index: int, name: str, stats: np.ndarray, metrics: tuple[str, ...],
                 flat: bool, extra: dict | None = None) -> dict:
    """One entry of `layers`: stats is [batch, tokens, metrics] float32."""
    core = {METRIC_KEYS[m]: _per_sequence(stats[..., k], flat) for k, m in enumerate(metrics)}
    obj = {"layer_index": index, "layer_name": name, "core_metrics": core}
    if extra:
        obj.update(extra)
    return obj


def attention_stats_object(index: int, layer_index: int, module_name: str, stats: np.ndarray,
                           names: tuple[str, ...]) -> dict:
    """One `attention.{index}` entry: stats is [batch, heads, tokens, len(names)] float32; each
    statistic is written [batch][heads][tokens] (padded queries null)."""
    return {"layer_index": layer_index, "layer_name": f"attention.{index}", "module_name": module_name,
            "attention_stats": {name: np.ascontiguousarray(stats[..., k]) for k, name in enumerate(names)}}


def write_json(
    path: str | os.PathLike,
    *,
    meta: dict,
    tokens: list[list[str]],
    layers: Iterable[dict],
    provenance: dict,
    decoder_tokens: list[list[str]] | None = None,
) -> int:
    """Streams {"meta", "tokens", ["decoder_tokens",] "layers", "provenance"} to `path` (gzipped
    for a .gz name); returns the bytes of JSON written.

    `layers` may be a generator (each layer object built and serialised, then dropped).
    """
    flat = len(tokens) == 1
    written = 0
    with atomic_write(path) as raw, _maybe_gzip(path, raw) as f:

        def put(chunk: bytes) -> None:
            nonlocal written
            f.write(chunk)
            written += len(chunk)

        put(b'{"meta":' + orjson.dumps(meta, option=_NUMPY))
        put(b',"tokens":' + orjson.dumps(tokens[0] if flat else tokens))
        if decoder_tokens is not None:
            put(b',"decoder_tokens":' + orjson.dumps(decoder_tokens[0] if flat else decoder_tokens))
        put(b',"layers":[')
        for i, layer in enumerate(layers):
            put((b"," if i else b"") + orjson.dumps(layer, option=_NUMPY))
        put(b'],"provenance":' + orjson.dumps(provenance, option=_NUMPY) + b"}")
    return written


@contextlib.contextmanager
def _maybe_gzip(path: str | os.PathLike, raw: IO[bytes]) -> Iterator[IO[bytes]]:
    """`raw` itself, or a gzip stream into it for a .gz file name."""
    if not str(path).lower().endswith(".gz"):
        yield raw
        return
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as f:
        yield f


def write_npz(path: str | os.PathLike, *, header: dict, arrays: dict[str, np.ndarray]) -> None:
    """The binary form: named arrays plus a JSON header (meta, tokens, names, provenance)."""
    with atomic_write(path) as f:
        np.savez(f, __header__=np.frombuffer(orjson.dumps(header, option=_NUMPY), dtype=np.uint8),
                 **arrays)


def read_npz(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as z:
        header = orjson.loads(z["__header__"].tobytes())
        arrays = {k: z[k] for k in z.files if k != "__header__"}
    return header, arrays


def read_json(path: str | os.PathLike) -> dict:
    with open(path, "rb") as f:
        data = f.read()
    return orjson.loads(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)


def as_float32(values) -> np.ndarray:
    """JSON numbers, possibly nested, back to float32; numpy reads null (None) as NaN."""
    return np.asarray(values, dtype=np.float32)
