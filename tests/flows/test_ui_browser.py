"""The Prefect UI shows the scoring run's density plot: `prefect server start` + headless Chromium.

Starts a real Prefect server on a free localhost port (isolated ``PREFECT_HOME``), runs the
scoring flow against it in a subprocess, then lets headless Chromium render the UI page of the
run's ``scoring-report`` markdown artifact and looks for the embedded density image in the
rendered DOM. A screenshot of the page is kept next to the test's temporary files (and copied to
``$SEAPIG_UI_SCREENSHOT`` when set). Skipped, saying so, only where Chromium is not installed.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from seapig_core.pipeline import calibrate_file

pytestmark = [pytest.mark.slow, pytest.mark.browser]

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def prefect_ui(tmp_path: Path):
    """A `prefect server start` on a free port; yields (base URL, environment for clients)."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"{base}/api",
        "PREFECT_SERVER_UI_API_URL": f"{base}/api",  # the UI's API on a non-default port
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not start:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield base, env
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def _chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=30000", *extra, url],
        capture_output=True, timeout=180, check=False,
    )


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not found: install the Debian package 'chromium' (CI's .ci/run does)")
def test_ui_renders_the_scoring_density_plot(prefect_ui, digits: dict[str, Path], tmp_path: Path) -> None:
    base, env = prefect_ui
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

    response = httpx.post(
        f"{base}/api/artifacts/filter",
        json={"artifacts": {"key": {"any_": ["scoring-report"]}, "flow_run_id": {"any_": [flow_run_id]}},
              "limit": 1, "offset": 0, "sort": "CREATED_DESC"},
        timeout=10,
    )
    response.raise_for_status()
    (artifact,) = response.json()
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
