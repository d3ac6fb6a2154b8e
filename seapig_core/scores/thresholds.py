"""Quantile thresholds that never go silently blind, and the diagnostics that explain them.

A sample is selected when its score is *below* the threshold. A quantile threshold should
select about a fraction ``q`` of the calibration samples, but tied scores cannot be split: a
threshold either selects a whole tied group or none of it. Ties are common where float32
probabilities saturate: a very accurate model at a small temperature gives most calibration
samples ``max p = 1.0`` exactly, so the softmax score of all of them is ``-1.0``; the plain
``q``-quantile is then ``-1.0`` and ``score < -1.0`` selects nothing.

:func:`quantile_threshold` therefore chooses, between the two thresholds around a tied group
at the quantile (``v``, which rejects the group, and the next representable value above
``v``, which selects it), the one whose coverage is closer to ``q``, and never the one that
selects nothing when the other selects something. When the achieved coverage still differs
from ``q`` by more than one percentage point, it returns a diagnostic saying why: how many
calibration scores are tied at which value (and whether that value is where the score
saturates), or how few samples there are, and which scores keep separating the samples.

Diagnostics are plain dicts ``{"code", "message", "severity"}`` (JSON-able, stored with a
fitted score, a bundle's manifest and shown in reports); :func:`emit` issues them as
:class:`SelectionWarning`. Codes:

``"ties"``
    Tied calibration scores keep the coverage more than a point from ``q``.
``"saturated"``
    The same, with the ties at the value where the score saturates in its dtype.
``"few_samples"``
    Too few calibration samples for the coverage to come within a point of ``q``.
``"nothing_selected"``
    A threshold selects no calibration sample.
``"temperature_at_bound"``
    The fitted temperature lies on a bound of its search interval.

Thresholds are values of the scores' dtype (float32 scores get a float32-representable
threshold), so comparing in float32 (torch, NumPy) and in float64 selects the same samples.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "COVERAGE_TOLERANCE",
    "SEPARATING_SCORES",
    "SelectionWarning",
    "ThresholdChoice",
    "diagnostic",
    "emit",
    "quantile_threshold",
    "saturation_diagnostic",
    "temperature_diagnostic",
]

#: The largest gap between the achieved coverage and ``q`` that passes without a warning.
COVERAGE_TOLERANCE = 0.01

#: Scores that do not saturate (unbounded in the logits): the remedy named by diagnostics.
SEPARATING_SCORES: tuple[str, ...] = ("energy", "margin", "max_logit")


class SelectionWarning(UserWarning):
    """A threshold, fit or selection that works but not as asked, and why.

    Issued for ties that keep the coverage away from ``q`` (e.g. a saturated softmax score),
    a threshold that selects no calibration sample, and a temperature fitted on a bound. The
    same messages are kept in ``score.diagnostics``.
    """


def diagnostic(code: str, message: str, severity: str = "warning") -> dict[str, str]:
    """One diagnostic record."""
    return {"code": code, "message": message, "severity": severity}


def emit(diagnostics: Iterable[dict[str, str]], stacklevel: int = 3) -> None:
    """Issue each diagnostic as a :class:`SelectionWarning`."""
    for item in diagnostics:
        warnings.warn(item["message"], SelectionWarning, stacklevel=stacklevel)


@dataclass(frozen=True)
class ThresholdChoice:
    """Result of :func:`quantile_threshold`.

    Attributes
    ----------
    threshold : float
        Select a sample when its score is below it; a value of the scores' dtype.
    coverage : float
        Fraction of the finite calibration scores below the threshold.
    n_scores : int
        Finite calibration scores.
    n_selected : int
        Of those, how many lie below the threshold.
    diagnostics : list of dict
        Why the coverage differs from ``q`` by more than :data:`COVERAGE_TOLERANCE`, if it does.
    """

    threshold: float
    coverage: float
    n_scores: int
    n_selected: int
    diagnostics: list[dict[str, str]] = field(default_factory=list)


def _as_numpy(scores: Any) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().to("cpu")
        if scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.to(torch.float32)
        return scores.numpy()
    array = np.asarray(scores)
    return array.astype(np.float32) if array.dtype == np.float16 else array


def _dtype(values: np.ndarray) -> np.dtype:
    return np.dtype(np.float32) if values.dtype == np.float32 else np.dtype(np.float64)


def _above(value: float, dtype: np.dtype) -> float:
    """The next value of ``dtype`` above ``value``: a threshold that selects ``value``."""
    return float(np.nextafter(dtype.type(value), dtype.type(np.inf)))


def _fmt_value(value: float) -> str:
    return f"{value:.9g}"


def _others(score_name: str) -> str:
    names = [n for n in SEPARATING_SCORES if n != score_name]
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


def quantile_threshold(
    scores: Any,
    q: float,
    *,
    score_name: str = "score",
    saturation: float | None = None,
    temperature: float | None = None,
    remedy: str | None = None,
) -> ThresholdChoice:
    """The ``q``-quantile threshold of calibration scores, tie-aware.

    Parameters
    ----------
    scores : torch.Tensor or numpy.ndarray
        ``(N,)`` calibration scores; NaN ignored (as :func:`numpy.nanquantile`).
    q : float
        Target coverage in (0, 1) (checked by the caller).
    score_name : str
        For messages, e.g. ``"softmax"``.
    saturation : float, optional
        The value where the score saturates in floating point (``-1.0`` for the softmax
        score), to name saturation as the cause of ties there.
    temperature : float, optional
        For messages.
    remedy : str, optional
        The sentence a saturation diagnostic ends with instead of the default (a
        non-saturating score, float64 logits or a larger temperature).

    Returns
    -------
    ThresholdChoice
        Without ties at the quantile, ``threshold`` is :func:`numpy.nanquantile` (rounded to
        the scores' dtype without changing which samples it selects), as before.

    Raises
    ------
    ValueError
        If no score is finite.
    """
    values = _as_numpy(scores).reshape(-1)
    dtype = _dtype(values)
    finite = np.sort(values[np.isfinite(values)].astype(np.float64))
    n = int(finite.size)
    if n == 0:
        raise ValueError("set_threshold() needs at least one finite calibration score. Got none.")
    t0 = float(np.quantile(finite, q))
    below = int(np.searchsorted(finite, t0, side="left"))  # scores < t0
    at_or_below = int(np.searchsorted(finite, t0, side="right"))  # scores <= t0
    count = below
    if at_or_below > below and (below == 0 or abs(at_or_below / n - q) < abs(below / n - q)):
        count = at_or_below  # select the tied group at t0 (never select nothing when avoidable)

    # A threshold of the scores' dtype selecting exactly `count` scores.
    if count == below:
        threshold = float(dtype.type(t0))
        if int(np.searchsorted(finite, threshold, side="left")) != count:
            threshold = _above(finite[count - 1], dtype) if count else float(dtype.type(finite[0]))
    else:
        threshold = _above(finite[count - 1], dtype)
    coverage = count / n

    diagnostics: list[dict[str, str]] = []
    if abs(coverage - q) > COVERAGE_TOLERANCE:
        diagnostics.append(
            _coverage_diagnostic(finite, q, threshold, coverage, score_name, saturation, temperature, dtype, remedy)
        )
    if count == 0:
        diagnostics.append(nothing_selected_diagnostic(score_name, threshold, n))
    return ThresholdChoice(threshold, coverage, n, count, diagnostics)


def _coverage_diagnostic(
    finite: np.ndarray,
    q: float,
    threshold: float,
    coverage: float,
    score_name: str,
    saturation: float | None,
    temperature: float | None,
    dtype: np.dtype,
    remedy: str | None = None,
) -> dict[str, str]:
    n = finite.size
    # The tied group that holds the target rank q * n.
    rank = min(n - 1, max(0, math.ceil(q * n) - 1))
    value = float(finite[rank])
    lo, hi = np.searchsorted(finite, value, side="left"), np.searchsorted(finite, value, side="right")
    n_tied = int(hi - lo)
    outcome = (
        f"The {score_name} threshold {_fmt_value(threshold)} selects {coverage:.1%} of the {n:,} calibration "
        f"samples instead of q = {q:g}"
    )
    if n_tied <= 1 or n_tied / n <= COVERAGE_TOLERANCE:
        return diagnostic(
            "few_samples",
            f"{outcome}: with {n:,} calibration samples the coverage moves in steps "
            f"of {1 / n:.1%}. Calibrate on more samples (at least {math.ceil(1 / COVERAGE_TOLERANCE):,} for "
            f"one-point steps).",
        )
    temp = "" if temperature is None else f" at T = {temperature:.4g}"
    saturated = saturation is not None and value == float(dtype.type(saturation))
    if saturated:
        cause = (
            f"{n_tied:,} of {n:,} calibration scores ({n_tied / n:.1%}) are tied at {_fmt_value(value)}, where the "
            f"{score_name} score saturates in {dtype.name}{temp}: their probabilities round to exactly 0 or 1, "
            f"so the score cannot rank them"
        )
        code = "saturated"
    else:
        cause = f"{n_tied:,} of {n:,} calibration scores ({n_tied / n:.1%}) are tied at {_fmt_value(value)}"
        code = "ties"
    if saturated and remedy is not None:
        return diagnostic(code, f"{outcome}: {cause}, and a threshold selects or rejects a tied group as a whole. {remedy}")
    return diagnostic(
        code,
        f"{outcome}: {cause}, and a threshold selects or rejects a tied group "
        f"as a whole. Use a score that keeps separating these samples ({_others(score_name)} do not "
        f"saturate){', float64 logits or a larger temperature' if saturated else ''}.",
    )


def nothing_selected_diagnostic(score_name: str, threshold: float, n: int) -> dict[str, str]:
    """The ``"nothing_selected"`` diagnostic."""
    return diagnostic(
        "nothing_selected",
        f"The {score_name} threshold {_fmt_value(threshold)} selects none of the {n:,} calibration samples: "
        f"every query sample like them would be rejected.",
    )


def saturation_diagnostic(
    scores: Any, score_name: str, saturation: float | None, temperature: float | None, *, remedy: str | None = None
) -> dict[str, str] | None:
    """A ``"saturated"`` diagnostic when more than a point of the scores sit at ``saturation``.

    For thresholds without a coverage target (guaranteed-risk thresholds): the tied group
    cannot be split, so the threshold cannot stop inside it. ``remedy`` replaces the default
    closing sentence (see :func:`quantile_threshold`).
    """
    if saturation is None:
        return None
    values = _as_numpy(scores).reshape(-1)
    dtype = _dtype(values)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    n_tied = int(np.count_nonzero(finite == dtype.type(saturation)))
    if n_tied <= 1 or n_tied / finite.size <= COVERAGE_TOLERANCE:
        return None
    temp = "" if temperature is None else f" at T = {temperature:.4g}"
    advice = remedy or (
        f"Use a score that keeps separating them ({_others(score_name)} do not saturate), float64 logits or a "
        f"larger temperature."
    )
    return diagnostic(
        "saturated",
        f"{n_tied:,} of {finite.size:,} calibration scores ({n_tied / finite.size:.1%}) of the {score_name} score "
        f"are tied at {_fmt_value(float(saturation))}, where it saturates in {dtype.name}{temp}: a threshold "
        f"selects or rejects them as a whole. {advice}",
    )


def temperature_diagnostic(
    temperature: float, at_bound: bool, bounds: tuple[float, float], n_samples: int, n_classes: int
) -> dict[str, str] | None:
    """The ``"temperature_at_bound"`` diagnostic of a temperature fit, or None."""
    if not at_bound:
        return None
    low, high = bounds
    if temperature <= low * (1 + 1e-9):
        return diagnostic(
            "temperature_at_bound",
            f"The fitted temperature is at its lower bound T = {low:g}: the NLL still decreased there, "
            f"because the logits separate the {n_samples:,} labelled calibration samples perfectly "
            f"(too few samples for {n_classes:,} classes to estimate a temperature). At this temperature "
            f"probabilities saturate and probability-based scores tie. Pass a temperature, or fit on "
            f"more labelled samples.",
        )
    return diagnostic(
        "temperature_at_bound",
        f"The fitted temperature is at its upper bound T = {high:g}: the NLL still decreased there, so "
        f"the logits carry almost no information about the {n_samples:,} calibration labels and every "
        f"probability is near uniform. Check that the labels match the logits (order, class indices).",
    )
