"""Issue 9 (Prefect side): artifact keys per pipeline, drift events and states, the alert, parameter descriptions.

Unit tests of ``tasks/artifacts.py`` (keys, with hypothesis), ``tasks/alerts.py`` (the drift
event, the states, the alert's markdown), ``flows/_parameters.py`` (descriptions in the
parameter schema of every deployed flow) and the automation definitions; then the scoring flow
on Prefect's temporary server with one in-distribution and one drifted batch: the drifted
batch's task run ends "Drifted" and emits the drift event, the run ends "Drift detected"
(Failed with ``fail_on_drift``), a clean run ends an ordinary Completed, and the artifacts are
keyed per pipeline with a review queue per batch. The real-server acceptance test with the
automation is ``tests/flows/test_alerts_live.py``.
"""

from __future__ import annotations

import inspect
import json
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from flows._parameters import describe_parameters
from seapig_core.formatting import markdown_text
from seapig_core.pipeline import calibrate_file
from seapig_core.selections import read_selections
from tasks.alerts import (
    DRIFT_DETECTED_STATE,
    DRIFT_EVENT,
    DRIFTED_STATE,
    DriftDetected,
    drift_alert_markdown,
    drift_event,
    run_state,
)
from tasks.artifacts import KINDS, REVIEW, artifact_key, artifact_kind, key_part, pipeline_key

REPO = Path(__file__).resolve().parents[2]
CLASSES = [f"class-{i}" for i in range(10)]


# ----------------------------------------------------------------------------- keys


def _valid_prefect_key(key: str) -> bool:
    from prefect.types.names import ArtifactKey

    TypeAdapter(ArtifactKey).validate_python(key)  # raises for anything Prefect refuses
    return True


def test_key_parts_keep_readable_names_and_hash_the_others() -> None:
    assert key_part("digits-scoring") == "digits-scoring"
    assert key_part("Digits Scoring").startswith("digits-scoring-") and len(key_part("Digits Scoring")) == len("digits-scoring-") + 10
    assert key_part("digits_scoring") != key_part("digits-scoring") != key_part("Digits-Scoring")
    assert key_part("ünïcode ✓") != key_part("ÜNÏCODE ✓")
    assert artifact_key("digits-scoring", "scoring-report") == "digits-scoring--scoring-report"
    assert artifact_key("digits-scoring", REVIEW, "batch-000") == "digits-scoring--review--batch-000"
    assert artifact_kind("digits-scoring--review--batch-000") == REVIEW and artifact_kind("scoring-report") is None
    for bad in ("Digits", "a--b", "-a", ""):
        with pytest.raises(ValueError, match="'pipeline'"):
            artifact_key(bad, "scoring-report")
    with pytest.raises(ValueError, match="'kind'"):
        artifact_key("a", "summary")
    with pytest.raises(ValueError, match="Got neither"):
        pipeline_key(None, None)


def test_two_deployments_and_two_directories_never_share_a_key(tmp_path: Path) -> None:
    deployments = ["digits-scoring", "inbox-scoring", "Inbox Scoring", "inbox_scoring"]
    directories = [tmp_path / "a" / "selections", tmp_path / "b" / "selections", tmp_path / "A" / "selections"]
    pipelines = [pipeline_key(name) for name in deployments] + [pipeline_key(None, d) for d in directories]
    keys = [artifact_key(p, kind) for p in pipelines for kind in KINDS]
    assert len(set(keys)) == len(keys) and all(_valid_prefect_key(k) for k in keys)
    hand = pipeline_key(None, directories[0])
    long = pipeline_key(None, tmp_path / ("x" * 200) / "selections")
    assert len(long) <= 64 and key_part(long) == long and key_part(hand) == hand  # the alert re-reads it from the event
    assert hand.startswith("dir-a-selections-") and hand == pipeline_key("", str(directories[0]) + "/")  # same dir, same key
    assert pipeline_key(None, "relative/out") == pipeline_key(None, Path.cwd() / "relative" / "out")


names = st.text(min_size=1, max_size=80)


@settings(max_examples=300, deadline=None)
@given(a=names, b=names, batch_a=st.none() | names, batch_b=st.none() | names,
       kind_a=st.sampled_from(KINDS), kind_b=st.sampled_from(KINDS))
