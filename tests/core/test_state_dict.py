"""Issue 10, item 7: persistence through state_dict/from_state_dict, no import circle, lean loads."""

from __future__ import annotations

import ast
import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

import seapig_core
from seapig_core import SCORES, EnergyScore, LogitScore, SoftmaxScore, load_score
from seapig_core import persistence as persistence_module
from seapig_core.scores import state_file
from tests.core.reference import LAYOUTS, SCORE_NAMES, layout_id, random_labels

ROOT = Path(seapig_core.__file__).resolve().parent


def _fitted(name, layout, n=60):
    task, per_member, shape = layout
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape(n, 4, 3)) * 2).astype(np.float32)
    y = random_labels(rng, task, x.shape, per_member)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SCORES[name](task=task, per_member=per_member).fit(x, y).set_threshold(0.8), x


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout_id(layout) for layout in LAYOUTS])
@pytest.mark.parametrize("name", SCORE_NAMES)
def test_state_dict_is_json_and_rebuilds_the_same_score(name, layout):
    score, x = _fitted(name, layout)
    state = json.loads(json.dumps(score.state_dict(), allow_nan=False))  # JSON-able, no tensors
    assert state["name"] == name and state["class"] == type(score).__name__
    rebuilt = LogitScore.from_state_dict(state, **score.calibration_tensors())
    assert type(rebuilt) is type(score)
    assert rebuilt.state_dict() == score.state_dict()
    torch.testing.assert_close(rebuilt.scores, score.scores)
    torch.testing.assert_close(rebuilt.logits, score.logits)
    torch.testing.assert_close(rebuilt.labels, score.labels)
    torch.testing.assert_close(rebuilt.select(x)["selected"], score.select(x)["selected"])
    # Without tensors: a score that selects but holds no calibration set.
    bare = type(score).from_state_dict(state)
    assert bare.scores is None and bare.threshold == score.threshold
    torch.testing.assert_close(bare.select(x)["selected"], score.select(x)["selected"])


def test_from_state_dict_accepts_flat_logits_and_rejects_what_does_not_fit():
    score, _ = _fitted("entropy", LAYOUTS[1])  # multiclass with members: (N, C, M)
    state, tensors = score.state_dict(), score.calibration_tensors()
    flat = tensors["logits"].reshape(len(tensors["logits"]), -1)
    rebuilt = LogitScore.from_state_dict(state, scores=tensors["scores"], logits=flat, labels=tensors["labels"])
    torch.testing.assert_close(rebuilt.logits, score.logits)
    with pytest.raises(ValueError, match="holds a EntropyScore, not a SoftmaxScore"):
        SoftmaxScore.from_state_dict(state)
    with pytest.raises(ValueError, match="unknown score 'msp'"):
        LogitScore.from_state_dict({**state, "name": "msp"})
    with pytest.raises(ValueError, match="one row per score"):
        LogitScore.from_state_dict(state, scores=tensors["scores"], logits=flat[:5])
    with pytest.raises(ValueError, match="need their calibration 'scores'"):
        LogitScore.from_state_dict(state, logits=flat)
    broken = json.loads(json.dumps(state))
    broken["state"]["quantile"] = 1.5
    with pytest.raises(ValueError, match=r"The 'quantile' parameter must be in \(0, 1\)"):
        LogitScore.from_state_dict(broken)
    broken = json.loads(json.dumps(state))
    broken["state"]["temperature_fit"] = {"temperature": 1.0}
    with pytest.raises(ValueError, match="malformed temperature_fit"):
        LogitScore.from_state_dict(broken)
    broken = json.loads(json.dumps(state))
    broken["settings"]["task"] = "regression"
    with pytest.raises(ValueError, match="The 'task' parameter must be one of"):
        LogitScore.from_state_dict(broken)
    with pytest.raises(TypeError, match="The 'state' parameter must be a dict"):
        LogitScore.from_state_dict([state])


def test_load_without_logits_reads_only_the_scores(tmp_path, monkeypatch):
    score, x = _fitted("softmax", LAYOUTS[0], n=500)
    path = score.save(tmp_path / "score.arrow")
    read = []
    original = state_file._column
    monkeypatch.setattr(state_file, "_column", lambda table, name: read.append(name) or original(table, name))
    lean = load_score(path, include_logits=False)
    assert read == ["score"]
    assert lean.logits is None and lean.labels is None
    torch.testing.assert_close(lean.scores, score.scores)
    assert lean.threshold == score.threshold and lean.temperature == score.temperature
    torch.testing.assert_close(lean.select(x)["selected"], score.select(x)["selected"])
    assert lean.set_threshold(0.5).threshold == score.set_threshold(0.5).threshold
    with pytest.raises(ValueError, match="include_logits"):
        lean.set_risk_threshold(0.2)
    read.clear()
    full = load_score(path)
    assert sorted(read) == ["label", "logits", "score"]
    torch.testing.assert_close(full.logits, score.logits)
    assert type(score).load(path, include_logits=False).logits is None


def test_a_file_written_before_diagnostics_existed_still_loads(tmp_path):
    # Schema version 1 as the first release wrote it: no 'diagnostics' in the state.
    metadata = {
        "format": "seapig_core.score",
        "schema_version": 1,
        "library_version": "0.1.0",
        "class": "EnergyScore",
        "name": "energy",
        "settings": {"temperature": 1.5, "task": "multiclass", "per_member": False},
        "state": {
            "threshold": -2.5,
            "quantile": 0.9,
            "n_units": 3,
            "temperature_fit": {"temperature": 1.5, "nll_before": 1.0, "nll_after": 0.9, "iterations": 4, "at_bound": False},
            "risk_threshold": None,
            "logits_shape": [2, 3],
        },
    }
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.5, -1.0]], dtype=np.float32)
    table = pa.table({
        "score": pa.array(np.array([-3.0, -1.0], dtype=np.float32)),
        "logits": pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1)), 3),
        "label": pa.array(np.array([2, 1], dtype=np.int64)),
    }).replace_schema_metadata({b"seapig_core": json.dumps(metadata).encode()})
    path = tmp_path / "old.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    score = EnergyScore.load(path)
    assert score.diagnostics == [] and score.threshold == -2.5 and score.quantile == 0.9
    np.testing.assert_array_equal(score.logits.numpy(), logits)
    assert score.labels.tolist() == [2, 1]
    assert persistence_module.read_score_metadata(path)["name"] == "energy"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_import_circle_between_persistence_and_the_score_classes():
    assert "seapig_core.persistence" not in _imports(ROOT / "scores" / "logits.py")
    assert "seapig_core.persistence" not in _imports(ROOT / "scores" / "state_file.py")
    assert not {m for m in _imports(ROOT / "scores" / "state_file.py") if m.startswith("seapig_core.scores")}
    assert "seapig_core.scores.logits" in _imports(ROOT / "persistence.py")


def test_persistence_reads_and_writes_scores_only_through_their_state():
    # No attribute of a score is read or set in persistence.py: only its state methods.
    allowed = {"save", "load", "state_dict", "from_state_dict", "calibration_tensors"}
    tree = ast.parse((ROOT / "persistence.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "score":
            assert node.attr in allowed, node.attr


def test_save_score_refuses_other_objects(tmp_path):
    with pytest.raises(TypeError, match="The 'score' parameter must be a LogitScore"):
        persistence_module.save_score({"name": "softmax"}, tmp_path / "x.arrow")
