"""The file format of a saved score: one Arrow IPC file, JSON metadata, no pickle.

This module knows the format only, not the score classes: it writes and reads a score's
*state* (the JSON-able dict of :meth:`seapig_core.scores.LogitScore.state_dict`) and its
calibration tensors. :meth:`LogitScore.save`/:meth:`LogitScore.load` and
:mod:`seapig_core.persistence` build on it; nothing here imports them, so there is no import
circle.

File layout (``schema_version`` 1):

- Arrow IPC *file* format (readable by ``pyarrow.ipc.open_file`` and ``pandas.read_feather``),
  one row per calibration sample, columns:

  - ``score``: float32/float64, the calibration scores;
  - ``logits`` (optional): ``FixedSizeList<float>`` holding the sample's logits row-major
    (``K * M`` values), reshaped on load to the state's ``logits_shape``;
  - ``label`` (when fitted with labels): int64 class index, or ``FixedSizeList<float64>[K]``
    0/1 targets for bernoulli tasks.

- Schema metadata key ``seapig_core`` holds JSON: ``format`` (``"seapig_core.score"``),
  ``schema_version``, ``library_version``, and the state dict's keys: ``class``, ``name``,
  ``settings`` (temperature, task, per_member), ``state`` (threshold, quantile, n_units,
  temperature_fit, risk_threshold, logits_shape, and since 0.2 ``diagnostics``; readers treat
  a missing key as empty, so files of earlier versions load unchanged).

Writes are atomic. Reading memory-maps the file, checks format and schema version, parses the
JSON through the bounded reader (:func:`seapig_core._io.loads_json`), and never executes
anything from it. Reading without the logits materialises only the ``score`` column.
"""

from __future__ import annotations

import json  # only json.dumps; JSON from disk goes through seapig_core._io.loads_json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from seapig_core._io import atomic_path, header_problem, loads_json
from seapig_core._version import __version__

__all__ = ["FORMAT", "SCHEMA_VERSION", "read_state", "write_state"]

FORMAT = "seapig_core.score"
SCHEMA_VERSION = 1
_META_KEY = b"seapig_core"
_HEADER_KEYS = ("format", "schema_version", "library_version")


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu").contiguous().numpy()


def _fixed_size_list(matrix: np.ndarray) -> pa.Array:
    """``(N, W)`` array -> ``FixedSizeList<dtype>[W]`` without copying."""
    n, width = matrix.shape
    flat = pa.array(np.ascontiguousarray(matrix).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, width)


def write_state(
    path: str | Path,
    state: dict[str, Any],
    *,
    scores: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> Path:
    """Write a score's state dict and calibration tensors to ``path`` atomically.

    Parameters
    ----------
    path : str or Path
        Destination file; its directory must exist.
    state : dict
        JSON-able state (:meth:`seapig_core.scores.LogitScore.state_dict`).
    scores, logits, labels : torch.Tensor, optional
        Calibration scores ``(N,)``, logits ``(N, ...)`` and labels ``(N,)``/``(N, K)``;
        logits and labels are written only with scores.

    Returns
    -------
    pathlib.Path
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"The 'path' parameter must be in an existing directory. Got {str(path)!r} instead.")
    columns: dict[str, pa.Array] = {}
    if scores is not None:
        columns["score"] = pa.array(_numpy(scores))
        if logits is not None:
            array = _numpy(logits)
            columns["logits"] = _fixed_size_list(array.reshape(array.shape[0], -1))
        if labels is not None:
            array = _numpy(labels)
            columns["label"] = pa.array(array) if array.ndim == 1 else _fixed_size_list(array)
    metadata = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "library_version": __version__, **state}
    table = pa.table(columns) if columns else pa.table({})
    table = table.replace_schema_metadata({_META_KEY: json.dumps(metadata, allow_nan=False).encode()})
    with atomic_path(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    return path


def _column(table: pa.Table, name: str) -> np.ndarray:
    column = table.column(name).combine_chunks()
    if pa.types.is_fixed_size_list(column.type):
        width = column.type.list_size
        return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    return column.to_numpy(zero_copy_only=False)


def read_state(path: str | Path, *, include_logits: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a file written by :func:`write_state`.

    Parameters
    ----------
    path : str or Path
        The score file.
    include_logits : bool, default True
        Also materialise the calibration logits and labels; with False only the scores are
        read (the other columns stay unread in the memory map).

    Returns
    -------
    state : dict
        The state dict (``class``, ``name``, ``settings``, ``state``), without the header keys.
    tensors : dict of str to torch.Tensor
        ``scores``, and with ``include_logits`` ``logits`` (flat ``(N, K * M)``) and
        ``labels``, for those present in the file.

    Raises
    ------
    ValueError
        If the file is missing, unreadable, not a score file, or of another schema version.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"The 'path' parameter must name an existing score file. Got {str(path)!r} instead.")
    wanted = ("score", "logits", "label") if include_logits else ("score",)
    try:
        with pa.memory_map(str(path), "r") as source:
            reader = pa.ipc.open_file(source)
            raw = (reader.schema.metadata or {}).get(_META_KEY)
            metadata = loads_json(raw, f"the metadata of {str(path)!r}") if raw is not None else None
            problem = header_problem(metadata, FORMAT, SCHEMA_VERSION)
            if problem is not None:
                raise _HeaderProblem(problem)
            table = reader.read_all()
            table = table.select([name for name in wanted if name in table.column_names])
            table.validate(full=True)
            tensors = {
                key: torch.from_numpy(_column(table, name).copy())
                for key, name in (("scores", "score"), ("logits", "logits"), ("labels", "label"))
                if name in table.column_names
            }
    except _HeaderProblem as exc:
        raise ValueError(f"{str(path)!r} is not a seapig_core score file this version can read: {exc}.") from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable seapig_core score file: {exc}") from exc
    state = {key: value for key, value in metadata.items() if key not in _HEADER_KEYS}
    return state, tensors


class _HeaderProblem(Exception):
    pass
