"""The logits store: format, fingerprints, cache hits and misses, corrupt entries, containment."""

from __future__ import annotations

import json
import os
import pickle
import sys
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from seapig_core import SoftmaxScore, __version__, store
from seapig_core import extract as extract_module
from seapig_core.extract import extract_logits
from seapig_core.store import (
    FORMAT,
    SCHEMA_VERSION,
    CorruptEntryError,
    CorruptEntryWarning,
    DataFingerprint,
    LogitsWriter,
    entry_paths,
    entry_prefix,
    is_entry,
    load_logits,
    lookup,
    model_fingerprint,
)
from tests.core.extract_models import CountingLoader, DropoutNet, LinearNet, tensor_data, tensor_loader
from tests.core.test_extract import direct


def run(model, loader, outdir, prefix="cal", **kwargs):
    return extract_logits(model, loader, outdir=outdir, prefix=prefix, progress=False, **kwargs)


def listing(directory):
    return sorted(p.name for p in directory.iterdir())


# ---------------------------------------------------------------------------- format


def test_entry_is_a_multi_batch_arrow_ipc_file_that_plain_pyarrow_and_pandas_read(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "BATCH_ROWS", 8)  # several record batches from a small extraction
    x, y = tensor_data(30)
    model = LinearNet()
    out = run(model, DataLoader(TensorDataset(x, y), batch_size=5), tmp_path)
    assert out.path == tmp_path / "cal.logits.arrow"
    assert listing(tmp_path) == ["cal.logits.arrow", "cal.logits.json"]

    reader = pa.ipc.open_file(str(out.path))
    assert reader.num_record_batches == 4 and [reader.get_batch(i).num_rows for i in range(4)] == [8, 8, 8, 6]
    table = reader.read_all()
    table.validate(full=True)
    assert table.column_names == ["logits", "sample_id", "label"]
    assert table.schema.field("logits").type == pa.list_(pa.float32(), 4)
    expected = out.logits  # the library's reader: plain pyarrow and pandas must read the same bits
    torch.testing.assert_close(expected, direct(model, x))
    np.testing.assert_array_equal(np.stack(table.column("logits").to_pylist()), expected.numpy())
    assert table.column("sample_id").to_pylist() == list(range(30))
    assert table.column("label").to_pylist() == y.tolist()

    meta = json.loads(table.schema.metadata[b"seapig_core"])
    assert meta == {
        "format": FORMAT, "schema_version": SCHEMA_VERSION, "library_version": __version__,
        "trailing_shape": [4], "n_classes": 4, "label": {"dtype": "int64", "shape": []},
        "sample_id": {"dtype": "int64"},
    }

    frame = pd.read_feather(out.path)
    assert list(frame.columns) == ["logits", "sample_id", "label"] and len(frame) == 30
    np.testing.assert_array_equal(np.stack(frame["logits"]), expected.numpy())
    np.testing.assert_array_equal(frame["sample_id"], np.arange(30))
    np.testing.assert_array_equal(frame["label"], y.numpy())
    assert torch.equal(out.labels, y) and out.sample_ids.tolist() == list(range(30))

    manifest = json.loads((tmp_path / "cal.logits.json").read_text())
    assert manifest["data_file"] == "cal.logits.arrow" and manifest["size"] == out.path.stat().st_size
    assert manifest["n_samples"] == 30 and manifest["logits_shape"] == [30, 4] and manifest["checksum"] == "xxh3_128"
    assert set(manifest["fingerprint"]) == {"key", "model", "data", "settings", "library_version", "schema_version"}
    assert manifest["fingerprint"]["key"] == out.fingerprint
    segments = manifest["segments"]
    assert [s["rows"] for s in segments] == [8, 8, 8, 6, 0]  # one per record batch, then the footer
    assert segments[0]["offset"] == 0 and sum(s["length"] for s in segments) == manifest["size"]
    assert all(a["offset"] + a["length"] == b["offset"] for a, b in zip(segments, segments[1:], strict=False))
    raw = out.path.read_bytes()
    for segment in segments:  # an independent check of the checksums
        chunk = raw[segment["offset"] : segment["offset"] + segment["length"]]
        assert xxhash.xxh3_128_hexdigest(chunk) == segment["digest"]


def test_default_entry_name_and_prefix_naming(tmp_path):
    assert entry_paths(tmp_path) == (tmp_path / "logits.arrow", tmp_path / "logits.json")
    out = run(LinearNet(), tensor_loader(10), tmp_path, prefix=None)
    assert out.path == tmp_path / "logits.arrow"


