"""Scoring flow: select the query batches with a saved selector; one selections Parquet file per batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, unmapped

from seapig_core.sources import check_source
from tasks import (
    check_bundle_task,
    extract_logits_task,
    list_logit_files_task,
    publish_scoring_artifacts,
    score_batch_task,
)


class ScoringFailed(RuntimeError):
    """One or more query batches could not be scored; the others were written and reported."""


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
) -> list[dict[str, Any]]:
    """Score and select every query batch with a selector bundle; publish the review artifacts.

    Each batch becomes ``<output_dir>/<batch>.selections.parquet``, written atomically: a re-run
    replaces it, and a failed batch leaves no partial file (and keeps an earlier one). Batches
    that fail are named, with the reason, in the error that fails the run; the others are still
    written and reported.

    Parameters
    ----------
    bundle_dir : str
        The selector bundle written by the calibration flow.
    output_dir : str
        Directory of the selections files (created if needed).
    logits_dir : str, optional
        A directory of logit files, one batch per file (``.npy``, ``.npz``, ``.parquet``,
        ``.arrow``, store entries). Give this, or ``model`` and ``data``.
    model, data : str, optional
        Import paths of a model factory and a data factory returning a DataLoader (one batch,
        named ``query``) or a mapping of batch names to DataLoaders.
    model_kwargs, data_kwargs : dict, optional
        Keyword arguments of the factories.
    store_dir : str, optional
        Logits store for extraction; default ``<parent of output_dir>/logits``.
    plot_dir : str, optional
        Also write the density plots there as PNG files.
    extract_options : dict, optional
        Passed to ``seapig_core.extract.extract_logits``.

    Returns
    -------
    list of dict
        Per batch: its name, the selections file and its summary.
    """
    source = check_source(logits_dir, model, data, "logits_dir")
    check_bundle_task(bundle_dir)
    if source == "files":
        batches = list_logit_files_task(logits_dir)
    else:
        store = store_dir or str(Path(output_dir).parent / "logits")
        extracted = extract_logits_task(model, data, store, model_kwargs, data_kwargs, "query", extract_options)
        batches = {entry["batch"]: entry["path"] for entry in extracted}
    futures = score_batch_task.map(unmapped(bundle_dir), list(batches.values()), unmapped(output_dir), list(batches))
    futures.wait()
    scored = [future.result() for future in futures if future.state.is_completed()]
    failed = {batch: future.state.message for batch, future in zip(batches, futures, strict=True) if not future.state.is_completed()}
    if scored:
        publish_scoring_artifacts(bundle_dir, {entry["batch"]: entry["path"] for entry in scored}, plot_dir)
    if failed:
        reasons = "; ".join(f"{batch}: {message}" for batch, message in failed.items())
        raise ScoringFailed(f"{len(failed)} of {len(batches)} query batch(es) failed and wrote no selections: {reasons}")
    return scored
