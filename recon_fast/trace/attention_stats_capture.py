"""Attention statistics under any attention implementation: for one run, the model's attention
implementation is swapped (transformers' AttentionInterface + AttentionMaskInterface, then
`model.set_attn_implementation`) for "recon_fast_stats", which computes each layer's output with
the implementation the model had (where sdpa refuses Gemma2's soft-cap, the family's eager math
in blocks of queries: kernels/softcap_attention.py), then hands (query, key) as it received them
(post-RoPE, KV cache included, heads not repeated) to the attention_stats op. Its buffers: one float32 [B, H, Tq, 8]
tensor per attention call, on the device; its part of the cube: [layers, batch, heads, tokens, 8].

Masks: the mask function registered beside it builds nothing; it returns a CompactMask holding
the arguments transformers called it with. The op gets key padding [B, Tk] + causal + window,
read off those arguments; the wrapped implementation gets, built only when it asks, exactly the
mask its own mask function makes from the same arguments (None for sdpa without padding, where
sdpa runs with is_causal), so the logits are bit-identical to the untraced model's.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from recon_fast.cube import export
from recon_fast.kernels.attention_stats import ATTENTION_STATS, attention_stats, visible_keys
from recon_fast.kernels.softcap_attention import softcap_attention

IMPLEMENTATION = "recon_fast_stats"
SINK_TOKENS = 4  # StreamingLLM's attention sinks: the first four keys
# transformers model_type of the families checked against eager output_attentions (tests).
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gpt2", "gpt_neox", "bert")
_ARGMAX = ATTENTION_STATS.index("argmax")
_PROBE_ROWS = 33  # query rows of the model's mask function checked against (causal, window)


@dataclass(eq=False)
class CompactMask:
    """What a model's mask function was called with, standing in for the mask it would build."""

    arguments: dict  # batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, ...
    _built: dict = field(default_factory=dict)  # implementation name -> the mask it builds
    _stats: tuple | None = None  # (causal, window, key_padding_mask, general mask) for the op

    def built_for(self, implementation: str):
        """The mask `implementation`'s own mask function makes from these arguments (once)."""
        if implementation not in self._built:
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

            make = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(implementation)
            # An implementation without a mask function got None from transformers (early exit).
            self._built[implementation] = make(**self.arguments) if make is not None else None
        return self._built[implementation]

    def for_stats(self, key_length: int):
        """(causal, window, key_padding_mask [B, Tk] or None, general mask or None) for the op,
        and for the soft-cap path that stands in for sdpa (_softcap_forward)."""
        if self._stats is None:
            self._stats = self._compact(key_length) or self._general()
        return self._stats

    def _compact(self, key_length: int):
        """Reads causal and window off the model's mask function on a few query rows, checked
        against the op's lower-right alignment; None where they do not describe it (static
        caches, packed sequences, custom overlays): then the general mask serves."""
        a = self.arguments
        q_len, kv_len = a["q_length"], a["kv_length"]
        q_offset, kv_offset = a.get("q_offset", 0), a.get("kv_offset", 0)
        if torch.is_tensor(q_offset) or torch.is_tensor(kv_offset) or kv_len != key_length or q_len > kv_len:
            return None
        rows = torch.unique(torch.linspace(0, q_len - 1, min(q_len, _PROBE_ROWS)).round().long())
        keys = torch.arange(kv_len)
        try:
            seen = a["mask_function"](torch.arange(a["batch_size"])[:, None, None, None],
                                      torch.zeros(1, 1, 1, 1, dtype=torch.long),
                                      (rows + q_offset)[None, None, :, None], (keys + kv_offset)[None, None, None, :])
            seen = torch.as_tensor(seen).to("cpu", torch.bool).expand(a["batch_size"], 1, len(rows), kv_len)[:, 0]
        except Exception:  # not an index-based function (vmap-only overlays)
            return None
        position = rows + (kv_len - q_len)  # the op's query positions among the keys
        causal = bool(not seen[0, 0, -1]) if q_len > 1 else True
        visible = int(seen[0, -1].sum())
        window = visible if visible < (int(position[-1]) + 1 if causal else kv_len) else None
        expect = visible_keys(position, keys, causal, window)
        if window is not None and window < 1 or not bool((seen == expect).all()):
            return None
        padding = a.get("attention_mask")
        if padding is not None:
            from transformers.masking_utils import prepare_padding_mask

            padding = prepare_padding_mask(padding, kv_len, kv_offset)[:, kv_offset:kv_offset + kv_len].bool()
        return causal, window, padding, None

    def _general(self):
        from transformers.masking_utils import sdpa_mask

        _warn_once("attention_stats: this model's mask is not key padding + causal + window; the statistics use "
                   "its full [batch, 1, queries, keys] mask (the slow path)")
        arguments = {**self.arguments, "allow_is_causal_skip": False, "allow_is_bidirectional_skip": False}
        return False, None, None, sdpa_mask(**arguments)


def _compact_mask(**arguments) -> CompactMask:
    """The mask function registered as "recon_fast_stats": builds nothing yet."""
    return CompactMask(arguments)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, UserWarning, stacklevel=3)


