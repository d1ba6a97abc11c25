"""PNG heatmaps of the block matrices (matplotlib, the optional ``plots`` extra).

One figure per (scope, view, statistic): a panel per layer and one for the mean over layers,
rows = the T-tokens' scenarios, columns = the view's key groups, each cell annotated with its
value. Blocks without a visible pair are NaN and drawn grey. :func:`heatmap_figure` returns the
arrays read back from the drawn images, so callers (and tests) can check that the PNG shows
exactly the numbers written to JSON.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class PlotsUnavailableError(ImportError, ValueError):
    """matplotlib is not installed. An ``ImportError`` for code, and a ``ValueError`` so the command
    line prints it as one line (the user's to fix: install the extra), like :class:`mtfm.errors.UnknownNameError`."""


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or :class:`PlotsUnavailableError` naming the extra."""
    try:
        import matplotlib
    except ImportError:
        raise PlotsUnavailableError("mtfm explain draws its heatmaps with matplotlib, which is not installed: "
                          "pip install 'mtfm[plots]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap_figure(path: Path, title: str, rows: list[str], columns: list[str],
                   panels: list[tuple[str, np.ndarray]]) -> list[np.ndarray]:
    """Draw ``panels`` (name, ``[rows, columns]`` matrix) side by side into ``path``; return the drawn arrays."""
    plt = pyplot()
    n = len(panels)
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    width = max(4.0, 0.55 * len(columns) + 2.2)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, (0.45 * len(rows) + 2.2) * nrows), squeeze=False)
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    drawn = []
    try:
        for ax, (name, matrix) in zip(axes.flat, panels):
            data = np.ma.masked_invalid(np.asarray(matrix, dtype=np.float64))
            image = ax.imshow(data, cmap=cmap, aspect="auto", interpolation="nearest")
            ax.set_title(name, fontsize=9)
            ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(len(rows)), rows, fontsize=8)
            ax.set_xlabel("key group (attended to)", fontsize=8)
            ax.set_ylabel("T-token scenario (query)", fontsize=8)
            for (r, c), value in np.ndenumerate(matrix):
                if not np.isnan(value):  # dark text on the bright end of viridis, white elsewhere
                    bright = image.norm(value) > 0.6
                    ax.text(c, r, f"{value:.2g}", ha="center", va="center", fontsize=6,
                            color="black" if bright else "white")
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
            shown = image.get_array()
            drawn.append(np.ma.filled(shown.astype(np.float64), np.nan))
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return drawn
