"""`--report DIR`: the JSON of a result and a PNG heatmap of it, both written atomically (a failed
run leaves any previous report in place). matplotlib is the optional `report` extra.

The pictures are built as matplotlib Figures by the *_figure functions (the tests inspect what
was drawn) and written by save_png. Figures are made with matplotlib's object API, not pyplot:
no global backend switch, nothing left open. Colour scales follow the data:
- "signed" (attributions: a term pushes the logit up or down): diverging, red up / blue down,
  symmetric about zero, so white is exactly zero;
- "linear" / "log" (norms, entropies: never negative): sequential (viridis). Log is what a
  residual stream needs: its norm spans orders of magnitude (SmolLM2's first position, an
  attention sink, reaches ~22,700 while the others sit in the tens), and on a linear scale that
  one cell leaves every other cell the same colour."""

from __future__ import annotations

import sys

import textwrap
from pathlib import Path

import numpy as np
import orjson

from recon_fast.atomic_files import atomic_write, check_writable

SCALES = ("log", "linear")  # for non-negative values; signed values always get "signed"
_TITLE_SIZE = 10
_TICK_SIZE = 7
_LABEL_ROOM = 10.0  # points a row (or a vertical column label) needs; with less only every n-th is labelled


def write_json(folder: str | Path, name: str, document: dict) -> Path:
    return write_json_file(Path(folder) / f"{name}.json", document)


def write_json_file(path: str | Path, document) -> Path:
    """`document` as indented JSON at `path`, written atomically (-o FILE, --report DIR)."""
    path = Path(path)
    with atomic_write(path) as f:
        f.write(orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    return path


def json_text(document) -> str:
    """What --json prints: the document as indented JSON."""
    return orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode()


def json_outputs(out: str | None, count: int) -> list[Path | None]:
    """-o FILE of a command that writes JSON: FILE for one prompt, FILE-1.json, FILE-2.json ...
    for several, each checked to be writable (before the model loads); [None] * count without -o."""
    if out is None:
        return [None] * count
    if not out.lower().endswith(".json"):
        raise ValueError(f"-o {out!r}: this command writes JSON; name the file .json")
    paths = [Path(out)] if count == 1 else [Path(f"{out[:-5]}-{n}.json") for n in range(1, count + 1)]
    for path in paths:
        check_writable(path)
    return paths


def _matplotlib():
    try:
        import matplotlib.colors
        import matplotlib.figure
    except ImportError:
        raise RuntimeError("--report needs matplotlib: pip install 'recon-fast[report]' (or `make setup`)") from None
    return matplotlib.figure.Figure, matplotlib.colors


def plain(text: str) -> str:
    """Text drawn as it is: matplotlib would read a pair of "$" as math."""
    return str(text).replace("$", r"\$")


def shorten(text: str, width: int) -> str:
    """One line of at most `width` characters, "…" where it was cut."""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 1].rstrip() + "…"


def _fit_title(fig, title: str) -> None:
    """The title as the figure's suptitle, wrapped to the figure's width (constrained layout then
    keeps it inside the figure: a long title is never clipped)."""
    width_points = fig.get_figwidth() * 72
    per_line = max(20, int(width_points / (_TITLE_SIZE * 0.6)))  # ~0.6 em per character
    wrapped = "\n".join(textwrap.fill(line, per_line) for line in plain(title).splitlines() or [""])
    fig.suptitle(wrapped, fontsize=_TITLE_SIZE)


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def _plain_log_formatter(**options):
    """matplotlib's log-axis labelling (which ticks get a label), with plain numbers."""
    from matplotlib import ticker

    class PlainLogFormatter(ticker.LogFormatter):
        def __call__(self, x, pos=None):
            return _number(x) if super().__call__(x, pos) else ""

    return PlainLogFormatter(**options)


