"""The selector bundle: fitting with the split protocol, saving, loading, and what loading refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from seapig_core import metrics
from seapig_core.bundle import (
    BUNDLE_SCHEMA_VERSION,
    MANIFEST_NAME,
    POINTER_NAME,
    VERSIONS_DIR,
    SelectorBundle,
    bundle_fingerprint,
    bundle_versions,
    describe_bundle,
    fit_selector,
    load_bundle,
)
from seapig_core.risk import split_calibration
from seapig_core.scores import SoftmaxScore


def _data(n: int = 2000, k: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    logits = 2.0 * torch.randn(n, k, generator=g)
    logits[torch.arange(n), labels] += 5.0  # 80 % accurate; the fitted temperature is not 1
    return logits, labels


def test_split_protocol_fits_temperature_and_threshold_on_disjoint_parts() -> None:
    logits, labels = _data()
    bundle = fit_selector(logits, labels, scores=["softmax", "energy"], q=0.9, split_fraction=0.4, seed=3)
    first, second = split_calibration(len(labels), fraction=0.4, seed=3)
    reference = SoftmaxScore().fit(logits[first], labels[first])
    assert bundle.temperature == pytest.approx(reference.temperature, rel=1e-12)
    primary = bundle.primary
    assert torch.equal(primary.logits, logits[second]) and torch.equal(primary.labels, labels[second])
    held_out = SoftmaxScore(temperature=reference.temperature).score(logits[second]).numpy()
    assert bundle.threshold == pytest.approx(float(np.nanquantile(held_out.astype(np.float64), 0.9)))
    cal = bundle.calibration
    assert (cal["samples"], cal["samples_temperature"], cal["samples_threshold"]) == (2000, 800, 1200)
    assert cal["nll_before"] == pytest.approx(metrics.negative_log_likelihood(logits[second], labels[second]))
    assert cal["ece_after"] == pytest.approx(
        metrics.expected_calibration_error(logits[second], labels[second], temperature=bundle.temperature)
    )
    assert cal["nll_after"] < cal["nll_before"] and cal["ece_after"] < cal["ece_before"]
    assert cal["coverage"] == pytest.approx(0.9, abs=0.01)
    assert set(cal["per_score"]) == {"softmax", "energy"} and cal["aurc"] == cal["per_score"]["softmax"]["aurc"]
    assert bundle.scores["energy"].T == bundle.temperature and bundle.threshold_source == "quantile"


def test_target_risk_selects_with_the_guaranteed_threshold() -> None:
    logits, labels = _data()
    bundle = fit_selector(logits, labels, q=0.95, target_risk=0.05, delta=0.1)
    risk = bundle.risk_threshold
    assert bundle.threshold_source == "risk" and risk["risk_bound"] <= 0.05 and risk["delta"] == 0.1
    assert bundle.threshold == risk["threshold"] and bundle.calibration["coverage"] == pytest.approx(risk["coverage"])
    assert bundle.calibration["selective_risk"] == pytest.approx(risk["empirical_risk"])
    with pytest.raises(ValueError, match="infeasible"):
        fit_selector(logits[:60], labels[:60], target_risk=0.001)
    with pytest.raises(ValueError, match="needs labelled calibration logits"):
        fit_selector(logits, target_risk=0.05)


def test_without_labels_or_with_a_given_temperature_everything_sets_the_threshold() -> None:
    logits, labels = _data(500)
    unlabelled = fit_selector(logits, q=0.8)
    assert unlabelled.split is None and unlabelled.temperature == 1.0 and unlabelled.calibration["samples_threshold"] == 500
    assert "accuracy" not in unlabelled.calibration
    given = fit_selector(logits, labels, temperature=2.0)
    assert given.temperature == 2.0 and given.split is None and given.calibration["samples_threshold"] == 500


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"scores": []}, TypeError, "non-empty list"),
        ({"scores": ["softmax", "softmax"]}, ValueError, "must not repeat"),
        ({"scores": ["mahalanobis"]}, ValueError, "must name scores among"),
        ({"q": 1.5}, ValueError, "'q' parameter must be in"),
        ({"target_risk": 2.0}, ValueError, r"'target_risk' parameter must be in \(0, 1\)\. Got 2.0 instead"),
        ({"target_risk": "5%"}, TypeError, r"'target_risk' parameter must be a float in \(0, 1\) or None\. Got str"),
        ({"delta": None}, TypeError, r"'delta' parameter must be a float in \(0, 1\)\. Got NoneType instead"),
    ],
)
def test_fit_selector_rejects_bad_arguments(kwargs: dict, error: type, message: str) -> None:
    logits, labels = _data(200)
    with pytest.raises(error, match=message):
        fit_selector(logits, labels, **kwargs)


def test_save_load_roundtrip_and_replace(tmp_path: Path) -> None:
    logits, labels = _data()
    bundle = fit_selector(logits, labels, scores=["certainty_ratio", "margin"], q=0.9, source={"run": "test"})
    path = bundle.save(tmp_path / "bundle")
    loaded = load_bundle(path)
    assert list(loaded.scores) == ["certainty_ratio", "margin"] and loaded.q == 0.9 and loaded.source == {"run": "test"}
    assert loaded.threshold == bundle.threshold and loaded.temperature == bundle.temperature
    assert loaded.calibration == json.loads(json.dumps(bundle.calibration))
    assert (loaded.manifest_sha256, loaded.version, loaded.version_path) == (bundle.manifest_sha256, bundle.version, bundle.version_path)
    assert loaded.path == path and loaded.version_path == path / VERSIONS_DIR / loaded.version
    assert loaded.settings == bundle.settings and loaded.settings.scores == ("certainty_ratio", "margin")
    query = _data(50, seed=1)[0]
    assert torch.equal(loaded.primary.select(query)["selected"], bundle.primary.select(query)["selected"])
    described = describe_bundle(path)
    assert described["primary"] == "certainty_ratio" and described["n_units"] == 10
    assert described["version"] == loaded.version and described["manifest_sha256"] == loaded.manifest_sha256
    assert bundle_fingerprint(path) == loaded.manifest_sha256 == bundle_fingerprint(loaded.version_path)

    # Saving another selector to the same directory adds a version and switches the pointer;
    # the first version and files that are not the bundle's stay untouched.
    (path / "unrelated.arrow").write_bytes(b"user file")
    first_files = {p.name: p.read_bytes() for p in loaded.version_path.iterdir()}
    other = fit_selector(logits, labels, scores=["entropy"])
    assert other.save(path) == path
    assert sorted(p.name for p in path.iterdir()) == [POINTER_NAME, "unrelated.arrow", VERSIONS_DIR]
    assert bundle_versions(path) == sorted([loaded.version, other.version])
    assert {p.name: p.read_bytes() for p in loaded.version_path.iterdir()} == first_files
    current = load_bundle(path)
    assert list(current.scores) == ["entropy"] and current.version == other.version != loaded.version
    assert list(load_bundle(loaded.version_path).scores) == ["certainty_ratio", "margin"]  # a version loads directly
    assert load_bundle(loaded.version_path).path == path


def _saved(tmp_path: Path) -> SelectorBundle:
    logits, labels = _data(300)
    bundle = fit_selector(logits, labels)
    bundle.save(tmp_path / "bundle")
    return bundle


def test_another_schema_version_is_a_clear_error(tmp_path: Path) -> None:
    version = _saved(tmp_path).version_path
    manifest = json.loads((version / MANIFEST_NAME).read_text())
    manifest["schema_version"] = BUNDLE_SCHEMA_VERSION + 1
    (version / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"schema version {BUNDLE_SCHEMA_VERSION + 1}.*reads schema version {BUNDLE_SCHEMA_VERSION}"):
        load_bundle(tmp_path / "bundle")


def test_tampered_missing_or_foreign_files_are_refused(tmp_path: Path) -> None:
    bundle = _saved(tmp_path)
    path, version = bundle.path, bundle.version_path
    score_file = version / "softmax.arrow"
    score_file.write_bytes(score_file.read_bytes() + b"x")
    with pytest.raises(ValueError, match="softmax.arrow' does not match its SHA-256"):
        load_bundle(path)
    score_file.unlink()
    with pytest.raises(ValueError, match="softmax.arrow' named by .*manifest.json' is missing"):
        load_bundle(path)
    manifest = json.loads((version / MANIFEST_NAME).read_text())
    manifest["scores"][0]["file"] = "../escape.arrow"
    (version / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="plain file-name stem"):
        load_bundle(path)
    (version / MANIFEST_NAME).write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a seapig_core selector bundle"):
        load_bundle(path)
    with pytest.raises(ValueError, match=f"has no {POINTER_NAME}"):
        load_bundle(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_query_with_another_class_count_is_a_clear_error(tmp_path: Path) -> None:
    bundle = load_bundle(_saved(tmp_path).path)
    with pytest.raises(ValueError, match=r"10 logits per sample \(classes\).*\(12 per sample\)"):
        bundle.check_query(torch.zeros(4, 12))
    with pytest.raises(ValueError, match="must have shape"):
        bundle.check_query(torch.zeros(4, 10, 3))
    bundle.check_query(torch.zeros(4, 10))


def test_a_bundle_needs_consistent_fitted_scores() -> None:
    logits, labels = _data(300)
    a = SoftmaxScore().fit(logits, labels).set_threshold(0.9)
    with pytest.raises(ValueError, match="non-empty dict"):
        SelectorBundle(scores={})
    with pytest.raises(ValueError, match="is a 'softmax' score"):
        SelectorBundle(scores={"energy": a})
    with pytest.raises(ValueError, match="needs a threshold"):
        SelectorBundle(scores={"softmax": SoftmaxScore().fit(logits)})
    from seapig_core.scores import EnergyScore

    with pytest.raises(ValueError, match="must share"):
        SelectorBundle(scores={"softmax": a, "energy": EnergyScore(temperature=3.0).fit(logits)})
