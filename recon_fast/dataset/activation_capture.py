"""Forward hooks that copy every token's output vector of the named modules into host buffers,
batch after batch, for the activation cache (recon_fast.dataset.activation_cache).

A hooked module's output is its tensor, or the first element of a tuple (as SAELens's
HookedProxyLM takes it), and must be [batch, context_size, d_in]. The value stored is that output
rounded to the cache's dtype (float32; float16; bfloat16, held in float32).

CPU: the hook copies (and rounds) the output straight into the host buffer.
CUDA (outputs on the model's input device; a module dispatched elsewhere is copied as on the
CPU): the hook copies (and rounds) the output into a device staging buffer on the compute stream
(ordered before any later in-place edit of the output), records an event, and a side stream
waits for that event and copies the staging buffer into pinned host memory, non-blocking: the
copy to the host overlaps the rest of this forward and the next batch's. Two staging slots
alternate between batches; the compute stream waits (on the device) for a slot's copies before
reusing it. The host waits once per shard, for the last batch's copies, before writing it: never
a sync per hook or per batch. The two paths share everything but that copy.

probe() runs a few tokens through the whole forward first: it learns each module's d_in and checks
that each runs exactly once; every batch after it stops the forward (an exception from the hook,
as SAELens's StopManager does) once the last of them has run, so the layers after it are not
computed."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from recon_fast.trace import presets

# The hook names a user may give beside module names: the Tracer's presets that name one module
# per block ("all" would hook every module).
HOOK_PRESETS = ("residual", "attn", "mlp", "components", "blocks+components")
_ROUNDING = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROBE_TOKENS = 8


def hook_names(model: nn.Module, hooks: str | Iterable[str]) -> list[str]:
    """The modules to hook: `hooks` is "NAME[,NAME...]" or a list, each a module name of `model`
    or a preset (residual, attn, mlp, components, blocks+components); in order, each once.
    ValueError naming the closest module names for an unknown one."""
    items = [h.strip() for h in (hooks.split(",") if isinstance(hooks, str) else hooks)]
    if not items or any(not h for h in items):
        raise ValueError(f"hooks {hooks!r}: give module names or presets ({', '.join(HOOK_PRESETS)}), "
                         "separated by commas")
    names: list[str] = []
    for item in items:
        if item in HOOK_PRESETS:
            found = presets.select_preset(model, item)
        elif item in presets.PRESETS:
            raise ValueError(f"hooks: preset {item!r} is not for an activation cache; use one of "
                             f"{', '.join(HOOK_PRESETS)}")
        else:
            try:
                presets.resolve_module(model, item)
            except KeyError as exc:
                raise ValueError(f"hooks: {exc.args[0]}; or a preset: {', '.join(HOOK_PRESETS)}") from None
            found = [item]
        names.extend(n for n in found if n not in names)
    return names


def output_tensor(output) -> torch.Tensor | None:
    """The module output a cache stores: the tensor, or a tuple's first element (HookedProxyLM's rule)."""
    if torch.is_tensor(output):
        return output
    if isinstance(output, tuple) and output and torch.is_tensor(output[0]):
        return output[0]
    return None


class _StopForward(Exception):
    """Raised by the last hook once every hooked module has fired: the rest is not needed."""


class ActivationCapture:
    """The hooks (a context manager: removed on exit, whatever happens) and the copies.

    probe() once, then run(ids, destination) for each batch: destination(name, d_in) gives the host tensor
    [batch, context_size, d_in] (of the cache's host dtype) that module `name`'s output goes to.
    On CUDA the copies may still be in flight when run returns; copies_done() is an event (None
    on the CPU) that completes once every copy enqueued so far has landed."""

    def __init__(self, model: nn.Module, names: list[str], dtype: str, device: torch.device,
                 forward_kwargs: dict | None = None):
        self.model = model
        self.names = list(names)
        self.rounding = _ROUNDING[dtype]
        self.device = device
        self.forward_kwargs = dict(forward_kwargs or {})
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self._staging: list[dict[str, torch.Tensor]] = [{}, {}]  # per slot: name -> [batch, T, d] on the device
        self._slot_free: list[torch.cuda.Event | None] = [None, None]  # the slot's copies done (CUDA)
        self._slot = 0
        self._handles: list = []
        self._batch: tuple[int, int] | None = None  # (windows, context_size) of the running batch
        self._destination: Callable[[str, int], torch.Tensor] | None = None
        self._fired: dict[str, int] = {}
        self._order: list[str] = []  # firing order in the running forward
        self._stop = False  # stop the forward once self._last has fired
        self._last: str | None = None  # the hooked module that runs last (from probe())

    def __enter__(self) -> "ActivationCapture":
        modules = dict(self.model.named_modules())
        try:
            for name in self.names:
                self._handles.append(modules[name].register_forward_hook(self._hook(name)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def probe(self, token_id: int, length: int = PROBE_TOKENS) -> dict[str, int]:
        """A short sequence of `token_id` through the whole forward: each hooked module's d_in,
        checking that it runs exactly once per forward and outputs [batch, tokens, d_in]; and
        which of them runs last, where later forwards stop. (Short: a whole window of a small
        model's forward was 3% of a 4096-token run.)"""
        found: dict[str, int] = {}

        def keep(name: str, d_in: int) -> torch.Tensor:
            found[name] = d_in
            return torch.empty((1, length, d_in), dtype=torch.float32)

        ids = torch.full((1, length), token_id, dtype=torch.long, device=self.device)
        self._forward(ids, keep, stop=False)
        wrong = {n: c for n, c in self._fired.items() if c != 1}
        if wrong:
            raise ValueError("an activation cache needs each hooked module to run exactly once per forward; "
                             + ", ".join(f"{n} ran {c} times" for n, c in wrong.items()))
        self._last = self._order[-1]
        return {name: found[name] for name in self.names}

    def inputs(self, windows) -> torch.Tensor:
        """[windows, context_size] int64 ids (numpy) on the model's input device. On CUDA through
        pinned memory, non-blocking: a copy from pageable memory would wait for the stream (the
        previous batch's forward) before it starts."""
        ids = torch.from_numpy(windows)
        return ids.pin_memory().to(self.device, non_blocking=True) if self.cuda else ids.to(self.device)

    def run(self, ids: torch.Tensor, destination: Callable[[str, int], torch.Tensor]) -> None:
        """ids: [windows, context_size] on the model's input device (inputs()). probe() first."""
        if self.cuda and self._slot_free[self._slot] is not None:
            # This slot's staging buffers were read by copies two batches ago: the compute stream
            # waits for them on the device, the host does not.
            torch.cuda.current_stream(self.device).wait_event(self._slot_free[self._slot])
        self._forward(ids, destination, stop=True)
        if self.cuda:
            free = torch.cuda.Event()
            free.record(self.copy_stream)
            self._slot_free[self._slot] = free
            self._slot ^= 1

    def _forward(self, ids: torch.Tensor, destination, stop: bool) -> None:
        self._batch, self._destination, self._stop = tuple(ids.shape), destination, stop
        self._fired, self._order = dict.fromkeys(self.names, 0), []
        try:
            with torch.no_grad():
                self.model(input_ids=ids, **self.forward_kwargs)
        except _StopForward:
            pass
        finally:
            self._destination = None

    def copies_done(self) -> "torch.cuda.Event | None":
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(self.copy_stream)
        return event

    def _hook(self, name: str):
        def hook(module, args, output):
            self._fired[name] += 1
            if self._fired[name] > 1:
                if not self._stop:
                    return None  # counted: probe() names it
                raise RuntimeError(f"{name} ran more than once in a forward")
            self._order.append(name)
            out = output_tensor(output)
            if out is None or out.dim() != 3 or tuple(out.shape[:2]) != self._batch:
                what = type(output).__name__ if out is None else f"shape {tuple(out.shape)}"
                raise ValueError(f"hook {name}: its output ({what}) is not [windows, context_size, d_in] = "
                                 f"[{self._batch[0]}, {self._batch[1]}, d_in]; hook a module that outputs the "
                                 "token vectors (a block, its attention or MLP)")
            host = self._destination(name, out.shape[-1])
            if self.cuda and self._stop and out.device == self.device:
                self._copy_to_host(name, out, host)
            else:
                host.copy_(self._rounded(out))
            if self._stop and name == self._last:
                raise _StopForward
            return None
        return hook

    def _rounded(self, out: torch.Tensor) -> torch.Tensor:
        """The output rounded to the cache's dtype (the copy into a wider buffer is then exact)."""
        return out if out.dtype == self.rounding else out.to(self.rounding)

    def _copy_to_host(self, name: str, out: torch.Tensor, host: torch.Tensor) -> None:
        stage = self._staging[self._slot].get(name)
        if stage is None or stage.shape[0] < out.shape[0] or stage.shape[1:] != host.shape[1:]:
            stage = torch.empty((out.shape[0], *host.shape[1:]), dtype=host.dtype, device=out.device)
            stage.record_stream(self.copy_stream)  # freed (outgrown) only after the side stream's reads
            self._staging[self._slot][name] = stage
        stage = stage[: out.shape[0]]
        stage.copy_(self._rounded(out))  # on the compute stream, where the output was made
        ready = torch.cuda.Event()
        ready.record()
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(ready)
            host.copy_(stage, non_blocking=True)