def test_keys_are_valid_and_distinct_for_distinct_names(
    a: str, b: str, batch_a: str | None, batch_b: str | None, kind_a: str, kind_b: str
) -> None:
    key_a = artifact_key(pipeline_key(a), kind_a, batch_a)
    key_b = artifact_key(pipeline_key(b), kind_b, batch_b)
    assert _valid_prefect_key(key_a) and len(key_a) <= 2 * 64 + 2 * 2 + max(map(len, KINDS))
    assert key_part(pipeline_key(a)) == pipeline_key(a)  # a pipeline key is its own key part (the alert's key)
    assert (key_a == key_b) == ((a, kind_a, batch_a) == (b, kind_b, batch_b))
    assert artifact_kind(key_a) == kind_a


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet="abAB-_. /", min_size=1, max_size=12), min_size=2, max_size=6, unique=True))
def test_look_alike_deployment_names_get_distinct_keys(deployments: list[str]) -> None:
    keys = {artifact_key(pipeline_key(name), "scoring-summary") for name in deployments}
    assert len(keys) == len(deployments)


# ----------------------------------------------------------------------------- parameter descriptions


def _deployed_flows() -> dict[str, Any]:
    from prefect.flows import load_flow_from_entrypoint

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    return {d["entrypoint"]: load_flow_from_entrypoint(str(REPO / d["entrypoint"]), use_placeholder_flow=False)
            for d in config["deployments"]}


def test_every_parameter_of_every_deployed_flow_is_described_in_its_schema() -> None:
    from prefect.utilities.callables import parameter_schema

    flows = _deployed_flows()
    assert {"flows/scoring.py:scoring_flow", "flows/drift_alert.py:drift_alert_flow"} <= set(flows)
    for entrypoint, flow in flows.items():
        for schema in (flow.parameters, parameter_schema(flow)):  # the flow's, and what `prefect deploy` sends
            properties = schema.model_dump_for_openapi()["properties"]
            assert set(properties) == set(inspect.signature(flow.fn).parameters), entrypoint
            undescribed = [name for name, spec in properties.items() if not (spec.get("description") or "").strip()]
            assert undescribed == [], entrypoint
    described = flows["flows/scoring.py:scoring_flow"].parameters.properties
    assert "``" not in described["logits_dir"]["description"] and "`seapig_core.extract.extract_logits`" in described["extract_options"]["description"]
    assert described["drift_thresholds"]["description"].startswith("Thresholds of the drift verdict")


def test_an_undescribed_parameter_fails_at_import() -> None:
    def half_documented(a: int, b: int) -> None:
        """Do it.

        Parameters
        ----------
        a : int
            The a.
        """

    with pytest.raises(TypeError, match=r"Missing: \['b'\]"):
        describe_parameters(half_documented)


# ----------------------------------------------------------------------------- event, states, alert


def _result(verdict: str = "drift", batch: str = "batch-7") -> dict[str, Any]:
    return {
        "batch": batch, "path": f"/data/out/{batch}.selections.parquet", "bundle_version": "20261101T000000Z-abc",
        "bundle_dir": "/data/bundle", "verdict": verdict, "reasons": ["The rejection rate 42.3% is above the expected 10.0%."],
        "samples": 300, "rejected": 127, "rejection_rate": 0.4233, "expected_rejection_rate": 0.1, "rate_pvalue": 1e-30,
        "binomial_pvalue": 1e-40, "ks_statistic": 0.51, "ks_pvalue": 1e-35, "psi": 1.9, "non_finite": 0,
        "thresholds": {"alpha": 0.001},
    }


def test_the_drift_event_names_the_batch_and_its_related_resources() -> None:
    from prefect.events import Event

    event_id = uuid.uuid4()
    kwargs = drift_event(
        _result(), pipeline="inbox-scoring", output_dir="/data/out", deployment_id="d-1", deployment_name="inbox-scoring",
        flow_run_id="r-1", flow_run_name="clever-fox", flow_run_url="http://ui/runs/flow-run/r-1", input_file="/in/batch-7.npz",
        event_id=event_id,
    )
    event = Event(**kwargs)  # what emit_event builds
    assert event.event == DRIFT_EVENT == "seapig.batch.drifted" and event.id == event_id
    assert event.resource.id == "seapig.batch.inbox-scoring.batch-7" and event.resource.name == "batch-7"
    roles = {r.role: r for r in event.related}
    assert roles["deployment"].id == "prefect.deployment.d-1" and roles["deployment"].name == "inbox-scoring"
    assert roles["flow-run"].id == "prefect.flow-run.r-1"
    assert roles["bundle-version"].id == "seapig.bundle-version.20261101T000000Z-abc"
    assert roles["output-dir"].name == str(Path("/data/out").resolve())
    payload = event.payload
    assert payload["verdict"] == "drift" and payload["reasons"] and payload["ks_statistic"] == 0.51
    assert payload["selections_file"].endswith("batch-7.selections.parquet") and payload["event_id"] == str(event_id)
    json.dumps(payload)  # JSON-serialisable (the automation templates it into the alert's parameters)
    by_hand = Event(**drift_event(_result(), pipeline="dir-x-1234567890", output_dir="/data/out"))
    assert {r.role for r in by_hand.related} == {"bundle-version", "output-dir"}  # no deployment, no flow run


