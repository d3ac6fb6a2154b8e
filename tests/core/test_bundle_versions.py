"""Bundles as immutable versions behind an atomic pointer (issue 8 item 2), in one process.

Saving writes a complete version before the pointer names it; loading reads one version and
verifies it (hand edits are refused naming the file and the field); old versions are pruned
only when unreferenced; calibrate_file reuses only a clean, matching version and repairs a
damaged one. The real-process tests (concurrent savers, kill -9, provenance under
recalibration) are in test_bundle_concurrency.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import seapig_core.bundle as bundle_module
import seapig_core.pipeline as pipeline_module
from seapig_core._io import _host_and_boot, is_temporary_name, temporary_name
from seapig_core.bundle import (
    DEFAULT_KEEP_PREVIOUS,
    MANIFEST_NAME,
    POINTER_NAME,
    VERSIONS_DIR,
    CalibrationSettings,
    SelectorBundle,
    bundle_versions,
    fit_selector,
    load_bundle,
    prune_versions,
)
from seapig_core.pipeline import calibrate_file, content_fingerprint
from seapig_core.scores.logits import LogitScore


def _data(n: int = 400, k: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    logits = 2.0 * torch.randn(n, k, generator=g)
    logits[torch.arange(n), labels] += 4.0
    return logits, labels


@pytest.fixture(scope="module")
def two() -> tuple[SelectorBundle, SelectorBundle]:
    """Two different fitted (unsaved) selectors."""
    logits, labels = _data()
    return fit_selector(logits, labels, scores=["softmax", "energy"], q=0.9), fit_selector(logits, labels, scores=["margin"], q=0.6)


def _temporaries(root: Path) -> list[str]:
    return sorted(p.name for d in (root, root / VERSIONS_DIR) if d.is_dir() for p in d.iterdir() if is_temporary_name(p.name))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _dead_writers_name(stem: str) -> str:
    host, boot = _host_and_boot()
    return f".{stem}.seapig-tmp-{host}-{boot}-{_dead_pid()}-12345-0badf00d"


# ----------------------------------------------------------------------------- saving


def test_the_pointer_switches_only_after_the_new_version_is_complete(
    two: tuple[SelectorBundle, SelectorBundle], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = two
    root = tmp_path / "b"
    first.save(root)
    seen: dict[str, object] = {}
    real = bundle_module.atomic_write_bytes

    def spy(destination: Path, data: bytes) -> None:
        if Path(destination).name == POINTER_NAME:  # the moment before the switch
            seen["current"] = load_bundle(root).version
            seen["versions"] = bundle_versions(root)
            complete = [v for v in seen["versions"] if v != first.version]  # type: ignore[union-attr]
            seen["new"] = load_bundle(root / VERSIONS_DIR / complete[0]).primary_name
        real(destination, data)

    monkeypatch.setattr(bundle_module, "atomic_write_bytes", spy)
    second.save(root)
    assert seen["current"] == first.version and seen["new"] == "margin"
    assert seen["versions"] == sorted([first.version, second.version])
    assert load_bundle(root).version == second.version
    pointer = json.loads((root / POINTER_NAME).read_text())
    assert (pointer["version"], pointer["manifest_sha256"]) == (second.version, second.manifest_sha256)


def test_a_failed_save_changes_nothing_and_leaves_no_temporary(
    two: tuple[SelectorBundle, SelectorBundle], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, _ = two
    root = tmp_path / "b"
    first.save(root)
    before = bundle_versions(root)
    real = LogitScore.save

    def failing(self, path, **kwargs):  # type: ignore[no-untyped-def]
        if self.name == "energy":
            raise OSError("disk full")
        return real(self, path, **kwargs)

    monkeypatch.setattr(LogitScore, "save", failing)
    with pytest.raises(OSError, match="disk full"):
        fit_selector(*_data(), scores=["softmax", "energy"], q=0.5).save(root)
    assert bundle_versions(root) == before and load_bundle(root).version == first.version
    assert _temporaries(root) == []


def test_the_next_save_removes_dead_writers_temporaries_only(
    two: tuple[SelectorBundle, SelectorBundle], tmp_path: Path
) -> None:
    first, second = two
    root = tmp_path / "b"
    first.save(root)
    dead_version = root / VERSIONS_DIR / _dead_writers_name("version")
    dead_version.mkdir()
    (dead_version / "softmax.arrow").write_bytes(b"half a file")
    dead_pointer = root / _dead_writers_name(POINTER_NAME)
    dead_pointer.write_text('{"version": ')
    live = root / VERSIONS_DIR / temporary_name("version")  # this process: alive
    live.mkdir()
    assert len(_temporaries(root)) == 3
    assert load_bundle(root).version == first.version  # readers ignore temporaries
    second.save(root)
    assert _temporaries(root) == [live.name]


def test_saving_into_a_version_directory_is_refused(two: tuple[SelectorBundle, SelectorBundle], tmp_path: Path) -> None:
    first, second = two
    first.save(tmp_path / "b")
    with pytest.raises(ValueError, match="must be a bundle root, not one of its version directories"):
        second.save(first.version_path)


# ----------------------------------------------------------------------------- retention


def test_old_versions_are_kept_up_to_keep_previous(tmp_path: Path, two: tuple[SelectorBundle, SelectorBundle]) -> None:
    first, _ = two
    saved = []
    for _ in range(DEFAULT_KEEP_PREVIOUS + 3):
        first.save(tmp_path / "default")
        saved.append(first.version)
    assert DEFAULT_KEEP_PREVIOUS == 5 and bundle_versions(tmp_path / "default") == saved[-6:]
    for _ in range(4):
        first.save(tmp_path / "two", keep_previous=2)
    kept = bundle_versions(tmp_path / "two")
    assert len(kept) == 3 and kept[-1] == first.version == load_bundle(tmp_path / "two").version
    with pytest.raises(ValueError, match="The 'keep_previous' parameter must be a non-negative integer. Got -1 instead."):
        first.save(tmp_path / "two", keep_previous=-1)
    with pytest.raises(TypeError, match="'keep_previous' parameter must be a non-negative integer. Got float"):
        prune_versions(tmp_path / "two", keep_previous=1.0)  # type: ignore[arg-type]


def test_prune_skips_a_version_being_read_and_never_the_current(two: tuple[SelectorBundle, SelectorBundle], tmp_path: Path) -> None:
    first, second = two
    root = tmp_path / "b"
    first.save(root)
    old = first.version_path
    second.save(root)
    second.save(root)
    fd = os.open(old, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # what a reader holds while it loads
        removed = prune_versions(root, keep_previous=0)
        assert len(removed) == 1 and old.is_dir() and bundle_versions(root) == sorted([first.version, second.version])
    finally:
        os.close(fd)
    assert prune_versions(root, keep_previous=0) == [first.version] and bundle_versions(root) == [second.version]
    assert _temporaries(root) == []
    (root / POINTER_NAME).write_text("{not json")
    first.save(tmp_path / "other")
    shutil.copytree(first.version_path, root / VERSIONS_DIR / first.version)
    assert prune_versions(root, keep_previous=0) == []  # no pruning while the pointer is unreadable


def test_a_version_loaded_directly_is_not_pruned_under_the_reader(
    two: tuple[SelectorBundle, SelectorBundle], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = two
    root = tmp_path / "b"
    first.save(root)
    old = first.version_path
    second.save(root)
    real = bundle_module.load_score
    removed: list[list[str]] = []

    def collector_runs_meanwhile(path):  # type: ignore[no-untyped-def]
        removed.append(prune_versions(root, keep_previous=0))
        return real(path)

    monkeypatch.setattr(bundle_module, "load_score", collector_runs_meanwhile)
    loaded = load_bundle(old)
    assert loaded.version == first.version and list(loaded.scores) == ["softmax", "energy"]
    assert removed and all(r == [] for r in removed) and old.is_dir()


def test_a_reader_whose_version_is_collected_follows_the_pointer(
    two: tuple[SelectorBundle, SelectorBundle], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = two
    root = tmp_path / "b"
    first.save(root)
    real = bundle_module._read_pointer
    calls = []

    def racing(directory: Path) -> dict:
        pointer = real(directory)
        calls.append(pointer["version"])
        if len(calls) == 1:  # between reading the pointer and locking the version, a save prunes it
            second.save(root, keep_previous=0)
        return pointer

    monkeypatch.setattr(bundle_module, "_read_pointer", racing)
    loaded = load_bundle(root)
    assert calls[0] == first.version and not first.version_path.exists()
    assert loaded.version == second.version and loaded.primary_name == "margin"


def test_provenance_is_the_loaded_version_even_if_the_pointer_moves_during_the_load(
    two: tuple[SelectorBundle, SelectorBundle], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first wave hashed manifest.json after loading the score files: a save in between mixed two bundles."""
    first, second = two
    root = tmp_path / "b"
    first.save(root)
    real = bundle_module.load_score
    switched = []

    def save_meanwhile(path):  # type: ignore[no-untyped-def]
        if not switched:
            switched.append(True)
            second.save(root)
        return real(path)

    monkeypatch.setattr(bundle_module, "load_score", save_meanwhile)
    loaded = load_bundle(root)
    monkeypatch.undo()
    assert switched and load_bundle(root).version == second.version
    assert (loaded.version, loaded.manifest_sha256) == (first.version, first.manifest_sha256)
    assert loaded.threshold == first.threshold and loaded.primary.threshold == first.threshold
    manifest = json.loads((loaded.version_path / MANIFEST_NAME).read_text())
    assert manifest["threshold"] == loaded.threshold and manifest["temperature"] == loaded.temperature


