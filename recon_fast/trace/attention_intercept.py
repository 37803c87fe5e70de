"""One way into transformers' attention, for every capture that reads it: each attention call still
computes what the model computes, then hands (module, query, key, value, mask, kwargs) as the
attention function received them (post-RoPE, KV cache included, heads not repeated) to an
observer; and one reading of whatever mask it received (key_mask: key padding [B, Tk] + causal +
window, or the general mask where those do not describe it).

Two ways in, one observer signature:
- wrapped_attention_functions(observe): every function transformers dispatches attention to
  (ALL_ATTENTION_FUNCTIONS, and each family's eager_attention_forward) is wrapped for the length
  of a block. The model runs as it is, its masks as it builds them: any family. Used by
  attribution.source_capture (attention rows of a few queries).
- switched_attention(model, observe): the model's implementation is swapped (AttentionInterface +
  AttentionMaskInterface, then `model.set_attn_implementation`) for "recon_fast_stats". Its mask
  function builds nothing: it returns a CompactMask holding the arguments transformers called it
  with. Its attention function runs the implementation the model had (where sdpa refuses Gemma2's
  soft-cap, the family's eager math in blocks of queries: kernels/softcap_attention.py) on exactly
  the mask that implementation's own mask function makes from those arguments, built only when it
  asks (None for sdpa without padding, which then runs with is_causal), so the logits are
  bit-identical to the untraced model's, and no [T, T] mask exists where the model would build
  none. Used by trace.attention_stats_capture (statistics at any length).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from recon_fast.kernels.attention_stats import visible_keys
from recon_fast.kernels.softcap_attention import softcap_attention

# observe(module, query [B, H, Tq, dh], key [B, Hkv, Tk, dh], value [B, Hkv, Tk, dh], mask, kwargs):
# after the model's own attention ran; `mask` as the attention function got it (see key_mask).
Observer = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, object, dict], None]

IMPLEMENTATION = "recon_fast_stats"
_PROBE_ROWS = 33  # query rows of the model's mask function checked against (causal, window)

_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, UserWarning, stacklevel=3)


def eager_attention_of(module: nn.Module) -> Callable:
    """The eager attention function of the module's own modeling file (each family has one)."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"{type(module).__name__} has no eager_attention_forward in its modeling file to fall "
                         "back on")
    return eager


# ---- the mask, in one form ----------------------------------------------------------------------------
@dataclass(eq=False)
class CompactMask:
    """What a model's mask function was called with, standing in for the mask it would build."""

    arguments: dict  # batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, ...
    _built: dict = field(default_factory=dict)  # implementation name -> the mask it builds
    _stats: tuple | None = None  # (causal, window, key_padding_mask, general mask)

    def built_for(self, implementation: str):
        """The mask `implementation`'s own mask function makes from these arguments (once)."""
        if implementation not in self._built:
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

            make = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(implementation)
            # An implementation without a mask function got None from transformers (early exit).
            self._built[implementation] = make(**self.arguments) if make is not None else None
        return self._built[implementation]

    def for_stats(self, key_length: int):
        """(causal, window, key_padding_mask [B, Tk] or None, general mask or None): the mask in
        compact form, read once (every layer of a forward pass gets the same CompactMask)."""
        if self._stats is None:
            self._stats = self._compact(key_length) or self._general()
        return self._stats

    def _compact(self, key_length: int):
        """Reads causal and window off the model's mask function on a few query rows, checked
        against the attention_stats op's lower-right alignment; None where they do not describe it
        (static caches, packed sequences, custom overlays): then the general mask serves."""
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

        warn_once("attention_stats: this model's mask is not key padding + causal + window; the statistics use "
                  "its full [batch, 1, queries, keys] mask (the slow path)")
        arguments = {**self.arguments, "allow_is_causal_skip": False, "allow_is_bidirectional_skip": False}
        return False, None, None, sdpa_mask(**arguments)


def _compact_mask(**arguments) -> CompactMask:
    """The mask function registered as "recon_fast_stats": builds nothing yet."""
    return CompactMask(arguments)


class KeyMask(NamedTuple):
    """Which keys each query of one attention call may see: key padding + causal + window (the
    queries being the last Tq of the Tk keys, as attention_stats and softcap_attention align
    them), or `general`, the model's own mask, where those do not describe it."""

    causal: bool
    window: int | None
    key_padding: torch.Tensor | None  # [B, Tk] bool, True where a key may be seen
    general: torch.Tensor | None  # [B|1, 1|H, Tq|1, Tk], bool (True: seen) or additive float
    kv_offset: int = 0  # keys a sliding-window cache dropped before the first one here

    def mask_scores(self, scores: torch.Tensor, rows: torch.Tensor, query_at: torch.Tensor) -> torch.Tensor:
        """scores [B, H, P, Tk] of the queries at `rows` [P] of the query axis, which sit at
        `query_at` [P] on the key axis, with what they may not see at -inf (or the general
        mask's additive values added)."""
        if self.general is not None:
            mask = self.general
            picked = mask if mask.shape[2] == 1 else mask.index_select(2, rows)
            if picked.dtype == torch.bool:
                return scores.masked_fill(~picked, float("-inf"))
            return scores + picked.double()
        keys = torch.arange(scores.shape[-1], device=scores.device)
        allowed = visible_keys(query_at, keys, self.causal, self.window)  # [P, Tk]
        if self.key_padding is not None:
            allowed = allowed & self.key_padding.to(scores.device)[:, None, None, :]  # [B, 1, P, Tk]
        return scores.masked_fill(~allowed, float("-inf"))


