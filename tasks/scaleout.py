"""Tasks of a scoring run on a Dask cluster: batches in parallel on the workers, large batches split into row ranges.

The scoring flow scores its claims in a subflow whose task runner is prefect-dask's
``DaskTaskRunner`` (:func:`dask_task_runner`). :func:`submit_batch` submits each claimed batch:
the tasks it submits (:func:`score_claimed_task` for a whole batch; :func:`score_range_task`
per row range and :func:`merge_ranges_task` for a batch of more than ``split_rows`` rows) run
on the cluster's workers; the ones it calls directly (:func:`plan_split_task`,
:func:`discard_split_task`) run in the flow's process. :func:`batch_outcome` waits for a
batch, and the scoring flow records each outcome in the ledger with
:func:`record_outcome_task`, in its own process, which made the claims: the scoring ledger
(:mod:`seapig_core.ledger`, SQLite) and the staging directories of split batches are touched
by that one process only, never by the workers.

Workers read the query files and the bundle version and write part files and selections
files: those paths must be on a file system every worker sees under the same names. Each
worker process loads a bundle version once (:func:`seapig_core.bundle.load_bundle_cached`),
however many tasks it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prefect import task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.states import Failed

from seapig_core.inbox import claim_logits_sha256, complete_claim, fail_claim, score_claimed
from seapig_core.ledger import Claim
from seapig_core.scaleout import (
    DaskOptions,
    SplitPlan,
    StagedRows,
    discard_split,
    merge_ranges,
    plan_split,
    score_range,
)
from tasks.alerts import batch_state
from tasks.keys import pipeline_key

__all__ = [
    "BatchInFlight",
    "batch_outcome",
    "dask_task_runner",
    "discard_split_task",
    "merge_ranges_task",
    "plan_split_task",
    "record_outcome_task",
    "score_claimed_task",
    "score_range_task",
    "submit_batch",
]


def dask_task_runner(options: DaskOptions) -> Any:
    """prefect-dask's ``DaskTaskRunner`` for validated options: the cluster at ``options.address``, or a new LocalCluster.

    A LocalCluster is started when the runner's subflow submits its first task and stopped when
    the subflow ends (3-5 s here). prefect-dask is imported only when a run asks for Dask.
    """
    from prefect_dask import DaskTaskRunner

    if options.local:
        return DaskTaskRunner(cluster_kwargs=options.cluster_kwargs())
    return DaskTaskRunner(address=options.address)


@task(name="plan-split", task_run_name="plan-split-{claim.batch}", cache_policy=NO_CACHE)
def plan_split_task(claim: Claim, bundle_path: str, output_dir: str, split_rows: int) -> SplitPlan | None:
    """Plan the row ranges of a claimed batch of more than ``split_rows`` rows (None: score it whole); run where the claim was made."""
    return plan_split(
        bundle_path, claim.input_path, output_dir, claim.batch, split_rows=split_rows, logits_sha256=claim_logits_sha256(claim)
    )


@task(name="score-claimed", task_run_name="score-{claim.batch}", cache_policy=NO_CACHE)
def score_claimed_task(claim: Claim, bundle_path: str, output_dir: str, thresholds: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the selections of one whole claimed batch (streamed), on a worker; the ledger is left to the flow."""
    return score_claimed(claim, bundle_path, output_dir, thresholds=thresholds)


@task(name="score-range", task_run_name="score-{plan.batch}-range-{index}", cache_policy=NO_CACHE)
def score_range_task(plan: SplitPlan, index: int) -> StagedRows:
    """Score one row range of a split batch into its staged part file, on a worker; return its partial summary."""
    return score_range(plan, index)


