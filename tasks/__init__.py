"""Prefect tasks of the seapig-core pipeline: each a few lines around one ``seapig_core`` call.

They pass file paths and small JSON summaries, never large tensors. None uses a Prefect cache:
extraction is cached by the logits store, calibration by the bundle (a clean, matching version
is reused), scoring by the ledger of the output directory (each input content is scored once);
each verifies what it serves.

The names below are imported on first use (PEP 562), so that a flow needing one light module
(the drift alert: :mod:`tasks.alerts`, :mod:`tasks.keys`) does not load torch through the others.
"""

from __future__ import annotations

import importlib
from typing import Any

_SOURCES = {
    "check_bundle_task": "tasks.selection",
    "extract_logits_task": "tasks.extraction",
    "fit_selector_task": "tasks.selection",
    "plan_scoring_task": "tasks.inbox",
    "publish_calibration_artifacts": "tasks.artifacts",
    "publish_drift_alert": "tasks.alerts",
    "publish_scoring_artifacts": "tasks.artifacts",
    "score_batch_task": "tasks.inbox",
    "record_outcome_task": "tasks.scaleout",
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module 'tasks' has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SOURCES))
