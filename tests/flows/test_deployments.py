"""prefect.yaml: every deployment loads its entrypoint with valid parameters; scoring runs on a schedule, one at a time.

The YAML only; tests/flows/test_schedule_live.py deploys it on a real server with a worker.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml
from prefect.flows import load_flow_from_entrypoint

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def _deployments(config: dict) -> list[dict]:
    return config["deployments"]


def test_every_deployment_loads_its_entrypoint(config: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the worker runs from the repository root (the recorded working directory)
    names = set()
    for deployment in _deployments(config):
        flow = load_flow_from_entrypoint(deployment["entrypoint"], use_placeholder_flow=False)
        assert flow.name == deployment["entrypoint"].split(":")[1].removesuffix("_flow").replace("_", "-")
        parameters = deployment.get("parameters", {})
        signature = inspect.signature(flow.fn)
        assert set(parameters) <= set(signature.parameters), deployment["name"]
        # Types and required parameters; a deployment run by its trigger gets them from the event.
        from_trigger = {name: {} if name == "details" else "x" for t in deployment.get("triggers") or [] for name in t["parameters"]}
        flow.validate_parameters({**parameters, **from_trigger})
        assert deployment["work_pool"]["name"] == "seapig-process"
        assert deployment.get("description")
        names.add(f"{flow.name}/{deployment['name']}")
    assert {"calibration/digits-calibration", "scoring/digits-scoring", "demo/digits-demo", "drift-alert/drift-alert"} <= names


def test_scoring_deployments_set_the_drift_verdict_and_the_alert_reacts_to_drift(config: dict) -> None:
    """Issue 9, item 1: the thresholds and the alerting are deployment parameters; the automation is in the file."""
    from seapig_core.drift import DriftThresholds
    from tasks.alerts import DRIFT_EVENT

    by_name = {d["name"]: d for d in _deployments(config)}
    for name in ("digits-scoring", "inbox-scoring"):
        parameters = by_name[name]["parameters"]
        assert DriftThresholds.from_dict(parameters["drift_thresholds"]) == DriftThresholds(), name  # the documented defaults
        assert parameters["fail_on_drift"] is False and parameters["review_count"] == 10, name
    (trigger,) = by_name["drift-alert"]["triggers"]
    assert trigger["expect"] == [DRIFT_EVENT] and trigger["match"] == {"prefect.resource.id": "seapig.batch.*"}
    assert trigger["parameters"] == {"batch": "{{ event.payload.batch }}", "details": "{{ event.payload }}"}
    assert not by_name["drift-alert"].get("schedules")


def test_scoring_runs_on_a_cron_schedule_and_calibration_on_demand(config: dict) -> None:
    by_name = {d["name"]: d for d in _deployments(config)}
    schedules = by_name["digits-scoring"]["schedules"]
    assert len(schedules) == 1 and schedules[0]["cron"] == "0 * * * *" and schedules[0]["active"] is True
    from prefect.client.schemas.schedules import CronSchedule

    CronSchedule(cron=schedules[0]["cron"], timezone=schedules[0]["timezone"])  # a valid cron expression
    assert not by_name["digits-calibration"].get("schedules")
    assert not by_name["digits-demo"].get("schedules")


def test_scheduled_scoring_runs_one_at_a_time_and_cancels_the_overlap(config: dict) -> None:
    """Issue 8, item 3: a scoring run overlapping a running one would only redo its work."""
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    by_name = {d["name"]: d for d in _deployments(config)}
    for name in ("digits-scoring", "inbox-scoring"):
        assert by_name[name]["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}, name
    for deployment in _deployments(config):
        limit = deployment.get("concurrency_limit")
        if isinstance(limit, dict):  # a typo in the strategy would only fail at deploy time
            assert limit.get("collision_strategy", "ENQUEUE") in ConcurrencyLimitStrategy.__members__, deployment["name"]
            assert isinstance(limit["limit"], int) and limit["limit"] >= 1, deployment["name"]
    # Each calibration or demo run is an explicit request: none is cancelled or held back.
    assert by_name["digits-calibration"].get("concurrency_limit") is None
    assert by_name["digits-demo"].get("concurrency_limit") is None
