"""The Prefect UI shows the scoring report, the verdicts and the review queue: `prefect server start` + headless Chromium.

Starts a real Prefect server on a free localhost port (isolated ``PREFECT_HOME``; the harness of
``tests/flows/live_server.py``), runs the scoring flow by hand against it in a subprocess, then
lets headless Chromium render the UI pages a reviewer opens:

* the run's ``<pipeline>--scoring-report`` markdown artifact: the drift alert, the embedded
  density plots and trend chart, and the review queue, whose rejected sample ids must be in the
  rendered DOM;
* the ``<pipeline>--review--<batch>`` table artifact of a drifted batch: its rejected sample ids
  (the first of the queue, from the selections file) must be in the rendered table;
* the flow run's page, whose final state is "Drift detected";
* the drift alert of a drifted batch (published by the alert flow, run by hand here as the
  automation would run it), linking the scoring run.

Screenshots of the four pages are kept next to the test's temporary files, and copied to
``$SEAPIG_UI_SCREENSHOT`` when set (a directory: every screenshot goes there; a file: the
report's screenshot there, the others beside it). Skipped, saying so, only where Chromium is
not installed.
"""

from __future__ import annotations

import html as html_lib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from seapig_core.pipeline import calibrate_file
from seapig_core.review import review_queue
from seapig_core.selections import read_selections
from tasks.alerts import DRIFT_DETECTED_STATE
from tasks.artifacts import DRIFT_ALERT, REVIEW, SCORING_REPORT, artifact_key, pipeline_key
from tests.flows.live_server import LiveServer, live_prefect_server

pytestmark = [pytest.mark.slow, pytest.mark.browser]

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
]
#: Rows of each review queue (the flow's review_count).
QUEUE_ROWS = 8


@pytest.fixture()
def prefect_ui(tmp_path: Path):
    """A `prefect server start` serving the UI on a free port (tests/flows/live_server.py)."""
    with live_prefect_server(tmp_path / "server", ui=True) as server:
        yield server


def _chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=30000", *extra, url],
        capture_output=True, timeout=180, check=False,
    )


def _dom(url: str, profile: Path) -> str:
    run = _chromium(url, profile, "--dump-dom")
    assert run.returncode == 0, run.stderr.decode("utf-8", "replace")[-2000:]
    return html_lib.unescape(run.stdout.decode("utf-8", "replace"))


def _screenshot(url: str, profile: Path, path: Path, height: int) -> Path:
    shot = _chromium(url, profile, f"--window-size=1400,{height}", f"--screenshot={path}")
    assert shot.returncode == 0 and path.stat().st_size > 10_000, shot.stderr.decode("utf-8", "replace")[-2000:]
    return path


