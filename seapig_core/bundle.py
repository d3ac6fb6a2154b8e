"""The selector bundle: fitted scores, their threshold and the calibration evidence, on disk.

A *selector* is what scheduled scoring needs to accept or reject query samples: one primary
score (its temperature and threshold decide ``selected``), optionally more scores reported
beside it, and the summary of how they were calibrated. :func:`fit_selector` builds one from
labelled (or unlabelled) calibration logits with the split protocol and a
:class:`CalibrationSettings`; :meth:`SelectorBundle.save` and :func:`load_bundle` move it
between the calibration and the scoring flows.

Directory layout (``schema_version`` 2): immutable versions behind a pointer ::

    <bundle>/
        current.json                          # the pointer: {"version": ..., "manifest_sha256": ...}
        versions/
            20261103T120102123456Z-<sha16>/   # one immutable version per save
                manifest.json                 # the version's single source of truth
                softmax.arrow                 # one file per score, seapig_core.persistence format
                certainty_ratio.arrow
            20261102T080000000001Z-<sha16>/   # older versions, kept for rollback and for readers
            .version.seapig-tmp-...           # a save in progress (or of a dead writer)

A version id is ``<created, UTC, microseconds>Z-<first 16 hex digits of the manifest's SHA-256>``:
sortable by creation time, and bound to the manifest's content.

**Saving** (:meth:`SelectorBundle.save`) writes a complete version under an owned temporary
name (:func:`seapig_core._io.temporary_name`: score files, then ``manifest.json``, each flushed
to disk), renames it into ``versions/`` and only then replaces ``current.json`` atomically
(``os.replace``). A save never modifies or deletes a version another process may be reading:
two calibrations writing the same bundle at once each write their own version, and the pointer
names one complete version at every moment (the last switch wins). A killed save leaves only
its temporary directory, which the next save removes (:func:`~seapig_core._io.sweep_stale_temporaries`
removes temporaries of dead writers, never of live ones). The pointer is a small JSON file
rather than a symlink: it also records the manifest's SHA-256, which the reader checks, and it
survives copies and archives that drop or rewrite symlinks.

**Loading** (:func:`load_bundle`) reads the pointer once and loads exactly that version: the
manifest's bytes are read once and hashed, every score file is checked against its SHA-256,
and every field the score files also hold (``primary``, ``task``, ``per_member``, ``n_units``,
``threshold``, ``temperature``, ``threshold_source``, ``risk_threshold``, each score's
``threshold``) must agree with them; a manifest edited by hand is refused naming the file and
the field, and any other edit by its hash no longer matching the version id. The loaded
:class:`SelectorBundle` carries ``version``, ``manifest_sha256``, ``path`` (the bundle root)
and ``version_path``, and everything else from that one version, so that provenance written
from it (selections metadata) names exactly what selected. A version directory can also be
loaded directly.

**Retention.** After a successful save, versions other than the current one and the
``keep_previous`` newest others (default :data:`DEFAULT_KEEP_PREVIOUS` = 5) are removed, but
only when unreferenced: readers hold a shared ``fcntl.flock`` on the version directory while
they load it, and the collector (:func:`prune_versions`) takes an exclusive non-blocking lock,
skips what it cannot lock, re-checks the pointer under the lock, and renames a version to an
owned temporary name before deleting it. Readers never delete anything. (Locks are advisory
``flock`` locks: on a platform without ``fcntl``, or a network file system without ``flock``,
pruning relies on ``keep_previous`` alone.)

**The old layout** (``schema_version`` 1, ``manifest.json`` at the bundle root) is refused by
:func:`load_bundle` with an error saying to re-run the calibration; saving into such a
directory writes the new layout beside the old files and leaves them untouched (remove them by
hand once no reader of an older seapig_core needs them).

``manifest.json`` holds ``format`` (``"seapig_core.bundle"``), ``schema_version``,
``library_version``, ``created``, ``task``, ``per_member``, ``confidence_head`` (whether the
logits' last unit is a learned confidence head's logit; absent in bundles of earlier versions,
meaning false), ``n_units`` (class logits per sample: the class count for multiclass, the
confidence unit not counted), ``class_names`` (or null), ``primary`` (the score that selects),
``q``, ``threshold``, ``threshold_source`` (``"quantile"`` or ``"risk"``), ``temperature``,
``scores`` (name, file, sha256 and threshold of each score file), ``calibration`` (the metrics
of :func:`fit_selector`), ``risk_threshold`` (the guaranteed threshold, or null), ``split`` (the
split protocol's sizes and seed, or null), ``settings`` (the :class:`CalibrationSettings`, or
null) and ``source`` (free-form provenance). ``current.json`` holds ``format``
(``"seapig_core.bundle_pointer"``), ``schema_version``, ``library_version``, ``version`` and
``manifest_sha256``. Nothing is unpickled; a bundle can be inspected with any JSON and Arrow
reader.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import shutil
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seapig_core._io import (
    JSON_MAX_BYTES,
    atomic_write_bytes,
    check_file_stem,
    ensure_writable_dir,
    file_sha256,
    header_problem,
    loads_json,
    read_json_object,
    sweep_stale_temporaries,
    temporary_name,
)
from seapig_core._validation import (
    check_bool,
    check_open_unit,
    check_positive_int,
    check_temperature,
)
from seapig_core._version import __version__
from seapig_core.layout import CanonicalLogits, canonicalize, check_labels, check_task
from seapig_core.persistence import load_score
from seapig_core.scores.logits import SCORES, LogitScore, make_score

try:  # advisory locks between readers and the version collector (POSIX)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "BUNDLE_CACHE_SIZE",
    "BUNDLE_FORMAT",
    "BUNDLE_SCHEMA_VERSION",
    "DEFAULT_KEEP_PREVIOUS",
    "MANIFEST_NAME",
    "POINTER_FORMAT",
    "POINTER_NAME",
    "VERSIONS_DIR",
    "CalibrationSettings",
    "SelectorBundle",
    "bundle_fingerprint",
    "bundle_versions",
    "clear_bundle_cache",
    "describe_bundle",
    "fit_selector",
    "load_bundle",
    "load_bundle_cached",
    "prune_versions",
    "resolve_settings",
]

BUNDLE_FORMAT = "seapig_core.bundle"
BUNDLE_SCHEMA_VERSION = 2
POINTER_FORMAT = "seapig_core.bundle_pointer"
MANIFEST_NAME = "manifest.json"
POINTER_NAME = "current.json"
VERSIONS_DIR = "versions"
#: Versions kept besides the current one after a save (see :func:`prune_versions`).
DEFAULT_KEEP_PREVIOUS = 5
_VERSION_ID = re.compile(r"(?P<created>\d{8}T\d{12}Z)-(?P<digest>[0-9a-f]{16})")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# A reader retries when the version it was pointed at is collected under it (the pointer has
# moved on meanwhile); more than a few retries means the pointer is switching faster than a
# bundle loads.
_LOAD_ATTEMPTS = 8


def _as_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _json_roundtrip(value: Any) -> Any:
    return json.loads(json.dumps(value, allow_nan=False))


# ----------------------------------------------------------------------------- settings


def _check_score_names(scores: Any) -> tuple[str, ...]:
    names = [scores] if isinstance(scores, str) else scores
    if not isinstance(names, Sequence) or not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"The 'scores' parameter must be a score name or a non-empty list of names. Got {scores!r} instead.")
    unknown = [n for n in names if n not in SCORES]
    if unknown:
        raise ValueError(f"The 'scores' parameter must name scores among {sorted(SCORES)}. Got {unknown} instead.")
    if len(set(names)) != len(names):
        raise ValueError(f"The 'scores' parameter must not repeat a score. Got {list(names)} instead.")
    return tuple(names)


def _check_class_names(class_names: Any) -> tuple[str, ...] | None:
    if class_names is None:
        return None
    if isinstance(class_names, str) or not isinstance(class_names, Sequence) or not all(isinstance(c, str) for c in class_names):
        raise TypeError(f"The 'class_names' parameter must be a list of str or None. Got {class_names!r} instead.")
    if not class_names or any(not c for c in class_names) or len(set(class_names)) != len(class_names):
        raise ValueError(
            f"The 'class_names' parameter must be a non-empty list of distinct, non-empty names. Got {list(class_names)!r} instead."
        )
    return tuple(class_names)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"The 'seed' parameter must be a non-negative integer. Got {type(seed).__name__} instead.")
    if seed < 0:
        raise ValueError(f"The 'seed' parameter must be a non-negative integer. Got {seed!r} instead.")
    return int(seed)


def _check_keep_previous(keep_previous: Any) -> int:
    if isinstance(keep_previous, (bool, np.bool_)) or not isinstance(keep_previous, (int, np.integer)):
        raise TypeError(f"The 'keep_previous' parameter must be a non-negative integer. Got {type(keep_previous).__name__} instead.")
    if keep_previous < 0:
        raise ValueError(f"The 'keep_previous' parameter must be a non-negative integer. Got {keep_previous!r} instead.")
    return int(keep_previous)


@dataclass(frozen=True)
class CalibrationSettings:
    """Every setting of a calibration, validated once: the one owner of the calibration parameters.

    :func:`fit_selector` and :func:`seapig_core.pipeline.calibrate_file` take it; a saved bundle
    stores it (``settings`` in the manifest) so that a calibration with the same settings on the
    same data can reuse the bundle instead of refitting.

    Parameters
    ----------
    scores : str or sequence of str, default ("softmax",)
        Score names (see :data:`seapig_core.scores.SCORES`); the first is the primary score,
        whose threshold selects. Stored as a tuple.
    q : float, default 0.95
        Coverage quantile in (0, 1) of every score's threshold.
    task : {"multiclass", "binary", "multilabel"}
    per_member : bool, default False
        Whether the logits have a member axis (ensemble, MC dropout).
    temperature : float, optional
        Use this temperature instead of fitting one.
    target_risk : float, optional
        In (0, 1): select with the guaranteed-risk threshold instead of the quantile.
    delta : float, default 0.05
        In (0, 1): the confidence parameter of the guarantee.
    split_fraction : float, default 0.5
        In (0, 1): share of the labelled samples that fit the temperature.
    seed : int, default 0
        Non-negative seed of the split.
    n_bins : int, default 15
        Bins of the expected calibration error.
    risk_method : str, default "sgr"
        Method of the guaranteed-risk threshold (:data:`seapig_core.risk.METHODS`).
    class_names : sequence of str, optional
        Names of the classes (multiclass, multilabel: one per logit; binary: two), kept by the
        bundle for reports and review queues. Stored as a tuple.
    confidence_head : bool, default False
        The logits' last unit is a learned confidence head's logit, ``(N, C + 1)`` (see
        :mod:`seapig_core.layout`): every score reads the ``C`` class logits, and the
        ``"confidence"`` score (which needs this) reads the confidence. The bundle stores it,
        so that scoring splits query logits the same way.

    Raises
    ------
    TypeError, ValueError
        Naming the parameter, what was expected and what was received.

    Examples
    --------
    >>> settings = CalibrationSettings(scores=["softmax", "energy"], q=0.9)
    >>> CalibrationSettings.from_dict(settings.to_dict()) == settings
    True
    """

    scores: tuple[str, ...] = ("softmax",)
    q: float = 0.95
    task: str = "multiclass"
    per_member: bool = False
    temperature: float | None = None
    target_risk: float | None = None
    delta: float = 0.05
    split_fraction: float = 0.5
    seed: int = 0
    n_bins: int = 15
    risk_method: str = "sgr"
    class_names: tuple[str, ...] | None = None
    confidence_head: bool = False

    def __post_init__(self) -> None:
        from seapig_core.risk import METHODS

        checked = {
            "scores": _check_score_names(self.scores),
            "q": check_open_unit(self.q, "q"),
            "task": check_task(self.task),
            "per_member": check_bool(self.per_member, "per_member"),
            "temperature": check_temperature(self.temperature, allow_none=True),
            "target_risk": check_open_unit(self.target_risk, "target_risk", allow_none=True),
            "delta": check_open_unit(self.delta, "delta"),
            "split_fraction": check_open_unit(self.split_fraction, "split_fraction"),
            "seed": _check_seed(self.seed),
            "n_bins": check_positive_int(self.n_bins, "n_bins"),
            "class_names": _check_class_names(self.class_names),
            "confidence_head": check_bool(self.confidence_head, "confidence_head"),
        }
        if not isinstance(self.risk_method, str) or self.risk_method not in METHODS:
            raise ValueError(f"The 'risk_method' parameter must be one of {list(METHODS)}. Got {self.risk_method!r} instead.")
        needs_head = [name for name in checked["scores"] if SCORES[name].reads_confidence]
        if needs_head and not checked["confidence_head"]:
            raise ValueError(
                f"The 'scores' parameter names {needs_head}, which read a learned confidence head: set "
                f"confidence_head=True (the logits' last unit is then the confidence logit). Got confidence_head=False."
            )
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict (tuples as lists)."""
        out = dataclasses.asdict(self)
        out["scores"] = list(self.scores)
        out["class_names"] = None if self.class_names is None else list(self.class_names)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], what: str = "settings") -> CalibrationSettings:
        """Settings from :meth:`to_dict`'s dict (missing keys take their defaults).

        Raises
        ------
        TypeError, ValueError
            If ``data`` is not a mapping, has unknown keys, or holds an invalid value.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"The '{what}' parameter must be a dict of calibration settings. Got {type(data).__name__} instead.")
        return cls(**_settings_kwargs(data, what))


_SETTING_NAMES = tuple(f.name for f in dataclasses.fields(CalibrationSettings))


def _settings_kwargs(data: Mapping[str, Any], what: str) -> dict[str, Any]:
    unknown = sorted(str(k) for k in data if k not in _SETTING_NAMES)
    if unknown:
        raise TypeError(f"The '{what}' parameter has unknown calibration settings {unknown}; known: {list(_SETTING_NAMES)}.")
    return dict(data)


def resolve_settings(settings: Any = None, overrides: Mapping[str, Any] | None = None) -> CalibrationSettings:
    """A :class:`CalibrationSettings` from ``settings`` (the object or a dict), or from keyword arguments.

    The one place that accepts the keyword form of :func:`fit_selector` and
    :func:`seapig_core.pipeline.calibrate_file` (``scores=..., q=...``).

    Raises
    ------
    TypeError
        For both ``settings`` and keyword settings, an unknown setting, or another type.
    """
    overrides = dict(overrides or {})
    if settings is None:
        return CalibrationSettings(**_settings_kwargs(overrides, "settings"))
    if overrides:
        raise TypeError(
            f"Give the calibration settings either as 'settings' or as keyword arguments, not both. "
            f"Got 'settings' and {sorted(overrides)}."
        )
    if isinstance(settings, CalibrationSettings):
        return settings
    if isinstance(settings, Mapping):
        return CalibrationSettings.from_dict(settings)
    raise TypeError(f"The 'settings' parameter must be a CalibrationSettings or a dict. Got {type(settings).__name__} instead.")


# ----------------------------------------------------------------------------- the bundle


@dataclass(eq=False)
class SelectorBundle:
    """Fitted scores that select query samples, with their calibration summary.

    Parameters
    ----------
    scores : dict[str, LogitScore]
        Fitted scores by registry name; the first is the *primary* score, whose threshold
        decides ``selected``. All share the task, ``per_member``, ``confidence_head``, the
        logits per sample and the temperature.
    q : float or None
        The coverage quantile the quantile thresholds were set at.
    calibration : dict
        JSON-serialisable calibration metrics (see :func:`fit_selector`).
    split : dict or None
        The split protocol's settings and sizes, when the temperature and the threshold were
        fitted on different samples.
    source : dict
        Free-form, JSON-serialisable provenance, e.g. the calibration logits file and its hash.
    settings : CalibrationSettings or None
        The settings it was fitted with (:func:`fit_selector` sets them).
    class_names : sequence of str or None
        Class names: one per logit for multiclass and multilabel, two for binary.

    Attributes
    ----------
    path : pathlib.Path or None
        The bundle root it was saved to or loaded from.
    version : str or None
        The version id it was saved as or loaded from (see the module docstring).
    version_path : pathlib.Path or None
        That version's directory.
    manifest_sha256 : str or None
        SHA-256 of the version's ``manifest.json``: its identity (cache keys, provenance).
    library_version : str
        The seapig_core version that wrote it.
    """

    scores: dict[str, LogitScore]
    q: float | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    split: dict[str, Any] | None = None
    source: dict[str, Any] = field(default_factory=dict)
    library_version: str = __version__
    settings: CalibrationSettings | None = None
    class_names: tuple[str, ...] | None = None
    path: Path | None = None
    version: str | None = None
    version_path: Path | None = None
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
            mine = (score.task, score.per_member, score.confidence_head, score.n_units, score.T)
            theirs = (first.task, first.per_member, first.confidence_head, first.n_units, first.T)
            if mine != theirs:
                raise ValueError(
                    f"All scores of a bundle must share task, per_member, confidence_head, logits per sample and "
                    f"temperature. Got {name!r} with {mine} and {first.name!r} with {theirs}."
                )
        if first.threshold is None:
            raise ValueError(f"The primary score {first.name!r} needs a threshold (set_threshold). Got none.")
        if self.settings is not None and not isinstance(self.settings, CalibrationSettings):
            raise TypeError(f"The 'settings' parameter must be a CalibrationSettings or None. Got {type(self.settings).__name__} instead.")
        self.class_names = _check_class_names(self.class_names)
        if self.class_names is not None:
            expected = 2 if first.task == "binary" else int(first.n_units)  # type: ignore[arg-type]
            if len(self.class_names) != expected:
                raise ValueError(
                    f"The 'class_names' parameter must name {expected} classes for this {first.task} bundle "
                    f"({first.n_units} logits per sample). Got {len(self.class_names)} names instead."
                )

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
    def confidence_head(self) -> bool:
        """Whether the logits' last unit is a learned confidence head's logit (``(N, C + 1)``)."""
        return self.primary.confidence_head

    @property
    def layout(self) -> dict[str, Any]:
        """``task``, ``per_member`` and ``confidence_head``: the keyword arguments of
        :func:`seapig_core.layout.canonicalize` that validate query logits for this bundle
        (with ``n_units=bundle.n_units``)."""
        return self.primary.layout

    @property
    def n_units(self) -> int:
        """Class logits per sample the bundle was calibrated on (the class count for multiclass;
        a confidence unit not counted)."""
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
        where = f", path={str(self.path)!r}, version={self.version!r}" if self.path else ""
        return (
            f"SelectorBundle(primary={self.primary_name!r}, scores={list(self.scores)}, task={self.task!r}, "
            f"n_units={self.n_units}, T={self.temperature:.4g}, threshold={self.threshold:.6g}{where})"
        )

    # ------------------------------------------------------------------ query checks

    def check_query(self, query_logits: Any, name: str = "query_logits") -> CanonicalLogits:
        """Validate ``query_logits`` for this bundle once and return them canonical (see :mod:`seapig_core.layout`).

        Zero samples are allowed (an empty query batch scores to empty results); non-finite
        rows are allowed (they are scored NaN and never selected). Pass the result to
        :func:`seapig_core.kernels.score_pass`; nothing validates it again.

        Returns
        -------
        CanonicalLogits

        Raises
        ------
        ValueError
            For a shape that does not fit the bundle's task, or another number of logits per
            sample (classes) than the bundle was calibrated on.
        """
        canon = canonicalize(
            query_logits, self.task, self.per_member, name=name, allow_empty=True, confidence_head=self.confidence_head
        )
        if canon.n_units != self.n_units:
            where = f" {str(self.path)!r}" if self.path else ""
            head = " besides the confidence logit" if self.confidence_head else ""
            raise ValueError(
                f"The '{name}' parameter must have {self.n_units} logits per sample (classes){head}, as the "
                f"selector bundle{where} was calibrated on. Got shape {tuple(canon.input_shape)} "
                f"({canon.n_units} per sample{head}) instead. Calibrate a bundle for this model."
            )
        return canon

    # ------------------------------------------------------------------ persistence

    def manifest(self, files: dict[str, tuple[str, str]] | None = None, created: str | None = None) -> dict[str, Any]:
        """The JSON manifest (``files`` maps score name to (file name, sha256) once written)."""
        files = files or {}
        return {
            "format": BUNDLE_FORMAT,
            "schema_version": BUNDLE_SCHEMA_VERSION,
            "library_version": __version__,
            "created": created,
            "task": self.task,
            "per_member": self.per_member,
            "confidence_head": self.confidence_head,
            "n_units": self.n_units,
            "class_names": None if self.class_names is None else list(self.class_names),
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
            "settings": None if self.settings is None else self.settings.to_dict(),
            "source": self.source,
        }

    def save(self, path: str | os.PathLike[str], *, keep_previous: int = DEFAULT_KEEP_PREVIOUS) -> Path:
        """Write the bundle as a new version of the bundle directory ``path`` and make it current.

        The version is written completely under an owned temporary name, renamed into
        ``versions/``, and then the pointer ``current.json`` is replaced atomically (see the
        module docstring). Nothing a concurrent reader or writer uses is modified or deleted.
        Afterwards, stale temporaries of dead writers are removed and old versions are pruned
        (:func:`prune_versions`).

        Parameters
        ----------
        path : str or os.PathLike
            The bundle root (created if needed).
        keep_previous : int, default :data:`DEFAULT_KEEP_PREVIOUS`
            Versions kept besides the current one.

        Returns
        -------
        pathlib.Path
            The bundle root. :attr:`path`, :attr:`version`, :attr:`version_path` and
            :attr:`manifest_sha256` are updated.

        Raises
        ------
        ValueError
            If ``path`` cannot be created or written, or is a version directory.
        """
        keep_previous = _check_keep_previous(keep_previous)
        root = ensure_writable_dir(path, "path")
        if root.parent.name == VERSIONS_DIR and _VERSION_ID.fullmatch(root.name):
            raise ValueError(
                f"The 'path' parameter must be a bundle root, not one of its version directories. Got {str(root)!r}; "
                f"save to {str(root.parent.parent)!r} instead."
            )
        versions = root / VERSIONS_DIR
        versions.mkdir(exist_ok=True)
        sweep_stale_temporaries(root)
        sweep_stale_temporaries(versions)
        staging = versions / temporary_name("version")
        staging.mkdir()
        lock_fd: int | None = None
        try:
            files: dict[str, tuple[str, str]] = {}
            for name, score in self.scores.items():
                file = f"{name}.arrow"
                score.save(staging / file, include_logits=True)
                files[name] = (file, file_sha256(staging / file))
            created = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            manifest = self.manifest(files, created=created)
            raw = (json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
            atomic_write_bytes(staging / MANIFEST_NAME, raw)
            digest = hashlib.sha256(raw).hexdigest()
            version = f"{created}-{digest[:16]}"
            final = versions / version
            # Hold a shared lock from before the version is visible until the pointer names it,
            # so that a concurrent prune cannot take the new version for an unreferenced one.
            lock_fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
            _flock(lock_fd, shared=True)
            try:
                os.rename(staging, final)
            except OSError as exc:  # the same id already exists: only an identical manifest has it
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or _read_bytes(final / MANIFEST_NAME) != raw:
                    raise
                shutil.rmtree(staging, ignore_errors=True)
            _fsync_dir(versions)
            pointer = {
                "format": POINTER_FORMAT,
                "schema_version": BUNDLE_SCHEMA_VERSION,
                "library_version": __version__,
                "version": version,
                "manifest_sha256": digest,
            }
            atomic_write_bytes(root / POINTER_NAME, (json.dumps(pointer, indent=2, sort_keys=True) + "\n").encode("utf-8"))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            if lock_fd is not None:
                os.close(lock_fd)  # releases the lock
        self.path, self.version, self.version_path, self.manifest_sha256 = root, version, final, digest
        self.library_version = __version__
        prune_versions(root, keep_previous=keep_previous)
        return root

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SelectorBundle:
        """Load a bundle written by :meth:`save` (see :func:`load_bundle`)."""
        return load_bundle(path)


# ----------------------------------------------------------------------------- locks and files


def _flock(fd: int, *, shared: bool, blocking: bool = True) -> bool:
    """Lock ``fd``; False when ``blocking`` is False and another process holds a conflicting lock.

    Where advisory locks are unavailable (no ``fcntl``, or a file system that refuses
    ``flock``), this returns True without locking: pruning then relies on ``keep_previous``.
    """
    if fcntl is None:  # pragma: no cover - no advisory locks on this platform
        return True
    flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
    try:
        fcntl.flock(fd, flags)
    except BlockingIOError:
        return False
    except OSError as exc:  # pragma: no cover - e.g. a network file system without flock
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
            return True
        raise
    return True


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _same_directory(path: Path, fd: int) -> bool:
    """Whether ``path`` still is the directory open as ``fd`` (not removed or renamed meanwhile)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


