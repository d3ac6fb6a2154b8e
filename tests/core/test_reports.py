"""Review material (tables + markdown with PNG data URIs) and the pipeline's review steps (issues 9.2, 9.3, 9.5, 8.6)."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from seapig_core.bundle import fit_selector, load_bundle
from seapig_core.formatting import format_value
from seapig_core.pipeline import calibrate_file, calibration_review, content_fingerprint, score_file, scoring_review
from seapig_core.reports import (
    MAX_BATCH_FIGURES,
    MAX_QUEUE_BATCHES,
    calibration_report,
    check_provenance,
    figure_data_uri,
    scoring_report,
)
from seapig_core.selections import selections_table, summarize_selections

_IMAGE = re.compile(r"!\[(\w[\w-]*)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")
HOSTILE = "[x](javascript:alert(1)) | injected | cell"


def _labelled(n: int = 800, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    logits = 1.5 * torch.randn(n, 4, generator=g)
    logits[torch.arange(n), labels] += 4.0
    return logits, labels


@pytest.fixture(scope="module")
def bundle():
    return fit_selector(*_labelled(), q=0.95)


def _render(markdown: str) -> str:
    markdown_it = pytest.importorskip("markdown_it")
    return markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(markdown)


def _text(markdown: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", _render(markdown)))


def test_figure_data_uri_is_a_png() -> None:
    from matplotlib.figure import Figure

    fig = Figure()
    fig.add_subplot().plot([0, 1])
    uri = figure_data_uri(fig)
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]).startswith(b"\x89PNG")


# ----------------------------------------------------------------------------- calibration


def test_calibration_report_with_risk_and_one_number_format() -> None:
    bundle = fit_selector(*_labelled(), scores=["softmax", "margin"], target_risk=0.1)
    report = calibration_report(bundle)
    rows = {row["metric"]: row["value"] for row in report.table}
    assert rows["primary_score"] == "softmax" and rows["guaranteed_threshold"] == pytest.approx(bundle.threshold, rel=1e-5)
    for key in ("accuracy", "nll_before", "nll_after", "ece_before", "ece_after", "aurc", "coverage", "risk_bound", "aurc_margin"):
        assert key in rows
    assert all(isinstance(row["description"], str) for row in report.table)
    assert [m[0] for m in _IMAGE.findall(report.markdown)] == ["density", "reliability", "risk-coverage", "temperature"]
    assert "guaranteed-risk threshold" in report.markdown and "What the temperature does" in report.markdown
    # One format: the same ECE reads the same in the display table, the markdown and the plot legend.
    shown = {row["metric"]: row["value"] for row in report.display_table}
    ece = format_value(bundle.calibration["ece_after"], "error")
    assert shown["ece_after"] == ece and re.fullmatch(r"\d+\.\d\d%", ece)
    assert f"| ECE | {shown['ece_before']} | {ece} |" in report.markdown
    legend = [t.get_text() for t in report.figures["calibration-reliability"].axes[0].get_legend().get_texts()]
    assert any(f"ECE = {ece}" in t for t in legend)
    assert shown["accuracy"] == format_value(bundle.calibration["accuracy"], "rate") and shown["accuracy"].endswith("%")
    assert shown["samples"] == "800" and shown["temperature"] == format_value(bundle.temperature, "stat")


def test_calibration_report_without_labels_has_only_the_density() -> None:
    report = calibration_report(fit_selector(_labelled()[0], q=0.9))
    assert [m[0] for m in _IMAGE.findall(report.markdown)] == ["density"]
    assert "n/a" in report.markdown and "- Bundle: not saved" in report.markdown


def test_calibration_report_shows_diagnostics_and_provenance(bundle) -> None:
    bundle.calibration["diagnostics"] = [
        {"code": "ties", "message": "42% of the scores tie at -1; use the energy score <b>instead</b>.", "severity": "warning"},
    ]
    try:
        report = calibration_report(
            bundle, provenance={"deployment": "digits-calibration", "flow_run": "brave-okapi", "input_files": "/data/cal.npz"}
        )
    finally:
        del bundle.calibration["diagnostics"]
    head = report.markdown.split("## ")[0]
    assert head.index("calibration warning(s)") < head.index("- Deployment")  # diagnostics come first
    assert "> - **warning** (ties): 42% of the scores tie at -1; use the energy score &lt;b&gt;instead&lt;/b&gt;." in head
    text = _text(report.markdown)
    assert "Deployment: digits-calibration" in text and "Flow run: brave-okapi" in text
    assert "Input files (1): /data/cal.npz" in text and "Output directory: not recorded" in text
    assert "<b>" not in _render(report.markdown)


# ----------------------------------------------------------------------------- scoring


def _batches(bundle) -> dict[str, pd.DataFrame]:
    ids = np.array([f"img_{i:03d}" for i in range(300)])
    same = selections_table(bundle, _labelled(300, seed=5)[0], ids)
    drifted = selections_table(bundle, 0.2 * _labelled(250, seed=6)[0], np.array([f"`x`<{i}>" for i in range(250)]))
    return {"batch-000": same, HOSTILE: drifted, "tiny": selections_table(bundle, _labelled(12, seed=7)[0])}


def test_scoring_report_verdicts_queues_and_provenance(bundle) -> None:
    batches = _batches(bundle)
    provenance = {
        "deployment": "digits-scoring", "flow_run": "calm-newt", "bundle_version": "v-0007", "output_dir": "/out",
        "input_files": {b: f"/inbox/{b}.npy" for b in batches},
        "selections_files": {HOSTILE: "/out/evil.selections.parquet"},
    }
    report = scoring_report(bundle, batches, provenance=provenance, class_names=["cat", "dog", "emu", "fox"], queue_rows=5)
    # Raw table: input order, raw numbers; display: drifted first, formatted.
    assert [row["batch"] for row in report.table] == list(batches)
    verdicts = {row["batch"]: row["verdict"] for row in report.table}
    assert verdicts == {"batch-000": "ok", HOSTILE: "drift", "tiny": "insufficient"}
    assert [row["batch"] for row in report.display_table] == [HOSTILE, "tiny", "batch-000"]
    assert report.display_table[0]["rejection_rate"] == format_value(report.table[1]["rejection_rate"], "rate")
    json.dumps(report.table, allow_nan=False)

    markdown = report.markdown
    assert markdown.index("> **Drift in 1 of 3 batch(es)") < markdown.index("- Deployment")
    sections = [line for line in markdown.splitlines() if line.startswith("## ")]
    assert sections[0].endswith(": **DRIFT**") and sections[1].startswith("## tiny") and sections[2].startswith("## batch-000")
    text = _text(markdown)
    assert f"## {HOSTILE}" not in markdown and f"{HOSTILE}: DRIFT" in text
    assert "Deployment: digits-scoring" in text and "Bundle: version v-0007" in text and "Output directory: /out" in text
    assert "Selections file: /out/evil.selections.parquet" in text
    drifted = next(row for row in report.table if row["verdict"] == "drift")
    rate = format_value(drifted["rejection_rate"], "rate")
    assert f"The rejection rate {rate} is above the expected 5.0% by at least 5 percentage points" in text  # reasons
    assert "Only 12 samples: a verdict needs at least 100" in text

    rendered = _render(markdown)
    assert "<a " not in rendered and "javascript:" not in re.sub(r"<[^>]+>", "", rendered).split(HOSTILE)[0] + ""
    assert 'href="javascript:' not in rendered and "<code>" not in rendered
    rows = re.findall(r"<tr>(.*?)</tr>", rendered, flags=re.S)
    assert all(len(re.findall(r"<t[hd][^>]*>", row)) in (10, 6) for row in rows)  # verdict table, queues: no extra cells
    # Review queue: the drifted batch's rejected samples, most uncertain first, with class names.
    queue = report.queues[HOSTILE]
    assert len(queue) == 5 and queue[0]["sample_id"] == "`x`<" + queue[0]["sample_id"][4:]
    assert re.fullmatch(r"(cat|dog|emu|fox) \(\d\)", queue[0]["prediction"])
    assert f"| 1 | {queue[0]['sample_id'].replace('`', chr(92) + '`').replace('<', '&lt;').replace('>', '&gt;')} |" in markdown
    assert f"Review queue: 5 of {drifted['rejected']} rejected samples, most uncertain first" in text
    scores = [float(row["score"]) for row in queue]
    assert scores == sorted(scores, reverse=True)
    assert "| certainty ratio | max softmax probability |" in markdown  # the queue shows the confidence, like the plot
    assert all(float(row["value"]) == pytest.approx(-float(row["score"]), abs=1e-4) for row in queue)
    assert len(_IMAGE.findall(markdown)) == 3 and set(report.figures) == {
        "batch-000-density", "x_javascript_alert_1_injected_cell-density", "tiny-density",
    }


def test_scoring_report_trend_thresholds_and_summaries(bundle) -> None:
    batches = dict(list(_batches(bundle).items())[:1])
    history = [
        {"time": pd.Timestamp("2026-11-01") + pd.Timedelta(hours=i), "rejection_rate": 0.05 + 0.01 * i,
         "expected_rejection_rate": 0.05, "ks_statistic": 0.02 * i, "verdict": "ok"}
        for i in range(5)
    ]
    report = scoring_report(bundle, batches, history=history)
    assert [m[0] for m in _IMAGE.findall(report.markdown)] == ["trend", "density"] and "## Recent runs" in report.markdown
    assert "scoring-trend" in report.figures
    assert "scoring-trend" not in scoring_report(bundle, batches, history=[]).figures
    # Given summaries are used when they carry the verdict for these thresholds, recomputed otherwise.
    stale = {"batch-000": {**summarize_selections(bundle, batches["batch-000"]), "verdict": "drift", "reasons": ["Stale."]}}
    assert scoring_report(bundle, batches, stale).table[0]["verdict"] == "drift"
    strict = scoring_report(bundle, batches, stale, thresholds={"min_samples": 1000})
    assert strict.table[0]["verdict"] == "insufficient" and "batches under 1,000 samples get no verdict" in strict.markdown
    with pytest.raises(ValueError, match="may only set"):
        scoring_report(bundle, batches, thresholds={"alhpa": 0.1})


@pytest.mark.slow
def test_scoring_report_limits_figures_queues_and_size(bundle) -> None:
    query = _labelled(150, seed=1)[0]
    tables = {f"b{i:02d}": selections_table(bundle, query) for i in range(MAX_BATCH_FIGURES + 2)}
    report = scoring_report(bundle, tables)
    assert [row["batch"] for row in report.table] == list(tables)
    assert len(_IMAGE.findall(report.markdown)) == MAX_BATCH_FIGURES and "2 further batch(es)" in report.markdown
    assert report.markdown.count("### Review queue") == MAX_QUEUE_BATCHES and len(report.queues) == len(tables)
    assert len(report.markdown.encode()) < 1_000_000
    with pytest.raises(ValueError, match="at least one selections table"):
        scoring_report(bundle, {})


def test_provenance_is_checked() -> None:
    assert check_provenance(None)["deployment"] is None
    normal = check_provenance({"input_files": [Path("/a.npy"), "/b.npy"], "bundle_dir": Path("/b")})
    assert normal["input_files"] == ["/a.npy", "/b.npy"] and normal["bundle_dir"] == "/b"
    with pytest.raises(ValueError, match=r"may only have the keys \[.*\]. Got unknown keys \['deploymnet'\]"):
        check_provenance({"deploymnet": "x"})
    with pytest.raises(TypeError, match="'flow_run' provenance entry must be a str, a path or None. Got int"):
        check_provenance({"flow_run": 3})
    with pytest.raises(TypeError, match="'provenance' parameter must be a mapping or None"):
        check_provenance(["deployment"])


# ----------------------------------------------------------------------------- pipeline


@pytest.mark.slow
def test_pipeline_steps_from_files(tmp_path: Path) -> None:
    logits, labels = _labelled()
    np.savez(tmp_path / "cal.npz", logits=logits.numpy(), labels=labels.numpy())
    summary = calibrate_file(tmp_path / "cal.npz", tmp_path / "bundle", scores=["energy"], q=0.9)
    assert summary["primary"] == "energy" and summary["manifest_sha256"] == content_fingerprint(tmp_path / "bundle")
    np.save(tmp_path / "q.npy", _labelled(64, seed=2)[0].numpy())
    scored = score_file(tmp_path / "bundle", tmp_path / "q.npy", tmp_path / "out", "q")
    assert Path(scored["path"]).name == "q.selections.parquet" and scored["samples"] == 64
    assert scored["verdict"] == "insufficient"  # 64 samples: no verdict at the defaults
    history = [{"time": "run-1", "rejection_rate": 0.1, "ks_statistic": 0.05}]
    report = scoring_review(
        tmp_path / "bundle", {"q": scored["path"]}, plot_dir=tmp_path / "plots",
        provenance={"deployment": "d"}, history=history, thresholds={"min_samples": 50}, queue_rows=3,
    )
    assert report.table[0]["samples"] == 64 and report.table[0]["verdict"] in {"ok", "drift"}
    assert (tmp_path / "plots" / "q-density.png").is_file() and (tmp_path / "plots" / "scoring-trend.png").is_file()
    text = _text(report.markdown)
    assert "Deployment: d" in text and f"Selections file: {scored['path']}" in text and str(tmp_path / "bundle") in text
    assert len(report.queues["q"]) <= 3
    calibration_review(tmp_path / "bundle", plot_dir=tmp_path / "plots", provenance={"flow_run": "r1"})
    assert {p.name for p in (tmp_path / "plots").iterdir()} >= {"calibration-density.png", "calibration-reliability.png"}
    assert load_bundle(tmp_path / "bundle").source["logits_sha256"] == content_fingerprint(tmp_path / "cal.npz")
    assert content_fingerprint(tmp_path / "nothing") is None and content_fingerprint(tmp_path) is None
