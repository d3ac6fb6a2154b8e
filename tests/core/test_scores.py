"""Every score x task x member layout against an independent float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.special import softmax

import seapig_core
from seapig_core import SCORES
from seapig_core.scores import logits as logits_module
from tests.core.reference import LAYOUTS, SCORE_NAMES, layout_id, member_vectors, reference_scores

LAYOUT_IDS = [layout_id(layout) for layout in LAYOUTS]


def _logits(rng: np.random.Generator, shape, scale: float = 3.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def test_public_api_is_importable_from_every_documented_path():
    for name in (
        "LogitScore",
        "SoftmaxScore",
        "EntropyScore",
        "EnergyScore",
        "MarginScore",
        "MaxLogitScore",
        "CertaintyRatioScore",
        "ProbabilityMarginScore",
        "ConfidenceScore",
    ):
        cls = getattr(logits_module, name)
        assert getattr(seapig_core.scores, name) is cls
        assert getattr(seapig_core, name) is cls
    # The class-logit scores, and the learned confidence head's (tests/core/test_confidence.py).
    assert set(SCORES) == {*SCORE_NAMES, "confidence"}


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("name", SCORE_NAMES)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_scores_match_float64_reference(name, layout, temperature):
    task, per_member, shape = layout
    rng = np.random.default_rng(abs(hash((name, task, per_member, temperature))) % 2**32)
    x = _logits(rng, shape(64, 5, 3))
    got = SCORES[name](temperature=temperature, task=task, per_member=per_member).score(torch.from_numpy(x))
    want = reference_scores(x, name, task, per_member, temperature)
    assert got.shape == (64,)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("name", SCORE_NAMES)
def test_float64_input_is_scored_in_float64(name, layout):
    task, per_member, shape = layout
    x = _logits(np.random.default_rng(1), shape(32, 4, 2)).astype(np.float64)
    got = SCORES[name](temperature=1.3, task=task, per_member=per_member).score(x)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), reference_scores(x, name, task, per_member, 1.3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("name", SCORE_NAMES)
def test_extreme_logits_give_finite_scores_matching_reference(name, layout):
    task, per_member, shape = layout
    rng = np.random.default_rng(7)
    x = rng.uniform(-1e4, 1e4, size=shape(48, 6, 3)).astype(np.float32)
    x.reshape(-1)[::5] = 1e4  # exact extremes and ties at the top
    x.reshape(-1)[1::7] = -1e4
    got = SCORES[name](task=task, per_member=per_member).score(x).numpy()
    assert np.isfinite(got).all()
    want = reference_scores(x, name, task, per_member, 1.0)
    # Scores of size ~1e4 (energy, margin, max-logit) carry float32's ~1e-3 absolute rounding.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _is_single_logit(task: str, per_member: bool, shape: tuple[int, ...]) -> bool:
    if task != "binary":
        return False
    if per_member:
        return len(shape) == 2 or shape[1] == 1
    return len(shape) == 1 or shape[1] == 1


def _confident_and_uncertain(task: str, per_member: bool, shape) -> tuple[np.ndarray, np.ndarray]:
    """One clearly confident and one clearly uncertain sample in the given layout (unit axis 1)."""
    template = np.zeros(shape(1, 4, 3), dtype=np.float32)
    confident, uncertain = template.copy(), template.copy()
    if _is_single_logit(task, per_member, template.shape):
        confident[...], uncertain[...] = 8.0, 0.1  # a single logit's magnitude is its confidence
    elif task == "multilabel":
        confident[...], uncertain[...] = -8.0, 0.1
        confident[0, 0, ...] = 8.0
    else:
        n_units = template.shape[1]
        confident[0, 0, ...] = 8.0
        uncertain[0, ...] = np.linspace(0.3, 0.0, n_units).reshape((n_units,) + (1,) * (template.ndim - 2))
    return confident, uncertain


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("name", SCORE_NAMES)
def test_confident_sample_scores_below_uncertain_sample(name, layout):
    task, per_member, shape = layout
    confident, uncertain = _confident_and_uncertain(task, per_member, shape)
    scorer = SCORES[name](task=task, per_member=per_member)
    both = np.concatenate([confident, uncertain])
    scores = scorer.score(both).numpy()
    assert scores[0] < scores[1], (name, task, scores)


@pytest.mark.parametrize("name", SCORE_NAMES)
def test_certainty_ratio_and_probability_scores_have_documented_ranges(name):
    x = _logits(np.random.default_rng(3), (500, 10), scale=4.0)
    scores = SCORES[name]().score(x).numpy()
    if name == "softmax":
        assert ((scores >= -1.0) & (scores <= -0.1 + 1e-6)).all()
    elif name == "entropy":
        assert ((scores >= 0.0) & (scores <= np.log(10) + 1e-6)).all()
    elif name == "certainty_ratio":
        assert ((scores > 0.0) & (scores <= 1.0)).all()
    elif name == "margin":
        assert (scores <= 0.0).all()


def test_certainty_ratio_reports_runner_up_class():
    x = np.array([[0.0, 5.0, 4.0, -1.0], [3.0, -2.0, 1.0, 2.9]], dtype=np.float32)
    score = SCORES["certainty_ratio"]()
    np.testing.assert_array_equal(score.alternate_label(x).numpy(), [2, 3])
    score.fit(x).set_threshold(0.5)
    out = score.select(x)
    np.testing.assert_array_equal(out["alternate_label"].numpy(), [2, 3])
    np.testing.assert_allclose(out["score"].numpy(), np.exp([-1.0, -0.1]), rtol=1e-6)


@pytest.mark.parametrize(
    ("task", "per_member", "x", "expected"),
    [
        ("binary", False, np.array([2.0, -3.0, 0.5]), [0, 1, 0]),  # the class not predicted
        ("binary", False, np.array([[0.0, 2.0], [1.0, -1.0], [0.2, 0.1]]), [0, 1, 1]),
        ("multilabel", False, np.array([[4.0, -0.1, 2.0], [0.05, 3.0, -3.0]]), [1, 0]),  # label nearest 0
        # members disagree (argmax 0 vs 1): mean probabilities [0.39, 0.56, 0.05] -> runner-up 0
        ("multiclass", True, np.array([[[3.0, 0.0], [2.0, 2.5], [0.0, 0.0]]]), [0]),
    ],
)
def test_alternate_label_for_every_task(task, per_member, x, expected):
    score = SCORES["certainty_ratio"](task=task, per_member=per_member)
    np.testing.assert_array_equal(score.alternate_label(x.astype(np.float32)).numpy(), expected)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_predict_matches_argmax_of_member_averaged_probabilities(layout):
    task, per_member, shape = layout
    rng = np.random.default_rng(11)
    x = _logits(rng, shape(40, 5, 3))
    got = SCORES["softmax"](temperature=1.7, task=task, per_member=per_member).predict(x).numpy()
    samples, family, single = member_vectors(x, task, per_member)
    from scipy.special import expit, softmax

    for i, members in enumerate(samples):
        if family == "categorical":
            probs = np.mean([softmax(z / 1.7) for z in members], axis=0)
            assert got[i] == np.argmax(probs)
        else:
            probs = np.mean([expit(z / 1.7) for z in members], axis=0)
            np.testing.assert_array_equal(np.reshape(got[i], -1), (probs > 0.5).astype(int))


@pytest.mark.parametrize("name", SCORE_NAMES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_non_finite_logits_score_nan_and_are_never_selected(name, layout):
    task, per_member, shape = layout
    rng = np.random.default_rng(5)
    calibration = _logits(rng, shape(50, 4, 2))
    query = _logits(rng, shape(6, 4, 2))
    flat = query.reshape(6, -1)
    flat[1, 0] = np.nan
    flat[2, -1] = np.inf
    flat[3, 0] = -np.inf
    query = flat.reshape(query.shape)
    score = SCORES[name](task=task, per_member=per_member).fit(calibration).set_threshold(0.9999)
    out = score.select(query)
    bad = np.array([False, True, True, True, False, False])
    assert np.isnan(out["score"].numpy()[bad]).all()
    assert np.isfinite(out["score"].numpy()[~bad]).all()
    assert not out["selected"].numpy()[bad].any()
    assert (score.predict(query).numpy().reshape(6, -1)[bad] == -1).all()


@pytest.mark.parametrize("name", SCORE_NAMES)
def test_identical_members_equal_single_member(name):
    x = _logits(np.random.default_rng(2), (30, 6))
    stacked = np.repeat(x[:, :, None], 4, axis=2)
    single = SCORES[name](temperature=1.4).score(x)
    members = SCORES[name](temperature=1.4, per_member=True).score(stacked)
    np.testing.assert_allclose(members.numpy(), single.numpy(), rtol=1e-6, atol=1e-6)


def test_large_inputs_are_scored_blockwise_like_small_ones():
    # Several row blocks plus a ragged tail: blocking must not change any value.
    x = _logits(np.random.default_rng(9), (70_001, 7))
    for name in SCORE_NAMES:
        got = SCORES[name]().score(x).numpy()
        head = SCORES[name]().score(x[:1000]).numpy()
        tail = SCORES[name]().score(x[-3:]).numpy()
        np.testing.assert_array_equal(got[:1000], head)
        np.testing.assert_array_equal(got[-3:], tail)


def test_score_accepts_numpy_lists_and_keeps_tensor_device():
    x = [[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]]
    from_list = SCORES["entropy"]().score(x)
    from_tensor = SCORES["entropy"]().score(torch.tensor(x))
    assert from_list.dtype == torch.float64  # NumPy's default float, as np.asarray(x) gives
    torch.testing.assert_close(from_list, from_tensor, check_dtype=False)
    assert from_tensor.device.type == "cpu"
    half = SCORES["entropy"]().score(torch.tensor(x, dtype=torch.float16))
    assert half.dtype == torch.float32


finite_floats = st.floats(-50, 50, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float32, st.tuples(st.integers(1, 8), st.integers(2, 6)), elements=finite_floats),
    st.floats(-20, 20, allow_nan=False),
    st.sampled_from(["softmax", "entropy", "margin", "certainty_ratio"]),
)
def test_shift_invariant_scores_ignore_a_constant_added_to_all_logits(x, shift, name):
    base = SCORES[name]().score(x.astype(np.float64)).numpy()
    shifted = SCORES[name]().score(x.astype(np.float64) + shift).numpy()
    np.testing.assert_allclose(shifted, base, rtol=1e-9, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(2, 6)), elements=st.floats(-30, 30)),
    st.sampled_from(SCORE_NAMES),
    st.randoms(use_true_random=False),
)
def test_scores_are_invariant_to_class_order(x, name, random):
    order = list(range(x.shape[1]))
    random.shuffle(order)
    np.testing.assert_allclose(
        SCORES[name]().score(x[:, order]).numpy(), SCORES[name]().score(x).numpy(), rtol=1e-12, atol=1e-12
    )


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(2, 6)), elements=st.floats(-10, 10)),
    st.floats(0.2, 5.0),
)
def test_entropy_grows_with_temperature(x, t):
    # d H(softmax(z / T)) / dT >= 0: softening never lowers the entropy.
    low = SCORES["entropy"](temperature=t).score(x).numpy()
    high = SCORES["entropy"](temperature=t * 1.5).score(x).numpy()
    assert (high >= low - 1e-12).all()


def test_probability_margin_has_everything_the_other_scores_have(tmp_path, cifar100):
    # Issue 11.3: registry, fit, quantile and guaranteed-risk thresholds, save/load, and the
    # seeds' softmax-lab formula (sorted_probs[0] - sorted_probs[1], negated) in float64.
    from seapig_core import ProbabilityMarginScore, load_score, make_score

    logits, labels = cifar100
    score = make_score("probability_margin")
    assert isinstance(score, ProbabilityMarginScore) and SCORES["probability_margin"] is ProbabilityMarginScore
    score.fit(logits[:4000], labels[:4000]).calibrate(logits[4000:8000], labels[4000:8000])
    probs = softmax(logits[8000:].astype(np.float64) / score.T, axis=1)
    top2 = np.sort(probs, axis=1)[:, -2:]
    np.testing.assert_allclose(score.score(logits[8000:]).numpy(), -(top2[:, 1] - top2[:, 0]), rtol=1e-5, atol=1e-6)
    score.set_threshold(0.9)
    coverage = float(score.select(logits[4000:8000])["selected"].double().mean())
    assert abs(coverage - 0.9) <= 1e-3
    score.set_risk_threshold(0.1, delta=0.05)
    assert score.risk_threshold.risk_bound <= 0.1 and score.risk_threshold.n_selected > 0
    loaded = load_score(score.save(tmp_path / "pm.arrow"))
    assert type(loaded) is ProbabilityMarginScore and loaded.threshold == score.threshold
    torch.testing.assert_close(loaded.select(logits[8000:])["selected"], score.select(logits[8000:])["selected"])
    # It ranks differently from the logit margin (spread-out mass shrinks the probability gap).
    from scipy.stats import spearmanr

    logit_margin = SCORES["margin"](temperature=score.T).score(logits[8000:]).numpy()
    assert spearmanr(logit_margin, score.score(logits[8000:]).numpy()).statistic < 0.999