@contextlib.contextmanager
def _reading(version_path: Path) -> Iterator[bool]:
    """Hold a shared lock on a version directory while it is read; yields False if it is gone."""
    try:
        fd = os.open(version_path, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        yield False
        return
    try:
        _flock(fd, shared=True)
        yield _same_directory(version_path, fd)
    finally:
        os.close(fd)


def _read_manifest(path: Path) -> tuple[dict[str, Any], str]:
    """The manifest's JSON object and the SHA-256 of the very bytes it was parsed from."""
    what = f"The bundle manifest {str(path)!r}"
    try:
        with open(path, "rb") as handle:
            raw = handle.read(JSON_MAX_BYTES + 1)
    except FileNotFoundError as exc:
        raise ValueError(
            f"{what} is missing: the version directory {str(path.parent)!r} is incomplete. Re-run the calibration."
        ) from exc
    except OSError as exc:
        raise ValueError(f"{what} could not be read: {exc.strerror or exc}.") from exc
    value = loads_json(raw, what)
    if not isinstance(value, dict):
        raise ValueError(f"{what} must hold a JSON object. Got a JSON {type(value).__name__} instead.")
    return value, hashlib.sha256(raw).hexdigest()


def _read_pointer(root: Path) -> dict[str, Any]:
    """The validated pointer of bundle root ``root``."""
    path = root / POINTER_NAME
    pointer = read_json_object(path, "bundle pointer")
    problem = header_problem(pointer, POINTER_FORMAT, BUNDLE_SCHEMA_VERSION)
    if problem is not None:
        raise ValueError(
            f"The bundle pointer {str(path)!r} is not one this seapig_core can read: {problem}. Re-run the calibration."
        )
    version, digest = pointer.get("version"), pointer.get("manifest_sha256")
    if not isinstance(version, str) or _VERSION_ID.fullmatch(version) is None:
        raise ValueError(
            f"The bundle pointer {str(path)!r} has an invalid 'version' {version!r}: expected "
            f"'<YYYYMMDDTHHMMSSffffff>Z-<16 hex digits>'. Re-run the calibration."
        )
    if not isinstance(digest, str) or _SHA256.fullmatch(digest) is None or digest[:16] != version[-16:]:
        raise ValueError(
            f"The bundle pointer {str(path)!r} has a 'manifest_sha256' {digest!r} that does not belong to version "
            f"{version!r}. Re-run the calibration."
        )
    return pointer


def _current_version(root: Path) -> str | None:
    """The version the pointer names, or None when the pointer is missing or unreadable."""
    try:
        return str(_read_pointer(root)["version"])
    except ValueError:
        return None


def bundle_versions(path: str | os.PathLike[str]) -> list[str]:
    """The version ids present in bundle root ``path``, oldest first (temporaries excluded)."""
    versions = Path(path) / VERSIONS_DIR
    try:
        entries = list(os.scandir(versions))
    except OSError:
        return []
    return sorted(e.name for e in entries if _VERSION_ID.fullmatch(e.name) and e.is_dir(follow_symlinks=False))


def prune_versions(path: str | os.PathLike[str], *, keep_previous: int = DEFAULT_KEEP_PREVIOUS) -> list[str]:
    """Remove unreferenced old versions of bundle root ``path`` (and stale temporaries of dead writers).

    Kept: the current version (named by the pointer) and the ``keep_previous`` newest others.
    Any other version is removed only if an exclusive non-blocking ``flock`` on it succeeds
    (a reader loading it holds a shared one; it is skipped then) and, under the lock, the
    pointer still does not name it. It is renamed to an owned temporary name before it is
    deleted, so a reader never sees half a version. Nothing is pruned while the pointer is
    missing or unreadable. :meth:`SelectorBundle.save` calls this after each save; readers never
    do.

    Returns
    -------
    list of str
        The ids of the removed versions.
    """
    keep_previous = _check_keep_previous(keep_previous)
    root = Path(path)
    versions = root / VERSIONS_DIR
    sweep_stale_temporaries(versions)
    current = _current_version(root)
    if current is None:
        return []
    others = [v for v in bundle_versions(root) if v != current]
    removed: list[str] = []
    for version in others[: max(len(others) - keep_previous, 0)]:
        version_path = versions / version
        try:
            fd = os.open(version_path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        trash = None
        try:
            if not _flock(fd, shared=False, blocking=False) or not _same_directory(version_path, fd):
                continue  # being read (or already taken by another collector)
            if _current_version(root) in (version, None):
                continue  # the pointer moved to it (or became unreadable) meanwhile
            trash = versions / temporary_name(version)
            try:
                os.rename(version_path, trash)
            except OSError:
                trash = None
                continue
        finally:
            os.close(fd)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(version)
    return removed


# ----------------------------------------------------------------------------- loading


def _field(manifest: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in manifest:
        raise ValueError(f"{where} has no '{key}' field.")
    return manifest[key]


def _check_agrees(manifest: Mapping[str, Any], key: str, expected: Any, where: str, holder: str) -> None:
    value, expected = _field(manifest, key, where), _json_roundtrip(expected)
    if value != expected or isinstance(value, bool) != isinstance(expected, bool):  # JSON true is not 1
        raise ValueError(
            f"{where} disagrees with its score files: the field '{key}' is {value!r}, but {holder} holds "
            f"{expected!r}. A saved bundle is immutable and hand edits are refused: re-run the calibration "
            f"to change it."
        )


def _load_version(
    version_path: Path, pointer: Mapping[str, Any] | None = None, root: Path | None = None, *, include_logits: bool = True
) -> SelectorBundle:
    """Load one version directory (the caller holds its shared lock)."""
    manifest_path = version_path / MANIFEST_NAME
    where = f"The bundle manifest {str(manifest_path)!r}"
    manifest, digest = _read_manifest(manifest_path)
    if manifest.get("format") == BUNDLE_FORMAT and manifest.get("schema_version") == 1:
        raise ValueError(
            f"{str(version_path)!r} is a selector bundle of the old layout (schema version 1, {MANIFEST_NAME} at the "
            f"bundle root), which this seapig_core {__version__} no longer reads: it cannot tell which score files "
            f"belong to one save. Re-run the calibration to write it as a versioned bundle (schema version "
            f"{BUNDLE_SCHEMA_VERSION})."
        )
    problem = header_problem(manifest, BUNDLE_FORMAT, BUNDLE_SCHEMA_VERSION)
    if problem is not None:
        raise ValueError(
            f"{str(version_path)!r} is not a seapig_core selector bundle this version can read: {problem}. "
            f"Re-run the calibration flow to rebuild it."
        )
    entries = _field(manifest, "scores", where)
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where} must list its score files under 'scores'. Got {entries!r} instead.")
    scores: dict[str, LogitScore] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("name", "file", "sha256")):
            raise ValueError(f"{where} has a malformed 'scores' entry {entry!r}: expected name, file and sha256 strings.")
        name, file, sha = entry["name"], entry["file"], entry["sha256"]
        check_file_stem(file, "file")
        score_path = version_path / file
        if not score_path.is_file():
            raise ValueError(
                f"The score file {str(score_path)!r} named by {str(manifest_path)!r} is missing: the version is incomplete. "
                f"Re-run the calibration."
            )
        if file_sha256(score_path) != sha:
            raise ValueError(f"The score file {str(score_path)!r} does not match its SHA-256 in {str(manifest_path)!r}.")
        score = load_score(score_path) if include_logits else load_score(score_path, include_logits=False)
        holder = f"the score file {file!r}"
        if score.name != name:
            raise ValueError(f"{where} disagrees with its score files: 'scores' names {name!r}, but {holder} holds a {score.name!r} score.")
        _check_agrees(entry, "threshold", _as_float(score.threshold), f"{where} (score {name!r})", holder)
        if name in scores:
            raise ValueError(f"{where} lists the score {name!r} twice.")
        scores[name] = score
    first_file = repr(entries[0]["file"])
    primary = next(iter(scores.values()))
    for key, expected in (
        ("primary", primary.name),
        ("task", primary.task),
        ("per_member", primary.per_member),
        *((("confidence_head", primary.confidence_head),) if "confidence_head" in manifest or primary.confidence_head else ()),
        ("n_units", primary.n_units),
        ("threshold", _as_float(primary.threshold)),
        ("temperature", primary.T),
        ("risk_threshold", None if primary.risk_threshold is None else primary.risk_threshold.to_dict()),
        ("threshold_source", "quantile" if primary.risk_threshold is None else "risk"),
    ):
        _check_agrees(manifest, key, expected, where, f"the primary score file {first_file}")
    settings_data = _field(manifest, "settings", where)
    try:
        settings = None if settings_data is None else CalibrationSettings.from_dict(settings_data, "settings")
        bundle = SelectorBundle(
            scores=scores,
            q=_field(manifest, "q", where),
            calibration=dict(_field(manifest, "calibration", where) or {}),
            split=_field(manifest, "split", where),
            source=dict(_field(manifest, "source", where) or {}),
            library_version=str(_field(manifest, "library_version", where)),
            settings=settings,
            class_names=_field(manifest, "class_names", where),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where} is invalid: {exc}") from exc
    if settings is not None and settings.class_names != bundle.class_names:
        raise ValueError(f"{where} disagrees with itself: 'class_names' differs from 'settings.class_names'.")
    created = _field(manifest, "created", where)
    if not isinstance(created, str) or _VERSION_ID.fullmatch(f"{created}-{digest[:16]}") is None:
        raise ValueError(f"{where} has an invalid 'created' field {created!r}: expected 'YYYYMMDDTHHMMSSffffffZ'.")
    version = f"{created}-{digest[:16]}"
    if _VERSION_ID.fullmatch(version_path.name) and version_path.name != version:
        raise ValueError(
            f"{where} was modified after it was saved: its SHA-256 {digest[:16]}... no longer matches the version id "
            f"{version_path.name!r}. A saved bundle is immutable and hand edits are refused: re-run the calibration."
        )
    if pointer is not None and pointer.get("manifest_sha256") != digest:
        raise ValueError(
            f"{where} does not match the SHA-256 recorded by the bundle pointer {str((root or version_path) / POINTER_NAME)!r}: "
            f"it was modified after it was saved. Re-run the calibration."
        )
    bundle.version, bundle.version_path, bundle.manifest_sha256 = version, version_path, digest
    if root is None:
        parent = version_path.parent
        root = parent.parent if parent.name == VERSIONS_DIR and (parent.parent / POINTER_NAME).exists() else version_path
    bundle.path = root
    return bundle


def _load_current(root: Path, *, include_logits: bool = True) -> SelectorBundle:
    pointer_path = root / POINTER_NAME
    for _ in range(_LOAD_ATTEMPTS):
        pointer = _read_pointer(root)
        version = str(pointer["version"])
        version_path = root / VERSIONS_DIR / version
        with _reading(version_path) as present:
            if present:
                return _load_version(version_path, pointer, root, include_logits=include_logits)
        # Gone: collected after the pointer moved on (read the pointer again), or never there.
        if _current_version(root) == version:
            raise ValueError(
                f"The bundle pointer {str(pointer_path)!r} names the version {version!r}, which is missing from "
                f"{str(root / VERSIONS_DIR)!r}. Re-run the calibration to write a new version."
            )
    raise ValueError(
        f"The selector bundle {str(root)!r} changed {_LOAD_ATTEMPTS} times while it was being loaded; try again."
    )


def load_bundle(path: str | os.PathLike[str], *, include_logits: bool = True) -> SelectorBundle:
    """Load the current version of a selector bundle (or one version directory given directly).

    The pointer is read once and exactly the version it names is loaded, under a shared lock
    that keeps :func:`prune_versions` from removing it meanwhile (see the module docstring).

    Parameters
    ----------
    path : str or os.PathLike
        A bundle root (with ``current.json``) or a version directory (with ``manifest.json``).
    include_logits : bool, default True
        Materialise each score's stored calibration logits and labels (reports, risk
        thresholds). ``False`` reads only the calibration scores: everything scoring a query
        needs (score, select, drift statistics), without the memory of the logits (a
        1M x 100 float32 calibration set: 400 MB). Every file is still verified against its
        SHA-256.

    Returns
    -------
    SelectorBundle
        With ``path`` (the root), ``version``, ``version_path`` and ``manifest_sha256`` set.

    Raises
    ------
    ValueError
        Naming the file: a missing directory, pointer or version; an unreadable or malformed
        pointer or manifest (too deep, not an object, another format or schema version, the
        old layout); a score file that is missing or does not match its hash; a manifest that
        disagrees with its score files (naming the field) or was otherwise edited after saving.
    """
    directory = Path(path)
    if (directory / POINTER_NAME).exists():
        return _load_current(directory, include_logits=include_logits)
    if (directory / MANIFEST_NAME).is_file():
        with _reading(directory) as present:
            if present:
                return _load_version(directory, include_logits=include_logits)
        raise ValueError(f"The selector bundle version {str(directory)!r} was removed while it was being loaded.")
    detail = "does not exist"
    if directory.is_dir():
        detail = f"has no {POINTER_NAME}" + (f" (its {VERSIONS_DIR}/ has {len(bundle_versions(directory))} versions)" if (directory / VERSIONS_DIR).is_dir() else "")
    raise ValueError(
        f"The 'bundle' parameter must be a selector bundle directory with a {POINTER_NAME} (or a version directory "
        f"with a {MANIFEST_NAME}). Got {str(directory)!r}, which {detail}."
    )


#: Loaded bundles :func:`load_bundle_cached` keeps per process (the least recently used goes first).
BUNDLE_CACHE_SIZE = 8
_CACHE: OrderedDict[tuple[Any, ...], SelectorBundle] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def _version_signature(version_path: Path) -> tuple[Any, ...] | None:
    """The version directory's real path and the stat of every file in it; None if unreadable.

    A version is immutable, so this changes only if a file was replaced, edited or removed
    (then the version is loaded and verified again).
    """
    try:
        real = version_path.resolve(strict=True)
        files = []
        for entry in sorted(os.scandir(real), key=lambda e: e.name):
            st = entry.stat(follow_symlinks=False)
            files.append((entry.name, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns))
    except OSError:
        return None
    return (str(real), tuple(files))


def load_bundle_cached(path: str | os.PathLike[str], *, include_logits: bool = False) -> SelectorBundle:
    """:func:`load_bundle`, cached per process by the immutable version it resolves to.

    A bundle root's pointer is read on every call (so a new calibration is picked up at
    once); the version it names is loaded and verified once per process and then served from
    a small LRU cache (:data:`BUNDLE_CACHE_SIZE` versions) keyed by the version directory and
    the stat (size, mtime, inode, ctime) of each of its files: a file replaced or edited by
    hand makes the next call load and verify it again. Many batches of a run, or the tasks of
    a Dask worker, so load a bundle once. Lean by default (``include_logits=False``: the
    calibration logits are not materialised; see :func:`load_bundle`); a cached bundle loaded
    with its logits also serves lean requests.

    The returned object is shared between callers: treat it as read-only (do not set
    thresholds on its scores).

    Raises
    ------
    ValueError
        As :func:`load_bundle`.
    """
    directory = Path(path)
    version_path = directory
    if (directory / POINTER_NAME).exists():
        version_path = directory / VERSIONS_DIR / str(_read_pointer(directory)["version"])
    signature = _version_signature(version_path)
    if signature is not None:
        with _CACHE_LOCK:
            for key in ((signature, include_logits), (signature, True)):
                if key in _CACHE:
                    _CACHE.move_to_end(key)
                    return _CACHE[key]
    bundle = load_bundle(directory, include_logits=include_logits)
    loaded = _version_signature(bundle.version_path) if bundle.version_path is not None else None
    if loaded is not None:
        with _CACHE_LOCK:
            _CACHE[(loaded, include_logits)] = bundle
            _CACHE.move_to_end((loaded, include_logits))
            while len(_CACHE) > BUNDLE_CACHE_SIZE:
                _CACHE.popitem(last=False)
    return bundle


def clear_bundle_cache() -> None:
    """Empty the cache of :func:`load_bundle_cached` (e.g. in tests)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def bundle_fingerprint(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the manifest of the bundle's current version (or of a version directory): its identity.

    Cheap: reads the pointer and hashes that one manifest, checking it against the pointer;
    the score files are not verified (:func:`load_bundle` does that, and
    :func:`seapig_core.pipeline.content_fingerprint` is None for a bundle that does not load).

    Raises
    ------
    ValueError
        If ``path`` holds no pointer and no manifest, or the pointer's version is missing or
        its manifest was modified.
    """
    directory = Path(path)
    if (directory / POINTER_NAME).exists():
        pointer = _read_pointer(directory)
        manifest = directory / VERSIONS_DIR / str(pointer["version"]) / MANIFEST_NAME
        digest = _read_manifest(manifest)[1]
        if digest != pointer["manifest_sha256"]:
            raise ValueError(f"The bundle manifest {str(manifest)!r} was modified after it was saved: its SHA-256 differs from the pointer's.")
        return digest
    if (directory / MANIFEST_NAME).is_file():
        return file_sha256(directory / MANIFEST_NAME)
    raise ValueError(
        f"The 'path' parameter must be a selector bundle directory. No {POINTER_NAME} or {MANIFEST_NAME} in {str(path)!r}."
    )


def describe_bundle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a bundle (validating it, see :func:`load_bundle`) and return a small JSON summary of it."""
    bundle = load_bundle(path)
    return {
        "bundle_dir": str(bundle.path),
        "version": bundle.version,
        "version_path": str(bundle.version_path),
        "manifest_sha256": bundle.manifest_sha256,
        "library_version": bundle.library_version,
        "primary": bundle.primary_name,
        "scores": list(bundle.scores),
        "task": bundle.task,
        "n_units": bundle.n_units,
        "class_names": None if bundle.class_names is None else list(bundle.class_names),
        "q": bundle.q,
        "threshold": bundle.threshold,
        "threshold_source": bundle.threshold_source,
        "temperature": bundle.temperature,
        "expected_rejection_rate": bundle.expected_rejection_rate,
    }


# ----------------------------------------------------------------------------- fitting


def _finite_or_none(value: Any) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


def _index(values: Any, idx: np.ndarray) -> torch.Tensor:
    tensor = values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))
    return tensor[torch.from_numpy(idx)]


def fit_selector(
    logits: Any,
    labels: Any = None,
    settings: CalibrationSettings | Mapping[str, Any] | None = None,
    *,
    source: dict[str, Any] | None = None,
    **kwargs: Any,
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
    settings : CalibrationSettings or dict, optional
        Every calibration setting (see :class:`CalibrationSettings`); the defaults when None.
    source : dict, optional
        Provenance stored in the bundle.
    **kwargs
        The settings as keyword arguments instead (``scores=["softmax"], q=0.9, ...``), for
        callers that do not build a :class:`CalibrationSettings`; not together with ``settings``.

    Returns
    -------
    SelectorBundle
        Not saved yet (call :meth:`SelectorBundle.save`), with its ``settings`` and
        ``class_names``. Its ``calibration`` dict holds ``samples``, ``samples_temperature``,
        ``samples_threshold``, ``temperature``, ``temperature_at_bound``, ``threshold``,
        ``coverage`` (share of the threshold samples selected) and, with labels, ``accuracy``,
        ``nll_before``/``nll_after``, ``ece_before``/``ece_after``, ``brier_after``, ``aurc``,
        ``eaurc``, ``augrc`` and ``selective_risk`` (error rate among the selected threshold
        samples), all on the held-out samples; plus ``aurc`` and ``threshold`` per score under
        ``per_score``.

    Raises
    ------
    ValueError
        For invalid settings, a ``target_risk`` without labels, or (saying "infeasible") a
        target risk that no threshold meets.
    """
    from seapig_core import metrics
    from seapig_core.risk import split_calibration

    s = resolve_settings(settings, kwargs)
    names = list(s.scores)
    layout = {"task": s.task, "per_member": s.per_member, "confidence_head": s.confidence_head}
    if s.target_risk is not None and labels is None:
        raise ValueError("The 'target_risk' parameter needs labelled calibration logits. Got no 'labels'.")
    canon = canonicalize(logits, name="logits", require_finite=True, **layout)
    if labels is not None:
        check_labels(labels, canon, name="labels")
    n = canon.n_samples

    split = None
    X_thr, Y_thr = logits, labels
    primary = make_score(names[0], temperature=s.temperature, **layout)
    if labels is not None and s.temperature is None:
        first, second = split_calibration(n, fraction=s.split_fraction, seed=s.seed)
        primary.fit(_index(logits, first), _index(labels, first))  # the temperature split
        X_thr, Y_thr = _index(logits, second), _index(labels, second)
        split = {"fraction": s.split_fraction, "seed": s.seed, "samples_temperature": int(first.size), "samples_threshold": int(second.size)}
    temperature_fit = primary.temperature_fit

    # Every score is calibrated on the threshold split (with its labels, so the bundle can
    # redraw its evidence) at the primary's temperature.
    fitted: dict[str, LogitScore] = {names[0]: primary.calibrate(X_thr, Y_thr).set_threshold(s.q)}
    for name in names[1:]:
        score = make_score(name, temperature=primary.temperature, **layout)
        fitted[name] = score.calibrate(X_thr, Y_thr).set_threshold(s.q)
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
    per_score: dict[str, dict[str, Any]] = {name: {"threshold": float(sc.threshold)} for name, sc in fitted.items()}  # type: ignore[arg-type]
    if Y_thr is not None:
        # Validated once; every metric reads the same canonical layout (never re-validated).
        canon_thr = canonicalize(X_thr, name="logits", require_finite=True, **layout)
        y_thr = check_labels(Y_thr, canon_thr, name="labels")
        errors = metrics.prediction_errors(canon_thr, y_thr, temperature=T_used)
        calibration.update(
            accuracy=float(1.0 - errors.mean()),
            nll_before=metrics.negative_log_likelihood(canon_thr, y_thr, temperature=1.0),
            nll_after=metrics.negative_log_likelihood(canon_thr, y_thr, temperature=T_used),
            ece_before=float(metrics.expected_calibration_error(canon_thr, y_thr, temperature=1.0, n_bins=s.n_bins)),
            ece_after=float(metrics.expected_calibration_error(canon_thr, y_thr, temperature=T_used, n_bins=s.n_bins)),
            brier_after=float(metrics.brier_score(canon_thr, y_thr, temperature=T_used)),
        )
        for name, sc in fitted.items():
            rc = metrics.risk_coverage(sc.scores, errors)
            per_score[name].update(aurc=rc.aurc, eaurc=rc.eaurc, augrc=rc.augrc)
        calibration.update({k: per_score[names[0]][k] for k in ("aurc", "eaurc", "augrc")})
        if s.target_risk is not None:
            primary.set_risk_threshold(s.target_risk, s.delta, X=X_thr, Y=Y_thr, method=s.risk_method)
            per_score[names[0]]["threshold"] = float(primary.threshold)  # type: ignore[arg-type]
        selected = primary_scores < primary.threshold
        calibration["selective_risk"] = _finite_or_none(errors[selected].mean()) if selected.any() else None
    calibration["threshold"] = float(primary.threshold)  # type: ignore[arg-type]
    calibration["coverage"] = float(np.mean(primary_scores < primary.threshold))
    calibration["per_score"] = per_score
    # What the scores warned about while fitting (ties, saturation, a temperature at its bound,
    # nothing selected): kept in the manifest so the reports and the flow's logs show it.
    calibration["diagnostics"] = [
        {**item, "score": name} for name, sc in fitted.items() for item in sc.diagnostics
    ]
    return SelectorBundle(
        scores=fitted,
        q=s.q,
        calibration=calibration,
        split=split,
        source=dict(source or {}),
        settings=s,
        class_names=s.class_names,
    )
