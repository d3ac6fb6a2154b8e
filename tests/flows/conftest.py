"""Fixtures of the flow tests: the shared temporary Prefect server and the digits workspace."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.flows.harness import acquire_server, digits_workspace, release_server


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A temporary Prefect server (SQLite in a temporary directory) for the whole session."""
    acquire_server(tmp_path_factory.mktemp("prefect-storage"))
    yield
    release_server()


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Trained digits model, calibration logits (.npz) and a directory of three query batches."""
    return digits_workspace(tmp_path_factory.getbasetemp() / "digits-workspace")
