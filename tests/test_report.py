"""`--report DIR` pictures (recon_fast/cli/report.py), checked on what was drawn: the colour scale,
the cells, the labels, the title inside the figure, and the `wrote PATH` lines the CLI prints.
The commands run in-process on a tiny random llama folder (tests/tiny_models.py); the figures
are caught on their way to report.save_png."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from matplotlib import colors  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from tiny_models import save_model_folder  # noqa: E402

from recon_fast import cli  # noqa: E402
from recon_fast.cli import report  # noqa: E402

STEPS = "t3 t5 t7\nt9 t21 t23 t25 t27 t29 t31 t33 t35 t37 t39\nt2 t4"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return str(save_model_folder(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture
def run(model_folder, monkeypatch, capsys):
    """run(command, *argv) -> (stdout, stderr, {png name: Figure drawn})."""
    figures = {}
    real = report.save_png

    def catch(fig, folder, name):
        figures[name] = fig
        return real(fig, folder, name)

    monkeypatch.setattr(report, "save_png", catch)

    def go(command, *argv):
        code = cli.main([command, "--model", model_folder, *argv])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return captured.out, captured.err, figures

    return go


def image_of(fig) -> AxesImage:
    (image,) = [im for ax in fig.axes for im in ax.get_images()]
    return image


def assert_text_inside(fig) -> None:
    """Every piece of text drawn (title, labels, ticks, caption) lies within the figure: none clipped."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    undrawn = set()  # labels of ticks outside an axis' view (matplotlib keeps but does not draw them)
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            slack = 1e-9 * max(abs(low), abs(high), 1.0)
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not low - slack <= tick.get_loc() <= high + slack:
                    undrawn |= {id(tick.label1), id(tick.label2)}
    drawn = [t for t in fig.findobj(Text)
             if t.get_visible() and t.get_text() and t.get_figure() is fig and id(t) not in undrawn]
    assert fig._suptitle in drawn
    for text in drawn:
        box = text.get_window_extent(renderer)
        if box.width == 0:
            continue
        assert -1 <= box.x0 and box.x1 <= width + 1 and -1 <= box.y0 and box.y1 <= height + 1, \
            (text.get_text(), box, width, height)


def wrote_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("wrote ")]


