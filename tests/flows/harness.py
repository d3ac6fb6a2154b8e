"""Shared test support for tests/tasks and tests/flows: one temporary Prefect server, the digits workspace.

Starting Prefect's test server costs about 15 s here, so both test directories share one per
session: :func:`acquire_server` starts it on first use and the last :func:`release_server`
stops it. Results and cache records go to a temporary directory, never to the user's
``PREFECT_HOME``.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np

_stack: contextlib.ExitStack | None = None
_users = 0

DIGITS = "seapig_core.examples.digits"


def acquire_server(storage: Path) -> None:
    """Start the shared temporary Prefect server (and isolated result storage) if not running."""
    global _stack, _users
    if _stack is None:
        from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
        from prefect.testing.utilities import prefect_test_harness

        stack = contextlib.ExitStack()
        stack.enter_context(
            temporary_settings({PREFECT_LOCAL_STORAGE_PATH: str(storage), PREFECT_SERVER_ANALYTICS_ENABLED: False})
        )
        stack.enter_context(prefect_test_harness(server_startup_timeout=120))
        _stack = stack
    _users += 1


def release_server() -> None:
    """Stop the shared server when its last user is done."""
    global _stack, _users
    _users -= 1
    if _users == 0 and _stack is not None:
        stack, _stack = _stack, None
        stack.close()


def read_artifacts(flow_run_id: UUID | str) -> dict[str, Any]:
    """The artifacts of a flow run by key (read back through the Prefect client)."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, TaskRunFilter
    from prefect.client.schemas.sorting import ArtifactSort

    async def read() -> list[Any]:
        async with get_client() as client:
            # Every field explicit: Prefect 3.8.8's client sends None for omitted ones, which this
            # server version rejects (422).
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(str(flow_run_id))])),
                flow_run_filter=FlowRunFilter(), task_run_filter=TaskRunFilter(), limit=200, offset=0,
                sort=ArtifactSort.CREATED_DESC,
            )

    return {a.key: a for a in asyncio.run(read())}


def read_logs(flow_run_id: UUID | str) -> list[str]:
    """The messages logged by a flow run and its task runs (after sending the queued logs)."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs reach the server in the background; send the queued ones now

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(str(flow_run_id))])), limit=200, offset=0
            )

    return [log.message for log in asyncio.run(read())]


def read_task_runs(flow_run_id: UUID | str) -> list[Any]:
    """The task runs of a flow run."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(str(flow_run_id))])),
                sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200,
            )

    return asyncio.run(read())


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


def read_artifact_by_id(artifact_id: UUID | str) -> Any:
    """One artifact, read back from the Prefect API (also one created outside a flow run)."""
    from prefect import get_client
    from prefect.client.schemas.objects import Artifact

    async def read() -> Any:
        async with get_client() as client:
            # Prefect 3.8.8's client fills omitted filters with null, which this server rejects
            # (422), and an empty flow-run filter drops artifacts without a run: post the body.
            response = await client._client.post(
                "/artifacts/filter",
                json={"artifacts": {"id": {"any_": [str(artifact_id)]}}, "limit": 1, "offset": 0, "sort": "CREATED_DESC"},
            )
            return response.json()

    (artifact,) = asyncio.run(read())
    return Artifact.model_validate(artifact)


def run_in_flow(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` (e.g. a task's ``.fn``) inside a throw-away flow run, as tasks run in production."""
    from prefect import flow

    @flow(name="task-under-test")
    def wrapper() -> Any:
        return fn(*args, **kwargs)

    return wrapper()
