"""Tasks that publish review material as Prefect artifacts (keys in dash-case)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from seapig_core.pipeline import calibration_review, scoring_review

#: Artifact keys: one history per key in the UI's Artifacts page.
CALIBRATION_TABLE, CALIBRATION_MARKDOWN = "calibration-summary", "calibration-report"
SCORING_TABLE, SCORING_MARKDOWN = "scoring-summary", "scoring-report"


@task(name="publish-calibration-artifacts", cache_policy=NO_CACHE)
def publish_calibration_artifacts(bundle_dir: str, plot_dir: str | None = None) -> dict[str, str]:
    """Publish the calibration table and the markdown report with density, reliability and risk-coverage plots."""
    report = calibration_review(bundle_dir, plot_dir)
    table_id = create_table_artifact(report.table, key=CALIBRATION_TABLE, description=f"Calibration of {bundle_dir}")
    markdown_id = create_markdown_artifact(report.markdown, key=CALIBRATION_MARKDOWN, description=f"Calibration plots of {bundle_dir}")
    return {CALIBRATION_TABLE: str(table_id), CALIBRATION_MARKDOWN: str(markdown_id)}


@task(name="publish-scoring-artifacts", cache_policy=NO_CACHE)
def publish_scoring_artifacts(bundle_dir: str, selections: dict[str, str], plot_dir: str | None = None) -> dict[str, str]:
    """Publish the per-batch scoring table and the markdown report with query-vs-calibration densities."""
    report = scoring_review(bundle_dir, selections, plot_dir)
    table_id = create_table_artifact(report.table, key=SCORING_TABLE, description=f"Selections scored with {bundle_dir}")
    markdown_id = create_markdown_artifact(report.markdown, key=SCORING_MARKDOWN, description="Query against calibration scores")
    return {SCORING_TABLE: str(table_id), SCORING_MARKDOWN: str(markdown_id)}
