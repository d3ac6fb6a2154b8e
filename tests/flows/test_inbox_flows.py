"""Exactly-once inbox scoring, one bundle version per run, and the bundle as the calibration cache, on a real Prefect server.

Issue 8 items 2 and 3 (pipeline side) and its "Why": overlapping runs in separate processes score
each file once; a re-run with nothing new writes nothing; changed files are rescored; failed
batches are retried; the archive; a calibration during a run does not mix versions; a re-run of
the calibration is served by the bundle from the second run, and a broken bundle is refitted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from flows.calibration import calibration_flow
from flows.scoring import scoring_flow
from seapig_core import inbox as inbox_module
from seapig_core.bundle import bundle_versions, load_bundle
from seapig_core.ledger import LEDGER_NAME, Ledger
from seapig_core.pipeline import calibrate_file
from seapig_core.selections import read_selections
from tasks.artifacts import artifact_kind
from tests.flows.harness import DIGITS, read_artifacts, read_logs, read_task_runs

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small labelled calibration file (10 classes)."""
    root = tmp_path_factory.mktemp("inbox-flows")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 400)
    logits = rng.normal(size=(400, 10)).astype(np.float32)
    logits[np.arange(400), labels] += 3.0
    np.savez(root / "cal.npz", logits=logits, labels=labels)
    return root / "cal.npz"


@pytest.fixture()
def bundle(calibration: Path, tmp_path: Path) -> dict:
    return calibrate_file(calibration, tmp_path / "bundle", scores=["softmax", "energy"], q=0.9)


def _inbox(directory: Path, names: list[str], seed: int = 1) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        np.save(directory / f"{name}.npy", rng.normal(size=(16, 10)).astype(np.float32))


def _stats(directory: Path) -> dict[str, tuple[int, int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size) for p in directory.iterdir()}


def _score_runs(state) -> list[str]:
    return sorted(run.name for run in read_task_runs(state.state_details.flow_run_id) if run.name.startswith("score-"))


# ----------------------------------------------------------------------------- overlapping runs

