"""The `recon-fast` command line: `trace` writes an ActivityCube for a prompt (or for each prompt
of a file), scored against a dataset's profile with --baseline (recon_fast.cli.baseline);
`trace-dataset` (recon_fast.cli.dataset) traces a whole dataset into Parquet shards; `heads`
(recon_fast.cli.heads) names each layer's sharp, diffuse, sink, previous-token and self heads;
`attribute`, `cot` and `residual` (recon_fast.cli.attribution) explain a prediction; `view`
(recon_fast.cli.view) writes a self-contained HTML page of a cube or an attribution.
The prompt, model and output options are the same in every command (recon_fast.cli.options); a
load prints one line on stderr (recon_fast.cli.loading). Every failure is one line on stderr and a
non-zero exit; arguments are checked before any model is loaded (recon_fast.cli.checks); warnings
(skipped layers, NaN) are one line each on stderr."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from recon_fast.cli import attribution as attribution_cli
from recon_fast.cli import baseline as baseline_cli
from recon_fast.cli import cache_activations as cache_activations_cli
from recon_fast.cli import checks as cli_checks
from recon_fast.cli import dataset as dataset_cli
from recon_fast.cli import heads as heads_cli
from recon_fast.cli import loading, options
from recon_fast.cli.prompt_io import encode, output_paths
from recon_fast.cli import view as view_cli
from recon_fast.cli.options import OneLineParser
from recon_fast.dataset.profile import compare
from recon_fast.kernels.stats_tables import ATTENTION_STATS_TABLE
from recon_fast.models import ModelNotFound

PROGRESS_MIN_TOKENS = 256  # below this a forward pass is too quick for a progress bar to help
_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])  # recon_fast/: warnings from any of its modules are ours


_add_model_args = options.add_model_options  # what a command without a prompt registers with


def _trace_parser(sub) -> None:
    p = sub.add_parser("trace", help="trace a prompt and write its ActivityCube")
    options.add_shared_options(p, "the cube: .json, .json.gz or .npz (default: cube.json); --json prints "
                                  "the summary as JSON", out_default="cube.json")
    p.add_argument("--layers", default=None, help="a preset (all, residual, attn, mlp, components, "
                   "blocks+components) or a regex over module names (default: all; with --baseline, its layers)")
    p.add_argument("--format", choices=("json", "npz"), default=None,
                   help="must agree with --out's suffix, which decides (default: from the suffix)")
    options.add_count(p, "--top-k", default=12, minimum=0, aliases=("--rows",),
                      help="layers in the summary table, and values in the --baseline tables")
    p.add_argument("--attention", choices=("stats",), default=None,
                   help=f"also per attention layer, head and query: {', '.join(ATTENTION_STATS_TABLE.names)} "
                        "(any attention implementation)")
    p.add_argument("--baseline", metavar="PROFILE", default=None,
                   help="a trace-dataset run's profile.json: print the layers and tokens of this prompt most out "
                        "of that dataset's distribution (z-scores, percentiles)")
    p.set_defaults(run=cmd_trace)


def _progress(total: int, enabled: bool, desc: str):
    if not enabled or not sys.stderr.isatty():  # a pipe or a log gets no bar (and no \r)
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="module", leave=False, file=sys.stderr)


def cmd_trace(args) -> int:
    from recon_fast.trace.tracer import Tracer

    # Everything that can be checked without the model, before the slow load.
    prompts = cli_checks.prompts(args)
    fmt = cli_checks.check_output(args.out, args.format)
    outs = output_paths(args.out, len(prompts))
    options.check_counts(args)
    profile = baseline_cli.load_profile(args.baseline) if args.baseline is not None else None
    if args.layers is None:
        args.layers = baseline_cli.layers_pattern(profile) if profile is not None else "all"
    cli_checks.check_model(args)
    cli_checks.check_layers(args.layers, args.model)

    model, tokenizer = loading.load(args)
    if args.chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"--chat: the tokenizer of {args.model!r} has no chat template")
    results = []
    with Tracer(model, tokenizer, layers=args.layers, attention=args.attention) as tracer:
        for n, (prompt, out) in enumerate(zip(prompts, outs), start=1):
            inputs = encode(tokenizer, prompt, args.chat)
            tokens = inputs["input_ids"].shape[1]
            bar = _progress(len(tracer.hooks), tokens >= PROGRESS_MIN_TOKENS, "forward")
            tracer.on_hook = (lambda name: bar.update(1)) if bar is not None else None
            try:
                tracer.run(inputs)
            finally:
                if bar is not None:
                    bar.close()
            cube = tracer.cube
            comparison = compare(profile, cube) if profile is not None else None
            cube.export(out, fmt)
            size = Path(out).stat().st_size
            if args.json:
                results.append(_trace_result(cube, tokens, out, fmt, size, args.top_k, comparison))
                continue
            if n == 1:
                print(f"model   {cube.meta['model_name']} ({args.model}), {cube.meta['dtype']} on "
                      f"{cube.meta['device']}, backend {cube.meta['backend']}   load {args.load_seconds:.1f} s")
            if len(prompts) > 1:
                print(f"prompt {n}/{len(prompts)}: {tokens} tokens, {cube.num_layers} layers, forward "
                      f"{cube.meta['seconds'] * 1e3:.1f} ms; wrote {out} ({fmt}, {size / 1e6:.2f} MB)")
                if comparison is not None:
                    print(f"  {baseline_cli.one_line(comparison, cube)}")
                continue
            attention = f"   attention layers {len(cube.attention_layers)}" if cube.attention_layers else ""
            print(f"tokens  {tokens}   layers {cube.num_layers}{attention}   forward {cube.meta['seconds'] * 1e3:.1f} ms")
            print(summary_table(cube, args.top_k))
            if comparison is not None:
                print(baseline_cli.report(comparison, cube, profile, args.baseline, args.top_k))
            print(f"wrote   {out} ({fmt}, {size / 1e6:.2f} MB)")
    if args.json:
        document = {"model": args.model, "model_name": cube.meta["model_name"], "dtype": cube.meta["dtype"],
                    "device": cube.meta["device"], "backend": cube.meta["backend"],
                    "load_seconds": args.load_seconds, "prompts": results}
        print(json.dumps(document, indent=2))
    return 0


def _trace_result(cube, tokens: int, out: str, fmt: str, size: int, rows: int, comparison) -> dict:
    """One prompt's line of `trace --json`: what the text output shows, as numbers."""
    result = {"tokens": tokens, "layers": cube.num_layers, "attention_layers": len(cube.attention_layers),
              "forward_ms": cube.meta["seconds"] * 1e3, "out": out, "format": fmt, "bytes": size,
              "peak_energy": [{"layer": name, "peak_energy": peak, "at_token": t, "token": token, "mean_std": std}
                              for name, peak, t, token, std in summary_rows(cube, rows)]}
    if comparison is not None:
        result["baseline"] = [{"layer": layer, "batch": b, "token": t, "metric": metric, "z": z, "percentile": pct}
                              for layer, b, t, metric, z, pct in comparison.top(rows)]
    return result


