"""seapig_core.inbox: planning against the ledger, scoring a claim, archiving without loss (no Prefect)."""

from __future__ import annotations

import errno
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

from seapig_core import inbox as inbox_module
from seapig_core.inbox import archive_input, check_scoring_dirs, plan_scoring, score_claim
from seapig_core.ledger import Ledger
from seapig_core.pipeline import calibrate_file
from seapig_core.selections import read_selections
from seapig_core.store import entry_paths


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("inbox-bundle")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 400)
    logits = rng.normal(size=(400, 10)).astype(np.float32)
    logits[np.arange(400), labels] += 3.0
    np.savez(root / "cal.npz", logits=logits, labels=labels)
    return calibrate_file(root / "cal.npz", root / "bundle", scores=["softmax"], q=0.9)


def _batches(directory: Path, n: int, seed: int = 1, rows: int = 16) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        path = directory / f"batch-{i:02d}.npy"
        np.save(path, rng.normal(size=(rows, 10)).astype(np.float32))
        out[path.stem] = path
    return out


def test_plan_claims_new_content_once_and_reports_the_rest(bundle: dict, tmp_path: Path) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    _batches(inbox, 3)
    (inbox / "copy.npy").write_bytes((inbox / "batch-00.npy").read_bytes())  # the same content twice
    os.symlink(tmp_path / "elsewhere.npy", inbox / "outside.npy")
    np.save(tmp_path / "elsewhere.npy", np.zeros((2, 10), dtype=np.float32))
    plan = plan_scoring(inbox, out, bundle["version"])
    assert [c.batch for c in plan.claims] == ["batch-00", "batch-01", "batch-02"]
    assert plan.duplicates == {"copy": "batch-00"}
    assert list(plan.refused) == ["'outside.npy'"] and "outside" in plan.refused["'outside.npy'"]
    for claim in plan.claims:
        score_claim(claim, bundle["version_path"], out)
    again = plan_scoring(inbox, out, bundle["version"])
    assert again.claims == () and set(again.done) == {"batch-00", "batch-01", "batch-02"}
    assert again.done["batch-00"] == str(out / "batch-00.selections.parquet")
    assert again.describe().startswith("Nothing new: 0 batch(es) to score")
    # Another version: not rescored unless asked.
    assert plan_scoring(inbox, out, "20990101T000000000000Z-0123456789abcdef").claims == ()
    rescore = plan_scoring(inbox, out, "20990101T000000000000Z-0123456789abcdef", rescore_on_new_bundle=True)
    assert len(rescore.claims) == 3


def test_a_file_removed_before_it_is_fingerprinted_is_gone_not_an_error(bundle: dict, tmp_path: Path) -> None:
    batches = _batches(tmp_path / "inbox", 2)
    batches["vanished"] = tmp_path / "inbox" / "vanished.npy"  # archived by an overlapping run meanwhile
    plan = plan_scoring(batches, tmp_path / "out", bundle["version"])
    assert [c.batch for c in plan.claims] == ["batch-00", "batch-01"] and plan.gone == ("vanished",)


def _hold_a_claim(output_dir: str, batches: dict, version: str, claimed, release) -> None:
    Ledger(output_dir).claim(batches, version)
    claimed.set()
    release.wait(30)


def test_a_batch_claimed_by_another_live_process_is_left_to_it(bundle: dict, tmp_path: Path) -> None:
    batches = {k: str(v) for k, v in _batches(tmp_path / "inbox", 2).items()}
    context = multiprocessing.get_context("fork")
    claimed, release = context.Event(), context.Event()
    child = context.Process(target=_hold_a_claim, args=(str(tmp_path / "out"), {"batch-00": batches["batch-00"]}, bundle["version"], claimed, release))
    child.start()
    try:
        assert claimed.wait(30)
        plan = plan_scoring(tmp_path / "inbox", tmp_path / "out", bundle["version"])
        assert [c.batch for c in plan.claims] == ["batch-01"] and plan.busy == ("batch-00",)
    finally:
        release.set()
        child.join(30)
    # Its owner is gone: the next run takes the claim over.
    plan = plan_scoring(tmp_path / "inbox", tmp_path / "out", bundle["version"])
    assert [c.batch for c in plan.claims] == ["batch-00", "batch-01"]


