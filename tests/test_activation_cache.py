"""Activation caches for SAE training (recon_fast.dataset.cache_activations, `recon-fast
cache-activations`), checked against plain forward hooks and by SAELens itself.

One tiny random Llama and a word-level tokenizer (BOS 0, a pad token 2 that no document uses),
saved to a folder for the subprocesses; ~80 generated documents of 0 to 39 words (document 7
empty), context 16, 4 windows a batch, 16 a shard. Our folder is read back here with pyarrow
alone. Runs that are compared bit for bit use one thread, as torchrun gives each rank.

SAELens's side runs in the SAELens venv that `make setup` builds (.venv-saelens: sae-lens 6.54.12
needs transformer-lens < 4; ours is 4.3), as a subprocess (tests/saelens_side/train_from_cache.py):
SAELens's training runner loads our folder through cached_activations_path, yields our vectors and
trains an SAE from them, and SAELens's own CacheActivationsRunner, over the same documents, writes
the same windows and the same vectors. Without that venv those tests FAIL (CI must not pass by
skipping them); RECON_FAST_NO_SAELENS=1 skips them instead, saying so."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")

from test_dataset import single_threaded, torchrun_cli  # noqa: E402
from tiny_models import VOCAB, make_model  # noqa: E402

from recon_fast import cli  # noqa: E402
from recon_fast.dataset import activation_format, cache_activations  # noqa: E402
from recon_fast.dataset.activation_capture import hook_names  # noqa: E402
from recon_fast.models import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAELENS_PYTHON = Path(os.environ.get("RECON_FAST_SAELENS_PYTHON", ROOT / ".venv-saelens" / "bin" / "python"))
CONTEXT, BATCH, PER_SHARD = 16, 4, 16
HOOKS = ["model.layers.1", "model.layers.0.mlp"]
WINDOWS = 96  # the single run's cap: a whole number of batches, as SAELens's runner needs
KWARGS = {"hooks": ",".join(HOOKS), "context_size": CONTEXT, "batch_tokens": BATCH * CONTEXT,
          "windows_per_shard": PER_SHARD, "tokens": WINDOWS * CONTEXT}
SETTINGS = ["--hooks", ",".join(HOOKS), "--context-size", str(CONTEXT), "--batch-tokens", str(BATCH * CONTEXT),
            "--windows-per-shard", str(PER_SHARD), "--tokens", str(WINDOWS * CONTEXT)]
BOS, PAD = 0, 2


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("activation_cache")
    # Special tokens of their own spelling: an added token matches inside words ("t1" in "t12").
    vocabulary = {"<s>": BOS, "<unk>": 1, "<pad>": PAD, **{f"t{i}": i for i in range(3, VOCAB)}}
    core = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="<s>", unk_token="<unk>",
                                        pad_token="<pad>")
    make_model("llama").save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    # Loaded as the command loads it: the same config, so the same config hash in every file.
    model, tokenizer = load_model(str(folder / "model"))
    rng = np.random.default_rng(0)
    texts = [" ".join(f"t{j}" for j in rng.integers(3, VOCAB, 0 if i == 7 else int(rng.integers(1, 40))))
             for i in range(80)]
    with open(folder / "docs.jsonl", "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return folder, model, tokenizer, texts


@pytest.fixture(scope="module")
def single(assets):
    folder, model, tokenizer, _ = assets
    with single_threaded():
        cache_activations(model, tokenizer, folder / "docs.jsonl", folder / "single", **KWARGS)
    return folder / "single"


def read_folder(out: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every column of the cache in dataset order (state.json's files), with pyarrow alone:
    {hook: [windows, context, d_in]}, token_ids [windows, context]."""
    state = json.loads((out / "state.json").read_text())
    tables = [pa.ipc.open_stream(pa.memory_map(str(out / f["filename"]))).read_all() for f in state["_data_files"]]
    table = pa.concat_tables(tables)
    values = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if name == "token_ids":
            ids = column.flatten().to_numpy().reshape(len(table), -1)
        else:
            flat = column.flatten().flatten().to_numpy(zero_copy_only=False)
            values[name] = flat.reshape(len(table), CONTEXT, -1)
    return values, ids


