"""Raw activation slices, the capture kept beside the statistics: a window [tokens, dims] of the
outputs of chosen modules, cloned on the device in the hook (its buffer: one small tensor per hook
call), and its part of the cube, `raw` (arrays written to a sidecar file on export)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from recon_fast.trace.session import Layout

if TYPE_CHECKING:
    from recon_fast.cube.cube import ActivityCube


@dataclass(frozen=True)
class RawSlices:
    """Raw activation slices to keep: modules whose name matches `layers` (re.fullmatch), token
    positions [tokens[0], tokens[1]) and features [dims[0], dims[1]) (None: to the end)."""

    layers: str
    tokens: tuple[int, int | None] = (0, None)
    dims: tuple[int, int | None] = (0, 16)

    def wants(self, name: str) -> bool:
        return re.fullmatch(self.layers, name) is not None


def take(spec: RawSlices | None, name: str, x: torch.Tensor) -> torch.Tensor | None:
    """The slice of one hook call's rows ([..., positions, features]) to keep, or None."""
    if spec is None or x.dim() < 2 or not spec.wants(name):
        return None
    (t0, t1), (d0, d1) = spec.tokens, spec.dims
    return x[..., t0:t1, d0:d1].clone()


class RawCapture:
    """Its buffer: the slices kept on each hook call (Call.raw); its part: the cube's `raw`."""

    streams = False  # small: held in the cube's shell, written to a sidecar beside the stream

    def __init__(self, spec: RawSlices):
        self.spec = spec

    def cube_part(self, layout: Layout) -> dict:
        """Per layer index, the slices of its calls along the token axis, on the host."""
        raw = {}
        (t0, t1), (d0, d1) = self.spec.tokens, self.spec.dims
        for i, layer in enumerate(layout.layers):
            if layer.calls[0].raw is not None:
                raw[i] = {"array": torch.cat([c.raw for c in layer.calls], dim=-2).float().cpu().numpy(),
                          "token_range": [t0, t1], "dim_range": [d0, d1]}
        return {"raw": raw}

    def stream_part(self, layout: Layout, shell: ActivityCube, path: str) -> Iterator[dict]:
        return iter(())  # the sidecar holds the slices; each layer object points at its own

    def warnings(self, layout: Layout) -> list[str]:
        return []
