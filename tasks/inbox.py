"""Tasks of an exactly-once scoring run: list the inbox, plan against the ledger, score one claim.

No Prefect cache: the ledger of ``output_dir`` (:mod:`seapig_core.ledger`) is the cache of
scoring. It records each input content scored with its selections file, so a re-run scores
only new or changed files, and overlapping runs never score a file twice.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.runtime import deployment, flow_run

from seapig_core.inbox import ScoringPlan, plan_scoring, score_claim
from seapig_core.ledger import Claim
from tasks.alerts import batch_state
from tasks.keys import pipeline_key


@task(name="plan-scoring", cache_policy=NO_CACHE)
def plan_scoring_task(
    source: str | dict[str, str], output_dir: str, bundle_version: str, rescore_on_new_bundle: bool = False
) -> ScoringPlan:
    """Claim in the ledger the batches of an inbox (or of extracted entries) not yet scored."""
    return plan_scoring(
        source, output_dir, bundle_version, rescore_on_new_bundle=rescore_on_new_bundle,
        run_id=None if flow_run.id is None else str(flow_run.id), deployment=deployment.name,
    )


@task(name="score-batch", task_run_name="score-{claim.batch}", cache_policy=NO_CACHE)
def score_batch_task(
    claim: Claim,
    bundle_path: str,
    output_dir: str,
    archive_dir: str | None = None,
    thresholds: dict[str, Any] | None = None,
    pipeline: str | None = None,
    chunk_rows: int | None = None,
    memory_budget_mb: int | None = None,
) -> dict[str, Any] | State:
    """Score one claimed batch with the run's bundle version, archive it if asked, and record it in the ledger.

    The batch streams in chunks of ``chunk_rows`` rows; the run's concurrent batches share one
    memory budget of ``memory_budget_mb`` (default ``$SEAPIG_MEMORY_BUDGET_MB`` or 1024 MB; see
    :mod:`seapig_core.pipeline`). A drifted batch emits the drift event and ends "Drifted"
    (:func:`tasks.alerts.batch_state`).
    """
    result = score_claim(
        claim, bundle_path, output_dir, archive_dir=archive_dir, thresholds=thresholds, chunk_rows=chunk_rows,
        memory_budget_mb=memory_budget_mb,
    )
    return batch_state(result, pipeline=pipeline or pipeline_key(None, output_dir), output_dir=output_dir, input_file=claim.input_path)
