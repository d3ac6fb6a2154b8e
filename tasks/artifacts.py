"""Tasks that publish review material as Prefect artifacts, keyed per pipeline.

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

Every artifact says what it describes (the reports' ``provenance``: deployment, flow run,
bundle version, input files, output directory), in its markdown and in its description.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from seapig_core.formatting import format_value, markdown_text
from seapig_core.ledger import Ledger
from seapig_core.pipeline import calibration_review, scoring_review
from seapig_core.reports import QUEUE_ROWS

__all__ = [
    "CALIBRATION_REPORT",
    "CALIBRATION_SUMMARY",
    "DRIFT_ALERT",
    "EXTRACTION_PROGRESS",
    "KINDS",
    "REVIEW",
    "SCORING_REPORT",
    "SCORING_SUMMARY",
    "artifact_key",
    "artifact_kind",
    "key_part",
    "log_calibration_diagnostics",
    "pipeline_key",
    "publish_calibration_artifacts",
    "publish_scoring_artifacts",
    "run_provenance",
    "trend_history",
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


def run_provenance(**given: Any) -> dict[str, Any]:
    """The reports' ``provenance`` for the current run: its deployment and flow run, plus ``given``."""
    from prefect.runtime import deployment, flow_run

    run = f"{flow_run.name} ({flow_run.id})" if flow_run.id else None
    return {"deployment": deployment.name, "flow_run": run, **given}


def _about(provenance: Mapping[str, Any], what: str) -> str:
    """An artifact description: what it is, and what it describes (escaped markdown)."""
    parts = [what]
    for key, label in (("deployment", "deployment"), ("flow_run", "flow run"), ("bundle_version", "bundle version"),
                       ("output_dir", "output directory")):
        if provenance.get(key):
            parts.append(f"{label} {markdown_text(provenance[key])}")
    return "; ".join(parts) + "."


def trend_history(output_dir: str | os.PathLike[str]) -> pd.DataFrame | None:
    """The batches scored into ``output_dir`` (its ledger's history) for the trend chart, one time per run.

    Each row is a scored batch (``batch``, ``rejection_rate``, ``ks_statistic``, ``verdict``, ...);
    ``time`` is when its run finished its first batch, so that the batches of one run share a
    point in time and the chart reads run by run (the first run: one labelled point).
    """
    frame = Ledger(output_dir).history()
    if frame.empty or "rejection_rate" not in frame.columns:
        return None
    done = frame[(frame["state"] == "done") & frame["rejection_rate"].notna()].copy()
    if done.empty:
        return None
    run = done["run_id"].fillna(done["finished_at"].astype(str))  # a batch scored outside a flow run is its own run
    done["time"] = done.groupby(run)["finished_at"].transform("min")
    if done["time"].nunique() == 1:  # one run: a labelled point, not a date axis spanning years
        done["time"] = "only run so far, " + done["time"].dt.strftime("%Y-%m-%d %H:%M UTC")
    return done


def _queue_table(rows: list[dict[str, str]], score: str | None) -> list[dict[str, str]]:
    """A review queue's display rows under the report's column headers (the score on the axis people know)."""
    from seapig_core.plotting import SCORE_AXES

    axis = SCORE_AXES.get(score) if score else None
    shown = ("value", axis.label.split(" (")[0]) if axis is not None and axis.rejects_low else ("score", f"score ({score or 'primary'})")
    columns = [("rank", "#"), ("sample_id", "sample id"), ("prediction", "prediction"), ("runner_up", "runner-up"),
               ("certainty_ratio", "certainty ratio"), shown]
    return [{header: row.get(key, "n/a") for key, header in columns} for row in rows]


@task(name="publish-calibration-artifacts", cache_policy=NO_CACHE)
def publish_calibration_artifacts(
    bundle_dir: str,
    plot_dir: str | None = None,
    *,
    pipeline: str | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Publish the calibration table and the markdown report (density, reliability, risk-coverage, temperature)."""
    pipeline = pipeline or pipeline_key(None, bundle_dir)
    about = run_provenance(**dict(provenance or {}))
    report = calibration_review(bundle_dir, plot_dir, provenance=about)
    keys = artifact_key(pipeline, CALIBRATION_SUMMARY), artifact_key(pipeline, CALIBRATION_REPORT)
    table_id = create_table_artifact(report.display_table, key=keys[0], description=_about(about, "Calibration metrics"))
    markdown_id = create_markdown_artifact(report.markdown, key=keys[1], description=_about(about, "Calibration report"))
    return {keys[0]: str(table_id), keys[1]: str(markdown_id)}


def log_calibration_diagnostics(calibration: Mapping[str, Any]) -> list[str]:
    """Log the bundle's calibration diagnostics (ties, nothing selected, ...) as warnings; return the messages."""
    logger = get_run_logger()
    messages = []
    for item in calibration.get("diagnostics") or []:
        if isinstance(item, Mapping) and item.get("message"):
            code = f" ({item['code']})" if item.get("code") else ""
            messages.append(f"Calibration {item.get('severity') or 'warning'}{code}: {item['message']}")
            logger.warning(messages[-1])
    return messages


@task(name="publish-scoring-artifacts", cache_policy=NO_CACHE)
def publish_scoring_artifacts(
    bundle_dir: str,
    selections: dict[str, str],
    plot_dir: str | None = None,
    *,
    pipeline: str | None = None,
    output_dir: str | None = None,
    provenance: Mapping[str, Any] | None = None,
    thresholds: Mapping[str, Any] | None = None,
    review_count: int = QUEUE_ROWS,
    score: str | None = None,
) -> dict[str, str]:
    """Publish the verdict table, the report (verdicts, trend, densities, queues) and one review-queue table per batch.

    ``output_dir`` (default: the selections' directory) holds the ledger whose history draws the
    trend; ``score`` (the bundle's primary score) names the queues' score column.
    """
    output_dir = output_dir or str(Path(next(iter(selections.values()))).parent)
    pipeline = pipeline or pipeline_key(None, output_dir)
    about = run_provenance(output_dir=output_dir, **dict(provenance or {}))
    report = scoring_review(
        bundle_dir, selections, plot_dir, provenance=about, history=trend_history(output_dir), thresholds=thresholds,
        queue_rows=review_count,
    )
    summary, markdown = artifact_key(pipeline, SCORING_SUMMARY), artifact_key(pipeline, SCORING_REPORT)
    drifted = [row["batch"] for row in report.display_table if row["verdict"] == "drift"]
    what = f"Drift verdicts: drift in {', '.join(markdown_text(b) for b in drifted)}" if drifted else "Drift verdicts: no drift"
    ids = {
        summary: str(create_table_artifact(report.display_table, key=summary, description=_about(about, what))),
        markdown: str(create_markdown_artifact(report.markdown, key=markdown, description=_about(about, "Scoring report"))),
    }
    rejected = {row["batch"]: row["rejected"] for row in report.display_table}
    for batch, rows in report.queues.items():
        key = artifact_key(pipeline, REVIEW, batch)
        what = (
            f"Review queue of batch {markdown_text(batch)}: the {format_value(len(rows), 'count')} of {rejected[batch]} "
            f"rejected samples to look at first (most uncertain first); selections file {markdown_text(selections[batch])}"
        )
        ids[key] = str(create_table_artifact(_queue_table(rows, score), key=key, description=_about(about, what)))
    return ids
