"""Saving and loading fitted scores: one Arrow IPC file, JSON metadata, no pickle.

The format is :mod:`seapig_core.scores.state_file` (schema version 1; see there). This module
reads and writes a score only through its state:
:meth:`~seapig_core.scores.LogitScore.state_dict`, :meth:`~seapig_core.scores.LogitScore.calibration_tensors`
and :meth:`~seapig_core.scores.LogitScore.from_state_dict`. It depends on the score classes;
they do not import it (no import circle).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from seapig_core.scores.logits import LogitScore
from seapig_core.scores.state_file import FORMAT, SCHEMA_VERSION, read_state

__all__ = ["FORMAT", "SCHEMA_VERSION", "load_score", "read_score_metadata", "save_score"]


def save_score(score: LogitScore, path: str | Path, *, include_logits: bool = True) -> Path:
    """Write ``score`` to ``path`` (see :mod:`seapig_core.scores.state_file` for the format).

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
    if not isinstance(score, LogitScore):
        raise TypeError(f"The 'score' parameter must be a LogitScore. Got {type(score).__name__} instead.")
    return score.save(path, include_logits=include_logits)


def read_score_metadata(path: str | Path) -> dict[str, Any]:
    """The state dict of a saved score (class, name, settings, state), validated for format and
    schema version; no tensor is materialised."""
    return read_state(path, include_logits=False)[0]


def load_score(path: str | Path, *, include_logits: bool = True) -> LogitScore:
    """Load a score written by :func:`save_score`.

    Parameters
    ----------
    path : str or Path
        The score file.
    include_logits : bool, default True
        Materialise the calibration logits and labels. With False only the calibration scores
        are read: the score scores, selects and re-thresholds by quantile (what a bundle needs
        to score a query), but :meth:`~seapig_core.scores.LogitScore.set_risk_threshold`
        without ``X``/``Y`` then raises.

    Raises
    ------
    ValueError
        If the file is missing, unreadable, not a score file, of another schema version, or
        holds an invalid state.
    """
    return LogitScore.load(path, include_logits=include_logits)
