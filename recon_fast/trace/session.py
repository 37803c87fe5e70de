"""What one traced run records, shared by the Tracer and every capture kind: a hook call (Call),
the run's session (Session) and the hooks keeping its token axis (axis_hooks), the cube's layers
and the Layout every capture part is built from (layout.py works it out), and the protocol of a
capture kind: a factory (CaptureKind) giving each run its capture (Capture)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from recon_fast.trace.stats_arena import ArenaSlot, StatsArena

if TYPE_CHECKING:
    from recon_fast.cube.cube import ActivityCube
    from recon_fast.trace.model_inputs import ModelCall


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
    raw: torch.Tensor | None = None  # the slice a capture kept of its rows (Capture.slice_of)
    axis: str = "tokens"
    step: int = -1  # index of the model.forward call within generate(); -1 outside one
    feature_shape: list[int] | None = None


@dataclass
class Session:
    """One run's records: the token statistics' calls (rows in `arena`), what was skipped and
    why, the token axis now being fed, and the run's captures (one per capture kind it uses).

    With the hooks' C++ recorder (`log`, a recon_fast._C.Recorder), every call of the pass is in
    its log, in order: those it took as numbers, those of the Python recorders as Calls (add_call).
    `calls` makes the numbers into Calls when read, so a run whose layout is reused from the run
    before (layout.LayerCache) never makes them."""

    arena: StatsArena
    token_ids: bool  # the input is token ids: dim 1 is the token axis
    skipped: list[dict] = field(default_factory=list)
    axis: str = "tokens"  # "decoder_tokens" once an encoder-decoder's decoder starts
    steps: list[int] = field(default_factory=list)  # positions fed by each model.forward (generate)
    captures: list[Capture] = field(default_factory=list)  # in the order of their parts in the cube
    log: object = None  # the C++ recorder of this run's hooks (or a compiled run's CompiledLog), if any
    made: list[Call] = field(default_factory=list)  # the calls made so far (`calls` reads them)

    @property
    def calls(self) -> list[Call]:
        """Every hook call of the run so far, in order."""
        if self.log is not None:
            self.log.drain(self.made, Call, ArenaSlot)
        return self.made

    def add_call(self, call: Call) -> None:
        """A call recorded in Python (after those already logged)."""
        if self.log is not None:
            self.log.add(call)
        else:
            self.made.append(call)

    @property
    def logged(self) -> bool:
        """Whether every call of the run is in `log` (nothing added them to `calls` but the log)."""
        return self.log is not None and len(self.made) == self.log.drained

    def decoder_starts(self) -> None:
        """An encoder-decoder's decoder runs: the calls from here on are on its token axis."""
        self.axis = "decoder_tokens"
        if self.log is not None:
            self.log.axis = self.axis

    def step_starts(self, positions: int) -> None:
        """A generate() pass of `positions` positions starts."""
        self.steps.append(positions)
        if self.log is not None:
            self.log.step = len(self.steps) - 1


def axis_hooks(model: nn.Module, session: Session, mode: str, encoder_decoder: bool) -> list:
    """Hooks that live for one run and keep the session's token axis: an encoder-decoder's decoder
    switches it, and under generate() each model.forward call starts a pass of known length."""
    handles = []
    if encoder_decoder and hasattr(model, "get_decoder"):
        def decoder_starts(module, args):
            session.decoder_starts()

        handles.append(model.get_decoder().register_forward_pre_hook(decoder_starts))
    if mode == "generate":
        key = "decoder_input_ids" if encoder_decoder else "input_ids"

        def step_starts(module, args, kwargs):
            fed = kwargs.get(key, args[0] if args and not encoder_decoder else None)
            if not torch.is_tensor(fed):
                fed = kwargs.get("inputs_embeds" if not encoder_decoder else "decoder_inputs_embeds")
            session.step_starts(int(fed.shape[1]) if torch.is_tensor(fed) else 0)

        handles.append(model.register_forward_pre_hook(step_starts, with_kwargs=True))
    return handles


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
    """The run's shape, worked out once after the pass (layout.run_layout), from which every
    capture builds its part."""

    mode: str  # "forward" or "generate"
    batch: int
    lengths: dict[str, int]  # length of each token axis
    padding: np.ndarray | None  # [batch, tokens] True where padded
    layers: list[Layer]  # the token statistics' layers, in cube order
    extras: dict[int, dict]  # per layer index: token_axis / feature_shape
    output: object = None  # what the model returned (attention="full" reads its attentions)
    tokens: list[list[str]] = field(default_factory=list)  # [batch][tokens] as text, or positions
    decoder_tokens: list[list[str]] | None = None  # an encoder-decoder's [batch][decoder tokens]
    skipped: list[dict] = field(default_factory=list)  # meta["skipped"]: what was not traced, and why
    # What captures work out from the layers alone (for this batch and these lengths), by key: kept
    # with the layers while layout.LayerCache reuses them for the runs after this one.
    memo: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return max(self.lengths.values())

    @property
    def token_length(self) -> int:
        return self.lengths["tokens"]


@runtime_checkable
class Capture(Protocol):
    """One capture kind's capture for one run. Before the pass it may refuse the run or ask the
    model call for what it needs (prepare); during it, it records into its own buffer (through
    what `recording` installs, or the slices it keeps of each hook call); after it, the Tracer
    asks each capture, in order, for its part. A capture kind subclasses this for its defaults:
    no records, no part, nothing to say."""

    # Its part is the bulk of the cube: written to disk layer by layer when streaming. Else its
    # cube_part is built in memory also when streaming, held in the cube's shell (from which its
    # stream_part may write objects after those of the captures before it).
    streams: bool = False
    # It records without the Tracer's hooks: a run of it alone needs none (attention="stats").
    hookless: bool = False
    # It records inside a compiled model's graph; a run of a compiled model refuses any other.
    compiles: bool = False
    # It keeps a slice of every hook call's rows (slice_of, held as Call.raw, one slot: one such
    # capture per run); every call then takes the hooks' general path.
    slices_calls: bool = False

    def prepare(self, call: ModelCall, mode: str) -> None:
        """Before the pass ("forward" or "generate"): raise to refuse the run, or add to the call."""

    def recording(self) -> AbstractContextManager:
        """What it installs for the pass (and takes off after it, also when the pass fails)."""
        return contextlib.nullcontext()

    def slice_of(self, name: str, rows: torch.Tensor) -> torch.Tensor | None:
        """What it keeps of one hook call's rows [..., positions, features] (slices_calls)."""
        return None

    def cube_part(self, layout: Layout) -> dict:
        """ActivityCube fields this capture fills, on the host (meta entries under "meta")."""
        return {}

    def stream_part(self, layout: Layout, shell: ActivityCube, path: str) -> Iterator[dict]:
        """Its JSON layer objects, in order, one at a time off the device (`shell`: the cube
        without layer data, holding the small parts)."""
        return iter(())

    def warnings(self, layout: Layout) -> list[str]:
        """What the user should hear about this run (one line each)."""
        return []


class TracerSettings(Protocol):
    """What a capture kind reads of the Tracer that runs it (tracer.Tracer): its settings."""

    model: nn.Module
    metrics: tuple[str, ...]
    attention: str | None
    raw: object  # raw_capture.RawSlices or None


class CaptureKind(Protocol):
    """A capture kind, as the Tracer knows it: called at the start of every run, it gives the run's
    capture, or None where the Tracer's settings do not ask for it (Tracer.capture_kinds)."""

    def __call__(self, tracer: TracerSettings, session: Session) -> Capture | None: ...
