"""Selections tables: columns, non-finite rows, multilabel, atomic Parquet writes, summaries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from seapig_core.bundle import fit_selector
from seapig_core.kernels import runner_up
from seapig_core.layout import canonicalize
from seapig_core.scores import CertaintyRatioScore
from seapig_core.selections import (
    read_selections,
    selections_path,
    selections_table,
    summarize_selections,
    write_selections,
)


@pytest.fixture(scope="module")
def bundle():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (600,), generator=g)
    logits = 2.0 * torch.randn(600, 5, generator=g)
    logits[torch.arange(600), labels] += 4.0
    return fit_selector(logits, labels, scores=["softmax", "energy"], q=0.9)


def _query(n: int = 40, k: int = 5) -> torch.Tensor:
    return 2.0 * torch.randn(n, k, generator=torch.Generator().manual_seed(1))


def test_columns_and_values(bundle) -> None:
    query = _query()
    query[3] = float("nan")
    ids = np.array([f"s{i}" for i in range(40)])
    table = selections_table(bundle, query, ids)
    assert list(table.columns) == [
        "sample_id", "prediction", "score", "selected", "alternate_label", "certainty_ratio", "score_energy", "selected_energy",
    ]
    assert table["sample_id"].tolist() == ids.tolist()
    selection = bundle.primary.select(query)
    assert np.array_equal(table["selected"], selection["selected"].numpy())
    np.testing.assert_array_equal(table["prediction"], bundle.primary.predict(query).numpy())
    ratio = CertaintyRatioScore(temperature=bundle.temperature).score(query).numpy()
    np.testing.assert_allclose(table["certainty_ratio"], ratio)
    np.testing.assert_array_equal(table["alternate_label"], runner_up(canonicalize(query), bundle.temperature).numpy())
    np.testing.assert_array_equal(table["selected_energy"], table["score_energy"] < bundle.scores["energy"].threshold)
    row = table.iloc[3]  # non-finite logits: never selected, prediction -1
    assert not row["selected"] and row["prediction"] == -1 and np.isnan(row["score"])
    assert table["selected"].any() and (~table["selected"]).any()


def test_default_ids_and_bad_ids(bundle) -> None:
    assert selections_table(bundle, _query(6))["sample_id"].tolist() == list(range(6))
    with pytest.raises(ValueError, match="one id per sample"):
        selections_table(bundle, _query(6), np.arange(5))
    with pytest.raises(ValueError, match=r"5 logits per sample.*\(7 per sample\)"):
        selections_table(bundle, _query(6, 7))


def test_multilabel_predictions_are_lists() -> None:
    g = torch.Generator().manual_seed(2)
    labels = (torch.rand(300, 4, generator=g) > 0.5).float()
    logits = 3.0 * (2 * labels - 1) + torch.randn(300, 4, generator=g)
    multilabel = fit_selector(logits, labels, task="multilabel")
    table = selections_table(multilabel, logits[:5])
    assert [len(p) for p in table["prediction"]] == [4] * 5


def test_write_is_atomic_and_replaces(bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = selections_path(tmp_path / "out", "batch-1")
    assert path.name == "batch-1.selections.parquet"
    table = selections_table(bundle, _query(), [f"s{i}" for i in range(40)])
    write_selections(table, path, metadata={"batch": "batch-1"})
    first = path.read_bytes()
    write_selections(table, path, metadata={"batch": "batch-1"})
    assert path.read_bytes() == first  # deterministic bytes: no timestamps
    back = read_selections(path)
    pd.testing.assert_frame_equal(back, table, check_dtype=False)
    assert back.attrs["seapig_core"]["batch"] == "batch-1" and back.attrs["seapig_core"]["schema_version"] == 1
    assert pq.read_table(path).num_rows == 40  # plain Parquet for any reader

    import seapig_core.selections as selections

    def broken(arrow, where, *args, **kwargs):
        Path(where).write_bytes(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(selections.pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        write_selections(table.head(3), path)
    assert path.read_bytes() == first and sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_bad_paths_and_files(bundle, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="plain file-name stem"):
        selections_path(tmp_path, "../escape")
    table = selections_table(bundle, _query(3))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="'output_dir' parameter must be a writable directory"):
        write_selections(table, blocker / "sub" / "x.selections.parquet")
    with pytest.raises(ValueError, match="must have the columns"):
        write_selections(table.drop(columns="selected"), tmp_path / "x.parquet")
    pq.write_table(pq.read_table(write_selections(table, tmp_path / "ok.parquet")).replace_schema_metadata({}), tmp_path / "plain.parquet")
    with pytest.raises(ValueError, match="not a seapig_core selections file"):
        read_selections(tmp_path / "plain.parquet")
    with pytest.raises(ValueError, match="existing selections file"):
        read_selections(tmp_path / "missing.parquet")


def test_summary_reports_rejection_and_drift(bundle) -> None:
    same = selections_table(bundle, bundle.primary.logits)
    summary = summarize_selections(bundle, same)
    assert summary["samples"] == len(same) and summary["selected"] + summary["rejected"] == len(same)
    assert summary["rejection_rate"] == pytest.approx(summary["expected_rejection_rate"])
    assert summary["ks_statistic"] == pytest.approx(0.0, abs=1e-9)
    shifted = selections_table(bundle, 0.2 * _query(300))  # low-confidence data: drift and more rejections
    drift = summarize_selections(bundle, shifted)
    assert drift["ks_statistic"] > 0.5 and drift["ks_pvalue"] < 1e-6 and drift["rejection_rate"] > 0.5
    nan_only = selections_table(bundle, torch.full((2, 5), float("nan")))
    assert summarize_selections(bundle, nan_only)["ks_statistic"] is None
