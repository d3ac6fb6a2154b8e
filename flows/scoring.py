"""Scoring flow: score each new query batch exactly once with one bundle version; one selections file per batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, unmapped

from seapig_core.inbox import check_scoring_dirs
from seapig_core.sources import check_source
from tasks import (
    check_bundle_task,
    extract_logits_task,
    plan_scoring_task,
    publish_scoring_artifacts,
    score_batch_task,
)


class ScoringFailed(RuntimeError):
    """Batches failed or inbox files were refused; the other batches were written and reported."""


@flow(name="scoring")
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
) -> dict[str, Any]:
    """Score every query batch not scored yet, with one bundle version; publish the review artifacts.

    The run resolves the bundle's current version once; every batch it scores is loaded from
    exactly that version, and its selections file records it. The scoring ledger of
    ``output_dir`` makes scoring exactly once: a batch whose content was already scored (by any
    run, under any name) is skipped, one that another live run is scoring is left to it, and
    only new or changed files are scored. Each batch becomes
    ``<output_dir>/<batch>.selections.parquet``, written atomically. Batches that fail (retried
    by the next run) and inbox files that cannot be batches are named, with the reason, in the
    error that fails the run; the other batches are still written and reported. A run with
    nothing new writes nothing and publishes no artifact.

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

    Returns
    -------
    dict
        ``bundle_version``, ``bundle_dir``, ``scored`` (per batch scored now: its summary),
        ``selections`` (batch -> selections file, for every batch scored now or before),
        ``busy`` (batches another run is scoring), ``duplicates`` (batch -> the batch with the
        same content) and ``gone`` (removed before they were planned, e.g. archived by another run).
    """
    source = check_source(logits_dir, model, data, "logits_dir")
    if archive_dir is not None and source != "files":
        raise ValueError(
            f"The 'archive_dir' parameter moves inbox files, so it needs 'logits_dir'. Got archive_dir={archive_dir!r} "
            f"with model and data (store entries stay in the logits store)."
        )
    bundle = check_bundle_task(bundle_dir)
    check_scoring_dirs(output_dir, logits_dir, archive_dir)
    if source == "files":
        batches: str | dict[str, str] = logits_dir  # type: ignore[assignment]
    else:
        store = store_dir or str(Path(output_dir).parent / "logits")
        extracted = extract_logits_task(model, data, store, model_kwargs, data_kwargs, "query", extract_options)
        batches = {entry["batch"]: entry["path"] for entry in extracted}
    plan = plan_scoring_task(batches, output_dir, bundle["version"], rescore_on_new_bundle)
    get_run_logger().info(plan.describe())
    futures = score_batch_task.map(list(plan.claims), unmapped(bundle["version_path"]), unmapped(output_dir), unmapped(archive_dir))
    futures.wait()
    scored = [future.result() for future in futures if future.state.is_completed()]
    failed = {claim.batch: future.state.message for claim, future in zip(plan.claims, futures, strict=True) if not future.state.is_completed()}
    if scored:
        publish_scoring_artifacts(bundle["version_path"], {entry["batch"]: entry["path"] for entry in scored}, plot_dir)
    if failed or plan.refused:
        counts = ([f"{len(failed)} of {len(plan.claims)} claimed query batch(es) failed and will be retried by the next run"] if failed else []) + (
            [f"{len(plan.refused)} inbox file(s) were refused and stay in the inbox"] if plan.refused else []
        )
        details = [f"{batch}: {message}" for batch, message in failed.items()] + [f"{file}: {why}" for file, why in plan.refused.items()]
        raise ScoringFailed(f"{'; '.join(counts)} ({len(scored)} batch(es) were scored). " + "; ".join(details))
    return {
        "bundle_version": bundle["version"],
        "bundle_dir": bundle["bundle_dir"],
        "scored": scored,
        "selections": {**plan.done, **{entry["batch"]: entry["path"] for entry in scored}},
        "busy": list(plan.busy),
        "duplicates": plan.duplicates,
        "gone": list(plan.gone),
    }
