"""The model cache (recon_fast.model_cache): built once, read after, never loaded when incomplete.
Its mechanics run on a small source file and a tiny random model as the "conversion" (fast); the
embedded SmolLM2 GGUF is converted once per module into a temporary RECON_FAST_CACHE (slow: its
tests are marked so, as every test that loads the real model is)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import make_model

from recon_fast import model_cache

ROOT = Path(__file__).resolve().parents[1]


def tiny_build(calls: list | None = None):
    """A conversion that writes a tiny random Llama as safetensors + config (and counts its calls)."""
    def build(out: Path) -> None:
        if calls is not None:
            calls.append(out)
        make_model("llama").save_pretrained(out)

    return build


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "source.gguf"
    path.write_bytes(os.urandom(4096))
    return path


def test_the_first_call_builds_the_second_reads(tmp_path, source):
    calls = []
    folder, built = model_cache.cached_folder("tiny", source, tiny_build(calls), root=tmp_path / "cache")
    assert built and len(calls) == 1 and calls[0] != folder  # built elsewhere, renamed into place
    assert (folder / "model.safetensors").is_file() and (folder / model_cache.MANIFEST).is_file()
    again, built = model_cache.cached_folder("tiny", source, tiny_build(calls), root=tmp_path / "cache")
    assert again == folder and not built and len(calls) == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")) == \
        sorted([folder.name, "source-hashes.json"])  # no temporary folder left


def test_a_changed_source_gets_its_own_folder(tmp_path, source):
    root = tmp_path / "cache"
    first, _ = model_cache.cached_folder("tiny", source, tiny_build(), root=root)
    source.write_bytes(os.urandom(4096))
    second, built = model_cache.cached_folder("tiny", source, tiny_build(), root=root)
    assert built and second != first


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_a_damaged_cache_is_rebuilt_not_loaded(tmp_path, source, damage):
    root = tmp_path / "cache"
    calls = []
    folder, _ = model_cache.cached_folder("tiny", source, tiny_build(calls), root=root)
    weights = folder / "model.safetensors"
    if damage == "truncate":
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size // 2)
    elif damage == "flip":  # same size, one byte of a tensor changed
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "delete":
        (folder / "config.json").unlink()
    else:
        (folder / model_cache.MANIFEST).write_text("{")
    sha = model_cache.source_sha256(source, root)
    assert not model_cache.is_complete(folder, sha)
    again, built = model_cache.cached_folder("tiny", source, tiny_build(calls), root=root)
    assert built and again == folder and len(calls) == 2 and model_cache.is_complete(folder, sha)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder)
    torch.testing.assert_close(loaded.model.embed_tokens.weight, make_model("llama").model.embed_tokens.weight)


def test_a_build_that_fails_leaves_nothing_and_the_next_call_builds(tmp_path, source):
    root = tmp_path / "cache"

    def broken(out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-conversion")

    with pytest.raises(RuntimeError, match="mid-conversion"):
        model_cache.cached_folder("tiny", source, broken, root=root)
    assert not [p for p in root.iterdir() if p.is_dir()]
    folder, built = model_cache.cached_folder("tiny", source, tiny_build(), root=root)
    assert built and model_cache.is_complete(folder, model_cache.source_sha256(source, root))


def test_a_warm_call_does_not_read_the_source(tmp_path, source, monkeypatch):
    root = tmp_path / "cache"
    model_cache.cached_folder("tiny", source, tiny_build(), root=root)
    opened = []
    real_open = open

    def watching(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", watching)
    model_cache.cached_folder("tiny", source, lambda out: pytest.fail("converted again"), root=root)
    assert opened and str(source) not in opened


_RACE = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{tests!r}, {root!r}]
    from pathlib import Path
    from recon_fast import model_cache
    from tiny_models import make_model

    def build(out):
        with open({log!r}, "a") as f:
            f.write("build\\n")
        time.sleep(1.0)  # long enough for the other process to arrive while this one builds
        make_model("llama").save_pretrained(out)

    while time.time() < {start}:  # both processes leave the line together
        time.sleep(0.001)
    folder, built = model_cache.cached_folder("tiny", Path({source!r}), build, root=Path({cache!r}))
    print(folder, built)
""")


def test_two_processes_starting_at_once_build_it_once(tmp_path, source):
    import time

    log = tmp_path / "builds.log"
    script = _RACE.format(tests=str(ROOT / "tests"), root=str(ROOT), log=str(log), start=time.time() + 3.0,
                          source=str(source), cache=str(tmp_path / "cache"))
    runs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=120)[0].split() for run in runs]
    assert all(run.returncode == 0 for run in runs)
    assert log.read_text().count("build") == 1
    assert outputs[0][0] == outputs[1][0] and sorted(o[1] for o in outputs) == ["False", "True"]
    assert model_cache.is_complete(Path(outputs[0][0]), model_cache.source_sha256(source, tmp_path / "cache"))