# ----------------------------------------------------------------------------- refused edits


def _edit_manifest(bundle: SelectorBundle, edit: Callable[[dict], None]) -> Path:
    path = bundle.version_path / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2))
    return path


def _set(key: str, value: object) -> Callable[[dict], None]:
    return lambda m: m.__setitem__(key, value)


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda m: m.__setitem__("threshold", m["threshold"] + 0.05), "threshold"),
        (_set("temperature", 2.5), "temperature"),
        (_set("primary", "energy"), "primary"),
        (lambda m: m["scores"].reverse(), "primary"),
        (lambda m: m["scores"][1].__setitem__("threshold", 0.0), "threshold"),
        (_set("task", "binary"), "task"),
        (_set("n_units", 3), "n_units"),
        (_set("per_member", True), "per_member"),
        (_set("threshold_source", "risk"), "threshold_source"),
        (_set("risk_threshold", {"threshold": 0.5}), "risk_threshold"),
    ],
)
def test_a_manifest_edited_to_disagree_with_its_score_files_is_refused(
    two: tuple[SelectorBundle, SelectorBundle], tmp_path: Path, edit: Callable[[dict], None], field: str
) -> None:
    first, _ = two
    first.save(tmp_path / "b")
    path = _edit_manifest(first, edit)
    message = f"{path}.*disagrees with its score files: the field '{field}' is .* hand edits are refused"
    with pytest.raises(ValueError, match=message):
        load_bundle(tmp_path / "b")
    with pytest.raises(ValueError, match=message):
        load_bundle(first.version_path)
    assert content_fingerprint(tmp_path / "b") is None


