"""A Tracer's hooks parked as their module's forward (recon_fast.trace.module_hooks: a C
TracedForward instead of a forward hook, so nn.Module keeps its fast path): the same cube as
forward hooks on every model family; what a forward hook would see where other hooks exist (one
registered before ours replaces the output; global hooks; a wrapper that replaced ours); the
module's forward as it was once the hooks come off; copies and signatures."""

import copy
import gc
import inspect
import pickle
import weakref
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from recon_fast import Tracer
from recon_fast.trace import module_hooks
from recon_fast.trace.module_hooks import TracedForward

from test_grouped_tracing import FAMILIES, _inputs
from tiny_models import VOCAB, make_model, tracer_hooks_on

pytestmark = pytest.mark.skipif(TracedForward is None, reason="no compiled recon_fast._C.TracedForward")


def _ids(seed=0):
    return torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


def _parked(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m.__dict__.get("forward"), TracedForward)]


def _hook_only_cube(model, monkeypatch, *args, layers=None, **kwargs):
    """The cube with every hook a forward hook (what a build without TracedForward does)."""
    with monkeypatch.context() as patch:
        patch.setattr(module_hooks, "TracedForward", None)
        with Tracer(model) as tracer:
            tracer.add_hooks(layers) if layers is not None else tracer.add_hooks_all()
            assert not _parked(model)
            tracer.run(*args, **kwargs)
            return tracer.cube


@pytest.mark.parametrize("family", FAMILIES)
def test_parked_hooks_give_the_forward_hooks_cube(family, monkeypatch):
    model, args, kwargs = _inputs(family)
    hooks_cube = _hook_only_cube(model, monkeypatch, *args, **kwargs)
    with Tracer(model) as tracer:
        tracer.add_hooks_all()
        assert _parked(model) == list(tracer.hooks)  # every hooked module, none by a forward hook
        assert sum(len(m._forward_hooks) for m in model.modules()) == 0
        tracer.run(*args, **kwargs)
        cube = tracer.cube
    assert not _parked(model) and tracer_hooks_on(model) == 0
    assert all("forward" not in m.__dict__ for m in model.modules())  # the class's forward again
    assert all(type(m._forward_hooks) is OrderedDict for m in model.modules())  # as torch made them
    assert cube.layer_names == hooks_cube.layer_names
    np.testing.assert_array_equal(cube.data, hooks_cube.data)
    assert cube.meta.get("skipped") == hooks_cube.meta.get("skipped")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parked_hooks_give_the_forward_hooks_cube_on_cuda(dtype, monkeypatch):
    """The same on a GPU, where the run's outputs are grouped (grouped=None) and the recorder
    writes through the CUDA launchers."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = make_model("llama").to("cuda", dtype)
    tokens = _ids().cuda()
    hooks_cube = _hook_only_cube(model, monkeypatch, tokens)
    with Tracer(model) as tracer:
        tracer.add_hooks_all()
        assert _parked(model) == list(tracer.hooks)
        tracer.run(tokens)
        cube = tracer.cube
    assert cube.layer_names == hooks_cube.layer_names
    np.testing.assert_array_equal(cube.data, hooks_cube.data)


class Scale(nn.Module):
    def forward(self, x):
        return x * 2.0


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Scale() for _ in range(3)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _energy(cube, layer: str) -> np.ndarray:
    return cube.data[cube.layer_names.index(layer), ..., 0]


def test_a_hook_registered_before_the_tracer_is_seen_and_one_after_is_not():
    model, x = Chain(), torch.ones(1, 4, 8)
    earlier = model.layers[0].register_forward_hook(lambda m, a, out: out * 10.0)  # e.g. steering
    with Tracer(model, layers=["layers.0", "layers.1"]) as tracer:
        later = model.layers[1].register_forward_hook(lambda m, a, out: out * 100.0)
        assert _parked(model) == ["layers.1"]  # layers.0 had a hook: ours stays a forward hook after it
        tracer.run(x)
        cube = tracer.cube
    earlier.remove()
    later.remove()
    norm = np.sqrt(8.0)
    np.testing.assert_allclose(_energy(cube, "layers.0"), 20.0 * norm)  # after the earlier hook
    np.testing.assert_allclose(_energy(cube, "layers.1"), 40.0 * norm)  # before the later one
    assert tracer_hooks_on(model) == 0


def test_hooks_added_after_the_tracer_run_where_torch_puts_them(monkeypatch):
    """Prepended (prepend=True, e.g. an injected outlier the tracer should see) before ours,
    appended after: the same cube as with the Tracer's forward hook, and the order torch gives."""

    def with_later_hooks(park: bool):
        model, x = Chain(), torch.ones(1, 4, 8)
        with monkeypatch.context() as patch:
            if not park:
                patch.setattr(module_hooks, "TracedForward", None)
            tracer = Tracer(model, layers=["layers.0", "layers.1"])
        assert len(_parked(model)) == (2 if park else 0)
        layer = model.layers[0]
        handles = [layer.register_forward_hook(lambda m, a, out: out + 1.0),
                   layer.register_forward_hook(lambda m, a, out: out * 10.0, prepend=True),
                   layer.register_forward_hook(lambda m, a, out: out - 5.0, prepend=True)]
        tracer.run(x)
        order = [key - tracer.hooks["layers.0"].id for key in layer._forward_hooks]
        assert _parked(model) == (["layers.1"] if park else [])  # layers.0 got prepended hooks: a forward hook
        cube = tracer.cube
        for handle in handles:
            handle.remove()
        tracer.clear_hooks()
        assert tracer_hooks_on(model) == 0
        return cube, order

    parked, order = with_later_hooks(True)
    hooked, hook_order = with_later_hooks(False)
    assert order == hook_order == [4, 3, 0, 2]  # (1: layers.1's hook)
    np.testing.assert_array_equal(parked.data, hooked.data)
    np.testing.assert_allclose(_energy(parked, "layers.0"), (2.0 - 5.0) * 10.0 * -np.sqrt(8.0))


