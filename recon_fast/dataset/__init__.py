"""Dataset tracing: every document of a dataset through the Tracer, on one process or many
(torchrun), into Parquet shards with a dataset profile (and, with attention="stats", attention
statistics per head); reading them back; scoring a new cube against the profile.

    from recon_fast.dataset import trace_dataset, open, compare
    trace_dataset(model, tokenizer, "docs.jsonl", "out/", layers="residual", attention="stats")
    reader = open("out/"); reader.cube(0); reader.layer_metric(3, "energy")
    reader.attention_stat(1, "entropy")  # {doc_id: [heads, tokens]}
    compare("out/profile.json", tracer.cube).top(10)

Modules: sources.py (JSONL, text, Parquet, HF datasets, iterables), batching.py (length-bucketed
batches and their ranks), shards.py (the Parquet files, resume checks), profile.py (the profile
and compare), distributed.py (torchrun's environment), writing.py (every file's atomic write, naming
the file it cannot write; test-only kills), tracing.py (trace_dataset), reader.py.

Activation caches for SAE training (cache_activations: the folder SAELens's runner writes):
activation_windows.py (documents into SAELens's context windows, batches, shards per rank),
activation_capture.py (the hooks and the device-to-host copies), activation_shards.py (shard
buffers, the writer thread, resume checks), activation_format.py (the HF datasets folder),
activation_cache.py (cache_activations)."""

from recon_fast.dataset.activation_cache import cache_activations
from recon_fast.dataset.profile import Comparison, Profile, compare
from recon_fast.dataset.reader import DatasetReader, open
from recon_fast.dataset.tracing import trace_dataset

__all__ = ["Comparison", "DatasetReader", "Profile", "cache_activations", "compare", "open", "trace_dataset"]
