"""Scale-out on Dask (issue 10 item 5): the scoring flow on a real LocalCluster, against the sequential run.

A real ``distributed.LocalCluster`` (worker processes: 2 workers, 1 thread each) and a real
Prefect server (tests/flows/harness.py). Through the flow's ``dask`` parameter, the cluster
named by its address (or a LocalCluster the run starts) scores many batches in parallel and
splits a batch of more than ``split_rows`` rows into row ranges scored on both workers and
merged in input order: every selections file has the bytes, and every summary the values, of
the sequential ``score_file``; each worker loads the bundle version once for many tasks; the
ledger records each content once; a failing range or merge fails its batch only, leaves no
file and no staged part, and the batch is claimed again by the next run; a bad ``dask``
parameter fails the run at once, naming it.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.scoring import ScoringFailed, scoring_flow
from seapig_core._io import file_sha256
from seapig_core.inbox import plan_scoring
from seapig_core.ledger import LEDGER_NAME, Ledger
from seapig_core.pipeline import calibrate_file, score_file

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
K = 10
BIG = 100_000  # two 65,536-row chunks: split_rows=60,000 gives one range per chunk
SPLIT = 60_000


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of two worker processes with one thread each, shared by this module's tests."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as local, Client(local) as client:
        yield local, client


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("dask-bundle")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, K, 400)
    logits = rng.normal(size=(400, K)).astype(np.float32)
    logits[np.arange(400), labels] += 3.0
    np.savez(root / "cal.npz", logits=logits, labels=labels)
    return calibrate_file(root / "cal.npz", root / "bundle", scores=["softmax", "energy"], q=0.9)


def _logits(rows: int, seed: int) -> np.ndarray:
    x = (1.5 * np.random.default_rng(seed).standard_normal((rows, K))).astype(np.float32)
    if rows > 90_000:
        x[7] = np.nan  # non-finite rows in the first and the last range
        x[90_001, 3] = -np.inf
    elif rows > 20:
        x[20] = np.inf
    return x


def _table(x: np.ndarray, ids: np.ndarray) -> pa.Table:
    return pa.table({"logits": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), K), "sample_id": pa.array(ids)})


def _arrow(path: Path, table: pa.Table, batch_rows: int) -> None:
    with pa.ipc.new_file(str(path), table.schema) as writer:
        for record_batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(record_batch)


def _string_ids(rows: int) -> np.ndarray:
    return np.array([f"img-{i:07d}" for i in range(rows)])


# Run on the workers (client.run): count the bundle loads of each worker process, by version.


def _count_bundle_loads() -> None:
    import seapig_core.bundle as bundle_module

    if not hasattr(bundle_module, "_test_loads"):
        real = bundle_module.load_bundle

        def counting(path, *args, **kwargs):
            bundle_module._test_loads[str(Path(path))] += 1
            return real(path, *args, **kwargs)

        bundle_module._test_loads = collections.Counter()
        bundle_module.load_bundle = counting
    bundle_module._test_loads.clear()
    bundle_module.clear_bundle_cache()


def _bundle_loads() -> dict[str, int]:
    import seapig_core.bundle as bundle_module

    return dict(bundle_module._test_loads)


def _same_as_sequential(bundle: dict, inputs: dict[str, Path], out: Path, scored: list[dict], tmp_path: Path) -> None:
    """Every batch's selections file and summary equal the sequential score_file's of its input."""
    by_batch = {entry["batch"]: entry for entry in scored}
    assert sorted(by_batch) == sorted(inputs)
    for batch, path in inputs.items():
        # As the flow calls it: with the SHA-256 its ledger keyed the input on (the files record it).
        sequential = score_file(bundle["version_path"], path, tmp_path / "sequential", batch, logits_sha256=file_sha256(path))
        assert (out / f"{batch}.selections.parquet").read_bytes() == Path(sequential["path"]).read_bytes(), batch
        ignored = ("path", "ranges", "archived_path")
        assert {k: v for k, v in by_batch[batch].items() if k not in ignored} == {k: v for k, v in sequential.items() if k not in ignored}


def test_batches_run_in_parallel_and_a_split_batch_merges_into_the_sequential_file(cluster, bundle: dict, tmp_path: Path) -> None:
    local, client = cluster
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    rng = np.random.default_rng(3)
    inputs = {
        "ints": inbox / "ints.arrow",
        "strs": inbox / "strs.parquet",
        "empty": inbox / "empty.npy",
        "big": inbox / "big.arrow",
        "big-index": inbox / "big-index.npy",
    }
    _arrow(inputs["ints"], _table(_logits(300, 1), rng.permutation(10_000)[:300].astype(np.int64)), 128)
    pq.write_table(_table(_logits(300, 2), _string_ids(300)), inputs["strs"], row_group_size=100)
    np.save(inputs["empty"], np.zeros((0, K), dtype=np.float32))
    _arrow(inputs["big"], _table(_logits(BIG, 5), _string_ids(BIG)), 50_000)  # range cuts inside input batches
    np.save(inputs["big-index"], _logits(BIG, 6))
    client.run(_count_bundle_loads)

    state = scoring_flow(
        bundle_dir=str(Path(bundle["bundle_dir"])), output_dir=str(out), logits_dir=str(inbox),
        dask={"address": local.scheduler_address}, split_rows=SPLIT, return_state=True,
    )
    assert state.is_completed(), state.message
    result = state.result()
    _same_as_sequential(bundle, inputs, out, result["scored"], tmp_path)

    by_batch = {entry["batch"]: entry for entry in result["scored"]}
    for batch in ("big", "big-index"):
        ranges = by_batch[batch]["ranges"]
        assert [(r["start"], r["stop"]) for r in ranges] == [(0, 65_536), (65_536, BIG)]
    workers = {r["scored_by"] for batch in ("big", "big-index") for r in by_batch[batch]["ranges"]}
    assert len(workers) == 2  # the ranges of one batch ran on both worker processes
    assert by_batch["empty"]["samples"] == 0 and "ranges" not in by_batch["ints"]
    # 3 whole batches + 4 ranges + 2 merges on 2 workers: each worker process loaded the version once.
    loads = client.run(_bundle_loads)
    assert len(loads) == 2 and all(counts == {bundle["version_path"]: 1} for counts in loads.values()), loads

    entries = Ledger(out).entries()
    assert sorted(e.batch for e in entries) == sorted(inputs) and {e.state for e in entries} == {"done"}
    assert sorted(p.name for p in out.iterdir()) == sorted([LEDGER_NAME] + [f"{b}.selections.parquet" for b in inputs])
    again = scoring_flow(
        bundle_dir=bundle["bundle_dir"], output_dir=str(out), logits_dir=str(inbox), dask={"address": local.scheduler_address},
        split_rows=SPLIT,
    )
    assert again["scored"] == [] and sorted(again["selections"]) == sorted(inputs)  # exactly once


def test_a_failing_range_or_merge_fails_its_batch_only_leaves_nothing_and_is_retried(cluster, bundle: dict, tmp_path: Path) -> None:
    local, _ = cluster
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    np.save(inbox / "good.npy", _logits(300, 1))
    ids = _string_ids(BIG)
    ids[90_500] = ids[90_499]  # repeated inside the last range: that range fails
    _arrow(inbox / "bad-range.arrow", _table(_logits(BIG, 2), ids), 50_000)
    ids = _string_ids(BIG)
    ids[99_000] = ids[10]  # in the first and the last range: each range passes, the merge fails
    pq.write_table(_table(_logits(BIG, 3), ids), inbox / "bad-merge.parquet", row_group_size=50_000)
    (out / "bad-range.selections.parquet").parent.mkdir()
    (out / "bad-range.selections.parquet").write_bytes(b"an earlier run's file")

    with pytest.raises(ScoringFailed) as info:
        scoring_flow(
            bundle_dir=bundle["bundle_dir"], output_dir=str(out), logits_dir=str(inbox), dask={"address": local.scheduler_address},
            split_rows=SPLIT,
        )
    message = str(info.value)
    assert "2 of 3 claimed query batch(es) failed" in message and "(1 batch(es) were scored)" in message
    assert "bad-range: " in message and "must be unique" in message
    assert "bad-merge: " in message and "two row ranges" in message
    assert sorted(p.name for p in out.iterdir()) == sorted([LEDGER_NAME, "good.selections.parquet", "bad-range.selections.parquet"])
    assert (out / "bad-range.selections.parquet").read_bytes() == b"an earlier run's file"  # kept, not half replaced
    states = {e.batch: e.state for e in Ledger(out).entries()}
    assert states == {"good": "done", "bad-range": "failed", "bad-merge": "failed"}
    retry = plan_scoring(inbox, out, bundle["version"])  # the next run claims the failed batches again
    assert sorted(c.batch for c in retry.claims) == ["bad-merge", "bad-range"] and all(c.attempts == 2 for c in retry.claims)
    assert sorted(retry.done) == ["good"]


def test_a_local_cluster_asked_for_by_parameters_scores_like_the_sequential_run(bundle: dict, tmp_path: Path) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    inputs = {f"b{i}": inbox / f"b{i}.npy" for i in range(3)}
    for i, path in enumerate(inputs.values()):
        np.save(path, _logits(500, 10 + i))
    result = scoring_flow(
        bundle_dir=bundle["bundle_dir"], output_dir=str(out), logits_dir=str(inbox), dask={"n_workers": 2, "threads_per_worker": 1}
    )
    _same_as_sequential(bundle, inputs, out, result["scored"], tmp_path)
    assert {e.state for e in Ledger(out).entries()} == {"done"}


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"dask": {"adress": "tcp://127.0.0.1:8786"}}, ValueError, r"'dask' parameter knows the keys .*\['adress'\]"),
        ({"dask": {"address": "tcp://127.0.0.1:8786", "n_workers": 2}}, ValueError, r"'dask' parameter names either"),
        ({"dask": {"n_workers": 0}}, ValueError, r"'dask.n_workers' parameter must be a positive integer"),
        ({"dask": {"n_workers": 1}, "split_rows": 0}, ValueError, r"'split_rows' parameter must be a positive integer"),
        ({"split_rows": 1000}, ValueError, r"'split_rows' parameter splits batches across Dask workers, so it needs 'dask'"),
    ],
)
def test_a_bad_dask_parameter_fails_the_run_before_any_work_naming_it(bundle: dict, tmp_path: Path, options, error, match) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    np.save(inbox / "b.npy", _logits(50, 1))
    with pytest.raises(error, match=match):
        scoring_flow(bundle_dir=bundle["bundle_dir"], output_dir=str(tmp_path / "out"), logits_dir=str(inbox), **options)
    assert not (tmp_path / "out").exists()  # nothing claimed, nothing written


def test_the_dask_deployment_is_manual_and_starts_a_local_cluster_by_default() -> None:
    import yaml

    from seapig_core.scaleout import check_dask_options

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "prefect.yaml").read_text())
    (deployment,) = [d for d in config["deployments"] if d["name"] == "inbox-scoring-dask"]
    assert deployment["entrypoint"] == "flows/scoring.py:scoring_flow" and not deployment.get("schedules")
    options = check_dask_options(deployment["parameters"]["dask"])
    assert options.local and options.n_workers == 2 and options.threads_per_worker == 1
    assert deployment["parameters"]["split_rows"] == 2_000_000
    assert deployment["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
