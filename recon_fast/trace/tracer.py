"""Tracer: forward hooks that reduce every hooked module's output to per-token statistics with
token_stats, on the device, during one forward pass (or a whole generate()), and assemble an
ActivityCube afterwards. This module is the Tracer's public API (hook selection, run, generate,
cube, export) and its session: one run from its capture kinds' captures to the cube. The other
jobs are elsewhere: the session's records and the capture protocol (session.py); what a hook call
becomes (stats_capture.py: the eager recorder, and token statistics as a capture kind;
compiled_capture.py: a compiled model's run); the run's layout, from its records (layout.py);
and one module per capture kind, each owning its device buffer and its part of the cube:
stats_capture (token statistics, written into stats_arena, grouped per decoder layer),
raw_capture (raw slices), attention_stats_capture (attention="stats") and attention_capture
("full"). CAPTURE_KINDS lists them; a new kind is a module with a factory (session.CaptureKind),
added there or to one Tracer's capture_kinds.

During the forward pass a hook does no .item(), .cpu(), .tolist() or stream sync: it takes a
slice of a device buffer (StatsArena) and enqueues token_stats into it. Results reach the host
once, after the pass, or layer by layer while streaming to disk. Nothing is dropped quietly:
outputs that cannot be traced are listed in meta["skipped"] and warned about once per run, and
non-finite activations are named (first layer and token) from the statistics already computed.

The token axis: with token ids as input, dim 1 of every activation ([B, T, ...]; per-head
[B, T, H, d] outputs are reduced over H * d and say so with "feature_shape"); with any other
input (images, feature sequences), the activation's second-to-last dim, a [B, D] output being
one position, and the cube's tokens are positions.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import warnings
import weakref
from collections.abc import Callable, Iterable
from datetime import datetime

import numpy as np
import torch
from torch import nn

from recon_fast._version import __version__
from recon_fast.atomic_files import check_writable
from recon_fast.cube import export
from recon_fast.cube.cube import ActivityCube
from recon_fast.cube.provenance import ModelProvenance
from recon_fast.kernels import token_stats as token_stats_op
from recon_fast.kernels.token_stats import STATS
from recon_fast.trace import attention_capture, compiled_capture, module_hooks, presets
from recon_fast.trace.attention_capture import full_attention_kind
from recon_fast.trace.attention_stats_capture import attention_stats_kind, check_model
from recon_fast.trace.layout import LayerCache, run_layout
from recon_fast.trace.model_inputs import ModelCall, prepare_call
from recon_fast.trace.module_hooks import ModuleHook
from recon_fast.trace.raw_capture import RawSlices, raw_slices_kind
from recon_fast.trace.session import Capture, CaptureKind, Layout, Session, axis_hooks
from recon_fast.trace.stats_arena import GROUP_BYTES, InPlaceEdit, StatsArena
from recon_fast.trace.stats_capture import layer_ends, session_recorder, token_stats_kind

# The capture kinds of every run (session.CaptureKind), in the order of their parts in the cube.
CAPTURE_KINDS: tuple[CaptureKind, ...] = (token_stats_kind, full_attention_kind, attention_stats_kind,
                                          raw_slices_kind)


_DEVICE_META: dict[tuple[torch.device, bool], dict[str, str]] = {}


def _device_meta(device: torch.device) -> dict[str, str]:
    """meta's "device" and "backend" (which token_stats serves it), worked out once per device and
    registration state (fixed once the library is loaded, but tests change it) instead of at every run."""
    key = (device, token_stats_op.compiled_serves(device.type))
    found = _DEVICE_META.get(key)
    if found is None:
        found = _DEVICE_META[key] = {"device": str(device), "backend": token_stats_op.backend(device)}
    return found


def _remove_handles(handles: dict) -> None:
    for handle in handles.values():
        handle.remove()
    handles.clear()


class Tracer:
    """Per-token activation statistics of any nn.Module (Hugging Face models as they are).

    with Tracer(model, tokenizer) as tracer:  # hooks come off at the end (or when it is collected)
        tracer.add_preset("residual")         # or add_hook(name), add_hooks_all(), add_hooks("regex")
        tracer.run("some text")               # or token ids, a BatchEncoding, or any forward's tensors
    tracer.cube.metric("energy")              # [layers, batch, tokens]

    metrics:   which of STATS (token_stats' statistics) the cube keeps (all by default).
    attention: None; "stats": per attention layer, head and query the statistics of
               ATTENTION_STATS (recon_fast.kernels.attention_stats: entropy, max weight,
               argmax, ...) under the model's own attention implementation, at any length
               (cube.attention_stat(name)); or "full": every attention probability, which needs
               eager attention and [B, H, T, T] per layer.
               With "stats", no hooks are needed (a cube of attention only).
    raw:       RawSlices to keep raw activation slices, written to a sidecar file on export.
    stream_to: a path (.json, .json.gz or .npz); the cube is streamed there layer by layer instead
               of being kept in memory (tracer.streamed_to says where the last run went).
    grouped:   True: a hook queues its output and one launch computes a decoder layer's outputs
               (or group_bytes of them; the cap on what grouping adds to peak memory), which
               takes the per-hook launch off a host-bound forward on a GPU. An output changed in
               place before its group's launch stops the run with its name, and that module is
               computed at its hook from then on. False: every output at its hook. None (the
               default): grouped when the run's inputs go to a CUDA device, else at the hook (on
               the CPU a call costs no launch, and an output computed at its hook is still in
               cache: SmolLM2 at T=512, 1.007-1.021x its forward at the hook against 1.019-1.044x
               grouped, benchmarks/RESULTS.md).
    A compiled model (model.compile() or torch.compile(model)) is traced in its graph: the same
    cube, no graph break, no recompilation from the second run on.

    capture_kinds: the capture kinds each run builds its captures with (session.CaptureKind), in
    the order of their parts in the cube; CAPTURE_KINDS unless a Tracer is given its own, e.g.
    tracer.capture_kinds += (my_kind,) for a kind of one's own module.
    """

    capture_kinds: tuple[CaptureKind, ...] = CAPTURE_KINDS

    def __init__(self, model: nn.Module, tokenizer=None, *, metrics: Iterable[str] = STATS,
                 layers: str | Iterable[str] | None = None, attention: str | None = None,
                 raw: RawSlices | None = None, stream_to: str | None = None, grouped: bool | None = None,
                 group_bytes: int = GROUP_BYTES):
        # torch.compile(model) wraps it: hooks go on the modules (the names of the eager model),
        # the run calls the wrapper.
        self._compiled = model if compiled_capture.compiled_wrapper(model) else None
        model = model._orig_mod if self._compiled is not None else model
        self.model = model
        self.tokenizer = tokenizer
        self.metrics = tuple(metrics)
        unknown = [m for m in self.metrics if m not in STATS]
        if unknown or not self.metrics:
            raise ValueError(f"unknown or no metrics {unknown or self.metrics}; choose from {list(STATS)}")
        attention_capture.check_mode(attention)
        if attention == "stats":
            check_model(model)
        if raw is not None:
            presets.compile_pattern(raw.layers)
        if stream_to is not None:
            check_writable(stream_to)
            export.cube_format(stream_to)
        self.attention = attention
        self.raw = raw
        self.stream_to = stream_to
        self.streamed_to: str | None = None  # where the last run's cube was written (stream_to)
        self.grouped = grouped
        self.group_bytes = group_bytes
        self._eager: set[str] = set()  # modules whose outputs were edited in place after their hook
        self._sink = compiled_capture.HookSink()  # what the hooks record into, for the Tracer's life
        self._on_hook: Callable[[str], None] | None = None  # on_hook
        self.hooks: dict[str, ModuleHook] = {}  # each a forward hook or parked as a wrapper (module_hooks)
        self._parked: module_hooks.ParkedHooks | None = None  # worked out again when the hooks change
        self._prepended: list = []  # where parked modules' hook dicts report hooks prepended before ours
        # The hooks hold the Tracer weakly, so a Tracer nobody holds is collected and its hooks
        # come off the model with it.
        self._finalizer = weakref.finalize(self, _remove_handles, self.hooks)
        self._detached: list[str] = []  # hooks taken off by a failed run, put back by the next
        self._group_ends: frozenset[str] | None = None
        self._layers = LayerCache()  # the last run's cube layers, for a run with the same calls
        self._provenance = ModelProvenance(model)  # worked out again when the config changes
        self._session: Session | None = None
        self._cube: ActivityCube | None = None
        self.skipped: list[dict] = []
        if layers is not None:
            self.add_hooks(layers)

    def __repr__(self) -> str:
        names = list(self.hooks)[:3]
        more = f", ... +{len(self.hooks) - 3}" if len(self.hooks) > 3 else ""
        return f"Tracer({type(self.model).__name__}, hooks={len(self.hooks)} [{', '.join(names)}{more}])"

    @property
    def on_hook(self) -> Callable[[str], None] | None:
        """Called with the module name after each hook call (e.g. a progress bar); keep it cheap."""
        return self._on_hook

    @on_hook.setter
    def on_hook(self, callback: Callable[[str], None] | None) -> None:
        self._on_hook = callback
        session = self._session
        if session is not None and session.log is not None:  # a run in progress: its C++ recorder's too
            session.log.on_hook = callback

    # ---- hook selection ---------------------------------------------------------------------
    def add_hook(self, name: str) -> None:
        """Hooks the module called `name` (KeyError with the closest names if there is none)."""
        if name in self.hooks:
            return
        module = presets.resolve_module(self.model, name)
        # A compiled model's graph calls the hooks (dynamo cannot trace into the wrapper), and
        # nn.DataParallel's replicas copy a module's __dict__ (the wrapper would run the original).
        parkable = not self._is_compiled() and not isinstance(self.model, nn.DataParallel)
        sink = self._sink.forwards if parkable else None
        self.hooks[name] = ModuleHook(module, name, self._make_hook(name), sink, self._prepended)
        self._group_ends = self._parked = None  # worked out again at the next run

    def add_hooks_by_type(self, module_type: type) -> None:
        for name, module in self.model.named_modules():
            if name and isinstance(module, module_type):
                self.add_hook(name)

    def add_hooks_all(self, filter_fn: Callable[[str, nn.Module], bool] | None = None) -> None:
        """Every non-root module with trainable parameters, or those passing filter_fn(name, module)."""
        for name in presets.select_all(self.model, filter_fn):
            self.add_hook(name)

    def add_preset(self, preset: str) -> None:
        """A named preset from recon_fast.trace.presets.PRESETS (e.g. "residual", "components")."""
        for name in presets.select_preset(self.model, preset):
            self.add_hook(name)

    def add_hooks(self, spec: str | Iterable[str]) -> None:
        """A preset name or a regex over module names, or a list of exact names."""
        names = presets.select(self.model, spec) if isinstance(spec, str) else list(spec)
        for name in names:
            self.add_hook(name)

    def clear_hooks(self) -> None:
        _remove_handles(self.hooks)
        self._detached.clear()
        self._parked = None

    def __enter__(self) -> "Tracer":
        return self

    def __exit__(self, *exc) -> None:
        self.clear_hooks()

    # ---- the hook ---------------------------------------------------------------------------
    def _make_hook(self, name: str):
        sink = self._sink
        is_compiling = torch.compiler.is_compiling

        def hook(module, inputs, output):
            if is_compiling():  # dynamo traces this branch once, into the graph
                sink.record_compiled(name, output)
                return
            record = sink.record
            if record is not None:  # hooks stay silent outside run()/generate()
                record(name, output)

        return hook

    @property
    def _hook_path(self) -> Callable[[str, object], None] | None:
        """The recorder of the run in progress (None outside a run)."""
        return self._sink.record

    def _recorder(self, session: Session, device: torch.device) -> Callable[[str, object], None]:
        """record(name, output) for the hooks of one session (stats_capture.session_recorder),
        keeping the slices of the session's capture that keeps them; `device`: where the run's
        inputs go (grouped=None groups on CUDA)."""
        slicing = [c for c in session.captures if c.slices_calls]
        if len(slicing) > 1:  # Call.raw holds one slice per call
            raise ValueError(f"one capture per run may keep slices of hook calls; got {len(slicing)}")
        if self._group_ends is None:
            self._group_ends = layer_ends(self.model, self.hooks)
        grouped = self.grouped if self.grouped is not None else device.type == "cuda"
        return session_recorder(session, grouped=grouped, group_ends=self._group_ends, eager=self._eager,
                                slice_of=slicing[0].slice_of if slicing else None, on_hook=lambda: self.on_hook)

    # ---- running ----------------------------------------------------------------------------
    def run(self, *inputs, **model_kwargs):
        """Runs the model once without autograd and builds the cube; returns the model's output.

        inputs: token ids ([T] or [B, T]), a dict/BatchEncoding of model inputs, text (a string
        or list of strings) when a tokenizer is set, or whatever tensors the model's forward
        takes, positionally or by keyword (images, feature sequences, pixel_values=...). An
        attention_mask marks padding; an encoder-decoder's decoder_input_ids get their own axis.
        """
        with self._detached_on_failure():
            call = self._prepare(inputs, model_kwargs)
            model = self._compiled if self._compiled is not None else self.model
            output, session, seconds = self._traced(lambda: call(model), call, mode="forward")
            self._finish(session, call, seconds, "forward", output=output)
        return output

    def generate(self, *inputs, **generate_kwargs):
        """Traces model.generate(): the prompt pass and every generated token, so the token axis
        covers every position that went through the model. Returns generate()'s output."""
        with self._detached_on_failure():
            call = self._prepare(inputs, generate_kwargs)
            if call.ids is None:
                raise ValueError("generate() needs token ids (or text with a tokenizer)")
            if self._is_compiled():
                raise ValueError("generate() of a compiled model is not traced (each step's shape recompiles it): "
                                 "trace the model before model.compile(), or use run()")
            output, session, seconds = self._traced(lambda: self.model.generate(*call.args, **call.kwargs), call,
                                                    mode="generate")
            sequences = output if torch.is_tensor(output) else output.sequences
            self._finish(session, call, seconds, "generate", sequences=sequences)
        return output

    @contextlib.contextmanager
    def _detached_on_failure(self):
        """Whatever fails in a run (bad input, the model's forward, building the cube) leaves the
        model without our hooks; the next run puts them back."""
        try:
            yield
        except BaseException as exc:
            if isinstance(exc, InPlaceEdit):
                self._eager.update(exc.modules)
            self._detached = list(dict.fromkeys([*self._detached, *self.hooks]))
            _remove_handles(self.hooks)
            self._parked = None
            raise

    @property
    def cube(self) -> ActivityCube:
        if self._cube is None:
            if self.streamed_to is not None:
                raise RuntimeError(f"no cube in memory: the run was streamed to {self.streamed_to} "
                                   "(tracer.streamed_to); ActivityCube.load(tracer.streamed_to) reads it")
            where = f"; it will be streamed to {self.stream_to}" if self.stream_to else ""
            raise RuntimeError(f"no cube in memory: call run() or generate() first{where}")
        return self._cube

    def export_json(self, path: str) -> int:
        return self.cube.export_json(path)

    # ---- internals --------------------------------------------------------------------------
    def _prepare(self, inputs: tuple, kwargs: dict) -> ModelCall:
        return prepare_call(self.model, self.tokenizer, inputs, kwargs)

    def _is_compiled(self) -> bool:
        return self._compiled is not None or compiled_capture.is_compiled(self.model)

    def _is_encoder_decoder(self) -> bool:
        return bool(getattr(getattr(self.model, "config", None), "is_encoder_decoder", False))

    # ---- the session: one run, from its captures to the cube ---------------------------------------
    def _traced(self, forward, call: ModelCall, mode: str):
        """Runs forward() with every capture of the run recording; returns the output, the
        session and the seconds the pass took."""
        session = Session(StatsArena(group_bytes=self.group_bytes), token_ids=call.ids is not None)
        session.captures = [c for kind in self.capture_kinds if (c := kind(self, session)) is not None]
        for capture in session.captures:
            capture.prepare(call, mode)
        if self._detached:  # a failed run took them off the model; put them back
            names, self._detached = self._detached, []
            for name in names:
                self.add_hook(name)
        if not self.hooks and not any(c.hookless for c in session.captures):
            raise RuntimeError("no hooks: add some with add_hook, add_preset, add_hooks_all or add_hooks")
        if self._parked is None:
            self._parked = module_hooks.ParkedHooks(self.hooks.values())
        if self._is_compiled():
            if self._parked.hooks:  # a compiled graph calls forward hooks: none stays parked
                self._parked.unpark_all()
                self._parked = module_hooks.ParkedHooks(())
            return self._traced_compiled(forward, call, session)
        if self._parked.check_before_run(self._prepended):
            self._parked = None  # some went back to forward hooks
        record = self._recorder(session, call.device)
        helpers = axis_hooks(self.model, session, mode, self._is_encoder_decoder())
        self._session = session
        self._sink.arm(record, session.log)
        start = time.perf_counter()
        try:
            with torch.no_grad(), contextlib.ExitStack() as recording:
                for capture in session.captures:
                    recording.enter_context(capture.recording())
                output = forward()
                session.arena.launch()  # the last group, before the run's time is taken
        finally:
            self._session = None
            self._sink.disarm()
            if session.log is not None:
                session.log.close()  # lets go of the session, the arena and the callbacks
            for handle in helpers:
                handle.remove()
        return output, session, time.perf_counter() - start

    def _traced_compiled(self, forward, call: ModelCall, session: Session):
        """A compiled model's run: the hooks are in its graph and write into the sink's buffer."""
        if self._is_encoder_decoder() or not all(c.compiles for c in session.captures):
            raise ValueError("a compiled model is traced with token statistics of a decoder-only or encoder model; "
                             "attention=, raw= and encoder-decoders need the model before model.compile()")
        tokens = call.ids.shape[1] if call.ids is not None else 1
        start = time.perf_counter()
        output = self._sink.run(self.model, forward, session, frozenset(self.hooks), call.batch, tokens, call.device)
        return output, session, time.perf_counter() - start

    def _finish(self, session: Session, call: ModelCall, seconds: float, mode: str, output=None,
                sequences=None) -> None:
        """The cube of the run: its layout, then each capture's part, in memory or streamed to stream_to."""
        layout = run_layout(session, call, mode, tokenizer=self.tokenizer, encoder_decoder=self._is_encoder_decoder(),
                            sequences=sequences, output=output, cache=self._layers)
        batch = call.batch
        meta = {
            "model_name": type(self.model).__name__,
            "timestamp": datetime.now().isoformat(),
            "input_shape": [batch, layout.token_length],
            "mode": mode,
            "dtype": str(call.dtype).removeprefix("torch.") if call.dtype is not None else None,
            **_device_meta(call.device),
            "seconds": round(seconds, 6),
            "hooks": len(self.hooks),
            "recon_fast_version": __version__,
        }
        if layout.decoder_tokens is not None:
            meta["decoder_input_shape"] = [batch, layout.lengths["decoder_tokens"]]
        self.skipped = layout.skipped
        if self.skipped:
            meta["skipped"] = self.skipped
        captures = session.captures
        shell = dict(tokens=layout.tokens, metrics=self.metrics, padding_mask=layout.padding, meta=meta,
                     provenance=self._provenance(), decoder_tokens=layout.decoder_tokens)
        self._cube = self.streamed_to = None
        # The binary form needs the whole array anyway: it is built as in memory, then written.
        streamed = self.stream_to is not None and export.cube_format(self.stream_to) == "json"
        for capture in captures:
            if not (streamed and capture.streams):
                part = capture.cube_part(layout)
                meta.update(part.pop("meta", {}))
                shell.update(part)
        if streamed:
            self._stream(layout, captures, shell)
        else:
            cube = ActivityCube(**{"layer_names": [], "data": np.zeros((0, batch, layout.length, len(self.metrics)),
                                                                       np.float32), **shell})
            if self.stream_to is not None:
                cube.export_npz(self.stream_to)
            else:
                self._cube = cube
        if self.stream_to is not None:
            self.streamed_to = str(self.stream_to)
        self._warn([message for capture in captures for message in capture.warnings(layout)])

    def _stream(self, layout: Layout, captures: list[Capture], shell: dict) -> None:
        """Writes the cube to stream_to (JSON), each capture's objects in turn, one at a time off
        the device; `shell` holds the parts kept in memory (raw slices, attention entries)."""
        path = str(self.stream_to)
        cube = ActivityCube(layer_names=[], data=np.zeros((0, layout.batch, layout.length, len(self.metrics)),
                                                          np.float32), **shell)
        cube.write_raw_sidecar(path)
        objects = itertools.chain.from_iterable(c.stream_part(layout, cube, path) for c in captures)
        export.write_json(path, meta=cube.meta_for_export(), tokens=cube.tokens, layers=objects,
                          provenance=cube.provenance, decoder_tokens=cube.decoder_tokens)

    def _warn(self, messages: list[str]) -> None:
        """One warning per run for what was left out, one for each capture's (non-finite values)."""
        if self.skipped:
            names = list(dict.fromkeys(s["layer_name"] for s in self.skipped))
            shown = ", ".join(names[:3]) + (f", ... +{len(names) - 3}" if len(names) > 3 else "")
            plural = "s" if len(names) != 1 else ""
            warnings.warn(f"{len(names)} module output{plural} not traced ({shown}): "
                          f"meta['skipped'] says why", UserWarning, stacklevel=4)
        for message in messages:
            warnings.warn(message, UserWarning, stacklevel=4)
