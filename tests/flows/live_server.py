"""A real Prefect server, work pool, deployments and worker for end-to-end tests.

Prefect's in-process test harness (``tests/flows/harness.py``) runs flows against a temporary
server but has no scheduler loop, no work pool and no worker, so it cannot show what operators
see: whether the server's scheduler creates runs for a deployment, whether a worker runs them,
whether a deployment's concurrency limit is enforced, which events and artifacts a run leaves.
This module starts the real thing, as the README tells an operator to:

* ``prefect server start`` on a free localhost port, with a private ``PREFECT_HOME`` (its own
  SQLite database), analytics off and ``PREFECT_SERVER_UI_API_URL`` set; the scheduler loop
  interval is shortened (``PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS``) so that a test does
  not wait a minute for it;
* ``prefect work-pool create``, ``prefect --no-prompt deploy --all`` and
  ``prefect worker start`` as subprocesses of the same interpreter, from a temporary copy of the
  project (``prefect.yaml``, ``flows/``, ``tasks/``) so that the deployments' relative
  ``demo_output/...`` paths land in the temporary directory, never in the checkout; the
  library itself is imported from this checkout (``PYTHONPATH``);
* reads through the REST API (``httpx``): deployments, flow runs, events (paged, 50 a page),
  artifacts.

Every wait is a bounded poll; a timeout or an unexpected terminal state fails the test with the
tail of the server's and the workers' logs. No ``PREFECT_*`` variable of the calling environment
reaches the subprocesses (a user's profile or API URL never leaks in). Everything is stopped
(process groups included: the worker's flow-run processes) when the context exits.

Typical use::

    with live_prefect_server(tmp_path) as server:
        project = copy_project(tmp_path / "project")
        server.create_work_pool("seapig-process")
        server.deploy_all(project)
        server.start_worker("seapig-process", cwd=project)
        run = server.run_deployment("calibration/digits-calibration")
        server.wait_for_flow_run(run["id"], timeout=120)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
PROJECT_FILES = ("prefect.yaml", "flows", "tasks")
TERMINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})
LOG_TAIL = 4000
# What Prefect's own client retries (prefect/client/base.py, PrefectHttpxSyncClient.send): these
# statuses and transport errors, for every method.
RETRYABLE_STATUS = frozenset({408, 429, 502, 503})
RETRYABLE_ERRORS = (
    httpx.TimeoutException,  # read, pool, connect and write timeouts
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
    httpx.LocalProtocolError,
    httpx.ConnectError,  # only after start-up: the server answered /api/health before
)
RETRIES = 5
REQUEST_TIMEOUT = 60

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def copy_project(destination: Path, files: Sequence[str] = PROJECT_FILES) -> Path:
    """Copy the deployable part of the checkout (``prefect.yaml``, ``flows/``, ``tasks/``) to ``destination``.

    ``prefect deploy`` run there records ``destination`` as the flow runs' working directory, so
    relative output paths of ``prefect.yaml`` resolve inside it.
    """
    destination.mkdir(parents=True, exist_ok=True)
    for name in files:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, destination / name)
    return destination


def _tail(path: Path, limit: int = LOG_TAIL) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError as error:
        return f"<cannot read {path}: {error}>"


def _stop_group(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group of ``process`` (started with a new session), then SIGKILL it."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    # Children (a worker's flow-run processes) may outlive their parent: kill what is left.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout)


@dataclass
class _Process:
    name: str
    process: subprocess.Popen
    log_path: Path


@dataclass
class LiveServer:
    """A running ``prefect server start`` and the workers started against it.

    Attributes
    ----------
    url : str
        The server's base URL (``http://127.0.0.1:<port>``); the UI is served there.
    api_url : str
        ``url + "/api"``, what clients use as ``PREFECT_API_URL``.
    home : pathlib.Path
        The private ``PREFECT_HOME`` (database, profiles, local result storage).
    env : dict
        The environment of every subprocess (server, CLI, workers): the caller's environment
        without any ``PREFECT_*`` variable, plus the server's settings.
    root : pathlib.Path
        The directory holding ``home`` and the logs.
    """

    url: str
    api_url: str
    home: Path
    env: dict[str, str]
    root: Path
    server: _Process
    workers: list[_Process] = field(default_factory=list)
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=REQUEST_TIMEOUT))

    # -- logs and failures -------------------------------------------------------------------

    def logs_tail(self, limit: int = LOG_TAIL) -> str:
        """The last ``limit`` characters of the server's and every worker's log."""
        parts = [f"--- {p.name} log ({p.log_path}) ---\n{_tail(p.log_path, limit)}" for p in (self.server, *self.workers)]
        return "\n".join(parts)

    def fail(self, message: str) -> None:
        """Fail the test with ``message`` and the tail of the server's and workers' logs."""
        pytest.fail(f"{message}\n{self.logs_tail()}", pytrace=False)

    def wait_for(self, what: str, probe: Callable[[], T | None], timeout: float, interval: float = 1.0) -> T:
        """Poll ``probe()`` until it returns something other than None/False; fail after ``timeout`` s.

        ``what`` describes the awaited condition for the failure message. A server or worker that
        exits meanwhile fails at once.
        """
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            last = probe()
            if last is not None and last is not False:
                return last
            for proc in (self.server, *self.workers):
                if proc.process.poll() is not None:
                    self.fail(f"waiting for {what}: the {proc.name} exited with code {proc.process.returncode}")
            if time.monotonic() > deadline:
                self.fail(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(interval)

    # -- REST API -----------------------------------------------------------------------------

    def request(self, method: str, path: str, *, json: Any = None, expect: Sequence[int] = (200, 201, 204)) -> Any:
        """Call the REST API (``path`` relative to ``/api``); fail on an unexpected status."""
        url = path if path.startswith("http") else f"{self.api_url}/{path.lstrip('/')}"
        # Retry what Prefect's own client retries, as its workers and CLI do against this server. A
        # busy host makes SQLite time out now and then: the server answers 503 ("Service
        # Unavailable") for such retryable database errors, after rolling the request back, or
        # a request waits on the database lock past the client's timeout (seen in CI).
        for attempt in range(RETRIES + 1):
            try:
                response = self.http.request(method, url, json=json)
            except RETRYABLE_ERRORS as error:
                if attempt == RETRIES:
                    self.fail(f"{method} {url} failed {RETRIES + 1} times; the last time: {error!r}")
                print(f"retrying {method} {url} after {error!r}", file=sys.stderr)  # shown if the test fails
                time.sleep(min(2.0**attempt, 10.0))
                continue
            if response.status_code not in RETRYABLE_STATUS or attempt == RETRIES:
                break
            print(f"retrying {method} {url} after status {response.status_code}", file=sys.stderr)
            time.sleep(min(2.0**attempt, 10.0))
        if response.status_code not in expect:
            self.fail(f"{method} {url} answered {response.status_code}: {response.text[:2000]}")
        return response.json() if response.content else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, json: Any = None) -> Any:
        return self.request("POST", path, json=json)

    def deployment(self, name: str) -> dict[str, Any]:
        """The deployment ``"<flow name>/<deployment name>"`` as the API returns it (schedules included)."""
        return self.get(f"deployments/name/{name}")

    def flow_run(self, flow_run_id: str) -> dict[str, Any]:
        return self.get(f"flow_runs/{flow_run_id}")

    def flow_runs(self, flow_runs: Mapping[str, Any] | None = None, *, limit: int = 200) -> list[dict[str, Any]]:
        """Flow runs matching a ``FlowRunFilter`` (as JSON, e.g. ``{"deployment_id": {"any_": [id]}}``)."""
        return self.post("flow_runs/filter", {"flow_runs": dict(flow_runs or {}), "limit": limit, "sort": "EXPECTED_START_TIME_ASC"})

    def run_deployment(self, name: str, parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Create a flow run of deployment ``name`` now (as ``prefect deployment run`` does); returns the run."""
        deployment = self.deployment(name)
        body: dict[str, Any] = {"state": {"type": "SCHEDULED", "message": "created by the test"}}
        if parameters:
            body["parameters"] = dict(parameters)
        return self.post(f"deployments/{deployment['id']}/create_flow_run", body)

    def wait_for_flow_run(self, flow_run_id: str, states: Sequence[str] = ("COMPLETED",), timeout: float = 120) -> dict[str, Any]:
        """Poll flow run ``flow_run_id`` until its state type is one of ``states``; return the run.

        A terminal state that is not awaited fails at once, with the run's state message.
        """
        wanted = {s.upper() for s in states}

        def probe() -> dict[str, Any] | None:
            run = self.flow_run(flow_run_id)
            state = run.get("state") or {}
            if state.get("type") in wanted:
                return run
            if state.get("type") in TERMINAL_STATES:
                self.fail(
                    f"flow run {run.get('name')} ({flow_run_id}) ended {state.get('type')} "
                    f"({state.get('name')}): {state.get('message')}; awaited {sorted(wanted)}"
                )
            return None

        return self.wait_for(f"flow run {flow_run_id} to reach {sorted(wanted)}", probe, timeout)

    def read_events(self, event_filter: Mapping[str, Any] | None = None, *, max_events: int = 10_000) -> list[dict[str, Any]]:
        """Events matching an ``EventFilter`` (as JSON), following ``next_page`` links (50 per page).

        Each event once: the server pages by offset over events ordered by ``occurred`` alone, so
        an event persisted meanwhile with an earlier ``occurred`` (events arrive in batches, from
        several processes) shifts the later pages by one and the next page repeats an event of
        the previous one (seen in CI: 150 read, 147 distinct). An insertion never skips one.
        """
        page = self.post("events/filter", {"filter": dict(event_filter or {}), "limit": 50})
        total, read = page["total"], len(page["events"])
        events = {event["id"]: event for event in page["events"]}
        while page.get("next_page") and len(events) < max_events:
            page = self.get(page["next_page"])
            read += len(page["events"])
            events.update((event["id"], event) for event in page["events"])
        if read < min(total, max_events):  # the filter's `until` defaults to the first request's time
            self.fail(f"read {read} events through next_page links, the server counted {total}")
        return list(events.values())

    def read_artifacts(self, *, flow_run_id: str | None = None, key: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """Artifacts of a flow run and/or with a key, newest first."""
        artifacts: dict[str, Any] = {}
        if flow_run_id is not None:
            artifacts["flow_run_id"] = {"any_": [str(flow_run_id)]}
        if key is not None:
            artifacts["key"] = {"any_": [key]}
        return self.post("artifacts/filter", {"artifacts": artifacts, "limit": limit, "sort": "CREATED_DESC"})

    # -- CLI and workers -------------------------------------------------------------------------

    def cli(self, *args: str, cwd: Path | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
        """Run ``python -m prefect <args>`` against this server; fail with its output if it fails."""
        command = [sys.executable, "-m", "prefect", *args]
        try:
            result = subprocess.run(
                command, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout, check=False,
            )
        except subprocess.TimeoutExpired as error:
            self.fail(f"`prefect {' '.join(args)}` did not finish in {timeout:.0f} s: {error.output!r}")
        if result.returncode != 0:
            self.fail(
                f"`prefect {' '.join(args)}` exited with {result.returncode}\n"
                f"stdout:\n{result.stdout[-LOG_TAIL:]}\nstderr:\n{result.stderr[-LOG_TAIL:]}"
            )
        return result

    def create_work_pool(self, name: str, pool_type: str = "process") -> dict[str, Any]:
        """``prefect work-pool create <name> --type <pool_type>``; returns the pool read back."""
        self.cli("work-pool", "create", name, "--type", pool_type)
        return self.get(f"work_pools/{name}")

    def deploy_all(self, project: Path, timeout: float = 240) -> subprocess.CompletedProcess:
        """``prefect --no-prompt deploy --all`` from ``project`` (its ``prefect.yaml``)."""
        return self.cli("--no-prompt", "deploy", "--all", cwd=project, timeout=timeout)

    def start_worker(
        self, pool: str, *, cwd: Path, name: str | None = None, query_seconds: float = 1, wait: bool = True,
    ) -> subprocess.Popen:
        """Start ``prefect worker start --pool <pool>`` in ``cwd``; with ``wait``, until the server lists it.

        It polls for work every ``query_seconds`` seconds and runs flow runs as subprocesses of
        this interpreter. Stopped (with its flow-run processes) when the server's context exits.
        """
        name = name or f"test-worker-{len(self.workers)}"
        env = {**self.env, "PREFECT_WORKER_QUERY_SECONDS": str(query_seconds)}
        log_path = self.root / f"{name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--name", name],
                cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.workers.append(_Process(f"worker {name}", process, log_path))

        def registered() -> bool:
            workers = self.post(f"work_pools/{pool}/workers/filter", {"limit": 50})
            return any(w["name"] == name for w in workers)

        if wait:
            self.wait_for(f"worker {name} to register with pool {pool}", registered, timeout=120)
        return process


def _prefect_free_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}


