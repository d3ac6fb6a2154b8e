"""seapig_core.dataframe against Spotlight's decision-boundary playbook (its function copied
verbatim from the seed below) and against the score classes (issue 11 item 4)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import seapig_core
from seapig_core.dataframe import boundary_score, score_frame
from seapig_core.probabilities import logits_from_probabilities
from seapig_core.scores import SCORES, make_score


# The playbook's function, verbatim from /work/shared/seeds/004_*.txt (indentation restored).
def playbook_boundary_score(df, probabilities_name='probabilities'):
    def compute_score(probs):
        indices=np.argsort(probs)[::-1]
        score = [indices[0], indices[1], probs[indices[0]],probs[indices[1]] ]
        return score
    df_out=pd.DataFrame()
    temp_scores=[compute_score(x) for x in df[probabilities_name]]
    df_out['decision_boundary_score']=[x[3]/x[2] for x in temp_scores]
    df_out['decision_boundary_alternate_label']=[x[1] for x in temp_scores]
    return df_out


def _probabilities(n, k, seed, dtype=np.float32, ties=0.3):
    """Dirichlet rows; a fraction with ties at the top, for second place, one-hot and uniform."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(k, 0.3), n)
    kinds = rng.integers(0, 4, n) * (rng.random(n) < ties)
    for i in np.flatnonzero(kinds):
        if kinds[i] == 1:  # tie at the top
            a, b = rng.choice(k, 2, replace=False)
            p[i, b] = p[i, a] = p[i].max()
        elif kinds[i] == 2 and k > 2:  # tie for second place
            order = np.argsort(p[i])
            p[i, order[-3]] = p[i, order[-2]]
        elif kinds[i] == 3:  # one-hot or uniform: many tied classes
            p[i] = np.eye(k)[rng.integers(k)] if rng.random() < 0.5 else 1.0 / k
    p /= p.sum(axis=1, keepdims=True)
    return p.astype(dtype)


def _frame(p, as_lists=False, index=None):
    rows = [list(map(float, r)) for r in p] if as_lists else list(p)
    return pd.DataFrame({"probabilities": rows, "other": np.arange(len(p))}, index=index)


# =========================================================================== the playbook


@pytest.mark.parametrize("k", [2, 3, 10, 17, 100])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_boundary_score_equals_the_playbook_values_labels_and_dtypes(k, dtype):
    """Acceptance (11.4): the same values and labels as the playbook's function, ties included."""
    p = _probabilities(3000, k, seed=k, dtype=dtype)
    df = _frame(p)
    ours = boundary_score(df)
    reference = playbook_boundary_score(df)
    assert list(ours.columns) == ["decision_boundary_score", "decision_boundary_alternate_label"]
    pd.testing.assert_frame_equal(ours, reference, check_exact=True)
    # Tied rows really were there (else the tie path would go untested).
    top2 = np.sort(p, axis=1)[:, -3:]
    assert np.sum(top2[:, -1] == top2[:, -2]) > 100


def test_boundary_score_on_rows_of_python_floats():
    p = _probabilities(500, 10, seed=1, dtype=np.float64)
    df = _frame(p, as_lists=True)
    pd.testing.assert_frame_equal(boundary_score(df), playbook_boundary_score(df), check_exact=True)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 30), st.integers(2, 6), st.integers(0, 2**31 - 1))
def test_boundary_score_matches_the_playbook_on_heavily_tied_rows(n, k, seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 3, (n, k)).astype(np.float64)
    counts[counts.sum(axis=1) == 0, 0] = 1.0
    p = counts / counts.sum(axis=1, keepdims=True)  # many exact ties
    df = _frame(p)
    pd.testing.assert_frame_equal(boundary_score(df), playbook_boundary_score(df), check_exact=True)


def test_boundary_score_on_the_shared_record(cifar100):
    from tests.conftest import CIFAR100

    with np.load(CIFAR100, allow_pickle=False) as record:
        probs = record["predictions"]
    df = pd.DataFrame({"probabilities": list(probs)})
    pd.testing.assert_frame_equal(boundary_score(df), playbook_boundary_score(df), check_exact=True)


def test_boundary_score_keeps_the_index_and_other_column_names():
    p = _probabilities(50, 5, seed=2)
    index = pd.Index([f"id-{i}" for i in range(49, -1, -1)], name="sample_id")
    df = _frame(p, index=index).rename(columns={"probabilities": "probs"})
    ours = boundary_score(df, probabilities_name="probs")
    assert ours.index.equals(index)
    reference = playbook_boundary_score(df, probabilities_name="probs")
    np.testing.assert_array_equal(ours.to_numpy(), reference.to_numpy())
    numbered = pd.DataFrame({0: list(p)})  # any column label, not only strings
    np.testing.assert_array_equal(boundary_score(numbered, probabilities_name=0).to_numpy(), reference.to_numpy())
    with pytest.raises(ValueError, match=r"The 'probabilities_name' parameter must name a column of 'df'.*Got \['probs'\] instead"):
        boundary_score(df, probabilities_name=["probs"])
    joined = pd.concat([df, ours], axis=1)  # the playbook's next step aligns rows
    assert len(joined) == 50 and not joined.isna().any().any()


