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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from seapig_core import SoftmaxScore, __version__
from seapig_core import extract as extract_module
from seapig_core.extract import extract_logits
from seapig_core.store import (
    FORMAT,
    SCHEMA_VERSION,
    CorruptEntryWarning,
    DataFingerprint,
    LogitsWriter,
    entry_paths,
    load_logits,
    model_fingerprint,
)
from tests.core.extract_models import CountingLoader, DropoutNet, LinearNet, tensor_data, tensor_loader


def run(model, loader, outdir, prefix="cal", **kwargs):
    return extract_logits(model, loader, outdir=outdir, prefix=prefix, progress=False, **kwargs)


def listing(directory):
    return sorted(p.name for p in directory.iterdir())


# ---------------------------------------------------------------------------- format


def test_entry_is_an_arrow_ipc_file_that_pyarrow_and_pandas_read(tmp_path):
    x, y = tensor_data(30)
    model = LinearNet()
    out = run(model, DataLoader(TensorDataset(x, y), batch_size=8), tmp_path)
    assert out.path == tmp_path / "cal.logits.arrow"
    assert listing(tmp_path) == ["cal.logits.arrow", "cal.logits.json"]

    table = pa.ipc.open_file(str(out.path)).read_all()
    table.validate(full=True)
    assert table.column_names == ["logits", "sample_id", "label"]
    assert table.schema.field("logits").type == pa.list_(pa.float32(), 4)
    np.testing.assert_array_equal(np.stack(table.column("logits").to_pylist()), out.logits.numpy())
    assert table.column("sample_id").to_pylist() == list(range(30))
    assert table.column("label").to_pylist() == y.tolist()

    meta = json.loads(table.schema.metadata[b"seapig_core"])
    assert meta["format"] == FORMAT and meta["schema_version"] == SCHEMA_VERSION
    assert meta["library_version"] == __version__
    assert meta["n_samples"] == 30 and meta["logits_shape"] == [30, 4] and meta["n_classes"] == 4
    assert meta["label"] == {"dtype": "int64", "shape": []}
    assert set(meta["fingerprint"]) == {"key", "model", "data", "settings", "library_version", "schema_version"}
    assert meta["fingerprint"]["key"] == out.fingerprint

    frame = pd.read_feather(out.path)
    assert list(frame.columns) == ["logits", "sample_id", "label"] and len(frame) == 30
    np.testing.assert_array_equal(np.stack(frame["logits"]), out.logits.numpy())

    manifest = json.loads((tmp_path / "cal.logits.json").read_text())
    assert manifest["data_file"] == "cal.logits.arrow" and manifest["size"] == out.path.stat().st_size
    assert manifest["fingerprint"] == meta["fingerprint"]