def summary_rows(cube, rows: int) -> list[tuple[str, float, int, str, float]]:
    """The `rows` layers of batch item 0 whose energy (L2 norm of a token's activation) peaks
    highest: (layer, peak, token index, token text, mean of the per-token std). Layers with NaN or
    Inf come first, with the first token where one appears."""
    entries = []
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: handled below
        for i, name in enumerate(cube.layer_names):
            layer = cube.layer(i)[0]  # [tokens of its axis, metrics] of the first sequence
            energy = layer[:, cube.metrics.index("energy")] if "energy" in cube.metrics else np.zeros(0)
            std = layer[:, cube.metrics.index("std")] if "std" in cube.metrics else None
            real = ~(cube.padding_mask[0] if cube.padding_mask is not None and cube.token_axis(i) == "tokens"
                     else np.zeros(energy.shape, bool))[: energy.shape[0]]
            bad = ~np.isfinite(energy) & real
            finite = np.isfinite(energy)
            if bad.any():
                t = int(np.argmax(bad))
                entries.append((0, -np.inf, name, t, i, std, float(energy[t])))
            elif finite.any():
                t = int(np.argmax(np.where(finite, energy, -np.inf)))
                entries.append((1, -float(energy[t]), name, t, i, std, float(energy[t])))
        entries.sort(key=lambda e: (e[0], e[1]))
        picked = []
        for _, _, name, t, i, std, peak in entries[:rows]:
            axis = cube.tokens if cube.token_axis(i) == "tokens" else cube.decoder_tokens
            mean_std = float(np.nanmean(std)) if std is not None and np.isfinite(std).any() else float("nan")
            picked.append((name, peak, t, axis[0][t], mean_std))
    return picked


def summary_table(cube, rows: int) -> str:
    """summary_rows as the table `trace` prints."""
    width = _name_width(cube)
    lines = [f"{'layer':<{width}}  {'peak energy':>11}  {'at token':<16}  {'mean std':>9}"]
    for name, peak, _, token, mean_std in summary_rows(cube, rows):
        shown = f"{peak:11.3f}" if np.isfinite(peak) else f"{peak!s:>11}"
        lines.append(f"{name:<{width}}  {shown}  {repr(token)[:16]:<16}  {mean_std:9.4f}")
    return "\n".join(lines)


def _name_width(cube) -> int:
    return max([len("layer")] + [len(n) for n in cube.layer_names])


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="recon-fast", description="Fast activation tracing for transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    _trace_parser(sub)
    heads_cli.add_parser(sub)
    attribution_cli.add_parsers(sub)
    view_cli.add_parser(sub)
    dataset_cli.add_parser(sub, _add_model_args)
    cache_activations_cli.add_parser(sub, _add_model_args)
    return parser


def _one_line(exc: BaseException) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    argv = attribution_cli.hexray_argv(sys.argv[1:] if argv is None else list(argv))
    try:
        args = build_parser().parse_args(argv)
        args.started = time.perf_counter()  # the load's line says how long since, imports included
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return exc.code if isinstance(exc.code, int) else 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            code = args.run(args)
        except KeyboardInterrupt:
            code, error = 130, "interrupted"
        except (ModelNotFound, ValueError, KeyError, TypeError, OSError) as exc:
            code, error = 2, _one_line(exc)
        except Exception as exc:  # a bug or a model's own failure: still one line
            if os.environ.get("RECON_FAST_TRACEBACK"):
                raise
            code, error = 1, f"{type(exc).__name__}: {_one_line(exc)} (RECON_FAST_TRACEBACK=1 shows where)"
        else:
            error = None
    _report_warnings(caught)
    if error is not None:
        print(f"recon-fast: {error}", file=sys.stderr)
    return code


def _report_warnings(caught) -> None:
    """recon_fast's own warnings as one line each on stderr; anyone else's as Python shows them."""
    seen = set()
    for w in caught:
        ours = issubclass(w.category, UserWarning) and str(w.filename).startswith(_PACKAGE_DIR)
        if not ours:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif str(w.message) not in seen:
            seen.add(str(w.message))
            print(f"recon-fast: warning: {_one_line(w.message)}", file=sys.stderr)
