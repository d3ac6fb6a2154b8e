"""Review material for people: summary tables and markdown with embedded plots.

The pipeline publishes these as Prefect artifacts, but nothing here knows about Prefect: a
:class:`Report` is a table (a list of JSON-serialisable rows), a markdown document whose
images are PNG data URIs (``![density](data:image/png;base64,...)``, which the Prefect UI
renders; an image artifact would need a URL the browser can load), and the Figures themselves,
which :meth:`Report.save_figures` writes as PNG files.
"""

from __future__ import annotations

import base64
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from seapig_core._io import atomic_write_bytes, check_file_stem, ensure_writable_dir
from seapig_core.bundle import SelectorBundle
from seapig_core.plotting import figure_to_png, plot_score_density

__all__ = [
    "MAX_BATCH_FIGURES",
    "Report",
    "calibration_report",
    "figure_data_uri",
    "scoring_report",
]

#: Density plots embedded in one scoring report; further batches appear in the table only.
MAX_BATCH_FIGURES = 12


def figure_data_uri(fig: Figure, dpi: int = 100) -> str:
    """The Figure as a ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(figure_to_png(fig, dpi=dpi)).decode("ascii")


def _fmt(value: Any) -> Any:
    """Round floats to 6 significant digits for display; None for non-finite values."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    return value


def _num(value: Any, spec: str = ".4g") -> str:
    return "n/a" if value is None else format(value, spec)


@dataclass
class Report:
    """A table, a markdown document embedding the figures, and the figures by file stem."""

    table: list[dict[str, Any]]
    markdown: str
    figures: dict[str, Figure] = field(default_factory=dict)

    def save_figures(self, directory: str | os.PathLike[str], dpi: int = 100) -> dict[str, Path]:
        """Write every figure as ``<directory>/<stem>.png`` (atomically); returns the paths by stem."""
        out = ensure_writable_dir(directory, "plot_dir")
        paths = {}
        for stem, fig in self.figures.items():
            path = out / f"{check_file_stem(stem, 'stem')}.png"
            atomic_write_bytes(path, figure_to_png(fig, dpi=dpi))
            paths[stem] = path
        return paths


# ----------------------------------------------------------------------------- calibration

_CALIBRATION_ROWS = (
    ("samples", "labelled calibration samples (both parts of the split)"),
    ("samples_temperature", "samples that fitted the temperature"),
    ("samples_threshold", "held-out samples that set the threshold and every metric below"),
    ("accuracy", "top-1 accuracy"),
    ("temperature", "fitted temperature T"),
    ("nll_before", "negative log-likelihood at T = 1 (nats)"),
    ("nll_after", "negative log-likelihood at T"),
    ("ece_before", "expected calibration error at T = 1 (15 equal-width bins)"),
    ("ece_after", "expected calibration error at T"),
    ("brier_after", "Brier score at T"),
    ("aurc", "area under the risk-coverage curve of the primary score"),
    ("eaurc", "AURC in excess of the oracle ordering"),
    ("q", "target coverage quantile"),
    ("quantile_threshold", "threshold at the q quantile"),
    ("threshold", "threshold in use (select when score < threshold)"),
    ("coverage", "share of held-out samples selected"),
    ("selective_risk", "error rate among the selected held-out samples"),
)


def calibration_report(bundle: SelectorBundle) -> Report:
    """Calibration evidence of a bundle: metrics table, density plot, reliability diagram, risk-coverage.

    The table has one row per metric (``metric``, ``value``, ``description``), from the
    bundle's calibration summary (see :func:`seapig_core.bundle.fit_selector`), plus the
    guaranteed-risk threshold when the bundle selects with one. The figures are drawn from the
    held-out calibration samples stored in the bundle: the score density with the threshold,
    and, when labels are present, the reliability diagram at T against T = 1 and the
    risk-coverage curve with its oracle.
    """
    from seapig_core import metrics
    from seapig_core.plotting import plot_reliability_diagram, plot_risk_coverage

    cal = bundle.calibration
    primary = bundle.primary
    rows: list[dict[str, Any]] = [{"metric": "primary_score", "value": bundle.primary_name, "description": "score that selects"}]
    rows += [{"metric": key, "value": _fmt(cal.get(key)), "description": text} for key, text in _CALIBRATION_ROWS if key in cal]
    risk = bundle.risk_threshold
    if risk is not None:
        rows += [
            {"metric": "target_risk", "value": _fmt(risk["target_risk"]), "description": "requested bound on the selective risk"},
            {"metric": "delta", "value": _fmt(risk["delta"]), "description": "allowed probability of exceeding it"},
            {"metric": "guaranteed_threshold", "value": _fmt(risk["threshold"]), "description": "SGR threshold (in use)"},
            {"metric": "guaranteed_coverage", "value": _fmt(risk["coverage"]), "description": "coverage it reaches on the held-out samples"},
            {"metric": "risk_bound", "value": _fmt(risk["risk_bound"]), "description": "upper confidence bound on its selective risk"},
        ]
    for name, extra in cal.get("per_score", {}).items():
        if name != bundle.primary_name:
            rows.append({"metric": f"aurc_{name}", "value": _fmt(extra.get("aurc")), "description": f"AURC of the {name} score"})

    figures: dict[str, Figure] = {"calibration-density": primary.plot()}
    labels = primary.labels
    if labels is not None and primary.logits is not None:
        figures["calibration-reliability"] = plot_reliability_diagram(
            primary.logits, labels, task=bundle.task, temperature=bundle.temperature,
            per_member=bundle.per_member, compare_temperature=1.0,
        )
        errors = metrics.prediction_errors(
            primary.logits, labels, task=bundle.task, temperature=bundle.temperature, per_member=bundle.per_member
        )
        rc = metrics.risk_coverage(primary.scores, errors)
        figures["calibration-risk-coverage"] = plot_risk_coverage(
            rc, risk_threshold=getattr(primary, "risk_threshold", None), label=bundle.primary_name
        )

    where = f"`{bundle.path}`" if bundle.path else "(not saved)"
    selection = (
        f"guaranteed-risk threshold: selective risk at most {risk['target_risk']:g} with probability "
        f"at least {1 - risk['delta']:g}"
        if risk is not None
        else f"the q = {_num(bundle.q, 'g')} quantile of the held-out calibration scores"
    )
    lines = [
        "# Selector calibration",
        "",
        f"Bundle {where}: primary score **{bundle.primary_name}** (of {', '.join(bundle.scores)}), "
        f"task {bundle.task}, {bundle.n_units} logits per sample.",
        "",
        f"Temperature **T = {bundle.temperature:.4g}**; threshold **{bundle.threshold:.6g}** ({selection}).",
        "",
        "| | before (T = 1) | after (T) |",
        "|---|---|---|",
        f"| NLL | {_num(cal.get('nll_before'))} | {_num(cal.get('nll_after'))} |",
        f"| ECE | {_num(cal.get('ece_before'))} | {_num(cal.get('ece_after'))} |",
        "",
        f"Accuracy {_num(cal.get('accuracy'))}, AURC {_num(cal.get('aurc'))}, coverage on the held-out "
        f"samples {_num(cal.get('coverage'))}, selective risk there {_num(cal.get('selective_risk'))}.",
    ]
    titles = {
        "calibration-density": "Score density and threshold",
        "calibration-reliability": "Reliability diagram",
        "calibration-risk-coverage": "Risk-coverage curve",
    }
    for stem, fig in figures.items():
        lines += ["", f"## {titles[stem]}", "", f"![{stem.removeprefix('calibration-')}]({figure_data_uri(fig)})"]
    return Report(table=rows, markdown="\n".join(lines) + "\n", figures=figures)


