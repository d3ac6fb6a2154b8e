"""seapig_core.metrics against independent references: direct NumPy/SciPy loops, scikit-learn,
torchmetrics (ECE/MCE on the shared CIFAR-100 record) and brute force over tie orders."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure
from scipy.special import expit, log_softmax, softmax
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

from seapig_core import metrics as M
from seapig_core.layout import canonicalize, check_labels
from seapig_core.plotting import plot_reliability_diagram, plot_risk_coverage
from seapig_core.risk import guaranteed_risk_threshold
from seapig_core.temperature import fit_temperature

RNG = np.random.default_rng(1234)


def _multiclass(n=300, k=5, scale=2.0, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    z = scale * rng.standard_normal((n, k))
    z[np.arange(n), y] += 1.5
    return z, y


def _multilabel(n=300, c=4, seed=0):
    rng = np.random.default_rng(seed)
    z = 2.5 * rng.standard_normal((n, c))
    y = (rng.random((n, c)) < expit(z / 1.7)).astype(np.float64)
    return z, y


# =========================================================================== references


def ref_bins(conf, correct, n_bins, binning):
    """ECE and MCE by an explicit loop over bins (lo, hi], first bin closed on the left."""
    conf, correct = np.asarray(conf, float), np.asarray(correct, float)
    if binning == "width":
        edges = [i / n_bins for i in range(n_bins + 1)]
    else:
        s = sorted(conf)
        edges = [s[0]] + [s[min(max(int(round((b + 1) * len(s) / n_bins)) - 1, 0), len(s) - 1)] for b in range(n_bins)]
        edges[-1] = s[-1]
    ece, mce = 0.0, 0.0
    for b in range(n_bins):
        lo, hi = edges[b], edges[b + 1]
        mask = (conf > lo) & (conf <= hi) if b > 0 else (conf >= -1.0) & (conf <= hi)
        if b == n_bins - 1:
            mask |= conf > hi  # nothing should be above the last edge
        if mask.sum() == 0:
            continue
        gap = abs(correct[mask].mean() - conf[mask].mean())
        ece += mask.sum() / len(conf) * gap
        mce = max(mce, gap)
    return ece, mce


def ref_aurc_no_ties(scores, losses):
    """Geifman et al. (2019): mean over i of the risk of the i most confident samples."""
    order = np.argsort(scores)
    total, acc = 0.0, 0.0
    for i, idx in enumerate(order, start=1):
        acc += losses[idx]
        total += acc / i
    return total / len(scores)


def brute_force_tie_average(scores, losses):
    """Average, over every order of the tied scores, of the sample-wise AURC and trapezoid AUGRC."""
    scores, losses = np.asarray(scores, float), np.asarray(losses, float)
    n = len(scores)
    groups = [np.flatnonzero(scores == v) for v in np.unique(scores)]
    aurcs, augrcs = [], []
    for perms in itertools.product(*(itertools.permutations(g) for g in groups)):
        order = np.concatenate(perms)
        cum = np.cumsum(losses[order])
        aurcs.append(np.mean(cum / np.arange(1, n + 1)))
        g = np.concatenate([[0.0], cum]) / n
        augrcs.append(np.sum((g[:-1] + g[1:]) / 2) / n)
    return float(np.mean(aurcs)), float(np.mean(augrcs))


# =========================================================================== NLL


def test_nll_multiclass_matches_sklearn_log_loss():
    z, y = _multiclass()
    for T in (1.0, 0.7, 2.5):
        expected = log_loss(y, softmax(z / T, axis=1), labels=range(5))
        assert M.negative_log_likelihood(z, y, temperature=T) == pytest.approx(expected, rel=1e-10)


def test_nll_on_cifar100_matches_direct_numpy(cifar100):
    logits, labels = cifar100
    z = logits.astype(np.float64)
    expected = -np.mean(log_softmax(z / 1.8, axis=1)[np.arange(len(labels)), labels])
    assert M.negative_log_likelihood(logits, labels, temperature=1.8) == pytest.approx(expected, rel=1e-9)


def test_nll_binary_one_and_two_logits_agree_with_bce():
    rng = np.random.default_rng(3)
    a = 3 * rng.standard_normal(200)
    y = (rng.random(200) < expit(a)).astype(int)
    p = expit(a / 1.3)
    expected = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert M.negative_log_likelihood(a, y, task="binary", temperature=1.3) == pytest.approx(expected, rel=1e-10)
    two = np.stack([np.zeros_like(a), a], axis=1)
    assert M.negative_log_likelihood(two, y, task="binary", temperature=1.3) == pytest.approx(expected, rel=1e-10)


def test_nll_multilabel_sums_labels():
    z, y = _multilabel()
    p = expit(z / 0.9)
    expected = -np.mean(np.sum(y * np.log(p) + (1 - y) * np.log(1 - p), axis=1))
    assert M.negative_log_likelihood(z, y, task="multilabel", temperature=0.9) == pytest.approx(expected, rel=1e-10)


def test_nll_per_member_is_that_of_the_mean_distribution():
    rng = np.random.default_rng(5)
    z = 2 * rng.standard_normal((100, 4, 3))
    y = rng.integers(0, 4, 100)
    p = softmax(z / 1.5, axis=1).mean(axis=2)
    expected = -np.mean(np.log(p[np.arange(100), y]))
    assert M.negative_log_likelihood(z, y, per_member=True, temperature=1.5) == pytest.approx(expected, rel=1e-10)
    # bernoulli members
    zb = 2 * rng.standard_normal((100, 3, 2))
    yb = (rng.random((100, 3)) < 0.5).astype(float)
    pb = expit(zb).mean(axis=2)
    expected_b = -np.mean(np.sum(yb * np.log(pb) + (1 - yb) * np.log(1 - pb), axis=1))
    assert M.negative_log_likelihood(zb, yb, task="multilabel", per_member=True) == pytest.approx(expected_b, rel=1e-10)
    single = zb[:, 0, :]
    ps = expit(single).mean(axis=1)
    expected_s = -np.mean(yb[:, 0] * np.log(ps) + (1 - yb[:, 0]) * np.log(1 - ps))
    assert M.negative_log_likelihood(single, yb[:, 0], task="binary", per_member=True) == pytest.approx(expected_s, rel=1e-10)


def test_nll_is_minimised_at_the_fitted_temperature(cifar100):
    logits, labels = cifar100
    canon = canonicalize(logits, "multiclass")
    T = fit_temperature(canon, check_labels(labels, canon)).temperature
    at = M.negative_log_likelihood(logits, labels, temperature=T)
    assert at <= M.negative_log_likelihood(logits, labels, temperature=T * 1.02)
    assert at <= M.negative_log_likelihood(logits, labels, temperature=T / 1.02)
    assert at < M.negative_log_likelihood(logits, labels)


# =========================================================================== Brier


def test_brier_multiclass_direct():
    z, y = _multiclass()
    p = softmax(z / 1.4, axis=1)
    onehot = np.eye(5)[y]
    expected = np.mean(np.sum((p - onehot) ** 2, axis=1))
    assert M.brier_score(z, y, temperature=1.4) == pytest.approx(expected, rel=1e-12)


def test_brier_binary_matches_sklearn_for_both_layouts():
    rng = np.random.default_rng(9)
    a = 2 * rng.standard_normal(150)
    y = (rng.random(150) < expit(a)).astype(int)
    expected = brier_score_loss(y, expit(a / 0.8))
    assert M.brier_score(a, y, task="binary", temperature=0.8) == pytest.approx(expected, rel=1e-12)
    two = np.stack([np.full_like(a, 0.3), a + 0.3], axis=1)
    assert M.brier_score(two, y, task="binary", temperature=0.8) == pytest.approx(expected, rel=1e-12)


def test_brier_multilabel_per_label_and_average():
    z, y = _multilabel()
    per_label = np.array([brier_score_loss(y[:, c], expit(z[:, c])) for c in range(4)])
    np.testing.assert_allclose(M.brier_score(z, y, task="multilabel", average=False), per_label, rtol=1e-12)
    assert M.brier_score(z, y, task="multilabel") == pytest.approx(per_label.mean(), rel=1e-12)


def test_brier_per_member_uses_mean_probabilities():
    rng = np.random.default_rng(2)
    z = rng.standard_normal((50, 3, 4))
    y = rng.integers(0, 3, 50)
    p = softmax(z, axis=1).mean(axis=2)
    expected = np.mean(np.sum((p - np.eye(3)[y]) ** 2, axis=1))
    assert M.brier_score(z, y, per_member=True) == pytest.approx(expected, rel=1e-12)


# =========================================================================== ECE / MCE


@pytest.mark.parametrize("binning", ["width", "mass"])
@pytest.mark.parametrize("n_bins", [1, 7, 15])
def test_ece_mce_multiclass_match_loop_reference(binning, n_bins):
    z, y = _multiclass(n=500, k=6, seed=n_bins)
    p = softmax(z / 1.2, axis=1)
    conf, correct = p.max(axis=1), (p.argmax(axis=1) == y)
    ece, mce = ref_bins(conf, correct, n_bins, binning)
    kwargs = dict(temperature=1.2, n_bins=n_bins, binning=binning)
    assert M.expected_calibration_error(z, y, **kwargs) == pytest.approx(ece, abs=1e-12)
    assert M.maximum_calibration_error(z, y, **kwargs) == pytest.approx(mce, abs=1e-12)


@pytest.mark.parametrize("temperature", [1.0, "fitted"])
def test_ece_mce_on_cifar100_match_torchmetrics(cifar100, temperature):
    """Acceptance 1: ECE/MCE on the shared record against torchmetrics (a peer library)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    logits, labels = cifar100
    if temperature == "fitted":
        canon = canonicalize(logits, "multiclass")
        temperature = fit_temperature(canon, check_labels(labels, canon)).temperature
    probs = torch.softmax(torch.from_numpy(logits).double() / temperature, dim=1)
    target = torch.from_numpy(labels)
    for norm, fn in (("l1", M.expected_calibration_error), ("max", M.maximum_calibration_error)):
        expected = float(multiclass_calibration_error(probs, target, num_classes=100, n_bins=15, norm=norm))
        got = fn(logits, labels, temperature=temperature, n_bins=15)
        # torchmetrics bins [lo, hi) and accumulates in float32: agreement to float32 rounding.
        assert got == pytest.approx(expected, abs=2e-5), norm
    if temperature == 1.0:
        assert M.expected_calibration_error(logits, labels) == pytest.approx(0.1422, abs=1e-4)


