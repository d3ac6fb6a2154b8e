"""Guaranteed-risk thresholds (SGR and Learn-then-Test), the split protocol on the score classes,
and the guarantee checked by simulation on the shared CIFAR-100 record (acceptance 2 of issue 5;
issue 11 item 6)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize, stats

from seapig_core import load_score
from seapig_core.metrics import prediction_errors
from seapig_core.risk import RiskThreshold, binomial_upper_bound, guaranteed_risk_threshold, split_calibration
from seapig_core.scores import EntropyScore, MarginScore, SoftmaxScore

N_SPLITS = 200


def _data(n=3000, seed=0):
    """Scores in [0, 1) whose error probability grows with the score."""
    rng = np.random.default_rng(seed)
    scores = rng.random(n)
    errors = (rng.random(n) < 0.4 * scores).astype(float)
    return scores, errors


def _labelled_logits(n=4000, k=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    logits = 2.0 * torch.randn(n, k, generator=g)
    logits[torch.arange(n), labels] += 4.0
    return logits, labels


# =========================================================================== binomial bound


@pytest.mark.parametrize(("k", "n"), [(0, 1), (0, 50), (3, 50), (49, 50), (120, 5000), (1, 2)])
@pytest.mark.parametrize("delta", [0.05, 0.001])
def test_binomial_upper_bound_solves_the_binomial_tail(k, n, delta):
    # Independent reference: root of P(Binomial(n, b) <= k) = delta by Brent's method.
    expected = optimize.brentq(lambda b: stats.binom.cdf(k, n, b) - delta, 1e-15, 1 - 1e-15, xtol=1e-14)
    assert binomial_upper_bound(k, n, delta) == pytest.approx(expected, abs=1e-10)


def test_binomial_upper_bound_edge_cases_and_arrays():
    assert binomial_upper_bound(5, 5, 0.05) == 1.0
    assert binomial_upper_bound(0, 0, 0.05) == 1.0
    assert binomial_upper_bound(0, 10, 0.05) == pytest.approx(1 - 0.05 ** (1 / 10))
    out = binomial_upper_bound(np.array([0, 2, 4]), np.array([4, 4, 4]), 0.1)
    assert out.shape == (3,) and out[-1] == 1.0 and np.all(np.diff(out) > 0)
    with pytest.raises(ValueError, match=r"must be integers with 0 <= n_errors <= n_trials\. Got 6 and 5 instead"):
        binomial_upper_bound(6, 5, 0.05)
    with pytest.raises(ValueError, match=r"The 'delta' parameter must be in \(0, 1\)\. Got 1\.0 instead"):
        binomial_upper_bound(1, 5, 1.0)


# =========================================================================== SGR


def _candidates(scores, errors):
    """Distinct finite scores ascending, with the count selected and the errors among them."""
    scores = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(scores)
    s, e = scores[finite], np.asarray(errors, dtype=np.float64)[finite]
    values = np.unique(s)
    n = np.array([np.count_nonzero(s <= v) for v in values])
    k = np.array([e[s <= v].sum() for v in values])
    return values, n, k


def reference_sgr(scores, errors, target, delta):
    """The documented SGR, written out: plain binary search over the candidates selecting at
    least the count at which an error-free selection passes. Returns the candidate index or None."""
    values, n, k = _candidates(scores, errors)
    m = values.size
    level = delta / math.ceil(math.log2(m + 1))
    need = next(c for c in range(1, 10**7) if 1 - level ** (1 / c) <= target)
    lo, hi = int(np.searchsorted(n, need)) - 1, m
    first, best = lo + 1, None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if binomial_upper_bound(int(k[mid]), int(n[mid]), level) <= target:
            best = lo = mid
        else:
            hi = mid
    return None if best is None or best < first else best


def reference_ltt(scores, errors, target, delta):
    """The documented LTT, written out as Wiens's fallback procedure with the documented weights
    at the documented starts (counts found by scanning their definitions). Returns
    (index, level of the accepting test) or None."""
    values, n, k = _candidates(scores, errors)
    count_a = next(c for c in range(1, 10**7) if 1 - (delta / 2) ** (1 / c) <= target)
    counts = np.arange(1, 40001)
    passes = binomial_upper_bound(np.floor(counts * target / 2), counts, delta / 4) <= target
    count_b = next(int(c) for c in counts[:20000] if passes[c - 1 : 2 * c].all())
    restarts = [count_b * 2**j for j in range(1, 40) if count_b * 2**j <= n[-1]]
    starts = [(count_a, delta / 2), (count_b, delta / 4 if restarts else delta / 2)]
    starts += [(c, delta / 4 / len(restarts)) for c in restarts]
    weights = np.zeros(values.size)
    for count, weight in starts:
        j = int(np.searchsorted(n, count))
        if j < values.size:
            weights[j] += weight
    level, best = 0.0, None
    for j in range(values.size):
        level += weights[j]
        if level > 0 and stats.binom.cdf(k[j], n[j], target) <= level:
            best = (j, level)
        else:
            level = 0.0
    return best


def _check_invariants(rt, scores, errors, target, delta, method="sgr"):
    scores = np.asarray(scores, dtype=np.float64)
    selected = scores < rt.threshold
    finite = np.isfinite(scores)
    assert not np.any(selected & ~finite)
    # The threshold never splits tied scores.
    assert np.all(scores[finite & ~selected] > scores[selected].max())
    k, n = int(errors[selected].sum()), int(selected.sum())
    assert (rt.n_selected, rt.n_samples) == (n, scores.size)
    assert rt.coverage == pytest.approx(n / scores.size)
    assert rt.empirical_risk == pytest.approx(k / n)
    m = np.unique(scores[finite]).size
    assert rt.empirical_risk <= rt.risk_bound <= target
    assert (rt.target_risk, rt.delta, rt.method) == (target, delta, method)
    # The result is the documented algorithm's, written out independently.
    values = np.unique(scores[finite])
    chosen = int(np.searchsorted(values, scores[selected].max()))
    if method == "sgr":
        assert rt.n_tests == math.ceil(math.log2(m + 1))
        assert rt.risk_bound == pytest.approx(binomial_upper_bound(k, n, delta / rt.n_tests), abs=1e-12)
        assert reference_sgr(scores, errors, target, delta) == chosen
    else:
        index, level = reference_ltt(scores, errors, target, delta)
        assert index == chosen
        assert rt.n_tests == math.ceil(delta / level - 1e-9)
        assert rt.risk_bound == pytest.approx(binomial_upper_bound(k, n, level), abs=1e-12)


@pytest.mark.parametrize("method", ["sgr", "ltt"])
@pytest.mark.parametrize(("target", "delta"), [(0.05, 0.05), (0.1, 0.05), (0.2, 0.01), (0.3, 0.5)])
def test_invariants(target, delta, method):
    scores, errors = _data()
    rt = guaranteed_risk_threshold(scores, errors, target, delta, method=method)
    _check_invariants(rt, scores, errors, target, delta, method)


@settings(max_examples=80, deadline=None)
@given(
    st.integers(1, 400),
    st.integers(1, 40),
    st.floats(0.02, 0.6),
    st.floats(0.01, 0.5),
    st.integers(0, 2**31 - 1),
)
def test_properties_and_the_documented_algorithms(n, n_levels, target, delta, seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, n_levels, n).astype(float)  # many ties
    scores[rng.random(n) < 0.05] = np.nan
    errors = (rng.random(n) < 0.5 * scores / n_levels).astype(float)
    if not np.isfinite(scores).any():
        return
    for method, reference in (("sgr", reference_sgr), ("ltt", reference_ltt)):
        try:
            rt = guaranteed_risk_threshold(scores, errors, target, delta, method=method)
        except ValueError as exc:
            assert "infeasible" in str(exc)
            assert reference(scores, errors, target, delta) is None
            continue
        _check_invariants(rt, scores, errors, target, delta, method)


def test_sgr_error_free_data_selects_everything_when_the_bound_allows():
    scores = np.linspace(0, 1, 200)
    errors = np.zeros(200)
    rt = guaranteed_risk_threshold(scores, errors, target_risk=0.1, delta=0.05)
    assert rt.coverage == 1.0 and rt.empirical_risk == 0.0
    assert rt.risk_bound == pytest.approx(1 - (0.05 / rt.n_tests) ** (1 / 200))


def test_sgr_non_finite_scores_are_never_selected_and_count_in_coverage():
    scores = np.concatenate([np.linspace(0, 1, 200), [np.nan, np.inf, np.nan]])
    errors = np.concatenate([np.zeros(200), [1.0, 1.0, np.nan]])
    rt = guaranteed_risk_threshold(scores, errors, target_risk=0.1)
    assert rt.n_selected == 200 and rt.n_samples == 203 and rt.coverage == pytest.approx(200 / 203)


def test_sgr_float32_threshold_selects_exactly_in_torch():
    scores32 = torch.from_numpy(_data()[0].astype(np.float32))
    errors = _data()[1]
    rt = guaranteed_risk_threshold(scores32, errors, 0.1)
    assert np.float32(rt.threshold) == rt.threshold
    assert int((scores32 < rt.threshold).sum()) == rt.n_selected  # torch compares in float32


def test_sgr_infeasible():
    scores, errors = _data(n=40)
    with pytest.raises(ValueError, match=r"The target risk 0\.01 is infeasible at delta=0\.05 on 40 calibration samples"):
        guaranteed_risk_threshold(scores, errors, 0.01)
    with pytest.raises(ValueError, match=r"infeasible"):
        guaranteed_risk_threshold(np.arange(100.0), np.ones(100), 0.5)


def _plain_binary_search(scores, errors, target, delta):
    """SGR as it was before the fix: binary search over every candidate."""
    values, n, k = _candidates(scores, errors)
    level = delta / math.ceil(math.log2(values.size + 1))
    lo, hi = -1, values.size
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if binomial_upper_bound(int(k[mid]), int(n[mid]), level) <= target:
            lo = mid
        else:
            hi = mid
    return None if lo < 0 else lo


def test_sgr_no_longer_steps_past_a_feasible_window():
    """Issue 11.6: the bound is wide at small coverage and high at large coverage. Here the 103
    most confident samples are right and every other one wrong: thresholds selecting 99 to 103
    samples are feasible at target 0.05, but the plain binary search probed 125 (too many errors),
    then 62 and fewer (too few samples to pass even without errors) and reported infeasible. The
    search now skips the counts that cannot pass and finds the window's right end."""
    scores = np.arange(252.0)
    errors = (scores >= 103).astype(float)
    assert _plain_binary_search(scores, errors, 0.05, 0.05) is None
    values, n, k = _candidates(scores, errors)
    level = 0.05 / math.ceil(math.log2(253))
    feasible = np.flatnonzero(binomial_upper_bound(k, n, level) <= 0.05)
    assert n[feasible].tolist() == [99, 100, 101, 102, 103]
    rt = guaranteed_risk_threshold(scores, errors, 0.05, 0.05)
    assert rt.n_selected == 103 and rt.risk_bound <= 0.05
    _check_invariants(rt, scores, errors, 0.05, 0.05)
    ltt = guaranteed_risk_threshold(scores, errors, 0.05, 0.05, method="ltt")
    assert ltt.n_selected >= rt.n_selected


