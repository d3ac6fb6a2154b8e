"""Plots that return a matplotlib Figure. The library never calls ``plt.show()``.

Every function takes ``ax=None`` (a new Figure is created, with no pyplot state) and returns
the Figure it drew on, so the plots work headless (Agg) and in notebooks alike. Numbers in
titles and legends use the one format of :mod:`seapig_core.formatting`.

- :func:`plot_score_density`: calibration (and query) scores on an axis a person reads, the
  threshold labelled, accepted and rejected samples in different colours, a log axis so the
  rejected tail stays visible next to a spike of saturated samples;
- :func:`plot_reliability_diagram`: accuracy against confidence per bin, the calibration gap,
  the ECE, and the samples per bin below;
- :func:`plot_temperature_effect`: class probabilities of representative calibration samples
  against the temperature (log axis), the fitted temperature marked (the softmax lab's chart);
- :func:`plot_drift_trend`: rejection rate (with the expected one) and the KS statistic per run
  over time, from a table of past runs;
- :func:`plot_risk_coverage`: selective risk against coverage.

Score axes
----------
Scores are "higher = more uncertain" so that one threshold rule fits all of them, which makes
some of them negated quantities (the softmax score is ``-max p``). The density plot draws each
registry score on the axis of the quantity people know (:data:`SCORE_AXES`,
:func:`score_axis`), and says which side is rejected:

====================  ====================================  ======  ======================
score                 axis                                  value   rejected side
====================  ====================================  ======  ======================
``softmax``           max softmax probability (confidence)  -score  low (left)
``entropy``           predictive entropy (nats)             score   high (right)
``energy``            free energy -T logsumexp(z / T)       score   high (right)
``margin``            logit margin (z(1) - z(2)) / T        -score  low (left)
``max_logit``         max logit z(1) / T                    -score  low (left)
``certainty_ratio``   certainty ratio p(2) / p(1)           score   high (right)
``probability_margin`` probability margin p(1) - p(2)       -score  low (left)
====================  ====================================  ======  ======================
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from seapig_core._validation import check_bool, check_positive_int, check_temperature
from seapig_core.formatting import format_count, format_rate, format_value

__all__ = [
    "SCORE_AXES",
    "ScoreAxis",
    "figure_to_png",
    "plain_text",
    "plot_drift_trend",
    "plot_reliability_diagram",
    "plot_risk_coverage",
    "plot_score_density",
    "plot_temperature_effect",
    "score_axis",
]

_CALIBRATION_COLOR = "0.35"
_ACCEPTED_COLOR = "tab:blue"
_REJECTED_COLOR = "tab:red"
_QUERY_COLOR = "tab:orange"


@dataclass(frozen=True)
class ScoreAxis:
    """How a score is drawn: ``value = sign * score`` on an axis labelled ``label``.

    Attributes
    ----------
    sign : {1.0, -1.0}
        -1 for scores that are a negated familiar quantity (``softmax`` = ``-max p``).
    label : str
        The axis label, e.g. ``"max softmax probability (confidence)"``.
    """

    sign: float
    label: str

    @property
    def rejects_low(self) -> bool:
        """Whether the rejected samples lie at low values of the axis (``sign == -1``)."""
        return self.sign < 0

    def value(self, scores: np.ndarray | float) -> np.ndarray | float:
        """Scores in axis units."""
        return self.sign * scores


#: Axes of the registry scores (see the module docstring).
SCORE_AXES: dict[str, ScoreAxis] = {
    "softmax": ScoreAxis(-1.0, "max softmax probability (confidence)"),
    "entropy": ScoreAxis(1.0, "predictive entropy (nats)"),
    "energy": ScoreAxis(1.0, "free energy -T logsumexp(z / T)"),
    "margin": ScoreAxis(-1.0, "logit margin (z(1) - z(2)) / T"),
    "max_logit": ScoreAxis(-1.0, "max logit z(1) / T"),
    "certainty_ratio": ScoreAxis(1.0, "certainty ratio p(2) / p(1)"),
    "probability_margin": ScoreAxis(-1.0, "probability margin p(1) - p(2)"),
    "confidence": ScoreAxis(-1.0, "learned confidence sigmoid(c)"),
}


def score_axis(score: str | None, score_name: str = "uncertainty score") -> ScoreAxis:
    """The axis of a registry score; for any other name the raw score, labelled ``score_name``."""
    if score is not None and score in SCORE_AXES:
        return SCORE_AXES[score]
    return ScoreAxis(1.0, f"{score_name} (higher = more uncertain)")


def plain_text(text: Any) -> str:
    """``str(text)`` with ``$`` escaped, so that matplotlib never reads a user string as mathtext.

    A batch or class name such as ``"$x"`` or ``"a$b$c"`` would otherwise be typeset, or fail
    to parse and raise while drawing. Use it for every user string in titles and legends.
    """
    return str(text).replace("$", r"\$")


def _new_axes(ax: Axes | None, figsize: tuple[float, float] = (8.0, 4.5)) -> tuple[Figure, Axes]:
    if ax is not None:
        if not isinstance(ax, Axes):
            raise TypeError(f"The 'ax' parameter must be a matplotlib Axes or None. Got {type(ax).__name__} instead.")
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


def _edges(values: list[np.ndarray], cut: float | None, bins: int) -> np.ndarray:
    """``bins`` equal-width bins over the finite values, shifted so that ``cut`` is an edge."""
    finite = np.concatenate([v[np.isfinite(v)] for v in values])
    if cut is not None:
        finite = np.append(finite, cut)
    if finite.size == 0:
        return np.linspace(0.0, 1.0, bins + 1)
    low, high = float(finite.min()), float(finite.max())
    if low == high:
        low, high = low - 0.5, high + 0.5
    width = (high - low) / bins
    if cut is None:
        return np.linspace(low, high, bins + 1)
    first = math.floor((low - cut) / width)
    last = math.ceil((high - cut) / width)
    return cut + width * np.arange(first, max(last, first + 1) + 1)


def plot_score_density(
    calibration_scores: Any,
    query_scores: Any = None,
    threshold: float | None = None,
    bins: int = 100,
    *,
    ax: Axes | None = None,
    title: str = "Uncertainty score densities",
    score_name: str = "uncertainty score",
    score: str | None = None,
) -> Figure:
    """Where the samples lie against the threshold: shares per bin on a log axis.

    Each series is drawn as the share of its samples per bin, on a log scale, so that a few
    rejected samples stay visible beside a spike of saturated ones. Bins have equal width and
    the threshold is a bin edge, so no bin mixes accepted and rejected samples. With query
    scores, the calibration scores are a grey outline and the query's accepted and rejected
    samples are filled in blue and red; without, the calibration's are. The legend gives each
    series' size, accepted and rejected counts and shares, and its non-finite scores; the
    threshold line is labelled with its value, and arrows mark the rejected and accepted sides.

    Parameters
    ----------
    calibration_scores : array-like of shape (N,)
        Scores of the calibration samples.
    query_scores : array-like of shape (M,), optional
        Scores of query samples, drawn on the same bins.
    threshold : float, optional
        Samples with a score at or above it (or non-finite) are rejected.
    bins : int
        Number of histogram bins over the range of all scores.
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; a new Figure is created if omitted.
    title : str
        Axes title.
    score_name : str
        Axis label for a score that is not a registry score.
    score : str, optional
        Registry name of the score (``"softmax"``, ...): the axis then shows the familiar
        quantity (:data:`SCORE_AXES`, e.g. the max softmax probability instead of its negative).

    Returns
    -------
    matplotlib.figure.Figure

    Notes
    -----
    Non-finite scores (samples with non-finite logits) cannot be placed on the axis; they are
    counted as rejected and reported in the legend.
    """
    bins = check_positive_int(bins, "bins")
    axis = score_axis(score, score_name)
    raw = [("calibration", _as_numpy(calibration_scores, "calibration_scores"))]
    if query_scores is not None:
        raw.append(("query", _as_numpy(query_scores, "query_scores")))
    if threshold is not None and not (isinstance(threshold, (int, float, np.floating)) and math.isfinite(threshold)):
        raise ValueError(f"The 'threshold' parameter must be a finite float or None. Got {threshold!r} instead.")
    cut = None if threshold is None else float(axis.value(float(threshold)))
    values = [axis.value(scores) for _, scores in raw]
    edges = _edges(values, cut, bins)

    fig, ax = _new_axes(ax)
    largest = max(max(s.size for _, s in raw), 1)
    floor = 0.5 / largest  # log axis: below the smallest non-zero share
    ax.set_yscale("log")

    def stairs(share: np.ndarray, **style: Any) -> None:
        heights = np.where(share > 0, share, np.nan)
        ax.stairs(heights, edges, baseline=floor, **style)

    for i, ((label, scores), shown) in enumerate(zip(raw, values, strict=True)):
        n = scores.size
        finite = np.isfinite(scores)
        rejected = ~(scores < threshold) if threshold is not None else ~finite
        n_rejected, n_bad = int(rejected.sum()), int((~finite).sum())
        size = f"{label} (n={format_count(n)})"
        bad = f", non-finite={format_count(n_bad)}" if n_bad else ""
        total = max(n, 1)
        as_outline = i == 0 and len(raw) > 1
        if as_outline:
            share = np.histogram(shown[finite], bins=edges)[0] / total
            text = f"{size}: rejected={format_count(n_rejected)} ({format_rate(n_rejected / total)}){bad}"
            if threshold is None:
                text = f"{size}{bad}"
            stairs(share, color=_CALIBRATION_COLOR, linewidth=1.6, label=text)
            continue
        accepted = finite & ~rejected
        stairs(
            np.histogram(shown[accepted], bins=edges)[0] / total, fill=True, color=_ACCEPTED_COLOR, alpha=0.55,
            label=f"{size}: accepted={format_count(int(accepted.sum()))} ({format_rate(accepted.sum() / total)})",
        )
        if threshold is not None:
            stairs(
                np.histogram(shown[finite & rejected], bins=edges)[0] / total, fill=True, color=_REJECTED_COLOR, alpha=0.6,
                label=f"{size}: rejected={format_count(n_rejected)} ({format_rate(n_rejected / total)}){bad}",
            )
        elif n_bad:
            ax.plot([], [], " ", label=f"{size}{bad}")

    ax.set_xlim(edges[0], edges[-1])
    ax.set_ylim(floor, 1.6)
    if cut is not None:
        side = "\u2264" if axis.rejects_low else "\u2265"
        shown_value = format_value(cut, "threshold")
        ax.axvline(
            cut, color="black", linestyle="--", linewidth=1.3,
            label=f"threshold = {format_value(threshold, 'threshold')}: reject {axis.label.split(' (')[0]} {side} {shown_value}",
        )
        low_side = (edges[0], cut) if axis.rejects_low else (cut, edges[-1])
        ax.axvspan(*low_side, color=_REJECTED_COLOR, alpha=0.06, linewidth=0)
        left, right = ("rejected", "accepted") if axis.rejects_low else ("accepted", "rejected")
        style = {"transform": ax.get_xaxis_transform(), "fontsize": "small", "va": "top"}
        ax.text(cut, 0.98, f"{left} \u2190 ", ha="right", color=_REJECTED_COLOR if left == "rejected" else "black", **style)
        ax.text(cut, 0.98, f" \u2192 {right}", ha="left", color=_REJECTED_COLOR if right == "rejected" else "black", **style)
        ax.text(
            cut, 0.90, f" {shown_value} ", ha="left" if axis.rejects_low else "right", fontsize="small", va="top",
            transform=ax.get_xaxis_transform(), bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1},
        )
    ax.set_xlabel(axis.label)
    ax.set_ylabel("share of samples per bin (log scale)")
    ax.set_title(title)
    ax.grid(True, linestyle=":", alpha=0.6)
    ax.set_axisbelow(True)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2, fontsize="small", frameon=False)
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

    Blue bars show the accuracy of each confidence bin at ``temperature``; a red bar on each
    spans from that accuracy to the bin's mean confidence (the gap: above the blue bar for an
    over-confident bin, inside it for an under-confident one; a calibrated model's bars follow
    the diagonal and have no red). With ``compare_temperature`` the accuracy at that temperature
    is a line with a point per bin at its mean confidence (a reliability curve), e.g.
    ``temperature=fitted_T, compare_temperature=1.0`` for after/before temperature scaling.
    Each ECE is in the legend. On a Figure of its own (``ax=None``) the legend sits beside the
    diagram (nothing is drawn under it) and a panel below shows the samples per bin (Guo et al.
    2017, Figure 1); on a given ``ax`` only the diagram is drawn, with the legend inside.

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
        fig = Figure(figsize=(8.6, 6.2), layout="constrained")
        ax, hist_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    else:
        fig, ax = _new_axes(ax)
        hist_ax = None
    edges = main.edges
    centers, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges) * 0.9
    filled = main.counts > 0
    bars = ax.bar(
        centers[filled], main.accuracy[filled], width=widths[filled], color=_PRIMARY_COLOR, alpha=0.85, linewidth=0,
        label=f"accuracy at T = {format_value(temperature, 'stat')} (ECE{pooled} = {format_value(main.ece, 'error')})",
    )
    # The gap as a narrow solid bar on top of the accuracy bar, from the accuracy to the mean
    # confidence: above the bar when over-confident, inside it when under-confident; never a
    # translucent overlay that mixes colours.
    gaps = ax.bar(
        centers[filled], (main.confidence - main.accuracy)[filled], bottom=main.accuracy[filled],
        width=widths[filled] * 0.4, color=_GAP_COLOR, alpha=0.9, linewidth=0, zorder=3,
        label="gap: accuracy to the bin's mean confidence",
    )
    if compare is not None:
        shown = compare.counts > 0
        ax.plot(
            compare.confidence[shown], compare.accuracy[shown], color=_COMPARE_COLOR, marker="o", markersize=4,
            linewidth=1.6,
            label=(
                f"accuracy at T = {format_value(compare_temperature, 'setting')} "
                f"(ECE{pooled} = {format_value(compare.ece, 'error')})"
            ),
        )
    ax.plot([0, 1], [0, 1], linestyle="--", color="black", linewidth=1.0, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    n = int(main.counts.sum())
    ax.set_title(title or f"Reliability diagram ({task}, n = {format_count(n)}{' label decisions' if pooled else ''})")
    ax.grid(True, linestyle=":", alpha=0.6)
    ax.set_axisbelow(True)
    xlabel = "confidence" + (" (per label)" if task == "multilabel" else "")
    handles, names = ax.get_legend_handles_labels()
    first = [names.index(bars.get_label()), names.index(gaps.get_label())]  # the bars, then the lines
    order = first + [i for i in range(len(names)) if i not in first]
    handles, names = [handles[i] for i in order], [names[i] for i in order]
    if hist_ax is None:
        ax.legend(handles, names, loc="upper left", fontsize="small", framealpha=1.0)
        ax.set_xlabel(xlabel)
        return fig
    ax.legend(handles, names, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
    counts = hist_ax.bar(centers, main.counts, width=widths, color=_PRIMARY_COLOR, alpha=0.6, linewidth=0,
                         label=f"T = {format_value(temperature, 'stat')}")
    if compare is not None:
        (line,) = hist_ax.plot(centers, compare.counts, color=_COMPARE_COLOR, marker="o", markersize=3, linewidth=1.2,
                               label=f"T = {format_value(compare_temperature, 'setting')}")
        hist_ax.legend([counts, line], [counts.get_label(), line.get_label()], loc="upper left",
                       bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
    hist_ax.set_xlim(0, 1)
    hist_ax.set_xlabel(xlabel)
    hist_ax.set_ylabel("samples per bin")
    hist_ax.yaxis.set_major_formatter(lambda value, _: format_count(value))
    hist_ax.grid(True, linestyle=":", alpha=0.6)
    hist_ax.set_axisbelow(True)
    return fig


# --------------------------------------------------------------------------- temperature


def _probabilities(values: np.ndarray, temperature: float, family: str, single_logit: bool) -> np.ndarray:
    """Member-averaged probabilities ``(n, C)`` of canonical ``(n, K, M)`` logits at ``temperature``.

    Categorical: softmax over the K classes. Single-logit binary: ``[1 - p, p]``. Multilabel:
    each label's ``P(label)`` (the columns do not sum to 1).
    """
    z = values / temperature
    if family == "categorical":
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).mean(axis=2)
    p = (1.0 / (1.0 + np.exp(-z))).mean(axis=2)
    return np.concatenate([1.0 - p, p], axis=1) if single_logit else p


def _representatives(
    probs: np.ndarray, truth: np.ndarray | None, family: str, single_logit: bool
) -> list[tuple[int, str]]:
    """Row indices (into ``probs``) and titles of a few representative samples, without repeats."""
    multilabel = family == "bernoulli" and not single_logit
    if multilabel:
        confidence = np.maximum(probs, 1.0 - probs).min(axis=1)
        correct = None if truth is None else np.all((probs > 0.5) == (truth > 0.5), axis=1)
    else:
        confidence = probs.max(axis=1)
        correct = None if truth is None else probs.argmax(axis=1) == truth

    def nearest(mask: np.ndarray, q: float) -> int | None:
        idx = np.flatnonzero(mask)
        if idx.size == 0:
            return None
        target = np.quantile(confidence[idx], q)
        return int(idx[np.argmin(np.abs(confidence[idx] - target))])

    everyone = np.ones(len(probs), dtype=bool)
    if correct is None:
        wanted = [(nearest(everyone, 0.9), "confident"), (nearest(everyone, 0.5), "typical"), (nearest(everyone, 0.05), "uncertain")]
    else:
        wrong = np.flatnonzero(~correct)
        most_wrong = int(wrong[np.argmax(confidence[wrong])]) if wrong.size else None
        wanted = [
            (nearest(correct, 0.9), "confident, correct"),
            (nearest(everyone, 0.05), "uncertain"),
            (most_wrong, "confident, wrong"),
        ]
    picks: list[tuple[int, str]] = []
    for index, name in wanted:
        if index is not None and index not in [i for i, _ in picks]:
            picks.append((index, name))
    return picks


def _class_label(index: int, class_names: Sequence[str] | None) -> str:
    return f"{plain_text(class_names[index])} ({index})" if class_names is not None else f"class {index}"


def plot_temperature_effect(
    logits: Any,
    labels: Any = None,
    temperature: float = 1.0,
    task: str = "multiclass",
    per_member: bool = False,
    *,
    samples: Sequence[int] | None = None,
    temperatures: Any = None,
    class_names: Sequence[str] | None = None,
    top_k: int = 3,
    ax: Axes | Sequence[Axes] | None = None,
) -> Figure:
    """Class probabilities of a few calibration samples against the temperature (the softmax lab's chart).

    One panel per sample: the probabilities of its ``top_k`` most probable classes at the
    fitted temperature (and its true class, dashed, when that is not among them) as ``T`` runs
    over a log axis, the fitted ``T`` marked with a solid line and dots, ``T = 1`` (the raw
    logits) dotted. Dividing the logits by ``T > 1`` flattens the distribution, ``T < 1``
    sharpens it; the chart shows a reviewer what the fitted value does to the model's outputs.

    Representative samples (chosen at the fitted temperature, non-finite rows left out): with
    labels, a confident correct one (the correct sample whose confidence is nearest the 90th
    percentile of the correct ones), an uncertain one (confidence nearest the 5th percentile
    of all), and the most confident wrong one; without labels, the samples nearest the 90th,
    50th and 5th percentiles of confidence. Confidence is the top probability (multilabel: the
    least confident label's ``max(p, 1 - p)``, and the curves are the per-label probabilities
    of the ``top_k`` labels nearest 0.5).

    Parameters
    ----------
    logits, labels, task, per_member
        Calibration logits and (optional) labels, as in :func:`seapig_core.metrics.negative_log_likelihood`.
    temperature : float, default 1.0
        The fitted temperature.
    samples : sequence of int, optional
        Row indices to draw instead of the representatives.
    temperatures : array-like of float, optional
        The temperature grid; default 61 log-spaced values from ``min(0.25, T / 4)`` to
        ``max(4, 4 T)``, plus ``T`` and 1.
    class_names : sequence of str, optional
        Names for the legend (``"cat (3)"``).
    top_k : int, default 3
        Classes drawn per sample.
    ax : Axes or sequence of Axes, optional
        One Axes per sample (a single Axes when one sample is drawn); a new Figure is created
        if omitted.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import torch

    from seapig_core.layout import canonicalize, check_labels

    temperature = check_temperature(temperature)
    top_k = check_positive_int(top_k, "top_k")
    canon = canonicalize(logits, task, per_member)
    values = canon.values.detach().to("cpu", dtype=torch.float64).numpy()
    finite_rows = canon.finite_rows().cpu().numpy()
    truth = None
    if labels is not None:
        truth = check_labels(labels, canon).cpu().numpy()
        if canon.single_logit:
            truth = truth.reshape(-1).astype(np.int64)
    n_classes = canon.n_classes
    if class_names is not None and len(class_names) < n_classes:
        raise ValueError(f"The 'class_names' parameter must name {n_classes} classes. Got {len(class_names)} names instead.")
    if temperatures is None:
        grid = np.geomspace(min(0.25, temperature / 4), max(4.0, 4 * temperature), 61)
    else:
        grid = np.asarray(temperatures, dtype=np.float64).reshape(-1)
        if grid.size < 2 or not np.all(np.isfinite(grid) & (grid > 0)):
            raise ValueError(f"The 'temperatures' parameter must hold at least two positive finite values. Got {grid!r} instead.")
    grid = np.unique(np.concatenate([grid, [temperature, 1.0]]))

    rows = np.flatnonzero(finite_rows)
    if rows.size == 0:
        raise ValueError("The 'logits' parameter must have at least one sample with finite logits. Got none.")
    if samples is None:
        at_fit = _probabilities(values[rows], temperature, canon.family, canon.single_logit)
        chosen = [(int(rows[i]), name) for i, name in _representatives(
            at_fit, None if truth is None else truth[rows], canon.family, canon.single_logit
        )]
    else:
        chosen = []
        for index in samples:
            if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)) or not 0 <= index < len(values):
                raise ValueError(f"The 'samples' parameter must hold row indices in [0, {len(values)}). Got {index!r}.")
            if not finite_rows[index]:
                raise ValueError(f"The 'samples' parameter names row {index}, whose logits are not finite.")
            chosen.append((int(index), f"sample {int(index)}"))

    if ax is None:
        fig = Figure(figsize=(4.2 * len(chosen) + 0.4, 4.4), layout="constrained")
        axes = list(np.atleast_1d(fig.subplots(1, len(chosen), sharey=True)))
    else:
        axes = [ax] if isinstance(ax, Axes) else list(ax)
        if len(axes) < len(chosen) or not all(isinstance(a, Axes) for a in axes):
            raise ValueError(
                f"The 'ax' parameter must give one Axes per sample ({len(chosen)}; pass samples=[i] to draw one "
                f"on a single Axes). Got {len(axes)}."
            )
        fig = axes[0].figure
    multilabel = canon.family == "bernoulli" and not canon.single_logit
    curves = np.stack([_probabilities(values[[i for i, _ in chosen]], t, canon.family, canon.single_logit) for t in grid])
    at_t = _probabilities(values[[i for i, _ in chosen]], temperature, canon.family, canon.single_logit)
    for panel, (a, (index, name)) in enumerate(zip(axes, chosen, strict=False)):
        p = at_t[panel]
        order = np.argsort(np.abs(p - 0.5)) if multilabel else np.argsort(-p, kind="stable")
        shown = list(order[: min(top_k, p.size)])
        true = None
        if truth is not None and not multilabel:
            true = int(truth[index])
            if true not in shown:
                shown.append(true)
        predicted = None if multilabel else int(np.argmax(p))
        for rank, c in enumerate(shown):
            suffix = []
            if c == predicted:
                suffix.append("predicted")
            if c == true:
                suffix.append("true")
            label = _class_label(int(c), class_names) + (f" ({', '.join(suffix)})" if suffix else "")
            style = "--" if (c == true and c not in order[:top_k]) else "-"
            a.plot(grid, curves[:, panel, c], linestyle=style, linewidth=1.8, color=f"C{rank}", label=label)
            a.plot([temperature], [p[c]], marker="o", color=f"C{rank}", markersize=5)
        a.axvline(temperature, color="black", linewidth=1.2, label=f"fitted T = {format_value(temperature, 'stat')}")
        if not math.isclose(temperature, 1.0):
            a.axvline(1.0, color="0.5", linestyle=":", linewidth=1.2, label="T = 1 (raw logits)")
        a.set_xscale("log")
        ticks = [2.0**k for k in range(-6, 8) if grid[0] <= 2.0**k <= grid[-1]]
        a.set_xticks(ticks, [format_value(t, "setting") for t in ticks])
        a.minorticks_off()
        a.set_xlim(grid[0], grid[-1])
        a.set_ylim(0, 1.02)
        a.set_xlabel("temperature T (log scale)")
        detail = f"sample {index}"
        if true is not None:
            detail += f": true {_class_label(true, class_names)}"
            if predicted is not None and predicted != true:
                detail += f", predicted {_class_label(predicted, class_names)}"
        a.set_title(f"{name}\n{detail}", fontsize="medium")
        a.grid(True, linestyle=":", alpha=0.6)
        a.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize="small", frameon=False)
    axes[0].set_ylabel("label probability P(label)" if multilabel else "class probability")
    if ax is None:
        fig.suptitle(f"Class probabilities against temperature (fitted T = {format_value(temperature, 'stat')})")
    return fig