def test_default_entry_name_and_prefix_naming(tmp_path):
    assert entry_paths(tmp_path) == (tmp_path / "logits.arrow", tmp_path / "logits.json")
    out = run(LinearNet(), tensor_loader(10), tmp_path, prefix=None)
    assert out.path == tmp_path / "logits.arrow"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_served_logits_are_memory_mapped_and_copy_on_write(tmp_path):
    loader = tensor_loader(40)
    first = run(LinearNet(), loader, tmp_path)
    served = run(LinearNet(), loader, tmp_path)
    assert served.from_cache
    with open("/proc/self/maps") as maps:
        assert str(first.path) in maps.read()
    original = served.logits.clone()
    served.logits[0] = 123.0  # private to this process: the file is unchanged
    again = run(LinearNet(), loader, tmp_path)
    assert again.from_cache and torch.equal(again.logits, original)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(0, 7), min_size=1, max_size=5).filter(lambda s: sum(s) > 0),
    trailing=st.sampled_from([(), (1,), (3,), (2, 3)]),
    label_kind=st.sampled_from([None, "int64", "float32", "bool", "vector", "uint8"]),
    string_ids=st.booleans(),
)
def test_writer_round_trips_any_batches(tmp_path_factory, sizes, trailing, label_kind, string_ids):
    path, _ = entry_paths(tmp_path_factory.mktemp("store"), "prop")
    rng = np.random.default_rng(len(sizes))
    logits, labels, ids = [], [], []
    with LogitsWriter(path) as writer:
        for size in sizes:
            block = torch.from_numpy(rng.normal(size=(size, *trailing)).astype(np.float32))
            label = {
                None: None,
                "int64": torch.arange(size),
                "float32": torch.rand(size),
                "bool": torch.rand(size, 2) > 0.5,
                "vector": torch.rand(size, 2, 3),
                "uint8": torch.arange(size, dtype=torch.uint8),
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
    assert torch.equal(stored.logits, torch.cat(logits))
    assert stored.sample_ids.tolist() == ids
    if label_kind is None:
        assert stored.labels is None
    else:
        assert torch.equal(stored.labels, torch.cat(labels))
    pa.ipc.open_file(str(path)).read_all().validate(full=True)


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
    flipped[len(flipped) // 2] ^= 0xFF
    return {
        "truncated": original[: len(original) // 2],
        "arbitrary bytes": os.urandom(len(original)),
        "pickle payload": pickle.dumps(_Payload(marker)),
        "one flipped byte": bytes(flipped),
        "empty": b"",
    }


@pytest.mark.parametrize("case", ["truncated", "arbitrary bytes", "pickle payload", "one flipped byte", "empty"])
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


def test_a_forged_manifest_for_another_entry_is_not_served(tmp_path):
    # Swap in another entry's data file and manifest size/hash: the file's own fingerprint
    # must still match the requested one.
    loader = tensor_loader(20)
    run(LinearNet(seed=1), loader, tmp_path, prefix="a")
    run(LinearNet(seed=2), loader, tmp_path, prefix="b")
    manifest_a = json.loads((tmp_path / "a.logits.json").read_text())
    manifest_b = json.loads((tmp_path / "b.logits.json").read_text())
    (tmp_path / "a.logits.arrow").write_bytes((tmp_path / "b.logits.arrow").read_bytes())
    manifest_a.update(size=manifest_b["size"], sha256=manifest_b["sha256"])
    (tmp_path / "a.logits.json").write_text(json.dumps(manifest_a))
    with pytest.warns(CorruptEntryWarning, match=r"fingerprint differs"):
        out = run(LinearNet(seed=1), loader, tmp_path, prefix="a")
    assert not out.from_cache


def test_load_logits_verifies_and_explains(tmp_path):
    out = run(LinearNet(), tensor_loader(20), tmp_path)
    stored = load_logits(out.path)
    assert torch.equal(stored.logits, out.logits) and stored.fingerprint == out.fingerprint
    with pytest.raises(ValueError, match=r"'path' parameter must name a valid logits store file.*does not exist"):
        load_logits(tmp_path / "nope.logits.arrow")
    _replace(out.path, out.path.read_bytes()[:-7])
    with pytest.raises(ValueError, match=r"truncated"):
        load_logits(out.path)
    with pytest.raises(ValueError, match=r"not a readable Arrow IPC store file"):
        load_logits(out.path, verify=False)
    (tmp_path / "other.logits.arrow").write_bytes(b"ARROW1")
    with pytest.raises(ValueError, match=r"manifest is not readable"):
        load_logits(tmp_path / "other.logits.arrow")


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


def _crafted(path, n=6, width=4, rows_claimed=None, shape=None, fmt=FORMAT, batches=1, logits_type=None):
    meta = {
        "format": fmt,
        "schema_version": SCHEMA_VERSION,
        "n_samples": rows_claimed or n,
        "logits_shape": shape or [rows_claimed or n, width],
        "label": None,
        "fingerprint": {"key": "k"},
    }
    values = pa.array(np.arange(n * width, dtype=np.float32))
    logits = pa.FixedSizeListArray.from_arrays(values.cast(logits_type) if logits_type else values, width)
    table = pa.table({"logits": logits, "sample_id": pa.array(np.arange(n))})
    table = table.replace_schema_metadata({b"seapig_core": json.dumps(meta).encode()})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        for _ in range(batches):
            writer.write_table(table)


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({}, None),
        ({"shape": [6, 5]}, "FixedSizeList<float32> of the recorded width"),
        ({"rows_claimed": 60}, "does not match its 6 rows"),
        ({"fmt": "something else"}, "no 'seapig_core.logits' format header"),
        ({"batches": 2}, "holds 2 record batches"),
        ({"logits_type": pa.float64()}, "FixedSizeList<float32>"),
        ({"shape": "abc"}, "does not match"),
    ],
    ids=["valid", "wrong-width", "rows-claimed", "format", "two-batches", "float64", "shape-not-a-list"],
)
def test_crafted_arrow_files_are_refused_not_trusted(tmp_path, options, reason):
    path = tmp_path / "crafted.logits.arrow"
    _crafted(path, **options)
    if reason is None:  # the reader accepts any well-formed file, not only its own writer's
        stored = load_logits(path, verify=False)
        assert stored.logits.shape == (6, 4) and stored.sample_ids.tolist() == list(range(6))
    else:
        with pytest.raises(ValueError, match=reason):
            load_logits(path, verify=False)


def test_a_miss_says_which_part_of_the_fingerprint_changed(tmp_path, caplog):
    model = LinearNet()
    run(model, tensor_loader(20), tmp_path)
    with torch.no_grad():
        model.linear.bias += 1
    with caplog.at_level("INFO", logger="seapig_core.extract"):
        run(model, tensor_loader(20), tmp_path)
    assert "its model changed" in caplog.text
