"""Saving and loading fitted scores: one Arrow IPC file, JSON metadata, no pickle.

File layout (``schema_version`` 1):

- Arrow IPC *file* format (readable by ``pyarrow.ipc.open_file`` and
  ``pandas.read_feather``), one row per calibration sample, columns:

  - ``score``: float32/float64, the calibration scores;
  - ``logits`` (optional): ``FixedSizeList<float>`` holding the sample's canonical ``K * M``
    values row-major (see :mod:`seapig_core.layout`);
  - ``label`` (when fitted with labels): int64 class index, or ``FixedSizeList<float64>[K]``
    0/1 targets for bernoulli tasks.

- Schema metadata key ``seapig_core`` holds JSON: ``format`` (``"seapig_core.score"``),
  ``schema_version``, ``library_version``, ``class``, ``name``, ``settings`` (temperature, task,
  per_member), ``state`` (threshold, quantile, n_units, temperature_fit, risk_threshold,
  logits_shape, ...). ``risk_threshold`` (optional; absent in older files) is the
  :class:`seapig_core.risk.RiskThreshold` of ``set_risk_threshold`` as a JSON object.

Writes are atomic. Reading memory-maps the file, checks format and schema version, and never
executes anything from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from seapig_core._io import atomic_path, header_problem
from seapig_core._version import __version__

if TYPE_CHECKING:
    from seapig_core.scores.logits import LogitScore

__all__ = ["SCHEMA_VERSION", "load_score", "save_score"]

FORMAT = "seapig_core.score"
SCHEMA_VERSION = 1
_META_KEY = b"seapig_core"


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu").contiguous().numpy()


def _fixed_size_list(matrix: np.ndarray) -> pa.Array:
    """``(N, W)`` array -> ``FixedSizeList<dtype>[W]`` without copying."""
    n, width = matrix.shape
    flat = pa.array(np.ascontiguousarray(matrix).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, width)


def save_score(score: LogitScore, path: str | Path, *, include_logits: bool = True) -> Path:
    """Write ``score`` to ``path`` (see the module docstring for the format).

    Parameters
    ----------
    score : LogitScore
        A fitted or unfitted score.
    path : str or Path
        Destination file; its directory must exist. Replaced atomically.
    include_logits : bool, default True
        Store the calibration logits (needed to refit a threshold with labels, e.g.
        ``set_risk_threshold``; scores, threshold and selection do not need them).

    Returns
    -------
    pathlib.Path
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"The 'path' parameter must be in an existing directory. Got {str(path)!r} instead.")
    columns: dict[str, pa.Array] = {}
    if score.scores is not None:
        columns["score"] = pa.array(_numpy(score.scores))
        if include_logits and score.logits is not None:
            logits = _numpy(score.logits)
            columns["logits"] = _fixed_size_list(logits.reshape(logits.shape[0], -1))
        if score.labels is not None:
            labels = _numpy(score.labels)
            columns["label"] = pa.array(labels) if labels.ndim == 1 else _fixed_size_list(labels)
    fit = score.temperature_fit
    metadata = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "library_version": __version__,
        "class": type(score).__name__,
        "name": score.name,
        "settings": {"temperature": score.temperature, "task": score.task, "per_member": score.per_member},
        "state": {
            "threshold": score.threshold,
            "quantile": score.quantile,
            "n_units": score.n_units,
            "temperature_fit": None if fit is None else fit.to_dict(),
            "risk_threshold": None if getattr(score, "risk_threshold", None) is None else score.risk_threshold.to_dict(),
            "logits_shape": None if score.logits is None or "logits" not in columns else list(score.logits.shape),
        },
    }
    table = pa.table(columns) if columns else pa.table({})
    table = table.replace_schema_metadata({_META_KEY: json.dumps(metadata, allow_nan=False).encode()})
    with atomic_path(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    return path


def read_score_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a saved score, validated for format and schema version."""
    return _open(path)[1]


def _open(path: str | Path) -> tuple[pa.Table, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"The 'path' parameter must name an existing score file. Got {str(path)!r} instead.")
    try:
        with pa.memory_map(str(path), "r") as source:
            table = pa.ipc.open_file(source).read_all()
        table.validate(full=True)
        raw = (table.schema.metadata or {}).get(_META_KEY)
        metadata = json.loads(raw) if raw is not None else None
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable seapig_core score file: {exc}") from exc
    problem = header_problem(metadata, FORMAT, SCHEMA_VERSION)
    if problem is not None:
        raise ValueError(f"{str(path)!r} is not a seapig_core score file this version can read: {problem}.")
    return table, metadata


def _column(table: pa.Table, name: str) -> np.ndarray:
    column = table.column(name).combine_chunks()
    if pa.types.is_fixed_size_list(column.type):
        width = column.type.list_size
        return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    return column.to_numpy(zero_copy_only=False)


def load_score(path: str | Path) -> LogitScore:
    """Load a score written by :func:`save_score`.

    Raises
    ------
    ValueError
        If the file is missing, unreadable, not a score file, or of another schema version.
    """
    from seapig_core.scores.logits import SCORES
    from seapig_core.temperature import TemperatureFit

    table, metadata = _open(path)
    name = metadata.get("name")
    if name not in SCORES:
        raise ValueError(f"{str(path)!r} holds an unknown score {name!r}; known: {sorted(SCORES)}.")
    settings, state = metadata["settings"], metadata["state"]
    score = SCORES[name](**settings)
    score.n_units = state["n_units"]
    score.threshold = state["threshold"]
    score.quantile = state["quantile"]
    if state.get("temperature_fit") is not None:
        score.temperature_fit = TemperatureFit(**state["temperature_fit"])
    if state.get("risk_threshold") is not None:
        from seapig_core.risk import RiskThreshold

        score.risk_threshold = RiskThreshold(**state["risk_threshold"])
    names = set(table.column_names)
    if "score" in names:
        score.scores = torch.from_numpy(_column(table, "score").copy())
    if "logits" in names and state.get("logits_shape"):
        score.logits = torch.from_numpy(_column(table, "logits").copy().reshape(state["logits_shape"]))
    if "label" in names:
        score.labels = torch.from_numpy(_column(table, "label").copy())
    return score