def test_the_default_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(model_cache.CACHE_ENV, str(tmp_path / "mine"))
    assert model_cache.cache_root() == tmp_path / "mine"
    monkeypatch.delenv(model_cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_cache.cache_root() == tmp_path / "xdg" / "recon-fast"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_cache.cache_root() == tmp_path / "home" / ".cache" / "recon-fast"


def test_an_unwritable_root_is_a_clear_error(tmp_path, source):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(model_cache.CacheUnavailable, match="cannot create the model cache"):
        model_cache.cached_folder("tiny", source, tiny_build(), root=blocker / "cache")


# ---- the embedded SmolLM2: converted once for this module -----------------------------------------------
@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    from recon_fast.models import ModelNotFound, load_model, smollm2_location

    try:
        folder, name = smollm2_location()
    except ModelNotFound as exc:
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("recon-fast-cache")
    previous = os.environ.get(model_cache.CACHE_ENV)
    os.environ[model_cache.CACHE_ENV] = str(root)
    try:
        model, tokenizer = load_model(progress=False)  # the conversion
    finally:
        if previous is None:
            os.environ.pop(model_cache.CACHE_ENV)
        else:
            os.environ[model_cache.CACHE_ENV] = previous
    return root, folder / name, model, tokenizer


_WARM_LOAD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    opened = []
    sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
    from recon_fast.models import load_model
    model, tokenizer = load_model(progress=False)
    ids = tokenizer("Why do bees buzz?", return_tensors="pt")["input_ids"]
    import torch, json
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    print(json.dumps({{"gguf_opened": [p for p in opened if p.endswith(".gguf")], "ids": ids[0].tolist(),
                      "logits": logits.tolist(), "class": type(model).__name__,
                      "name_or_path": model.config._name_or_path}}))
""")


@pytest.mark.slow
def test_smollm2_is_converted_once_then_read_without_opening_the_gguf(smollm2_cache):
    root, gguf, model, tokenizer = smollm2_cache
    entries = [p for p in root.iterdir() if p.is_dir()]
    assert len(entries) == 1 and (entries[0] / "model.safetensors").is_file()
    env = {**os.environ, model_cache.CACHE_ENV: str(root), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", _WARM_LOAD.format(root=str(ROOT))], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    warm = json.loads(result.stdout.strip().splitlines()[-1])
    assert warm["gguf_opened"] == []  # read from the cache: the GGUF was not even opened
    assert warm["class"] == type(model).__name__ and warm["name_or_path"] == str(gguf.parent)
    # The cached model is the converted one: same tokens, same logits as the model the GGUF gave.
    ids = tokenizer("Why do bees buzz?", return_tensors="pt")["input_ids"]
    assert warm["ids"] == ids[0].tolist()
    with torch.no_grad():
        expected = model(ids).logits[0, -1]
    torch.testing.assert_close(torch.tensor(warm["logits"]), expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_the_cached_smollm2_equals_the_gguf_weights_and_tokenizer(smollm2_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, gguf, model, tokenizer = smollm2_cache
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)  # the GGUF itself
    cached = model.state_dict()
    for name, tensor in direct.state_dict().items():
        assert torch.equal(cached[name], tensor), name
    reference = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    text = "<|im_start|>user\nWhy do bees buzz? 1234 héllo<|im_end|>"
    assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]
    assert tokenizer.chat_template == reference.chat_template
    assert (tokenizer.eos_token, tokenizer.bos_token) == (reference.eos_token, reference.bos_token)


def test_a_checked_folder_is_not_read_again_until_a_file_changes(tmp_path, source, monkeypatch):
    # A command checks the cache before the load and in it: the CRC-32s are read once per process.
    folder, _ = model_cache.cached_folder("tiny", source, tiny_build(), root=tmp_path / "cache")
    sha = model_cache.source_sha256(source, tmp_path / "cache")
    reads = []
    crc32 = model_cache._crc32
    monkeypatch.setattr(model_cache, "_crc32", lambda path: reads.append(path.name) or crc32(path))
    model_cache._checked.clear()
    assert model_cache.is_complete(folder, sha) and reads
    first = len(reads)
    assert model_cache.is_complete(folder, sha) and len(reads) == first
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))  # same size, a new mtime: checked again, and found damaged
    assert not model_cache.is_complete(folder, sha) and len(reads) > first