def test_a_global_forward_hook_sends_parked_hooks_back_to_forward_hooks():
    model, x = Chain(), torch.ones(1, 4, 8)
    with Tracer(model, layers=["layers.0", "layers.1"]) as tracer:
        assert _parked(model) == ["layers.0", "layers.1"]
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, a, out: out + 1.0 if isinstance(m, Scale) else None)
        try:
            tracer.run(x)
        finally:
            handle.remove()
        assert not _parked(model)
        cube = tracer.cube
    # Global hooks run before the module's own: the tracer sees their output.
    np.testing.assert_allclose(_energy(cube, "layers.0"), 3.0 * np.sqrt(8.0))
    np.testing.assert_allclose(_energy(cube, "layers.1"), 7.0 * np.sqrt(8.0))


def test_a_wrapper_that_replaced_ours_sends_it_back_to_a_forward_hook_without_double_records():
    model, x = Chain(), torch.ones(1, 4, 8)
    tracer = Tracer(model, layers=["layers.0", "layers.1", "layers.2"])
    ours = model.layers[1].forward
    model.layers[1].forward = lambda *args, **kwargs: ours(*args, **kwargs)  # keeps calling ours
    model.layers[2].__dict__.pop("forward")  # or removes it, restoring the class's
    tracer.run(x)
    assert _parked(model) == ["layers.0"]  # layers.1: someone else's forward; layers.2: none
    assert ours.detached
    assert tracer.cube.layer_names == ["layers.0", "layers.1", "layers.2"]  # each once
    np.testing.assert_allclose(tracer.cube.data[:, 0, :, 0], np.sqrt(8.0) * np.array([[2.0] * 4, [4.0] * 4, [8.0] * 4]))
    tracer.clear_hooks()
    assert tracer_hooks_on(model) == 0 and "forward" in model.layers[1].__dict__  # theirs is left alone


