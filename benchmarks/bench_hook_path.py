"""Host cost of the hook path. First one hook's write into the stats arena, on a tiny activation
(so the kernel itself costs next to nothing and what is timed is the per-call overhead a
launch-bound forward pays on a GPU): the compiled token_stats_rows op through the dispatcher and
its direct launcher (no dispatcher) against the Python slice + view + token_stats they replaced
(baseline: the Python path). Then the whole traced forward of a model so small that the host is
the bottleneck (30 layers, hidden 64, T=8, one thread: 365 hooks on a ~7 ms forward), as
traced/untraced ratios of interleaved rounds: issue 9's measure of the host cost per hook, with
the floor of an empty Python hook on the same modules and the hook path of before issue 17 (no
direct launchers, no grouped launches, no C++ recorder) beside it. With
RECON_FAST_BASELINE_TREE=<another checkout> (e.g. `git archive` of an earlier commit, unpacked),
that checkout's Tracer runs in the same rounds too, on its own copy of the model (other_checkout.py).
CPU here; on a CUDA machine the write benchmark adds a cuda group."""

import contextlib
import copy
import os
import statistics

import pytest
import torch

from recon_fast import Tracer
from recon_fast.kernels import token_stats as ops
from recon_fast.trace import module_hooks, stats_arena
from recon_fast.trace.stats_arena import StatsArena

CALLS = 2000  # hook calls per timing: a 135M model's 365 hooks, five forward passes
ROUNDS = 30
# Model copies per side of the traced/untraced rounds, each side's time the mean of its copies':
# on this project's CPU machine a copy's memory layout alone moved its ratio by up to ~2% (issue
# 17, fourth stop), as much as the changes measured. RECON_BENCH_COPIES sets another count.
COPIES = int(os.environ.get("RECON_BENCH_COPIES", "2"))


def _writes(device: str):
    x = torch.randn(1, 4, 64, device=device)

    def run():
        arena = StatsArena(initial_rows=CALLS * 4)
        for _ in range(CALLS):
            arena.write(x)

    return run


