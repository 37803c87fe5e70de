"""The position-aware baseline (recon_fast.dataset.profile, `trace --baseline`): the profile keeps
position 0 apart from the rest, compare() scores each token against its own position's bucket, and
profiles written before buckets still load (pooled, with a warning naming the file).

Fast tests on a tiny random Llama and on synthetic values; one slow test on a real SmolLM2 dataset
of a handful of short documents, whose first-token activations (norm ~23,770, the rest ~10-100)
made the pooled baseline flag token 0 of every prompt."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("pyarrow")

from tiny_models import make_model, word_tokenizer  # noqa: E402

from recon_fast.cli.baseline import layers_pattern  # noqa: E402
from recon_fast.cube.cube import ActivityCube  # noqa: E402
from recon_fast.dataset import Profile, compare, open as open_dataset, trace_dataset  # noqa: E402
from recon_fast.dataset.profile import POOLED_FORMAT, token_positions  # noqa: E402
from recon_fast.trace.tracer import Tracer  # noqa: E402


def first_token_values(rng, documents: int, length: int, layers: int = 3) -> list[np.ndarray]:
    """[layers, length, 1] per document: ~N(40, 10) everywhere, ~N(20000, 2000) at position 0."""
    out = []
    for _ in range(documents):
        v = rng.normal(40, 10, size=(layers, length, 1))
        v[:, 0] = rng.normal(20000, 2000, size=(layers, 1))
        out.append(v)
    return out


def cube_of(values: np.ndarray) -> ActivityCube:  # [layers, tokens, 1] -> a one-row energy cube
    layers, tokens, _ = values.shape
    return ActivityCube(tokens=[[f"w{i}" for i in range(tokens)]], layer_names=[f"l{i}" for i in range(layers)],
                        metrics=("energy",), data=values[:, None].astype(np.float32))


def profile_of(docs: list[np.ndarray], **kwargs) -> Profile:
    profile = Profile([f"l{i}" for i in range(docs[0].shape[0])], ("energy",), **kwargs)
    for v in docs:
        profile.add(v, documents=1, positions=np.arange(v.shape[1]))
    return profile


# ---- the statistics -----------------------------------------------------------------------------
def test_buckets_hold_exactly_their_positions_and_pool_to_the_whole():
    rng = np.random.default_rng(0)
    docs = first_token_values(rng, 40, 12)
    profile = profile_of(docs)
    first = np.stack([v[:, 0] for v in docs], 1)  # [layers, documents, 1]
    rest = np.concatenate([v[:, 1:] for v in docs], 1)
    everything = np.concatenate(docs, 1)
    assert profile.positions == (0, 1) and [b.tokens for b in profile.by_position] == [40, 440]
    for bucket, reference in zip(profile.by_position + [profile], (first, rest, everything)):
        np.testing.assert_array_equal(bucket.count[:, 0], reference.shape[1])
        np.testing.assert_allclose(bucket.mean[:, 0], reference.mean(1)[:, 0], rtol=1e-12)
        np.testing.assert_allclose(bucket.std[:, 0], reference.std(1, ddof=1)[:, 0], rtol=1e-10)
        np.testing.assert_array_equal(bucket.min[:, 0], reference.min(1)[:, 0])
    np.testing.assert_array_equal(sum(b.histogram for b in profile.by_position), profile.histogram)


def test_merging_parts_equals_the_whole_bucket_by_bucket_and_through_the_shard_state():
    rng = np.random.default_rng(1)
    docs = first_token_values(rng, 30, 9)
    whole = profile_of(docs)
    merged = Profile(whole.layers, whole.metrics)  # empty: takes the parts' buckets
    for part in (docs[:7], docs[7:20], docs[20:]):
        merged.merge(Profile.from_state(whole.layers, whole.metrics, profile_of(part).to_state()))
    for got, want in zip([merged, *merged.by_position], [whole, *whole.by_position]):
        np.testing.assert_array_equal(got.count, want.count)
        np.testing.assert_array_equal(got.histogram, want.histogram)
        np.testing.assert_allclose(got.mean, want.mean, rtol=1e-12)
        np.testing.assert_allclose(got.std, want.std, rtol=1e-10)
    pooled = Profile(whole.layers, whole.metrics, positions=None)
    pooled.add(docs[0], documents=1)
    assert whole.merge(pooled).pooled  # one side without positions: the buckets would not be whole


def test_compare_scores_each_token_against_its_own_position():
    rng = np.random.default_rng(2)
    profile = profile_of(first_token_values(rng, 200, 16))
    clean = first_token_values(rng, 1, 16)[0]  # a new document of the same distribution
    z = np.abs(compare(profile, cube_of(clean)).z)
    assert np.nanmax(z) < 4.5, np.nanmax(z)
    pooled = Profile(profile.layers, profile.metrics, positions=None).merge(profile)
    farthest = np.nanargmax(np.abs(compare(pooled, cube_of(clean)).z[:, 0, :, 0]), 1)  # per layer: token 0
    assert pooled.pooled and farthest.tolist() == [0, 0, 0]
    injected = clean.copy()
    injected[1, 5] = 400.0  # layer l1, token 5: out of distribution for positions 1+
    comparison = compare(profile, cube_of(injected))
    assert comparison.position_buckets == (0, 1)
    assert comparison.top(1)[0][:3] == ("l1", 0, 5) and comparison.top(1)[0][4] > 30


def test_positions_follow_the_padding_of_either_side():
    cube = cube_of(np.ones((1, 4, 1)))
    cube.data = np.concatenate([cube.data, cube.data], 1)
    cube.padding_mask = np.array([[True, True, False, False], [False, False, False, True]])
    assert token_positions(cube).tolist() == [[-1, -1, 0, 1], [0, 1, 2, -1]]


def test_an_old_pooled_profile_still_compares_with_a_warning_naming_the_file(tmp_path):
    rng = np.random.default_rng(3)
    docs = first_token_values(rng, 20, 8)
    pooled = Profile([f"l{i}" for i in range(3)], ("energy",), positions=None)
    for v in docs:
        pooled.add(v, documents=1)
    old = pooled.to_dict()
    old["format"] = POOLED_FORMAT  # as recon-fast wrote profiles before position buckets
    del old["position_buckets"]
    path = tmp_path / "old_profile.json"
    path.write_text(json.dumps(old))
    with pytest.warns(UserWarning, match=r"old_profile\.json pools every token position.*keep position 0 apart"):
        comparison = compare(path, cube_of(docs[0]))
    assert comparison.position_buckets is None and np.isfinite(comparison.z).all()
    new = tmp_path / "profile.json"
    profile_of(docs).save(new)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Profile.load(new).by_position[0].tokens == 20


@pytest.mark.parametrize("positions, message", [((1, 2), "start at 0"), ((0, 3, 3), "increase")])
def test_bad_buckets_are_refused(positions, message):
    with pytest.raises(ValueError, match=message):
        Profile(["l"], ("energy",), positions=positions)


def test_positions_must_match_the_tokens():
    with pytest.raises(ValueError, match="one per token"):
        Profile(["l"], ("energy",)).add(np.ones((1, 3, 1)), positions=np.arange(2))


# ---- through the dataset tracer ------------------------------------------------------------------
def scale_at(module: torch.nn.Module, token: int, factor: float):
    """A forward hook multiplying `module`'s output at one token: an out-of-distribution activation.
    Prepended, so that the tracer's own hook on the module sees the scaled output."""
    def hook(_, __, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[:, token] *= factor
        return output
    return module.register_forward_hook(hook, prepend=True)


def injected_is_found(model, tokenizer, profile: Profile, text: str, blocks, layer: int, token: int, factor: float):
    """The clean document's max |z|, and the injected run's comparison."""
    ids = tokenizer(text, return_tensors="pt")
    with Tracer(model, tokenizer, layers=layers_pattern(profile)) as tracer:
        tracer.run(dict(ids))
        clean = compare(profile, tracer.cube)
        handle = scale_at(blocks[layer], token, factor)
        try:
            tracer.run(dict(ids))
        finally:
            handle.remove()
        return clean, compare(profile, tracer.cube), tracer.cube.layer_names


def test_tiny_model_dataset_keeps_position_zero_apart_and_flags_an_injection(tmp_path):
    torch.manual_seed(0)
    model, tokenizer = make_model("llama"), word_tokenizer()
    rng = np.random.default_rng(4)
    texts = [" ".join(f"t{i}" for i in rng.integers(2, 90, size=rng.integers(8, 14))) for _ in range(24)]
    trace_dataset(model, tokenizer, texts, tmp_path / "tiny", max_tokens=32, batch_tokens=128, docs_per_shard=8)
    profile = Profile.load(tmp_path / "tiny" / "profile.json")
    reader = open_dataset(tmp_path / "tiny")
    cubes = [reader.cube(i) for i in range(len(texts))]
    first = np.stack([c.data[:, 0, 0] for c in cubes], 1).astype(np.float64)  # [layers, docs, metrics]
    assert profile.by_position[0].tokens == len(texts)
    np.testing.assert_array_equal(profile.by_position[0].count, len(texts))
    np.testing.assert_allclose(profile.by_position[0].mean, first.mean(1), rtol=1e-9)
    np.testing.assert_allclose(profile.by_position[0].std, first.std(1, ddof=1), rtol=1e-9)
    assert profile.by_position[1].tokens == profile.tokens - len(texts)

    layer, token = 1, 4
    clean, hit, names = injected_is_found(model, tokenizer, profile, texts[0], model.model.layers, layer, token, 50.0)
    assert clean.position_buckets == (0, 1)
    top = hit.top(1)[0]
    assert top[2] == token and abs(top[4]) > 5 * np.nanmax(np.abs(clean.z)), (top, np.nanmax(np.abs(clean.z)))
    # the first layer that moves is the one scaled: the residual stream before it is untouched
    moved = [names[i] for i in range(len(names)) if not np.allclose(hit.z[i], clean.z[i], equal_nan=True)]
    assert moved and moved[0] == f"model.layers.{layer}", moved


# ---- the real model ----------------------------------------------------------------------------------
DOCUMENTS = [
    "The cat sat on the warm windowsill and watched the birds in the garden.",
    "Paris is the capital of France, and it is known for its museums and cafes.",
    "To bake bread, mix flour, water, salt and yeast, then let the dough rise.",
    "The stock market fell sharply on Monday after the report on inflation.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
    "She opened the old letter slowly, afraid of what it might say.",
]


@pytest.mark.slow
def test_smollm2_dataset_document_is_not_flagged_and_an_injection_is(smollm2, tmp_path):
    model, tokenizer = smollm2
    trace_dataset(model, tokenizer, DOCUMENTS, tmp_path / "smol", max_tokens=32)
    profile = Profile.load(tmp_path / "smol" / "profile.json")
    first, rest = profile.by_position
    energy = profile.metrics.index("energy")
    # why buckets: the first token's energy is in a class of its own in this model
    assert np.nanmax(first.mean[:, energy]) > 100 * np.nanmedian(rest.mean[:, energy])

    # The dataset's own documents. Pooled, the farthest value of most of them was at token 0
    # (metric min, |z| ~ 5). Now token 0 is one of the 6 samples of its bucket (|z| <= 5/sqrt(6))
    # and no document's farthest value is there.
    worst = 0.0
    with Tracer(model, tokenizer, layers=layers_pattern(profile)) as tracer:
        for text in DOCUMENTS:
            tracer.run(dict(tokenizer(text, return_tensors="pt")))
            comparison = compare(profile, tracer.cube)
            assert comparison.position_buckets == (0, 1) and comparison.top(1)[0][2] != 0, (text, comparison.top(3))
            assert np.nanmax(np.abs(comparison.z[:, 0, 0])) <= 5 / np.sqrt(6) + 1e-9
            worst = max(worst, float(np.nanmax(np.abs(comparison.z))))

    layer, token = 12, 5  # model.layers.12's output at token 5, scaled 8x
    clean, hit, names = injected_is_found(model, tokenizer, profile, DOCUMENTS[1], model.model.layers, layer, token,
                                          8.0)
    at = names.index(f"model.layers.{layer}")
    assert hit.top(1)[0][2] == token and np.nanmax(np.abs(hit.z[at, 0, token])) > 3 * worst, (hit.top(3), worst)
    moved = [names[i] for i in range(len(names)) if not np.allclose(hit.z[i], clean.z[i], equal_nan=True)]
    assert moved and moved[0] == f"model.layers.{layer}", moved  # nothing before it is flagged