def test_run_state_says_drift_and_fails_only_when_asked() -> None:
    clean = {"scored": [_result("ok", "a"), _result("insufficient", "b")]}
    state = run_state(clean)
    assert (state.type.value, state.name) == ("COMPLETED", "Completed") and "no drift" in state.message
    nothing = run_state({"scored": []}, nothing_new="Nothing new: 0 batch(es) to score.")
    assert nothing.name == "Completed" and nothing.message.startswith("Nothing new")
    mixed = {"scored": [_result("ok", "a"), _result("drift", "b")]}
    state = run_state(mixed)
    assert (state.type.value, state.name) == ("COMPLETED", DRIFT_DETECTED_STATE) and "1 of 2" in state.message and ": b." in state.message
    failed = run_state(mixed, fail_on_drift=True)
    assert (failed.type.value, failed.name) == ("FAILED", DRIFT_DETECTED_STATE)
    with pytest.raises(DriftDetected, match="Drift detected in 1 of 2"):
        failed.result()


def test_the_alert_names_deployment_batch_reasons_and_links_the_run_and_escapes_the_rest() -> None:
    payload = drift_event(_result(batch="[x](javascript:alert(1))"), pipeline="inbox-scoring", output_dir="/data/out",
                          deployment_id="d", deployment_name="inbox-scoring", flow_run_id="r", flow_run_name="clever-fox",
                          flow_run_url="http://127.0.0.1:4200/runs/flow-run/r")["payload"]
    markdown = drift_alert_markdown(payload["batch"], payload)
    assert markdown.startswith("# Drift: batch \\[x\\]\\(javascript:alert\\(1\\)\\)")
    assert "inbox-scoring" in markdown and "42.3%" in markdown and "above the expected 10.0%" in markdown
    assert "[clever-fox](http://127.0.0.1:4200/runs/flow-run/r)" in markdown and "](javascript" not in markdown
    payload["flow_run_url"] = "javascript:alert(1)"
    assert "](javascript" not in drift_alert_markdown("b", payload) and "clever-fox" in drift_alert_markdown("b", payload)


def test_the_automations_expect_the_drift_event() -> None:
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers
    from prefect.events.schemas.automations import AutomationCore

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (alert,) = [d for d in config["deployments"] if d["name"] == "drift-alert"]
    (trigger,) = _initialize_deployment_triggers(alert["name"], [dict(t) for t in alert["triggers"]])
    trigger.set_deployment_id(uuid.uuid4())
    automation = trigger.as_automation()
    assert automation.trigger.expect == {DRIFT_EVENT} and automation.enabled
    (action,) = automation.actions
    assert action.type == "run-deployment" and set(action.parameters) == set(inspect.signature(
        _deployed_flows()["flows/drift_alert.py:drift_alert_flow"].fn).parameters)
    pause = AutomationCore.model_validate(yaml.safe_load((REPO / "automations/pause-scoring-on-drift.yaml").read_text()))
    assert pause.trigger.expect == {DRIFT_EVENT} and [a.type for a in pause.actions] == ["pause-deployment"]
    assert pause.actions[0].source == "inferred"


def test_the_alert_flow_loads_without_torch() -> None:
    """The automation starts one alert run per drifted batch: each imports Prefect only (seconds, not torch's)."""
    import subprocess
    import sys

    probe = "import sys, flows.drift_alert; print(sorted(m for m in ('torch', 'seapig_core', 'pandas') if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"
    payload = drift_event(_result(), pipeline="p", output_dir="/data/out")["payload"]
    assert payload["alert_markdown"] == drift_alert_markdown("batch-7", {k: v for k, v in payload.items() if k != "alert_markdown"})


