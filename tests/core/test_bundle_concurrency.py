"""Bundles under real concurrency: processes that save, load, calibrate and get killed (issue 8 item 2).

- Two processes save different bundles to one directory in a tight loop while a third loads
  continuously: every load succeeds and is one consistent version, and the pointer ends on a
  complete version (the first wave lost every score file in 4 of 25 rounds).
- ``kill -9`` of a saving process, at fixed points of a save and at random times: the bundle
  stays loadable, and the next save removes the dead writer's temporaries.
- A process recalibrates (alternating two thresholds) while another loads and scores: the
  identity (version, manifest SHA-256) and the thresholds it records and applies always agree
  with what the calibration wrote for that version.

This file is also the worker script (``python test_bundle_concurrency.py <mode> ...``): one
worker process per test imports the library once and forks the concurrent processes (real
processes with their own file descriptions and locks), which keeps the tests affordable on a
busy two-core machine. The parent sets one torch thread before any work, so forking is safe.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 240.0


# ----------------------------------------------------------------------------- worker side


def _fitted(name: str, n: int = 400, k: int = 5, labelled: bool = True, **settings):  # type: ignore[no-untyped-def]
    import torch

    from seapig_core.bundle import fit_selector

    g = torch.Generator().manual_seed(sum(map(ord, name)))
    labels = torch.randint(0, k, (n,), generator=g)
    logits = 2.0 * torch.randn(n, k, generator=g)
    logits[torch.arange(n), labels] += 4.0
    return fit_selector(logits, labels if labelled else None, source={"writer": name}, **settings)


WRITERS = {
    "init": {"scores": ["entropy"], "q": 0.5},
    "A": {"scores": ["softmax", "energy"], "q": 0.8},
    "B": {"scores": ["margin"], "q": 0.95, "temperature": 2.0},
}


def _expectation(bundle) -> dict:  # type: ignore[no-untyped-def]
    return {
        "scores": list(bundle.scores),
        "threshold": bundle.threshold,
        "temperature": bundle.temperature,
        "thresholds": {name: score.threshold for name, score in bundle.scores.items()},
    }


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.005)


def _fork(target: Callable[[], None]) -> int:
    """Run ``target`` in a child process; it exits 0, or 1 with the traceback on stderr."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            target()
        except BaseException:  # noqa: BLE001 - reported through the exit status
            traceback.print_exc()
            code = 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    return pid