def test_ltt_restarts_after_confident_errors():
    """Confidently wrong samples among the first ones break the sequence from the first start;
    the later starts resume it at their (smaller) levels, where a plain fixed sequence from the
    first start would stop at a tiny coverage."""
    rng = np.random.default_rng(3)
    n = 4000
    scores = np.arange(float(n))
    errors = (rng.random(n) < np.where(scores < 200, 0.0, np.where(scores < 2500, 0.02, 0.5))).astype(float)
    errors[[40, 41, 42]] = 1.0  # three confident mistakes, e.g. label noise
    values, n_sel, k = _candidates(scores, errors)
    half = 0.025
    count_a = next(c for c in range(1, 1000) if 1 - half ** (1 / c) <= 0.1)
    p = stats.binom.cdf(k, n_sel, 0.1)
    start = int(np.searchsorted(n_sel, count_a))
    plain_stop = start + int(np.argmax(p[start:] > 0.05))  # plain FST at delta from the first start
    assert plain_stop < 60
    rt = guaranteed_risk_threshold(scores, errors, 0.1, 0.05, method="ltt")
    assert rt.n_tests == 2 and rt.n_selected > 2000  # accepted at delta / 2 (B and the restarts)
    _check_invariants(rt, scores, errors, 0.1, 0.05, "ltt")
    # On the same data without the confident mistakes, the whole sequence runs at delta.
    errors[[40, 41, 42]] = 0.0
    clean = guaranteed_risk_threshold(scores, errors, 0.1, 0.05, method="ltt")
    assert clean.n_tests == 1 and clean.n_selected >= rt.n_selected
    _check_invariants(clean, scores, errors, 0.1, 0.05, "ltt")


