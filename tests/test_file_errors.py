"""Every reader names the file and what is wrong with it, with one error type
(recon_fast.file_errors.FileFormatError, a ValueError): cubes in each format, `recon-fast view`'s
sources (cubes and attribution JSON), --baseline profiles, a dataset's manifest and shards, and
resume, where a committed shard whose footer is damaged is traced again, never merged."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from recon_fast.cube.cube import ActivityCube
from recon_fast.dataset.profile import Profile
from recon_fast.file_errors import FileFormatError
from recon_fast.cli.view import read_source

SUFFIXES = [".json", ".json.gz", ".npz"]


def small_cube() -> ActivityCube:
    rng = np.random.default_rng(0)
    data = rng.standard_normal((3, 2, 5, 2)).astype(np.float32)
    mask = np.zeros((2, 5), bool)
    mask[1, 3:] = True
    data[:, mask] = np.nan
    return ActivityCube(tokens=[list("abcde"), list("fghij")], layer_names=["l0", "l1", "l2"],
                        metrics=("energy", "max"), data=data, padding_mask=mask, meta={"model_name": "m"})


def assert_names_file(exc: FileFormatError, path, expected: str) -> None:
    assert isinstance(exc, ValueError)
    assert exc.path == str(path) and str(path) in str(exc) and expected in str(exc), str(exc)
    assert exc.problem and "\n" not in str(exc)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_cut_short_cube_names_file_and_format(tmp_path, suffix):
    path = tmp_path / f"cube{suffix}"
    small_cube().export(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(FileFormatError) as caught:
        ActivityCube.load(path)
    kind = {".json": ".json", ".json.gz": ".json.gz", ".npz": ".npz"}[suffix]
    assert_names_file(caught.value, path, f"cube ({kind})")
    with pytest.raises(FileFormatError) as caught:  # recon-fast view reads through the same check
        read_source(path)
    assert_names_file(caught.value, path, "cube")


def test_wrong_structure_is_the_same_error(tmp_path):
    """Files that parse but are not cubes: a missing key, a row of the wrong length."""
    path = tmp_path / "cube.json"
    small_cube().export(path)
    doc = json.loads(path.read_text())
    del doc["layers"][1]["core_metrics"]["energy"]
    path.write_text(json.dumps(doc))
    with pytest.raises(FileFormatError, match="energy"):
        ActivityCube.load(path)
    doc = json.loads(gzip.decompress(gzip.compress(json.dumps({"meta": {}, "tokens": ["a", "b"],
                                                                 "layers": [{"layer_name": "x", "core_metrics":
                                                                             {"energy": [1.0]}}]}).encode())))
    path.write_text(json.dumps(doc))
    with pytest.raises(FileFormatError) as caught:
        ActivityCube.load(path)
    assert_names_file(caught.value, path, "cube (.json)")


def test_attribution_json_cut_short(tmp_path):
    path = tmp_path / "attribution.json"
    text = json.dumps({"labels": ["a", "b"], "sequences": [{"values": [1.0, 2.0]}]})
    path.write_text(text[:-7])
    with pytest.raises(FileFormatError) as caught:
        read_source(path)
    assert_names_file(caught.value, path, "attribution JSON")
    assert "does not parse as JSON" in str(caught.value)


def saved_profile(tmp_path):
    profile = Profile(["l0", "l1"], ("energy", "max"))
    profile.add(np.random.default_rng(0).standard_normal((2, 30, 2)), documents=3)
    path = tmp_path / "profile.json"
    profile.save(path)
    return profile, path


def test_profile_damaged(tmp_path):
    profile, path = saved_profile(tmp_path)
    assert Profile.load(path).count.tolist() == profile.count.tolist()  # intact: reads
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(FileFormatError) as caught:
        Profile.load(path)
    assert_names_file(caught.value, path, "profile")
    doc = json.loads(text)
    doc["count"] = doc["count"][:1]  # parses, and one layer's row is missing
    path.write_text(json.dumps(doc))
    with pytest.raises(FileFormatError, match="count is") as caught:
        Profile.load(path)
    assert_names_file(caught.value, path, "profile")


def test_cli_baseline_names_file_in_one_line(tmp_path, capsys):
    from recon_fast.cli import main

    _, path = saved_profile(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    assert main(["trace", "--prompt", "x", "--model", str(tmp_path / "no-model"), "--baseline", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "profile" in err, err


# ---- datasets: the manifest, a shard, resume -------------------------------------------------
pytest.importorskip("pyarrow")
from test_dataset import KWARGS, assert_same_output, assert_same_profile, assets, single  # noqa: E402,F401


def test_dataset_reader_names_damaged_manifest_and_shard(single, tmp_path):
    import shutil

    from recon_fast.dataset import open as open_dataset

    out = tmp_path / "copy"
    shutil.copytree(single, out)
    manifest = out / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    with pytest.raises(FileFormatError) as caught:
        open_dataset(out)
    assert_names_file(caught.value, manifest, "manifest")
    manifest.write_text(text)
    reader = open_dataset(out)
    shard = out / reader.manifest["shards"][1]["activations"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    doc = int(open_dataset(single).documents(["doc_id"]).column(0)[0].as_py())
    with pytest.raises(FileFormatError) as caught:
        reader.layer_metric(0, "energy")
    assert_names_file(caught.value, shard, "shard")
    documents = out / reader.manifest["shards"][0]["documents_file"]
    documents.write_bytes(b"PAR1 not parquet")
    with pytest.raises(FileFormatError) as caught:
        open_dataset(out).cube(doc)
    assert caught.value.path in {str(documents), str(shard)}


def test_resume_redoes_shard_with_damaged_footer(assets, single, tmp_path):
    """A committed shard whose metadata parses but holds a partial profile of the wrong shape is
    traced again: merged, it would broadcast into every cell of the profile."""
    import shutil

    import pyarrow.parquet as pq

    from recon_fast.dataset import shards, trace_dataset
    from test_dataset import single_threaded

    folder, model, tokenizer = assets
    out = tmp_path / "damaged"
    shutil.copytree(single, out)
    (out / "manifest.json").unlink()
    path = shards.shard_path(out, shards.ACTIVATIONS, 0, 1)
    table = pq.read_table(path)
    info = json.loads(table.schema.metadata[shards.META_KEY])
    info["profile"]["count"] = [[1]]
    info["profile"]["mean"] = [[1e6]]
    pq.write_table(table.replace_schema_metadata({shards.META_KEY: json.dumps(info).encode()}), path)
    with single_threaded():
        manifest = trace_dataset(model, tokenizer, folder / "docs.jsonl", out, resume=True, **KWARGS)
    assert manifest["ranks"][0]["resumed_shards"] == len(manifest["shards"]) - 1
    assert_same_output(out, single)
    assert_same_profile(Profile.load(out / "profile.json"), Profile.load(single / "profile.json"), rtol=0)
