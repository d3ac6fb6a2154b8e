"""Artifact keys per pipeline (no heavy imports: the drift-alert flow run loads only this and Prefect).

Keys
----
Every key is ``<pipeline>--<kind>`` (``--<batch>`` added for per-batch artifacts), where:

- ``<pipeline>`` is :func:`pipeline_key`: the deployment's name when a deployment runs the flow
  (``digits-scoring``), else ``dir-<last two parts of the directory>-<hash>`` of the output
  directory (scoring) or the bundle directory (calibration), so that each pipeline keeps its
  own history in the UI's Artifacts page and a notebook run never writes into a deployment's;
- ``<kind>`` is one of :data:`KINDS` (``scoring-summary``, ``scoring-report``, ``review``, ...);
- ``<batch>`` is the batch name as a key part (:func:`key_part`).

A name that already is a key part (lowercase letters and digits in dash-separated words, at
most :data:`MAX_PART` characters) is used as it is (so a pipeline key is its own key part); any
other name is cut to at most :data:`MAX_SLUG` such characters and gets
the first 10 hex digits of its SHA-256 (``Digits Scoring`` -> ``digits-scoring-536c0eb7a6``), so
that two names never map to one part (short of a 40-bit hash collision). Parts never contain
``--`` nor start or end with ``-``, so joining them with ``--`` never makes two keys equal.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

__all__ = [
    "CALIBRATION_REPORT",
    "CALIBRATION_SUMMARY",
    "DRIFT_ALERT",
    "EXTRACTION_PROGRESS",
    "KINDS",
    "MAX_PART",
    "MAX_SLUG",
    "REVIEW",
    "SCORING_REPORT",
    "SCORING_SUMMARY",
    "SEPARATOR",
    "artifact_key",
    "artifact_kind",
    "key_part",
    "pipeline_key",
]

#: Artifact kinds (the part of a key after the pipeline).
CALIBRATION_SUMMARY, CALIBRATION_REPORT = "calibration-summary", "calibration-report"
SCORING_SUMMARY, SCORING_REPORT = "scoring-summary", "scoring-report"
REVIEW, DRIFT_ALERT, EXTRACTION_PROGRESS = "review", "drift-alert", "extraction-progress"
KINDS = (CALIBRATION_SUMMARY, CALIBRATION_REPORT, SCORING_SUMMARY, SCORING_REPORT, REVIEW, DRIFT_ALERT, EXTRACTION_PROGRESS)
#: Longest name used as a key part as it is (a longer one is cut to MAX_SLUG characters and hashed).
MAX_PART = 64
MAX_SLUG = 48
SEPARATOR = "--"
_PART = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_HASH_DIGITS = 10


def _slug(text: str, keep_end: bool = False) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    slug = slug[-MAX_SLUG:] if keep_end else slug[:MAX_SLUG]
    return slug.strip("-")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_DIGITS]


def key_part(name: str) -> str:
    """``name`` as one part of an artifact key: itself if it is one already, else a slug and a hash.

    Examples
    --------
    >>> key_part("digits-scoring")
    'digits-scoring'
    >>> key_part("Digits Scoring")
    'digits-scoring-536c0eb7a6'
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"An artifact key part must be a non-empty string. Got {name!r} instead.")
    if len(name) <= MAX_PART and _PART.fullmatch(name):
        return name
    slug = _slug(name)
    return f"{slug}-{_digest(name)}" if slug else _digest(name)


def pipeline_key(deployment: str | None = None, directory: str | os.PathLike[str] | None = None) -> str:
    """The pipeline's part of its artifact keys: from the deployment's name, else from a directory.

    Parameters
    ----------
    deployment : str, optional
        The deployment running the flow (``prefect.runtime.deployment.name``); None when run by hand.
    directory : str or os.PathLike, optional
        The pipeline's output directory (scoring) or bundle directory (calibration), used when
        there is no deployment: ``dir-<its last two parts>-<hash of its absolute path>``.

    Raises
    ------
    ValueError
        If neither is given.
    """
    if deployment:
        return key_part(deployment)
    if directory is None:
        raise ValueError("A pipeline key needs the deployment's name or the pipeline's directory. Got neither.")
    path = str(Path(directory).resolve())
    tail = _slug("-".join(Path(path).parts[-2:]), keep_end=True)
    return f"dir-{tail}-{_digest(path)}" if tail else f"dir-{_digest(path)}"


def artifact_key(pipeline: str, kind: str, batch: str | None = None) -> str:
    """``<pipeline>--<kind>`` or ``<pipeline>--<kind>--<batch part>`` (see the module docstring)."""
    if not isinstance(pipeline, str) or not _PART.fullmatch(pipeline):
        raise ValueError(f"The 'pipeline' parameter must be a key part (see pipeline_key). Got {pipeline!r} instead.")
    if kind not in KINDS:
        raise ValueError(f"The 'kind' parameter must be one of {list(KINDS)}. Got {kind!r} instead.")
    return SEPARATOR.join([pipeline, kind] + ([] if batch is None else [key_part(batch)]))


def artifact_kind(key: str | None) -> str | None:
    """The kind of an artifact key made by :func:`artifact_key` (``"scoring-report"``, ...), else None."""
    parts = (key or "").split(SEPARATOR)
    return parts[1] if len(parts) >= 2 and parts[1] in KINDS else None
