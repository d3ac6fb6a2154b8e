"""Plots that return a matplotlib Figure. The library never calls ``plt.show()``.

Every function takes ``ax=None`` (a new Figure is created, with no pyplot state) and returns
the Figure it drew on, so the plots work headless (Agg) and in notebooks alike.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = ["figure_to_png", "plot_score_density"]

_CALIBRATION_COLOR = "tab:blue"
_QUERY_COLOR = "tab:orange"


def _new_axes(ax: Axes | None, figsize: tuple[float, float] = (8.0, 4.5)) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    # Figure() directly, not pyplot: no global state, no GUI backend needed.
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _as_numpy(values: Any, name: str) -> np.ndarray:
    try:
        import torch

        if isinstance(values, torch.Tensor):
            values = values.detach().to("cpu", dtype=torch.float64).numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"The '{name}' parameter must be 1-D scores. Got shape {array.shape} instead.")
    return array


def plot_score_density(
    calibration_scores: Any,
    query_scores: Any = None,
    threshold: float | None = None,
    bins: int = 100,
    *,
    ax: Axes | None = None,
    title: str = "Uncertainty score densities",
    score_name: str = "uncertainty score",
) -> Figure:
    """Density of calibration scores (and query scores) with the threshold and rejected counts.

    Parameters
    ----------
    calibration_scores : array-like of shape (N,)
        Scores of the calibration samples.
    query_scores : array-like of shape (M,), optional
        Scores of query samples, drawn on the same bins.
    threshold : float, optional
        Samples with a score at or above it are rejected; drawn as a dashed line.
    bins : int
        Number of histogram bins, shared by both densities.
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; a new Figure is created if omitted.
    title, score_name : str
        Title and x-axis label.

    Returns
    -------
    matplotlib.figure.Figure

    Notes
    -----
    Non-finite scores (samples with non-finite logits) cannot be placed on the axis; they are
    counted as rejected and reported in the legend.
    """
    if not isinstance(bins, (int, np.integer)) or isinstance(bins, bool) or bins < 1:
        raise ValueError(f"The 'bins' parameter must be a positive integer. Got {bins!r} instead.")
    series = [("calibration", _as_numpy(calibration_scores, "calibration_scores"), _CALIBRATION_COLOR)]
    if query_scores is not None:
        series.append(("query", _as_numpy(query_scores, "query_scores"), _QUERY_COLOR))

    finite_all = np.concatenate([s[np.isfinite(s)] for _, s, _ in series])
    if threshold is not None and np.isfinite(threshold):
        finite_all = np.append(finite_all, threshold)
    if finite_all.size == 0:
        low, high = 0.0, 1.0
    else:
        low, high = float(finite_all.min()), float(finite_all.max())
        if low == high:
            low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, int(bins) + 1)

    fig, ax = _new_axes(ax)
    for label, scores, color in series:
        finite = scores[np.isfinite(scores)]
        n_bad = scores.size - finite.size
        rejected = n_bad + (int(np.sum(finite >= threshold)) if threshold is not None else 0)
        text = f"{label} (n={scores.size:,}"
        if threshold is not None:
            text += f", rejected={rejected:,} ({rejected / max(scores.size, 1):.1%})"
        if n_bad:
            text += f", non-finite={n_bad:,}"
        text += ")"
        if finite.size:
            density, _ = np.histogram(finite, bins=edges, density=True)
            ax.stairs(density, edges, fill=True, alpha=0.45, color=color, label=text)
        else:
            ax.plot([], [], color=color, label=text)
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1.2, label=f"threshold = {threshold:.4g}")
        ax.axvspan(threshold, max(high, threshold), color="tab:red", alpha=0.06, label="rejected region")
    ax.set_xlim(low, high)
    ax.set_xlabel(f"{score_name} (higher = more uncertain)")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.grid(True, linestyle=":", alpha=0.6)
    ax.legend(loc="best", fontsize="small")
    return fig


def figure_to_png(fig: Figure, dpi: int = 110) -> bytes:
    """Render a Figure to PNG bytes (Agg), e.g. for a markdown artifact's data URI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
