"""The hooks' fast path (Tracer._recorder) against the general one (stats_recording.record_call): the same
calls and the same statistics for every kind of module output, each kind taking the path meant
for it; and what the fast path must not change: a dropped Tracer still takes its hooks with it,
hooks stay silent outside a run, and nothing in it syncs a CUDA device."""

import gc

import pytest
import torch
from torch import nn

from recon_fast import RawSlices, Tracer
from recon_fast.kernels.ops import token_stats_ref
from recon_fast.trace import stats_recording
from recon_fast.trace.session import Session
from recon_fast.trace.stats_arena import StatsArena

from tiny_models import make_model


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
        "first of a tuple": (randn(2, 5, 24), None),
        "strided [B, T, D]": randn(24, 5, 2).permute(2, 1, 0),
        "[1, T, D] of a batch of 2 (wpe)": randn(1, 5, 24),
        # the general path
        "tuple led by a non-tensor": (None, randn(2, 5, 24), "x"),
        "list": [randn(2, 5, 24)],
        "ModelOutput-like": type("Out", (), {"last_hidden_state": randn(2, 5, 24)})(),
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


FAST = {"float32 [B, T, D]", "bfloat16 [B, T, D]", "float16 [1, T, D]", "first of a tuple", "strided [B, T, D]",
        "[1, T, D] of a batch of 2 (wpe)"}


def _recorded(tracer: Tracer, outputs: dict, token_ids: bool, fast: bool) -> tuple[Session, list]:
    session = Session(StatsArena(initial_rows=8), token_ids=token_ids)  # small: chunks grow on the way
    record = tracer._recorder(session) if fast else (lambda name, out: stats_recording.record_call(session, name, out))
    for name, output in outputs.items():
        record(name, output)
    host = session.arena.to_host()
    return session, [host.read(c.slot).clone() for c in session.calls]


@pytest.mark.parametrize("token_ids", [True, False], ids=["token-ids", "positions"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_fast_path_records_what_the_general_path_records(device, token_ids, monkeypatch):
    outputs = _outputs(device)
    tracer = Tracer(nn.Linear(2, 2))
    general, general_rows = _recorded(tracer, outputs, token_ids, fast=False)
    taken = []
    record_call = stats_recording.record_call
    monkeypatch.setattr(stats_recording, "record_call", lambda session, name, output, **how: (
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
        assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    finally:
        gc.enable()


@pytest.mark.cuda
def test_fast_path_never_syncs():
    tracer = Tracer(nn.Linear(2, 2))
    session = Session(StatsArena(initial_rows=64), token_ids=True)
    record = tracer._recorder(session)
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
