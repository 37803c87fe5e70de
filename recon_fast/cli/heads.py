"""`recon-fast heads`: per attention layer, which heads are sharp or diffuse (entropy), which are
attention sinks (sink mass), previous-token heads and self heads, from one traced forward pass
with attention statistics (Tracer(attention="stats")); `--report DIR` adds a JSON of the per-head
means and a PNG of layers x heads heatmaps of mean sink mass and entropy."""

from __future__ import annotations

import argparse

import numpy as np

from recon_fast.cli import checks as cli_checks
from recon_fast.cli import loading, options
from recon_fast.kernels.attention_stats import ATTENTION_STATS
from recon_fast.trace.attention_stats_capture import SINK_TOKENS

# A head is named a sink / previous-token / self head when its mean weight there is at least this.
ROLE_THRESHOLD = 0.5
ROLES = (("sink", "sink_mass"), ("prev-token", "prev_weight"), ("self", "self_weight"))


def add_parser(sub) -> None:
    p = sub.add_parser("heads", help="name each layer's sharp, diffuse, sink, previous-token and self heads")
    options.add_shared_options(p, "also write the per-head means as JSON to FILE (several prompts: FILE-1.json, ...)")
    options.add_count(p, "--top-k", default=3, help="heads named per role and layer (more: '+N')")
    p.add_argument("--threshold", type=float, default=ROLE_THRESHOLD,
                   help=f"mean weight that makes a sink/prev-token/self head (default: {ROLE_THRESHOLD})")
    p.add_argument("--report", metavar="DIR", help="also write heads.json and heads.png (heatmaps) to DIR")
    p.set_defaults(run=cmd_heads)


def head_means(cube) -> dict[str, np.ndarray]:
    """Per statistic, [attn_layers, heads] means over batch item 0's real queries. Queries among
    the first SINK_TOKENS are left out when the prompt is longer (they can only look at sinks)."""
    skip = SINK_TOKENS if cube.axis_length("tokens") > 2 * SINK_TOKENS else 0
    return {name: cube.attention_head_means(name, from_token=skip) for name in ATTENTION_STATS}


def _head(h: int, value: float) -> str:
    return f"H{h} {value:.2f}"


def heads_table(layers: list[str], means: dict[str, np.ndarray], threshold: float, k: int = 3) -> str:
    width = max([len("layer")] + [len(n) for n in layers])
    lines = [f"{'layer':<{width}}  {'sharpest':<10}  {'most diffuse':<12}  "
             + "  ".join(f"{role + ' heads':<24}" for role, _ in ROLES).rstrip()]
    entropy = means["entropy"]
    for i, name in enumerate(layers):
        row = entropy[i]
        if not np.isfinite(row).any():
            lines.append(f"{name:<{width}}  (no real queries)")
            continue
        sharp = int(np.nanargmin(row))
        diffuse = int(np.nanargmax(row))
        cells = []
        for _, stat in ROLES:
            values = means[stat][i]
            picked = [h for h in np.argsort(-np.nan_to_num(values, nan=-1.0)) if values[h] >= threshold]
            cells.append(", ".join(_head(int(h), values[h]) for h in picked[:k])
                         + (f" +{len(picked) - k}" if len(picked) > k else "") or "-")
        lines.append(f"{name:<{width}}  {_head(sharp, row[sharp]):<10}  {_head(diffuse, row[diffuse]):<12}  "
                     + "  ".join(f"{c:<24}" for c in cells).rstrip())
    return "\n".join(lines)


def cmd_heads(args: argparse.Namespace) -> int:
    from recon_fast.cli.prompt_io import encode
    from recon_fast.cli import report
    from recon_fast.trace.tracer import Tracer

    prompts = cli_checks.prompts(args)
    if not 0 < args.threshold <= 1:
        raise ValueError(f"--threshold must be in (0, 1], got {args.threshold}")
    if args.report is not None:
        cli_checks.check_output(f"{args.report.rstrip('/')}/heads.json")
    outs = report.json_outputs(args.out, len(prompts))
    cli_checks.check_model(args)
    model, tokenizer = loading.load(args)
    documents = []
    for n, (prompt, out) in enumerate(zip(prompts, outs), start=1):
        with Tracer(model, tokenizer, attention="stats") as tracer:
            tracer.run(encode(tokenizer, prompt, args.chat))
        cube = tracer.cube
        means = head_means(cube)
        document = {"model": args.model, "prompt": prompt, "tokens": cube.tokens[0], "layers": cube.attention_layers,
                    "threshold": args.threshold, "means": {k: v for k, v in means.items() if k != "argmax"}}
        documents.append(document)
        if out is not None:
            report.write_json_file(out, document)
        if not args.json:
            if len(prompts) > 1:
                print(f"prompt {n}/{len(prompts)}")
            print(f"model   {cube.meta['model_name']} ({args.model}), {cube.axis_length('tokens')} tokens, "
                  f"{len(cube.attention_layers)} attention layers; head means over the prompt's queries")
            print(heads_table(cube.attention_layers, means, args.threshold, args.top_k))
        if args.report is not None:
            name = "heads" if len(prompts) == 1 else f"heads-{n}"
            heads = cube.attention_data.shape[2]
            json_path = report.write_json(args.report, name, document)
            png_path = report.write_layer_head_heatmaps(
                args.report, name,
                [(means["sink_mass"], f"Mean sink mass (first {SINK_TOKENS} keys)", "sink mass", (0.0, 1.0)),
                 (means["entropy"], "Mean attention entropy", "entropy (nats)", None)],
                row_labels=[f"L{i}" for i in range(len(cube.attention_layers))],
                column_labels=[f"H{h}" for h in range(heads)])
            report.print_written([json_path, png_path], to_stderr=args.json)
    if args.json:
        print(report.json_text(documents[0] if len(documents) == 1 else documents))
    report.print_written([out for out in outs if out is not None], to_stderr=args.json)
    return 0
