"""Dataset tracing (recon_fast.dataset): one process, two ranks under torchrun (gloo), a rank
killed after its first shard and resumed, a truncated shard, the merged profile, compare(), and
attention statistics (on the first 40 documents, as a list of strings).

One tiny random Llama and one word-level tokenizer, saved to a folder so the torchrun ranks load
exactly the same model; ~200 generated documents of 0 to 69 words (truncated to 48 tokens), so
batches mix lengths and carry padding. Every run uses one thread per process, as torchrun gives
each rank (OMP_NUM_THREADS=1), so one process and two ranks run the same kernels on the same
batches and their outputs can be compared bit for bit."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from tiny_models import VOCAB, make_model  # noqa: E402

from recon_fast.cube.cube import ActivityCube  # noqa: E402
from recon_fast.dataset import Profile, compare, open as open_dataset, trace_dataset  # noqa: E402
from recon_fast.dataset import shards, sources  # noqa: E402
from recon_fast.kernels.attention_stats import ATTENTION_STATS  # noqa: E402
from recon_fast.trace.tracer import Tracer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = 200
SETTINGS = ["--max-tokens", "48", "--batch-tokens", "256", "--docs-per-shard", "16"]
KWARGS = {"max_tokens": 48, "batch_tokens": 256, "docs_per_shard": 16}
ATTENTION_KWARGS = {**KWARGS, "docs_per_shard": 8, "attention": "stats"}
ATTENTION_DOCS = 40


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("dataset")
    core = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="t0", eos_token="t0", unk_token="t1",
                                        pad_token="t0")
    model = make_model("llama")
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    rng = np.random.default_rng(0)
    with open(folder / "docs.jsonl", "w") as f:
        for i in range(DOCS):
            n = 0 if i == 7 else int(rng.integers(1, 70))  # document 7 is empty: no token, left out
            f.write(json.dumps({"id": i, "text": " ".join(f"t{j}" for j in rng.integers(2, VOCAB, n))}) + "\n")
    return folder, model, tokenizer


@contextlib.contextmanager
def single_threaded():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    with single_threaded():
        yield


@pytest.fixture(scope="module")
def single(assets):
    folder, model, tokenizer = assets
    with single_threaded():
        trace_dataset(model, tokenizer, folder / "docs.jsonl", folder / "single", **KWARGS)
    return folder / "single"


def first_texts(folder: Path, count: int = ATTENTION_DOCS) -> list[str]:
    """The first documents as a list of strings (their doc_id is their index; document 7 is empty)."""
    return [json.loads(line)["text"] for line in (folder / "docs.jsonl").read_text().splitlines()[:count]]


@pytest.fixture(scope="module")
def with_attention(assets):
    folder, model, tokenizer = assets
    with single_threaded():
        trace_dataset(model, tokenizer, first_texts(folder), folder / "attention", **ATTENTION_KWARGS)
    return folder / "attention"


def torchrun(folder: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return torchrun_cli("trace-dataset", folder, out, *SETTINGS, *extra, env=env)


def torchrun_cli(subcommand: str, folder: Path, out: Path, *options: str,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    """`recon-fast SUBCOMMAND` over folder's docs.jsonl and model, as two gloo ranks on the CPU."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "recon_fast.cli", subcommand, "--data", str(folder / "docs.jsonl"), "--out", str(out),
               "--model", str(folder / "model"), *options]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)


