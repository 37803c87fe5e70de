"""The ActivityCube file formats: the schema key by key, exact round trips, atomic writes,
streaming from the tracer, and the peak memory of a large export."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from recon_fast import ActivityCube, Tracer
from recon_fast.cube import export

from tiny_models import VOCAB, make_model


def traced_cube(batch=1, **kw):
    model = make_model("gpt2")
    tracer = Tracer(model, layers="blocks+components", **kw)
    tokens = torch.randint(1, VOCAB, (batch, 6), generator=torch.Generator().manual_seed(5))
    tracer.run(tokens)
    return tracer, tokens


def test_schema_key_by_key(tmp_path):
    tracer, tokens = traced_cube()
    path = tmp_path / "cube.json"
    tracer.cube.export_json(path)
    doc = json.loads(path.read_text())  # valid JSON for the standard library too
    assert list(doc) == ["meta", "tokens", "layers", "provenance"]
    meta = doc["meta"]
    assert meta["model_name"] == "GPT2LMHeadModel" and meta["input_shape"] == [1, 6]
    assert isinstance(meta["timestamp"], str) and "T" in meta["timestamp"]
    assert meta["backend"] == "cpp" and meta["device"] == "cpu" and meta["dtype"] == "float32"
    assert meta["metrics"] == ["energy", "mean_activation", "std_activation", "min_activation", "max_activation"]
    assert doc["tokens"] == [str(t) for t in tokens[0].tolist()]  # flat for batch size 1
    assert len(doc["layers"]) == 6
    for i, layer in enumerate(doc["layers"]):
        assert list(layer) == ["layer_index", "layer_name", "core_metrics"]
        assert layer["layer_index"] == i
        assert list(layer["core_metrics"])[:3] == ["energy", "mean_activation", "std_activation"]
        assert all(len(v) == 6 and isinstance(v[0], float) for v in layer["core_metrics"].values())
    assert doc["layers"][0]["layer_name"] == "transformer.h.0.attn"
    prov = doc["provenance"]
    assert set(prov) >= {"commit_hash", "package_versions"}
    assert set(prov["package_versions"]) >= {"torch", "transformers", "recon_fast", "python"}
    assert prov["package_versions"]["torch"] == torch.__version__
    assert len(prov["model_config_sha256"]) == 64


def test_the_config_fingerprint_does_not_depend_on_where_the_model_was_loaded_from(tmp_path):
    from transformers import AutoModelForCausalLM

    from recon_fast.cube.provenance import model_provenance

    model = make_model("llama")
    model.save_pretrained(tmp_path / "a")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert loaded.config._name_or_path != model.config._name_or_path
    fingerprint = model_provenance(model)["model_config_sha256"]
    assert model_provenance(loaded)["model_config_sha256"] == fingerprint
    loaded.config.num_attention_heads *= 2  # a real change of the architecture still shows
    assert model_provenance(loaded)["model_config_sha256"] != fingerprint


def test_batch_lists_are_per_sequence(tmp_path):
    tracer, _ = traced_cube(batch=3)
    doc = tracer.cube.to_dict()
    assert len(doc["tokens"]) == 3 and len(doc["tokens"][0]) == 6
    energy = doc["layers"][0]["core_metrics"]["energy"]
    assert energy.shape == (3, 6)


def test_json_round_trip_is_exact_and_nan_becomes_null(tmp_path):
    tracer, _ = traced_cube(batch=2)
    cube = tracer.cube
    cube.data[1, 0, 2, 2] = np.nan
    path = tmp_path / "c.json"
    cube.export_json(path)
    assert b"null" in path.read_bytes() and b"NaN" not in path.read_bytes()
    back = ActivityCube.load(path)
    np.testing.assert_array_equal(back.data, cube.data)  # bit-exact float32, NaN included
    assert back.layer_names == cube.layer_names and back.tokens == cube.tokens
    assert back.metrics == cube.metrics and back.meta == cube.meta and back.provenance == cube.provenance


def test_npz_round_trip_keeps_infinities(tmp_path):
    tracer, _ = traced_cube()
    cube = tracer.cube
    cube.data[0, 0, 0, 0] = np.inf
    cube.export(tmp_path / "c.npz")
    back = ActivityCube.load(tmp_path / "c.npz")
    np.testing.assert_array_equal(back.data, cube.data)
    assert back.layer_names == cube.layer_names and back.meta == cube.meta


def test_streaming_tracer_writes_what_the_in_memory_cube_would(tmp_path):
    tracer, tokens = traced_cube(batch=2)
    streamed = Tracer(tracer.model, layers="blocks+components", stream_to=str(tmp_path / "s.json"))
    streamed.run(tokens)
    assert streamed.streamed_to == str(tmp_path / "s.json")
    with pytest.raises(RuntimeError, match="streamed to .*tracer.streamed_to"):
        streamed.cube
    back = ActivityCube.load(streamed.streamed_to)
    np.testing.assert_array_equal(back.data, tracer.cube.data)
    assert back.layer_names == tracer.cube.layer_names
    npz = Tracer(tracer.model, layers="blocks+components", stream_to=str(tmp_path / "s.npz"))
    npz.run(tokens)
    np.testing.assert_array_equal(ActivityCube.load(tmp_path / "s.npz").data, tracer.cube.data)


def test_a_failed_export_never_replaces_a_good_file(tmp_path):
    path = tmp_path / "cube.json"
    path.write_text('{"good": true}')

    def layers():
        yield {"layer_index": 0, "layer_name": "a", "core_metrics": {}}
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        export.write_json(path, meta={}, tokens=[["x"]], layers=layers(), provenance={})
    assert path.read_text() == '{"good": true}'
    assert os.listdir(tmp_path) == ["cube.json"], "a temporary file was left behind"


def test_unknown_format_and_bad_cube_are_named(tmp_path):
    tracer, _ = traced_cube()
    with pytest.raises(ValueError, match="unknown cube format"):
        tracer.cube.export(tmp_path / "x", "xml")
    with pytest.raises(ValueError, match="does not match"):
        ActivityCube(tokens=[["a"]], layer_names=["l"], metrics=("energy",), data=np.zeros((1, 1, 2, 1)))


def test_to_pandas_is_tidy():
    pd = pytest.importorskip("pandas")
    tracer, _ = traced_cube(batch=2)
    frame = tracer.cube.to_pandas()
    assert len(frame) == 6 * 2 * 6 and list(frame.columns)[:5] == ["layer_index", "batch", "position", "layer_name", "token"]


PEAK_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from recon_fast import ActivityCube

    def status(key):  # kB -> bytes
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    layers, tokens = int(sys.argv[2]), int(sys.argv[3])
    data = np.empty((layers, 1, tokens, 5), dtype=np.float32)
    np.random.default_rng(0).standard_normal(out=data, dtype=np.float32)
    data *= 1e3
    cube = ActivityCube(tokens=[[str(i) for i in range(tokens)]], layer_names=[f"l{i}" for i in range(layers)],
                        metrics=("energy", "mean", "std", "min", "max"), data=data)
    # Reset the peak (VmHWM) to the resident size now: importing torch peaks higher than it
    # settles, and that slack would hide a whole document held in memory.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    size = EXPORT
    print(size, status("VmHWM") - before, data.nbytes)
""")
STREAMED = "cube.export_json(sys.argv[1])"


