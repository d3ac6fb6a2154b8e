"""Prefect tasks of the seapig-core pipeline: each a few lines around one ``seapig_core`` call.

They pass file paths and small JSON summaries, never large tensors. Fitting and scoring are
cached on content fingerprints and the library version (:class:`tasks._support.ContentCache`);
extraction is cached by the logits store itself and retries transient errors.
"""

from tasks.artifacts import publish_calibration_artifacts, publish_scoring_artifacts
from tasks.extraction import extract_logits_task, list_logit_files_task
from tasks.selection import check_bundle_task, fit_selector_task, score_batch_task

__all__ = [
    "check_bundle_task",
    "extract_logits_task",
    "fit_selector_task",
    "list_logit_files_task",
    "publish_calibration_artifacts",
    "publish_scoring_artifacts",
    "score_batch_task",
]
