"""Tasks that fit a selector and score query batches with it."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from seapig_core.bundle import describe_bundle
from seapig_core.pipeline import calibrate_file, score_file
from seapig_core.selections import selections_path
from tasks._support import ContentCache

_RESULTS = {"persist_result": True, "result_serializer": "json"}


@task(
    name="fit-selector",
    cache_policy=ContentCache(inputs=("logits_path",), outputs=lambda p: [p["bundle_dir"]]),
    **_RESULTS,
)
def fit_selector_task(
    logits_path: str,
    bundle_dir: str,
    scores: list[str],
    q: float = 0.95,
    target_risk: float | None = None,
    delta: float = 0.05,
    split_fraction: float = 0.5,
    seed: int = 0,
    task: str = "multiclass",
    per_member: bool = False,
) -> dict[str, Any]:
    """Fit temperature and threshold on a calibration logits file and save the selector bundle."""
    return calibrate_file(
        logits_path, bundle_dir, scores=scores, q=q, target_risk=target_risk, delta=delta,
        split_fraction=split_fraction, seed=seed, task=task, per_member=per_member,
    )


@task(
    name="score-batch",
    task_run_name="score-{batch}",
    cache_policy=ContentCache(
        inputs=("bundle_dir", "logits_path"), outputs=lambda p: [str(selections_path(p["output_dir"], p["batch"]))]
    ),
    **_RESULTS,
)
def score_batch_task(bundle_dir: str, logits_path: str, output_dir: str, batch: str) -> dict[str, Any]:
    """Score and select one query batch; write (replace) its selections Parquet file."""
    return score_file(bundle_dir, logits_path, output_dir, batch)


@task(name="check-bundle", cache_policy=NO_CACHE)
def check_bundle_task(bundle_dir: str) -> dict[str, Any]:
    """Load and validate a selector bundle; return its summary (fails early on a bad bundle)."""
    return describe_bundle(bundle_dir)
