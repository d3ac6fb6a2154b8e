"""publish_calibration_artifacts and publish_scoring_artifacts through .fn(), read back from a real server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seapig_core.bundle import CalibrationSettings
from seapig_core.pipeline import score_file
from tasks import fit_selector_task, publish_calibration_artifacts, publish_scoring_artifacts
from tasks.artifacts import artifact_key, pipeline_key
from tests.flows.harness import read_artifact_by_id, run_in_flow

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_publish_calibration_and_scoring_artifacts(digits: dict[str, Path], tmp_path: Path) -> None:
    bundle = str(tmp_path / "bundle")
    fit = fit_selector_task.fn(str(digits["calibration"]), bundle, CalibrationSettings(scores=["softmax"], q=0.95, target_risk=0.05))
    ids = run_in_flow(publish_calibration_artifacts.fn, fit["version_path"], plot_dir=str(tmp_path / "plots"),
                      pipeline="my-calibration", provenance={"input_files": [str(digits["calibration"])]})
    assert set(ids) == {"my-calibration--calibration-summary", "my-calibration--calibration-report"}
    table = read_artifact_by_id(ids["my-calibration--calibration-summary"])
    assert table.type == "table" and "Calibration metrics" in table.description
    rows = {row["metric"]: row["value"] for row in json.loads(table.data)}
    assert {"ece_before", "ece_after", "aurc", "guaranteed_threshold", "risk_bound"} <= set(rows)
    assert rows["ece_after"].endswith("%") and all(isinstance(v, str) for v in rows.values())  # the one number format
    markdown = read_artifact_by_id(ids["my-calibration--calibration-report"])
    assert markdown.type == "markdown" and markdown.data.count("data:image/png;base64,") == 4
    assert "calibration.npz" in markdown.data and "Flow run: task-under-test" not in markdown.data  # provenance lines
    assert len(list((tmp_path / "plots").glob("*.png"))) == 4
    by_hand = run_in_flow(publish_calibration_artifacts.fn, bundle)  # no pipeline given: keyed by the bundle directory
    assert set(by_hand) == {artifact_key(pipeline_key(None, bundle), kind) for kind in ("calibration-summary", "calibration-report")}

    out = tmp_path / "out"
    selections = {name: score_file(bundle, digits["queries"] / f"{name}.npz", out, name)["path"] for name in ("batch-000", "batch-001")}
    ids = run_in_flow(publish_scoring_artifacts.fn, bundle, selections, review_count=3)
    pipeline = pipeline_key(None, out)  # from the selections' directory
    assert set(ids) == {f"{pipeline}--scoring-summary", f"{pipeline}--scoring-report", f"{pipeline}--review--batch-000",
                        f"{pipeline}--review--batch-001"}
    rows = json.loads(read_artifact_by_id(ids[f"{pipeline}--scoring-summary"]).data)
    assert sorted(row["batch"] for row in rows) == ["batch-000", "batch-001"]
    assert all(row["rejection_rate"].endswith("%") and {"expected_rejection_rate", "ks_statistic", "verdict"} <= set(row) for row in rows)
    report = read_artifact_by_id(ids[f"{pipeline}--scoring-report"]).data
    assert report.count("![density](data:image/png;base64,") == 2
    queue = read_artifact_by_id(ids[f"{pipeline}--review--batch-000"])
    assert len(json.loads(queue.data)) == 3 and "batch-000.selections.parquet" in queue.description
