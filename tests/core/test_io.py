"""Atomic writes, file stems that stay inside their directory, writable directories."""

from __future__ import annotations

import hashlib
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from seapig_core._io import (
    atomic_path,
    atomic_write_json,
    check_file_stem,
    ensure_writable_dir,
    file_sha256,
    read_json,
)


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half-writ")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_atomic_files_get_the_permissions_open_would_give(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "shared.bin") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "shared.bin").stat().st_mode & 0o777 == 0o640


def test_json_round_trip_and_no_nan(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"b": 1, "a": [1.5, None]})
    assert read_json(tmp_path / "m.json") == {"a": [1.5, None], "b": 1}
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "bad.json", {"x": float("nan")})
    assert not (tmp_path / "bad.json").exists()


def test_file_sha256_matches_hashlib(tmp_path):
    data = os.urandom(9_000_000)  # spans several read chunks
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("stem", ["", ".", "..", "../x", "a/b", "a\\b", "..hidden", "x\x00y", "/abs"])
def test_bad_file_stems_are_refused(stem):
    with pytest.raises(ValueError, match=r"The 'prefix' parameter must be a plain file-name stem"):
        check_file_stem(stem)


def test_file_stem_type():
    with pytest.raises(TypeError, match=r"The 'prefix' parameter must be a str\. Got int instead"):
        check_file_stem(3)


@given(st.text(min_size=1, max_size=20))
def test_accepted_stems_never_leave_their_directory(stem):
    try:
        check_file_stem(stem)
    except ValueError:
        return
    base = os.path.realpath("/srv/store")
    assert os.path.dirname(os.path.realpath(os.path.join(base, stem + ".arrow"))) == base


def test_ensure_writable_dir(tmp_path):
    created = ensure_writable_dir(tmp_path / "a" / "b")
    assert created.is_dir() and list(created.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"The 'outdir' parameter must be a directory\. Got the file"):
        ensure_writable_dir(tmp_path / "file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only directories")
def test_unwritable_dir_is_reported(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ValueError, match=r"must be a writable directory"):
            ensure_writable_dir(locked)
    finally:
        locked.chmod(0o700)


def test_dir_below_a_file_is_reported(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"must be a writable directory\. Could not write to"):
        ensure_writable_dir(tmp_path / "file" / "sub")


def test_header_problem_names_format_and_version():
    from seapig_core._io import header_problem

    good = {"format": "seapig_core.x", "schema_version": 2, "library_version": "9.9"}
    assert header_problem(good, "seapig_core.x", 2) is None
    assert header_problem([], "seapig_core.x", 2) == "it has no 'seapig_core.x' format header"
    assert header_problem({**good, "format": "other"}, "seapig_core.x", 2) == "it has no 'seapig_core.x' format header"
    problem = header_problem(good, "seapig_core.x", 1)
    assert "schema version 2 (written by seapig_core '9.9')" in problem and "reads schema version 1" in problem
