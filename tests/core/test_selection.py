"""Thresholds, select, plot and the save/load round trip."""

from __future__ import annotations

import json
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from matplotlib.figure import Figure

import seapig_core
from seapig_core import SCORES, EnergyScore, SoftmaxScore, load_score
from seapig_core.persistence import SCHEMA_VERSION
from tests.core.reference import LAYOUTS, SCORE_NAMES, layout_id, random_labels


@pytest.fixture(scope="module")
def fitted(cifar100):
    logits, labels = cifar100
    return SoftmaxScore().fit(logits[:5000], labels[:5000]), logits[5000:], labels[5000:]


@pytest.mark.parametrize("q", [0.01, 0.5, 0.9, 0.99])
def test_threshold_is_the_nan_aware_quantile_of_calibration_scores(fitted, q):
    score, _, _ = fitted
    score.set_threshold(q)
    assert score.get_threshold() == pytest.approx(np.nanquantile(score.scores.numpy().astype(np.float64), q))
    coverage = float((score.scores < score.get_threshold()).float().mean())
    assert abs(coverage - q) <= 1.0 / len(score.scores) + 1e-12
    assert score.quantile == q


def test_set_threshold_ignores_nan_calibration_scores():
    score = SoftmaxScore()
    score.scores = torch.tensor([0.1, float("nan"), 0.3, 0.2])
    score.set_threshold(0.5)
    assert score.get_threshold() == pytest.approx(0.2)


def test_select_returns_score_and_selected_with_strict_threshold(fitted):
    score, query, _ = fitted
    score.set_threshold(0.8)
    out = score.select(query)
    assert set(out) == {"score", "selected"}
    assert out["selected"].dtype == torch.bool
    torch.testing.assert_close(out["score"], score.score(query))
    torch.testing.assert_close(out["selected"], out["score"] < score.get_threshold())
    # Exactly at the threshold is rejected (strict <).
    at = torch.full((1, 100), 0.0)
    boundary = SoftmaxScore(temperature=1.0)
    boundary.scores = boundary.score(at)
    boundary.threshold = float(boundary.scores[0])
    assert not boundary.select(at)["selected"][0]


def test_select_without_threshold_sets_q099_and_warns(cifar100):
    logits, _ = cifar100
    score = EnergyScore().fit(logits[:1000])
    with pytest.warns(UserWarning, match=r"set_threshold\(q=0.99\)"):
        out = score.select(logits[1000:1100])
    assert score.quantile == 0.99
    assert score.get_threshold() == pytest.approx(np.nanquantile(score.scores.numpy().astype(np.float64), 0.99))
    assert out["selected"].any()


def test_select_without_calibration_raises():
    with pytest.raises(ValueError, match=r"call fit\(\) and set_threshold"):
        SoftmaxScore().select(torch.zeros(2, 3))


def test_refit_drops_the_old_threshold(cifar100):
    logits, _ = cifar100
    score = SoftmaxScore().fit(logits[:100]).set_threshold(0.5)
    score.fit(logits[100:200])
    assert score.get_threshold() is None


def test_plot_returns_a_figure_without_pyplot_state(fitted):
    score, query, _ = fitted
    score.set_threshold(0.9)
    before = plt.get_fignums()
    fig = score.plot(score.score(query), bins=40)
    assert isinstance(fig, Figure)
    assert plt.get_fignums() == before  # no pyplot figure, hence nothing to show
    ax = fig.axes[0]
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    n_rejected_cal = int((score.scores >= score.get_threshold()).sum())
    n_rejected_query = int((score.score(query) >= score.get_threshold()).sum())
    assert any(f"rejected={n_rejected_cal:,}" in label and "calibration" in label for label in labels)
    assert any(f"rejected={n_rejected_query:,}" in label and "query" in label for label in labels)
    assert any(label.startswith("threshold") for label in labels)
    png = seapig_core.plotting.figure_to_png(fig)
    assert png.startswith(b"\x89PNG")


def test_plot_handles_calibration_only_and_non_finite_query(fitted):
    score, _, _ = fitted
    assert isinstance(score.plot(), Figure)
    fig = score.plot(np.array([np.nan, -0.5, -0.9]), bins=5)
    labels = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert any("non-finite=1" in label for label in labels)


def test_plot_needs_calibration_scores_and_valid_bins(fitted):
    with pytest.raises(ValueError, match=r"call fit\(\) first"):
        SoftmaxScore().plot()
    with pytest.raises(ValueError, match="'bins' parameter must be a positive integer. Got 0"):
        fitted[0].plot(bins=0)


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout_id(layout) for layout in LAYOUTS])
@pytest.mark.parametrize("name", SCORE_NAMES)
def test_save_load_round_trip_gives_identical_scores_threshold_and_selection(tmp_path, name, layout):
    task, per_member, shape = layout
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(shape(80, 4, 3)) * 2).astype(np.float32)
    y = random_labels(rng, task, x.shape, per_member)
    query = (rng.standard_normal(shape(30, 4, 3)) * 2).astype(np.float32)
    query.reshape(30, -1)[0, 0] = np.nan
    score = SCORES[name](task=task, per_member=per_member).fit(x, y).set_threshold(0.7)
    path = score.save(tmp_path / "score.arrow")

    loaded = load_score(path)
    assert type(loaded) is type(score)
    assert (loaded.task, loaded.per_member, loaded.temperature) == (task, per_member, score.temperature)
    assert loaded.get_threshold() == score.get_threshold() and loaded.quantile == 0.7
    assert loaded.temperature_fit == score.temperature_fit
    torch.testing.assert_close(loaded.scores, score.scores)
    torch.testing.assert_close(loaded.logits, score.logits)
    a, b = score.select(query), loaded.select(query)
    torch.testing.assert_close(a["score"], b["score"], equal_nan=True)
    torch.testing.assert_close(a["selected"], b["selected"])
    # A reloaded score can be re-thresholded and refitted like the original.
    assert loaded.set_threshold(0.5).get_threshold() == score.set_threshold(0.5).get_threshold()
    assert type(score).load(path).quantile == 0.7


