"""Rejection thresholds with a statistical guarantee on the selective risk.

A threshold at a coverage quantile fixes how many samples are accepted, not how many of the
accepted ones are wrong. :func:`guaranteed_risk_threshold` instead chooses, on labelled
calibration data, the threshold with the largest coverage whose *selective risk* (the error
rate among the accepted samples, on new data from the same distribution) is at most
``target_risk`` with probability at least ``1 - delta`` over the draw of the calibration data.

Both methods below test the same candidates, one per distinct finite calibration score sorted
by coverage: candidate ``j`` selects the ``n_j`` samples with a score at most its value
(``score < t`` with ``t`` the next float above it; a threshold never splits tied scores), of
which ``k_j`` are wrong. Conditionally on ``n_j``, ``k_j`` is binomial with the selective risk
as its rate, so the evidence at candidate ``j`` is exact: the one-sided binomial
(Clopper-Pearson) upper confidence bound ``B(k_j, n_j, d)``, the ``b`` solving
``sum_{i=0}^{k_j} C(n_j, i) b^i (1 - b)^(n_j - i) = d`` (``beta.ppf(1 - d, k_j + 1, n_j - k_j)``,
``1`` when ``k_j = n_j``), or equivalently the p-value ``P(Binomial(n_j, r) <= k_j)`` of the
null hypothesis "the selective risk exceeds ``r``" (``B <= r`` exactly when that p-value is at
most ``d``). The candidate thresholds are calibration order statistics, as in Geifman and
El-Yaniv; the p-values are exact for a threshold fixed in advance and the guarantee is checked
by simulation on the shared CIFAR-100 record treated as the population
(``tests/core/test_risk.py``, ``benchmarks/bench_risk.py``).

``method="sgr"``: Selection with Guaranteed Risk (Geifman and El-Yaniv, "Selective
Classification for Deep Neural Networks", NeurIPS 2017, Algorithm 1). Binary search over the
``m`` candidates, every bound at ``d = delta / k`` with ``k = ceil(log2(m + 1))`` (at least the
number of tests the search makes: Bonferroni over the tests, the paper's ``ceil(log2 m)`` plus
at most one); the search moves to larger coverage after a pass and to smaller coverage after a
failure, and returns the passing candidate with the largest coverage. The guarantee is that of
the paper (Theorem 3.2). A plain binary search assumes that the bound fails only to the right of
the feasible candidates, but the bound is not monotone in coverage: it is wide at small
coverage (few samples) and high at large coverage (many errors). The plain search probed
candidates that select too few samples to pass even without a single error, failed there,
moved to still smaller coverage and reported "infeasible" although a feasible window lay
between its probes (``tests/core/test_risk.py`` has such a case). The search here runs only
over the candidates that could pass at all, those selecting at least
``ceil(log(d) / log(1 - target_risk))`` samples (a function of the counts only, so no
validity is spent; the Bonferroni count is unchanged and no candidate that could be returned
is left out). On data where the bound's failures lie only on both sides of one window the
search then finds its right end in most cases, but a binary search over a non-monotone
predicate can still miss a window, for example one that errors concentrated among the most
confident samples open and close: that is what ``"ltt"`` is for. (A direction rule, "after a
width failure move to larger coverage", was tried and rejected: where the only feasible
candidates are error-free ones at the smallest counts it walks away from them.)

``method="ltt"``: Learn-then-Test (Angelopoulos, Bates, Candès, Jordan and Lei, "Learn then
Test: Calibrating Predictive Algorithms to Achieve Risk Control", 2021) with fixed-sequence
testing from the most confident side. The null hypotheses "the selective risk of candidate
``j`` exceeds ``target_risk``" are tested in the fixed order of coverage, each with its exact
binomial p-value; the candidate with the largest coverage among the rejected ones is returned.
Fixed-sequence testing controls the family-wise error rate for any order fixed before the
errors are seen, without assuming that the bound or the risk is monotone in coverage, and
needs no Bonferroni correction over the candidates. Its weak point is where it starts: at the
smallest counts a candidate passes only when (nearly) error-free, so a few confidently wrong
samples among the first ones (label noise, duplicated samples) end a plain sequence there. The
budget ``delta`` is therefore spread over a few starts, each a count fixed by the target,
``delta`` and the number of finite scores alone (never by the errors), with the fallback
procedure of Wiens ("A fixed sequence Bonferroni procedure for testing multiple endpoints",
Pharmaceutical Statistics 2003), which controls the family-wise error rate at ``delta`` for
any fixed order: a hypothesis is tested at its own weight plus the level of the previous one
if that was rejected (the level carries along an unbroken stretch and drops to 0 after a
non-rejection, until the next start). The starts:

- A, weight ``delta / 2``: the first candidate selecting at least
  ``ceil(log(delta / 2) / log(1 - r))`` samples, where an error-free selection passes;
- B, weight ``delta / 4``: the first candidate selecting at least ``n_B`` samples, the smallest
  count from which a selection erring at half the target rate passes (every ``n`` in
  ``[n_B, 2 n_B]`` has ``B(floor(n r / 2), n, delta / 4) <= r``);
- restarts at ``2 n_B``, ``4 n_B``, ... up to the number of finite scores, sharing
  ``delta / 4`` (B takes it when none fits).

(``r = 0.1``, ``delta = 0.05``, 5,000 samples: A at 36, B at 166, restarts at 332, 664, 1328,
2656.) On clean data the stretch from A is never broken and every test from the last start on
runs at the full ``delta``; where confident errors break it, the next start resumes at a
smaller level; where only the smallest counts are feasible, A finds them. On the shared
CIFAR-100 record it reaches about one point more coverage than SGR, and at least the coverage of
MAPIE 1.6's fixed-sequence Learn-then-Test, with violation rates at most ``delta``
(``benchmarks/RESULTS.md``). SGR, at ``delta / ceil(log2(m + 1))``, is the more conservative:
its realised violation rate is far below ``delta``.

Which to choose: ``"ltt"`` when coverage matters and the score orders errors roughly by
confidence (the usual case); ``"sgr"`` (the default, the paper's algorithm) when a margin below
``delta`` is wanted.

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
METHODS: tuple[str, ...] = ("sgr", "ltt")


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
        Upper confidence bound on the selective risk at the level of the test that accepted the
        threshold (SGR: ``delta / n_tests``); at most ``target_risk``.
    target_risk : float
        The requested bound on the selective risk.
    delta : float
        The allowed probability that the selective risk exceeds ``target_risk``.
    n_samples : int
        Calibration samples (all, including those with a non-finite score).
    n_selected : int
        Calibration samples selected.
    n_tests : int
        The correction divisor. SGR: the Bonferroni count ``ceil(log2(m + 1))``, every bound at
        ``delta / n_tests``. LTT: ``ceil(delta / level)`` for the level of the test that
        accepted the threshold (1 when the sequence ran unbroken to it at the full ``delta``);
        ``risk_bound`` is at that level.
    method : str
        ``"sgr"`` or ``"ltt"``.
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


def _start_count(target: float, level: float) -> int:
    """``n_0``: the smallest ``n`` such that every ``n'`` in ``[n, 2n]`` has ``B(floor(n' target / 2), n', level) <= target``.

    A function of the target and the level only (never of the errors). The floor makes the
    bound saw-toothed in ``n``; asking for a run of passing counts keeps the start off a tooth.
    """
    size = 256
    while True:
        n = np.arange(1, size + 1)
        passes = binomial_upper_bound(np.floor(n * target / 2.0), n, level) <= target
        # failures_upto[i]: number of failing counts among 1..i (failures_upto[0] = 0).
        failures_upto = np.concatenate([[0], np.cumsum(~passes)])
        first = n[: size // 2]  # candidates whose window [n, 2n] fits in the table
        ok = failures_upto[2 * first] - failures_upto[first - 1] == 0
        if ok.any():
            return int(first[np.argmax(ok)])
        size *= 4


def _infeasible(target: float, delta: float, n_total: int, detail: str) -> ValueError:
    return ValueError(
        f"The target risk {target:g} is infeasible at delta={delta:g} on {n_total} calibration samples: "
        f"{detail}. Use a larger 'target_risk' or 'delta', more calibration samples, or a better score."
    )


def _zero_error_count(target: float, level: float) -> int:
    """The smallest ``n`` with ``B(0, n, level) = 1 - level^(1/n) <= target``."""
    n = max(1, math.ceil(math.log(level) / math.log1p(-target)))
    while binomial_upper_bound(0, n, level) > target:  # float rounding of the closed form
        n += 1
    while n > 1 and binomial_upper_bound(0, n - 1, level) <= target:
        n -= 1
    return n


def _sgr(n_sel: np.ndarray, k_err: np.ndarray, target: float, delta: float, n_total: int) -> tuple[int, float, int]:
    """Selection with Guaranteed Risk: ``(index, bound, n_tests)`` of the chosen candidate.

    The binary search runs over the candidates that could pass at all: those selecting at
    least :func:`_zero_error_count` samples (a function of the counts only). Every probe halves
    the interval, so at most ``ceil(log2(m + 1))`` bounds are computed.
    """
    m = n_sel.size
    n_tests = max(1, math.ceil(math.log2(m + 1)))
    level = delta / n_tests
    need = _zero_error_count(target, level)
    first = int(np.searchsorted(n_sel, need))
    if first >= m:
        raise _infeasible(
            target, delta, n_total,
            f"even without errors a bound at most the target needs {need} selected samples at level "
            f"delta / {n_tests}; {int(n_sel[-1])} samples have a finite score",
        )
    bounds: dict[int, float] = {}
    best = -1
    lo, hi = first - 1, m  # the search interval is (lo, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        bounds[mid] = binomial_upper_bound(int(k_err[mid]), int(n_sel[mid]), level)
        if bounds[mid] <= target:
            best = lo = mid
        else:
            hi = mid
    if best < 0:
        closest = min(bounds, key=bounds.get)
        raise _infeasible(
            target, delta, n_total,
            f"the smallest upper bound found is {bounds[closest]:.4g} (at coverage {n_sel[closest] / n_total:.4g}, "
            f"empirical risk {k_err[closest] / n_sel[closest]:.4g})",
        )
    return best, float(bounds[best]), n_tests


def _first_failure(p_values_of, begin: int, end: int, level: float) -> int:
    """Index of the first candidate in ``[begin, end)`` whose p-value exceeds ``level`` (``end`` if none).

    p-values are computed in growing chunks, so a long sequence costs only the candidates
    actually tested.
    """
    position, chunk = begin, 256
    while position < end:
        stop = min(position + chunk, end)
        failed = np.flatnonzero(p_values_of(position, stop) > level)
        if failed.size:
            return position + int(failed[0])
        position, chunk = stop, chunk * 2
    return end


def _ltt_starts(n_sel: np.ndarray, target: float, delta: float) -> list[tuple[int, float]]:
    """The fallback procedure's starts: ``(candidate index, weight)``, weights summing to ``delta``.

    Counts only (never the errors): A, the first count at which an error-free selection passes
    at ``delta / 2`` (weight ``delta / 2``); B, the first count from which half the target's
    error rate passes at ``delta / 4`` (weight ``delta / 4``); and restarts at ``2 n_B``,
    ``4 n_B``, ... up to the number of finite scores, sharing ``delta / 4`` (B takes it when
    none fits).
    """
    n_finite = int(n_sel[-1])
    count_a = _zero_error_count(target, delta / 2)
    count_b = _start_count(target, delta / 4)
    restarts = []
    count = 2 * count_b
    while count <= n_finite:
        restarts.append(count)
        count *= 2
    weighted = [(count_a, delta / 2), (count_b, delta / 4 if restarts else delta / 2)]
    weighted += [(count, delta / 4 / len(restarts)) for count in restarts]
    return [(int(np.searchsorted(n_sel, count)), weight) for count, weight in weighted]


def _ltt(n_sel: np.ndarray, k_err: np.ndarray, target: float, delta: float, n_total: int) -> tuple[int, float, int]:
    """Learn-then-Test, fixed sequence from the most confident side, Wiens's fallback procedure.

    Returns ``(index, bound, n_tests)``: the rejected candidate with the largest coverage, its
    Clopper-Pearson bound at the level of the test that rejected it, and
    ``ceil(delta / that level)``.
    """
    m = n_sel.size
    weights: dict[int, float] = {}
    for index, weight in _ltt_starts(n_sel, target, delta):
        if index < m:
            weights[index] = weights.get(index, 0.0) + weight
    if not weights:
        need = _zero_error_count(target, delta / 2)
        raise _infeasible(
            target, delta, n_total,
            f"even without errors a bound at most the target needs {need} selected samples at level delta / 2; "
            f"{int(n_sel[-1])} samples have a finite score",
        )

    def p_values_of(begin: int, stop: int) -> np.ndarray:
        return stats.binom.cdf(k_err[begin:stop], n_sel[begin:stop], target)

    # Between two starts the level is constant: the start's weight plus the level carried over
    # from an unbroken stretch before it. After a non-rejection it is 0 until the next start.
    starts = sorted(weights)
    best, best_level, carried = -1, delta, 0.0
    for i, begin in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else m
        level = weights[begin] + carried
        stop = _first_failure(p_values_of, begin, end, level)
        if stop > begin:
            best, best_level = stop - 1, level
        carried = level if stop == end else 0.0
    if best < 0:
        first = starts[0]
        k, n = int(k_err[first]), int(n_sel[first])
        raise _infeasible(
            target, delta, n_total,
            f"the first test after every start fails (the first at coverage {n / n_total:.4g} with empirical risk "
            f"{k / n:.4g}, p-value {float(stats.binom.cdf(k, n, target)):.4g} > {weights[first]:.3g})",
        )
    bound = binomial_upper_bound(int(k_err[best]), int(n_sel[best]), min(best_level, 1.0 - 1e-12))
    return best, float(bound), math.ceil(delta / best_level - 1e-9)


def guaranteed_risk_threshold(
    scores: Any,
    errors: Any,
    target_risk: float,
    delta: float = 0.05,
    method: str = "sgr",
) -> RiskThreshold:
    """The largest-coverage threshold whose selective risk is at most ``target_risk`` w.p. ``>= 1 - delta``.

    Selection with Guaranteed Risk or Learn-then-Test with fixed-sequence testing (see the
    module docstring for both algorithms, their guarantees and when to choose which). A sample
    is selected when its score is below the threshold; a threshold never splits tied scores; a
    sample with a non-finite score is never selected (it counts in the coverage's denominator).

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
    method : {"sgr", "ltt"}, default "sgr"
        ``"sgr"``: Selection with Guaranteed Risk (binary search, Bonferroni over its tests).
        ``"ltt"``: Learn-then-Test with fixed-sequence testing from the most confident side
        (no monotonicity assumed, no correction over the candidates; more coverage).

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
    >>> ltt = guaranteed_risk_threshold(scores, errors, target_risk=0.1, delta=0.05, method="ltt")
    >>> bool(ltt.risk_bound <= 0.1), bool(ltt.coverage >= rt.coverage)
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

    search = _sgr if method == "sgr" else _ltt
    best, bound, n_tests = search(n_sel, k_err, target_risk, delta, n_total)
    threshold = np.nextafter(np.asarray(distinct[best], dtype=dtype), np.array(np.inf, dtype=dtype))
    return RiskThreshold(
        threshold=float(threshold),
        coverage=float(n_sel[best] / n_total),
        empirical_risk=float(k_err[best] / n_sel[best]),
        risk_bound=bound,
        target_risk=target_risk,
        delta=delta,
        n_samples=int(n_total),
        n_selected=int(n_sel[best]),
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
