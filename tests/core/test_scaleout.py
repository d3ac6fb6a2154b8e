"""A batch split into row ranges scored apart and merged (issue 10 item 5, library side), and the `dask` parameter.

The split steps (:mod:`seapig_core.scaleout`) run here in one process, with every object that
would cross a Dask cluster pickled on the way (tests/flows/test_dask.py runs them on a real
LocalCluster through the scoring flow): the merged file has the bytes of the sequential
``score_file`` output and the same summary, for string, integer and row-index ids, non-finite
rows, range boundaries inside the input's record batches and row groups, and more rows than the
summary keeps exactly; a failing range or merge leaves no selections file and no staged part.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from seapig_core.bundle import fit_selector, load_bundle
from seapig_core.pipeline import score_file
from seapig_core.scaleout import (
    DaskOptions,
    check_dask_options,
    check_split_rows,
    discard_split,
    merge_ranges,
    plan_split,
    score_range,
)

K = 5
ROWS = 12_000  # more finite scores than the summary keeps exactly (EXACT_SUMMARY_SAMPLES)
CHUNK = 768  # range boundaries at multiples of 768 fall inside the input's 1000-row batches


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("scaleout")
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, K, (800,), generator=g)
    logits = 2.0 * torch.randn(800, K, generator=g)
    logits[torch.arange(800), labels] += 3.0
    fit_selector(logits, labels, scores=["softmax", "energy", "margin"], q=0.9).save(root / "bundle")
    return str(load_bundle(root / "bundle").version_path)


def _query(rows: int = ROWS, seed: int = 1) -> np.ndarray:
    x = (1.5 * np.random.default_rng(seed).standard_normal((rows, K))).astype(np.float32)
    x[3] = np.nan  # non-finite rows, in the first and in a later range
    x[rows - 7, 2] = np.inf
    return x


def _write(kind: str, directory: Path, x: np.ndarray, ids: np.ndarray | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if kind == "npy":
        np.save(directory / "q.npy", x)
        return directory / "q.npy"
    table = pa.table({"logits": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), K), "sample_id": pa.array(ids)})
    if kind == "parquet":
        pq.write_table(table, directory / "q.parquet", row_group_size=1000)
        return directory / "q.parquet"
    with pa.ipc.new_file(str(directory / "q.arrow"), table.schema) as writer:
        for record_batch in table.to_batches(max_chunksize=1000):
            writer.write_batch(record_batch)
    return directory / "q.arrow"


def _ids(kind: str, rows: int = ROWS) -> np.ndarray | None:
    if kind == "str":
        return np.array([f"sample-{i:06d}" for i in range(rows)])
    if kind == "int":  # not consecutive: the id sets keep one interval per id
        return np.random.default_rng(2).permutation(rows * 3)[:rows].astype(np.int64)
    return None


def _split(bundle_path: str, path: Path, out: Path, split_rows: int = 4000):
    plan = plan_split(bundle_path, path, out, "q", split_rows=split_rows, chunk_rows=CHUNK)
    assert plan is not None
    plan = pickle.loads(pickle.dumps(plan))  # as Dask ships it to the workers
    return plan, [pickle.loads(pickle.dumps(score_range(plan, i))) for i in range(len(plan.ranges))]


@pytest.mark.parametrize(("file_kind", "id_kind"), [("parquet", "str"), ("arrow", "int"), ("npy", "index")])
def test_ranges_scored_apart_merge_into_the_bytes_and_summary_of_the_sequential_run(
    bundle_path: str, tmp_path: Path, file_kind: str, id_kind: str
) -> None:
    path = _write(file_kind, tmp_path / "in", _query(), _ids(id_kind))
    sequential = score_file(bundle_path, path, tmp_path / "sequential", "q", chunk_rows=CHUNK)
    out = tmp_path / "out"
    plan, parts = _split(bundle_path, path, out)
    assert plan.ranges == ((0, 4608), (4608, 9216), (9216, ROWS)) and plan.chunk_rows == CHUNK
    assert all(a % 1000 for a, _ in plan.ranges[1:])  # each cut falls inside one of the input's record batches
    assert [p.name for p in Path(plan.staging_dir).iterdir()] and Path(plan.staging_dir).parent == out
    merged = merge_ranges(plan, list(reversed(parts)))  # any order: merged by position
    assert Path(merged["path"]).read_bytes() == Path(sequential["path"]).read_bytes()
    assert {k: v for k, v in merged.items() if k not in ("path", "ranges")} == {k: v for k, v in sequential.items() if k != "path"}
    assert merged["samples"] == ROWS and merged["non_finite"] == 2 and merged["mean_score"] is not None
    assert [(r["start"], r["stop"]) for r in merged["ranges"]] == list(plan.ranges)
    assert sorted(p.name for p in out.iterdir()) == ["q.selections.parquet"]  # the staging directory is gone


def test_small_and_empty_batches_are_not_split_and_ranges_cut_at_chunks(bundle_path: str, tmp_path: Path) -> None:
    path = _write("npy", tmp_path / "in", _query(3000))
    out = tmp_path / "out"
    assert plan_split(bundle_path, path, out, "q", split_rows=3000, chunk_rows=CHUNK) is None
    empty = _write("npy", tmp_path / "empty", np.zeros((0, K), dtype=np.float32))
    assert plan_split(bundle_path, empty, out, "q", split_rows=1) is None
    assert not out.exists() or not list(out.iterdir())  # no staging directory for a whole batch
    for split_rows, expected in [(1000, 2), (700, 4), (1, 4), (2999, 2)]:
        plan = plan_split(bundle_path, path, out, "q", split_rows=split_rows, chunk_rows=CHUNK)
        starts = [a for a, _ in plan.ranges]
        assert len(plan.ranges) == expected, split_rows
        assert starts[0] == 0 and plan.ranges[-1][1] == 3000 and all(a % CHUNK == 0 for a in starts)
        assert all(b == c for (_, b), (c, _) in zip(plan.ranges, plan.ranges[1:], strict=False))
        assert all(b - a < max(split_rows, CHUNK) + CHUNK for a, b in plan.ranges)  # less than a chunk over
        name = Path(plan.staging_dir).name
        assert name.startswith(".q.ranges.") and Path(plan.staging_dir).is_dir()
        discard_split(plan)
        assert not Path(plan.staging_dir).exists()
    with pytest.raises(TypeError, match="'split_rows'"):
        plan_split(bundle_path, path, out, "q", split_rows=1.5)
    with pytest.raises(ValueError, match="'batch'"):
        plan_split(bundle_path, path, out, "../q", split_rows=10)


def test_a_failing_range_leaves_no_part_and_the_batch_leaves_nothing(bundle_path: str, tmp_path: Path) -> None:
    rows = [list(map(float, r)) for r in _query(3000)]
    rows[2500] = rows[2500][:3]  # a ragged row in the last range
    path = tmp_path / "ragged.parquet"
    pq.write_table(pa.table({"logits": pa.array(rows)}), path, row_group_size=500)
    out = tmp_path / "out"
    out.mkdir()
    (out / "q.selections.parquet").write_bytes(b"an earlier run's file")
    plan = plan_split(bundle_path, path, out, "q", split_rows=1000, chunk_rows=CHUNK)
    staged = [score_range(plan, i) for i in range(len(plan.ranges) - 1)]
    with pytest.raises(ValueError, match="same length") as info:
        score_range(plan, len(plan.ranges) - 1)
    assert str(path) in str(info.value)
    assert sorted(p.name for p in Path(plan.staging_dir).iterdir()) == [Path(s.path).name for s in staged]  # no partial part
    discard_split(plan)
    assert sorted(p.name for p in out.iterdir()) == ["q.selections.parquet"]
    assert (out / "q.selections.parquet").read_bytes() == b"an earlier run's file"
    with pytest.raises(ValueError, match="staging directory .* is gone"):
        score_range(plan, 0)  # a range that starts late does not recreate the directory
    assert not Path(plan.staging_dir).exists()


def test_an_id_in_two_ranges_or_a_missing_part_fails_the_merge_and_leaves_no_file(bundle_path: str, tmp_path: Path) -> None:
    ids = _ids("str", 3000)
    ids[2900] = ids[5]  # the same id in the first and the last range
    path = _write("parquet", tmp_path / "in", _query(3000), ids)
    out = tmp_path / "out"
    plan, parts = _split(bundle_path, path, out, split_rows=1000)
    with pytest.raises(ValueError, match="two row ranges"):
        merge_ranges(plan, parts)
    assert not out.joinpath("q.selections.parquet").exists() and not list(out.iterdir())
    ids = _ids("str", 3000)
    path = _write("parquet", tmp_path / "in2", _query(3000), ids)
    plan, parts = _split(bundle_path, path, out, split_rows=1000)
    with pytest.raises(ValueError, match=r"plan's row ranges"):
        merge_ranges(plan, parts[:-1])
    assert not list(out.iterdir())
    plan, parts = _split(bundle_path, path, out, split_rows=1000)
    os.unlink(parts[1].path)
    with pytest.raises(ValueError, match=re.escape(f"The part file {parts[1].path!r}")):
        merge_ranges(plan, parts)
    assert not list(out.iterdir())


def test_the_staging_directory_of_a_dead_run_is_swept_by_the_next_write(bundle_path: str, tmp_path: Path) -> None:
    path = _write("npy", tmp_path / "in", _query(3000))
    out = tmp_path / "out"
    plan = plan_split(bundle_path, path, out, "q", split_rows=1000, chunk_rows=CHUNK)
    score_range(plan, 0)
    staging = Path(plan.staging_dir)
    # The same name with the pid of a process that is gone: what a killed run leaves.
    dead = staging.with_name(re.sub(r"-(\d+)-(\d+)-([0-9a-f]{8})$", r"-4194300-1-\3", staging.name))
    staging.rename(dead)
    score_file(bundle_path, path, out, "other")
    assert sorted(p.name for p in out.iterdir()) == ["other.selections.parquet"]


def test_the_dask_parameter_names_a_cluster_or_a_local_cluster_and_errors_name_it() -> None:
    assert check_dask_options(None) is None
    remote = check_dask_options({"address": "tcp://10.0.0.5:8786"})
    assert remote == DaskOptions(address="tcp://10.0.0.5:8786") and not remote.local and remote.cluster_kwargs() == {}
    assert check_dask_options({"address": "scheduler:8786"}).address == "scheduler:8786"
    local = check_dask_options({"n_workers": 2, "threads_per_worker": 1, "memory_limit": "2GiB"})
    assert local.local and local.cluster_kwargs() == {
        "processes": True, "dashboard_address": None, "n_workers": 2, "threads_per_worker": 1, "memory_limit": "2GiB"
    }
    assert "LocalCluster of 2 worker process(es) with 1 thread(s)" in local.describe()
    assert check_dask_options({}).cluster_kwargs() == {"processes": True, "dashboard_address": None}
    assert check_dask_options(local.to_dict()) == local
    bad = [
        ("tcp://host:8786", TypeError, r"'dask' parameter must be a dict .*Got str"),
        ({"adress": "tcp://h:1"}, ValueError, r"'dask' parameter knows the keys .*unknown key\(s\) \['adress'\]"),
        ({"address": "tcp://h:1", "n_workers": 2}, ValueError, r"'dask' parameter names either .*not both"),
        ({"address": "http://h:1"}, ValueError, r"'dask' parameter's 'address' must be a Dask scheduler address"),
        ({"address": "tcp://host"}, ValueError, r"'address' must be a Dask scheduler address"),
        ({"address": 8786}, TypeError, r"'address' must be a str"),
        ({"n_workers": 0}, ValueError, r"'dask.n_workers' parameter must be a positive integer"),
        ({"threads_per_worker": 1.5}, TypeError, r"'dask.threads_per_worker' parameter must be a positive integer"),
        ({"memory_limit": "lots"}, ValueError, r"'dask.memory_limit' parameter must be like"),
    ]
    for value, error, message in bad:
        with pytest.raises(error, match=message):
            check_dask_options(value)
    assert check_split_rows(None) is None and check_split_rows(10) == 10
    with pytest.raises(ValueError, match="'split_rows' parameter must be a positive integer"):
        check_split_rows(0)