def test_temperature_scaling_reduces_ece_on_cifar100(cifar100):
    logits, labels = cifar100
    canon = canonicalize(logits, "multiclass")
    T = fit_temperature(canon, check_labels(labels, canon)).temperature
    before = M.expected_calibration_error(logits, labels)
    after = M.expected_calibration_error(logits, labels, temperature=T)
    assert after < before / 5


def test_ece_binary_top_label_matches_torchmetrics_two_class():
    from torchmetrics.functional.classification import multiclass_calibration_error

    rng = np.random.default_rng(4)
    a = 3 * rng.standard_normal(400)
    y = (rng.random(400) < expit(a / 2)).astype(int)
    probs = torch.from_numpy(np.stack([1 - expit(a), expit(a)], axis=1))
    expected = float(multiclass_calibration_error(probs, torch.from_numpy(y), num_classes=2, n_bins=10))
    for layout in (a, np.stack([np.zeros_like(a), a], axis=1)):
        got = M.expected_calibration_error(layout, y, task="binary", n_bins=10)
        assert got == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("binning", ["width", "mass"])
def test_ece_multilabel_is_per_label_binary(binning):
    z, y = _multilabel(n=400, c=5)
    per_label = M.expected_calibration_error(z, y, task="multilabel", binning=binning, average=False)
    assert per_label.shape == (5,)
    for c in range(5):
        p = expit(z[:, c])
        conf, correct = np.maximum(p, 1 - p), ((p > 0.5) == (y[:, c] == 1))
        assert per_label[c] == pytest.approx(ref_bins(conf, correct, 15, binning)[0], abs=1e-12)
        assert per_label[c] == pytest.approx(M.expected_calibration_error(z[:, c], y[:, c], task="binary", binning=binning))
    assert M.expected_calibration_error(z, y, task="multilabel", binning=binning) == pytest.approx(per_label.mean())
    mce = M.maximum_calibration_error(z, y, task="multilabel", average=False)
    assert mce.shape == (5,) and np.all(mce >= per_label - 1e-12)


