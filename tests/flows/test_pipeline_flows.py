"""The calibration and scoring flows against a real temporary Prefect server (prefect_test_harness)."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.calibration import calibration_flow
from flows.scoring import ScoringFailed, scoring_flow
from seapig_core._io import is_temporary_name
from seapig_core.bundle import MANIFEST_NAME, load_bundle
from seapig_core.ledger import Ledger
from seapig_core.selections import read_selections
from tasks.artifacts import artifact_kind
from tests.flows.harness import DIGITS, read_artifacts, read_logs, read_task_runs

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

_PNG_URI = re.compile(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")


def _pngs(markdown: str) -> list[bytes]:
    return [base64.b64decode(m) for m in _PNG_URI.findall(markdown)]


def _table(artifact) -> list[dict]:
    data = artifact.data
    return json.loads(data) if isinstance(data, str) else data


def _by_kind(flow_run_id) -> dict:
    """A run's artifacts by kind (keys are ``<pipeline>--<kind>[--<batch>]``, tasks/artifacts.py)."""
    return {artifact_kind(key): artifact for key, artifact in read_artifacts(flow_run_id).items()}


@pytest.fixture(scope="module")
def calibrated(digits: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A bundle fitted by the calibration flow on the digits model + data, with a target risk."""
    root = tmp_path_factory.mktemp("calibrated")
    state = calibration_flow(
        bundle_dir=str(root / "bundle"), model=f"{DIGITS}:digits_model", data=f"{DIGITS}:digits_loader",
        model_kwargs={"cache_dir": str(digits["model"])}, data_kwargs={"split": "calibration"},
        store_dir=str(root / "logits"), scores=["softmax", "energy"], q=0.95, target_risk=0.05,
        plot_dir=str(root / "plots"), return_state=True,
    )
    assert state.is_completed(), state.message
    return {"root": root, "bundle": root / "bundle", "plots": root / "plots", "flow_run_id": state.state_details.flow_run_id, "result": state.result()}


def test_calibration_flow_writes_bundle_and_artifacts(calibrated: dict) -> None:
    bundle = load_bundle(calibrated["bundle"])
    assert list(bundle.scores) == ["softmax", "energy"] and bundle.n_units == 10
    assert bundle.threshold_source == "risk" and bundle.risk_threshold["risk_bound"] <= 0.05
    assert calibrated["result"]["manifest_sha256"] == bundle.manifest_sha256

    artifacts = _by_kind(calibrated["flow_run_id"])
    assert {"calibration-summary", "calibration-report", "extraction-progress"} <= set(artifacts)
    assert artifacts["extraction-progress"].data == pytest.approx(100.0)

    rows = {row["metric"]: row["value"] for row in _table(artifacts["calibration-summary"])}  # formatted for display
    for key in ("samples", "accuracy", "temperature", "nll_before", "nll_after", "ece_before", "ece_after",
                "aurc", "threshold", "coverage", "guaranteed_threshold", "risk_bound"):
        assert key in rows, key
    calibration = calibrated["result"]["calibration"]
    assert rows["samples"] == "629" and calibration["samples_threshold"] + calibration["samples_temperature"] == 629
    assert calibration["nll_after"] <= calibration["nll_before"]
    assert float(rows["guaranteed_threshold"]) == pytest.approx(bundle.threshold, rel=1e-3)

    markdown = artifacts["calibration-report"].data
    images = _pngs(markdown)
    assert len(images) == 4 and all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in images)
    assert "Reliability diagram" in markdown and "Risk-coverage" in markdown
    assert sorted(p.name for p in calibrated["plots"].glob("*.png")) == [
        "calibration-density.png", "calibration-reliability.png", "calibration-risk-coverage.png", "calibration-temperature.png",
    ]


def test_scoring_flow_from_model_and_data(calibrated: dict, digits: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "selections"
    state = scoring_flow(
        bundle_dir=str(calibrated["bundle"]), output_dir=str(out), model=f"{DIGITS}:digits_model",
        data=f"{DIGITS}:query_loaders", model_kwargs={"cache_dir": str(digits["model"])}, data_kwargs={"n_batches": 3},
        store_dir=str(tmp_path / "logits"), plot_dir=str(tmp_path / "plots"), return_state=True,
    )
    assert state.is_completed(), state.message
    files = sorted(p.name for p in out.glob("*.parquet"))
    assert files == [f"batch-00{i}.selections.parquet" for i in range(3)]
    table = pd.concat([read_selections(out / name) for name in files])
    for column in ("sample_id", "prediction", "score", "selected", "alternate_label", "certainty_ratio", "score_energy"):
        assert column in table.columns
    assert table["selected"].any() and (~table["selected"]).any()
    assert len(table) == 750 and table["sample_id"].is_unique

    artifacts = _by_kind(state.state_details.flow_run_id)
    assert {"scoring-summary", "scoring-report", "extraction-progress", "review"} <= set(artifacts)
    rows = _table(artifacts["scoring-summary"])  # formatted for display, drifted batches first
    assert sorted(row["batch"] for row in rows) == ["batch-000", "batch-001", "batch-002"]
    assert all(row["samples"] == "250" for row in rows)
    for row in state.result()["scored"]:  # the raw numbers
        assert row["samples"] == row["selected"] + row["rejected"] == 250
        assert row["expected_rejection_rate"] == pytest.approx(1 - load_bundle(calibrated["bundle"]).calibration["coverage"], rel=1e-5)
        assert 0.0 <= row["ks_statistic"] <= 1.0
    markdown = artifacts["scoring-report"].data
    assert len(_pngs(markdown)) == 4 and "batch-002" in markdown and "![trend](" in markdown  # 3 densities + the trend
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [f"batch-00{i}-density.png" for i in range(3)] + ["scoring-trend.png"]


def test_rerunning_with_nothing_new_keeps_the_outputs(calibrated: dict, digits: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = scoring_flow(bundle_dir=str(calibrated["bundle"]), output_dir=str(out), logits_dir=str(digits["queries"]))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = scoring_flow(bundle_dir=str(calibrated["bundle"]), output_dir=str(out), logits_dir=str(digits["queries"]))
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"batch-00{i}.selections.parquet" for i in range(3)]
    assert after == before
    assert again["scored"] == [] and again["selections"] == first["selections"]  # served by the ledger


def test_failing_batch_leaves_no_partial_file(
    calibrated: dict, digits: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    queries = tmp_path / "queries"
    shutil.copytree(digits["queries"], queries)
    out = tmp_path / "out"
    scoring_flow(bundle_dir=str(calibrated["bundle"]), output_dir=str(out), logits_dir=str(queries))
    earlier = (out / "batch-001.selections.parquet").read_bytes()

    # A write that dies half-way through batch-001 (e.g. the disk fills up).
    import seapig_core.selections as selections

    class DyingWriter(selections.pq.ParquetWriter):
        """Writes batch-001's first row group, then the disk is full."""

        def __init__(self, where, *args, **kwargs):
            super().__init__(where, *args, **kwargs)
            self.dies = "batch-001" in str(where)

        def write_batch(self, batch, *args, **kwargs):
            super().write_batch(batch, *args, **kwargs)
            if self.dies:
                raise OSError(28, "No space left on device")

    monkeypatch.setattr(selections.pq, "ParquetWriter", DyingWriter)
    with np.load(queries / "batch-001.npz") as old:  # new content for batch-001: the ledger rescores it
        np.savez(queries / "batch-001.npz", logits=old["logits"], sample_ids=np.char.add(old["sample_ids"], "-v2"))
    state = scoring_flow(bundle_dir=str(calibrated["bundle"]), output_dir=str(out), logits_dir=str(queries), return_state=True)

    assert state.is_failed()
    assert "batch-001" in state.message and "No space left on device" in state.message
    with pytest.raises(ScoringFailed, match="1 of 1 claimed query batch"):
        state.result()
    assert (out / "batch-001.selections.parquet").read_bytes() == earlier  # the earlier output is kept
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"batch-00{i}.selections.parquet" for i in range(3)]
    assert [p.name for p in out.iterdir() if is_temporary_name(p.name)] == []  # no temporary file
    logs = "\n".join(read_logs(state.state_details.flow_run_id))
    assert "No space left on device" in logs
    failed = [e for e in Ledger(out).entries() if e.batch == "batch-001" and e.state == "failed"]
    assert len(failed) == 1

    monkeypatch.undo()  # the disk has space again: the next run retries the failed batch, and only it
    retried = scoring_flow(bundle_dir=str(calibrated["bundle"]), output_dir=str(out), logits_dir=str(queries))
    assert [entry["batch"] for entry in retried["scored"]] == ["batch-001"]
    assert read_selections(out / "batch-001.selections.parquet")["sample_id"].str.endswith("-v2").all()