@pytest.mark.parametrize(
    ("name", "entry", "prefix"),
    [
        ("logits.arrow", True, None),
        ("cal.logits.arrow", True, "cal"),
        ("batch-007.v2.logits.arrow", True, "batch-007.v2"),
        (".logits.arrow", False, None),
        ("cal.arrow", False, None),
        ("cal.logits.json", False, None),
        ("cal.logits.arrow.parquet", False, None),
        ("a..b.logits.arrow", False, None),
        (".cal.logits.arrow.seapig-tmp-0a1b2c3d-0a1b2c3d-12-34-0a1b2c3d", False, None),
    ],
)
def test_one_owner_names_entries(tmp_path, name, entry, prefix):
    assert is_entry(tmp_path / name) is entry
    if entry:
        assert entry_prefix(tmp_path / name) == prefix
        assert entry_paths(tmp_path, prefix)[0] == tmp_path / name
    else:
        with pytest.raises(ValueError, match=r"'path' parameter must name a logits store entry"):
            entry_prefix(tmp_path / name)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_entries_are_memory_mapped_and_materialised_copies_are_private(tmp_path):
    loader = tensor_loader(40)
    first = run(LinearNet(), loader, tmp_path)
    served = run(LinearNet(), loader, tmp_path)
    assert served.from_cache
    with open("/proc/self/maps") as maps:
        assert str(first.path) in maps.read()  # opened by mapping the file, not by reading it
    original = served.logits.clone()
    served.logits[0] = 123.0  # an ordinary in-memory tensor: the file is unchanged
    chunk = next(served.stored.iter_chunks())
    chunk.logits[1] = -1.0  # a view of the private (copy-on-write) mapping: the file is unchanged
    again = run(LinearNet(), loader, tmp_path)
    assert again.from_cache and torch.equal(again.logits, original)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(0, 7), min_size=1, max_size=5).filter(lambda s: sum(s) > 0),
    trailing=st.sampled_from([(), (1,), (3,), (2, 3)]),
    label_kind=st.sampled_from([None, "int64", "float32", "bool", "vector", "uint8", "float16"]),
    string_ids=st.booleans(),
    batch_rows=st.sampled_from([None, 1, 3, 5]),
    max_rows=st.sampled_from([None, 1, 2, 4, 100]),
)
def test_writer_round_trips_any_batches(tmp_path_factory, sizes, trailing, label_kind, string_ids, batch_rows, max_rows):
    path, _ = entry_paths(tmp_path_factory.mktemp("store"), "prop")
    rng = np.random.default_rng(len(sizes))
    logits, labels, ids = [], [], []
    with LogitsWriter(path, batch_rows=batch_rows) as writer:
        for size in sizes:
            block = torch.from_numpy(rng.normal(size=(size, *trailing)).astype(np.float32))
            label = {
                None: None,
                "int64": torch.arange(size),
                "float32": torch.rand(size),
                "bool": torch.rand(size, 2) > 0.5,
                "vector": torch.rand(size, 2, 3),
                "uint8": torch.arange(size, dtype=torch.uint8),
                "float16": torch.rand(size).half(),
            }[label_kind]
            start = len(ids)
            batch_ids = np.array([f"é-{i}" for i in range(start, start + size)], dtype=object) if string_ids else (
                np.arange(start, start + size) * 3
            )
            writer.append(block, label, batch_ids)
            logits.append(block)
            labels.append(label)
            ids.extend(batch_ids.tolist())
        writer.commit({"key": "k"})
    stored = load_logits(path)
    expected_logits = torch.cat(logits)
    expected_labels = None if label_kind is None else torch.cat(labels)
    assert stored.logits_shape == tuple(expected_logits.shape) and stored.n_samples == len(ids)
    assert torch.equal(stored.logits, expected_logits)
    assert stored.sample_ids.tolist() == ids
    if label_kind is None:
        assert stored.labels is None
    else:
        assert stored.labels.dtype == expected_labels.dtype and torch.equal(stored.labels, expected_labels)
    chunks = list(load_logits(path).iter_chunks(max_rows))
    assert [c.start for c in chunks] == [0, *np.cumsum([c.rows for c in chunks])[:-1].tolist()]
    assert all(c.rows == max_rows for c in chunks[:-1]) if max_rows else True
    assert torch.equal(torch.cat([c.logits for c in chunks]), expected_logits)
    assert np.concatenate([c.sample_ids for c in chunks]).tolist() == ids
    if label_kind is not None:
        assert torch.equal(torch.cat([c.labels for c in chunks]), expected_labels)
    table = pa.ipc.open_file(str(path)).read_all()
    table.validate(full=True)
    assert table.num_rows == len(ids) and table.column("sample_id").to_pylist() == ids


def test_writer_leaves_nothing_behind_on_error_or_without_commit(tmp_path):
    path, _ = entry_paths(tmp_path, "w")
    with pytest.raises(RuntimeError, match="killed"):
        with LogitsWriter(path) as writer:
            writer.append(torch.zeros(4, 2), None, np.arange(4))
            raise RuntimeError("killed")
    with pytest.raises(RuntimeError, match="without commit"):
        with LogitsWriter(path) as writer:
            writer.append(torch.zeros(4, 2), None, np.arange(4))
    with pytest.raises(ValueError, match="match the first batch's logits shape"):
        with LogitsWriter(path) as writer:
            writer.append(torch.zeros(4, 2), None, np.arange(4))
            writer.append(torch.zeros(4, 3), None, np.arange(4))
    with pytest.raises(ValueError, match="empty extraction"):
        with LogitsWriter(path) as writer:
            writer.commit({"key": "k"})
    with pytest.raises(TypeError, match=r"Labels must be bool, integer or float16/32/64.*complex64"):
        with LogitsWriter(path) as writer:
            writer.append(torch.zeros(2, 2), torch.zeros(2, dtype=torch.complex64), np.arange(2))
    assert listing(tmp_path) == []