# ----------------------------------------------------------------------------- scoring


def scoring_report(
    bundle: SelectorBundle, batches: Mapping[str, pd.DataFrame], summaries: Mapping[str, Mapping[str, Any]] | None = None
) -> Report:
    """Review material for scored query batches: per-batch table and density plots against calibration.

    Parameters
    ----------
    bundle : SelectorBundle
        The selector the batches were scored with.
    batches : mapping of str to pandas.DataFrame
        Selections tables by batch name (:func:`seapig_core.selections.selections_table`).
    summaries : mapping of str to dict, optional
        Their :func:`seapig_core.selections.summarize_selections`, computed if omitted.

    Returns
    -------
    Report
        One table row per batch (``batch``, ``samples``, ``selected``, ``rejected``,
        ``rejection_rate``, ``expected_rejection_rate``, ``ks_statistic``, ``ks_pvalue``,
        ``non_finite``) and a markdown document with one density plot of the batch's scores
        against the calibration scores per batch (at most :data:`MAX_BATCH_FIGURES`).
    """
    from seapig_core.selections import summarize_selections

    if not batches:
        raise ValueError("The 'batches' parameter must hold at least one selections table. Got none.")
    summaries = dict(summaries or {})
    rows, figures = [], {}
    primary = bundle.primary
    for i, (batch, table) in enumerate(batches.items()):
        summary = summaries.get(batch) or summarize_selections(bundle, table)
        rows.append({"batch": batch, **{k: _fmt(summary[k]) for k in (
            "samples", "selected", "rejected", "rejection_rate", "expected_rejection_rate",
            "ks_statistic", "ks_pvalue", "non_finite",
        )}})
        if i < MAX_BATCH_FIGURES:
            figures[f"{check_file_stem(batch, 'batch')}-density"] = plot_score_density(
                primary.scores, table["score"].to_numpy(dtype=np.float64), threshold=bundle.threshold,
                title=f"{batch}: query against calibration ({bundle.primary_name}, T = {bundle.temperature:.3g})",
                score_name=f"{bundle.primary_name} score",
            )
    total = sum(r["samples"] for r in rows)
    rejected = sum(r["rejected"] for r in rows)
    lines = [
        "# Query scoring",
        "",
        f"{len(rows)} batch(es), {total:,} samples, {rejected:,} rejected ({rejected / total:.1%}); "
        f"expected about {bundle.expected_rejection_rate:.1%} for data like the calibration data "
        f"(primary score **{bundle.primary_name}**, threshold {bundle.threshold:.6g}, T = {bundle.temperature:.4g}).",
        "",
        "| batch | samples | rejected | rejection rate | KS statistic (drift) |",
        "|---|---|---|---|---|",
        *(
            f"| {r['batch']} | {r['samples']:,} | {r['rejected']:,} | {r['rejection_rate']:.1%} | {_num(r['ks_statistic'], '.3f')} |"
            for r in rows
        ),
    ]
    for stem, fig in figures.items():
        batch = stem.removesuffix("-density")
        lines += ["", f"## {batch}", "", f"![density]({figure_data_uri(fig)})"]
    if len(rows) > MAX_BATCH_FIGURES:
        lines += ["", f"Density plots of {len(rows) - MAX_BATCH_FIGURES} further batch(es) are omitted; see the table."]
    return Report(table=rows, markdown="\n".join(lines) + "\n", figures=figures)
