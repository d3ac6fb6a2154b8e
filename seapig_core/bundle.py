"""The selector bundle: fitted scores, their threshold and the calibration evidence, on disk.

A *selector* is what scheduled scoring needs to accept or reject query samples: one primary
score (its temperature and threshold decide ``selected``), optionally more scores reported
beside it, and the summary of how they were calibrated. :func:`fit_selector` builds one from
labelled (or unlabelled) calibration logits with the split protocol; :meth:`SelectorBundle.save`
and :func:`load_bundle` move it between the calibration and the scoring flows.

Directory layout (``schema_version`` 1)::

    <bundle>/
        manifest.json                 # written last, atomically: the bundle's single source of truth
        softmax-<sha256[:16]>.arrow   # one file per score, seapig_core.persistence format
        certainty_ratio-<...>.arrow

``manifest.json`` holds ``format`` (``"seapig_core.bundle"``), ``schema_version``,
``library_version``, ``task``, ``per_member``, ``n_units`` (logits per sample: the class count
for multiclass), ``primary`` (the score that selects), ``q``, ``threshold``,
``threshold_source`` (``"quantile"`` or ``"risk"``), ``temperature``, ``scores`` (name, file,
sha256 and threshold of each score file), ``calibration`` (the metrics of
:func:`fit_selector`), ``risk_threshold`` (the guaranteed threshold, or null), ``split`` (the
split protocol's sizes and seed, or null) and ``source`` (free-form provenance).

Score files are content-addressed and the manifest names them with their SHA-256, so a reader
never mixes files of two saves: a save writes the new score files, then replaces the manifest
atomically, then removes score files that no manifest names. Loading checks the format, the
schema version, each file's hash, and that every score agrees with the manifest. Nothing is
unpickled; a bundle can be inspected with any JSON and Arrow reader.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seapig_core._io import (
    atomic_write_json,
    check_file_stem,
    ensure_writable_dir,
    file_sha256,
    header_problem,
    read_json,
)
from seapig_core._validation import check_open_unit
from seapig_core._version import __version__
from seapig_core.layout import canonicalize, check_labels
from seapig_core.persistence import load_score
from seapig_core.scores.logits import SCORES, LogitScore, make_score

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_SCHEMA_VERSION",
    "MANIFEST_NAME",
    "SelectorBundle",
    "bundle_fingerprint",
    "describe_bundle",
    "fit_selector",
    "load_bundle",
]

BUNDLE_FORMAT = "seapig_core.bundle"
BUNDLE_SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
# Score files a save writes (and may later remove): "<registry name>-<16 hex digits>.arrow".
_SCORE_FILE = re.compile(r"[a-z_]+-[0-9a-f]{16}\.arrow")


def _as_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(eq=False)
class SelectorBundle:
    """Fitted scores that select query samples, with their calibration summary.

    Parameters
    ----------
    scores : dict[str, LogitScore]
        Fitted scores by registry name; the first is the *primary* score, whose threshold
        decides ``selected``. All share the task, ``per_member``, the logits per sample and
        the temperature.
    q : float or None
        The coverage quantile the quantile thresholds were set at.
    calibration : dict
        JSON-serialisable calibration metrics (see :func:`fit_selector`).
    split : dict or None
        The split protocol's settings and sizes, when the temperature and the threshold were
        fitted on different samples.
    source : dict
        Free-form, JSON-serialisable provenance, e.g. the calibration logits file and its hash.

    Attributes
    ----------
    path : pathlib.Path or None
        The directory it was saved to or loaded from.
    manifest_sha256 : str or None
        SHA-256 of the saved ``manifest.json``: the bundle's identity (cache keys, provenance).
    library_version : str
        The seapig_core version that wrote it.
    """

    scores: dict[str, LogitScore]
    q: float | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    split: dict[str, Any] | None = None
    source: dict[str, Any] = field(default_factory=dict)
    library_version: str = __version__
    path: Path | None = None
    manifest_sha256: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.scores, dict) or not self.scores:
            raise ValueError(f"The 'scores' parameter must be a non-empty dict of fitted scores. Got {self.scores!r}.")
        first = next(iter(self.scores.values()))
        for name, score in self.scores.items():
            if not isinstance(score, LogitScore):
                raise TypeError(f"The 'scores' parameter must hold LogitScore objects. Got {type(score).__name__} for {name!r}.")
            if score.name != name:
                raise ValueError(f"The score under key {name!r} is a {score.name!r} score.")
            if not score.is_fitted or score.n_units is None:
                raise ValueError(f"The {name!r} score must be fitted (call fit()). Got an unfitted score.")
            same = (score.task, score.per_member, score.n_units, score.T) == (first.task, first.per_member, first.n_units, first.T)
            if not same:
                raise ValueError(
                    f"All scores of a bundle must share task, per_member, logits per sample and temperature. "
                    f"Got {name!r} with {(score.task, score.per_member, score.n_units, score.T)} and "
                    f"{first.name!r} with {(first.task, first.per_member, first.n_units, first.T)}."
                )
        if first.threshold is None:
            raise ValueError(f"The primary score {first.name!r} needs a threshold (set_threshold). Got none.")

    # ------------------------------------------------------------------ views

    @property
    def primary_name(self) -> str:
        """Registry name of the primary score."""
        return next(iter(self.scores))

    @property
    def primary(self) -> LogitScore:
        """The score whose threshold decides ``selected``."""
        return self.scores[self.primary_name]

    @property
    def task(self) -> str:
        return self.primary.task

    @property
    def per_member(self) -> bool:
        return self.primary.per_member

    @property
    def n_units(self) -> int:
        """Logits per sample the bundle was calibrated on (the class count for multiclass)."""
        return int(self.primary.n_units)  # type: ignore[arg-type]

    @property
    def temperature(self) -> float:
        """The temperature in use (1 when none was fitted)."""
        return self.primary.T

    @property
    def threshold(self) -> float:
        """The primary score's threshold: a sample is selected when its score is below it."""
        return float(self.primary.threshold)  # type: ignore[arg-type]

    @property
    def risk_threshold(self) -> dict[str, Any] | None:
        """The primary score's guaranteed-risk threshold as a dict, when it selects with one."""
        rt = getattr(self.primary, "risk_threshold", None)
        return None if rt is None else rt.to_dict()

    @property
    def threshold_source(self) -> str:
        """``"risk"`` for a guaranteed-risk threshold, else ``"quantile"``."""
        return "risk" if self.risk_threshold is not None else "quantile"

    @property
    def expected_rejection_rate(self) -> float:
        """Share of calibration samples the threshold rejects: what query data like them should see."""
        coverage = self.calibration.get("coverage")
        if coverage is None:
            scores = self.primary.scores.detach().to("cpu", dtype=torch.float64).numpy()  # type: ignore[union-attr]
            coverage = float(np.mean(scores < self.threshold))
        return 1.0 - float(coverage)

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return (
            f"SelectorBundle(primary={self.primary_name!r}, scores={list(self.scores)}, task={self.task!r}, "
            f"n_units={self.n_units}, T={self.temperature:.4g}, threshold={self.threshold:.6g}{where})"
        )

    # ------------------------------------------------------------------ query checks

    def check_query(self, query_logits: Any, name: str = "query_logits") -> None:
        """Raise a clear ValueError if ``query_logits`` do not fit this bundle (task layout, class count).

        Raises
        ------
        ValueError
            For a shape that does not fit the bundle's task, or another number of logits per
            sample (classes) than the bundle was calibrated on.
        """
        canon = canonicalize(query_logits, self.task, self.per_member, name=name)
        if canon.n_units != self.n_units:
            where = f" {str(self.path)!r}" if self.path else ""
            raise ValueError(
                f"The '{name}' parameter must have {self.n_units} logits per sample (classes), as the "
                f"selector bundle{where} was calibrated on. Got shape {tuple(canon.input_shape)} "
                f"({canon.n_units} per sample) instead. Calibrate a bundle for this model."
            )

    # ------------------------------------------------------------------ persistence

    def manifest(self, files: dict[str, tuple[str, str]] | None = None) -> dict[str, Any]:
        """The JSON manifest (``files`` maps score name to (file name, sha256) once written)."""
        files = files or {}
        return {
            "format": BUNDLE_FORMAT,
            "schema_version": BUNDLE_SCHEMA_VERSION,
            "library_version": __version__,
            "task": self.task,
            "per_member": self.per_member,
            "n_units": self.n_units,
            "primary": self.primary_name,
            "q": self.q,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "temperature": self.temperature,
            "scores": [
                {
                    "name": name,
                    "file": files.get(name, (None, None))[0],
                    "sha256": files.get(name, (None, None))[1],
                    "threshold": _as_float(score.threshold),
                }
                for name, score in self.scores.items()
            ],
            "calibration": self.calibration,
            "risk_threshold": self.risk_threshold,
            "split": self.split,
            "source": self.source,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the bundle to directory ``path`` (created if needed), replacing an earlier bundle there.

        Returns
        -------
        pathlib.Path
            The directory. :attr:`path` and :attr:`manifest_sha256` are updated.

        Raises
        ------
        ValueError
            If ``path`` cannot be created or written.
        """
        directory = ensure_writable_dir(path, "path")
        files: dict[str, tuple[str, str]] = {}
        for name, score in self.scores.items():
            staging = directory / f".staging-{name}-{os.getpid()}-{id(score)}.arrow"
            try:
                score.save(staging, include_logits=True)
                digest = file_sha256(staging)
                final = f"{name}-{digest[:16]}.arrow"
                os.replace(staging, directory / final)
            finally:
                staging.unlink(missing_ok=True)
            files[name] = (final, digest)
        manifest = self.manifest(files)
        atomic_write_json(directory / MANIFEST_NAME, manifest)
        keep = {file for file, _ in files.values()}
        for stale in directory.glob("*.arrow"):
            if _SCORE_FILE.fullmatch(stale.name) and stale.name not in keep:
                stale.unlink(missing_ok=True)
        self.path = directory
        self.manifest_sha256 = file_sha256(directory / MANIFEST_NAME)
        return directory

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SelectorBundle:
        """Load a bundle written by :meth:`save` (see :func:`load_bundle`)."""
        return load_bundle(path)


def bundle_fingerprint(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a saved bundle's manifest, which names every score file by its hash.

    Raises
    ------
    ValueError
        If ``path`` holds no manifest.
    """
    manifest = Path(path) / MANIFEST_NAME
    if not manifest.is_file():
        raise ValueError(f"The 'path' parameter must be a selector bundle directory. No {MANIFEST_NAME} in {str(path)!r}.")
    return file_sha256(manifest)


def load_bundle(path: str | os.PathLike[str]) -> SelectorBundle:
    """Load a selector bundle directory.

    Raises
    ------
    ValueError
        If the directory or its manifest is missing or not a bundle, the schema version is not
        this library's, a score file is missing or does not match its hash, or a score does not
        agree with the manifest.
    """
    directory = Path(path)
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ValueError(
            f"The 'bundle' parameter must be a selector bundle directory with a {MANIFEST_NAME}. "
            f"Got {str(directory)!r}, which {'has no manifest' if directory.is_dir() else 'does not exist'}."
        )
    try:
        manifest = read_json(manifest_path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(manifest_path)!r} is not a readable bundle manifest: {exc}") from exc
    problem = header_problem(manifest, BUNDLE_FORMAT, BUNDLE_SCHEMA_VERSION)
    if problem is not None:
        raise ValueError(
            f"{str(directory)!r} is not a seapig_core selector bundle this version can read: {problem}. "
            f"Re-run the calibration flow to rebuild it."
        )
    scores: dict[str, LogitScore] = {}
    try:
        entries = manifest["scores"]
        for entry in entries:
            name, file, digest = entry["name"], entry["file"], entry["sha256"]
            check_file_stem(file, "file")
            score_path = directory / file
            if not score_path.is_file():
                raise ValueError(f"the score file {file!r} is missing")
            if file_sha256(score_path) != digest:
                raise ValueError(f"the score file {file!r} does not match its SHA-256 in the manifest")
            score = load_score(score_path)
            if score.name != name or score.n_units != manifest["n_units"] or score.task != manifest["task"]:
                raise ValueError(f"the score file {file!r} does not agree with the manifest")
            scores[name] = score
        bundle = SelectorBundle(
            scores=scores,
            q=manifest.get("q"),
            calibration=dict(manifest.get("calibration") or {}),
            split=manifest.get("split"),
            source=dict(manifest.get("source") or {}),
            library_version=str(manifest.get("library_version")),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"The selector bundle {str(directory)!r} has a malformed manifest: {exc!r}.") from exc
    except ValueError as exc:
        raise ValueError(f"The selector bundle {str(directory)!r} is invalid: {exc}") from exc
    if bundle.primary_name != manifest.get("primary"):
        raise ValueError(f"The selector bundle {str(directory)!r} is invalid: the primary score is not listed first.")
    bundle.path = directory
    bundle.manifest_sha256 = file_sha256(manifest_path)
    return bundle


def describe_bundle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a bundle (validating it, see :func:`load_bundle`) and return a small JSON summary of it."""
    bundle = load_bundle(path)
    return {
        "bundle_dir": str(bundle.path),
        "manifest_sha256": bundle.manifest_sha256,
        "library_version": bundle.library_version,
        "primary": bundle.primary_name,
        "scores": list(bundle.scores),
        "task": bundle.task,
        "n_units": bundle.n_units,
        "q": bundle.q,
        "threshold": bundle.threshold,
        "threshold_source": bundle.threshold_source,
        "temperature": bundle.temperature,
        "expected_rejection_rate": bundle.expected_rejection_rate,
    }


# ----------------------------------------------------------------------------- fitting


def _check_score_names(scores: Any) -> list[str]:
    names = [scores] if isinstance(scores, str) else scores
    if not isinstance(names, Sequence) or not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"The 'scores' parameter must be a score name or a non-empty list of names. Got {scores!r} instead.")
    unknown = [n for n in names if n not in SCORES]
    if unknown:
        raise ValueError(f"The 'scores' parameter must name scores among {sorted(SCORES)}. Got {unknown} instead.")
    if len(set(names)) != len(names):
        raise ValueError(f"The 'scores' parameter must not repeat a score. Got {list(names)} instead.")
    return list(names)




def _finite_or_none(value: Any) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


def _index(values: Any, idx: np.ndarray) -> torch.Tensor:
    tensor = values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))
    return tensor[torch.from_numpy(idx)]


def fit_selector(
    logits: Any,
    labels: Any = None,
    *,
    scores: str | Sequence[str] = ("softmax",),
    q: float = 0.95,
    task: str = "multiclass",
    per_member: bool = False,
    temperature: float | None = None,
    target_risk: float | None = None,
    delta: float = 0.05,
    split_fraction: float = 0.5,
    seed: int = 0,
    n_bins: int = 15,
    source: dict[str, Any] | None = None,
) -> SelectorBundle:
    """Fit a selector on calibration logits with the split protocol.

    With labels and no given ``temperature``, the labelled samples are split
    (:func:`seapig_core.risk.split_calibration`): the temperature is fitted on the first part
    (a fraction ``split_fraction``), and the scores, thresholds and every reported metric are
    computed on the second, held-out part, so that neither the threshold nor the metrics are
    tuned on the samples that fitted the temperature. With a given ``temperature`` or without
    labels, all samples set the threshold.

    The primary score (the first of ``scores``) selects: with its threshold at the ``q``
    quantile of the calibration scores, or, when ``target_risk`` is given, at the guaranteed
    threshold of :func:`seapig_core.risk.guaranteed_risk_threshold` (selective risk at most
    ``target_risk`` with probability at least ``1 - delta``).

    Parameters
    ----------
    logits : torch.Tensor or numpy.ndarray
        Finite calibration logits shaped for ``task``.
    labels : torch.Tensor or numpy.ndarray, optional
        Their labels; needed for the temperature, the metrics and ``target_risk``.
    scores : str or sequence of str
        Score names (see :data:`seapig_core.scores.SCORES`); the first is the primary score.
    q : float
        Coverage quantile in (0, 1) of every score's threshold.
    task : {"multiclass", "binary", "multilabel"}
    per_member : bool
    temperature : float, optional
        Use this temperature instead of fitting one.
    target_risk : float, optional
        In (0, 1): select with the guaranteed-risk threshold instead of the quantile.
    delta : float
        In (0, 1): the confidence parameter of the guarantee.
    split_fraction : float
        In (0, 1): share of the labelled samples that fit the temperature.
    seed : int
        Seed of the split.
    n_bins : int
        Bins of the expected calibration error.
    source : dict, optional
        Provenance stored in the bundle.

    Returns
    -------
    SelectorBundle
        Not saved yet (call :meth:`SelectorBundle.save`). Its ``calibration`` dict holds
        ``samples``, ``samples_temperature``, ``samples_threshold``, ``temperature``,
        ``temperature_at_bound``, ``threshold``, ``coverage`` (share of the threshold samples
        selected) and, with labels, ``accuracy``, ``nll_before``/``nll_after``,
        ``ece_before``/``ece_after``, ``brier_after``, ``aurc``, ``eaurc``, ``augrc`` and
        ``selective_risk`` (error rate among the selected threshold samples), all on the
        held-out samples; plus ``aurc`` and ``threshold`` per score under ``per_score``.

    Raises
    ------
    ValueError
        For invalid arguments, a ``target_risk`` without labels, or (saying "infeasible") a
        target risk that no threshold meets.
    """
    from seapig_core import metrics
    from seapig_core.risk import split_calibration

    names = _check_score_names(scores)
    target_risk = check_open_unit(target_risk, "target_risk", allow_none=True)
    check_open_unit(delta, "delta")
    if target_risk is not None and labels is None:
        raise ValueError("The 'target_risk' parameter needs labelled calibration logits. Got no 'labels'.")
    canon = canonicalize(logits, task, per_member, name="logits", require_finite=True)
    if labels is not None:
        check_labels(labels, canon, name="labels")
    n = canon.n_samples

    split = None
    X_thr, Y_thr = logits, labels
    primary = make_score(names[0], temperature=temperature, task=task, per_member=per_member)
    if labels is not None and temperature is None:
        first, second = split_calibration(n, fraction=split_fraction, seed=seed)
        primary.fit(_index(logits, first), _index(labels, first))  # the temperature split
        X_thr, Y_thr = _index(logits, second), _index(labels, second)
        split = {"fraction": float(split_fraction), "seed": int(seed), "samples_temperature": int(first.size), "samples_threshold": int(second.size)}
    temperature_fit = primary.temperature_fit

    # Every score is calibrated on the threshold split (with its labels, so the bundle can
    # redraw its evidence) at the primary's temperature.
    fitted: dict[str, LogitScore] = {names[0]: primary.calibrate(X_thr, Y_thr).set_threshold(q)}
    for name in names[1:]:
        score = make_score(name, temperature=primary.temperature, task=task, per_member=per_member)
        fitted[name] = score.calibrate(X_thr, Y_thr).set_threshold(q)
    T_used = primary.T
    primary_scores = primary.scores.detach().to("cpu", dtype=torch.float64).numpy()  # type: ignore[union-attr]

    calibration: dict[str, Any] = {
        "samples": int(n),
        "samples_temperature": int(split["samples_temperature"]) if split else 0,
        "samples_threshold": int(primary_scores.size),
        "temperature": float(T_used),
        "temperature_at_bound": None if temperature_fit is None else bool(temperature_fit.at_bound),
        "q": float(primary.quantile) if primary.quantile is not None else None,
        "quantile_threshold": float(primary.threshold),  # type: ignore[arg-type]
    }
    per_score: dict[str, dict[str, Any]] = {name: {"threshold": float(s.threshold)} for name, s in fitted.items()}  # type: ignore[arg-type]
    if Y_thr is not None:
        errors = metrics.prediction_errors(X_thr, Y_thr, task=task, temperature=T_used, per_member=per_member)
        calibration.update(
            accuracy=float(1.0 - errors.mean()),
            nll_before=metrics.negative_log_likelihood(X_thr, Y_thr, task=task, temperature=1.0, per_member=per_member),
            nll_after=metrics.negative_log_likelihood(X_thr, Y_thr, task=task, temperature=T_used, per_member=per_member),
            ece_before=float(metrics.expected_calibration_error(X_thr, Y_thr, task=task, temperature=1.0, per_member=per_member, n_bins=n_bins)),
            ece_after=float(metrics.expected_calibration_error(X_thr, Y_thr, task=task, temperature=T_used, per_member=per_member, n_bins=n_bins)),
            brier_after=float(metrics.brier_score(X_thr, Y_thr, task=task, temperature=T_used, per_member=per_member)),
        )
        for name, s in fitted.items():
            rc = metrics.risk_coverage(s.scores, errors)
            per_score[name].update(aurc=rc.aurc, eaurc=rc.eaurc, augrc=rc.augrc)
        calibration.update({k: per_score[names[0]][k] for k in ("aurc", "eaurc", "augrc")})
        if target_risk is not None:
            primary.set_risk_threshold(target_risk, delta, X=X_thr, Y=Y_thr)
            per_score[names[0]]["threshold"] = float(primary.threshold)  # type: ignore[arg-type]
        selected = primary_scores < primary.threshold
        calibration["selective_risk"] = _finite_or_none(errors[selected].mean()) if selected.any() else None
    calibration["threshold"] = float(primary.threshold)  # type: ignore[arg-type]
    calibration["coverage"] = float(np.mean(primary_scores < primary.threshold))
    calibration["per_score"] = per_score
    return SelectorBundle(
        scores=fitted, q=float(q), calibration=calibration, split=split, source=dict(source or {})
    )