def test_risk_threshold_to_dict_is_json():
    rt = guaranteed_risk_threshold(*_data(), 0.1)
    assert RiskThreshold(**json.loads(json.dumps(rt.to_dict()))) == rt


def test_sgr_bad_input():
    scores, errors = _data(n=50)
    with pytest.raises(ValueError, match=r"The 'target_risk' parameter must be in \(0, 1\)\. Got 0\.0 instead"):
        guaranteed_risk_threshold(scores, errors, 0.0)
    with pytest.raises(ValueError, match=r"The 'target_risk' parameter must be in \(0, 1\)\. Got nan instead"):
        guaranteed_risk_threshold(scores, errors, float("nan"))
    with pytest.raises(TypeError, match=r"The 'target_risk' parameter must be a float in \(0, 1\)\. Got str instead"):
        guaranteed_risk_threshold(scores, errors, "5%")
    with pytest.raises(ValueError, match=r"The 'delta' parameter must be in \(0, 1\)\. Got 1\.5 instead"):
        guaranteed_risk_threshold(scores, errors, 0.1, delta=1.5)
    with pytest.raises(TypeError, match=r"The 'delta' parameter must be a float in \(0, 1\)\. Got bool instead"):
        guaranteed_risk_threshold(scores, errors, 0.1, delta=True)
    with pytest.raises(ValueError, match=r"The 'method' parameter must be one of \['sgr', 'ltt'\]\. Got 'lt' instead"):
        guaranteed_risk_threshold(scores, errors, 0.1, method="lt")
    with pytest.raises(ValueError, match=r"The 'errors' parameter must hold 0/1 losses for the binomial bound\. Got the value 0\.5 instead"):
        guaranteed_risk_threshold(scores, np.full(50, 0.5), 0.1)
    with pytest.raises(ValueError, match=r"The 'errors' parameter must have one loss per score \(50\)\. Got shape \(49,\)"):
        guaranteed_risk_threshold(scores, errors[:-1], 0.1)
    with pytest.raises(TypeError, match=r"The 'scores' parameter must be a torch.Tensor or numpy.ndarray\. Got NoneType"):
        guaranteed_risk_threshold(None, errors, 0.1)
    with pytest.raises(ValueError, match=r"The 'scores' parameter must contain at least one finite score"):
        guaranteed_risk_threshold(np.full(50, np.nan), errors, 0.1)


