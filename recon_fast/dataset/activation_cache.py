"""cache_activations: every token's output vector of the named modules over a dataset, written as
the folder SAELens trains from (recon_fast.dataset.activation_format; sae-lens 6.54.12).

    from recon_fast.dataset import cache_activations
    cache_activations(model, tokenizer, "docs.jsonl", "cache/", hooks="model.layers.6", context_size=128)
    # SAELens: LanguageModelSAERunnerConfig(use_cached_activations=True, cached_activations_path="cache/",
    #          hook_name="model.layers.6", context_size=128, ...)

Documents become windows as SAELens's runner makes them (activation_windows); batches of whole
windows run through the model with hooks (activation_capture) whose outputs land in host shard
buffers, written as they fill by a background thread (activation_shards). Under torchrun every
rank reads the source and walks the same windows; shard k is computed and written by rank
k % world_size, so N ranks write exactly the files one process would. Rank 0 writes the index
(dataset_info.json, state.json) and manifest.json, last, once every rank is done. --resume keeps
each shard whose file holds exactly the plan's windows and computes the rest."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from recon_fast.cube.provenance import model_provenance
from recon_fast.dataset import activation_format, activation_shards, activation_windows, distributed, sources, writing
from recon_fast.dataset import progress as progress_bars
from recon_fast.dataset.activation_capture import PROBE_TOKENS, ActivationCapture, hook_names
from recon_fast.trace.input_limits import position_limit
from recon_fast.trace.model_inputs import forward_takes, model_device

FORMAT = "recon-fast activation cache 1"
MANIFEST = "manifest.json"
SHARD_BYTES = 256 * 2**20  # a shard's activations when windows_per_shard is not given (two are in memory)
_TEMPORARY = re.compile(r"\.(data-\d+\.arrow)\.[a-z0-9_]{8}\.tmp")


def cache_activations(model: torch.nn.Module, tokenizer, source: "str | os.PathLike | Iterable",
                      out_dir: str | os.PathLike,
                      *, hooks: str | Iterable[str], context_size: int = 128, dtype: str = "float32",
                      tokens: int | None = None, shuffle: bool = False, seed: int = 42, prepend_bos: bool = True,
                      batch_tokens: int = 8192, windows_per_shard: int | None = None, text_field: str = "text",
                      resume: bool = False, progress: bool | None = None) -> dict:
    """Writes `out_dir` (see the module) and returns its manifest. Call it on every rank with the
    same arguments under torchrun.

    source: as trace_dataset's (.jsonl, .txt, folder of .txt, .parquet, HF Dataset, iterable of
    strings). hooks: "NAME[,NAME...]" or a list: module names (the cache's column names, SAELens's
    hook_name) or presets (residual, attn, mlp, components, blocks+components). dtype: float32,
    float16, or bfloat16 (bfloat16-rounded values in float32 columns: Arrow has no bfloat16).
    tokens: at most tokens // context_size windows (SAELens's training_tokens). shuffle: each
    shard's windows in a seeded order, and the shards in one in state.json. prepend_bos: SAELens's
    (BOS at each window's start). batch_tokens: windows per forward = batch_tokens // context_size.
    windows_per_shard: rounded down to whole batches (default: ~256 MiB of activations)."""
    activation_format.check_dtype(dtype)
    for name, value in (("context_size", context_size), ("batch_tokens", batch_tokens)):
        if not isinstance(value, int) or value < (2 if name == "context_size" else 1):
            raise ValueError(f"{name} must be an integer, {2 if name == 'context_size' else 1} or more, got {value!r}")
    if tokens is not None and tokens < context_size:
        raise ValueError(f"tokens ({tokens}) must be at least context_size ({context_size}): one window")
    if windows_per_shard is not None and windows_per_shard < 1:
        raise ValueError(f"windows_per_shard must be 1 or more, got {windows_per_shard}")
    limit = position_limit(model)
    if limit is not None and context_size > limit:
        raise ValueError(f"context_size {context_size} is longer than {type(model).__name__}'s position table "
                         f"({limit} positions, max_position_embeddings)")
    sources.check_source(source, text_field)
    names = hook_names(model, hooks)
    device = model_device(model)
    with distributed.process_group(device) as ranks:
        return _cache(model, tokenizer, source, Path(out_dir), ranks, names=names, context_size=context_size,
                      dtype=dtype, tokens=tokens, shuffle=shuffle, seed=seed, prepend_bos=prepend_bos,
                      batch_tokens=batch_tokens, windows_per_shard=windows_per_shard, text_field=text_field,
                      resume=resume, progress=progress, device=device)


def _cache(model, tokenizer, source, out_dir: Path, ranks: distributed.Ranks, *, names, context_size, dtype, tokens,
           shuffle, seed, prepend_bos, batch_tokens, windows_per_shard, text_field, resume, progress, device) -> dict:
    started = time.time()
    if not resume and holds_cache(out_dir):
        raise ValueError(f"{out_dir} already holds an activation cache; pass --resume (resume=True) to continue it, "
                         "or choose a new folder")
    _remove_temporaries(out_dir, ranks)
    if ranks.rank == 0:
        shutil.rmtree(out_dir / progress_bars.FOLDER, ignore_errors=True)
    rule = activation_windows.policy(tokenizer, context_size, prepend_bos)
    provenance = model_provenance(model)
    capture = ActivationCapture(model, names, dtype, device, _forward_kwargs(model, names))
    with capture:
        hooks = capture.probe(rule.begin_id or 0, min(context_size, PROBE_TOKENS))  # {name: d_in}: a full forward
        batch_windows = max(1, batch_tokens // context_size)
        if windows_per_shard is None:
            window_bytes = context_size * sum(hooks.values()) * np.dtype(activation_format.DTYPES[dtype][0]).itemsize
            batches_per_shard = max(1, SHARD_BYTES // (window_bytes * batch_windows))
        else:
            batch_windows = min(batch_windows, windows_per_shard)
            batches_per_shard = max(1, windows_per_shard // batch_windows)
        plan = activation_windows.ShardPlan(batch_windows, batches_per_shard, ranks.world_size)
        max_windows = tokens // context_size if tokens is not None else None
        settings = {"format": FORMAT, "model_config_sha256": provenance.get("model_config_sha256"), "hooks": hooks,
                    "context_size": context_size, "dtype": dtype, "begin_id": rule.begin_id,
                    "separator_id": rule.separator_id, "strip_leading_bos": rule.strip_leading_bos,
                    "max_windows": max_windows, "batch_windows": batch_windows,
                    "batches_per_shard": batches_per_shard, "shuffle": shuffle, "seed": seed if shuffle else None,
                    "text_field": text_field}
        config_sha256 = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

        packer = activation_windows.WindowPacker(rule)
        documents = activation_windows.document_ids(tokenizer, sources.documents(source, text_field), rule)
        stream = activation_windows.windows(documents, packer, max_windows)
        decided = (progress_bars.enabled(progress), uuid.uuid4().hex) if ranks.rank == 0 else None
        shown, run_id = ranks.gather(decided)[0]  # rank 0's terminal decides for every rank
        writer = activation_shards.ShardWriter(out_dir, ranks.rank, context_size, dtype, config_sha256, shuffle, seed)
        buffers: list[activation_shards.ShardBuffer] = []
        mine, windows_total, shards_total, computed = [], 0, 0, 0
        with _progress(out_dir, ranks, shown, run_id, max_windows) as bar:
            try:  # on any failure, the shards in flight still land (complete) and the failure is raised
                for k, ids in plan.shards(stream):
                    windows_total += len(ids)
                    shards_total = k + 1
                    if plan.rank_of(k) != ranks.rank:
                        continue
                    entry = {"file": activation_format.shard_name(k), "rank": ranks.rank, "windows": len(ids)}
                    kept = resume and activation_shards.committed(out_dir, k, ids, config_sha256, shuffle, seed)
                    if kept:
                        mine.append({**entry, "resumed": True})
                        bar.advance(len(ids), len(ids) * context_size, resumed=True)
                        continue
                    if len(buffers) <= computed % 2:  # two, allocated as first needed: one fills, one is written
                        buffers.append(activation_shards.ShardBuffer(hooks, plan.windows_per_shard, context_size, dtype,
                                                                     pinned=device.type == "cuda"))
                    buffer = buffers[computed % 2]
                    writer.wait(buffer)  # its previous shard is on disk: it may be refilled
                    for start, batch in plan.batches(ids):
                        capture.run(capture.inputs(batch), buffer.destination(start, len(batch)))
                        bar.advance(len(batch), len(batch) * context_size)
                    writer.submit(buffer, k, ids, capture.copies_done())
                    mine.append({**entry, "resumed": False})
                    computed += 1
            except BaseException:
                writer.abandon()
                raise
            writer.finish(buffers)
            bar.rank_done()
            everyone = ranks.gather({"shards": mine})
            bar.draw_final()
    if windows_total == 0:
        raise ValueError(f"the source gives no complete window of {context_size} tokens ({packer.pending} tokens in "
                         "all, with the BOS and separators): give more text or a smaller context size")
    files = [activation_format.shard_name(k) for k in range(shards_total)]
    if shuffle:
        files = [files[i] for i in np.random.default_rng([seed]).permutation(shards_total)]
    shards = sorted((s for r in everyone for s in r["shards"]), key=lambda s: activation_format.shard_index(s["file"]))
    manifest = {
        "format": FORMAT, "model": provenance.get("model_name_or_path") or type(model).__name__,
        "config_sha256": config_sha256, "settings": settings, "hooks": hooks, "context_size": context_size,
        "dtype": dtype, "windows": windows_total, "tokens": windows_total * context_size,
        "tail_tokens_dropped": packer.pending if max_windows is None or windows_total < max_windows else 0,
        "world_size": ranks.world_size, "source": sources.describe(source), "files": files,
        "shards": [{k: v for k, v in s.items() if k != "resumed"} for s in shards],
        "resumed_shards": sum(s["resumed"] for s in shards), "seconds": time.time() - started,
        "saelens": saelens_settings(out_dir, hooks, context_size, prepend_bos),
        "provenance": provenance,
    }
    if ranks.rank == 0:
        _remove_beyond(out_dir, shards_total)
        writing.remove_temporaries([out_dir])  # every rank is done: what is left is debris
        activation_format.write_index(out_dir, hooks, context_size, dtype, files, config_sha256)
        with writing.atomic_write(out_dir / MANIFEST) as f:  # last: its presence says the cache is complete
            f.write(json.dumps(manifest, indent=1).encode())
    ranks.barrier()
    return manifest


def saelens_settings(out_dir: Path, hooks: dict[str, int], context_size: int, prepend_bos: bool) -> dict:
    """What a LanguageModelSAERunnerConfig takes to train from the cache (hook_name: any column)."""
    name, d_in = next(iter(hooks.items()))
    return {"sae_lens": activation_format.SAELENS_VERSION, "use_cached_activations": True,
            "cached_activations_path": str(out_dir), "hook_name": name, "d_in": d_in, "context_size": context_size,
            "prepend_bos": prepend_bos, "model_class_name": "AutoModelForCausalLM"}


def holds_cache(out_dir: Path) -> bool:
    """Whether `out_dir` has a cache's files (a complete one, or a killed run's shards)."""
    if not out_dir.is_dir():
        return False
    return (out_dir / MANIFEST).exists() or any(activation_format.shard_index(p.name) is not None
                                                for p in out_dir.iterdir())


def _forward_kwargs(model, names: list[str]) -> dict:
    """No KV cache (nothing generates), and logits at one position unless the unembedding is hooked:
    the [batch, tokens, vocab] product would otherwise be most of a small model's forward."""
    kwargs = {}
    if forward_takes(model, "use_cache", or_kwargs=True):
        kwargs["use_cache"] = False
    unembedding = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    modules = dict(model.named_modules())
    if (forward_takes(model, "logits_to_keep", or_kwargs=True) and unembedding is not None
            and not any(modules[n] is unembedding for n in names)):
        kwargs["logits_to_keep"] = 1
    return kwargs