def test_scoring_a_batch_with_another_class_count_fails_clearly(calibrated: dict, digits: dict[str, Path], tmp_path: Path) -> None:
    queries = tmp_path / "queries"
    queries.mkdir()
    shutil.copy(digits["queries"] / "batch-000.npz", queries)
    np.savez(queries / "wide.npz", logits=np.random.default_rng(0).normal(size=(20, 12)).astype(np.float32))
    out = tmp_path / "out"
    state = scoring_flow(bundle_dir=str(calibrated["bundle"]), output_dir=str(out), logits_dir=str(queries), return_state=True)
    assert state.is_failed()
    assert "wide" in state.message and "10 logits per sample" in state.message and "12 per sample" in state.message
    assert sorted(p.name for p in out.glob("*.parquet")) == ["batch-000.selections.parquet"]  # the good batch is still written
    assert "scoring-report" in _by_kind(state.state_details.flow_run_id)


def test_calibration_from_a_logits_file(digits: dict[str, Path], tmp_path: Path) -> None:
    result = calibration_flow(bundle_dir=str(tmp_path / "bundle"), logits_path=str(digits["calibration"]), scores=["entropy"], q=0.9)
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.primary_name == "entropy" and bundle.q == 0.9 and bundle.threshold_source == "quantile"
    assert result["calibration"]["coverage"] == pytest.approx(0.9, abs=0.02)
    assert bundle.source["logits_path"] == str(digits["calibration"].resolve())


