"""Shared test support for tests/tasks and tests/flows: one temporary Prefect server, the digits workspace.

Starting Prefect's test server costs about 15 s here, so both test directories share one per
session (the ``prefect_server`` fixture in tests/conftest.py). Results and cache records go to a
temporary directory, never to the user's ``PREFECT_HOME``.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np

DIGITS = "seapig_core.examples.digits"


@contextlib.contextmanager
def temporary_prefect_server(storage: Path) -> Any:
    """Prefect's temporary test server (SQLite in a temporary directory), results under ``storage``."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    settings = {PREFECT_LOCAL_STORAGE_PATH: str(storage), PREFECT_SERVER_ANALYTICS_ENABLED: False}
    with temporary_settings(settings), prefect_test_harness(server_startup_timeout=120):
        yield


def _run(coroutine_function: Any) -> Any:
    """Run ``coroutine_function(client)`` with a Prefect client of the current settings."""
    from prefect import get_client

    async def main() -> Any:
        async with get_client() as client:
            return await coroutine_function(client)

    return asyncio.run(main())


def read_artifacts(flow_run_id: UUID | str) -> dict[str, Any]:
    """The artifacts of a flow run by key (read back through the Prefect client)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    run_filter = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(str(flow_run_id))]))
    return {a.key: a for a in _run(lambda client: client.read_artifacts(artifact_filter=run_filter))}


def read_artifact_by_id(artifact_id: UUID | str) -> Any:
    """One artifact, read back through the Prefect client (also one created outside a flow run)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

    id_filter = ArtifactFilter(id=ArtifactFilterId(any_=[UUID(str(artifact_id))]))
    (artifact,) = _run(lambda client: client.read_artifacts(artifact_filter=id_filter))
    return artifact


def read_logs(flow_run_id: UUID | str) -> list[str]:
    """The messages logged by a flow run and its task runs (after sending the queued logs)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs reach the server in the background; send the queued ones now
    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(str(flow_run_id))]))
    return [log.message for log in _run(lambda client: client.read_logs(log_filter=log_filter))]


def read_task_runs(flow_run_id: UUID | str) -> list[Any]:
    """The task runs of a flow run."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    run_filter = FlowRunFilter(id=FlowRunFilterId(any_=[UUID(str(flow_run_id))]))
    return _run(lambda client: client.read_task_runs(flow_run_filter=run_filter))


def run_in_flow(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` (e.g. a task's ``.fn``) inside a throw-away flow run, as tasks run in production."""
    from prefect import flow

    @flow(name="task-under-test")
    def wrapper() -> Any:
        return fn(*args, **kwargs)

    return wrapper()


def digits_workspace(root: Path) -> dict[str, Path]:
    """Train the digits model once into ``root`` and write calibration and query logits as ``.npz`` files.

    Returns paths: ``model`` (weights cache), ``calibration`` (labelled logits file),
    ``queries`` (directory of three query batches), ``root``.
    """
    import torch

    from seapig_core.examples import digits

    paths = {"root": root, "model": root / "model", "calibration": root / "calibration.npz", "queries": root / "queries"}
    if paths["calibration"].is_file():
        return paths
    model = digits.digits_model(cache_dir=paths["model"])
    calibration = digits.digits_splits()["calibration"]
    with torch.no_grad():
        logits = model.logits(torch.from_numpy(np.array(calibration.images))).numpy()
    paths["queries"].mkdir(parents=True)
    for name, batch in digits.query_batches(n_batches=3).items():
        with torch.no_grad():
            query = model.logits(torch.from_numpy(np.array(batch.images))).numpy()
        np.savez(paths["queries"] / f"{name}.npz", logits=query, sample_ids=batch.sample_ids.astype(str))
    np.savez(paths["calibration"], logits=logits, labels=calibration.labels, sample_ids=calibration.sample_ids.astype(str))
    return paths