def key_mask(mask, module: nn.Module, kwargs: dict, key_length: int) -> KeyMask:
    """The mask an attention function got, in one form: a CompactMask (switched_attention) read
    off its arguments; a 4-D tensor (the model's own mask, or one the user prepared) as the general
    mask. Otherwise the function was told is_causal: the module's causality, the window the model
    passed (transformers leaves the mask out only where the window cannot bite, or for flash
    attention, which applies the window itself), and flash attention's [B, Tk] padding mask."""
    if isinstance(mask, CompactMask):
        causal, window, padding, general = mask.for_stats(key_length)
        return KeyMask(causal, window, padding, general, mask.arguments.get("kv_offset", 0))
    if torch.is_tensor(mask) and mask.dim() == 4:
        return KeyMask(False, None, None, mask)
    padding = mask.bool() if torch.is_tensor(mask) and mask.dim() == 2 else None
    return KeyMask(bool(getattr(module, "is_causal", True)), kwargs.get("sliding_window") or None, padding, None)


# ---- way in 1: the registered functions wrapped ----------------------------------------------------------
_ABSENT = object()


@contextlib.contextmanager
def wrapped_attention_functions(observe: Observer) -> Iterator[None]:
    """For the block: every attention function transformers dispatches to (and "eager", which
    the registry does not hold: each family's own eager_attention_forward) runs as before, then
    calls `observe`. The registry's per-process overrides are restored afterwards."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    saved = []
    try:
        for key in set(ALL_ATTENTION_FUNCTIONS) | {"eager"}:
            saved.append((key, local.get(key, _ABSENT)))
            original = ALL_ATTENTION_FUNCTIONS[key] if key in ALL_ATTENTION_FUNCTIONS else None
            local[key] = _observed(original, observe)
        yield
    finally:
        for key, previous in saved:
            if previous is _ABSENT:
                local.pop(key, None)
            else:
                local[key] = previous


def _observed(original: Callable | None, observe: Observer) -> Callable:
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        function = original or eager_attention_of(module)
        output = function(module, query, key, value, attention_mask, *args, **kwargs)
        observe(module, query, key, value, attention_mask, kwargs)
        return output

    return attention


# ---- way in 2: the model switched to "recon_fast_stats" -------------------------------------------------
# id(attention module) -> (its observer, the implementation the model had)
_active: dict[int, tuple[Observer, str]] = {}


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


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules transformers calls the attention function with (they carry a layer index)."""
    return [m for m in model.modules() if hasattr(m, "config") and hasattr(m, "layer_idx")]


@contextlib.contextmanager
def switched_attention(model: nn.Module, observe: Observer) -> Iterator[None]:
    """The model under "recon_fast_stats" for the block, each attention module's calls handed to
    `observe`; its implementation restored afterwards, also when the forward raises."""
    _register()
    configs = _configs(model)
    before = [(c, c.__dict__.get("_attn_implementation_internal")) for c in configs]
    original = model.config._attn_implementation
    modules = attention_modules(model)
    for module in modules:
        _active[id(module)] = (observe, module.config._attn_implementation)
    try:
        model.set_attn_implementation(IMPLEMENTATION)
        yield
    finally:
        for module in modules:
            _active.pop(id(module), None)
        with contextlib.suppress(Exception):
            model.set_attn_implementation(original)
        for config, value in before:  # exactly as found, sub-configs included
            config._attn_implementation_internal = value


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
        return eager_attention_of(module), built("eager")
    if implementation == "sdpa" and kwargs.get("softcap") is not None:
        if sdpa_drops_softcap():  # the model runs uncapped: so does the traced run, saying so
            warn_once(f"attention_stats: transformers {_transformers_version()}'s sdpa ignores the attention "
                      "soft-cap, so this model runs (and its statistics describe) uncapped attention; "
                      "set attn_implementation='eager' (or use transformers >= 5.21) for the soft-capped model")
        else:
            # sdpa refuses a soft-cap: eager's math in blocks of queries on the compact mask; on a
            # 4-D mask the user passed, the family's own eager function.
            if isinstance(mask, CompactMask):
                return _softcap_forward, mask
            return eager_attention_of(module), built("eager")
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_of(module)), built(implementation)


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
        return eager_attention_of(module)(module, query, key, value, attention_mask.built_for("eager"), dropout=dropout,
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
    observe, implementation = entry
    forward, mask = _wrapped(module, implementation, attention_mask, kwargs)
    output = forward(module, query, key, value, mask, **kwargs)
    if implementation == "sdpa" and sdpa_drops_softcap():
        kwargs = {**kwargs, "softcap": None}  # the observer sees the attention that ran
    observe(module, query, key, value, attention_mask, kwargs)
    return output
