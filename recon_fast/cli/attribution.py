"""The `attribute`, `cot` and `residual` commands of the `recon-fast` program, printing HexRay's
console formats (`- MLP  L9 : +46.16 (24.3%)`, bar charts per chain-of-thought step) from
recon_fast.attribution (direct, chain_of_thought, logit_lens)."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np

from recon_fast.atomic_files import check_writable
from recon_fast.attribution_labels import parse_label
from recon_fast.cli import checks as cli_checks
from recon_fast.cli import loading, options, report
from recon_fast.trace.model_inputs import token_texts

BAR_WIDTH = 25  # blocks of the longest bar (HexRay's)
_ESCAPED = re.compile(r'[\x00-\x1f\x7f"\\]')


def add_parsers(sub) -> None:
    p = sub.add_parser("attribute", help="direct logit attribution of the predicted token")
    _common(p, "attribution")
    p.add_argument("--token-index", "--position", dest="position", type=int, default=-1,
                   help="position to attribute (default: -1, the last token)")
    p.add_argument("--target", default=None, help="token to attribute: its text or id (default: the prediction)")
    p.add_argument("--versus", default=None,
                   help="a second token (text or id): attribute logit(target) - logit(versus), 'why A rather than B' "
                        "(default: none)")
    options.add_count(p, "--top-k-neurons", default=0, minimum=0, aliases=("--neurons",),
                      help="split every MLP into its neurons; print the top K neurons overall and per layer (0: no split)")
    options.add_count(p, "--top-k-sources", default=0, minimum=0, aliases=("--sources",),
                      help="split every head over the source tokens it read from; print the top K for the top heads "
                           "(each head keeps its max(K, --top-k) largest sources, enough for what is printed, and "
                           "one remainder L{i}.H{h}.S_rest, in --json and --report too; 0: no split)")
    p.add_argument("--all-sources", action="store_true",
                   help="with --top-k-sources: keep every source term of every head (layers x heads x tokens terms) "
                        "in --json and --report")
    p.add_argument("--share", choices=("top", "total"), default="top",
                   help="percent of the listed terms' magnitude (HexRay's, default) or of all terms")
    p.add_argument("--logit-debug", action="store_true", help="also print the model's logit beside the terms' sum")
    p.add_argument("--cot-debug", action="store_true", help="run the chain-of-thought trace instead (HexRay's flag)")
    p.set_defaults(run=cmd_attribute)

    p = sub.add_parser("cot", help="attribution of every chain-of-thought step, one forward pass")
    _common(p, "cot")
    p.set_defaults(run=cmd_cot)

    p = sub.add_parser("residual", help="residual stream per layer: norms and the logit lens")
    options.add_shared_options(p, "also write the JSON document to FILE (several prompts: FILE-1.json, ...)")
    options.add_count(p, "--top-k", default=1, aliases=("--lens-k",), help="logit-lens tokens per position")
    options.add_count(p, "--max-positions", default=10, metavar="N", help="last positions shown and unembedded")
    p.add_argument("--report", metavar="DIR", default=None, help="write residual.json and residual.png there")
    p.add_argument("--scale", choices=("log", "linear"), default="log",
                   help="colour scale of residual.png's norms (default: log; the norm of an attention-sink "
                        "position can be 1000x the others', which a linear scale shows as one bright cell)")
    p.set_defaults(run=cmd_residual)


def _common(p: argparse.ArgumentParser, report_name: str) -> None:
    options.add_shared_options(p, "also write the JSON document to FILE, which `recon-fast view` reads "
                                  "(several prompts: FILE-1.json, ...)")
    options.add_count(p, "--top-k", default=10, aliases=("--top-k-attribution",), help="contributors listed")
    p.add_argument("--per-head", action="store_true", help="split attention into heads")
    p.add_argument("--report", metavar="DIR", default=None,
                   help=f"write {report_name}.json and a PNG heatmap there")


# ---- formatting ---------------------------------------------------------------------------------
def display_names(labels: list[str]) -> dict[str, str]:
    """HexRay's names: "MLP  L9 ", "Attn L11", "Head L3.H7"; a neuron "MLP  L3.N12", a head's share
    from source position 4 "Head L3.H7<-4"; other terms by name (recon_fast.attribution_labels'
    word and place of each kind). Layer fields are padded to a common width so the colons line up."""
    parts = {}
    for label in labels:
        term = parse_label(label)
        parts[label] = (label, None) if term is None else (term.kind.word, term.where)
    where_width = max([len(w) for _, w in parts.values() if w] or [0])
    names = {label: f"{kind:<4} {where:<{where_width}}" if where else kind for label, (kind, where) in parts.items()}
    width = max(len(n) for n in names.values())
    return {label: name.ljust(width) for label, name in names.items()}


def contributor_lines(top: list[tuple[str, float, float]]) -> list[str]:
    names = display_names([label for label, _, _ in top])
    return [f"- {names[label]}: {value:+.2f} ({percent:.1f}%)" for label, value, percent in top]


def bar_lines(top: list[tuple[str, float, float]]) -> list[str]:
    names = display_names([label for label, _, _ in top])
    longest = max((percent for _, _, percent in top), default=0.0) or 1.0
    lines = []
    for label, value, percent in top:
        bar = "█" * math.floor(percent / longest * BAR_WIDTH + 1e-9)  # HexRay rounds bars down
        signed = -percent if value < 0 else percent  # a negative contributor shows its sign
        lines.append(f"{names[label]} {bar:<{BAR_WIDTH}} {signed:5.1f}%")
    return lines


def shown_token(text: str) -> str:
    """A token as it goes between double quotes: control characters, quotes and backslashes
    escaped as in JSON (HexRay printed a newline token raw, which broke its own layout)."""
    return _ESCAPED.sub(lambda m: json.dumps(m.group())[1:-1], text)


def token_header(attribution, where: str | None = None, row: int = 0) -> str:
    where = where or f"index {attribution.position}"
    versus = f' versus "{shown_token(attribution.versus_text[row])}"' if attribution.versus_text else ""
    return f'Token: "{shown_token(attribution.target_text[row])}"{versus} ({where})'


def neuron_lines(attribution, k: int) -> list[str]:
    """The k neurons of largest magnitude overall, then per layer."""
    lines = [f"Top {k} Neurons:"]
    lines += [f"- {label}: {value:+.3f}" for label, value in attribution.top_neurons(k)]
    lines.append(f"Top {k} Neurons per Layer:")
    for layer in range(attribution.n_layers):
        top = attribution.top_neurons(k, layer=layer)
        lines.append(f"- L{layer}: " + ", ".join(f"N{parse_label(label).neuron} {value:+.3f}" for label, value in top))
    return lines


def source_lines(attribution, k: int, heads: int, tokens: list[str]) -> list[str]:
    """For the `heads` heads of largest term, the k source tokens each moved the most logit from."""
    totals = sorted(attribution.head_totals().items(), key=lambda item: -abs(item[1]))[:heads]
    lines = [f"Top {len(totals)} Heads by Source Token:"]
    for label, total in totals:
        head = parse_label(label)
        shown = ", ".join(f'"{shown_token(tokens[j])}"@{j} {value:+.3f}'
                          for j, value in attribution.top_sources(head.layer, head.head, k))
        lines.append(f"- Head {label} ({total:+.3f}): {shown}")
    return lines


def _token_argument(text: str | None):
    """A --target/--versus value: an id when it is a number, else the token's text."""
    return int(text) if text is not None and text.lstrip("-").isdigit() else text


