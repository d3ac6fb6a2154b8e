"""The scoring ledger: exactly-once claims across processes, dead owners, cached hashing, history."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest

from seapig_core import ledger as ledger_module
from seapig_core.ledger import LEDGER_NAME, Ledger


def _inbox(root: Path, n: int, seed: int = 0) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = {}
    for i in range(n):
        path = root / f"batch-{i:03d}.npy"
        np.save(path, rng.normal(size=(4, 3)).astype(np.float32))
        paths[path.stem] = path
    return paths


def test_claim_complete_skip_and_changed_content(tmp_path: Path) -> None:
    inbox = _inbox(tmp_path / "inbox", 3)
    ledger = Ledger(tmp_path / "out")
    claims, skipped = ledger.claim(inbox, "v1", run_id="run-1", deployment="scoring/x")
    assert [c.batch for c in claims] == ["batch-000", "batch-001", "batch-002"] and skipped == []
    for claim in claims:
        ledger.complete(claim, tmp_path / "out" / f"{claim.batch}.selections.parquet", {"rejection_rate": 0.1, "samples": 4})
    claims, skipped = ledger.claim(inbox, "v1")
    assert claims == [] and [s.state for s in skipped] == ["done"] * 3
    assert skipped[0].selections_path.endswith("batch-000.selections.parquet") and skipped[0].summary["samples"] == 4
    # A changed file is new content: claimed again; the others stay done.
    np.save(inbox["batch-001"], np.zeros((4, 3), dtype=np.float32))
    claims, skipped = ledger.claim(inbox, "v1")
    assert [c.batch for c in claims] == ["batch-001"] and len(skipped) == 2


def test_a_new_bundle_rescoring_the_inbox_is_explicit(tmp_path: Path) -> None:
    inbox = _inbox(tmp_path / "inbox", 2)
    ledger = Ledger(tmp_path / "out")
    for claim in ledger.claim(inbox, "v1")[0]:
        ledger.complete(claim, "x.parquet")
    assert ledger.claim(inbox, "v2")[0] == []  # done with another version: not rescored by default
    claims, _ = ledger.claim(inbox, "v2", rescore_on_new_bundle=True)
    assert [c.bundle_version for c in claims] == ["v2", "v2"]


def test_failed_batches_are_claimed_again(tmp_path: Path) -> None:
    inbox = _inbox(tmp_path / "inbox", 1)
    ledger = Ledger(tmp_path / "out")
    (claim,), _ = ledger.claim(inbox, "v1")
    ledger.fail(claim, "the disk was full")
    (again,), _ = ledger.claim(inbox, "v1")
    assert again.attempts == 2
    assert ledger.history()["state"].tolist() == []  # a claimed batch is not history yet


def _claim_in_child(output_dir: str, inbox: dict[str, str], version: str, start: float, queue) -> None:
    while time.time() < start:
        time.sleep(0.001)
    ledger = Ledger(output_dir)
    claimed = []
    for _ in range(3):  # keep re-claiming, as overlapping scheduled runs would
        claims, _ = ledger.claim(inbox, version)
        for claim in claims:
            ledger.complete(claim, f"{claim.batch}.selections.parquet")
        claimed += [c.batch for c in claims]
    queue.put(claimed)


@pytest.mark.parametrize("round_", range(3))
def test_overlapping_processes_claim_every_batch_exactly_once(tmp_path: Path, round_: int) -> None:
    inbox = {k: str(v) for k, v in _inbox(tmp_path / "inbox", 40, seed=round_).items()}
    Ledger(tmp_path / "out")  # created before the race, as a deployment's first run would
    ctx = multiprocessing.get_context("fork")  # no re-import of torch per child
    queue = ctx.Queue()
    start = time.time() + 0.5
    workers = [ctx.Process(target=_claim_in_child, args=(str(tmp_path / "out"), inbox, "v1", start, queue)) for _ in range(3)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    everything = [batch for claimed in results for batch in claimed]
    assert sorted(everything) == sorted(inbox)  # each batch exactly once across the three processes


def _claim_and_report(output_dir: str, inbox: dict[str, str], queue) -> None:
    claims, skipped = Ledger(output_dir).claim(inbox, "v1")
    queue.put(([c.batch for c in claims], [s.state for s in skipped]))


def test_a_dead_runs_claim_is_taken_over_and_a_live_one_is_not(tmp_path: Path) -> None:
    inbox = {k: str(v) for k, v in _inbox(tmp_path / "inbox", 2).items()}
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_claim_and_report, args=(str(tmp_path / "out"), {"batch-000": inbox["batch-000"]}, queue))
    child.start()
    assert queue.get(timeout=60) == (["batch-000"], [])
    child.join(timeout=60)  # the child is gone, still holding batch-000
    ledger = Ledger(tmp_path / "out")
    claims, skipped = ledger.claim(inbox, "v1")
    assert sorted(c.batch for c in claims) == ["batch-000", "batch-001"] and skipped == []
    # This live process's claim is skipped by another process.
    child = ctx.Process(target=_claim_and_report, args=(str(tmp_path / "out"), inbox, queue))
    child.start()
    assert queue.get(timeout=60) == ([], ["claimed", "claimed"])
    child.join(timeout=60)


def test_claims_of_other_hosts_expire_with_their_lease(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inbox = _inbox(tmp_path / "inbox", 1)
    monkeypatch.setattr(ledger_module, "_owner", lambda: "0badc0de-00000000-1-1")
    other = Ledger(tmp_path / "out", lease_seconds=0.5)
    (foreign,), _ = other.claim(inbox, "v1")
    monkeypatch.undo()
    ledger = Ledger(tmp_path / "out", lease_seconds=0.5)
    assert ledger.claim(inbox, "v1")[0] == []  # another host: honoured while the lease runs
    time.sleep(0.6)
    (mine,), _ = ledger.claim(inbox, "v1")
    with pytest.raises(ValueError, match="no longer this run's"):
        other.complete(foreign, "late.parquet")  # the slow run learns its claim was taken over
    ledger.complete(mine, "b.parquet")


def test_unchanged_files_are_not_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inbox = _inbox(tmp_path / "inbox", 5)
    ledger = Ledger(tmp_path / "out")
    calls: list[str] = []
    real = ledger_module.file_sha256
    monkeypatch.setattr(ledger_module, "file_sha256", lambda p: calls.append(str(p)) or real(p))
    first = ledger.fingerprints(inbox)
    assert len(calls) == 5
    assert ledger.fingerprints(inbox) == first and len(calls) == 5
    os.utime(inbox["batch-002"], ns=(1, 1))  # touched: hashed again (same content, same hash)
    assert ledger.fingerprints(inbox) == first and len(calls) == 6


def test_history_for_trends(tmp_path: Path) -> None:
    inbox = _inbox(tmp_path / "inbox", 3)
    ledger = Ledger(tmp_path / "out")
    claims, _ = ledger.claim(inbox, "v1", run_id="r1", deployment="scoring/inbox")
    for i, claim in enumerate(claims):
        ledger.complete(claim, "x.parquet", {"rejection_rate": 0.1 * i, "ks_statistic": 0.2, "verdict": "ok", "reasons": ["a"]})
    history = ledger.history()
    assert list(history["batch"]) == ["batch-000", "batch-001", "batch-002"]
    assert history["rejection_rate"].tolist() == pytest.approx([0.0, 0.1, 0.2])
    assert set(history["deployment"]) == {"scoring/inbox"} and "reasons" not in history  # scalars only
    assert str(history["finished_at"].dt.tz) == "UTC"
    assert len(ledger.history(limit=2)) == 2


def test_a_corrupt_ledger_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / LEDGER_NAME).write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match=LEDGER_NAME):
        Ledger(tmp_path / "out")
