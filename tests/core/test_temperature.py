"""Temperature scaling: the fitted T is the NLL optimum, checked by an independent dense search."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import expit, logsumexp

from seapig_core import EntropyScore, SoftmaxScore, TemperatureFitError
from seapig_core import temperature as temperature_module
from seapig_core.layout import canonicalize, check_labels
from seapig_core.temperature import T_MAX, T_MIN, fit_temperature, negative_log_likelihood
from tests.core.reference import LAYOUTS, layout_id, member_vectors, reference_nll

# --------------------------------------------------------------------------- independent reference


def _rows(logits: np.ndarray, labels: np.ndarray, task: str, per_member: bool):
    """Flatten to one row per sample-member, with the sample's label repeated (float64)."""
    samples, family, _ = member_vectors(logits, task, per_member)
    rows, targets = [], []
    for i, members in enumerate(samples):
        for z in members:
            rows.append(z)
            targets.append(labels[i])
    return np.asarray(rows, dtype=np.float64), np.asarray(targets), family


def _nll_curve(rows: np.ndarray, targets: np.ndarray, family: str, temperatures: np.ndarray) -> np.ndarray:
    """NLL at each temperature, vectorised with SciPy (independent of the library)."""
    out = np.empty(len(temperatures))
    for j, t in enumerate(temperatures):
        a = rows / t
        if family == "categorical":
            out[j] = np.mean(logsumexp(a, axis=1) - a[np.arange(len(a)), targets.astype(int)])
        else:
            y = targets.reshape(a.shape).astype(np.float64)
            out[j] = np.mean(np.sum(np.logaddexp(0.0, a) - y * a, axis=1))
    return out


def dense_search(rows, targets, family, lo=T_MIN, hi=T_MAX) -> tuple[float, float]:
    """Grid over log T, then three 10x zoomed grids around the best point: (T, NLL).

    The last grid's step in log10 T is 5e-5 (T varies by 1e-4 relative), which bounds the
    search's own NLL error far below the 1e-6 nats being checked.
    """
    grid = np.geomspace(lo, hi, 121)
    for _ in range(3):
        values = _nll_curve(rows, targets, family, grid)
        best = int(np.argmin(values))
        if best in (0, len(grid) - 1):
            return float(grid[best]), float(values[best])
        grid = np.geomspace(grid[best - 2], grid[best + 2], 41)
    values = _nll_curve(rows, targets, family, grid)
    best = int(np.argmin(values))
    return float(grid[best]), float(values[best])


# --------------------------------------------------------------------------- data


def synthetic(task: str, per_member: bool, shape, n: int, seed: int, overconfidence: float = 2.5):
    """Labels drawn from the model's own probabilities at T=1, logits sharpened by `overconfidence`."""
    rng = np.random.default_rng(seed)
    full_shape = shape(n, 5, 3)
    if per_member:  # members scatter around one shared logit vector, as in an ensemble
        base = rng.standard_normal(full_shape[:-1]) * 1.5
        true = base[..., None] + 0.3 * rng.standard_normal(full_shape)
    else:
        true = rng.standard_normal(full_shape) * 1.5
    samples, family, single = member_vectors(true, task, per_member)
    labels = []
    for members in samples:
        z = members[0]  # the first member's distribution generates the label
        if family == "categorical":
            p = np.exp(z - logsumexp(z))
            labels.append(rng.choice(len(z), p=p))
        else:
            draws = (rng.random(len(z)) < expit(z)).astype(np.float32)
            labels.append(draws[0] if single else draws)
    return (true * overconfidence).astype(np.float32), np.asarray(labels)


# --------------------------------------------------------------------------- tests


