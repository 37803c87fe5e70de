"""trace_dataset against a plain batched forward over the very same batches (tokens/s, and the
padding overhead of the length-bucketed plan), and peak RSS at 1x and 10x the documents (it must
not grow with the dataset). A random Llama (4 layers, d=128), word-level documents of 1 to 300
words. Each size runs in a fresh subprocess so ru_maxrss is its own:

    python benchmarks/bench_dataset.py            # the table for RESULTS.md
    python benchmarks/bench_dataset.py run DOCS   # one measurement (what the table runs)
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

VOCAB, DOCS = 512, 400


def tiny_llama_and_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=4, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, vocab_size=VOCAB, pad_token_id=0)
    core = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w1"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w1", pad_token="w0")
    return LlamaForCausalLM(config).eval(), tokenizer


def documents(n: int):
    rng = np.random.default_rng(0)
    for _ in range(n):
        yield " ".join(f"w{j}" for j in rng.integers(2, VOCAB, int(rng.integers(1, 300))))


def forward(model, batches) -> None:
    """The plain batched forward: the same batches, no hooks, logits at one position."""
    with torch.no_grad():
        for batch in batches:
            ids, mask = batch.input_ids(0)
            model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), logits_to_keep=1)


def measure(n: int) -> dict:
    from recon_fast.dataset import batching, trace_dataset

    torch.set_num_threads(1)  # one rank = one thread, as torchrun gives it; a shared 2-core machine
    model, tokenizer = tiny_llama_and_tokenizer()
    settings = {"max_tokens": 256, "batch_tokens": 4096}
    windows = batching.tokenized_windows(enumerate(documents(n)), tokenizer, settings["max_tokens"], 4096)
    batches = list(batching.rank_batches(windows, settings["batch_tokens"], 0, 1))
    forward(model, batches)  # warm-up: oneDNN builds its kernels per shape on first use
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        manifest = trace_dataset(model, tokenizer, list(documents(n)), out, **settings)
        traced = time.perf_counter() - started
    started = time.perf_counter()
    forward(model, batches)
    plain = time.perf_counter() - started
    return {"documents": manifest["documents"], "tokens": manifest["tokens"], "padded": manifest["padded_tokens"],
            "trace_s": traced, "plain_s": plain, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    if sys.argv[1:2] == ["run"]:
        print(json.dumps(measure(int(sys.argv[2]))))
        return
    print("| documents | tokens | padding | plain forward | trace_dataset | ratio | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for n in (DOCS, 10 * DOCS):
        done = subprocess.run([sys.executable, __file__, "run", str(n)], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[1])
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {r['documents']} | {r['tokens']} | {1 - r['tokens'] / r['padded']:.1%} | "
              f"{r['tokens'] / r['plain_s']:.0f} tok/s | {r['tokens'] / r['trace_s']:.0f} tok/s | "
              f"{r['plain_s'] / r['trace_s']:.2f}x | {r['peak_rss_mib']:.0f} MiB |")


if __name__ == "__main__":
    main()
