"""What one traced run records, shared by the Tracer and every capture kind: the activation in a
module's output (extract_tensor), one hook call (Call), the cube layers made of calls (Layer),
the run's session (Session), what every capture part is built from (Layout), and the protocol
each capture kind follows (Capture): a record per call into its own buffer, then its part of
the cube in memory (cube_part) or as JSON objects streamed to disk (stream_part)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from recon_fast.trace.stats_arena import ArenaSlot, StatsArena

if TYPE_CHECKING:
    from recon_fast.cube.cube import ActivityCube
    from recon_fast.trace.attention_stats_capture import AttentionStatsCapture


def extract_tensor(output) -> torch.Tensor | None:
    """The activation in a module's output: a tensor, the first tensor of a tuple/list, or a
    ModelOutput's last_hidden_state (the original tool's rule)."""
    if torch.is_tensor(output):
        return output
    if isinstance(output, (list, tuple)):
        return next((item for item in output if torch.is_tensor(item)), None)
    hidden = getattr(output, "last_hidden_state", None)
    return hidden if torch.is_tensor(hidden) else None


@dataclass(slots=True)
class Call:
    """One hook call: which module, the activation's [batch, positions] shape, where its stats
    went, which token axis and (generate) which forward pass it belongs to."""

    name: str
    lead_shape: tuple[int, ...]
    slot: ArenaSlot
    raw: torch.Tensor | None = None
    axis: str = "tokens"
    step: int = -1  # index of the model.forward call within generate(); -1 outside one
    feature_shape: list[int] | None = None


@dataclass
class Session:
    """One run's records: the token statistics' calls (rows in `arena`), what was skipped and
    why, the token axis now being fed, and the other captures of the run."""

    arena: StatsArena
    token_ids: bool  # the input is token ids: dim 1 is the token axis
    calls: list[Call] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    axis: str = "tokens"  # "decoder_tokens" once an encoder-decoder's decoder starts
    steps: list[int] = field(default_factory=list)  # positions fed by each model.forward (generate)
    attention_stats: AttentionStatsCapture | None = None  # attention="stats"


@dataclass(slots=True)
class Layer:
    """One layer of the cube: a module's calls and where their rows go on its token axis."""

    name: str
    axis: str
    calls: list[Call]
    starts: list[int]  # where each call's rows go on the token axis
    lengths: list[int]


@dataclass
class Layout:
    """The run's shape, worked out once after the pass, from which every capture builds its part."""

    mode: str  # "forward" or "generate"
    batch: int
    lengths: dict[str, int]  # length of each token axis
    padding: np.ndarray | None  # [batch, tokens] True where padded
    layers: list[Layer]  # the token statistics' layers, in cube order
    extras: dict[int, dict]  # per layer index: token_axis / feature_shape
    output: object = None  # what the model returned (attention="full" reads its attentions)

    @property
    def length(self) -> int:
        return max(self.lengths.values())

    @property
    def token_length(self) -> int:
        return self.lengths["tokens"]


class Capture(Protocol):
    """One capture kind of a run. Its hooks (or attention function) record each call into its own
    buffer during the pass; after it, the Tracer asks each capture, in order, for its part."""

    def cube_part(self, layout: Layout) -> dict:
        """ActivityCube fields this capture fills, on the host (meta entries under "meta")."""

    def stream_part(self, layout: Layout, shell: ActivityCube, path: str) -> Iterator[dict]:
        """Its JSON layer objects, in order, one at a time off the device (`shell`: the cube
        without layer data, holding the small parts)."""

    def warnings(self, layout: Layout) -> list[str]:
        """What the user should hear about this run (one line each)."""
