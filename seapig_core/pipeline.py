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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from seapig_core import store
from seapig_core._io import file_sha256
from seapig_core._version import __version__
from seapig_core.bundle import (
    DEFAULT_KEEP_PREVIOUS,
    CalibrationSettings,
    SelectorBundle,
    fit_selector,
    load_bundle,
    resolve_settings,
)
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
    """SHA-256 identifying the content at ``path``; None if nothing (valid) is there.

    A selector bundle directory is identified by the manifest SHA-256 of its current version
    (which names every score file by its hash, and differs between any two versions); it is
    loaded and verified first (:func:`seapig_core.bundle.load_bundle`), and a bundle that does
    not load has no fingerprint (None), so that it is never served from a cache. A logits
    store entry is identified by its manifest (which holds the data file's hash), and any
    other file by its bytes.
    """
    path = Path(path)
    if path.is_dir():
        try:
            return load_bundle(path).manifest_sha256
        except ValueError:
            return None
    if not path.is_file():
        return None
    if store.is_entry(path):
        manifest = store.entry_paths(path.parent, store.entry_prefix(path))[1]
        if manifest.is_file():
            return file_sha256(manifest)
    return file_sha256(path)


def _reusable_bundle(bundle_dir: str | os.PathLike[str], settings: CalibrationSettings, logits_sha256: str | None) -> SelectorBundle | None:
    """The current version of ``bundle_dir`` if it can stand for this calibration, else None.

    Only a bundle that loads cleanly (every hash and field verified) and was calibrated from
    the same input content, with the same settings and this library version, is reused.
    """
    if logits_sha256 is None:
        return None
    try:
        current = load_bundle(bundle_dir)
    except ValueError:
        return None  # absent, of another schema version, or damaged: refit, which repairs it
    same = (
        current.settings == settings
        and current.library_version == __version__
        and current.source.get("logits_sha256") == logits_sha256
    )
    return current if same else None


def calibrate_file(
    logits_path: str | os.PathLike[str],
    bundle_dir: str | os.PathLike[str],
    settings: CalibrationSettings | Mapping[str, Any] | None = None,
    *,
    keep_previous: int = DEFAULT_KEEP_PREVIOUS,
    **kwargs: Any,
) -> dict[str, Any]:
    """Fit a selector on a calibration logits file and save it as a new version of a bundle.

    If the bundle's current version loads cleanly and was calibrated from the same content
    (the file's :func:`content_fingerprint`) with the same ``settings`` and the same library
    version, it is reused: nothing is refitted or written (``reused`` is True). Otherwise
    ``logits_path`` is read (:func:`seapig_core.sources.read_logits_file`), a selector is fitted
    (:func:`seapig_core.bundle.fit_selector`) and saved as a new version
    (:meth:`~seapig_core.bundle.SelectorBundle.save`); a damaged bundle is repaired that way.

    Parameters
    ----------
    logits_path : str or os.PathLike
        Calibration logits (with labels for a temperature, metrics or a target risk).
    bundle_dir : str or os.PathLike
        The bundle root.
    settings : CalibrationSettings or dict, optional
        The calibration settings; or give them as keyword arguments (``scores=..., q=...``).
    keep_previous : int, default :data:`seapig_core.bundle.DEFAULT_KEEP_PREVIOUS`
        Old versions kept besides the current one.

    Returns
    -------
    dict
        ``bundle_dir``, ``version``, ``version_path``, ``manifest_sha256``, ``primary``,
        ``threshold``, ``temperature``, the bundle's ``calibration`` summary and ``reused``.
    """
    settings = resolve_settings(settings, kwargs)
    logits_sha256 = content_fingerprint(logits_path)
    bundle = _reusable_bundle(bundle_dir, settings, logits_sha256)
    reused = bundle is not None
    if bundle is None:
        data = read_logits_file(logits_path)
        source = {"logits_path": str(Path(logits_path).resolve()), "logits_sha256": logits_sha256}
        bundle = fit_selector(data.logits, data.labels, settings, source=source)
        bundle.save(bundle_dir, keep_previous=keep_previous)
    return {
        "bundle_dir": str(bundle.path),
        "version": bundle.version,
        "version_path": str(bundle.version_path),
        "manifest_sha256": bundle.manifest_sha256,
        "primary": bundle.primary_name,
        "threshold": bundle.threshold,
        "temperature": bundle.temperature,
        "calibration": bundle.calibration,
        "reused": reused,
    }


def score_file(
    bundle_dir: str | os.PathLike[str],
    logits_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    batch: str,
    *,
    thresholds: Any = None,
) -> dict[str, Any]:
    """Score and select one query batch; write ``<output_dir>/<batch>.selections.parquet``.

    The bundle is loaded once (:func:`seapig_core.bundle.load_bundle`) and everything the
    selections file records about it comes from that one loaded object: its ``bundle_version``,
    ``bundle_manifest_sha256``, ``threshold``, ``temperature`` and primary score, and the bundle
    root (``bundle_dir``). Pass a version directory (``version_path``) to score with exactly that
    version while calibrations switch the bundle's pointer; pass the root for its current version.

    The file is written atomically and replaces an earlier file of the same batch; if anything
    fails, no partial file is left and the earlier file is kept. ``thresholds`` (a
    :class:`seapig_core.drift.DriftThresholds` or a mapping of its fields; the defaults when
    omitted) set the summary's drift verdict.

    Returns
    -------
    dict
        ``batch``, ``path``, ``bundle_version``, ``bundle_manifest_sha256`` and
        :func:`seapig_core.selections.summarize_selections`.

    Raises
    ------
    ValueError
        For a missing or invalid bundle or logits file, logits that do not fit the bundle
        (e.g. another class count), a bad batch name or an unwritable ``output_dir``.
    """
    bundle = load_bundle(bundle_dir)
    data = read_logits_file(logits_path, name="logits_path")
    table = selections_table(bundle, data.logits, data.sample_ids)
    provenance = {
        "bundle_version": bundle.version,
        "bundle_manifest_sha256": bundle.manifest_sha256,
        "bundle_dir": None if bundle.path is None else str(Path(bundle.path).resolve()),
    }
    metadata = {
        "batch": batch,
        "primary": bundle.primary_name,
        "threshold": bundle.threshold,
        "temperature": bundle.temperature,
        **provenance,
        "logits_sha256": content_fingerprint(logits_path),
    }
    path = write_selections(table, selections_path(output_dir, batch), metadata=metadata)
    return {"batch": batch, "path": str(path), **provenance, **summarize_selections(bundle, table, thresholds)}


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