def _ticks(count: int, inches: float) -> range:
    """Every label where they fit along `inches` of axis (~80% of the figure), else every n-th."""
    fitting = max(1, int(inches * 0.8 * 72 / _LABEL_ROOM))
    return range(0, count, max(1, -(-count // fitting)))


def _norm_and_cmap(matrix: np.ndarray, scale: str):
    """(colour norm, colormap, matrix to draw) for a scale: see the module's docstring."""
    _, colors = _matplotlib()
    import matplotlib

    finite = matrix[np.isfinite(matrix)]
    if scale == "signed":
        limit = float(np.abs(finite).max()) if finite.size else 0.0
        limit = limit or 1.0
        return colors.Normalize(vmin=-limit, vmax=limit), matplotlib.colormaps["RdBu_r"], matrix
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")  # grey: no value (log of <= 0)
    if scale == "log":
        positive = finite[finite > 0]
        low, high = (float(positive.min()), float(positive.max())) if positive.size else (1.0, 10.0)
        if high <= low:
            low, high = low / 10, high * 10 if high > 0 else 10.0
        return colors.LogNorm(vmin=low, vmax=high), cmap, np.ma.masked_where(~(matrix > 0), matrix)
    if scale == "linear":
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        return colors.Normalize(vmin=low, vmax=high if high > low else low + 1.0), cmap, matrix
    raise ValueError(f"unknown colour scale {scale!r}: use one of {', '.join(SCALES)} (or 'signed')")


def heatmap_figure(matrix: np.ndarray, row_labels: list[str], column_labels: list[str], title: str,
                   colorbar_label: str, *, scale: str = "signed", xlabel: str | None = None,
                   ylabel: str | None = None, separators: tuple[int, ...] = (), caption: str | None = None,
                   annotate: int = 0, rotate_columns: int | None = None):
    """A heatmap of matrix [rows, columns] as a matplotlib Figure.

    scale:      "signed" (diverging about zero), "linear" or "log" (sequential; log for values
                spanning orders of magnitude);
    separators: column indices before which a vertical line is drawn (the heads | MLP border);
    caption:    a line under the picture; annotate: write the values of the n cells of largest
                magnitude into them."""
    Figure, _ = _matplotlib()
    matrix = np.asarray(matrix, dtype=np.float64)
    rows, columns = matrix.shape
    rotation = rotate_columns if rotate_columns is not None else (90 if columns > 12 else 0)
    width = 3.0 + 0.5 * columns
    if rotation == 0:  # room for each column's label side by side
        longest = max((len(line) for label in column_labels for line in str(label).splitlines()), default=0)
        width = max(width, 3.0 + columns * (longest * _TICK_SIZE * 0.6 / 72 + 0.2))
    width = float(np.clip(width, 7.0, 24.0))
    height = float(np.clip(2.5 + 0.24 * rows, 4.0, 30.0))
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    norm, cmap, drawn = _norm_and_cmap(matrix, scale)
    image = ax.imshow(drawn, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    shown_rows = _ticks(rows, height)
    shown_columns = _ticks(columns, width) if rotation else range(columns)
    ax.set_yticks(list(shown_rows), labels=[plain(row_labels[i]) for i in shown_rows], fontsize=_TICK_SIZE)
    ax.set_xticks(list(shown_columns), labels=[plain(column_labels[i]) for i in shown_columns], fontsize=_TICK_SIZE,
                  rotation=rotation, ha="right" if 0 < rotation < 90 else "center", rotation_mode="anchor"
                  if 0 < rotation < 90 else "default")
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=8)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=8)
    for column in separators:
        ax.axvline(column - 0.5, color="black", linewidth=1.5)
    if annotate:
        finite = np.where(np.isfinite(matrix), np.abs(matrix), -1.0)
        for flat in np.argsort(-finite, axis=None)[:annotate]:
            r, c = np.unravel_index(flat, matrix.shape)
            if finite[r, c] < 0:
                break
            shade = norm(matrix[r, c])
            dark = scale == "signed" and abs(float(shade) - 0.5) > 0.3 or scale != "signed" and float(shade) < 0.5
            ax.text(c, r, f"{matrix[r, c]:+.2f}" if scale == "signed" else f"{matrix[r, c]:.3g}", ha="center",
                    va="center", fontsize=6, color="white" if dark else "black")
    colorbar = fig.colorbar(image, ax=ax, label=plain(colorbar_label) + (" (log scale)" if scale == "log" else ""))
    if scale == "log":  # plain numbers (0.2, 1,000) where matplotlib would write 2x10^-1
        colorbar.ax.yaxis.set_major_formatter(_plain_log_formatter(labelOnlyBase=False))
        colorbar.ax.yaxis.set_minor_formatter(_plain_log_formatter(labelOnlyBase=False))
    _fit_title(fig, title)
    if caption:
        per_line = max(30, int(width * 72 / (8 * 0.55)))
        fig.supxlabel(textwrap.fill(plain(caption), per_line), fontsize=8)
    return fig


def save_png(fig, folder: str | Path, name: str) -> Path:
    """Writes the figure as <folder>/<name>.png (atomically) and returns the path."""
    path = Path(folder) / f"{name}.png"
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=120)
    return path


def write_heatmap(folder: str | Path, name: str, matrix: np.ndarray, row_labels: list[str],
                  column_labels: list[str], title: str, colorbar_label: str, **options) -> Path:
    """heatmap_figure(...) written as <folder>/<name>.png (options: see heatmap_figure)."""
    fig = heatmap_figure(matrix, row_labels, column_labels, title, colorbar_label, **options)
    return save_png(fig, folder, name)


def layer_head_figure(panels: list[tuple], row_labels: list[str], column_labels: list[str]):
    """Side-by-side sequential heatmaps (layers x heads) as a Figure; each panel is (matrix [rows,
    columns], title, colorbar label, (vmin, vmax) or None for the data's range)."""
    Figure, colors = _matplotlib()
    rows, columns = np.asarray(panels[0][0]).shape
    width = max(min(2.5 + 0.35 * columns, 12.0), 4.5) * len(panels)
    height = max(min(1.8 + 0.22 * rows, 24.0), 3.0)
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (matrix, title, label, limits) in zip(axes[0], panels):
        matrix = np.asarray(matrix, dtype=np.float64)
        vmin, vmax = limits if limits is not None else (np.nanmin(matrix), np.nanmax(matrix))
        image = ax.imshow(matrix, cmap="viridis", norm=colors.Normalize(vmin=vmin, vmax=vmax), aspect="auto",
                          interpolation="nearest")
        ax.set_yticks(range(rows), labels=row_labels, fontsize=_TICK_SIZE)
        ax.set_xticks(range(columns), labels=column_labels, fontsize=_TICK_SIZE, rotation=90 if columns > 12 else 0)
        ax.set_xlabel("head", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        per_line = max(20, int(width / len(panels) * 72 / (9 * 0.6)))
        ax.set_title(textwrap.fill(plain(title), per_line), fontsize=9)
        fig.colorbar(image, ax=ax, label=label)
    return fig


def write_layer_head_heatmaps(folder: str | Path, name: str, panels: list[tuple], row_labels: list[str],
                              column_labels: list[str]) -> Path:
    """layer_head_figure(...) written as <folder>/<name>.png."""
    return save_png(layer_head_figure(panels, row_labels, column_labels), folder, name)


def print_written(paths: list[Path], to_stderr: bool = False) -> None:
    """`wrote out/attribution.png`, a line per file of --report (to stderr under --json, whose
    stdout is the JSON document alone)."""
    for path in paths:
        print(f"wrote {path}", file=sys.stderr if to_stderr else sys.stdout)

