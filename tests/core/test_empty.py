"""Issue 11, item 2: scoring zero samples gives empty results; fitting on zero samples is an error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seapig_core import SCORES, CertaintyRatioScore
from seapig_core.kernels import score_pass
from seapig_core.layout import canonicalize
from tests.core.reference import LAYOUTS, SCORE_NAMES, layout_id, random_labels

LAYOUT_IDS = [layout_id(layout) for layout in LAYOUTS]


def _fitted(name, task, per_member, shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape(50, 4, 3)).astype(np.float32)
    y = random_labels(rng, task, x.shape, per_member)
    return SCORES[name](task=task, per_member=per_member).fit(x, y).set_threshold(0.5), x


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("name", SCORE_NAMES)
def test_zero_samples_score_select_predict_to_empty_results(name, layout):
    task, per_member, shape = layout
    score, x = _fitted(name, task, per_member, shape)
    for dtype in (torch.float32, torch.float64):
        empty = torch.empty((0, *x.shape[1:]), dtype=dtype)
        scores = score.score(empty)
        assert scores.shape == (0,) and scores.dtype == dtype
        out = score.select(empty)
        expected_keys = {"score", "selected"} | ({"alternate_label"} if name == "certainty_ratio" else set())
        assert set(out) == expected_keys
        assert out["score"].shape == (0,) and out["selected"].shape == (0,) and out["selected"].dtype == torch.bool
        if name == "certainty_ratio":
            assert out["alternate_label"].shape == (0,) and out["alternate_label"].dtype == torch.int64
        pred = score.predict(empty)
        multilabel = task == "multilabel"
        assert pred.shape == ((0, x.shape[1]) if multilabel else (0,)) and pred.dtype == torch.int64
    # NumPy input too, and an unfitted score.
    np_empty = np.zeros((0, *x.shape[1:]), dtype=np.float32)
    assert score.score(np_empty).shape == (0,)
    assert SCORES[name](task=task, per_member=per_member).score(np_empty).shape == (0,)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_alternate_label_and_score_pass_of_zero_samples(layout):
    task, per_member, shape = layout
    empty = np.zeros((0, *shape(1, 4, 3)[1:]), dtype=np.float32)
    assert CertaintyRatioScore(task=task, per_member=per_member).alternate_label(empty).shape == (0,)
    canon = canonicalize(empty, task, per_member, allow_empty=True)
    out = score_pass(canon, SCORE_NAMES, 0.7, labels=True)
    assert set(out.scores) == set(SCORE_NAMES)
    assert all(v.shape == (0,) and v.dtype == torch.float32 for v in out.scores.values())
    assert out.runner_up.shape == (0,) and out.certainty_ratio.shape == (0,) and out.finite.shape == (0,)
    assert out.prediction.shape[0] == 0 and out.prediction.dtype == torch.int64


def test_zero_samples_need_allow_empty_and_keep_the_class_count_check():
    with pytest.raises(ValueError, match=r"The 'logits' parameter must contain at least one sample"):
        canonicalize(np.zeros((0, 3)))
    score = SCORES["softmax"]().fit(np.eye(3, dtype=np.float32))
    with pytest.raises(ValueError, match=r"must have 3 logit\(s\) per sample, as the fitted score\. Got shape \(0, 5\)"):
        score.score(np.zeros((0, 5)))
    with pytest.raises(ValueError, match=r"must have shape \(N, C\)"):
        score.score(np.zeros((0,)))
