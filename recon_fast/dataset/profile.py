"""The dataset profile: per layer and metric, exact count, mean, std, min and max over every real
token of every document, and a fixed-bin log histogram (quantiles and percentiles come from it);
and `compare`, which scores a new cube against a profile (z-scores and percentiles per layer and
token), the auditing use.

Moments are merged with Chan's parallel formula in float64 (as ATen's WelfordOps::combine), per
batch into a shard's profile, then shard by shard and rank by rank, so the merge order changes the
result only by float64 rounding; counts and histograms are integers and merge exactly. The
histogram's edges are fixed (symmetric log, 10 bins a decade from 1e-6 to 1e6, one bin around 0,
one below and one above the range), so histograms of any runs add up bin by bin.

Position buckets: a causal model's first token is in a class of its own (SmolLM2's residual norm
there is ~23,770, the rest ~10-100; the attention sink, where a BOS goes when the tokenizer adds
one), so pooled statistics flag token 0 of every prompt. The profile therefore also keeps one
sub-profile per bucket of positions within the document (POSITION_BUCKETS: position 0 and the
rest), and compare() scores each token against its own bucket. The pooled arrays stay at the top
level (they are the buckets merged), so readers of the old format keep working. A profile whose
values came without positions (or a file from before buckets, format 1) is pooled only: it still
loads and compares, with a warning naming the file."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "recon-fast profile 2"
POOLED_FORMAT = "recon-fast profile 1"  # before position buckets: still read, pooled only
# Starts of the position buckets: [0, 1) and [1, inf). Position = index among a document's real
# tokens (the model's own position in the forward: documents are never split into windows).
POSITION_BUCKETS = (0, 1)
_MAGNITUDES = np.array([10.0 ** (k / 10) for k in range(-60, 61)])  # 1e-6 .. 1e6, 10 a decade
# Ascending edges: -1e6 ... -1e-6, 1e-6 ... 1e6; bin b holds edges[b-1] <= v < edges[b]
# (np.searchsorted(edges, v, "right")), bin 0 everything below -1e6 and the last above 1e6.
EDGES = np.concatenate([-_MAGNITUDES[::-1], _MAGNITUDES])
BINS = len(EDGES) + 1
QUANTILES = {"p1": 0.01, "p50": 0.5, "p99": 0.99}


@dataclass
class Profile:
    layers: list[str]
    metrics: tuple[str, ...]
    count: np.ndarray = None  # [layers, metrics] int64: finite values seen
    mean: np.ndarray = None  # [layers, metrics] float64
    m2: np.ndarray = None  # [layers, metrics] float64: sum of squared deviations from the mean
    min: np.ndarray = None  # [layers, metrics] float64 (+inf where count is 0)
    max: np.ndarray = None
    nonfinite: np.ndarray = None  # [layers, metrics] int64: NaN/Inf activations, left out above
    histogram: np.ndarray = None  # [layers, metrics, BINS] int64
    documents: int = 0
    tokens: int = 0
    meta: dict = field(default_factory=dict)
    # Bucket starts (ascending, from 0), None for a pooled-only profile; by_position holds one
    # pooled-only Profile per bucket, the same layers and metrics.
    positions: tuple[int, ...] | None = POSITION_BUCKETS
    by_position: list["Profile"] | None = None

    def __post_init__(self):
        shape = (len(self.layers), len(self.metrics))
        self.metrics = tuple(self.metrics)
        defaults = {"count": (np.int64, 0), "mean": (np.float64, 0.0), "m2": (np.float64, 0.0),
                    "min": (np.float64, np.inf), "max": (np.float64, -np.inf), "nonfinite": (np.int64, 0)}
        for name, (dtype, fill) in defaults.items():
            value = getattr(self, name)
            setattr(self, name, np.full(shape, fill, dtype) if value is None else np.asarray(value, dtype))
        self.histogram = (np.zeros((*shape, BINS), np.int64) if self.histogram is None
                          else np.asarray(self.histogram, np.int64))
        if self.positions is None:
            self.by_position = None
            return
        self.positions = tuple(int(p) for p in self.positions)
        starts = self.positions
        if not starts or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"position buckets must start at 0 and increase, got {list(self.positions)}")
        if self.by_position is None:
            self.by_position = [Profile(self.layers, self.metrics, positions=None) for _ in self.positions]
        if len(self.by_position) != len(self.positions):
            raise ValueError(f"{len(self.by_position)} position buckets for {len(self.positions)} starts")

    @property
    def pooled(self) -> bool:
        """True when every position is in one distribution (no position buckets)."""
        return self.positions is None

    def bucket_of(self, positions: np.ndarray) -> np.ndarray:
        """The bucket index of each position (same shape); positions below 0 (padding) get -1."""
        positions = np.asarray(positions)
        return np.where(positions >= 0, np.searchsorted(self.positions, positions, side="right") - 1, -1)

    def bucket_name(self, b: int) -> str:
        start = self.positions[b]
        end = self.positions[b + 1] if b + 1 < len(self.positions) else None
        if end == start + 1:
            return f"position {start}"
        return f"positions {start}+" if end is None else f"positions {start}-{end - 1}"

    # ---- accumulating ---------------------------------------------------------------------
    def add(self, values: np.ndarray, documents: int = 0, positions: np.ndarray | None = None) -> None:
        """values: [layers, tokens, metrics] (real tokens only: padding never comes here);
        positions: [tokens] int, each token's position in its document. Without positions the
        values cannot go to a bucket, and the profile becomes pooled only (its buckets dropped)."""
        values = np.asarray(values)
        self.documents += documents
        if positions is None or self.pooled:
            self.positions = self.by_position = None
            self._add_values(values)
            return
        positions = np.asarray(positions)
        if positions.shape != values.shape[1:2]:
            raise ValueError(f"positions is {list(positions.shape)}, expected one per token ({values.shape[1]})")
        if positions.size and positions.min() < 0:
            raise ValueError("positions must be 0 or more (padding never comes here)")
        bucket = self.bucket_of(positions)
        for b, sub in enumerate(self.by_position):
            part = Profile(self.layers, self.metrics, positions=None)
            part._add_values(values[:, bucket == b])
            sub._merge_stats(part)
            self._merge_stats(part)  # the pooled arrays: the buckets merged

    def _add_values(self, values: np.ndarray) -> None:
        layers, n, metrics = values.shape
        finite = np.isfinite(values)
        self.tokens += n
        if n == 0:
            return
        v = values.astype(np.float64)
        if finite.all():
            count = np.full((layers, metrics), n, np.int64)
            mean = v.mean(axis=1)
            m2 = ((v - mean[:, None, :]) ** 2).sum(axis=1)
            lo, hi = v.min(axis=1), v.max(axis=1)
        else:
            v = np.where(finite, v, np.nan)
            count = finite.sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.where(count > 0, np.nansum(v, axis=1) / np.maximum(count, 1), 0.0)
                m2 = np.nansum((v - mean[:, None, :]) ** 2, axis=1)
                lo = np.where(count > 0, np.nanmin(np.where(finite, v, np.inf), axis=1), np.inf)
                hi = np.where(count > 0, np.nanmax(np.where(finite, v, -np.inf), axis=1), -np.inf)
            self.nonfinite += (~finite).sum(axis=1)
        bins = np.searchsorted(EDGES, np.where(finite, v, 0.0), side="right")  # [layers, tokens, metrics]
        cell = (np.arange(layers)[:, None, None] * metrics + np.arange(metrics)[None, None, :]) * BINS
        flat = (bins + cell)[finite]
        self.histogram += np.bincount(flat, minlength=layers * metrics * BINS).reshape(layers, metrics, BINS)
        self._merge_moments(count, mean, m2, lo, hi)

    def merge(self, other: "Profile") -> "Profile":
        """Adds `other` (same layers and metrics) into this profile; returns self."""
        if list(other.layers) != list(self.layers) or tuple(other.metrics) != self.metrics:
            raise ValueError("profiles of different layers or metrics cannot be merged")
        empty = self.tokens == 0 and self.documents == 0
        if not self.pooled and not other.pooled and self.positions == other.positions:
            for mine, theirs in zip(self.by_position, other.by_position):
                mine._merge_stats(theirs)
        elif empty and not self.pooled and not other.pooled:  # an empty profile takes the other's
            self.positions = other.positions
            self.by_position = [Profile(self.layers, self.metrics, positions=None)._merge_stats(b)
                                for b in other.by_position]
        else:  # buckets that differ or are missing on one side: pooled only
            self.positions = self.by_position = None
        self._merge_stats(other)
        self.documents += other.documents
        return self

    def _merge_stats(self, other: "Profile") -> "Profile":
        self._merge_moments(other.count, other.mean, other.m2, other.min, other.max)
        self.histogram += other.histogram
        self.nonfinite += other.nonfinite
        self.tokens += other.tokens
        return self

    def _merge_moments(self, count, mean, m2, lo, hi) -> None:
        # Chan, Golub & LeVeque: n = na + nb, delta = mb - ma, mean = ma + delta nb / n,
        # M2 = M2a + M2b + delta^2 na nb / n.
        total = self.count + count
        safe = np.maximum(total, 1).astype(np.float64)
        delta = mean - self.mean
        self.mean = np.where(total > 0, self.mean + delta * (count / safe), 0.0)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * (count / safe))
        self.count = total
        self.min = np.minimum(self.min, lo)
        self.max = np.maximum(self.max, hi)

    # ---- reading --------------------------------------------------------------------------
    @property
    def std(self) -> np.ndarray:  # [layers, metrics]: divides by n - 1, like torch.std
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 1, np.sqrt(self.m2 / np.maximum(self.count - 1, 1)), np.nan)

    def quantile(self, q: float) -> np.ndarray:  # -> [layers, metrics], from the histogram
        """Linear within a bin, clamped to [min, max]; exact to a bin's width (a tenth of a decade)."""
        cum = np.cumsum(self.histogram, axis=-1)
        target = q * self.count[..., None]
        b = np.minimum((cum < target).sum(axis=-1, keepdims=True), BINS - 1)  # first bin reaching it
        below = np.take_along_axis(np.concatenate([np.zeros_like(cum[..., :1]), cum], -1), b, -1)
        inside = np.take_along_axis(self.histogram, b, -1)
        lo = np.concatenate([[-np.inf], EDGES])[b]
        hi = np.concatenate([EDGES, [np.inf]])[b]
        lo = np.maximum(lo, self.min[..., None])
        hi = np.minimum(hi, self.max[..., None])
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.clip(np.where(inside > 0, (target - below) / np.maximum(inside, 1), 0.5), 0, 1)
            out = (lo + frac * (hi - lo))[..., 0]
        return np.where(self.count > 0, out, np.nan)

    def percentile(self, layer: int, metric: int, values: np.ndarray) -> np.ndarray:
        """Where `values` fall in layer/metric's distribution, 0-100, from the histogram."""
        hist = self.histogram[layer, metric]
        total = hist.sum()
        if total == 0:
            return np.full(np.shape(values), np.nan)
        values = np.asarray(values, np.float64)
        finite = np.isfinite(values)
        b = np.searchsorted(EDGES, np.where(finite, values, 0.0), side="right")
        below = np.concatenate([[0], np.cumsum(hist)])[b]
        lo = np.concatenate([[-np.inf], EDGES])[b]
        hi = np.concatenate([EDGES, [np.inf]])[b]
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(np.isfinite(lo) & np.isfinite(hi), (values - lo) / (hi - lo), 0.5)
        out = 100.0 * (below + np.clip(frac, 0, 1) * hist[b]) / total
        return np.where(finite, out, np.nan)

    # ---- files ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "layers": list(self.layers), "metrics": list(self.metrics),
                "documents": self.documents, "tokens": self.tokens, "meta": self.meta,
                "histogram_edges": EDGES.tolist(), **self._cells(),
                # null: pooled only. Each bucket holds the same per-cell lists as the top level.
                "position_buckets": None if self.pooled else [
                    {"start": start, "name": self.bucket_name(b), "tokens": sub.tokens, **sub._cells()}
                    for b, (start, sub) in enumerate(zip(self.positions, self.by_position))]}

    def _cells(self) -> dict:
        def floats(a):  # JSON has no inf: an empty cell's min/max are null
            return [[None if not np.isfinite(x) else float(x) for x in row] for row in a]

        quantiles = {name: floats(self.quantile(q)) for name, q in QUANTILES.items()}
        # every per-cell list is [layers][metrics]; histogram [layers][metrics][bins]
        return {"count": self.count.tolist(), "mean": floats(self.mean), "std": floats(self.std),
                "min": floats(self.min), "max": floats(self.max), "m2": floats(self.m2),
                "nonfinite": self.nonfinite.tolist(), "histogram": self.histogram.tolist(), **quantiles}

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        if d.get("format") not in (FORMAT, POOLED_FORMAT):
            raise ValueError(f"not a recon-fast profile (format {d.get('format')!r}, expected {FORMAT!r})")
        if d["histogram_edges"] != EDGES.tolist():
            raise ValueError("the profile's histogram edges differ from this version's")

        def cells(c: dict) -> dict:
            def arr(key, fill):
                return np.array([[fill if x is None else x for x in row] for row in c[key]], np.float64)

            return {"count": c["count"], "mean": arr("mean", 0.0), "m2": arr("m2", 0.0), "min": arr("min", np.inf),
                    "max": arr("max", -np.inf), "nonfinite": c["nonfinite"], "histogram": c["histogram"]}

        buckets = d.get("position_buckets")
        by_position = None if buckets is None else [
            cls(d["layers"], tuple(d["metrics"]), **cells(c), tokens=c["tokens"], positions=None) for c in buckets]
        return cls(d["layers"], tuple(d["metrics"]), **cells(d), documents=d["documents"], tokens=d["tokens"],
                   meta=d.get("meta", {}), positions=None if buckets is None else [c["start"] for c in buckets],
                   by_position=by_position)

    def to_state(self) -> dict:
        """A compact JSON form of a partial profile (sparse histograms), for a shard's metadata."""
        def cells(p: "Profile") -> dict:
            flat = p.histogram.ravel()
            nonzero = np.flatnonzero(flat)
            return {"count": p.count.tolist(), "mean": p.mean.tolist(), "m2": p.m2.tolist(), "min": p.min.tolist(),
                    "max": p.max.tolist(), "nonfinite": p.nonfinite.tolist(),
                    "histogram": [nonzero.tolist(), flat[nonzero].tolist()], "tokens": p.tokens}

        return {**cells(self), "documents": self.documents,
                "positions": None if self.pooled else list(self.positions),
                "by_position": None if self.pooled else [cells(sub) for sub in self.by_position]}

    @classmethod
    def from_state(cls, layers: list[str], metrics: tuple[str, ...], state: dict) -> "Profile":
        """to_state()'s inverse; a state from before position buckets gives a pooled profile."""
        def build(c: dict, **extra) -> "Profile":
            profile = cls(list(layers), metrics, count=c["count"], mean=c["mean"], m2=c["m2"], min=c["min"],
                          max=c["max"], nonfinite=c["nonfinite"], tokens=c["tokens"], **extra)
            index, counts = c["histogram"]
            profile.histogram.ravel()[np.asarray(index, np.int64)] = counts
            return profile

        buckets = state.get("by_position")
        return build(state, documents=state["documents"], positions=state.get("positions") if buckets else None,
                     by_position=[build(c, positions=None) for c in buckets] if buckets else None)

    def save(self, path: str | os.PathLike) -> None:
        from recon_fast.dataset.writing import atomic_write  # a failed write names the file

        with atomic_write(path) as f:
            f.write(json.dumps(self.to_dict()).encode())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        """A profile.json, or FileFormatError naming the file and its first problem (cut short, not
        a profile, arrays of the wrong shape)."""
        from recon_fast.file_errors import reading

        with reading(path, "recon-fast profile (profile.json)"):
            profile = cls.from_dict(json.loads(Path(path).read_bytes()))
            profile.check_shapes()
        if profile.pooled:
            warnings.warn(f"{os.fspath(path)} pools every token position into one distribution (written before "
                          "position buckets, or from values without positions): a prompt's first token, in a class "
                          "of its own in many models, is scored against all positions; run trace-dataset again to "
                          "keep position 0 apart", UserWarning, stacklevel=2)
        return profile

    def check_shapes(self) -> None:
        """ValueError unless every array is [layers, metrics] (histogram [.., BINS]): a damaged
        file can parse and still hold a short row."""
        shape = (len(self.layers), len(self.metrics))
        for name in ("count", "mean", "m2", "min", "max", "nonfinite"):
            if getattr(self, name).shape != shape:
                raise ValueError(f"{name} is {list(getattr(self, name).shape)}, expected layers x metrics = {list(shape)}")
        if self.histogram.shape != (*shape, BINS):
            raise ValueError(f"histogram is {list(self.histogram.shape)}, expected {[*shape, BINS]}")
        for b, sub in enumerate(self.by_position or ()):
            try:
                sub.check_shapes()
            except ValueError as exc:
                raise ValueError(f"position bucket {b}: {exc}") from None


