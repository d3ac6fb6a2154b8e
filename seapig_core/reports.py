"""Review material for people: summary tables and markdown with embedded plots.

The pipeline publishes these as Prefect artifacts, but nothing here knows about Prefect: a
:class:`Report` holds a machine-readable table (JSON-serialisable rows, raw numbers), the
same table for display (every number in the one format of :mod:`seapig_core.formatting`), a
markdown document whose images are PNG data URIs (``![density](data:image/png;base64,...)``,
which the Prefect UI renders; an image artifact would need a URL the browser can load), the
review queues by batch, and the Figures themselves, which :meth:`Report.save_figures` writes
as PNG files.

Every user-controlled string that enters the markdown (batch and file names, paths, sample
ids, class names, deployment and flow-run names, diagnostic messages) goes through
:func:`seapig_core.formatting.markdown_text`, so it renders as literal text.

Size: embedded figures are rendered at :data:`EMBED_DPI`; at most :data:`MAX_BATCH_FIGURES`
density plots and :data:`MAX_QUEUE_BATCHES` review queues of ``queue_rows`` rows are embedded,
and at most :data:`MAX_LISTED_FILES` input files are listed (the rest are counted). A scoring
report of 12 batches stays well under 1 MB.

Provenance
----------
Reports take a ``provenance`` mapping saying what they describe (every key optional, any value
may be None): ``deployment``, ``flow_run``, ``bundle_version``, ``bundle_dir``,
``input_files`` (a path, a list of paths, or a mapping of batch name to path), ``output_dir``
and ``selections_files`` (batch name to selections file). Missing values read "not recorded";
the bundle's own version and directory fill in when not given.
"""

from __future__ import annotations

import base64
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from seapig_core._io import atomic_write_bytes, check_file_stem, ensure_writable_dir
from seapig_core._validation import check_positive_int
from seapig_core.bundle import SelectorBundle
from seapig_core.drift import VERDICTS, check_drift_thresholds
from seapig_core.formatting import format_value, markdown_table, markdown_text
from seapig_core.plotting import SCORE_AXES, figure_to_png, plain_text, plot_score_density
from seapig_core.review import check_class_names, format_review_queue, review_queue

__all__ = [
    "EMBED_DPI",
    "MAX_BATCH_FIGURES",
    "MAX_LISTED_FILES",
    "MAX_QUEUE_BATCHES",
    "PROVENANCE_KEYS",
    "QUEUE_ROWS",
    "Report",
    "calibration_report",
    "check_provenance",
    "figure_data_uri",
    "scoring_report",
]

#: Density plots embedded in one scoring report; further batches appear in the table only.
MAX_BATCH_FIGURES = 12
#: Review queues embedded in one scoring report (drifted batches first).
MAX_QUEUE_BATCHES = 12
#: Default rows of each embedded review queue.
QUEUE_ROWS = 10
#: Input files listed by name in the provenance; the rest are counted.
MAX_LISTED_FILES = 20
#: Resolution of embedded figures (an 8 x 4.5 inch figure becomes 576 x 324 pixels).
EMBED_DPI = 72
#: The keys a ``provenance`` mapping may have.
PROVENANCE_KEYS = (
    "deployment", "flow_run", "bundle_version", "bundle_dir", "input_files", "output_dir", "selections_files",
)

# Verdicts as shown: table cells are escaped text, headings the library's own markdown.
_VERDICT_CELL = {"drift": "DRIFT", "insufficient": "too few samples", "ok": "ok"}
_VERDICT_HEADING = {"drift": "**DRIFT**", "insufficient": "too few samples for a verdict", "ok": "ok"}


def figure_data_uri(fig: Figure, dpi: int = EMBED_DPI) -> str:
    """The Figure as a ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(figure_to_png(fig, dpi=dpi)).decode("ascii")


def _fmt(value: Any) -> Any:
    """A JSON-safe raw value: floats rounded to 6 significant digits, non-finite ones None."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    return value


