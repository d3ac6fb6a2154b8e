"""Atomic writes, file stems that stay inside their directory, writable directories."""

from __future__ import annotations

import hashlib
import os

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from seapig_core._io import (
    MappedFileHash,
    atomic_path,
    atomic_write_json,
    check_file_stem,
    ensure_writable_dir,
    file_sha256,
    file_xxh3_128,
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


@pytest.mark.parametrize("size", [0, 1, 4 << 20, 9_000_001])  # empty (cannot be mapped), one chunk, several
def test_file_xxh3_128_matches_xxhash_over_the_bytes(tmp_path, size):
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    assert file_xxh3_128(tmp_path / "f") == xxhash.xxh3_128_hexdigest(data)


@given(
    data=st.binary(min_size=1, max_size=5000),
    ends=st.lists(st.integers(min_value=-10, max_value=6000), max_size=12),
)
def test_mapped_file_hash_is_the_file_hash_whatever_the_order_of_the_reads(tmp_path_factory, data, ends):
    """A reader's ranges, in any order, repeated or past the end: the digest is still the file's, in file order."""
    import mmap

    path = tmp_path_factory.mktemp("mapped") / "f"
    path.write_bytes(data)
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        hasher = MappedFileHash(mapped)
        for end in ends:
            hasher.advance(end)
        digest = hasher.hexdigest()
        hasher.release()  # the mapping can then be closed
    assert digest == xxhash.xxh3_128_hexdigest(data) == file_xxh3_128(path)


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


# ----------------------------------------------------------------------------- bounded JSON


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[" * 5000 + "]" * 5000, "levels deep"),
        ('{"a":' * 100 + "1" + "}" * 100, "levels deep"),
        ('{"a": NaN}', "not valid JSON"),
        ('{"a": 1', "not valid JSON"),
    ],
)
def test_hostile_json_is_a_value_error_naming_the_file(tmp_path, text, reason):
    from seapig_core._io import read_json

    path = tmp_path / "manifest.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=reason) as info:
        read_json(path)
    assert str(path) in str(info.value)


def test_json_depth_ignores_brackets_inside_strings(tmp_path):
    from seapig_core._io import loads_json

    nested_text = "[" * 80
    assert loads_json(f'{{"a": "{nested_text}"}}', max_depth=1) == {"a": nested_text}
    assert loads_json('["\\"[[[[[["]', max_depth=1) == ['"[[[[[[']


def test_json_size_and_encoding_limits(tmp_path):
    from seapig_core._io import loads_json, read_json

    with pytest.raises(ValueError, match="at most 10 are read"):
        loads_json(b"[" + b"1," * 10 + b"1]", "x", max_bytes=10)
    (tmp_path / "latin.json").write_bytes(b'{"a": "\xe9"}')
    with pytest.raises(ValueError, match="not UTF-8"):
        read_json(tmp_path / "latin.json")
    with pytest.raises(ValueError, match="could not be read"):
        read_json(tmp_path / "missing.json")


def test_json_object_refuses_other_documents(tmp_path):
    from seapig_core._io import read_json_object

    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"must hold a JSON object\. Got a JSON list"):
        read_json_object(tmp_path / "list.json", "metadata file")


# ----------------------------------------------------------------------------- containment


def test_resolve_inside_refuses_symlinks_that_leave_the_root(tmp_path):
    from seapig_core._io import resolve_inside

    inbox, outside = tmp_path / "inbox", tmp_path / "secret.npy"
    inbox.mkdir()
    outside.write_bytes(b"x")
    (inbox / "ok.npy").write_bytes(b"x")
    (inbox / "link.npy").symlink_to(outside)
    (inbox / "inner.npy").symlink_to(inbox / "ok.npy")
    assert resolve_inside(inbox / "ok.npy", inbox) == (inbox / "ok.npy").resolve()
    assert resolve_inside(inbox / "inner.npy", inbox) == (inbox / "ok.npy").resolve()
    with pytest.raises(ValueError, match="outside"):
        resolve_inside(inbox / "link.npy", inbox, "logits_dir")


# ----------------------------------------------------------------------------- owned temporaries


def test_temporary_names_are_hidden_owned_and_recognised():
    from seapig_core._io import is_temporary_name, temporary_name

    name = temporary_name("batch.selections.parquet", ".tmp")
    assert name.startswith(".batch.selections.parquet.seapig-tmp-") and name.endswith(".tmp")
    assert is_temporary_name(name) and not is_temporary_name("batch.selections.parquet")
    assert temporary_name("x") != temporary_name("x")


def test_sweep_keeps_live_writers_and_removes_dead_ones(tmp_path):
    import subprocess
    import sys

    from seapig_core._io import sweep_stale_temporaries, temporary_name

    mine = tmp_path / temporary_name("live.parquet")
    mine.write_bytes(b"in progress")
    # A writer that dies: a child process creates its temporary file and directory, then exits.
    code = (
        "import sys; from pathlib import Path; from seapig_core._io import temporary_name; d = Path(sys.argv[1]); "
        "(d / temporary_name('dead.parquet')).write_bytes(b'half'); (d / temporary_name('spill')).mkdir(); "
        "(d / 'data.parquet').write_bytes(b'kept')"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    dead = sorted(p.name for p in tmp_path.iterdir() if "dead" in p.name or "spill" in p.name)
    assert len(dead) == 2
    removed = sweep_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == dead
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, "data.parquet"])


def test_sweep_ages_out_temporaries_of_other_hosts(tmp_path):
    from seapig_core._io import sweep_stale_temporaries

    foreign = tmp_path / ".x.parquet.seapig-tmp-00000000-00000000-1-1-abcdef01"
    foreign.write_bytes(b"x")
    assert sweep_stale_temporaries(tmp_path) == [] and foreign.exists()
    os.utime(foreign, (0, 0))
    assert sweep_stale_temporaries(tmp_path) == [foreign] and not foreign.exists()


def test_kill_9_mid_write_leaves_no_visible_file_and_the_next_write_cleans_up(tmp_path):
    """A writer killed inside atomic_path leaves only a hidden temporary, removed by the next write."""
    import signal
    import subprocess
    import sys
    import time

    code = (
        "import sys, time; from pathlib import Path; from seapig_core._io import atomic_path\n"
        "with atomic_path(Path(sys.argv[1]) / 'out.bin') as tmp:\n"
        "    tmp.write_bytes(b'x' * 1000); print('writing', flush=True); time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE)
    assert child.stdout.readline() == b"writing\n"
    child.send_signal(signal.SIGKILL)
    child.wait()
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".out.bin.seapig-tmp-")
    assert not (tmp_path / "out.bin").exists()
    time.sleep(0.01)
    atomic_write_json(tmp_path / "other.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.json"]
