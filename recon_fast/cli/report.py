"""`--report DIR`: the JSON of a result and a PNG heatmap of it, both written atomically (a failed
run leaves any previous report in place). matplotlib is the optional `report` extra."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson

from recon_fast.cube.export import atomic_write


def write_json(folder: str | Path, name: str, document: dict) -> Path:
    path = Path(folder) / f"{name}.json"
    with atomic_write(path) as f:
        f.write(orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    return path


def write_heatmap(folder: str | Path, name: str, matrix: np.ndarray, row_labels: list[str],
                  column_labels: list[str], title: str, colorbar_label: str) -> Path:
    """A diverging heatmap (zero is white) of matrix [rows, columns] as <folder>/<name>.png."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: render to a file only
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--report needs matplotlib: pip install 'recon-fast[report]' (or `make setup`)") from None
    matrix = np.asarray(matrix, dtype=np.float64)
    rows, columns = matrix.shape
    limit = float(np.nanmax(np.abs(matrix))) if matrix.size and np.isfinite(matrix).any() else 1.0
    width = min(2.0 + 0.45 * columns, 24.0)
    height = min(1.5 + 0.28 * rows, 30.0)
    fig, ax = plt.subplots(figsize=(max(width, 4.0), max(height, 3.0)))
    try:
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=-limit or -1.0, vmax=limit or 1.0, aspect="auto")
        ax.set_yticks(range(rows), labels=row_labels, fontsize=7)
        ax.set_xticks(range(columns), labels=column_labels, fontsize=7, rotation=90 if columns > 12 else 0)
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, label=colorbar_label)
        fig.tight_layout()
        path = Path(folder) / f"{name}.png"
        with atomic_write(path) as f:
            fig.savefig(f, format="png", dpi=120)
    finally:
        plt.close(fig)
    return path


def write_layer_head_heatmaps(folder: str | Path, name: str, panels: list[tuple], row_labels: list[str],
                              column_labels: list[str]) -> Path:
    """Side-by-side sequential heatmaps (layers x heads) as <folder>/<name>.png; each panel is
    (matrix [rows, columns], title, colorbar label, (vmin, vmax) or None for the data's range)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--report needs matplotlib: pip install 'recon-fast[report]' (or `make setup`)") from None
    rows, columns = np.asarray(panels[0][0]).shape
    width = min(2.5 + 0.35 * columns, 12.0) * len(panels)
    height = min(1.8 + 0.22 * rows, 24.0)
    fig, axes = plt.subplots(1, len(panels), figsize=(max(width, 4.5 * len(panels)), max(height, 3.0)), squeeze=False)
    try:
        for ax, (matrix, title, label, limits) in zip(axes[0], panels):
            matrix = np.asarray(matrix, dtype=np.float64)
            vmin, vmax = limits if limits is not None else (np.nanmin(matrix), np.nanmax(matrix))
            image = ax.imshow(matrix, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
            ax.set_yticks(range(rows), labels=row_labels, fontsize=7)
            ax.set_xticks(range(columns), labels=column_labels, fontsize=7, rotation=90 if columns > 12 else 0)
            ax.set_xlabel("head", fontsize=8)
            ax.set_ylabel("layer", fontsize=8)
            ax.set_title(title, fontsize=9, wrap=True)
            fig.colorbar(image, ax=ax, label=label)
        fig.tight_layout()
        path = Path(folder) / f"{name}.png"
        with atomic_write(path) as f:
            fig.savefig(f, format="png", dpi=120)
    finally:
        plt.close(fig)
    return path
