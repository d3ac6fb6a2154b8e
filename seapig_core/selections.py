"""Selections: which query samples a selector accepts, as a Parquet table, and its summary.

:func:`selections_table` turns a :class:`~seapig_core.bundle.SelectorBundle`, query logits and
sample ids into one row per sample; :func:`write_selections` writes it atomically, replacing an
earlier file of the same batch (:func:`selections_path`); :func:`summarize_selections` gives
the numbers a reviewer compares with the calibration (rejection rate against the expected one,
drift of the query scores).

Parquet schema (``schema_version`` 1), one row per query sample, in input order:

- ``sample_id``: the caller's ids (string or integer); the row index when none were given;
- ``prediction``: int64 predicted class (multilabel: list of 0/1 per label); ``-1`` for a
  sample with non-finite logits;
- ``score``: the primary score (higher = more uncertain; NaN for non-finite logits);
- ``selected``: bool, ``score < threshold`` (never True for non-finite logits);
- ``alternate_label``: int64 runner-up class (see :func:`seapig_core.kernels.runner_up`);
- ``certainty_ratio``: ``p_(2) / p_(1)`` at the bundle's temperature, in (0, 1];
- ``score_<name>`` and ``selected_<name>``: every further score of the bundle, with its own
  threshold.

The file's schema metadata key ``seapig_core`` holds JSON: ``format``
(``"seapig_core.selections"``), ``schema_version``, ``library_version``, ``batch``, the primary
score, its threshold and temperature, and the bundle's manifest SHA-256 and path. Files are
written without timestamps, so scoring the same batch with the same bundle gives the same bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from seapig_core._io import atomic_path, check_file_stem, ensure_writable_dir, header_problem
from seapig_core._version import __version__
from seapig_core.bundle import SelectorBundle
from seapig_core.scores.logits import CertaintyRatioScore

__all__ = [
    "SELECTIONS_FORMAT",
    "SELECTIONS_SCHEMA_VERSION",
    "SELECTIONS_SUFFIX",
    "read_selections",
    "selections_path",
    "selections_table",
    "summarize_selections",
    "write_selections",
]

SELECTIONS_FORMAT = "seapig_core.selections"
SELECTIONS_SCHEMA_VERSION = 1
SELECTIONS_SUFFIX = ".selections.parquet"
_META_KEY = b"seapig_core"


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu").numpy()


def _sample_ids(sample_ids: Any, n: int) -> np.ndarray:
    if sample_ids is None:
        return np.arange(n, dtype=np.int64)
    ids = _numpy(sample_ids) if isinstance(sample_ids, torch.Tensor) else np.asarray(sample_ids)
    if ids.ndim != 1 or ids.shape[0] != n:
        raise ValueError(
            f"The 'sample_ids' parameter must be 1-D with one id per sample ({n}). Got shape {ids.shape} instead."
        )
    if ids.dtype.kind not in "iuUSO":
        raise TypeError(f"The 'sample_ids' parameter must hold integers or strings. Got dtype {ids.dtype} instead.")
    if ids.dtype.kind in "USO":
        ids = ids.astype(str).astype(object)
    return ids


def selections_table(bundle: SelectorBundle, query_logits: Any, sample_ids: Any = None) -> pd.DataFrame:
    """Score and select query samples with a bundle: one row per sample (see the module docstring).

    Parameters
    ----------
    bundle : SelectorBundle
        The fitted selector.
    query_logits : torch.Tensor or numpy.ndarray
        Logits shaped for the bundle's task, with its number of logits per sample; rows with
        non-finite values are scored NaN and rejected.
    sample_ids : array-like, optional
        One id per row (strings or integers); default the row index.

    Returns
    -------
    pandas.DataFrame

    Raises
    ------
    ValueError
        If the logits do not fit the bundle (task layout, class count), are empty, or the ids
        do not match them.
    """
    if not isinstance(bundle, SelectorBundle):
        raise TypeError(f"The 'bundle' parameter must be a SelectorBundle. Got {type(bundle).__name__} instead.")
    bundle.check_query(query_logits)
    primary = bundle.primary
    selection = primary.select(query_logits)
    prediction = _numpy(primary.predict(query_logits))
    ratio = CertaintyRatioScore(temperature=bundle.temperature, **bundle.layout)
    n = prediction.shape[0]
    columns: dict[str, Any] = {
        "sample_id": _sample_ids(sample_ids, n),
        "prediction": list(prediction) if prediction.ndim == 2 else prediction,
        "score": _numpy(selection["score"]),
        "selected": _numpy(selection["selected"]).astype(bool),
        "alternate_label": _numpy(ratio.alternate_label(query_logits)),
        "certainty_ratio": _numpy(ratio.score(query_logits)),
    }
    for name, score in bundle.scores.items():
        if name == bundle.primary_name:
            continue
        values = _numpy(score.score(query_logits))
        columns[f"score_{name}"] = values
        columns[f"selected_{name}"] = values < score.threshold  # NaN < t is False
    return pd.DataFrame(columns)


def selections_path(output_dir: str | os.PathLike[str], batch: str) -> Path:
    """``<output_dir>/<batch>.selections.parquet``; ``batch`` must be a plain file-name stem."""
    return Path(output_dir) / f"{check_file_stem(batch, 'batch')}{SELECTIONS_SUFFIX}"


def write_selections(
    table: pd.DataFrame, path: str | os.PathLike[str], *, metadata: dict[str, Any] | None = None
) -> Path:
    """Write a selections table to Parquet atomically, replacing an earlier file at ``path``.

    The directory is created if needed. If anything fails, ``path`` keeps its previous content
    (or stays absent) and no temporary file is left behind.

    Parameters
    ----------
    table : pandas.DataFrame
        From :func:`selections_table`.
    path : str or Path
        Destination, e.g. :func:`selections_path`.
    metadata : dict, optional
        JSON-serialisable entries added to the file's ``seapig_core`` metadata.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ValueError
        If required columns are missing or the directory cannot be written.
    """
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"The 'table' parameter must be a pandas DataFrame. Got {type(table).__name__} instead.")
    missing = [c for c in ("sample_id", "prediction", "score", "selected") if c not in table.columns]
    if missing:
        raise ValueError(f"The 'table' parameter must have the columns {missing}. Got {list(table.columns)} instead.")
    path = Path(path)
    ensure_writable_dir(path.parent, "output_dir")
    meta = {
        "format": SELECTIONS_FORMAT,
        "schema_version": SELECTIONS_SCHEMA_VERSION,
        "library_version": __version__,
        **(metadata or {}),
    }
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    schema_meta = dict(arrow.schema.metadata or {})
    schema_meta[_META_KEY] = json.dumps(meta, sort_keys=True, allow_nan=False, default=str).encode()
    arrow = arrow.replace_schema_metadata(schema_meta)
    with atomic_path(path) as tmp:
        pq.write_table(arrow, tmp)
    return path


def read_selections(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a selections file; its ``seapig_core`` metadata is in ``DataFrame.attrs["seapig_core"]``.

    Raises
    ------
    ValueError
        If the file is missing, unreadable, not a selections file or of another schema version.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"The 'path' parameter must name an existing selections file. Got {str(path)!r} instead.")
    try:
        arrow = pq.read_table(path)
        raw = (arrow.schema.metadata or {}).get(_META_KEY)
        meta = json.loads(raw) if raw else None
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable Parquet file: {exc}") from exc
    problem = header_problem(meta, SELECTIONS_FORMAT, SELECTIONS_SCHEMA_VERSION)
    if problem is not None:
        raise ValueError(f"{str(path)!r} is not a seapig_core selections file this version can read: {problem}.")
    table = arrow.to_pandas()
    table.attrs["seapig_core"] = meta
    return table


def summarize_selections(bundle: SelectorBundle, table: pd.DataFrame, thresholds: Any = None) -> dict[str, Any]:
    """Numbers a reviewer compares with the calibration for one selections table, and a drift verdict.

    Parameters
    ----------
    bundle : SelectorBundle
        The selector the table was scored with.
    table : pandas.DataFrame
        A selections table (:func:`selections_table` or :func:`read_selections`).
    thresholds : DriftThresholds or mapping, optional
        The drift verdict's thresholds (:class:`seapig_core.drift.DriftThresholds`); the
        defaults when omitted.

    Returns
    -------
    dict
        JSON-serialisable: ``samples``, ``selected``, ``rejected``, ``rejection_rate``,
        ``expected_rejection_rate`` (the share of calibration samples the threshold rejects,
        about ``1 - q`` for a quantile threshold), ``non_finite`` (samples with non-finite
        logits), ``mean_score`` and ``calibration_mean_score``, and the drift statistics of
        :func:`seapig_core.drift.drift_statistics`: ``binomial_pvalue``, ``rate_pvalue``,
        ``calibration_samples``, ``ks_statistic``, ``ks_pvalue``, ``psi`` (the last three None
        without finite query scores), ``verdict`` (``"ok"``, ``"drift"``, ``"insufficient"``),
        ``reasons`` (sentences) and ``thresholds`` (as a dict).

    Raises
    ------
    ValueError
        For an empty table or one without ``score``/``selected``.

    Notes
    -----
    The counts come from the table's ``selected`` column (the decisions that were written),
    the distribution statistics from its ``score`` column.
    """
    from seapig_core.drift import drift_statistics

    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"The 'table' parameter must be a pandas DataFrame. Got {type(table).__name__} instead.")
    if len(table) == 0:
        raise ValueError("The 'table' parameter must have at least one row. Got an empty table.")
    missing = [c for c in ("score", "selected") if c not in table.columns]
    if missing:
        raise ValueError(f"The 'table' parameter must have the columns {missing}. Got {list(table.columns)} instead.")
    query = table["score"].to_numpy(dtype=np.float64)
    calibration = _numpy(bundle.primary.scores).astype(np.float64)  # type: ignore[arg-type]
    calibration = calibration[np.isfinite(calibration)]
    selected = table["selected"].to_numpy(dtype=bool)
    drift = drift_statistics(
        query, calibration, bundle.threshold, bundle.expected_rejection_rate, thresholds, rejected=~selected
    )
    finite = query[np.isfinite(query)]
    n = len(table)
    summary: dict[str, Any] = {
        "samples": n,
        "selected": int(selected.sum()),
        "rejected": drift["rejected"],
        "rejection_rate": drift["rejection_rate"],
        "expected_rejection_rate": drift["expected_rejection_rate"],
        "non_finite": drift["non_finite"],
        "mean_score": float(finite.mean()) if finite.size else None,
        "calibration_mean_score": float(calibration.mean()),
    }
    summary.update({k: v for k, v in drift.items() if k not in summary})
    return summary
