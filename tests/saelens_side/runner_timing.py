"""SAELens's own CacheActivationsRunner, timed, for benchmarks/bench_activation_cache.py: run by the
SAELens venv's python (`make setup`: .venv-saelens), importing nothing of recon_fast.

    python runner_timing.py JOB.json

JOB.json: {"model": HF folder, "texts": [...], "hooks": [...], "d_in": D, "context_size": N,
"batch_windows": B, "windows": W (a multiple of B), "rounds": R, "out": FILE}. The runner takes one
hook per run (its features hold one hook column), so a round is one run per hook, each over the
same W windows in batches of B, into a fresh folder, model in float32 through HookedProxyLM
(model_class_name="AutoModelForCausalLM"). Timed: run() alone (not the model load in its
constructor); one untimed round first. Writes {"seconds": [per round], "load_seconds": [...]}."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    from datasets import Dataset
    from sae_lens import CacheActivationsRunner
    from sae_lens.config import CacheActivationsRunnerConfig

    job = json.loads(Path(sys.argv[1]).read_text())
    size, batch, windows = job["context_size"], job["batch_windows"], job["windows"]
    tokens = windows * size
    dataset = Dataset.from_dict({"text": job["texts"]})
    seconds, loads = [], []
    for round_ in range(job["rounds"] + 1):
        spent = 0.0
        for hook in job["hooks"]:
            folder = tempfile.mkdtemp(prefix="saelens-runner-")
            shutil.rmtree(folder)  # the runner wants to make it (or find it empty)
            cfg = CacheActivationsRunnerConfig(
                dataset_path="unused (override_dataset)", model_name=job["model"],
                model_class_name="AutoModelForCausalLM", model_from_pretrained_kwargs={"dtype": "float32"},
                model_batch_size=batch, hook_name=hook, d_in=job["d_in"], training_tokens=tokens, context_size=size,
                new_cached_activations_path=folder, shuffle=False, dtype="float32", device="cpu",
                buffer_size_gb=(tokens + batch * size // 2) * job["d_in"] * 4 / 1e9)  # one buffer of exactly W windows
            started = time.perf_counter()
            runner = CacheActivationsRunner(cfg, override_dataset=dataset)
            loaded = time.perf_counter()
            result = runner.run()
            spent += time.perf_counter() - loaded
            loads.append(loaded - started)
            assert len(result) == windows, (len(result), windows)
            del runner, result
            shutil.rmtree(folder, ignore_errors=True)
        if round_ > 0:  # the first warms oneDNN's kernels and the page cache
            seconds.append(spent)
    Path(job["out"]).write_text(json.dumps({"seconds": seconds, "load_seconds": loads}))


if __name__ == "__main__":
    main()