@pytest.mark.parametrize("path", ["python slice + view + token_stats", "token_stats_rows op", "direct launcher"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_hook_write_overhead(record, monkeypatch, device, path):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if stats_arena._rows_op_for(device) is None:
        pytest.skip("no compiled token_stats on this device")
    python_path = path.startswith("python")
    if python_path:  # arenas made from here on take the Python slice + view + token_stats
        monkeypatch.setattr(stats_arena, "_rows_op_for", lambda device_type: None)
    elif path.endswith("op"):  # the op through the dispatcher, as before the direct launchers
        monkeypatch.setattr(stats_arena, "_eager_rows_op", lambda device_type, overload: stats_arena._direct(overload))
    record(f"hook write, {device}, {CALLS} calls of [1, 4, 64] float32", path,
           _writes(device), device=device, baseline=python_path)


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=30, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    return LlamaForCausalLM(config).eval()


@contextlib.contextmanager
def _forward_hooks_only():
    """Tracers made inside hook every module with a forward hook (none parked as its forward:
    module_hooks.TracedForward), as before issue 17 and as a build without it does."""
    wrapper = module_hooks.TracedForward
    module_hooks.TracedForward = None
    try:
        yield
    finally:
        module_hooks.TracedForward = wrapper


@contextlib.contextmanager
def _dispatcher_path():
    """The hook path as it was before the direct launchers, grouped launches, the C++ recorder and
    the parked hooks (issue 17): forward hooks, the Python recorder, every queued output written
    by its own token_stats_rows call through the dispatcher. Tracers, runs and arenas made inside
    take it."""
    grouped_op, eager_rows_op, recorder = stats_arena._grouped_op, stats_arena._eager_rows_op, ops.TokenStatsRecorder
    stats_arena._grouped_op = lambda device_type: None
    stats_arena._eager_rows_op = lambda device_type, overload: stats_arena._direct(overload)
    ops.TokenStatsRecorder = None
    try:
        with _forward_hooks_only():
            yield
    finally:
        stats_arena._grouped_op, stats_arena._eager_rows_op, ops.TokenStatsRecorder = grouped_op, eager_rows_op, recorder


def _baseline_tracer(model):
    """A Tracer of the checkout named by RECON_FAST_BASELINE_TREE on `model`, all hooks, or None."""
    root = os.environ.get("RECON_FAST_BASELINE_TREE")
    if not root:
        return None
    from other_checkout import import_checkout

    tracer = import_checkout(root, "recon_fast.trace.tracer").Tracer(model)
    tracer.add_hooks_all()
    return tracer


def test_host_bound_traced_over_untraced(benchmark, record_measure, alternating, tiny_llama):
    """The tracer's host cost per hook and per run, where nothing else hides it: medians of
    per-round ratios, the forwards of a round running back to back (in an order reversed every
    round) so that drift on a shared machine hits all alike. Untraced three ways: a hook-free copy of the model (what runs without
    recon-fast); the floor, a copy with an empty Python forward hook on each module the Tracer
    hooks (what any hook-based tracer pays before doing anything); and the model itself with the
    Tracer's hooks attached but idle (the untraced side of bench_tracer's interleaved pairs: here
    its wrappers of the modules' forwards, module_hooks). Traced three ways in the same rounds,
    each Tracer on its own copy of the model (a Tracer reuses its last run's layout): the hook
    path as it is (hooks parked as the modules' forwards, the C++ recorder, direct launchers;
    on the CPU each output computed at its hook, grouped=None); the same with forward hooks;
    and as it was before issue
    17 (forward hooks, the Python recorder, one token_stats_rows call through the dispatcher per
    output); and, when asked for, another checkout's Tracer (_baseline_tracer). Each kind runs on
    COPIES copies of the model in every round, its time the mean of theirs."""
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the host's Python is what is measured, not intra-op threading
    kinds = ["hook-free", "empty hooks", "idle hooks", "traced", "traced, forward hooks", "traced before",
             "baseline checkout"]
    sides, tracers, empty = {}, [], []
    for copy_index in range(COPIES):
        plain = copy.deepcopy(tiny_llama)
        baseline = _baseline_tracer(copy.deepcopy(plain))
        model = copy.deepcopy(plain)
        tracer = Tracer(model)
        tracer.add_hooks_all()
        hooks = len(tracer.hooks)
        with _forward_hooks_only():
            hooked = Tracer(copy.deepcopy(plain))
            hooked.add_hooks_all()
        with _dispatcher_path():
            before = Tracer(copy.deepcopy(plain))
            before.add_hooks_all()
        floor = copy.deepcopy(plain)
        handles = [module.register_forward_hook(lambda module, args, output: None)
                   for name, module in floor.named_modules() if name in tracer.hooks]
        assert len(handles) == hooks
        empty += handles
        tracers += [tracer, hooked, before] + ([baseline] if baseline is not None else [])

        def untraced(module):
            def forward():
                with torch.no_grad():
                    module(ids)
            return forward

        def traced_before(before=before):
            with _dispatcher_path():
                before.run(ids)

        runs = [untraced(plain), untraced(floor), untraced(model), lambda tracer=tracer: tracer.run(ids),
                lambda hooked=hooked: hooked.run(ids), traced_before]
        if baseline is not None:
            runs.append(lambda baseline=baseline: baseline.run(ids))
        sides.update({(kind, copy_index): run for kind, run in zip(kinds, runs)})
    timed_round = alternating(sides)
    rounds = []  # seconds of each kind, per round: the mean of its copies
    group = f"host-bound Llama (30 layers, hidden 64, {hooks} hooks), T=8, traced/untraced interleaved"

    def one_round():
        seconds = timed_round()
        rounds.append({kind: statistics.fmean(t for (k, _), t in seconds.items() if k == kind)
                       for kind in {k for k, _ in seconds}})

    try:
        for _ in range(3):  # warm-up
            one_round()
        rounds.clear()
        benchmark.group = group
        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    finally:
        for traced in tracers:
            traced.clear_hooks()
        for handle in empty:
            handle.remove()
        torch.set_num_threads(threads)

    def ratios(kind, over="hook-free"):
        return [r[kind] / r[over] for r in rounds]

    over_plain = ratios("traced")
    record_measure(group, "empty hooks (floor): median ratio", statistics.median(ratios("empty hooks")), "x")
    record_measure(group, "hook-free: lowest ratio", min(over_plain), "x")
    record_measure(group, "hook-free: median ratio", statistics.median(over_plain), "x")
    record_measure(group, "hook-free: highest ratio", max(over_plain), "x")
    record_measure(group, "forward hooks: median ratio", statistics.median(ratios("traced, forward hooks")), "x")
    record_measure(group, "before issue 17: median ratio", statistics.median(ratios("traced before")), "x")
    record_measure(group, "over the floor: median ratio", statistics.median(ratios("traced", "empty hooks")), "x")
    record_measure(group, "idle hooks: median ratio", statistics.median(ratios("traced", "idle hooks")), "x")
    extras = []
    if "baseline checkout" in rounds[0]:
        record_measure(group, "baseline checkout: median ratio", statistics.median(ratios("baseline checkout")), "x")
        record_measure(group, "this / baseline checkout: median", statistics.median(ratios("traced", "baseline checkout")),
                       "x")
        extras = [("baseline checkout, hook-free", "baseline checkout", "hook-free")]
    for name, kind, over in [("hook-free", "traced", "hook-free"), ("idle hooks", "traced", "idle hooks"),
                             ("before, hook-free", "traced before", "hook-free"), *extras]:
        extra = [r[kind] - r[over] for r in rounds]
        record_measure(group, f"{name}: extra per hook", statistics.median(extra) / hooks * 1e6, "us")
