"""The task that produces logit files from a model and data: extraction into the logits store."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from seapig_core.sources import extract_from_factories
from tasks._support import ProgressArtifact, retry_unless_bad_input
from tasks.keys import EXTRACTION_PROGRESS, artifact_key, pipeline_key


# No Prefect cache: the logits store is the cache, keyed on the model's weights, the data's
# content and the library version (seapig_core.store), and it verifies its files.
@task(
    name="extract-logits",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_unless_bad_input,
    cache_policy=NO_CACHE,
)
def extract_logits_task(
    model: str,
    data: str,
    store_dir: str,
    model_kwargs: dict[str, Any] | None = None,
    data_kwargs: dict[str, Any] | None = None,
    default_batch: str = "query",
    extract_options: dict[str, Any] | None = None,
    pipeline: str | None = None,
) -> list[dict[str, Any]]:
    """Extract every batch of a model (import path) over a data source (import path) into the logits store.

    The progress artifact's key is ``<pipeline>--extraction-progress`` (:mod:`tasks.artifacts`).
    """
    key = artifact_key(pipeline or pipeline_key(None, store_dir), EXTRACTION_PROGRESS)
    progress = ProgressArtifact(key, f"Extracting logits of {data} with {model}")
    batches = extract_from_factories(
        model, data, store_dir, model_kwargs=model_kwargs, data_kwargs=data_kwargs, default_batch=default_batch,
        progress_callback=progress, progress=False, **(extract_options or {}),
    )
    progress.finish()
    return [asdict(b) for b in batches]