# =========================================================================== acceptance 2: simulation


def _splits(n, n_splits, seed):
    """(n_splits, n) random permutations, vectorised."""
    return np.argsort(np.random.default_rng(seed).random((n_splits, n)), axis=1)


def _test_risk(test_scores, test_errors, thresholds):
    selected = test_scores < thresholds[:, None]
    n_sel = selected.sum(axis=1)
    return np.where(n_sel > 0, (selected * test_errors).sum(axis=1) / np.maximum(n_sel, 1), 0.0), n_sel


def _hindsight_coverage(test_scores, test_errors, target):
    """Per row: the largest coverage whose selective risk is <= target (tie groups never split)."""
    order = np.argsort(test_scores, axis=1, kind="stable")
    s = np.take_along_axis(test_scores, order, axis=1)
    cum = np.cumsum(np.take_along_axis(test_errors, order, axis=1), axis=1)
    count = np.arange(1, s.shape[1] + 1)
    group_end = np.concatenate([s[:, 1:] != s[:, :-1], np.ones((s.shape[0], 1), bool)], axis=1)
    ok = group_end & (cum / count <= target)
    return np.where(ok.any(axis=1), (ok * count).max(axis=1), 0) / s.shape[1]


def _simulate(scores, errors, target, delta, choose):
    perms = _splits(scores.size, N_SPLITS, seed=2024)
    half = scores.size // 2
    cal, test = perms[:, :half], perms[:, half:]
    thresholds = np.array([choose(scores[c], errors[c]) for c in cal])
    risk, n_sel = _test_risk(scores[test], errors[test], thresholds)
    coverage = n_sel / test.shape[1]
    hindsight = _hindsight_coverage(scores[test], errors[test], target)
    return risk, coverage, hindsight