@dataclass
class Report:
    """Review material: tables, a markdown document embedding the figures, the figures by file stem.

    Attributes
    ----------
    table : list of dict
        Machine-readable rows with raw (JSON-safe) numbers, e.g. for trends across runs.
    markdown : str
        The document, with the figures as PNG data URIs.
    figures : dict of str to Figure
        By file stem (:meth:`save_figures`).
    display_table : list of dict
        The rows a person reads (every value a string in the one number format), in the order
        of the markdown (drifted batches first): what a table artifact should show.
    queues : dict of str to list of dict
        Scoring reports: each batch's review queue as display rows
        (:func:`seapig_core.review.format_review_queue`), e.g. for a table artifact per batch.
    """

    table: list[dict[str, Any]]
    markdown: str
    figures: dict[str, Figure] = field(default_factory=dict)
    display_table: list[dict[str, str]] = field(default_factory=list)
    queues: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    def save_figures(self, directory: str | os.PathLike[str], dpi: int = 100) -> dict[str, Path]:
        """Write every figure as ``<directory>/<stem>.png`` (atomically); returns the paths by stem."""
        out = ensure_writable_dir(directory, "plot_dir")
        paths = {}
        for stem, fig in self.figures.items():
            path = out / f"{check_file_stem(stem, 'stem')}.png"
            atomic_write_bytes(path, figure_to_png(fig, dpi=dpi))
            paths[stem] = path
        return paths


# ----------------------------------------------------------------------------- provenance