# --------------------------------------------------------------------------- trends

_TREND_COLUMNS = ("time", "rejection_rate")


def _history_frame(history: Any) -> pd.DataFrame:
    if isinstance(history, pd.DataFrame):
        frame = history.copy()
    elif isinstance(history, Sequence) and not isinstance(history, (str, bytes)) and all(isinstance(r, Mapping) for r in history):
        frame = pd.DataFrame(list(history))
    else:
        raise TypeError(f"The 'history' parameter must be a DataFrame or a list of dicts. Got {type(history).__name__} instead.")
    missing = [c for c in _TREND_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"The 'history' parameter must have the columns {missing}. Got {list(frame.columns)} instead.")
    if frame.empty:
        raise ValueError("The 'history' parameter must hold at least one run. Got none.")
    return frame


def plot_drift_trend(
    history: Any,
    ax: Axes | None = None,
    *,
    thresholds: Any = None,
    title: str = "Recent runs: rejection rate and drift",
) -> Figure:
    """Rejection rate (against the expected one) and the KS statistic per run, over time.

    Parameters
    ----------
    history : pandas.DataFrame or list of dict
        One row per scored batch of a past run: ``time`` (datetimes, or labels such as run
        names, drawn in the given order), ``rejection_rate`` and optionally
        ``expected_rejection_rate``, ``ks_statistic``, ``verdict`` and ``batch`` (with up to
        8 distinct batches, each gets its own line). E.g. the scoring summaries of a
        deployment's recent runs, with the run's start time.
    ax : matplotlib.axes.Axes, optional
        Draw on this Axes (the KS statistic then on a second y axis on the right); by default
        a Figure with the rejection rate above and the KS statistic below.
    thresholds : DriftThresholds or mapping, optional
        Draws the KS drift threshold (:attr:`seapig_core.drift.DriftThresholds.ks_statistic`).
    title : str
        Title.

    Returns
    -------
    matplotlib.figure.Figure
        Runs with a ``"drift"`` verdict are ringed in red.
    """
    from matplotlib.ticker import PercentFormatter

    from seapig_core.drift import check_drift_thresholds

    frame = _history_frame(history)
    limits = check_drift_thresholds(thresholds)
    times = frame["time"]
    if pd.api.types.is_datetime64_any_dtype(times) or all(hasattr(t, "year") for t in times):
        x = pd.to_datetime(times, utc=True).dt.tz_localize(None)
        frame = frame.assign(_x=x).sort_values("_x", kind="stable")
        categorical = None
    else:
        categorical = list(dict.fromkeys(str(t) for t in times))
        frame = frame.assign(_x=[categorical.index(str(t)) for t in times]).sort_values("_x", kind="stable")

    if ax is None:
        fig = Figure(figsize=(8.6, 5.6), layout="constrained")
        rate_ax, ks_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
        rate_ax.set_title(title)
    else:
        fig, rate_ax = _new_axes(ax)
        ks_ax = rate_ax.twinx()
        rate_ax.set_title(title)
    groups = [(None, frame)]
    if "batch" in frame.columns and 1 < frame["batch"].nunique() <= 8:
        groups = [(str(b), g) for b, g in frame.groupby("batch", sort=True)]
    for i, (batch, group) in enumerate(groups):
        suffix = f" ({plain_text(batch)})" if batch is not None else ""
        color = f"C{i}" if batch is not None else _ACCEPTED_COLOR
        rate_ax.plot(group["_x"], group["rejection_rate"], marker="o", markersize=4, color=color,
                     label=f"rejection rate{suffix}")
        if "ks_statistic" in frame.columns:
            ks_ax.plot(group["_x"], group["ks_statistic"], marker="s", markersize=3.5, color=color,
                       linestyle="-" if ax is None else ":", label=f"KS statistic{suffix}")
    if "expected_rejection_rate" in frame.columns:
        expected = frame.groupby("_x", sort=True)["expected_rejection_rate"].mean()
        style = {"color": "black", "linestyle": "--", "linewidth": 1.2, "label": "expected rejection rate"}
        if len(expected) == 1:  # a step through one point draws nothing
            rate_ax.axhline(float(expected.iloc[0]), **style)
        else:
            rate_ax.step(expected.index, expected.to_numpy(), where="post", **style)
    if "verdict" in frame.columns:
        drifted = frame[frame["verdict"] == "drift"]
        if len(drifted):
            rate_ax.scatter(drifted["_x"], drifted["rejection_rate"], s=110, facecolors="none", edgecolors=_REJECTED_COLOR,
                            linewidths=1.8, zorder=3, label=f"drift verdict ({format_count(len(drifted))})")
            if "ks_statistic" in frame.columns and ax is None:
                ks_ax.scatter(drifted["_x"], drifted["ks_statistic"], s=90, facecolors="none", edgecolors=_REJECTED_COLOR,
                              linewidths=1.5, zorder=3)
    # decimals=None: as many as the tick spacing needs (rates 4.2% and 4.6% must not both read "4%").
    rate_ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))
    rate_ax.set_ylim(bottom=0)
    rate_ax.set_ylabel("rejection rate")
    ks_ax.axhline(limits.ks_statistic, color=_REJECTED_COLOR, linestyle="--", linewidth=1.0,
                  label=f"KS drift threshold {format_value(limits.ks_statistic, 'setting')}")
    top = pd.to_numeric(frame["ks_statistic"], errors="coerce").max() if "ks_statistic" in frame.columns else 0.0
    ks_ax.set_ylim(0, min(1.0, max(0.3, 1.15 * float(np.nan_to_num(top)), 1.3 * limits.ks_statistic)))
    ks_ax.set_ylabel("KS statistic vs calibration")
    for a in (rate_ax, ks_ax) if ax is None else (rate_ax,):  # one grid: the twin axis shares it
        a.grid(True, linestyle=":", alpha=0.6)
        a.set_axisbelow(True)
    if ax is None:
        rate_ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
        ks_ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
        bottom = ks_ax
    else:
        handles, labels = rate_ax.get_legend_handles_labels()
        more, more_labels = ks_ax.get_legend_handles_labels()
        rate_ax.legend(handles + more, labels + more_labels, loc="upper left", fontsize="small", framealpha=1.0)
        bottom = rate_ax
    if categorical is not None:
        bottom.set_xticks(range(len(categorical)), categorical, rotation=30, ha="right")
        bottom.set_xlabel("run")
    else:
        from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

        locator = AutoDateLocator()
        bottom.xaxis.set_major_locator(locator)
        bottom.xaxis.set_major_formatter(ConciseDateFormatter(locator))
        bottom.set_xlabel("run time (UTC)")
    return fig


# --------------------------------------------------------------------------- risk-coverage


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
        label=f"{label} (AURC = {format_value(rc.aurc)}, E-AURC = {format_value(rc.eaurc)}, AUGRC = {format_value(rc.augrc)})",
    )
    top = float(np.max(rc.risk))
    if oracle:
        ax.plot(
            rc.oracle_coverage, rc.oracle_risk, color=_ORACLE_COLOR, linestyle="--", linewidth=1.5,
            label=f"oracle (AURC = {format_value(rc.oracle_aurc)})",
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
