"""The HTML viewer's page: one self-contained file (CSS and JS from assets/ inlined, data embedded)
that needs no network to open. Numbers travel as one base64 block of little-endian float32 (exact
cube values at 4/3 of their binary size); names, tokens and layout as a small JSON header.

The viewer takes plain data and imports no layer above it: a cube is read through its fields (Cube
below; ActivityCube.to_html calls in here), an attribution document is JSON, and the attribution
labels' grammar comes from recon_fast.attribution_labels into the page's JSON, from which
viewer.js reads every label."""

from __future__ import annotations

import base64
import html
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import orjson

from recon_fast.atomic_files import atomic_write
from recon_fast.attribution_labels import page_table


class Cube(Protocol):
    """What the page reads of an ActivityCube (recon_fast.cube.cube, which imports this module to
    draw itself: the viewer names the fields instead of importing the class)."""

    tokens: list[list[str]]  # [batch][tokens]
    decoder_tokens: list[list[str]] | None
    layer_names: list[str]
    metrics: tuple[str, ...]
    data: np.ndarray  # [layers, batch, tokens, metrics] float32
    meta: dict
    attention: list[dict]  # attention="full" entries
    attention_layers: list[str]
    attention_data: np.ndarray | None  # [attention layers, batch, heads, tokens, statistics]

    @property
    def num_layers(self) -> int: ...

    def token_axis(self, index: int) -> str: ...

    def axis_length(self, axis: str) -> int: ...

ASSETS = Path(__file__).with_name("assets")


