"""Tracer(attention="stats"): attention statistics under the model's own attention implementation.

Every family is checked against statistics computed here, in float64, from eager attention's
`output_attentions` on the same weights: random weights with q/k scaled up so softmax is peaked
(uniform attention would hide a wrong mask or a wrong argmax), batches with left padding, sliding
windows small enough to bite, Gemma2's soft-cap low enough to bite. Tolerances are the op's
(tests/test_attention_stats.py): weights 1e-4 absolute, entropy 1e-4 relative to |ref| + 0.1,
argmax equal except at ties, mean_distance 1e-3 tokens. lse is not in output_attentions (it is
checked against the float64 dense softmax in the op's own tests). Logits are compared with
torch.equal to the untraced model."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import VOCAB, make_model, save_model_folder

from recon_fast import ActivityCube, Tracer
from recon_fast.kernels.attention_stats import ATTENTION_STATS
from recon_fast.trace import attention_intercept, attention_stats_capture

SINKS = attention_stats_capture.SINK_TOKENS
QK_NAMES = ("q_proj", "k_proj", "q_norm", "k_norm", "c_attn", "query_key_value", ".query.", ".key.")


def peaked(model: torch.nn.Module, factor: float = 12.0) -> torch.nn.Module:
    """Scales the query and key projections (and Qwen3's q/k norms, which undo a projection's scale)
    up: attention logits x factor^2, so rows are peaked."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(part in name for part in QK_NAMES):
                parameter.mul_(factor)
    return model.eval()


