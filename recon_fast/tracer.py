"""Tracer: forward hooks that reduce every hooked module's output to per-token statistics with
token_stats, on the device, during one forward pass (or a whole generate()), and assemble an
ActivityCube afterwards.

During the forward pass a hook does no .item(), .cpu(), .tolist() or stream sync: it takes a
slice of a device buffer (StatsArena) and enqueues token_stats into it. Results reach the host
once, after the pass, or layer by layer while streaming to disk.
"""

from __future__ import annotations

import inspect
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import torch
from torch import nn

from recon_fast import export, ops, presets
from recon_fast._version import __version__
from recon_fast.cube import ActivityCube
from recon_fast.model_inputs import model_device, model_dtype, prepare_inputs, token_texts
from recon_fast.ops import STATS
from recon_fast.provenance import model_provenance
from recon_fast.stats_arena import ArenaSlot, StatsArena, back_to_back


def extract_tensor(output) -> torch.Tensor | None:
    """The activation in a module's output: a tensor, the first tensor of a tuple/list, or a
    ModelOutput's last_hidden_state (the original tool's rule)."""
    if torch.is_tensor(output):
        return output
    if isinstance(output, (list, tuple)):
        return next((item for item in output if torch.is_tensor(item)), None)
    hidden = getattr(output, "last_hidden_state", None)
    return hidden if torch.is_tensor(hidden) else None


@dataclass(frozen=True)
class RawSlices:
    """Raw activation slices to keep: modules whose name matches `layers` (re.fullmatch), token
    positions [tokens[0], tokens[1]) and features [dims[0], dims[1]) (None: to the end)."""

    layers: str
    tokens: tuple[int, int | None] = (0, None)
    dims: tuple[int, int | None] = (0, 16)

    def wants(self, name: str) -> bool:
        return re.fullmatch(self.layers, name) is not None


@dataclass
class _Call:
    """One hook call: which module, the activation's leading shape, where its stats went."""

    name: str
    lead_shape: tuple[int, ...]
    slot: ArenaSlot
    raw: torch.Tensor | None = None


@dataclass
class _Session:
    arena: StatsArena
    calls: list[_Call] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


