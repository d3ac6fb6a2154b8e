"""Streaming scoring (issue 10 items 1, 2, 7; issue 11 items 2 and 4, pipeline side).

Every logit-file format is read as validated chunks that equal the whole file; ``score_file``
validates each chunk once and scores it in one pass, writes the selections row group by row
group with today's schema, and summarises in bounded memory with the same numbers as the
whole-table functions; empty files give empty selections; probability files are converted;
sample ids are checked for repeats across chunks; row ranges scored apart merge into the same
file and summary.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
import torch
import xxhash
from scipy import stats

import seapig_core.bundle as bundle_module
import seapig_core.selections as selections_module
from seapig_core._validation import check_sample_ids
from seapig_core.bundle import fit_selector, load_bundle
from seapig_core.drift import drift_statistics
from seapig_core.pipeline import (
    calibrate_file,
    content_fingerprint,
    merge_rows,
    row_ranges,
    score_file,
    score_rows,
    scoring_review,
)
from seapig_core.probabilities import logits_from_probabilities
from seapig_core.review import review_queue
from seapig_core.selections import (
    SelectionSummary,
    merge_summaries,
    read_selections,
    selections_schema,
    selections_table,
    summarize_selections,
    write_selections,
)
from seapig_core.sources import SampleIdSet, open_logits_file, read_logits_file

K = 5
ROWS = 1000


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("streaming")
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, K, (800,), generator=g)
    logits = 2.0 * torch.randn(800, K, generator=g)
    logits[torch.arange(800), labels] += 3.0
    bundle = fit_selector(logits, labels, scores=["softmax", "energy", "margin"], q=0.9)
    bundle.save(root / "bundle")
    return load_bundle(root / "bundle"), root


def _query(rows: int = ROWS, seed: int = 1, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (1.5 * rng.standard_normal((rows, K))).astype(dtype)
    if rows > 11:
        x[3] = np.nan
        x[11, 2] = np.inf
    return x


def _ids(rows: int = ROWS) -> np.ndarray:
    return np.array([f"s{i:05d}" for i in range(rows)], dtype=str)


def _fsl(x: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def _write(kind: str, path_dir: Path, x: np.ndarray, ids: np.ndarray | None = None, labels: np.ndarray | None = None) -> Path:
    """``x`` (and ids/labels) in one of the supported layouts; several chunks/row groups/batches each."""
    columns: dict[str, pa.Array] = {"logits": _fsl(x)}
    if ids is not None:
        columns["sample_id"] = pa.array(ids)
    if labels is not None:
        columns["label"] = pa.array(labels)
    table = pa.table(columns)
    arrays = {"logits": x, **({"sample_ids": ids} if ids is not None else {}), **({"labels": labels} if labels is not None else {})}
    if kind == "npy":
        path = path_dir / "q.npy"
        np.save(path, x)
    elif kind == "npy-fortran":
        path = path_dir / "q.npy"
        np.save(path, np.asfortranarray(x))
    elif kind == "npz":
        path = path_dir / "q.npz"
        np.savez(path, **arrays)
    elif kind == "npz-compressed":
        path = path_dir / "q.npz"
        np.savez_compressed(path, **arrays)
    elif kind == "parquet":
        path = path_dir / "q.parquet"
        pq.write_table(table, path, row_group_size=170)
    elif kind == "parquet-lists":
        path = path_dir / "q.parquet"
        lists = table.set_column(0, "logits", pa.array(list(x.astype(np.float64)), type=pa.list_(pa.float64())))
        pq.write_table(lists, path, row_group_size=300)
    elif kind == "arrow":
        path = path_dir / "q.arrow"
        with pa.ipc.new_file(str(path), table.schema) as writer:
            for batch in table.to_batches(max_chunksize=130):
                writer.write_batch(batch)
    elif kind == "arrow-stream":
        path = path_dir / "q.arrow"
        with pa.ipc.new_stream(str(path), table.schema) as writer:
            for batch in table.to_batches(max_chunksize=130):
                writer.write_batch(batch)
    elif kind == "feather":  # lz4-compressed batches (Feather's default)
        path = path_dir / "q.feather"
        feather.write_feather(table, path, chunksize=250)
    elif kind == "store":
        from seapig_core.store import LogitsWriter

        with LogitsWriter(path_dir / "q.logits.arrow", batch_rows=200) as writer:
            writer.append(torch.from_numpy(x), None if labels is None else torch.from_numpy(labels),
                          check_sample_ids(ids, len(x)))
            stored = writer.commit({"key": "0" * 64})
        path = stored.path
    else:  # pragma: no cover
        raise AssertionError(kind)
    return path


FORMATS = ["npy", "npy-fortran", "npz", "npz-compressed", "parquet", "parquet-lists", "arrow", "arrow-stream", "feather", "store"]


@pytest.mark.parametrize("kind", FORMATS)
def test_every_format_streams_chunks_equal_to_the_whole_file(kind: str, tmp_path: Path) -> None:
    """Issue 10 item 2: chunks (and row ranges) of every source equal the whole file."""
    x = _query()
    ids = None if kind.startswith("npy") else _ids()
    labels = np.arange(ROWS) % K
    path = _write(kind, tmp_path, x, ids, None if kind.startswith("npy") else labels)
    with open_logits_file(path) as source:
        assert source.trailing_shape in ((K,), None) and source.n_samples == ROWS
        chunks = list(source.iter_chunks(97))
        assert [c.start for c in chunks] == list(range(0, ROWS, 97)) and all(c.rows <= 97 for c in chunks)
        whole = torch.cat([c.logits for c in chunks]).numpy()
        np.testing.assert_array_equal(whole, x.astype(whole.dtype))
        got_ids = np.concatenate([c.sample_ids for c in chunks])
        assert got_ids.tolist() == (list(range(ROWS)) if ids is None else ids.tolist())
        if ids is not None:
            np.testing.assert_array_equal(torch.cat([c.labels for c in chunks]).numpy(), labels)
        middle = list(source.iter_chunks(64, start=250, stop=731, labels=False))
        assert middle[0].start == 250 and sum(c.rows for c in middle) == 481
        np.testing.assert_array_equal(torch.cat([c.logits for c in middle]).numpy(), x[250:731].astype(whole.dtype))
    data = read_logits_file(path)
    np.testing.assert_array_equal(data.logits.numpy(), x.astype(data.logits.numpy().dtype))


# Formats whose chunks are byte ranges of the file's memory map: hashed as they are read (a store
# entry is fingerprinted by its manifest, and never needs it).
MAPPED = {"npy", "arrow", "arrow-stream"}


@pytest.mark.parametrize("kind", FORMATS)
def test_a_source_hashes_the_bytes_it_reads_as_it_reads_them(kind: str, tmp_path: Path) -> None:
    """Issue 10: the input's fingerprint costs no second read where the file is mapped, and is always the file's."""
    path = _write(kind, tmp_path, _query(), None if kind.startswith("npy") else _ids())
    expected = xxhash.xxh3_128_hexdigest(path.read_bytes())
    with open_logits_file(path, hash_while_reading=True) as source:
        chunks = source.iter_chunks(97, labels=False)
        next(chunks)
        hasher = source._reader.hasher
        assert (hasher is not None) == (kind in MAPPED)
        if hasher is not None:  # the first chunk's bytes were hashed before it was handed out, not the rest
            assert 97 * K * 4 <= hasher._done < path.stat().st_size
        for _ in chunks:
            pass
        assert source.xxh3_128() == expected
    with open_logits_file(path, hash_while_reading=True) as source:  # a partial read: still the whole file's
        for _ in source.iter_chunks(64, start=250, stop=731, labels=False):
            pass
        assert source.xxh3_128() == expected
    with open_logits_file(path) as source:  # not asked: no hashing while reading
        assert source._reader.hasher is None and source.xxh3_128() == expected


def test_the_fingerprint_is_written_at_the_close_as_if_given_at_the_open(fitted, tmp_path: Path) -> None:
    """The late metadata reads back exactly as metadata given upfront: same footer schema, same attrs."""
    _, root = fitted
    path = _write("npy", tmp_path, _query())
    late = Path(score_file(root / "bundle", path, tmp_path / "late", "q", chunk_rows=128)["path"])
    meta = read_selections(late).attrs["seapig_core"]
    upfront = tmp_path / "upfront.parquet"
    written = pq.read_table(late)
    schema = written.schema.with_metadata({k: v for k, v in written.schema.metadata.items() if k != b"seapig_core"})
    given = {k: v for k, v in meta.items() if k not in ("format", "schema_version", "library_version")}
    with selections_module.SelectionsWriter(upfront, schema, given) as writer:
        for batch in written.to_batches(max_chunksize=128):
            writer.write(batch)
    assert pq.read_schema(late).equals(pq.read_schema(upfront), check_metadata=True)
    assert late.read_bytes() == upfront.read_bytes()  # footer entries replaced in place, not repeated
    assert meta["logits_xxh3_128"] == xxhash.xxh3_128_hexdigest(path.read_bytes()) and meta["logits_sha256"] is None


def test_late_metadata_is_checked_and_a_file_that_lost_it_is_not_written(fitted, tmp_path: Path, monkeypatch) -> None:
    bundle, _ = fitted
    schema = selections_schema(bundle)
    out = tmp_path / "s.parquet"
    writer = selections_module.SelectionsWriter(out, schema, {"batch": "b"})
    with pytest.raises(RuntimeError, match="outside its 'with' block"):
        writer.update_metadata({"x": 1})
    with pytest.raises(ValueError, match="Out of range float"), selections_module.SelectionsWriter(out, schema) as writer:
        writer.update_metadata({"x": float("nan")})  # refused when given, not at the close
    assert not out.exists()
    # A pyarrow that stopped writing the footer entries given at the close: refused loudly, nothing left.
    monkeypatch.setattr(pq.ParquetWriter, "add_key_value_metadata", lambda self, metadata: None)
    with pytest.raises(RuntimeError, match="did not record the selections metadata"), selections_module.SelectionsWriter(
        out, schema, {"batch": "b"}
    ) as writer:
        writer.update_metadata({"logits_xxh3_128": "0" * 32})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["npy", "npz", "npz-compressed", "parquet", "arrow", "feather", "store"])
def test_score_file_streams_the_same_selections_and_summary_as_the_whole_table(fitted, kind: str, tmp_path: Path) -> None:
    """Items 1-2: the streamed file equals selections_table + write_selections (values, schema, pandas metadata)."""
    bundle, root = fitted
    x = _query()
    ids = None if kind == "npy" else _ids()
    path = _write(kind, tmp_path, x, ids)
    result = score_file(root / "bundle", path, tmp_path / "out", "q", chunk_rows=128)
    table = selections_table(bundle, x, ids)
    streamed = read_selections(result["path"])
    pd.testing.assert_frame_equal(streamed, table)
    reference = write_selections(table, tmp_path / "reference.parquet")
    assert pq.read_schema(result["path"]).remove_metadata() == pq.read_schema(reference).remove_metadata()
    assert pq.read_schema(result["path"]).metadata[b"pandas"] == pq.read_schema(reference).metadata[b"pandas"]
    assert pq.ParquetFile(result["path"]).metadata.num_row_groups == -(-ROWS // 128)  # row group by row group
    meta = streamed.attrs["seapig_core"]
    assert meta["bundle_version"] == bundle.version and meta["threshold"] == bundle.threshold and meta["batch"] == "q"
    # The input's fingerprint: a store entry's manifest SHA-256, any other file's xxh3-128.
    if kind == "store":
        assert (meta["logits_sha256"], meta["logits_xxh3_128"]) == (content_fingerprint(path), None)
    else:
        assert (meta["logits_sha256"], meta["logits_xxh3_128"]) == (None, xxhash.xxh3_128_hexdigest(path.read_bytes()))
    expected = summarize_selections(bundle, table)
    assert {k: result[k] for k in expected} == expected
    assert result["review_queue"] == [
        {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
        for row in review_queue(table).to_dict("records")
    ]


def test_selections_of_multilabel_and_float64_keep_their_types(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    labels = (torch.rand(300, 4, generator=g) > 0.5).double()
    logits = 3.0 * (2 * labels - 1) + torch.randn(300, 4, generator=g, dtype=torch.float64)
    bundle = fit_selector(logits, labels, task="multilabel", scores=["entropy", "softmax"], temperature=1.0)
    bundle.save(tmp_path / "b")
    np.save(tmp_path / "q.npy", logits.numpy()[:50])
    result = score_file(tmp_path / "b", tmp_path / "q.npy", tmp_path / "out", "q", chunk_rows=16)
    streamed = read_selections(result["path"])
    table = selections_table(bundle, logits[:50])
    assert streamed["score"].dtype == np.float64
    np.testing.assert_array_equal(np.stack(streamed["prediction"]), np.stack(table["prediction"]))
    reference = write_selections(table, tmp_path / "reference.parquet")
    assert pq.read_schema(result["path"]).remove_metadata() == pq.read_schema(reference).remove_metadata()
    assert selections_schema(bundle, "int", np.float64).remove_metadata() == pq.read_schema(reference).remove_metadata()


def test_each_chunk_is_validated_once_and_scored_in_one_pass(fitted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 1: one canonicalisation and one score_pass per chunk; no re-passes, no topk, no separate finiteness pass."""
    bundle, root = fitted
    path = _write("npy", tmp_path, _query())
    calls = {"canonicalize": 0, "score_pass": 0}
    real_canonicalize, real_pass = bundle_module.canonicalize, selections_module.score_pass

    def canonicalize(*args, **kwargs):
        canon = real_canonicalize(*args, **kwargs)
        calls["canonicalize"] += canon.n_samples > 0  # the header checks validate no data
        return canon

    def score_pass(canon, names, temperature, *, labels=True):
        calls["score_pass"] += 1
        assert labels and list(names) == ["softmax", "energy", "margin"]
        return real_pass(canon, names, temperature, labels=labels)

    def forbidden(*args, **kwargs):
        raise AssertionError("a second pass over the batch")

    monkeypatch.setattr(bundle_module, "canonicalize", canonicalize)
    monkeypatch.setattr(selections_module, "score_pass", score_pass)
    monkeypatch.setattr(torch, "topk", forbidden)
    for name in ("predict", "runner_up", "compute_scores"):
        monkeypatch.setattr(f"seapig_core.kernels.{name}", forbidden)
    monkeypatch.setattr("seapig_core.layout.CanonicalLogits.finite_rows", forbidden)
    for method in ("LogitScore.score", "LogitScore.select", "LogitScore.predict", "CertaintyRatioScore.alternate_label"):
        monkeypatch.setattr(f"seapig_core.scores.logits.{method}", forbidden)
    score_file(bundle, path, tmp_path / "out", "q", chunk_rows=100)
    chunks = -(-ROWS // 100)
    assert calls == {"canonicalize": chunks, "score_pass": chunks}
    calls.update(canonicalize=0, score_pass=0)
    selections_table(bundle, _query())
    assert calls == {"canonicalize": 1, "score_pass": 1}


# ----------------------------------------------------------------------------- sample ids


def test_one_normaliser_of_sample_ids() -> None:
    """Issue 10 item 7: one owner; sources, selections and extraction all call it."""
    import seapig_core.extract as extract
    import seapig_core.sources as sources

    assert check_sample_ids(None, 3, start=5).tolist() == [5, 6, 7]
    assert check_sample_ids(torch.arange(3), 3).dtype == np.int64
    assert check_sample_ids(np.array([b"a", b"b"]), 2).tolist() == ["a", "b"]
    assert check_sample_ids([1, 2], 2).dtype == np.int64 and check_sample_ids(np.array(["a"]), 1).dtype == object
    with pytest.raises(ValueError, match="one id per sample"):
        check_sample_ids(np.arange(4), 3)
    with pytest.raises(TypeError, match="integers or strings"):
        check_sample_ids(np.array([0.5]), 1)
    with pytest.raises(TypeError, match="mixed"):
        check_sample_ids([1, "a"], 2)
    with pytest.raises(TypeError, match="NoneType"):
        check_sample_ids(["a", None], 2)
    for module in (sources, selections_module, extract):
        assert module.check_sample_ids is check_sample_ids
    assert not hasattr(sources, "_ids") and not hasattr(selections_module, "_sample_ids")


@pytest.mark.parametrize("kind", ["npz", "parquet", "arrow", "store"])
def test_a_repeated_sample_id_in_a_later_chunk_is_refused_and_nothing_is_written(fitted, kind: str, tmp_path: Path) -> None:
    """Hostile input: duplicate ids across chunks (the whole-file check can no longer see them at once)."""
    bundle, root = fitted
    ids = _ids()
    ids[900] = ids[10]
    path = _write(kind, tmp_path, _query(), ids)
    out = tmp_path / "out"
    good = _write("npy", tmp_path, _query())
    first = score_file(bundle, good, out, "q")["path"]
    before = Path(first).read_bytes()
    with pytest.raises(ValueError, match=r"must be unique.*'s00010'") as info:
        score_file(bundle, path, out, "q", chunk_rows=64)
    assert str(path) in str(info.value)
    assert Path(first).read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["q.selections.parquet"]


def test_a_write_failing_in_the_writer_thread_stops_scoring_and_leaves_the_earlier_file(fitted, tmp_path: Path, monkeypatch) -> None:
    """score_file writes behind in a second thread: a disk error there reaches the caller, scoring
    stops soon after, and the earlier selections file is kept (nothing partial is left)."""
    bundle, _ = fitted
    out = tmp_path / "out"
    path = _write("npy", tmp_path, _query())
    first = score_file(bundle, path, out, "q")["path"]
    before = Path(first).read_bytes()
    written, scored = [], []
    original_write, original_score = selections_module.SelectionsWriter.write, selections_module._score_chunk

    def failing_write(self, batch):
        if written:
            raise OSError(28, "No space left on device")
        written.append(batch.num_rows)
        original_write(self, batch)

    monkeypatch.setattr(selections_module.SelectionsWriter, "write", failing_write)
    monkeypatch.setattr(selections_module, "_score_chunk", lambda *a: scored.append(1) or original_score(*a))
    with pytest.raises(OSError, match="No space left"):
        score_file(bundle, path, out, "q", chunk_rows=16)
    chunks = -(-len(_query()) // 16)
    assert len(scored) <= 4 < chunks  # stopped within a batch or two of the failure, not at the end
    assert Path(first).read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["q.selections.parquet"]


def test_sample_id_set_keeps_consecutive_ids_in_constant_memory_and_merges_ranges() -> None:
    seen = SampleIdSet()
    for start in range(0, 1_000_000, 65_536):
        seen.add(np.arange(start, min(start + 65_536, 1_000_000)))
    assert seen.intervals == 1 and seen.count == 1_000_000
    with pytest.raises(ValueError, match=r"must be unique.*\[999990, 999991"):  # a consecutive run that overlaps
        seen.add(np.arange(999_990, 1_000_010))
    with pytest.raises(ValueError, match=r"must be unique.*\[0\]"):  # one id
        seen.add(np.array([0]))
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(200_000)
    parts = [SampleIdSet() for _ in range(4)]
    for part, block in zip(parts, np.array_split(shuffled, 4), strict=True):
        for chunk in np.array_split(block, 7):
            part.add(chunk.astype(np.int64))
    merged = parts[0]
    for part in parts[1:]:
        merged.merge(part)
    assert merged.count == 200_000 and merged.intervals == 1  # the union is 0..199999
    with pytest.raises(ValueError, match=r"must be unique.*\[17\]"):
        merged.add(np.array([200_000, 17]))
    strings = SampleIdSet()
    strings.add(np.array(["a", "b"], dtype=object))
    with pytest.raises(ValueError, match=r"'b'"):
        strings.add(np.array(["c", "b"], dtype=object))
    other = SampleIdSet()
    other.add(np.array([5, 6]))
    with pytest.raises(ValueError, match="two row ranges"):
        other.merge(pickle.loads(pickle.dumps(other)))


# ----------------------------------------------------------------------------- empty in, empty out


@pytest.mark.parametrize("kind", ["npy", "npz", "npz-compressed", "parquet", "parquet-lists", "arrow", "arrow-stream", "feather"])
def test_an_empty_query_file_gives_an_empty_selections_file_and_an_insufficient_summary(fitted, kind: str, tmp_path: Path) -> None:
    """Issue 11 item 2 (pipeline): N = 0 in any format is an empty file with the full schema, not a failed run."""
    bundle, root = fitted
    ids = None if kind.startswith("npy") else _ids(0)
    path = _write(kind, tmp_path, np.zeros((0, K), dtype=np.float32), ids)
    result = score_file(root / "bundle", path, tmp_path / "out", "empty")
    table = pq.read_table(result["path"])
    assert table.num_rows == 0
    dtype = np.float64 if kind == "parquet-lists" else np.float32  # that writer stores float64 lists
    assert table.schema.remove_metadata() == selections_schema(bundle, "index" if ids is None else "str", dtype).remove_metadata()
    assert read_selections(result["path"]).attrs["seapig_core"]["batch"] == "empty"
    assert (result["samples"], result["selected"], result["rejected"], result["verdict"]) == (0, 0, 0, "insufficient")
    assert result["rejection_rate"] is None and result["ks_statistic"] is None and result["review_queue"] == []
    assert "no samples" in result["reasons"][0]
    report = scoring_review(root / "bundle", {"empty": result["path"]})  # the artifacts step does not fail either
    assert report.table[0]["samples"] == 0
    assert bundle.check_query(np.zeros((0, K), dtype=np.float32)).n_samples == 0


def test_fitting_on_an_empty_file_stays_an_error_naming_it(tmp_path: Path) -> None:
    np.savez(tmp_path / "cal.npz", logits=np.zeros((0, K), dtype=np.float32), labels=np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="holds no samples") as info:
        calibrate_file(tmp_path / "cal.npz", tmp_path / "bundle")
    assert str(tmp_path / "cal.npz") in str(info.value)
    assert not (tmp_path / "bundle").exists()


# ----------------------------------------------------------------------------- probabilities


def _probabilities(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, rows)
    z = rng.standard_normal((rows, K))
    z[np.arange(rows), labels] += 2.5
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return p.astype(np.float32), labels


@pytest.mark.parametrize("mark", ["npz-array", "parquet-column", "arrow-metadata", "npy-argument"])
def test_probability_files_are_converted_for_calibration_and_scoring(mark: str, tmp_path: Path) -> None:
    """Issue 11 item 4 (pipeline): a documented setting marks probability input; both steps accept it."""
    cal_p, cal_y = _probabilities(600, 0)
    query_p, _ = _probabilities(300, 1)
    as_logits = {}
    for name, p in (("cal", cal_p), ("query", query_p)):
        z = logits_from_probabilities(p).numpy()
        np.savez(tmp_path / f"{name}-logits.npz", logits=z, **({"labels": cal_y} if name == "cal" else {}))
        as_logits[name] = tmp_path / f"{name}-logits.npz"

    def written(name: str, p: np.ndarray, labels: np.ndarray | None) -> Path:
        if mark == "npz-array":
            path = tmp_path / f"{name}.npz"
            np.savez(path, probabilities=p, **({"labels": labels} if labels is not None else {}))
        elif mark == "parquet-column":
            path = tmp_path / f"{name}.parquet"
            pq.write_table(pa.table({"probabilities": _fsl(p), **({"label": labels} if labels is not None else {})}), path)
        elif mark == "arrow-metadata":
            path = tmp_path / f"{name}.arrow"
            table = pa.table({"logits": _fsl(p), **({"label": labels} if labels is not None else {})})
            feather.write_feather(table.replace_schema_metadata({"seapig_core": '{"input": "probabilities"}'}), path)
        else:
            path = tmp_path / f"{name}.npy"
            np.save(path, p)
        return path

    query = written("query", query_p, None)
    probabilities = True if mark == "npy-argument" else None
    with open_logits_file(query, probabilities=probabilities) as source:
        assert source.probabilities
    if mark != "npy-argument":
        cal = written("cal", cal_p, cal_y)
        from_p = calibrate_file(cal, tmp_path / "bundle-p", scores=["softmax", "entropy"])
        from_z = calibrate_file(as_logits["cal"], tmp_path / "bundle-z", scores=["softmax", "entropy"])
        assert from_p["temperature"] == from_z["temperature"] and from_p["threshold"] == from_z["threshold"]
    else:
        calibrate_file(as_logits["cal"], tmp_path / "bundle-p", scores=["softmax", "entropy"])
    scored = score_file(tmp_path / "bundle-p", query, tmp_path / "out", "p", chunk_rows=64, probabilities=probabilities)
    reference = score_file(tmp_path / "bundle-p", as_logits["query"], tmp_path / "out", "z")
    pd.testing.assert_frame_equal(read_selections(scored["path"]), read_selections(reference["path"]))


def test_probability_marks_must_agree_and_bad_probabilities_name_the_file_and_rows(tmp_path: Path) -> None:
    p, _ = _probabilities(200, 3)
    np.savez(tmp_path / "both.npz", logits=p, probabilities=p)
    with pytest.raises(ValueError, match="not both"):
        open_logits_file(tmp_path / "both.npz")
    np.savez(tmp_path / "p.npz", probabilities=p)
    with pytest.raises(ValueError, match="holds probabilities.*probabilities=False"):
        open_logits_file(tmp_path / "p.npz", probabilities=False)
    table = pa.table({"probabilities": _fsl(p)}).replace_schema_metadata({"seapig_core": '{"input": "logits"}'})
    pq.write_table(table, tmp_path / "odd.parquet")
    with pytest.raises(ValueError, match="'input': 'logits' but its column is 'probabilities'"):
        open_logits_file(tmp_path / "odd.parquet")
    bad = p.copy()
    bad[150] *= 2  # a row that does not sum to 1, in the third chunk
    np.savez(tmp_path / "bad.npz", probabilities=bad)
    with pytest.raises(ValueError, match=r"rows 128-191: The 'probabilities' parameter must contain probabilities") as info:
        list(open_logits_file(tmp_path / "bad.npz").iter_chunks(64))
    assert str(tmp_path / "bad.npz") in str(info.value)


# ----------------------------------------------------------------------------- summaries


@pytest.mark.parametrize("chunk", [4096, 97])  # more, and fewer, rows per chunk than calibration values
def test_the_streamed_summary_equals_the_whole_batch_one_beyond_the_exact_size(fitted, chunk: int) -> None:
    """The KS statistic from counts per calibration value equals scipy's ks_2samp on the kept scores."""
    bundle, _ = fitted
    calibration = bundle.primary.scores.numpy().astype(np.float64)
    rng = np.random.default_rng(5)
    n = 25_000
    query = 1.3 * rng.standard_normal((n, K)).astype(np.float32)
    query[::997] = np.nan
    table = selections_table(bundle, query)
    scores = table["score"].to_numpy(dtype=np.float64)
    scores[:200] = rng.choice(calibration, 200)  # exact ties with calibration values
    table["score"] = scores.astype(np.float32)
    table["selected"] = table["score"] < bundle.threshold
    summary = SelectionSummary(bundle)
    for start in range(0, n, chunk):
        part = table.iloc[start : start + chunk]
        summary.update({name: part[name].to_numpy() for name in part.columns}, start)
    result = summary.result()
    finite = table["score"].to_numpy(dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    ks = stats.ks_2samp(finite, calibration[np.isfinite(calibration)])
    assert result["ks_statistic"] == float(ks.statistic) and result["ks_pvalue"] == float(ks.pvalue)
    reference = drift_statistics(
        table["score"].to_numpy(dtype=np.float64), calibration, bundle.threshold, bundle.expected_rejection_rate,
        rejected=~table["selected"].to_numpy(),
    )
    assert {k: result[k] for k in reference} == reference
    assert result["mean_score"] == pytest.approx(float(finite.mean()), rel=1e-12)
    # Partial summaries merged (in input order, through pickling, as from Dask workers) give the same.
    parts = []
    for start in range(0, n, 8192):
        part_summary = SelectionSummary(bundle)
        for a in range(start, min(start + 8192, n), 4096):
            part = table.iloc[a : a + 4096]
            part_summary.update({name: part[name].to_numpy() for name in part.columns}, a)
        parts.append(pickle.loads(pickle.dumps(part_summary)))
    merged = merge_summaries(parts, bundle)
    assert merged.result() == result
    pd.testing.assert_frame_equal(merged.review_queue(), review_queue(table, class_names=None))
    with pytest.raises(ValueError, match="bundle"):
        merge_summaries(parts)


def test_the_review_queue_kept_while_streaming_equals_the_whole_tables(fitted) -> None:
    """Ties, non-finite rows beyond the queue's length, all rejected: the kept rows still give review_queue's answer."""
    bundle, _ = fitted
    rng = np.random.default_rng(8)
    n = 5000
    table = selections_table(bundle, rng.standard_normal((n, K)).astype(np.float32))
    table["score"] = np.round(table["score"].to_numpy(), 1).astype(np.float32)  # many ties
    table["certainty_ratio"] = np.round(table["certainty_ratio"].to_numpy(), 1).astype(np.float32)
    table.loc[rng.choice(n, 40, replace=False), ["score", "certainty_ratio"]] = np.nan
    table["selected"] = False
    for queue_rows in (5, 20, 60):
        summary = SelectionSummary(bundle, queue_rows=queue_rows)
        for start in range(0, n, 333):
            part = table.iloc[start : start + 333]
            summary.update({name: part[name].to_numpy() for name in part.columns}, start)
        pd.testing.assert_frame_equal(summary.review_queue(), review_queue(table, n=queue_rows))


def test_row_ranges_scored_apart_merge_into_the_sequential_file(fitted, tmp_path: Path) -> None:
    """The row-range API (for Dask): score_rows on ranges + merge_rows == score_file."""
    bundle, root = fitted
    ids = _ids(3000)
    path = _write("parquet", tmp_path, _query(3000), ids)
    sequential = score_file(root / "bundle", path, tmp_path / "seq", "q", chunk_rows=256)
    ranges = row_ranges(path, 3, chunk_rows=256)
    assert ranges[0][0] == 0 and ranges[-1][1] == 3000 and all(a % 256 == 0 for a, _ in ranges)
    parts = [pickle.loads(pickle.dumps(score_rows(root / "bundle", path, a, b, chunk_rows=256))) for a, b in ranges]
    merged = merge_rows(root / "bundle", parts, tmp_path / "merged", "q", logits_path=path)
    pd.testing.assert_frame_equal(read_selections(merged["path"]), read_selections(sequential["path"]))
    assert pq.read_schema(merged["path"]) == pq.read_schema(sequential["path"])
    assert {k: v for k, v in merged.items() if k != "path"} == {k: v for k, v in sequential.items() if k not in ("path", "chunk_rows")}
    with pytest.raises(ValueError, match="consecutive"):
        merge_rows(root / "bundle", [parts[1], parts[0]], tmp_path / "merged", "q")
    ids[2900] = ids[5]  # the same id in the first and the last range
    dup = tmp_path / "dup"
    dup.mkdir()
    path = _write("parquet", dup, _query(3000), ids)
    parts = [score_rows(bundle, path, a, b, chunk_rows=256) for a, b in ranges]
    with pytest.raises(ValueError, match="two row ranges"):
        merge_rows(bundle, parts, tmp_path / "dup-out", "q")
    assert not (tmp_path / "dup-out" / "q.selections.parquet").exists()


def test_a_failure_mid_stream_leaves_the_previous_file(fitted, tmp_path: Path) -> None:
    bundle, root = fitted
    out = tmp_path / "out"
    first = score_file(bundle, _write("npy", tmp_path, _query()), out, "q")["path"]
    before = Path(first).read_bytes()
    rows = [list(map(float, r)) for r in _query()]
    rows[700] = rows[700][:3]  # a ragged row, in a later row group
    pq.write_table(pa.table({"logits": pa.array(rows)}), tmp_path / "ragged.parquet", row_group_size=100)
    with pytest.raises(ValueError, match="same length") as info:
        score_file(bundle, tmp_path / "ragged.parquet", out, "q", chunk_rows=100)
    assert str(tmp_path / "ragged.parquet") in str(info.value)
    assert Path(first).read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["q.selections.parquet"]
    with pytest.raises(ValueError, match=r"6 logits per sample.*\(7 per sample\)|7 per sample"):
        score_file(bundle, _write("npy", tmp_path, np.zeros((4, 7), dtype=np.float32)), out, "q")


def test_a_corrupt_store_chunk_found_mid_stream_fails_the_batch(fitted, tmp_path: Path) -> None:
    bundle, _ = fitted
    path = _write("store", tmp_path, _query(), _ids())
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # a byte in a middle record batch
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum|corrupt"):
        score_file(bundle, path, tmp_path / "out", "q", chunk_rows=100)
    assert not (tmp_path / "out" / "q.selections.parquet").exists()
