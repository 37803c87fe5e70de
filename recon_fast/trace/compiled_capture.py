"""Tracing a compiled model (`model.compile()` or `torch.compile(model)`): the object every hook
of a Tracer records into (HookSink), and its compiled run (HookSink.run). Dynamo inlines the hooks
into the graph once; nothing a hook touches may change from run to run, or every run would
recompile. So the sink is made once per Tracer and reused: one float32 [capacity, NUM_STATS]
buffer (a static address, so that mode="reduce-overhead" captures it in its CUDA graph), a row
counter reset before each run, and lists of what was recorded that dynamo replays after the graph (its side
effects). In eager, the hooks call the session's recorder (stats_capture.session_recorder).

Dynamo does not guard on hooks (pytorch issue 117758): a graph compiled before a hook was added
runs without it. `refresh_compiled` drops the model's compiled code when the Tracer's hooks are not
the ones of its last compiled run, so that they all take effect (one recompile). Nor does it tell
modules of one class apart: a graph compiled later for another (hookless) model of the same class
serves the traced one too; a run whose hooks, which recorded before, record nothing is taken for
that, and repeated after the same refresh.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from recon_fast.kernels import token_stats as token_stats_op
from recon_fast.kernels.token_stats import NUM_STATS, token_stats
from recon_fast.trace import module_hooks
from recon_fast.trace.session import Call, Session, extract_tensor
from recon_fast.trace.stats_arena import ArenaSlot, _rows_op_for
from recon_fast.trace.stats_capture import rows_of, untraceable


def compiled_wrapper(model: nn.Module) -> bool:
    """Whether model is torch.compile(module)'s wrapper (its modules live under `_orig_mod`)."""
    return isinstance(model, torch._dynamo.eval_frame.OptimizedModule)


def is_compiled(model: nn.Module) -> bool:
    """model.compile() was called on it, or it is torch.compile's wrapper."""
    return compiled_wrapper(model) or getattr(model, "_compiled_call_impl", None) is not None


class HookSink:
    """What the hooks of one Tracer record into, for its whole life (never the Tracer itself: the
    hooks hold the sink, so a Tracer nobody holds is still collected with its hooks)."""

    def __init__(self):
        self.record: Callable[[str, object], None] | None = None  # eager: set while a run records
        # Eager: what the parked hooks (module_hooks.TracedForward) record into; None without it.
        self.forwards = module_hooks.ForwardSink() if module_hooks.ForwardSink is not None else None
        self.active = False  # compiled: a run records (guarded on: one graph each way)
        self.token_ids = True
        self.buffer: torch.Tensor | None = None  # compiled: float32 [capacity, NUM_STATS], reused
        self.rows_op = None
        self.fill = 0  # rows the run has asked for (more than the capacity: grow and run again)
        self.calls: list[tuple] = []  # (name, lead shape, row0, rows, feature shape)
        self.skipped: list[dict] = []
        self.compiled_hooks: frozenset[str] | None = None  # the hooks of the last compiled run
        self.recorded = False  # a compiled run with these hooks recorded calls

    def arm(self, record: Callable[[str, object], None], log: object) -> None:
        """An eager run begins: the hooks call record(name, output); the parked ones call the
        session's C++ recorder (`log`, when it is one) directly, else record."""
        self.record = record
        if self.forwards is not None:
            native = token_stats_op.TokenStatsRecorder
            self.forwards.record = log if native is not None and isinstance(log, native) else record

    def disarm(self) -> None:
        """The eager run is over: hooks and wrappers only call through."""
        self.record = None
        if self.forwards is not None:
            self.forwards.record = None

    def record_compiled(self, name: str, output) -> None:
        """The hook's body as dynamo traces it: the general rules, each taken once at compile time."""
        if not self.active:
            return
        tensor = extract_tensor(output)
        reason = untraceable(tensor, output)
        if reason is not None:
            self.skipped.append({"layer_name": name, "reason": reason})
            return
        x, feature_shape = rows_of(tensor.detach(), self.token_ids)
        rows = x.numel() // x.shape[-1]
        row0 = self.fill
        self.fill = row0 + rows
        if row0 + rows > self.buffer.shape[0]:
            return  # the tracer grows the buffer and runs again
        # Written here, one op per hook. Queuing the outputs for one grouped op per decoder layer
        # (365 op calls -> 31 on the proxy) was tried: it read outputs edited in place after their
        # hook (the graph keeps Python's aliasing and has no version counter to check; see
        # tests/test_compiled_tracing.py), for 0.96x the time on the proxy and 1.03x on a 4-layer model.
        if self.rows_op is not None:  # the registered op, on the current stream
            self.rows_op(x, self.buffer, row0)
        else:
            token_stats(x, out=self.buffer[row0:row0 + rows].view(*x.shape[:-1], NUM_STATS))
        self.calls.append((name, tuple(x.shape[:-1]), row0, rows, feature_shape))

    # ---- run by the Tracer, outside the graph ---------------------------------------------------
    def run(self, model: nn.Module, forward: Callable[[], object], session: Session, hooks: frozenset[str],
            batch: int, tokens: int, device: torch.device) -> object:
        """A compiled run of `forward` (no autograd) with `hooks` in its graph, recorded into
        `session` on `device` (where the run's inputs went); returns the model's output. The
        buffer's rows are first guessed (each hook [batch, tokens] once, twice over); a run that
        needs more gets a buffer of its size and runs again (a new buffer: one recompile)."""
        if hooks != self.compiled_hooks:
            refresh_compiled(model)
            self.compiled_hooks, self.recorded = hooks, False
        rows = max(self.buffer.shape[0] if self.buffer is not None else 0, 2 * len(hooks) * batch * tokens)
        refreshed = False
        while True:
            self.start(device, session.token_ids, rows)
            try:
                with torch.no_grad():
                    output = forward()
            finally:
                self.active = False
            if self.overflowed():
                rows = self.fill
            elif self.recorded and not self.calls and not self.skipped and not refreshed:
                # Hooks that recorded before recorded nothing: dynamo ran a graph compiled for
                # another module of the same class (compiled after this one; its guards do not
                # see hooks, pytorch issue 117758), in which our hooks are not.
                refresh_compiled(model, shared=True)
                refreshed = True
            else:
                break
        self.recorded = self.recorded or bool(self.calls)
        self.into(session)
        return output

    def start(self, device: torch.device, token_ids: bool, rows: int) -> None:
        """Before a compiled run: empty records, a buffer of at least `rows` on `device`."""
        self.fill = 0
        self.calls.clear()
        self.skipped.clear()
        self.token_ids = token_ids
        buffer = self.buffer
        if buffer is None or buffer.device != device or buffer.shape[0] < rows:
            # A new buffer is a new graph input: one recompile, on growth only.
            self.buffer = torch.zeros(max(rows, 1), NUM_STATS, dtype=torch.float32, device=device)
            torch._dynamo.mark_static_address(self.buffer)
            self.rows_op = _rows_op_for(device.type)
        self.active = True

    def overflowed(self) -> bool:
        return self.fill > self.buffer.shape[0]

    def into(self, session: Session) -> None:
        """The run's records as an eager session's: the used rows of the buffer as a chunk of the
        session's arena, not copied (the next run writes the buffer again only after this run's
        cube was made), and its hook calls as the session's log (CompiledLog)."""
        device = self.buffer.device
        first = session.arena.adopt(self.buffer[: self.fill])
        session.skipped.extend(self.skipped)
        session.log = CompiledLog(list(self.calls), device, first.chunk, first.row0)


