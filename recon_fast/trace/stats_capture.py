"""Token statistics, the Tracer's main capture. At the hook (session_recorder): each call's rows
are written into a device buffer (stats_arena.StatsArena) with token_stats, at the hook or grouped
per decoder layer (layer_ends), by the C++ recorder (recon_fast._C.Recorder) or fast_recorder for
the usual [B, T, D] output and by record_call for any other. Token statistics as a capture kind:
token_stats_kind, TokenStats. After the pass, this module reads them back into the cube's data
[layers, batch, tokens, metrics] (layers whose rows lie back to back in one copy) or streams them
to disk layer by layer, with padding made NaN and the first non-finite value named."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Set
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from recon_fast.cube import export
from recon_fast.kernels import token_stats as token_stats_op
from recon_fast.kernels.stats_tables import column_picker
from recon_fast.kernels.token_stats import STATS, copy_stat_columns
from recon_fast.trace.session import Call, Capture, Layer, Layout, Session, TracerSettings, extract_tensor
from recon_fast.trace.stats_arena import StatsArena

if TYPE_CHECKING:
    from recon_fast.cube.cube import ActivityCube


# What a capture keeps of one hook call's rows [..., positions, features] (Capture.slice_of).
SliceOf = Callable[[str, torch.Tensor], torch.Tensor | None]


def session_recorder(session: Session, *, grouped: bool, group_ends: frozenset[str], eager: Set[str],
                     slice_of: SliceOf | None, on_hook: Callable[[], Callable[[str], None] | None]
                     ) -> Callable[[str, object], None]:
    """record(name, output) for the hooks of one session. on_hook gives the callback to call after
    each hook call (the Python recorders read it at every call; the C++ one holds what it gave
    when made, and the Tracer sets a new one on it: Tracer.on_hook). With slice_of every call
    takes the general path, which keeps the slices.

    With the compiled library, the recorder is a recon_fast._C.Recorder
    (kernels.token_stats.TokenStatsRecorder, also the session's `log`): the usual outputs are
    recorded in C++ as fast_recorder records them, and everything else is handed to fast_recorder.
    It must be closed after the pass (close())."""

    def general(session: Session, name: str, output) -> None:
        record_call(session, name, output, grouped=grouped, group_ends=group_ends, eager=eager, slice_of=slice_of,
                    on_hook=on_hook())

    if slice_of is not None:
        return lambda name, output: general(session, name, output)
    record = fast_recorder(session, general, grouped=grouped, group_ends=group_ends, eager=eager, on_hook=on_hook)
    if token_stats_op.TokenStatsRecorder is None:
        return record
    log = token_stats_op.TokenStatsRecorder(session.arena, record, group_ends, eager, grouped)
    log.on_hook, log.axis, log.step = on_hook(), session.axis, len(session.steps) - 1
    session.log = log
    return log.__call__  # bound once: calling the object itself looks __call__ up at every call


def record_call(session: Session, name: str, output, *, grouped: bool = True, group_ends: Set[str] = frozenset(),
                eager: Set[str] = frozenset(), slice_of: SliceOf | None = None,
                on_hook: Callable[[str], None] | None = None) -> None:
    """The general path: any module output, traced into session.calls or listed in
    session.skipped with the reason. grouped: the rows are queued (StatsArena.defer) and launched
    at a module in group_ends, except for modules in `eager`, written at their hook."""
    tensor = extract_tensor(output)
    reason = untraceable(tensor, output)
    if reason is not None:
        session.skipped.append({"layer_name": name, "reason": reason})
        return
    # Runs are under no_grad; a tensor that still needs grad (a hook outside run()) is detached.
    x, feature_shape = rows_of(tensor.detach() if tensor.requires_grad else tensor, session.token_ids)
    if grouped and name not in eager:
        slot = session.arena.defer(x, name)
        if name in group_ends:
            session.arena.launch()
    else:
        slot = session.arena.write(x)
    kept = slice_of(name, x) if slice_of is not None else None
    step = len(session.steps) - 1
    session.add_call(Call(name, tuple(x.shape[:-1]), slot, kept, session.axis, step, feature_shape))
    if on_hook is not None:
        on_hook(name)


def layer_ends(model: nn.Module, hooks: Set[str]) -> frozenset[str]:
    """Hooked modules that close a group: the blocks of a ModuleList (decoder layers), whose hook
    fires after those of the modules inside them."""
    in_lists = {f"{name}.{child}" if name else child for name, module in model.named_modules()
                if isinstance(module, nn.ModuleList) for child, _ in module.named_children()}
    return frozenset(n for n in hooks if n in in_lists)


def fast_recorder(session: Session, general: Callable[[Session, str, object], None], *, grouped: bool,
                  group_ends: frozenset[str], eager: set[str], on_hook: Callable[[], Callable | None]):
    """record(name, output) for the hooks of one session. On a host-bound forward (a small model
    on a GPU) every microsecond here is paid once per hook, hundreds of times a pass, so the usual
    case is taken with what it needs bound once: a plain floating [B, T, D] tensor, alone or first
    in a tuple, that needs no grad. Its rows are the tensor as it is and it is recorded exactly as
    `general` would, as is a ModelOutput's last_hidden_state of that kind (a Hugging Face base model's
    output inside its CausalLM). Anything else (subclasses, other ranks and dtypes) goes through `general`.

    grouped: the activation is queued (StatsArena.defer) and the queue launched at the hook of a
    module in `group_ends` (a decoder layer: its sub-modules' hooks fire before its own), or once
    it holds the arena's group_bytes; modules in `eager` (whose outputs were seen edited in place)
    are written at their hook."""
    tensor_type = torch.Tensor
    arena = session.arena
    write, defer, launch = arena.write, arena.defer, arena.launch
    steps = session.steps

    def record(name: str, output) -> None:
        x = output
        if x.__class__ is not tensor_type:
            if output.__class__ is tuple:
                x = output[0] if output else None
            elif not isinstance(output, (tuple, list, torch.Tensor)):  # a ModelOutput: extract_tensor's rule
                x = getattr(output, "last_hidden_state", None)
            if x.__class__ is not tensor_type:
                general(session, name, output)
                return
        shape = x.shape
        if len(shape) != 3 or not shape[2] or x.requires_grad or not x.dtype.is_floating_point:
            general(session, name, output)
            return
        if not grouped or name in eager:
            slot = write(x)
        else:
            slot = defer(x, name)
            if name in group_ends:
                launch()
        session.add_call(Call(name, (shape[0], shape[1]), slot, None, session.axis, len(steps) - 1, None))
        callback = on_hook()
        if callback is not None:
            callback(name)

    return record


def rows_of(x: torch.Tensor, token_ids: bool) -> tuple[torch.Tensor, list[int] | None]:
    """The activation as [..., positions, features] rows for token_stats, and the shape of
    the features when several dims were folded into them."""
    if token_ids:
        if x.dim() >= 4:  # [B, T, H, d] (per-head norms): one row per token over H * d
            return x.flatten(2), list(x.shape[2:])
        return x, None
    if x.dim() == 2:  # [B, D]: one position per batch item
        return x.unsqueeze(1), None
    if x.dim() >= 4:  # [B, ..., T, D]: the token axis is the second-to-last dim
        features = [*x.shape[1:-2], x.shape[-1]]
        return x.movedim(-2, 1).flatten(2), features
    return x, None


def untraceable(tensor: torch.Tensor | None, output) -> str | None:
    """Why a module output cannot be traced (meta["skipped"]'s reason), or None."""
    if tensor is None:
        return f"output is {type(output).__name__}, not a tensor"
    if not tensor.is_floating_point():
        return f"activation dtype {tensor.dtype} is not floating"
    if tensor.dim() == 0 or tensor.shape[-1] == 0:
        return f"activation shape {tuple(tensor.shape)} has no feature dim"
    return None


class TokenStatsCapture:
    """The statistics' part of the cube: the metrics asked for, on [batch, length] (length: the
    longest token axis; the layout's token_length that of the input tokens, where padding applies)."""

    streams = True  # its part is the cube's bulk: written to disk layer by layer when streaming

    def __init__(self, arena: StatsArena, metrics: tuple[str, ...]):
        self.arena = arena
        self.metrics = metrics
        self.columns = [STATS.index(m) for m in metrics]
        self.picked = column_picker(self.columns)
        self.nonfinite = NonFinite()
        self.batch = self.length = self.token_length = 0
        self.padding = None

    def _shape_to(self, layout: Layout) -> None:
        self.batch, self.length, self.token_length = layout.batch, layout.length, layout.token_length
        self.padding = layout.padding

    def cube_part(self, layout: Layout) -> dict:
        self._shape_to(layout)
        data = self.data(layout.layers, layout.memo)
        meta = {"nonfinite": self.nonfinite.summary()} if self.nonfinite.first is not None else {}
        names = layout.memo.get("layer names")
        if names is None:  # the same for every run with these layers (a copy for each cube)
            names = layout.memo["layer names"] = [layer.name for layer in layout.layers]
        return {"layer_names": list(names), "data": data, "layer_extras": layout.extras, "meta": meta}

    def stream_part(self, layout: Layout, shell: ActivityCube, path: str) -> Iterator[dict]:
        self._shape_to(layout)
        flat = self.batch == 1
        for i, layer in enumerate(layout.layers):
            stats = self.layer(i, layer, self.arena)
            own = shell.axis_length(layer.axis)
            extra = {**layout.extras.get(i, {}), **shell.raw_reference(path, i)}
            yield export.layer_object(i, layer.name, stats[:, :own], self.metrics, flat, extra)

    def warnings(self, layout: Layout) -> list[str]:
        return [self.nonfinite.message(len(layout.layers))] if self.nonfinite.first is not None else []

    def layer(self, index: int, layer: Layer, host) -> np.ndarray:
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

    def data(self, layers: list[Layer], memo: dict | None = None) -> np.ndarray:
        """Every layer's statistics [layers, batch, length, metrics], off the device at once
        (memo: Layout.memo, which keeps the copies' plan for runs with the same layers)."""
        batch, length, host_cols, padding = self.batch, self.length, len(STATS), self.padding
        host = self.arena.to_host()
        data = np.empty((len(layers), batch, length, len(self.columns)), dtype=np.float32)
        runs = memo.get("token_stats runs") if memo is not None else None
        if runs is None:
            runs = _copy_runs(layers, batch, length)
            if memo is not None:
                memo["token_stats runs"] = runs
        for i, j, whole in runs:
            if not whole:
                data[i] = self.layer(i, layers[i], host)
                continue
            span = host.span(layers[i].calls[0].slot, layers[j - 1].calls[0].slot)
            block = data[i:j]
            if copy_stat_columns is not None:
                finite = copy_stat_columns(span, block, self.columns)
            else:
                rows = span.numpy().reshape(j - i, batch, length, host_cols)
                finite = bool(np.isfinite(rows[..., 0]).all())
                # One copy: a list of columns would make numpy gather into a temporary first.
                block[...] = rows[..., self.picked]
            if not finite:  # rare: then layer by layer, in order
                rows = span.numpy().reshape(j - i, batch, length, host_cols)
                counted = ~padding if padding is not None else np.ones((batch, length), dtype=bool)
                for k in range(i, j):
                    self.nonfinite.check(k, layers[k].name, rows[k - i, ..., 0], counted)
            if padding is not None:
                block[:, padding] = np.nan
        return data


class TokenStats(TokenStatsCapture, Capture):
    """Token statistics as a capture of the session: the Tracer's hooks record it (through
    session_recorder, or in a compiled model's graph); its part is TokenStatsCapture's."""

    compiles = True


def token_stats_kind(tracer: TracerSettings, session: Session) -> TokenStats:
    """The capture kind of token statistics, in every run: the metrics asked for, from the session's arena."""
    return TokenStats(session.arena, tracer.metrics)


def _copy_runs(layers: list[Layer], batch: int, length: int) -> list[tuple[int, int, bool]]:
    """Runs [i, j) of layers whose rows lie back to back in the arena, each the whole
    [batch, length] of its one call (whole: True), to be copied in one go: per-layer copies cost
    more than the forward pass itself at short T on a GPU; other layers one at a time. One pass
    over the layers, with back_to_back inlined: it runs once per hooked module."""
    runs, rows_per_layer, last = [], batch * length, None
    for k, layer in enumerate(layers):
        calls = layer.calls
        slot = calls[0].slot if len(calls) == 1 else None
        if slot is None or slot.rows != rows_per_layer or layer.lengths[0] != length or layer.axis != "tokens":
            runs.append((k, k + 1, False))
            last = None
        elif (last is not None and slot.row0 == last.row0 + last.rows and slot.chunk == last.chunk
              and slot.device == last.device):
            runs[-1] = (runs[-1][0], k + 1, True)
            last = slot
        else:
            runs.append((k, k + 1, True))
            last = slot
    return runs


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
