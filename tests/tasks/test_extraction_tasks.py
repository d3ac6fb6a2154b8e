"""extract_logits_task through .fn(), and the shared retry policy and progress artifact."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.states import Completed, Failed

from tasks import extract_logits_task
from tasks._support import ProgressArtifact, retry_unless_bad_input
from tests.flows.harness import DIGITS, read_artifact_by_id, run_in_flow


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_extract_logits_task_fills_the_store_and_reports_progress(digits: dict[str, Path], tmp_path: Path) -> None:
    kwargs = {
        "model": f"{DIGITS}:digits_model", "data": f"{DIGITS}:query_loaders", "store_dir": str(tmp_path),
        "model_kwargs": {"cache_dir": str(digits["model"])}, "data_kwargs": {"n_batches": 2},
    }
    batches = run_in_flow(extract_logits_task.fn, **kwargs)
    assert [(b["batch"], b["samples"], b["from_cache"]) for b in batches] == [("batch-000", 375, False), ("batch-001", 375, False)]
    assert all(Path(b["path"]).is_file() and Path(b["path"]).parent == tmp_path for b in batches)
    again = run_in_flow(extract_logits_task.fn, **kwargs)
    assert [b["from_cache"] for b in again] == [True, True]


@pytest.mark.usefixtures("prefect_server")
def test_progress_artifact_reaches_100() -> None:
    def report() -> tuple:
        progress = ProgressArtifact("test-progress", "testing", min_interval=0.0)
        for done in (10, 50, 80):
            progress(done, 100)
        middle = read_artifact_by_id(progress.artifact_id).data
        progress(5, None)  # unknown totals are skipped
        progress.finish()
        return middle, progress.artifact_id

    middle, artifact_id = run_in_flow(report)
    assert middle == pytest.approx(80.0)
    assert read_artifact_by_id(artifact_id).data == pytest.approx(100.0)


def test_extract_logits_task_rejects_bad_import_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tasks.extraction.ProgressArtifact", lambda *a, **k: _NoProgress())
    with pytest.raises(ValueError, match="'nowhere.module', which is not allowed"):
        extract_logits_task.fn("nowhere.module:net", f"{DIGITS}:digits_loader", str(tmp_path))
    with pytest.raises(ValueError, match="cannot import module"):
        extract_logits_task.fn("seapig_core.examples.nowhere:net", f"{DIGITS}:digits_loader", str(tmp_path))


class _NoProgress:
    def __call__(self, done: int, total: int | None) -> None:
        pass

    def finish(self) -> None:
        pass


def test_retry_only_transient_errors() -> None:
    assert extract_logits_task.retries == 2 and extract_logits_task.retry_condition_fn is retry_unless_bad_input
    assert not retry_unless_bad_input(None, None, Failed(data=ValueError("bad path")))
    assert not retry_unless_bad_input(None, None, Failed(data=TypeError("bad type")))
    assert retry_unless_bad_input(None, None, Failed(data=ConnectionError("flaky storage")))
    assert retry_unless_bad_input(None, None, Completed(data=1))