@pytest.mark.parametrize("target", [0.05, 0.10])
def test_guarantee_holds_on_cifar100_splits(cifar100, target):
    """Over 200 random 50/50 calibration/test splits, the test selective risk exceeds the target in
    at most delta of the splits, plus binomial slack: if a violation had probability exactly delta,
    the count would exceed binom.ppf(0.999, 200, delta) with probability < 0.1%."""
    logits, labels = cifar100
    delta = 0.05
    scores = SoftmaxScore().fit(logits).scores.numpy()
    errors = prediction_errors(logits, labels)

    risk, coverage, hindsight = _simulate(
        scores, errors, target, delta, lambda s, e: guaranteed_risk_threshold(s, e, target, delta).threshold
    )
    limit = int(stats.binom.ppf(0.999, N_SPLITS, delta))
    violations = int(np.sum(risk > target))
    print(
        f"\ntarget={target} delta={delta}: violations {violations}/{N_SPLITS} (limit {limit}), "
        f"mean test coverage {coverage.mean():.3f} vs hindsight oracle {hindsight.mean():.3f}"
    )
    assert limit == 21  # 200 * 0.05 = 10 expected; 21 or fewer with probability >= 99.9%
    assert violations <= limit
    # Useful, not vacuous: most of the hindsight coverage is reached, and never much more.
    assert 0.8 * hindsight.mean() < coverage.mean() < hindsight.mean()


@pytest.mark.parametrize("target", [0.1, 0.2])
def test_guarantee_holds_with_the_record_as_the_population(cifar100, target):
    """Acceptance (11.6): the shared CIFAR-100 record is the population. Calibration sets of 5,000
    are drawn from it (with replacement: i.i.d. from the population), the threshold is chosen on
    each, and its true selective risk is computed on the whole record. For both methods the
    violation count over 200 draws stays within the binomial limit of a violation probability
    delta; LTT reaches more coverage than SGR."""
    logits, labels = cifar100
    delta = 0.05
    scores = SoftmaxScore().fit(logits).scores.numpy()
    errors = prediction_errors(logits, labels)
    rng = np.random.default_rng(11)
    draws = rng.integers(0, scores.size, (N_SPLITS, 5000))
    limit = int(stats.binom.ppf(0.999, N_SPLITS, delta))
    coverage = {}
    for method in ("sgr", "ltt"):
        true_risk, true_coverage = [], []
        for idx in draws:
            rt = guaranteed_risk_threshold(scores[idx], errors[idx], target, delta, method=method)
            selected = scores < rt.threshold
            true_risk.append(errors[selected].mean())
            true_coverage.append(selected.mean())
        violations = int(np.sum(np.array(true_risk) > target))
        coverage[method] = float(np.mean(true_coverage))
        print(f"\n{method} target={target}: violations {violations}/{N_SPLITS} (limit {limit}), coverage {coverage[method]:.4f}")
        assert violations <= limit
    assert coverage["ltt"] > coverage["sgr"] + 0.005


