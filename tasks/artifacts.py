"""Tasks that publish review material as Prefect artifacts, keyed per pipeline.

Keys: ``<pipeline>--<kind>[--<batch>]`` (:mod:`tasks.keys`: the deployment's name, or the
output or bundle directory when run by hand).

Every artifact says what it describes (the reports' ``provenance``: deployment, flow run,
bundle version, input files, output directory), in its markdown and in its description.
"""

from __future__ import annotations

import os
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
from tasks.keys import (
    CALIBRATION_REPORT,
    CALIBRATION_SUMMARY,
    DRIFT_ALERT,
    EXTRACTION_PROGRESS,
    KINDS,
    REVIEW,
    SCORING_REPORT,
    SCORING_SUMMARY,
    artifact_key,
    artifact_kind,
    key_part,
    pipeline_key,
)

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
