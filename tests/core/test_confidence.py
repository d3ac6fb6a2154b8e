"""A learned confidence head (issue 11, item 5): the layout, ConfidenceScore, the pass, persistence,
bundles, extraction and the library pipeline.

The confidence travels as one extra trailing logit, ``(N, C + 1)`` (``(N, C + 1, M)`` with
members); ``confidence_head=True`` splits it off. References are independent: SciPy's ``expit``
of the stored column, and the class-logit scores of the class columns alone.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import expit
from torch.utils.data import DataLoader, TensorDataset

import seapig_core
from seapig_core import ConfidenceScore, SelectionWarning, SoftmaxScore, extract_logits, load_score, make_score
from seapig_core.bundle import CalibrationSettings, fit_selector, load_bundle
from seapig_core.kernels import score_pass
from seapig_core.layout import canonicalize
from seapig_core.pipeline import calibrate_file, score_file
from seapig_core.selections import read_selections, selections_table
from tests.core.reference import LAYOUTS, SCORE_NAMES, layout_id, random_labels, reference_scores

# Every layout of the reference with a unit axis (axis 1) that a confidence unit can join.
CLASS_LAYOUTS = [layout for layout in LAYOUTS if len(layout[2](7, 5, 3)) == (3 if layout[1] else 2)]


def _with_confidence(rng: np.random.Generator, task: str, per_member: bool, shape: tuple[int, ...], scale: float = 3.0):
    """(class logits, confidence logits (N,) or (N, M), joined (N, C + 1[, M])) as float32."""
    x = (scale * rng.standard_normal(shape)).astype(np.float32)
    c = (scale * rng.standard_normal((shape[0], *shape[2:]))).astype(np.float32)
    joined = np.concatenate([x, c[:, None]], axis=1)
    return x, c, joined


def _reference_confidence(c: np.ndarray) -> np.ndarray:
    """-sigmoid(c) in float64, averaged over members."""
    values = -expit(np.asarray(c, dtype=np.float64))
    return values if values.ndim == 1 else values.mean(axis=1)


# ----------------------------------------------------------------------------- the score


@pytest.mark.parametrize("layout", CLASS_LAYOUTS, ids=[layout_id(layout) for layout in CLASS_LAYOUTS])
def test_confidence_score_equals_the_sigmoid_of_the_stored_column(layout):
    task, per_member, shape = layout
    rng = np.random.default_rng(1)
    _, c, joined = _with_confidence(rng, task, per_member, shape(400, 5, 3))
    got = ConfidenceScore(task=task, per_member=per_member).score(joined)
    assert got.dtype == torch.float32 and got.shape == (400,)
    np.testing.assert_allclose(got.numpy(), _reference_confidence(c), rtol=1e-6, atol=1e-7)
    # float64 logits give float64 scores, to float64 precision
    got64 = ConfidenceScore(task=task, per_member=per_member).score(joined.astype(np.float64))
    np.testing.assert_allclose(got64.numpy(), _reference_confidence(c), rtol=1e-14, atol=0)


@pytest.mark.parametrize("layout", CLASS_LAYOUTS, ids=[layout_id(layout) for layout in CLASS_LAYOUTS])
def test_in_one_pass_the_class_scores_ignore_the_confidence_and_it_ranks_as_its_reference(layout):
    task, per_member, shape = layout
    rng = np.random.default_rng(2)
    x, c, joined = _with_confidence(rng, task, per_member, shape(3000, 5, 3))
    joined[:, -1] += 8.0  # a confidence unit larger than every class logit never becomes a class
    canon = canonicalize(joined, task, per_member, confidence_head=True)
    out = score_pass(canon, ["confidence", *SCORE_NAMES], 1.3, labels=True)
    plain = score_pass(canonicalize(x, task, per_member), SCORE_NAMES, 1.3, labels=True)
    for name in SCORE_NAMES:  # bit for bit the scores of the class logits alone
        torch.testing.assert_close(out.scores[name], plain.scores[name], rtol=0, atol=0)
    torch.testing.assert_close(out.prediction, plain.prediction, rtol=0, atol=0)
    torch.testing.assert_close(out.runner_up, plain.runner_up, rtol=0, atol=0)
    np.testing.assert_allclose(
        out.scores["softmax"].double().numpy(), reference_scores(x, "softmax", task, per_member, 1.3), rtol=1e-5, atol=1e-6
    )
    # The confidence: its reference's values and ranking, whatever else is asked and whatever T.
    confidence = out.scores["confidence"]
    expected = _reference_confidence(joined[:, -1])
    np.testing.assert_allclose(confidence.numpy(), expected, rtol=1e-6, atol=1e-7)
    # Ranked as its reference: along the reference's order the scores never decrease (exactly for
    # one member: sigmoid is monotone; within float32 rounding of the member mean otherwise).
    along = confidence.double().numpy()[np.argsort(expected, kind="stable")]
    assert np.diff(along).min() >= (0.0 if not per_member else -3e-7)
    alone = score_pass(canon, ["confidence"], 0.2, labels=False).scores["confidence"]
    torch.testing.assert_close(alone, confidence, rtol=0, atol=0)
    chunked = torch.cat([score_pass(canon.rows(a, a + 700), ["confidence"], 1.0).scores["confidence"] for a in range(0, 3000, 700)])
    torch.testing.assert_close(chunked, confidence, rtol=0, atol=0)  # chunks give the whole tensor's values


def test_a_non_finite_confidence_makes_the_sample_non_finite():
    rng = np.random.default_rng(3)
    _, _, joined = _with_confidence(rng, "multiclass", False, (300, 4))
    joined[5, -1] = np.nan
    joined[7, 0] = np.inf
    score = ConfidenceScore().fit(np.delete(joined, [5, 7], axis=0), rng.integers(0, 4, 298)).set_threshold(0.9)
    out = score.select(joined)
    assert torch.isnan(out["score"][[5, 7]]).all() and not out["selected"][[5, 7]].any()
    assert torch.isfinite(out["score"][:5]).all()
    canon = canonicalize(joined, confidence_head=True)
    assert canon.finite_rows().tolist().count(False) == 2
    pass_ = score_pass(canon, ["softmax"], 1.0)
    assert pass_.prediction[5] == -1 and torch.isnan(pass_.scores["softmax"][5])  # the whole sample
    with pytest.raises(ValueError, match=r"must contain only finite values. Got 2 sample\(s\)"):
        ConfidenceScore().fit(joined)


def test_fit_threshold_and_select_on_the_class_temperature():
    rng = np.random.default_rng(4)
    x, c, joined = _with_confidence(rng, "multiclass", False, (2000, 6))
    y = rng.integers(0, 6, 2000)
    x[np.arange(2000), y] += 3.0
    joined[:, :6] = x
    score = ConfidenceScore().fit(joined, y)
    reference = SoftmaxScore().fit(x, y)  # the temperature is fitted on the class logits
    assert score.temperature == reference.temperature and score.n_units == 6
    assert score.logits.shape == (2000, 7) and torch.equal(score.class_logits, torch.from_numpy(x))
    # No confidence temperature: the score is -sigmoid(c) at every T.
    torch.testing.assert_close(score.scores, ConfidenceScore(temperature=0.3).score(joined), rtol=0, atol=0)
    assert torch.equal(score.predict(joined), reference.predict(x))
    score.set_threshold(0.8)
    assert abs(float((score.scores < score.threshold).double().mean()) - 0.8) < 0.01
    selected = score.select(joined)["selected"].numpy()
    assert np.array_equal(selected, _reference_confidence(c) < score.threshold)
    logits, labels = _labelled(rng)  # a confidence that is higher on the right predictions
    risky = ConfidenceScore().fit(logits, labels).set_risk_threshold(0.2, delta=0.1)  # labels of the calibration set
    assert risky.risk_threshold.risk_bound <= 0.2 and risky.quantile is None and risky.risk_threshold.coverage > 0.5


def test_saturated_confidences_warn_with_the_confidence_heads_remedy():
    rng = np.random.default_rng(5)
    _, _, joined = _with_confidence(rng, "multiclass", False, (1000, 3))
    joined[:900, -1] = rng.uniform(18.0, 25.0, 900)  # sigmoid rounds to exactly 1 in float32, not in float64
    with pytest.warns(SelectionWarning, match=r"confidence score saturates in float32.*beyond about 17 in float32"):
        score = ConfidenceScore().fit(joined).set_threshold(0.5)
    assert [d["code"] for d in score.diagnostics] == ["saturated"]
    assert "T =" not in score.diagnostics[0]["message"]  # the score does not depend on the temperature
    with warnings.catch_warnings():
        warnings.simplefilter("error", SelectionWarning)
        ConfidenceScore().fit(joined.astype(np.float64)).set_threshold(0.5)  # float64 keeps them apart


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("task", "per_member", "shape", "expected"),
    [
        ("multiclass", False, (5, 2), r"shape \(N, C \+ 1\) with C >= 2 class logit\(s\) for task='multiclass'"),
        ("multiclass", False, (5,), r"shape \(N, C \+ 1\)"),
        ("multiclass", True, (5, 3), r"shape \(N, C \+ 1, M\) with C >= 2 .*"),
        ("binary", False, (5,), r"shape \(N, 2\) \(one logit\) or \(N, 3\) \(two logits\) for task='binary'"),
        ("binary", False, (5, 4), r"shape \(N, 2\) \(one logit\) or \(N, 3\) \(two logits\)"),
        ("binary", True, (5, 3), r"shape \(N, 2, M\) \(one logit\) or \(N, 3, M\) \(two logits\).*"),
        ("multilabel", False, (5, 1), r"shape \(N, C \+ 1\) with C >= 1 class logit\(s\) for task='multilabel'"),
    ],
)
def test_a_width_that_does_not_fit_the_confidence_layout_is_refused(task, per_member, shape, expected):
    with pytest.raises(ValueError, match=rf"The 'X' parameter must have {expected}.*confidence_head=True.*Got shape"):
        ConfidenceScore(task=task, per_member=per_member).fit(np.zeros(shape, dtype=np.float32))


def test_the_score_the_settings_and_the_pass_refuse_a_missing_confidence_head():
    with pytest.raises(ValueError, match="The 'confidence_head' parameter of ConfidenceScore must be True"):
        ConfidenceScore(confidence_head=False)
    with pytest.raises(TypeError, match="The 'confidence_head' parameter must be a bool"):
        SoftmaxScore(confidence_head="yes")
    with pytest.raises(ValueError, match=r"\['confidence'\], which read a learned confidence head: set confidence_head=True"):
        CalibrationSettings(scores=["confidence", "softmax"])
    with pytest.raises(ValueError, match=r"read a learned confidence head: validate the logits with confidence_head=True"):
        score_pass(canonicalize(torch.zeros(3, 4)), ["softmax", "confidence"])
    fitted = ConfidenceScore().fit(np.zeros((10, 5), dtype=np.float32))
    with pytest.raises(ValueError, match=r"must have 4 class logit\(s\) and the confidence logit per sample \(5 units\)"):
        fitted.score(np.zeros((3, 4), dtype=np.float32))
    assert fitted.score(np.zeros((0, 5), dtype=np.float32)).shape == (0,)  # empty in, empty out
    assert isinstance(make_score("confidence"), ConfidenceScore) and seapig_core.SCORES["confidence"] is ConfidenceScore


# ----------------------------------------------------------------------------- persistence and bundles


@pytest.mark.filterwarnings("ignore::seapig_core.SelectionWarning")  # random labels: T at a bound
def test_save_load_and_state_dict_round_trip_the_setting(tmp_path: Path):
    rng = np.random.default_rng(6)
    _, _, joined = _with_confidence(rng, "multiclass", True, (200, 4, 3))
    y = rng.integers(0, 4, 200)
    for score in (ConfidenceScore(per_member=True), SoftmaxScore(per_member=True, confidence_head=True)):
        score.fit(joined, y).set_threshold(0.9)
        state = score.state_dict()
        assert state["settings"]["confidence_head"] is True and state["state"]["logits_shape"] == [200, 5, 3]
        loaded = load_score(score.save(tmp_path / f"{score.name}.arrow"))
        assert type(loaded) is type(score) and loaded.confidence_head and loaded.threshold == score.threshold
        assert torch.equal(loaded.logits, score.logits) and torch.equal(loaded.score(joined), score.score(joined))
        light = load_score(tmp_path / f"{score.name}.arrow", include_logits=False)
        assert light.confidence_head and light.logits is None and torch.equal(light.score(joined), score.score(joined))
    old = SoftmaxScore().fit(joined[:, :4, 0]).state_dict()
    del old["settings"]["confidence_head"]  # a state of an earlier version
    assert SoftmaxScore.from_state_dict(old).confidence_head is False


def _labelled(rng: np.random.Generator, n: int = 1200, classes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(N, C + 1) logits whose confidence is higher on correct predictions, and labels."""
    y = rng.integers(0, classes, n)
    x = 2.0 * rng.standard_normal((n, classes)).astype(np.float32)
    x[np.arange(n), y] += 3.0
    correct = x.argmax(axis=1) == y
    c = np.where(correct, 2.0, -1.0) + rng.standard_normal(n)
    return np.concatenate([x, c[:, None]], axis=1).astype(np.float32), y


