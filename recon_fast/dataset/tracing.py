"""trace_dataset: every document of a source through the Tracer, batch by batch, into Parquet
shards per rank, with a dataset profile of the activations; rank 0 writes manifest.json once every
rank is done. With attention="stats", each shard also gets a table of attention statistics per
attention layer, document and head (no profile: the profile covers the activations only).

Each rank walks the same deterministic plan (recon_fast.dataset.batching) and traces its own
batches, so N ranks compute exactly the batches one process would, and a resumed rank knows which
shards it should have: those committed and intact are skipped, the others traced again."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from recon_fast.cube.provenance import model_provenance
from recon_fast.dataset import batching, distributed, progress as progress_bars, shards, sources, writing
from recon_fast.dataset.profile import Profile
from recon_fast.kernels.attention_stats import ATTENTION_STATS
from recon_fast.kernels.token_stats import STATS
from recon_fast.trace.input_limits import position_limit
from recon_fast.trace.model_inputs import model_device

MANIFEST = "manifest.json"
PROFILE = "profile.json"
FORMAT = "recon-fast dataset 1"
FAULT_ENV = writing.FAULT_ENV  # test-only fault injection (kills at chosen moments): see dataset.writing


def trace_dataset(model: torch.nn.Module, tokenizer, source: "str | os.PathLike | Iterable", out_dir: str | os.PathLike,
                  *, layers: str | Iterable[str] = "residual", metrics: Iterable[str] = STATS,
                  max_tokens: int | None = 512, batch_tokens: int = 8192, text_field: str = "text",
                  docs_per_shard: int = 512, window: int = 4096, resume: bool = False, attention: str | None = None,
                  progress: bool | None = None) -> dict:
    """Traces every document of `source` and writes `out_dir` (see recon_fast.dataset); returns
    the manifest. Under torchrun each rank traces its share on its own device; call it on every
    rank with the same arguments.

    source: a .jsonl (text under `text_field`), .txt (one document per line), folder of .txt files
    (one document each), .parquet (column `text_field`), a HF datasets Dataset, or any iterable of
    strings. max_tokens truncates each document; batch_tokens bounds documents x longest per batch.
    docs_per_shard: documents per shard (each rank writes its own shards). resume: keep the
    intact shards of an earlier run into `out_dir` with the same settings and trace the rest.
    attention: None, or "stats": per attention layer, document, head and token the statistics of
    recon_fast.kernels.attention_stats, into the shards' attention table (profile.json stays the
    activations' alone)."""
    if attention not in (None, "stats"):
        raise ValueError(f"attention over a dataset is None or 'stats', got {attention!r} ('full' would keep "
                         "[heads, tokens, tokens] per layer and document)")
    if attention is not None:
        from recon_fast.trace.attention_stats_capture import check_model

        check_model(model)
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in STATS]
    if unknown or not metrics:
        raise ValueError(f"unknown or no metrics {unknown or metrics}; choose from {list(STATS)}")
    for name, value in (("batch_tokens", batch_tokens), ("docs_per_shard", docs_per_shard), ("window", window)):
        if value < 1:
            raise ValueError(f"{name} must be 1 or more, got {value}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be 1 or more, got {max_tokens}")
    sources.check_source(source, text_field)
    out_dir = Path(out_dir)
    device = model_device(model)  # where inputs go, also for a model dispatched by accelerate
    with distributed.process_group(device) as ranks:
        return _trace(model, tokenizer, source, out_dir, ranks, layers=layers, metrics=metrics, max_tokens=max_tokens,
                      batch_tokens=batch_tokens, text_field=text_field, docs_per_shard=docs_per_shard, window=window,
                      resume=resume, attention=attention, progress=progress)