def _path_text(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    raise TypeError(f"The '{name}' provenance entry must be a str, a path or None. Got {type(value).__name__} instead.")


def check_provenance(provenance: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate a ``provenance`` mapping (see the module docstring) and normalise its values to strings.

    Returns
    -------
    dict
        Every key of :data:`PROVENANCE_KEYS`: strings or None; ``input_files`` a list of
        strings or a dict of batch name to string; ``selections_files`` a dict.

    Raises
    ------
    TypeError, ValueError
        For a non-mapping, an unknown key (a typo is not ignored) or a value of the wrong type.
    """
    if provenance is None:
        provenance = {}
    if not isinstance(provenance, Mapping):
        raise TypeError(f"The 'provenance' parameter must be a mapping or None. Got {type(provenance).__name__} instead.")
    unknown = sorted(str(k) for k in provenance if k not in PROVENANCE_KEYS)
    if unknown:
        raise ValueError(f"The 'provenance' parameter may only have the keys {list(PROVENANCE_KEYS)}. Got unknown keys {unknown}.")
    out: dict[str, Any] = {}
    for key in ("deployment", "flow_run", "bundle_version", "bundle_dir", "output_dir"):
        out[key] = _path_text(provenance.get(key), key)
    files = provenance.get("input_files")
    if files is None or isinstance(files, (str, os.PathLike)):
        out["input_files"] = None if files is None else [os.fspath(files)]
    elif isinstance(files, Mapping):
        out["input_files"] = {str(k): _path_text(v, "input_files") for k, v in files.items()}
    elif isinstance(files, Sequence):
        out["input_files"] = [_path_text(v, "input_files") for v in files]
    else:
        raise TypeError(
            f"The 'input_files' provenance entry must be a path, a list of paths or a mapping of batch to path. "
            f"Got {type(files).__name__} instead."
        )
    selections = provenance.get("selections_files")
    if selections is not None and not isinstance(selections, Mapping):
        raise TypeError(
            f"The 'selections_files' provenance entry must be a mapping of batch to path. Got {type(selections).__name__} instead."
        )
    out["selections_files"] = {str(k): _path_text(v, "selections_files") for k, v in (selections or {}).items()}
    return out


def _bundle_version(bundle: SelectorBundle) -> str | None:
    version = getattr(bundle, "version", None)
    if version:
        return str(version)
    return f"manifest {bundle.manifest_sha256[:12]}" if bundle.manifest_sha256 else None


def _provenance_lines(prov: dict[str, Any], bundle: SelectorBundle) -> list[str]:
    def text(value: Any) -> str:
        return "not recorded" if value in (None, "") else markdown_text(value)

    version = prov["bundle_version"] or _bundle_version(bundle)
    where = prov["bundle_dir"] or (os.fspath(bundle.path) if bundle.path is not None else None)
    files = prov["input_files"]
    if files is None:
        inputs = "- Input files: not recorded"
    elif not files:
        inputs = "- Input files: none"
    else:
        names = [f"{k}: {v}" for k, v in files.items()] if isinstance(files, dict) else [str(v) for v in files]
        listed = ", ".join(markdown_text(n) for n in names[:MAX_LISTED_FILES])
        if len(names) > MAX_LISTED_FILES:
            listed += f" and {format_value(len(names) - MAX_LISTED_FILES, 'count')} more"
        inputs = f"- Input files ({format_value(len(names), 'count')}): {listed}"
    return [
        f"- Deployment: {text(prov['deployment'])}",
        f"- Flow run: {text(prov['flow_run'])}",
        f"- Bundle: version {text(version)} in {text(where)}" if version or where else "- Bundle: not saved",
        inputs,
        f"- Output directory: {text(prov['output_dir'])}",
    ]


def _diagnostics(bundle: SelectorBundle) -> list[dict[str, str]]:
    """The calibration diagnostics (bundle manifest first, then the primary score's), without repeats."""
    found: list[dict[str, str]] = []
    for source in (bundle.calibration.get("diagnostics"), getattr(bundle.primary, "diagnostics", None)):
        if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
            for item in source:
                if isinstance(item, Mapping) and item.get("message"):
                    entry = {k: str(item.get(k, "")) for k in ("code", "message", "severity")}
                    if entry not in found:
                        found.append(entry)
    return found


def _image(alt: str, fig: Figure) -> str:
    return f"![{alt}]({figure_data_uri(fig)})"


# ----------------------------------------------------------------------------- calibration

# (key, kind of number, description)
_CALIBRATION_ROWS = (
    ("samples", "count", "labelled calibration samples (both parts of the split)"),
    ("samples_temperature", "count", "samples that fitted the temperature"),
    ("samples_threshold", "count", "held-out samples that set the threshold and every metric below"),
    ("accuracy", "rate", "top-1 accuracy"),
    ("temperature", "stat", "fitted temperature T"),
    ("nll_before", "stat", "negative log-likelihood at T = 1 (nats)"),
    ("nll_after", "stat", "negative log-likelihood at T"),
    ("ece_before", "error", "expected calibration error at T = 1 (15 equal-width bins)"),
    ("ece_after", "error", "expected calibration error at T"),
    ("brier_after", "stat", "Brier score at T"),
    ("aurc", "stat", "area under the risk-coverage curve of the primary score"),
    ("eaurc", "stat", "AURC in excess of the oracle ordering"),
    ("q", "setting", "target coverage quantile"),
    ("quantile_threshold", "threshold", "threshold at the q quantile"),
    ("threshold", "threshold", "threshold in use (select when score < threshold)"),
    ("coverage", "rate", "share of held-out samples selected"),
    ("selective_risk", "rate", "error rate among the selected held-out samples"),
)


def calibration_report(bundle: SelectorBundle, provenance: Mapping[str, Any] | None = None) -> Report:
    """Calibration evidence of a bundle: diagnostics, metrics, density, reliability, risk-coverage, temperature.

    The table has one row per metric (``metric``, ``value``, ``description``), from the
    bundle's calibration summary (see :func:`seapig_core.bundle.fit_selector`), plus the
    guaranteed-risk threshold when the bundle selects with one; ``display_table`` has the same
    rows with formatted values. The markdown starts with the calibration diagnostics (ties,
    nothing selected, a temperature at its bound, ... from ``bundle.calibration["diagnostics"]``)
    as warnings, then says what it describes (``provenance``, see the module docstring). The
    figures are drawn from the held-out calibration samples stored in the bundle: the score
    density with the threshold, and, when labels are present, the reliability diagram at T
    against T = 1, the risk-coverage curve with its oracle and the temperature chart (class
    probabilities of representative samples against T).

    Parameters
    ----------
    bundle : SelectorBundle
        The fitted selector.
    provenance : mapping, optional
        What the report describes (:func:`check_provenance`).

    Returns
    -------
    Report
    """
    from seapig_core import metrics
    from seapig_core.plotting import plot_reliability_diagram, plot_risk_coverage, plot_temperature_effect

    if not isinstance(bundle, SelectorBundle):
        raise TypeError(f"The 'bundle' parameter must be a SelectorBundle. Got {type(bundle).__name__} instead.")
    prov = check_provenance(provenance)
    cal = bundle.calibration
    primary = bundle.primary
    rows: list[tuple[str, Any, str, str]] = [("primary_score", bundle.primary_name, "text", "score that selects")]
    rows += [(key, cal.get(key), kind, text) for key, kind, text in _CALIBRATION_ROWS if key in cal]
    risk = bundle.risk_threshold
    if risk is not None:
        rows += [
            ("target_risk", risk["target_risk"], "rate", "requested bound on the selective risk"),
            ("delta", risk["delta"], "rate", "allowed probability of exceeding it"),
            ("guaranteed_threshold", risk["threshold"], "threshold", "SGR threshold (in use)"),
            ("guaranteed_coverage", risk["coverage"], "rate", "coverage it reaches on the held-out samples"),
            ("risk_bound", risk["risk_bound"], "rate", "upper confidence bound on its selective risk"),
        ]
    for name, extra in cal.get("per_score", {}).items():
        if name != bundle.primary_name:
            rows.append((f"aurc_{name}", extra.get("aurc"), "stat", f"AURC of the {name} score"))
    table = [{"metric": key, "value": _fmt(value), "description": text} for key, value, _, text in rows]
    display = [{"metric": key, "value": format_value(value, kind), "description": text} for key, value, kind, text in rows]

    class_names = getattr(bundle, "class_names", None)
    figures: dict[str, Figure] = {
        "calibration-density": plot_score_density(
            primary.scores, threshold=bundle.threshold, score=bundle.primary_name,
            title=f"Held-out calibration scores ({bundle.primary_name}, T = {format_value(bundle.temperature, 'stat')})",
        )
    }
    labels = primary.labels
    logits = primary.class_logits  # without a learned confidence head's unit, if any
    if labels is not None and logits is not None:
        figures["calibration-reliability"] = plot_reliability_diagram(
            logits, labels, task=bundle.task, temperature=bundle.temperature,
            per_member=bundle.per_member, compare_temperature=1.0,
        )
        errors = metrics.prediction_errors(
            logits, labels, task=bundle.task, temperature=bundle.temperature, per_member=bundle.per_member
        )
        rc = metrics.risk_coverage(primary.scores, errors)
        figures["calibration-risk-coverage"] = plot_risk_coverage(
            rc, risk_threshold=getattr(primary, "risk_threshold", None), label=bundle.primary_name
        )
        figures["calibration-temperature"] = plot_temperature_effect(
            logits, labels, bundle.temperature, task=bundle.task, per_member=bundle.per_member,
            class_names=list(class_names) if class_names else None,
        )

    def num(key: str, kind: str) -> str:
        return format_value(cal.get(key), kind)

    selection = (
        f"guaranteed-risk threshold: selective risk at most {format_value(risk['target_risk'], 'rate')} with "
        f"probability at least {format_value(1 - risk['delta'], 'rate')}"
        if risk is not None
        else f"the q = {format_value(bundle.q, 'setting')} quantile of the held-out calibration scores"
    )
    lines = ["# Selector calibration", ""]
    diagnostics = _diagnostics(bundle)
    if diagnostics:
        lines += [f"> **{len(diagnostics)} calibration warning(s): read before using this bundle.**", ">"]
        for item in diagnostics:
            code = f" ({markdown_text(item['code'])})" if item["code"] else ""
            lines.append(f"> - **{markdown_text(item['severity'] or 'warning')}**{code}: {markdown_text(item['message'])}")
        lines.append("")
    names = f", classes {markdown_text(', '.join(class_names))}" if class_names else ""
    lines += [
        *_provenance_lines(prov, bundle),
        "",
        f"Primary score **{markdown_text(bundle.primary_name)}** (of {markdown_text(', '.join(bundle.scores))}), "
        f"task {markdown_text(bundle.task)}, {format_value(bundle.n_units, 'count')} logits per sample{names}.",
        "",
        f"Temperature **T = {format_value(bundle.temperature, 'stat')}**; threshold "
        f"**{format_value(bundle.threshold, 'threshold')}** ({selection}).",
        "",
        f"| | before (T = 1) | after (T = {format_value(bundle.temperature, 'stat')}) |",
        "|---|---|---|",
        f"| NLL | {num('nll_before', 'stat')} | {num('nll_after', 'stat')} |",
        f"| ECE | {num('ece_before', 'error')} | {num('ece_after', 'error')} |",
        "",
        f"Accuracy {num('accuracy', 'rate')}, AURC {num('aurc', 'stat')}, coverage on the held-out samples "
        f"{num('coverage', 'rate')}, selective risk there {num('selective_risk', 'rate')}.",
    ]
    titles = {
        "calibration-density": ("Score density and threshold", "density"),
        "calibration-reliability": ("Reliability diagram", "reliability"),
        "calibration-risk-coverage": ("Risk-coverage curve", "risk-coverage"),
        "calibration-temperature": ("What the temperature does to the outputs", "temperature"),
    }
    for stem, fig in figures.items():
        heading, alt = titles[stem]
        lines += ["", f"## {heading}", "", _image(alt, fig)]
    return Report(table=table, markdown="\n".join(lines) + "\n", figures=figures, display_table=display)


# ----------------------------------------------------------------------------- scoring

_SCORING_KEYS = (
    "verdict", "samples", "selected", "rejected", "rejection_rate", "expected_rejection_rate", "binomial_pvalue",
    "rate_pvalue", "ks_statistic", "ks_pvalue", "psi", "non_finite",
)


def _figure_stems(batches: Sequence[str]) -> dict[str, str]:
    """A distinct, file-safe stem per batch name (hostile names are reduced to [A-Za-z0-9._-])."""
    stems: dict[str, str] = {}
    used: set[str] = set()
    for batch in batches:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", batch).strip("._") or "batch"
        stem = stem.replace("..", "_")[:80]
        candidate, i = stem, 1
        while candidate in used:
            i += 1
            candidate = f"{stem}-{i}"
        used.add(candidate)
        stems[batch] = candidate
    return stems


def _history_records(history: Any) -> pd.DataFrame | None:
    if history is None:
        return None
    if isinstance(history, pd.DataFrame):
        return history if len(history) else None
    if isinstance(history, Sequence) and not isinstance(history, (str, bytes)):
        return pd.DataFrame(list(history)) if len(history) else None
    raise TypeError(f"The 'history' parameter must be a DataFrame, a list of dicts or None. Got {type(history).__name__} instead.")


def scoring_report(
    bundle: SelectorBundle,
    batches: Mapping[str, pd.DataFrame],
    summaries: Mapping[str, Mapping[str, Any]] | None = None,
    provenance: Mapping[str, Any] | None = None,
    history: Any = None,
    *,
    thresholds: Any = None,
    class_names: Sequence[str] | None = None,
    queue_rows: int = QUEUE_ROWS,
) -> Report:
    """Review material for scored query batches: drift verdicts, review queues, density plots, trend.

    Parameters
    ----------
    bundle : SelectorBundle
        The selector the batches were scored with.
    batches : mapping of str to pandas.DataFrame
        Selections tables by batch name (:func:`seapig_core.selections.selections_table`).
    summaries : mapping of str to dict, optional
        Their :func:`seapig_core.selections.summarize_selections`; computed when omitted,
        lacking the drift keys, or computed with other ``thresholds``.
    provenance : mapping, optional
        What the report describes (:func:`check_provenance`); ``selections_files`` adds each
        batch's selections file to its section.
    history : pandas.DataFrame or list of dict, optional
        Past runs for the trend chart (:func:`seapig_core.plotting.plot_drift_trend`: ``time``,
        ``rejection_rate``, optionally ``expected_rejection_rate``, ``ks_statistic``,
        ``verdict``, ``batch``); no chart when omitted or empty.
    thresholds : DriftThresholds or mapping, optional
        The drift verdict's thresholds (:class:`seapig_core.drift.DriftThresholds`).
    class_names : sequence of str, optional
        Class names for the review queues; default the bundle's ``class_names``.
    queue_rows : int, default 10
        Rows of each embedded review queue.

    Returns
    -------
    Report
        ``table``: one row per batch in the given order (``batch`` and the raw numbers of
        ``verdict``, ``samples``, ``selected``, ``rejected``, ``rejection_rate``,
        ``expected_rejection_rate``, ``binomial_pvalue``, ``rate_pvalue``, ``ks_statistic``,
        ``ks_pvalue``, ``psi``, ``non_finite``); ``display_table`` the same formatted, drifted
        batches first; ``queues`` each batch's review queue (display rows). The markdown: an
        alert naming drifted batches, the provenance, the verdict table, the trend chart, then a
        section per batch (drifted first) with the verdict's reasons, the selections file, a
        density plot of the batch against the calibration scores (at most
        :data:`MAX_BATCH_FIGURES`) and the review queue (at most :data:`MAX_QUEUE_BATCHES`).
    """
    from seapig_core.plotting import plot_drift_trend
    from seapig_core.selections import summarize_selections

    if not isinstance(bundle, SelectorBundle):
        raise TypeError(f"The 'bundle' parameter must be a SelectorBundle. Got {type(bundle).__name__} instead.")
    if not isinstance(batches, Mapping) or not batches:
        raise ValueError("The 'batches' parameter must hold at least one selections table. Got none.")
    for batch, table in batches.items():
        if not isinstance(batch, str) or not isinstance(table, pd.DataFrame):
            raise TypeError(
                f"The 'batches' parameter must map batch names (str) to DataFrames. Got {type(batch).__name__} to "
                f"{type(table).__name__}."
            )
    limits = check_drift_thresholds(thresholds)
    prov = check_provenance(provenance)
    names = check_class_names(class_names if class_names is not None else getattr(bundle, "class_names", None))
    queue_rows = check_positive_int(queue_rows, "queue_rows")
    frame = _history_records(history)

    given = dict(summaries or {})
    summary: dict[str, dict[str, Any]] = {}
    for batch, table in batches.items():
        known = given.get(batch)
        fresh = known is not None and "verdict" in known and known.get("thresholds") == limits.to_dict()
        summary[batch] = dict(known) if fresh else summarize_selections(bundle, table, limits)  # type: ignore[arg-type]
    table_rows = [{"batch": batch, **{k: _fmt(summary[batch].get(k)) for k in _SCORING_KEYS}} for batch in batches]
    order = sorted(batches, key=lambda b: VERDICTS.index(summary[b]["verdict"]))
    display = [
        {
            "batch": batch,
            "verdict": summary[batch]["verdict"],
            "samples": format_value(summary[batch]["samples"], "count"),
            "rejected": format_value(summary[batch]["rejected"], "count"),
            "rejection_rate": format_value(summary[batch]["rejection_rate"], "rate"),
            "expected_rejection_rate": format_value(summary[batch]["expected_rejection_rate"], "rate"),
            "rate_pvalue": format_value(summary[batch].get("rate_pvalue"), "pvalue"),
            "ks_statistic": format_value(summary[batch].get("ks_statistic"), "stat"),
            "ks_pvalue": format_value(summary[batch].get("ks_pvalue"), "pvalue"),
            "psi": format_value(summary[batch].get("psi"), "stat"),
            "non_finite": format_value(summary[batch].get("non_finite"), "count"),
        }
        for batch in order
    ]

    queues = {
        batch: format_review_queue(review_queue(batches[batch], n=queue_rows, class_names=names), score=bundle.primary_name)
        for batch in order
    }
    axis = SCORE_AXES.get(bundle.primary_name)
    shown_score = (
        ("value", axis.label.split(" (")[0]) if axis is not None and axis.rejects_low
        else ("score", f"score ({bundle.primary_name})")
    )
    stems = _figure_stems(list(batches))
    figures: dict[str, Figure] = {}
    primary = bundle.primary
    for batch in order[:MAX_BATCH_FIGURES]:
        figures[f"{stems[batch]}-density"] = plot_score_density(
            primary.scores, batches[batch]["score"].to_numpy(dtype=np.float64), threshold=bundle.threshold,
            score=bundle.primary_name,
            title=f"{plain_text(batch)}: query against calibration ({bundle.primary_name}, "
            f"T = {format_value(bundle.temperature, 'stat')})",
        )
    if frame is not None:
        figures["scoring-trend"] = plot_drift_trend(frame, thresholds=limits)

    total = sum(summary[b]["samples"] for b in batches)
    rejected = sum(summary[b]["rejected"] for b in batches)
    drifted = [b for b in order if summary[b]["verdict"] == "drift"]
    lines = ["# Query scoring", ""]
    if drifted:
        listed = ", ".join(markdown_text(b) for b in drifted)
        lines += [
            f"> **Drift in {format_value(len(drifted), 'count')} of {format_value(len(batches), 'count')} "
            f"batch(es): {listed}.** Their sections come first; review their rejected samples.",
            "",
        ]
    lines += [
        *_provenance_lines(prov, bundle),
        "",
        f"{format_value(len(batches), 'count')} batch(es), {format_value(total, 'count')} samples, "
        f"{format_value(rejected, 'count')} rejected ({format_value(rejected / total if total else None, 'rate')}); expected about "
        f"{format_value(bundle.expected_rejection_rate, 'rate')} for data like the calibration data (primary score "
        f"**{markdown_text(bundle.primary_name)}**, threshold {format_value(bundle.threshold, 'threshold')}, "
        f"T = {format_value(bundle.temperature, 'stat')}).",
        "",
        markdown_table(
            [{**row, "verdict": _VERDICT_CELL[row["verdict"]]} for row in display],
            [
                ("batch", "batch"), ("verdict", "verdict"), ("samples", "samples"), ("rejected", "rejected"),
                ("rejection_rate", "rejection rate"), ("expected_rejection_rate", "expected"),
                ("rate_pvalue", "p (rate)"), ("ks_statistic", "KS"), ("ks_pvalue", "p (KS)"), ("psi", "PSI"),
            ],
        ),
        "",
        f"Verdicts: drift when the rejection rate or the score distribution differs significantly "
        f"(p < {format_value(limits.alpha, 'setting')}) and materially (rate by at least "
        f"{format_value(100 * limits.rate_margin, 'setting')} percentage points, KS at least {format_value(limits.ks_statistic, 'setting')} "
        f"or PSI at least {format_value(limits.psi, 'setting')}); batches under "
        f"{format_value(limits.min_samples, 'count')} samples get no verdict.",
    ]
    if "scoring-trend" in figures:
        lines += ["", "## Recent runs", "", _image("trend", figures["scoring-trend"])]
    for i, batch in enumerate(order):
        s = summary[batch]
        lines += ["", f"## {markdown_text(batch)}: {_VERDICT_HEADING[s['verdict']]}", ""]
        lines += [f"- {markdown_text(reason)}" for reason in s.get("reasons", [])]
        where = prov["selections_files"].get(batch)
        if where:
            lines += [f"- Selections file: {markdown_text(where)}"]
        stem = f"{stems[batch]}-density"
        if stem in figures:
            lines += ["", _image("density", figures[stem])]
        if i < MAX_QUEUE_BATCHES:
            shown = queues[batch]
            if shown:
                lines += [
                    "",
                    f"### Review queue: {format_value(len(shown), 'count')} of {format_value(s['rejected'], 'count')} "
                    f"rejected samples, most uncertain first",
                    "",
                    markdown_table(shown, [
                        ("rank", "#"), ("sample_id", "sample id"), ("prediction", "prediction"), ("runner_up", "runner-up"),
                        ("certainty_ratio", "certainty ratio"), shown_score,
                    ]),
                ]
            else:
                lines += ["", "No rejected samples."]
    if len(order) > MAX_BATCH_FIGURES:
        lines += ["", f"Density plots of {format_value(len(order) - MAX_BATCH_FIGURES, 'count')} further batch(es) are omitted; see the table."]
    if len(order) > MAX_QUEUE_BATCHES:
        lines += [f"Review queues of {format_value(len(order) - MAX_QUEUE_BATCHES, 'count')} further batch(es) are omitted (Report.queues has them)."]
    return Report(table=table_rows, markdown="\n".join(lines) + "\n", figures=figures, display_table=display, queues=queues)