def test_bundles_round_trip_the_setting_and_select_with_the_confidence(tmp_path: Path):
    rng = np.random.default_rng(7)
    logits, y = _labelled(rng)
    settings = CalibrationSettings(scores=["confidence", "softmax"], q=0.9, confidence_head=True)
    bundle = fit_selector(logits, y, settings)
    assert bundle.confidence_head and bundle.n_units == 5 and bundle.layout["confidence_head"] is True
    assert 0.0 <= bundle.calibration["accuracy"] <= 1.0 and bundle.calibration["per_score"]["confidence"]["aurc"] > 0
    bundle.save(tmp_path / "bundle")
    manifest = json.loads((bundle.version_path / "manifest.json").read_text())
    assert manifest["confidence_head"] is True and manifest["settings"]["confidence_head"] is True
    loaded = load_bundle(tmp_path / "bundle")
    assert loaded.confidence_head and loaded.settings == settings and loaded.threshold == bundle.threshold

    query, _ = _labelled(np.random.default_rng(8), n=300)
    table = selections_table(loaded, query)
    expected = _reference_confidence(query[:, -1])
    np.testing.assert_allclose(table["score"].to_numpy(), expected, rtol=1e-6)
    assert np.array_equal(table["selected"].to_numpy(), table["score"].to_numpy() < loaded.threshold)
    assert np.array_equal(table["prediction"].to_numpy(), query[:, :5].argmax(axis=1))  # never the confidence unit
    assert table["alternate_label"].max() < 5 and "score_softmax" in table.columns
    with pytest.raises(ValueError, match=r"must have 5 logits per sample \(classes\) besides the confidence logit"):
        loaded.check_query(query[:, :5])  # a model without its confidence, or another class count
    with pytest.raises(ValueError, match=r"must have shape \(N, C \+ 1\) with C >= 2 .*confidence_head=True"):
        loaded.check_query(query[:, :2])

    plain = fit_selector(logits[:, :5], y, CalibrationSettings(q=0.9))  # a bundle without a head says so too
    assert plain.manifest()["confidence_head"] is False


