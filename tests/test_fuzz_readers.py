"""Fuzzing the readers (hypothesis): random cubes (shapes, NaN/Inf, padding, attention statistics,
raw slices) in every format round-trip exactly; then, cut short or with bytes flipped at random,
every reader either returns the same data or raises the one error (FileFormatError) naming the
file, nothing else, and within a deadline (SIGALRM: a hang fails the example instead of the run).

Plain .json has no checksum: a flipped digit is another number and still a cube, so there a
flipped file may also load as a different, valid cube; .json.gz (gzip's CRC-32) and .npz (the zip
members' CRC-32) cannot change silently, so there the data must be the same or the load refused.

The CI profile is short and deterministic (seconds); RECON_FAST_FUZZ=long runs many more, random,
examples (minutes)."""

from __future__ import annotations

import contextlib
import json
import os
import signal

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from recon_fast.cube.cube import ActivityCube
from recon_fast.dataset.profile import Profile
from recon_fast.file_errors import FileFormatError
from recon_fast.kernels.attention_stats import ATTENTION_STATS
from recon_fast.kernels.token_stats import STATS
from recon_fast.cli.view import read_source

LONG = os.environ.get("RECON_FAST_FUZZ") == "long"
PROFILE = settings(max_examples=1500 if LONG else 25, deadline=None, derandomize=not LONG, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
MUTATIONS = 12 if LONG else 4  # damaged copies per random cube
SECONDS = 20  # per load: far above any real one (milliseconds), far below a hang


@contextlib.contextmanager
def deadline(seconds: int = SECONDS):
    def expired(signum, frame):
        raise TimeoutError(f"a reader ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@st.composite
def cubes(draw) -> ActivityCube:
    layers, batch, length = draw(st.integers(0, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 6))
    metrics = tuple(draw(st.lists(st.sampled_from(list(STATS)), min_size=1, max_size=len(STATS), unique=True)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def values(shape):
        v = (rng.standard_normal(shape) * 10.0 ** rng.integers(-30, 30, shape)).astype(np.float32)
        special = rng.random(shape)
        v[special < 0.05] = np.nan
        v[(special >= 0.05) & (special < 0.08)] = np.inf
        v[(special >= 0.08) & (special < 0.1)] = -np.inf
        return v

    data = values((layers, batch, length, len(metrics)))
    mask = None
    if draw(st.booleans()):  # right padding: a row's tail
        lengths = rng.integers(1, length + 1, batch)
        mask = np.arange(length)[None, :] >= lengths[:, None]
        data[:, mask] = np.nan
    text = st.text(max_size=4)
    tokens = [draw(st.lists(text, min_size=length, max_size=length)) for _ in range(batch)]
    attention_layers, attention_data = [], None
    if draw(st.booleans()):
        count, heads = draw(st.integers(1, 2)), draw(st.integers(1, 3))
        attention_layers = [f"model.layers.{i}.self_attn" for i in range(count)]
        attention_data = values((count, batch, heads, length, len(ATTENTION_STATS)))
    raw = {}
    for i in range(layers):
        if draw(st.booleans()):
            t0 = int(rng.integers(0, length))
            t1 = int(rng.integers(t0 + 1, length + 1))
            dims = int(rng.integers(1, 5))
            raw[i] = {"array": values((batch, t1 - t0, dims)), "token_range": [t0, t1], "dim_range": [0, dims]}
    return ActivityCube(tokens=tokens, layer_names=[f"model.layers.{i}" for i in range(layers)], metrics=metrics,
                        data=data, padding_mask=mask, meta={"model_name": draw(text)},
                        attention_layers=attention_layers, attention_data=attention_data, raw=raw)


def json_values(a: np.ndarray | None) -> np.ndarray | None:
    """What JSON keeps of float32 values: Inf has no JSON form and is written null, read NaN."""
    return None if a is None else np.where(np.isinf(a), np.float32(np.nan), a)


def assert_same(got: ActivityCube, want: ActivityCube, binary: bool) -> None:
    keep = (lambda a: a) if binary else json_values
    assert got.tokens == want.tokens and got.layer_names == want.layer_names and got.metrics == want.metrics
    np.testing.assert_array_equal(got.data, keep(want.data))  # NaN == NaN here, bit-exact otherwise
    assert (got.padding_mask is None) == (want.padding_mask is None)
    if want.padding_mask is not None:
        np.testing.assert_array_equal(got.padding_mask, want.padding_mask)
    assert got.attention_layers == want.attention_layers
    assert (got.attention_data is None) == (want.attention_data is None)
    if want.attention_data is not None:
        np.testing.assert_array_equal(got.attention_data, keep(want.attention_data))
    assert sorted(got.raw) == sorted(want.raw)
    for i, entry in want.raw.items():  # the raw sidecar is .npz in every format: exact
        np.testing.assert_array_equal(got.raw[i]["array"], entry["array"])
        assert list(got.raw[i]["token_range"]) == entry["token_range"]
    assert got.meta == want.meta


def damaged(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    if rng.random() < 0.4 or len(data) < 2:
        return data[: int(rng.integers(0, len(data)))], "cut"
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        out[int(rng.integers(0, len(out)))] ^= int(rng.integers(1, 256))
    return bytes(out), "flipped"


def check_reader(read, path, original, suffix: str, how: str, compare) -> None:
    try:
        with deadline():
            got = read(path)
    except FileFormatError as exc:
        assert exc.path in (str(path), str(path) + ".raw.npz"), (exc.path, path)
        assert "\n" not in str(exc)
        return
    if suffix == ".json" and how == "flipped":
        return  # no checksum in plain JSON: another valid cube is what the file now says
    compare(got, original)


@pytest.mark.parametrize("suffix", [".json", ".json.gz", ".npz"])
@PROFILE
@given(cube=cubes(), seed=st.integers(0, 2**32 - 1))
def test_cube_round_trip_and_damage(tmp_path_factory, suffix, cube, seed):
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / f"cube{suffix}"
    cube.export(path)
    binary = suffix == ".npz"
    with deadline():
        assert_same(ActivityCube.load(path), cube, binary)
    rng = np.random.default_rng(seed)
    files = [path] + ([ActivityCube.raw_sidecar(path)] if cube.raw and not binary else [])
    for _ in range(MUTATIONS):
        target = files[int(rng.integers(0, len(files)))]
        intact = target.read_bytes()
        broken, how = damaged(intact, rng)
        target.write_bytes(broken)
        try:
            for read in (ActivityCube.load, read_source):  # `recon-fast view` reads the same files
                check_reader(read, path, cube, suffix if target == path else ".npz", how,
                             lambda got, want: assert_same(got, want, binary))
        finally:
            target.write_bytes(intact)


@PROFILE
@given(seed=st.integers(0, 2**32 - 1), layers=st.integers(1, 3), metrics=st.integers(1, len(STATS)))
def test_profile_damage(tmp_path_factory, seed, layers, metrics):
    rng = np.random.default_rng(seed)
    profile = Profile([f"l{i}" for i in range(layers)], tuple(list(STATS)[:metrics]))
    # Two documents of 10 tokens, with positions: the bucketed format (position 0 apart) that
    # trace-dataset writes today (a pooled profile would also warn on every load).
    profile.add(rng.standard_normal((layers, 20, metrics)) * 100, documents=2, positions=np.tile(np.arange(10), 2))
    path = tmp_path_factory.mktemp("fuzz") / "profile.json"
    profile.save(path)
    want = Profile.load(path).to_dict()
    intact = path.read_bytes()
    for _ in range(MUTATIONS):
        broken, how = damaged(intact, rng)
        path.write_bytes(broken)
        try:
            with deadline():
                got = Profile.load(path)
        except FileFormatError as exc:
            assert exc.path == str(path)
            continue
        if how == "cut":
            assert json.dumps(got.to_dict()) == json.dumps(want)
