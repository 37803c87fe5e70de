"""How a Tracer's hook sits on one module (ModuleHook): as a forward hook, or as the module's
`forward` attribute (recon_fast._C.TracedForward), which records the same output without sending
every call of the module down nn.Module's hook path.

Why: one forward hook on a module makes each of its calls take _call_impl's slow path (the hook
dicts, the global hooks, the backward-hook checks). On the host-bound proxy (365 hooks, T=8) an
empty Python hook on every module costs 1.06-1.09x the hook-free forward; the C wrapper ~1.01x.
It calls the class's forward, looked up at each call as `self.forward` would be (a class patched
later, or a __class__ swapped, is followed), or the forward attribute it replaced (accelerate's),
and hands the output to the run's recorder, as the hook would.

When a module takes the wrapper ("parked": its forward hook is registered, so it keeps its place
among the module's hooks, then taken out of the module's hook dict):
- the compiled library has TracedForward, and the Tracer's model is neither compiled (dynamo would
  break its graph at a C callable; compiled runs use the hooks) nor an nn.DataParallel (replicas
  copy a module's __dict__, and the wrapper would run the original);
- the module has no other forward hook, no other Tracer parks there, and there is no global
  forward hook (a hook registered before ours may replace the output, and ours must see what it
  returns).
A hook added to the module later is registered after ours: appended, it runs after ours, so the
wrapper records what the hook would; prepended (prepend=True), it must run before ours. A parked
module's hook dict is a HookDict, which notes prepended hooks. Before each run (ParkedHooks.
check_before_run) a parked hook goes back to being a forward hook, after the hooks prepended since
and before the others, when its module got a prepended hook, when a global forward hook exists, or
when its wrapper is no longer the module's forward (something replaced or removed it, e.g.
accelerate's remove_hook_from_module restoring the forward it saved). The wrapper is then detached
(it lets go of the Tracer's sink): still called inside another wrapper, or put back by one, it
only calls through.

Differences left: a parent that calls a child's forward() directly (not the module itself) is
recorded by the wrapper, where a hook would not fire; a shallow copy of the module (copy.copy)
calls the original module; and a model compiled by hand (torch.compile(model), the Tracer holding
the eager model) and called outside the Tracer while hooks are parked breaks its graph at each
parked module (its outputs are right): compile it before adding hooks, or give the Tracer the
compiled model, and they are forward hooks. Copies (deepcopy, pickle) are not traced.
"""

from __future__ import annotations

import inspect
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules import module as module_globals

from recon_fast.kernels import _library

# None with a library built before it (or none): every hook is then a forward hook.
TracedForward = getattr(_library.module, "TracedForward", None)
ForwardSink = getattr(_library.module, "ForwardSink", None)

_ABSENT = object()  # the module had no forward attribute of its own before the wrapper


def global_forward_hooks() -> bool:
    """Whether torch.nn.modules.module.register_module_forward_hook has hooks (they run before
    every module's own hooks, so a parked hook would not see what they return)."""
    return bool(module_globals._global_forward_hooks)


class ClassForward:
    """What a copy (copy.deepcopy, pickle) of a module with a parked hook gets as its forward
    attribute: the class's forward, looked up at each call, with the module held weakly (a bound
    method there would keep every copied module in a reference cycle). Not traced."""

    __slots__ = ("_module", "__weakref__")

    def __init__(self, module: nn.Module):
        self._module = weakref.ref(module)

    def __call__(self, *args, **kwargs):
        module = self._module()
        return type(module).forward(module, *args, **kwargs)

    @property
    def __wrapped__(self):  # inspect.signature follows it
        module = self._module()
        return type(module).forward.__get__(module)

    def __reduce__(self):
        return ClassForward, (self._module(),)


class HookDict(OrderedDict):
    """A parked module's _forward_hooks: an OrderedDict, as torch's, that notes the hooks moved to
    the front (register_forward_hook(prepend=True)) and tells `alerts` (the Tracer's list), since
    those must run before the Tracer's hook. Copies and pickles as a plain OrderedDict."""

    def __init__(self, alerts: list):
        super().__init__()
        self.alerts = alerts
        self.prepended: set[int] = set()
        self.parked = False  # a Tracer's hook on the module is parked (only one Tracer parks there)

    def move_to_end(self, key, last: bool = True) -> None:
        super().move_to_end(key, last)
        if not last:
            self.prepended.add(key)
            self.alerts.append(self)

    def has_prepended(self) -> bool:
        return any(key in self for key in self.prepended)

    def __reduce__(self):
        return OrderedDict, (), None, None, iter(self.items())


