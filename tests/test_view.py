"""The HTML viewer (recon_fast.view, `recon-fast view`, ActivityCube.to_html / _repr_html_): the page
is self-contained and carries the cube's exact float32 values; in a real browser (Debian's
chromium driven by Playwright) it loads without console errors or network requests, hovering a
cell shows its exact value, switching metric / scale / normalisation changes the picture, clicks
select a token and a layer, and the attribution and compare pages render.

One browser serves the whole module. Without chromium or Playwright the browser tests FAIL (CI must
not pass by skipping them); RECON_FAST_NO_BROWSER=1 skips them instead, saying so."""

from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest

from recon_fast.cube.cube import ActivityCube
from recon_fast.view import html as view

CHROMIUM = os.environ.get("RECON_FAST_CHROMIUM", "/usr/bin/chromium")
METRICS = ("energy", "mean", "std", "min", "max")
PI = np.float32(np.pi)  # a cell whose exact float32 repr the hover must show: 3.1415927


def synthetic_cube(layers=12, tokens=20, seed=0, scale=1.0) -> ActivityCube:
    """Energy and std never negative and growing with depth, mean/min/max signed, one outlier
    token (position 0 of layer 0, as real residual streams have), an attention entry of full
    probabilities, a token with a line break and one with a quote."""
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(layers, 1, tokens, len(METRICS))).astype(np.float32) * scale
    data[..., 0] = np.abs(data[..., 0]) * np.arange(1, layers + 1)[:, None, None]
    data[..., 2] = np.abs(data[..., 2])
    data[..., 3] = -np.abs(data[..., 3])
    data[0, 0, 0, 0] = 500.0
    data[5, 0, 7 % tokens, 0] = PI
    words = [f" w{i}" for i in range(tokens)]
    words[3], words[4] = "\n", 'say "hi"'
    cube = ActivityCube(tokens=[words], layer_names=[f"model.layers.{i}" for i in range(layers)], metrics=METRICS,
                        data=data, meta={"model_name": "synthetic"})
    probs = rng.dirichlet(np.ones(tokens), size=(1, 4, tokens)).astype(np.float32)  # [batch, heads, q, k]
    cube.attention = [{"layer_index": layers + i, "layer_name": f"attention.{i}", "attention_scores": probs}
                      for i in range(3)]
    return cube


def attribution_document(layers=4, heads=4, seed=1) -> dict:
    rng = np.random.default_rng(seed)
    labels = ["embed"]
    for i in range(layers):
        labels += [f"L{i}.H{h}" for h in range(heads)] + [f"L{i}.attn_bias", f"L{i}.mlp"]
    labels.append("norm_bias")
    values = rng.normal(size=len(labels))
    values[labels.index(f"L{layers - 1}.mlp")] = 10.89  # the top contributor, as in the issue
    return {"prompt": "Why do bees buzz?", "model": "synthetic", "position": -1, "index": 5, "per_head": True,
            "labels": labels, "sequences": [{"target_id": 198, "target_text": "\n", "logit": float(values.sum()),
                                             "total": float(values.sum()), "values": values.tolist()}]}


def source_document(layers=2, heads=2, neurons=3, seed=2) -> dict:
    """by_source's top-k mode as to_dict writes it, with neurons: each head keeps two source
    positions and one S_rest, each MLP is its neurons and a bias. The largest term of all is an
    S_rest (a sum: never a bar); the largest single term is L1.H0's share from token 3."""
    rng = np.random.default_rng(seed)
    labels = ["embed"]
    for i in range(layers):
        for h in range(heads):
            labels += [f"L{i}.H{h}.S{j}" for j in (0, 3 - h)] + [f"L{i}.H{h}.S_rest"]
        labels += [f"L{i}.attn_bias"] + [f"L{i}.N{n}" for n in range(neurons)] + [f"L{i}.mlp_bias"]
    values = rng.normal(size=len(labels))
    values[labels.index("L0.H1.S_rest")] = -20.0
    values[labels.index("L1.H0.S3")] = 7.5
    sequence = {"target_id": 7, "target_text": " France", "logit": float(values.sum()), "total": float(values.sum()),
                "values": values.tolist(), "rest_magnitude": 31.25}
    return {"prompt": "The capital of France is Paris", "model": "synthetic", "position": -1, "index": 5,
            "per_head": True, "per_neuron": True, "by_source": True, "source_top_k": 2, "labels": labels,
            "tokens": ["The", " capital", " of", " Paris", " is", " France"], "sequences": [sequence]}