class _Blob:
    """float32 arrays laid end to end; each array's place is its offset in elements."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.size = 0

    def add(self, array: np.ndarray) -> dict:
        array = np.ascontiguousarray(array, dtype="<f4").reshape(-1)
        self.parts.append(array)
        placed = {"offset": self.size, "size": int(array.size)}
        self.size += array.size
        return placed

    def base64_chunks(self, chunk: int = 3 << 20) -> Iterator[bytes]:
        """base64 of the concatenation, in pieces (each a multiple of 3 bytes, so the pieces
        join into one valid base64 text) without holding a second copy of the data."""
        pending = b""
        for part in self.parts:
            raw = memoryview(part).cast("B")
            for start in range(0, len(raw), chunk):
                piece = pending + bytes(raw[start:start + chunk])
                cut = len(piece) - len(piece) % 3
                yield base64.b64encode(piece[:cut])
                pending = piece[cut:]
        if pending:
            yield base64.b64encode(pending)


def _cube_entry(cube: Cube, name: str, blob: _Blob) -> dict:
    # [layers, batch, tokens, metrics] -> [metrics, batch, layers, tokens]: a metric of one
    # sequence is then one contiguous layers x tokens block, the heatmap's own layout.
    placed = blob.add(cube.data.transpose(3, 1, 0, 2))
    entry = {"name": name, "model": cube.meta.get("model_name"), "layers": cube.layer_names,
             "metrics": list(cube.metrics), "batch": len(cube.tokens), "T": int(cube.data.shape[2]),
             "tokens": cube.tokens, **placed}
    if cube.decoder_tokens:
        entry["decoder_tokens"] = cube.decoder_tokens
        entry["token_axis"] = [int(cube.token_axis(i) == "decoder_tokens") for i in range(cube.num_layers)]
    return entry


def attention_statistics(cube: Cube) -> tuple[list[str], dict[str, np.ndarray]]:
    """The cube's attention statistics as (layer names, {statistic: [batch, layers, heads,
    queries] float32}), whatever form they take: the statistics array of Tracer(attention="stats")
    (`attention_data` [layers, batch, heads, tokens, stats], when the cube has one), or the
    `attention` entries: any per-statistic arrays ([batch, heads, queries] or [heads, queries]) in
    a dict-valued field, and full probabilities ([batch, heads, queries, keys]) as their entropy
    and max weight. A cube without attention gives ([], {})."""
    data = getattr(cube, "attention_data", None)
    if data is not None and np.ndim(data) == 5:
        data = np.asarray(data, dtype=np.float32)
        names = [str(n) for n in getattr(cube, "attention_layers", [])] or [f"attention.{i}" for i in range(len(data))]
        try:
            from recon_fast.kernels.attention_stats import ATTENTION_STATS as known
        except ImportError:
            known = ()
        stats = list(known) if len(known) == data.shape[-1] else [f"statistic {k}" for k in range(data.shape[-1])]
        return names, {stat: data[..., k].transpose(1, 0, 2, 3) for k, stat in enumerate(stats)}
    names, per_layer = [], []
    for entry in cube.attention:
        stats = {}
        for key, value in entry.items():
            if key == "attention_scores":
                probs = np.asarray(value, dtype=np.float64)
                if probs.ndim == 3:
                    probs = probs[None]
                if probs.ndim == 4:
                    stats["entropy"] = -(probs * np.log(np.clip(probs, 1e-30, None))).sum(-1)
                    stats["max_weight"] = probs.max(-1)
            elif isinstance(value, dict):
                for stat, array in value.items():
                    try:
                        array = np.asarray(array, dtype=np.float32)
                    except (TypeError, ValueError):
                        continue
                    if array.ndim == 2:
                        array = array[None]
                    if array.ndim == 3:
                        stats[stat] = array
        if stats:
            names.append(str(entry.get("layer_name", f"attention.{len(names)}")))
            per_layer.append(stats)
    if not per_layer:
        return [], {}
    order = list(dict.fromkeys(stat for stats in per_layer for stat in stats))
    batch, heads, queries = (max(s[k].shape[d] for s in per_layer for k in s) for d in range(3))
    out = {}
    for stat in order:
        grid = np.full((batch, len(per_layer), heads, queries), np.nan, np.float32)
        for i, stats in enumerate(per_layer):
            if stat in stats:
                a = stats[stat]
                grid[: a.shape[0], i, : a.shape[1], : a.shape[2]] = a
        out[stat] = grid
    return names, out


def cube_payload(cube: Cube, blob: _Blob, *, compare: Cube | None = None,
                 title: str | None = None, names: tuple[str, str] = ("A", "B")) -> dict:
    if compare is not None:
        check_comparable(cube, compare)
    cubes = [_cube_entry(cube, names[0], blob)]
    if compare is not None:
        cubes.append(_cube_entry(compare, names[1], blob))
    payload = {"kind": "cube", "title": title or f"ActivityCube \u2014 {cube.meta.get('model_name') or 'recon-fast'}",
               "cubes": cubes}
    layers, stats = attention_statistics(cube)
    if stats:
        first = next(iter(stats.values()))  # [batch, layers, heads, queries], as every statistic
        placed = blob.add(np.stack(list(stats.values())))  # [statistics, batch, layers, heads, queries]
        payload["attention"] = {"layers": layers, "stats": list(stats), "batch": first.shape[0],
                                "heads": first.shape[2], "queries": first.shape[3], **placed}
    return payload


def check_comparable(a: Cube, b: Cube) -> None:
    """Two cubes are drawn against each other layer by layer: they need the same layer names and
    a metric in common (prompts may differ; tokens are aligned by index)."""
    if a.layer_names != b.layer_names:
        if len(a.layer_names) != len(b.layer_names):
            raise ValueError(f"cannot compare cubes with {len(a.layer_names)} and {len(b.layer_names)} layers: "
                             "they need the same layer names (the same model and layer selection)")
        i = next(i for i, (x, y) in enumerate(zip(a.layer_names, b.layer_names)) if x != y)
        raise ValueError(f"cannot compare cubes: layer {i} is {a.layer_names[i]!r} in one and "
                         f"{b.layer_names[i]!r} in the other")
    if not set(a.metrics) & set(b.metrics):
        raise ValueError(f"cannot compare cubes: no metric in common ({list(a.metrics)} and {list(b.metrics)})")


def is_attribution(document: dict) -> bool:
    """An `attribute` document (labels + sequences) or a `cot` one (steps of those)."""
    if not isinstance(document, dict):
        return False
    if isinstance(document.get("steps"), list):
        return all(isinstance(s, dict) and is_attribution(s.get("attribution")) for s in document["steps"]) \
            and bool(document["steps"])
    return isinstance(document.get("labels"), list) and isinstance(document.get("sequences"), list) \
        and all(isinstance(s, dict) and len(s.get("values", ())) == len(document["labels"])
                for s in document["sequences"]) and bool(document["sequences"])


def attribution_payload(document: dict, title: str | None = None) -> dict:
    if not is_attribution(document):
        raise ValueError("not an attribution document: expected `labels` and `sequences` "
                         "(recon-fast attribute --json) or `steps` (recon-fast cot --json)")
    what = "chain of thought" if "steps" in document else "direct logit attribution"
    versus = [s["versus_text"] for s in document.get("sequences", ()) if s.get("versus_text") is not None]
    if versus:  # a --versus run: its logit is a difference (viewer.js says so on every label too)
        what += f" (logit difference vs {orjson.dumps(versus[0]).decode()})"
    return {"kind": "attribution", "title": title or f"{what} \u2014 {document.get('model') or 'recon-fast'}",
            "attribution": document, "term_kinds": page_table()}


def _json_for_script(payload: dict) -> bytes:
    # Inside <script> only "</script" or "<!--" could end or confuse it; "<" appears only in
    # strings, where \u003c means the same.
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY).replace(b"<", b"\\u003c")


def _asset(name: str) -> str:
    return (ASSETS / name).read_text(encoding="utf-8")


def fragment_chunks(payload: dict, blob: _Blob | None) -> Iterator[bytes]:
    """The view as an HTML fragment (what a notebook shows): a root element, the scoped CSS, the
    data and the script that mounts it."""
    root = f"rfv-{uuid.uuid4().hex[:12]}"
    yield f'<div class="rfv" id="{root}"></div>\n<style>\n{_asset("viewer.css")}</style>\n'.encode()
    yield f'<script type="application/json" id="{root}-meta">'.encode() + _json_for_script(payload) + b"</script>\n"
    yield f'<script type="application/octet-stream" id="{root}-data">'.encode()
    if blob is not None:
        yield from blob.base64_chunks()
    yield b"</script>\n<script>\n" + _asset("viewer.js").encode()
    yield (f'\n(function () {{ var id = "{root}"; window.ReconFastView.mount(document.getElementById(id), '
           f'JSON.parse(document.getElementById(id + "-meta").textContent), '
           f'document.getElementById(id + "-data").textContent); }})();\n</script>\n').encode()


def page_chunks(payload: dict, blob: _Blob | None) -> Iterator[bytes]:
    """The whole page: a fragment in a minimal document (no external resource of any kind)."""
    yield (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
           f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
           f'<title>{html.escape(payload["title"])}</title>\n'
           f'<style>body {{ margin: 0; background: #fff; }}</style>\n</head>\n<body>\n').encode()
    yield from fragment_chunks(payload, blob)
    yield b"</body>\n</html>\n"


def write_page(path: str | os.PathLike, chunks: Iterator[bytes]) -> int:
    """Writes the page atomically; returns its size in bytes."""
    written = 0
    with atomic_write(path) as f:
        for chunk in chunks:
            f.write(chunk)
            written += len(chunk)
    return written


def cube_html(cube: Cube, path: str | os.PathLike | None = None, *, compare: Cube | None = None,
              title: str | None = None, names: tuple[str, str] = ("A", "B")) -> str | int:
    """The page for a cube (and, with `compare`, a second cube beside it and their difference):
    written to `path` (returns its size in bytes), or returned as text when `path` is None."""
    blob = _Blob()
    payload = cube_payload(cube, blob, compare=compare, title=title, names=names)
    if path is None:
        return b"".join(page_chunks(payload, blob)).decode()
    return write_page(path, page_chunks(payload, blob))


# A notebook keeps every output inside the .ipynb and its page holds it in memory: a cube whose
# arrays pass this is summarised inline instead (a 364-layer cube at 32k tokens would be ~300 MB
# of base64 in the notebook), and its viewer goes to a file on request.
INLINE_LIMIT_BYTES = 32 * 2**20


def cube_fragment(cube: Cube, limit_bytes: int | None = None) -> str:
    """The cube's view as an HTML fragment, for a notebook's rich display; a short summary that
    says how to see it where its arrays exceed limit_bytes (default INLINE_LIMIT_BYTES)."""
    limit = INLINE_LIMIT_BYTES if limit_bytes is None else limit_bytes
    size = cube.data.nbytes + (cube.attention_data.nbytes if cube.attention_data is not None else 0)
    if size > limit:
        return _summary_fragment(cube, size, limit)
    blob = _Blob()
    return b"".join(fragment_chunks(cube_payload(cube, blob), blob)).decode()


def _summary_fragment(cube: Cube, size: int, limit: int) -> str:
    # size counts data and attention_data only: full attention entries reach the page as their
    # entropy and max weight (attention_statistics), never as [T, T] maps.
    tokens = cube.axis_length("tokens")
    attention = f", {len(cube.attention_layers)} attention layers" if cube.attention_layers else ""
    return (f"<div class=\"recon-fast-summary\"><b>{html.escape(repr(cube))}</b><br>"
            f"{cube.num_layers} layers x {len(cube.tokens)} sequences x {tokens} tokens x {len(cube.metrics)} metrics"
            f"{attention}: {size / 2**20:.0f} MiB of values, more than the {limit / 2**20:.0f} MiB shown inline "
            "(recon_fast.view.html.INLINE_LIMIT_BYTES). <code>cube.to_html(\"cube.html\")</code> writes the "
            "whole viewer to a file; <code>recon-fast view</code> does the same for a saved cube.</div>")


def attribution_html(document: dict, path: str | os.PathLike | None = None, *, title: str | None = None) -> str | int:
    """The page for an attribution JSON document (`recon-fast attribute --json` / `cot --json`, or
    Attribution.to_dict()): HexRay bars, the per-layer grid, chain-of-thought steps. The document
    is small, so it travels as JSON."""
    payload = attribution_payload(document, title)
    if path is None:
        return b"".join(page_chunks(payload, None)).decode()
    return write_page(path, page_chunks(payload, None))
