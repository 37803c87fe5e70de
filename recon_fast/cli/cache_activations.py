"""The `cache-activations` command of the `recon-fast` program: every token's output vector of the
named modules over a dataset, written as the folder SAELens trains from
(recon_fast.dataset.activation_cache). Runs under `torchrun --nproc_per_node N` as trace-dataset
does. Arguments, hook names and the context size (against the model's config, on the meta device)
are checked before the model loads.

Here --dtype is the stored dtype, as in SAELens's configs; the model's own dtype is --model-dtype
(the other commands' --dtype)."""

from __future__ import annotations

import argparse
from pathlib import Path

from recon_fast.cli import checks as cli_checks


def add_parser(sub, add_model_args) -> None:
    # "resolve": the model options' --dtype gives way to this command's (the stored dtype).
    p = sub.add_parser("cache-activations", conflict_handler="resolve",
                       help="store every token's activations of chosen modules over a dataset, as the folder SAELens "
                            "trains from (cached_activations_path)")
    p.add_argument("--data", required=True, metavar="PATH",
                   help=".jsonl, .txt (one document per line), .parquet, or a folder of .txt files (one each)")
    p.add_argument("--text-field", default="text", help="the text's key (JSONL) or column (Parquet) (default: text)")
    p.add_argument("--hooks", required=True, metavar="NAME[,NAME...]",
                   help="module names (each a column, SAELens's hook_name) or presets: residual, attn, mlp, "
                        "components, blocks+components")
    p.add_argument("-o", "--out", required=True, metavar="DIR",
                   help="the output folder: data-*.arrow, dataset_info.json, state.json (HF datasets), manifest.json")
    add_model_args(p)
    p.add_argument("--model-dtype", dest="dtype", default=None,
                   help="the model's dtype: float32, bfloat16, float16 (default: the model's)")
    p.add_argument("--dtype", dest="cache_dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="the stored values' dtype; bfloat16 is held in float32 columns (Arrow has no bfloat16) "
                        "(default: float32)")
    p.add_argument("--context-size", type=int, default=128, metavar="N",
                   help="tokens per window, documents packed as SAELens's runner packs them (default: 128)")
    p.add_argument("--tokens", type=int, default=None, metavar="N",
                   help="stop after N // context-size windows (SAELens's training_tokens; default: the whole source)")
    p.add_argument("--shuffle", action="store_true",
                   help="each shard's windows in a seeded order, and the shards in one (default: source order)")
    p.add_argument("--seed", type=int, default=42, help="--shuffle's seed (default: 42)")
    p.add_argument("--batch-tokens", type=int, default=8192,
                   help="tokens per forward: batch-tokens // context-size windows (default: 8192)")
    p.add_argument("--windows-per-shard", type=int, default=None, metavar="N",
                   help="windows per Arrow file, rounded down to whole batches (default: ~256 MiB of activations)")
    p.add_argument("--resume", action="store_true", help="keep the shards an earlier run into --out committed "
                   "(same settings) and compute the rest")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a bar per rank (windows, tokens/s, ETA with --tokens) on rank 0's stderr "
                        "(default: when it is a terminal)")
    p.set_defaults(run=run)


def check(args) -> None:
    """Everything that needs no model weights, before the load."""
    from recon_fast.dataset import activation_cache, sources

    if args.context_size < 2:
        raise ValueError(f"--context-size must be 2 or more, got {args.context_size}")
    if args.tokens is not None and args.tokens < args.context_size:
        raise ValueError(f"--tokens ({args.tokens}) must be at least --context-size ({args.context_size}): one window")
    for name in ("batch_tokens", "windows_per_shard"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be 1 or more, got {value}")
    sources.check_source(args.data, args.text_field)
    cli_checks.check_model(args)
    if not args.resume and activation_cache.holds_cache(Path(args.out)):
        raise ValueError(f"--out {args.out} already holds an activation cache; add --resume to continue it, or "
                         "choose a new folder")
    skeleton = cli_checks.model_skeleton(args.model)
    if skeleton is not None:  # else cache_activations checks the same after the load, before any forward
        from recon_fast.dataset.activation_capture import hook_names
        from recon_fast.trace.input_limits import position_limit

        try:
            hook_names(skeleton, args.hooks)
        except ValueError as exc:  # "hooks: ..." as the function says it: the option's name
            raise ValueError(f"--{exc}") from None
        limit = position_limit(skeleton)
        if limit is not None and args.context_size > limit:
            raise ValueError(f"--context-size {args.context_size} is longer than the model's position table "
                             f"({limit} positions)")


def run(args) -> int:
    from recon_fast.cli import loading
    from recon_fast.dataset import cache_activations, distributed

    check(args)
    ranks = distributed.from_environment()
    device = args.device
    if device is None and ranks.distributed:
        device = str(distributed.device_for(ranks))  # each rank its own GPU
    model, tokenizer = loading.load(args, device=device)
    manifest = cache_activations(model, tokenizer, args.data, args.out, hooks=args.hooks,
                                 context_size=args.context_size, dtype=args.cache_dtype, tokens=args.tokens,
                                 shuffle=args.shuffle, seed=args.seed, batch_tokens=args.batch_tokens,
                                 windows_per_shard=args.windows_per_shard, text_field=args.text_field,
                                 resume=args.resume, progress=args.progress)
    if ranks.rank == 0:
        resumed = manifest["resumed_shards"]
        seconds = max(manifest["seconds"], 1e-9)
        kept = f", {resumed} shard(s) kept from the earlier run" if resumed else ""
        print(f"cached  {manifest['windows']} windows x {manifest['context_size']} tokens ({manifest['tokens']} "
              f"tokens) of {len(manifest['hooks'])} hook(s) on {manifest['world_size']} rank(s) in {seconds:.1f} s "
              f"({manifest['tokens'] / seconds:.0f} tok/s{kept})")
        hooks = ", ".join(f"{name} [{manifest['context_size']}, {d_in}]" for name, d_in in manifest["hooks"].items())
        print(f"wrote   {args.out}: {len(manifest['files'])} shard(s), {manifest['dtype']}: {hooks}")
        saelens = manifest["saelens"]
        print(f"SAELens LanguageModelSAERunnerConfig(use_cached_activations=True, cached_activations_path="
              f"{saelens['cached_activations_path']!r}, hook_name={saelens['hook_name']!r}, "
              f"context_size={saelens['context_size']}, ...) with sae d_in={saelens['d_in']}")
    return 0