def test_a_failed_extraction_leaves_no_entry_and_keeps_the_old_one(tmp_path):
    class Failing(LinearNet):
        def logits(self, x):
            if self.calls == 3:
                raise RuntimeError("killed mid-way")
            return super().logits(x)

    with pytest.raises(RuntimeError, match="killed mid-way"):
        run(Failing(), tensor_loader(50), tmp_path)
    assert listing(tmp_path) == []
    good = run(LinearNet(), tensor_loader(50), tmp_path)
    before = good.path.read_bytes()
    with pytest.raises(RuntimeError, match="killed mid-way"):
        run(Failing(), tensor_loader(50), tmp_path, refresh=True)
    assert listing(tmp_path) == ["cal.logits.arrow", "cal.logits.json"]
    assert good.path.read_bytes() == before


# ---------------------------------------------------------------------------- cache hits and misses


def test_second_run_is_served_from_the_store_without_running_the_model(tmp_path):
    loader = tensor_loader(50)
    model = LinearNet()
    first = run(model, loader, tmp_path)
    calls = model.calls
    second = run(model, loader, tmp_path)
    assert not first.from_cache and second.from_cache and model.calls == calls
    assert second.fingerprint == first.fingerprint
    assert torch.equal(second.logits, first.logits) and torch.equal(second.labels, first.labels)
    np.testing.assert_array_equal(second.sample_ids, first.sample_ids)


def test_the_same_model_and_data_in_a_new_object_hit(tmp_path):
    first = run(LinearNet(seed=3), tensor_loader(20), tmp_path)
    second = run(LinearNet(seed=3), tensor_loader(20), tmp_path)  # equal weights, new objects
    assert second.from_cache and torch.equal(second.logits, first.logits)


def test_changed_weights_recompute(tmp_path):
    loader = tensor_loader(30)
    model = LinearNet()
    first = run(model, loader, tmp_path)
    with torch.no_grad():
        model.linear.weight[0, 0] += 1e-3
    second = run(model, loader, tmp_path)
    assert not second.from_cache and second.fingerprint != first.fingerprint
    assert not torch.equal(second.logits, first.logits)
    assert run(model, loader, tmp_path).from_cache


def test_changed_buffers_recompute(tmp_path):
    loader = tensor_loader(30)
    model = DropoutNet()
    first = run(model, loader, tmp_path)
    with torch.no_grad():
        model.body[1].running_mean += 0.5  # a buffer, not a parameter
    second = run(model, loader, tmp_path)
    assert not second.from_cache and not torch.equal(second.logits, first.logits)


def test_another_model_class_with_equal_weights_recomputes(tmp_path):
    class Scaled(LinearNet):
        def logits(self, x):
            return 2 * super().logits(x)

    loader = tensor_loader(20)
    first = run(LinearNet(), loader, tmp_path)
    second = run(Scaled(), loader, tmp_path)
    assert not second.from_cache
    torch.testing.assert_close(second.logits, 2 * first.logits)


def test_changed_data_recomputes(tmp_path):
    model = LinearNet()
    run(model, tensor_loader(30, seed=0), tmp_path)
    changed = run(model, tensor_loader(30, seed=1), tmp_path)
    assert not changed.from_cache
    rebatched = run(model, tensor_loader(30, seed=1, batch_size=7), tmp_path)
    assert not rebatched.from_cache  # batching is part of what the loader yields
    x, y = tensor_data(30, seed=1)
    y[0] = (y[0] + 1) % 4
    relabelled = run(model, DataLoader(TensorDataset(x, y), batch_size=7), tmp_path)
    assert not relabelled.from_cache and torch.equal(relabelled.labels, y)


def test_changed_settings_and_library_version_recompute(tmp_path, monkeypatch):
    x, y = tensor_data(20)
    batches = [{"x": x[i : i + 5], "y": y[i : i + 5], "cls": y[i : i + 5]} for i in range(0, 20, 5)]
    model = LinearNet()
    run(model, batches, tmp_path)
    assert run(model, batches, tmp_path).from_cache
    assert not run(model, batches, tmp_path, label_key="cls").from_cache
    monkeypatch.setattr(extract_module, "__version__", "99.0")
    assert not run(model, batches, tmp_path, label_key="cls").from_cache


def test_refresh_recomputes_and_overwrites(tmp_path):
    loader = tensor_loader(20)
    model = LinearNet()
    run(model, loader, tmp_path)
    calls = model.calls
    out = run(model, loader, tmp_path, refresh=True)
    assert not out.from_cache and model.calls > calls
    assert run(model, loader, tmp_path).from_cache


def test_a_hit_reads_the_loader_once_and_a_given_data_fingerprint_not_at_all(tmp_path):
    x, _ = tensor_data(20)
    loader = CountingLoader([x[:10], x[10:]])
    model = LinearNet()
    run(model, loader, tmp_path)
    assert loader.passes == 1  # nothing to compare with: extract and fingerprint in one pass
    assert run(model, loader, tmp_path).from_cache and loader.passes == 2

    run(model, loader, tmp_path, prefix="named", data_fingerprint="digits-v1")
    passes = loader.passes
    hit = run(model, loader, tmp_path, prefix="named", data_fingerprint="digits-v1")
    assert hit.from_cache and loader.passes == passes
    assert not run(model, loader, tmp_path, prefix="named", data_fingerprint="digits-v2").from_cache