def test_ece_per_member_uses_mean_probabilities():
    rng = np.random.default_rng(8)
    z = 2 * rng.standard_normal((300, 4, 5))
    y = rng.integers(0, 4, 300)
    p = softmax(z, axis=1).mean(axis=2)
    ece, mce = ref_bins(p.max(axis=1), p.argmax(axis=1) == y, 10, "width")
    assert M.expected_calibration_error(z, y, per_member=True, n_bins=10) == pytest.approx(ece, abs=1e-12)
    assert M.maximum_calibration_error(z, y, per_member=True, n_bins=10) == pytest.approx(mce, abs=1e-12)


def test_equal_mass_bins_hold_equal_counts_and_keep_ties_together():
    z, y = _multiclass(n=600, k=4)
    bins = M.calibration_bins(z, y, n_bins=6, binning="mass")
    np.testing.assert_array_equal(bins.counts, np.full(6, 100))
    # Heavily tied confidences: a tie group is never split across bins.
    zt = np.repeat(z[:10], 30, axis=0)
    yt = np.repeat(y[:10], 30)
    tied = M.calibration_bins(zt, yt, n_bins=7, binning="mass")
    assert np.all(tied.counts % 30 == 0) and tied.counts.sum() == 300
    ece, mce = ref_bins(softmax(zt, 1).max(1), softmax(zt, 1).argmax(1) == yt, 7, "mass")
    assert tied.ece == pytest.approx(ece, abs=1e-12) and tied.mce == pytest.approx(mce, abs=1e-12)


def test_calibration_bins_multilabel_pooled_and_per_label():
    z, y = _multilabel(n=100, c=3)
    pooled = M.calibration_bins(z, y, task="multilabel")
    assert pooled.counts.sum() == 300
    per_label = M.calibration_bins(z, y, task="multilabel", pooled=False)
    assert len(per_label) == 3 and all(b.counts.sum() == 100 for b in per_label)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 60),
    st.integers(2, 6),
    st.integers(1, 20),
    st.sampled_from(["width", "mass"]),
    st.integers(0, 2**31 - 1),
)
def test_ece_properties(n, k, n_bins, binning, seed):
    rng = np.random.default_rng(seed)
    z = np.round(3 * rng.standard_normal((n, k)), 1)  # rounding makes ties
    y = rng.integers(0, k, n)
    ece = M.expected_calibration_error(z, y, n_bins=n_bins, binning=binning)
    mce = M.maximum_calibration_error(z, y, n_bins=n_bins, binning=binning)
    assert 0.0 <= ece <= mce + 1e-12 <= 1.0 + 1e-12
    p = softmax(z, axis=1)
    conf, correct = p.max(1), p.argmax(1) == y
    # One bin: |mean confidence - accuracy|.
    assert M.expected_calibration_error(z, y, n_bins=1, binning=binning) == pytest.approx(abs(conf.mean() - correct.mean()))
    assert ece == pytest.approx(ref_bins(conf, correct, n_bins, binning)[0], abs=1e-12)


# =========================================================================== prediction errors


