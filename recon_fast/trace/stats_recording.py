"""Token statistics at the hook, in an eager run: the recorder the Tracer's hooks call for one
session (session_recorder: stats_capture.fast_recorder for the usual [B, T, D] output, the
general path record_call for any other), where a grouped launch closes (layer_ends), and token
statistics as a capture kind (token_stats_kind), whose part stats_capture.TokenStatsCapture reads back."""

from __future__ import annotations

from collections.abc import Callable, Set

import torch
from torch import nn

from recon_fast.trace.session import Call, Capture, Session, TracerSettings, extract_tensor
from recon_fast.trace.stats_capture import TokenStatsCapture, fast_recorder, rows_of, untraceable

# What a capture keeps of one hook call's rows [..., positions, features] (Capture.slice_of).
SliceOf = Callable[[str, torch.Tensor], torch.Tensor | None]


def session_recorder(session: Session, *, grouped: bool, group_ends: frozenset[str], eager: Set[str],
                     slice_of: SliceOf | None, on_hook: Callable[[], Callable[[str], None] | None]
                     ) -> Callable[[str, object], None]:
    """record(name, output) for the hooks of one session. on_hook gives the callback to call after
    each hook call (read at every call: the Tracer's may change). With slice_of every call takes
    the general path, which keeps the slices."""

    def general(session: Session, name: str, output) -> None:
        record_call(session, name, output, grouped=grouped, group_ends=group_ends, eager=eager, slice_of=slice_of,
                    on_hook=on_hook())

    if slice_of is not None:
        return lambda name, output: general(session, name, output)
    return fast_recorder(session, general, grouped=grouped, group_ends=group_ends, eager=eager, on_hook=on_hook)


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
    session.calls.append(Call(name, tuple(x.shape[:-1]), slot, kept, session.axis, step, feature_shape))
    if on_hook is not None:
        on_hook(name)


def layer_ends(model: nn.Module, hooks: Set[str]) -> frozenset[str]:
    """Hooked modules that close a group: the blocks of a ModuleList (decoder layers), whose hook
    fires after those of the modules inside them."""
    in_lists = {f"{name}.{child}" if name else child for name, module in model.named_modules()
                if isinstance(module, nn.ModuleList) for child, _ in module.named_children()}
    return frozenset(n for n in hooks if n in in_lists)


class TokenStats(TokenStatsCapture, Capture):
    """Token statistics as a capture of the session: the Tracer's hooks record it (through
    session_recorder, or in a compiled model's graph); its part is TokenStatsCapture's."""

    compiles = True


def token_stats_kind(tracer: TracerSettings, session: Session) -> TokenStats:
    """The capture kind of token statistics, in every run: the metrics asked for, from the session's arena."""
    return TokenStats(session.arena, tracer.metrics)
