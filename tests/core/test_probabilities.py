"""seapig_core.probabilities: probabilities as input (issue 11 item 4, library side), checked
against direct NumPy/SciPy formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import expit, softmax

import seapig_core
from seapig_core.probabilities import SUM_TOLERANCE, check_probabilities, logits_from_probabilities
from seapig_core.scores import CertaintyRatioScore, EnergyScore, EntropyScore, MaxLogitScore, SoftmaxScore
from tests.conftest import CIFAR100


def _dirichlet(n, k, seed, zeros=0.2, dtype=np.float64):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(k, 0.5), n)
    p[rng.random((n, k)) < zeros] = 0.0  # exact zeros, as float32 softmax underflow gives
    p[p.sum(axis=1) == 0, 0] = 1.0
    p /= p.sum(axis=1, keepdims=True)
    return p.astype(dtype)


# =========================================================================== round trip


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 50), st.integers(2, 30), st.sampled_from([np.float32, np.float64]), st.integers(0, 2**31 - 1))
def test_multiclass_round_trip(n, k, dtype, seed):
    p = _dirichlet(n, k, seed, dtype=dtype)
    z = logits_from_probabilities(p)
    assert z.dtype == torch.from_numpy(p).dtype and z.shape == p.shape
    assert bool(torch.isfinite(z).all())
    back = z.softmax(dim=1).numpy()
    tiny = np.finfo(dtype).tiny
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(back, p, rtol=rtol, atol=k * tiny)
    np.testing.assert_array_equal(back.argmax(axis=1), p.argmax(axis=1))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 50), st.integers(1, 6), st.sampled_from([np.float32, np.float64]), st.integers(0, 2**31 - 1))
def test_bernoulli_round_trip_with_zeros_and_ones(n, c, dtype, seed):
    rng = np.random.default_rng(seed)
    p = rng.random((n, c))
    p[rng.random((n, c)) < 0.15] = 0.0
    p[rng.random((n, c)) < 0.15] = 1.0
    p = p.astype(dtype)
    z = logits_from_probabilities(p, task="multilabel")
    assert bool(torch.isfinite(z).all())
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(z.sigmoid().numpy(), p, rtol=rtol, atol=np.finfo(dtype).tiny * 2)
    # Binary: one probability of class 1 per sample, (N,) or (N, 1).
    for shape in ((n,), (n, 1)):
        zb = logits_from_probabilities(p[:, 0].reshape(shape), task="binary")
        assert zb.shape == shape
        np.testing.assert_allclose(zb.sigmoid().numpy().reshape(-1), p[:, 0], rtol=rtol, atol=np.finfo(dtype).tiny * 2)
        # The sigmoid's inverse against a float64 reference where it is finite.
        inner = (p[:, 0] > 0) & (p[:, 0] < 1)
        ref = np.log(p[inner, 0].astype(np.float64)) - np.log1p(-p[inner, 0].astype(np.float64))
        np.testing.assert_allclose(zb.numpy().reshape(-1)[inner], ref, rtol=1e-5, atol=1e-5)


def test_two_column_binary_and_per_member():
    p = _dirichlet(40, 2, seed=1)
    z = logits_from_probabilities(p, task="binary")
    np.testing.assert_allclose(z.softmax(dim=1).numpy(), p, rtol=1e-12, atol=1e-300)
    members = np.stack([_dirichlet(30, 4, seed=s) for s in range(3)], axis=2)  # (N, C, M)
    zm = logits_from_probabilities(members, per_member=True)
    np.testing.assert_allclose(zm.softmax(dim=1).numpy(), members, rtol=1e-12, atol=1e-300)
    # Member scores of log-probability logits are those of the member probabilities.
    assert SoftmaxScore(per_member=True).score(zm).numpy() == pytest.approx(-members.max(axis=1).mean(axis=1))


def test_zeros_are_clipped_to_eps():
    p = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], dtype=np.float32)
    z = logits_from_probabilities(p)
    assert z[0, 1].item() == pytest.approx(np.log(np.finfo(np.float32).tiny))
    z = logits_from_probabilities(p, eps=1e-6)
    assert z[0, 1].item() == pytest.approx(np.log(1e-6), rel=1e-6)
    np.testing.assert_allclose(z.softmax(dim=1).numpy(), p, atol=3e-6)
    # Scoring the clipped rows gives finite scores: the samples stay valid.
    assert bool(torch.isfinite(EntropyScore().score(logits_from_probabilities(p))).all())


def test_the_shared_record_gives_its_log_probabilities(cifar100):
    """The record's softmax outputs (no exact zeros) become log p, the logits the tests use."""
    logits, labels = cifar100
    with np.load(CIFAR100, allow_pickle=False) as record:
        probs = record["predictions"]
    z = logits_from_probabilities(probs)
    np.testing.assert_allclose(z.numpy(), np.log(probs), rtol=3e-7)  # torch.log vs np.log: 1 ulp
    # The temperature fit on log p is that of the record's logits.
    assert SoftmaxScore().fit(z, labels).T == pytest.approx(SoftmaxScore().fit(logits, labels).T, rel=1e-6)