def test_boundary_score_from_an_arrow_list_column():
    """An Arrow list column iterates as lists of Python floats: the playbook then divides in
    float64, and so do we."""
    p = _probabilities(400, 7, seed=3)
    for arrow_type in (pa.list_(pa.float32()), pa.large_list(pa.float32()), pa.list_(pa.float32(), 7)):
        column = pd.Series(pa.array(list(p), type=arrow_type), dtype=pd.ArrowDtype(arrow_type))
        df = pd.DataFrame({"probabilities": column})
        pd.testing.assert_frame_equal(boundary_score(df), playbook_boundary_score(df), check_exact=True)
        # A slice (offsets not at 0) with its own index.
        sliced = df.iloc[100:200]
        np.testing.assert_array_equal(boundary_score(sliced).to_numpy(), playbook_boundary_score(sliced).to_numpy())


def test_empty_frame_gives_an_empty_result():
    empty = pd.DataFrame({"probabilities": pd.Series([], dtype=object)})
    out = boundary_score(empty)
    assert list(out.columns) == ["decision_boundary_score", "decision_boundary_alternate_label"] and len(out) == 0
    assert out["decision_boundary_alternate_label"].dtype == np.int64
    out = score_frame(empty, "entropy")
    assert list(out.columns) == ["score", "prediction", "alternate_label"] and len(out) == 0


def test_bad_frames_and_columns_name_the_problem():
    p = _probabilities(6, 3, seed=4)
    with pytest.raises(TypeError, match=r"The 'df' parameter must be a pandas DataFrame\. Got dict instead"):
        boundary_score({"probabilities": list(p)})
    with pytest.raises(ValueError, match=r"The 'probabilities_name' parameter must name a column of 'df' \(columns: \['probabilities', 'other'\]\)\. Got 'probs' instead"):
        boundary_score(_frame(p), probabilities_name="probs")
    rows = list(p)
    with_null = _frame(p)
    with_null.at[3, "probabilities"] = None
    with pytest.raises(ValueError, match=r"The 'probabilities' column must not contain nulls\. Got None at row 3 \(index 3\) instead"):
        boundary_score(with_null)
    with_nan = pd.DataFrame({"probabilities": rows[:2] + [np.nan] + rows[3:]})
    with pytest.raises(ValueError, match=r"must not contain nulls\. Got nan at row 2"):
        boundary_score(with_nan)
    ragged = pd.DataFrame({"probabilities": rows[:4] + [np.array([0.5, 0.5])] + rows[5:]})
    with pytest.raises(ValueError, match=r"The 'probabilities' column must hold vectors of one length\. Got 3 values at row 0 \(index 0\) and 2 at row 4 \(index 4\) instead"):
        boundary_score(ragged)
    ragged_lists = pd.DataFrame({"probabilities": [[0.5, 0.5], [0.2, 0.3, 0.5]]})
    with pytest.raises(ValueError, match=r"must hold vectors of one length"):
        boundary_score(ragged_lists)
    nested = pd.DataFrame({"probabilities": [np.full((3, 1), 1 / 3)] * 2})
    with pytest.raises(ValueError, match=r"The 'probabilities' column must hold 1-D vectors\. Got shape \(3, 1\) at row 0"):
        boundary_score(nested)
    words = pd.DataFrame({"probabilities": [["a", "b"], ["c", "d"]]})
    with pytest.raises(TypeError, match=r"The 'probabilities' column must hold vectors of numbers\. Got \['a', 'b'\]"):
        boundary_score(words)
    strings = pd.DataFrame({"probabilities": ["0.1,0.9", "0.5,0.5"]})
    with pytest.raises(TypeError, match=r"The 'probabilities' column must hold one vector of numbers per row"):
        boundary_score(strings)
    scalars = pd.DataFrame({"probabilities": [0.2, 0.9]})
    with pytest.raises(TypeError, match=r"The 'probabilities' column must hold one vector per row\. Got a column of float64 numbers instead"):
        boundary_score(scalars)
    arrow_null = pd.DataFrame({"probabilities": pd.Series(pa.array([[0.5, 0.5], None], type=pa.list_(pa.float64())), dtype=pd.ArrowDtype(pa.list_(pa.float64())))})
    with pytest.raises(ValueError, match=r"must not contain nulls\. Got a null at row 1"):
        boundary_score(arrow_null)
    not_probabilities = _frame(np.log(p) * 2)
    with pytest.raises(ValueError, match=r"The 'probabilities' column must contain probabilities in \[0, 1\]"):
        boundary_score(not_probabilities)
    unnormalised = _frame(p * 0.5)
    with pytest.raises(ValueError, match=r"The 'probabilities' column must hold rows that sum to 1"):
        boundary_score(unnormalised)


