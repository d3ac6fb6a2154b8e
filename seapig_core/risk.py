"""Rejection thresholds with a statistical guarantee on the selective risk.

A threshold at a coverage quantile fixes how many samples are accepted, not how many of the
accepted ones are wrong. :func:`guaranteed_risk_threshold` instead chooses, on labelled
calibration data, the threshold with the largest coverage whose *selective risk* (the error
rate among the accepted samples, on new data from the same distribution) is at most
``target_risk`` with probability at least ``1 - delta`` over the draw of the calibration data.

Selection with Guaranteed Risk (SGR; Geifman and El-Yaniv, "Selective Classification for Deep
Neural Networks", NeurIPS 2017, Algorithm 1):

1. Sort the ``m`` candidate thresholds (one per distinct calibration score) by coverage.
2. Binary-search them. At candidate ``t`` with ``n_t`` selected samples (``score < t``) of
   which ``k_t`` are wrong, the exact one-sided binomial (Clopper-Pearson) upper confidence
   bound on the selective risk is ``B(k_t, n_t, d)``, the ``b`` solving
   ``sum_{j=0}^{k_t} C(n_t, j) b^j (1 - b)^(n_t - j) = d``, i.e. ``beta.ppf(1 - d, k_t + 1, n_t - k_t)``
   (and ``1`` when ``k_t = n_t``). The candidate passes when ``B <= target_risk``; the search
   moves to larger coverage after a pass and to smaller coverage after a failure.
3. Every bound uses ``d = delta / k`` with ``k = ceil(log2(m + 1))``, the most tests a binary
   search over ``m`` candidates makes (Bonferroni over the tests; the paper's
   ``ceil(log2 m)`` plus at most one, so at least as conservative).
4. Return the passing candidate with the largest coverage; if none passes, the target is
   infeasible (:class:`ValueError`).

The guarantee is that of Geifman and El-Yaniv (Theorem 3.2): with probability at least
``1 - delta``, the selective risk of the returned threshold on the distribution is at most its
``risk_bound`` (and so at most ``target_risk``). The candidate thresholds are calibration order
statistics, as in the paper. ``benchmarks/bench_risk.py`` and ``tests/core/test_risk.py`` check
the guarantee by simulation on the shared CIFAR-100 record.

The binomial bound needs 0/1 losses (``errors`` from :func:`seapig_core.metrics.prediction_errors`).
The calibration data must not be those the threshold is evaluated on; to fit a temperature too,
split the labelled data (:func:`split_calibration`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from seapig_core._validation import check_open_unit
from seapig_core.metrics import _check_scores_errors, _score_dtype

__all__ = [
    "METHODS",
    "RiskThreshold",
    "binomial_upper_bound",
    "guaranteed_risk_threshold",
    "split_calibration",
]

#: Accepted values of the ``method`` parameter.
METHODS: tuple[str, ...] = ("sgr",)


@dataclass(frozen=True)
class RiskThreshold:
    """A rejection threshold with a high-probability bound on its selective risk.

    Attributes
    ----------
    threshold : float
        Select a sample when its score is below it.
    coverage : float
        Fraction of the calibration samples selected (``score < threshold``).
    empirical_risk : float
        Error rate among the selected calibration samples.
    risk_bound : float
        Upper confidence bound on the selective risk, at the Bonferroni-corrected level; at most
        ``target_risk``.
    target_risk : float
        The requested bound on the selective risk.
    delta : float
        The allowed probability that the selective risk exceeds ``risk_bound``.
    n_samples : int
        Calibration samples (all, including those with a non-finite score).
    n_selected : int
        Calibration samples selected.
    n_tests : int
        Bounds computed, each at level ``delta / n_tests``.
    method : str
        ``"sgr"``.
    """

    threshold: float
    coverage: float
    empirical_risk: float
    risk_bound: float
    target_risk: float
    delta: float
    n_samples: int
    n_selected: int
    n_tests: int
    method: str

    def to_dict(self) -> dict[str, float | int | str]:
        """A JSON-serialisable copy."""
        return asdict(self)




def binomial_upper_bound(n_errors: Any, n_trials: Any, delta: float) -> np.ndarray | float:
    """Exact one-sided (Clopper-Pearson) upper confidence bound on a binomial proportion.

    The ``b`` with ``P(Binomial(n, b) <= k) = delta``: ``beta.ppf(1 - delta, k + 1, n - k)``,
    ``1`` when ``k = n`` (this covers ``n = 0``). With probability at least ``1 - delta`` the
    true proportion is at most the bound.

    Parameters
    ----------
    n_errors, n_trials : int or array-like of int
        ``0 <= k <= n``.
    delta : float
        In ``(0, 1)``.
    """
    delta = check_open_unit(delta, "delta")
    k = np.asarray(n_errors, dtype=np.float64)
    n = np.asarray(n_trials, dtype=np.float64)
    if np.any(k < 0) or np.any(k > n) or np.any(k != np.round(k)) or np.any(n != np.round(n)):
        raise ValueError(
            f"The 'n_errors' and 'n_trials' parameters must be integers with 0 <= n_errors <= n_trials. "
            f"Got {n_errors!r} and {n_trials!r} instead."
        )
    full = k >= n
    with np.errstate(invalid="ignore", divide="ignore"):
        bound = stats.beta.ppf(1.0 - delta, k + 1.0, np.where(full, 1.0, n - k))
    bound = np.where(full, 1.0, bound)
    return float(bound) if bound.ndim == 0 else bound


def guaranteed_risk_threshold(
    scores: Any,
    errors: Any,
    target_risk: float,
    delta: float = 0.05,
    method: str = "sgr",
) -> RiskThreshold:
    """The largest-coverage threshold whose selective risk is at most ``target_risk`` w.p. ``>= 1 - delta``.

    Selection with Guaranteed Risk (see the module docstring for the algorithm and its
    guarantee). A sample is selected when its score is below the threshold; a threshold never
    splits tied scores; a sample with a non-finite score is never selected (it counts in the
    coverage's denominator).

    Parameters
    ----------
    scores : torch.Tensor or numpy.ndarray
        ``(N,)`` calibration scores, higher = more uncertain.
    errors : torch.Tensor or numpy.ndarray
        ``(N,)`` 0/1 losses of the calibration predictions
        (:func:`seapig_core.metrics.prediction_errors`); ignored where the score is not finite.
    target_risk : float
        In ``(0, 1)``: the largest acceptable selective risk.
    delta : float, default 0.05
        In ``(0, 1)``: the allowed probability of exceeding it.
    method : {"sgr"}, default "sgr"
        Selection with Guaranteed Risk.

    Returns
    -------
    RiskThreshold

    Raises
    ------
    TypeError
        For non-numeric inputs.
    ValueError
        For invalid inputs (shapes, losses other than 0/1, ``target_risk`` or ``delta`` outside
        (0, 1), an unknown method), and, with the word "infeasible", when no threshold has a
        bound at most ``target_risk``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> scores = rng.random(5000)
    >>> errors = (rng.random(5000) < scores / 2).astype(float)  # error rate grows with the score
    >>> rt = guaranteed_risk_threshold(scores, errors, target_risk=0.1, delta=0.05)
    >>> bool(rt.risk_bound <= 0.1), bool(rt.empirical_risk < rt.risk_bound)
    (True, True)
    """
    s, e, selectable = _check_scores_errors(scores, errors)
    target_risk = check_open_unit(target_risk, "target_risk")
    delta = check_open_unit(delta, "delta")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"The 'method' parameter must be one of {list(METHODS)}. Got {method!r} instead.")
    e_fin = e[selectable]
    if not np.all((e_fin == 0.0) | (e_fin == 1.0)):
        bad = float(e_fin[(e_fin != 0.0) & (e_fin != 1.0)][0])
        raise ValueError(
            f"The 'errors' parameter must hold 0/1 losses for the binomial bound. Got the value {bad!r} instead."
        )
    dtype = _score_dtype(scores)
    n_total = s.size

    s_fin = s[selectable]
    order = np.argsort(s_fin, kind="stable")
    s_sorted = s_fin[order]
    cum_errors = np.cumsum(e_fin[order])
    ends = np.append(np.flatnonzero(np.diff(s_sorted) != 0), s_sorted.size - 1)
    # Candidate j selects every sample with score <= distinct[j]: n_sel[j] samples, k_err[j] wrong.
    distinct = s_sorted[ends]
    n_sel = ends + 1
    k_err = cum_errors[ends]
    m = distinct.size
    n_tests = max(1, math.ceil(math.log2(m + 1)))
    level = delta / n_tests

    bounds: dict[int, float] = {}
    lo, hi = -1, m  # lo: largest known pass (or -1), hi: smallest known failure (or m)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        bounds[mid] = binomial_upper_bound(int(k_err[mid]), int(n_sel[mid]), level)
        if bounds[mid] <= target_risk:
            lo = mid
        else:
            hi = mid
    if lo < 0:
        best = min(bounds, key=bounds.get)
        raise ValueError(
            f"The target risk {target_risk:g} is infeasible at delta={delta:g} on {n_total} calibration "
            f"samples: the smallest upper bound found is {bounds[best]:.4g} (at coverage "
            f"{n_sel[best] / n_total:.4g}, empirical risk {k_err[best] / n_sel[best]:.4g}). "
            f"Use a larger 'target_risk' or 'delta', more calibration samples, or a better score."
        )
    threshold = np.nextafter(np.asarray(distinct[lo], dtype=dtype), np.array(np.inf, dtype=dtype))
    return RiskThreshold(
        threshold=float(threshold),
        coverage=float(n_sel[lo] / n_total),
        empirical_risk=float(k_err[lo] / n_sel[lo]),
        risk_bound=float(bounds[lo]),
        target_risk=target_risk,
        delta=delta,
        n_samples=int(n_total),
        n_selected=int(n_sel[lo]),
        n_tests=int(n_tests),
        method=method,
    )


def split_calibration(n: int, fraction: float = 0.5, seed: int | None = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random disjoint split of ``n`` labelled samples into two calibration parts.

    The split protocol: fit the temperature on the first part and set the threshold on the
    second, so that neither is tuned on the samples that check it (see
    :class:`seapig_core.scores.logits.LogitScore`).

    Parameters
    ----------
    n : int
        Number of samples, at least 2.
    fraction : float, default 0.5
        In ``(0, 1)``: the first part holds ``round(fraction * n)`` samples, clipped to
        ``[1, n - 1]``.
    seed : int or None, default 0
        Seed of ``numpy.random.default_rng``; the same seed gives the same split.

    Returns
    -------
    tuple of numpy.ndarray
        ``(first, second)``: sorted int64 index arrays, disjoint, together ``range(n)``.

    Examples
    --------
    >>> first, second = split_calibration(10, fraction=0.3, seed=1)
    >>> len(first), len(second), sorted([*first, *second]) == list(range(10))
    (3, 7, True)
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"The 'n' parameter must be an integer >= 2. Got {type(n).__name__} instead.")
    if n < 2:
        raise ValueError(f"The 'n' parameter must be an integer >= 2. Got {n!r} instead.")
    fraction = check_open_unit(fraction, "fraction")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise TypeError(f"The 'seed' parameter must be an integer or None. Got {type(seed).__name__} instead.")
    n_first = min(max(int(round(fraction * n)), 1), n - 1)
    permutation = np.random.default_rng(seed).permutation(int(n))
    return np.sort(permutation[:n_first]), np.sort(permutation[n_first:])
