"""fit_selector_task, score_batch_task, check_bundle_task through .fn(), and their content-keyed cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

import seapig_core
from seapig_core.selections import read_selections
from tasks import check_bundle_task, fit_selector_task, score_batch_task
from tasks._support import ContentCache


@pytest.fixture()
def bundle(digits: dict[str, Path], tmp_path: Path) -> Path:
    fit_selector_task.fn(str(digits["calibration"]), str(tmp_path / "bundle"), ["softmax", "entropy"], q=0.9)
    return tmp_path / "bundle"


def test_fit_selector_task(digits: dict[str, Path], tmp_path: Path) -> None:
    result = fit_selector_task.fn(str(digits["calibration"]), str(tmp_path / "b"), ["margin"], q=0.9, target_risk=0.1)
    assert result["primary"] == "margin" and Path(result["bundle_dir"]) == tmp_path / "b"
    assert result["calibration"]["coverage"] > 0.5 and result["calibration"]["samples"] == 629
    json.dumps(result)  # small and JSON-serialisable: what Prefect persists
    with pytest.raises(ValueError, match="must name scores among"):
        fit_selector_task.fn(str(digits["calibration"]), str(tmp_path / "c"), ["nope"])


def test_score_batch_task_and_check_bundle_task(bundle: Path, digits: dict[str, Path], tmp_path: Path) -> None:
    summary = check_bundle_task.fn(str(bundle))
    assert summary["primary"] == "softmax" and summary["scores"] == ["softmax", "entropy"] and summary["n_units"] == 10
    result = score_batch_task.fn(str(bundle), str(digits["queries"] / "batch-000.npz"), str(tmp_path / "out"), "batch-000")
    table = read_selections(result["path"])
    assert result["samples"] == len(table) == 250 and result["rejected"] == int((~table["selected"]).sum())
    assert "score_entropy" in table.columns and table.attrs["seapig_core"]["bundle_manifest_sha256"] == summary["manifest_sha256"]
    json.dumps(result)
    with pytest.raises(ValueError, match="plain file-name stem"):
        score_batch_task.fn(str(bundle), str(digits["queries"] / "batch-000.npz"), str(tmp_path / "out"), "../x")


def _key(policy: ContentCache, task, **parameters) -> str | None:
    return policy.compute_key(SimpleNamespace(task=task), parameters, {})


def test_score_cache_key_follows_content_and_library_version(
    bundle: Path, digits: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = score_batch_task.cache_policy
    queries = tmp_path / "queries"
    shutil.copytree(digits["queries"], queries)
    parameters = {"bundle_dir": str(bundle), "logits_path": str(queries / "batch-000.npz"), "output_dir": str(tmp_path / "out"), "batch": "batch-000"}
    assert _key(policy, score_batch_task, **parameters) is None  # no output yet: run, don't cache
    score_batch_task.fn(**parameters)
    key = _key(policy, score_batch_task, **parameters)
    assert key is not None and key == _key(policy, score_batch_task, **parameters)

    monkeypatch.setattr(seapig_core, "__version__", "999.0")
    assert _key(policy, score_batch_task, **parameters) != key  # a library upgrade re-scores
    monkeypatch.undo()

    shutil.copy(queries / "batch-001.npz", queries / "batch-000.npz")
    changed_input = _key(policy, score_batch_task, **parameters)
    assert changed_input not in (None, key)  # new query content re-scores

    shutil.copy(digits["queries"] / "batch-000.npz", queries / "batch-000.npz")
    assert _key(policy, score_batch_task, **parameters) == key
    out = Path(tmp_path / "out" / "batch-000.selections.parquet")
    out.write_bytes(out.read_bytes()[:-10])
    assert _key(policy, score_batch_task, **parameters) not in (None, key)  # an edited output is rebuilt
    out.unlink()
    assert _key(policy, score_batch_task, **parameters) is None

    fit_selector_task.fn(str(digits["calibration"]), str(bundle), ["softmax", "entropy"], q=0.5)  # a new bundle version
    score_batch_task.fn(**parameters)
    assert _key(policy, score_batch_task, **parameters) != key  # a recalibrated bundle re-scores


def test_fit_cache_key_needs_the_bundle_and_sees_the_calibration_file(digits: dict[str, Path], tmp_path: Path) -> None:
    policy = fit_selector_task.cache_policy
    parameters = {"logits_path": str(digits["calibration"]), "bundle_dir": str(tmp_path / "b"), "scores": ["softmax"], "q": 0.9}
    assert _key(policy, fit_selector_task, **parameters) is None
    fit_selector_task.fn(**parameters)
    key = _key(policy, fit_selector_task, **parameters)
    assert key is not None and _key(policy, fit_selector_task, **{**parameters, "q": 0.8}) != key
    assert _key(policy, fit_selector_task, **{**parameters, "logits_path": str(tmp_path / "missing.npz")}) is None
