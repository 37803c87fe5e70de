"""recon-fast beside nnsight and plain hooks (issue 17's side-by-side figures): every module with
parameters (add_hooks_all's modules) of a Llama, in the same interleaved rounds, as ratios to the
untraced forward of the round (medians of per-round ratios). Each way runs on its own copy of the
model, so that no way pays for another's hooks:

  untraced          the plain forward (the baseline)
  plain hooks       a forward hook per module computing the same five statistics in plain PyTorch
                    (token_stats_ref), kept on the device: what one writes without a tracer
  recon-fast        Tracer.run() (the statistics, the cube on the host)
  nnsight .save()   nnsight 0.8's documented way of keeping every module's output,
                    `with model.trace(ids): nnsight.save([m.output for m in modules])`
  nnsight cache     nnsight's tracer.cache(modules, device=None): every output, left on the device

nnsight keeps references to the outputs (no statistics, no copy): its figure is a floor for
caching rather than the same work. CPU: the host-bound proxy of bench_hook_path (30 layers,
hidden 64, T=8) and SmolLM2-135M at T=128 (the model cache); CUDA: the 1B shape at T=4096 and the
SmolLM2 shape at T=512 in bfloat16 (bench_tracer_gpu's random models). Skipped without nnsight
(`pip install --no-deps nnsight==0.8.1`; benchmarks/run_gpu.sh installs it from .whl) and, for
the CUDA cases, without a GPU."""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time

import pytest
import torch

from recon_fast import Tracer
from recon_fast.kernels.token_stats import token_stats_ref
from recon_fast.trace.presets import select_all

nnsight = pytest.importorskip("nnsight")

sys.path.insert(0, os.path.dirname(__file__))
WAYS = ["untraced", "plain hooks", "recon-fast", "nnsight .save()", "nnsight cache"]


def _proxy():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=30, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    return LlamaForCausalLM(config).eval(), torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))


def _smollm2(length: int):
    from recon_fast.models import load_model

    model, tokenizer = load_model()
    text = "The quick brown fox jumps over the lazy dog. " * (length // 8 + 1)
    return model.eval(), tokenizer(text, return_tensors="pt")["input_ids"][:, :length]


def _gpu(shape: str, length: int):
    from bench_tracer_gpu import build_model

    model = build_model(shape)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    return model, ids.to(next(model.parameters()).device)


CASES = {
    "cpu, host-bound proxy (30 layers, hidden 64), T=8": ("cpu", _proxy, 30),
    "cpu, SmolLM2-135M, T=128": ("cpu", lambda: _smollm2(128), 9),
    "cuda, 1B shape bf16, T=4096": ("cuda", lambda: _gpu("1B shape", 4096), 7),
    "cuda, SmolLM2-135M shape bf16, T=512": ("cuda", lambda: _gpu("SmolLM2-135M shape", 512), 15),
}


def _firing_order(model, ids, names: list[str]) -> list[str]:
    """The modules of `names` in the order their forwards finish (nnsight reads outputs in order)."""
    order, wanted = [], set(names)
    handles = [m.register_forward_hook(lambda m, a, o, name=n: order.append(name))
               for n, m in model.named_modules() if n in wanted]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order))


def _plain_hooks(model, names: list[str], kept: list):
    def hook(module, args, output):
        x = output[0] if isinstance(output, tuple) else output
        if torch.is_tensor(x) and x.is_floating_point() and x.dim() >= 2:
            kept.append(token_stats_ref(x))

    wanted = set(names)
    return [m.register_forward_hook(hook) for n, m in model.named_modules() if n in wanted]


def _envoy(root, path: str):
    envoy = root
    for part in path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


@pytest.mark.parametrize("case", list(CASES))
def test_recon_fast_beside_nnsight_and_plain_hooks(benchmark, record_measure, case):
    device, make, rounds = CASES[case]
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    threads = torch.get_num_threads()
    if "proxy" in case:
        torch.set_num_threads(1)  # the host's Python is what is measured
    model, ids = make()
    names = select_all(model)
    order = _firing_order(model, ids, names)
    copies = {way: copy.deepcopy(model) for way in WAYS[1:4]}
    copies["untraced"] = model
    copies["nnsight cache"] = copies["nnsight .save()"]
    kept: list = []
    handles = _plain_hooks(copies["plain hooks"], names, kept)
    tracer = Tracer(copies["recon-fast"])
    tracer.add_hooks_all()
    wrapped = nnsight.NNsight(copies["nnsight .save()"])
    envoys = [_envoy(wrapped, name) for name in order]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def untraced():
        with torch.no_grad():
            model(ids)

    def plain():
        kept.clear()
        with torch.no_grad():
            copies["plain hooks"](ids)

    def saved():
        with torch.no_grad(), wrapped.trace(ids):
            outputs = nnsight.save([e.output for e in envoys])
        return outputs

    def cached():
        with torch.no_grad(), wrapped.trace(ids) as trace:
            cache = trace.cache(modules=envoys, device=None)
        return cache

    ways = {"untraced": untraced, "plain hooks": plain, "recon-fast": lambda: tracer.run(ids),
            "nnsight .save()": saved, "nnsight cache": cached}
    times: dict[str, list[float]] = {way: [] for way in WAYS}

    def one_round():
        for way, fn in ways.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[way].append(time.perf_counter() - start)

    try:
        assert len(saved()) == len(order)  # nnsight keeps every output
        for _ in range(2):  # warm-up
            one_round()
        for values in times.values():
            values.clear()
        group = f"{case}, {len(names)} modules, side by side"
        benchmark.group = group
        benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    finally:
        tracer.clear_hooks()
        for h in handles:
            h.remove()
        torch.set_num_threads(threads)
    base = times["untraced"]
    record_measure(group, "untraced forward (median ms)", statistics.median(base) * 1e3, "ms", baseline=True)
    for way in WAYS[1:]:
        ratios = [t / b for t, b in zip(times[way], base)]
        record_measure(group, f"{way} / untraced, median", statistics.median(ratios), "x")
        record_measure(group, f"{way} / untraced, range", max(ratios) - min(ratios), "x")
