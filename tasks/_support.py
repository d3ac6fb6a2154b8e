"""What the tasks share: content-fingerprint cache keys, retry policy, a progress artifact.

Prefect's default task-source cache policy sees only a task's own lines, not the library it
calls, nor the files its parameters name. :class:`ContentCache` keys a task on
``seapig_core.__version__``, its source, its parameters and the *content* of the files it reads
and writes, so a cached result is reused only for the same code and the same bytes.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import CachePolicy
from prefect.client.schemas.objects import State, TaskRun
from prefect.context import TaskRunContext

import seapig_core
from seapig_core.pipeline import content_fingerprint

__all__ = ["ContentCache", "ProgressArtifact", "retry_unless_bad_input"]


@dataclass
class ContentCache(CachePolicy):
    """Cache key from the library version, the task's source, its parameters and file contents.

    Parameters
    ----------
    inputs : tuple of str
        Parameters naming files or bundle directories the task reads; their content hashes
        (:func:`seapig_core.pipeline.content_fingerprint`) enter the key.
    outputs : callable, optional
        ``parameters -> list of paths`` the task writes. Their current content enters the key,
        and while one is absent there is no key (the task runs): a deleted or edited output is
        rebuilt instead of being served from the cache.
    """

    inputs: tuple[str, ...] = ()
    outputs: Callable[[dict[str, Any]], list[str]] | None = field(default=None, repr=False)

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        content: dict[str, str] = {}
        for name in self.inputs:
            if inputs.get(name) is None:
                continue
            fingerprint = content_fingerprint(inputs[name])
            if fingerprint is None:
                return None  # the task will fail with a clear error; nothing to cache
            content[f"input:{name}"] = fingerprint
        for path in self.outputs(inputs) if self.outputs else []:
            fingerprint = content_fingerprint(path)
            if fingerprint is None:
                return None
            content[f"output:{path}"] = fingerprint
        fn = task_ctx.task.fn
        payload = {
            "library_version": seapig_core.__version__,
            "task": f"{fn.__module__}.{fn.__qualname__}",
            "source": hashlib.sha256(inspect.getsource(fn).encode()).hexdigest(),
            "parameters": inputs,
            "content": content,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


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