def test_simulation_detects_a_threshold_without_guarantee(cifar100):
    """The same check fails the naive threshold (largest coverage with calibration risk <= target):
    it violates in about half of the splits, so the check above has power."""
    from seapig_core.metrics import risk_coverage

    logits, labels = cifar100
    target = 0.10
    scores = SoftmaxScore().fit(logits).scores.numpy()
    errors = prediction_errors(logits, labels)

    def naive(s, e):
        rc = risk_coverage(s, e)
        return rc.thresholds[np.flatnonzero(rc.risk <= target)[-1]]

    risk, _, _ = _simulate(scores, errors, target, 0.05, naive)
    assert np.sum(risk > target) > stats.binom.ppf(0.999, N_SPLITS, 0.05)


# =========================================================================== score classes


def test_set_risk_threshold_on_the_calibration_set():
    logits, labels = _labelled_logits()
    score = SoftmaxScore().fit(logits, labels)
    assert score.risk_threshold is None
    out = score.set_risk_threshold(0.1, delta=0.05)
    assert out is score
    rt = score.risk_threshold
    expected = guaranteed_risk_threshold(score.scores, prediction_errors(logits, labels), 0.1, 0.05)
    assert rt == expected
    assert score.threshold == rt.threshold and score.get_threshold() == rt.threshold and score.quantile is None
    assert score.select(logits)["selected"].float().mean().item() == pytest.approx(rt.coverage)


def test_set_risk_threshold_split_protocol_uses_current_temperature():
    logits, labels = _labelled_logits()
    part_a, part_b = split_calibration(len(labels), fraction=0.5, seed=3)
    score = EntropyScore().fit(logits[part_a], labels[part_a])
    assert score.T != 1.0
    score.set_risk_threshold(0.1, X=logits[part_b], Y=labels[part_b].numpy())
    scores_b = score.score(logits[part_b])
    errors_b = prediction_errors(logits[part_b], labels[part_b], temperature=score.T)
    assert score.risk_threshold == guaranteed_risk_threshold(scores_b, errors_b, 0.1)
    assert score.risk_threshold.n_samples == len(part_b)


def test_set_risk_threshold_multilabel_and_binary():
    rng = np.random.default_rng(0)
    z = 4 * rng.standard_normal((3000, 3))
    y = (rng.random((3000, 3)) < 1 / (1 + np.exp(-z))).astype(float)
    score = MarginScore(task="multilabel").fit(z, y).set_risk_threshold(0.2)
    errors = prediction_errors(z, y, task="multilabel", temperature=score.T)  # any label wrong
    assert score.risk_threshold == guaranteed_risk_threshold(score.scores, errors, 0.2)
    a = z[:, 0]
    binary = SoftmaxScore(task="binary").fit(a, y[:, 0]).set_risk_threshold(0.05)
    assert binary.risk_threshold.risk_bound <= 0.05


def test_fit_and_set_threshold_reset_the_risk_threshold():
    logits, labels = _labelled_logits(n=2000)
    score = SoftmaxScore().fit(logits, labels).set_risk_threshold(0.15)
    score.set_threshold(0.5)
    assert score.risk_threshold is None and score.quantile == 0.5
    score.set_risk_threshold(0.15)
    score.fit(logits, labels)
    assert score.risk_threshold is None and score.threshold is None


