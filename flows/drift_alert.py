"""Drift alert flow: what the automation of ``prefect.yaml`` runs when a batch drifted.

The ``drift-alert`` deployment's trigger expects the ``seapig.batch.drifted`` event (emitted by
the scoring flow for each drifted batch, :mod:`tasks.alerts`) and runs this flow with the
event's payload: a flow run named ``drift-<batch>`` appears in the UI's runs, and it publishes
the pipeline's ``<pipeline>--drift-alert`` markdown artifact naming the deployment, the batch,
the reasons and a link to the scoring run.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows._parameters import describe_parameters
from tasks.alerts import publish_drift_alert


@flow(name="drift-alert", flow_run_name="drift-{batch}")
@describe_parameters
def drift_alert_flow(batch: str, details: dict[str, Any]) -> str:
    """Publish the drift alert of one batch as a markdown artifact; return the artifact's id.

    Parameters
    ----------
    batch : str
        The drifted batch (the event's ``batch``).
    details : dict
        The drift event's payload: deployment, flow run and its UI link, bundle version,
        selections file, output directory, verdict, reasons and the drift statistics.
    """
    return publish_drift_alert(batch, details)
