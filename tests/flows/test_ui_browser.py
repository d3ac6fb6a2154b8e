"""The Prefect UI shows the scoring run's density plot: `prefect server start` + headless Chromium.

Starts a real Prefect server on a free localhost port (isolated ``PREFECT_HOME``; the harness of
``tests/flows/live_server.py``), runs the scoring flow against it in a subprocess, then lets
headless Chromium render the UI page of the run's ``scoring-report`` markdown artifact and looks
for the embedded density image in the rendered DOM. A screenshot of the page is kept next to the test's temporary files (and copied to
``$SEAPIG_UI_SCREENSHOT`` when set). Skipped, saying so, only where Chromium is not installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from seapig_core.pipeline import calibrate_file
from tests.flows.live_server import LiveServer, live_prefect_server

pytestmark = [pytest.mark.slow, pytest.mark.browser]

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
]


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


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not found: install the Debian package 'chromium' (CI's .ci/run does)")
def test_ui_renders_the_scoring_density_plot(prefect_ui: LiveServer, digits: dict[str, Path], tmp_path: Path) -> None:
    base, env = prefect_ui.url, prefect_ui.env
    bundle = tmp_path / "bundle"
    calibrate_file(digits["calibration"], bundle, q=0.95)
    script = (
        "import sys\n"
        "from flows.scoring import scoring_flow\n"
        "state = scoring_flow(bundle_dir=sys.argv[1], output_dir=sys.argv[2], logits_dir=sys.argv[3], return_state=True)\n"
        "print(state.state_details.flow_run_id if state.is_completed() else 'FAILED ' + str(state.message))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(bundle), str(tmp_path / "out"), str(digits["queries"])],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    flow_run_id = run.stdout.strip().splitlines()[-1]
    assert not flow_run_id.startswith("FAILED"), flow_run_id

    (artifact,) = prefect_ui.read_artifacts(flow_run_id=flow_run_id, key="scoring-report")
    url = f"{base}/artifacts/artifact/{artifact['id']}"

    dom = _chromium(url, tmp_path / "chromium-dom", "--dump-dom")
    html = dom.stdout.decode("utf-8", "replace")
    assert dom.returncode == 0, dom.stderr.decode("utf-8", "replace")[-2000:]
    assert "Query scoring" in html, "the UI did not render the markdown artifact"
    images = re.findall(r'<img[^>]*src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}"[^>]*>', html)
    assert len(images) == 3 and all('alt="density"' in img for img in images)

    screenshot = tmp_path / "scoring-report.png"
    shot = _chromium(url, tmp_path / "chromium-shot", "--window-size=1400,1800", f"--screenshot={screenshot}")
    assert shot.returncode == 0 and screenshot.stat().st_size > 10_000
    if os.environ.get("SEAPIG_UI_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["SEAPIG_UI_SCREENSHOT"])
