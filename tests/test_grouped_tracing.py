"""Grouped launches (Tracer(grouped=True), the default on CUDA): each hook queues its output and one launch
computes a decoder layer's (or group_bytes' worth); the same numbers as computing each output at
its hook and as a float64 reference on every model family the tests use; outputs edited in place
after their hook stop the run with their name and are then computed at their hook; the memory
cap bounds what a group holds, and grouping keeps the forward's peak memory."""

import numpy as np
import pytest
import torch
from torch import nn

from recon_fast import Tracer
from recon_fast.kernels.token_stats import token_stats_ref
from recon_fast.trace import stats_arena
from recon_fast.trace.stats_arena import InPlaceEdit, StatsArena

from tiny_models import ARCHS, LLAMA_LIKE, VOCAB, SmallCNN, SmallLSTM, capture_outputs, make_model, make_t5, make_vit


class Groups:
    """The grouped launches of the arenas made (the `arenas` fixture's list; StatsArena.launches,
    whether the arena or the hooks' C++ recorder made them) and the activations these computed
    (launched)."""

    def __init__(self, arenas: list[StatsArena]):
        self.arenas = arenas

    def clear(self) -> None:
        self.arenas.clear()

    @property
    def launches(self) -> int:
        return sum(arena.launches for arena in self.arenas)

    @property
    def launched(self) -> int:
        return sum(arena.launched for arena in self.arenas)


def _inputs(family: str):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (2, 9), generator=g)
    if family == "t5":
        return make_t5(), (ids,), {"decoder_input_ids": torch.randint(1, VOCAB, (2, 5), generator=g)}
    if family == "vit":
        return make_vit(), (torch.randn(2, 3, 16, 16, generator=g),), {}
    if family == "cnn":
        torch.manual_seed(0)
        return SmallCNN().eval(), (torch.randn(2, 3, 32, 32, generator=g),), {}
    if family == "lstm":
        torch.manual_seed(0)
        return SmallLSTM().eval(), (torch.randn(2, 6, 7, generator=g),), {}
    return make_model(family), (ids,), {}


FAMILIES = [*ARCHS, "neox-sequential", *LLAMA_LIKE, "t5", "vit", "cnn", "lstm"]


@pytest.mark.parametrize("family", FAMILIES)
def test_grouped_equals_immediate_equals_float64(family, arenas):
    model, args, kwargs = _inputs(family)
    cubes = {}
    groups = Groups(arenas)
    for grouped in (True, False):
        groups.clear()
        tracer = Tracer(model, grouped=grouped)
        tracer.add_hooks_all()
        tracer.run(*args, **kwargs)
        cubes[grouped] = tracer.cube
        calls = len(tracer.cube.layer_names)
        tracer.clear_hooks()
        if grouped:
            assert groups.launched >= calls and groups.launches < max(calls, 2), "not grouped"
        else:
            assert not groups.launches, "grouped=False queued outputs"
    grouped, immediate = cubes[True], cubes[False]
    assert grouped.layer_names == immediate.layer_names
    np.testing.assert_allclose(grouped.data, immediate.data, rtol=1e-6, atol=1e-6, equal_nan=True)
    # The float64 reference, from plain torch hooks, for every [batch, tokens, D] output.
    names = list(dict.fromkeys(grouped.layer_names))
    seen = capture_outputs(model, names, lambda: model(*args, **kwargs))
    batch, token_ids = args[0].shape[0], not args[0].is_floating_point()
    checked, layer = 0, 0
    for name, t in seen:  # in firing order, as the cube's layers (minus the skipped outputs)
        if layer == len(grouped.layer_names) or name != grouped.layer_names[layer] or not t.is_floating_point():
            continue
        if t.dim() == 2 and not token_ids:  # [B, D]: one position per batch item
            t = t.unsqueeze(1)
        elif t.dim() == 4:  # per-head [B, T, H, d] rows, or [B, C, H, W] with H the position axis
            t = t.flatten(2) if token_ids else t.movedim(-2, 1).flatten(2)
        ref = token_stats_ref(t.expand(batch, *t.shape[1:]), float64=True).numpy()
        got = grouped.data[layer, :, : t.shape[1]]
        scale = np.maximum(np.abs(ref), np.abs(ref[..., :1]) / np.sqrt(t.shape[-1]))
        err = np.abs(got - ref) / np.maximum(scale, 1e-30)
        assert np.nanmax(err) < 2e-5, (name, float(np.nanmax(err)))
        checked, layer = checked + 1, layer + 1
    assert checked == len(grouped.layer_names)


class EditsItsInputInPlace(nn.Module):
    def forward(self, x):
        return x.mul_(3.0)  # the previous module's output, changed after its hook


