"""Prefect tasks of the seapig-core pipeline: each a few lines around one ``seapig_core`` call.

They pass file paths and small JSON summaries, never large tensors. None uses a Prefect cache:
extraction is cached by the logits store, calibration by the bundle (a clean, matching version
is reused), scoring by the ledger of the output directory (each input content is scored once);
each verifies what it serves.
"""

from tasks.artifacts import publish_calibration_artifacts, publish_scoring_artifacts
from tasks.extraction import extract_logits_task
from tasks.inbox import plan_scoring_task, score_batch_task
from tasks.selection import check_bundle_task, fit_selector_task

__all__ = [
    "check_bundle_task",
    "extract_logits_task",
    "fit_selector_task",
    "plan_scoring_task",
    "publish_calibration_artifacts",
    "publish_scoring_artifacts",
    "score_batch_task",
]
