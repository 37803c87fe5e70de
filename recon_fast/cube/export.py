"""Writing and reading ActivityCube files.

JSON is written incrementally, layer by layer, with orjson serialising numpy slices, so peak
memory during export is the cube plus about one layer's text, never the whole document. Every
write is atomic: the document goes to a temporary file in the same folder, is flushed to disk and
renamed over the target only when complete, so a crash leaves the previous file or none. A
SIGTERM during the write removes the temporary file before the process dies of it; one left by a
SIGKILL or a power cut (`.<name>.XXXXXXXX.tmp`) is removed by the next export to the same path,
provided it is older than the process doing that export (a younger one may be another export in
flight).

The format follows the file name: .json, .json.gz (gzip-compressed JSON) or .npz.

JSON cannot hold NaN or Inf: they are written as null (orjson's rule) and read back as NaN.
Padding positions are NaN too, and listed in meta["padding_mask"]. The binary form (.npz: the
float32 array beside the same metadata) keeps every value exactly, Inf included.
"""

from __future__ import annotations

import atexit
import contextlib
import gzip
import os
import re
import signal
import tempfile
import threading
import time
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

# File name endings and the format each means, longest first.
SUFFIXES = {".json.gz": "json", ".json": "json", ".npz": "npz"}

_NUMPY = orjson.OPT_SERIALIZE_NUMPY
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # reading the umask means setting it: put it straight back
_IMPORTED = time.time()


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


def check_writable(path: str | os.PathLike) -> None:
    """ValueError (one line) if a file could not be written at `path`: an empty name, a directory,
    or a folder that cannot be created or written in. Probes with a temporary file it removes, so
    nothing is left behind and missing folders are not created yet."""
    if not str(path).strip():
        raise ValueError("the output path is empty")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory; name a file in it, e.g. {str(path / 'cube.json')!r}")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot write {str(path)!r}: {str(existing)!r} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=existing)
    except OSError as exc:
        raise ValueError(f"cannot write {str(path)!r}: {exc.strerror or exc} in {str(existing)!r}") from None
    os.close(fd)
    os.unlink(probe)


# ---- temporary files: removed on SIGTERM, and when stale ------------------------------------------
_in_flight: set[str] = set()
_lock = threading.Lock()
_previous_sigterm = None  # the handler ours replaced while a write is in flight


def _remove_in_flight() -> None:
    for tmp in list(_in_flight):
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    _in_flight.clear()


atexit.register(_remove_in_flight)


def _on_sigterm(signum, frame) -> None:
    """Removes in-flight temporary files, then lets SIGTERM do what it would have done."""
    _remove_in_flight()
    previous = _previous_sigterm
    signal.signal(signum, previous)
    if callable(previous):
        previous(signum, frame)
    else:  # SIG_DFL: die of the signal, as without us
        os.kill(os.getpid(), signum)


def _track(tmp: str) -> None:
    global _previous_sigterm
    with _lock:
        if not _in_flight and threading.current_thread() is threading.main_thread():
            current = signal.getsignal(signal.SIGTERM)
            # Only a handler we can put back (not SIG_IGN: then SIGTERM kills nothing; not one set from C).
            if current is signal.SIG_DFL or (callable(current) and current is not _on_sigterm):
                _previous_sigterm = current
                signal.signal(signal.SIGTERM, _on_sigterm)
        _in_flight.add(tmp)


def _untrack(tmp: str) -> None:
    global _previous_sigterm
    with _lock:
        _in_flight.discard(tmp)
        if (not _in_flight and _previous_sigterm is not None
                and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) is _on_sigterm):
            signal.signal(signal.SIGTERM, _previous_sigterm)
            _previous_sigterm = None


def process_start_time() -> float:
    """When this process started (epoch seconds): from /proc where there is one, else when this
    module was imported. Measured back from now by the uptime, not from /proc/stat's btime: btime
    is whole seconds, so a temporary written by a run killed less than a second before this one
    started would count as this run's and be kept (the dataset chaos tests found it)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Removes `.<name>.XXXXXXXX.tmp` files of `path` (this module's own pattern) last written
    before this process started: their export died. Returns what was removed."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp")
    started = process_start_time()
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            if pattern.fullmatch(entry.name):
                with contextlib.suppress(OSError):
                    if entry.stat().st_mtime < started:
                        os.unlink(entry.path)
                        removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file that replaces `path` only if the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    _track(tmp)
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
    finally:
        _untrack(tmp)


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
