"""Review material (tables + markdown with PNG data URIs) and the pipeline's plain-function steps."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from seapig_core.bundle import fit_selector, load_bundle
from seapig_core.pipeline import calibrate_file, calibration_review, content_fingerprint, score_file, scoring_review
from seapig_core.reports import MAX_BATCH_FIGURES, calibration_report, figure_data_uri, scoring_report
from seapig_core.selections import selections_table

_IMAGE = re.compile(r"!\[(\w[\w-]*)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")


def _labelled(n: int = 800, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    logits = 1.5 * torch.randn(n, 4, generator=g)
    logits[torch.arange(n), labels] += 4.0
    return logits, labels


def test_figure_data_uri_is_a_png() -> None:
    from matplotlib.figure import Figure

    fig = Figure()
    fig.add_subplot().plot([0, 1])
    uri = figure_data_uri(fig)
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]).startswith(b"\x89PNG")


def test_calibration_report_with_risk() -> None:
    bundle = fit_selector(*_labelled(), scores=["softmax", "margin"], target_risk=0.1)
    report = calibration_report(bundle)
    rows = {row["metric"]: row["value"] for row in report.table}
    assert rows["primary_score"] == "softmax" and rows["guaranteed_threshold"] == pytest.approx(bundle.threshold, rel=1e-5)
    for key in ("accuracy", "nll_before", "nll_after", "ece_before", "ece_after", "aurc", "coverage", "risk_bound", "aurc_margin"):
        assert key in rows
    assert all(isinstance(row["description"], str) for row in report.table)
    assert [m[0] for m in _IMAGE.findall(report.markdown)] == ["density", "reliability", "risk-coverage"]
    assert "| ECE |" in report.markdown and "guaranteed-risk threshold" in report.markdown


def test_calibration_report_without_labels_has_only_the_density() -> None:
    report = calibration_report(fit_selector(_labelled()[0], q=0.9))
    assert [m[0] for m in _IMAGE.findall(report.markdown)] == ["density"]
    assert "n/a" in report.markdown


def test_scoring_report_limits_embedded_figures() -> None:
    bundle = fit_selector(*_labelled())
    query = _labelled(50, seed=1)[0]
    tables = {f"b{i:02d}": selections_table(bundle, query) for i in range(MAX_BATCH_FIGURES + 2)}
    report = scoring_report(bundle, tables)
    assert [row["batch"] for row in report.table] == list(tables)
    assert len(_IMAGE.findall(report.markdown)) == MAX_BATCH_FIGURES and "2 further batch(es)" in report.markdown
    with pytest.raises(ValueError, match="at least one selections table"):
        scoring_report(bundle, {})


def test_pipeline_steps_from_files(tmp_path: Path) -> None:
    logits, labels = _labelled()
    np.savez(tmp_path / "cal.npz", logits=logits.numpy(), labels=labels.numpy())
    summary = calibrate_file(tmp_path / "cal.npz", tmp_path / "bundle", scores=["energy"], q=0.9)
    assert summary["primary"] == "energy" and summary["manifest_sha256"] == content_fingerprint(tmp_path / "bundle")
    np.save(tmp_path / "q.npy", _labelled(64, seed=2)[0].numpy())
    scored = score_file(tmp_path / "bundle", tmp_path / "q.npy", tmp_path / "out", "q")
    assert Path(scored["path"]).name == "q.selections.parquet" and scored["samples"] == 64
    report = scoring_review(tmp_path / "bundle", {"q": scored["path"]}, plot_dir=tmp_path / "plots")
    assert report.table[0]["samples"] == 64 and (tmp_path / "plots" / "q-density.png").is_file()
    calibration_review(tmp_path / "bundle", plot_dir=tmp_path / "plots")
    assert {p.name for p in (tmp_path / "plots").iterdir()} >= {"calibration-density.png", "calibration-reliability.png"}
    assert load_bundle(tmp_path / "bundle").source["logits_sha256"] == content_fingerprint(tmp_path / "cal.npz")
    assert content_fingerprint(tmp_path / "nothing") is None and content_fingerprint(tmp_path) is None