def test_clearing_hooks_restores_a_forward_attribute_the_module_had():
    model = Chain()
    own = model.layers[0].forward  # e.g. accelerate's hook keeps its forward as an attribute
    model.layers[0].forward = lambda x: own(x) + 1.0
    before = model.layers[0].__dict__["forward"]
    with Tracer(model, layers=["layers.0", "layers.1", "layers.2"]) as tracer:
        assert model.layers[0].__dict__["forward"] is not before
        tracer.run(torch.ones(1, 2, 4))
        np.testing.assert_allclose(_energy(tracer.cube, "layers.0"), 3.0 * 2.0)
    assert model.layers[0].__dict__["forward"] is before
    assert all("forward" not in layer.__dict__ for layer in model.layers[1:])


def test_compiling_after_the_hooks_are_set_moves_them_back_to_forward_hooks():
    model = make_model("llama")
    tokens = _ids()
    with Tracer(model) as tracer:
        tracer.add_hooks_all()
        eager_cube = (tracer.run(tokens), tracer.cube)[1]
        assert _parked(model)
        model.compile()
        tracer.run(tokens)  # its first compiled run: nothing was compiled without the hooks
        assert not _parked(model) and sum(len(m._forward_hooks) for m in model.modules()) == len(tracer.hooks)
        assert tracer.cube.layer_names == eager_cube.layer_names
        np.testing.assert_allclose(tracer.cube.data, eager_cube.data, rtol=1e-5, atol=1e-6)
        tracer.add_hook("lm_head")  # already there; and new hooks on a compiled model are forward hooks
        assert not _parked(model)


def test_a_traced_model_copies_and_pickles_untraced_and_keeps_its_signatures():
    model = make_model("gpt2")
    tokens = _ids()
    plain_signature = inspect.signature(model.transformer.h[0].forward)
    with Tracer(model) as tracer:
        tracer.add_hooks_all()
        assert inspect.signature(model.transformer.h[0].forward) == plain_signature
        tracer.run(tokens)
        names = tracer.cube.layer_names
        for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert not _parked(copied) and tracer_hooks_on(copied) == 0
            with torch.no_grad():
                torch.testing.assert_close(copied(tokens).logits, model(tokens).logits)
            tracer.run(tokens)
            assert tracer.cube.layer_names == names  # the model keeps its hooks, each recorded once


def test_an_error_in_recording_reaches_the_caller_and_leaves_no_hooks():
    model, x = Chain(), torch.ones(1, 4, 8)
    tracer = Tracer(model, layers=["layers.0", "layers.1", "layers.2"])

    def fails(name, output):
        raise ValueError(f"recording {name} failed")

    tracer._recorder = lambda session, device: fails
    with pytest.raises(ValueError, match="recording layers.0 failed"):
        tracer.run(x)
    assert tracer_hooks_on(model) == 0 and tracer._hook_path is None


def test_idle_wrappers_only_call_through():
    model, x = Chain(), torch.ones(1, 4, 8)
    with Tracer(model, layers=["layers.0", "layers.1", "layers.2"]) as tracer:
        assert len(_parked(model)) == 3
        with torch.no_grad():
            torch.testing.assert_close(model(x), x * 8.0)
        assert tracer._session is None
        with pytest.raises(RuntimeError, match="no cube in memory"):
            tracer.cube


def test_a_model_compiled_by_hand_while_hooks_are_parked_runs_right_outside_the_tracer():
    """torch.compile(model) of a model whose hooks are parked (the Tracer holds the eager model):
    dynamo cannot trace into the C wrapper and breaks its graph there, but the outputs are the
    model's, and the Tracer's own runs still trace the eager model."""
    model = make_model("llama")
    tokens = _ids()
    with torch.no_grad():
        expected = model(tokens).logits
    with Tracer(model) as tracer:
        tracer.add_hooks_all()
        compiled = torch.compile(model)
        with torch.no_grad():
            torch.testing.assert_close(compiled(tokens).logits, expected, rtol=1e-4, atol=1e-5)
        tracer.run(tokens)
        assert _parked(model) and len(tracer.cube.layer_names) > 0
    torch._dynamo.reset()