def test_prediction_errors_multiclass_binary_multilabel():
    z, y = _multiclass()
    np.testing.assert_array_equal(M.prediction_errors(z, y), (z.argmax(1) != y).astype(float))
    a = np.array([2.0, -1.0, 0.5, -0.1])
    np.testing.assert_array_equal(M.prediction_errors(a, [1, 1, 0, 0], task="binary"), [0.0, 1.0, 1.0, 0.0])
    zl = np.array([[1.0, -1.0, 2.0], [1.0, 1.0, -1.0]])
    yl = np.array([[1, 0, 0], [1, 1, 0]])
    np.testing.assert_array_equal(M.prediction_errors(zl, yl, task="multilabel"), [1.0, 0.0])
    np.testing.assert_allclose(M.prediction_errors(zl, yl, task="multilabel", multilabel_loss="hamming"), [1 / 3, 0.0])


def test_prediction_errors_nan_for_non_finite_logits():
    z, y = _multiclass(n=5)
    z[2, 1] = np.nan
    z[4, 0] = np.inf
    errors = M.prediction_errors(z, y)
    assert np.isnan(errors[[2, 4]]).all() and np.isfinite(errors[[0, 1, 3]]).all()


def test_prediction_errors_per_member_argmax_of_mean():
    z = np.zeros((1, 3, 2))
    z[0, :, 0] = [5.0, 0.0, 0.0]  # member 1: class 0, very sure
    z[0, :, 1] = [0.0, 0.2, 0.0]  # member 2: class 1, unsure
    assert M.prediction_errors(z, [0], per_member=True)[0] == 0.0
    assert M.prediction_errors(z, [1], per_member=True)[0] == 1.0


# =========================================================================== risk-coverage


def test_risk_coverage_no_ties_matches_geifman_reference():
    scores = RNG.standard_normal(200)
    losses = (RNG.random(200) < 0.3).astype(float)
    rc = M.risk_coverage(scores, losses)
    assert rc.aurc == pytest.approx(ref_aurc_no_ties(scores, losses), rel=1e-12)
    np.testing.assert_allclose(rc.coverage, np.arange(1, 201) / 200)
    order = np.argsort(scores)
    np.testing.assert_allclose(rc.risk, np.cumsum(losses[order]) / np.arange(1, 201))
    assert rc.oracle_aurc == pytest.approx(ref_aurc_no_ties(losses + 1e-9 * np.arange(200), losses), rel=1e-12)
    assert rc.eaurc == pytest.approx(rc.aurc - rc.oracle_aurc)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1)), min_size=1, max_size=7))
def test_ties_give_the_average_over_tie_orders(pairs):
    scores = np.array([p[0] for p in pairs], float)
    losses = np.array([p[1] for p in pairs], float)
    rc = M.risk_coverage(scores, losses)
    aurc, augrc = brute_force_tie_average(scores, losses)
    assert rc.aurc == pytest.approx(aurc, abs=1e-12)
    assert rc.augrc == pytest.approx(augrc, abs=1e-12)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8), st.integers(0, 1)), min_size=2, max_size=60))
def test_augrc_identity_with_failure_auroc(pairs):
    """Traub et al. 2024: AUGRC = (1 - AUROC_f) acc (1 - acc) + (1 - acc)^2 / 2 (0-1 loss)."""
    scores = np.array([p[0] for p in pairs], float)
    errors = np.array([p[1] for p in pairs], float)
    rc = M.risk_coverage(scores, errors)
    err = errors.mean()
    if 0 < err < 1:
        auroc = roc_auc_score(errors, scores)  # ties count 1/2
        expected = (1 - auroc) * (1 - err) * err + err**2 / 2
    else:
        expected = err**2 / 2
    assert rc.augrc == pytest.approx(expected, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(-5, 5, allow_nan=False), st.floats(0, 3, allow_nan=False)), min_size=1, max_size=80
    ),
    st.integers(0, 2**31 - 1),
)
def test_risk_coverage_properties(pairs, seed):
    scores = np.array([p[0] for p in pairs])
    losses = np.array([p[1] for p in pairs])
    rc = M.risk_coverage(scores, losses)
    # Risk at full coverage is the mean loss; coverage ends at 1.
    assert rc.coverage[-1] == 1.0
    assert rc.risk[-1] == pytest.approx(losses.mean(), rel=1e-12, abs=1e-12)
    assert rc.selective_risk_at(1.0) == pytest.approx(losses.mean(), rel=1e-12, abs=1e-12)
    # The oracle ordering is at least as good as the score's and any random ordering.
    assert rc.eaurc >= 0.0 and rc.oracle_aurc <= rc.aurc + 1e-12
    shuffled = M.risk_coverage(np.random.default_rng(seed).permutation(len(losses)).astype(float), losses)
    assert rc.oracle_aurc <= shuffled.aurc + 1e-12
    assert shuffled.oracle_aurc == pytest.approx(rc.oracle_aurc)
    # Invariant under a strictly increasing transformation of the scores (dense ranks: exact in floats).
    ranks = np.unique(scores, return_inverse=True)[1]
    moved = M.risk_coverage(np.exp(ranks / 7.0) * 3 - 10, losses)
    assert moved.aurc == pytest.approx(rc.aurc, rel=1e-12, abs=1e-15)
    assert moved.augrc == pytest.approx(rc.augrc, rel=1e-12, abs=1e-15)
    # Thresholds select exactly each point's samples, never splitting ties.
    counts = np.array([(scores < t).sum() for t in rc.thresholds])
    np.testing.assert_array_equal(counts, np.round(rc.coverage * len(scores)).astype(int))
    assert 0.0 <= rc.augrc <= rc.aurc + 1e-12


