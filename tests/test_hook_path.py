"""The hooks' fast paths (Tracer._recorder: the C++ recorder, recon_fast._C.Recorder, and the
Python one, stats_capture.fast_recorder, which serves without it) against the general one
(stats_capture.record_call): the same calls and the same statistics for every kind of module
output, each kind taking the path meant for it; and what the fast paths must not change: a dropped
Tracer still takes its hooks with it, hooks stay silent outside a run, nothing in them syncs a
CUDA device; a run's layers are reused only by a run with the same calls, the provenance only
while the config is unchanged, and on_hook reaches a run in progress."""

import collections
import copy
import gc
import weakref

import numpy as np
import pytest
import torch
from torch import nn

from recon_fast import RawSlices, Tracer
from recon_fast.kernels import token_stats as ops
from recon_fast.kernels.token_stats import token_stats_ref
from recon_fast.trace import stats_capture
from recon_fast.trace.session import Session
from recon_fast.trace.stats_arena import StatsArena

from tiny_models import make_model, tracer_hooks_on


def _outputs(device: str) -> dict[str, object]:
    """Module outputs of every kind the hooks meet, by what they are."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device, dtype)

    return {
        # the fast path
        "float32 [B, T, D]": randn(2, 5, 24),
        "bfloat16 [B, T, D]": randn(2, 5, 24, dtype=torch.bfloat16),
        "float16 [1, T, D]": randn(1, 7, 16, dtype=torch.float16),
        "float64 [B, T, D]": randn(2, 3, 9, dtype=torch.float64),
        "negative view (the op's path)": torch._neg_view(randn(2, 5, 24)),
        "no tokens [B, 0, D]": randn(2, 0, 24),
        "first of a tuple": (randn(2, 5, 24), None),
        "strided [B, T, D]": randn(24, 5, 2).permute(2, 1, 0),
        "[1, T, D] of a batch of 2 (wpe)": randn(1, 5, 24),
        "ModelOutput-like": type("Out", (), {"last_hidden_state": randn(2, 5, 24)})(),
        # the general path
        "tuple led by a non-tensor": (None, randn(2, 5, 24), "x"),
        "list": [randn(2, 5, 24)],
        "ModelOutput of a per-head tensor": type("Out", (), {"last_hidden_state": randn(2, 5, 4, 6)})(),
        "named tuple": collections.namedtuple("Pair", "a b")(randn(2, 5, 24), None),
        "no last_hidden_state": object(),
        "per-head [B, T, H, d]": randn(2, 5, 4, 6),
        "[B, D]": randn(2, 24),
        "[T, D]": randn(5, 24),
        "parameter (a subclass)": nn.Parameter(randn(2, 5, 24), requires_grad=False),
        "needs grad": randn(2, 5, 24).requires_grad_(),
        "integer": torch.arange(30, device=device).view(1, 5, 6),
        "no feature dim": randn(2, 5, 0),
        "scalar": randn(()).squeeze(),
        "not a tensor": {"a": 1},
    }


FAST = {"ModelOutput-like", "float32 [B, T, D]", "bfloat16 [B, T, D]", "float16 [1, T, D]", "float64 [B, T, D]",
        "negative view (the op's path)", "no tokens [B, 0, D]", "first of a tuple", "strided [B, T, D]",
        "[1, T, D] of a batch of 2 (wpe)"}


def _recorded(tracer: Tracer, outputs: dict, token_ids: bool, fast: bool) -> tuple[Session, list]:
    session = Session(StatsArena(initial_rows=8), token_ids=token_ids)  # small: chunks grow on the way
    device = next(iter(outputs.values())).device
    record = tracer._recorder(session, device) if fast else (lambda name, out: stats_capture.record_call(session, name, out))
    for name, output in outputs.items():
        record(name, output)
    host = session.arena.to_host()
    return session, [host.read(c.slot).clone() for c in session.calls]


RECORDERS = ["C++", "Python"]


def _use(recorder: str, monkeypatch) -> None:
    """Runs from here on record with the C++ recorder, or with the Python one as without it."""
    if recorder == "Python":
        monkeypatch.setattr(ops, "TokenStatsRecorder", None)
    elif ops.TokenStatsRecorder is None:
        pytest.skip("the compiled library has no C++ recorder")


@pytest.mark.parametrize("recorder", RECORDERS)
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "at-hook"])
@pytest.mark.parametrize("token_ids", [True, False], ids=["token-ids", "positions"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_fast_path_records_what_the_general_path_records(device, token_ids, grouped, recorder, monkeypatch):
    # At the hook on the CPU, the C++ recorder writes a contiguous output itself and hands any
    # other (strided, a negative view) to the op: the same kernel, so the same bits either way.
    _use(recorder, monkeypatch)
    outputs = _outputs(device)
    tracer = Tracer(nn.Linear(2, 2), grouped=grouped)
    general, general_rows = _recorded(tracer, outputs, token_ids, fast=False)
    taken = []
    record_call = stats_capture.record_call
    monkeypatch.setattr(stats_capture, "record_call", lambda session, name, output, **how: (
        taken.append(name), record_call(session, name, output, **how)))
    fast, fast_rows = _recorded(tracer, outputs, token_ids, fast=True)
    assert set(taken) == set(outputs) - FAST, "an output took the wrong path"
    assert fast.skipped == general.skipped
    assert len(fast.calls) == len(general.calls)
    for a, b, rows_a, rows_b in zip(fast.calls, general.calls, fast_rows, general_rows):
        assert (a.name, a.lead_shape, a.slot, a.axis, a.step, a.feature_shape) == \
               (b.name, b.lead_shape, b.slot, b.axis, b.step, b.feature_shape), a.name
        assert type(a.lead_shape) is tuple and all(type(n) is int for n in a.lead_shape), a.name
        torch.testing.assert_close(rows_a, rows_b, rtol=0, atol=0, equal_nan=True, msg=a.name)


def test_raw_slices_and_on_hook_still_happen():
    model = make_model("llama")
    tokens = torch.randint(1, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    seen = []
    tracer = Tracer(model, layers="residual", raw=RawSlices(r"model\.layers\.0", tokens=(1, 4), dims=(0, 5)))
    tracer.on_hook = seen.append
    tracer.run(tokens)
    assert seen == tracer.cube.layer_names
    assert tracer.cube.raw[0]["array"].shape == (1, 3, 5)
    tracer.raw = None
    seen.clear()
    tracer.run(tokens)
    assert seen == tracer.cube.layer_names and not tracer.cube.raw


def test_hooks_are_silent_outside_a_run_and_a_run_leaves_no_cycle():
    model = make_model("llama")
    tokens = torch.randint(1, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    tracer = Tracer(model)
    tracer.add_hooks_all()
    tracer.run(tokens)
    assert tracer._hook_path is None and tracer._session is None
    with torch.no_grad():
        model(tokens)  # nothing to record into, and nothing fails
    def fail(module, args):
        raise RuntimeError("the forward fails half way")

    handle = model.model.layers[1].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="half way"):
        tracer.run(tokens)
    handle.remove()
    assert tracer._hook_path is None and tracer._session is None
    # No reference cycle through the session's recorder: the Tracer goes, with its hooks, as soon
    # as the last reference does, without waiting for the cycle collector.
    gc.disable()
    try:
        del tracer
        assert tracer_hooks_on(model) == 0
    finally:
        gc.enable()


@pytest.mark.cuda
def test_fast_path_never_syncs():
    tracer = Tracer(nn.Linear(2, 2))
    session = Session(StatsArena(initial_rows=64), token_ids=True)
    record = tracer._recorder(session, torch.device("cuda"))
    activations = [torch.randn(2, 64, 48, device="cuda", dtype=dt) for dt in (torch.float32, torch.bfloat16)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, a in enumerate(activations * 50):  # enough calls to grow the arena several times
            record(f"layer{i}", (a, None))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(session.calls) == 100
    host = session.arena.to_host()
    assert all(chunks.last is None for chunks in session.arena._devices.values())  # device memory let go
    for call, a in zip(session.calls, activations * 50):
        torch.testing.assert_close(host.read(call.slot), token_stats_ref(a.cpu()).reshape(-1, 5), rtol=1e-5, atol=1e-5)


def test_arena_write_compiles_without_a_graph_break():
    """The eager shortcut to the op's C++ function is a builtin dynamo cannot trace: under
    torch.compile the write must call the registered op, in one graph, with the same rows."""
    arena = StatsArena(initial_rows=64)
    arena.write(torch.randn(1, 2, 8))  # the first chunk, made eagerly
    slots = []

    def doubled_and_traced(x):
        y = x * 2
        slots.append(arena.write(y))
        return y + 1

    x = torch.randn(1, 4, 8)
    explained = torch._dynamo.explain(doubled_and_traced)(x)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    torch._dynamo.reset()
    slots.clear()
    compiled = torch.compile(doubled_and_traced, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), x * 2 + 1)
    assert len(slots) == 1
    got = arena.to_host().read(slots[0]).view(1, 4, 5)
    torch.testing.assert_close(got, token_stats_ref(x * 2).float(), rtol=1e-5, atol=1e-6)


def _llama_tracer(**kwargs) -> Tracer:
    tracer = Tracer(make_model("llama"), **kwargs)
    tracer.add_hooks_all()
    return tracer


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "immediate"])
def test_a_run_reuses_the_layers_only_of_a_run_with_the_same_calls(grouped):
    """Runs with the same calls share the layers (no Call made again) and give the cube a fresh
    Tracer gives; another shape or batch works them out again (padding is the run's own)."""
    if ops.TokenStatsRecorder is None:
        pytest.skip("the compiled library has no C++ recorder")
    tracer = _llama_tracer(grouped=grouped)
    inputs = [_ids(2, 7), _ids(2, 7, 1), _ids(1, 9, 2), {"input_ids": _ids(2, 7, 3),
                                                          "attention_mask": torch.tensor([[1] * 7, [0] * 3 + [1] * 4])},
              _ids(2, 7, 4), _ids(2, 7, 5)]
    reused = []
    for x in inputs:
        before = tracer._layers._value
        tracer.run(x)
        reused.append(before is not None and tracer._layers._value[0] is before[0])
        fresh = Tracer(tracer.model, grouped=grouped)
        fresh.add_hooks_all()
        fresh.run(x)
        fresh.clear_hooks()
        assert tracer.cube.layer_names == fresh.cube.layer_names
        np.testing.assert_array_equal(tracer.cube.data, fresh.cube.data)
        assert tracer.cube.meta.get("skipped") == fresh.cube.meta.get("skipped")
        assert tracer.cube.padding_mask is None or (tracer.cube.padding_mask == fresh.cube.padding_mask).all()
    assert reused == [False, True, False, False, True, True]


def test_a_run_with_a_python_recorded_call_is_cached_with_it_and_raw_slices_never_are():
    """Calls of the Python recorders (a per-head output, a ModelOutput) are in the C++ log too: a run
    with them is reused as well; a run keeping raw slices (every call in Python) never is."""
    if ops.TokenStatsRecorder is None:
        pytest.skip("the compiled library has no C++ recorder")

    class PerHead(nn.Module):
        def forward(self, x):  # [B, T, D] -> [B, T, 2, D / 2]: the general path
            return x.unflatten(-1, (2, -1))

    model = nn.Sequential(nn.Linear(8, 8), PerHead(), nn.Flatten(-2), nn.Linear(8, 4)).eval()
    tracer = Tracer(model, layers=["0", "1", "3"])
    x = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(0))
    tracer.run(x)
    first = tracer._layers._value[0]
    tracer.run(x * 2)
    assert tracer._layers._value[0] is first
    assert tracer.cube.meta.get("skipped") is None and len(tracer.cube.layer_names) == 3
    raw = Tracer(model, layers=["0", "1", "3"], raw=RawSlices("0"))
    raw.run(x)
    raw.run(x)
    assert raw._layers._value is None


