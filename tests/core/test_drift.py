"""Drift statistics and the verdict (issue 9 item 1): references, the issue's cases, false alarms."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from seapig_core.bundle import fit_selector
from seapig_core.drift import (
    PSI_EPSILON,
    DriftThresholds,
    check_drift_thresholds,
    drift_statistics,
    population_stability_index,
    psi_bin_edges,
    rate_pvalue,
)
from seapig_core.selections import selections_table, summarize_selections


def _msp_like(n: int, rng: np.random.Generator) -> np.ndarray:
    """Negative max-softmax-like scores in [-1, 0], with a spike of saturated samples at -1."""
    scores = -rng.beta(8.0, 1.2, n)
    scores[rng.random(n) < 0.1] = -1.0
    return scores


def _calibrated(m: int = 1000, seed: int = 0, q: float = 0.95) -> tuple[np.ndarray, float, float]:
    calibration = _msp_like(m, np.random.default_rng(seed))
    threshold = float(np.quantile(calibration, q))
    return calibration, threshold, float(np.mean(~(calibration < threshold)))


# ----------------------------------------------------------------------------- references


def test_statistics_match_scipy_references() -> None:
    rng = np.random.default_rng(3)
    calibration, threshold, expected = _calibrated(800, seed=1)
    query = _msp_like(400, rng) * 0.97
    query[:5] = np.nan
    out = drift_statistics(query, calibration, threshold, expected)
    rejected = int(np.sum(~(query < threshold)))
    assert out["samples"] == 400 and out["rejected"] == rejected and out["non_finite"] == 5
    assert out["rejection_rate"] == pytest.approx(rejected / 400)
    assert out["binomial_pvalue"] == pytest.approx(stats.binomtest(rejected, 400, expected).pvalue, rel=1e-12)
    ks = stats.ks_2samp(query[5:], calibration)  # non-finite scores are left out
    assert out["ks_statistic"] == pytest.approx(ks.statistic) and out["ks_pvalue"] == pytest.approx(ks.pvalue)
    assert out["calibration_samples"] == 800
    json.dumps(out, allow_nan=False)  # small and JSON-serialisable: fit for a Prefect result


def test_psi_by_hand() -> None:
    # Calibration 0..7 in 4 quantile bins: edges 1.75, 3.5, 5.25 -> shares 1/4 each.
    calibration = np.arange(8.0)
    np.testing.assert_allclose(psi_bin_edges(calibration, bins=4), [1.75, 3.5, 5.25])
    query = np.array([0.0, 0.5, 1.0, 6.0])  # shares 3/4, 0, 0, 1/4: the empty bins count as eps
    eps = PSI_EPSILON
    by_hand = (0.75 - 0.25) * math.log(0.75 / 0.25) + 2 * (eps - 0.25) * math.log(eps / 0.25) + 0.0
    assert population_stability_index(query, calibration, bins=4) == pytest.approx(by_hand, rel=1e-12)
    assert population_stability_index(calibration, calibration, bins=4) == 0.0
    # An edge value goes to the upper bin (edges[b-1] <= x < edges[b]), for both sides alike.
    assert population_stability_index([1.75, 3.5, 5.25, 7.0], calibration, bins=4) == pytest.approx(
        (eps - 0.25) * math.log(eps / 0.25) + (0.5 - 0.25) * math.log(0.5 / 0.25)  # shares 0, 1/4, 1/4, 1/2
    )
    # Ties (saturated scores) merge repeated quantiles instead of making empty bins.
    tied = np.r_[np.full(50, -1.0), np.linspace(-0.9, -0.5, 50)]
    assert np.all(np.diff(psi_bin_edges(tied)) > 0) and psi_bin_edges(tied).size < 9
    assert math.isnan(population_stability_index([np.nan], calibration))
    with pytest.raises(ValueError, match="'bins' parameter must be an integer >= 2"):
        population_stability_index(calibration, calibration, bins=1)


def _betabinom_pvalue_reference(x: int, n: int, k: int, m: int) -> float:
    """Two-sided minlike p-value of the beta-binomial from log-gamma formulas (not scipy.stats.betabinom)."""
    a, b = k + 0.5, m - k + 0.5

    def log_pmf(j: int) -> float:
        log_choose = math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)
        log_beta = lambda p, q: math.lgamma(p) + math.lgamma(q) - math.lgamma(p + q)  # noqa: E731
        return log_choose + log_beta(j + a, n - j + b) - log_beta(a, b)

    pmf = [math.exp(log_pmf(j)) for j in range(n + 1)]
    return min(1.0, sum(p for p in pmf if p <= pmf[x] * (1 + 1e-7)))


@pytest.mark.parametrize(("x", "n", "k", "m"), [(14, 100, 15, 300), (5, 100, 5, 100), (0, 50, 10, 200), (30, 30, 1, 40)])
def test_rate_pvalue_matches_a_hand_written_beta_binomial(x: int, n: int, k: int, m: int) -> None:
    assert rate_pvalue(x, n, k, m) == pytest.approx(_betabinom_pvalue_reference(x, n, k, m), rel=1e-9, abs=1e-300)


def test_rate_pvalue_allows_for_the_calibration_size_and_tends_to_the_binomial_test() -> None:
    # 14 of 100 rejected where 5% of 300 calibration samples were: the binomial test alarms,
    # but a true rate of 8-9% is plausible from 15 of 300, so the calibration-aware test does not.
    assert stats.binomtest(14, 100, 0.05).pvalue < 0.001 < rate_pvalue(14, 100, 15, 300)
    assert rate_pvalue(14, 100, 50_000, 1_000_000) == pytest.approx(stats.binomtest(14, 100, 0.05).pvalue, rel=0.05)
    with pytest.raises(ValueError, match="rejected <= samples"):
        rate_pvalue(5, 4, 1, 10)


# ----------------------------------------------------------------------------- verdicts


def test_a_fully_rejected_batch_is_drift() -> None:
    calibration, threshold, expected = _calibrated()
    query = np.random.default_rng(5).uniform(-0.5, -0.3, 250)  # all far less confident than the threshold
    out = drift_statistics(query, calibration, threshold, expected)
    assert out["rejection_rate"] == 1.0 and out["ks_statistic"] > 0.99
    assert out["verdict"] == "drift"
    assert len(out["reasons"]) == 2 and all(r[0].isupper() and r.endswith(".") for r in out["reasons"])
    assert out["reasons"][0].startswith("The rejection rate 100.0% is above the expected 5.0%")
    assert "250 of 250 samples rejected" in out["reasons"][0]
    assert out["reasons"][1].startswith("The score distribution moved away") and "KS statistic 0.99" in out["reasons"][1] and "with p < 0.001" in out["reasons"][1]


def test_in_distribution_batches_rarely_alarm_at_the_defaults() -> None:
    calibration, threshold, expected = _calibrated(m=1000, seed=11)
    verdicts = []
    for seed in range(150):
        rng = np.random.default_rng(1000 + seed)
        n = int(rng.choice([100, 300, 1000, 3000]))
        verdicts.append(drift_statistics(_msp_like(n, rng), calibration, threshold, expected)["verdict"])
    assert set(verdicts) <= {"ok", "drift"}
    assert verdicts.count("drift") / len(verdicts) <= 0.02, verdicts.count("drift")


def test_small_batches_are_insufficient_not_alarming() -> None:
    calibration, threshold, expected = _calibrated()
    out = drift_statistics(np.full(12, -0.2), calibration, threshold, expected)  # all rejected, but 12 samples
    assert out["verdict"] == "insufficient" and out["rejection_rate"] == 1.0
    assert out["reasons"][0].startswith("Only 12 samples: a verdict needs at least 100")
    tiny_calibration = drift_statistics(_msp_like(500, np.random.default_rng(1)), calibration[:50], threshold, expected)
    assert tiny_calibration["verdict"] == "insufficient" and "calibration has only 50 finite scores" in tiny_calibration["reasons"][0]
    assert drift_statistics(np.full(12, -0.2), calibration, threshold, expected, {"min_samples": 10})["verdict"] == "drift"


def test_large_batches_need_a_material_difference() -> None:
    rng = np.random.default_rng(7)
    calibration, threshold, expected = _calibrated(m=20_000, seed=2)
    query = -rng.beta(8.0, 1.3, 20_000)  # a real but small shift: significant at this size, not material
    query[rng.random(20_000) < 0.1] = -1.0
    out = drift_statistics(query, calibration, threshold, expected)
    assert out["ks_pvalue"] < 0.001 and out["ks_statistic"] < 0.1 and out["psi"] < 0.25
    assert out["verdict"] == "ok" and any("differs slightly" in r for r in out["reasons"])
    strict = drift_statistics(query, calibration, threshold, expected, DriftThresholds(ks_statistic=0.01))
    assert strict["verdict"] == "drift" and strict["thresholds"]["ks_statistic"] == 0.01


def test_non_finite_samples_are_rejected_and_explained() -> None:
    calibration, threshold, expected = _calibrated()
    query = np.full(200, np.nan)
    out = drift_statistics(query, calibration, threshold, expected)
    assert out["rejected"] == 200 and out["ks_statistic"] is None and out["psi"] is None
    assert out["verdict"] == "drift"  # the rejection rate alone says so
    assert any("200 samples have non-finite logits" in r for r in out["reasons"])
    assert any("too few to compare the score distribution" in r for r in out["reasons"])


def test_given_rejections_are_counted_as_written() -> None:
    calibration, threshold, expected = _calibrated()
    query = _msp_like(150, np.random.default_rng(2))
    mask = np.zeros(150, dtype=bool)
    mask[:3] = True
    assert drift_statistics(query, calibration, threshold, expected, rejected=mask)["rejected"] == 3
    with pytest.raises(ValueError, match="'rejected' parameter must be a bool array of shape"):
        drift_statistics(query, calibration, threshold, expected, rejected=mask[:5])


def test_bad_arguments_name_themselves() -> None:
    calibration, threshold, expected = _calibrated()
    with pytest.raises(ValueError, match="'query_scores' parameter must hold at least one score"):
        drift_statistics([], calibration, threshold, expected)
    with pytest.raises(ValueError, match="'calibration_scores' parameter must hold at least one finite score"):
        drift_statistics([0.1], [np.nan], threshold, expected)
    with pytest.raises(ValueError, match="'threshold' parameter must be a finite float. Got nan"):
        drift_statistics([0.1], calibration, float("nan"), expected)
    with pytest.raises(ValueError, match="'expected_rejection_rate' parameter must be a float in \\[0, 1\\]. Got 1.5"):
        drift_statistics([0.1], calibration, threshold, 1.5)
    with pytest.raises(ValueError, match="'query_scores' parameter must be 1-D scores. Got shape \\(2, 2\\)"):
        drift_statistics(np.zeros((2, 2)), calibration, threshold, expected)
    with pytest.raises(TypeError, match="'thresholds' parameter must be a DriftThresholds"):
        drift_statistics([0.1], calibration, threshold, expected, thresholds=0.5)


# ----------------------------------------------------------------------------- thresholds


def test_thresholds_defaults_overrides_and_validation() -> None:
    defaults = DriftThresholds()
    assert defaults.to_dict() == {"min_samples": 100, "alpha": 0.001, "rate_margin": 0.05, "ks_statistic": 0.1, "psi": 0.25}
    assert check_drift_thresholds(None) == defaults and check_drift_thresholds(defaults) is defaults
    custom = DriftThresholds.from_dict({"alpha": 0.01, "psi": 0.1})
    assert custom == DriftThresholds(alpha=0.01, psi=0.1) and DriftThresholds.from_dict(custom.to_dict()) == custom
    with pytest.raises(dataclasses.FrozenInstanceError):
        custom.alpha = 0.5  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"may only set \['min_samples', .*\]. Got unknown keys \['alhpa'\]"):
        DriftThresholds.from_dict({"alhpa": 0.01})
    with pytest.raises(ValueError, match=r"The 'alpha' parameter of DriftThresholds must be in \(0, 1\). Got 1.5 instead."):
        DriftThresholds(alpha=1.5)
    with pytest.raises(ValueError, match="'alpha' parameter of DriftThresholds must be in \\(0, 1\\). Got nan"):
        DriftThresholds(alpha=float("nan"))
    with pytest.raises(TypeError, match="'psi' parameter of DriftThresholds must be a float a finite float >= 0. Got str"):
        DriftThresholds(psi="0.2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'min_samples' parameter of DriftThresholds must be an integer >= 2. Got 1"):
        DriftThresholds(min_samples=1)
    with pytest.raises(TypeError, match="'min_samples' parameter of DriftThresholds must be an integer >= 2. Got float"):
        DriftThresholds(min_samples=10.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'rate_margin' parameter of DriftThresholds must be in \\[0, 1\\)"):
        DriftThresholds(rate_margin=1.0)


# ----------------------------------------------------------------------------- selections


def test_summarize_selections_carries_the_verdict() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (1200,), generator=g)
    logits = 1.5 * torch.randn(1200, 4, generator=g)
    logits[torch.arange(1200), labels] += 4.0
    bundle = fit_selector(logits, labels, q=0.95)
    same = summarize_selections(bundle, selections_table(bundle, bundle.primary.logits))
    assert same["verdict"] == "ok" and same["ks_statistic"] == pytest.approx(0.0, abs=1e-9)
    assert same["rejected"] == same["samples"] - same["selected"]
    noise = summarize_selections(bundle, selections_table(bundle, 0.3 * torch.randn(300, 4, generator=g)))
    assert noise["verdict"] == "drift" and noise["rejection_rate"] > 0.9 and noise["ks_statistic"] > 0.9
    lenient = summarize_selections(bundle, selections_table(bundle, 0.3 * torch.randn(300, 4, generator=g)), {"min_samples": 1000})
    assert lenient["verdict"] == "insufficient" and lenient["thresholds"]["min_samples"] == 1000
    for key in ("binomial_pvalue", "rate_pvalue", "psi", "reasons", "mean_score", "calibration_mean_score", "non_finite"):
        assert key in noise
    json.dumps(noise, allow_nan=False)


@pytest.mark.parametrize(("n", "k", "m"), [(100, 15, 300), (4_000_000, 250_000, 1_000_000), (7, 0, 0), (1, 3, 3)])
def test_the_beta_binomial_pmf_is_scipys(n: int, k: int, m: int) -> None:
    from seapig_core.drift import _BetaBinomial

    a, b = k + 0.5, m - k + 0.5
    xs = np.unique(np.r_[np.linspace(0, n, 50).round().astype(np.int64), 0, n])
    mine, theirs = _BetaBinomial(n, a, b), stats.betabinom(n, a, b)
    np.testing.assert_allclose(mine.logpmf(xs), theirs.logpmf(xs), rtol=1e-13, atol=1e-9)
    np.testing.assert_allclose(mine.pmf(xs), theirs.pmf(xs), rtol=1e-12, atol=1e-300)
    assert float(mine.logpmf(int(xs[len(xs) // 2]))) == pytest.approx(float(theirs.logpmf(int(xs[len(xs) // 2]))), rel=1e-13)
