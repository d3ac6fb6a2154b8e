"""Scoring flow: score each new query batch exactly once with one bundle version; one selections file per batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.client.schemas.objects import State
from prefect.runtime import deployment

from flows._parameters import describe_parameters
from seapig_core._validation import check_positive_int
from seapig_core.drift import check_drift_thresholds
from seapig_core.inbox import check_scoring_dirs
from seapig_core.ledger import Claim
from seapig_core.scaleout import check_dask_options, check_split_rows
from seapig_core.sources import check_source
from tasks import (
    check_bundle_task,
    extract_logits_task,
    plan_scoring_task,
    publish_scoring_artifacts,
    record_outcome_task,
    score_batch_task,
)
from tasks.alerts import run_state
from tasks.artifacts import pipeline_key
from tasks.scaleout import batch_outcome, dask_task_runner, submit_batch


class ScoringFailed(RuntimeError):
    """Batches failed or inbox files were refused; the other batches were written and reported."""


@flow(name="score-on-dask")
@describe_parameters
def score_on_dask_flow(
    claims: list[Claim],
    bundle_path: str,
    output_dir: str,
    thresholds: dict[str, Any] | None = None,
    split_rows: int | None = None,
) -> list[dict[str, Any]]:
    """Score claimed batches on the Dask cluster of this subflow's task runner; one outcome per claim, in order.

    The scoring flow runs this subflow with ``.with_options(task_runner=DaskTaskRunner(...))``
    (a running flow cannot change its own task runner). Every batch is submitted at once: a
    whole batch is one task; a batch of more than ``split_rows`` rows is split into row ranges,
    each scored by its own task on whichever worker is free into a staged part file, then
    merged in input order by one more task (:mod:`seapig_core.scaleout`). The ledger is not
    touched here: the scoring flow records each outcome in its own process.

    Parameters
    ----------
    claims : list of Claim
        The batches the scoring run claimed.
    bundle_path : str
        The bundle version directory the run resolved.
    output_dir : str
        The selections directory (shared with the workers).
    thresholds : dict, optional
        The drift verdict's thresholds.
    split_rows : int, optional
        Split batches of more rows than this into row ranges; None scores every batch whole.

    Returns
    -------
    list of dict
        Per claim: ``result`` (the batch's summary) or ``error`` (why it failed).
    """
    in_flight = [submit_batch(claim, bundle_path, output_dir, thresholds, split_rows) for claim in claims]
    return [batch_outcome(batch) for batch in in_flight]


@flow(name="scoring")
@describe_parameters
def scoring_flow(
    bundle_dir: str,
    output_dir: str,
    logits_dir: str | None = None,
    model: str | None = None,
    data: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    data_kwargs: dict[str, Any] | None = None,
    store_dir: str | None = None,
    plot_dir: str | None = None,
    extract_options: dict[str, Any] | None = None,
    archive_dir: str | None = None,
    rescore_on_new_bundle: bool = False,
    drift_thresholds: dict[str, Any] | None = None,
    fail_on_drift: bool = False,
    review_count: int = 10,
    dask: dict[str, Any] | None = None,
    split_rows: int | None = None,
) -> State:
    """Score every query batch not scored yet, with one bundle version; publish the review artifacts.

    The run resolves the bundle's current version once; every batch it scores is loaded from
    exactly that version, and its selections file records it. The scoring ledger of
    ``output_dir`` makes scoring exactly once: a batch whose content was already scored (by any
    run, under any name) is skipped, one that another live run is scoring is left to it, and
    only new or changed files are scored. Each batch becomes
    ``<output_dir>/<batch>.selections.parquet``, written atomically. Batches that fail (retried
    by the next run) and inbox files that cannot be batches are named, with the reason, in the
    error that fails the run; the other batches are still written and reported. A run with
    nothing new writes nothing and publishes no artifact (its Completed state's message says
    so).

    Each batch gets a drift verdict (``drift_thresholds``). A drifted batch emits the
    ``seapig.batch.drifted`` event and its task run ends "Drifted"; the run then ends in a
    state named "Drift detected" (Completed, or Failed with ``fail_on_drift``) whose message
    names the drifted batches (:mod:`tasks.alerts`). The artifacts (keys from the deployment's
    name, or from ``output_dir`` when run by hand; :mod:`tasks.artifacts`): the verdict table,
    the report with the trend of recent runs, and a review queue per batch.

    Parameters
    ----------
    bundle_dir : str
        The selector bundle written by the calibration flow.
    output_dir : str
        Directory of the selections files and of the scoring ledger (created if needed).
    logits_dir : str, optional
        The inbox: a directory of logit files, one batch per file (``.npy``, ``.npz``,
        ``.parquet``, ``.arrow``, store entries). Give this, or ``model`` and ``data``.
    model, data : str, optional
        Import paths of a model factory and a data factory returning a DataLoader (one batch,
        named ``query``) or a mapping of batch names to DataLoaders; each batch is extracted
        into the logits store, and the store entry's content identifies it in the ledger.
    model_kwargs, data_kwargs : dict, optional
        Keyword arguments of the factories.
    store_dir : str, optional
        Logits store for extraction; default ``<parent of output_dir>/logits``.
    plot_dir : str, optional
        Also write the density plots there as PNG files.
    extract_options : dict, optional
        Passed to ``seapig_core.extract.extract_logits``.
    archive_dir : str, optional
        Move each scored inbox file there (with ``logits_dir`` only); the ledger records where.
    rescore_on_new_bundle : bool, default False
        Score again the inbox files that were scored with another bundle version (e.g. after a
        new calibration); by default a content is scored once, with the version current then.
    drift_thresholds : dict, optional
        Thresholds of the drift verdict, any of ``min_samples`` (100), ``alpha`` (0.001),
        ``rate_margin`` (0.05), ``ks_statistic`` (0.1) and ``psi`` (0.25); the defaults of
        :class:`seapig_core.drift.DriftThresholds` for the rest.
    fail_on_drift : bool, default False
        End the run Failed (state "Drift detected") instead of Completed when a batch drifted.
    review_count : int, default 10
        Rejected samples listed in each batch's review queue (most uncertain first).
    dask : dict, optional
        Score on a Dask cluster (README, "Scale-out on Dask"): ``{"address":
        "tcp://scheduler:8786"}`` for an existing cluster, or ``{"n_workers": 2,
        "threads_per_worker": 1}`` (and ``memory_limit``) for a LocalCluster started for the
        run; the batches then run in parallel on the workers, each worker loading the bundle
        once. The input files, ``bundle_dir`` and ``output_dir`` must be on a file system the
        workers share. Null (default): the batches run in threads of the flow's process.
    split_rows : int, optional
        With ``dask``: split each batch of more rows than this into row ranges scored on
        different workers and merged, in input order, into its one selections file (identical
        to scoring it whole). Null (default): every batch is scored whole.

    Returns
    -------
    State
        Completed (named "Drift detected" when a batch drifted), or Failed with
        ``fail_on_drift``; its result is a dict:
        ``bundle_version``, ``bundle_dir``, ``scored`` (per batch scored now: its summary),
        ``selections`` (batch -> selections file, for every batch scored now or before),
        ``busy`` (batches another run is scoring), ``duplicates`` (batch -> the batch with the
        same content) and ``gone`` (removed before they were planned, e.g. archived by another run).
    """
    source = check_source(logits_dir, model, data, "logits_dir")
    thresholds = check_drift_thresholds(drift_thresholds, "drift_thresholds").to_dict()
    review_count = check_positive_int(review_count, "review_count")
    cluster = check_dask_options(dask, "dask")
    split_rows = check_split_rows(split_rows, "split_rows")
    if split_rows is not None and cluster is None:
        raise ValueError(
            f"The 'split_rows' parameter splits batches across Dask workers, so it needs 'dask'. Got split_rows={split_rows} "
            f"with dask=None."
        )
    if not isinstance(fail_on_drift, bool):
        raise TypeError(f"The 'fail_on_drift' parameter must be true or false. Got {type(fail_on_drift).__name__} instead.")
    if archive_dir is not None and source != "files":
        raise ValueError(
            f"The 'archive_dir' parameter moves inbox files, so it needs 'logits_dir'. Got archive_dir={archive_dir!r} "
            f"with model and data (store entries stay in the logits store)."
        )
    bundle = check_bundle_task(bundle_dir)
    check_scoring_dirs(output_dir, logits_dir, archive_dir)
    pipeline = pipeline_key(deployment.name, output_dir)
    if source == "files":
        batches: str | dict[str, str] = logits_dir  # type: ignore[assignment]
    else:
        store = store_dir or str(Path(output_dir).parent / "logits")
        extracted = extract_logits_task(model, data, store, model_kwargs, data_kwargs, "query", extract_options, pipeline)
        batches = {entry["batch"]: entry["path"] for entry in extracted}
    plan = plan_scoring_task(batches, output_dir, bundle["version"], rescore_on_new_bundle)
    get_run_logger().info(plan.describe())
    if cluster is None or not plan.claims:
        futures = score_batch_task.map(
            list(plan.claims), unmapped(bundle["version_path"]), unmapped(output_dir), unmapped(archive_dir),
            unmapped(thresholds), unmapped(pipeline),
        )
        futures.wait()
        states = [future.state for future in futures]
    else:
        get_run_logger().info(
            f"Scoring on {cluster.describe()}" + (f"; batches over {split_rows:,} rows are split into row ranges." if split_rows else ".")
        )
        run = score_on_dask_flow.with_options(task_runner=dask_task_runner(cluster))(
            list(plan.claims), bundle["version_path"], output_dir, thresholds, split_rows, return_state=True
        )
        outcomes = run.result(raise_on_failure=False) if run.is_completed() else None
        if not isinstance(outcomes, list):  # the cluster could not be reached or started: every claim fails
            outcomes = [{"result": None, "error": f"Dask: {run.message}"}] * len(plan.claims)
        states = [
            record_outcome_task(claim, outcome, output_dir, archive_dir, pipeline, return_state=True)
            for claim, outcome in zip(plan.claims, outcomes, strict=True)
        ]
    scored = [state.result() for state in states if state.is_completed()]
    failed = {claim.batch: state.message for claim, state in zip(plan.claims, states, strict=True) if not state.is_completed()}
    if scored:
        inputs = {claim.batch: claim.input_path for claim in plan.claims}
        publish_scoring_artifacts(
            bundle["version_path"], {entry["batch"]: entry["path"] for entry in scored}, plot_dir, pipeline=pipeline,
            output_dir=output_dir, thresholds=thresholds, review_count=review_count, score=bundle["primary"],
            provenance={"bundle_dir": bundle["bundle_dir"], "input_files": {e["batch"]: inputs[e["batch"]] for e in scored}},
        )
    drifted = [entry["batch"] for entry in scored if entry.get("verdict") == "drift"]
    if failed or plan.refused:
        counts = ([f"{len(failed)} of {len(plan.claims)} claimed query batch(es) failed and will be retried by the next run"] if failed else []) + (
            [f"{len(plan.refused)} inbox file(s) were refused and stay in the inbox"] if plan.refused else []
        )
        details = [f"{batch}: {message}" for batch, message in failed.items()] + [f"{file}: {why}" for file, why in plan.refused.items()]
        drift = f" Drift detected in: {', '.join(drifted)}." if drifted else ""
        raise ScoringFailed(f"{'; '.join(counts)} ({len(scored)} batch(es) were scored).{drift} " + "; ".join(details))
    result = {
        "bundle_version": bundle["version"],
        "bundle_dir": bundle["bundle_dir"],
        "scored": scored,
        "selections": {**plan.done, **{entry["batch"]: entry["path"] for entry in scored}},
        "busy": list(plan.busy),
        "duplicates": plan.duplicates,
        "gone": list(plan.gone),
    }
    return run_state(result, fail_on_drift=fail_on_drift, nothing_new=plan.describe())