def test_set_risk_threshold_forwards_the_method(tmp_path):
    """Issue 11.6, library side: LogitScore.set_risk_threshold(method="ltt") reaches the new
    method through guaranteed_risk_threshold, and the result survives save and load."""
    logits, labels = _labelled_logits(n=3000)
    part_a, part_b = split_calibration(len(labels), fraction=0.5, seed=1)
    score = SoftmaxScore().fit(logits[part_a], labels[part_a])
    score.set_risk_threshold(0.1, X=logits[part_b], Y=labels[part_b], method="ltt")
    errors_b = prediction_errors(logits[part_b], labels[part_b], temperature=score.T)
    expected = guaranteed_risk_threshold(score.score(logits[part_b]), errors_b, 0.1, method="ltt")
    assert score.risk_threshold == expected and score.risk_threshold.method == "ltt"
    assert score.threshold == expected.threshold
    loaded = load_score(score.save(tmp_path / "ltt.arrow"))
    assert loaded.risk_threshold == score.risk_threshold
    with pytest.raises(ValueError, match=r"The 'method' parameter must be one of \['sgr', 'ltt'\]"):
        score.set_risk_threshold(0.1, method="holm")


def test_set_threshold_with_X_scores_at_the_current_temperature():
    logits, labels = _labelled_logits(n=2000)
    score = SoftmaxScore().fit(logits[:1000], labels[:1000])
    score.set_threshold(0.8, X=logits[1000:])
    expected = np.quantile(score.score(logits[1000:]).double().numpy(), 0.8)
    assert score.threshold == pytest.approx(expected) and score.quantile == 0.8
    # Without X: the seeds' behaviour, the quantile of the calibration scores.
    assert score.set_threshold(0.8).threshold == pytest.approx(np.quantile(score.scores.double().numpy(), 0.8))
    # A score with a given temperature needs no fit to take a threshold from X.
    fixed = SoftmaxScore(temperature=2.0).set_threshold(0.5, X=logits)
    assert fixed.threshold == pytest.approx(np.quantile(fixed.score(logits).double().numpy(), 0.5))


def test_set_threshold_with_bad_X():
    logits, labels = _labelled_logits(n=200)
    score = SoftmaxScore().fit(logits, labels)
    with pytest.raises(ValueError, match=r"The 'X' parameter must have 10 logit\(s\) per sample, as the fitted score"):
        score.set_threshold(0.5, X=logits[:, :5])
    bad = logits.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"The 'X' parameter must contain only finite values"):
        score.set_threshold(0.5, X=bad)
    with pytest.raises(ValueError, match=r"The 'q' parameter must be in \(0, 1\)\. Got 1\.5 instead"):
        score.set_threshold(1.5, X=logits)


def test_set_risk_threshold_bad_input():
    logits, labels = _labelled_logits(n=500)
    fitted = SoftmaxScore().fit(logits, labels)
    with pytest.raises(ValueError, match=r"The 'target_risk' parameter must be in \(0, 1\)\. Got 1\.5 instead"):
        fitted.set_risk_threshold(1.5)
    with pytest.raises(TypeError, match=r"The 'target_risk' parameter must be a float in \(0, 1\)\. Got NoneType instead"):
        fitted.set_risk_threshold(None)
    with pytest.raises(ValueError, match=r"The 'delta' parameter must be in \(0, 1\)\. Got 0\.0 instead"):
        fitted.set_risk_threshold(0.1, delta=0.0)
    with pytest.raises(ValueError, match=r"needs both logits 'X' and labels 'Y', or neither\. Got 'X' without 'Y' instead"):
        fitted.set_risk_threshold(0.1, X=logits)
    with pytest.raises(ValueError, match=r"Got 'Y' without 'X' instead"):
        fitted.set_risk_threshold(0.1, Y=labels)
    with pytest.raises(ValueError, match=r"needs labelled logits: call fit\(X, Y\) first"):
        SoftmaxScore().set_risk_threshold(0.1)
    with pytest.raises(ValueError, match=r"needs labels: the calibration set was fitted without 'Y'"):
        SoftmaxScore().fit(logits).set_risk_threshold(0.1)
    with pytest.raises(ValueError, match=r"The 'Y' parameter must have one entry per sample \(500\)\. Got shape \(499,\)"):
        fitted.set_risk_threshold(0.1, X=logits, Y=labels[:-1])
    with pytest.raises(ValueError, match=r"The 'X' parameter must have 10 logit\(s\) per sample"):
        fitted.set_risk_threshold(0.1, X=logits[:, :3], Y=labels % 3)
    with pytest.raises(ValueError, match=r"The target risk 0\.001 is infeasible"):
        fitted.set_risk_threshold(0.001)
    assert fitted.risk_threshold is None and fitted.threshold is None  # failures leave no state


