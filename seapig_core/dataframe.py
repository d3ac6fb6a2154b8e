"""Scores from a pandas DataFrame column of probability or logit vectors.

Renumics Spotlight's decision-boundary playbook keeps, per sample, the model's probability
vector in a DataFrame column (``df["probabilities"]``) and computes the top-2 certainty ratio
with a Python loop. :func:`boundary_score` is that function, vectorised, with the playbook's
exact output; :func:`score_frame` gives any registered score (:data:`seapig_core.scores.SCORES`)
with the prediction and the alternate label, from a column of probabilities or of logits.

The column
----------
One vector per row, all of the same length: 1-D numpy arrays or lists/tuples of numbers (what
``DataFrame.to_pandas()`` of Hugging Face ``datasets``, ``pandas.read_parquet`` and the
playbook give), or a pyarrow-backed list column (``pd.ArrowDtype(pa.list_(...))``, read as
float64: iterating it gives lists of Python floats, which is what the playbook then divides). A binary
model's probability of class 1 may also be a plain numeric column (``task="binary"``). A null,
a ragged row, a nested or non-numeric value raises, naming the column and the row (position
and index label). Vectors are stacked into one ``(N, K)`` array in their own dtype (float32
arrays stay float32; lists of Python floats become float64).

Probabilities are validated and turned into logits by
:func:`seapig_core.probabilities.logits_from_probabilities` (the one owner of probability
input; see there for zeros and for what a temperature means on probabilities).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from seapig_core.kernels import score_pass
from seapig_core.layout import canonicalize, check_task
from seapig_core.probabilities import check_probabilities, logits_from_probabilities
from seapig_core.scores import SCORES, make_score

__all__ = ["KINDS", "boundary_score", "score_frame"]

#: Accepted values of the ``kind`` parameter of :func:`score_frame`.
KINDS: tuple[str, ...] = ("probabilities", "logits")
#: Scores that need the model's own logits (see :mod:`seapig_core.probabilities`).
_NEED_LOGITS: tuple[str, ...] = ("energy",)


# =========================================================================== the column


def _row_name(df: pd.DataFrame, position: int) -> str:
    return f"row {position} (index {df.index[position]!r})"


def _check_frame(df: Any, column: Any, argument: str) -> pd.Series:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"The 'df' parameter must be a pandas DataFrame. Got {type(df).__name__} instead.")
    try:
        present = column in df.columns
    except TypeError:  # unhashable
        present = False
    if not present:
        shown = [str(c) for c in df.columns[:10]]
        raise ValueError(
            f"The '{argument}' parameter must name a column of 'df' (columns: {shown}"
            f"{', ...' if len(df.columns) > 10 else ''}). Got {column!r} instead."
        )
    series = df[column]
    if isinstance(series, pd.DataFrame):
        raise ValueError(f"The '{argument}' parameter must name one column, but 'df' has {series.shape[1]} named {column!r}.")
    return series


def _arrow_matrix(df: pd.DataFrame, series: pd.Series, column: str) -> np.ndarray:
    """An Arrow list column -> ``(N, K)`` numpy, checked for nulls and equal lengths."""
    array = pa.array(series.array)
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if not (pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or pa.types.is_fixed_size_list(array.type)):
        raise TypeError(
            f"The {column!r} column must hold one vector of numbers per row. Got the Arrow type {array.type} instead."
        )
    value_type = array.type.value_type
    if not (pa.types.is_floating(value_type) or pa.types.is_integer(value_type)):
        raise TypeError(f"The {column!r} column must hold numbers. Got vectors of Arrow type {value_type} instead.")
    if array.null_count:
        first = int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"The {column!r} column must not contain nulls. Got a null at {_row_name(df, first)} instead.")
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    _check_lengths(df, lengths, column)
    values = array.flatten()  # respects offsets and slices
    if values.null_count:
        first_value = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(
            f"The {column!r} column must not contain nulls. Got a null inside the vector at "
            f"{_row_name(df, first_value // int(lengths[0]))} instead."
        )
    # Iterating an Arrow column gives lists of Python floats (as the playbook does): float64.
    matrix = values.to_numpy(zero_copy_only=False).astype(np.float64)
    return matrix.reshape(len(array), int(lengths[0]) if len(array) else 0)


def _check_lengths(df: pd.DataFrame, lengths: np.ndarray, column: str) -> None:
    if lengths.size and np.any(lengths != lengths[0]):
        first = int(np.flatnonzero(lengths != lengths[0])[0])
        raise ValueError(
            f"The {column!r} column must hold vectors of one length. Got {int(lengths[0])} values at "
            f"{_row_name(df, 0)} and {int(lengths[first])} at {_row_name(df, first)} instead."
        )


def _object_matrix(df: pd.DataFrame, values: np.ndarray, column: str) -> np.ndarray:
    """An object column of arrays/lists -> ``(N, K)`` numpy in the vectors' dtype.

    The fast path stacks with one ``np.concatenate`` (arrays) or ``np.fromiter`` (lists) and
    checks the result; only when that fails is the column walked to name the bad row.
    """
    types = set(map(type, values))
    if not types <= {np.ndarray, list, tuple}:
        _raise_bad_row(df, values, column)
    try:
        lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    except TypeError:  # a 0-d array
        _raise_bad_row(df, values, column)
    _check_lengths(df, lengths, column)
    n, k = len(values), int(lengths[0]) if len(values) else 0
    try:
        if types == {np.ndarray}:
            flat = np.concatenate(values) if n else np.empty(0)
        else:
            flat = np.fromiter(itertools.chain.from_iterable(values), dtype=np.float64, count=n * k)
    except (TypeError, ValueError):
        _raise_bad_row(df, values, column)
    if flat.ndim != 1 or flat.size != n * k or flat.dtype.kind not in "iuf":
        _raise_bad_row(df, values, column)
    return flat.reshape(n, k)


def _raise_bad_row(df: pd.DataFrame, values: np.ndarray, column: str) -> None:
    """Name the first row that is not a 1-D vector of real numbers."""
    for position, value in enumerate(values):
        if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
            raise ValueError(f"The {column!r} column must not contain nulls. Got {value!r} at {_row_name(df, position)} instead.")
        if not isinstance(value, (np.ndarray, list, tuple)):
            raise TypeError(
                f"The {column!r} column must hold one vector of numbers per row (a 1-D numpy array or a list). "
                f"Got {type(value).__name__} at {_row_name(df, position)} instead."
            )
        array = np.asarray(value) if not isinstance(value, np.ndarray) else value
        if array.ndim != 1:
            raise ValueError(
                f"The {column!r} column must hold 1-D vectors. Got shape {array.shape} at {_row_name(df, position)} instead."
            )
        if array.dtype.kind not in "iuf":
            raise TypeError(
                f"The {column!r} column must hold vectors of numbers. Got {list(value)[:5]!r} (dtype {array.dtype}) at "
                f"{_row_name(df, position)} instead."
            )
    raise AssertionError("unreachable: every row is a 1-D numeric vector")  # pragma: no cover


def _column_matrix(df: Any, column: Any, argument: str, *, allow_scalars: bool = False) -> np.ndarray:
    """The column as one ``(N, K)`` array (``(N,)`` for a numeric column when ``allow_scalars``)."""
    series = _check_frame(df, column, argument)
    dtype = series.dtype
    if isinstance(dtype, pd.ArrowDtype):
        arrow_type = dtype.pyarrow_dtype
        if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type):
            return _arrow_matrix(df, series, column)
        numeric = pa.types.is_floating(arrow_type) or pa.types.is_integer(arrow_type)
    elif dtype == object:
        return _object_matrix(df, series.to_numpy(dtype=object), column)
    else:
        numeric = dtype.kind in "iuf"
    if not numeric:
        raise TypeError(f"The {column!r} column must hold one vector of numbers per row. Got dtype {dtype} instead.")
    nulls = series.isna().to_numpy()
    if nulls.any():
        first = int(np.flatnonzero(nulls)[0])
        raise ValueError(f"The {column!r} column must not contain nulls. Got a null at {_row_name(df, first)} instead.")
    if not allow_scalars:
        raise TypeError(
            f"The {column!r} column must hold one vector per row. Got a column of {dtype} numbers instead "
            f"(a binary model's probability or logit of class 1 per row is accepted with task='binary')."
        )
    return series.to_numpy(copy=True)  # pandas may hand out a read-only view


# =========================================================================== the playbook


def boundary_score(df: pd.DataFrame, probabilities_name: str = "probabilities") -> pd.DataFrame:
    """The decision-boundary score of Spotlight's playbook, vectorised.

    For each row's probability vector ``p``: ``decision_boundary_score = p_(2) / p_(1)``, the
    second-largest probability over the largest, in ``[0, 1]`` (1 on the decision boundary,
    0 far from it), and ``decision_boundary_alternate_label``, the class of ``p_(2)``. The
    values equal the playbook's own function (``np.argsort(probs)[::-1]``, then
    ``probs[i1] / probs[i0]``) bit for bit, in the vectors' dtype, and so do the labels:
    rows without ties among the top three probabilities are resolved by one vectorised
    top-k; rows with a tie at the top (or for second place) are sorted with the playbook's own
    call, ``np.argsort`` per row, so ties are broken exactly as the playbook breaks them on the
    same machine. (NumPy's default sort is not stable: on x86 with AVX2 or AVX-512 it uses a
    vectorised sort, so the playbook's choice among tied classes depends on the NumPy build and
    the CPU; this function inherits that, by design.)

    One difference from the playbook: the result keeps ``df``'s index (the playbook's frame has
    a fresh ``RangeIndex``), so ``pd.concat([df, boundary_score(df)], axis=1)`` aligns rows
    for any index.

    Parameters
    ----------
    df : pandas.DataFrame
        One row per sample.
    probabilities_name : str, default "probabilities"
        The column holding each sample's class probability vector (see the module docstring
        for the accepted column types); at least 2 classes, rows summing to 1
        (:func:`seapig_core.probabilities.check_probabilities`).

    Returns
    -------
    pandas.DataFrame
        Exactly the columns ``decision_boundary_score`` (the vectors' float dtype) and
        ``decision_boundary_alternate_label`` (int64), indexed like ``df``.

    Raises
    ------
    TypeError, ValueError
        For a ``df`` that is not a DataFrame, an unknown column, nulls, ragged or non-numeric
        rows, and values that are not probabilities.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> df = pd.DataFrame({"probabilities": [np.array([0.1, 0.6, 0.3]), np.array([0.5, 0.0, 0.5])]})
    >>> boundary_score(df)
       decision_boundary_score  decision_boundary_alternate_label
    0                      0.5                                  2
    1                      1.0                                  0
    """
    probs = _column_matrix(df, probabilities_name, "probabilities_name")
    if probs.dtype.kind not in "f":
        probs = probs.astype(np.float64)  # integer one-hot rows: the playbook's division gives float64
    n, k = probs.shape
    if n == 0:  # empty in, empty out
        return pd.DataFrame(
            {
                "decision_boundary_score": np.empty(0, dtype=probs.dtype),
                "decision_boundary_alternate_label": np.empty(0, dtype=np.int64),
            },
            index=df.index,
        )
    check_probabilities(probs, "multiclass", name=probabilities_name, what="column")
    values, indices = torch.topk(torch.from_numpy(probs), min(3, k), dim=1)
    values, indices = values.numpy(), indices.numpy()
    top, second = values[:, 0], values[:, 1]
    alternate = indices[:, 1].astype(np.int64)
    tied = top == second
    if k > 2:
        tied |= second == values[:, 2]
    rows = np.flatnonzero(tied)
    if rows.size:
        order = np.argsort(probs[rows], axis=1)  # the playbook's sort, row by row
        alternate[rows] = order[:, -2]
    return pd.DataFrame(
        {"decision_boundary_score": second / top, "decision_boundary_alternate_label": alternate},
        index=df.index,
    )


# =========================================================================== any score


def score_frame(
    df: pd.DataFrame,
    score: str = "softmax",
    column: str | None = None,
    kind: str = "probabilities",
    temperature: float | None = None,
    task: str = "multiclass",
) -> pd.DataFrame:
    """Any registered score, the prediction and the alternate label from a DataFrame column.

    Parameters
    ----------
    df : pandas.DataFrame
        One row per sample.
    score : str, default "softmax"
        A name of :data:`seapig_core.scores.SCORES`. ``"energy"`` needs logits: on
        probabilities it is refused (it is constant at ``T = 1``; see
        :mod:`seapig_core.probabilities`).
    column : str or None, default None
        The column of vectors; None: the column named like ``kind``.
    kind : {"probabilities", "logits"}, default "probabilities"
        What the vectors hold. Probabilities become logits through
        :func:`seapig_core.probabilities.logits_from_probabilities` (validated; zeros clipped).
    temperature : float or None, default None
        ``T > 0`` of the score (None: 1). On probabilities it raises them to ``1/T`` and
        renormalises.
    task : {"multiclass", "binary", "multilabel"}, default "multiclass"
        As everywhere in the library; ``task="binary"`` also takes a numeric column holding the
        probability (or logit) of class 1. (Member axes do not fit a column of vectors:
        score ensembles with the score classes.)

    Returns
    -------
    pandas.DataFrame
        Indexed like ``df``, with ``score`` (higher = more uncertain; the vectors' float dtype,
        NaN for a row of non-finite logits), ``prediction`` (int64 class; multilabel: a 0/1
        int64 array per row; -1 for non-finite logits) and ``alternate_label`` (int64: the
        runner-up class, or for multilabel the label nearest its decision boundary; -1 for
        non-finite logits).

    Raises
    ------
    TypeError, ValueError
        For bad frames and columns (see :func:`boundary_score`), an unknown ``score``,
        ``kind`` or ``task``, energy on probabilities, and invalid probabilities or logits.
    """
    if not isinstance(score, str) or score not in SCORES:
        raise ValueError(f"The 'score' parameter must be one of {sorted(SCORES)}. Got {score!r} instead.")
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"The 'kind' parameter must be one of {list(KINDS)}. Got {kind!r} instead.")
    task = check_task(task)
    if SCORES[score].reads_confidence:
        raise ValueError(
            f"The 'score' parameter {score!r} reads a learned confidence head's logit, which a column of "
            f"probability or logit vectors does not carry. Score such logits with "
            f"seapig_core.ConfidenceScore (confidence_head=True). Got score={score!r} instead."
        )
    if kind == "probabilities" and score in _NEED_LOGITS:
        raise ValueError(
            f"The 'score' parameter {score!r} needs the model's logits: on probabilities (log p as logits) the "
            f"energy is -T log sum p^(1/T), constant at T = 1. Use kind='logits' with a column of logits, or "
            f"another score. Got score={score!r} with kind='probabilities' instead."
        )
    column = kind if column is None else column
    matrix = _column_matrix(df, column, "column", allow_scalars=task == "binary")
    if matrix.dtype.kind not in "f":
        matrix = matrix.astype(np.float32)
    index = df.index
    scorer = make_score(score, temperature=temperature, task=task)
    if matrix.shape[0] == 0:  # empty in, empty out
        return pd.DataFrame(
            {
                "score": np.empty(0, dtype=matrix.dtype),
                "prediction": np.empty(0, dtype=np.int64),
                "alternate_label": np.empty(0, dtype=np.int64),
            },
            index=index,
        )
    if kind == "probabilities":
        logits = logits_from_probabilities(matrix, task, name=column)
    else:
        logits = torch.from_numpy(matrix)
    # Validated once and read once: the score, the prediction and the runner-up in one pass.
    out = score_pass(canonicalize(logits, task, name=column), [scorer.name], scorer.T, labels=True)
    values, prediction, alternate = out.scores[scorer.name].numpy(), out.prediction.numpy(), out.runner_up.numpy()
    return pd.DataFrame(
        {
            "score": values,
            "prediction": list(prediction) if prediction.ndim == 2 else prediction,
            "alternate_label": alternate,
        },
        index=index,
    )