# ----------------------------------------------------------------------------- bad input


def _failed_run(flow, **parameters):
    state = flow(**parameters, return_state=True)
    assert state.is_failed()
    return state


def test_an_import_path_outside_the_allowlist_fails_without_running_or_retrying(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    state = _failed_run(
        calibration_flow, bundle_dir=str(tmp_path / "bundle"), model="os:system", model_kwargs={"command": f"touch {marker}"},
        data=f"{DIGITS}:digits_loader", store_dir=str(tmp_path / "logits"),
    )
    assert "'os:system' names 'os', a module of Python's standard library" in state.message
    with pytest.raises(ValueError, match="SEAPIG_ALLOWED_MODULES"):
        state.result()
    assert not marker.exists()
    extract = [run for run in read_task_runs(state.state_details.flow_run_id) if run.name.startswith("extract-logits")]
    assert len(extract) == 1 and extract[0].run_count == 1  # bad input is not retried
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"logits_path": "x.npz", "model": f"{DIGITS}:digits_model", "data": f"{DIGITS}:digits_loader"}, "not both"),
        ({"model": f"{DIGITS}:digits_model"}, "Got no 'data'"),
        ({"model": "not an import path", "data": f"{DIGITS}:digits_loader"}, "must be an import path"),
        ({"model": f"{DIGITS}:no_such_function", "data": f"{DIGITS}:digits_loader"}, "has no attribute 'no_such_function'"),
        ({"logits_path": "missing.npz"}, "does not exist"),
    ],
)
def test_bad_calibration_sources(parameters: dict, message: str, tmp_path: Path) -> None:
    state = _failed_run(calibration_flow, bundle_dir=str(tmp_path / "bundle"), store_dir=str(tmp_path / "logits"), **parameters)
    assert message in state.message


def test_bundle_of_another_schema_version_is_rejected(calibrated: dict, digits: dict[str, Path], tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(calibrated["bundle"], bundle)
    manifest_path = load_bundle(bundle).version_path / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["schema_version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    state = _failed_run(scoring_flow, bundle_dir=str(bundle), output_dir=str(tmp_path / "out"), logits_dir=str(digits["queries"]))
    assert "schema version 99" in state.message and "Re-run the calibration flow" in state.message
    assert not (tmp_path / "out").exists()


def test_missing_query_source(calibrated: dict, tmp_path: Path) -> None:
    state = _failed_run(
        scoring_flow, bundle_dir=str(calibrated["bundle"]), output_dir=str(tmp_path / "out"), logits_dir=str(tmp_path / "queries")
    )
    assert "'logits_dir'" in state.message and "does not exist" in state.message


@pytest.mark.parametrize("case", ["empty", "no logit files"])
def test_an_empty_inbox_is_nothing_new(case: str, calibrated: dict, tmp_path: Path) -> None:
    """An inbox drained by the archive is the normal state of a scheduled scorer, not an error."""
    queries = tmp_path / "queries"
    queries.mkdir()
    if case == "no logit files":
        (queries / "notes.txt").write_text("not logits")
    state = scoring_flow(
        bundle_dir=str(calibrated["bundle"]), output_dir=str(tmp_path / "out"), logits_dir=str(queries), return_state=True
    )
    assert state.is_completed(), state.message
    assert state.result()["scored"] == [] and not list((tmp_path / "out").glob("*.parquet"))
    assert any(line.startswith("Nothing new") for line in read_logs(state.state_details.flow_run_id))


def test_unwritable_output_dir(calibrated: dict, digits: dict[str, Path], tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    state = _failed_run(
        scoring_flow, bundle_dir=str(calibrated["bundle"]), output_dir=str(blocker / "out"), logits_dir=str(digits["queries"])
    )
    assert "The 'output_dir' parameter must be a writable directory" in state.message
    assert not [run for run in read_task_runs(state.state_details.flow_run_id) if run.name.startswith("score-")]


def test_the_server_accepts_the_clients_default_filters(calibrated: dict) -> None:
    """fastapi >= 0.151 rejects the nulls Prefect 3.8.8's client sends (`prefect deploy` then fails)."""
    from tests.flows.harness import _run

    assert _run(lambda client: client.read_work_pools()) is not None
    assert _run(lambda client: client.read_flow_runs(limit=None)) is not None
    assert read_artifacts(calibrated["flow_run_id"])