def test_a_failed_batch_is_recorded_and_claimed_again(bundle: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _batches(tmp_path / "inbox", 1)
    out = tmp_path / "out"
    (claim,) = plan_scoring(tmp_path / "inbox", out, bundle["version"]).claims

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(inbox_module, "score_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        score_claim(claim, bundle["version_path"], out)
    (entry,) = Ledger(out).entries()
    assert entry.state == "failed"
    monkeypatch.undo()
    (again,) = plan_scoring(tmp_path / "inbox", out, bundle["version"]).claims
    assert again.attempts == 2
    result = score_claim(again, bundle["version_path"], out)
    assert Path(result["path"]).is_file() and Ledger(out).entries()[0].state == "done"


def test_an_input_changed_while_it_is_scored_is_not_recorded_as_its_old_content(
    bundle: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = _batches(tmp_path / "inbox", 1)
    out = tmp_path / "out"
    (claim,) = plan_scoring(tmp_path / "inbox", out, bundle["version"]).claims
    real = inbox_module.score_file

    def score_then_replace(*args, **kwargs):
        result = real(*args, **kwargs)
        np.save(batches["batch-00"], np.ones((3, 10), dtype=np.float32))
        return result

    monkeypatch.setattr(inbox_module, "score_file", score_then_replace)
    with pytest.raises(ValueError, match="changed while it was being scored"):
        score_claim(claim, bundle["version_path"], out)
    monkeypatch.undo()
    (again,) = plan_scoring(tmp_path / "inbox", out, bundle["version"]).claims  # the new content
    assert again.content_sha256 != claim.content_sha256


def test_score_claim_records_the_version_it_was_given(bundle: dict, tmp_path: Path) -> None:
    _batches(tmp_path / "inbox", 1)
    out = tmp_path / "out"
    (claim,) = plan_scoring(tmp_path / "inbox", out, bundle["version"]).claims
    result = score_claim(claim, bundle["version_path"], out, archive_dir=tmp_path / "archive")
    meta = read_selections(result["path"]).attrs["seapig_core"]
    assert meta["bundle_version"] == bundle["version"] == result["bundle_version"]
    assert meta["bundle_manifest_sha256"] == bundle["manifest_sha256"] and meta["threshold"] == bundle["threshold"]
    assert meta["bundle_dir"] == str(Path(bundle["bundle_dir"]).resolve())
    # The ledger's SHA-256 of the input, passed on (the file is not hashed a second time).
    assert (meta["logits_sha256"], meta["logits_xxh3_128"]) == (claim.content_sha256, None)
    assert result["archived_path"] == str(tmp_path / "archive" / "batch-00.npy")
    assert not (tmp_path / "inbox" / "batch-00.npy").exists()


# ----------------------------------------------------------------------------- archive


def test_archive_moves_within_a_file_system_and_never_overwrites(tmp_path: Path) -> None:
    inbox, archive = tmp_path / "inbox", tmp_path / "archive"
    inbox.mkdir()
    (inbox / "a.npz").write_bytes(b"first")
    inode = (inbox / "a.npz").stat().st_ino
    assert archive_input(inbox / "a.npz", archive) == archive / "a.npz"
    assert (archive / "a.npz").stat().st_ino == inode and not (inbox / "a.npz").exists()  # renamed, not copied

    (inbox / "a.npz").write_bytes(b"second")  # same name, different content
    moved = archive_input(inbox / "a.npz", archive)
    assert moved.name.startswith("a-") and moved.name.endswith(".npz") and moved.read_bytes() == b"second"
    assert (archive / "a.npz").read_bytes() == b"first"  # never overwritten

    (inbox / "a.npz").write_bytes(b"first")  # identical to what is archived: absorbed
    assert archive_input(inbox / "a.npz", archive) == archive / "a.npz" and not (inbox / "a.npz").exists()
    assert sorted(p.name for p in archive.iterdir()) == sorted(["a.npz", moved.name])
    with pytest.raises(ValueError, match="does not exist"):
        archive_input(inbox / "a.npz", archive)


def test_archive_across_file_systems_copies_then_links_without_replacing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inbox, archive = tmp_path / "inbox", tmp_path / "archive"
    inbox.mkdir()
    archive.mkdir()
    (inbox / "b.npy").write_bytes(b"payload")
    real_link = os.link

    def cross_device(source, destination, **kwargs):
        if Path(source).parent == inbox:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_link(source, destination, **kwargs)

    monkeypatch.setattr(os, "link", cross_device)
    assert archive_input(inbox / "b.npy", archive) == archive / "b.npy"
    assert (archive / "b.npy").read_bytes() == b"payload" and not (inbox / "b.npy").exists()
    assert sorted(p.name for p in archive.iterdir()) == ["b.npy"]  # no staging copy left

    (inbox / "b.npy").write_bytes(b"other")
    moved = archive_input(inbox / "b.npy", archive)
    assert moved != archive / "b.npy" and moved.read_bytes() == b"other" and (archive / "b.npy").read_bytes() == b"payload"


def test_archive_without_hard_links_reserves_the_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inbox, archive = tmp_path / "inbox", tmp_path / "archive"
    inbox.mkdir()
    (inbox / "c.npy").write_bytes(b"one")

    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    assert archive_input(inbox / "c.npy", archive).read_bytes() == b"one"
    (inbox / "c.npy").write_bytes(b"two")
    moved = archive_input(inbox / "c.npy", archive)
    assert (archive / "c.npy").read_bytes() == b"one" and moved.read_bytes() == b"two"


def test_a_store_entry_is_archived_with_its_manifest(tmp_path: Path) -> None:
    inbox, archive = tmp_path / "inbox", tmp_path / "archive"
    inbox.mkdir()
    data, manifest = entry_paths(inbox, "q")
    data.write_bytes(b"arrow")
    manifest.write_bytes(b"{}")
    moved = archive_input(data, archive, "q")
    assert moved == entry_paths(archive, "q")[0] and entry_paths(archive, "q")[1].read_bytes() == b"{}"
    assert not data.exists() and not manifest.exists()


def test_check_scoring_dirs_names_the_parameter(tmp_path: Path) -> None:
    check_scoring_dirs(tmp_path / "out", tmp_path / "inbox", tmp_path / "archive")
    with pytest.raises(ValueError, match="'output_dir' parameter must be another directory than the inbox"):
        check_scoring_dirs(tmp_path / "inbox", tmp_path / "inbox")
    with pytest.raises(ValueError, match="'archive_dir' parameter must be another directory than the inbox"):
        check_scoring_dirs(tmp_path / "out", tmp_path / "inbox", tmp_path / "inbox")
    with pytest.raises(ValueError, match="'archive_dir' parameter must be another directory than 'output_dir'"):
        check_scoring_dirs(tmp_path / "out", None, tmp_path / "out")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="'archive_dir' parameter must be a directory"):
        check_scoring_dirs(tmp_path / "out", None, tmp_path / "file")