def test_the_pipeline_calibrates_and_scores_a_confidence_logits_file(tmp_path: Path):
    rng = np.random.default_rng(9)
    logits, y = _labelled(rng)
    np.savez(tmp_path / "calibration.npz", logits=logits, labels=y)
    settings = CalibrationSettings(scores=["confidence"], confidence_head=True, target_risk=0.2)
    result = calibrate_file(tmp_path / "calibration.npz", tmp_path / "bundle", settings)
    assert result["primary"] == "confidence" and not result["reused"]
    assert calibrate_file(tmp_path / "calibration.npz", tmp_path / "bundle", settings)["reused"]
    query, _ = _labelled(np.random.default_rng(10), n=250)
    np.save(tmp_path / "query.npy", query)
    summary = score_file(tmp_path / "bundle", tmp_path / "query.npy", tmp_path / "out", "query")
    table = read_selections(summary["path"])
    np.testing.assert_allclose(table["score"].to_numpy(), _reference_confidence(query[:, -1]), rtol=1e-6)
    assert summary["samples"] == 250 and 0 < summary["selected"] < 250


# ----------------------------------------------------------------------------- extraction


class _ConfidenceNet(torch.nn.Module):
    """logits(x) returns (class logits, confidence logit), the documented convention."""

    def __init__(self, members: int = 0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.members = members
        self.classes = torch.nn.Linear(4, 3 * max(members, 1))
        self.confidence = torch.nn.Linear(4, max(members, 1))

    def logits(self, x):
        z, c = self.classes(x), self.confidence(x)
        if self.members:
            return z.view(-1, 3, self.members), c  # (B, C, M) and (B, M)
        return z, c  # (B, C) and (B, 1)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(50, 4, generator=g), torch.arange(50) % 3), batch_size=16)


@pytest.mark.filterwarnings("ignore::seapig_core.SelectionWarning")  # random labels: T at a bound
def test_extraction_stores_caches_and_serves_the_confidence_as_the_last_unit(tmp_path: Path):
    net, loader = _ConfidenceNet(), _loader()
    with torch.no_grad():
        z, c = net.logits(torch.cat([batch[0] for batch in loader]))
    first = extract_logits(net, loader, outdir=tmp_path, prefix="calibration", progress=False)
    assert first.confidence_head and not first.from_cache and first.logits.shape == (50, 4)
    assert torch.equal(first.logits, torch.cat([z, c], dim=1))
    manifest = json.loads((tmp_path / "calibration.logits.json").read_text())
    assert manifest["layout"] == {"confidence_head": True}
    served = extract_logits(net, loader, outdir=tmp_path, prefix="calibration", progress=False)
    assert served.from_cache and served.confidence_head and torch.equal(served.logits, first.logits)

    score = ConfidenceScore().fit(model=net, loader=loader, outdir=tmp_path, prefix="calibration", progress=False)
    np.testing.assert_allclose(score.scores.numpy(), _reference_confidence(c[:, 0].numpy()), rtol=1e-6)
    with pytest.raises(ValueError, match="returns a confidence logit beside its logits, but the score was built with "
                                         "confidence_head=False"):
        SoftmaxScore().fit(model=net, loader=loader, progress=False)

    members = extract_logits(_ConfidenceNet(members=2), loader, progress=False)  # (B, C, M) and (B, M)
    assert members.confidence_head and members.logits.shape == (50, 4, 2)
    assert ConfidenceScore(per_member=True).score(members.logits).shape == (50,)

    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def logits(self, x):
            return self.lin(x)

    plain = extract_logits(Plain(), loader, outdir=tmp_path, prefix="plain", progress=False)
    assert not plain.confidence_head and json.loads((tmp_path / "plain.logits.json").read_text())["layout"] == {}
    with pytest.raises(ValueError, match="does not return a confidence logit .* confidence_head=True"):
        ConfidenceScore().fit(model=Plain(), loader=loader, progress=False)


def test_extraction_refuses_a_confidence_of_the_wrong_shape_or_in_some_batches_only():
    loader = _loader()

    class Wrong(_ConfidenceNet):
        def logits(self, x):
            return self.classes(x), self.classes(x)  # (B, 3) beside (B, 3)

    with pytest.raises(ValueError, match=r"shaped like the logits without their unit axis \(axis 1\): \(16,\) or \(16, 1\)"):
        extract_logits(Wrong(), loader, progress=False)

    class Three(_ConfidenceNet):
        def logits(self, x):
            return self.classes(x), self.confidence(x), x

    with pytest.raises(TypeError, match=r"a \(logits, confidence_logit\) pair of tensors .* Got a tuple of 3 item"):
        extract_logits(Three(), loader, progress=False)

    class Sometimes(_ConfidenceNet):
        calls = 0

        def logits(self, x):
            Sometimes.calls += 1
            z = torch.cat([self.classes(x), self.confidence(x)], dim=1)
            return z if Sometimes.calls > 1 else (self.classes(x), self.confidence(x))

    with pytest.raises(ValueError, match="in every batch or in none. Got a tensor in batch 1 after pairs before"):
        extract_logits(Sometimes(), loader, progress=False)


@pytest.mark.filterwarnings("ignore::seapig_core.SelectionWarning")  # random labels: T at a bound
def test_labels_of_every_layout_are_checked_against_the_class_units():
    rng = np.random.default_rng(11)
    for task, per_member, shape in CLASS_LAYOUTS:
        x, _, joined = _with_confidence(rng, task, per_member, shape(60, 4, 2))
        y = random_labels(rng, task, x.shape, per_member)
        score = ConfidenceScore(task=task, per_member=per_member).fit(joined, y)
        assert score.n_units == canonicalize(x, task, per_member).n_units
        same = SoftmaxScore(temperature=score.temperature, task=task, per_member=per_member)
        assert torch.equal(score.predict(joined), same.predict(x))
