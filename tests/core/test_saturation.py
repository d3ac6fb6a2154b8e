"""Issue 11, item 1: no silent blindness where float32 probabilities saturate.

The issue's case: float32 logits, 10 classes, the true class +15 over N(0, 3^2) noise
(accuracy ~0.999), temperature ~0.2. The float32 softmax score of almost every calibration
sample is exactly -1.0, so the plain 0.95-quantile threshold was -1.0 and ``score < -1.0``
selected nothing: coverage 0.0, silently.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from seapig_core import SCORES, SelectionWarning, SoftmaxScore, load_score
from seapig_core.scores.thresholds import SEPARATING_SCORES, quantile_threshold
from tests.core.reference import LAYOUTS, SCORE_NAMES, layout_id

LAYOUT_IDS = [layout_id(layout) for layout in LAYOUTS]
ISSUE_T = 0.1985  # the temperature fitted in the issue
Q = 0.95


def saturated_case(task: str, per_member: bool, shape, n: int = 4000, seed: int = 0):
    """The issue's data in any layout: the right class (or label sign) +15 over N(0, 3^2) noise."""
    rng = np.random.default_rng(seed)
    full = shape(n, 10, 3)
    z = rng.normal(0.0, 3.0, full)
    if task == "multilabel":
        y = rng.integers(0, 2, (n, full[1]))
        sign = 2.0 * y - 1.0
        z += 15.0 * (sign[..., None] if per_member else sign)
        return z.astype(np.float32), y.astype(np.float32)
    two_logits = task == "multiclass" or (len(full) >= 2 and full[1] == 2)
    y = rng.integers(0, full[1] if task == "multiclass" else 2, n)
    if two_logits:
        z[np.arange(n), y] += 15.0
    else:  # single-logit binary: the logit's sign is the class
        z += 15.0 * (2.0 * y - 1.0).reshape((n,) + (1,) * (len(full) - 1))
    return z.astype(np.float32), y


def _calibrated(name, task, per_member, x, y, temperature):
    score = SCORES[name](temperature=temperature, task=task, per_member=per_member)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if temperature is None:
            score.fit(x, y)
        else:
            score.calibrate(x, y)
        score.set_threshold(Q)
    return score, [w for w in caught if issubclass(w.category, SelectionWarning)]