def test_a_class_forward_patched_while_hooks_are_parked_is_followed():
    class Double(nn.Module):
        def forward(self, x):
            return x * 2.0

    model, x = nn.Sequential(Double()), torch.ones(1, 3, 4)
    with Tracer(model, layers=["0"]) as tracer:
        assert _parked(model) == ["0"]
        Double.forward = lambda self, x: x * 100.0  # e.g. a kernel library swapping a class's forward
        torch.testing.assert_close(tracer.run(x), x * 100.0)
        np.testing.assert_allclose(_energy(tracer.cube, "0"), 200.0)
        model[0].__class__ = Scale  # and a swapped class
        torch.testing.assert_close(tracer.run(x), x * 2.0)


def test_only_one_tracer_parks_on_a_module_and_either_comes_off_cleanly():
    model, x = Chain(), torch.ones(1, 4, 8)
    first = Tracer(model, layers=["layers.0"])
    second = Tracer(model, layers=["layers.0"])
    assert _parked(model) == ["layers.0"] and len(model.layers[0]._forward_hooks) == 1  # the second's hook
    first.clear_hooks()
    handle = model.layers[0].register_forward_hook(lambda m, a, out: out * 0.0, prepend=True)
    second.run(x)
    np.testing.assert_array_equal(_energy(second.cube, "layers.0"), 0.0)  # the prepended hook ran first
    handle.remove()
    second.clear_hooks()
    assert tracer_hooks_on(model) == 0 and "forward" not in model.layers[0].__dict__
    assert type(model.layers[0]._forward_hooks) is OrderedDict
    # The other way round: the parked one outlives the forward hook.
    first, second = Tracer(model, layers=["layers.0"]), Tracer(model, layers=["layers.0"])
    second.clear_hooks()
    first.run(x)
    np.testing.assert_allclose(_energy(first.cube, "layers.0"), 2.0 * np.sqrt(8.0))
    first.clear_hooks()
    assert tracer_hooks_on(model) == 0 and type(model.layers[0]._forward_hooks) is OrderedDict


def test_copies_of_a_traced_model_free_without_the_cycle_collector_and_keep_foreign_forwards():
    class Scaler:
        def __init__(self, layer):
            self.layer = layer

        def run(self, x):
            return self.layer.__class__.forward(self.layer, x) * 3.0

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[0].forward = Scaler(model[0]).run  # a bound method of another object, as some wrappers set
    x = torch.ones(1, 2, 4)
    with torch.no_grad():
        expected = model(x)
    with Tracer(model, layers=["0", "1"]):
        assert _parked(model) == ["0", "1"]
        copied = copy.deepcopy(model)
        with torch.no_grad():
            torch.testing.assert_close(copied(x), expected)
        weight = weakref.ref(copied[1].weight)
        gc.disable()
        try:
            del copied
            assert weight() is None  # no reference cycle through a copied forward
        finally:
            gc.enable()


def test_a_detached_wrapper_put_back_by_someone_else_only_calls_through():
    model, x = Chain(), torch.ones(1, 4, 8)
    tracer = Tracer(model, layers=["layers.0"])
    ours = model.layers[0].__dict__["forward"]
    model.layers[0]._old_forward = ours  # accelerate's add_hook_to_module keeps the forward it replaces
    model.layers[0].forward = lambda *args, **kwargs: model.layers[0]._old_forward(*args, **kwargs)
    tracer.run(x)  # ours was replaced: a forward hook from now on
    assert ours.detached and len(tracer.cube.layer_names) == 1
    tracer.clear_hooks()
    model.layers[0].forward = model.layers[0]._old_forward  # remove_hook_from_module puts it back
    del model.layers[0]._old_forward
    with torch.no_grad():
        torch.testing.assert_close(model(x), x * 8.0)
    assert tracer_hooks_on(model) == 0
    gone = weakref.ref(tracer._sink.forwards)
    del tracer
    gc.collect()
    assert gone() is None  # the wrapper left on the module holds no Tracer's sink