def test_any_other_manifest_edit_is_refused_by_its_hash(two: tuple[SelectorBundle, SelectorBundle], tmp_path: Path) -> None:
    first, _ = two
    first.save(tmp_path / "b")
    path = _edit_manifest(first, lambda m: m["source"].__setitem__("logits_path", "elsewhere.npz"))
    for target in (tmp_path / "b", first.version_path):
        with pytest.raises(ValueError, match=f"{path}.*was modified after it was saved.*re-run the calibration"):
            load_bundle(target)
    first.save(tmp_path / "c")
    pointer = json.loads((tmp_path / "c" / POINTER_NAME).read_text())
    pointer["manifest_sha256"] = pointer["manifest_sha256"][:16] + "0" * 48
    (tmp_path / "c" / POINTER_NAME).write_text(json.dumps(pointer))
    with pytest.raises(ValueError, match="does not match the SHA-256 recorded by the bundle pointer"):
        load_bundle(tmp_path / "c")


def _pointer_edit(root: Path, bundle: SelectorBundle, case: str) -> str:
    pointer_path = root / POINTER_NAME
    pointer = json.loads(pointer_path.read_text())
    if case == "missing version":
        shutil.rmtree(bundle.version_path)
        return f"{pointer_path}' names the version '{bundle.version}', which is missing"
    if case == "incomplete version":
        (bundle.version_path / MANIFEST_NAME).unlink()
        return f"manifest.json' is missing: the version directory '{bundle.version_path}' is incomplete"
    if case == "missing score file":
        (bundle.version_path / "energy.arrow").unlink()
        return "energy.arrow' named by .* is missing: the version is incomplete"
    if case == "path in version":
        pointer["version"] = "../../elsewhere"
        pointer_path.write_text(json.dumps(pointer))
        return f"{pointer_path}' has an invalid 'version' '../../elsewhere'"
    if case == "foreign digest":
        pointer["manifest_sha256"] = "f" * 64
        pointer_path.write_text(json.dumps(pointer))
        return "does not belong to version"
    if case == "other format":
        pointer["format"] = "something"
        pointer_path.write_text(json.dumps(pointer))
        return f"{pointer_path}' is not one this seapig_core can read: it has no 'seapig_core.bundle_pointer' format header"
    if case == "list":
        pointer_path.write_text(json.dumps([pointer]))
        return f"{pointer_path}' must hold a JSON object. Got a JSON list instead"
    if case == "deep":
        pointer_path.write_text("[" * 100_000 + "]" * 100_000)
        return f"{pointer_path}' nests JSON 100000 levels deep"
    if case == "not json":
        pointer_path.write_text("{version: 1")
        return f"{pointer_path}' is not valid JSON"
    if case == "deep manifest":
        (bundle.version_path / MANIFEST_NAME).write_text('{"a": ' + "[" * 5000 + "]" * 5000 + "}")
        return f"{bundle.version_path / MANIFEST_NAME}' nests JSON 5001 levels deep"
    if case == "list manifest":
        (bundle.version_path / MANIFEST_NAME).write_text("[1, 2]")
        return f"{bundle.version_path / MANIFEST_NAME}' must hold a JSON object. Got a JSON list instead"
    if case == "malformed scores":
        _edit_manifest(bundle, _set("scores", [["softmax"]]))
        return "has a malformed 'scores' entry"
    if case == "missing field":
        _edit_manifest(bundle, lambda m: m.pop("temperature"))
        return f"{bundle.version_path / MANIFEST_NAME}' has no 'temperature' field"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "missing version", "incomplete version", "missing score file", "path in version", "foreign digest",
        "other format", "list", "deep", "not json", "deep manifest", "list manifest", "malformed scores",
        "missing field",
    ],
)
def test_a_bad_pointer_or_version_is_a_clear_error_naming_the_file(
    two: tuple[SelectorBundle, SelectorBundle], tmp_path: Path, case: str
) -> None:
    first, _ = two
    root = tmp_path / "b"
    first.save(root)
    message = _pointer_edit(root, first, case)
    with pytest.raises(ValueError, match=message):
        load_bundle(root)
    assert content_fingerprint(root) is None