# ---- the capture ------------------------------------------------------------------------------------
# id(attention module) -> (its capture, its name, the implementation the model had)
_active: dict[int, tuple["AttentionStatsCapture", str, str]] = {}


@dataclass
class AttentionCall:
    name: str  # the attention module, e.g. model.layers.3.self_attn
    stats: torch.Tensor  # float32 [B, H, Tq, 8] on the device


def check_model(model: nn.Module) -> None:
    """Before the run: a family whose attention goes through AttentionInterface, checked here."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES or not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"attention='stats' supports the model types {', '.join(FAMILIES)}; this model is "
                         f"{model_type or type(model).__name__!r}")


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    # Global and idempotent: transformers has no unregister, and the name only serves models
    # whose implementation a capture switched to it (and switches back).
    AttentionInterface.register(IMPLEMENTATION, _attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, _compact_mask)


def _configs(model: nn.Module) -> list:
    """Every config whose `_attn_implementation` set_attn_implementation may change."""
    found, stack = {}, [model.config]
    stack += [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "sub_configs")]
    while stack:
        config = stack.pop()
        if id(config) in found:
            continue
        found[id(config)] = config
        stack += [getattr(config, key) for key in getattr(config, "sub_configs", {})
                  if getattr(config, key, None) is not None]
    return list(found.values())


class AttentionStatsCapture:
    """Statistics of every attention call of one run (or generate()), kept on the device."""

    def __init__(self, model: nn.Module, sink_tokens: int = SINK_TOKENS):
        check_model(model)
        self.model = model
        self.sink_tokens = sink_tokens
        self.calls: list[AttentionCall] = []

    @contextlib.contextmanager
    def installed(self):
        """The model under "recon_fast_stats" for the duration; its implementation restored
        afterwards, also when the forward raises."""
        _register()
        configs = _configs(self.model)
        before = [(c, c.__dict__.get("_attn_implementation_internal")) for c in configs]
        original = self.model.config._attn_implementation
        names = {id(m): n for n, m in self.model.named_modules()}
        modules = [m for m in self.model.modules() if hasattr(m, "config") and hasattr(m, "layer_idx")]
        for module in modules:
            _active[id(module)] = (self, names[id(module)], module.config._attn_implementation)
        try:
            self.model.set_attn_implementation(IMPLEMENTATION)
            yield self
        finally:
            for module in modules:
                _active.pop(id(module), None)
            with contextlib.suppress(Exception):
                self.model.set_attn_implementation(original)
            for config, value in before:  # exactly as found, sub-configs included
                config._attn_implementation_internal = value

    def record(self, module: nn.Module, name: str, query: torch.Tensor, key: torch.Tensor, mask, kwargs: dict) -> None:
        # query [B, H, Tq, D], key [B, Hkv, Tk, D]
        kv_offset = 0
        if isinstance(mask, CompactMask):
            causal, window, padding, general = mask.for_stats(key.shape[2])
            kv_offset = mask.arguments.get("kv_offset", 0)
        elif torch.is_tensor(mask) and mask.dim() == 4:  # a prepared 4-D mask the user passed
            causal, window, padding, general = False, None, None, mask
        else:
            causal, window, padding, general = bool(getattr(module, "is_causal", True)), None, None, None
        stats = attention_stats(query.detach(), key.detach(), scaling=kwargs.get("scaling"), causal=causal,
                                window=window, softcap=kwargs.get("softcap"), key_padding_mask=padding,
                                mask=general, sink_tokens=max(0, self.sink_tokens - kv_offset))
        if kv_offset:  # a sliding-window cache dropped the first keys: argmax as a position
            stats[..., _ARGMAX] += kv_offset
        self.calls.append(AttentionCall(name, stats))

    # ---- its part of the cube ---------------------------------------------------------------------
    streams = True  # [layers, batch, heads, tokens, 8]: written layer by layer when streaming

    def cube_part(self, layout) -> dict:
        names, data = self.data(layout.mode, layout.token_length, layout.padding)
        return {"attention_layers": names, "attention_data": data}

    def stream_part(self, layout, shell, path: str):
        """After the token statistics' layers: one object per attention layer, off the device in turn."""
        first = len(layout.layers)
        for i, (name, stats) in enumerate(self.layers(layout.mode, layout.token_length, layout.padding)):
            yield export.attention_stats_object(i, first + i, name, stats, ATTENTION_STATS)

    def warnings(self, layout) -> list[str]:
        return []

    def layer_names(self, mode: str) -> list[str]:
        if mode == "forward":
            return [c.name for c in self.calls]
        return list(dict.fromkeys(c.name for c in self.calls))

    def layers(self, mode: str, length: int, padding: np.ndarray | None):
        """(name, float32 [batch, heads, length, 8]) per attention layer, one at a time off the
        device: in forward mode a call per layer, under generate() a module's calls in order
        along the token axis. Padded queries and positions no call covered are NaN."""
        groups: dict = {}
        for i, call in enumerate(self.calls):
            groups.setdefault(i if mode == "forward" else call.name, []).append(call)
        for calls in groups.values():
            batch, heads = calls[0].stats.shape[:2]
            out = np.full((batch, heads, length, len(ATTENTION_STATS)), np.nan, np.float32)
            start = 0
            for call in calls:
                n = min(call.stats.shape[2], length - start)
                out[:, :, start:start + n] = call.stats[:, :, :n].cpu().numpy()
                start += call.stats.shape[2]
            if padding is not None:
                cols = min(padding.shape[1], length)
                out[:, :, :cols][np.broadcast_to(padding[:, None, :cols], out.shape[:2] + (cols,))] = np.nan
            yield calls[0].name, out

    def data(self, mode: str, length: int, padding: np.ndarray | None) -> tuple[list[str], np.ndarray | None]:
        """All layers at once: names and [layers, batch, heads, length, 8] (heads NaN-padded to
        the widest layer)."""
        layers = list(self.layers(mode, length, padding))
        if not layers:
            return [], None
        heads = max(a.shape[1] for _, a in layers)
        batch = layers[0][1].shape[0]
        data = np.full((len(layers), batch, heads, length, len(ATTENTION_STATS)), np.nan, np.float32)
        for i, (_, array) in enumerate(layers):
            data[i, :, : array.shape[1]] = array
        return [name for name, _ in layers], data