def _trace(model, tokenizer, source, out_dir: Path, ranks: distributed.Ranks, *, layers, metrics, max_tokens,
           batch_tokens, text_field, docs_per_shard, window, resume, attention, progress) -> dict:
    from recon_fast.trace.tracer import Tracer

    started = time.time()
    if not resume and ((out_dir / MANIFEST).exists() or any(_rank_shards(out_dir, ranks.rank))):
        raise ValueError(f"{out_dir} already holds a traced dataset; pass --resume (resume=True) to continue "
                         "it, or choose a new folder")
    # A killed run's debris: this run has written nothing yet, so any temporary is a dead run's
    # (rank 0 owns the top-level files, each rank its own folders), and so are progress files,
    # which a run without bars would never remove (no rank touches them before the gather below).
    writing.remove_temporaries([out_dir / table / f"rank{ranks.rank}" for table in
                                (shards.ACTIVATIONS, shards.ATTENTION, shards.DOCUMENTS)])
    if ranks.rank == 0:
        writing.remove_temporaries([out_dir], names=(PROFILE, MANIFEST))
        shutil.rmtree(out_dir / progress_bars.FOLDER, ignore_errors=True)
    provenance = model_provenance(model)
    limit = position_limit(model)
    if limit is not None and (max_tokens is None or max_tokens > limit):
        max_tokens = limit  # a longer document could not go through the position table: cut, and counted
    pad_id = _pad_id(tokenizer)
    device = model_device(model)
    # No tokenizer: no per-token text to decode.
    tracer = Tracer(model, None, layers=layers, metrics=metrics, attention=attention)
    hooks = list(tracer.hooks)
    if not hooks:
        raise ValueError(f"layers {layers!r} matched no module of the model")
    settings = {"format": FORMAT, "model_config_sha256": provenance.get("model_config_sha256"), "hooks": hooks,
                "metrics": list(metrics), "max_tokens": max_tokens, "batch_tokens": batch_tokens,
                "window": window, "docs_per_shard": docs_per_shard, "world_size": ranks.world_size,
                "text_field": text_field, "pad_id": pad_id}
    if attention is not None:  # only when set: runs without it keep the config hash they always had
        settings["attention"] = attention
    # The logits are not traced unless the unembedding is hooked: computing them at one position
    # instead of every one keeps the [batch, tokens, vocab] product out of the run.
    from recon_fast.trace.model_inputs import forward_takes

    extra = ({"logits_to_keep": 1} if forward_takes(model, "logits_to_keep", or_kwargs=True)
             and not any(h.endswith("lm_head") for h in hooks) else {})
    config_sha256 = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    skipped_rows: list[int] = []
    truncated_rows: list[int] = []
    windows = batching.tokenized_windows(sources.documents(source, text_field), tokenizer, max_tokens, window,
                                         skipped_rows, truncated_rows)
    batches = batching.rank_batches(windows, batch_tokens, ranks.rank, ranks.world_size)
    # Rank 0's terminal decides whether bars are shown, for every rank (one small collective).
    shown, run_id = ranks.gather((progress_bars.enabled(progress), uuid.uuid4().hex) if ranks.rank == 0 else None)[0]
    # Closed (drawing thread, bars, the ranks' files) also when anything below raises.
    with progress_bars.start(out_dir, ranks.rank, ranks.world_size, shown, run_id,
                             lambda: sources.count(source)) as bar:
        layer_names: list[str] | None = None
        attention_layers: list[str] | None = None
        heads: int | None = None
        profile: Profile | None = None
        written, totals = [], {"documents": 0, "tokens": 0, "padded_tokens": 0, "resumed_shards": 0}
        with tracer:
            for k, group in enumerate(batching.shard_groups(batches, docs_per_shard)):
                docs = [d for batch in group for d in batch.docs]
                info = None
                if resume:
                    # The last shard a killed run wrote is read in full; the others' footers and
                    # documents are checked (they were complete before the next one began).
                    last = not shards.shard_path(out_dir, shards.ACTIVATIONS, ranks.rank, k + 1).exists()
                    info = shards.committed(out_dir, ranks.rank, k, config_sha256, docs, full_read=last,
                                            attention=attention is not None, metrics=metrics)
                if info is not None:
                    totals["resumed_shards"] += 1
                    part = shards.profile_from_state(info["layer_names"], metrics, info["profile"])
                    layer_names = layer_names or info["layer_names"]
                    attention_layers = attention_layers or info.get("attention_layers")
                    bar.advance(info["documents"], info["tokens"], resumed=True)
                else:
                    buffer = None
                    for batch in group:
                        ids, mask = batch.input_ids(pad_id)
                        inputs = {"input_ids": torch.from_numpy(ids).to(device),
                                  "attention_mask": torch.from_numpy(mask).to(device)}
                        tracer.run(inputs, **extra)
                        cube = tracer.cube
                        if buffer is None:
                            layer_names = layer_names or list(cube.layer_names)
                            if attention is not None:
                                attention_layers = attention_layers or list(cube.attention_layers)
                            buffer = shards.ShardBuffer(layer_names, metrics, attention_layers)
                        buffer.add_batch(batch.docs, cube.data, mask.astype(bool), cube.attention_data)
                        bar.advance(len(batch.docs), batch.tokens)
                    info = buffer.write(out_dir, ranks.rank, k, config_sha256)
                    part = buffer.profile
                    writing.after_commit(ranks.rank, k)
                profile = part if profile is None else profile.merge(part)
                heads = heads or info.get("heads")
                files = {"activations": shards.ACTIVATIONS, "documents_file": shards.DOCUMENTS}
                if attention is not None:
                    files["attention"] = shards.ATTENTION
                written.append({"rank": ranks.rank, "shard": k, "documents": info["documents"], "tokens": info["tokens"],
                                **{key: str(shards.shard_path(out_dir, table, ranks.rank, k).relative_to(out_dir))
                                   for key, table in files.items()}})
                totals["documents"] += info["documents"]
                totals["tokens"] += info["tokens"]
                totals["padded_tokens"] += sum(b.padded_tokens for b in group)
        bar.rank_done()
        _remove_beyond(out_dir, ranks.rank, len(written), attention is not None)

        # Every rank's summary to every rank; rank 0 merges and writes. The profile goes as its
        # compact state: numbers, not the arrays' pickles.
        mine = {"shards": written, "totals": totals, "layer_names": layer_names, "attention_layers": attention_layers,
                "heads": heads,
                "profile": shards.profile_state(profile) if profile is not None else None}
        everyone = ranks.gather(mine)
        bar.draw_final()  # every rank is done: rank 0's bars show their final counts
        layer_names = next((r["layer_names"] for r in everyone if r["layer_names"]), [])
        attention_layers = next((r["attention_layers"] for r in everyone if r["attention_layers"]), [])
        merged = Profile(layer_names, metrics)
        for r in everyone:  # rank order: the same merge order on every run
            if r["profile"] is not None:
                merged.merge(shards.profile_from_state(layer_names, metrics, r["profile"]))
        manifest = {
            "format": FORMAT, "model": provenance.get("model_name_or_path") or type(model).__name__,
            "config_sha256": config_sha256, "settings": settings, "layers": layer_names, "metrics": list(metrics),
            "attention_layers": attention_layers, "attention_heads": next((r["heads"] for r in everyone if r["heads"]), 0),
            "attention_statistics": list(ATTENTION_STATS) if attention is not None else [],
            "world_size": ranks.world_size, "source": sources.describe(source),
            "documents": sum(r["totals"]["documents"] for r in everyone),
            "tokens": sum(r["totals"]["tokens"] for r in everyone),
            "padded_tokens": sum(r["totals"]["padded_tokens"] for r in everyone),
            "empty_documents": len(skipped_rows),
            "truncated_documents": len(truncated_rows),  # cut to settings.max_tokens
            "ranks": [dict(r["totals"], rank=i) for i, r in enumerate(everyone)],
            "shards": [s for r in everyone for s in r["shards"]],
            "seconds": time.time() - started, "provenance": provenance,
        }
        if ranks.rank == 0:
            merged.meta = {"model": manifest["model"], "config_sha256": config_sha256,
                           "model_config_sha256": provenance.get("model_config_sha256")}
            merged.save(out_dir / PROFILE)
            with writing.atomic_write(out_dir / MANIFEST) as f:  # last: its presence says the run is complete
                f.write(json.dumps(manifest, indent=1).encode())
        ranks.barrier()
        return manifest


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0  # right padding under the attention mask: the id never reaches a real position


def _rank_shards(out_dir: Path, rank: int):
    folder = out_dir / shards.ACTIVATIONS / f"rank{rank}"
    return folder.glob("part-*.parquet") if folder.is_dir() else iter(())


def _remove_beyond(out_dir: Path, rank: int, count: int, attention: bool) -> None:
    """Shards numbered past this run's last (a resumed run's plan can only agree, but a folder
    may hold debris), and any attention table of a run without attention (a killed run with
    attention that committed nothing leaves one): removed, so the folder holds exactly this run."""
    for table in (shards.ACTIVATIONS, shards.ATTENTION, shards.DOCUMENTS):
        folder = out_dir / table / f"rank{rank}"
        keep = 0 if table == shards.ATTENTION and not attention else count
        for path in folder.glob("part-*.parquet") if folder.is_dir() else ():
            if int(path.stem.split("-")[1]) >= keep:
                path.unlink()
