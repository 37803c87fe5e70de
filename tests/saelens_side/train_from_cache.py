"""The SAELens side of tests/test_activation_cache.py, run by the SAELens venv's python
(`make setup` builds .venv-saelens: sae-lens 6.54.12, which needs transformer-lens < 4, apart from
our environment's 4.3), as a separate consumer of our folder would. It imports nothing of
recon_fast.

    python train_from_cache.py JOB.json

JOB.json: {"cache": DIR, "hook": NAME, "model": DIR, "context_size": N, "d_in": D,
"batch_windows": B, "texts": [...], "steps": S, "out": DIR, "runner": DIR or null}. It
1. builds LanguageModelSAETrainingRunner with use_cached_activations=True and
   cached_activations_path=DIR (model_class_name="AutoModelForCausalLM": SAELens's HookedProxyLM,
   whose hook names are the HF module names our columns carry), takes the first batch its
   ActivationsStore yields (saved as first_acts.npy, first_token_ids.npy), rewinds it, and trains
   a standard SAE for S steps, recording each step's loss;
2. with "runner", runs SAELens's own CacheActivationsRunner over the same texts, model, hook,
   context size and batch size into that folder, for the test to compare with ours.
Writes OUT/result.json: {"losses": [...], "runner_windows": N or null, "sae_lens": version}."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch


def train(job: dict, out: Path) -> list[float]:
    from datasets import Dataset
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, StandardTrainingSAEConfig
    from sae_lens.config import LoggingConfig
    from sae_lens.training.sae_trainer import SAETrainer

    size, d_in, batch = job["context_size"], job["d_in"], job["batch_windows"]
    train_tokens = size * batch  # one store batch per step (the mixing buffer holds two)
    cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(d_in=d_in, d_sae=2 * d_in, l1_coefficient=1e-3),
        model_name=job["model"], model_class_name="AutoModelForCausalLM", hook_name=job["hook"],
        dataset_path="", is_dataset_tokenized=False, streaming=False, context_size=size,
        use_cached_activations=True, cached_activations_path=job["cache"],
        training_tokens=train_tokens * job["steps"], store_batch_size_prompts=batch,
        train_batch_size_tokens=train_tokens, n_batches_in_buffer=2 * batch, activations_mixing_fraction=0.0,
        lr=1e-2, device="cpu", dtype="float32", logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=None, output_path=None, verbose=False, seed=0)
    # The dataset is SAELens's to have (its evaluator's); the training batches come from the cache.
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=Dataset.from_dict({"text": job["texts"]}))
    store = runner.activations_store
    assert store.cached_activation_dataset is not None, "SAELens did not load the cache"
    acts, token_ids = store.get_raw_llm_batch()
    np.save(out / "first_acts.npy", acts.numpy())
    np.save(out / "first_token_ids.npy", token_ids.numpy())
    store.current_row_idx = 0  # training starts from the first row, as it would have

    losses: list[float] = []
    step = SAETrainer.step

    def recording(self, batch_in):
        output = step(self, batch_in)
        losses.append(float(output.loss))
        return output

    SAETrainer.step = recording
    try:
        runner.run()
    finally:
        SAETrainer.step = step
    return losses


def run_saelens_runner(job: dict, folder: str) -> int:
    from datasets import Dataset
    from sae_lens import CacheActivationsRunner
    from sae_lens.config import CacheActivationsRunnerConfig

    size, d_in, batch = job["context_size"], job["d_in"], job["batch_windows"]
    tokens = job["runner_windows"] * size
    # One buffer holding exactly `tokens`: n_tokens_in_buffer is buffer_size_gb's bytes over the
    # bytes per token, rounded down to whole batches; half a batch more never rounds up past it.
    buffer_gb = (tokens + batch * size // 2) * d_in * 4 / 1e9
    cfg = CacheActivationsRunnerConfig(
        dataset_path="unused (override_dataset)", model_name=job["model"], model_class_name="AutoModelForCausalLM",
        model_batch_size=batch, hook_name=job["hook"], d_in=d_in, training_tokens=tokens, context_size=size,
        new_cached_activations_path=folder, shuffle=False, dtype="float32", device="cpu", buffer_size_gb=buffer_gb)
    assert cfg.n_buffers == 1 and cfg.n_batches_in_buffer * batch == job["runner_windows"], (cfg.n_buffers,
                                                                                              cfg.n_batches_in_buffer)
    dataset = CacheActivationsRunner(cfg, override_dataset=Dataset.from_dict({"text": job["texts"]})).run()
    return len(dataset)


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    import sae_lens

    result = {"sae_lens": sae_lens.__version__, "torch": torch.__version__, "losses": train(job, out),
              "runner_windows": run_saelens_runner(job, job["runner"]) if job.get("runner") else None}
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