def test_one_shot_loaders_need_a_data_fingerprint(tmp_path):
    x, _ = tensor_data(20)
    with pytest.raises(TypeError, match=r"'loader' parameter must be re-iterable.*Got a one-shot generator"):
        run(LinearNet(), (b for b in [x[:10], x[10:]]), tmp_path)
    out = run(LinearNet(), (b for b in [x[:10], x[10:]]), tmp_path, data_fingerprint="v1")
    assert out.n_samples == 20
    refreshed = run(LinearNet(), (b for b in [x[:10], x[10:]]), tmp_path, prefix="fresh", refresh=True)
    assert refreshed.n_samples == 20 and run(LinearNet(), [x[:10], x[10:]], tmp_path, prefix="fresh").from_cache


def test_string_ids_round_trip_through_the_store(tmp_path):
    x, y = tensor_data(9)
    batches = [{"image": x[i : i + 3], "label": y[i : i + 3], "id": [f"ü{j}" for j in range(i, i + 3)]} for i in (0, 3, 6)]
    first = run(LinearNet(), batches, tmp_path)
    second = run(LinearNet(), batches, tmp_path)
    assert second.from_cache
    assert second.sample_ids.tolist() == first.sample_ids.tolist() == [f"ü{j}" for j in range(9)]


def test_fingerprints_see_content_not_identity():
    assert model_fingerprint(LinearNet(seed=1)) == model_fingerprint(LinearNet(seed=1))
    assert model_fingerprint(LinearNet(seed=1))["state"] != model_fingerprint(LinearNet(seed=2))["state"]
    wide = LinearNet(n_classes=5)
    assert model_fingerprint(wide)["architecture"] != model_fingerprint(LinearNet())["architecture"]

    def digest(*batches):
        fingerprint = DataFingerprint()
        for batch in batches:
            fingerprint.update(*batch)
        return fingerprint.hexdigest()

    x = torch.arange(6.0).reshape(3, 2)
    assert digest((x, None, None)) == digest((x.clone(), None, None))
    assert digest((x, None, None)) != digest((x.double(), None, None))  # dtype
    assert digest((x, None, None)) != digest((x.reshape(2, 3), None, None))  # shape
    assert digest((x, None, None)) != digest((x[:1], None, None), (x[1:], None, None))  # batching
    assert digest(({"a": x}, None, None)) != digest(({"b": x}, None, None))  # structure
    assert digest((x, None, np.array(["a", "b", "c"], dtype=object))) != digest((x, None, np.array(["a", "b", "d"], dtype=object)))
    with pytest.raises(TypeError, match=r"cannot hash a object.*Pass 'data_fingerprint'"):
        digest((object(), None, None))


# ---------------------------------------------------------------------------- corrupt and tampered entries


