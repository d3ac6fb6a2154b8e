"""CalibrationSettings: the one validated owner of the calibration parameters (issue 10 item 7)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seapig_core.bundle import CalibrationSettings, SelectorBundle, fit_selector, load_bundle, resolve_settings
from seapig_core.pipeline import calibrate_file
from seapig_core.scores import SCORES
from seapig_core.scores.logits import LogitScore


def _data(n: int = 600, k: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    logits = 2.0 * torch.randn(n, k, generator=g)
    logits[torch.arange(n), labels] += 4.0
    return logits, labels


def test_defaults_and_normalised_types() -> None:
    s = CalibrationSettings()
    assert s.scores == ("softmax",) and (s.q, s.task, s.per_member, s.temperature) == (0.95, "multiclass", False, None)
    assert (s.target_risk, s.delta, s.split_fraction, s.seed, s.n_bins, s.risk_method, s.class_names) == (
        None, 0.05, 0.5, 0, 15, "sgr", None
    )
    listed = CalibrationSettings(scores=["margin", "energy"], q=np.float32(0.5), seed=np.int64(3), class_names=["a", "b"])
    assert listed.scores == ("margin", "energy") and listed.class_names == ("a", "b")
    assert type(listed.q) is float and type(listed.seed) is int
    assert CalibrationSettings(scores="energy").scores == ("energy",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.q = 0.5  # type: ignore[misc]
    assert hash(listed) == hash(CalibrationSettings(scores=("margin", "energy"), q=0.5, seed=3, class_names=("a", "b")))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"scores": []}, TypeError, "'scores' parameter must be a score name or a non-empty list"),
        ({"scores": ["softmax", "softmax"]}, ValueError, "must not repeat"),
        ({"scores": ["mahalanobis"]}, ValueError, "must name scores among"),
        ({"q": 1.5}, ValueError, r"The 'q' parameter must be in \(0, 1\)\. Got 1.5 instead\."),
        ({"q": "0.9"}, TypeError, r"The 'q' parameter must be a float in \(0, 1\)\. Got str instead\."),
        ({"task": "regression"}, ValueError, r"The 'task' parameter must be one of \['multiclass', 'binary', 'multilabel'\]\. Got 'regression'"),
        ({"per_member": 1}, TypeError, "The 'per_member' parameter must be a bool. Got int instead."),
        ({"temperature": -1.0}, ValueError, "The 'temperature' parameter must be a positive finite float. Got -1.0 instead."),
        ({"target_risk": 2.0}, ValueError, r"'target_risk' parameter must be in \(0, 1\)\. Got 2.0 instead"),
        ({"delta": None}, TypeError, r"'delta' parameter must be a float in \(0, 1\)\. Got NoneType instead"),
        ({"split_fraction": 1.0}, ValueError, r"'split_fraction' parameter must be in \(0, 1\)\. Got 1.0 instead"),
        ({"seed": -1}, ValueError, "The 'seed' parameter must be a non-negative integer. Got -1 instead."),
        ({"seed": 1.5}, TypeError, "The 'seed' parameter must be a non-negative integer. Got float instead."),
        ({"n_bins": 0}, ValueError, "The 'n_bins' parameter must be a positive integer. Got 0 instead."),
        ({"risk_method": "bogus"}, ValueError, r"The 'risk_method' parameter must be one of \[.*'sgr'.*\]\. Got 'bogus' instead\."),
        ({"class_names": "abc"}, TypeError, "The 'class_names' parameter must be a list of str or None. Got 'abc' instead."),
        ({"class_names": ["a", "a"]}, ValueError, "'class_names' parameter must be a non-empty list of distinct, non-empty names"),
    ],
)
def test_invalid_settings_name_the_parameter(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        CalibrationSettings(**kwargs)


def _calibration_settings(confidence_head: bool, **kwargs) -> CalibrationSettings:
    # The "confidence" score reads a learned confidence head: it needs confidence_head=True.
    return CalibrationSettings(confidence_head=confidence_head or "confidence" in kwargs["scores"], **kwargs)


_settings = st.builds(
    _calibration_settings,
    confidence_head=st.booleans(),
    scores=st.lists(st.sampled_from(sorted(SCORES)), min_size=1, max_size=3, unique=True),
    q=st.floats(0.01, 0.99),
    task=st.sampled_from(["multiclass", "binary", "multilabel"]),
    per_member=st.booleans(),
    temperature=st.none() | st.floats(0.05, 20.0),
    target_risk=st.none() | st.floats(0.01, 0.5),
    delta=st.floats(0.01, 0.5),
    split_fraction=st.floats(0.1, 0.9),
    seed=st.integers(0, 2**31),
    n_bins=st.integers(1, 50),
    class_names=st.none() | st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=4, unique=True),
)


@settings(max_examples=60, deadline=None)
@given(_settings)
def test_to_dict_from_dict_roundtrip_through_json(s: CalibrationSettings) -> None:
    data = json.loads(json.dumps(s.to_dict(), allow_nan=False))
    assert set(data) == {f.name for f in dataclasses.fields(CalibrationSettings)}
    assert CalibrationSettings.from_dict(data) == s


def test_from_dict_and_resolve_settings_refuse_what_they_cannot_use() -> None:
    with pytest.raises(TypeError, match=r"unknown calibration settings \['quantile'\]"):
        CalibrationSettings.from_dict({"quantile": 0.9})
    with pytest.raises(TypeError, match="must be a dict of calibration settings. Got list"):
        CalibrationSettings.from_dict([("q", 0.9)])  # type: ignore[arg-type]
    assert CalibrationSettings.from_dict({"q": 0.8}) == CalibrationSettings(q=0.8)
    assert resolve_settings(None, {"q": 0.8}) == resolve_settings({"q": 0.8}) == CalibrationSettings(q=0.8)
    with pytest.raises(TypeError, match="either as 'settings' or as keyword arguments, not both"):
        resolve_settings(CalibrationSettings(), {"q": 0.8})
    with pytest.raises(TypeError, match=r"unknown calibration settings \['bins'\]"):
        resolve_settings(None, {"bins": 3})
    with pytest.raises(TypeError, match="must be a CalibrationSettings or a dict. Got float"):
        resolve_settings(0.9)


def test_fit_selector_takes_the_settings_object_or_the_keyword_form() -> None:
    logits, labels = _data()
    s = CalibrationSettings(scores=["softmax", "energy"], q=0.9, split_fraction=0.4, seed=3, n_bins=10)
    by_object = fit_selector(logits, labels, s)
    by_keywords = fit_selector(logits, labels, scores=["softmax", "energy"], q=0.9, split_fraction=0.4, seed=3, n_bins=10)
    assert by_object.settings == by_keywords.settings == s
    assert by_object.threshold == by_keywords.threshold and by_object.temperature == by_keywords.temperature
    assert by_object.calibration == by_keywords.calibration
    assert by_object.split == {"fraction": 0.4, "seed": 3, "samples_temperature": 240, "samples_threshold": 360}
    assert fit_selector(logits, labels, q=0.9, n_bins=5).calibration["ece_after"] != by_object.calibration["ece_after"]
    with pytest.raises(TypeError, match="not both"):
        fit_selector(logits, labels, s, q=0.5)


def test_risk_method_reaches_the_guaranteed_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    original = LogitScore.set_risk_threshold

    def spy(self, *args, method: str = "sgr", **kwargs):  # type: ignore[no-untyped-def]
        seen.append(method)
        return original(self, *args, method=method, **kwargs)

    monkeypatch.setattr(LogitScore, "set_risk_threshold", spy)
    bundle = fit_selector(*_data(2000), CalibrationSettings(target_risk=0.1, risk_method="sgr"))
    assert seen == ["sgr"] and bundle.risk_threshold["method"] == "sgr"


def test_class_names_are_known_to_the_bundle_and_stored(tmp_path: Path) -> None:
    logits, labels = _data()
    names = ["cat", "dog", "emu", "fox"]
    bundle = fit_selector(logits, labels, CalibrationSettings(class_names=names))
    assert bundle.class_names == tuple(names)
    bundle.save(tmp_path / "b")
    manifest = json.loads((bundle.version_path / "manifest.json").read_text())
    assert manifest["class_names"] == names and manifest["settings"]["class_names"] == names
    loaded = load_bundle(tmp_path / "b")
    assert loaded.class_names == tuple(names) and loaded.settings == bundle.settings
    with pytest.raises(ValueError, match="must name 4 classes for this multiclass bundle .*Got 3 names"):
        fit_selector(logits, labels, class_names=names[:3])
    binary = fit_selector(torch.randn(200), torch.randint(0, 2, (200,)), task="binary", class_names=["no", "yes"])
    assert binary.class_names == ("no", "yes")
    with pytest.raises(ValueError, match="must name 2 classes for this binary bundle"):
        SelectorBundle(scores=binary.scores, class_names=["a", "b", "c"])


def test_calibrate_file_takes_the_settings_object(tmp_path: Path) -> None:
    logits, labels = _data()
    np.savez(tmp_path / "cal.npz", logits=logits.numpy(), labels=labels.numpy())
    s = CalibrationSettings(scores=["margin"], q=0.8, class_names=["a", "b", "c", "d"])
    result = calibrate_file(tmp_path / "cal.npz", tmp_path / "b", s)
    assert result["primary"] == "margin" and not result["reused"]
    assert load_bundle(tmp_path / "b").settings == s
    assert calibrate_file(tmp_path / "cal.npz", tmp_path / "b", s.to_dict())["reused"]  # a dict works too
    with pytest.raises(TypeError, match="not both"):
        calibrate_file(tmp_path / "cal.npz", tmp_path / "b", s, q=0.5)
