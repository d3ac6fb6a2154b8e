"""publish_calibration_artifacts and publish_scoring_artifacts through .fn(), read back from a real server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seapig_core.bundle import CalibrationSettings
from seapig_core.pipeline import score_file
from tasks import fit_selector_task, publish_calibration_artifacts, publish_scoring_artifacts
from tests.flows.harness import read_artifact_by_id, run_in_flow

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_publish_calibration_and_scoring_artifacts(digits: dict[str, Path], tmp_path: Path) -> None:
    bundle = str(tmp_path / "bundle")
    fit_selector_task.fn(str(digits["calibration"]), bundle, CalibrationSettings(scores=["softmax"], q=0.95, target_risk=0.05))
    ids = run_in_flow(publish_calibration_artifacts.fn, bundle, plot_dir=str(tmp_path / "plots"))
    assert set(ids) == {"calibration-summary", "calibration-report"}
    table = read_artifact_by_id(ids["calibration-summary"])
    assert table.key == "calibration-summary" and table.type == "table"
    rows = {row["metric"]: row["value"] for row in json.loads(table.data)}
    assert {"ece_before", "ece_after", "aurc", "guaranteed_threshold", "risk_bound"} <= set(rows)
    markdown = read_artifact_by_id(ids["calibration-report"])
    assert markdown.type == "markdown" and markdown.data.count("data:image/png;base64,") == 4
    assert len(list((tmp_path / "plots").glob("*.png"))) == 4

    selections = {
        name: score_file(bundle, digits["queries"] / f"{name}.npz", tmp_path / "out", name)["path"]
        for name in ("batch-000", "batch-001")
    }
    ids = run_in_flow(publish_scoring_artifacts.fn, bundle, selections)
    rows = json.loads(read_artifact_by_id(ids["scoring-summary"]).data)
    assert [row["batch"] for row in rows] == ["batch-000", "batch-001"]
    assert all({"rejection_rate", "expected_rejection_rate", "ks_statistic"} <= set(row) for row in rows)
    report = read_artifact_by_id(ids["scoring-report"]).data
    assert report.count("![density](data:image/png;base64,") == 2