def test_the_provenance_is_worked_out_again_when_the_config_changes(monkeypatch):
    from recon_fast.cube import provenance

    made = []
    model_provenance = provenance.model_provenance
    monkeypatch.setattr(provenance, "model_provenance", lambda model: made.append(1) or model_provenance(model))
    tracer = _llama_tracer()
    ids = _ids(1, 6)
    tracer.run(ids)
    first = tracer.cube.provenance
    tracer.run(ids)
    assert len(made) == 1 and tracer.cube.provenance == first and tracer.cube.provenance is not first
    tracer.cube.provenance["package_versions"]["torch"] = "edited"  # a cube's own copy
    tracer.model.config.rms_norm_eps *= 2  # a value of the config
    tracer.run(ids)
    assert len(made) == 2 and tracer.cube.provenance["model_config_sha256"] != first["model_config_sha256"]
    assert tracer.cube.provenance["package_versions"]["torch"] == torch.__version__
    tracer.model.config.rope_parameters = copy.deepcopy(tracer.model.config.rope_parameters)  # equal: reused
    tracer.run(ids)
    assert len(made) == 2
    tracer.model.config.rope_parameters["rope_theta"] = 123.0  # a nested value, in place
    tracer.run(ids)
    assert len(made) == 3
    assert tracer.cube.provenance == model_provenance(tracer.model)
    tracer.model.config = copy.deepcopy(tracer.model.config)  # another config object
    tracer.run(ids)
    assert len(made) == 4