def cot_document() -> dict:
    steps = []
    for n, text in enumerate(["John has 3 apples.", "He buys 2 more.", "How many does he have?"], start=1):
        a = attribution_document(seed=n)
        steps.append({"step": n, "text": text, "span": [0, 1], "token_index": 4 * n,
                      "attribution": {k: v for k, v in a.items() if k not in ("prompt", "model")}})
    return {"prompt": "John has 3 apples. He buys 2 more. How many does he have?", "model": "synthetic", "steps": steps}


# ---- the page itself (no browser) -----------------------------------------------------------------
def embedded(page: str) -> tuple[dict, np.ndarray]:
    import orjson

    meta = re.search(r'<script type="application/json" id="[^"]+">(.*?)</script>', page, re.S).group(1)
    data = re.search(r'<script type="application/octet-stream" id="[^"]+">(.*?)</script>', page, re.S).group(1)
    return orjson.loads(meta), np.frombuffer(base64.b64decode(data), dtype="<f4")


def test_page_is_self_contained_and_carries_exact_values():
    cube = synthetic_cube()
    page = view.cube_html(cube)
    assert not re.search(r"https?://|\bsrc\s*=|<link|@import|url\(", page), "the page must need no network"
    meta, data = embedded(page)
    entry = meta["cubes"][0]
    stored = data[entry["offset"]:entry["offset"] + entry["size"]].reshape(5, 1, 12, 20)  # [metrics, batch, layers, tokens]
    np.testing.assert_array_equal(stored, cube.data.transpose(3, 1, 0, 2))  # bit-exact float32
    assert entry["tokens"][0][3] == "\n" and meta["attention"]["stats"] == ["entropy", "max_weight"]


def test_page_size_is_close_to_the_npz(tmp_path):
    cube = synthetic_cube(layers=64, tokens=512)
    cube.attention = []
    cube.export(tmp_path / "cube.npz")
    size = cube.to_html(tmp_path / "cube.html")
    assert size == (tmp_path / "cube.html").stat().st_size
    assert size <= 1.5 * (tmp_path / "cube.npz").stat().st_size  # base64 of float32: 4/3 + the page


def test_a_cube_without_attention_has_no_attention_view():
    cube = synthetic_cube()
    cube.attention = []
    meta, _ = embedded(view.cube_html(cube))
    assert "attention" not in meta


def test_a_cube_too_large_for_a_notebook_is_summarised_inline(monkeypatch):
    from recon_fast.view import html as view_html

    cube = synthetic_cube(layers=12, tokens=20)  # 12 x 1 x 20 x 5 float32: 4800 bytes
    full = cube._repr_html_()
    assert "to_html" not in full and len(full) > cube.data.nbytes  # the values travel in the page
    monkeypatch.setattr(view_html, "INLINE_LIMIT_BYTES", cube.data.nbytes - 1)
    summary = cube._repr_html_()
    assert len(summary) < 1000 and 'cube.to_html("cube.html")' in summary and "12 layers" in summary
    at_limit = view_html.cube_fragment(cube, limit_bytes=cube.data.nbytes)  # at the limit: shown in full
    assert len(at_limit) == len(full) and "to_html" not in at_limit


def test_attention_statistics_from_entries_and_arrays():
    cube = synthetic_cube(tokens=6)
    summary = {"entropy": np.ones((1, 2, 6), np.float32), "max_weight": np.full((2, 6), 0.5, np.float32)}
    cube.attention = [{"layer_name": "attention.0", "attention_summary": summary}, {"layer_name": "x", "other": 3}]
    names, stats = view.attention_statistics(cube)
    assert names == ["attention.0"] and stats["max_weight"].shape == (1, 1, 2, 6)
    cube.attention_layers, cube.attention_data = ["a", "b"], np.zeros((2, 1, 3, 6, 8), np.float32)
    names, stats = view.attention_statistics(cube)
    assert names == ["a", "b"] and len(stats) == 8 and next(iter(stats.values())).shape == (1, 2, 3, 6)


