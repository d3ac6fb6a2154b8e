"""Shared test configuration: headless plotting, the shared CIFAR-100 record."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parents[1]
CIFAR100 = Path(os.environ.get("SEAPIG_SHARED_DATA", REPO.parent / "shared" / "data")) / "densenet-bc-100-cifar-100.npz"


@pytest.fixture(scope="session")
def cifar100() -> tuple[np.ndarray, np.ndarray]:
    """Real DenseNet-BC-100 CIFAR-100 test outputs as (logits float32 (10000, 100), labels int64)."""
    if not CIFAR100.is_file():
        pytest.skip(f"shared CIFAR-100 record not found at {CIFAR100}")
    with np.load(CIFAR100, allow_pickle=False) as record:
        probs = record["predictions"].astype(np.float64)
        labels = record["ground_truth"].astype(np.int64)
    return np.log(probs).astype(np.float32), labels


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """One temporary Prefect server for the whole session, shared by tests/tasks and tests/flows."""
    from tests.flows.harness import temporary_prefect_server

    with temporary_prefect_server(tmp_path_factory.mktemp("prefect-storage")):
        yield


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Trained digits model, calibration logits (.npz) and a directory of three query batches."""
    from tests.flows.harness import digits_workspace

    return digits_workspace(tmp_path_factory.getbasetemp() / "digits-workspace")