# ---- commands -----------------------------------------------------------------------------------
def _check(args, report_name: str) -> list[str]:
    """What can be checked before the model loads: the prompts, model, device, dtype, counts,
    --report and -o. The prompts to run."""
    prompts = cli_checks.prompts(args)
    cli_checks.check_model(args)
    if args.report:
        check_writable(Path(args.report) / f"{report_name}.json")
    args.outs = report.json_outputs(args.out, len(prompts))
    return prompts


def _inputs(tokenizer, prompt: str, chat: bool):
    from recon_fast.cli.prompt_io import encode

    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat: the tokenizer has no chat template")
    return encode(tokenizer, prompt, chat)


def _run_each(args, prompts: list[str], report_name: str, one) -> int:
    """one(prompt, report name) -> (document, written files) for each prompt, then --json's
    document(s) on stdout, -o's files, the written files' lines."""
    documents, written = [], []
    for n, (prompt, out) in enumerate(zip(prompts, args.outs), start=1):
        if len(prompts) > 1 and not args.json:
            print(f"{'' if n == 1 else chr(10)}prompt {n}/{len(prompts)}")
        document, files = one(prompt, report_name if len(prompts) == 1 else f"{report_name}-{n}")
        documents.append(document)
        if out is not None:
            files.append(report.write_json_file(out, document))
        if not args.json:
            report.print_written(files)
        written += files
    if args.json:
        print(report.json_text(documents[0] if len(documents) == 1 else documents))
        report.print_written(written, to_stderr=True)
    return 0


