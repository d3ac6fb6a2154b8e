"""Every bad input gets a ValueError/TypeError naming the argument, the expectation and the value."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seapig_core import SCORES, EntropyScore, MarginScore, SoftmaxScore, make_score

X = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
Y = np.arange(20) % 4


@pytest.mark.parametrize("task", ["multi-class", "regression", "", None, 3])
def test_unknown_task(task):
    with pytest.raises(ValueError, match=r"The 'task' parameter must be one of \['multiclass', 'binary', 'multilabel'\]\. Got .* instead"):
        SoftmaxScore(task=task)


@pytest.mark.parametrize(
    ("task", "per_member", "shape", "expected"),
    [
        ("multiclass", False, (20,), r"shape \(N, C\) for task='multiclass'\. Got shape \(20,\)"),
        ("multiclass", False, (20, 4, 2), r"shape \(N, C\) for task='multiclass'\. Got shape \(20, 4, 2\)"),
        ("multiclass", True, (20, 4), r"shape \(N, C, M\) for task='multiclass' with a trailing member axis"),
        ("multiclass", False, (20, 1), r"at least 2 classes for task='multiclass'\. Got shape \(20, 1\)"),
        ("binary", False, (20, 3), r"shape \(N,\), \(N, 1\) or \(N, 2\) for task='binary'\. Got shape \(20, 3\)"),
        ("binary", True, (20,), r"shape \(N, M\), \(N, 1, M\) or \(N, 2, M\) for task='binary'"),
        ("binary", True, (20, 3, 2), r"task='binary' with a trailing member axis .*Got shape \(20, 3, 2\)"),
        ("multilabel", False, (20,), r"shape \(N, C\) for task='multilabel'\. Got shape \(20,\)"),
        ("multilabel", True, (20, 4), r"shape \(N, C, M\) for task='multilabel'"),
        ("multilabel", False, (20, 0), r"at least one logit per sample\. Got shape \(20, 0\)"),
    ],
)
@pytest.mark.parametrize("method", ["fit", "score"])
def test_wrong_dimensionality_for_the_task(task, per_member, shape, expected, method):
    score = SoftmaxScore(task=task, per_member=per_member)
    name = "X" if method == "fit" else "query_logits"
    with pytest.raises(ValueError, match=rf"The '{name}' parameter must .*{expected}"):
        getattr(score, method)(np.zeros(shape, dtype=np.float32))


def test_fitting_on_zero_samples_is_an_error():
    # Scoring zero samples gives empty results (tests/core/test_empty.py); fitting cannot.
    for x in (np.zeros((0, 4), dtype=np.float32), torch.empty(0, 4)):
        with pytest.raises(ValueError, match=r"The 'X' parameter must contain at least one sample\. Got shape \(0, 4\)"):
            SoftmaxScore().fit(x)
        with pytest.raises(ValueError, match=r"The 'X' parameter must contain at least one sample"):
            SoftmaxScore().fit(x, np.zeros(0, dtype=int))
    fitted = SoftmaxScore().fit(X)
    with pytest.raises(ValueError, match=r"The 'X' parameter must contain at least one sample"):
        fitted.calibrate(np.zeros((0, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"The 'X' parameter must contain at least one sample"):
        fitted.set_threshold(0.9, X=np.zeros((0, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"The 'X' parameter must contain at least one sample"):
        fitted.set_risk_threshold(0.1, X=np.zeros((0, 4), dtype=np.float32), Y=np.zeros(0, dtype=int))


@pytest.mark.parametrize(
    ("x", "error", "expected"),
    [
        ("logits", TypeError, r"The 'X' parameter must be a torch.Tensor or numpy.ndarray\. Got str instead"),
        ({"logit": X}, TypeError, r"Got dict instead"),
        (np.array([["a", "b"], ["c", "d"]]), TypeError, r"must hold real numbers\. Got an array of dtype <U1"),
        (torch.ones(3, 2, dtype=torch.bool), TypeError, r"must hold real numbers\. Got dtype torch.bool"),
        (torch.ones(3, 2, dtype=torch.complex64), TypeError, r"must hold real numbers"),
    ],
)
def test_logits_of_the_wrong_type(x, error, expected):
    with pytest.raises(error, match=expected):
        SoftmaxScore().fit(x)


@pytest.mark.parametrize(
    ("task", "x", "y", "expected"),
    [
        ("multiclass", X, Y[:19], r"The 'Y' parameter must have one entry per sample \(20\)\. Got shape \(19,\) instead"),
        ("multiclass", X, np.zeros((20, 4)), r"The 'Y' parameter must have shape \(N,\) with class indices .*Got shape \(20, 4\)"),
        ("multiclass", X, Y - 1, r"class indices in \[0, 3\]\. Got values in \[-1, 2\] instead"),
        ("multiclass", X, Y + 1, r"class indices in \[0, 3\]\. Got values in \[1, 4\] instead"),
        ("multiclass", X, Y + 0.5, r"integer class indices for task='multiclass'\. Got non-integer values"),
        ("multiclass", X, np.where(Y == 0, np.nan, Y), r"The 'Y' parameter must contain only finite values\. Got NaN"),
        ("binary", X[:, :2], Y, r"class indices in \[0, 1\]\. Got values in \[0, 3\]"),
        ("binary", X[:, 0], Y, r"only 0 and 1 for task='binary'\. Got values in \[0, 3\]"),
        ("binary", X[:, 0], np.zeros((20, 2)), r"shape \(N,\) for single-logit binary\. Got shape \(20, 2\)"),
        ("multilabel", X, Y, r"shape \(20, 4\) with 0/1 targets for task='multilabel'\. Got shape \(20,\)"),
        ("multilabel", X, np.full((20, 4), 0.5), r"only 0 and 1 for task='multilabel'\. Got values in \[0.5, 0.5\]"),
        ("multiclass", X, "labels", r"The 'Y' parameter must be a torch.Tensor or numpy.ndarray\. Got str"),
    ],
)
def test_bad_labels(task, x, y, expected):
    error = TypeError if isinstance(y, str) else ValueError
    with pytest.raises(error, match=expected):
        EntropyScore(task=task).fit(x, y)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_calibration_logits(bad):
    x = X.copy()
    x[3, 1] = bad
    with pytest.raises(
        ValueError, match=r"The 'X' parameter must contain only finite values\. Got 1 sample\(s\) .* \(first at row 3\)"
    ):
        SoftmaxScore().fit(x, Y)


def test_query_with_a_different_class_count():
    score = MarginScore().fit(X)
    with pytest.raises(
        ValueError,
        match=r"The 'query_logits' parameter must have 4 logit\(s\) per sample, as the fitted score\. Got shape \(5, 3\)",
    ):
        score.score(np.zeros((5, 3)))
    with pytest.raises(ValueError, match="must have 4 logit"):
        score.set_threshold(0.9).select(np.zeros((5, 6)))


@pytest.mark.parametrize("q", [0.0, 1.0, 1.5, -0.1, float("nan"), float("inf")])
def test_quantile_outside_open_unit_interval(q):
    score = SoftmaxScore().fit(X)
    with pytest.raises(ValueError, match=rf"The 'q' parameter must be in \(0, 1\)\. Got {q!r} instead"):
        score.set_threshold(q)


@pytest.mark.parametrize("q", ["0.9", True, None, [0.9]])
def test_quantile_of_the_wrong_type(q):
    with pytest.raises(TypeError, match=r"The 'q' parameter must be a float in \(0, 1\)\. Got .* instead"):
        SoftmaxScore().fit(X).set_threshold(q)


def test_set_threshold_before_fit():
    with pytest.raises(ValueError, match=r"set_threshold\(\) needs calibration scores: call fit\(\) first"):
        SoftmaxScore().set_threshold(0.9)


@pytest.mark.parametrize(
    ("temperature", "error", "expected"),
    [
        (0.0, ValueError, r"The 'temperature' parameter must be a positive finite float\. Got 0.0 instead"),
        (-1.0, ValueError, r"positive finite float\. Got -1.0"),
        (float("nan"), ValueError, r"positive finite float\. Got nan"),
        ("2", TypeError, r"The 'temperature' parameter must be a positive float or None\. Got str instead"),
        (True, TypeError, r"Got bool instead"),
    ],
)
def test_bad_temperature(temperature, error, expected):
    with pytest.raises(error, match=expected):
        SoftmaxScore(temperature=temperature)


def test_bad_per_member():
    with pytest.raises(TypeError, match=r"The 'per_member' parameter must be a bool\. Got str instead"):
        SoftmaxScore(per_member="yes")


def test_fit_modes_are_exclusive_and_complete():
    model, loader = torch.nn.Linear(2, 2), [torch.zeros(1, 2)]
    with pytest.raises(ValueError, match=r"either precomputed logits 'X' or 'model' and 'loader', not both"):
        SoftmaxScore().fit(X, model=model, loader=loader)
    with pytest.raises(ValueError, match=r"needs precomputed logits 'X' or a 'model' and a 'loader'\. Got neither"):
        SoftmaxScore().fit()
    with pytest.raises(ValueError, match=r"needs both 'model' and 'loader'\. Got no 'loader'"):
        SoftmaxScore().fit(model=model)
    with pytest.raises(ValueError, match=r"needs both 'model' and 'loader'\. Got no 'model'"):
        SoftmaxScore().fit(loader=loader)
    with pytest.raises(ValueError, match=r"The 'Y' parameter is only used with precomputed logits 'X'"):
        SoftmaxScore().fit(Y=Y, model=model, loader=loader)
    with pytest.raises(ValueError, match=r"'outdir' and 'prefix' parameters only apply with 'model' and 'loader'"):
        SoftmaxScore().fit(X, outdir="/tmp")
    with pytest.raises(TypeError, match=r"unexpected argument\(s\): refresh"):
        SoftmaxScore().fit(X, refresh=True)


def test_make_score_with_unknown_name():
    with pytest.raises(ValueError, match=r"The 'name' parameter must be one of \[.*'softmax'.*\]\. Got 'msp' instead"):
        make_score("msp")
    assert isinstance(make_score("entropy", task="binary"), SCORES["entropy"])