def _reap(pid: int) -> int:
    """Wait for child ``pid``; its exit status, or minus the signal that killed it."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _race(root: str, expect_dir: str, rounds: str, out: str) -> None:
    """Two savers in a tight loop and a loader, each a process of its own."""
    from seapig_core.bundle import load_bundle

    bundles = {name: _fitted(name, **WRITERS[name]) for name in ("A", "B")}
    for name, bundle in bundles.items():
        Path(expect_dir, f"{name}.json").write_text(json.dumps(_expectation(bundle)))
    expectations = {p.stem: json.loads(p.read_text()) for p in Path(expect_dir).glob("*.json")}
    stop, ready, loads = Path(out).with_suffix(".stop"), Path(out).with_suffix(".ready"), Path(out).with_suffix(".loads")

    def loader() -> None:
        report: dict = {"loads": 0, "errors": [], "writers": {}, "versions": []}

        def check() -> None:
            try:
                bundle = load_bundle(root)
            except Exception as exc:  # noqa: BLE001 - every failure is reported to the test
                report["errors"].append(f"{type(exc).__name__}: {exc}")
                return
            writer = bundle.source["writer"]  # from the manifest; the thresholds from the score files
            if _expectation(bundle) != expectations[writer] or bundle.manifest_sha256[:16] != bundle.version[-16:]:
                report["errors"].append(f"inconsistent bundle {bundle.version}: {_expectation(bundle)} vs {writer}")
            report["loads"] += 1
            report["writers"][writer] = report["writers"].get(writer, 0) + 1
            report["versions"].append(bundle.version)

        check()
        ready.touch()
        while not stop.exists():
            check()
        check()  # after every writer has finished
        report["versions"] = len(set(report["versions"]))
        loads.write_text(json.dumps(report))

    def saver(name: str) -> Callable[[], None]:
        def run() -> None:
            for _ in range(int(rounds)):
                bundles[name].save(root)

        return run

    loading = _fork(loader)
    _wait_for(ready)
    saving = [_fork(saver(name)) for name in bundles]
    statuses = [_reap(pid) for pid in saving]
    stop.touch()
    statuses.append(_reap(loading))
    Path(out).write_text(json.dumps({"statuses": statuses, **json.loads(loads.read_text())}))


def _kill_hooks(point: str) -> None:
    """In a saving child: SIGKILL this process at ``point`` of its next save."""
    import shutil

    import seapig_core.bundle as bundle_module
    from seapig_core._io import is_temporary_name

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    real_rename, real_replace, real_rmtree = os.rename, os.replace, shutil.rmtree
    if point == "staging":  # a complete version still under its temporary name

        def rename(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
            if Path(src).name.startswith(".version.seapig-tmp-"):
                die()
            return real_rename(src, dst, *args, **kwargs)

        os.rename = rename
    elif point == "pointer":  # the new version in place, the new pointer still a temporary file

        def replace(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
            if Path(dst).name == bundle_module.POINTER_NAME:
                die()
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace
    elif point == "prune":  # an old version renamed for deletion, not yet deleted

        def rmtree(path, *args, **kwargs):  # type: ignore[no-untyped-def]
            if is_temporary_name(Path(path).name) and not Path(path).name.startswith(".version."):
                die()
            return real_rmtree(path, *args, **kwargs)

        bundle_module.shutil.rmtree = rmtree  # type: ignore[assignment]


def _kill(staging: str, pointer: str, prune: str, shared: str, seed: str, out: str) -> None:
    """Saving children killed at fixed points of a save, then two killed at random times."""
    from seapig_core.bundle import load_bundle

    bundle = load_bundle(staging)  # the test's large template bundle
    bundle.source = {"writer": "A"}
    statuses = {}
    for point, root in (("staging", staging), ("pointer", pointer), ("prune", prune)):

        def save_once(point: str = point, root: str = root) -> None:
            _kill_hooks(point)
            bundle.save(root)

        statuses[point] = _reap(_fork(save_once))
    rng, delays = random.Random(int(seed)), []
    for name in ("A", "B"):
        read_end, write_end = os.pipe()

        def save_forever(name: str = name, write_end: int = write_end) -> None:
            bundle.source = {"writer": name}
            bundle.save(shared)
            os.write(write_end, b"saved")
            while True:
                bundle.save(shared)

        pid = _fork(save_forever)
        os.close(write_end)
        assert os.read(read_end, 5) == b"saved"
        os.close(read_end)
        delays.append(rng.uniform(0.0, 0.3))
        time.sleep(delays[-1])
        os.kill(pid, signal.SIGKILL)
        statuses[f"random-{name}"] = _reap(pid)  # reaped: a zombie would still count as a live writer
    Path(out).write_text(json.dumps({"statuses": statuses, "delays": delays}))


def _provenance(root: str, logits: str, rounds: str, log: str, out: str) -> None:
    """A calibrating process alternating two thresholds, and a scoring process."""
    import torch

    from seapig_core.bundle import CalibrationSettings, load_bundle
    from seapig_core.pipeline import calibrate_file

    stop, ready = Path(out).with_suffix(".stop"), Path(out).with_suffix(".ready")

    def calibrator() -> None:
        with open(log, "a") as handle:
            for i in range(int(rounds)):
                settings = CalibrationSettings(scores=["softmax", "energy"], q=0.7 if i % 2 == 0 else 0.95)
                result = calibrate_file(logits, root, settings)
                handle.write(json.dumps({k: result[k] for k in ("version", "manifest_sha256", "threshold", "temperature")}) + "\n")
                handle.flush()

    def scorer() -> None:
        query = 3.0 * torch.randn(500, 10, generator=torch.Generator().manual_seed(7))
        records = []

        def score() -> None:
            bundle = load_bundle(root)
            selection = bundle.primary.select(query)  # what a selections file holds
            records.append({
                "version": bundle.version,
                "manifest_sha256": bundle.manifest_sha256,
                "threshold": bundle.threshold,
                "temperature": bundle.temperature,
                "applied_threshold": bundle.primary.threshold,
                "applied_temperature": bundle.primary.T,
                "selected_below_threshold": bool(torch.equal(selection["selected"], selection["score"] < bundle.threshold)),
            })

        score()
        ready.touch()
        while not stop.exists():
            score()
        score()
        Path(out).write_text(json.dumps(records))

    scoring = _fork(scorer)
    _wait_for(ready)
    status = _reap(_fork(calibrator))
    stop.touch()
    if (status, _reap(scoring)) != (0, 0):
        raise SystemExit(f"a child failed: calibrator {status}")


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)  # before any work: the forked children need no thread pool
    mode, *arguments = sys.argv[1:]
    {"race": _race, "kill": _kill, "provenance": _provenance}[mode](*arguments)
    sys.exit(0)


# ----------------------------------------------------------------------------- test side

import shutil  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from seapig_core._io import is_temporary_name  # noqa: E402
from seapig_core.bundle import (  # noqa: E402
    DEFAULT_KEEP_PREVIOUS,
    POINTER_NAME,
    bundle_versions,
    load_bundle,
    prune_versions,
)
from seapig_core.pipeline import calibrate_file  # noqa: E402


def _run_worker(*arguments: object) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, __file__, *map(str, arguments)], cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the {arguments[0]} worker did not finish in {TIMEOUT} s: {exc.stderr!r}")
    assert proc.returncode == 0, f"the {arguments[0]} worker failed ({proc.returncode}): {proc.stderr[-3000:]}"


def _temporaries(root: Path) -> list[str]:
    return sorted(p.name for d in (root, root / "versions") if d.is_dir() for p in d.iterdir() if is_temporary_name(p.name))


@pytest.mark.slow
def test_concurrent_saves_always_leave_a_loadable_consistent_bundle(tmp_path: Path) -> None:
    root, expect = tmp_path / "bundle", tmp_path / "expect"
    expect.mkdir()
    initial = _fitted("init", **WRITERS["init"])
    initial.save(root)
    (expect / "init.json").write_text(json.dumps(_expectation(initial)))
    _run_worker("race", root, expect, 50, tmp_path / "race.json")

    report = json.loads((tmp_path / "race.json").read_text())
    assert report["statuses"] == [0, 0, 0]
    assert report["errors"] == [], report["errors"][:5]
    assert report["loads"] >= 2 and report["versions"] >= 2
    final = load_bundle(root)
    assert final.source["writer"] in {"A", "B"} and final.version in bundle_versions(root)
    pointer = json.loads((root / POINTER_NAME).read_text())
    assert (pointer["version"], pointer["manifest_sha256"]) == (final.version, final.manifest_sha256)
    assert _temporaries(root) == []  # every writer cleaned up after itself
    prune_versions(root)
    assert len(bundle_versions(root)) == DEFAULT_KEEP_PREVIOUS + 1


@pytest.mark.slow
def test_kill_9_during_saves_leaves_a_loadable_bundle_and_the_next_save_sweeps(tmp_path: Path) -> None:
    template = tmp_path / "template"
    big = _fitted("init", n=20_000, k=10, labelled=False, scores=["softmax", "energy"], temperature=1.5)
    for _ in range(DEFAULT_KEEP_PREVIOUS + 1):  # a full set of versions, so that the next save prunes one
        big.save(template)
    roots = {name: tmp_path / name for name in ("staging", "pointer", "prune", "shared")}
    for root in roots.values():
        shutil.copytree(template, root)
    seed = int.from_bytes(os.urandom(4), "little")
    _run_worker("kill", roots["staging"], roots["pointer"], roots["prune"], roots["shared"], seed, tmp_path / "kill.json")
    report = json.loads((tmp_path / "kill.json").read_text())
    assert set(report["statuses"].values()) == {-signal.SIGKILL}, report

    # Each fixed point left its temporaries, and the bundle still loads the last complete switch.
    assert load_bundle(roots["staging"]).version == big.version
    assert [n for n in _temporaries(roots["staging"]) if n.startswith(".version.")]
    assert load_bundle(roots["pointer"]).version == big.version
    assert len(bundle_versions(roots["pointer"])) == DEFAULT_KEEP_PREVIOUS + 2  # the new one, complete but unreferenced
    assert [n for n in _temporaries(roots["pointer"]) if n.startswith(f".{POINTER_NAME}.")]
    pruned = load_bundle(roots["prune"])
    assert pruned.source["writer"] == "A" and pruned.version != big.version  # the switch came before the kill
    assert _temporaries(roots["prune"]) and len(bundle_versions(roots["prune"])) == DEFAULT_KEEP_PREVIOUS + 1
    assert load_bundle(roots["shared"]).source["writer"] in {"init", "A", "B"}, (seed, report)

    # The next save removes every dead writer's temporaries.
    small = _fitted("init", **WRITERS["init"])
    for root in roots.values():
        small.save(root)
        assert _temporaries(root) == [], (root, seed, report)
        assert load_bundle(root).version == small.version


@pytest.mark.slow
def test_scoring_while_recalibrating_records_the_identity_and_threshold_it_applied(tmp_path: Path) -> None:
    import torch

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (1000,), generator=g)
    logits = 2.0 * torch.randn(1000, 10, generator=g)
    logits[torch.arange(1000), labels] += 4.0
    np.savez(tmp_path / "cal.npz", logits=logits.numpy(), labels=labels.numpy())
    root, log = tmp_path / "bundle", tmp_path / "calibrations.jsonl"
    first = calibrate_file(tmp_path / "cal.npz", root, scores=["softmax", "energy"], q=0.5)
    log.write_text(json.dumps({k: first[k] for k in ("version", "manifest_sha256", "threshold", "temperature")}) + "\n")
    rounds = 10
    _run_worker("provenance", root, tmp_path / "cal.npz", rounds, log, tmp_path / "scored.json")

    written = [json.loads(line) for line in log.read_text().splitlines()]
    by_version = {w["version"]: w for w in written}
    assert len(by_version) == rounds + 1 and len({w["threshold"] for w in written}) == 3  # q = 0.5, 0.7, 0.95
    records = json.loads((tmp_path / "scored.json").read_text())
    assert len({r["version"] for r in records}) >= 2  # the first and the last calibration at least
    for record in records:
        truth = by_version[record["version"]]
        assert record["manifest_sha256"] == truth["manifest_sha256"], record
        assert record["threshold"] == record["applied_threshold"] == truth["threshold"], record
        assert record["temperature"] == record["applied_temperature"] == truth["temperature"], record
        assert record["selected_below_threshold"], record
