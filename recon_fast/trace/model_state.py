"""Leaving a user's model as found. Hugging Face models install output-capturing forward hooks for
good, on every layer, the first time attentions or hidden states are asked for (transformers'
`capture_outputs`); a tracer that asks for them takes a ModelState first and restores it after,
which removes every hook added since and puts back transformers' "installed" flags."""

from __future__ import annotations

import contextlib

from torch import nn

_FLAG = "_output_capturing_hooks_installed"  # set by transformers on the module it hooked
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")
_HOOK_SIDE_TABLES = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")
_MISSING = object()


def returns_attentions(model: nn.Module) -> bool:
    """Whether the model's attention implementation hands back attention probabilities (eager
    does; sdpa and flash attention return None and log a warning when asked)."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    return implementation is None or str(implementation).startswith("eager")


class ModelState:
    """The hooks of every module and transformers' output-capturing flags, to restore later."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._hooks = {id(m): tuple(frozenset(getattr(m, d)) for d in _HOOK_DICTS) for m in model.modules()}
        self._flags = {id(m): m.__dict__.get(_FLAG, _MISSING) for m in model.modules()}

    def restore(self) -> None:
        for module in self.model.modules():
            kept = self._hooks.get(id(module), (frozenset(),) * len(_HOOK_DICTS))
            for name, before in zip(_HOOK_DICTS, kept):
                hooks = getattr(module, name)
                for added in [key for key in hooks if key not in before]:
                    del hooks[added]
                    for table in _HOOK_SIDE_TABLES:
                        getattr(module, table, {}).pop(added, None)
            flag = self._flags.get(id(module), _MISSING)
            if flag is _MISSING:
                module.__dict__.pop(_FLAG, None)
            else:
                module.__dict__[_FLAG] = flag


@contextlib.contextmanager
def model_state_kept(model: nn.Module):
    """The model's hooks and transformers' flags, after the block (also when it raises), as they were before."""
    state = ModelState(model)
    try:
        yield
    finally:
        state.restore()