@dataclass
class Comparison:
    """A cube scored against a profile: z-score and percentile of every value. Layers the profile
    does not have are NaN, as are padding positions."""
    layer_names: list[str]
    metrics: tuple[str, ...]
    z: np.ndarray  # [layers, batch, tokens, metrics]
    percentile: np.ndarray  # [layers, batch, tokens, metrics], 0-100
    # The profile's bucket starts each token was scored within (None: against every position pooled)
    position_buckets: tuple[int, ...] | None = None

    def top(self, k: int = 10, metric: str | None = None) -> list[tuple[str, int, int, str, float, float]]:
        """The k values farthest from the profile's mean: (layer, batch, token, metric, z, percentile)."""
        return [(self.layer_names[layer], batch, token, self.metrics[m], float(self.z[layer, batch, token, m]),
                 float(self.percentile[layer, batch, token, m])) for layer, batch, token, m in self.top_indices(k, metric)]

    def top_indices(self, k: int = 10, metric: str | None = None) -> list[tuple[int, int, int, int]]:
        """top()'s values as indices (layer, batch, token, metric) into z: a layer name that fires
        more than once names several layers, an index one."""
        z = self.z if metric is None else self.z[..., [self.metrics.index(metric)]]
        score = np.where(np.isfinite(z), np.abs(z), -1.0).ravel()
        order = np.argsort(-score, kind="stable")[:k]
        out = []
        for flat in order:
            if score[flat] < 0:
                break
            layer, batch, token, m = (int(i) for i in np.unravel_index(flat, z.shape))
            out.append((layer, batch, token, m if metric is None else self.metrics.index(metric)))
        return out


