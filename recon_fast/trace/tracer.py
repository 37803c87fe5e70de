"""Tracer: forward hooks that reduce every hooked module's output to per-token statistics with
token_stats, on the device, during one forward pass (or a whole generate()), and assemble an
ActivityCube afterwards. This module keeps hook registration, the session and running; each capture
kind owns its device buffer and its part of the cube in a module of its own (the protocol:
session.Capture): stats_capture (token statistics, written into stats_arena, grouped per decoder
layer), raw_capture (raw slices), attention_stats_capture (attention statistics,
attention="stats") and attention_capture (eager probabilities, "full"); compiled_capture is the
path of a compiled model.

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
from recon_fast.cube.provenance import model_provenance
from recon_fast.kernels import ops
from recon_fast.kernels.ops import STATS
from recon_fast.trace import attention_capture, compiled_capture, presets, raw_capture
from recon_fast.trace.attention_stats_capture import AttentionStatsCapture, check_model
from recon_fast.trace.model_inputs import ModelCall, model_device, model_dtype, prepare_call, token_texts
from recon_fast.trace.model_state import ModelState
from recon_fast.trace.raw_capture import RawSlices
from recon_fast.trace.session import Call, Layer, Layout, Session, extract_tensor
from recon_fast.trace.stats_arena import GROUP_BYTES, InPlaceEdit, StatsArena
from recon_fast.trace.stats_capture import TokenStatsCapture, fast_recorder, rows_of, untraceable

_Session = Session  # the name tests and older callers know the session by


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

    metrics:   which of STATS the cube keeps (all five by default).
    attention: None; "stats": per attention layer, head and query the 8 statistics of
               recon_fast.kernels.attention_stats (entropy, max weight, argmax, sink mass, mean
               distance, self and previous-token weight, lse) under the model's own attention
               implementation, at any length (cube.attention_stat(name)); or "full": every
               attention probability, which needs eager attention and [B, H, T, T] per layer.
               With "stats", no hooks are needed (a cube of attention only).
    raw:       RawSlices to keep raw activation slices, written to a sidecar file on export.
    stream_to: a path (.json, .json.gz or .npz); the cube is streamed there layer by layer instead
               of being kept in memory (tracer.streamed_to says where the last run went).
    grouped:   True (the default): a hook queues its output and one launch computes a decoder
               layer's outputs (or group_bytes of them; the cap on what grouping adds to peak
               memory), which takes the per-hook launch off a host-bound forward. An output
               changed in place before its group's launch stops the run with its name, and that
               module is computed at its hook from then on. False: every output at its hook.
    A compiled model (model.compile() or torch.compile(model)) is traced in its graph: the same
    cube, no graph break, no recompilation from the second run on.
    """

    def __init__(self, model: nn.Module, tokenizer=None, *, metrics: Iterable[str] = STATS,
                 layers: str | Iterable[str] | None = None, attention: str | None = None,
                 raw: RawSlices | None = None, stream_to: str | None = None, grouped: bool = True,
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
        self._compiled_hooks: frozenset[str] | None = None  # the hooks of the last compiled run
        # Called with the module name after each hook call (e.g. a progress bar); keep it cheap.
        self.on_hook: Callable[[str], None] | None = None
        self.hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        # The hooks hold the Tracer weakly, so a Tracer nobody holds is collected and its hooks
        # come off the model with it.
        self._finalizer = weakref.finalize(self, _remove_handles, self.hooks)
        self._detached: list[str] = []  # hooks taken off by a failed run, put back by the next
        self._group_ends: frozenset[str] | None = None
        self._session: Session | None = None
        self._cube: ActivityCube | None = None
        self.skipped: list[dict] = []
        if layers is not None:
            self.add_hooks(layers)

    def __repr__(self) -> str:
        names = list(self.hooks)[:3]
        more = f", ... +{len(self.hooks) - 3}" if len(self.hooks) > 3 else ""
        return f"Tracer({type(self.model).__name__}, hooks={len(self.hooks)} [{', '.join(names)}{more}])"

    # ---- hook selection ---------------------------------------------------------------------
    def add_hook(self, name: str) -> None:
        """Hooks the module called `name` (KeyError with the closest names if there is none)."""
        if name in self.hooks:
            return
        module = presets.resolve_module(self.model, name)
        self.hooks[name] = module.register_forward_hook(self._make_hook(name))
        self._group_ends = None  # worked out again at the next run

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

    def _recorder(self, session: Session) -> Callable[[str, object], None]:
        """record(name, output) for the hooks of one session (stats_capture.fast_recorder); with raw
        slices every call takes the general path, which keeps them."""
        general = self._record
        if self.raw is not None:
            return lambda name, output: general(session, name, output)
        return fast_recorder(session, general, grouped=self.grouped, group_ends=self._layer_ends(),
                             eager=self._eager, on_hook=lambda: self.on_hook)

    def _layer_ends(self) -> frozenset[str]:
        """Hooked modules that close a group: the blocks of a ModuleList (decoder layers), whose
        hook fires after those of the modules inside them."""
        if self._group_ends is None:
            in_lists = {f"{name}.{child}" if name else child for name, module in self.model.named_modules()
                        if isinstance(module, nn.ModuleList) for child, _ in module.named_children()}
            self._group_ends = frozenset(n for n in self.hooks if n in in_lists)
        return self._group_ends

    def _record(self, session: Session, name: str, output) -> None:
        """The general path: any output, traced or listed in session.skipped with the reason."""
        tensor = extract_tensor(output)
        reason = untraceable(tensor, output)
        if reason is not None:
            session.skipped.append({"layer_name": name, "reason": reason})
            return
        # Runs are under no_grad; a tensor that still needs grad (a hook outside run()) is detached.
        x, feature_shape = rows_of(tensor.detach() if tensor.requires_grad else tensor, session.token_ids)
        if self.grouped and name not in self._eager:
            slot = session.arena.defer(x, name)
            if name in self._layer_ends():
                session.arena.launch()
        else:
            slot = session.arena.write(x)
        raw = raw_capture.take(self.raw, name, x)
        step = len(session.steps) - 1
        session.calls.append(Call(name, tuple(x.shape[:-1]), slot, raw, session.axis, step, feature_shape))
        if self.on_hook is not None:
            self.on_hook(name)

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
            if self.attention == "full":
                attention_capture.check_returned(self.model)
                call.kwargs["output_attentions"] = True
            model = self._compiled if self._compiled is not None else self.model
            output, session, seconds = self._traced(lambda: call(model), call, mode="forward")
            self._finish(session, call, seconds, "forward", output=output)
        return output

    def generate(self, *inputs, **generate_kwargs):
        """Traces model.generate(): the prompt pass and every generated token, so the token axis
        covers every position that went through the model. Returns generate()'s output."""
        with self._detached_on_failure():
            if self.attention == "full":
                raise ValueError("attention='full' works with run(), not generate(); attention='stats' works with both")
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
    def _model_device(self) -> torch.device:
        return model_device(self.model)

    def _model_dtype(self) -> str | None:
        dtype = model_dtype(self.model)
        return str(dtype).removeprefix("torch.") if dtype is not None else None

    def _prepare(self, inputs: tuple, kwargs: dict) -> ModelCall:
        return prepare_call(self.model, self.tokenizer, inputs, kwargs)

    def _is_compiled(self) -> bool:
        return self._compiled is not None or compiled_capture.is_compiled(self.model)

    def _is_encoder_decoder(self) -> bool:
        return bool(getattr(getattr(self.model, "config", None), "is_encoder_decoder", False))

    def _traced(self, forward, call: ModelCall, mode: str):
        if self._detached:  # a failed run took them off the model; put them back
            names, self._detached = self._detached, []
            for name in names:
                self.add_hook(name)
        if not self.hooks and self.attention != "stats":
            raise RuntimeError("no hooks: add some with add_hook, add_preset, add_hooks_all or add_hooks")
        session = Session(StatsArena(group_bytes=self.group_bytes), token_ids=call.ids is not None)
        if self._is_compiled():
            return self._traced_compiled(forward, call, session)
        if self.attention == "stats":
            session.attention_stats = AttentionStatsCapture(self.model)
        state = ModelState(self.model) if self.attention is not None else None
        helpers = self._session_hooks(session, mode)
        self._session = session
        self._sink.record = self._recorder(session)
        start = time.perf_counter()
        try:
            installed = (session.attention_stats.installed() if session.attention_stats is not None
                         else contextlib.nullcontext())
            with torch.no_grad(), installed:
                output = forward()
                session.arena.launch()  # the last group, before the run's time is taken
        finally:
            self._session = self._sink.record = None
            for handle in helpers:
                handle.remove()
            if state is not None:
                state.restore()
        return output, session, time.perf_counter() - start

    def _traced_compiled(self, forward, call: ModelCall, session: Session):
        """A compiled model's run: the hooks are in its graph and write into the sink's buffer."""
        if self.attention is not None or self.raw is not None or self._is_encoder_decoder():
            raise ValueError("a compiled model is traced with token statistics of a decoder-only or encoder model; "
                             "attention=, raw= and encoder-decoders need the model before model.compile()")
        hooks = frozenset(self.hooks)
        if hooks != self._compiled_hooks:
            compiled_capture.refresh_compiled(self.model)
            self._compiled_hooks = hooks
        sink = self._sink
        # A first guess of the rows (each hook [batch, tokens] once, twice over); a run that
        # needs more gets a buffer of its size and runs again (a new buffer: one recompile).
        tokens = call.ids.shape[1] if call.ids is not None else 1
        rows = max(sink.buffer.shape[0] if sink.buffer is not None else 0, 2 * len(self.hooks) * call.batch * tokens)
        start = time.perf_counter()
        for _ in range(2):
            sink.start(self._model_device(), session.token_ids, rows)
            try:
                with torch.no_grad():
                    output = forward()
            finally:
                sink.active = False
            if not sink.overflowed():
                break
            rows = sink.fill
        sink.into(session)
        return output, session, time.perf_counter() - start

    def _session_hooks(self, session: Session, mode: str) -> list:
        """Hooks that live for one run: an encoder-decoder's decoder switches the token axis, and
        under generate() each model.forward call starts a pass of known length."""
        handles = []
        encoder_decoder = self._is_encoder_decoder()
        if encoder_decoder and hasattr(self.model, "get_decoder"):
            def decoder_starts(module, args):
                session.axis = "decoder_tokens"

            handles.append(self.model.get_decoder().register_forward_pre_hook(decoder_starts))
        if mode == "generate":
            key = "decoder_input_ids" if encoder_decoder else "input_ids"

            def step_starts(module, args, kwargs):
                fed = kwargs.get(key, args[0] if args and not encoder_decoder else None)
                if not torch.is_tensor(fed):
                    fed = kwargs.get("inputs_embeds" if not encoder_decoder else "decoder_inputs_embeds")
                session.steps.append(int(fed.shape[1]) if torch.is_tensor(fed) else 0)

            handles.append(self.model.register_forward_pre_hook(step_starts, with_kwargs=True))
        return handles

    def _axis_lengths(self, session: Session, call: ModelCall, mode: str, sequences) -> dict[str, int]:
        """Length of each token axis of the cube."""
        if call.ids is None:  # positions: the longest activation
            counts = [self._tokens_of(c.lead_shape, call.batch) or 0 for c in session.calls]
            return {"tokens": max(counts, default=0)}
        lengths = {"tokens": call.ids.shape[1]}
        stepped = "decoder_tokens" if self._is_encoder_decoder() else "tokens"
        if mode == "generate" and session.steps:
            # the positions fed through the model; the last generated token never is
            lengths[stepped] = min(sum(session.steps), sequences.shape[1])
        elif call.decoder_ids is not None:
            lengths["decoder_tokens"] = call.decoder_ids.shape[1]
        elif session.axis == "decoder_tokens" and any(c.axis == "decoder_tokens" for c in session.calls):
            # decoder ids made from labels (session.axis tells whether a decoder ran at all)
            lengths["decoder_tokens"] = max(self._tokens_of(c.lead_shape, call.batch) or 0
                                            for c in session.calls if c.axis == "decoder_tokens")
        return lengths

    def _layers(self, session: Session, batch: int, lengths: dict[str, int], mode: str,
                exact: bool) -> tuple[list[Layer], list[dict]]:
        """Groups hook calls into cube layers and places their rows on their token axis."""
        if mode == "forward":
            return self._forward_layers(session.calls, batch, lengths, exact)
        # generate: a module's calls, in order, extend its token axis
        by_key: dict[tuple[str, str], list[Call]] = {}
        for call in session.calls:
            by_key.setdefault((call.name, call.axis), []).append(call)
        ends = np.cumsum(session.steps).tolist()  # where each generate() pass ends
        layers, skipped = [], []
        for calls in by_key.values():
            name, axis = calls[0].name, calls[0].axis
            counts = [self._tokens_of(c.lead_shape, batch) for c in calls]
            length = lengths.get(axis, 0)
            starts, placed = [], 0
            for call, n in zip(calls, counts):
                if n is None:
                    break
                # A pass's rows end where the pass ends: lm_head under generate() sees only each
                # pass's last position (logits_to_keep=1).
                start = ends[call.step] - n if 0 <= call.step < len(ends) else placed
                starts.append(start)
                placed = start + n
            if None in counts or any(s < 0 for s in starts) or placed > length:
                shapes = sorted({c.lead_shape for c in calls})
                skipped.append(self._shape_skipped(name, shapes[0], batch, axis, length))
                continue
            layers.append(Layer(name, axis, calls, starts, counts))
        return layers, skipped

    def _forward_layers(self, calls: list[Call], batch: int, lengths: dict[str, int],
                        exact: bool) -> tuple[list[Layer], list[dict]]:
        """run(): each hook call is a layer, its rows from the start of its token axis. A loop of
        its own, as it runs once per hook call after every run."""
        layers, skipped = [], []
        tokens_of = self._tokens_of
        for call in calls:
            lead = call.lead_shape
            n = lead[1] if len(lead) == 2 and lead[0] == batch else tokens_of(lead, batch)  # the usual case first
            axis = call.axis
            if axis == "decoder_tokens" and n not in (None, lengths[axis]) and n == lengths["tokens"]:
                axis = "tokens"  # a decoder's cross-attention keys/values are on the encoder's axis
            length = lengths.get(axis, 0)
            if n is None or n > length or (exact and n != length):
                skipped.append(self._shape_skipped(call.name, call.lead_shape, batch, axis, length))
                continue
            layers.append(Layer(call.name, axis, [call], [0], [n]))
        return layers, skipped

    @staticmethod
    def _shape_skipped(name: str, lead: tuple[int, ...], batch: int, axis: str, length: int) -> dict:
        """meta["skipped"]'s entry for a layer whose activation does not lie on its token axis."""
        where = f"{axis}={length}" if length else axis
        return {"layer_name": name, "reason": f"activation leading shape {lead} is not [batch={batch}, {where}]"}

    @staticmethod
    def _tokens_of(lead: tuple[int, ...], batch: int) -> int | None:
        if len(lead) == 2 and lead[0] in (batch, 1):  # [1, T] broadcasts over the batch (e.g. wpe)
            return lead[1]
        if len(lead) == 1 and batch == 1:  # a [T, D] activation of a single sequence
            return lead[0]
        return None

    def _finish(self, session: Session, call: ModelCall, seconds: float, mode: str, output=None,
                sequences=None) -> None:
        batch = call.batch
        lengths = self._axis_lengths(session, call, mode, sequences)
        layers, shape_skipped = self._layers(session, batch, lengths, mode, exact=call.ids is not None)
        token_length = lengths["tokens"]
        attention_mask = call.kwargs.get("attention_mask")
        padding = self._padding(attention_mask, batch, token_length) if call.ids is not None else None
        device = self._model_device()
        meta = {
            "model_name": type(self.model).__name__,
            "timestamp": datetime.now().isoformat(),
            "input_shape": [batch, token_length],
            "mode": mode,
            "dtype": self._model_dtype(),
            "device": str(device),
            "backend": ops.backend(device),
            "seconds": round(seconds, 6),
            "hooks": len(self.hooks),
            "recon_fast_version": __version__,
        }
        tokens, decoder_tokens = self._token_texts(call, lengths, mode, sequences)
        if decoder_tokens is not None:
            meta["decoder_input_shape"] = [batch, lengths["decoder_tokens"]]
        self.skipped = self._dedupe(session.skipped + shape_skipped)
        if self.skipped:
            meta["skipped"] = self.skipped
        two_axes = decoder_tokens is not None
        extras = {i: self._layer_extra(layer, two_axes) for i, layer in enumerate(layers)
                  if two_axes or layer.calls[0].feature_shape is not None}  # the others have none
        layout = Layout(mode, batch, lengths, padding, layers, extras, output)
        captures = self._captures(session)
        shell = dict(tokens=tokens, metrics=self.metrics, padding_mask=padding, meta=meta,
                     provenance=model_provenance(self.model), decoder_tokens=decoder_tokens)
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

    def _captures(self, session: Session) -> list:
        """The run's captures (session.Capture), in the order of their parts in the cube."""
        captures = [TokenStatsCapture(session.arena, self.metrics)]
        if self.attention == "full":
            captures.append(attention_capture.FullAttentionCapture(self.model))
        if session.attention_stats is not None:
            captures.append(session.attention_stats)
        if self.raw is not None:
            captures.append(raw_capture.RawCapture(self.raw))
        return captures

    def _stream(self, layout: Layout, captures: list, shell: dict) -> None:
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

    @staticmethod
    def _layer_extra(layer: Layer, two_axes: bool) -> dict:
        extra = {}
        if two_axes:
            extra["token_axis"] = layer.axis
        if layer.calls[0].feature_shape is not None:
            extra["feature_shape"] = layer.calls[0].feature_shape
        return extra

    def _token_texts(self, call: ModelCall, lengths: dict[str, int], mode: str, sequences):
        """(tokens, decoder_tokens) as text: decoded ids, or positions for inputs that are not ids."""
        batch = call.batch
        if call.ids is None:
            return [[str(i) for i in range(lengths["tokens"])] for _ in range(batch)], None
        encoder_decoder = self._is_encoder_decoder()
        source = sequences if mode == "generate" and not encoder_decoder else call.ids
        tokens = token_texts(self.tokenizer, source[:, :lengths["tokens"]].tolist())
        if "decoder_tokens" not in lengths:
            return tokens, None
        decoder = sequences if mode == "generate" else call.decoder_ids
        if decoder is None:  # decoder ids the model made itself (from labels): positions
            return tokens, [[str(i) for i in range(lengths["decoder_tokens"])] for _ in range(batch)]
        return tokens, token_texts(self.tokenizer, decoder[:, :lengths["decoder_tokens"]].tolist())

    @staticmethod
    def _padding(attention_mask, batch: int, length: int) -> np.ndarray | None:
        if not torch.is_tensor(attention_mask) or attention_mask.dim() != 2:
            return None
        mask = attention_mask.detach().to("cpu", torch.bool)
        if mask.shape[1] < length:  # generate(): generated positions are real tokens
            mask = torch.cat([mask, mask.new_ones(batch, length - mask.shape[1])], dim=1)
        padding = ~mask[:, :length].numpy()
        return padding if padding.any() else None

    @staticmethod
    def _dedupe(skipped: list[dict]) -> list[dict]:
        seen, unique = set(), []
        for item in skipped:
            key = (item["layer_name"], item["reason"])
            if key not in seen:
                seen.add(key)
                unique.append(item)
        return unique