def plain_hook_outputs(model, ids, names: list[str]) -> dict[str, torch.Tensor]:
    """A plain register_forward_hook reference: each module's output (a tuple's first element),
    batch by batch of BATCH windows as the cache ran them. ids: numpy, or a tensor on the model's device."""
    modules = dict(model.named_modules())
    found = {name: [] for name in names}
    handles = [modules[name].register_forward_hook(
        lambda m, a, out, name=name: found[name].append((out[0] if isinstance(out, tuple) else out).clone()))
        for name in names]
    try:
        with torch.no_grad():
            for start in range(0, len(ids), BATCH):
                batch = ids[start: start + BATCH]
                model(input_ids=batch if torch.is_tensor(batch) else torch.from_numpy(batch))
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(found[name]) for name in names}


def document_tokens(tokenizer, texts: list[str]) -> list[int]:
    return [t for text in texts for t in tokenizer(text)["input_ids"]]


# ---- the vectors ------------------------------------------------------------------------------------------
def test_float32_vectors_equal_plain_forward_hooks(assets, single):
    _, model, _, _ = assets
    values, ids = read_folder(single)
    assert list(values) == HOOKS and ids.shape == (WINDOWS, CONTEXT)
    with single_threaded():
        want = plain_hook_outputs(model, ids.astype(np.int64), HOOKS)
    for name in HOOKS:
        assert values[name].dtype == np.float32
        np.testing.assert_array_equal(values[name], want[name].numpy(), err_msg=name)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_rounded_dtypes_are_the_rounding_of_float32_hook_outputs(assets, tmp_path, dtype):
    folder, model, tokenizer, _ = assets
    with single_threaded():
        manifest = cache_activations(model, tokenizer, folder / "docs.jsonl", tmp_path / dtype,
                                     **{**KWARGS, "tokens": 8 * CONTEXT}, dtype=dtype)
        values, ids = read_folder(tmp_path / dtype)
        want = plain_hook_outputs(model, ids.astype(np.int64), HOOKS)
    assert manifest["windows"] == 8
    rounding = getattr(torch, dtype)
    stored = np.float16 if dtype == "float16" else np.float32  # Arrow has no bfloat16
    for name in HOOKS:
        assert values[name].dtype == stored
        np.testing.assert_array_equal(values[name], want[name].to(rounding).to(stored_torch(stored)).numpy(), name)
    features = json.loads((tmp_path / dtype / "dataset_info.json").read_text())["features"]
    assert features[HOOKS[0]] == {"shape": [CONTEXT, 48], "dtype": np.dtype(stored).name, "_type": "Array2D"}


def stored_torch(dtype) -> torch.dtype:
    return torch.float16 if dtype == np.float16 else torch.float32


@pytest.mark.cuda
def test_cuda_copies_land_as_plain_hooks_see_them_without_a_sync(assets, tmp_path):
    """The pinned, side-stream path: the same vectors as plain hooks on the GPU, and no hidden
    sync in a batch (torch's sync debug mode raises on one)."""
    import copy

    from recon_fast.dataset.activation_capture import ActivationCapture
    from recon_fast.dataset.activation_shards import ShardBuffer

    folder, model, tokenizer, _ = assets
    model = copy.deepcopy(model).cuda()
    cache_activations(model, tokenizer, folder / "docs.jsonl", tmp_path / "cuda", **{**KWARGS, "tokens": 32 * CONTEXT})
    values, ids = read_folder(tmp_path / "cuda")
    want = plain_hook_outputs(model, torch.from_numpy(ids.astype(np.int64)).cuda(), HOOKS)
    for name in HOOKS:
        np.testing.assert_array_equal(values[name], want[name].cpu().numpy(), err_msg=name)

    capture = ActivationCapture(model, HOOKS, "bfloat16", torch.device("cuda", 0), {"use_cache": False})
    buffer = ShardBuffer({name: 48 for name in HOOKS}, 3 * BATCH, CONTEXT, "bfloat16", pinned=True)
    batches = [ids[start: start + BATCH].astype(np.int64) for start in range(0, 3 * BATCH, BATCH)]

    def our_batches():
        for k, batch in enumerate(batches):
            capture.run(capture.inputs(batch), buffer.destination(k * BATCH, BATCH))

    with capture:
        capture.probe(BOS)
        plain = lambda: model(input_ids=capture.inputs(batches[0]), use_cache=False)  # noqa: E731
        with torch.no_grad():
            model_syncs = synchronizes(plain)
        ours_sync = None if model_syncs else synchronizes(our_batches)
        if model_syncs:
            our_batches()
        done = capture.copies_done()
    done.synchronize()
    for name in HOOKS:
        rounded = want[name][: 3 * BATCH].to(torch.bfloat16).float().cpu()
        assert torch.equal(buffer.values[name], rounded), name
    if model_syncs:
        pytest.skip("this model's own forward synchronizes (torch's sync debug mode): ours cannot be told apart")
    assert not ours_sync