def measure_export_peak(path, layers, tokens, export_call=STREAMED):
    """(file bytes, peak RSS growth during export, cube bytes), in a fresh process."""
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT.replace("EXPORT", export_call), str(path), str(layers), str(tokens)],
                         check=True, capture_output=True, text=True).stdout.split()
    return tuple(int(v) for v in out)


def test_large_export_streams_layer_by_layer(tmp_path):
    # ~60 MB of JSON from 200 layers: the whole document in memory would show up in peak RSS.
    size, growth, cube_bytes = measure_export_peak(tmp_path / "big.json", 200, 12000)
    assert size > 50e6, "test cube too small to mean anything"
    assert growth <= size / 2, f"export raised peak RSS by {growth / 1e6:.1f} MB for a {size / 1e6:.1f} MB file"
    back = ActivityCube.load(tmp_path / "big.json")
    assert back.shape == (200, 1, 12000, 5)


def test_peak_measurement_would_catch_a_whole_document_in_memory(tmp_path):
    # The same measurement on an export that builds the whole text first must fail the bound,
    # or the test above proves nothing.
    whole = "len(__import__('orjson').dumps(cube.to_dict(), option=__import__('orjson').OPT_SERIALIZE_NUMPY))"
    size, growth, _ = measure_export_peak(tmp_path / "unused.json", 200, 12000, whole)
    assert growth > size / 2


