"""Tracing a compiled model (`model.compile()` or `torch.compile(model)`) with the Tracer as usual:
the same cube as eager tracing, no graph break, no recompilation on later runs (also across
prompt lengths, once dynamo has made the length dynamic), and hooks set after the model was
compiled take effect instead of being silently skipped (dynamo does not guard on hooks), also
when another model of the same class is compiled later."""

import warnings

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from recon_fast import Tracer

from tiny_models import VOCAB, make_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _ids(tokens: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(tokens))


def _eager_cube(arch: str, ids: torch.Tensor):
    tracer = Tracer(make_model(arch))
    tracer.add_hooks_all()
    tracer.run(ids)
    return tracer.cube


def _assert_same_cube(compiled, eager):
    assert compiled.layer_names == eager.layer_names
    # Inductor fuses the model's own ops, so its activations differ from eager's by float32 rounding.
    np.testing.assert_allclose(compiled.data, eager.data, rtol=1e-4, atol=1e-4, equal_nan=True)


def _compiles() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("arch, how", [("llama", "method"), ("gpt2", "wrapper")])
def test_compiled_model_traces_like_eager_without_breaks_or_recompiles(arch, how):
    model = make_model(arch)
    if how == "method":
        model.compile()
        traced = model
    else:
        traced = torch.compile(model)
    tracer = Tracer(traced)
    tracer.add_hooks_all()
    first = _ids(12)
    tracer.run(first)
    _assert_same_cube(tracer.cube, _eager_cube(arch, first))
    assert not counters["graph_break"], dict(counters["graph_break"])
    compiled = _compiles()
    assert compiled >= 1, "the model did not run compiled"
    tracer.run(first)
    _assert_same_cube(tracer.cube, _eager_cube(arch, first))
    assert _compiles() == compiled, "the second run recompiled"
    # A new length recompiles once (dynamo makes it dynamic), later lengths reuse that graph.
    for tokens in (7, 9, 10):
        tracer.run(_ids(tokens))
        _assert_same_cube(tracer.cube, _eager_cube(arch, _ids(tokens)))
    assert _compiles() == compiled + 1, "lengths after the first change recompiled"
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_hooks_set_after_compiling_take_effect():
    model = make_model("gpt2")
    model.compile()
    ids = _ids(8)
    model(ids)  # compiled without hooks: dynamo would keep running this graph without them
    tracer = Tracer(model)
    tracer.add_hooks_all()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracer.run(ids)
    assert any("compiled before its hooks" in str(w.message) for w in caught)
    _assert_same_cube(tracer.cube, _eager_cube("gpt2", ids))
    assert len(tracer.cube.layer_names) > 10


def test_another_model_of_the_class_compiled_later_does_not_hide_the_hooks():
    """Dynamo tells modules of one class apart by neither identity nor hooks: the graph a second,
    untraced model compiles after the traced one would serve the traced model too, without its
    hooks (a cube of no layers, before). The run notices and is repeated with the hooks."""
    traced, other = make_model("llama"), make_model("llama")
    traced.compile()
    other.compile()
    tracer = Tracer(traced)
    tracer.add_hooks_all()
    ids = _ids(6)
    tracer.run(ids)
    first = tracer.cube
    with torch.no_grad():
        other(input_ids=ids)  # as the Tracer calls the model: the same guards
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracer.run(ids)
    assert any("another compiled module of its class" in str(w.message) for w in caught)
    assert tracer.cube.layer_names == first.layer_names
    np.testing.assert_array_equal(tracer.cube.data, first.data)


def test_untraced_calls_after_tracing_record_nothing():
    """The hooks stay in the graph between runs; outside run() they must not write or grow."""
    model = make_model("llama")
    model.compile()
    tracer = Tracer(model)
    tracer.add_hooks_all()
    ids = _ids(6)
    tracer.run(ids)
    before = tracer.cube.data.copy()
    with torch.no_grad():
        model(_ids(6, batch=2))
    tracer.run(ids)
    np.testing.assert_array_equal(tracer.cube.data, before)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reduce_overhead_cuda_graphs_trace_like_eager():
    """mode="reduce-overhead" replays CUDA graphs: the sink's buffer is a static address the graph
    writes into, the op runs on the current (graph's) stream."""
    ids = _ids(16).cuda()
    eager_model = make_model("llama").cuda()
    tracer = Tracer(eager_model)
    tracer.add_hooks_all()
    tracer.run(ids)
    eager = tracer.cube
    model = make_model("llama").cuda()
    model.compile(mode="reduce-overhead")
    tracer = Tracer(model)
    tracer.add_hooks_all()
    for _ in range(3):  # warm-up, recording, replays
        tracer.run(ids)
        _assert_same_cube(tracer.cube, eager)
    assert not counters["graph_break"], dict(counters["graph_break"])


class _EditsInPlace(torch.nn.Module):
    """A block that scales its linear's output in place after the linear's hook has seen it."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = torch.nn.Linear(width, width)

    def forward(self, x):
        h = self.linear(x)
        h.mul_(3.0)
        return h + x


class _Blocks(torch.nn.Module):
    def __init__(self, width: int = 16, depth: int = 3):
        super().__init__()
        self.layers = torch.nn.ModuleList(_EditsInPlace(width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_an_output_edited_in_place_after_its_hook_is_written_as_the_hook_saw_it():
    """Inside a graph each hook's output is written at its hook, before the edit. A grouped write
    at the layer's end was tried (2026-12-05) and read the edited values: the graph keeps Python's
    aliasing (the queued tensor is the edited one), and the graph has no version counter to check."""
    torch.manual_seed(0)
    model = _Blocks().eval()
    x = torch.randn(2, 5, 16)
    seen = {}
    handles = [model.get_submodule(f"layers.{i}.linear").register_forward_hook(
        lambda m, a, out, i=i: seen.__setitem__(i, out.detach().double().clone())) for i in range(3)]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    model.compile()
    with Tracer(model, layers=[f"layers.{i}.linear" for i in range(3)]) as tracer:
        tracer.run(x)
        tracer.run(x)
    for i in range(3):
        want = seen[i]
        np.testing.assert_allclose(tracer.cube.metric("energy")[i], want.norm(dim=-1).numpy(), rtol=1e-5)
        np.testing.assert_allclose(tracer.cube.metric("mean")[i], want.mean(dim=-1).numpy(), rtol=1e-5, atol=1e-6)