def synchronizes(fn) -> bool:
    """Whether fn makes the host wait for the GPU (torch's sync debug mode raises there)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as exc:
        if "synchroniz" not in str(exc):
            raise
        return True
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return False


# ---- the windows ------------------------------------------------------------------------------------------
def test_windows_are_packed_documents_without_padding(assets, single):
    _, _, tokenizer, texts = assets
    _, ids = read_folder(single)
    assert (ids[:, 0] == BOS).all()  # every window starts with BOS
    assert not (ids == PAD).any()  # padding never reaches the output
    # BOS between documents and at each window's start, nothing else added or lost: without them,
    # the windows are the documents' tokens, in order (up to the cap).
    stream = ids[ids != BOS]
    tokens = np.array(document_tokens(tokenizer, texts))
    assert not np.isin(tokens, (BOS, 1, PAD)).any()  # documents of plain words only
    np.testing.assert_array_equal(stream, tokens[: len(stream)])
    # A BOS separates documents inside a window: their count is the document boundaries crossed
    # (minus those that fall on a window's start, where the window's own BOS serves).
    assert (ids[:, 1:] == BOS).sum() > 0


def test_hook_names_take_module_names_and_presets(assets):
    _, model, _, _ = assets
    assert hook_names(model, "residual") == ["model.layers.0", "model.layers.1"]
    assert hook_names(model, "model.layers.1, mlp,model.layers.1") == ["model.layers.1", "model.layers.0.mlp",
                                                                      "model.layers.1.mlp"]
    assert hook_names(model, ["attn"]) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]


def test_shuffle_writes_the_same_windows_in_a_seeded_order(assets, single, tmp_path):
    folder, model, tokenizer, _ = assets
    with single_threaded():
        manifest = cache_activations(model, tokenizer, folder / "docs.jsonl", tmp_path / "shuffled", **KWARGS,
                                     shuffle=True, seed=3)
    values, ids = read_folder(tmp_path / "shuffled")
    plain_values, plain_ids = read_folder(single)
    assert manifest["files"] != sorted(manifest["files"])  # the shards' order, too
    assert not np.array_equal(ids, plain_ids)
    order, plain_order = np.lexsort(ids.T[::-1]), np.lexsort(plain_ids.T[::-1])
    np.testing.assert_array_equal(ids[order], plain_ids[plain_order])
    for name in HOOKS:
        np.testing.assert_array_equal(values[name][order], plain_values[name][plain_order])


# ---- interrupted runs and ranks -------------------------------------------------------------------------
def assert_same_folder(got: Path, want: Path) -> None:
    """The same files, byte for byte (manifest.json aside: it records times and ranks)."""
    names = sorted(p.name for p in want.iterdir() if p.name != "manifest.json")
    assert sorted(p.name for p in got.iterdir() if p.name != "manifest.json") == names
    for name in names:
        assert (got / name).read_bytes() == (want / name).read_bytes(), name


def test_resume_after_an_interruption_gives_the_uninterrupted_output(assets, single, tmp_path, monkeypatch, capsys):
    folder, model, tokenizer, _ = assets
    out = tmp_path / "interrupted"
    write, calls = activation_format.write_shard, []

    def failing(*args, **kwargs):  # the third shard's write dies, as a crash would end it
        calls.append(args[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return write(*args, **kwargs)

    monkeypatch.setattr(activation_format, "write_shard", failing)
    with single_threaded(), pytest.raises(KeyboardInterrupt):
        cache_activations(model, tokenizer, folder / "docs.jsonl", out, **KWARGS)
    monkeypatch.setattr(activation_format, "write_shard", write)
    # Shard 2 is missing; the shard computed while it was being written (3) may be committed.
    committed = sorted(p.name for p in out.glob("data-*.arrow"))
    assert committed[:2] == ["data-00000.arrow", "data-00001.arrow"] and "data-00002.arrow" not in committed
    assert not (out / "state.json").exists()
    with pytest.raises(ValueError, match="--resume"):
        cache_activations(model, tokenizer, folder / "docs.jsonl", out, **KWARGS)
    with single_threaded():
        manifest = cache_activations(model, tokenizer, folder / "docs.jsonl", out, **KWARGS, resume=True,
                                     progress=True)
    assert manifest["resumed_shards"] == len(committed)
    assert_same_folder(out, single)
    bars = capsys.readouterr().err.replace("\r", "\n")
    assert "cache-activations rank 0/1" in bars and f"{WINDOWS}/{WINDOWS}" in bars and "tok/s" in bars
    assert "trace-dataset" not in bars and "doc/s" not in bars  # its own command and unit (windows)
    assert not (out / ".progress").exists()


def torchrun(folder: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return torchrun_cli("cache-activations", folder, out, *SETTINGS, *extra, env=env)


def test_two_ranks_killed_and_resumed_write_what_one_process_writes(assets, single, tmp_path):
    folder, _, _, _ = assets
    out = tmp_path / "ranks"
    killed = torchrun(folder, out, env={"RECON_FAST_DATASET_FAULT": "kill:1:1"})  # rank 1, after shard 1
    assert killed.returncode != 0
    assert (out / "data-00001.arrow").exists() and not (out / "manifest.json").exists()
    resumed = torchrun(folder, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "shard(s) kept from the earlier run" in resumed.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and {s["rank"] for s in manifest["shards"]} == {0, 1}
    assert_same_folder(out, single)


# ---- refusals, before any forward -------------------------------------------------------------------------
def forwards(model) -> list:
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


@pytest.mark.parametrize("kwargs, words", [
    ({"hooks": "model.layers.9"}, "module 'model.layers.9' not found in LlamaForCausalLM; closest: model.layers.1"),
    ({"hooks": "all"}, "preset 'all' is not for an activation cache"),
    ({"hooks": "model.layers.0", "dtype": "float64"}, "dtype 'float64': choose from float32, float16, bfloat16"),
    ({"hooks": "model.layers.0", "context_size": 1}, "context_size must be an integer, 2 or more"),
    ({"hooks": "model.layers.0", "tokens": 8}, "tokens (8) must be at least context_size (16)"),
])
def test_bad_arguments_are_refused_before_the_forward(assets, tmp_path, kwargs, words):
    folder, _, tokenizer, _ = assets
    model = make_model("llama")
    calls = forwards(model)
    with pytest.raises(ValueError) as raised:
        cache_activations(model, tokenizer, folder / "docs.jsonl", tmp_path / "out",
                          **{"context_size": CONTEXT, **kwargs})
    assert words in str(raised.value)
    assert not calls and not (tmp_path / "out").exists()


def test_a_context_longer_than_the_position_table_is_refused(assets, tmp_path):
    folder, _, tokenizer, _ = assets
    model = make_model("gpt2")  # a learned position table of 128 rows
    calls = forwards(model)
    with pytest.raises(ValueError, match=r"context_size 129 is longer than GPT2LMHeadModel's position table \(128"):
        cache_activations(model, tokenizer, folder / "docs.jsonl", tmp_path / "out", hooks="transformer.h.0",
                          context_size=129)
    assert not calls


@pytest.mark.parametrize("extra, words", [
    (["--hooks", "model.layers.9"], "--hooks: module 'model.layers.9' not found"),
    (["--hooks", "model.layers.0", "--context-size", "1"], "--context-size must be 2 or more"),
    (["--hooks", "model.layers.0", "--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
])
def test_the_command_refuses_bad_arguments_before_loading_the_model(assets, tmp_path, capsys, extra, words):
    folder, _, _, _ = assets
    code = cli.main(["cache-activations", "--data", str(folder / "docs.jsonl"), "--out", str(tmp_path / "out"),
                     "--model", str(folder / "model"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "loaded" not in err, err
    assert len(err.strip().splitlines()) == 1


# ---- SAELens ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saelens(assets, single, tmp_path_factory):
    """The SAELens side, run once: our folder through its training runner, and its own runner."""
    if os.environ.get("RECON_FAST_NO_SAELENS") == "1":
        pytest.skip("RECON_FAST_NO_SAELENS=1: the SAELens checks are switched off")
    if not SAELENS_PYTHON.is_file():
        pytest.fail(f"the SAELens checks need the venv `make setup` builds ({SAELENS_PYTHON} is missing; see "
                    "/tmp/recon-fast-saelens.log); set RECON_FAST_NO_SAELENS=1 to skip them")
    folder, _, _, texts = assets
    work = tmp_path_factory.mktemp("saelens")
    job = {"cache": str(single), "hook": HOOKS[0], "model": str(folder / "model"), "context_size": CONTEXT,
           "d_in": 48, "batch_windows": BATCH, "texts": texts, "steps": 8, "out": str(work / "side"),
           "runner": str(work / "runner"), "runner_windows": WINDOWS}
    (work / "job.json").write_text(json.dumps(job))
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RECON_FAST_DATASET_FAULT")}
    environment.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([str(SAELENS_PYTHON), str(ROOT / "tests" / "saelens_side" / "train_from_cache.py"),
                           str(work / "job.json")], capture_output=True, text=True, env=environment, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((work / "side" / "result.json").read_text())
    return result, work


def test_saelens_loads_our_folder_and_yields_our_vectors(single, saelens):
    result, work = saelens
    assert result["sae_lens"] == activation_format.SAELENS_VERSION
    values, ids = read_folder(single)
    acts = np.load(work / "side" / "first_acts.npy")
    token_ids = np.load(work / "side" / "first_token_ids.npy")
    np.testing.assert_array_equal(acts, values[HOOKS[0]][:BATCH].reshape(-1, 48))  # its first batch: our rows
    np.testing.assert_array_equal(token_ids, ids[:BATCH].reshape(-1))


def test_saelens_trains_an_sae_from_our_folder(saelens):
    result, _ = saelens
    losses = result["losses"]
    assert len(losses) == 8 and all(np.isfinite(losses)), losses
    assert min(losses[4:]) < losses[0], losses  # it learns from our vectors


def test_saelens_own_runner_writes_the_same_windows_and_vectors(single, saelens):
    result, work = saelens
    assert result["runner_windows"] == WINDOWS
    runner_values, runner_ids = read_folder(work / "runner")
    values, ids = read_folder(single)
    np.testing.assert_array_equal(runner_ids, ids)  # SAELens's packing, window for window
    np.testing.assert_array_equal(runner_values[HOOKS[0]], values[HOOKS[0]])
    ours = json.loads((single / "dataset_info.json").read_text())["features"]
    theirs = json.loads((work / "runner" / "dataset_info.json").read_text())["features"]
    assert ours[HOOKS[0]] == theirs[HOOKS[0]]
    assert {**ours["token_ids"], "_type": "List"} == theirs["token_ids"]  # "Sequence": datasets 3.x reads it too