# ---- the registered attention function ----------------------------------------------------------------
def _eager_of(module: nn.Module):
    """The eager attention function of the module's own modeling file (each family has one)."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"attention='stats': {type(module).__name__} has no eager_attention_forward to fall back on")
    return eager


def _wrapped(module: nn.Module, implementation: str, mask, kwargs: dict):
    """(function, mask): what the model would have called, and the mask it would have passed."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def built(name: str):
        return mask.built_for(name) if isinstance(mask, CompactMask) else mask

    if implementation == "eager":
        if getattr(module, "reorder_and_upcast_attn", False) and hasattr(module, "_upcast_and_reordered_attn"):
            # GPT-2's own upcast path, taken under eager instead of the interface.
            def reordered(m, q, k, v, attn_mask, **kw):
                return m._upcast_and_reordered_attn(q, k, v, attn_mask)
            return reordered, built("eager")
        return _eager_of(module), built("eager")
    if implementation == "sdpa" and kwargs.get("softcap") is not None:
        if sdpa_drops_softcap():  # the model runs uncapped: so does the traced run, saying so
            _warn_once(f"attention_stats: transformers {_transformers_version()}'s sdpa ignores the attention "
                       "soft-cap, so this model runs (and its statistics describe) uncapped attention; "
                       "set attn_implementation='eager' (or use transformers >= 5.21) for the soft-capped model")
        else:
            # sdpa refuses a soft-cap: eager's math in blocks of queries on the compact mask; on a
            # 4-D mask the user passed, the family's own eager function.
            return (_softcap_forward, mask) if isinstance(mask, CompactMask) else (_eager_of(module), built("eager"))
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, _eager_of(module)), built(implementation)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


@functools.cache
def sdpa_drops_softcap() -> bool:
    """Whether transformers' sdpa takes a soft-cap and silently drops it: before 5.21 it did (and
    Gemma2 declared sdpa support, so a Gemma2 could run uncapped); from 5.21 it raises ValueError
    and Gemma2 defaults to eager."""
    from packaging.version import Version

    return Version(_transformers_version()).release < (5, 21)


def _softcap_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: CompactMask, dropout: float = 0.0, scaling: float | None = None,
                     softcap: float | None = None, **kwargs):
    """A soft-capped layer under sdpa: the family's eager output without its [B, H, Tq, Tk] scores
    (softcap_attention), on causal + window + key padding read off the mask's arguments; the
    eager function on the eager mask where those do not describe it (the general mask)."""
    causal, window, padding, general = attention_mask.for_stats(key.shape[2])
    if general is not None:
        return _eager_of(module)(module, query, key, value, attention_mask.built_for("eager"), dropout=dropout,
                                 scaling=scaling, softcap=softcap, **kwargs)
    # The eager mask is made in the dtype the model passed its mask function (eager_mask's default
    # float32 where it passed none); the mask value, finfo(dtype).min, must be the same.
    mask_dtype = attention_mask.arguments.get("dtype", torch.float32)
    output = softcap_attention(query, key, value, softcap=softcap, scaling=scaling, causal=causal, window=window,
                               key_padding_mask=padding, mask_dtype=mask_dtype, dropout=dropout,
                               training=module.training)
    return output, None


def _attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask, **kwargs):
    entry = _active.get(id(module))
    if entry is None:
        raise RuntimeError(f"the '{IMPLEMENTATION}' attention implementation serves only inside a Tracer run "
                           "(it was left set on a model; call model.set_attn_implementation('sdpa'))")
    capture, name, implementation = entry
    forward, mask = _wrapped(module, implementation, attention_mask, kwargs)
    output = forward(module, query, key, value, mask, **kwargs)
    if implementation == "sdpa" and sdpa_drops_softcap():
        kwargs = {**kwargs, "softcap": None}  # the statistics of the attention that ran
    capture.record(module, name, query, key, attention_mask, kwargs)
    return output