@task(name="merge-ranges", task_run_name="merge-{plan.batch}", cache_policy=NO_CACHE)
def merge_ranges_task(plan: SplitPlan, parts: list[StagedRows], thresholds: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge the staged ranges of a split batch into its one selections file, in input order, on a worker."""
    return merge_ranges(plan, parts, thresholds=thresholds)


@task(name="discard-split", task_run_name="discard-{plan.batch}", cache_policy=NO_CACHE)
def discard_split_task(plan: SplitPlan) -> None:
    """Remove the staged ranges of a split batch that failed (in the flow's process, which owns them)."""
    discard_split(plan)


@dataclass
class BatchInFlight:
    """One claimed batch submitted to the run's task runner (:func:`submit_batch`).

    Attributes
    ----------
    claim : Claim
    plan : SplitPlan or None
        Its row ranges, when it was split.
    parts : list of PrefectFuture
        The range tasks (split batches).
    future : PrefectFuture or None
        The whole batch's score task, or the merge of its ranges; None when planning failed.
    error : str or None
        Why planning failed.
    """

    claim: Claim
    plan: SplitPlan | None = None
    parts: list[Any] = field(default_factory=list)
    future: Any = None
    error: str | None = None


def submit_batch(
    claim: Claim, bundle_path: str, output_dir: str, thresholds: dict[str, Any] | None, split_rows: int | None
) -> BatchInFlight:
    """Submit a claimed batch: whole (:func:`score_claimed_task`), or, over ``split_rows`` rows, as row ranges and their merge.

    Call inside a flow: planning runs in its process; the scoring tasks go to its task runner
    (a Dask cluster's workers). A batch whose planning fails (its file unreadable, or not
    fitting the bundle) is returned with the reason, not submitted.
    """
    plan = None
    if split_rows is not None:
        planning = plan_split_task(claim, bundle_path, output_dir, split_rows, return_state=True)
        if not planning.is_completed():
            return BatchInFlight(claim, error=_reason(planning))
        plan = planning.result()
    if plan is None:
        return BatchInFlight(claim, future=score_claimed_task.submit(claim, bundle_path, output_dir, thresholds))
    parts = score_range_task.map(unmapped(plan), list(range(len(plan.ranges))))
    return BatchInFlight(claim, plan, list(parts), merge_ranges_task.submit(plan, parts, thresholds))


def batch_outcome(batch: BatchInFlight) -> dict[str, Any]:
    """Wait for a submitted batch: ``{"result": summary, "error": None}`` or ``{"result": None, "error": reason}``.

    A split batch whose range (or merge) failed has its staged ranges removed once every range
    task has ended; the reason is the first failed range's. Only small results reach the
    flow's process: the merge's summary (a range's partial summary goes from its worker to the
    merge's), or the failed states.
    """
    if batch.future is None:
        return {"result": None, "error": batch.error}
    batch.future.wait()
    if batch.future.state.is_completed():
        return {"result": batch.future.result(), "error": None}
    for part in batch.parts:
        part.wait()
    failed = [part for part in batch.parts if not part.state.is_completed()]
    reason = _failure(failed[0] if failed else batch.future)
    if batch.plan is not None:
        discard_split_task(batch.plan)
    return {"result": None, "error": reason}


def _reason(state: State) -> str:
    return state.message or f"its task run ended {state.name}"


def _failure(future: Any) -> str:
    """Why a finished future's task did not complete: its state's message, or the cluster's error.

    A task that never started on the cluster (its graph could not be unpickled by the scheduler
    or a worker, a worker died) leaves its task run Pending; the Dask future holds the error.
    """
    state = future.state
    if state.is_final():
        return _reason(state)
    try:
        future.result(raise_on_failure=True)  # finished (waited for): returns or raises at once
    except Exception as exc:  # the cluster's error, e.g. ModuleNotFoundError on the scheduler
        cause = "" if exc.__cause__ is None else f" Caused by {type(exc.__cause__).__name__}: {exc.__cause__}"
        return " ".join(f"The Dask cluster could not run the task: {type(exc).__name__}: {exc}{cause}".split())
    return _reason(state)


@task(name="record-outcome", task_run_name="record-{claim.batch}", cache_policy=NO_CACHE)
def record_outcome_task(
    claim: Claim, outcome: dict[str, Any], output_dir: str, archive_dir: str | None = None, pipeline: str | None = None
) -> dict[str, Any] | State:
    """Record a batch scored on the cluster in the ledger, in the flow's process (which claimed it).

    Scored (``outcome["result"]``): the input is checked and archived if asked, and the claim
    completed (:func:`seapig_core.inbox.complete_claim`); a drifted batch emits its event and
    ends "Drifted" (:func:`tasks.alerts.batch_state`). Failed (``outcome["error"]``): the claim
    is marked failed (the next run retries it) and the task run ends Failed with the reason.
    """
    if outcome.get("error") is not None or outcome.get("result") is None:
        reason = str(outcome.get("error") or "no result")
        fail_claim(claim, reason, output_dir)
        return Failed(message=reason)
    recorded = complete_claim(claim, outcome["result"], output_dir, archive_dir=archive_dir)
    return batch_state(recorded, pipeline=pipeline or pipeline_key(None, output_dir), output_dir=output_dir, input_file=claim.input_path)