@pytest.mark.parametrize("temperature", [ISSUE_T, None], ids=["issue-T", "fitted-T"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("name", SCORE_NAMES)
def test_saturated_calibration_reaches_q_or_warns_with_the_cause(name, layout, temperature):
    task, per_member, shape = layout
    x, y = saturated_case(task, per_member, shape)
    score, caught = _calibrated(name, task, per_member, x, y, temperature)
    coverage = float(score.select(x)["selected"].double().mean())
    assert coverage > 0.5, (name, score.threshold, coverage)  # never silently blind
    if abs(coverage - Q) > 0.01:
        codes = {d["code"] for d in score.diagnostics}
        assert codes & {"saturated", "ties"}, score.diagnostics
        messages = [str(w.message) for w in caught]
        tie = next(m for m in messages if "tied at" in m)
        assert f"{coverage:.1%}" in tie and "q = 0.95" in tie
        assert any(other in tie for other in SEPARATING_SCORES)  # the score that separates them
    if name in ("energy", "margin", "max_logit"):  # unbounded: they never saturate
        assert abs(coverage - Q) <= 0.01


def test_the_issue_case_selects_the_saturated_group_and_says_so():
    x, y = saturated_case("multiclass", False, LAYOUTS[0][2])
    assert (x.argmax(axis=1) == y).mean() > 0.998
    score = SoftmaxScore(temperature=ISSUE_T).calibrate(x, y)
    n_tied = int((score.scores == -1.0).sum())
    tied = n_tied / len(x)
    assert tied > Q  # the plain quantile is -1.0, and `score < -1.0` selects nothing
    assert np.nanquantile(score.scores.double().numpy(), Q) == -1.0
    with pytest.warns(SelectionWarning) as caught:
        score.set_threshold(Q)
    assert score.threshold == float(np.nextafter(np.float32(-1.0), np.float32(0.0)))
    assert int(score.select(x)["selected"].sum()) == n_tied
    [diag] = score.diagnostics
    assert diag["code"] == "saturated" and diag["severity"] == "warning"
    message = str(caught[0].message)
    assert message == diag["message"]
    for part in (f"{n_tied:,} of 4,000", "tied at -1", "saturates in float32", "T = 0.1985",
                 "energy, margin or max_logit", "float64 logits or a larger temperature"):
        assert part in message, (part, message)
    # The same data in float64 are not saturated: no warning, coverage q.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = SoftmaxScore(temperature=ISSUE_T).calibrate(x.astype(np.float64), y).set_threshold(Q)
    assert float(exact.select(x.astype(np.float64))["selected"].double().mean()) == pytest.approx(Q, abs=1e-3)


def test_diagnostics_survive_state_dict_and_save_load(tmp_path):
    x, y = saturated_case("multiclass", False, LAYOUTS[0][2], n=500)
    with pytest.warns(SelectionWarning):
        score = SoftmaxScore(temperature=ISSUE_T).calibrate(x, y).set_threshold(Q)
    state = json.loads(json.dumps(score.state_dict()))
    assert state["state"]["diagnostics"] == score.diagnostics
    loaded = load_score(score.save(tmp_path / "s.arrow"), include_logits=False)
    assert loaded.diagnostics == score.diagnostics
    # A new threshold replaces the threshold's diagnostics; energy has none.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        energy = SCORES["energy"](temperature=ISSUE_T).calibrate(x, y).set_threshold(Q)
    assert energy.diagnostics == []


@pytest.mark.parametrize("name", ["entropy", "certainty_ratio"])
def test_entropy_and_certainty_ratio_keep_their_ranking_where_probabilities_saturate(name):
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 60
    x, _ = saturated_case("multiclass", False, LAYOUTS[0][2], n=300, seed=1)
    got = SCORES[name](temperature=ISSUE_T).score(x).double().numpy()
    beta = 1 / mpmath.mpf(ISSUE_T)
    exact = []
    for row in x.astype(np.float64):
        logits = [mpmath.mpf(float(v)) * beta for v in row]
        top = max(logits)
        weights = [mpmath.e ** (v - top) for v in logits]
        total = mpmath.fsum(weights)
        p = [w / total for w in weights]
        if name == "entropy":
            exact.append(float(-mpmath.fsum(pk * mpmath.log(pk) for pk in p)))
        else:
            first, second = sorted(p)[-1], sorted(p)[-2]
            exact.append(float(second / first))
    exact = np.asarray(exact)
    representable = exact > 1e-36  # float32's normal range
    assert representable.mean() > 0.9
    # Where max p is exactly 1.0 in float32 these values are still accurate and distinct...
    assert (SoftmaxScore(temperature=ISSUE_T).score(x).numpy()[representable] == -1.0).mean() > 0.9
    np.testing.assert_allclose(got[representable], exact[representable], rtol=1e-4)
    # ...so they rank the samples as the exact values do.
    order = np.argsort(exact[representable])
    assert (np.diff(got[representable][order]) >= 0).all()


def test_two_sample_calibration_warns_instead_of_selecting_nothing():
    x, y = saturated_case("multiclass", False, LAYOUTS[0][2], n=2)
    with pytest.warns(SelectionWarning) as caught:
        score = SoftmaxScore().fit(x, y).set_threshold(Q)
    codes = [d["code"] for d in score.diagnostics]
    assert codes[0] == "temperature_at_bound" and codes[1] in ("saturated", "few_samples")
    assert "lower bound T = 0.001" in str(caught[0].message)
    assert score.temperature_fit.at_bound
    assert bool(score.select(x)["selected"].any())  # not silently blind


def test_few_distinct_samples_warn_about_the_coverage_step():
    scores = torch.tensor([0.1, 0.2], dtype=torch.float32)
    choice = quantile_threshold(scores, 0.95, score_name="energy")
    assert choice.n_selected == 1 and choice.coverage == 0.5
    [diag] = choice.diagnostics
    assert diag["code"] == "few_samples" and "steps of 50.0%" in diag["message"]


def test_many_classes_few_rows_pin_the_temperature_and_warn():
    # The issue's 50,000 classes with 400 rows, scaled down (same mechanism, a test-sized cost):
    # every row is classified correctly, so the NLL decreases all the way to T_MIN.
    rng = np.random.default_rng(0)
    n, k = 80, 5000
    y = rng.integers(0, k, n)
    x = rng.standard_normal((n, k), dtype=np.float32)
    x[np.arange(n), y] += 10.0
    with pytest.warns(SelectionWarning) as caught:
        score = SoftmaxScore().fit(x, y).set_threshold(Q)
    assert score.temperature == 1e-3 and score.temperature_fit.at_bound
    codes = [d["code"] for d in score.diagnostics]
    assert codes == ["temperature_at_bound", "saturated"]
    assert "80 labelled calibration samples" in str(caught[0].message)
    assert "5,000 classes" in str(caught[0].message)
    assert float(score.select(x)["selected"].float().mean()) == 1.0  # was 0 of 400 in the issue


@pytest.mark.slow
def test_the_issue_case_of_50000_classes_and_400_rows():
    rng = np.random.default_rng(0)
    n, k = 400, 50_000
    y = rng.integers(0, k, n)
    x = rng.standard_normal((n, k), dtype=np.float32)
    x[np.arange(n), y] += 10.0
    with pytest.warns(SelectionWarning, match="lower bound T = 0.001"):
        score = SoftmaxScore().fit(x, y).set_threshold(Q)
    assert [d["code"] for d in score.diagnostics] == ["temperature_at_bound", "saturated"]
    assert bool(score.select(x)["selected"].all())


def test_temperature_at_the_upper_bound_names_uninformative_logits():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 4)).astype(np.float32) * 1e-3
    y = rng.integers(0, 4, 500)
    x[np.arange(500), (y + 1) % 4] += 0.05  # the logits point away from the labels
    with pytest.warns(SelectionWarning, match=r"upper bound T = 1000.*no information"):
        score = SoftmaxScore().fit(x, y)
    assert score.diagnostics[0]["code"] == "temperature_at_bound"


def test_risk_threshold_on_saturated_scores_warns():
    x, y = saturated_case("multiclass", False, LAYOUTS[0][2], n=2000)
    score = SoftmaxScore(temperature=ISSUE_T).calibrate(x, y)
    with pytest.warns(SelectionWarning, match="tied at -1"):
        score.set_risk_threshold(0.01, delta=0.05)
    assert [d["code"] for d in score.diagnostics] == ["saturated"]
    assert score.risk_threshold.n_selected > 0


def test_thresholds_are_values_of_the_score_dtype():
    # A float64 quantile between two float32 scores selects the same samples in either dtype.
    rng = np.random.default_rng(5)
    scores = torch.from_numpy(rng.standard_normal(1001).astype(np.float32))
    for q in (0.1, 0.37, 0.5, 0.9, 0.999):
        choice = quantile_threshold(scores, q)
        assert float(np.float32(choice.threshold)) == choice.threshold
        as32 = int((scores < choice.threshold).sum())
        as64 = int((scores.double() < choice.threshold).sum())
        assert as32 == as64 == choice.n_selected
        assert abs(choice.coverage - q) <= 1 / 1001 + 1e-12
