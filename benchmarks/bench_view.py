"""The HTML viewer: file size against the cube's .npz (target <= 2x) and the time headless Chromium
takes from opening the file to the first painted heatmap (target <= 2 s), for a synthetic
364-layer x 4096-token x 5-metric cube and for the real SmolLM2-135M-Instruct cube of a short
prompt (every module traced, as `recon-fast trace` does by default). Also the time to write the
page. Chromium is Debian's (/usr/bin/chromium), driven by Playwright, as in tests/test_view.py."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from recon_fast.cube.cube import ActivityCube

CHROMIUM = os.environ.get("RECON_FAST_CHROMIUM", "/usr/bin/chromium")
PROMPT = "Why do bees buzz? Because their wings beat two hundred times a second."


@pytest.fixture(scope="module")
def browser():
    if os.environ.get("RECON_FAST_NO_BROWSER") == "1":
        pytest.skip("RECON_FAST_NO_BROWSER=1")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


def synthetic_cube(layers: int = 364, tokens: int = 4096) -> ActivityCube:
    rng = np.random.default_rng(0)
    data = rng.standard_normal((layers, 1, tokens, 5), dtype=np.float32)
    data[..., 0] = np.abs(data[..., 0]) * 40 + np.arange(layers, dtype=np.float32)[:, None, None]
    data[..., 2] = np.abs(data[..., 2])
    return ActivityCube(tokens=[[f" t{i}" for i in range(tokens)]], layer_names=[f"model.layers.{i}.mlp" for i in range(layers)],
                        metrics=("energy", "mean", "std", "min", "max"), data=data, meta={"model_name": "synthetic"})


@pytest.fixture(scope="module")
def smollm2_cube():
    from recon_fast.models import ModelNotFound, load_model
    from recon_fast.trace.tracer import Tracer

    try:
        model, tokenizer = load_model()
    except ModelNotFound as exc:
        pytest.skip(str(exc))
    with Tracer(model, tokenizer, layers="all") as tracer:
        tracer.run(PROMPT)
        return tracer.cube


def render(browser, path: Path) -> float:
    """Opens the page and waits until its heatmap is drawn and painted; returns the page's own
    mount time (decoding and first draw, ms) for the record."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        page.goto(path.resolve().as_uri())
        page.wait_for_selector(".rfv[data-rendered]", timeout=60_000)
        page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        return page.evaluate("() => document.querySelector('.rfv').rfv.mountMs")
    finally:
        page.close()


@pytest.fixture(scope="module")
def pages(tmp_path_factory, request):
    """name -> (cube, its .npz, the page path): the page is written by test_write_page."""
    folder = tmp_path_factory.mktemp("bench_view")
    built = {}

    def get(name):
        if name not in built:
            cube = synthetic_cube() if name == "synthetic" else request.getfixturevalue("smollm2_cube")
            cube.export(folder / f"{name}.npz")
            built[name] = (cube, folder / f"{name}.npz", folder / f"{name}.html")
        return built[name]

    return get


def label(name: str, cube: ActivityCube) -> str:
    what = "synthetic" if name == "synthetic" else "SmolLM2-135M, every module"
    return f"{what}: {cube.num_layers} layers x {cube.data.shape[2]} tokens x {len(cube.metrics)} metrics"


CUBES = ["synthetic", "smollm2"]


@pytest.mark.parametrize("name", CUBES)
def test_write_page(record, record_measure, pages, name):
    cube, npz, page = pages(name)
    record(f"viewer: write the page, {label(name, cube)}", "cube.to_html", lambda: cube.to_html(page), rounds=3)
    group = f"viewer file size, {label(name, cube)}"
    record_measure(group, ".npz", npz.stat().st_size / 1e6, "MB", baseline=True)
    record_measure(group, ".html (target <= 2x)", page.stat().st_size / 1e6, "MB")


@pytest.mark.parametrize("name", CUBES)
def test_render_page(record, record_measure, browser, pages, name):
    cube, _, page = pages(name)
    if not page.exists():
        cube.to_html(page)
    mount = []
    record(f"viewer: open to painted heatmap, headless Chromium, {label(name, cube)}", "load + render (target <= 2 s)",
           lambda: mount.append(render(browser, page)), rounds=3)
    record_measure(f"viewer: the page's own decode + first draw, {label(name, cube)}", "median", float(np.median(mount)), "ms")