# ----------------------------------------------------------------------------- the scoring flow with drift


def _batch(n: int, boost: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    logits = rng.normal(size=(n, 10)).astype(np.float32)
    logits[np.arange(n), labels] += boost
    return logits, labels


def write_drift_inbox(root: Path) -> dict[str, Path]:
    """A bundle calibrated on synthetic logits, and an inbox with a clean and a drifted batch of 300 samples.

    ``clean`` is drawn like the calibration data (verdict ok); ``drifted`` has a much weaker true
    class (42 % rejected against 10 % expected, KS 0.5: verdict drift).
    """
    root.mkdir(parents=True, exist_ok=True)
    logits, labels = _batch(600, 3.0, 0)
    np.savez(root / "calibration.npz", logits=logits, labels=labels)
    calibrate_file(root / "calibration.npz", root / "bundle", scores=["softmax"], q=0.9, class_names=CLASSES)
    inbox = root / "inbox"
    inbox.mkdir()
    for name, boost, seed in (("clean", 3.0, 1), ("drifted", 0.5, 2)):
        logits, _ = _batch(300, boost, seed)
        np.savez(inbox / f"{name}.npz", logits=logits, sample_ids=np.array([f"{name}-{i:03d}" for i in range(300)]))
    return {"root": root, "bundle": root / "bundle", "inbox": inbox}


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_a_drifted_batch_ends_drifted_emits_its_event_and_the_run_says_drift(tmp_path: Path) -> None:
    from flows.scoring import scoring_flow
    from tests.flows.harness import read_artifacts, read_task_runs

    ws = write_drift_inbox(tmp_path / "ws")
    out = tmp_path / "out"
    started = time.time()
    state = scoring_flow(bundle_dir=str(ws["bundle"]), output_dir=str(out), logits_dir=str(ws["inbox"]), review_count=5,
                         return_state=True)
    assert (state.type.value, state.name) == ("COMPLETED", DRIFT_DETECTED_STATE), state.message
    assert state.message.startswith("Drift detected in 1 of 2 batch(es) scored: drifted.")
    result = state.result()
    assert {e["batch"]: e["verdict"] for e in result["scored"]} == {"clean": "ok", "drifted": "drift"}
    runs = {run.name: run.state for run in read_task_runs(state.state_details.flow_run_id) if run.name.startswith("score-")}
    assert (runs["score-drifted"].type.value, runs["score-drifted"].name) == ("COMPLETED", DRIFTED_STATE)
    assert "above the expected" in runs["score-drifted"].message
    assert (runs["score-clean"].type.value, runs["score-clean"].name) == ("COMPLETED", "Completed")

    # Artifacts keyed per pipeline (run by hand: from the output directory), one review queue per batch.
    pipeline = pipeline_key(None, out)
    artifacts = read_artifacts(state.state_details.flow_run_id)
    assert set(artifacts) == {artifact_key(pipeline, kind) for kind in ("scoring-summary", "scoring-report")} | {
        artifact_key(pipeline, REVIEW, batch) for batch in ("clean", "drifted")}
    summary = json.loads(artifacts[artifact_key(pipeline, "scoring-summary")].data)
    assert [row["batch"] for row in summary] == ["drifted", "clean"] and summary[0]["rejection_rate"] == "42.3%"
    queue = json.loads(artifacts[artifact_key(pipeline, REVIEW, "drifted")].data)
    selections = read_selections(out / "drifted.selections.parquet")
    rejected = set(selections.loc[~selections["selected"], "sample_id"])
    assert len(queue) == 5 and {row["sample id"] for row in queue} <= rejected
    assert list(queue[0]) == ["#", "sample id", "prediction", "runner-up", "certainty ratio", "max softmax probability"]
    assert all(row["prediction"].startswith("class-") for row in queue)  # the bundle's class names
    description = artifacts[artifact_key(pipeline, REVIEW, "drifted")].description
    assert "drifted.selections.parquet" in description and "5 of 127 rejected" in description
    report = artifacts[artifact_key(pipeline, "scoring-report")].data
    for needle in ("Drift in 1 of 2", "Deployment: not recorded", "Flow run: ", markdown_text(ws["inbox"] / "drifted.npz"),
                   "Output directory: ", "## Recent runs", "![trend](data:image/png;base64,"):
        assert needle in report, needle

    # The event, read back from the server (persisted a moment later): the drifted batch only.
    events = _wait_for_events(started, state.state_details.flow_run_id)
    assert [event["resource"]["prefect.resource.name"] for event in events] == ["drifted"]
    (event,) = events
    roles = {r["prefect.resource.role"]: r["prefect.resource.id"] for r in event["related"]}
    assert roles["flow-run"] == f"prefect.flow-run.{state.state_details.flow_run_id}"
    assert roles["bundle-version"] == f"seapig.bundle-version.{result['bundle_version']}" and "output-dir" in roles
    assert event["payload"]["rejected"] == 127 and event["payload"]["selections_file"] == str(out / "drifted.selections.parquet")

    # The deployment's thresholds set the verdict: with lenient ones nothing drifts, and the run
    # ends an ordinary Completed even with fail_on_drift; with the defaults it fails.
    lenient = {"rate_margin": 0.5, "ks_statistic": 0.9, "psi": 100.0}
    tolerated = scoring_flow(bundle_dir=str(ws["bundle"]), output_dir=str(tmp_path / "lenient-out"), logits_dir=str(ws["inbox"]),
                             fail_on_drift=True, drift_thresholds=lenient, return_state=True)
    assert (tolerated.type.value, tolerated.name) == ("COMPLETED", "Completed") and tolerated.message == "2 batch(es) scored, no drift."
    assert {e["verdict"] for e in tolerated.result()["scored"]} == {"ok"}
    failing = scoring_flow(bundle_dir=str(ws["bundle"]), output_dir=str(tmp_path / "fail-out"), logits_dir=str(ws["inbox"]),
                           fail_on_drift=True, return_state=True)
    assert (failing.type.value, failing.name) == ("FAILED", DRIFT_DETECTED_STATE) and "drifted" in failing.message
    with pytest.raises(DriftDetected):
        failing.result()


def _wait_for_events(since: float, flow_run_id: Any, timeout: float = 30) -> list[dict[str, Any]]:
    import datetime

    import httpx
    from prefect.settings import PREFECT_API_URL

    body = {"filter": {"event": {"name": [DRIFT_EVENT]},
                       "related": {"id": [f"prefect.flow-run.{flow_run_id}"]},
                       "occurred": {"since": datetime.datetime.fromtimestamp(since - 60, datetime.UTC).isoformat()}},
            "limit": 50}
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json=body, timeout=30)
        response.raise_for_status()
        events = response.json()["events"]
        if events or time.monotonic() > deadline:
            return events
        time.sleep(1)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_the_calibration_flow_logs_the_bundles_diagnostics_as_warnings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 9, item 5: diagnostics stored by the bundle (calibration.diagnostics) reach the run's logs as warnings."""
    import tasks.selection
    from flows.calibration import calibration_flow
    from tests.flows.harness import read_artifacts, read_logs

    logits, labels = _batch(400, 3.0, 0)
    np.savez(tmp_path / "calibration.npz", logits=logits, labels=labels)
    real = tasks.selection.calibrate_file
    diagnostic = {"code": "ties", "severity": "warning",
                  "message": "40% of the held-out scores are tied at the threshold; use the 'energy' score, which separates them."}

    def with_diagnostics(*args, **kwargs):  # until the bundle records its own (the `core` piece)
        result = real(*args, **kwargs)
        return {**result, "calibration": {**result["calibration"], "diagnostics": [diagnostic]}}

    monkeypatch.setattr(tasks.selection, "calibrate_file", with_diagnostics)
    bundle = tmp_path / "bundle"
    state = calibration_flow(bundle_dir=str(bundle), logits_path=str(tmp_path / "calibration.npz"), q=0.9, return_state=True)
    assert state.is_completed(), state.message
    logs = read_logs(state.state_details.flow_run_id)
    assert f"Calibration warning (ties): {diagnostic['message']}" in logs
    # Keyed by the bundle directory when run by hand; the report says what it describes.
    pipeline = pipeline_key(None, bundle)
    artifacts = read_artifacts(state.state_details.flow_run_id)
    assert set(artifacts) == {artifact_key(pipeline, "calibration-summary"), artifact_key(pipeline, "calibration-report")}
    report = artifacts[artifact_key(pipeline, "calibration-report")].data
    assert markdown_text(tmp_path / "calibration.npz") in report and "Flow run: " in report