class ModuleHook:
    """One Tracer hook on `module`: hook(module, args, output) registered as a forward hook and,
    with a ForwardSink given and the module fit for it, parked as a TracedForward recording
    (name, output) into the sink (`alerts`: the Tracer's list that HookDicts report prepended
    hooks to). remove() takes it off either way."""

    def __init__(self, module: nn.Module, name: str, hook: Callable, sink=None, alerts: list | None = None):
        self.module = module
        self.hook = hook
        self.handle = module.register_forward_hook(hook)
        self.wrapper = None  # the TracedForward, while parked
        self._previous = _ABSENT
        alerts = alerts if alerts is not None else []
        if sink is not None and self._fit_for_wrapper():
            self._park(name, sink, alerts)

    @property
    def id(self) -> int:
        return self.handle.id

    def _fit_for_wrapper(self) -> bool:
        module = self.module
        if TracedForward is None or list(module._forward_hooks) != [self.handle.id] or global_forward_hooks():
            return False
        # Another Tracer's wrapper (parked, or left detached inside someone's): ours is a forward hook.
        hooks = module._forward_hooks
        if isinstance(module.__dict__.get("forward"), TracedForward) or (isinstance(hooks, HookDict) and hooks.parked):
            return False
        if isinstance(module, torch.jit.ScriptModule):  # its forward is compiled
            return False
        # A forward defined as a property (or any data descriptor) would not be replaced by an
        # instance attribute.
        found = inspect.getattr_static(type(module), "forward", None)
        return not hasattr(type(found), "__set__")

    def _park(self, name: str, sink, alerts: list) -> None:
        module = self.module
        self._previous = module.__dict__.get("forward", _ABSENT)
        previous = None if self._previous is _ABSENT else self._previous
        self.wrapper = TracedForward(module, name, sink, previous, ClassForward)
        module.__dict__["forward"] = self.wrapper
        # Its hook dict held only our hook: from now on a HookDict, empty (nn.Module's fast path).
        hooks = module._forward_hooks
        if isinstance(hooks, HookDict):
            del hooks[self.handle.id]
            hooks.alerts, hooks.prepended = alerts, set()
        else:
            hooks = module.__dict__["_forward_hooks"] = HookDict(alerts)
        hooks.parked = True

    def unpark(self) -> None:
        """Back to a forward hook: after the hooks prepended since it was parked, before those
        appended (it had none when parked, so every hook now was registered after it)."""
        if self.wrapper is None:
            return
        self._take_off_wrapper()
        hooks = self.module._forward_hooks
        hooks[self.handle.id] = self.hook
        prepended = [key for key in hooks if key in getattr(hooks, "prepended", ())]
        OrderedDict.move_to_end(hooks, self.handle.id, last=False)  # not noted as prepended
        for key in reversed(prepended):
            OrderedDict.move_to_end(hooks, key, last=False)

    def remove(self) -> None:
        hooks = self.module._forward_hooks
        if self.wrapper is not None:
            self._take_off_wrapper()
        # The module's hook dict may be a HookDict made after the handle: removed from it by id.
        hooks.pop(self.handle.id, None)
        self.handle.remove()
        if isinstance(hooks, HookDict) and not hooks.parked:
            if not hooks:  # no handle needs it now: the module as found
                self.module.__dict__["_forward_hooks"] = OrderedDict()
            else:  # others' hooks, whose handles hold it: it stays, telling no Tracer
                hooks.alerts, hooks.prepended = [], set()

    def _take_off_wrapper(self) -> None:
        wrapper, self.wrapper = self.wrapper, None
        wrapper.detach()
        hooks = self.module._forward_hooks
        if isinstance(hooks, HookDict):
            hooks.parked = False
        if wrapper.in_place():
            if self._previous is _ABSENT:
                del self.module.__dict__["forward"]
            else:
                self.module.__dict__["forward"] = self._previous
        # Not in place: whatever replaced it may still call it; detached, it only calls through.
        self._previous = _ABSENT


class ParkedHooks:
    """A Tracer's parked hooks and their wrappers, listed once while its hooks stay the same (a
    run checks them all: two lists of 365 would cost more than the check)."""

    def __init__(self, hooks: Iterable[ModuleHook]):
        self.hooks = [hook for hook in hooks if hook.wrapper is not None]
        self.wrappers = [hook.wrapper for hook in self.hooks]

    def check_before_run(self, alerts: list) -> bool:
        """Puts back as forward hooks the parked hooks that would not record what a hook would:
        all of them when a global forward hook exists, else those whose module got a prepended
        hook (`alerts`, the Tracer's list the HookDicts report to; emptied here) and those whose
        wrapper is no longer the module's forward. Returns whether any was put back (the lists
        are then stale)."""
        hooks = self.hooks
        if not hooks:
            alerts.clear()
            return False
        if global_forward_hooks():
            unparked = hooks
        else:
            unparked = [hooks[i] for i in _library.module.displaced_forwards(self.wrappers)]
            if alerts:
                alerted = {id(d) for d in alerts if d.has_prepended()}
                unparked += [h for h in hooks if id(h.module._forward_hooks) in alerted and h not in unparked]
        alerts.clear()
        for hook in unparked:
            hook.unpark()
        return bool(unparked)

    def unpark_all(self) -> None:
        """Every parked hook back to a forward hook (a compiled run's graph calls the hooks)."""
        for hook in self.hooks:
            hook.unpark()
