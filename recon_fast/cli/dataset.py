"""The `trace-dataset` command of the `recon-fast` program: every document of a JSONL, text or
Parquet file through the tracer into Parquet shards, a profile and a manifest
(recon_fast.dataset). The same command runs under `torchrun --nproc_per_node N` (each rank on its
own device, cuda:LOCAL_RANK or the CPU). Arguments are checked before the model loads."""

from __future__ import annotations

import argparse

from recon_fast.cli import checks as cli_checks
from recon_fast.kernels.stats_tables import ATTENTION_STATS_TABLE


def add_parser(sub, add_model_args) -> None:
    p = sub.add_parser("trace-dataset", help="trace every document of a dataset into Parquet shards and a profile "
                                             "(one process, or many under torchrun)")
    p.add_argument("--data", required=True, metavar="PATH",
                   help=".jsonl, .txt (one document per line), .parquet, or a folder of .txt files (one each)")
    p.add_argument("--text-field", default="text", help="the text's key (JSONL) or column (Parquet) (default: text)")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="the output folder: activations/, documents/, "
                   "attention/ (--attention stats), profile.json, manifest.json")
    add_model_args(p)
    p.add_argument("--layers", default="residual", help="a preset (all, residual, attn, mlp, components, "
                   "blocks+components) or a regex over module names (default: residual)")
    p.add_argument("--attention", choices=("stats",), default=None,
                   help=f"also per attention layer, document, head and token: {', '.join(ATTENTION_STATS_TABLE.names)} "
                        "(the attention/ table)")
    p.add_argument("--max-tokens", type=int, default=512, help="truncate each document to N tokens (default: 512)")
    p.add_argument("--batch-tokens", type=int, default=8192,
                   help="at most N tokens per batch, padding included (default: 8192)")
    p.add_argument("--docs-per-shard", type=int, default=512, help="documents per Parquet shard (default: 512)")
    p.add_argument("--resume", action="store_true", help="keep the intact shards of an earlier run into --out "
                   "(same settings) and trace the rest")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a bar per rank (documents, tokens/s, ETA) on rank 0's stderr (default: when it is a terminal)")
    p.set_defaults(run=run)


def run(args) -> int:
    from recon_fast.cli import loading
    from recon_fast.dataset import distributed, sources, trace_dataset

    for name in ("max_tokens", "batch_tokens", "docs_per_shard"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be 1 or more, got {getattr(args, name)}")
    sources.check_source(args.data, args.text_field)
    cli_checks.check_model(args)
    cli_checks.check_layers(args.layers, args.model)
    ranks = distributed.from_environment()
    device = args.device
    if device is None and ranks.distributed:
        device = str(distributed.device_for(ranks))  # each rank its own GPU
    model, tokenizer = loading.load(args, device=device)
    manifest = trace_dataset(model, tokenizer, args.data, args.out, layers=args.layers, max_tokens=args.max_tokens,
                             batch_tokens=args.batch_tokens, text_field=args.text_field,
                             docs_per_shard=args.docs_per_shard, resume=args.resume, attention=args.attention,
                             progress=args.progress)
    if ranks.rank == 0:
        padding = 1 - manifest["tokens"] / max(manifest["padded_tokens"], 1)
        resumed = sum(r["resumed_shards"] for r in manifest["ranks"])
        print(f"traced  {manifest['documents']} documents, {manifest['tokens']} tokens on {manifest['world_size']} "
              f"rank(s) in {manifest['seconds']:.1f} s ({manifest['tokens'] / max(manifest['seconds'], 1e-9):.0f} tok/s, "
              f"padding {padding:.1%}{f', {resumed} shard(s) kept from the earlier run' if resumed else ''})")
        attention = (f", attention statistics of {len(manifest['attention_layers'])} layers x "
                     f"{manifest['attention_heads']} heads" if manifest["attention_layers"] else "")
        print(f"wrote   {args.out}: {len(manifest['shards'])} shard(s), {len(manifest['layers'])} layers x "
              f"{len(manifest['metrics'])} metrics{attention}, profile.json, manifest.json")
    return 0
