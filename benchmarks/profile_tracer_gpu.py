"""Where a traced forward's host time goes on a GPU (launch-bound at short T): the untraced
forward, the same modules with empty hooks, with the Tracer's hooks, and a cProfile of one traced
forward. A diagnostic to run by hand (python3 benchmarks/profile_tracer_gpu.py [T]), not a
benchmark: its figures guide changes, the benchmarks judge them."""

from __future__ import annotations

import cProfile
import os
import pstats
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # bench_tracer_gpu, and recon_fast from a checkout
from bench_tracer_gpu import build_model, traced_forward  # noqa: E402

from recon_fast import Tracer  # noqa: E402
from recon_fast.trace.presets import select_all  # noqa: E402


def median_ms(fn, n=30) -> float:
    fn()
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(length: int) -> None:
    model = build_model("SmolLM2-135M shape")
    ids = torch.randint(0, model.config.vocab_size, (1, length), device="cuda")

    def forward():
        with torch.no_grad():
            model(ids)

    names = select_all(model)
    modules = dict(model.named_modules())
    base = median_ms(forward)
    handles = [modules[n].register_forward_hook(lambda m, i, o: None) for n in names]
    empty = median_ms(forward)
    for h in handles:
        h.remove()
    tracer = Tracer(model)
    tracer.add_hooks_all()
    hooks = median_ms(lambda: traced_forward(tracer, ids))
    run = median_ms(lambda: tracer.run(ids))
    n = len(names)
    print(f"T={length}, {n} hooks: untraced {base:.2f} ms; empty hooks +{(empty - base) / n * 1e3:.1f} us/hook; "
          f"Tracer hooks +{(hooks - base) / n * 1e3:.1f} us/hook; run() {run:.2f} ms (+{run - hooks:.2f} ms after the pass)")
    for label, fn in (("traced forward", lambda: traced_forward(tracer, ids)), ("run()", lambda: tracer.run(ids))):
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        profile.disable()
        print(f"--- cProfile, 5 x {label}, by own time")
        pstats.Stats(profile).sort_stats("tottime").print_stats(22)
    tracer.clear_hooks()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 512)
