"""The review queue: the rejected samples of a batch that a person should look at first.

:func:`review_queue` takes a selections table (:func:`seapig_core.selections.selections_table`
or :func:`seapig_core.selections.read_selections`) and returns its rejected samples in the
order a reviewer should see them, as a DataFrame for notebooks; :func:`format_review_queue`
turns that into display rows (every number in the one format of
:mod:`seapig_core.formatting`) for a report or a Prefect table artifact.

Order:

1. samples with non-finite logits (score NaN) first, in input order: they are rejected
   whatever their score, and usually mean broken input rather than a hard case;
2. then the other rejected samples, most uncertain first: primary score descending (higher
   means more uncertain, for every score), ties broken by the certainty ratio descending
   (closer to the decision boundary first), then by input order.

Accepted samples never appear.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from seapig_core._validation import check_positive_int
from seapig_core.formatting import format_value

__all__ = ["QUEUE_COLUMNS", "check_class_names", "format_review_queue", "review_queue"]

#: Columns of :func:`review_queue` (``prediction_name`` and ``runner_up_name`` are added after
#: ``prediction`` and ``runner_up`` when class names are given).
QUEUE_COLUMNS = ("sample_id", "prediction", "runner_up", "certainty_ratio", "score", "non_finite")


def check_class_names(class_names: Any, name: str = "class_names") -> list[str] | None:
    """None, or a non-empty sequence of distinct strings (one per class or label)."""
    if class_names is None:
        return None
    if isinstance(class_names, (str, bytes)) or not isinstance(class_names, (Sequence, np.ndarray)):
        raise TypeError(f"The '{name}' parameter must be a list of strings or None. Got {type(class_names).__name__} instead.")
    names = list(class_names)
    if not names:
        raise ValueError(f"The '{name}' parameter must name at least one class. Got an empty list.")
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"The '{name}' parameter must hold strings only. Got {type(bad[0]).__name__} ({bad[0]!r}).")
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"The '{name}' parameter must hold distinct names. Got {repeated} more than once.")
    return names


def _is_multilabel(values: pd.Series) -> bool:
    return len(values) > 0 and isinstance(values.iloc[0], (list, tuple, np.ndarray))


def _labels_used(queue: pd.DataFrame, multilabel: bool) -> int:
    """The largest label index the queue refers to, or -1."""
    largest = -1
    if multilabel:
        widths = [len(p) for p in queue["prediction"]]
        largest = max(widths, default=0) - 1
    elif len(queue):
        largest = int(pd.to_numeric(queue["prediction"]).max())
    runner = pd.to_numeric(queue["runner_up"], errors="coerce").dropna()
    if len(runner):
        largest = max(largest, int(runner.max()))
    return largest


def _name(index: Any, names: list[str]) -> str | None:
    if index is None or pd.isna(index) or int(index) < 0:
        return None
    return names[int(index)]


def review_queue(table: pd.DataFrame, n: int = 20, class_names: Sequence[str] | None = None) -> pd.DataFrame:
    """The rejected samples a person should look at first (see the module docstring for the order).

    Parameters
    ----------
    table : pandas.DataFrame
        A selections table: ``sample_id``, ``prediction``, ``score``, ``selected`` and, when
        present, ``alternate_label`` and ``certainty_ratio`` (missing ones read as missing).
    n : int, default 20
        Most rows returned.
    class_names : sequence of str, optional
        One name per class (multilabel: per label), e.g. the bundle's ``class_names``; adds
        ``prediction_name`` and ``runner_up_name``.

    Returns
    -------
    pandas.DataFrame
        At most ``n`` rows, index 0.. in review order, with the columns ``sample_id``,
        ``prediction`` (``prediction_name``), ``runner_up`` (``runner_up_name``),
        ``certainty_ratio``, ``score`` and ``non_finite`` (True for samples with non-finite
        logits). Multilabel: ``prediction`` holds the 0/1 vector and ``prediction_name`` the
        names of the predicted labels joined by ``", "`` (empty string for none). A missing
        prediction or runner-up (``-1``, non-finite logits) has no name (None).

    Raises
    ------
    ValueError
        If columns are missing, ``n`` is not a positive integer, or ``class_names`` does not
        name every class the queue refers to.
    """
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"The 'table' parameter must be a pandas DataFrame. Got {type(table).__name__} instead.")
    missing = [c for c in ("sample_id", "prediction", "score", "selected") if c not in table.columns]
    if missing:
        raise ValueError(f"The 'table' parameter must have the columns {missing}. Got {list(table.columns)} instead.")
    n = check_positive_int(n, "n")
    names = check_class_names(class_names)

    score = table["score"].to_numpy(dtype=np.float64)
    ratio = (
        table["certainty_ratio"].to_numpy(dtype=np.float64)
        if "certainty_ratio" in table.columns
        else np.full(len(table), np.nan)
    )
    rejected = ~table["selected"].to_numpy(dtype=bool) | ~np.isfinite(score)
    non_finite = ~np.isfinite(score)
    # lexsort: last key first. Non-finite first, then score and ratio descending (NaN last), then position.
    order = np.lexsort((
        np.arange(len(table)),
        np.where(np.isnan(ratio), np.inf, -ratio),
        np.where(non_finite, 0.0, -np.nan_to_num(score, nan=0.0, posinf=0.0, neginf=0.0)),
        ~non_finite,
    ))
    picked = order[rejected[order]][:n]

    rows = table.iloc[picked]
    queue = pd.DataFrame({
        "sample_id": rows["sample_id"].to_numpy(),
        "prediction": list(rows["prediction"]) if _is_multilabel(rows["prediction"]) else rows["prediction"].to_numpy(),
        "runner_up": (
            rows["alternate_label"].to_numpy() if "alternate_label" in rows.columns else np.full(len(rows), -1, dtype=np.int64)
        ),
        "certainty_ratio": ratio[picked],
        "score": score[picked],
        "non_finite": non_finite[picked],
    })
    if names is None:
        return queue
    multilabel = _is_multilabel(queue["prediction"])
    largest = _labels_used(queue, multilabel)
    if largest >= len(names):
        raise ValueError(
            f"The 'class_names' parameter must name every class: label {largest} appears but only "
            f"{len(names)} names were given."
        )
    if multilabel:
        prediction_names = [
            ", ".join(names[i] for i in np.flatnonzero(np.asarray(p) > 0)) if np.all(np.asarray(p) >= 0) else None
            for p in queue["prediction"]
        ]
    else:
        prediction_names = [_name(p, names) for p in queue["prediction"]]
    # object columns: a missing name stays None (pandas' string dtype would turn it into NaN)
    queue.insert(2, "prediction_name", pd.Series(prediction_names, dtype=object))
    queue.insert(4, "runner_up_name", pd.Series([_name(r, names) for r in queue["runner_up"]], dtype=object))
    return queue


def _label_text(index: Any, name: Any) -> str:
    if index is None or pd.isna(index) or int(index) < 0:
        return "n/a"
    return f"{name} ({int(index)})" if isinstance(name, str) else str(int(index))


def format_review_queue(queue: pd.DataFrame, score: str | None = None) -> list[dict[str, str]]:
    """Display rows of a :func:`review_queue`: every value a string in the one number format.

    Keys: ``rank`` (1-based), ``sample_id``, ``prediction``, ``runner_up``,
    ``certainty_ratio``, ``score`` (4 significant digits, like the threshold it was compared
    with). With ``score`` naming a registry score that is a negated familiar quantity (e.g.
    ``"softmax"``, see :data:`seapig_core.plotting.SCORE_AXES`), rows also have ``value``: that
    quantity (the max softmax probability, ...), as on the density plot's axis. A named class
    reads ``"cat (3)"``; multilabel predictions list the predicted labels
    (``"cat, dog"`` or ``"1, 2"``; ``"none"``); a sample with non-finite logits reads
    ``"n/a (non-finite logits)"``. The strings are not markdown-escaped: pass them through
    :func:`seapig_core.formatting.markdown_cell` for markdown (a Prefect table artifact shows
    them as they are).
    """
    if not isinstance(queue, pd.DataFrame):
        raise TypeError(f"The 'queue' parameter must be a pandas DataFrame. Got {type(queue).__name__} instead.")
    missing = [c for c in QUEUE_COLUMNS if c not in queue.columns]
    if missing:
        raise ValueError(f"The 'queue' parameter must have the columns {missing} (see review_queue). Got {list(queue.columns)}.")
    named = "prediction_name" in queue.columns
    from seapig_core.plotting import SCORE_AXES

    axis = SCORE_AXES.get(score) if score is not None else None
    flipped = axis is not None and axis.rejects_low
    rows = []
    for rank, row in enumerate(queue.itertuples(index=False), start=1):
        values = row._asdict()
        prediction = values["prediction"]
        if values["non_finite"]:
            predicted = "n/a (non-finite logits)"
        elif isinstance(prediction, (list, tuple, np.ndarray)):
            positives = np.flatnonzero(np.asarray(prediction) > 0)
            predicted = (values["prediction_name"] if named else ", ".join(str(i) for i in positives)) or "none"
        else:
            predicted = _label_text(prediction, values.get("prediction_name"))
        rows.append({
            "rank": str(rank),
            "sample_id": str(values["sample_id"]),
            "prediction": predicted,
            "runner_up": _label_text(values["runner_up"], values.get("runner_up_name")),
            "certainty_ratio": format_value(values["certainty_ratio"], "stat"),
            "score": format_value(values["score"], "threshold"),
        })
        if flipped:
            rows[-1]["value"] = format_value(axis.value(values["score"]), "threshold")  # type: ignore[union-attr]
    return rows
