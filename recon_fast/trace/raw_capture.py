"""Raw activation slices, the capture kept beside the statistics (Tracer(raw=RawSlices(...))): a
window [tokens, dims] of the outputs of chosen modules, cloned on the device in the hook (its
buffer: one small tensor per hook call, Call.raw), and its part of the cube, `raw` (arrays written
to a sidecar file on export)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from recon_fast.trace.session import Capture, Layout, Session, TracerSettings


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


class RawCapture(Capture):
    """Its buffer: the slices kept on each hook call (Call.raw); its part: the cube's `raw`, small,
    held in the cube's shell and written to a sidecar file (no stream_part: each layer object
    points at its own slice in the sidecar)."""

    slices_calls = True

    def __init__(self, spec: RawSlices):
        self.spec = spec

    def slice_of(self, name: str, rows: torch.Tensor) -> torch.Tensor | None:
        return take(self.spec, name, rows)

    def cube_part(self, layout: Layout) -> dict:
        """Per layer index, the slices of its calls along the token axis, on the host."""
        raw = {}
        (t0, t1), (d0, d1) = self.spec.tokens, self.spec.dims
        for i, layer in enumerate(layout.layers):
            if layer.calls[0].raw is not None:
                raw[i] = {"array": torch.cat([c.raw for c in layer.calls], dim=-2).float().cpu().numpy(),
                          "token_range": [t0, t1], "dim_range": [d0, d1]}
        return {"raw": raw}


def raw_slices_kind(tracer: TracerSettings, session: Session) -> RawCapture | None:
    """The capture kind of raw slices, in runs of a Tracer with raw= set."""
    return RawCapture(tracer.raw) if tracer.raw is not None else None
