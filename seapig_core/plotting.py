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

from seapig_core._validation import check_bool, check_positive_int, check_temperature

__all__ = ["figure_to_png", "plot_reliability_diagram", "plot_risk_coverage", "plot_score_density"]

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
    bins = check_positive_int(bins, "bins")
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


# --------------------------------------------------------------------------- calibration and selection

_PRIMARY_COLOR = "tab:blue"
_GAP_COLOR = "tab:red"
_COMPARE_COLOR = "tab:orange"
_ORACLE_COLOR = "tab:green"


def plot_reliability_diagram(
    logits: Any,
    labels: Any,
    task: str = "multiclass",
    temperature: float = 1.0,
    per_member: bool = False,
    n_bins: int = 15,
    ax: Axes | None = None,
    compare_temperature: float | None = None,
    *,
    binning: str = "width",
    title: str | None = None,
) -> Figure:
    """Reliability diagram: accuracy against confidence per bin, with the gaps and the ECE.

    Bars show the accuracy of each confidence bin at ``temperature``; the hatched red boxes
    span from the accuracy to the bin's mean confidence (the gap; a perfectly calibrated model
    has none and its bars follow the diagonal). On a Figure of its own (``ax=None``) a panel
    below shows the fraction of samples per bin (Guo et al. 2017, Figure 1); on a given ``ax``
    only the diagram is drawn. With ``compare_temperature`` the accuracy at that temperature
    is drawn as an orange outline, e.g. ``temperature=fitted_T, compare_temperature=1.0`` for
    after/before temperature scaling. Each ECE is in the legend.

    Confidence and correctness as in :mod:`seapig_core.metrics` (top-label). Multilabel: all
    ``N * C`` label decisions are pooled in one diagram and the legend says "pooled"; the
    per-label ECEs are :func:`seapig_core.metrics.expected_calibration_error` with
    ``average=False``.

    Parameters
    ----------
    logits, labels, task, temperature, per_member, n_bins
        As in :func:`seapig_core.metrics.expected_calibration_error`.
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; a new Figure is created if omitted.
    compare_temperature : float, optional
        A second temperature to draw for comparison.
    binning : {"width", "mass"}, default "width"
        Equal-width or equal-mass bins.
    title : str, optional
        Axes title; a default names the task and the number of samples.

    Returns
    -------
    matplotlib.figure.Figure
        Never shown.

    References
    ----------
    Guo et al., "On Calibration of Modern Neural Networks", ICML 2017 (Figure 1).
    """
    from seapig_core.metrics import calibration_bins

    main = calibration_bins(logits, labels, task, temperature, per_member, n_bins, binning, pooled=True)
    compare = None
    if compare_temperature is not None:
        compare_temperature = check_temperature(compare_temperature, name="compare_temperature")
        compare = calibration_bins(logits, labels, task, compare_temperature, per_member, n_bins, binning, pooled=True)
    pooled = " pooled" if task == "multilabel" else ""

    if ax is None:
        # Own figure: the reliability diagram above a histogram of the confidences (Guo et al.).
        fig = Figure(figsize=(6.0, 6.4), layout="constrained")
        ax, hist_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    else:
        fig, hist_ax = ax.figure, None
    left, widths = main.edges[:-1], np.diff(main.edges)
    filled = main.counts > 0
    ax.bar(
        left[filled], main.accuracy[filled], width=widths[filled], align="edge", color=_PRIMARY_COLOR,
        alpha=0.8, edgecolor="white", linewidth=0.8,
        label=f"accuracy, T = {float(temperature):.3g} (ECE{pooled} = {main.ece:.2%})",
    )
    ax.bar(
        left[filled], (main.confidence - main.accuracy)[filled], bottom=main.accuracy[filled],
        width=widths[filled], align="edge", facecolor=_GAP_COLOR, alpha=0.25, edgecolor=_GAP_COLOR,
        hatch="//", linewidth=0.6, label="gap to mean confidence",
    )
    if compare is not None:
        acc = np.where(compare.counts > 0, compare.accuracy, np.nan)
        ax.stairs(
            acc, compare.edges, color=_COMPARE_COLOR, linewidth=2.0,
            label=f"accuracy, T = {compare_temperature:.3g} (ECE{pooled} = {compare.ece:.2%})",
        )
    ax.plot([0, 1], [0, 1], linestyle="--", color="black", linewidth=1.0, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    n = int(main.counts.sum())
    ax.set_title(title or f"Reliability diagram ({task}, n = {n:,}{' label decisions' if pooled else ''})")
    ax.grid(True, linestyle=":", alpha=0.6)
    ax.set_axisbelow(True)
    handles, names = ax.get_legend_handles_labels()
    rank = {"accuracy, T = " + f"{float(temperature):.3g}": 0, "gap": 1, "accuracy": 2, "perfect": 3}
    order = sorted(range(len(names)), key=lambda i: min(v for k, v in rank.items() if names[i].startswith(k)))
    ax.legend([handles[i] for i in order], [names[i] for i in order], loc="upper left", fontsize="small")
    xlabel = "confidence" + (" (per label)" if task == "multilabel" else "")
    if hist_ax is None:
        ax.set_xlabel(xlabel)
        return fig
    hist_ax.stairs(
        main.counts / n, main.edges, fill=True, color=_PRIMARY_COLOR, alpha=0.6, label=f"T = {float(temperature):.3g}"
    )
    if compare is not None:
        hist_ax.stairs(
            compare.counts / n, compare.edges, color=_COMPARE_COLOR, linewidth=1.8,
            label=f"T = {compare_temperature:.3g}",
        )
        hist_ax.legend(loc="upper left", fontsize="small")
    hist_ax.set_xlim(0, 1)
    hist_ax.set_xlabel(xlabel)
    hist_ax.set_ylabel("fraction of samples")
    hist_ax.grid(True, linestyle=":", alpha=0.6)
    hist_ax.set_axisbelow(True)
    return fig


def plot_risk_coverage(
    rc: Any,
    ax: Axes | None = None,
    oracle: bool = True,
    *,
    risk_threshold: Any = None,
    label: str = "score",
    title: str = "Risk-coverage curve",
) -> Figure:
    """Selective risk against coverage, with the oracle curve and the AURC in the legend.

    Parameters
    ----------
    rc : seapig_core.metrics.RiskCoverage
        From :func:`seapig_core.metrics.risk_coverage`.
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; a new Figure is created if omitted.
    oracle : bool, default True
        Also draw the oracle ordering (smallest loss first) and its AURC.
    risk_threshold : seapig_core.risk.RiskThreshold, optional
        Mark a guaranteed threshold: its target risk (horizontal) and its coverage on the
        data it was set on (vertical).
    label : str, default "score"
        Legend name of the curve, e.g. the score's name.
    title : str
        Axes title.

    Returns
    -------
    matplotlib.figure.Figure
        Never shown.

    References
    ----------
    Geifman and El-Yaniv, "Selective Classification for Deep Neural Networks", NeurIPS 2017;
    Geifman et al., "Bias-Reduced Uncertainty Estimation for Deep Neural Classifiers", ICLR 2019.
    """
    from seapig_core.metrics import RiskCoverage

    if not isinstance(rc, RiskCoverage):
        raise TypeError(f"The 'rc' parameter must be a RiskCoverage (see risk_coverage). Got {type(rc).__name__} instead.")
    oracle = check_bool(oracle, "oracle")

    fig, ax = _new_axes(ax, figsize=(7.0, 4.5))
    ax.plot(
        rc.coverage, rc.risk, color=_PRIMARY_COLOR, linewidth=1.8,
        label=f"{label} (AURC = {rc.aurc:.4f}, E-AURC = {rc.eaurc:.4f}, AUGRC = {rc.augrc:.4f})",
    )
    top = float(np.max(rc.risk))
    if oracle:
        ax.plot(
            rc.oracle_coverage, rc.oracle_risk, color=_ORACLE_COLOR, linestyle="--", linewidth=1.5,
            label=f"oracle (AURC = {rc.oracle_aurc:.4f})",
        )
    if risk_threshold is not None:
        rt = risk_threshold
        ax.axhline(rt.target_risk, color=_GAP_COLOR, linestyle=":", linewidth=1.2)
        ax.axvline(rt.coverage, color=_GAP_COLOR, linestyle=":", linewidth=1.2)
        ax.plot(
            [rt.coverage], [rt.empirical_risk], marker="o", color=_GAP_COLOR, linestyle="none",
            label=(
                f"guaranteed threshold: coverage {rt.coverage:.1%}, risk <= {rt.target_risk:.3g} "
                f"w.p. >= {1 - rt.delta:.0%} (bound {rt.risk_bound:.3g})"
            ),
        )
        top = max(top, rt.target_risk)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(top * 1.08, 1e-3))
    ax.set_xlabel("coverage (fraction of samples selected)")
    ax.set_ylabel("selective risk (mean loss of selected)")
    ax.set_title(title)
    ax.grid(True, linestyle=":", alpha=0.6)
    ax.legend(loc="upper left", fontsize="small")
    return fig