def test_risk_coverage_non_finite_scores_are_never_selected():
    scores = np.array([0.1, np.nan, 0.3, np.inf, 0.2, -np.inf])
    losses = np.array([0.0, np.nan, 1.0, 1.0, 0.0, 0.0])  # losses at non-finite scores are ignored
    rc = M.risk_coverage(scores, losses)
    finite = M.risk_coverage(scores[[0, 2, 4]], losses[[0, 2, 4]])
    assert rc.n_samples == 6 and rc.n_selectable == 3
    np.testing.assert_allclose(rc.coverage, finite.coverage / 2)
    np.testing.assert_allclose(rc.risk, finite.risk)
    assert rc.aurc == pytest.approx(finite.aurc / 2)
    with pytest.raises(ValueError, match=r"largest achievable coverage 0\.5 \(3 of 6 samples have a finite score\)\. Got 0\.9"):
        rc.selective_risk_at(0.9)


def test_float32_scores_get_float32_thresholds():
    scores = torch.tensor([0.5, 0.25, 0.25, 0.75], dtype=torch.float32) + 1e-8
    rc = M.risk_coverage(scores, np.array([0.0, 1.0, 0.0, 1.0]))
    for t, c in zip(rc.thresholds, rc.coverage, strict=True):
        assert float((scores < t).float().mean()) == c  # torch compares in float32
        assert np.float32(t) == t


def test_selective_risk_at_and_coverage_at():
    rc = M.risk_coverage(np.array([0.1, 0.2, 0.2, 0.9]), np.array([0.0, 0.0, 1.0, 1.0]))
    assert rc.selective_risk_at(0.25) == 0.0
    assert rc.selective_risk_at(0.5) == pytest.approx(1 / 3)  # 0.5 unreachable: the next point, 0.75
    np.testing.assert_allclose(rc.selective_risk_at([0.1, 0.75, 1.0]), [0.0, 1 / 3, 0.5])
    assert rc.coverage_at(0.0) == 0.25
    assert rc.coverage_at(0.4) == 0.75
    assert rc.coverage_at(0.5) == 1.0
    np.testing.assert_allclose(rc.coverage_at([0.0, 0.4]), [0.25, 0.75])
    assert M.risk_coverage(np.array([1.0, 2.0]), np.array([1.0, 1.0])).coverage_at(0.5) == 0.0
    summary = rc.to_dict()
    assert summary["risk_at_max_coverage"] == 0.5 and summary["n_samples"] == 4
    np.testing.assert_allclose(rc.generalized_risk, rc.coverage * rc.risk)


def test_risk_coverage_on_cifar100(cifar100):
    logits, labels = cifar100
    from seapig_core.scores import SoftmaxScore

    scores = SoftmaxScore().fit(logits).scores
    errors = M.prediction_errors(logits, labels)
    rc = M.risk_coverage(scores, errors)
    assert rc.risk[-1] == pytest.approx(errors.mean())
    # Closed-form oracle AURC for the 0-1 loss (Geifman et al. 2019): r + (1 - r) ln(1 - r), up to O(1/N).
    r = errors.mean()
    assert rc.oracle_aurc == pytest.approx(r + (1 - r) * math.log(1 - r), abs=1e-3)
    assert 0.0 < rc.eaurc < rc.aurc < r


# =========================================================================== plots


def test_reliability_diagram_returns_figure_and_never_uses_pyplot(cifar100, tmp_path):
    import matplotlib.pyplot as plt

    logits, labels = cifar100
    before = plt.get_fignums()
    fig = plot_reliability_diagram(logits, labels, temperature=2.0, compare_temperature=1.0)
    assert isinstance(fig, Figure) and plt.get_fignums() == before
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    ece = M.expected_calibration_error(logits, labels, temperature=2.0)
    assert any(f"ECE = {ece:.2%}" in t for t in legend)
    assert any("T = 1 (ECE" in t for t in legend)
    fig.savefig(tmp_path / "reliability.png")
    assert (tmp_path / "reliability.png").stat().st_size > 10_000


def test_reliability_diagram_on_given_axes_and_multilabel():
    fig0 = Figure()
    ax = fig0.add_subplot()
    z, y = _multilabel()
    fig = plot_reliability_diagram(z, y, task="multilabel", ax=ax, n_bins=8, binning="mass")
    assert fig is fig0 and len(fig.axes) == 1
    assert "pooled" in ax.get_legend().get_texts()[0].get_text() or any(
        "pooled" in t.get_text() for t in ax.get_legend().get_texts()
    )


def test_risk_coverage_plot(cifar100, tmp_path):
    logits, labels = cifar100
    from seapig_core.scores import SoftmaxScore

    scores = SoftmaxScore().fit(logits).scores
    errors = M.prediction_errors(logits, labels)
    rc = M.risk_coverage(scores, errors)
    rt = guaranteed_risk_threshold(scores, errors, 0.1)
    fig = plot_risk_coverage(rc, risk_threshold=rt, label="softmax")
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(f"AURC = {rc.aurc:.4f}" in t for t in texts)
    assert any(f"oracle (AURC = {rc.oracle_aurc:.4f})" in t for t in texts)
    assert any("guaranteed threshold" in t for t in texts)
    fig.savefig(tmp_path / "rc.png")
    no_oracle = plot_risk_coverage(rc, oracle=False)
    assert not any("oracle" in t.get_text() for t in no_oracle.axes[0].get_legend().get_texts())
    with pytest.raises(TypeError, match=r"The 'rc' parameter must be a RiskCoverage .*Got dict instead"):
        plot_risk_coverage({})
    with pytest.raises(TypeError, match=r"The 'oracle' parameter must be a bool\. Got str instead"):
        plot_risk_coverage(rc, oracle="yes")