def build(family: str, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A small random model of `family`; the sliding-window families with a window of 4 keys."""
    from transformers import (Gemma2Config, Gemma2ForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, hidden_size=48, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=12, max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
                  pad_token_id=0, attn_implementation=attn_implementation)
    if family == "gemma2":  # no sdpa (soft-cap): transformers refuses it at construction
        common["attn_implementation"] = "eager"
    if family == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=4, **common))
    elif family in ("qwen2", "qwen3"):  # one sliding layer, one full: per-layer windows from layer_types
        config_class, model_class = {"qwen2": (Qwen2Config, Qwen2ForCausalLM),
                                     "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[family]
        model = model_class(config_class(use_sliding_window=True, sliding_window=4,
                                         layer_types=["sliding_attention", "full_attention"], **common))
    elif family == "gemma2":  # layers alternate sliding / full; soft-cap low enough to bite
        model = Gemma2ForCausalLM(Gemma2Config(sliding_window=4, attn_logit_softcapping=2.0,
                                               query_pre_attn_scalar=12, **common))
    else:
        model = make_model({"gpt_neox": "neox"}.get(family, family), attn_implementation=attn_implementation)
    return peaked(model)


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gpt2", "gpt_neox", "bert"]


def left_padded(batch: int = 3, length: int = 13, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, padding in zip(range(1, batch), (3, 5)):
        mask[row, :padding] = 0
    return {"input_ids": ids, "attention_mask": mask}


def eager_twin(model: torch.nn.Module) -> torch.nn.Module:
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    return twin


def stats_from_probabilities(p: torch.Tensor) -> dict[str, np.ndarray]:
    """float64 statistics of eager probabilities p [B, H, Tq, Tk] (queries are the last Tq keys)."""
    p = p.double()
    q_len, k_len = p.shape[-2:]
    i = torch.arange(q_len)[:, None] + (k_len - q_len)
    j = torch.arange(k_len)[None]
    return {"entropy": -torch.special.xlogy(p, p).sum(-1).numpy(), "max_weight": p.amax(-1).numpy(),
            "argmax": p.argmax(-1).double().numpy(), "sink_mass": p[..., :SINKS].sum(-1).numpy(),
            "mean_distance": (p * (i - j)).sum(-1).numpy(), "self_weight": (p * (i == j)).sum(-1).numpy(),
            "prev_weight": (p * (i - 1 == j)).sum(-1).numpy(),
            "second": p.topk(2, dim=-1).values[..., 1].numpy() if k_len > 1 else np.zeros(p.shape[:-1])}


def assert_matches_eager(got: np.ndarray, probabilities: list[torch.Tensor], real: np.ndarray) -> None:
    """got [layers, B, H, T, 8] against eager probabilities per layer; only real queries count
    (real [B, T]); padded queries must be NaN."""
    assert got.shape[0] == len(probabilities)
    for layer, p in enumerate(probabilities):
        ref = stats_from_probabilities(p)
        mine = {name: got[layer, ..., k] for k, name in enumerate(ATTENTION_STATS)}
        counted = np.broadcast_to(real[:, None, :], mine["entropy"].shape)
        assert np.isnan(got[layer][~counted]).all(), f"layer {layer}: padded queries are not NaN"
        for name, atol, rtol in (("max_weight", 1e-4, 0), ("sink_mass", 1e-4, 0), ("self_weight", 1e-4, 0),
                                 ("prev_weight", 1e-4, 0), ("mean_distance", 1e-3, 0)):
            np.testing.assert_allclose(mine[name][counted], ref[name][counted], atol=atol, rtol=rtol,
                                       err_msg=f"layer {layer} {name}")
        err = np.abs(mine["entropy"] - ref["entropy"]) / (np.abs(ref["entropy"]) + 0.1)
        assert err[counted].max() <= 1e-4, f"layer {layer} entropy: worst relative error {err[counted].max():.2e}"
        tie = (ref["max_weight"] - ref["second"]) < 1e-5
        differ = (mine["argmax"] != ref["argmax"]) & counted & ~tie
        assert not differ.any(), f"layer {layer} argmax differs at {np.argwhere(differ)[:5].tolist()}"


def logits_of(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
def test_statistics_equal_eager_and_logits_are_bit_identical(family):
    model = build(family)
    inputs = left_padded()
    with torch.no_grad():
        untraced = logits_of(model(**inputs))
        eager = eager_twin(model)(**inputs, output_attentions=True)
    tracer = Tracer(model, attention="stats")
    traced = logits_of(tracer.run(inputs))
    assert torch.equal(traced, untraced)
    assert model.config._attn_implementation == untraced_implementation(family)
    cube = tracer.cube
    assert len(cube.attention_layers) == len(eager.attentions)
    assert cube.attention_data.shape == (2, 3, 4, 13, 8)
    real = inputs["attention_mask"].bool().numpy()
    assert_matches_eager(cube.attention_data, list(eager.attentions), real)
    # The weights are peaked: uniform attention would make a wrong mask or argmax invisible.
    assert np.nanmean(cube.attention_stat("max_weight")) > 0.5


def untraced_implementation(family: str) -> str:
    return "eager" if family == "gemma2" else "sdpa"  # Gemma2 has no sdpa (soft-cap): transformers picks eager


def test_sliding_windows_bite_in_the_test_models():
    """The windowed layers really see fewer keys than the full ones (else the window is untested)."""
    model = build("qwen2")
    tracer = Tracer(model, attention="stats")
    tracer.run(left_padded(batch=1, length=12))
    distance = tracer.cube.attention_stat("mean_distance")[:, 0, :, -1]  # last query
    assert distance[0].max() <= 3 + 1e-4 < distance[1].max()  # window of 4 keys: at most 3 back


def test_eager_model_stays_bit_identical():
    model = build("llama", attn_implementation="eager")
    inputs = left_padded()
    with torch.no_grad():
        untraced = model(**inputs).logits
    traced = Tracer(model, attention="stats").run(inputs).logits
    assert torch.equal(traced, untraced)
    assert model.config._attn_implementation == "eager"


def test_soft_cap_under_sdpa_runs_what_the_model_runs():
    """transformers >= 5.21: sdpa refuses Gemma2's soft-cap; a model set to sdpa anyway gets the
    family's eager math in blocks of queries (tests/test_softcap_attention.py), equal but for the
    matmuls' shapes (last bits). Before 5.21 sdpa dropped the soft-cap: the traced run drops it
    too, with a warning."""
    model = build("gemma2")
    eager_logits = model(**left_padded()).logits.detach()
    model.config._attn_implementation_internal = "sdpa"
    if attention_intercept.sdpa_drops_softcap():
        untraced = model(**left_padded()).logits.detach()
        assert not torch.allclose(untraced, eager_logits)  # the soft-cap bites; sdpa dropped it
        attention_intercept._warned.clear()  # warned once per process: maybe already
        with pytest.warns(UserWarning, match="ignores the attention soft-cap"):
            traced = Tracer(model, attention="stats").run(left_padded()).logits
        assert torch.equal(traced, untraced)
    else:
        with pytest.raises(ValueError, match="softcap"):
            model(**left_padded())
        traced = Tracer(model, attention="stats").run(left_padded()).logits
        torch.testing.assert_close(traced, eager_logits, atol=1e-5, rtol=0)
    assert model.config._attn_implementation == "sdpa"


def test_generate_extends_the_token_axis_with_each_decode_step():
    model = build("qwen2")
    prompt = left_padded(batch=2, length=6)
    tracer = Tracer(model, attention="stats")
    sequences = tracer.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    cube = tracer.cube
    fed = sequences.shape[1] - 1  # the last generated token never goes through the model
    assert cube.attention_data.shape == (2, 2, 4, fed, 8)
    mask = torch.cat([prompt["attention_mask"], torch.ones(2, sequences.shape[1] - 6, dtype=torch.long)], 1)[:, :fed]
    with torch.no_grad():
        eager = eager_twin(model)(input_ids=sequences[:, :fed], attention_mask=mask, output_attentions=True)
    assert_matches_eager(cube.attention_data, list(eager.attentions), mask.bool().numpy())


def test_implementation_restored_when_the_forward_raises():
    model = build("llama")

    def explode(module, args, output):
        raise RuntimeError("boom")

    handle = model.model.layers[1].register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        Tracer(model, attention="stats").run(left_padded())
    handle.remove()
    assert model.config._attn_implementation == "sdpa"
    assert not attention_intercept._active
    model(**left_padded())  # runs untraced again


def test_other_model_types_are_refused_by_name():
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=16, num_layers=1,
                                             num_heads=2))
    with pytest.raises(ValueError, match="'t5'"):
        Tracer(t5, attention="stats")


def test_summary_mode_points_to_stats():
    with pytest.raises(ValueError, match="attention='stats'"):
        Tracer(build("llama"), attention="summary")


def test_statistics_beside_token_statistics_and_file_round_trips(tmp_path):
    model = build("llama")
    inputs = left_padded()
    tracer = Tracer(model, layers="residual", attention="stats")
    tracer.run(inputs)
    cube = tracer.cube
    assert cube.attention_layers == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert cube.attention_stat("entropy").shape == (2, 3, 4, 13)
    for path in (tmp_path / "cube.json", tmp_path / "cube.json.gz", tmp_path / "cube.npz"):
        cube.export(path)
        loaded = ActivityCube.load(path)
        assert loaded.attention_layers == cube.attention_layers
        np.testing.assert_array_equal(loaded.attention_data, cube.attention_data)
        np.testing.assert_array_equal(loaded.data, cube.data)
    doc = cube.to_dict()
    entry = doc["layers"][cube.num_layers]
    assert entry["layer_name"] == "attention.0" and entry["module_name"] == "model.layers.0.self_attn"
    assert entry["layer_index"] == cube.num_layers
    assert set(entry["attention_stats"]) == set(ATTENTION_STATS)
    # Streamed: layer by layer to disk, the attention entries after the layers, the same numbers.
    streamed = tmp_path / "streamed.json"
    Tracer(model, layers="residual", attention="stats", stream_to=streamed).run(inputs)
    loaded = ActivityCube.load(streamed)
    np.testing.assert_array_equal(loaded.attention_data, cube.attention_data)
    np.testing.assert_array_equal(loaded.data, cube.data)


def test_attention_only_needs_no_hooks():
    tracer = Tracer(build("gpt2"), attention="stats")
    tracer.run(left_padded())
    assert tracer.cube.num_layers == 0 and len(tracer.cube.attention_layers) == 2


def test_compact_mask_never_builds_a_square_mask_where_the_model_would_not():
    """Full causal attention under sdpa without padding: no [B, 1, T, T] mask at all (sdpa runs
    with is_causal, the op with causal). With a window sdpa needs the mask the untraced model
    builds too, but the op still gets the compact form (causal + window), never a general mask."""
    built, for_stats = [], []
    original_built, original_stats = (attention_intercept.CompactMask.built_for,
                                      attention_intercept.CompactMask.for_stats)

    def spy_built(self, implementation):
        built.append(original_built(self, implementation))
        return built[-1]

    def spy_stats(self, key_length):
        for_stats.append(original_stats(self, key_length))
        return for_stats[-1]

    attention_intercept.CompactMask.built_for = spy_built
    attention_intercept.CompactMask.for_stats = spy_stats
    try:
        Tracer(build("llama"), attention="stats").run(torch.randint(1, VOCAB, (1, 12)))
        assert built and all(mask is None for mask in built)
        assert for_stats and all(s == (True, None, None, None) for s in for_stats)
        for_stats.clear()
        Tracer(build("mistral"), attention="stats").run(torch.randint(1, VOCAB, (1, 12)))
        assert for_stats and all(s == (True, 4, None, None) for s in for_stats)
    finally:
        attention_intercept.CompactMask.built_for = original_built
        attention_intercept.CompactMask.for_stats = original_stats


def test_heads_command_prints_roles_and_writes_a_report(tmp_path):
    folder = save_model_folder(tmp_path / "model", model=build("llama"))
    report = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "recon_fast.cli", "heads", "--prompt", "t3 t5 t7 t9 t11 t13 t15 t17",
                             "--model", str(folder), "--report", str(report)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "sharpest" in lines[1] and "sink heads" in lines[1] and "prev-token heads" in lines[1]
    assert lines[2].startswith("model.layers.0.self_attn") and lines[3].startswith("model.layers.1.self_attn")
    assert (report / "heads.png").stat().st_size > 0 and (report / "heads.json").is_file()
    traced = subprocess.run([sys.executable, "-m", "recon_fast.cli", "trace", "--prompt", "t3 t5 t7", "--model",
                             str(folder), "--attention", "stats", "--out", str(tmp_path / "c.npz")],
                            capture_output=True, text=True)
    assert traced.returncode == 0, traced.stderr
    assert ActivityCube.load(tmp_path / "c.npz").attention_stat("sink_mass").shape[0] == 2


@pytest.mark.cuda
def test_on_cuda_equal_to_eager_and_bit_identical():
    model = build("qwen2").cuda()
    inputs = {k: v.cuda() for k, v in left_padded().items()}
    with torch.no_grad():
        untraced = model(**inputs).logits
        eager = eager_twin(model)(**inputs, output_attentions=True)
    tracer = Tracer(model, attention="stats")
    assert torch.equal(tracer.run(inputs).logits, untraced)
    assert_matches_eager(tracer.cube.attention_data, [a.cpu() for a in eager.attentions],
                         inputs["attention_mask"].bool().cpu().numpy())


@pytest.mark.slow
def test_real_smollm2_equal_to_eager_and_bit_identical(smollm2):
    model, tokenizer = smollm2
    tokenizer.padding_side = "left"
    inputs = tokenizer(["Why do bees buzz?", "The capital of France is Paris, and the capital of Spain is"],
                       return_tensors="pt", padding=True)
    inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():
        untraced = model(**inputs).logits
    tracer = Tracer(model, tokenizer, attention="stats")
    assert torch.equal(tracer.run(inputs).logits, untraced)
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            eager = model(**inputs, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    assert len(tracer.cube.attention_layers) == 30
    assert_matches_eager(tracer.cube.attention_data, list(eager.attentions), inputs["attention_mask"].bool().numpy())