def _progress(out_dir: Path, ranks: distributed.Ranks, shown: bool, run_id: str, total_windows: int | None):
    """dataset.progress's bars per rank, counting windows (ETA when the number of windows is known:
    with tokens=..., else the rate alone)."""
    if not shown:
        return progress_bars.Silent()
    return progress_bars.RankProgress(out_dir, ranks.rank, ranks.world_size, run_id,
                                      total_windows if ranks.rank == 0 else None, ranks.rank == 0,
                                      command="cache-activations", unit="window")


def _remove_temporaries(out_dir: Path, ranks: distributed.Ranks) -> None:
    """A killed run's temporaries of this rank's shards (another rank may be writing its own now),
    and rank 0's of the index files. Called before this run writes anything."""
    if not out_dir.is_dir():
        return
    names = {m[1] for m in map(_TEMPORARY.fullmatch, (p.name for p in out_dir.iterdir())) if m is not None}
    mine = tuple(n for n in names if activation_format.shard_index(n) % ranks.world_size == ranks.rank)
    if ranks.rank == 0:
        mine += (activation_format.DATASET_INFO, activation_format.STATE, MANIFEST)
    writing.remove_temporaries([out_dir], names=mine)


def _remove_beyond(out_dir: Path, count: int) -> None:
    """Shard files numbered past this run's last (a folder's debris): the folder holds this run alone."""
    for path in out_dir.iterdir():
        k = activation_format.shard_index(path.name)
        if k is not None and k >= count:
            path.unlink()
