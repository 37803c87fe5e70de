"""Writing and reading ActivityCube files.

JSON is written incrementally, layer by layer, with orjson serialising numpy slices, so peak
memory during export is the cube plus about one layer's text, never the whole document. Every
write is atomic: the document goes to a temporary file in the same folder, is flushed to disk and
renamed over the target only when complete, so a crash leaves the previous file or none.

JSON cannot hold NaN or Inf: they are written as null (orjson's rule) and read back as NaN.
Padding positions are NaN too, and listed in meta["padding_mask"]. The binary form (.npz: the
float32 array beside the same metadata) keeps every value exactly, Inf included.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

import numpy as np
import orjson

# The JSON names of token_stats' channels: the established schema's three, then min and max.
METRIC_KEYS = {
    "energy": "energy",
    "mean": "mean_activation",
    "std": "std_activation",
    "min": "min_activation",
    "max": "max_activation",
}
METRIC_NAMES = {key: name for name, key in METRIC_KEYS.items()}

_NUMPY = orjson.OPT_SERIALIZE_NUMPY
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # reading the umask means setting it: put it straight back


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file that replaces `path` only if the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would make exports private to their writer
        with os.fdopen(fd, "wb", buffering=1 << 20) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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


def write_json(
    path: str | os.PathLike,
    *,
    meta: dict,
    tokens: list[list[str]],
    layers: Iterable[dict],
    provenance: dict,
) -> int:
    """Streams {"meta", "tokens", "layers", "provenance"} to `path`; returns bytes written.

    `layers` may be a generator (each layer object built and serialised, then dropped).
    """
    flat = len(tokens) == 1
    written = 0
    with atomic_write(path) as f:

        def put(chunk: bytes) -> None:
            nonlocal written
            f.write(chunk)
            written += len(chunk)

        put(b'{"meta":' + orjson.dumps(meta, option=_NUMPY))
        put(b',"tokens":' + orjson.dumps(tokens[0] if flat else tokens))
        put(b',"layers":[')
        for i, layer in enumerate(layers):
            put((b"," if i else b"") + orjson.dumps(layer, option=_NUMPY))
        put(b'],"provenance":' + orjson.dumps(provenance, option=_NUMPY) + b"}")
    return written


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
        return orjson.loads(f.read())


def as_float32(values) -> np.ndarray:
    """JSON numbers, possibly nested, back to float32; numpy reads null (None) as NaN."""
    return np.asarray(values, dtype=np.float32)
