"""Hostile and broken logit files (issue 8): every case is a ValueError naming the file, never a crash.

A test run of the pipeline found each of these raising something else (``BadZipFile``,
``TokenError``, ``MemoryError``, ``AttributeError``, ``RecursionError``,
``UnicodeEncodeError``), passing silently (a null logit read as NaN, duplicate sample ids, a
store entry without its manifest scored unverified) or following a symlink out of the inbox.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from seapig_core.sources import list_logit_files, read_logits_file, scan_logit_files

LOGITS = np.arange(12, dtype=np.float32).reshape(4, 3)


def _refused(path: Path, match: str) -> str:
    with pytest.raises(ValueError, match=match) as info:
        read_logits_file(path)
    assert str(path) in str(info.value)
    return str(info.value)


def test_half_written_npz(tmp_path: Path) -> None:
    np.savez(tmp_path / "full.npz", logits=LOGITS, sample_ids=np.array(["a", "b", "c", "d"]))
    raw = (tmp_path / "full.npz").read_bytes()
    for cut in (10, len(raw) // 2, len(raw) - 30):
        (tmp_path / "half.npz").write_bytes(raw[:cut])
        _refused(tmp_path / "half.npz", "could not be read as logits")


def test_npz_with_a_corrupted_array_header(tmp_path: Path) -> None:
    np.savez(tmp_path / "b.npz", logits=LOGITS)
    raw = (tmp_path / "b.npz").read_bytes()
    # Break the header's Python literal (numpy parses it with tokenize: a TokenError before).
    broken = raw.replace(b"'descr': '<f4'", b"'descr': '<f4 ", 1)
    assert broken != raw
    (tmp_path / "b.npz").write_bytes(broken)
    _refused(tmp_path / "b.npz", "could not be read as logits")


def test_array_headers_that_claim_huge_shapes_allocate_nothing(tmp_path: Path) -> None:
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 10), dtype=np.float32))
    header["shape"] = (10**9, 10)
    with open(tmp_path / "huge.npy", "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        handle.write(b"\x00" * 400)
    _refused(tmp_path / "huge.npy", "could not be read as logits")
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as archive:
        archive.write(tmp_path / "huge.npy", "logits.npy")
    _refused(tmp_path / "huge.npz", r"claims shape \(1000000000, 10\)")


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
@pytest.mark.parametrize(
    ("metadata", "match"),
    [
        ("[1, 2, 3]", "must be a JSON object"),
        ("[" * 10_000 + "]" * 10_000, "levels deep"),
        ('{"logits_shape": "x"}', "list of positive integers"),
        ('{"logits_shape": [4, 7]}', "does not match"),
    ],
)
def test_bad_table_metadata(tmp_path: Path, suffix: str, metadata: str, match: str) -> None:
    table = pa.table({"logits": pa.array(LOGITS.tolist())}).replace_schema_metadata({"seapig_core": metadata})
    path = tmp_path / f"batch{suffix}"
    (pq.write_table if suffix == ".parquet" else feather.write_feather)(table, path)
    _refused(path, match)


def test_a_null_inside_a_logits_list_is_not_a_nan(tmp_path: Path) -> None:
    pq.write_table(pa.table({"logits": pa.array([[1.0, 2.0, 3.0], [4.0, None, 6.0]])}), tmp_path / "b.parquet")
    _refused(tmp_path / "b.parquet", "1 missing value")
    pq.write_table(pa.table({"logits": pa.array([[1.0, 2.0], [3.0, 4.0]]), "label": pa.array([1, None])}), tmp_path / "l.parquet")
    _refused(tmp_path / "l.parquet", "missing label")
    pq.write_table(pa.table({"logits": pa.array([[1.0, 2.0], [3.0, 4.0]]), "sample_id": pa.array(["a", None])}), tmp_path / "i.parquet")
    _refused(tmp_path / "i.parquet", "missing id")


@pytest.mark.parametrize("ids", [np.array(["a", "b", "a", "c"]), np.array([7, 8, 8, 8])])
def test_duplicate_sample_ids_are_refused(tmp_path: Path, ids: np.ndarray) -> None:
    np.savez(tmp_path / "b.npz", logits=LOGITS, sample_ids=ids)
    message = _refused(tmp_path / "b.npz", "must be unique")
    assert str(ids[2]) in message


def test_a_store_entry_without_its_manifest_is_not_scored_unverified(tmp_path: Path) -> None:
    feather.write_feather(pa.table({"logits": pa.array(LOGITS.tolist())}), tmp_path / "b.logits.arrow")
    _refused(tmp_path / "b.logits.arrow", "has no manifest")


def test_the_inbox_refuses_outside_symlinks_odd_names_and_double_batches(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    np.save(tmp_path / "secret.npy", LOGITS)
    np.save(inbox / "good.npy", LOGITS)
    (inbox / "escape.npy").symlink_to(tmp_path / "secret.npy")
    (inbox / "alias.npy").symlink_to(inbox / "good.npy")  # inside: allowed
    odd = os.fsencode(inbox) + b"/caf\xe9.npy"  # Latin-1 bytes: not a UTF-8 name
    with open(odd, "wb") as handle:
        np.save(handle, LOGITS)
    np.save(inbox / "twice.npy", LOGITS)
    np.savez(inbox / "twice.npz", logits=LOGITS)
    found = scan_logit_files(inbox)
    assert sorted(found.batches) == ["alias", "good"]
    assert set(found.refused) == {"'escape.npy'", "'caf\\udce9.npy'", "'twice.npy'", "'twice.npz'"}
    assert "outside" in found.refused["'escape.npy'"]
    assert "not valid UTF-8" in found.refused["'caf\\udce9.npy'"]
    assert "two files for batch 'twice'" in found.refused["'twice.npz'"]
    json.dumps(found.refused)  # printable: safe for Prefect results and logs
    with pytest.raises(ValueError, match="cannot be batches") as info:
        list_logit_files(inbox)
    info.value.args[0].encode("utf-8")  # the message itself is encodable
