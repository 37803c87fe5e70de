"""Models dispatched by accelerate: from_pretrained(device_map=..., max_memory=..., offload_folder=...),
dispatch_model, cpu_offload and disk_offload, with modules offloaded to the CPU and disk (their
weights meta tensors between calls). The Tracer (token stats, raw slices, attention stats),
ReconTracer, attribution (components, heads, neurons, sources, logit lens, chain of thought) and
dataset tracing give what they give on the same model undispatched (1e-6, float32), accelerate's
hooks stay in place and keep working afterwards, and the offload folder holds what accelerate put
there and nothing else. With a GPU (marker `cuda`): the first half on cuda:0, the second on the CPU."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import make_model, perturb_vectors, word_tokenizer

from recon_fast.attribution.chain_of_thought import chain_of_thought
from recon_fast.attribution.direct import attribute_positions
from recon_fast.attribution.logit_lens import logit_lens
from recon_fast.models import device_split, load_model
from recon_fast.trace.compat import ReconTracer
from recon_fast.trace.raw_capture import RawSlices
from recon_fast.trace.tracer import Tracer

accelerate = pytest.importorskip("accelerate")

ATOL = 1e-6  # float32 throughout; the dispatched forward runs the very same kernels on the same weights
IDS = torch.tensor([[5, 17, 3, 40, 8, 22, 61, 9], [12, 4, 90, 33, 7, 2, 50, 18]])


def _blocks(arch: str) -> tuple[str, str, str, str]:
    """(embedding, block list, final norm, unembedding) module names of a tiny model."""
    if arch == "gpt2":
        return "transformer.wte", "transformer.h", "transformer.ln_f", "lm_head"
    return "model.embed_tokens", "model.layers", "model.norm", "lm_head"


def _split_map(arch: str, first: str, second: str, tied_apart: bool = True) -> dict[str, str]:
    """Block 0 (and the embeddings) on `first`, block 1, the final norm and lm_head on `second`.
    tied_apart=False keeps GPT-2's lm_head (tied to wte) with wte: from_pretrained cannot offload
    a tied weight apart from its twin (accelerate looks lm_head.weight up in the checkpoint)."""
    embed, blocks, final, unembed = _blocks(arch)
    last = first if arch == "gpt2" and not tied_apart else second
    placement = {embed: first, f"{blocks}.0": first, f"{blocks}.1": second, final: second, unembed: last}
    if arch == "gpt2":
        placement = {"transformer.wpe": first, **placement}
    else:
        placement["model.rotary_emb"] = first
    return placement


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def saved(request, tmp_path_factory):
    """(arch, folder, the model undispatched, tokenizer): a tiny random model saved with save_pretrained."""
    arch = request.param
    folder = tmp_path_factory.mktemp(f"dispatch-{arch}") / "model"
    model = perturb_vectors(make_model(arch, attn_implementation="eager"))
    model.save_pretrained(folder)
    tokenizer = word_tokenizer(folder)
    return arch, folder, model, tokenizer


def _dispatched(kind: str, arch: str, folder: Path, offload: Path):
    """The saved model, dispatched by accelerate in one of several ways, modules offloaded."""
    from accelerate import cpu_offload, disk_offload, dispatch_model
    from transformers import AutoModelForCausalLM

    if kind == "from_pretrained":  # block 0 on the CPU, the rest offloaded to disk
        model, _ = load_model(str(folder), device_map=_split_map(arch, "cpu", "disk", tied_apart=False), offload_folder=str(offload),
                              attn_implementation="eager", progress=False)
        return model
    if kind == "max_memory":  # "auto" under a CPU budget that holds about half of it
        model, _ = load_model(str(folder), device_map="auto", max_memory={"cpu": "150KB"},
                              offload_folder=str(offload), attn_implementation="eager", progress=False)
        return model
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    if kind == "dispatch_model":  # accelerate writes the disk modules' weights into the folder
        return dispatch_model(model, _split_map(arch, "cpu", "disk"), offload_dir=str(offload))
    if kind == "disk_offload":
        return disk_offload(model, str(offload), execution_device="cpu")
    if kind == "cpu_offload":
        return cpu_offload(model, execution_device="cpu")
    raise ValueError(kind)


KINDS = ["from_pretrained", "max_memory", "dispatch_model", "disk_offload", "cpu_offload"]


def _folder_state(folder: Path) -> dict[str, str]:
    """Every file under the offload folder and the SHA-256 of its bytes."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _accelerate_hooks(model) -> dict[str, object]:
    return {name: module._hf_hook for name, module in model.named_modules() if hasattr(module, "_hf_hook")}