@pytest.mark.parametrize("recorder", RECORDERS)
def test_on_hook_set_during_a_run_takes_effect_at_once(recorder, monkeypatch):
    _use(recorder, monkeypatch)
    tracer = _llama_tracer()
    seen, later = [], []

    def first(name):
        seen.append(name)
        if len(seen) == 3:
            tracer.on_hook = later.append

    tracer.on_hook = first
    tracer.run(_ids(1, 6))
    assert seen + later == tracer.cube.layer_names and len(seen) == 3


def test_a_recorder_left_open_is_collected_with_its_session():
    """The C++ recorder and its session refer to each other (its fallback holds the session):
    the cycle collector takes them when nothing else does, even if the recorder was never closed."""
    if ops.TokenStatsRecorder is None:
        pytest.skip("the compiled library has no C++ recorder")
    tracer = Tracer(nn.Linear(2, 2))
    session = Session(StatsArena(), token_ids=True)
    record = tracer._recorder(session, torch.device("cpu"))
    record("a", torch.randn(1, 3, 4))
    gone = weakref.ref(session)
    del session, record
    gc.collect()
    assert gone() is None



@pytest.mark.parametrize("recorder", RECORDERS)
def test_an_output_whose_last_hidden_state_raises_raises_as_the_general_path_does(recorder, monkeypatch):
    # getattr(output, "last_hidden_state", None) swallows AttributeError only: so does the fast path.
    _use(recorder, monkeypatch)

    class Broken:
        @property
        def last_hidden_state(self):
            raise KeyError("no hidden state here")

    session = Session(StatsArena(), token_ids=True)
    record = Tracer(nn.Linear(2, 2))._recorder(session, torch.device("cpu"))
    try:
        with pytest.raises(KeyError, match="no hidden state here"):
            record("m", Broken())
        with pytest.raises(KeyError, match="no hidden state here"):
            stats_capture.record_call(session, "m", Broken())
    finally:
        if session.log is not None:
            session.log.close()
