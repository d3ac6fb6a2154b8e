"""Tasks that fit a selector and check the bundle a scoring run uses.

No Prefect cache: the bundle is its own cache. :func:`seapig_core.pipeline.calibrate_file`
reuses the current version when it was calibrated from the same content with the same
settings and library version and loads cleanly (a damaged bundle is refitted), from the
second run on.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from seapig_core.bundle import DEFAULT_KEEP_PREVIOUS, CalibrationSettings, describe_bundle
from seapig_core.pipeline import calibrate_file


@task(name="fit-selector", cache_policy=NO_CACHE)
def fit_selector_task(
    logits_path: str, bundle_dir: str, settings: CalibrationSettings, keep_previous: int = DEFAULT_KEEP_PREVIOUS
) -> dict[str, Any]:
    """Fit temperature and threshold on a calibration logits file and save a bundle version (or reuse the current one)."""
    return calibrate_file(logits_path, bundle_dir, settings, keep_previous=keep_previous)


@task(name="check-bundle", cache_policy=NO_CACHE)
def check_bundle_task(bundle_dir: str) -> dict[str, Any]:
    """Load and validate the bundle's current version once; its ``version_path`` is what the run scores with."""
    return describe_bundle(bundle_dir)
