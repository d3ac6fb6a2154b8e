"""Drift alerts: an event and a task state per drifted batch, a final state per run, and the alert artifact.

A batch whose drift verdict (:func:`seapig_core.drift.drift_statistics`, with the thresholds the
deployment sets) is ``"drift"``:

1. emits the Prefect event :data:`DRIFT_EVENT` (``seapig.batch.drifted``) whose resource is the
   batch (``seapig.batch.<pipeline>.<batch>``) and whose related resources are the deployment
   (when a deployment runs the flow), the flow run, the bundle version and the output directory;
   its payload carries the verdict, the reasons, the key numbers and where to look
   (:func:`drift_event`);
2. ends its ``score-<batch>`` task run in a Completed state named :data:`DRIFTED_STATE`
   (``Drifted``), whose message gives the first reason (:func:`batch_state`).

The flow run then ends in a state named :data:`DRIFT_DETECTED_STATE` (``Drift detected``):
Completed, or Failed when the deployment sets ``fail_on_drift`` (:func:`run_state`); a run
without drift ends in an ordinary Completed state. ``prefect.yaml`` defines the automation on
the event: the ``drift-alert`` deployment's trigger runs ``flows/drift_alert.py``, which
publishes :func:`drift_alert_markdown` as the pipeline's ``drift-alert`` artifact.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.states import Completed, Failed

from tasks.keys import DRIFT_ALERT, artifact_key, key_part

__all__ = [
    "DRIFTED_STATE",
    "DRIFT_DETECTED_STATE",
    "DRIFT_EVENT",
    "DriftDetected",
    "batch_state",
    "drift_alert_markdown",
    "drift_event",
    "publish_drift_alert",
    "run_state",
]

#: The event a drifted batch emits (the automation of prefect.yaml expects it).
DRIFT_EVENT = "seapig.batch.drifted"
#: Name of the Completed state of a drifted batch's task run.
DRIFTED_STATE = "Drifted"
#: Name of the final state (Completed, or Failed with ``fail_on_drift``) of a run with drift.
DRIFT_DETECTED_STATE = "Drift detected"
#: The numbers of a batch's summary that the event's payload carries: (display kind, label in the alert).
PAYLOAD_NUMBERS = {
    "samples": ("count", "samples"),
    "rejected": ("count", "rejected samples"),
    "rejection_rate": ("rate", "rejection rate"),
    "expected_rejection_rate": ("rate", "expected rejection rate (calibration)"),
    "rate_pvalue": ("pvalue", "p-value of the rate (allowing for the calibration's size; the verdict's)"),
    "binomial_pvalue": ("pvalue", "p-value of the rate (exact binomial test)"),
    "ks_statistic": ("stat", "KS statistic (0: like the calibration scores, 1: disjoint)"),
    "ks_pvalue": ("pvalue", "KS p-value"),
    "psi": ("stat", "PSI (above 0.25: a major shift)"),
    "non_finite": ("count", "samples with non-finite logits"),
}


#: A link the alert may show as a link: http(s), no spaces, parentheses or brackets.
_SAFE_URL = re.compile(r"https?://[A-Za-z0-9._~:/?#@!$&'*+,;=%-]+")


class DriftDetected(RuntimeError):
    """A scoring run found drift and its deployment asked to fail on drift (``fail_on_drift``)."""


def _ui_url(flow_run_id: str | None) -> str | None:
    """The flow run's page in the Prefect UI, when the UI's address is known."""
    from prefect.settings import get_current_settings

    base = get_current_settings().ui_url
    return f"{base.rstrip('/')}/runs/flow-run/{flow_run_id}" if base and flow_run_id else None


def drift_event(
    result: Mapping[str, Any],
    *,
    pipeline: str,
    output_dir: str,
    deployment_id: str | None = None,
    deployment_name: str | None = None,
    flow_run_id: str | None = None,
    flow_run_name: str | None = None,
    flow_run_url: str | None = None,
    input_file: str | None = None,
    event_id: uuid.UUID | None = None,
) -> dict[str, Any]:
    """The drift event of one scored batch, as keyword arguments of :func:`prefect.events.emit_event`.

    Parameters
    ----------
    result : mapping
        The batch's :func:`seapig_core.pipeline.score_file` result (``batch``, ``path``,
        ``bundle_version``, ``bundle_dir`` and the summary with ``verdict`` and ``reasons``).
    pipeline : str
        The pipeline's key part (:func:`tasks.artifacts.pipeline_key`).
    output_dir : str
        The selections directory.
    deployment_id, deployment_name, flow_run_id, flow_run_name, flow_run_url : str, optional
        The run that scored it (related resources, and links in the payload).
    input_file : str, optional
        The batch's input file.
    event_id : uuid.UUID, optional
        The event's id (default: a new one); the payload repeats it.

    Returns
    -------
    dict
        ``event``, ``resource``, ``related``, ``payload`` and ``id``.
    """
    batch = str(result["batch"])
    event_id = event_id or uuid.uuid4()
    output = str(Path(output_dir).resolve())
    version = str(result.get("bundle_version") or "unknown")
    resource = {"prefect.resource.id": f"seapig.batch.{pipeline}.{batch}", "prefect.resource.name": batch, "seapig.pipeline": pipeline}
    related: list[dict[str, str]] = []
    if deployment_id:
        related.append({"prefect.resource.id": f"prefect.deployment.{deployment_id}", "prefect.resource.role": "deployment",
                        "prefect.resource.name": deployment_name or ""})
    if flow_run_id:
        related.append({"prefect.resource.id": f"prefect.flow-run.{flow_run_id}", "prefect.resource.role": "flow-run",
                        "prefect.resource.name": flow_run_name or ""})
    related.append({"prefect.resource.id": f"seapig.bundle-version.{version}", "prefect.resource.role": "bundle-version",
                    "prefect.resource.name": version, "seapig.bundle.dir": str(result.get("bundle_dir") or "")})
    related.append({"prefect.resource.id": f"seapig.output-dir.{output}", "prefect.resource.role": "output-dir",
                    "prefect.resource.name": output})
    payload = {
        "event_id": str(event_id),
        "batch": batch,
        "pipeline": pipeline,
        "deployment": deployment_name,
        "flow_run_id": flow_run_id,
        "flow_run_name": flow_run_name,
        "flow_run_url": flow_run_url,
        "bundle_version": result.get("bundle_version"),
        "bundle_dir": result.get("bundle_dir"),
        "output_dir": output,
        "selections_file": result.get("path"),
        "input_file": input_file,
        "verdict": result.get("verdict"),
        "reasons": [str(reason) for reason in result.get("reasons") or []],
        **{key: result.get(key) for key in PAYLOAD_NUMBERS},
        "thresholds": dict(result.get("thresholds") or {}),
    }
    # The alert, written where seapig_core is loaded anyway, so that the alert's flow run
    # imports only Prefect (seconds less per alert on a loaded worker).
    payload["alert_markdown"] = drift_alert_markdown(batch, payload)
    return {"event": DRIFT_EVENT, "resource": resource, "related": related, "payload": payload, "id": event_id}


def batch_state(result: dict[str, Any], *, pipeline: str, output_dir: str, input_file: str | None = None) -> dict[str, Any] | State:
    """The outcome of a scored batch: ``result`` itself, or, for a drifted batch, its event emitted and a "Drifted" state.

    Called inside the batch's task run; reads the deployment and flow run from ``prefect.runtime``.
    """
    if result.get("verdict") != "drift":
        return result
    from prefect.events import emit_event
    from prefect.runtime import deployment, flow_run

    run_id = None if flow_run.id is None else str(flow_run.id)
    event = drift_event(
        result, pipeline=pipeline, output_dir=output_dir, deployment_id=deployment.id, deployment_name=deployment.name,
        flow_run_id=run_id, flow_run_name=flow_run.name, flow_run_url=_ui_url(run_id), input_file=input_file,
    )
    if emit_event(**event) is None:
        get_run_logger().warning(f"The drift event of batch {result['batch']!r} could not be sent (no Prefect events client).")
    reasons = result.get("reasons") or ["no reason recorded"]
    return Completed(name=DRIFTED_STATE, message=f"Drift in batch {result['batch']!r}: {reasons[0]}", data=result)


def run_state(result: dict[str, Any], *, fail_on_drift: bool = False, nothing_new: str | None = None) -> State:
    """The scoring run's final state: Completed, or "Drift detected" (Completed, or Failed with ``fail_on_drift``).

    The message names the drifted batches; ``nothing_new`` (the plan's description) is the
    message of a run that scored nothing.
    """
    scored: Sequence[Mapping[str, Any]] = result.get("scored") or []
    drifted = [str(entry["batch"]) for entry in scored if entry.get("verdict") == "drift"]
    if not drifted:
        message = nothing_new if not scored else f"{len(scored)} batch(es) scored, no drift."
        return Completed(message=message, data=result)
    message = (
        f"Drift detected in {len(drifted)} of {len(scored)} batch(es) scored: {', '.join(drifted)}. "
        f"See the scoring report and the batches' review queues."
    )
    if fail_on_drift:
        return Failed(name=DRIFT_DETECTED_STATE, message=message + " (fail_on_drift is set)", data=DriftDetected(message))
    return Completed(name=DRIFT_DETECTED_STATE, message=message, data=result)


def drift_alert_markdown(batch: str, details: Mapping[str, Any]) -> str:
    """The alert a person reads: which deployment and batch drifted, why, the numbers, and where to look.

    ``details`` is the drift event's payload (:func:`drift_event`); every value in it is escaped.
    """
    from seapig_core.formatting import format_value, markdown_table, markdown_text  # loads torch: not at import

    deployment = details.get("deployment")
    source = f"deployment {markdown_text(deployment)}" if deployment else "a scoring run started by hand (no deployment)"
    lines = [
        f"# Drift: batch {markdown_text(batch)}",
        "",
        f"> **Batch {markdown_text(batch)} of {source} drifted from the calibration data.** Review its rejected "
        f"samples before trusting its selections.",
        "",
    ]
    lines += [f"- {markdown_text(reason)}" for reason in details.get("reasons") or []]
    numbers = [{"what": label, "value": format_value(details.get(key), kind)} for key, (kind, label) in PAYLOAD_NUMBERS.items()
               if key in details]
    if numbers:
        lines += ["", markdown_table(numbers, [("what", "statistic"), ("value", "value")])]
    run = markdown_text(details.get("flow_run_name") or details.get("flow_run_id") or "not recorded")
    url = details.get("flow_run_url")
    link = f"[{run}]({url})" if isinstance(url, str) and _SAFE_URL.fullmatch(url) else run
    pipeline = key_part(str(details.get("pipeline") or "unknown-pipeline"))
    lines += [
        "",
        "## Where to look",
        "",
        f"- Scoring run: {link} (its artifacts: the scoring report, the verdict table and this batch's review queue)",
        f"- Pipeline: `{pipeline}` (its artifact keys start with `{pipeline}--`)",
        f"- Selections file: {markdown_text(details.get('selections_file') or 'not recorded')}",
        f"- Input file: {markdown_text(details.get('input_file') or 'not recorded')}",
        f"- Bundle version: {markdown_text(details.get('bundle_version') or 'not recorded')} "
        f"in {markdown_text(details.get('bundle_dir') or 'not recorded')}",
        f"- Output directory: {markdown_text(details.get('output_dir') or 'not recorded')}",
        f"- Event: `{DRIFT_EVENT}` {markdown_text(details.get('event_id') or '')}",
    ]
    return "\n".join(lines) + "\n"


@task(name="publish-drift-alert", cache_policy=NO_CACHE)
def publish_drift_alert(batch: str, details: dict[str, Any]) -> str:
    """Publish the drift alert of one batch as the pipeline's ``drift-alert`` markdown artifact; return its id.

    The markdown is the payload's ``alert_markdown`` (written, escaped, by :func:`drift_event`),
    else :func:`drift_alert_markdown` of the payload.
    """
    pipeline = key_part(str(details.get("pipeline") or "unknown-pipeline"))
    markdown = details.get("alert_markdown")
    if not isinstance(markdown, str) or not markdown.strip():
        markdown = drift_alert_markdown(batch, details)
    title = markdown.splitlines()[0].lstrip("# ")  # "Drift: batch <escaped name>"
    artifact_id = create_markdown_artifact(markdown, key=artifact_key(pipeline, DRIFT_ALERT), description=f"{title} (pipeline {pipeline}).")
    return str(artifact_id)