def test_the_old_layout_is_refused_and_a_save_writes_the_new_one_beside_it(
    two: tuple[SelectorBundle, SelectorBundle], tmp_path: Path
) -> None:
    first, _ = two
    root = tmp_path / "old"
    root.mkdir()
    legacy = {"format": "seapig_core.bundle", "schema_version": 1, "library_version": "0.1.0", "scores": []}
    (root / MANIFEST_NAME).write_text(json.dumps(legacy))
    (root / "softmax-0123456789abcdef.arrow").write_bytes(b"old score file")
    with pytest.raises(ValueError, match=r"old layout \(schema version 1, manifest.json at the bundle root\).*Re-run the calibration"):
        load_bundle(root)
    first.save(root)
    assert load_bundle(root).version == first.version
    assert json.loads((root / MANIFEST_NAME).read_text()) == legacy and (root / "softmax-0123456789abcdef.arrow").is_file()


# ----------------------------------------------------------------------------- calibrate_file: reuse and repair


@pytest.fixture
def calibration_file(tmp_path: Path) -> Path:
    logits, labels = _data(600)
    np.savez(tmp_path / "cal.npz", logits=logits.numpy(), labels=labels.numpy())
    return tmp_path / "cal.npz"


def test_calibrate_file_reuses_only_a_matching_version(
    calibration_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "b"
    settings = CalibrationSettings(scores=["softmax", "margin"], q=0.9)
    first = calibrate_file(calibration_file, root, settings)
    assert not first["reused"] and first["version"] == load_bundle(root).version
    assert content_fingerprint(root) == first["manifest_sha256"] == load_bundle(root).manifest_sha256

    def no_fit(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("refitted although the bundle could be reused")

    with monkeypatch.context() as m:
        m.setattr(pipeline_module, "fit_selector", no_fit)
        again = calibrate_file(calibration_file, root, settings)
    assert again["reused"] and again["version"] == first["version"] and bundle_versions(root) == [first["version"]]
    assert {k: v for k, v in again.items() if k != "reused"} == {k: v for k, v in first.items() if k != "reused"}

    changed = calibrate_file(calibration_file, root, settings.__class__(scores=["softmax", "margin"], q=0.8))
    assert not changed["reused"] and changed["version"] != first["version"]
    assert content_fingerprint(root) == changed["manifest_sha256"] != first["manifest_sha256"]

    logits, labels = _data(600, seed=1)
    np.savez(calibration_file, logits=logits.numpy(), labels=labels.numpy())  # new content, same path
    new_data = calibrate_file(calibration_file, root, q=0.8, scores=["softmax", "margin"])  # the keyword form
    assert not new_data["reused"] and new_data["version"] != changed["version"]

    monkeypatch.setattr(pipeline_module, "__version__", "99.0")
    assert not calibrate_file(calibration_file, root, q=0.8, scores=["softmax", "margin"])["reused"]
    assert len(bundle_versions(root)) == 4


@pytest.mark.parametrize("damage", ["delete a score file", "edit the threshold", "delete the version", "truncate the pointer"])
def test_calibrate_file_repairs_a_bundle_that_does_not_load(calibration_file: Path, tmp_path: Path, damage: str) -> None:
    root = tmp_path / "b"
    settings = CalibrationSettings(scores=["softmax", "energy"], q=0.9)
    first = calibrate_file(calibration_file, root, settings)
    version = Path(first["version_path"])
    if damage == "delete a score file":
        (version / "energy.arrow").unlink()
    elif damage == "edit the threshold":
        manifest = json.loads((version / MANIFEST_NAME).read_text())
        manifest["threshold"] = 0.0
        (version / MANIFEST_NAME).write_text(json.dumps(manifest))
    elif damage == "delete the version":
        shutil.rmtree(version)
    else:
        (root / POINTER_NAME).write_text('{"format": "seapig_core.bundle_po')
    with pytest.raises(ValueError):
        load_bundle(root)
    assert content_fingerprint(root) is None  # never a cache key for a bundle that does not load
    repaired = calibrate_file(calibration_file, root, settings)
    assert not repaired["reused"] and repaired["version"] != first["version"]
    loaded = load_bundle(root)
    assert loaded.version == repaired["version"] and loaded.threshold == first["threshold"]
    assert content_fingerprint(root) == repaired["manifest_sha256"]
    assert calibrate_file(calibration_file, root, settings)["reused"]