_RUNNER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path

    bundle, inbox, out, counter, me, other = sys.argv[1:7]
    import seapig_core.pipeline as pipeline
    import tasks.inbox

    real_writer, real_plan = pipeline.SelectionsWriter, tasks.inbox.plan_scoring

    def wait_for(path):
        deadline = time.time() + 60
        while not Path(path).exists() and time.time() < deadline:
            time.sleep(0.01)

    class CountingWriter(real_writer):
        def __enter__(self):
            wait_for(other + ".planned")  # the run that claimed writes only once the other run has planned
            with open(counter, "a") as handle:
                handle.write(f"{os.getpid()} {self.path.name}\\n")
            return super().__enter__()

    def signalling_plan(*args, **kwargs):
        plan = real_plan(*args, **kwargs)
        Path(me + ".planned").touch()
        return plan

    pipeline.SelectionsWriter, tasks.inbox.plan_scoring = CountingWriter, signalling_plan
    from flows.scoring import scoring_flow

    Path(me + ".ready").touch()
    wait_for(Path(me).parent / "go")
    start = time.time()
    state = scoring_flow(bundle_dir=bundle, output_dir=out, logits_dir=inbox, return_state=True)
    result = state.result(raise_on_failure=False)
    print(json.dumps({"state": state.type.value, "message": state.message, "start": start, "end": time.time(),
                      "scored": [e["batch"] for e in result["scored"]] if isinstance(result, dict) else None,
                      "busy": result["busy"] if isinstance(result, dict) else None}))
    """
)


def test_two_overlapping_runs_in_separate_processes_score_each_file_exactly_once(bundle: dict, tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    names = [f"batch-{i:02d}" for i in range(12)]
    inbox, out, counter = tmp_path / "inbox", tmp_path / "out", tmp_path / "writes.log"
    _inbox(inbox, names)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_API_URL=str(PREFECT_API_URL.value()), PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(REPO),
        PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING", OMP_NUM_THREADS="1",
    )
    signals = [str(tmp_path / "run-a"), str(tmp_path / "run-b")]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RUNNER, bundle["bundle_dir"], str(inbox), str(out), str(counter), me, other],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for me, other in (signals, signals[::-1])
    ]
    try:
        import time

        deadline = time.time() + 180
        while not all(Path(s + ".ready").exists() for s in signals) and time.time() < deadline:
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.05)
        (tmp_path / "go").touch()  # both start their flow run at once
        outputs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    runs = []
    for proc, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
        runs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert [run["state"] for run in runs] == ["COMPLETED", "COMPLETED"], runs
    assert runs[0]["start"] < runs[1]["end"] and runs[1]["start"] < runs[0]["end"]  # they overlapped
    # One run claimed everything; the other found every batch claimed by a live run and left it.
    scorer, other = sorted(runs, key=lambda run: -len(run["scored"]))
    assert sorted(scorer["scored"]) == names and other["scored"] == [] and other["busy"] == names

    writes = [line.split()[1] for line in counter.read_text().splitlines()]
    assert sorted(writes) == [f"{name}.selections.parquet" for name in names]  # each written exactly once
    entries = Ledger(out).entries()
    assert sorted(e.batch for e in entries) == names
    assert {(e.state, e.bundle_version) for e in entries} == {("done", bundle["version"])}
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted(writes)


# ----------------------------------------------------------------------------- one inbox over time


def test_nothing_new_writes_nothing_and_a_changed_file_is_rescored(bundle: dict, tmp_path: Path) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    _inbox(inbox, ["batch-00", "batch-01", "batch-02"])
    first = scoring_flow(bundle_dir=bundle["bundle_dir"], output_dir=str(out), logits_dir=str(inbox), return_state=True)
    assert _score_runs(first) == ["score-batch-00", "score-batch-01", "score-batch-02"]
    assert {"scoring-summary", "scoring-report"} <= {artifact_kind(k) for k in read_artifacts(first.state_details.flow_run_id)}
    before = _stats(out)
    assert LEDGER_NAME in before

    again = scoring_flow(bundle_dir=bundle["bundle_dir"], output_dir=str(out), logits_dir=str(inbox), return_state=True)
    assert again.is_completed() and _score_runs(again) == []
    assert _stats(out) == before  # no selections file touched, not even the ledger
    assert read_artifacts(again.state_details.flow_run_id) == {}  # no artifact churn
    assert "Nothing new: 0 batch(es) to score" in "\n".join(read_logs(again.state_details.flow_run_id))
    result = again.result()
    assert result["scored"] == [] and sorted(result["selections"]) == ["batch-00", "batch-01", "batch-02"]

    np.save(inbox / "batch-01.npy", np.zeros((5, 10), dtype=np.float32))  # changed content
    changed = scoring_flow(bundle_dir=bundle["bundle_dir"], output_dir=str(out), logits_dir=str(inbox), return_state=True)
    assert _score_runs(changed) == ["score-batch-01"]
    after = _stats(out)
    assert after["batch-01.selections.parquet"][0] != before["batch-01.selections.parquet"][0]  # rewritten
    assert {k: v for k, v in after.items() if k.startswith(("batch-00", "batch-02"))} == {
        k: v for k, v in before.items() if k.startswith(("batch-00", "batch-02"))
    }
    assert len(read_selections(out / "batch-01.selections.parquet")) == 5


def test_archive_refused_files_and_a_retried_batch(bundle: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inbox, out, archive = tmp_path / "inbox", tmp_path / "out", tmp_path / "archive"
    _inbox(inbox, ["a", "b", "c"])
    (tmp_path / "secret.npy").write_bytes((inbox / "a.npy").read_bytes())
    os.symlink(tmp_path / "secret.npy", inbox / "link.npy")  # outside the inbox: refused
    real = inbox_module.score_file

    def flaky(bundle_path, logits_path, output_dir, batch, **kwargs):
        if batch == "b":
            raise OSError(5, "Input/output error")
        return real(bundle_path, logits_path, output_dir, batch, **kwargs)

    monkeypatch.setattr(inbox_module, "score_file", flaky)
    state = scoring_flow(
        bundle_dir=bundle["bundle_dir"], output_dir=str(out), logits_dir=str(inbox), archive_dir=str(archive), return_state=True
    )
    assert state.is_failed()
    assert "b: " in state.message and "Input/output error" in state.message and "'link.npy'" in state.message
    assert "outside" in state.message and "will be retried by the next run" in state.message
    assert sorted(p.name for p in archive.iterdir()) == ["a.npy", "c.npy"]  # scored and archived
    assert sorted(p.name for p in inbox.iterdir()) == ["b.npy", "link.npy"]  # nothing lost
    entries = {e.batch: e for e in Ledger(out).entries()}
    assert entries["b"].state == "failed" and entries["a"].state == "done"
    assert "scoring-report" in {artifact_kind(k) for k in read_artifacts(state.state_details.flow_run_id)}  # the others are still reported

    monkeypatch.undo()
    os.unlink(inbox / "link.npy")
    retried = scoring_flow(bundle_dir=bundle["bundle_dir"], output_dir=str(out), logits_dir=str(inbox), archive_dir=str(archive))
    assert [e["batch"] for e in retried["scored"]] == ["b"] and retried["scored"][0]["archived_path"] == str(archive / "b.npy")
    assert list(inbox.iterdir()) == [] and sorted(p.name for p in archive.iterdir()) == ["a.npy", "b.npy", "c.npy"]
    with Ledger(out)._connect() as db:  # the ledger records where each input went
        rows = dict(db.execute("SELECT batch, archived_path FROM batches").fetchall())
    assert rows == {name: str(archive / f"{name}.npy") for name in ("a", "b", "c")}
    drained = scoring_flow(bundle_dir=bundle["bundle_dir"], output_dir=str(out), logits_dir=str(inbox), archive_dir=str(archive))
    assert drained["scored"] == []  # an empty inbox is nothing new, not an error


# ----------------------------------------------------------------------------- one bundle version per run


def test_a_calibration_during_a_run_does_not_change_the_version_it_scores_with(
    bundle: dict, calibration: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    names = [f"batch-{i}" for i in range(6)]
    _inbox(inbox, names)
    real = inbox_module.score_file
    recalibrated: dict = {}
    once = threading.Lock()  # the batches are scored on several threads

    def recalibrate_first(bundle_path, logits_path, output_dir, batch, **kwargs):
        with once:
            if not recalibrated:  # a calibration finishes while the run is in flight
                recalibrated.update(calibrate_file(calibration, bundle["bundle_dir"], scores=["softmax", "energy"], q=0.5))
        return real(bundle_path, logits_path, output_dir, batch, **kwargs)

    monkeypatch.setattr(inbox_module, "score_file", recalibrate_first)
    result = scoring_flow(bundle_dir=bundle["bundle_dir"], output_dir=str(out), logits_dir=str(inbox))
    assert load_bundle(bundle["bundle_dir"]).version == recalibrated["version"] != bundle["version"]
    assert recalibrated["threshold"] != bundle["threshold"]
    assert result["bundle_version"] == bundle["version"]  # resolved once, at the start
    metas = [read_selections(out / f"{name}.selections.parquet").attrs["seapig_core"] for name in names]
    recorded = {(m["bundle_version"], m["bundle_manifest_sha256"], m["threshold"], m["temperature"], m["bundle_dir"]) for m in metas}
    assert recorded == {(bundle["version"], bundle["manifest_sha256"], bundle["threshold"], bundle["temperature"],
                         str(Path(bundle["bundle_dir"]).resolve()))}
    for name in names:  # and the rows were selected with that threshold
        table = read_selections(out / f"{name}.selections.parquet")
        assert (table["selected"] == (table["score"] < bundle["threshold"])).all()
    assert {e.bundle_version for e in Ledger(out).entries()} == {bundle["version"]}

    # The new version rescores the inbox only when asked to.
    assert scoring_flow(bundle_dir=bundle["bundle_dir"], output_dir=str(out), logits_dir=str(inbox))["scored"] == []
    rescored = scoring_flow(bundle_dir=bundle["bundle_dir"], output_dir=str(out), logits_dir=str(inbox), rescore_on_new_bundle=True)
    assert len(rescored["scored"]) == 6 and rescored["bundle_version"] == recalibrated["version"]
    assert {read_selections(out / f"{n}.selections.parquet").attrs["seapig_core"]["threshold"] for n in names} == {
        recalibrated["threshold"]
    }


# ----------------------------------------------------------------------------- calibration


def test_calibration_settings_reuse_from_the_second_run_and_repair(calibration: Path, tmp_path: Path) -> None:
    root = tmp_path / "bundle"
    parameters = {
        "bundle_dir": str(root), "logits_path": str(calibration), "scores": ["softmax", "energy"], "q": 0.9,
        "n_bins": 10, "risk_method": "sgr", "class_names": [f"c{i}" for i in range(10)], "keep_previous": 0,
    }
    first = calibration_flow(**parameters)
    second = calibration_flow(**parameters)
    assert (first["reused"], second["reused"]) == (False, True)  # served from the second run on
    assert second["version"] == first["version"] and bundle_versions(root) == [first["version"]]
    loaded = load_bundle(root)
    assert loaded.settings.n_bins == 10 and loaded.class_names == tuple(f"c{i}" for i in range(10))

    damaged = Path(first["version_path"]) / "energy.arrow"
    damaged.write_bytes(damaged.read_bytes()[:-16])
    repaired = calibration_flow(**parameters)
    assert not repaired["reused"] and repaired["version"] != first["version"]
    assert load_bundle(root).version == repaired["version"]
    assert bundle_versions(root) == [repaired["version"]]  # keep_previous=0 reached the bundle


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"q": 1.5}, "The 'q' parameter must be in (0, 1). Got 1.5"),
        ({"risk_method": "magic"}, "The 'risk_method' parameter must be one of"),
        ({"keep_previous": -1}, "The 'keep_previous' parameter must be a non-negative integer"),
    ],
)
def test_bad_calibration_settings_fail_before_any_work(parameters: dict, message: str, tmp_path: Path) -> None:
    state = calibration_flow(
        bundle_dir=str(tmp_path / "bundle"), model=f"{DIGITS}:digits_model", data=f"{DIGITS}:digits_loader",
        store_dir=str(tmp_path / "logits"), return_state=True, **parameters,
    )
    assert state.is_failed() and message in state.message
    assert read_task_runs(state.state_details.flow_run_id) == []  # no extraction, no fit
    assert not (tmp_path / "logits").exists() and not (tmp_path / "bundle").exists()


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"model": f"{DIGITS}:digits_model", "data": f"{DIGITS}:query_loaders", "archive_dir": "archive"}, "'archive_dir' parameter"),
        ({"logits_dir": "SAME", "output_dir": "SAME"}, "'output_dir' parameter must be another directory than the inbox"),
    ],
)
def test_bad_scoring_parameters_fail_before_any_scoring(bundle: dict, parameters: dict, message: str, tmp_path: Path) -> None:
    resolved = {k: str(tmp_path / v) if k in ("logits_dir", "output_dir", "archive_dir") else v for k, v in parameters.items()}
    resolved.setdefault("output_dir", str(tmp_path / "out"))
    state = scoring_flow(bundle_dir=bundle["bundle_dir"], return_state=True, **resolved)
    assert state.is_failed() and message in state.message
    assert not [run for run in read_task_runs(state.state_details.flow_run_id) if run.name.startswith(("score-", "extract"))]