# =========================================================================== score_frame


@pytest.mark.parametrize("score", sorted(SCORES))
def test_score_frame_equals_the_score_classes_on_probabilities_and_logits(score):
    """Any registered score from a column of probability vectors (through log p) or of logits."""
    rng = np.random.default_rng(7)
    logits = (3 * rng.standard_normal((500, 6))).astype(np.float32)
    probs = torch.from_numpy(logits).softmax(dim=1).numpy()
    df = pd.DataFrame({"probabilities": list(probs), "logits": list(logits)})
    if SCORES[score].reads_confidence:  # a learned confidence head: not in a column of vectors
        for kind in ("logits", "probabilities"):
            with pytest.raises(ValueError, match=r"reads a learned confidence head's logit"):
                score_frame(df, score, kind=kind)
        return
    for T in (None, 1.7):
        out = score_frame(df, score, kind="logits", temperature=T)
        expected = make_score(score, temperature=T).score(torch.from_numpy(logits)).numpy()
        np.testing.assert_array_equal(out["score"].to_numpy(), expected)
        np.testing.assert_array_equal(out["prediction"].to_numpy(), logits.argmax(axis=1))
        np.testing.assert_array_equal(out["alternate_label"].to_numpy(), np.argsort(logits, axis=1)[:, -2])
        if score == "energy":
            with pytest.raises(ValueError, match=r"The 'score' parameter 'energy' needs the model's logits"):
                score_frame(df, score, temperature=T)
            continue
        out = score_frame(df, score, temperature=T)
        expected = make_score(score, temperature=T).score(logits_from_probabilities(probs)).numpy()
        np.testing.assert_array_equal(out["score"].to_numpy(), expected)
        np.testing.assert_array_equal(out["prediction"].to_numpy(), probs.argmax(axis=1))
        np.testing.assert_array_equal(out["alternate_label"].to_numpy(), np.argsort(probs, axis=1)[:, -2])
        assert out.index.equals(df.index) and list(out.columns) == ["score", "prediction", "alternate_label"]


def test_score_frame_certainty_ratio_is_the_boundary_score():
    p = _probabilities(1000, 10, seed=8, ties=0.0)
    df = _frame(p)
    ratio = score_frame(df, "certainty_ratio")
    playbook = boundary_score(df)
    np.testing.assert_allclose(ratio["score"], playbook["decision_boundary_score"], rtol=2e-6)
    np.testing.assert_array_equal(ratio["alternate_label"], playbook["decision_boundary_alternate_label"])


def test_score_frame_binary_multilabel_and_non_finite_logits():
    rng = np.random.default_rng(9)
    q = rng.random(200)
    binary = score_frame(pd.DataFrame({"p1": q}), "softmax", column="p1", task="binary")
    np.testing.assert_allclose(binary["score"], -np.maximum(q, 1 - q), rtol=1e-12)
    np.testing.assert_array_equal(binary["prediction"], (q > 0.5).astype(int))
    labels = rng.random((50, 3))
    multilabel = score_frame(pd.DataFrame({"probabilities": list(labels)}), "entropy", task="multilabel")
    np.testing.assert_array_equal(np.stack(multilabel["prediction"]), (labels > 0.5).astype(int))
    logits = rng.standard_normal((5, 4))
    logits[2, 1] = np.nan
    out = score_frame(pd.DataFrame({"logits": list(logits)}), "margin", kind="logits")
    assert np.isnan(out["score"][2]) and out["prediction"][2] == -1 and out["alternate_label"][2] == -1
    assert np.isfinite(out["score"].drop(2)).all()


def test_score_frame_bad_arguments():
    df = _frame(_probabilities(5, 3, seed=10))
    with pytest.raises(ValueError, match=r"The 'score' parameter must be one of \["):
        score_frame(df, "odin")
    with pytest.raises(ValueError, match=r"The 'kind' parameter must be one of \['probabilities', 'logits'\]\. Got 'scores' instead"):
        score_frame(df, kind="scores")
    with pytest.raises(ValueError, match=r"The 'column' parameter must name a column of 'df'"):
        score_frame(df, kind="logits")  # no 'logits' column
    with pytest.raises(ValueError, match=r"The 'task' parameter must be one of"):
        score_frame(df, task="ranking")
    with pytest.raises(ValueError, match=r"The 'temperature' parameter must be a positive finite float"):
        score_frame(df, temperature=-1.0)


def test_exported_from_the_package():
    assert seapig_core.boundary_score is boundary_score and seapig_core.score_frame is score_frame