class _Payload:
    """Unpickling this creates ``marker``: proof that something was (or was not) executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _replace(path, data: bytes) -> None:
    # A new file under the old name, as a copy or a download would leave it; an in-place
    # truncation of a file mapped by this process would crash it (SIGBUS), not the store.
    path.unlink()
    path.write_bytes(data)


def _tamper_cases(path, marker):
    original = path.read_bytes()
    flipped = bytearray(original)
    flipped[-20] ^= 0xFF  # inside the footer, which opening checks
    return {
        "truncated": original[: len(original) // 2],
        "arbitrary bytes": os.urandom(len(original)),
        "pickle payload": pickle.dumps(_Payload(marker)),
        "flipped footer byte": bytes(flipped),
        "empty": b"",
    }


@pytest.mark.parametrize("case", ["truncated", "arbitrary bytes", "pickle payload", "flipped footer byte", "empty"])
def test_tampered_data_files_are_recomputed_safely(tmp_path, case):
    outdir, marker = tmp_path / "store", tmp_path / "executed"
    loader = tensor_loader(40)
    model = LinearNet()
    first = run(model, loader, outdir)
    expected = first.logits.clone()
    _replace(first.path, _tamper_cases(first.path, marker)[case])
    calls = model.calls
    with pytest.warns(CorruptEntryWarning, match=r"cal\.logits\.arrow.*Recomputing"):
        again = run(model, loader, outdir)
    assert not again.from_cache and model.calls > calls
    assert torch.equal(again.logits, expected)
    assert not marker.exists()  # nothing was unpickled or executed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run(model, loader, outdir).from_cache  # repaired


@pytest.mark.parametrize("case", ["pickle payload", "not json", "wrong format", "missing"])
def test_bad_manifests_are_recomputed_safely(tmp_path, case):
    outdir, marker = tmp_path / "store", tmp_path / "executed"
    loader = tensor_loader(20)
    first = run(LinearNet(), loader, outdir)
    manifest = outdir / "cal.logits.json"
    if case == "missing":
        manifest.unlink()  # a run killed between the data file and its manifest
    else:
        manifest.write_bytes(
            {
                "pickle payload": pickle.dumps(_Payload(marker)),
                "not json": b"{\x00",
                "wrong format": json.dumps({"format": "other", "fingerprint": {}}).encode(),
            }[case]
        )
    with pytest.warns(CorruptEntryWarning, match=r"Recomputing"):
        again = run(LinearNet(), loader, outdir)
    assert not again.from_cache and torch.equal(again.logits, first.logits)
    assert not marker.exists()


def test_a_manifest_whose_data_file_is_gone_recomputes(tmp_path):
    first = run(LinearNet(), tensor_loader(20), tmp_path)
    first.path.unlink()
    with pytest.warns(CorruptEntryWarning, match=r"data file is missing"):
        assert not run(LinearNet(), tensor_loader(20), tmp_path).from_cache


def test_another_entrys_files_copied_over_an_entry_are_not_served(tmp_path):
    loader = tensor_loader(20)
    a = run(LinearNet(seed=1), loader, tmp_path, prefix="a")
    b = run(LinearNet(seed=2), loader, tmp_path, prefix="b")
    # b's data file alone, over a's (same shape, same size): a's checksums refuse it when read.
    _replace(tmp_path / "a.logits.arrow", (tmp_path / "b.logits.arrow").read_bytes())
    served = run(LinearNet(seed=1), loader, tmp_path, prefix="a")
    with pytest.raises(CorruptEntryError, match=r"a\.logits\.arrow.*fail their xxh3_128 checksum.*manifest was removed"):
        _ = served.logits
    with pytest.warns(CorruptEntryWarning, match=r"a\.logits\.arrow.*has no manifest"):
        again = run(LinearNet(seed=1), loader, tmp_path, prefix="a")
    assert not again.from_cache and torch.equal(again.logits, a.logits)
    # b's data file and manifest both copied under a's names: the manifest names another file.
    (tmp_path / "a.logits.arrow").write_bytes((tmp_path / "b.logits.arrow").read_bytes())
    (tmp_path / "a.logits.json").write_bytes((tmp_path / "b.logits.json").read_bytes())
    with pytest.warns(CorruptEntryWarning, match=r"describes 'b\.logits\.arrow', not 'a\.logits\.arrow'"):
        assert not run(LinearNet(seed=1), loader, tmp_path, prefix="a").from_cache
    assert torch.equal(run(LinearNet(seed=2), loader, tmp_path, prefix="b").logits, b.logits)


@pytest.mark.parametrize("where", ["first chunk", "middle chunk", "last chunk"])
def test_a_corrupt_chunk_fails_when_read_and_the_entry_is_then_recomputed(tmp_path, monkeypatch, where):
    monkeypatch.setattr(store, "BATCH_ROWS", 16)
    loader = tensor_loader(64)
    model = LinearNet()
    first = run(model, loader, tmp_path)
    expected = first.logits.clone()
    manifest = json.loads((tmp_path / "cal.logits.json").read_text())
    index = {"first chunk": 0, "middle chunk": 2, "last chunk": 3}[where]
    segment = manifest["segments"][index]
    raw = bytearray(first.path.read_bytes())
    raw[segment["offset"] + segment["length"] - 9] ^= 0x01  # one bit of the chunk's last bytes
    _replace(first.path, bytes(raw))

    served = run(model, loader, tmp_path)  # opening checks the footer, not every chunk
    assert served.from_cache and served.n_samples == 64
    chunks = served.stored.iter_chunks()
    for _ in range(index):  # the chunks before the corrupt one are served, verified
        chunk = next(chunks)
        assert torch.equal(chunk.logits, expected[chunk.start : chunk.stop])
    rows = f"{16 * index}-{16 * index + 15}"
    with pytest.raises(CorruptEntryError, match=rf"cal\.logits\.arrow' is corrupt: rows {rows} \(chunk {index}\) fail"):
        next(chunks)
    assert not (tmp_path / "cal.logits.json").exists()  # invalidated: never served again
    calls = model.calls
    with pytest.warns(CorruptEntryWarning, match=r"has no manifest"):
        again = run(model, loader, tmp_path)
    assert not again.from_cache and model.calls > calls and torch.equal(again.logits, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run(model, loader, tmp_path).from_cache


def test_opening_checks_only_the_footer_and_reading_verifies_each_chunk_once(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "BATCH_ROWS", 64)
    run(LinearNet(), tensor_loader(1000, batch_size=100), tmp_path)
    hashed = []
    real = store._checksum
    monkeypatch.setattr(store, "_checksum", lambda data: hashed.append(memoryview(data).nbytes) or real(data))
    manifest = json.loads((tmp_path / "cal.logits.json").read_text())
    size, footer = manifest["size"], manifest["segments"][-1]["length"]
    stored = load_logits(tmp_path / "cal.logits.arrow")
    assert hashed == [footer] and footer < size / 20  # opening: the footer only
    assert stored.n_samples == 1000 and stored.logits_shape == (1000, 4) and stored.chunk_rows[0] == 64
    hashed.clear()
    total = sum(chunk.rows for chunk in stored.iter_chunks(100))
    assert total == 1000 and sum(hashed) == size - footer  # each chunk once, in the same pass
    hashed.clear()
    stored.logits, stored.labels, stored.sample_ids, stored.verify()
    assert hashed == []  # verified chunks are not hashed again
    hit = run(LinearNet(), tensor_loader(1000, batch_size=100), tmp_path)
    assert hit.from_cache and hashed == [footer]  # a hit opens the entry; reading it verifies it


def test_iter_chunks_gives_row_ranges_in_chunks_of_max_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "BATCH_ROWS", 10)
    out = run(LinearNet(), tensor_loader(45, batch_size=7), tmp_path)
    stored = out.stored
    assert stored.chunk_rows == (10, 10, 10, 10, 5)
    for max_rows, start, stop in [(None, 0, 45), (10, 0, 45), (4, 0, 45), (25, 3, 44), (1, 19, 21), (7, 45, 45)]:
        chunks = list(stored.iter_chunks(max_rows, start=start, stop=stop))
        sizes = [c.rows for c in chunks]
        if max_rows is not None:
            assert all(n == max_rows for n in sizes[:-1]) and (not sizes or 0 < sizes[-1] <= max_rows)
        assert sum(sizes) == stop - start and (not chunks or chunks[0].start == start)
        for chunk in chunks:
            assert torch.equal(chunk.logits, out.logits[chunk.start : chunk.stop])
            assert torch.equal(chunk.labels, out.labels[chunk.start : chunk.stop])
            assert chunk.sample_ids.tolist() == list(range(chunk.start, chunk.stop))
    inside = next(stored.iter_chunks(5, start=10))
    assert np.shares_memory(inside.logits.numpy(), next(stored.iter_chunks(start=10)).logits.numpy())  # zero-copy
    with pytest.raises(ValueError, match=r"'max_rows' parameter must be a positive int or None\. Got 0"):
        stored.iter_chunks(0)
    with pytest.raises(ValueError, match=r"'stop' parameter must be an int in \[0, 45\]\. Got 46"):
        stored.iter_chunks(stop=46)
    with pytest.raises(ValueError, match=r"'start' parameter must not exceed 'stop'"):
        stored.iter_chunks(start=9, stop=3)


def test_lookup_is_the_cache_policy_and_computes_costly_components_last(tmp_path):
    data_path, _ = entry_paths(tmp_path, "p")
    components = {"model": {"state": "m1"}, "data": {"value": "d1"}, "settings": ("a", 1)}
    with LogitsWriter(data_path) as writer:
        writer.append(torch.zeros(3, 2), None, np.arange(3))
        writer.commit({**components, "key": store.fingerprint_key(store._as_json(components))})
    assert lookup(tmp_path, "missing", components) is None
    served = lookup(tmp_path, "p", components)
    assert served is not None and served.logits_shape == (3, 2)
    calls = []

    def data():
        calls.append(1)
        return {"value": "d1"}

    assert lookup(tmp_path, "p", {**components, "model": {"state": "m2"}, "data": data}) is None
    assert calls == []  # another model: the data was never fingerprinted
    assert lookup(tmp_path, "p", {**components, "data": data}) is not None and calls == [1]
    assert lookup(tmp_path, "p", {**components, "data": lambda: {"value": "d2"}}) is None


def test_load_logits_verifies_and_explains(tmp_path):
    out = run(LinearNet(), tensor_loader(20), tmp_path)
    stored = load_logits(out.path)
    assert torch.equal(stored.logits, out.logits) and stored.fingerprint == out.fingerprint and stored.verified
    with pytest.raises(ValueError, match=r"'path' parameter must name a valid logits store file.*does not exist"):
        load_logits(tmp_path / "nope.logits.arrow")
    _replace(out.path, out.path.read_bytes()[:-7])
    with pytest.raises(CorruptEntryError, match=r"truncated"):
        load_logits(out.path)
    with pytest.raises(ValueError, match=r"not a readable Arrow IPC store file"):
        load_logits(out.path, verify=False)


def test_a_data_file_without_its_manifest_is_never_read_unverified(tmp_path):
    out = run(LinearNet(), tensor_loader(20), tmp_path)
    (tmp_path / "cal.logits.json").unlink()  # a run killed between the two files, or a lone copy
    with pytest.raises(ValueError, match=r"cal\.logits\.arrow'.*has no manifest '.*cal\.logits\.json'.*verify=False"):
        load_logits(out.path)
    unverified = load_logits(out.path, verify=False)  # only when asked for
    assert not unverified.verified and unverified.fingerprint is None and unverified.n_samples == 20


# ---------------------------------------------------------------------------- bad manifests (issue 8.5)


def _nested(depth: int) -> bytes:
    return b'{"format": "seapig_core.logits.manifest", "x": ' + b"[" * depth + b"]" * depth + b"}"


def _edit(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _swap(path, make):
    path.unlink()
    make(path)


BAD_MANIFESTS = {
    "deeply nested": (lambda p: p.write_bytes(_nested(100_000)), r"nests JSON 100001 levels deep; at most 64"),
    "JSON list": (lambda p: p.write_text("[1, 2, 3]"), r"must hold a JSON object\. Got a JSON list"),
    "invalid UTF-8": (lambda p: p.write_bytes(b'{"format": "\xff\xfe"}'), r"not UTF-8 text"),
    "not JSON": (lambda p: p.write_bytes(b"{\x00"), r"not valid JSON"),
    "NaN": (lambda p: p.write_text('{"size": NaN}'), r"non-standard JSON constant NaN"),
    "fingerprint a list": (lambda p: _edit(p, fingerprint=[]), r"lacks the fingerprint key"),
    "segments a string": (lambda p: _edit(p, segments="abc"), r"lacks a valid size, n_samples"),
    "segments of wrong types": (lambda p: _edit(p, segments=[None, {"offset": True}]), r"segment 0 is not an object"),
    "size a bool": (lambda p: _edit(p, size=True), r"lacks a valid size"),
    "dangling symlink": (lambda p: _swap(p, lambda q: q.symlink_to(q.parent / "nowhere")), r"not a regular file"),
    "FIFO": (lambda p: _swap(p, os.mkfifo), r"not a regular file"),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_unreadable_manifests_recompute_with_a_warning_naming_the_file(tmp_path, case):
    loader = tensor_loader(20)
    first = run(LinearNet(), loader, tmp_path)
    manifest = tmp_path / "cal.logits.json"
    damage, reason = BAD_MANIFESTS[case]
    damage(manifest)
    with pytest.raises(ValueError, match=rf"valid logits store file.*cal\.logits\.arrow.*{reason}"):
        load_logits(first.path)
    with pytest.warns(CorruptEntryWarning, match=rf"cal\.logits\.arrow.*{reason}.*Recomputing") as caught:
        again = run(LinearNet(), loader, tmp_path)
    assert "cal.logits.json" in str(caught[0].message)
    assert not again.from_cache and torch.equal(again.logits, first.logits)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run(LinearNet(), loader, tmp_path).from_cache  # repaired, never blocked for good


def test_an_entry_of_an_older_schema_version_is_recomputed_quietly(tmp_path, caplog):
    loader = tensor_loader(20)
    run(LinearNet(), loader, tmp_path)
    _edit(tmp_path / "cal.logits.json", schema_version=1)
    with warnings.catch_warnings(), caplog.at_level("INFO", logger="seapig_core.store"):
        warnings.simplefilter("error")
        assert not run(LinearNet(), loader, tmp_path).from_cache
    assert "schema version 1" in caplog.text
    assert run(LinearNet(), loader, tmp_path).from_cache


def test_a_directory_in_place_of_an_entry_file_is_a_clear_error(tmp_path):
    (tmp_path / "cal.logits.json").mkdir()
    with pytest.raises(ValueError, match=r"cal\.logits\.json' is a directory\. Remove it"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CorruptEntryWarning)
            run(LinearNet(), tensor_loader(20), tmp_path)
    assert listing(tmp_path) == ["cal.logits.json"]


# ---------------------------------------------------------------------------- containment


@pytest.mark.parametrize("prefix", ["../escape", "a/b", "..", "x\\y", "sub/../../escape", ""])
def test_prefixes_that_leave_outdir_are_refused_and_nothing_is_written(tmp_path, prefix):
    outdir = tmp_path / "store"
    outdir.mkdir()
    with pytest.raises(ValueError, match=r"'prefix' parameter must be a plain file-name stem"):
        run(LinearNet(), tensor_loader(10), outdir, prefix=prefix)
    assert listing(tmp_path) == ["store"] and listing(outdir) == []


def test_lazy_models_must_be_initialised_before_caching(tmp_path):
    class Lazy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.LazyLinear(3)

        def logits(self, x):
            return self.linear(x)

    model = Lazy()
    with pytest.raises(ValueError, match=r"initialised weights.*'linear\.weight'.*run one forward pass first"):
        run(model, tensor_loader(10), tmp_path)
    assert listing(tmp_path) == []
    model.logits(torch.zeros(1, 6))
    assert run(model, tensor_loader(10), tmp_path).n_samples == 10


def test_prefix_must_be_a_string(tmp_path):
    with pytest.raises(TypeError, match=r"'prefix' parameter must be a str\. Got int"):
        run(LinearNet(), tensor_loader(10), tmp_path, prefix=3)


def test_an_outdir_that_cannot_be_written_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=r"'outdir' parameter must be a directory\. Got the file"):
        run(LinearNet(), tensor_loader(10), blocker)
    with pytest.raises(ValueError, match=r"'outdir' parameter must be a writable directory"):
        run(LinearNet(), tensor_loader(10), blocker / "sub")
    assert listing(tmp_path) == ["file"]


def test_outdir_is_created_and_holds_everything(tmp_path):
    outdir = tmp_path / "a" / "b"
    run(LinearNet(), tensor_loader(10), outdir)
    assert listing(tmp_path) == ["a"] and listing(outdir) == ["cal.logits.arrow", "cal.logits.json"]


# ---------------------------------------------------------------------------- fit end to end


def test_fit_with_model_and_loader_uses_the_store(tmp_path):
    x, y = tensor_data(200)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    model = DropoutNet()
    model.train()
    reference = SoftmaxScore().fit(X=extract_logits(model, loader, progress=False).logits, Y=y)

    first = SoftmaxScore().fit(model=model, loader=loader, outdir=tmp_path, prefix="calib", progress=False)
    assert listing(tmp_path) == ["calib.logits.arrow", "calib.logits.json"]
    written = (tmp_path / "calib.logits.arrow").stat().st_mtime_ns
    second = SoftmaxScore().fit(model=model, loader=loader, outdir=tmp_path, prefix="calib", progress=False)
    assert (tmp_path / "calib.logits.arrow").stat().st_mtime_ns == written  # served, not rewritten
    assert model.training  # fit left the model as it found it

    for fitted in (first, second):
        assert fitted.temperature == pytest.approx(reference.temperature)
        torch.testing.assert_close(fitted.scores, reference.scores)
        assert torch.equal(fitted.labels, y)
    second.set_threshold(0.9)
    selection = second.select(torch.zeros(5, 4))
    assert selection["selected"].shape == (5,)


def test_fit_forwards_refresh_and_rejects_a_bad_prefix(tmp_path):
    loader = tensor_loader(20)
    model = LinearNet()
    SoftmaxScore().fit(model=model, loader=loader, outdir=tmp_path, prefix="c", progress=False)
    calls = model.calls
    SoftmaxScore().fit(model=model, loader=loader, outdir=tmp_path, prefix="c", progress=False, refresh=True)
    assert model.calls > calls
    with pytest.raises(ValueError, match=r"'prefix' parameter must be a plain file-name stem"):
        SoftmaxScore().fit(model=model, loader=loader, outdir=tmp_path, prefix="../c", progress=False)


def _crafted(path, n=6, width=4, trailing=None, fmt=FORMAT, batches=1, logits_type=None, extra=False, nulls=False):
    meta = {
        "format": fmt,
        "schema_version": SCHEMA_VERSION,
        "trailing_shape": [width] if trailing is None else trailing,
        "label": None,
        "sample_id": {"dtype": "int64"},
    }
    values = pa.array(np.arange(n * width, dtype=np.float32))
    logits = pa.FixedSizeListArray.from_arrays(values.cast(logits_type) if logits_type else values, width)
    ids = pa.array(np.arange(n), mask=np.arange(n) == 2 if nulls else None)
    columns = {"logits": logits, "sample_id": ids, **({"extra": pa.array(np.zeros(n))} if extra else {})}
    nullable = {"logits": False, "sample_id": nulls, "extra": False}
    schema = pa.schema([pa.field(k, v.type, nullable=nullable[k]) for k, v in columns.items()])
    table = pa.table(columns, schema=schema).replace_schema_metadata({b"seapig_core": json.dumps(meta).encode()})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        for _ in range(batches):
            writer.write_table(table)


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({}, None),
        ({"batches": 3}, None),
        ({"trailing": [5]}, "not the recorded layout"),
        ({"trailing": [2, 2]}, None),
        ({"fmt": "something else"}, "no 'seapig_core.logits' format header"),
        ({"logits_type": pa.float64()}, "not the recorded layout"),
        ({"trailing": "abc"}, "trailing_shape 'abc' is not a list of positive ints"),
        ({"trailing": [0]}, "not a list of positive ints"),
        ({"extra": True}, "not the recorded layout"),
        ({"nulls": True}, "not the recorded layout"),
    ],
    ids=["valid", "three-batches", "wrong-width", "2d", "format", "float64", "shape-not-a-list", "zero-width",
         "extra-column", "nullable"],
)
def test_crafted_arrow_files_are_refused_not_trusted(tmp_path, options, reason):
    path = tmp_path / "crafted.logits.arrow"
    _crafted(path, **options)
    if reason is None:  # the reader accepts any well-formed file of this layout, not only its own writer's
        stored = load_logits(path, verify=False)
        batches = options.get("batches", 1)
        assert stored.logits_shape == (6 * batches, *(options.get("trailing") or [4]))
        assert stored.sample_ids.tolist() == list(range(6)) * batches
        assert torch.equal(stored.logits.reshape(6 * batches, 4)[:6], torch.arange(24.0).reshape(6, 4))
    else:
        with pytest.raises(ValueError, match=reason):
            _ = load_logits(path, verify=False).logits


def test_a_miss_says_which_part_of_the_fingerprint_changed(tmp_path, caplog):
    model = LinearNet()
    run(model, tensor_loader(20), tmp_path)
    with torch.no_grad():
        model.linear.bias += 1
    with caplog.at_level("INFO", logger="seapig_core.store"):
        run(model, tensor_loader(20), tmp_path)
    assert "its model changed" in caplog.text


def test_a_store_extraction_is_read_lazily(tmp_path, monkeypatch):
    run(LinearNet(), tensor_loader(50), tmp_path)
    hashed = []
    real = store._checksum
    monkeypatch.setattr(store, "_checksum", lambda data: hashed.append(memoryview(data).nbytes) or real(data))
    hit = run(LinearNet(), tensor_loader(50), tmp_path)
    assert hit.from_cache and hit.n_samples == 50 and hit.path == tmp_path / "cal.logits.arrow"
    assert len(hashed) == 1  # the footer: nothing read yet
    assert hit.stored.logits_shape == (50, 4) and hit.fingerprint == hit.stored.fingerprint
    assert hit.logits.shape == (50, 4) and len(hashed) == 2  # read (and verified) on first access
    assert "n_samples=50" in repr(hit) and "cal.logits.arrow" in repr(hit)


def test_labels_with_an_empty_axis_are_refused_when_written(tmp_path):
    path, _ = entry_paths(tmp_path, "e")
    with pytest.raises(ValueError, match=r"Labels must have at least one value per sample to be stored\. Got shape \(3, 0\)"):
        with LogitsWriter(path) as writer:
            writer.append(torch.zeros(3, 2), torch.zeros(3, 0), np.arange(3))
    assert listing(tmp_path) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_extraction_is_stored_and_served_to_a_cpu_run(tmp_path):
    out = run(LinearNet().cuda(), tensor_loader(64, batch_size=16, pin_memory=True), tmp_path)
    assert out.logits.device.type == "cpu" and out.logits.dtype == torch.float32
    assert load_logits(out.path).logits.device.type == "cpu"
    served = run(LinearNet(), tensor_loader(64, batch_size=16), tmp_path)  # the same weights, on the CPU
    assert served.from_cache and torch.equal(served.logits, out.logits)
    torch.testing.assert_close(served.logits, extract_logits(LinearNet(), tensor_loader(64), progress=False).logits)
