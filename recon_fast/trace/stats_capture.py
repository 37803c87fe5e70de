"""Token statistics, the Tracer's main capture: the hooks write each call's rows into a device
buffer (stats_arena.StatsArena) with token_stats; after the pass, this module reads them back
into the cube's data [layers, batch, tokens, metrics] (layers whose rows lie back to back in one
copy) or streams them to disk layer by layer, with padding made NaN and the first non-finite
value named."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from recon_fast.cube import export
from recon_fast.cube.cube import ActivityCube
from recon_fast.kernels.attention_stats import ATTENTION_STATS
from recon_fast.kernels.ops import STATS
from recon_fast.trace.stats_arena import StatsArena, back_to_back

if TYPE_CHECKING:
    from recon_fast.trace.tracer import _Layer


class StatsCube:
    """The statistics' part of the cube: the metrics asked for, on [batch, length] (length: the
    longest token axis; `token_length` that of the input tokens, where `padding` applies)."""

    def __init__(self, arena: StatsArena, metrics: tuple[str, ...], batch: int, length: int, token_length: int,
                 padding: np.ndarray | None):
        self.arena = arena
        self.metrics = metrics
        self.batch, self.length, self.token_length = batch, length, token_length
        self.padding = padding
        self.columns = [STATS.index(m) for m in metrics]
        contiguous = self.columns == list(range(self.columns[0], self.columns[0] + len(self.columns)))
        self.picked = slice(self.columns[0], self.columns[0] + len(self.columns)) if contiguous else self.columns
        self.nonfinite = NonFinite()

    def layer(self, index: int, layer: _Layer, host) -> np.ndarray:
        """One layer's statistics [batch, length, metrics], read from `host` (the arena or its host copy)."""
        batch, length, host_cols, padding = self.batch, self.length, len(STATS), self.padding
        stats = np.full((batch, length, host_cols), np.nan, dtype=np.float32)
        written = np.zeros((batch, length), dtype=bool)
        for c, start, n in zip(layer.calls, layer.starts, layer.lengths):
            stats[:, start:start + n] = host.read(c.slot).view(-1, n, host_cols).expand(batch, n, host_cols).numpy()
            written[:, start:start + n] = True
        if padding is not None and layer.axis == "tokens":
            written[:, :self.token_length] &= ~padding
            stats[:, :self.token_length][padding] = np.nan
        self.nonfinite.check(index, layer.name, stats[..., 0], written)
        return stats[..., self.columns]

    def data(self, layers: list[_Layer]) -> np.ndarray:
        """Every layer's statistics [layers, batch, length, metrics], off the device at once."""
        batch, length, host_cols, padding = self.batch, self.length, len(STATS), self.padding
        host = self.arena.to_host()
        data = np.empty((len(layers), batch, length, len(self.columns)), dtype=np.float32)
        whole = [layer.axis == "tokens" and len(layer.calls) == 1 and layer.lengths[0] == length
                 and layer.calls[0].slot.rows == batch * length for layer in layers]
        counted = ~padding if padding is not None else np.ones((batch, length), dtype=bool)
        i = 0
        while i < len(layers):
            if not whole[i]:
                data[i] = self.layer(i, layers[i], host)
                i += 1
                continue
            # Layers whose rows lie back to back in the arena are copied in one go: per-layer
            # copies cost more than the forward pass itself at short T on a GPU.
            j = i + 1
            while j < len(layers) and whole[j] and back_to_back(layers[j - 1].calls[0].slot, layers[j].calls[0].slot):
                j += 1
            rows = host.span(layers[i].calls[0].slot, layers[j - 1].calls[0].slot).numpy()
            rows = rows.reshape(j - i, batch, length, host_cols)
            if not np.isfinite(rows[..., 0]).all():  # rare: then layer by layer, in order
                for k in range(i, j):
                    self.nonfinite.check(k, layers[k].name, rows[k - i, ..., 0], counted)
            block = data[i:j]
            # One copy: a list of columns would make numpy gather into a temporary first.
            block[...] = rows[..., self.picked]
            if padding is not None:
                block[:, padding] = np.nan
            i = j
        return data

    def stream(self, path, layers: list[_Layer], shell: dict, extras: dict, attention_layers=()) -> None:
        """Writes the cube to `path` (JSON), copying one layer at a time off the device; then the
        attention statistics, (module name, [batch, heads, tokens, 8]) pairs, one at a time."""
        cube = ActivityCube(layer_names=[], data=np.zeros((0, self.batch, self.length, len(self.metrics)), np.float32),
                            **shell)
        path = str(path)
        flat = self.batch == 1

        def layer_objects() -> Iterator[dict]:
            for i, layer in enumerate(layers):
                stats = self.layer(i, layer, self.arena)
                own = cube.axis_length(layer.axis)
                extra = {**extras.get(i, {}), **cube.raw_reference(path, i)}
                yield export.layer_object(i, layer.name, stats[:, :own], self.metrics, flat, extra)
            yield from cube.attention
            for i, (name, stats) in enumerate(attention_layers):
                yield export.attention_stats_object(i, len(layers) + i, name, stats, ATTENTION_STATS)

        cube.write_raw_sidecar(path)
        export.write_json(path, meta=cube.meta_for_export(), tokens=cube.tokens, layers=layer_objects(),
                          provenance=cube.provenance, decoder_tokens=cube.decoder_tokens)


class NonFinite:
    """The first layer and token whose statistics are NaN or Inf, from the stats already on the
    host (energy is the L2 norm: non-finite exactly when some element is, or the row overflows).
    Positions a layer never wrote (padding, past its own axis) do not count."""

    def __init__(self):
        self.first: dict | None = None
        self.layers = 0

    def check(self, index: int, name: str, energy: np.ndarray, counted: np.ndarray) -> None:
        bad = ~np.isfinite(energy) & counted  # [batch, length]
        if not bad.any():
            return
        self.layers += 1
        if self.first is None:
            where = np.argwhere(bad)
            b, t = where[np.lexsort((where[:, 0], where[:, 1]))[0]]  # earliest token, then batch item
            kind = "NaN" if np.isnan(energy[b, t]) else "Inf"
            self.first = {"layer_index": index, "layer_name": name, "batch": int(b), "token": int(t), "value": kind}

    def summary(self) -> dict:
        return {**self.first, "layers": self.layers}

    def message(self, layers: int) -> str:
        f = self.first
        return (f"non-finite activations ({f['value']}): first in {f['layer_name']} at token {f['token']} "
                f"(batch item {f['batch']}); {self.layers} of {layers} layers have some (meta['nonfinite'])")