# =========================================================================== bad input

Z, Y = _multiclass(n=20, k=3)


@pytest.mark.parametrize(
    "fn", [M.negative_log_likelihood, M.brier_score, M.expected_calibration_error, M.maximum_calibration_error]
)
def test_calibration_metrics_bad_input(fn):
    with pytest.raises(TypeError, match=r"The 'logits' parameter must be a torch.Tensor or numpy.ndarray\. Got str"):
        fn("logits", Y)
    with pytest.raises(ValueError, match=r"The 'logits' parameter must have shape \(N, C\) for task='multiclass'"):
        fn(Z[:, 0], Y)
    with pytest.raises(ValueError, match=r"The 'logits' parameter must contain only finite values"):
        fn(np.where(np.arange(20)[:, None] == 3, np.nan, Z), Y)
    with pytest.raises(ValueError, match=r"The 'labels' parameter must have one entry per sample \(20\)\. Got shape \(19,\)"):
        fn(Z, Y[:-1])
    with pytest.raises(ValueError, match=r"The 'labels' parameter must contain class indices in \[0, 2\]\. Got values in \[1, 3\]"):
        fn(Z, np.where(Y == 0, 3, Y))
    with pytest.raises(ValueError, match=r"The 'task' parameter must be one of"):
        fn(Z, Y, task="regression")
    with pytest.raises(ValueError, match=r"The 'temperature' parameter must be a positive finite float\. Got -1\.0 instead"):
        fn(Z, Y, temperature=-1.0)
    with pytest.raises(ValueError, match=r"The 'temperature' parameter must be a positive finite float\. Got nan instead"):
        fn(Z, Y, temperature=float("nan"))
    with pytest.raises(TypeError, match=r"The 'temperature' parameter must be a positive float\. Got NoneType instead"):
        fn(Z, Y, temperature=None)
    with pytest.raises(TypeError, match=r"The 'per_member' parameter must be a bool\. Got int instead"):
        fn(Z, Y, per_member=1)


@pytest.mark.parametrize("fn", [M.expected_calibration_error, M.maximum_calibration_error, M.calibration_bins])
def test_binning_bad_input(fn):
    with pytest.raises(ValueError, match=r"The 'n_bins' parameter must be a positive integer\. Got 0 instead"):
        fn(Z, Y, n_bins=0)
    with pytest.raises(TypeError, match=r"The 'n_bins' parameter must be a positive integer\. Got float instead"):
        fn(Z, Y, n_bins=10.0)
    with pytest.raises(ValueError, match=r"The 'binning' parameter must be one of \['width', 'mass'\]\. Got 'quantile' instead"):
        fn(Z, Y, binning="quantile")


def test_average_and_multilabel_loss_bad_input():
    with pytest.raises(TypeError, match=r"The 'average' parameter must be a bool\. Got str instead"):
        M.expected_calibration_error(Z, Y, average="macro")
    with pytest.raises(TypeError, match=r"The 'average' parameter must be a bool\. Got NoneType instead"):
        M.brier_score(Z, Y, average=None)
    with pytest.raises(ValueError, match=r"The 'multilabel_loss' parameter must be one of \['subset', 'hamming'\]\. Got 'any'"):
        M.prediction_errors(Z, Y, multilabel_loss="any")
    with pytest.raises(ValueError, match=r"The 'labels' parameter must contain only 0 and 1 for task='multilabel'"):
        M.prediction_errors(np.zeros((3, 2)), np.full((3, 2), 2), task="multilabel")


def test_risk_coverage_bad_input():
    s, e = np.arange(5.0), np.zeros(5)
    with pytest.raises(TypeError, match=r"The 'scores' parameter must be a torch.Tensor or numpy.ndarray\. Got int instead"):
        M.risk_coverage(3, e)
    with pytest.raises(TypeError, match=r"The 'errors' parameter must hold real numbers\. Got an array of dtype <U1 instead"):
        M.risk_coverage(s, np.array(list("abcde")))
    with pytest.raises(TypeError, match=r"The 'scores' parameter must hold real numbers\. Got dtype torch.bool instead"):
        M.risk_coverage(torch.ones(5, dtype=torch.bool), e)
    with pytest.raises(ValueError, match=r"The 'scores' parameter must be 1-D, one value per sample\. Got shape \(5, 1\)"):
        M.risk_coverage(s[:, None], e)
    with pytest.raises(ValueError, match=r"The 'scores' parameter must contain at least one sample\. Got shape \(0,\)"):
        M.risk_coverage(np.array([]), np.array([]))
    with pytest.raises(ValueError, match=r"The 'errors' parameter must have one loss per score \(5\)\. Got shape \(4,\)"):
        M.risk_coverage(s, e[:4])
    with pytest.raises(ValueError, match=r"The 'scores' parameter must contain at least one finite score\. Got none"):
        M.risk_coverage(np.full(5, np.nan), e)
    with pytest.raises(ValueError, match=r"The 'errors' parameter must be finite wherever the score is finite\. Got 1 non-finite loss\(es\) \(first at index 2\)"):
        M.risk_coverage(s, np.array([0, 0, np.nan, 0, 0]))
    rc = M.risk_coverage(s, e)
    for bad in (0.0, 1.5, float("nan"), -0.1):
        with pytest.raises(ValueError, match=r"The 'coverage' parameter must be in \(0, 1\]"):
            rc.selective_risk_at(bad)
    with pytest.raises(TypeError, match=r"The 'coverage' parameter must be a real number or array\. Got str instead"):
        rc.selective_risk_at("half")
    with pytest.raises(ValueError, match=r"The 'risk' parameter must be finite and >= 0\. Got -0\.1 instead"):
        rc.coverage_at(-0.1)
    with pytest.raises(TypeError, match=r"The 'risk' parameter must be a real number or array\. Got NoneType instead"):
        rc.coverage_at(None)