def test_saved_file_is_plain_arrow_readable_by_pyarrow_and_pandas(tmp_path, fitted):
    score, _, _ = fitted
    path = score.set_threshold(0.9).save(tmp_path / "softmax.arrow")
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    assert table.column_names == ["score", "logits", "label"]
    meta = json.loads(table.schema.metadata[b"seapig_core"])
    assert meta["schema_version"] == SCHEMA_VERSION
    assert meta["library_version"] == seapig_core.__version__
    assert meta["state"]["threshold"] == score.get_threshold()
    frame = pd.read_feather(path)
    np.testing.assert_array_equal(frame["score"].to_numpy(), score.scores.numpy())


def test_unfitted_and_logit_free_saves_round_trip(tmp_path, fitted):
    blank = SoftmaxScore(temperature=1.5, task="binary")
    restored = load_score(blank.save(tmp_path / "blank.arrow"))
    assert repr(restored) == repr(blank) and restored.scores is None

    score, query, _ = fitted
    slim = load_score(score.set_threshold(0.9).save(tmp_path / "slim.arrow", include_logits=False))
    assert slim.logits is None
    torch.testing.assert_close(slim.select(query)["selected"], score.select(query)["selected"])


def test_load_rejects_other_files_and_schema_versions(tmp_path, fitted):
    score, _, _ = fitted
    with pytest.raises(ValueError, match="existing score file"):
        load_score(tmp_path / "missing.arrow")
    garbage = tmp_path / "garbage.arrow"
    garbage.write_bytes(b"\x80\x04\x95 not arrow at all")
    with pytest.raises(ValueError, match="not a readable seapig_core score file"):
        load_score(garbage)
    foreign = tmp_path / "foreign.arrow"
    with pa.OSFile(str(foreign), "wb") as sink, pa.ipc.new_file(sink, pa.schema([("a", pa.int64())])) as writer:
        writer.write_table(pa.table({"a": [1, 2]}))
    with pytest.raises(ValueError, match="not a seapig_core score file"):
        load_score(foreign)

    path = score.save(tmp_path / "score.arrow")
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    meta = json.loads(table.schema.metadata[b"seapig_core"])
    meta["schema_version"] = SCHEMA_VERSION + 1
    future = tmp_path / "future.arrow"
    table = table.replace_schema_metadata({b"seapig_core": json.dumps(meta).encode()})
    with pa.OSFile(str(future), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(ValueError, match=f"schema version {SCHEMA_VERSION + 1}"):
        load_score(future)
    with pytest.raises(ValueError, match="holds a SoftmaxScore, not a EnergyScore"):
        EnergyScore.load(path)


def test_save_is_atomic_and_leaves_no_temporary_file(tmp_path, fitted, monkeypatch):
    score, _, _ = fitted
    path = score.save(tmp_path / "score.arrow")
    original = path.read_bytes()

    def broken_writer(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pa.ipc, "new_file", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        score.set_threshold(0.1).save(path)
    assert path.read_bytes() == original  # the previous version survives intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["score.arrow"]


def test_save_needs_an_existing_directory(tmp_path, fitted):
    with pytest.raises(ValueError, match="existing directory"):
        fitted[0].save(tmp_path / "nowhere" / "score.arrow")


def test_no_warning_for_normal_use(fitted):
    score, query, _ = fitted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        score.set_threshold(0.95).select(query)


def test_calibrate_keeps_the_temperature_and_replaces_the_calibration_set(cifar100):
    logits, labels = cifar100
    a, b = slice(0, 3000), slice(3000, 6000)
    score = SoftmaxScore().fit(logits[a], labels[a])
    fitted_t, fit_record = score.temperature, score.temperature_fit
    score.set_threshold(0.9)
    score.calibrate(logits[b], labels[b])
    assert score.temperature == fitted_t and score.temperature_fit == fit_record
    assert score.get_threshold() is None  # belonged to the previous calibration set
    torch.testing.assert_close(score.scores, SoftmaxScore(temperature=fitted_t).score(logits[b]))
    torch.testing.assert_close(score.labels, torch.from_numpy(labels[b]))
    # The threshold now comes from the second split only.
    score.set_threshold(0.9)
    assert score.get_threshold() == pytest.approx(np.quantile(score.scores.numpy().astype(np.float64), 0.9))
    score.set_risk_threshold(0.1)
    assert score.risk_threshold.n_samples == 3000


def test_calibrate_checks_its_input_against_the_fitted_score(cifar100):
    logits, _ = cifar100
    score = SoftmaxScore().fit(logits[:100])
    with pytest.raises(ValueError, match=r"The 'X' parameter must have 100 logit\(s\) per sample"):
        score.calibrate(logits[:10, :50])
    bad = logits[:10].copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match=r"The 'X' parameter must contain only finite values"):
        score.calibrate(bad)
    with pytest.raises(ValueError, match=r"The 'Y' parameter must have one entry per sample \(10\)"):
        score.calibrate(logits[:10], np.zeros(9, dtype=int))
    # Without fit, calibrate uses the constructor's temperature.
    fresh = SoftmaxScore(temperature=2.0).calibrate(logits[:50])
    assert fresh.temperature == 2.0 and fresh.n_units == 100 and fresh.temperature_fit is None