def check_target_versus(target: str | None, versus: str | None) -> None:
    """--target and --versus naming the same token (same text or same id): a difference of zero."""
    if versus is not None and target is not None and _token_argument(target) == _token_argument(versus):
        raise ValueError(f"--target and --versus are the same token ({target!r}): logit(A) - logit(A) is 0; "
                         "give two different tokens")


def cmd_attribute(args) -> int:
    if args.cot_debug:
        return cmd_cot(args)
    from recon_fast.attribution.direct import direct_logit_attribution

    if args.all_sources and not args.top_k_sources:
        raise ValueError("--all-sources keeps every source term of --top-k-sources K: give --top-k-sources too")
    check_target_versus(args.target, args.versus)
    prompts = _check(args, "attribution")
    model, tokenizer = loading.load(args)
    target = _token_argument(args.target)
    if args.versus is not None:
        target = (target, _token_argument(args.versus))
    sources = args.top_k_sources
    # The top --top-k terms overall and the top K sources of a head are each among that head's
    # max(K, --top-k) largest, so this many per head prints what the full split would print.
    source_top_k = None if args.all_sources or not sources else max(sources, args.top_k)

    def one(prompt: str, report_name: str):
        inputs = _inputs(tokenizer, prompt, args.chat)
        attribution = direct_logit_attribution(model, inputs, position=args.position, target=target,
                                               per_head=args.per_head, per_neuron=args.top_k_neurons > 0,
                                               by_source=sources > 0, source_top_k=source_top_k,
                                               tokenizer=tokenizer)
        # The prompt's tokens as text: the viewer names a source term by its token ("<- token ' Paris' (5)").
        tokens = token_texts(tokenizer, inputs["input_ids"].tolist())[0]
        document = {"prompt": prompt, "model": args.model, "tokens": tokens, **attribution.to_dict()}
        written = (_attribution_report(args.report, report_name, document, attribution, args.model)
                   if args.report else [])
        if not args.json:
            _print_attribution(args, attribution, tokens)
        return document, written

    return _run_each(args, prompts, "attribution", one)


def _print_attribution(args, attribution, tokens: list[str]) -> None:
    print(token_header(attribution))
    print("Top Contributors to Final Logit" + (" Difference:" if attribution.versus_text else ":"))
    print("\n".join(contributor_lines(attribution.top(args.top_k, share=args.share))))
    if args.top_k_neurons:
        print("\n".join(neuron_lines(attribution, args.top_k_neurons)))
    if args.top_k_sources:
        print("\n".join(source_lines(attribution, args.top_k_sources, args.top_k, tokens)))
    if attribution.note:
        print(f"Note: {attribution.note}")
    if args.logit_debug:
        total, logit = float(attribution.total()[0]), float(attribution.logit[0])
        what = "logit difference " if attribution.versus_text else ""
        print(f"Logit check: model {what}{logit:+.4f}, sum of {len(attribution.labels)} terms {total:+.4f} "
              f"(difference {total - logit:+.2e})")


