"""A module that returns its child's output itself (a Llama MLP returns down_proj's tensor, its
attention o_proj's as the first item): on the CPU, at the hook, the C++ recorder copies the
child's rows for it instead of reading the activation again (StatsArena.repeats counts them).
The copy must be taken only for the very same, unchanged tensor viewed the same way."""

import numpy as np
import pytest
import torch
from torch import nn

from recon_fast import Tracer
from recon_fast.kernels import token_stats as ops
from recon_fast.kernels.token_stats import token_stats_ref
from recon_fast.trace.stats_arena import StatsArena

from tiny_models import VOCAB, forward_hooks, make_model

pytestmark = pytest.mark.skipif(ops.TokenStatsRecorder is None, reason="no compiled recon_fast._C.Recorder")


def _same_tensor_as_previous_call(model, call) -> int:
    """How many module calls return (as output or its first item) the very tensor the call before
    them returned: the copies an at-hook recorder may make. Counted in a run of its own, with plain
    hooks on every module, so that the Tracer's run keeps its parked hooks. Only the outputs the C++
    recorder takes count: a plain tensor, a tuple starting with one, or the plain last_hidden_state
    of an output neither a tuple nor a list (a base model's ModelOutput, which returns its final
    norm's tensor)."""
    previous, count = [None], [0]

    def hook(module, inputs, output):
        if type(output) is tuple:
            t = output[0] if output else None
        elif isinstance(output, (tuple, list, torch.Tensor)):
            t = output
        else:
            t = getattr(output, "last_hidden_state", None)
        if type(t) is not torch.Tensor or t.dim() != 3:
            return
        count[0] += t is previous[0]
        previous[0] = t

    with forward_hooks((m, hook) for name, m in model.named_modules() if name), torch.no_grad():
        call()
    return count[0]


def test_llama_modules_returning_a_childs_tensor_get_its_rows_copied(arenas):
    model = make_model("llama")
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = _same_tensor_as_previous_call(model, lambda: model(ids))
    assert expected >= 2 * model.config.num_hidden_layers  # mlp and self_attn in every layer
    tracer = Tracer(model, grouped=False)
    tracer.add_hooks_all()
    tracer.run(ids)
    assert sum(arena.repeats for arena in arenas) == expected
    names = tracer.cube.layer_names
    for layer in range(model.config.num_hidden_layers):
        mlp, down = names.index(f"model.layers.{layer}.mlp"), names.index(f"model.layers.{layer}.mlp.down_proj")
        np.testing.assert_array_equal(tracer.cube.layer(mlp), tracer.cube.layer(down))
    # Grouped, every output is read (queued outputs are not compared): the same numbers.
    grouped = Tracer(model, grouped=True)
    grouped.add_hooks_all()
    arenas.clear()
    grouped.run(ids)
    assert sum(arena.repeats for arena in arenas) == 0
    np.testing.assert_array_equal(grouped.cube.data, tracer.cube.data)


class ReturnsItsChildsOutput(nn.Module):
    """Returns the inner Linear's output itself, after `change` (in place, or not at all)."""

    def __init__(self, change=None):
        super().__init__()
        self.inner = nn.Linear(8, 8)
        self.change = change

    def forward(self, x):
        y = self.inner(x)
        return self.change(y) if self.change else y


def _restrided_keeping_version(y, size, stride):
    # Every in-place view change in torch moves the version; were one not to (here the version is
    # set back by hand), the new view must still be told apart from the one whose rows were written.
    version = y._version
    y.as_strided_(size, stride)
    torch._C._autograd._unsafe_set_version_counter((y,), (version,))
    return y


def _retyped_through_data(y):
    # `.data =` swaps what the tensor holds (here float16 bits read as bfloat16: same storage,
    # sizes and strides) and leaves its version where it was.
    y.data = y.data.view(torch.bfloat16)
    return y


@pytest.mark.parametrize("change, repeats, dtype", [
    (None, 1, torch.float32),
    (lambda y: y.mul_(3.0), 0, torch.float32),  # edited in place: its version moved
    (lambda y: _restrided_keeping_version(y, (1, 5, 4), (40, 8, 2)), 0, torch.float32),
    (lambda y: _restrided_keeping_version(y, (1, 5, 8), (40, 1, 5)), 0, torch.float32),  # same sizes
    (_retyped_through_data, 0, torch.float16),
    (lambda y: y[:, 1:], 0, torch.float32),  # another tensor (a view)
], ids=["unchanged", "edited", "restrided", "transposed-in-place", "retyped", "view"])
def test_only_the_same_unchanged_tensor_is_copied(change, repeats, dtype, arenas):
    torch.manual_seed(0)
    model = nn.Sequential(ReturnsItsChildsOutput(change)).eval().to(dtype)
    x = torch.randn(1, 5, 8, dtype=dtype)
    with torch.no_grad():
        inner = model[0].inner(x).clone()
        outer = model(x).clone()
    tracer = Tracer(model, grouped=False)
    tracer.add_hooks_all()
    tracer.run(x)
    assert tracer.cube.layer_names == ["0.inner", "0"]
    assert sum(arena.repeats for arena in arenas) == repeats
    rtol = 2e-5 if dtype == torch.float32 else 1e-3  # half outputs: the hook's exact numbers, torch's float64
    for layer, seen in ((0, inner), (1, outer)):
        got = tracer.cube.layer(layer)[:, : seen.shape[1]]
        np.testing.assert_allclose(got, token_stats_ref(seen, float64=True).numpy(), rtol=rtol, atol=1e-6)


def test_a_repeat_after_a_new_chunk_is_computed(arenas, monkeypatch):
    # The arena's chunk of 5 rows is full after the inner call: the outer call's rows start a new
    # chunk, and the recorder forgets what it wrote when it hands the cursor back for that.
    init = StatsArena.__init__
    monkeypatch.setattr(StatsArena, "__init__", lambda arena, *a, **k: init(arena, initial_rows=5))
    torch.manual_seed(0)
    model = nn.Sequential(ReturnsItsChildsOutput()).eval()
    x = torch.randn(1, 5, 8)
    tracer = Tracer(model, grouped=False)
    tracer.add_hooks_all()
    tracer.run(x)
    assert sum(arena.repeats for arena in arenas) == 0
    with torch.no_grad():
        expected = token_stats_ref(model[0].inner(x), float64=True).numpy()
    for layer in (0, 1):
        np.testing.assert_allclose(tracer.cube.layer(layer), expected, rtol=2e-5, atol=1e-6)