def test_an_output_edited_in_place_later_stops_the_run_naming_it_then_is_computed_at_its_hook():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), EditsItsInputInPlace(), nn.Linear(8, 4)).eval()
    x = torch.randn(1, 5, 8)
    with torch.no_grad():
        first = model[0](x)  # what the hook of module "0" sees
    tracer = Tracer(model, layers=["0", "2"], grouped=True)
    with pytest.raises(InPlaceEdit, match=r"output of 0 was changed in place after its hook"):
        tracer.run(x)
    tracer.run(x)  # now "0" is computed at its hook
    np.testing.assert_allclose(tracer.cube.layer(0), token_stats_ref(first, float64=True).numpy(), rtol=2e-5,
                               atol=1e-6)
    # grouped=False never waits, so it is right the first time (the edit moved the version: "2"
    # reads the edited tensor, no rows are copied).
    fresh = Tracer(model, layers=["0", "2"], grouped=False)
    fresh.run(x)
    np.testing.assert_array_equal(fresh.cube.data, tracer.cube.data)


def test_under_inference_mode_outputs_are_computed_at_their_hook_and_in_place_edits_are_right():
    # Inference tensors keep no version counter: nothing could tell an edit after the hook, so
    # they are never queued; the numbers are those the hook saw, as with grouped=False.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), EditsItsInputInPlace(), nn.Linear(8, 4)).eval()
    x = torch.randn(1, 5, 8)
    with torch.no_grad():
        first = model[0](x)
    tracer = Tracer(model, layers=["0", "2"], grouped=True)
    with torch.inference_mode():
        tracer.run(x)
    np.testing.assert_allclose(tracer.cube.layer(0), token_stats_ref(first, float64=True).numpy(), rtol=2e-5,
                               atol=1e-6)
    llama = make_model("llama")
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    grouped, immediate = Tracer(llama, grouped=True), Tracer(llama, grouped=False)
    for tracer in (grouped, immediate):
        tracer.add_hooks_all()
        with torch.inference_mode():
            tracer.run(ids)
    np.testing.assert_array_equal(grouped.cube.data, immediate.cube.data)


def test_the_memory_cap_bounds_what_a_group_holds(arenas):
    model = make_model("llama")
    tokens = torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    groups = Groups(arenas)
    widest = 2 * 16 * 96 * 4  # bytes of the largest output (the MLP's [2, 16, 96] float32)
    cap = 3 * widest
    tracer = Tracer(model, group_bytes=cap, grouped=True)
    tracer.add_hooks_all()
    tracer.run(tokens)
    capped, arena = groups.launches, groups.arenas[-1]
    assert arena.peak_pending_bytes <= cap + widest  # launched as soon as it reaches the cap
    assert arena.pending_bytes == 0  # all let go
    uncapped = Tracer(model, grouped=True)
    uncapped.add_hooks_all()
    groups.clear()
    uncapped.run(tokens)
    assert groups.arenas[-1].peak_pending_bytes > cap  # the cap, not the layers, made the groups
    assert capped > groups.launches
    np.testing.assert_array_equal(tracer.cube.data, uncapped.cube.data)


def _peak_live_bytes(fn) -> int:
    """The most bytes of CPU tensors alive at once while fn runs, above those alive before, from
    the profiler's allocation events (the CPU's torch.cuda.max_memory_allocated)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_grouping_keeps_the_forward_peak_memory():
    """Peak memory of a traced forward within 5% of the untraced one's, grouped and immediate, on
    a Llama of SmolLM2-135M's proportions scaled down (vocabulary 85x hidden, tied embeddings,
    GQA 3/1): what the forward itself allocates, and with the weights. Pending outputs of a
    layer cost nothing at the forward's peak (the logits), when no layer's outputs are queued."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=8, hidden_size=144, intermediate_size=384, num_attention_heads=3,
                         num_key_value_heads=1, vocab_size=12288, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    tokens = torch.randint(1, 12288, (1, 128), generator=torch.Generator().manual_seed(2))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())

    def untraced():
        with torch.no_grad():
            model(tokens)

    untraced()
    forward_peak = _peak_live_bytes(untraced)
    for grouped in (True, False):
        tracer = Tracer(model, grouped=grouped)
        tracer.add_hooks_all()
        tracer.run(tokens)
        peak = _peak_live_bytes(lambda: tracer.run(tokens))
        tracer.clear_hooks()
        assert peak <= 1.05 * forward_peak, (grouped, peak, forward_peak)
        assert weights + peak <= 1.05 * (weights + forward_peak), (grouped, peak, forward_peak)


@pytest.mark.parametrize("device, grouped", [("cpu", False), pytest.param("cuda", True, marks=pytest.mark.cuda)])
def test_by_default_outputs_are_grouped_on_cuda_and_computed_at_their_hook_elsewhere(device, grouped, arenas):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    groups = Groups(arenas)
    tracer = Tracer(make_model("llama").to(device))
    tracer.add_hooks_all()
    tracer.run(torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0)))
    assert (groups.launches > 0) is grouped and tracer.grouped is None