@pytest.fixture(scope="module")
def two_ranks(assets):
    folder, _, _ = assets
    done = torchrun(folder, folder / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "two"


def tables(out: Path) -> dict[str, pa.Table]:
    """Every shard's activations, documents and (when traced) attention, sorted (the order ranks
    wrote them in is theirs)."""
    manifest = json.loads((out / "manifest.json").read_text())
    keys = {"activations": ["doc_id", "layer"], "documents_file": ["doc_id"], "attention": ["doc_id", "layer", "head"]}
    found = {}
    for key, order in keys.items():
        if key in manifest["shards"][0]:
            table = pa.concat_tables([pq.read_table(out / s[key]) for s in manifest["shards"]])
            found[key] = table.replace_schema_metadata(None).sort_by([(c, "ascending") for c in order])
    return found


def assert_same_output(out: Path, reference: Path) -> None:
    got, want = tables(out), tables(reference)
    assert list(got) == list(want)
    for what in want:
        g, w = got[what], want[what]
        assert g.column_names == w.column_names
        for name in w.column_names:
            g_col = g.column(name).combine_chunks() if name != "layer_name" else g.column(name).cast(pa.string())
            w_col = w.column(name).combine_chunks() if name != "layer_name" else w.column(name).cast(pa.string())
            assert g_col.equals(w_col), f"{what}.{name} differs from the reference run"


def assert_same_profile(got: Profile, want: Profile, rtol: float) -> None:
    assert got.layers == want.layers and got.metrics == want.metrics
    np.testing.assert_array_equal(got.count, want.count)
    np.testing.assert_array_equal(got.histogram, want.histogram)
    assert (got.documents, got.tokens) == (want.documents, want.tokens)
    np.testing.assert_array_equal(got.min, want.min)
    np.testing.assert_array_equal(got.max, want.max)
    np.testing.assert_allclose(got.mean, want.mean, rtol=rtol, atol=0)
    np.testing.assert_allclose(got.std, want.std, rtol=rtol, atol=0)
    assert got.positions == want.positions  # and the position buckets alike
    for got_bucket, want_bucket in zip(got.by_position or (), want.by_position or ()):
        assert_same_profile(got_bucket, want_bucket, rtol)


def test_single_process_output_and_reader(assets, single, one_thread):
    folder, model, tokenizer = assets
    manifest = json.loads((single / "manifest.json").read_text())
    assert manifest["documents"] == DOCS - 1 and manifest["empty_documents"] == 1
    assert manifest["layers"] == ["model.layers.0", "model.layers.1"]
    assert manifest["padded_tokens"] > manifest["tokens"]  # batches did carry padding
    found = tables(single)
    activations, documents = found["activations"], found["documents_file"]
    assert "attention" not in found and not manifest["attention_layers"]
    assert documents.column("doc_id").to_pylist() == [i for i in range(DOCS) if i != 7]
    assert documents.column("source_row").to_pylist() == documents.column("doc_id").to_pylist()
    # Padding never reaches the output: every list is exactly the document's tokens long.
    lengths = {d: n for d, n in zip(documents.column("doc_id").to_pylist(), documents.column("tokens").to_pylist())}
    for name in ("energy", "max"):
        got = [len(v) for v in activations.column(name).to_pylist()]
        assert got == [lengths[d] for d in activations.column("doc_id").to_pylist()]
    assert not np.isnan(np.concatenate(activations.column("energy").to_numpy(zero_copy_only=False))).any()

    # A document traced alone (no padding, no batch) gives the same values, to float rounding.
    reader = open_dataset(single)
    text = json.loads((folder / "docs.jsonl").read_text().splitlines()[42])["text"]
    with Tracer(model, tokenizer, layers="residual") as tracer:
        tracer.run(tokenizer(text, truncation=True, max_length=48, return_tensors="pt"))
        alone = tracer.cube
    cube = reader.cube(42, tokenizer=tokenizer)
    assert cube.tokens == alone.tokens and cube.layer_names == alone.layer_names
    np.testing.assert_allclose(cube.data, alone.data, rtol=1e-5, atol=1e-6)

    # One layer x metric across every document, and the cube, agree with the table.
    energy = reader.layer_metric("model.layers.1", "energy")
    assert list(energy) == documents.column("doc_id").to_pylist()
    np.testing.assert_array_equal(energy[42], cube.metric("energy")[1, 0])
    np.testing.assert_array_equal(reader.layer_metric(-1, "energy")[42], energy[42])  # as a list counts
    with pytest.raises(KeyError, match="out of range: this dataset has 2"):
        reader.layer_metric(2, "energy")
    row = activations.filter(pa.compute.and_(pa.compute.equal(activations["doc_id"], 42),
                                             pa.compute.equal(activations["layer"], 0)))
    np.testing.assert_array_equal(np.asarray(row.column("std")[0].as_py(), np.float32), cube.metric("std")[0, 0])


def test_two_ranks_union_equals_single_process(single, two_ranks):
    manifest = json.loads((two_ranks / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and {s["rank"] for s in manifest["shards"]} == {0, 1}
    loads = [r["padded_tokens"] for r in manifest["ranks"]]
    assert max(loads) - min(loads) <= 256  # length-balanced: within one batch's worth
    assert_same_output(two_ranks, single)


def test_profile_merged_across_ranks_equals_single_process(single, two_ranks):
    got, want = Profile.load(two_ranks / "profile.json"), Profile.load(single / "profile.json")
    assert_same_profile(got, want, rtol=1e-6)
    # And the profile is right: the exact moments of every value in the output.
    activations = tables(single)["activations"]
    for layer in range(2):
        rows = activations.filter(pa.compute.equal(activations["layer"], layer))
        for m, name in enumerate(want.metrics):
            values = np.concatenate(rows.column(name).to_numpy(zero_copy_only=False)).astype(np.float64)
            assert want.count[layer, m] == values.size
            np.testing.assert_allclose(want.mean[layer, m], values.mean(), rtol=1e-9)
            np.testing.assert_allclose(want.std[layer, m], values.std(ddof=1), rtol=1e-9)
            assert (want.min[layer, m], want.max[layer, m]) == (values.min(), values.max())


def test_killed_rank_resumes_to_identical_output(assets, single, tmp_path):
    folder, _, _ = assets
    out = tmp_path / "killed"
    killed = torchrun(folder, out, env={"RECON_FAST_DATASET_FAULT": "kill:1:0"})
    assert killed.returncode != 0
    assert not (out / "manifest.json").exists()
    assert [p.name for p in (out / "activations" / "rank1").glob("part-*.parquet")] == ["part-00000.parquet"]
    resumed = torchrun(folder, out, "--resume", "--progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "shard(s) kept from the earlier run" in resumed.stdout
    # Rank 0's terminal shows a bar per rank, each ending at that rank's documents.
    manifest = json.loads((out / "manifest.json").read_text())
    for rank in range(2):
        final = [line for line in resumed.stderr.replace("\r", "\n").splitlines() if f"rank {rank}/2" in line][-1]
        assert f" {manifest['ranks'][rank]['documents']}/" in final and "tok/s" in final, final
    assert not (out / ".progress").exists()
    assert_same_output(out, single)
    assert_same_profile(Profile.load(out / "profile.json"), Profile.load(single / "profile.json"), rtol=1e-6)


def interrupted_copy(run: Path, out: Path, table: str) -> tuple[Path, int]:
    """A copy of `run` as a crash could leave it: no manifest, rank 0's last file of `table` cut
    in half. Returns that file and its full size."""
    shutil.copytree(run, out)
    (out / "manifest.json").unlink()
    last = sorted((out / table / "rank0").glob("part-*.parquet"))[-1]
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    return last, len(data)


def test_truncated_last_shard_is_redone(assets, single, tmp_path, one_thread):
    folder, model, tokenizer = assets
    out = tmp_path / "truncated"
    last, size = interrupted_copy(single, out, "activations")
    with pytest.raises(ValueError, match="--resume"):
        trace_dataset(model, tokenizer, folder / "docs.jsonl", out, **KWARGS)
    manifest = trace_dataset(model, tokenizer, folder / "docs.jsonl", out, resume=True, **KWARGS)
    assert manifest["ranks"][0]["resumed_shards"] == len(manifest["shards"]) - 1
    assert last.stat().st_size == size
    assert_same_output(out, single)
    assert_same_profile(Profile.load(out / "profile.json"), Profile.load(single / "profile.json"), rtol=0)
    # Other settings into the same folder are refused rather than mixed.
    with pytest.raises(ValueError, match="other settings"):
        trace_dataset(model, tokenizer, folder / "docs.jsonl", out, resume=True, **{**KWARGS, "batch_tokens": 128})


def test_attention_statistics_equal_each_document_traced_alone(assets, single, with_attention, one_thread):
    folder, model, tokenizer = assets
    manifest = json.loads((with_attention / "manifest.json").read_text())
    assert manifest["attention_layers"] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert manifest["attention_statistics"] == list(ATTENTION_STATS) and len(manifest["shards"]) >= 3
    heads = manifest["attention_heads"]
    found = tables(with_attention)
    attention, documents = found["attention"], found["documents_file"]
    assert attention.column_names == ["doc_id", "layer", "layer_name", "head", "tokens", *ATTENTION_STATS]
    lengths = dict(zip(documents.column("doc_id").to_pylist(), documents.column("tokens").to_pylist()))
    assert sorted(lengths) == [i for i in range(ATTENTION_DOCS) if i != 7]
    assert attention.num_rows == len(lengths) * 2 * heads
    # Padding never reaches the output: every list is exactly the document's tokens long.
    for name in ATTENTION_STATS:
        got = [len(v) for v in attention.column(name).to_pylist()]
        assert got == [lengths[d] for d in attention.column("doc_id").to_pylist()], name
    assert attention.column("tokens").to_pylist() == [lengths[d] for d in attention.column("doc_id").to_pylist()]

    reader = open_dataset(with_attention)
    argmax = ATTENTION_STATS.index("argmax")
    texts = first_texts(folder)
    with Tracer(model, tokenizer, layers="residual", attention="stats") as tracer:
        for doc_id in lengths:
            tracer.run(tokenizer(texts[doc_id], truncation=True, max_length=48, return_tensors="pt"))
            alone = tracer.cube.attention_data[:, 0]  # [layers, heads, tokens, statistics]
            rows = attention.filter(pa.compute.equal(attention["doc_id"], doc_id))  # sorted by layer, head
            table = np.stack([np.stack(rows.column(s).to_numpy(zero_copy_only=False)) for s in ATTENTION_STATS], -1)
            table = table.reshape(alone.shape)
            # Batched with padding vs alone: the same math on other shapes, so float rounding apart;
            # the argmax is a key index, exact (no ties in a random model's scores).
            np.testing.assert_allclose(table, alone, rtol=1e-5, atol=1e-6, err_msg=f"document {doc_id}")
            np.testing.assert_array_equal(table[..., argmax], alone[..., argmax])
            cube = reader.cube(doc_id)
            assert cube.attention_layers == tracer.cube.attention_layers
            np.testing.assert_array_equal(cube.attention_data[:, 0], table)

    # One attention layer x statistic across every document (all heads, or one) agrees with the cube.
    entropy = reader.attention_stat("model.layers.1.self_attn", "entropy")
    assert list(entropy) == sorted(lengths) and entropy[13].shape == (heads, lengths[13])
    cube = reader.cube(13)
    np.testing.assert_array_equal(entropy[13], cube.attention_stat("entropy")[1, 0])
    lse = reader.attention_stat(0, "lse", head=2)
    np.testing.assert_array_equal(lse[13], cube.attention_stat("lse")[0, 0, 2])
    with pytest.raises(KeyError, match="no attention statistics"):
        open_dataset(single).attention_stat(0, "entropy")


def test_truncated_attention_file_is_redone(assets, single, with_attention, tmp_path, one_thread):
    folder, model, tokenizer = assets
    out = tmp_path / "truncated"
    last, size = interrupted_copy(with_attention, out, "attention")  # the activations file, the commit, is intact
    manifest = trace_dataset(model, tokenizer, first_texts(folder), out, resume=True, **ATTENTION_KWARGS)
    assert manifest["ranks"][0]["resumed_shards"] == len(manifest["shards"]) - 1
    assert last.stat().st_size == size
    assert_same_output(out, with_attention)
    # Resuming with another attention setting is refused, either way round.
    with pytest.raises(ValueError, match="other settings"):
        trace_dataset(model, tokenizer, first_texts(folder), out, resume=True, **{**ATTENTION_KWARGS, "attention": None})
    plain = tmp_path / "plain"
    shutil.copytree(single, plain)
    with pytest.raises(ValueError, match="other settings"):
        trace_dataset(model, tokenizer, folder / "docs.jsonl", plain, resume=True, attention="stats", **KWARGS)


def test_cli_traces_attention_statistics(assets, tmp_path, capsys):
    from recon_fast.cli import main

    folder, _, _ = assets
    data = tmp_path / "six.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in first_texts(folder, 6)))
    code = main(["trace-dataset", "--data", str(data), "--out", str(tmp_path / "o"), "--model", str(folder / "model"),
                 "--attention", "stats", *SETTINGS])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "attention statistics of 2 layers x 4 heads" in printed
    reader = open_dataset(tmp_path / "o")
    assert reader.attention_layers == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert sorted(reader.attention_stat(1, "sink_mass", head=0)) == list(range(6))


def test_compare_flags_an_injected_outlier(assets, single):
    folder, model, tokenizer = assets
    profile = Profile.load(single / "profile.json")
    text = json.loads((folder / "docs.jsonl").read_text().splitlines()[3])["text"]
    with Tracer(model, tokenizer, layers="residual") as tracer:
        tracer.run(text)
        normal = compare(profile, tracer.cube)

        def blow_up(module, inputs, output):  # token 5 of block 1's output, 30x: an outlier prompt
            hidden = output[0] if isinstance(output, tuple) else output
            hidden[:, 5] *= 30
            return output

        handle = model.model.layers[1].register_forward_hook(blow_up, prepend=True)  # before the tracer's
        try:
            tracer.run(text)
        finally:
            handle.remove()
        outlier = compare(folder / "single" / "profile.json", tracer.cube)
    layer, batch, token, metric, z, percentile = outlier.top(1)[0]
    assert (layer, batch, token) == ("model.layers.1", 0, 5)
    assert z > 10 * max(abs(normal.top(1)[0][4]), 1.0)
    energy = outlier.metrics.index("energy")
    assert outlier.percentile[1, 0, 5, energy] == 100.0  # beyond everything the dataset showed
    assert 0 < normal.percentile[1, 0, 5, energy] < 100


def test_progress_bar_counts_documents_and_is_quiet_by_default(assets, tmp_path, capsys, one_thread):
    folder, model, tokenizer = assets
    manifest = trace_dataset(model, tokenizer, folder / "docs.jsonl", tmp_path / "shown", progress=True, **KWARGS)
    final = capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]
    # Done: 100% of the documents traced (the ETA's estimate was the source's 200 lines, the
    # empty document included, which is never traced).
    assert sources.count(folder / "docs.jsonl") == DOCS and sources.count(iter(["a"])) is None
    assert f"{manifest['documents']}/{manifest['documents']}" in final and f"{manifest['tokens']} tok" in final, final
    assert "tok/s" in final and not (tmp_path / "shown" / ".progress").exists()
    # Debris of a killed run with attention that committed nothing: not part of a run without it.
    stale = tmp_path / "quiet" / shards.ATTENTION / "rank0" / "part-00000.parquet"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a file")
    trace_dataset(model, tokenizer, folder / "docs.jsonl", tmp_path / "quiet", **KWARGS)  # stderr is not a tty
    assert capsys.readouterr().err == ""
    assert not stale.exists()


def test_baseline_report_reads_the_layer_that_fired_where_a_name_repeats():
    from recon_fast.cli import baseline

    rng = np.random.default_rng(0)
    profile = Profile(["shared.norm", "shared.norm"], ("energy",))
    profile.add(rng.standard_normal((2, 500, 1)).astype(np.float32) + 5, documents=10)
    data = np.full((2, 1, 4, 1), 5.0, np.float32)
    data[1, 0, 2, 0] = 99.0  # the module's second firing, token 2: far out
    cube = ActivityCube(tokens=[["a", "b", "c", "d"]], layer_names=["shared.norm", "shared.norm"],
                        metrics=("energy",), data=data)
    comparison = compare(profile, cube)
    assert comparison.top_indices(1) == [(1, 0, 2, 0)]
    printed = baseline.report(comparison, cube, profile, "profile.json", rows=1).splitlines()
    value_row = printed[printed.index("values farthest from the dataset:") + 2].split()
    assert value_row[:4] == ["shared.norm", "2:'c'", "energy", "99"], value_row


def test_compare_warns_when_the_profile_comes_from_another_model():
    profile = Profile(["l"], ("energy",), meta={"model_config_sha256": "a" * 64})
    profile.add(np.ones((1, 3, 1), np.float32))
    cube = ActivityCube(tokens=[["x"]], layer_names=["l"], metrics=("energy",), data=np.ones((1, 1, 1, 1), np.float32),
                        provenance={"model_config_sha256": "b" * 64})
    with pytest.warns(UserWarning, match="another model configuration"):
        compare(profile, cube)
    cube.provenance["model_config_sha256"] = "a" * 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compare(profile, cube)


def test_trace_baseline_prints_what_compare_finds(assets, single, tmp_path, capsys):
    from recon_fast.cli import main

    folder, model, tokenizer = assets
    text = json.loads((folder / "docs.jsonl").read_text().splitlines()[3])["text"]
    out = tmp_path / "c.json"
    code = main(["trace", "--prompt", text, "--model", str(folder / "model"), "--baseline",
                 str(single / "profile.json"), "--out", str(out), "--rows", "3"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    # Without --layers, exactly the profile's layers were traced.
    assert [layer["layer_name"] for layer in json.loads(out.read_text())["layers"]] == ["model.layers.0", "model.layers.1"]
    with Tracer(model, tokenizer, layers="residual") as tracer:
        tracer.run(text)
        expected = compare(single / "profile.json", tracer.cube).top(3)
    rows = printed.split("values farthest from the dataset:\n")[1].splitlines()[1:4]
    for row, (layer, _, token, metric, z, percentile) in zip(rows, expected):
        fields = row.split()
        assert (fields[0], fields[1].split(":")[0], fields[2]) == (layer, str(token), metric), row
        assert float(fields[4]) == pytest.approx(z, abs=0.006) and float(fields[5]) == pytest.approx(percentile, abs=0.06)
    # A file that is not a profile is refused before any model loads (the model path is bogus).
    assert main(["trace", "--prompt", "x", "--model", str(tmp_path / "no-model"), "--baseline", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--baseline" in err and "not a recon-fast profile" in err


def test_profile_merges_exactly_in_any_split():
    rng = np.random.default_rng(1)
    values = (rng.standard_normal((3, 1000, 2)) * 50 + 10).astype(np.float32)
    values[1, 17, 0] = np.nan  # non-finite values are counted apart, never in the moments
    whole = Profile(["a", "b", "c"], ("energy", "mean"))
    whole.add(values, documents=1)
    parts = Profile(["a", "b", "c"], ("energy", "mean"))
    for chunk in np.array_split(values, [1, 300, 301, 999], axis=1):
        part = Profile(["a", "b", "c"], ("energy", "mean"))
        part.add(chunk)
        parts.merge(part)
    parts.documents = 1
    assert_same_profile(parts, Profile.from_dict(json.loads(json.dumps(whole.to_dict()))), rtol=1e-12)
    assert whole.nonfinite[1, 0] == 1 and whole.count[1, 0] == 999
    finite = values[1, :, 0][np.isfinite(values[1, :, 0])].astype(np.float64)
    np.testing.assert_allclose(whole.std[1, 0], finite.std(ddof=1), rtol=1e-12)
    np.testing.assert_allclose(whole.quantile(0.5)[0, 0], np.median(values[0, :, 0]), rtol=0.3)


def test_cli_errors_are_one_line(assets, tmp_path, capsys):
    from recon_fast.cli import main

    folder, _, _ = assets
    assert main(["trace-dataset", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "d.parquet").write_bytes(pq_bytes({"body": ["a b"]}))
    assert main(["trace-dataset", "--data", str(tmp_path / "d.parquet"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no column 'text'" in err and "--text-field" in err


def pq_bytes(columns: dict) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue().to_pybytes()