@contextlib.contextmanager
def live_prefect_server(
    root: Path,
    *,
    scheduler_loop_seconds: float = 2,
    ui: bool = False,
    settings: Mapping[str, str] | None = None,
    startup_timeout: float = 120,
) -> Iterator[LiveServer]:
    """Start ``prefect server start`` under ``root`` (private ``PREFECT_HOME``); yield a :class:`LiveServer`.

    Parameters
    ----------
    root : pathlib.Path
        Directory for ``PREFECT_HOME`` (``root/prefect-home``) and the logs.
    scheduler_loop_seconds : float
        The scheduler service's loop interval (Prefect's default is 60 s).
    ui : bool
        Serve the UI too (slower start-up).
    settings : mapping, optional
        More ``PREFECT_*`` settings for the server and every client (they win over the defaults
        set here).
    startup_timeout : float
        Seconds to wait for ``/api/health``.
    """
    root.mkdir(parents=True, exist_ok=True)
    home = root / "prefect-home"
    python_path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    for attempt in range(3):  # a free port can be taken between probing and binding it
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            **_prefect_free_environment(),
            "PYTHONPATH": python_path,  # seapig_core from this checkout, in every subprocess
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": f"{url}/api",
            "PREFECT_SERVER_UI_API_URL": f"{url}/api",  # the UI's API on a non-default port
            "PREFECT_SERVER_UI_ENABLED": "true" if ui else "false",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": str(scheduler_loop_seconds),
            "PREFECT_SERVER_LOG_RETRYABLE_ERRORS": "true",  # a 503's cause goes into the server log
            **dict(settings or {}),
        }
        log_path = root / f"server-{attempt}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        server = LiveServer(url=url, api_url=f"{url}/api", home=home, env=env, root=root,
                            server=_Process("server", process, log_path))
        deadline = time.monotonic() + startup_timeout
        healthy = False
        while process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if server.http.get(f"{url}/api/health", timeout=2).status_code == 200:
                    healthy = True
                    break
            time.sleep(0.5)
        if healthy:
            break
        _stop_group(process)
        server.http.close()
        if "address already in use" not in _tail(log_path).lower() or attempt == 2:
            pytest.fail(f"prefect server did not start in {startup_timeout:.0f} s:\n{_tail(log_path)}", pytrace=False)
    try:
        yield server
    finally:
        for worker in server.workers:
            _stop_group(worker.process)
        _stop_group(server.server.process)
        server.http.close()