# ---- the command line -------------------------------------------------------------------------------
def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`recon-fast view ...` through the real main() (its one-line error handling)."""
    import recon_fast.cli as cli

    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_a_page_for_json_npz_and_attribution(tmp_path, capsys):
    import orjson

    cube = synthetic_cube()
    cube.export(tmp_path / "cube.json")
    cube.export(tmp_path / "cube.npz")
    (tmp_path / "attribution.json").write_bytes(orjson.dumps(attribution_document()))
    code, out, err = run_cli(["view", str(tmp_path / "cube.json")], capsys)
    assert code == 0, err
    assert (tmp_path / "cube.html").is_file() and "wrote" in out
    code, _, err = run_cli(["view", str(tmp_path / "cube.npz"), "-o", str(tmp_path / "out/n.html"),
                            "--compare", str(tmp_path / "cube.json")], capsys)
    assert code == 0, err
    meta, _ = embedded((tmp_path / "out/n.html").read_text())
    assert [c["name"] for c in meta["cubes"]] == ["cube.npz", "cube.json"]
    code, _, err = run_cli(["view", str(tmp_path / "attribution.json")], capsys)
    assert code == 0, err
    meta, _ = embedded((tmp_path / "attribution.html").read_text())
    assert meta["kind"] == "attribution"


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("not_json", "does not parse as JSON"),
    ("other_json", "neither a cube"),
    ("suffix", "name it .html"),
    ("layers", "layer 0 is"),
    ("attribution_compare", "--compare goes with two cubes"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, case, message):
    import orjson

    synthetic_cube().export(tmp_path / "cube.json")
    other = synthetic_cube()
    other.layer_names = [f"blocks.{i}" for i in range(12)]
    other.export(tmp_path / "other.npz")
    (tmp_path / "notes.json").write_text("hello")
    (tmp_path / "config.json").write_bytes(orjson.dumps({"model_type": "llama"}))
    (tmp_path / "attribution.json").write_bytes(orjson.dumps(attribution_document()))
    argv = {"missing": [str(tmp_path / "nope.json")], "not_json": [str(tmp_path / "notes.json")],
            "other_json": [str(tmp_path / "config.json")],
            "suffix": [str(tmp_path / "cube.json"), "-o", str(tmp_path / "cube.txt")],
            "layers": [str(tmp_path / "cube.json"), "--compare", str(tmp_path / "other.npz")],
            "attribution_compare": [str(tmp_path / "attribution.json"), "--compare", str(tmp_path / "cube.json")]}[case]
    code, out, err = run_cli(["view", *argv], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not list(tmp_path.glob("*.html"))


# ---- in the browser ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if os.environ.get("RECON_FAST_NO_BROWSER") == "1":
        pytest.skip("RECON_FAST_NO_BROWSER=1: the viewer's browser tests are switched off")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the viewer's browser tests need Playwright (`make setup` installs it: pip install "
                    "'recon-fast[view]'); set RECON_FAST_NO_BROWSER=1 to skip them")
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"the viewer's browser tests need chromium at {CHROMIUM} (`make setup`: apt-get install "
                    "chromium; RECON_FAST_CHROMIUM names another); set RECON_FAST_NO_BROWSER=1 to skip them")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


class Page:
    """A page of the viewer opened from disk, with everything that would fail it recorded: console
    errors and warnings, uncaught exceptions, and every request the page makes."""

    def __init__(self, browser, path: Path | None = None, content: str | None = None, width: int = 1200):
        self.page = browser.new_page(viewport={"width": width, "height": 900})
        self.problems, self.requests = [], []
        self.page.on("console", lambda m: m.type in ("error", "warning") and self.problems.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.problems.append(f"exception: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.url = path.resolve().as_uri() if path else None
        if path:
            self.page.goto(self.url)
        else:
            self.page.set_content(content)
        self.page.wait_for_selector(".rfv[data-rendered]", timeout=20_000)

    def check_clean(self):
        assert self.problems == []
        assert [u for u in self.requests if u != self.url] == [], "the page must make no request"

    def js(self, expression: str, arg=None):
        return self.page.evaluate(expression, arg)

    def hover_cell(self, heatmap: str, r: int, c: int, root: int = 0) -> str:
        at = self.js(f"([r, c]) => document.querySelectorAll('.rfv')[{root}].rfv.{heatmap}.cellCenter(r, c)", [r, c])
        self.page.mouse.move(at["x"], at["y"])
        return self.js(f"() => document.querySelectorAll('.rfv')[{root}].rfv.{heatmap}.tip.innerText")

    def pixels(self, selector: str = ".rfv-heat canvas") -> str:
        return self.js(f"() => document.querySelector('{selector}').toDataURL()")

    def close(self):
        self.page.close()


@pytest.fixture(scope="module")
def cube_page(browser, tmp_path_factory):
    path = tmp_path_factory.mktemp("view") / "cube.html"
    synthetic_cube().to_html(path)
    page = Page(browser, path)
    yield page
    page.close()


def test_page_loads_with_no_error_and_no_request(cube_page):
    cube_page.check_clean()
    assert cube_page.js("() => document.querySelectorAll('.rfv-tok').length") == 20


def test_hover_shows_layer_token_and_exact_value(cube_page):
    text = cube_page.hover_cell("heatmaps.A.map", 5, 7)
    assert "layer 5: model.layers.5" in text and 'token 7: " w7"' in text, text
    value = re.search(r"energy = (\S+)", text).group(1)
    assert value == "3.1415927" and np.float32(value) == PI
    text = cube_page.hover_cell("heatmaps.A.map", 0, 4)
    assert 'token 4: "say \\"hi\\""' in text
    value = np.float32(re.search(r"energy = (\S+)", text).group(1))
    assert value == synthetic_cube().data[0, 0, 4, 0]  # the shortest repr reads back exactly


def test_metric_scale_and_normalisation_change_the_picture(cube_page):
    page = cube_page
    seen = [page.pixels()]
    heading = page.js("() => document.querySelector('.rfv-section .rfv-subtitle').textContent")
    assert "sequential" in heading
    opening = page.js("() => document.querySelector('select[name=scale]').value")  # see test_opening_scale_*
    other = {"log": "linear", "linear": "log"}[opening]
    for name, value in [("scale", other), ("norm", "layer"), ("metric", "mean")]:
        page.page.select_option(f"select[name={name}]", value)
        seen.append(page.pixels())
    heading = page.js("() => document.querySelector('.rfv-section .rfv-subtitle').textContent")
    assert "diverging" in heading and "each layer on its own range" in heading
    assert len(set(seen)) == len(seen), "every switch must change the heatmap"
    for name, value in [("scale", opening), ("norm", "global"), ("metric", "energy")]:
        page.page.select_option(f"select[name={name}]", value)
    assert page.pixels() == seen[0]
    page.check_clean()


def test_click_selects_token_and_layer_and_drag_zooms(cube_page):
    page = cube_page
    at = page.js("() => document.querySelector('.rfv').rfv.heatmaps.A.map.cellCenter(3, 9)")
    page.page.mouse.click(at["x"], at["y"])
    state = page.js("() => document.querySelector('.rfv').rfv.state")
    assert (state["layer"], state["token"]) == (3, 9)
    titles = page.js("() => [...document.querySelectorAll('.rfv-line .rfv-subtitle')].map(e => e.textContent)")
    assert titles[0].startswith('token 9 " w9" across depth') and titles[1].startswith("layer 3 model.layers.3")
    assert page.js("() => document.querySelector('.rfv-tok.rfv-sel').dataset.token") == "9"
    a = page.js("() => document.querySelector('.rfv').rfv.heatmaps.A.map.cellCenter(2, 2)")
    b = page.js("() => document.querySelector('.rfv').rfv.heatmaps.A.map.cellCenter(5, 10)")
    page.page.mouse.move(a["x"], a["y"])
    page.page.mouse.down()
    page.page.mouse.move(b["x"], b["y"], steps=4)
    page.page.mouse.up()
    assert page.js("() => document.querySelector('.rfv').rfv.heatmaps.A.map.view") == {"r0": 2, "r1": 6, "c0": 2, "c1": 11}
    assert page.js("() => document.querySelectorAll('.rfv-tok').length") == 9  # the strip follows the zoom
    page.page.mouse.dblclick(b["x"], b["y"])
    assert page.js("() => document.querySelector('.rfv').rfv.heatmaps.A.map.view")["c1"] == 20
    page.check_clean()


def test_attention_statistics_render(cube_page):
    cube = synthetic_cube()
    probs = cube.attention[1]["attention_scores"].astype(np.float64)
    entropy = -(probs * np.log(probs)).sum(-1)[0]  # [heads, queries]
    text = cube_page.hover_cell("attention.map", 1, 2)
    shown = float(re.search(r"= (\S+)", text).group(1))
    assert "attention.1 head 2" in text and shown == pytest.approx(entropy[2].mean(), rel=1e-5)


def test_screenshot_is_not_blank(cube_page, tmp_path):
    from PIL import Image

    shot = cube_page.page.screenshot(full_page=True)
    (tmp_path / "viewer.png").write_bytes(shot)
    image = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"))
    colours = np.unique(image.reshape(-1, 3), axis=0)
    assert len(colours) > 100 and image.std() > 20, "the screenshot looks blank"
    viridis_dark = np.all(np.abs(image.astype(int) - [68, 1, 84]) < 20, axis=-1).sum()
    assert viridis_dark > 5000, "the heatmap's colours are missing"


def test_compare_page_side_by_side_and_difference(browser, tmp_path):
    a, b = synthetic_cube(), synthetic_cube(tokens=15, seed=3)
    a.to_html(tmp_path / "compare.html", compare=b)
    page = Page(browser, tmp_path / "compare.html")
    text = page.hover_cell("heatmaps.B.map", 2, 14)
    assert np.float32(re.search(r"energy = (\S+)", text).group(1)) == b.data[2, 0, 14, 0]
    assert "NaN" in page.hover_cell("heatmaps.B.map", 2, 17)  # past B's end: aligned by token index
    page.page.select_option("select[name=mode]", "diff")
    text = page.hover_cell("heatmaps.A.map", 4, 6)
    expected = a.data[4, 0, 6, 0] - b.data[4, 0, 6, 0]
    assert np.float32(re.search(r"A \u2212 B = (\S+)", text).group(1)) == expected
    assert page.js("() => document.querySelector('.rfv').rfv.heatmaps.A.map.cols") == 15
    assert "diverging" in page.js("() => document.querySelector('.rfv-section .rfv-subtitle').textContent")
    page.check_clean()
    page.close()


def test_attribution_pages_render(browser, tmp_path):
    document = attribution_document()
    view.attribution_html(document, tmp_path / "attribution.html")
    page = Page(browser, tmp_path / "attribution.html")
    rows = page.js("() => [...document.querySelectorAll('.rfv-bar-row')].map(r => r.innerText.replace(/\\s+/g, ' '))")
    assert len(rows) == 10 and rows[0].startswith("MLP L3") and "+10.89" in rows[0], rows
    columns = page.js("() => document.querySelector('.rfv').rfv.grid.cols_")
    assert columns == ["H0", "H1", "H2", "H3", "attn_bias", "", "mlp"]  # the MLP term beside the heads
    text = page.hover_cell("grid", 3, 6)
    assert "MLP L3 (L3.mlp)" in text and "10.89" in text
    page.check_clean()
    page.close()

    view.attribution_html(cot_document(), tmp_path / "cot.html")
    page = Page(browser, tmp_path / "cot.html")
    assert page.js("() => [...document.querySelectorAll('.rfv-step')].map(b => b.innerText)")[1] == "Step 2 He buys 2 more."
    page.page.click(".rfv-step >> nth=1")
    assert page.js("() => document.querySelector('.rfv-target').textContent").startswith('Step 2: "He buys 2 more."')
    page.check_clean()
    page.close()


def test_notebook_fragment_renders(browser):
    cube = synthetic_cube(tokens=8)
    fragment = cube._repr_html_()
    assert not fragment.lstrip().startswith("<!DOCTYPE")
    page = Page(browser, content=f"<html><body><p>notebook cell</p>{fragment}{cube._repr_html_()}</body></html>")
    assert page.js("() => document.querySelectorAll('.rfv[data-rendered]').length") == 2  # two views, one script
    page.check_clean()
    page.close()


def bar_rows(page: Page) -> list[tuple[str, str]]:
    return page.js("() => [...document.querySelectorAll('.rfv-bar-row')].map(r => [r.dataset.label, "
                   "r.innerText.replace(/\\s+/g, ' ')])")


def test_source_and_neuron_terms_add_to_their_head_and_mlp(browser, tmp_path):
    document = source_document()
    labels, values = document["labels"], document["sequences"][0]["values"]
    view.attribution_html(document, tmp_path / "sources.html")
    page = Page(browser, tmp_path / "sources.html")
    columns = page.js("() => document.querySelector('.rfv').rfv.grid.cols_")
    assert columns == ["H0", "H1", "attn_bias", "", "mlp", "mlp_bias"]
    sums = np.array(page.js("() => Array.from(document.querySelector('.rfv').rfv.grid.sums_)")).reshape(2, -1)
    for i in range(2):
        for h in range(2):  # a head: its kept sources and its S_rest (Attribution.head_totals)
            parts = [v for label, v in zip(labels, values) if label.startswith(f"L{i}.H{h}.")]
            assert len(parts) == 3 and sums[i, columns.index(f"H{h}")] == pytest.approx(sum(parts), rel=1e-12)
        neurons = [v for label, v in zip(labels, values) if label.startswith(f"L{i}.N")]
        assert sums[i, columns.index("mlp")] == pytest.approx(sum(neurons), rel=1e-12)
        assert sums[i, columns.index("mlp_bias")] == values[labels.index(f"L{i}.mlp_bias")]
    text = page.hover_cell("grid", 0, 1)
    assert "Head L0.H1 (L0.H1: the sum of 2 source terms and S_rest)" in text, text
    kept = sorted([(values[labels.index(f"L0.H1.S{j}")], j) for j in (0, 2)], key=lambda vj: -abs(vj[0]))
    words = document["tokens"]
    assert "largest sources: " + ", ".join(f'token "{words[j]}" ({j}) {v:+.3f}' for v, j in kept) in text, text
    assert "the sources not kept (S_rest): -20.000" in text
    assert page.js("() => document.querySelector('.rfv-other').innerText").count("\n") == 1  # embed only

    rows = bar_rows(page)
    assert len(rows) == 10 and not [label for label, _ in rows if label.endswith("S_rest")], rows
    assert rows[0][0] == "L1.H0.S3" and rows[0][1].startswith('Head L1.H0 <- token " Paris" (3) +7.50'), rows
    single = [abs(v) for label, v in zip(labels, values) if not label.endswith("S_rest")]
    listed = sorted(single, reverse=True)[:10]
    assert f"({7.5 / sum(listed) * 100:.1f}%)" in rows[0][1]  # share="top": the ten listed
    page.page.select_option("select[name=share]", "total")
    total = sum(single) + document["sequences"][0]["rest_magnitude"]  # share="total": S_rest's sources counted
    assert f"({7.5 / total * 100:.1f}%)" in bar_rows(page)[0][1]
    note = page.js("() => document.querySelector('.rfv-note').textContent")
    assert "each head's 2 largest sources kept; the rest summed per head" in note, note
    page.check_clean()
    page.close()


def test_a_real_top_k_source_attribution_renders(browser, tmp_path):
    import torch
    from tiny_models import VOCAB, make_model

    from recon_fast.attribution.direct import direct_logit_attribution

    model = make_model("llama")
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    attribution = direct_logit_attribution(model, ids, by_source=True, source_top_k=2, per_neuron=True)
    document = {"prompt": "nine random tokens", "model": "tiny llama", **attribution.to_dict()}
    view.attribution_html(document, tmp_path / "real.html")
    page = Page(browser, tmp_path / "real.html")
    page.check_clean()
    rows = bar_rows(page)
    top = attribution.top(10)
    assert [label for label, _ in rows] == [label for label, _, _ in top]  # Attribution.top's list, no S_rest
    assert rows[0][1].endswith(f"({top[0][2]:.1f}%)")
    _, heads, grid = attribution.grid()
    sums = np.array(page.js("() => Array.from(document.querySelector('.rfv').rfv.grid.sums_)")).reshape(2, -1)
    columns = page.js("() => document.querySelector('.rfv').rfv.grid.cols_")
    np.testing.assert_allclose(sums[:, [columns.index(h) for h in heads]], grid.numpy(), rtol=1e-12, atol=1e-15)
    page.page.select_option("select[name=share]", "total")
    total = attribution.top(10, share="total")
    assert bar_rows(page)[0][1].endswith(f"({total[0][2]:.1f}%)")
    assert "each head's 2 largest sources kept" in page.js("() => document.querySelector('.rfv-note').textContent")
    page.check_clean()
    page.close()


# ---- the opening scale, the width, the --versus label -----------------------------------------------
def first_token_cube(tokens=24, first=23770.0, seed=4) -> ActivityCube:
    """A SmolLM2-like residual stream: energies ~10-60 everywhere but token 0, ~23,770 (the model's
    first-token activations, a class of their own)."""
    rng = np.random.default_rng(seed)
    data = rng.uniform(10, 60, size=(8, 1, tokens, len(METRICS))).astype(np.float32)
    data[..., 1] -= 35  # the mean: signed
    data[:, 0, 0, 0] = first
    return ActivityCube(tokens=[[f" t{i}" for i in range(tokens)]], layer_names=[f"model.layers.{i}" for i in range(8)],
                        metrics=METRICS, data=data, meta={"model_name": "synthetic"})


def scale_and_heading(page: Page) -> tuple[str, str]:
    return (page.js("() => document.querySelector('select[name=scale]').value"),
            page.js("() => document.querySelector('.rfv-section .rfv-subtitle').textContent"))


def test_opening_scale_is_log_when_values_span_more_than_100x(browser, tmp_path):
    first_token_cube().to_html(tmp_path / "wide.html")
    page = Page(browser, tmp_path / "wide.html")
    scale, heading = scale_and_heading(page)
    assert scale == "log" and "energy" in heading and ", log (the largest |value| is" in heading, heading
    # on log the other tokens are not one colour: the cells of token 1.. use many colour indices
    idx = np.array(page.js("() => Array.from(document.querySelector('.rfv').rfv.heatmaps.A.map.idx)")).reshape(8, 24)
    assert len(np.unique(idx[:, 1:])) > 20, np.unique(idx[:, 1:])
    page.page.select_option("select[name=scale]", "linear")  # the user's choice then holds for every metric
    page.page.select_option("select[name=metric]", "std")
    assert scale_and_heading(page)[0] == "linear"
    page.check_clean()
    page.close()

    first_token_cube(first=500.0).to_html(tmp_path / "narrow.html")  # 500 / ~35: under 100x
    page = Page(browser, tmp_path / "narrow.html")
    scale, heading = scale_and_heading(page)
    assert scale == "linear" and "linear (the largest |value| is" in heading, heading
    page.check_clean()
    page.close()


def test_pages_fit_1280_px_without_sideways_scrolling(browser, tmp_path):
    """The document and every element in it: a 300-token prompt's token strip used to be one line
    that scrolled sideways. A hover at the right edge must not widen the page either."""
    long = synthetic_cube(layers=30, tokens=300)
    long.tokens[0][7] = "a_token_longer_than_any_strip_could_hold" * 40
    long.to_html(tmp_path / "long.html")
    synthetic_cube().to_html(tmp_path / "compare.html", compare=synthetic_cube(seed=3))
    view.attribution_html(versus_document(), tmp_path / "versus.html")
    for name in ("long", "compare", "versus"):
        page = Page(browser, tmp_path / f"{name}.html", width=1280)
        if name == "long":
            page.hover_cell("heatmaps.A.map", 29, 299)
        widths = page.js("""() => ({document: document.documentElement.scrollWidth,
            scrolling: [...document.querySelectorAll('*')].filter(e => e.scrollWidth > e.clientWidth + 1 && getComputedStyle(e).overflowX !== 'visible'
                         && getComputedStyle(e).overflowX !== 'hidden')
            .map(e => e.className + ' ' + e.scrollWidth + '/' + e.clientWidth)})""")
        assert widths["document"] <= 1280 and widths["scrolling"] == [], (name, widths)
        page.check_clean()
        page.close()


def versus_document() -> dict:
    document = attribution_document()
    document["sequences"][0].update(target_text=" Paris", versus_id=4528, versus_text=" London")
    return document


def test_a_versus_page_says_logit_difference(browser, tmp_path):
    view.attribution_html(versus_document(), tmp_path / "versus.html")
    view.attribution_html(attribution_document(), tmp_path / "plain.html")
    texts = {}
    for name in ("versus", "plain"):
        page = Page(browser, tmp_path / f"{name}.html")
        texts[name] = page.js("() => [document.querySelector('.rfv-target').textContent, "
                              "...[...document.querySelectorAll('.rfv-subtitle')].map(e => e.textContent)]")
        page.check_clean()
        page.close()
    header = texts["versus"][0]
    bars = [t for t in texts["versus"][1:] if t.startswith("Top contributors")]
    assert 'Token " Paris"' in header and 'logit difference vs " London"' in header, header
    assert bars and bars[0].startswith('Top contributors to the logit difference vs " London"'), bars
    assert any('rather than " London"' in t for t in texts["versus"][2:]), texts["versus"]
    assert not any("difference" in t for t in texts["plain"]), texts["plain"]
    title = view.attribution_payload(versus_document())["title"]
    assert 'direct logit attribution (logit difference vs " London")' in title, title