# =========================================================================== temperature


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0])
def test_a_temperature_on_log_probabilities_is_a_power_renormalised(T):
    """softmax(log p / T) = p^(1/T) / sum p^(1/T); sigmoid: p^(1/T) / (p^(1/T) + (1-p)^(1/T))."""
    p = _dirichlet(200, 6, seed=4, zeros=0.0)
    z = logits_from_probabilities(p)
    powered = p ** (1 / T) / (p ** (1 / T)).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(softmax(z.numpy() / T, axis=1), powered, rtol=1e-10)
    assert SoftmaxScore(temperature=T).score(z).numpy() == pytest.approx(-powered.max(axis=1), rel=1e-10)
    top2 = np.sort(p, axis=1)[:, -2:]
    assert CertaintyRatioScore(temperature=T).score(z).numpy() == pytest.approx((top2[:, 0] / top2[:, 1]) ** (1 / T), rel=1e-9)
    q = np.random.default_rng(5).random(100)
    zb = logits_from_probabilities(q, task="binary")
    expected = q ** (1 / T) / (q ** (1 / T) + (1 - q) ** (1 / T))
    np.testing.assert_allclose(expit(zb.numpy() / T), expected, rtol=1e-10)


def test_energy_and_max_logit_lose_their_meaning_on_log_probabilities():
    """As documented: the energy of log p at T = 1 is 0 for every sample; max_logit ranks like softmax."""
    p = _dirichlet(300, 8, seed=6, zeros=0.0)
    z = logits_from_probabilities(p)
    np.testing.assert_allclose(EnergyScore().score(z).numpy(), 0.0, atol=1e-12)
    order_max_logit = np.argsort(MaxLogitScore().score(z).numpy(), kind="stable")
    order_softmax = np.argsort(SoftmaxScore().score(z).numpy(), kind="stable")
    np.testing.assert_array_equal(order_max_logit, order_softmax)


# =========================================================================== validation


def test_bad_probabilities_name_the_argument():
    good = _dirichlet(5, 3, seed=0)
    with pytest.raises(TypeError, match=r"The 'p' parameter must be a torch.Tensor or numpy.ndarray\. Got str instead"):
        logits_from_probabilities("0.5")
    with pytest.raises(TypeError, match=r"The 'p' parameter must hold real numbers\. Got an array of dtype <U"):
        logits_from_probabilities(np.array([["a", "b"]]))
    bad = good.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"The 'p' parameter must contain only finite probabilities\. Got 1 sample\(s\) with NaN or infinite values \(first at row 2\) instead"):
        logits_from_probabilities(bad)
    logits = np.log(good + 0.1) * 3
    with pytest.raises(ValueError, match=r"The 'p' parameter must contain probabilities in \[0, 1\]\. Got values in .*\(5 sample\(s\) outside, first at row 0\) instead\. Pass logits as logits"):
        logits_from_probabilities(logits)
    unnormalised = good * 0.99
    with pytest.raises(ValueError, match=r"The 'p' parameter must hold rows that sum to 1 \(within 0\.00035\) for task='multiclass'\. Got 5 row\(s\) off by up to 0\.01 \(first at row 0\) instead\. For independent per-label probabilities use task='multilabel'"):
        logits_from_probabilities(unnormalised)
    logits_from_probabilities(unnormalised, task="multilabel")  # independent labels: no sum
    within = good * (1 + 0.5 * SUM_TOLERANCE)
    np.testing.assert_allclose(logits_from_probabilities(within).softmax(dim=1).numpy(), good, rtol=1e-12, atol=1e-300)
    with pytest.raises(ValueError, match=r"The 'p' parameter must have shape \(N, C\) for task='multiclass'\. Got shape \(5,\)"):
        logits_from_probabilities(good[:, 0])
    with pytest.raises(ValueError, match=r"The 'p' parameter must have shape \(N,\), \(N, 1\) or \(N, 2\) for task='binary'"):
        logits_from_probabilities(good, task="binary")
    with pytest.raises(ValueError, match=r"The 'task' parameter must be one of"):
        logits_from_probabilities(good, task="ranking")
    with pytest.raises(ValueError, match=r"The 'eps' parameter must be in \(0, 0\.5\)\. Got 0\.0 instead"):
        logits_from_probabilities(good, eps=0.0)
    with pytest.raises(TypeError, match=r"The 'eps' parameter must be a float in \(0, 0\.5\) or None\. Got str instead"):
        logits_from_probabilities(good, eps="tiny")
    with pytest.raises(ValueError, match=r"The 'scores' parameter must contain only finite"):
        check_probabilities(bad, name="scores")
    with pytest.raises(ValueError, match=r"The 'probabilities' column must contain probabilities in \[0, 1\]"):
        check_probabilities(logits, name="probabilities", what="column")


def test_exported_from_the_package():
    assert seapig_core.logits_from_probabilities is logits_from_probabilities