def test_cifar100_temperature_is_the_nll_optimum_and_helps_held_out(cifar100):
    logits, labels = cifar100
    half = len(labels) // 2
    score = SoftmaxScore().fit(logits[:half], labels[:half])
    fit = score.temperature_fit

    rows = logits[:half].astype(np.float64)
    ref_t, ref_nll = dense_search(rows, labels[:half], "categorical")
    ours = _nll_curve(rows, labels[:half], "categorical", np.array([score.temperature]))[0]
    assert abs(ours - ref_nll) <= 1e-6
    assert ours <= ref_nll + 1e-9  # never worse than the search
    assert score.temperature == pytest.approx(ref_t, rel=1e-3)
    assert fit.nll_after == pytest.approx(ours, abs=1e-9)
    assert 1.5 < score.temperature < 3.0  # the record is overconfident
    assert not fit.at_bound

    held = logits[half:].astype(np.float64)
    before, after = _nll_curve(held, labels[half:], "categorical", np.array([1.0, score.temperature]))
    assert after < before


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout_id(layout) for layout in LAYOUTS])
def test_synthetic_temperature_is_the_nll_optimum_for_every_task(layout):
    task, per_member, shape = layout
    n = 400 if per_member else 1200
    logits, labels = synthetic(task, per_member, shape, 2 * n, seed=len(layout_id(layout)))
    score = EntropyScore(task=task, per_member=per_member).fit(logits[:n], labels[:n])

    rows, targets, family = _rows(logits[:n], labels[:n], task, per_member)
    _, ref_nll = dense_search(rows, targets, family)
    ours = _nll_curve(rows, targets, family, np.array([score.temperature]))[0]
    assert abs(ours - ref_nll) <= 1e-6, (score.temperature, ours, ref_nll)
    # The library's own NLL agrees with the loop-per-sample reference.
    assert score.temperature_fit.nll_after == pytest.approx(
        reference_nll(logits[:n], labels[:n], task, per_member, score.temperature), abs=1e-9
    )
    assert 1.5 < score.temperature < 4.0  # recovers the sharpening of 2.5

    held_rows, held_targets, _ = _rows(logits[n:], labels[n:], task, per_member)
    before, after = _nll_curve(held_rows, held_targets, family, np.array([1.0, score.temperature]))
    assert after <= before


def test_fit_is_deterministic_bit_for_bit(cifar100):
    logits, labels = cifar100
    first = SoftmaxScore().fit(logits[:3000], labels[:3000]).temperature
    second = SoftmaxScore().fit(torch.from_numpy(logits[:3000].copy()), labels[:3000]).temperature
    assert first == second


def test_constant_logits_keep_t_one():
    logits = np.zeros((50, 4), dtype=np.float32)
    labels = np.arange(50) % 4
    fit = SoftmaxScore().fit(logits, labels).temperature_fit
    assert fit.temperature == 1.0
    assert fit.nll_after == pytest.approx(np.log(4))


def test_all_labels_equal_and_separated_data_stop_at_the_lower_bound():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((100, 3)).astype(np.float32)
    logits[:, 0] += 5.0  # class 0 always wins, and is always the label
    score = SoftmaxScore().fit(logits, np.zeros(100, dtype=int))
    assert score.temperature == pytest.approx(T_MIN)
    assert score.temperature_fit.at_bound
    assert np.isfinite(score.scores.numpy()).all()


def test_always_wrong_confident_logits_stop_at_the_upper_bound():
    logits = np.tile(np.array([[6.0, -6.0]], dtype=np.float32), (40, 1))
    labels = np.ones(40, dtype=int)  # the model is confidently wrong every time
    score = SoftmaxScore(task="binary").fit(logits, labels)
    assert score.temperature == pytest.approx(T_MAX)
    assert score.temperature_fit.at_bound


def test_non_convergence_raises_instead_of_falling_back(monkeypatch, cifar100):
    logits, labels = cifar100
    monkeypatch.setattr(temperature_module, "_MAX_ITER", 1)
    with pytest.raises(TemperatureFitError, match="did not converge"):
        SoftmaxScore().fit(logits[:2000], labels[:2000])


def test_constructor_temperature_is_kept_without_labels_and_replaced_with_labels(cifar100):
    logits, labels = cifar100
    kept = SoftmaxScore(temperature=3.0).fit(logits[:500])
    assert kept.temperature == 3.0 and kept.temperature_fit is None
    np.testing.assert_allclose(kept.scores.numpy(), SoftmaxScore(temperature=3.0).score(logits[:500]).numpy())
    refit = SoftmaxScore(temperature=3.0).fit(logits[:500], labels[:500])
    assert refit.temperature != 3.0 and refit.temperature_fit is not None


def test_negative_log_likelihood_matches_reference_at_any_temperature(cifar100):
    logits, labels = cifar100
    canon = canonicalize(logits[:1000], "multiclass")
    y = check_labels(labels[:1000], canon)
    for t in (0.5, 1.0, 2.2):
        want = _nll_curve(logits[:1000].astype(np.float64), labels[:1000], "categorical", np.array([t]))[0]
        assert negative_log_likelihood(canon, y, t) == pytest.approx(want, abs=1e-10)


def test_bounds_are_validated():
    canon = canonicalize(np.zeros((3, 2)), "multiclass")
    y = check_labels(np.array([0, 1, 0]), canon)
    for bad in [(0.0, 1.0), (2.0, 1.0), (1.0, float("inf"))]:
        with pytest.raises(ValueError, match="'bounds' parameter"):
            fit_temperature(canon, y, bounds=bad)
