"""fit_selector_task, check_bundle_task, plan_scoring_task and score_batch_task through .fn(); no Prefect cache."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State

import tasks
from seapig_core.bundle import CalibrationSettings, bundle_versions, load_bundle
from seapig_core.ledger import Ledger
from seapig_core.selections import read_selections
from tasks import check_bundle_task, fit_selector_task, plan_scoring_task, score_batch_task


@pytest.fixture()
def bundle(digits: dict[str, Path], tmp_path: Path) -> Path:
    fit_selector_task.fn(str(digits["calibration"]), str(tmp_path / "bundle"), CalibrationSettings(scores=["softmax", "entropy"], q=0.9))
    return tmp_path / "bundle"


def test_fit_selector_task(digits: dict[str, Path], tmp_path: Path) -> None:
    settings = CalibrationSettings(scores=["margin"], q=0.9, target_risk=0.1, class_names=[str(i) for i in range(10)])
    result = fit_selector_task.fn(str(digits["calibration"]), str(tmp_path / "b"), settings)
    assert result["primary"] == "margin" and Path(result["bundle_dir"]) == tmp_path / "b" and not result["reused"]
    assert result["calibration"]["coverage"] > 0.5 and result["calibration"]["samples"] == 629
    assert load_bundle(tmp_path / "b").settings == settings
    json.dumps(result)  # small and JSON-serialisable
    with pytest.raises(ValueError, match="must name scores among"):
        fit_selector_task.fn(str(digits["calibration"]), str(tmp_path / "c"), CalibrationSettings(scores=["nope"]))


def test_the_calibration_parameters_pass_as_one_settings_object() -> None:
    """The task takes the settings object; the parameter list is not written out again in tasks/."""
    assert list(inspect.signature(fit_selector_task.fn).parameters) == ["logits_path", "bundle_dir", "settings", "keep_previous"]


def test_no_task_uses_a_prefect_cache() -> None:
    """The bundle, the ledger and the store are the caches and verify what they serve (issue 8)."""
    for name in tasks.__all__:
        assert getattr(tasks, name).cache_policy is NO_CACHE, name


def test_a_rerun_is_served_by_the_bundle_from_the_second_run_and_a_broken_bundle_is_refitted(
    digits: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import seapig_core.pipeline as pipeline

    fits = []
    real_fit = pipeline.fit_selector
    monkeypatch.setattr(pipeline, "fit_selector", lambda *a, **k: fits.append(1) or real_fit(*a, **k))
    root, settings = tmp_path / "bundle", CalibrationSettings(scores=["softmax"], q=0.9)
    first = fit_selector_task.fn(str(digits["calibration"]), str(root), settings)
    second = fit_selector_task.fn(str(digits["calibration"]), str(root), settings)  # the second run, not the third
    assert (first["reused"], second["reused"], len(fits)) == (False, True, 1)
    assert second["version"] == first["version"] and bundle_versions(root) == [first["version"]]

    score_file = Path(first["version_path"]) / "softmax.arrow"
    score_file.write_bytes(score_file.read_bytes()[:-8])  # damaged: never served
    with pytest.raises(ValueError, match="does not match its SHA-256"):
        check_bundle_task.fn(str(root))
    repaired = fit_selector_task.fn(str(digits["calibration"]), str(root), settings)
    assert not repaired["reused"] and len(fits) == 2 and repaired["version"] != first["version"]
    assert load_bundle(root).version == repaired["version"]


def test_check_bundle_plan_and_score_tasks(bundle: Path, digits: dict[str, Path], tmp_path: Path) -> None:
    summary = check_bundle_task.fn(str(bundle))
    assert summary["primary"] == "softmax" and summary["scores"] == ["softmax", "entropy"] and summary["n_units"] == 10
    assert Path(summary["version_path"]).name == summary["version"]
    inbox = tmp_path / "inbox"
    shutil.copytree(digits["queries"], inbox)
    out = str(tmp_path / "out")
    plan = plan_scoring_task.fn(str(inbox), out, summary["version"])
    assert [claim.batch for claim in plan.claims] == ["batch-000", "batch-001", "batch-002"]
    outcome = score_batch_task.fn(plan.claims[0], summary["version_path"], out)
    # A drifted batch's outcome is a Completed state named "Drifted" holding the result (tasks/alerts.py).
    result = outcome.result() if isinstance(outcome, State) else outcome
    assert isinstance(outcome, State) == (result["verdict"] == "drift")
    table = read_selections(result["path"])
    assert result["samples"] == len(table) == 250 and result["rejected"] == int((~table["selected"]).sum())
    meta = table.attrs["seapig_core"]
    assert (meta["bundle_version"], meta["bundle_manifest_sha256"]) == (summary["version"], summary["manifest_sha256"])
    assert meta["bundle_dir"] == str(bundle.resolve()) and meta["threshold"] == summary["threshold"]
    json.dumps(result)
    done = {entry.batch: entry for entry in Ledger(out).entries()}
    assert done["batch-000"].state == "done" and done["batch-000"].selections_path == result["path"]
    assert done["batch-001"].state == "claimed"  # claimed by this process until scored
