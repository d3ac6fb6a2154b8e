"""Issue 9 acceptance on a real server: a drifted batch raises the event, the automation acts, the run says drift.

What an operator runs (README, "Alerts"): `prefect server start`, `prefect work-pool create`,
`prefect --no-prompt deploy --all` (which also creates the `drift-alert` deployment's trigger,
the automation), optionally the automation of `automations/pause-scoring-on-drift.yaml` (sent
as `prefect automation create --from-file` sends it), and `prefect worker start`. Then one run of the
`scoring/inbox-scoring` deployment over an inbox with one in-distribution batch (`clean`) and
one drifted batch (`drifted`, synthetic logits whose true class is much weaker than in the
calibration data), checked through the REST API:

* the drifted batch: one `seapig.batch.drifted` event (read back through the paged events API)
  with the batch as its resource and the deployment, the flow run, the bundle version and the
  output directory as related resources; its task run ends "Drifted"; the automation's action:
  a `drift-alert` flow run named `drift-drifted` reaches Completed and publishes the
  `inbox-scoring--drift-alert` markdown artifact naming the deployment, the batch, the reasons
  and linking the scoring run; the pause automation pauses the deployment;
* the run ends Completed in the state "Drift detected", its message naming `drifted`;
* the clean batch: no event, no alert run, an ordinary Completed task run;
* the artifacts are keyed by the deployment (`inbox-scoring--...`), with a review queue per
  batch; every parameter of every deployment has a description in the deployment's
  `parameter_openapi_schema` (the UI's "Run" form).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.events.schemas.automations import AutomationCore

from tasks.alerts import DRIFT_DETECTED_STATE, DRIFT_EVENT, DRIFTED_STATE
from tasks.artifacts import DRIFT_ALERT, REVIEW, artifact_key
from tests.flows.live_server import REPO, LiveServer, copy_project, live_prefect_server
from tests.tasks.test_alert_tasks import write_drift_inbox

pytestmark = pytest.mark.slow

POOL = "seapig-process"


def _task_runs(server: LiveServer, flow_run_id: str) -> dict[str, dict[str, Any]]:
    runs = server.post("task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200})
    return {run["name"]: run for run in runs}


def test_a_drifted_batch_raises_the_event_the_automation_alerts_and_the_clean_one_does_not(tmp_path: Path) -> None:
    started = time.monotonic()
    laps: list[str] = []

    def lap(what: str) -> None:
        laps.append(f"{what} {time.monotonic() - started:.0f} s")

    data = write_drift_inbox(tmp_path / "data")
    project = copy_project(tmp_path / "project")
    with live_prefect_server(tmp_path / "server") as server:
        lap("server up")
        server.create_work_pool(POOL)
        server.deploy_all(project)
        # What `prefect automation create --from-file automations/pause-scoring-on-drift.yaml` sends
        # (through the API: a second CLI process would cost seconds here).
        pause = yaml.safe_load((REPO / "automations" / "pause-scoring-on-drift.yaml").read_text())
        server.post("automations/", AutomationCore.model_validate(pause).model_dump(mode="json"))
        server.start_worker(POOL, cwd=project, wait=False)
        lap("deployed")

        # The automation `prefect deploy` created from prefect.yaml, and the optional one.
        automations = {a["name"]: a for a in server.post("automations/filter", {"limit": 50})}
        alert = server.deployment("drift-alert/drift-alert")
        assert automations["seapig-drift-alert"]["trigger"]["expect"] == [DRIFT_EVENT]
        (action,) = automations["seapig-drift-alert"]["actions"]
        assert (action["type"], action["deployment_id"]) == ("run-deployment", alert["id"])
        assert automations["seapig-pause-scoring-on-drift"]["actions"][0]["type"] == "pause-deployment"

        # Every parameter of every deployment is described in the schema the UI's Run form shows.
        for deployment in server.post("deployments/filter", {"limit": 50}):
            properties = deployment["parameter_openapi_schema"]["properties"]
            assert properties and all(spec.get("description") for spec in properties.values()), deployment["name"]

        scoring = server.deployment("scoring/inbox-scoring")
        run = server.run_deployment("scoring/inbox-scoring", {
            "bundle_dir": str(data["bundle"]), "logits_dir": str(data["inbox"]), "output_dir": str(tmp_path / "selections"),
        })
        finished = server.wait_for_flow_run(run["id"], timeout=240)
        lap("scoring run completed")

        # The run's final state says drift and names the batch; the batches' task runs differ.
        assert (finished["state"]["type"], finished["state"]["name"]) == ("COMPLETED", DRIFT_DETECTED_STATE)
        assert "drifted" in finished["state"]["message"] and "clean" not in finished["state"]["message"]
        tasks = _task_runs(server, run["id"])
        assert (tasks["score-drifted"]["state"]["type"], tasks["score-drifted"]["state"]["name"]) == ("COMPLETED", DRIFTED_STATE)
        assert (tasks["score-clean"]["state"]["type"], tasks["score-clean"]["state"]["name"]) == ("COMPLETED", "Completed")

        # The event: the drifted batch only, with its related resources.
        def drift_events() -> list[dict[str, Any]] | None:
            events = server.read_events({"event": {"name": [DRIFT_EVENT]}})
            return events or None

        events = server.wait_for("the seapig.batch.drifted event", drift_events, timeout=30)
        (event,) = events
        assert event["resource"]["prefect.resource.id"] == "seapig.batch.inbox-scoring.drifted"
        related = {r["prefect.resource.role"]: r for r in event["related"]}
        assert related["deployment"]["prefect.resource.id"] == f"prefect.deployment.{scoring['id']}"
        assert related["deployment"]["prefect.resource.name"] == "inbox-scoring"
        assert related["flow-run"]["prefect.resource.id"] == f"prefect.flow-run.{run['id']}"
        assert related["bundle-version"]["prefect.resource.id"].startswith("seapig.bundle-version.")
        assert related["output-dir"]["prefect.resource.name"] == str((tmp_path / "selections").resolve())
        assert event["payload"]["verdict"] == "drift" and event["payload"]["reasons"]
        assert not server.read_events({"any_resource": {"id": ["seapig.batch.inbox-scoring.clean"]}})
        # Prefect names the run's state-change event after the state: an automation on "any
        # completed run" must expect it too (README, "Alerts").
        final = server.wait_for(
            "the scoring run's state-change event", lambda: server.read_events({
                "event": {"name": [f"prefect.flow-run.{DRIFT_DETECTED_STATE}"]},
                "any_resource": {"id": [f"prefect.flow-run.{run['id']}"]}}) or None, timeout=30)
        assert [e["resource"]["prefect.state-type"] for e in final] == ["COMPLETED"]

        # The automation's action: one alert run, for the drifted batch, with its artifact.
        def alert_completed() -> dict[str, Any] | None:
            runs = server.flow_runs({"deployment_id": {"any_": [alert["id"]]}})
            for alert_run in runs:
                if alert_run["state"]["type"] in {"FAILED", "CRASHED", "CANCELLED"}:
                    server.fail(f"the drift-alert run {alert_run['name']} ended {alert_run['state']['type']}: "
                                f"{alert_run['state'].get('message')}")
            done = [r for r in runs if r["state"]["type"] == "COMPLETED"]
            return done[0] if done else None

        alert_run = server.wait_for("the automation's drift-alert run to complete", alert_completed, timeout=180)
        lap("alert run completed")
        assert alert_run["name"] == "drift-drifted" and alert_run["parameters"]["batch"] == "drifted"
        assert len(server.flow_runs({"deployment_id": {"any_": [alert["id"]]}})) == 1  # none for the clean batch
        (artifact,) = server.read_artifacts(flow_run_id=alert_run["id"])
        assert artifact["key"] == artifact_key("inbox-scoring", DRIFT_ALERT) and artifact["type"] == "markdown"
        markdown = artifact["data"]
        assert markdown.startswith("# Drift: batch drifted") and "deployment inbox-scoring" in markdown
        assert "above the expected 10.0%" in markdown and f"/runs/flow-run/{run['id']})" in markdown

        # The optional automation paused the scoring deployment until someone reviews.
        server.wait_for("the pause automation to pause inbox-scoring",
                        lambda: server.deployment("scoring/inbox-scoring")["paused"], timeout=60)

        # Artifacts keyed by the deployment, a review queue per batch.
        keys = {a["key"] for a in server.read_artifacts(flow_run_id=run["id"])}
        assert keys == {artifact_key("inbox-scoring", kind) for kind in ("scoring-summary", "scoring-report")} | {
            artifact_key("inbox-scoring", REVIEW, batch) for batch in ("clean", "drifted")}
        lap("checked")
        print("live alert test:", ", ".join(laps))