# ---- residual --------------------------------------------------------------------------------------
def test_residual_report_is_log_viridis_and_says_where_it_wrote(run, tmp_path):
    out, _, figures = run("residual", "--prompt", "t3 t5 t7 t9 t21", "--report", f"{tmp_path}/out/")
    assert wrote_lines(out) == [f"wrote {tmp_path}/out/residual.json", f"wrote {tmp_path}/out/residual.png"]
    assert "//" not in out
    assert (tmp_path / "out" / "residual.png").read_bytes().startswith(b"\x89PNG")
    norms = np.array(json.loads((tmp_path / "out" / "residual.json").read_text())["norms"])[:, 0]
    fig = figures["residual"]
    image = image_of(fig)
    assert isinstance(image.norm, colors.LogNorm) and image.get_cmap().name.startswith("viridis")
    assert image.norm.vmin == pytest.approx(norms.min()) and image.norm.vmax == pytest.approx(norms.max())
    np.testing.assert_allclose(np.asarray(image.get_array()), norms, rtol=1e-6)
    ax = image.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["embed", "L0", "L1"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0 t3", "1 t5", "2 t7", "3 t9", "4 t21"]
    assert "(log scale)" in fig.axes[1].get_ylabel()  # the colour bar's
    assert_text_inside(fig)


def test_residual_report_linear_scale_is_sequential_from_the_data(run, tmp_path):
    out, _, figures = run("residual", "--prompt", "t3 t5 t7", "--report", str(tmp_path), "--scale", "linear")
    image = image_of(figures["residual"])
    assert type(image.norm) is colors.Normalize and image.get_cmap().name.startswith("viridis")
    norms = np.asarray(image.get_array())
    assert (image.norm.vmin, image.norm.vmax) == pytest.approx((norms.min(), norms.max()))
    assert len(wrote_lines(out)) == 2


def test_log_scale_keeps_cells_apart_beside_a_huge_first_position():
    """The issue's picture: a ~22,700 norm at position 0 beside norms in the tens. On the old
    symmetric -22,700..+22,700 scale every other cell came out within 0.1% of white."""
    norms = np.array([[22700.0, 12.0, 30.0, 80.0], [21000.0, 15.0, 45.0, 160.0]])
    fig = report.heatmap_figure(norms, ["L0", "L1"], ["a", "b", "c", "d"], "norms", "L2 norm", scale="log")
    image = image_of(fig)
    shades = image.norm(norms[:, 1:])
    assert shades.max() - shades.min() > 0.25  # the small cells differ visibly from each other
    assert float(image.norm(norms[0, 0])) == pytest.approx(1.0)
    # a cell without a positive value is masked (drawn grey), not a log error
    fig = report.heatmap_figure(np.array([[0.0, 2.0, 20.0]]), ["L0"], ["a", "b", "c"], "t", "n", scale="log")
    assert np.ma.getmaskarray(image_of(fig).get_array()).tolist() == [[True, False, False]]
    with pytest.raises(ValueError, match="unknown colour scale"):
        report.heatmap_figure(norms, ["L0", "L1"], list("abcd"), "t", "n", scale="rainbow")


# ---- attribute -------------------------------------------------------------------------------------
def layer_values(document: dict, part) -> dict[int, float]:
    sums: dict[int, float] = {}
    for label, value in zip(document["labels"], document["sequences"][0]["values"]):
        layer, _, rest = label.partition(".")
        if layer.startswith("L") and part(rest):
            sums[int(layer[1:])] = sums.get(int(layer[1:]), 0.0) + value
    return sums


@pytest.mark.parametrize("neurons", [[], ["--neurons", "2"]])
def test_per_head_picture_has_an_mlp_column_beside_the_heads(run, tmp_path, neurons):
    out, _, figures = run("attribute", "--prompt", "t3 t5 t7 t9", "--per-head", *neurons, "--target", "t21",
                          "--versus", "t22", "--report", f"{tmp_path}/")
    assert wrote_lines(out) == [f"wrote {tmp_path}/attribution.json", f"wrote {tmp_path}/attribution.png"]
    document = json.loads((tmp_path / "attribution.json").read_text())
    fig = figures["attribution"]
    image = image_of(fig)
    ax = image.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["H0", "H1", "H2", "H3", "MLP"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["L0", "L1"]
    grid = np.asarray(image.get_array())
    mlp = layer_values(document, lambda rest: rest == "mlp" or rest.startswith("N"))
    np.testing.assert_allclose(grid[:, 4], [mlp[0], mlp[1]], rtol=1e-6, atol=1e-9)
    head2 = layer_values(document, lambda rest: rest == "H2")
    np.testing.assert_allclose(grid[:, 2], [head2[0], head2[1]], rtol=1e-6, atol=1e-9)
    # signed values: diverging and symmetric about zero, so white is zero
    assert image.get_cmap().name == "RdBu_r" and image.norm.vmin == -image.norm.vmax
    assert image.norm.vmax == pytest.approx(np.abs(grid).max())
    assert any(line.get_xdata()[0] == pytest.approx(3.5) for line in ax.get_lines())  # heads | MLP border
    title = fig._suptitle.get_text()
    assert '"t21" rather than "t22"' in title and "MLP" in title and "\n" in title  # the long title wraps
    assert_text_inside(fig)


def test_attribution_without_heads_labels_attn_and_mlp(run, tmp_path):
    out, _, figures = run("attribute", "--prompt", "t3 t5", "--report", str(tmp_path))
    image = image_of(figures["attribution"])
    assert [t.get_text() for t in image.axes.get_xticklabels()] == ["Attn", "MLP"]
    assert_text_inside(figures["attribution"])


def test_json_report_keeps_stdout_the_document_and_says_where_it_wrote_on_stderr(run, tmp_path):
    out, err, _ = run("attribute", "--prompt", "t3 t5", "--json", "--report", str(tmp_path))
    assert json.loads(out) == json.loads((tmp_path / "attribution.json").read_text())
    assert wrote_lines(err) == [f"wrote {tmp_path}/attribution.json", f"wrote {tmp_path}/attribution.png"]


# ---- cot -------------------------------------------------------------------------------------------
def test_cot_columns_carry_the_step_text_and_the_predicted_token(run, tmp_path):
    out, _, figures = run("cot", "--prompt", STEPS, "--per-head", "--report", str(tmp_path / "r"))
    assert wrote_lines(out) == [f"wrote {tmp_path}/r/cot.json", f"wrote {tmp_path}/r/cot.png"]
    steps = json.loads((tmp_path / "r" / "cot.json").read_text())["steps"]
    fig = figures["cot"]
    image = image_of(fig)
    labels = [t.get_text() for t in image.axes.get_xticklabels()]
    assert len(labels) == 3
    assert labels[0] == f'1. t3 t5 t7\n-> "{steps[0]["attribution"]["sequences"][0]["target_text"]}"'
    assert labels[1].startswith("2. t9 t21 t23") and "…" in labels[1]  # a long step is shortened
    assert labels[2].startswith("3. t2 t4\n")
    rows = [t.get_text() for t in image.axes.get_yticklabels()]
    assert rows == [f"L{i} {c}" for i in range(2) for c in ("H0", "H1", "H2", "H3", "MLP")]
    grid = np.asarray(image.get_array())
    for column, step in enumerate(steps):
        mlp = layer_values(step["attribution"], lambda rest: rest == "mlp")
        assert grid[rows.index("L1 MLP"), column] == pytest.approx(mlp[1])
    assert image.get_cmap().name == "RdBu_r"
    assert_text_inside(fig)


# ---- the heads picture (recon-fast heads --report) ------------------------------------------------
def test_layer_head_heatmaps_still_write_a_png(tmp_path):
    panels = [(np.random.default_rng(0).random((3, 4)), "Mean sink mass (first 4 keys) " * 4, "sink mass", (0.0, 1.0)),
              (np.random.default_rng(1).random((3, 4)), "Mean attention entropy", "entropy (nats)", None)]
    path = report.write_layer_head_heatmaps(tmp_path, "heads", panels, ["L0", "L1", "L2"], ["H0", "H1", "H2", "H3"])
    assert path == tmp_path / "heads.png" and path.read_bytes().startswith(b"\x89PNG")
    fig = report.layer_head_figure(panels, ["L0", "L1", "L2"], ["H0", "H1", "H2", "H3"])
    assert [image_norm.norm.vmax for ax in fig.axes for image_norm in ax.get_images()] == [1.0, panels[1][0].max()]
