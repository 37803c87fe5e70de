"""`recon-fast trace --baseline DIR/profile.json`: the traced prompt scored against a dataset's
profile (recon_fast.dataset.compare) and printed as the layers, then the values, farthest out of
the dataset's distribution: the auditing use (which layer lights up unlike anything the dataset
showed, and at which token)."""

from __future__ import annotations

import json
import re

import numpy as np

from recon_fast.dataset.profile import Comparison, Profile

# A value outside the profile's 1st..99th percentile counts as "outside": in distribution about
# 2% of a layer's values are, so a layer far above that is the one to look at.
OUTSIDE_LOW, OUTSIDE_HIGH = 1.0, 99.0


def load_profile(path: str) -> Profile:
    """The profile, or a one-line ValueError naming the file (checked before the model loads)."""
    try:
        return Profile.load(path)
    except FileNotFoundError:
        raise ValueError(f"--baseline {path!r}: no such file (a trace-dataset run writes DIR/profile.json)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--baseline {path!r}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"--baseline {path!r}: not a recon-fast profile.json ({type(exc).__name__})") from None
    except ValueError as exc:
        raise ValueError(f"--baseline {path!r}: {exc}") from None


def layers_pattern(profile: Profile) -> str:
    """A --layers regex selecting exactly the profile's layers, so that a plain `--baseline`
    traces what the dataset was traced with."""
    names = list(dict.fromkeys(profile.layers))
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


def report(comparison: Comparison, cube, profile: Profile, source: str, rows: int) -> str:
    """Two tables for batch item 0: layers by their largest |z| (with the mean |z| and the share
    of values outside the profile's p1..p99), then the `rows` values with the largest |z|."""
    z = np.abs(comparison.z[:, 0])  # [layers, tokens, metrics]
    percentile = comparison.percentile[:, 0]
    tokens = cube.tokens[0]
    scored = [i for i in range(z.shape[0]) if np.isfinite(z[i]).any()]
    lines = [f"baseline {source}: {profile.documents} documents, {profile.tokens} tokens; "
             f"{len(scored)} of the {cube.num_layers} traced layers are in it"]
    width = max([len("layer")] + [len(comparison.layer_names[i]) for i in scored])
    lines.append(f"{'layer':<{width}}  {'max |z|':>8}  {'at token':<16}  {'metric':<7}  {'mean |z|':>8}  "
                 f"{'outside p1..p99':>15}")
    per_layer = []
    for i in scored:
        finite = np.isfinite(z[i])
        flat = int(np.argmax(np.where(finite, z[i], -1.0)))
        t, m = np.unravel_index(flat, z[i].shape)
        p = percentile[i][finite]
        outside = float(np.mean((p < OUTSIDE_LOW) | (p > OUTSIDE_HIGH)))
        per_layer.append((float(z[i][t, m]), i, int(t), comparison.metrics[m], float(z[i][finite].mean()), outside))
    per_layer.sort(key=lambda e: -e[0])
    for peak, i, t, metric, mean, outside in per_layer[:rows]:
        lines.append(f"{comparison.layer_names[i]:<{width}}  {peak:8.2f}  {_token(tokens, t):<16}  {metric:<7}  "
                     f"{mean:8.2f}  {outside:15.1%}")
    top = comparison.top_indices(rows)
    if top:
        lines.append("values farthest from the dataset:")
        lines.append(f"{'layer':<{width}}  {'token':<16}  {'metric':<7}  {'value':>11}  {'z':>8}  {'percentile':>10}")
        for i, batch, t, m in top:
            metric = comparison.metrics[m]
            value = cube.data[i, batch, t, cube.metrics.index(metric)]
            lines.append(f"{comparison.layer_names[i]:<{width}}  {_token(tokens, t):<16}  {metric:<7}  {value:11.4g}  "
                         f"{comparison.z[i, batch, t, m]:8.2f}  {comparison.percentile[i, batch, t, m]:10.1f}")
    return "\n".join(lines)


def one_line(comparison: Comparison, cube) -> str:
    """For one prompt of many: its single farthest value."""
    top = comparison.top(1)
    if not top:
        return "baseline: no value of this prompt could be scored"
    layer, _, t, metric, zvalue, pct = top[0]
    return f"baseline: max |z| {abs(zvalue):.2f} at {layer} token {t} {_token(cube.tokens[0], t)} ({metric}, " \
           f"percentile {pct:.1f})"


def _token(tokens, t: int) -> str:
    return f"{t}:{tokens[t]!r}"[:16] if t < len(tokens) else str(t)
