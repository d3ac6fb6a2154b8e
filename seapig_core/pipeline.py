"""The pipeline's steps as plain functions: files in, files and small JSON summaries out.

Each function is one step of the calibration or scoring flow; the repository's ``tasks/``
wrap each in a Prefect task, and they work just as well from a notebook or a cron job. They
take and return paths and JSON-serialisable summaries (never large tensors), so that what
passes between Prefect tasks stays small.

- :func:`calibrate_file`: calibration logits file -> selector bundle directory;
- :func:`score_file`: bundle + query logits file -> ``<batch>.selections.parquet``;
- :func:`calibration_review` / :func:`scoring_review`: bundle (+ selections) -> :class:`~seapig_core.reports.Report`;
- :func:`content_fingerprint`: the content hash of a step's input or output, for cache keys.

Extraction from a model and a data source is :func:`seapig_core.sources.extract_from_factories`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from seapig_core._io import file_sha256
from seapig_core.bundle import MANIFEST_NAME, fit_selector, load_bundle
from seapig_core.reports import Report, calibration_report, scoring_report
from seapig_core.selections import (
    read_selections,
    selections_path,
    selections_table,
    summarize_selections,
    write_selections,
)
from seapig_core.sources import read_logits_file

__all__ = ["calibrate_file", "calibration_review", "content_fingerprint", "score_file", "scoring_review"]


def content_fingerprint(path: str | os.PathLike[str]) -> str | None:
    """SHA-256 identifying the content at ``path``; None if nothing is there.

    A selector bundle directory is identified by its manifest (which names every score file by
    its hash), a logits store entry by its manifest (which holds the data file's hash), and
    any other file by its bytes.
    """
    path = Path(path)
    if path.is_dir():
        manifest = path / MANIFEST_NAME
        return file_sha256(manifest) if manifest.is_file() else None
    if not path.is_file():
        return None
    if path.name.endswith(".logits.arrow") and path.with_suffix(".json").is_file():
        return file_sha256(path.with_suffix(".json"))
    return file_sha256(path)


def calibrate_file(
    logits_path: str | os.PathLike[str],
    bundle_dir: str | os.PathLike[str],
    *,
    scores: str | Sequence[str] = ("softmax",),
    q: float = 0.95,
    task: str = "multiclass",
    per_member: bool = False,
    temperature: float | None = None,
    target_risk: float | None = None,
    delta: float = 0.05,
    split_fraction: float = 0.5,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit a selector on a calibration logits file and save it as a bundle.

    Reads ``logits_path`` (:func:`seapig_core.sources.read_logits_file`), fits with
    :func:`seapig_core.bundle.fit_selector` (same keyword arguments) and saves the bundle to
    ``bundle_dir``, replacing an earlier one there.

    Returns
    -------
    dict
        ``bundle_dir``, ``manifest_sha256``, ``primary``, ``threshold``, ``temperature`` and
        the bundle's ``calibration`` summary.
    """
    data = read_logits_file(logits_path)
    bundle = fit_selector(
        data.logits, data.labels, scores=scores, q=q, task=task, per_member=per_member, temperature=temperature,
        target_risk=target_risk, delta=delta, split_fraction=split_fraction, seed=seed,
        source={"logits_path": str(Path(logits_path).resolve()), "logits_sha256": content_fingerprint(logits_path)},
    )
    bundle.save(bundle_dir)
    return {
        "bundle_dir": str(bundle.path),
        "manifest_sha256": bundle.manifest_sha256,
        "primary": bundle.primary_name,
        "threshold": bundle.threshold,
        "temperature": bundle.temperature,
        "calibration": bundle.calibration,
    }


def score_file(
    bundle_dir: str | os.PathLike[str],
    logits_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    batch: str,
) -> dict[str, Any]:
    """Score and select one query batch; write ``<output_dir>/<batch>.selections.parquet``.

    The file is written atomically and replaces an earlier file of the same batch; if anything
    fails, no partial file is left and the earlier file is kept.

    Returns
    -------
    dict
        ``batch``, ``path`` and :func:`seapig_core.selections.summarize_selections`.

    Raises
    ------
    ValueError
        For a missing or invalid bundle or logits file, logits that do not fit the bundle
        (e.g. another class count), a bad batch name or an unwritable ``output_dir``.
    """
    bundle = load_bundle(bundle_dir)
    data = read_logits_file(logits_path, name="logits_path")
    table = selections_table(bundle, data.logits, data.sample_ids)
    metadata = {
        "batch": batch,
        "primary": bundle.primary_name,
        "threshold": bundle.threshold,
        "temperature": bundle.temperature,
        "bundle_dir": str(Path(bundle_dir).resolve()),
        "bundle_manifest_sha256": bundle.manifest_sha256,
        "logits_sha256": content_fingerprint(logits_path),
    }
    path = write_selections(table, selections_path(output_dir, batch), metadata=metadata)
    return {"batch": batch, "path": str(path), **summarize_selections(bundle, table)}


def calibration_review(
    bundle_dir: str | os.PathLike[str],
    plot_dir: str | os.PathLike[str] | None = None,
    *,
    provenance: Mapping[str, Any] | None = None,
) -> Report:
    """The calibration report of a saved bundle (:func:`seapig_core.reports.calibration_report`).

    Parameters
    ----------
    bundle_dir : str or Path
        The bundle.
    plot_dir : str or Path, optional
        Also write the report's figures there as PNG files.
    provenance : mapping, optional
        What the report describes (``deployment``, ``flow_run``, ``input_files``, ...; see
        :mod:`seapig_core.reports`); ``bundle_dir`` defaults to ``bundle_dir``.
    """
    bundle = load_bundle(bundle_dir)
    given = dict(provenance or {})
    given.setdefault("bundle_dir", str(Path(bundle_dir)))
    report = calibration_report(bundle, provenance=given)
    if plot_dir is not None:
        report.save_figures(plot_dir)
    return report


def scoring_review(
    bundle_dir: str | os.PathLike[str],
    selections: Mapping[str, str | os.PathLike[str]],
    plot_dir: str | os.PathLike[str] | None = None,
    *,
    provenance: Mapping[str, Any] | None = None,
    history: Any = None,
    thresholds: Any = None,
    queue_rows: int = 10,
) -> Report:
    """The scoring report of selections files by batch name (:func:`seapig_core.reports.scoring_report`).

    Made to be called from a task with paths and small dicts.

    Parameters
    ----------
    bundle_dir : str or Path
        The bundle the batches were scored with.
    selections : mapping of str to path
        Selections files (:func:`score_file`) by batch name.
    plot_dir : str or Path, optional
        Also write the figures there (``<batch>-density.png``, ``scoring-trend.png``).
    provenance : mapping, optional
        What the report describes (see :mod:`seapig_core.reports`); ``bundle_dir`` and
        ``selections_files`` default to the arguments.
    history : pandas.DataFrame or list of dict, optional
        Past runs for the trend chart (:func:`seapig_core.plotting.plot_drift_trend`).
    thresholds : DriftThresholds or mapping, optional
        The drift verdict's thresholds, e.g. a deployment parameter
        (:class:`seapig_core.drift.DriftThresholds`).
    queue_rows : int, default 10
        Rows of each batch's review queue.
    """
    bundle = load_bundle(bundle_dir)
    tables = {batch: read_selections(path) for batch, path in selections.items()}
    given = dict(provenance or {})
    given.setdefault("bundle_dir", str(Path(bundle_dir)))
    given.setdefault("selections_files", {batch: str(path) for batch, path in selections.items()})
    report = scoring_report(
        bundle, tables, provenance=given, history=history, thresholds=thresholds, queue_rows=queue_rows
    )
    if plot_dir is not None:
        report.save_figures(plot_dir)
    return report