def test_risk_threshold_survives_save_and_load(tmp_path):
    logits, labels = _labelled_logits(n=1000)
    score = SoftmaxScore().fit(logits, labels).set_risk_threshold(0.15)
    loaded = load_score(score.save(tmp_path / "s.arrow"))
    assert loaded.risk_threshold == score.risk_threshold and loaded.threshold == score.threshold
    # Reloaded with logits and labels, the threshold can be recomputed identically.
    assert loaded.set_risk_threshold(0.15).risk_threshold == score.risk_threshold
    plain = load_score(SoftmaxScore().fit(logits).save(tmp_path / "plain.arrow"))
    assert plain.risk_threshold is None


def test_split_protocol_on_cifar100(cifar100):
    """Temperature on one labelled split, guaranteed threshold on another, checked on the rest."""
    logits, labels = cifar100
    first, rest = split_calibration(len(labels), fraction=0.25, seed=7)
    second, test = rest[: len(rest) // 3], rest[len(rest) // 3 :]
    score = SoftmaxScore().fit(logits[first], labels[first])
    score.set_risk_threshold(0.1, delta=0.05, X=logits[second], Y=labels[second])
    rt = score.risk_threshold
    selected = score.select(logits[test])["selected"].numpy()
    test_errors = prediction_errors(logits[test], labels[test], temperature=score.T)
    assert 1.5 < score.T < 2.5
    assert test_errors[selected].mean() <= 0.1
    assert abs(selected.mean() - rt.coverage) < 0.05


# =========================================================================== split_calibration


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 500), st.floats(0.01, 0.99), st.integers(0, 1000))
def test_split_calibration_partitions(n, fraction, seed):
    first, second = split_calibration(n, fraction, seed)
    assert first.size == min(max(round(fraction * n), 1), n - 1)
    np.testing.assert_array_equal(np.sort(np.concatenate([first, second])), np.arange(n))
    assert np.all(np.diff(first) > 0) and np.all(np.diff(second) > 0)
    again = split_calibration(n, fraction, seed)
    np.testing.assert_array_equal(first, again[0])


def test_split_calibration_bad_input():
    with pytest.raises(ValueError, match=r"The 'n' parameter must be an integer >= 2\. Got 1 instead"):
        split_calibration(1)
    with pytest.raises(TypeError, match=r"The 'n' parameter must be an integer >= 2\. Got float instead"):
        split_calibration(10.0)
    with pytest.raises(ValueError, match=r"The 'fraction' parameter must be in \(0, 1\)\. Got 1\.0 instead"):
        split_calibration(10, 1.0)
    with pytest.raises(TypeError, match=r"The 'seed' parameter must be an integer or None\. Got str instead"):
        split_calibration(10, 0.5, seed="a")


def test_docstring_examples_run():
    import doctest

    import seapig_core.metrics
    import seapig_core.risk
    from seapig_core.scores.logits import LogitScore

    for module in (seapig_core.metrics, seapig_core.risk):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0 and result.attempted > 0, module.__name__
    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(LogitScore, "LogitScore", globs={}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0