class CompiledLog:
    """A compiled run's hook calls, (name, lead shape, row0, rows, feature shape) each, rows from
    `start` in the arena's chunk `chunk`: a session's log as the C++ recorder's is (Session.log),
    so that the Calls are made only when read and a run with the same calls as the one before
    reuses its layers (layout.LayerCache): every run of one graph makes the same calls."""

    def __init__(self, calls: list[tuple], device: torch.device, chunk: int, start: int):
        self.calls, self.device, self.chunk, self.start = calls, device, chunk, start
        self.drained = 0

    def __len__(self) -> int:
        return len(self.calls)

    def drain(self, made: list[Call], call_type: type = Call, slot_type: type = ArenaSlot) -> None:
        device, chunk, start = self.device, self.chunk, self.start
        made.extend(call_type(name, lead, slot_type(device, chunk, start + row0, n), None, "tokens", -1, feature)
                    for name, lead, row0, n, feature in self.calls[self.drained:])
        self.drained = len(self.calls)

    def same_calls(self, other) -> bool:
        return (isinstance(other, CompiledLog) and (self.device, self.chunk, self.start) == (other.device, other.chunk,
                                                                                            other.start)
                and self.calls == other.calls)


def refresh_compiled(model: nn.Module, shared: bool = False) -> None:
    """Drops the compiled code that serves `model` (nn.Module's _call_impl, shared by every
    compiled module, and the model's forward): graphs made before the Tracer's hooks were there
    (or, shared, for another module of the model's class) would run without them. Said, as other
    compiled modules recompile too."""
    codes = [nn.Module._call_impl.__code__, type(model).forward.__code__]
    cached = sum(len(torch._C._dynamo.eval_frame._debug_get_cache_entry_list(c)) for c in codes)
    if not cached:
        return
    for code in codes:
        torch._dynamo.reset_code(code)
    why = ("another compiled module of its class ran a graph compiled without its hooks, so the run was repeated"
           if shared else "the model was compiled before its hooks were set")
    warnings.warn(f"Tracer: {why}; its compiled code was dropped so that they take effect (dynamo does not guard on "
                  "hooks, pytorch issue 117758): one recompile", UserWarning, stacklevel=4)
