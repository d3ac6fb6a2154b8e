"""Plots a reviewer can read (issue 9 item 5): content checks (axes, scales, artists, labels), not pixels."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle, StepPatch

from seapig_core.plotting import (
    SCORE_AXES,
    figure_to_png,
    plot_drift_trend,
    plot_reliability_diagram,
    plot_score_density,
    plot_temperature_effect,
    score_axis,
)
from seapig_core.scores import SCORES, SoftmaxScore


def _labelled(n: int = 600, k: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    logits = 2.0 * torch.randn(n, k, generator=g)
    logits[torch.arange(n), labels] += 3.0
    return logits, labels


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def _vlines(ax) -> list[Line2D]:
    xs = [np.atleast_1d(line.get_xdata()) for line in ax.get_lines()]
    return [line for line, x in zip(ax.get_lines(), xs, strict=True) if len(x) >= 2 and len(set(x)) == 1]


# ----------------------------------------------------------------------------- density


def test_every_registry_score_has_a_readable_axis() -> None:
    assert set(SCORES) <= set(SCORE_AXES)
    assert score_axis("softmax").label == "max softmax probability (confidence)" and score_axis("softmax").rejects_low
    assert not score_axis("entropy").rejects_low
    assert score_axis("custom", "my score").label == "my score (higher = more uncertain)"


def test_density_shows_the_rejected_tail_on_a_confidence_axis() -> None:
    logits, labels = _labelled()
    score = SoftmaxScore().fit(logits, labels).set_threshold(0.9)
    query = score.score(_labelled(300, seed=1)[0] * 0.5).numpy()
    query[:2] = np.nan
    before = plt.get_fignums()
    fig = plot_score_density(score.scores, query, threshold=score.threshold, score="softmax", bins=40)
    assert isinstance(fig, Figure) and plt.get_fignums() == before
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and "log scale" in ax.get_ylabel()
    assert ax.get_xlabel() == "max softmax probability (confidence)"
    # The threshold, drawn in confidence units, with its value in the legend.
    (line,) = _vlines(ax)
    assert line.get_xdata()[0] == pytest.approx(-score.threshold)
    legend = _legend(ax)
    threshold_label = next(t for t in legend if t.startswith("threshold"))
    assert f"{-score.threshold:#.4g}" in threshold_label and "reject max softmax probability \u2264" in threshold_label
    assert any(t.get_text().strip().startswith("rejected") for t in ax.texts)  # the side arrows
    # Accepted and rejected query samples are separate areas, counted in the legend.
    rejected = int(np.sum(~(query < score.threshold)))
    assert any(t == f"query (n=300): rejected={rejected} ({rejected / 300:.1%}), non-finite=2" for t in legend)
    assert any(t == f"query (n=300): accepted={300 - rejected} ({(300 - rejected) / 300:.1%})" for t in legend)
    steps = [p for p in ax.patches if isinstance(p, StepPatch)]
    colours = {tuple(np.round(p.get_facecolor()[:3], 3)) for p in steps if p.get_fill()}
    assert len(colours) == 2  # blue accepted, red rejected
    # The threshold is a bin edge, so no bin mixes the two; the filled shares add up to the finite samples.
    filled = [p for p in steps if p.get_fill()]
    edges = filled[0].get_data().edges
    assert np.min(np.abs(edges - (-score.threshold))) < 1e-9
    total = sum(np.nansum(p.get_data().values) for p in filled)
    assert total == pytest.approx(298 / 300)
    assert figure_to_png(fig).startswith(b"\x89PNG")


def test_density_on_a_raw_axis_and_on_given_axes() -> None:
    fig0 = Figure()
    ax = fig0.add_subplot()
    scores = np.linspace(0, 1, 200)
    fig = plot_score_density(scores, threshold=0.8, ax=ax, score_name="energy-ish score", bins=20)
    assert fig is fig0 and ax.get_xlabel() == "energy-ish score (higher = more uncertain)"
    legend = _legend(ax)
    assert any("calibration (n=200): rejected=40 (20.0%)" == t for t in legend)
    assert any("reject energy-ish score \u2265 0.8000" in t for t in legend)
    no_threshold = plot_score_density(scores, bins=10)
    assert not _vlines(no_threshold.axes[0])
    with pytest.raises(ValueError, match="'threshold' parameter must be a finite float or None. Got nan"):
        plot_score_density(scores, threshold=float("nan"))


# ----------------------------------------------------------------------------- reliability


def test_reliability_diagram_is_clean() -> None:
    logits, labels = _labelled(2000)
    fig = plot_reliability_diagram(logits, labels, temperature=1.7, compare_temperature=1.0, n_bins=10)
    main, hist = fig.axes
    rects = [p for p in main.patches if isinstance(p, Rectangle) and p.get_width() > 0]
    assert rects and all(not p.get_hatch() for p in fig.axes[0].patches)  # no hatching anywhere
    widths = sorted({round(p.get_width(), 6) for p in rects})
    assert len(widths) == 2 and widths[0] < 0.5 * widths[1]  # narrow gap bars on the accuracy bars
    legend = _legend(main)
    assert legend[0].startswith("accuracy at T = 1.70 (ECE = ") and legend[1].startswith("gap")
    assert any(t.startswith("accuracy at T = 1 (ECE = ") for t in legend)
    # The legend sits beside the diagram: nothing is drawn under it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    box, frame = main.get_legend().get_window_extent(renderer), main.get_window_extent(renderer)
    assert box.x0 >= frame.x1 - 1
    assert hist.get_ylabel() == "samples per bin"
    bars = [p for p in hist.patches if isinstance(p, Rectangle)]
    assert sum(p.get_height() for p in bars) == pytest.approx(2000)


# ----------------------------------------------------------------------------- temperature


def _softmax(z: np.ndarray, t: float) -> np.ndarray:
    e = np.exp((z - z.max()) / t)
    return e / e.sum()


def test_temperature_chart_of_representative_samples() -> None:
    logits, labels = _labelled(800)
    fig = plot_temperature_effect(logits, labels, 1.8, class_names=["cat", "dog", "emu", "fox", "gnu"])
    axes = fig.axes
    assert len(axes) == 3
    titles = [a.get_title().split("\n")[0] for a in axes]
    assert titles == ["confident, correct", "uncertain", "confident, wrong"]
    z = logits.numpy().astype(np.float64)
    for a in axes:
        assert a.get_xscale() == "log" and a.get_xlabel() == "temperature T (log scale)"
        fitted = [line for line in _vlines(a) if line.get_xdata()[0] == pytest.approx(1.8)]
        assert len(fitted) == 1 and "fitted T = 1.80" in _legend(a)
        assert "T = 1 (raw logits)" in _legend(a)
        index = int(a.get_title().split("sample ")[1].split(":")[0])
        curves = [line for line in a.get_lines() if len(line.get_xdata()) > 2]
        assert 3 <= len(curves) <= 4
        for line in curves:  # each curve is that class's softmax probability at every temperature
            c = int(line.get_label().split("(")[1].split(")")[0])
            expected = [_softmax(z[index], t)[c] for t in line.get_xdata()]
            np.testing.assert_allclose(line.get_ydata(), expected, rtol=1e-9, atol=1e-12)
    wrong = axes[2].get_title()
    index = int(wrong.split("sample ")[1].split(":")[0])
    assert _softmax(z[index], 1.8).argmax() != int(labels[index]) and "predicted" in wrong


def test_temperature_chart_without_labels_other_tasks_and_errors() -> None:
    logits, _ = _labelled(300)
    fig = plot_temperature_effect(logits, temperature=0.7)
    assert [a.get_title().split("\n")[0] for a in fig.axes] == ["confident", "typical", "uncertain"]
    one = Figure()
    ax = one.add_subplot()
    assert plot_temperature_effect(logits, temperature=0.7, samples=[5], ax=ax) is one
    with pytest.raises(ValueError, match="'ax' parameter must give one Axes per sample"):
        plot_temperature_effect(logits, temperature=0.7, ax=ax)
    with pytest.raises(ValueError, match="'samples' parameter must hold row indices"):
        plot_temperature_effect(logits, samples=[300])
    binary = plot_temperature_effect(torch.randn(200), (torch.rand(200) > 0.5).long(), 1.3, task="binary")
    assert len(binary.axes) >= 2
    multilabel = plot_temperature_effect(torch.randn(200, 4) * 3, (torch.rand(200, 4) > 0.5).float(), 1.2, task="multilabel")
    assert multilabel.axes[0].get_ylabel() == "label probability P(label)"


# ----------------------------------------------------------------------------- trends


def _history() -> pd.DataFrame:
    times = pd.date_range("2026-11-01", periods=6, freq="h")
    rows = []
    for i, t in enumerate(times):
        rows.append({"time": t, "batch": "a", "rejection_rate": 0.05, "expected_rejection_rate": 0.05, "ks_statistic": 0.03, "verdict": "ok"})
        drift = i >= 4
        rows.append({"time": t, "batch": "b", "rejection_rate": 0.05 + 0.05 * i, "expected_rejection_rate": 0.05,
                     "ks_statistic": 0.05 * i, "verdict": "drift" if drift else "ok"})
    return pd.DataFrame(rows)


def test_trend_chart_from_past_runs() -> None:
    fig = plot_drift_trend(_history(), thresholds={"ks_statistic": 0.15})
    rate, ks = fig.axes
    assert rate.get_ylabel() == "rejection rate" and ks.get_ylabel() == "KS statistic vs calibration"
    legend = _legend(rate)
    assert {"rejection rate (a)", "rejection rate (b)", "expected rejection rate", "drift verdict (2)"} <= set(legend)
    assert "KS drift threshold 0.15" in _legend(ks)
    rings = [c for c in rate.collections if isinstance(c, PathCollection)]
    assert sum(len(c.get_offsets()) for c in rings) == 2
    b_line = next(line for line in rate.get_lines() if line.get_label() == "rejection rate (b)")
    np.testing.assert_allclose(b_line.get_ydata(), 0.05 + 0.05 * np.arange(6))
    assert any(line.get_ydata()[0] == pytest.approx(0.15) for line in ks.get_lines() if "threshold" in line.get_label())


def test_trend_chart_of_one_run_and_close_rates_is_readable() -> None:
    # One run: the expected rate is still drawn (a step through one point draws nothing).
    fig = plot_drift_trend([{"time": "run-0", "rejection_rate": 0.046, "expected_rejection_rate": 0.042}])
    rate = fig.axes[0]
    expected = next(line for line in rate.get_lines() if line.get_label() == "expected rejection rate")
    np.testing.assert_allclose(expected.get_ydata(), 0.042)
    assert len(expected.get_xdata()) == 2  # a line across the axes, not a lone point
    # Close rates: tick labels keep the decimals that tell them apart (not every tick "4%").
    fig = plot_drift_trend([{"time": f"run-{i}", "rejection_rate": r} for i, r in enumerate([0.042, 0.044, 0.046])])
    rate = fig.axes[0]
    rate.set_ylim(0.04, 0.048)
    FigureCanvasAgg(fig).draw()
    ticks = [t.get_text() for t in rate.get_yticklabels() if t.get_text()]
    assert len(ticks) >= 3 and len(set(ticks)) == len(ticks), ticks


def test_trend_chart_with_run_labels_on_given_axes_and_errors() -> None:
    records = [{"time": f"run-{i}", "rejection_rate": r, "ks_statistic": 0.1 * i} for i, r in enumerate([0.05, 0.06, 0.4])]
    fig0 = Figure()
    ax = fig0.add_subplot()
    fig = plot_drift_trend(records, ax=ax)
    assert fig is fig0 and [t.get_text() for t in ax.get_xticklabels()] == ["run-0", "run-1", "run-2"]
    assert len(fig.axes) == 2  # the KS statistic on a twin axis
    with pytest.raises(ValueError, match=r"'history' parameter must have the columns \['rejection_rate'\]"):
        plot_drift_trend([{"time": 1}])
    with pytest.raises(ValueError, match="at least one run"):
        plot_drift_trend(pd.DataFrame(columns=["time", "rejection_rate"]))
    with pytest.raises(TypeError, match="'history' parameter must be a DataFrame or a list of dicts"):
        plot_drift_trend("runs.parquet")