@pytest.fixture(params=KINDS)
def dispatched(request, saved, tmp_path):
    arch, folder, reference, tokenizer = saved
    offload = tmp_path / "offload"
    model = _dispatched(request.param, arch, folder, offload)
    with torch.no_grad():  # accelerate's own first call (it unties GPT-2's offloaded lm_head from wte)
        model(IDS)
    offloaded = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert offloaded, "the dispatch under test offloads nothing: nothing would be moved in at call time"
    before, hooks = _folder_state(offload), _accelerate_hooks(model)
    assert hooks
    yield arch, model, reference, tokenizer
    # Afterwards: accelerate's hooks are the ones it installed, the model still runs through them
    # (weights moved in and out again), and the offload folder is as accelerate left it.
    assert _accelerate_hooks(model) == hooks
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, atol=ATOL, rtol=0)
    assert [n for n, p in model.named_parameters() if p.device.type == "meta"] == offloaded
    assert _folder_state(offload) == before
    leftovers = [p for p in tmp_path.iterdir() if p.name != "offload"]
    assert not leftovers


def _cube(model, tokenizer, **kwargs):
    with Tracer(model, tokenizer, **kwargs) as tracer:
        tracer.add_hooks_all()
        tracer.run(IDS)
    return tracer.cube


def test_tracer_and_recon_tracer_equal_the_undispatched_model(dispatched):
    arch, model, reference, tokenizer = dispatched
    raw = RawSlices(layers=r".*(mlp|attn)", tokens=(1, 6), dims=(0, 8))
    got, want = (_cube(m, tokenizer, raw=raw, attention="stats") for m in (model, reference))
    assert got.layer_names == want.layer_names and len(got.layer_names) > 8
    np.testing.assert_allclose(got.data, want.data, atol=ATOL, rtol=0)
    assert got.raw.keys() == want.raw.keys() and got.raw
    for i in want.raw:
        np.testing.assert_allclose(got.raw[i]["array"], want.raw[i]["array"], atol=ATOL, rtol=0)
    assert got.attention_layers == want.attention_layers and len(want.attention_layers) == 2
    np.testing.assert_allclose(got.attention_data, want.attention_data, atol=ATOL, rtol=0, equal_nan=True)
    assert got.meta["device"] == "cpu"
    # ReconTracer, the original tool's interface (its own hooks, attention probabilities asked for)
    cubes = []
    for m in (model, reference):
        tracer = ReconTracer(m)
        tracer.add_hooks_all()
        tracer.run(IDS[:1])
        cubes.append(tracer.activity_cube)
        tracer.clear_hooks()
    got, want = cubes
    assert [layer["layer_name"] for layer in got["layers"]] == [layer["layer_name"] for layer in want["layers"]]
    for a, b in zip(got["layers"], want["layers"]):
        assert a.keys() == b.keys()
        if "core_metrics" in b:
            for key in ("energy", "mean_activation", "std_activation"):
                np.testing.assert_allclose(a["core_metrics"][key], b["core_metrics"][key], atol=ATOL, rtol=0)
        else:  # the attention probabilities the original asks for (eager attention)
            np.testing.assert_allclose(a["attention_scores"], b["attention_scores"], atol=ATOL, rtol=0)
    assert any("attention_scores" in layer for layer in want["layers"])


SPLITS = {"components": {}, "heads": {"per_head": True}, "neurons": {"per_neuron": True},
          "sources": {"by_source": True, "source_top_k": 3}}


def test_attribution_logit_lens_and_chain_of_thought_equal_the_undispatched_model(dispatched):
    arch, model, reference, tokenizer = dispatched
    for options in SPLITS.values():
        got, want = (attribute_positions(m, IDS, [3, -1], target=(7, 11), **options) for m in (model, reference))
        for a, b in zip(got, want):
            assert a.labels == b.labels
            torch.testing.assert_close(a.values, b.values, atol=ATOL, rtol=0)
            torch.testing.assert_close(a.logit, b.logit, atol=ATOL, rtol=0)
            torch.testing.assert_close(a.total(), a.logit, atol=1e-5, rtol=0)  # still adds up
    got, want = (logit_lens(m, IDS, k=4) for m in (model, reference))
    assert torch.equal(got.token_ids, want.token_ids)
    torch.testing.assert_close(got.logprobs, want.logprobs, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.norms, want.norms, atol=ATOL, rtol=0)
    prompt = "t5 t9 t12. t40 t3 t8 t77. t2 t61"
    got, want = (chain_of_thought(m, tokenizer, prompt, per_head=True) for m in (model, reference))
    assert [s.token_index for s in got] == [s.token_index for s in want] and len(got) == 3
    for a, b in zip(got, want):
        torch.testing.assert_close(a.attribution.values, b.attribution.values, atol=ATOL, rtol=0)