# ---- issue 10: the format follows the file name; no temporary file outlives an export ---------------
import gzip  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402


def test_the_format_follows_the_suffix_and_a_contradiction_is_an_error(tmp_path):
    tracer, tokens = traced_cube()
    cube = tracer.cube
    cube.export(tmp_path / "c.json.gz")
    assert (tmp_path / "c.json.gz").read_bytes()[:2] == b"\x1f\x8b"
    np.testing.assert_array_equal(ActivityCube.load(tmp_path / "c.json.gz").data, cube.data)
    cube.export(tmp_path / "c.npz")
    assert (tmp_path / "c.npz").read_bytes()[:2] == b"PK"
    with pytest.raises(ValueError, match=r"unknown file suffix '\.csv'.*\.json, \.json\.gz or \.npz"):
        cube.export(tmp_path / "c.csv")
    with pytest.raises(ValueError, match="conflicts"):
        cube.export(tmp_path / "x.json", "npz")
    with pytest.raises(ValueError, match="suffix"):
        Tracer(tracer.model, layers="residual", stream_to=str(tmp_path / "s.csv"))
    streamed = Tracer(tracer.model, layers="blocks+components", stream_to=str(tmp_path / "s.json.gz"))
    streamed.run(tokens)
    np.testing.assert_array_equal(ActivityCube.load(tmp_path / "s.json.gz").data, cube.data)
    assert sorted(os.listdir(tmp_path)) == ["c.json.gz", "c.npz", "s.json.gz"]


SLOW_EXPORT = textwrap.dedent("""
    import sys, time
    from recon_fast.cube import export

    def layers():
        for i in range(3):
            yield {"layer_index": i, "layer_name": "x" * 100000, "core_metrics": {}}
        print("exporting", flush=True)
        time.sleep(120)  # the signal arrives here, mid-export
        yield {"layer_index": 3, "layer_name": "never", "core_metrics": {}}

    export.write_json(sys.argv[1], meta={}, tokens=[["a"]], layers=layers(), provenance={})
""")


def _interrupted_export(path, sig):
    child = subprocess.Popen([sys.executable, "-c", SLOW_EXPORT, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "exporting"
        assert [n for n in os.listdir(path.parent) if n.endswith(".tmp")], "no temporary file mid-export"
        child.send_signal(sig)
        return child.wait(timeout=60)
    finally:
        child.kill()
        child.wait()


def test_sigterm_during_an_export_removes_its_temporary_file(tmp_path):
    code = _interrupted_export(tmp_path / "cube.json", signal.SIGTERM)
    assert code == -signal.SIGTERM  # still dies of the signal, as it would have
    assert os.listdir(tmp_path) == [], "SIGTERM left a temporary file behind"


def test_a_later_export_removes_stale_temporary_files_of_its_own(tmp_path):
    path = tmp_path / "cube.json"
    assert _interrupted_export(path, signal.SIGKILL) == -signal.SIGKILL
    (stale,) = os.listdir(tmp_path)  # SIGKILL cannot be caught: the temporary file stays ...
    other = tmp_path / ".other.json.abc123.tmp"
    other.write_text("another file's")
    old = time.time() - 3600  # (/proc gives a process's start to the second: make the gap plain)
    for left in (tmp_path / stale, other):
        os.utime(left, (old, old))
    export_in_a_new_process = "from recon_fast.cube import export; export.write_json(__import__('sys').argv[1], " \
                              "meta={}, tokens=[['a']], layers=[], provenance={})"
    subprocess.run([sys.executable, "-c", export_in_a_new_process, str(path)], check=True)
    # ... until the next export to that path, from a process started after it was left
    assert sorted(os.listdir(tmp_path)) == [".other.json.abc123.tmp", "cube.json"]
    # one that may belong to an export still running (newer than this process) is left alone
    young = tmp_path / f".cube.json.{'x' * 8}.tmp"
    young.write_text("in flight")
    export.write_json(path, meta={}, tokens=[["a"]], layers=[], provenance={})
    assert young.exists()
