"""The schedules of prefect.yaml fire on a real server, and a worker completes an auto-scheduled run.

Issue 8, item 1: `prefect deploy --all` succeeded and the UI showed `digits-scoring` as active,
yet Prefect 3.8.8's scheduler, next to SQLAlchemy 2.1, crashed on every loop and never created a
run. A YAML check cannot see that; this test runs what an operator runs (README, "Running the
pipeline with Prefect"): `prefect server start` (private PREFECT_HOME, scheduler loop of 2 s),
`prefect work-pool create seapig-process --type process`, `prefect --no-prompt deploy --all` on
the repository's own prefect.yaml (from a temporary copy of the project, so that its relative
`demo_output/...` paths stay out of the checkout), then checks through the REST API:

* every deployment of prefect.yaml is deployed, with the concurrency limit the file sets
  (issue 8, item 3), and the server enforces it with the file's collision strategy;
* the scheduler creates auto-scheduled runs for every active schedule of prefect.yaml (and none
  for an inactive one);
* with a worker (`prefect worker start --pool seapig-process`), a manual calibration run
  completes, and then an auto-scheduled run of `digits-scoring` (from a 10-second interval
  schedule the test adds) reaches Completed and writes its selections and artifacts; the later
  runs of the interval find nothing new and publish no second report.

Once they have fired, the schedules of prefect.yaml are deactivated and their runs deleted
before the worker starts, so that a cron tick during the test (the suite run across the hour)
cannot start a run of its own; CI once failed that way.

With SQLAlchemy 2.1 the second check fails (no auto-scheduled run; the server log shows
"Can't evaluate bulk DML statement").
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.flows.live_server import REPO, LiveServer, copy_project, live_prefect_server

pytestmark = pytest.mark.slow

POOL = "seapig-process"
INTERVAL_SECONDS = 10


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def _check_concurrency(server: LiveServer, spec: dict[str, Any], deployed: dict[str, Any]) -> None:
    """The deployment carries the limit of prefect.yaml, and the server enforces it with its strategy."""
    name = spec["name"]
    limit = spec["concurrency_limit"]
    limit, strategy = (limit, "ENQUEUE") if isinstance(limit, int) else (limit["limit"], limit.get("collision_strategy", "ENQUEUE"))
    # (The response's own `concurrency_limit` field is deprecated and always null.)
    assert (deployed.get("global_concurrency_limit") or {}).get("limit") == limit, (name, deployed.get("global_concurrency_limit"))
    assert (deployed.get("concurrency_options") or {}).get("collision_strategy", "ENQUEUE") == strategy, name

    # Fill the slots with runs that claim them (the transition a worker proposes before starting a
    # run), then one more run asks: it must be cancelled (CANCEL_NEW) or parked (ENQUEUE). No
    # worker is running yet, so nothing else moves these runs.
    path = f"deployments/{deployed['id']}/create_flow_run"
    holders = [server.post(path, {"state": {"type": "SCHEDULED"}}) for _ in range(limit)]
    for run in holders:
        result = server.post(f"flow_runs/{run['id']}/set_state", {"state": {"type": "PENDING"}})
        assert result["status"] == "ACCEPT", (name, result)
    extra = server.post(path, {"state": {"type": "SCHEDULED"}})
    result = server.post(f"flow_runs/{extra['id']}/set_state", {"state": {"type": "PENDING"}})
    assert result["status"] == "REJECT", (name, result)
    if strategy == "CANCEL_NEW":
        assert result["state"]["type"] == "CANCELLED", (name, result)
    else:
        assert (result["state"]["type"], result["state"]["name"]) == ("SCHEDULED", "AwaitingConcurrencySlot"), (name, result)
        server.post(f"flow_runs/{extra['id']}/set_state", {"state": {"type": "CANCELLED"}, "force": True})
    for run in holders:  # leaving Pending releases the slot
        result = server.post(f"flow_runs/{run['id']}/set_state", {"state": {"type": "CANCELLED"}})
        assert result["status"] == "ACCEPT", (name, result)
    active = server.get(f"deployments/{deployed['id']}")["global_concurrency_limit"]["active_slots"]
    assert active == 0, f"{name}: {active} slots still taken after the test's runs were cancelled"


def _schedule_runs(server: LiveServer, deployment_id: str, schedule_id: str) -> list[dict[str, Any]]:
    """The flow runs that the scheduler created for one schedule of a deployment."""
    return server.flow_runs({"deployment_id": {"any_": [deployment_id]}, "created_by": {"id_": [schedule_id]}})


def test_schedules_fire_and_a_worker_completes_an_auto_scheduled_scoring_run(config: dict[str, Any], tmp_path: Path) -> None:
    started = time.monotonic()
    laps: list[str] = []  # where the time goes (printed; shown with -s)

    def lap(what: str) -> None:
        laps.append(f"{what} {time.monotonic() - started:.0f} s")

    project = copy_project(tmp_path / "project")
    with live_prefect_server(tmp_path / "server", scheduler_loop_seconds=2) as server:
        lap("server up")
        pool = server.create_work_pool(POOL)
        assert pool["type"] == "process"
        server.deploy_all(project)
        lap("deployed")

        deployed = {d["name"]: d for d in server.post("deployments/filter", {"limit": 200})}
        assert set(deployed) == {spec["name"] for spec in config["deployments"]}
        for spec in config["deployments"]:
            assert deployed[spec["name"]]["work_pool_name"] == POOL
            # The worker runs the flows from the directory the deploy ran in: the temporary copy.
            pull = deployed[spec["name"]]["pull_steps"]
            assert any(str(project) in str(step) for step in pull), (spec["name"], pull)

        # 1. Concurrency limits (issue 8, item 3): deployed as the file says, enforced as it says.
        limited = [spec for spec in config["deployments"] if spec.get("concurrency_limit") is not None]
        assert {"digits-scoring", "inbox-scoring"} <= {spec["name"] for spec in limited}
        for spec in limited:
            _check_concurrency(server, spec, deployed[spec["name"]])

        # 2. The scheduler creates runs for every active schedule of prefect.yaml, none for an inactive one.
        active: list[tuple[str, dict[str, Any]]] = []
        inactive: list[tuple[str, dict[str, Any]]] = []
        for spec in config["deployments"]:
            schedules = deployed[spec["name"]]["schedules"]
            assert len(schedules) == len(spec.get("schedules") or []), spec["name"]
            for schedule in schedules:
                (active if schedule["active"] else inactive).append((spec["name"], schedule))
        assert [name for name, _ in active] == [s["name"] for s in config["deployments"]
                                                if any(x.get("active", True) for x in s.get("schedules") or [])]
        assert active, "prefect.yaml has no active schedule"

        def every_active_schedule_has_runs() -> dict[str, list[dict[str, Any]]] | None:
            runs = {f"{name} {s['schedule']}": _schedule_runs(server, deployed[name]["id"], s["id"]) for name, s in active}
            return runs if all(runs.values()) else None

        scheduled = server.wait_for("auto-scheduled runs for every active schedule of prefect.yaml",
                                    every_active_schedule_has_runs, timeout=60)
        for key, runs in scheduled.items():
            for run in runs:
                assert run["auto_scheduled"] is True, key
                assert run["state"]["type"] == "SCHEDULED", (key, run["state"])
                assert run["created_by"]["type"] == "SCHEDULE", (key, run["created_by"])
        for name, schedule in inactive:
            assert _schedule_runs(server, deployed[name]["id"], schedule["id"]) == [], f"{name}: inactive schedule ran"

        lap("schedules fired")

        # The schedules of prefect.yaml have fired; from here on, only the test's own interval
        # schedule runs. Otherwise a cron tick during the test (digits-scoring's "0 * * * *" when
        # the suite runs across the hour) would start a run before the calibration exists, or
        # score the batches before the interval's run, and the outcome would depend on the clock.
        # Deactivating a schedule deletes its future runs; a run already due is deleted here, and
        # so is one inserted by a scheduler loop that read the schedule before it was deactivated:
        # the sweep goes on until three loops (2 s each) have added nothing.
        for name, schedule in active:
            server.request("PATCH", f"deployments/{deployed[name]['id']}/schedules/{schedule['id']}", json={"active": False})
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 6:
            for name, schedule in active:
                for run in _schedule_runs(server, deployed[name]["id"], schedule["id"]):
                    assert run["state"]["type"] == "SCHEDULED", (name, run["state"])  # no worker has run yet
                    server.request("DELETE", f"flow_runs/{run['id']}", expect=(200, 204, 404))  # 404: a retry after it went
                    quiet_since = time.monotonic()
            time.sleep(1)
            assert time.monotonic() - started < 600, "the deactivated schedules kept creating runs"
        # Started only now, so that it cannot have picked up a run of those schedules (the
        # concurrency check above needed a pool without a worker, too).
        server.start_worker(POOL, cwd=project, wait=False)

        # 3. A worker runs a manual calibration, then an auto-scheduled scoring run completes.
        calibration = server.run_deployment("calibration/digits-calibration")
        server.wait_for_flow_run(calibration["id"], timeout=240)
        lap("calibrated")

        scoring = deployed["digits-scoring"]
        (interval,) = server.post(
            f"deployments/{scoring['id']}/schedules",
            [{"schedule": {"interval": INTERVAL_SECONDS}, "active": True, "slug": "test-interval"}],
        )

        report_keys = {"digits-scoring--scoring-summary", "digits-scoring--scoring-report"}  # keyed per deployment

        def a_scheduled_scoring_run_scored() -> dict[str, Any] | None:
            # The interval fires every 10 s, so several runs may complete: the one that took the
            # deployment's concurrency slot first scores the batches (one started meanwhile is
            # cancelled), the later ones find nothing new and publish no report. The test waits
            # for the run that scored, whichever it is.
            runs = _schedule_runs(server, scoring["id"], interval["id"])
            for run in runs:
                if run["state"]["type"] in {"FAILED", "CRASHED"}:
                    server.fail(f"auto-scheduled scoring run {run['name']} ended {run['state']['type']}: "
                                f"{run['state'].get('message')}")
            for run in runs:
                if run["state"]["type"] == "COMPLETED":
                    if report_keys <= {artifact["key"] for artifact in server.read_artifacts(flow_run_id=run["id"])}:
                        return run
            return None

        run = server.wait_for(f"an auto-scheduled digits-scoring run (every {INTERVAL_SECONDS} s) to score the batches",
                              a_scheduled_scoring_run_scored, timeout=240)
        assert run["auto_scheduled"] is True and run["created_by"]["id"] == interval["id"]
        lap("scheduled scoring run completed")

        # It ran in the project copy, with the deployment's parameters, and wrote every batch once.
        selections = sorted((project / "demo_output/deployments/selections").glob("*.selections.parquet"))
        assert len(selections) == 3, selections
        runs = server.flow_runs({"deployment_id": {"any_": [scoring["id"]]}})
        assert {r["id"] for r in runs if r["auto_scheduled"]} == {r["id"] for r in _schedule_runs(server, scoring["id"], interval["id"])}
        for other in runs:
            if other["id"] != run["id"] and other["auto_scheduled"] and other["state"]["type"] == "COMPLETED":
                keys = {artifact["key"] for artifact in server.read_artifacts(flow_run_id=other["id"])}
                assert not report_keys & keys, (other["name"], keys)  # nothing new: no second report
                assert "nothing new" in (other["state"].get("message") or "").lower(), other["state"]

        def completion_event() -> list[dict[str, Any]] | None:  # events are persisted in batches, a moment later
            events = server.read_events({"any_resource": {"id": [f"prefect.flow-run.{run['id']}"]}})
            # The event is named after the final state: prefect.flow-run.Completed, or
            # prefect.flow-run.Drift detected (a Completed state named for drift, tasks/alerts.py).
            final = {"prefect.flow-run.Completed", "prefect.flow-run.Drift detected"}
            done = [e for e in events if e["event"] in final and e["resource"].get("prefect.state-type") == "COMPLETED"]
            return events if done else None

        events = server.wait_for("the scoring run's completion event", completion_event, timeout=30)
        every_event = server.read_events()  # more than one page of 50 by now
        assert len(every_event) > 50  # distinct events, so the next_page links were followed
        assert {event["id"] for event in events} <= {event["id"] for event in every_event}
        lap("checked")
        print("live schedule test:", ", ".join(laps))