# =========================================================================== validated once (issue 10 item 1)


def _layouts():
    """(name, logits, labels, task, per_member) for every canonical layout."""
    rng = np.random.default_rng(21)
    z, y = _multiclass(n=6000, k=100, seed=3)  # 100 classes: several row blocks
    zl, yl = _multilabel(n=400, c=4)
    a = 2 * rng.standard_normal(300)
    yb = (rng.random(300) < expit(a)).astype(int)
    zm = 2 * rng.standard_normal((300, 5, 3))
    ym = rng.integers(0, 5, 300)
    return [
        ("multiclass float32", z.astype(np.float32), y, "multiclass", False),
        ("multiclass float64", z, y, "multiclass", False),
        ("binary one logit", a, yb, "binary", False),
        ("binary two logits", np.stack([np.zeros_like(a), a], axis=1), yb, "binary", False),
        ("multilabel", zl, yl, "multilabel", False),
        ("per member", zm, ym, "multiclass", True),
    ]


CALIBRATION_METRICS = [
    M.negative_log_likelihood,
    M.brier_score,
    M.expected_calibration_error,
    M.maximum_calibration_error,
]


@pytest.mark.parametrize("layout", _layouts(), ids=lambda case: case[0])
def test_canonical_logits_give_identical_results_without_revalidation(layout, monkeypatch):
    """Acceptance (10.1, calibration side): raw logits are canonicalised once per call; a
    CanonicalLogits is not canonicalised or scanned for non-finite values again, and gives
    identical results. No metric runs a finiteness pass over the logits: torch.isfinite runs
    at most once per call (check_labels on the labels), whatever the number of row blocks."""
    _, z, y, task, per_member = layout
    canon = canonicalize(z, task, per_member, require_finite=True)
    calls = {"canonicalize": 0, "isfinite": 0, "finite_rows": 0}
    real_canonicalize, real_isfinite, real_finite_rows = M.canonicalize, torch.isfinite, type(canon).finite_rows

    def counting_canonicalize(*args, **kwargs):
        calls["canonicalize"] += 1
        return real_canonicalize(*args, **kwargs)

    def counting_isfinite(*args, **kwargs):
        calls["isfinite"] += 1
        return real_isfinite(*args, **kwargs)

    def counting_finite_rows(self):
        calls["finite_rows"] += 1
        return real_finite_rows(self)

    monkeypatch.setattr(M, "canonicalize", counting_canonicalize)
    monkeypatch.setattr(torch, "isfinite", counting_isfinite)
    monkeypatch.setattr(type(canon), "finite_rows", counting_finite_rows)
    kwargs = dict(temperature=1.7)
    for fn in CALIBRATION_METRICS:
        calls.update(canonicalize=0, isfinite=0, finite_rows=0)
        raw = fn(z, y, task=task, per_member=per_member, **kwargs)
        assert calls == {"canonicalize": 1, "isfinite": calls["isfinite"], "finite_rows": 0}, fn.__name__
        assert calls["isfinite"] <= 1, fn.__name__
        calls.update(canonicalize=0, isfinite=0, finite_rows=0)
        from_canon = fn(canon, y, **kwargs)
        assert calls["canonicalize"] == 0 and calls["finite_rows"] == 0 and calls["isfinite"] <= 1, fn.__name__
        np.testing.assert_array_equal(np.asarray(from_canon), np.asarray(raw), err_msg=fn.__name__)
        # The task and layout may be restated, if they match.
        np.testing.assert_array_equal(np.asarray(fn(canon, y, task=task, per_member=per_member, **kwargs)), np.asarray(raw))
    raw_bins = M.calibration_bins(z, y, task=task, per_member=per_member, **kwargs)
    canon_bins = M.calibration_bins(canon, y, **kwargs)
    np.testing.assert_array_equal(raw_bins.counts, canon_bins.counts)
    np.testing.assert_array_equal(raw_bins.confidence, canon_bins.confidence)
    calls.update(canonicalize=0)
    np.testing.assert_array_equal(M.prediction_errors(canon, y, **kwargs), M.prediction_errors(z, y, task=task, per_member=per_member, **kwargs))
    assert calls["canonicalize"] == 1  # the raw call only