def _keep(screenshots: list[Path]) -> None:
    """Copy the screenshots to $SEAPIG_UI_SCREENSHOT (a directory, or the first one's file path)."""
    target = os.environ.get("SEAPIG_UI_SCREENSHOT")
    if not target:
        return
    where = Path(target)
    if where.is_dir() or target.endswith(os.sep):
        where.mkdir(parents=True, exist_ok=True)
        for shot in screenshots:
            shutil.copy(shot, where / shot.name)
        return
    shutil.copy(screenshots[0], where)
    for shot in screenshots[1:]:
        shutil.copy(shot, where.with_name(f"{where.stem}-{shot.name}"))


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not found: install the Debian package 'chromium' (CI's .ci/run does)")
def test_ui_renders_the_scoring_report_and_the_review_queue(prefect_ui: LiveServer, digits: dict[str, Path], tmp_path: Path) -> None:
    base, env = prefect_ui.url, prefect_ui.env
    bundle, out = tmp_path / "bundle", tmp_path / "out"
    calibrate_file(digits["calibration"], bundle, q=0.95)
    # Score by hand, then publish the first drifted batch's alert as the automation would (the
    # automation itself is tests/flows/test_alerts_live.py's).
    script = (
        "import sys\n"
        "from flows.drift_alert import drift_alert_flow\n"
        "from flows.scoring import scoring_flow\n"
        "from tasks.alerts import _ui_url, drift_event\n"
        "from tasks.artifacts import pipeline_key\n"
        "state = scoring_flow(bundle_dir=sys.argv[1], output_dir=sys.argv[2], logits_dir=sys.argv[3], review_count=int(sys.argv[4]),\n"
        "                     return_state=True)\n"
        "if not state.is_completed():\n"
        "    sys.exit('FAILED ' + str(state.message))\n"
        "run = str(state.state_details.flow_run_id)\n"
        "drifted = [entry for entry in state.result()['scored'] if entry['verdict'] == 'drift']\n"
        "event = drift_event(drifted[0], pipeline=pipeline_key(None, sys.argv[2]), output_dir=sys.argv[2], flow_run_id=run,\n"
        "                    flow_run_url=_ui_url(run), input_file=f\"{sys.argv[3]}/{drifted[0]['batch']}.npz\")\n"
        "alert = drift_alert_flow(drifted[0]['batch'], event['payload'], return_state=True)\n"
        "print(run, alert.state_details.flow_run_id)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(bundle), str(out), str(digits["queries"]), str(QUEUE_ROWS)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    flow_run_id, alert_run_id = run.stdout.strip().splitlines()[-1].split()

    # The rejected samples a reviewer should see first, from the selections files themselves.
    queues = {batch: list(review_queue(read_selections(out / f"{batch}.selections.parquet"), n=QUEUE_ROWS)["sample_id"])
              for batch in ("batch-000", "batch-001", "batch-002")}
    pipeline = pipeline_key(None, out)  # run by hand: keyed by its output directory
    artifacts = {a["key"]: a for a in prefect_ui.read_artifacts(flow_run_id=flow_run_id)}
    summary = json.loads(artifacts[artifact_key(pipeline, "scoring-summary")]["data"])
    drifted = [row["batch"] for row in summary if row["verdict"] == "drift"]
    assert drifted, summary  # the digits query batches mix in noisy and out-of-distribution digits
    screenshots: list[Path] = []

    # 1. The report: alert, densities and trend, the review queues with their sample ids.
    report_url = f"{base}/artifacts/artifact/{artifacts[artifact_key(pipeline, SCORING_REPORT)]['id']}"
    html = _dom(report_url, tmp_path / "chromium-report")
    assert "Query scoring" in html, "the UI did not render the markdown artifact"
    assert "Drift in " in html and "Review queue:" in html and "Recent runs" in html
    images = re.findall(r'<img[^>]*src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}"[^>]*>', html)
    assert sum('alt="density"' in img for img in images) == 3 and sum('alt="trend"' in img for img in images) == 1
    for batch, ids in queues.items():
        assert all(sample_id in html for sample_id in ids), (batch, [i for i in ids if i not in html])
    screenshots.append(_screenshot(report_url, tmp_path / "chromium-report-shot", tmp_path / "scoring-report.png", 2400))

    # 2. The review-queue table of a drifted batch: its rejected sample ids, most uncertain first.
    batch = drifted[0]
    queue_url = f"{base}/artifacts/artifact/{artifacts[artifact_key(pipeline, REVIEW, batch)]['id']}"
    html = _dom(queue_url, tmp_path / "chromium-queue")
    assert all(sample_id in html for sample_id in queues[batch]), [i for i in queues[batch] if i not in html]
    assert "certainty ratio" in html and "runner-up" in html and "max softmax probability" in html
    screenshots.append(_screenshot(queue_url, tmp_path / "chromium-queue-shot", tmp_path / f"review-{batch}.png", 1100))

    # 3. The flow run's page: the final state says drift.
    run_url = f"{base}/runs/flow-run/{flow_run_id}"
    screenshots.append(_screenshot(run_url, tmp_path / "chromium-run-shot", tmp_path / "flow-run.png", 1100))
    assert prefect_ui.flow_run(flow_run_id)["state"]["name"] == DRIFT_DETECTED_STATE

    # 4. The drift alert a person finds in the alert run: batch, reasons, numbers, a link to the scoring run.
    (alert,) = prefect_ui.read_artifacts(flow_run_id=alert_run_id)
    assert alert["key"] == artifact_key(pipeline, DRIFT_ALERT) and f"]({run_url})" in alert["data"]
    alert_url = f"{base}/artifacts/artifact/{alert['id']}"
    screenshots.append(_screenshot(alert_url, tmp_path / "chromium-alert-shot", tmp_path / "drift-alert.png", 1300))
    _keep(screenshots)