def cmd_cot(args) -> int:
    from recon_fast.attribution.chain_of_thought import chain_of_thought, steps_to_dict

    if args.chat:
        raise ValueError("--chat: cot splits the prompt's own text into steps; a chat template's markup would "
                         "become steps too (run `attribute --chat` per step instead)")
    prompts = _check(args, "cot")
    model, tokenizer = loading.load(args)

    def one(prompt: str, report_name: str):
        steps = chain_of_thought(model, tokenizer, prompt, per_head=args.per_head)
        document = {"prompt": prompt, "model": args.model, "steps": steps_to_dict(steps)}
        written = _cot_report(args.report, document, steps, args.model, report_name) if args.report else []
        if not args.json:
            print("Chain of Thought Attribution Trace (Console):")
            for step in steps:
                print()
                print(f"Step {step.number}: {step.text}")
                print(token_header(step.attribution, where=f"token {step.token_index}"))
                print("\n".join(bar_lines(step.attribution.top(args.top_k))))
            if written:
                print()
        return document, written

    return _run_each(args, prompts, "cot", one)


def cmd_residual(args) -> int:
    from recon_fast.attribution.logit_lens import logit_lens

    prompts = _check(args, "residual")
    model, tokenizer = loading.load(args)

    def one(prompt: str, report_name: str):
        inputs = _inputs(tokenizer, prompt, args.chat)  # once: its length picks the positions shown
        length = inputs["input_ids"].shape[1]
        shown = list(range(max(0, length - args.max_positions), length))
        lens = logit_lens(model, inputs, k=args.top_k, positions=shown, tokenizer=tokenizer)
        document = {"prompt": prompt, "model": args.model, **lens.to_dict()}
        written = (_residual_report(args.report, document, lens, args.model, args.scale, report_name)
                   if args.report else [])
        if not args.json:
            print("\n".join(residual_table(lens)))
        return document, written

    return _run_each(args, prompts, "residual", one)


def residual_table(lens) -> list[str]:
    """Per layer: the residual's shape, and at each position the lens was computed at, the norm
    and the lens' top token."""
    length = lens.shape[1]
    shown = lens.positions
    cell = 11

    def fit(text: str) -> str:
        text = repr(text)
        return text if len(text) <= cell else text[:cell - 2] + "…'"

    shape = str(list(lens.shape))
    lines = [f"Residual stream: {len(lens.layers)} readings (embed + {len(lens.layers) - 1} blocks), "
             f"shape {shape} each" + (f"; last {len(shown)} of {length} positions" if len(shown) < length else ""),
             f"{'layer':<6} {'shape':<{len(shape)}} {'':<5}" + "".join(f"{p:>{cell + 1}}" for p in shown),
             f"{'':<6} {'':<{len(shape)}} {'token':<5}" + "".join(f"{fit(lens.tokens[0][p]):>{cell + 1}}" for p in shown)]
    for i, layer in enumerate(lens.layers):
        norms = "".join(f"{float(lens.norms[i, 0, p]):>{cell + 1}.2f}" for p in shown)
        lines.append(f"{layer:<6} {shape:<{len(shape)}} {'norm':<5}{norms}")
        top = [lens.predicted[i][0][j] if lens.predicted else str(int(lens.token_ids[i, 0, j, 0]))
               for j in range(len(shown))]
        lines.append(f"{'':<6} {'':<{len(shape)}} {'lens':<5}" + "".join(f"{fit(t):>{cell + 1}}" for t in top))
    return lines


def attribution_grid(attribution, row: int = 0) -> tuple[list[str], list[str], np.ndarray]:
    """(row labels, column labels, [layers, columns]) for the picture: Attribution.grid_with_mlp(),
    its columns named as the figure shows them."""
    rows, columns, grid = attribution.grid_with_mlp(row)
    return rows, [{"attn": "Attn", "mlp": "MLP"}.get(c, c) for c in columns], grid.double().numpy()


