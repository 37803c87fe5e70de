"""One table of statistics per op (recon_fast/kernels/stats_tables.py), and everything made from it:
csrc names the same channels in the same order (the built library says so, and its headers do);
the constants, the JSON keys and the docstrings are the table's, and README's JSON section lists
them; a row added to the table without
its formula and its C++ channel fails with an error naming what is missing; and once a row has its
formula, every consumer (the Tracer, the cube, its files, the viewer, dataset tracing) carries it
with no other edit: each runs in a child process whose table has a row more."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from recon_fast.cube import export
from recon_fast.kernels import _library, attention_stats, token_stats
from recon_fast.kernels.stats_tables import ATTENTION_STATS_TABLE, TABLES, TOKEN_STATS_TABLE, Statistic, StatsTable

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def test_the_compiled_library_writes_the_channels_the_tables_name():
    if _library.module is None:
        assert "channels" not in (_library.load_error or ""), _library.load_error
        pytest.skip(f"no compiled library: {_library.load_error}")
    assert _library.module.channel_names() == {table.op: table.names for table in TABLES}


def _csrc_names(header: str, array: str) -> list[str]:
    text = (CSRC / header).read_text()
    body = re.search(rf"{array}\[\] = \{{(.*?)\}};", text, re.DOTALL)
    assert body, f"{header} has no {array}"
    return re.findall(r'"(\w+)"', body.group(1))


def _csrc_enum(header: str, enum: str) -> list[tuple[str, int]]:
    body = re.search(rf"enum {enum} : int \{{(.*?)\}};", (CSRC / header).read_text(), re.DOTALL)
    assert body, f"{header} has no enum {enum}"
    return [(name, int(index)) for name, index in re.findall(r"(kStat\w+) = (\d+)", body.group(1))]


@pytest.mark.parametrize("table, header, array, enum", [
    (TOKEN_STATS_TABLE, "token_stats_problem.h", "kTokenStatNames", "TokenStat"),
    (ATTENTION_STATS_TABLE, "attention_stats_problem.h", "kAttentionStatNames", "AttentionStat"),
], ids=["token_stats", "attention_stats"])
def test_csrc_names_each_channel_where_the_table_puts_it(table, header, array, enum):
    """Read from the sources, so that it holds without a build too: the names array and the enum
    of channel indices agree with the table row for row (kStatMaxWeight is max_weight's index)."""
    assert _csrc_names(header, array) == list(table.names)
    snake = lambda name: re.sub(r"(?<!^)([A-Z])", r"_\1", name.removeprefix("kStat")).lower()  # noqa: E731
    assert [(snake(name), index) for name, index in _csrc_enum(header, enum)] == [(r.name, r.index) for r in table]


def test_the_constants_json_keys_and_docstrings_are_the_tables():
    assert token_stats.STATS == TOKEN_STATS_TABLE.names and token_stats.NUM_STATS == len(TOKEN_STATS_TABLE)
    assert attention_stats.ATTENTION_STATS == ATTENTION_STATS_TABLE.names
    assert attention_stats.NUM_ATTENTION_STATS == len(ATTENTION_STATS_TABLE)
    # The established schema's keys, in channel order.
    assert list(export.METRIC_KEYS.values()) == ["energy", "mean_activation", "std_activation", "min_activation",
                                                 "max_activation"]
    assert list(export.METRIC_KEYS) == list(token_stats.STATS)
    for function, table in ((token_stats.token_stats, TOKEN_STATS_TABLE),
                            (attention_stats.attention_stats, ATTENTION_STATS_TABLE)):
        assert "{channels}" not in function.__doc__
        for row in table:
            assert f"{row.index} {row.name}: {row.doc}" in function.__doc__


def test_the_readmes_json_schema_lists_the_tables():
    """README's JSON section is prose, not generated: it must name what the tables name."""
    text = (ROOT / "README.md").read_text()
    for field, names in (("core_metrics", list(export.METRIC_KEYS.values())),
                         ("attention_stats", list(ATTENTION_STATS_TABLE.names))):
        listed = re.search(rf"{field}: \{{([^}}]*)\}}", text)
        assert listed, f"README.md's JSON section has no {field}: {{...}}"
        assert re.split(r",\s*", listed.group(1).strip()) == names, field


def test_a_table_keeps_its_rows_in_channel_order_and_its_names_apart():
    energy, mean = TOKEN_STATS_TABLE.rows[:2]
    with pytest.raises(ValueError, match="row 0 of its table but says channel 1"):
        StatsTable("token_stats", (mean, energy))
    with pytest.raises(ValueError, match="names repeat"):
        StatsTable("token_stats", (energy, Statistic("energy", 1, "again", json_key="other")))
    with pytest.raises(ValueError, match=r"\['min'\] have no JSON key"):
        StatsTable("token_stats", (energy, mean, Statistic("min", 2, "smallest element"))).json_keys()


# ---- a row more, in a child process ---------------------------------------------------------------
# The table module is loaded by its path and given the extra row before anything of recon_fast is
# imported, so that every consumer derives its constants from the extended table, as it would from
# an edited file.
PRELUDE = """
import importlib.util, sys, warnings
sys.path.insert(0, {tests!r})
spec = importlib.util.spec_from_file_location("recon_fast.kernels.stats_tables", {tables!r})
tables = sys.modules["recon_fast.kernels.stats_tables"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tables)
ORIGINAL = {{t.op: t for t in tables.TABLES}}
def extend(op, row):
    table = tables.StatsTable(op, ORIGINAL[op].rows + (row,))
    setattr(tables, "TOKEN_STATS_TABLE" if op == "token_stats" else "ATTENTION_STATS_TABLE", table)
    tables.TABLES = (tables.TOKEN_STATS_TABLE, tables.ATTENTION_STATS_TABLE)
"""


def _run_child(body: str) -> subprocess.CompletedProcess:
    script = PRELUDE.format(tests=str(ROOT / "tests"), tables=str(ROOT / "recon_fast/kernels/stats_tables.py"))
    return subprocess.run([sys.executable, "-c", script + textwrap.dedent(body)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def test_a_token_statistic_added_to_the_table_alone_fails_naming_what_is_missing():
    done = _run_child("""
        extend("token_stats", tables.Statistic("median", 5, "the middle element", json_key="median_activation"))
        import torch
        from recon_fast.kernels import _library
        from recon_fast.kernels.token_stats import token_stats
        from recon_fast.trace.tracer import Tracer
        from tiny_models import make_model
        print("LOAD", _library.load_error)
        for attempt in (lambda: token_stats(torch.randn(3, 8)),
                        lambda: Tracer(make_model("llama"), layers="residual").run(torch.tensor([[1, 2, 3]]))):
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    attempt()
                print("NO ERROR")
            except NotImplementedError as exc:
                print("ERROR", exc)
            print("WARNED", [str(w.message) for w in caught if "fallback" in str(w.message)])
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    if _library.module is not None:  # the library is refused, and the warning says why
        assert "LOAD the compiled library" in out and "its token_stats channels are ['energy', 'mean', 'std', " \
            "'min', 'max'] (csrc) but the table lists ['energy', 'mean', 'std', 'min', 'max', 'median']" in out
        assert "(python setup.py build_ext --inplace)" in out
    assert "NO ERROR" not in out
    want = ("ERROR token_stats_ref computes the token_stats statistics ['energy', 'mean', 'std', 'min', 'max'] but "
            "the table (recon_fast/kernels/stats_tables.py) lists ['energy', 'mean', 'std', 'min', 'max', 'median']: "
            "no formula for ['median']")
    assert out.count(want) == 2, out


def test_an_attention_statistic_added_to_the_table_alone_fails_naming_what_is_missing():
    done = _run_child("""
        extend("attention_stats", tables.Statistic("first_weight", 8, "p at j = 0"))
        import torch
        from recon_fast.kernels.attention_stats import attention_stats
        from recon_fast.kernels.attention_stats_flex import attention_stats_flex
        from recon_fast.kernels.attention_stats_linear import attention_stats_linear
        q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
        warnings.simplefilter("ignore")
        for run in (attention_stats, attention_stats_flex, attention_stats_linear):
            try:
                run(q, k)
                print("NO ERROR")
            except NotImplementedError as exc:
                print("ERROR", exc)
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NO ERROR" not in done.stdout
    for by in ("attention_stats_ref", "attention_stats_flex", "attention_stats_linear"):
        assert f"ERROR {by} computes the attention_stats statistics ['entropy', " in done.stdout, done.stdout
    assert done.stdout.count("no formula for ['first_weight']") == 3


def test_a_token_statistic_with_its_formula_reaches_every_file_with_no_other_edit(tmp_path):
    """The consumers of the token statistics (the Tracer's buffers, the cube, JSON / npz / streamed
    files and reading them back, the viewer, dataset tracing and its profile) take the extended
    table as it is: the reference is the only other place this statistic had to be written (the
    compiled library, built for the table without it, is not used)."""
    done = _run_child(f"""
        extend("token_stats", tables.Statistic("median", 5, "the lower middle element", json_key="median_activation"))
        import json, numpy as np, torch
        from recon_fast.kernels import token_stats as ts
        base = ts._reference_channels
        ts._reference_channels = lambda xf: {{**base(xf), "median": xf.median(dim=-1).values}}
        from recon_fast.cube.cube import ActivityCube
        from recon_fast.dataset import trace_dataset
        from recon_fast.trace.tracer import Tracer
        from tiny_models import VOCAB, make_model
        warnings.simplefilter("ignore")
        model, out = make_model("llama"), {str(tmp_path)!r}
        ids = torch.randint(2, VOCAB, (2, 6))
        with Tracer(model, layers="residual") as tracer:
            tracer.run(ids)
        cube = tracer.cube
        hidden = model(ids, output_hidden_states=True).hidden_states[1]
        assert np.array_equal(cube.metric("median")[0], hidden.median(-1).values.detach().numpy())
        for name in ("c.json", "c.npz"):
            cube.export(out + "/" + name)
            back = ActivityCube.load(out + "/" + name)
            assert back.metrics == cube.metrics and np.array_equal(back.data, cube.data, equal_nan=True), name
        doc = json.load(open(out + "/c.json"))
        with Tracer(model, layers="residual", metrics=("median", "energy"), stream_to=out + "/s.json") as tracer:
            tracer.run(ids)
        streamed = json.load(open(out + "/s.json"))
        cube.to_html(out + "/c.html")
        texts = [" ".join(f"t{{j}}" for j in range(2, 2 + n)) for n in (3, 5, 4)]
        from tiny_models import word_tokenizer
        tok = word_tokenizer()
        manifest = trace_dataset(model, tok, texts, out + "/ds", max_tokens=16, batch_tokens=64)
        import pyarrow.parquet as pq
        columns = pq.read_table(out + "/ds/activations").column_names
        print("RESULT", json.dumps({{"metrics": cube.metrics, "shape": list(cube.data.shape),
                                    "meta": doc["meta"]["metrics"], "keys": list(doc["layers"][0]["core_metrics"]),
                                    "streamed": list(streamed["layers"][0]["core_metrics"]),
                                    "columns": columns, "profile": json.load(open(out + "/ds/profile.json"))["metrics"],
                                    "html": "median" in open(out + "/c.html").read()}}))
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    names = ["energy", "mean", "std", "min", "max", "median"]
    keys = ["energy", "mean_activation", "std_activation", "min_activation", "max_activation", "median_activation"]
    assert result["metrics"] == names and result["shape"][-1] == 6
    assert result["meta"] == keys and result["keys"] == keys
    assert result["streamed"] == ["median_activation", "energy"]
    assert [c for c in result["columns"] if c in names] == names and result["profile"] == names
    assert result["html"]


def test_an_attention_statistic_with_its_formula_reaches_every_file_with_no_other_edit(tmp_path):
    """The same for attention: the capture's buffers, the cube's attention_data, its JSON entries
    and npz, reading them back, the viewer and the dataset's attention table."""
    done = _run_child(f"""
        extend("attention_stats", tables.Statistic("first_weight", 8, "p at j = 0 (the first key)"))
        import json, numpy as np, torch
        from recon_fast.kernels import attention_stats as A
        reference = A.attention_stats_ref

        def with_first_weight(q, k, **kwargs):  # the eight of the original table, then p at j = 0
            A.ATTENTION_STATS_TABLE = ORIGINAL["attention_stats"]
            try:
                stats = reference(q, k, **kwargs)
                first = reference(q, k, **{{**kwargs, "sink_tokens": 1}})[..., 3:4]
            finally:
                A.ATTENTION_STATS_TABLE = tables.ATTENTION_STATS_TABLE
            return torch.cat([stats, first], -1)

        A.attention_stats_ref = with_first_weight
        from recon_fast.cube.cube import ActivityCube
        from recon_fast.dataset import trace_dataset
        from recon_fast.trace.tracer import Tracer
        from tiny_models import VOCAB, make_model
        warnings.simplefilter("ignore")
        model, out = make_model("llama"), {str(tmp_path)!r}
        ids = torch.randint(2, VOCAB, (2, 6))
        with Tracer(model, attention="stats") as tracer:
            tracer.run(ids)
        cube = tracer.cube
        first = cube.attention_stat("first_weight")
        assert np.allclose(first[..., 0], 1.0)  # the first query sees the first key alone
        for name in ("c.json", "c.npz"):
            cube.export(out + "/" + name)
            back = ActivityCube.load(out + "/" + name)
            assert np.array_equal(back.attention_data, cube.attention_data, equal_nan=True), name
        doc = json.load(open(out + "/c.json"))
        cube.to_html(out + "/c.html")
        from tiny_models import word_tokenizer
        tok = word_tokenizer()
        texts = [" ".join(f"t{{j}}" for j in range(2, 2 + n)) for n in (3, 5, 4)]
        manifest = trace_dataset(model, tok, texts, out + "/ds", max_tokens=16, batch_tokens=64, attention="stats")
        import pyarrow.parquet as pq
        print("RESULT", json.dumps({{"shape": list(cube.attention_data.shape),
                                    "entry": list(doc["layers"][-1]["attention_stats"]),
                                    "manifest": manifest["attention_statistics"],
                                    "columns": pq.read_table(out + "/ds/attention").column_names,
                                    "html": "first_weight" in open(out + "/c.html").read()}}))
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    names = list(ATTENTION_STATS_TABLE.names) + ["first_weight"]
    assert result["shape"][-1] == 9 and result["entry"] == names and result["manifest"] == names
    assert [c for c in result["columns"] if c in names] == names
    assert result["html"]
