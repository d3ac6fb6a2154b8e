"""The review queue (issue 9 item 3, library): rejected samples, most uncertain first."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from seapig_core.bundle import fit_selector
from seapig_core.review import QUEUE_COLUMNS, check_class_names, format_review_queue, review_queue
from seapig_core.selections import read_selections, selections_table, write_selections


def _table() -> pd.DataFrame:
    return pd.DataFrame({
        "sample_id": ["a", "b", "c", "d", "e", "f", "g"],
        "prediction": [0, 1, 2, -1, 1, 0, 2],
        "score": [-0.9, -0.4, -0.4, np.nan, -0.6, -0.3, -0.95],
        "selected": [True, False, False, False, False, False, True],
        "alternate_label": [1, 0, 0, -1, 2, 1, 0],
        "certainty_ratio": [0.1, 0.5, 0.8, np.nan, 0.4, 0.9, 0.05],
    })


def test_order_non_finite_first_then_most_uncertain() -> None:
    queue = review_queue(_table())
    # d: non-finite; f: highest score; c before b: same score, c nearer the boundary; e last.
    assert queue["sample_id"].tolist() == ["d", "f", "c", "b", "e"]
    assert list(queue.columns) == list(QUEUE_COLUMNS)
    assert queue["non_finite"].tolist() == [True, False, False, False, False]
    assert queue["runner_up"].tolist() == [-1, 1, 0, 0, 2] and queue["prediction"].tolist() == [-1, 0, 2, 1, 1]
    assert review_queue(_table(), n=2)["sample_id"].tolist() == ["d", "f"]
    assert review_queue(_table().assign(selected=True, score=-1.0)).empty


def test_class_names_are_added_and_checked() -> None:
    queue = review_queue(_table(), class_names=["cat", "dog", "emu"])
    assert list(queue.columns) == [
        "sample_id", "prediction", "prediction_name", "runner_up", "runner_up_name", "certainty_ratio", "score", "non_finite",
    ]
    assert queue["prediction_name"].tolist() == [None, "cat", "emu", "dog", "dog"]
    assert queue["runner_up_name"].tolist() == [None, "dog", "cat", "cat", "emu"]
    with pytest.raises(ValueError, match="must name every class: label 2 appears but only 2 names were given"):
        review_queue(_table(), class_names=["cat", "dog"])
    with pytest.raises(ValueError, match=r"distinct names. Got \['cat'\] more than once"):
        check_class_names(["cat", "cat"])
    with pytest.raises(TypeError, match="'class_names' parameter must be a list of strings or None. Got str"):
        review_queue(_table(), class_names="cat")
    with pytest.raises(TypeError, match="must hold strings only. Got int"):
        check_class_names(["cat", 1])


def test_bad_tables_and_counts() -> None:
    with pytest.raises(ValueError, match=r"must have the columns \['selected'\]"):
        review_queue(_table().drop(columns="selected"))
    with pytest.raises(ValueError, match="'n' parameter must be a positive integer. Got 0"):
        review_queue(_table(), n=0)
    with pytest.raises(TypeError, match="'table' parameter must be a pandas DataFrame"):
        review_queue(_table().to_dict())
    minimal = review_queue(_table().drop(columns=["alternate_label", "certainty_ratio"]))
    assert minimal["sample_id"].tolist() == ["d", "f", "b", "c", "e"]  # no ratio: ties in input order
    assert (minimal["runner_up"] == -1).all() and minimal["certainty_ratio"].isna().all()


def _labelled(n: int = 800, k: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    logits = 1.5 * torch.randn(n, k, generator=g)
    logits[torch.arange(n), labels] += 4.0
    return logits, labels


def test_queue_of_a_real_selections_file(tmp_path) -> None:
    bundle = fit_selector(*_labelled(), q=0.9)
    query = _labelled(200, seed=1)[0] * 0.5
    query[7] = float("nan")
    ids = np.array([f"img_{i:04d}" for i in range(200)])
    path = write_selections(selections_table(bundle, query, ids), tmp_path / "b.selections.parquet")
    table = read_selections(path)
    queue = review_queue(table, n=15, class_names=["cat", "dog", "emu", "fox"])
    # Independent reference: pandas sorting of the rejected rows.
    rejected = table[~table["selected"]].assign(position=np.arange(200)[~table["selected"].to_numpy()])
    finite = rejected[rejected["score"].notna()].sort_values(
        ["score", "certainty_ratio", "position"], ascending=[False, False, True], kind="stable"
    )
    assert queue["sample_id"].tolist() == ["img_0007", *finite["sample_id"].tolist()[:14]]
    assert (np.diff(queue["score"].to_numpy()[1:]) <= 0).all()
    names = ["cat", "dog", "emu", "fox"]
    assert queue["prediction_name"].iloc[1] == names[int(queue["prediction"].iloc[1])]
    assert queue["runner_up_name"].iloc[1] == names[int(queue["runner_up"].iloc[1])]

    display = format_review_queue(queue)
    assert display[0] == {
        "rank": "1", "sample_id": "img_0007", "prediction": "n/a (non-finite logits)", "runner_up": "n/a",
        "certainty_ratio": "n/a", "score": "n/a",
    }
    row = queue.iloc[1]
    assert display[1]["prediction"] == f"{row['prediction_name']} ({row['prediction']})"
    assert display[1]["score"] == format(row["score"], "#.4g") and all(isinstance(v, str) for v in display[1].values())
    assert "value" not in display[1]
    confidence = format_review_queue(queue, score="softmax")[1]
    assert confidence["value"] == format(-row["score"], "#.4g")  # the max softmax probability
    assert "value" not in format_review_queue(queue, score="entropy")[1]  # entropy is shown as it is


def test_multilabel_queue() -> None:
    g = torch.Generator().manual_seed(3)
    logits = 3.0 * torch.randn(600, 3, generator=g)
    bundle = fit_selector(logits, (logits + torch.randn(600, 3, generator=g) > 0).float(), task="multilabel", q=0.8)
    query = torch.randn(40, 3, generator=g)
    query[0] = float("nan")
    table = selections_table(bundle, query)
    queue = review_queue(table, n=10, class_names=["red", "green", "blue"])
    assert queue["non_finite"].iloc[0] and queue["prediction_name"].iloc[0] is None
    for prediction, name in zip(queue["prediction"].iloc[1:], queue["prediction_name"].iloc[1:], strict=True):
        assert name == ", ".join(n for n, p in zip(["red", "green", "blue"], prediction, strict=True) if p == 1)
    display = format_review_queue(review_queue(table, n=10))
    for row, prediction in zip(display[1:], queue["prediction"].iloc[1:], strict=True):
        assert row["prediction"] == (", ".join(str(i) for i, p in enumerate(prediction) if p == 1) or "none")