def test_dataset_tracing_equals_the_undispatched_model(saved, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    from recon_fast.dataset import trace_dataset

    arch, folder, reference, tokenizer = saved
    model = _dispatched("from_pretrained", arch, folder, tmp_path / "offload")
    rng = np.random.default_rng(0)
    docs = [" ".join(f"t{j}" for j in rng.integers(2, 90, int(rng.integers(1, 30)))) for _ in range(12)]
    tables = []
    for name, m in (("dispatched", model), ("reference", reference)):
        trace_dataset(m, tokenizer, docs, tmp_path / name, max_tokens=24, batch_tokens=64, docs_per_shard=6,
                      progress=False)
        shards = sorted((tmp_path / name).rglob("*.parquet"))
        assert shards
        tables.append([pq.read_table(p).to_pydict() for p in shards])
    got, want = tables
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for key in a:
            _assert_close_values(a[key], b[key], key)
    got_profile, want_profile = (json.loads((tmp_path / n / "profile.json").read_text())
                                 for n in ("dispatched", "reference"))
    assert got_profile.keys() == want_profile.keys()
    # every statistic; of the meta, all but the model's name (the reference is a model in memory)
    got_profile["meta"].pop("model"), want_profile["meta"].pop("model")
    _assert_close_values(got_profile, want_profile, "profile.json")


def _assert_close_values(a, b, where: str) -> None:
    """Nested lists (and dicts) of Parquet or JSON values: numbers within ATOL, relative to their
    size past 1 (NaN where NaN), the rest equal."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_close_values(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for x, y in zip(a, b):
            _assert_close_values(x, y, where)
    elif isinstance(a, float):
        assert isinstance(b, float) and (abs(a - b) <= ATOL * max(1.0, abs(a)) or (np.isnan(a) and np.isnan(b))), (where, a, b)
    else:
        assert a == b, (where, a, b)


def test_the_split_is_one_line(saved, tmp_path):
    arch, folder, _, _ = saved
    model = _dispatched("from_pretrained", arch, folder, tmp_path / "offload")
    embed = _blocks(arch)[0].rsplit(".", 1)[-1]
    line = device_split(model)
    assert "\n" not in line
    if arch == "llama":
        assert line == f"{embed}, layers 0 on cpu, 1, norm, lm_head on disk, rotary_emb on cpu"
    else:
        assert line == f"wpe, {embed}, layers 0 on cpu, 1, ln_f on disk, lm_head on cpu"
    assert "on disk" in line and "on cpu" in line
    whole, _ = load_model(str(folder), progress=False)
    assert device_split(whole) == "all on cpu"


def test_device_and_device_map_together_are_one_error(saved):
    _, folder, _, _ = saved
    with pytest.raises(ValueError, match="not both"):
        load_model(str(folder), device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="go with a device_map"):
        load_model(str(folder), offload_folder="/tmp/x")


# ---- on a GPU: the first half on cuda:0, the second on the CPU ----------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("main_device", ["cuda:0", "cpu"])
def test_a_split_over_cuda_and_the_cpu_equals_the_undispatched_model(saved, main_device):
    """main_device cuda:0: accelerate runs the CPU half on the GPU, moving its weights in per call;
    main_device cpu: the second half really runs on the CPU (outputs on two devices, an arena each)."""
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM

    arch, folder, reference, tokenizer = saved
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    model = dispatch_model(model, _split_map(arch, "cuda:0", "cpu"), main_device=main_device)
    hooks = _accelerate_hooks(model)
    raw = RawSlices(layers=r".*mlp", tokens=(0, 4), dims=(0, 8))
    got, want = (_cube(m, tokenizer, raw=raw, attention="stats") for m in (model, reference))
    np.testing.assert_allclose(got.data, want.data, atol=1e-5, rtol=0)  # GPU kernels: float32 roundings differ
    np.testing.assert_allclose(got.attention_data, want.attention_data, atol=1e-5, rtol=0, equal_nan=True)
    for split in ({}, {"per_head": True}, {"per_neuron": True}, {"by_source": True}):
        a, b = (attribute_positions(m, IDS, [-1], target=(7, 11), **split)[0] for m in (model, reference))
        assert a.labels == b.labels
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=0)
    a, b = (logit_lens(m, IDS, k=3) for m in (model, reference))
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=0)
    assert _accelerate_hooks(model) == hooks
    with torch.no_grad():
        torch.testing.assert_close(model(IDS.cuda()).logits.cpu(), reference(IDS).logits, atol=1e-5, rtol=0)
    assert "cuda:0" in device_split(model) and "cpu" in device_split(model)