def _target_words(attribution, row: int = 0) -> str:
    versus = f' rather than "{shown_token(attribution.versus_text[row])}"' if attribution.versus_text else ""
    return f'"{shown_token(attribution.target_text[row])}"{versus}'


def attribution_figure(attribution, model_name: str | None = None):
    """The attribution picture: layers x (Attn, MLP), or with per_head layers x (heads..., MLP)."""

    rows, columns, grid = attribution_grid(attribution)
    total = float(attribution.values[0].sum())
    rest = total - float(grid.sum())
    what = "per head, with each layer's MLP" if attribution.per_head else "attention and MLP per layer"
    title = (f"Direct logit attribution of {_target_words(attribution)} at position {attribution.position}: "
             f"{what}" + (f" ({model_name})" if model_name else ""))
    caption = (f"all terms sum to {total:+.2f}; outside the grid (embeddings, biases): {rest:+.2f}. "
               "Red raises the logit, blue lowers it.")
    return report.heatmap_figure(grid, rows, columns, title, "logit contribution", scale="signed",
                                 xlabel="head | MLP" if attribution.per_head else None, ylabel="layer",
                                 separators=(len(columns) - 1,) if attribution.per_head else (),
                                 caption=caption, annotate=3)


def _attribution_report(folder: str, name: str, document: dict, attribution, model_name=None) -> list[Path]:

    json_path = report.write_json(folder, name, document)
    return [json_path, report.save_png(attribution_figure(attribution, model_name), folder, name)]


def step_label(step, width: int = 32) -> str:
    """A CoT column's label: the step's number and (shortened) text, and the token it predicts."""
    from recon_fast.cli.report import shorten

    return f'{step.number}. {shorten(step.text, width)}\n-> "{shorten(shown_token(step.attribution.target_text[0]), 12)}"'


def cot_figure(steps, model_name: str | None = None):
    """A row per layer component (with per_head: heads and MLP), a column per step."""

    components, matrix = [], []
    for step in steps:
        rows, parts, grid = attribution_grid(step.attribution)
        components = [f"{r} {c}" for r in rows for c in parts]
        matrix.append(grid.flatten())
    title = "Direct logit attribution per chain-of-thought step" + (f" ({model_name})" if model_name else "")
    return report.heatmap_figure(np.stack(matrix, axis=1), components, [step_label(s) for s in steps], title,
                                 "logit contribution", scale="signed", ylabel="component", annotate=3,
                                 rotate_columns=30 if len(steps) > 3 else 0,
                                 caption="each step attributes the token its last token predicts")


def _cot_report(folder: str, document: dict, steps, model_name=None, name: str = "cot") -> list[Path]:

    json_path = report.write_json(folder, name, document)
    return [json_path, report.save_png(cot_figure(steps, model_name), folder, name)]


def residual_figure(lens, model_name: str | None = None, scale: str = "log"):
    """Layers x tokens, the residual stream's L2 norm on a sequential (by default log) scale."""

    title = "Residual stream L2 norm per layer and token" + (f" ({model_name})" if model_name else "")
    tokens = [f"{i} {report.shorten(shown_token(t), 12)}" for i, t in enumerate(lens.tokens[0])]
    return report.heatmap_figure(lens.norms[:, 0].double().numpy(), lens.layers, tokens, title, "L2 norm",
                                 scale=scale, xlabel="token", ylabel="layer")


def _residual_report(folder: str, document: dict, lens, model_name=None, scale: str = "log",
                     name: str = "residual") -> list[Path]:

    json_path = report.write_json(folder, name, document)
    return [json_path, report.save_png(residual_figure(lens, model_name, scale), folder, name)]


def hexray_argv(argv: list[str]) -> list[str]:
    """HexRay was invoked without a command (`hexray.py --prompt ... --top-k-attribution 10`):
    such a command line runs `attribute` (or `cot` with --cot-debug)."""
    if argv and argv[0].startswith("--") and argv[0] not in ("--help", "--version") and "--prompt" in argv:
        return ["attribute", *argv]
    return argv
