"""What the tasks share: the retry policy and a progress artifact.

No task uses a Prefect cache policy: each step's own store is its cache and verifies what it
serves (the logits store for extraction, the bundle for calibration, the ledger for scoring).
Prefect's cache saw only a task's parameters and, through a hand-made key, some file hashes:
it served a broken bundle, and it began caching on the third run.
"""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.schemas.objects import State, TaskRun

__all__ = ["ProgressArtifact", "retry_unless_bad_input"]


def retry_unless_bad_input(task: Any, task_run: TaskRun, state: State) -> bool:
    """Retry transient failures; not a ValueError/TypeError (bad input fails the same way again)."""
    try:
        state.result()
    except (ValueError, TypeError):
        return False
    except Exception:
        return True
    return True


class ProgressArtifact:
    """A Prefect progress artifact fed with ``(done_rows, total_rows_or_None)``, updated at most once a second.

    Parameters
    ----------
    key : str
        Artifact key (lowercase letters, digits, dashes).
    description : str
        Shown beside the progress bar.
    min_interval : float
        Seconds between two updates (the last update, at 100 %, is always sent).
    """

    def __init__(self, key: str, description: str, min_interval: float = 1.0) -> None:
        self.artifact_id: UUID = create_progress_artifact(progress=0.0, key=key, description=description)
        self.min_interval = min_interval
        self._last = time.monotonic()
        self.progress = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        if not total:
            return  # an unknown total cannot be shown as a percentage
        progress = min(100.0, 100.0 * done / total)
        now = time.monotonic()
        if progress < 100.0 and now - self._last < self.min_interval:
            return
        self._last, self.progress = now, progress
        update_progress_artifact(self.artifact_id, progress)

    def finish(self) -> None:
        """Mark the work done (100 %)."""
        if self.progress < 100.0:
            self.progress = 100.0
            update_progress_artifact(self.artifact_id, 100.0)
