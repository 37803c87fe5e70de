"""The `recon-fast` command line: `trace` writes an ActivityCube for a prompt; `attribute`, `cot`
and `residual` (recon_fast.attribution_cli) explain a prediction."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from recon_fast import attribution_cli
from recon_fast.models import DEFAULT_MODEL, ModelNotFound, load_model

PROGRESS_MIN_TOKENS = 256  # below this a forward pass is too quick for a progress bar to help


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="local HF folder, .gguf file or cached hub id (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: where the model loads)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the model's)")


def _trace_parser(sub) -> None:
    p = sub.add_parser("trace", help="trace a prompt and write its ActivityCube")
    p.add_argument("--prompt", required=True)
    _add_model_args(p)
    p.add_argument("--out", default="cube.json", help="output file (default: cube.json)")
    p.add_argument("--layers", default="all", help="a preset (all, residual, attn, mlp, components, "
                   "blocks+components) or a regex over module names (default: all)")
    p.add_argument("--format", choices=("json", "npz"), default=None, help="default: from --out's suffix")
    p.add_argument("--rows", type=int, default=12, help="rows of the summary table (default: 12)")
    p.set_defaults(run=cmd_trace)


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="module", leave=False, file=sys.stderr)


def cmd_trace(args) -> int:
    from recon_fast.tracer import Tracer

    started = time.perf_counter()
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    loaded = time.perf_counter()
    fmt = args.format or ("npz" if args.out.endswith(".npz") else "json")
    tracer = Tracer(model, tokenizer, layers=args.layers)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    tokens = inputs["input_ids"].shape[1]
    bar = _progress(len(tracer.hooks), tokens >= PROGRESS_MIN_TOKENS, "forward")
    if bar is not None:
        tracer.on_hook = lambda name: bar.update(1)
    try:
        tracer.run(inputs)
    finally:
        if bar is not None:
            bar.close()
        tracer.clear_hooks()
    cube = tracer.cube
    cube.export(args.out, fmt)
    print(f"model   {cube.meta['model_name']} ({args.model}), {cube.meta['dtype']} on {cube.meta['device']}, "
          f"backend {cube.meta['backend']}")
    print(f"tokens  {tokens}   layers {cube.num_layers}   forward {cube.meta['seconds'] * 1e3:.1f} ms   "
          f"load {loaded - started:.1f} s")
    if tracer.skipped:
        print(f"skipped {len(cube.meta.get('skipped', []))} module outputs (listed in meta.skipped)")
    print(summary_table(cube, args.rows))
    size = Path(args.out).stat().st_size
    print(f"wrote   {args.out} ({fmt}, {size / 1e6:.2f} MB)")
    return 0


def summary_table(cube, rows: int) -> str:
    """The layers whose energy peaks highest: peak energy, the token where it peaks, mean std."""
    energy = cube.metric("energy")[:, 0]  # [layers, tokens] of the first sequence
    peaks = np.nanmax(energy, axis=1) if energy.size else np.zeros(0)
    order = np.argsort(-np.nan_to_num(peaks, nan=-np.inf))[:rows]
    std = cube.metric("std")[:, 0] if "std" in cube.metrics else None
    name_width = max([len("layer")] + [len(cube.layer_names[i]) for i in order])
    lines = [f"{'layer':<{name_width}}  {'peak energy':>11}  {'at token':<16}  {'mean std':>9}"]
    for i in order:
        t = int(np.nanargmax(energy[i]))
        token = repr(cube.tokens[0][t])[:16]
        mean_std = f"{np.nanmean(std[i]):9.4f}" if std is not None else ""
        lines.append(f"{cube.layer_names[i]:<{name_width}}  {peaks[i]:11.3f}  {token:<16}  {mean_std}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recon-fast", description="Fast activation tracing for transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    _trace_parser(sub)
    attribution_cli.add_parsers(sub, _add_model_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = attribution_cli.hexray_argv(sys.argv[1:] if argv is None else list(argv))
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ModelNotFound as exc:
        print(f"recon-fast: {exc}", file=sys.stderr)
        return 2
    except (ValueError, KeyError) as exc:
        print(f"recon-fast: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