class Tracer:
    """Per-token activation statistics of any nn.Module (Hugging Face models as they are).

    tracer = Tracer(model, tokenizer)        # or `with Tracer(model) as tracer:`
    tracer.add_preset("residual")            # or add_hook(name), add_hooks_all(), add_hooks("regex")
    tracer.run("some text")                  # or token ids, or a BatchEncoding
    tracer.cube.metric("energy")             # [layers, batch, tokens]

    metrics:   which of STATS the cube keeps (all five by default).
    attention: None, "full" (every attention probability) or "summary" (per head and query:
               entropy, max weight, argmax); needs a model that returns attentions (eager).
    raw:       RawSlices to keep raw activation slices, written to a sidecar file on export.
    stream_to: a path; the cube is streamed there (JSON, or .npz) layer by layer instead of
               being kept in memory.
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
        if attention not in (None, "full", "summary"):
            raise ValueError(f"attention must be None, 'full' or 'summary', got {attention!r}")
        self.attention = attention
        self.raw = raw
        self.stream_to = stream_to
        # Called with the module name after each hook call (e.g. a progress bar); keep it cheap.
        self.on_hook: Callable[[str], None] | None = None
        self.hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._session: _Session | None = None
        self._cube: ActivityCube | None = None
        self.skipped: list[dict] = []
        if layers is not None:
            self.add_hooks(layers)

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
        """A named preset from recon_fast.presets.PRESETS (e.g. "residual", "components")."""
        for name in presets.select_preset(self.model, preset):
            self.add_hook(name)

    def add_hooks(self, spec: str | Iterable[str]) -> None:
        """A preset name or a regex over module names, or a list of exact names."""
        names = presets.select(self.model, spec) if isinstance(spec, str) else list(spec)
        for name in names:
            self.add_hook(name)

    def clear_hooks(self) -> None:
        for handle in self.hooks.values():
            handle.remove()
        self.hooks.clear()

    def __enter__(self) -> "Tracer":
        return self

    def __exit__(self, *exc) -> None:
        self.clear_hooks()

    # ---- the hook ---------------------------------------------------------------------------
    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            session = self._session
            if session is not None:  # hooks stay silent outside run()/generate()
                self._record(session, name, output)

        return hook

    def _record(self, session: _Session, name: str, output) -> None:
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
        lead = tuple(tensor.shape[:-1])
        slot, out = session.arena.take(tensor.device, tensor.shape[:-1])
        ops.token_stats(tensor.detach(), out=out)
        raw = None
        if self.raw is not None and tensor.dim() >= 2 and self.raw.wants(name):
            (t0, t1), (d0, d1) = self.raw.tokens, self.raw.dims
            raw = tensor.detach()[..., t0:t1, d0:d1].clone()
        session.calls.append(_Call(name, lead, slot, raw))
        if self.on_hook is not None:
            self.on_hook(name)

    # ---- running ----------------------------------------------------------------------------
    def run(self, input_ids=None, **model_kwargs):
        """Runs the model once without autograd and builds the cube; returns the model's output.

        input_ids: token ids ([T] or [B, T]), a dict/BatchEncoding of model inputs, or text (a
        string or list of strings) when a tokenizer is set. An attention_mask marks padding.
        """
        inputs = self._prepare_inputs(input_ids, model_kwargs)
        if self.attention is not None:
            inputs["output_attentions"] = True
        output, session, seconds = self._traced(lambda: self.model(**inputs))
        ids = inputs["input_ids"]
        self._finish(session, ids, inputs.get("attention_mask"), seconds, "forward",
                     attentions=getattr(output, "attentions", None) if self.attention else None)
        return output

    def generate(self, input_ids=None, **generate_kwargs):
        """Traces model.generate(): the prompt pass and every generated token, so the token axis
        covers every position that went through the model. Returns generate()'s output."""
        if self.attention is not None:
            raise ValueError("attention capture works with run(), not generate()")
        inputs = self._prepare_inputs(input_ids, generate_kwargs)
        output, session, seconds = self._traced(lambda: self.model.generate(**inputs))
        sequences = output if torch.is_tensor(output) else output.sequences
        self._finish(session, sequences, inputs.get("attention_mask"), seconds, "generate")
        return output

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

    def _prepare_inputs(self, input_ids, kwargs: dict) -> dict:
        return prepare_inputs(self.model, self.tokenizer, input_ids, kwargs)

    def _traced(self, forward):
        if not self.hooks:
            raise RuntimeError("no hooks: add some with add_hook, add_preset, add_hooks_all or add_hooks")
        session = _Session(StatsArena())
        self._session = session
        start = time.perf_counter()
        try:
            with torch.no_grad():
                output = forward()
        except BaseException:
            self.clear_hooks()  # the model is left clean whatever went wrong inside it
            raise
        finally:
            self._session = None
        return output, session, time.perf_counter() - start

    def _layers(self, session: _Session, batch: int, length: int, mode: str):
        """Groups hook calls into cube layers: (name, [calls]) whose rows cover [batch, length]."""
        if mode == "forward":
            groups = [(call.name, [call]) for call in session.calls]
        else:  # generate: a module's calls, in order, extend the token axis
            by_name: dict[str, list[_Call]] = {}
            for call in session.calls:
                by_name.setdefault(call.name, []).append(call)
            groups = list(by_name.items())
        layers, skipped = [], []
        for name, calls in groups:
            lengths = [self._tokens_of(c.lead_shape, batch) for c in calls]
            if None in lengths or sum(lengths) != length:
                shapes = sorted({c.lead_shape for c in calls})
                skipped.append({"layer_name": name,
                                "reason": f"activation leading shape {shapes[0]} is not [batch={batch}, tokens={length}]"})
                continue
            layers.append((name, calls, lengths))
        return layers, skipped

    @staticmethod
    def _tokens_of(lead: tuple[int, ...], batch: int) -> int | None:
        if len(lead) == 2 and lead[0] in (batch, 1):  # [1, T] broadcasts over the batch (e.g. wpe)
            return lead[1]
        if len(lead) == 1 and batch == 1:  # a [T, D] activation of a single sequence
            return lead[0]
        return None

    def _finish(self, session: _Session, ids: torch.Tensor, attention_mask, seconds: float,
                mode: str, attentions=None) -> None:
        batch = ids.shape[0]
        length = self._traced_length(session, ids, mode)
        layers, shape_skipped = self._layers(session, batch, length, mode)
        ids = ids[:, :length]
        padding = self._padding(attention_mask, batch, length)
        columns = [STATS.index(m) for m in self.metrics]
        contiguous = columns == list(range(columns[0], columns[0] + len(columns)))
        picked = slice(columns[0], columns[0] + len(columns)) if contiguous else columns
        host_cols = len(STATS)
        device = self._model_device()
        meta = {
            "model_name": type(self.model).__name__,
            "timestamp": datetime.now().isoformat(),
            "input_shape": [batch, length],
            "mode": mode,
            "dtype": self._model_dtype(),
            "device": str(device),
            "backend": ops.backend(device),
            "seconds": round(seconds, 6),
            "hooks": len(self.hooks),
            "recon_fast_version": __version__,
        }
        self.skipped = session.skipped + shape_skipped
        if self.skipped:
            meta["skipped"] = self._dedupe(self.skipped)
        attention_entries = self._attention_entries(attentions, len(layers)) if self.attention else []
        tokens = token_texts(self.tokenizer, ids.tolist())
        provenance = model_provenance(self.model)

        def stats_of(calls, lengths, host) -> np.ndarray:  # -> [batch, length, metrics]
            parts = [host.read(c.slot).view(-1, n, host_cols).expand(batch, n, host_cols)
                     for c, n in zip(calls, lengths)]
            stats = torch.cat(parts, dim=1)[..., columns].numpy()
            if padding is not None:
                stats[padding] = np.nan
            return stats

        raw = self._raw_arrays(layers)
        # The binary form needs the whole array anyway: it is built as in memory, then written.
        if self.stream_to is not None and not str(self.stream_to).endswith(".npz"):
            self._cube = None
            self._stream(layers, stats_of, session, batch, length, meta, tokens, provenance,
                         attention_entries, padding, raw)
            return
        host = session.arena.to_host()
        data = np.empty((len(layers), batch, length, len(columns)), dtype=np.float32)
        whole = [len(calls) == 1 and calls[0].slot.rows == batch * length for _, calls, _ in layers]
        i = 0
        while i < len(layers):
            name, calls, lengths = layers[i]
            if not whole[i]:
                data[i] = stats_of(calls, lengths, host)
                i += 1
                continue
            # Layers whose rows lie back to back in the arena are copied in one go: per-layer
            # copies cost more than the forward pass itself at short T on a GPU.
            j = i + 1
            while j < len(layers) and whole[j] and back_to_back(layers[j - 1][1][0].slot, layers[j][1][0].slot):
                j += 1
            rows = host.span(calls[0].slot, layers[j - 1][1][0].slot).numpy()
            block = data[i:j]
            # One copy: a list of columns would make numpy gather into a temporary first.
            block[...] = rows.reshape(j - i, batch, length, host_cols)[..., picked]
            if padding is not None:
                block[:, padding] = np.nan
            i = j
        self._cube = ActivityCube(tokens=tokens, layer_names=[name for name, _, _ in layers],
                                  metrics=self.metrics, data=data, padding_mask=padding, meta=meta,
                                  provenance=provenance, attention=attention_entries, raw=raw)
        if self.stream_to is not None:
            self._cube.export_npz(self.stream_to)
            self._cube = None

    def _stream(self, layers, stats_of, session, batch, length, meta, tokens, provenance,
                attention_entries, padding, raw) -> None:
        """Writes the cube to stream_to, copying one layer at a time off the device."""
        shell = ActivityCube(tokens=tokens, layer_names=[], metrics=self.metrics,
                             data=np.zeros((0, batch, length, len(self.metrics)), np.float32),
                             padding_mask=padding, meta=meta, provenance=provenance,
                             attention=attention_entries, raw=raw)
        path = str(self.stream_to)
        device_arena = session.arena
        flat = batch == 1

        def layer_objects() -> Iterator[dict]:
            for i, (name, calls, lengths) in enumerate(layers):
                stats = stats_of(calls, lengths, device_arena)
                yield export.layer_object(i, name, stats, self.metrics, flat, shell.raw_reference(path, i))
            yield from attention_entries

        shell.write_raw_sidecar(path)
        export.write_json(path, meta=shell.meta_for_export(), tokens=tokens, layers=layer_objects(),
                          provenance=provenance)

    @staticmethod
    def _traced_length(session: _Session, ids: torch.Tensor, mode: str) -> int:
        if mode == "forward":
            return ids.shape[1]
        # generate(): the positions fed through the model; the last generated token never is.
        first = session.calls[0].name if session.calls else None
        batch = ids.shape[0]
        fed = sum(Tracer._tokens_of(c.lead_shape, batch) or 0 for c in session.calls if c.name == first)
        return min(fed, ids.shape[1]) if fed else ids.shape[1]

    @staticmethod
    def _padding(attention_mask, batch: int, length: int) -> np.ndarray | None:
        if attention_mask is None:
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

    def _raw_arrays(self, layers) -> dict[int, dict]:
        raw = {}
        if self.raw is None:
            return raw
        for i, (name, calls, _) in enumerate(layers):
            if calls[0].raw is not None:
                (t0, t1), (d0, d1) = self.raw.tokens, self.raw.dims
                raw[i] = {"array": torch.cat([c.raw for c in calls], dim=-2).float().cpu().numpy(),
                          "token_range": [t0, t1], "dim_range": [d0, d1]}
        return raw

    def _attention_entries(self, attentions, first_index: int) -> list[dict]:
        if not attentions or any(a is None for a in attentions):
            impl = getattr(getattr(self.model, "config", None), "_attn_implementation", "unknown")
            raise ValueError(
                f"the model returned no attention probabilities (attention implementation: {impl}); "
                "load it with attn_implementation='eager' or call model.set_attn_implementation('eager')"
            )
        entries = []
        for i, att in enumerate(attentions):  # [batch, heads, queries, keys]
            entry = {"layer_index": first_index + i, "layer_name": f"attention.{i}"}
            probs = att.detach().float()
            if self.attention == "full":
                entry["attention_scores"] = probs.cpu().numpy()
            else:
                entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
                top, where = probs.max(dim=-1)
                entry["attention_summary"] = {"entropy": entropy.cpu().numpy(), "max_weight": top.cpu().numpy(),
                                              "argmax": where.cpu().numpy()}
            entries.append(entry)
        return entries


def accepts_kwargs(module: nn.Module, *names: str) -> bool:
    """Whether module.forward takes these keyword arguments (or **kwargs)."""
    params = inspect.signature(module.forward).parameters
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) or all(n in params for n in names)
