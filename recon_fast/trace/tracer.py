"""Tracer: forward hooks that reduce every hooked module's output to per-token statistics with
token_stats, on the device, during one forward pass (or a whole generate()), and assemble an
ActivityCube afterwards. This module keeps hook registration, the session and running; each capture
kind owns its device buffer and its part of the cube in a module of its own: stats_capture
(token statistics, written into stats_arena), raw_capture (raw slices), attention_stats_capture
(attention statistics, attention="stats") and attention_capture (eager probabilities, "full").

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
import inspect
import time
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import torch
from torch import nn

from recon_fast._version import __version__
from recon_fast.cube import export
from recon_fast.cube.cube import ActivityCube
from recon_fast.cube.provenance import model_provenance
from recon_fast.kernels import ops
from recon_fast.kernels.ops import STATS
from recon_fast.trace import attention_capture, presets, raw_capture
from recon_fast.trace.attention_stats_capture import AttentionStatsCapture, check_model
from recon_fast.trace.model_inputs import ModelCall, model_device, model_dtype, prepare_call, token_texts
from recon_fast.trace.model_state import ModelState
from recon_fast.trace.raw_capture import RawSlices
from recon_fast.trace.stats_arena import ArenaSlot, StatsArena
from recon_fast.trace.stats_capture import NonFinite, StatsCube


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
class _Call:
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
class _Session:
    arena: StatsArena
    token_ids: bool  # the input is token ids: dim 1 is the token axis
    calls: list[_Call] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    axis: str = "tokens"  # "decoder_tokens" once an encoder-decoder's decoder starts
    steps: list[int] = field(default_factory=list)  # positions fed by each model.forward (generate)
    attention_stats: AttentionStatsCapture | None = None  # attention="stats"


@dataclass(slots=True)
class _Layer:
    name: str
    axis: str
    calls: list[_Call]
    starts: list[int]  # where each call's rows go on the token axis
    lengths: list[int]


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
               of being kept in memory.
    """

    def __init__(self, model: nn.Module, tokenizer=None, *, metrics: Iterable[str] = STATS,
                 layers: str | Iterable[str] | None = None, attention: str | None = None,
                 raw: RawSlices | None = None, stream_to: str | None = None):
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
            export.check_writable(stream_to)
            export.cube_format(stream_to)
        self.attention = attention
        self.raw = raw
        self.stream_to = stream_to
        # Called with the module name after each hook call (e.g. a progress bar); keep it cheap.
        self.on_hook: Callable[[str], None] | None = None
        self.hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        # The hooks hold the Tracer weakly, so a Tracer nobody holds is collected and its hooks
        # come off the model with it.
        self._finalizer = weakref.finalize(self, _remove_handles, self.hooks)
        self._detached: list[str] = []  # hooks taken off by a failed run, put back by the next
        self._session: _Session | None = None
        self._hook_path: Callable[[str, object], None] | None = None  # set while a run records
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
        tracer = weakref.ref(self)

        def hook(module, inputs, output):
            owner = tracer()
            if owner is not None:
                record = owner._hook_path
                if record is not None:  # hooks stay silent outside run()/generate()
                    record(name, output)

        return hook

    def _recorder(self, session: _Session) -> Callable[[str, object], None]:
        """record(name, output) for the hooks of one session. On a host-bound forward (a small
        model on a GPU) every microsecond here is paid once per hook, hundreds of times a pass,
        so the usual case is taken with what it needs bound once: a plain floating [B, T, D]
        tensor, alone or first in a tuple, that needs no grad. Its rows are the tensor as it is
        (_rows_of changes nothing for 3 dims) and it is recorded exactly as _record would.
        Anything else (subclasses, other ranks and dtypes, raw slices) goes through _record."""
        general = self._record
        if self.raw is not None:
            return lambda name, output: general(session, name, output)
        tensor_type = torch.Tensor
        write = session.arena.write
        append = session.calls.append
        steps = session.steps

        def record(name: str, output) -> None:
            x = output
            if x.__class__ is not tensor_type:
                x = output[0] if output.__class__ is tuple and output else None
                if x.__class__ is not tensor_type:
                    general(session, name, output)
                    return
            shape = x.shape
            if len(shape) != 3 or not shape[2] or x.requires_grad or not x.dtype.is_floating_point:
                general(session, name, output)
                return
            slot = write(x)
            append(_Call(name, (shape[0], shape[1]), slot, None, session.axis, len(steps) - 1, None))
            if self.on_hook is not None:
                self.on_hook(name)

        return record

    def _record(self, session: _Session, name: str, output) -> None:
        """The general path: any output, traced or listed in session.skipped with the reason."""
        tensor = extract_tensor(output)
        if tensor is None:
            session.skipped.append({"layer_name": name, "reason": f"output is {type(output).__name__}, not a tensor"})
            return
        if not tensor.is_floating_point():
            session.skipped.append({"layer_name": name, "reason": f"activation dtype {tensor.dtype} is not floating"})
            return
        if tensor.dim() == 0 or tensor.shape[-1] == 0:
            session.skipped.append({"layer_name": name, "reason": f"activation shape {tuple(tensor.shape)} has no feature dim"})
            return
        # Runs are under no_grad; a tensor that still needs grad (a hook outside run()) is detached.
        x, feature_shape = self._rows_of(tensor.detach() if tensor.requires_grad else tensor, session.token_ids)
        slot = session.arena.write(x)
        raw = raw_capture.take(self.raw, name, x)
        step = len(session.steps) - 1
        session.calls.append(_Call(name, tuple(x.shape[:-1]), slot, raw, session.axis, step, feature_shape))
        if self.on_hook is not None:
            self.on_hook(name)

    @staticmethod
    def _rows_of(x: torch.Tensor, token_ids: bool) -> tuple[torch.Tensor, list[int] | None]:
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
            output, session, seconds = self._traced(lambda: call(self.model), call, mode="forward")
            attentions = getattr(output, "attentions", None) if self.attention == "full" else None
            self._finish(session, call, seconds, "forward", attentions=attentions)
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
        except BaseException:
            self._detached = list(dict.fromkeys([*self._detached, *self.hooks]))
            _remove_handles(self.hooks)
            raise

    @property
    def cube(self) -> ActivityCube:
        if self._cube is None:
            where = f"; it was streamed to {self.stream_to}: ActivityCube.load() reads it" if self.stream_to else ""
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

    def _is_encoder_decoder(self) -> bool:
        return bool(getattr(getattr(self.model, "config", None), "is_encoder_decoder", False))

    def _traced(self, forward, call: ModelCall, mode: str):
        if self._detached:  # a failed run took them off the model; put them back
            names, self._detached = self._detached, []
            for name in names:
                self.add_hook(name)
        if not self.hooks and self.attention != "stats":
            raise RuntimeError("no hooks: add some with add_hook, add_preset, add_hooks_all or add_hooks")
        session = _Session(StatsArena(), token_ids=call.ids is not None)
        if self.attention == "stats":
            session.attention_stats = AttentionStatsCapture(self.model)
        state = ModelState(self.model) if self.attention is not None else None
        helpers = self._session_hooks(session, mode)
        self._session = session
        self._hook_path = self._recorder(session)
        start = time.perf_counter()
        try:
            installed = (session.attention_stats.installed() if session.attention_stats is not None
                         else contextlib.nullcontext())
            with torch.no_grad(), installed:
                output = forward()
        finally:
            self._session = self._hook_path = None
            for handle in helpers:
                handle.remove()
            if state is not None:
                state.restore()
        return output, session, time.perf_counter() - start

    def _session_hooks(self, session: _Session, mode: str) -> list:
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

    def _axis_lengths(self, session: _Session, call: ModelCall, mode: str, sequences) -> dict[str, int]:
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

    def _layers(self, session: _Session, batch: int, lengths: dict[str, int], mode: str,
                exact: bool) -> tuple[list[_Layer], list[dict]]:
        """Groups hook calls into cube layers and places their rows on their token axis."""
        if mode == "forward":
            return self._forward_layers(session.calls, batch, lengths, exact)
        # generate: a module's calls, in order, extend its token axis
        by_key: dict[tuple[str, str], list[_Call]] = {}
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
            layers.append(_Layer(name, axis, calls, starts, counts))
        return layers, skipped

    def _forward_layers(self, calls: list[_Call], batch: int, lengths: dict[str, int],
                        exact: bool) -> tuple[list[_Layer], list[dict]]:
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
            layers.append(_Layer(call.name, axis, [call], [0], [n]))
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

    def _finish(self, session: _Session, call: ModelCall, seconds: float, mode: str,
                attentions=None, sequences=None) -> None:
        batch = call.batch
        lengths = self._axis_lengths(session, call, mode, sequences)
        layers, shape_skipped = self._layers(session, batch, lengths, mode, exact=call.ids is not None)
        length = max(lengths.values())
        token_length = lengths["tokens"]
        attention_mask = call.kwargs.get("attention_mask")
        padding = self._padding(attention_mask, batch, token_length) if call.ids is not None else None
        stats = StatsCube(session.arena, self.metrics, batch, length, token_length, padding)
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
        attention_entries = (attention_capture.cube_part(self.model, attentions, len(layers))
                             if self.attention == "full" else [])
        capture = session.attention_stats
        provenance = model_provenance(self.model)
        two_axes = decoder_tokens is not None
        extras = {i: self._layer_extra(layer, two_axes) for i, layer in enumerate(layers)
                  if two_axes or layer.calls[0].feature_shape is not None}  # the others have none
        raw = raw_capture.cube_part(self.raw, layers)
        shell = dict(tokens=tokens, metrics=self.metrics, padding_mask=padding, meta=meta, provenance=provenance,
                     attention=attention_entries, raw=raw, decoder_tokens=decoder_tokens)
        # The binary form needs the whole array anyway: it is built as in memory, then written.
        if self.stream_to is not None and export.cube_format(self.stream_to) == "json":
            self._cube = None
            stats.stream(self.stream_to, layers, shell, extras,
                         capture.layers(mode, token_length, padding) if capture is not None else ())
            self._warn(stats.nonfinite, len(layers))
            return
        data = stats.data(layers)
        nonfinite = stats.nonfinite
        if nonfinite.first is not None:
            meta["nonfinite"] = nonfinite.summary()
        attention_layers, attention_data = (capture.data(mode, token_length, padding) if capture is not None
                                            else ([], None))
        self._cube = ActivityCube(layer_names=[layer.name for layer in layers], data=data, layer_extras=extras,
                                  attention_layers=attention_layers, attention_data=attention_data, **shell)
        self._warn(nonfinite, len(layers))
        if self.stream_to is not None:
            self._cube.export_npz(self.stream_to)
            self._cube = None

    def _warn(self, nonfinite: NonFinite, layers: int) -> None:
        """One warning per run for what was left out, one for non-finite values."""
        if self.skipped:
            names = list(dict.fromkeys(s["layer_name"] for s in self.skipped))
            shown = ", ".join(names[:3]) + (f", ... +{len(names) - 3}" if len(names) > 3 else "")
            plural = "s" if len(names) != 1 else ""
            warnings.warn(f"{len(names)} module output{plural} not traced ({shown}): "
                          f"meta['skipped'] says why", UserWarning, stacklevel=4)
        if nonfinite.first is not None:
            warnings.warn(nonfinite.message(layers), UserWarning, stacklevel=4)

    @staticmethod
    def _layer_extra(layer: _Layer, two_axes: bool) -> dict:
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


def accepts_kwargs(module: nn.Module, *names: str) -> bool:
    """Whether module.forward takes these keyword arguments (or **kwargs)."""
    params = inspect.signature(module.forward).parameters
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) or all(n in params for n in names)