def test_canonical_logits_task_or_layout_mismatch_is_an_error():
    z, y = _multiclass(n=50, k=3)
    canon = canonicalize(z, "multiclass")
    with pytest.raises(ValueError, match=r"The 'task' parameter must be left out or match the task of the CanonicalLogits \('multiclass'\)\. Got 'multilabel' instead"):
        M.expected_calibration_error(canon, y, task="multilabel")
    with pytest.raises(ValueError, match=r"The 'per_member' parameter must be left out or match the CanonicalLogits \(per_member=False\)\. Got True instead"):
        M.negative_log_likelihood(canon, y, per_member=True)
    with pytest.raises(ValueError, match=r"The 'task' parameter must be one of"):
        M.brier_score(canon, y, task="regression")
    with pytest.raises(ValueError, match=r"The 'labels' parameter must have one entry per sample \(50\)"):
        M.expected_calibration_error(canon, y[:-1])


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("layout", _layouts(), ids=lambda case: case[0])
def test_non_finite_logits_raise_from_raw_and_canonical_input(layout, bad_value):
    """Without a separate finiteness pass, a NaN or infinite logit still raises, naming the
    count and first row, also for a CanonicalLogits built without require_finite."""
    _, z, y, task, per_member = layout
    z = np.array(z, copy=True)
    z.reshape(len(z), -1)[[7, 200], 0] = bad_value
    canon = canonicalize(z, task, per_member)  # require_finite=False: not checked here
    for fn in [*CALIBRATION_METRICS, M.calibration_bins]:
        for logits, kwargs in ((z, dict(task=task, per_member=per_member)), (canon, {})):
            with pytest.raises(ValueError, match=r"The 'logits' parameter must contain only finite values\. Got 2 sample\(s\) with NaN or infinite logits \(first at row 7\) instead"):
                fn(logits, y, **kwargs)
    errors = M.prediction_errors(canon, y)  # allowed here: no prediction, NaN loss
    assert np.isnan(errors[[7, 200]]).all()


def test_metrics_never_modify_the_callers_logits():
    for _, z, y, task, per_member in _layouts():
        before = np.array(z, copy=True)
        for fn in [*CALIBRATION_METRICS, M.calibration_bins, M.prediction_errors]:
            fn(z, y, task=task, per_member=per_member, temperature=0.3)
            fn(torch.from_numpy(z), y, task=task, per_member=per_member, temperature=3.0)
        np.testing.assert_array_equal(z, before)


# =========================================================================== ECE precision (issue 10 item 6)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(2, 400),
    st.floats(0.05, 30.0),
    st.sampled_from([0.01, 0.3, 1.0, 2.5, 100.0]),
    st.integers(0, 2**31 - 1),
)
def test_float32_confidence_error_is_within_the_refinement_bound(k, scale, temperature, seed):
    """The float32 confidence of the fast path is within (K + 2) eps32 (relative) of the exact
    float64 confidence of the same float32 logits; the refinement uses 4x this bound."""
    rng = np.random.default_rng(seed)
    z = (scale * rng.standard_normal((300, k))).astype(np.float32)
    z[:50, 1] = z[:50, 0]  # tied maxima
    y = rng.integers(0, k, 300)
    canon = canonicalize(z)
    conf32, correct = M._categorical_top_label(canon, torch.from_numpy(y), temperature)
    exact = softmax(z.astype(np.float64) / temperature, axis=1).max(axis=1)
    bound = (k + 2) * np.finfo(np.float32).eps
    assert np.all(np.abs(conf32 - exact) <= bound * exact)
    np.testing.assert_array_equal(correct, z.argmax(axis=1) == y)  # argmax: first maximal index


def _near_edge_logits(n, k, targets, seed):
    """float32 logits whose exact (float64) top-label confidence lies within ~1e-7 of ``targets``."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, k))
    z[:, 0] = -np.inf
    rest = np.log(np.exp(z[:, 1:]).sum(axis=1))
    c = rng.choice(targets, n)
    z[:, 0] = rest - np.log(1.0 / c - 1.0)  # softmax(z)_0 = c exactly in real arithmetic
    return z.astype(np.float32), rng.integers(0, k, n)


@pytest.mark.parametrize("binning", ["width", "mass"])
def test_float32_confidences_near_bin_edges_fall_in_their_exact_bins(binning):
    """Acceptance (10.6, exactness kept): confidences computed in float32 land in the bin of
    their exact value, so bin counts equal those of the float64 computation of the same logits
    and the ECE differs by float32 rounding only."""
    edges = np.linspace(0, 1, 16)[2:-1]
    z32, y = _near_edge_logits(20_000, 10, edges if binning == "width" else [0.6], seed=5)
    z64 = z32.astype(np.float64)
    for T in (1.0, 1.3):
        fast = M.calibration_bins(z32, y, temperature=T, binning=binning)
        exact = M.calibration_bins(z64, y, temperature=T, binning=binning)
        np.testing.assert_array_equal(fast.counts, exact.counts)
        np.testing.assert_array_equal(fast.accuracy, exact.accuracy)
        np.testing.assert_allclose(fast.edges, exact.edges, rtol=1e-6)
        np.testing.assert_allclose(fast.confidence, exact.confidence, rtol=1e-6)
        assert M.expected_calibration_error(z32, y, temperature=T, binning=binning) == pytest.approx(
            M.expected_calibration_error(z64, y, temperature=T, binning=binning), abs=1e-6
        )