def compare(profile: "Profile | str | os.PathLike", cube) -> Comparison:
    """Scores `cube` (an ActivityCube) against a dataset profile (a Profile or a profile.json):
    per layer, token and metric, z = (value - mean) / std and the percentile, against the
    statistics of the token's position bucket (its position: its index among the row's real
    tokens, as in the dataset). Layers are matched by name (the k-th entry of a name with the k-th
    in the profile)."""
    if not isinstance(profile, Profile):
        profile = Profile.load(profile)
    traced = profile.meta.get("model_config_sha256")
    scored = (getattr(cube, "provenance", None) or {}).get("model_config_sha256")
    if traced and scored and traced != scored:
        # Models of one family share layer names: the scores would come out, and mean nothing.
        warnings.warn(f"the profile was traced from another model configuration (config sha256 {traced[:12]}, "
                      f"this cube's {scored[:12]}): its z-scores and percentiles compare different models",
                      UserWarning, stacklevel=2)
    index = {}
    seen: dict[str, int] = {}
    for i, name in enumerate(profile.layers):
        index[(name, seen.get(name, 0))] = i
        seen[name] = seen.get(name, 0) + 1
    metrics = [m for m in cube.metrics if m in profile.metrics]
    if not metrics:
        raise ValueError(f"the cube's metrics {list(cube.metrics)} are not in the profile ({list(profile.metrics)})")
    shape = (cube.num_layers, *cube.data.shape[1:3], len(metrics))
    z = np.full(shape, np.nan)
    percentile = np.full(shape, np.nan)
    # Per bucket: the statistics to score against and where its tokens are ([batch, tokens] bool).
    if profile.pooled:
        groups = [(profile, np.ones(cube.data.shape[1:3], bool))]
    else:
        bucket = profile.bucket_of(token_positions(cube))
        groups = [(sub, bucket == b) for b, sub in enumerate(profile.by_position)]
    stds = [group.std for group, _ in groups]
    seen = {}
    for i, name in enumerate(cube.layer_names):
        p = index.get((name, seen.get(name, 0)))
        seen[name] = seen.get(name, 0) + 1
        if p is None:
            continue
        for j, metric in enumerate(metrics):
            pm = profile.metrics.index(metric)
            values = cube.data[i, ..., cube.metrics.index(metric)].astype(np.float64)  # [batch, tokens]
            for (group, where), std in zip(groups, stds):
                with np.errstate(invalid="ignore", divide="ignore"):
                    z[i, ..., j][where] = (values[where] - group.mean[p, pm]) / std[p, pm]
                percentile[i, ..., j][where] = group.percentile(p, pm, values[where])
    if not np.isfinite(z).any() and not any((n, 0) in index for n in cube.layer_names):
        raise ValueError("no layer of the cube is in the profile (were they traced with the same --layers?)")
    return Comparison(list(cube.layer_names), tuple(metrics), z, percentile, profile.positions)


def token_positions(cube) -> np.ndarray:
    """[batch, tokens] int: each token's index among its row's real tokens, as the dataset's
    profile counts positions (left or right padding alike); -1 at padding."""
    batch, tokens = cube.data.shape[1:3]
    if cube.padding_mask is None:
        return np.broadcast_to(np.arange(tokens), (batch, tokens))
    real = ~np.asarray(cube.padding_mask, bool)
    return np.where(real, np.cumsum(real, axis=1) - 1, -1)
