"""Logit-based uncertainty scores: the seeds' public API.

Every class is a thin, stateful wrapper: settings in ``__init__``, state from :meth:`LogitScore.fit`,
and the maths in pure functions (:mod:`seapig_core.layout`, :mod:`seapig_core.kernels`,
:mod:`seapig_core.temperature`). Scores are ``(N,)`` tensors, **higher means more uncertain**
for every score and task, and a sample is selected when its score is below the threshold.

Supported logits (see :mod:`seapig_core.layout`):

- ``task="multiclass"``: ``(N, C)``, labels ``(N,)`` class indices;
- ``task="binary"``: one logit ``(N,)``/``(N, 1)`` or two logits ``(N, 2)``, labels ``(N,)`` 0/1;
- ``task="multilabel"``: ``(N, C)``, labels ``(N, C)`` 0/1;
- ``per_member=True``: a trailing member axis (ensembles, MC-dropout), ``(N, C, M)`` or
  ``(N, M)`` for single-logit binary; the score is computed per member and averaged;
- ``confidence_head=True``: the model also outputs a learned confidence, as one extra trailing
  logit (``(N, C + 1)``, ``(N, C + 1, M)``; see :mod:`seapig_core.layout`). Every score reads
  the class logits as above; :class:`ConfidenceScore` reads the confidence.

Examples
--------
>>> import torch
>>> from seapig_core.scores.logits import SoftmaxScore
>>> logits = torch.tensor([[4.0, 0.0, 0.0], [1.0, 0.9, 0.8]])
>>> SoftmaxScore().score(logits)
tensor([-0.9647, -0.3672])
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from matplotlib.figure import Figure

from seapig_core._validation import check_bool, check_open_unit, check_temperature
from seapig_core.kernels import KERNELS, PassOutputs, ScoreKernel, _run_pass
from seapig_core.layout import CanonicalLogits, canonicalize, check_labels, check_task
from seapig_core.scores import state_file
from seapig_core.scores.thresholds import (
    emit,
    nothing_selected_diagnostic,
    quantile_threshold,
    saturation_diagnostic,
    temperature_diagnostic,
)
from seapig_core.temperature import T_MAX, T_MIN, TemperatureFit, fit_temperature

if TYPE_CHECKING:
    from seapig_core.risk import RiskThreshold

__all__ = [
    "SCORES",
    "CertaintyRatioScore",
    "ConfidenceScore",
    "EnergyScore",
    "EntropyScore",
    "LogitScore",
    "MarginScore",
    "MaxLogitScore",
    "ProbabilityMarginScore",
    "SoftmaxScore",
    "make_score",
]


class LogitScore:
    """Base class of the logit-based uncertainty scores.

    Parameters
    ----------
    temperature : float or None, default None
        Temperature ``T`` that divides the logits. If None, ``T = 1`` until :meth:`fit` is
        given labels, which fits ``T`` by minimising the NLL. A given temperature is kept
        unless labels are passed to :meth:`fit`.
    task : {"multiclass", "binary", "multilabel"}, default "multiclass"
        The classification task; fixes the accepted logit shapes and the score's formula.
    per_member : bool, default False
        Logits carry a trailing member axis (ensembles, MC-dropout). The score is computed per
        member and averaged; the temperature is fitted on all members.
    confidence_head : bool, default False
        The logits' last unit is a learned confidence head's logit (``(N, C + 1)``; see
        :mod:`seapig_core.layout`): it is split off, and the score, the temperature and the
        predictions read the ``C`` class logits. :class:`ConfidenceScore` scores the confidence.

    Attributes
    ----------
    logits : torch.Tensor or None
        Calibration logits from :meth:`fit`.
    labels : torch.Tensor or None
        Calibration labels from :meth:`fit` (canonical: int64 indices or float 0/1 targets).
    scores : torch.Tensor or None
        Calibration scores, ``(N,)``.
    temperature : float or None
        The temperature in use (``None`` means 1).
    temperature_fit : TemperatureFit or None
        NLL before and after, iterations, whether a bound was hit; set when labels were fitted.
    threshold : float or None
        Rejection threshold: a sample is selected when its score is below it.
    quantile : float or None
        The ``q`` that produced :attr:`threshold`.
    n_units : int or None
        Logits per sample (classes, labels, or 1 for single-logit binary) seen by :meth:`fit`,
        the confidence unit not counted; query logits must match it.
    risk_threshold : RiskThreshold or None
        Set by :meth:`set_risk_threshold`: the threshold with its bound on the selective risk,
        the coverage reached and the settings (see :class:`seapig_core.risk.RiskThreshold`).
    diagnostics : list of dict
        Why the fit or the threshold does not work as asked: a temperature on a bound of its
        search, ties (e.g. a saturated float32 softmax score) that keep the coverage more than a
        point from ``q``, a threshold that selects no calibration sample. Each is a dict with
        ``code``, ``message`` (the cause and the remedy) and ``severity``, and was issued as a
        :class:`~seapig_core.scores.thresholds.SelectionWarning` (see
        :mod:`seapig_core.scores.thresholds`).

    Notes
    -----
    **Split protocol.** Fitting the temperature and choosing the threshold on the same labelled
    samples biases both. Split the labelled data with :func:`seapig_core.risk.split_calibration`,
    fit the temperature on one part, and make the other the calibration set with
    :meth:`calibrate` (``score.fit(X_a, Y_a).calibrate(X_b, Y_b)``), whose scores then set the
    threshold and the metrics. For a one-off threshold, :meth:`set_threshold` and
    :meth:`set_risk_threshold` also take logits ``X`` (and labels ``Y``), scored at the fitted
    temperature, instead of the calibration set.

    Examples
    --------
    Temperature on one half, a threshold with at most 10% selective risk (with probability at
    least 95%) on the other:

    >>> import torch
    >>> from seapig_core.risk import split_calibration
    >>> from seapig_core.scores import SoftmaxScore
    >>> g = torch.Generator().manual_seed(0)
    >>> labels = torch.randint(0, 10, (4000,), generator=g)
    >>> logits = 2.0 * torch.randn(4000, 10, generator=g)
    >>> logits[torch.arange(4000), labels] += 4.0
    >>> temperature_part, threshold_part = split_calibration(len(labels), fraction=0.5, seed=0)
    >>> score = SoftmaxScore().fit(logits[temperature_part], labels[temperature_part])
    >>> score = score.set_risk_threshold(
    ...     0.1, delta=0.05, X=logits[threshold_part], Y=labels[threshold_part]
    ... )
    >>> score.risk_threshold.risk_bound <= 0.1 < score.risk_threshold.coverage
    True
    >>> selected = score.select(logits)["selected"]  # score < score.threshold

    Or a coverage quantile of the threshold part: ``score.set_threshold(0.9, X=logits[threshold_part])``.
    """

    #: Registry name of the score, e.g. ``"softmax"``.
    name: ClassVar[str] = ""
    #: The value where the score saturates in floating point at the confident end (ties pile
    #: up there when probabilities round to 0 or 1); None for scores that do not saturate.
    saturation: ClassVar[float | None] = None
    #: Whether the score reads a learned confidence head (it then needs ``confidence_head=True``).
    reads_confidence: ClassVar[bool] = False
    #: What a saturation diagnostic recommends instead of the default remedy (None: the default,
    #: a non-saturating score, float64 logits or a larger temperature).
    _saturation_remedy: ClassVar[str | None] = None

    @property
    def _message_temperature(self) -> float | None:
        """The temperature diagnostics name (None where the score does not depend on it)."""
        return self.T

    def __init__(
        self,
        temperature: float | None = None,
        task: str = "multiclass",
        per_member: bool = False,
        confidence_head: bool = False,
    ) -> None:
        self.temperature = check_temperature(temperature, allow_none=True)
        self.task = check_task(task)
        self.per_member = check_bool(per_member, "per_member")
        self.confidence_head = check_bool(confidence_head, "confidence_head")
        self.logits: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.temperature_fit: TemperatureFit | None = None
        self.threshold: float | None = None
        self.quantile: float | None = None
        self.n_units: int | None = None
        self.risk_threshold: RiskThreshold | None = None
        self._fit_diagnostics: list[dict[str, str]] = []
        self._threshold_diagnostics: list[dict[str, str]] = []

    # ------------------------------------------------------------------ settings and state

    @property
    def T(self) -> float:
        """The temperature in use: :attr:`temperature`, or 1 when it is None."""
        return 1.0 if self.temperature is None else float(self.temperature)

    @property
    def kernel(self) -> ScoreKernel:
        """The pure score function pair of this class."""
        return KERNELS[self.name]

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` has stored calibration scores."""
        return self.scores is not None

    @property
    def diagnostics(self) -> list[dict[str, str]]:
        """Diagnostics of the fit and of the current threshold (see the class docstring); a copy."""
        return [dict(item) for item in (*self._fit_diagnostics, *self._threshold_diagnostics)]

    def __repr__(self) -> str:
        args = [f"temperature={self.temperature!r}", f"task={self.task!r}"]
        if self.per_member:
            args.append("per_member=True")
        if self.confidence_head:
            args.append("confidence_head=True")
        return f"{type(self).__name__}({', '.join(args)})"

    @property
    def layout(self) -> dict[str, Any]:
        """``task``, ``per_member`` and ``confidence_head``: the keyword arguments of
        :func:`seapig_core.layout.canonicalize` that validate logits for this score."""
        return {"task": self.task, "per_member": self.per_member, "confidence_head": self.confidence_head}

    @property
    def class_logits(self) -> torch.Tensor | None:
        """The calibration logits without the confidence unit (the same as :attr:`logits`
        without a confidence head), in the caller's layout; None before :meth:`fit`.

        What functions that know nothing of confidence heads take with this score's ``task``
        and ``per_member`` (metrics, reliability plots).
        """
        if self.logits is None or not self.confidence_head:
            return self.logits
        return canonicalize(self.logits, name="logits", **self.layout).class_logits()

    # ------------------------------------------------------------------ fitting

    def fit(
        self,
        X: Any = None,
        Y: Any = None,
        model: Any = None,
        loader: Any = None,
        outdir: str | Path | None = None,
        prefix: str | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> LogitScore:
        """Fit the score on reference (calibration) logits.

        Two modes, exactly one of which must be used:

        1. Precomputed logits: ``X`` (and optionally labels ``Y``).
        2. Extraction: a ``model`` with a ``.logits(x)`` method and a ``loader``
           (``torch.utils.data.DataLoader``); labels are taken from the batches when present.
           A model whose ``.logits(x)`` returns ``(logits, confidence_logit)`` (a learned
           confidence head) needs a score with ``confidence_head=True``, and the reverse.
           With ``outdir`` and ``prefix`` the logits are cached on disk (see
           :func:`seapig_core.extract.extract_logits`, which receives any extra keyword
           arguments, e.g. ``progress=False`` or ``refresh=True``).

        Parameters
        ----------
        X : torch.Tensor or numpy.ndarray, optional
            Calibration logits; finite. Shape depends on the task (see the module docstring).
        Y : torch.Tensor or numpy.ndarray, optional
            Labels for ``X``. When given (or found in the loader's batches) the temperature is
            fitted by minimising the task's NLL, replacing a constructor temperature.
        model : torch.nn.Module, optional
            Model with ``.logits(x)``; requires ``loader``.
        loader : torch.utils.data.DataLoader, optional
            Batches for ``model``.
        outdir : str or Path, optional
            Cache directory for extracted logits (extraction mode only).
        prefix : str, optional
            File-name stem of the cache entry (extraction mode only).

        Returns
        -------
        self

        Raises
        ------
        ValueError
            Both or neither mode; ``Y``/``outdir``/``prefix`` given in the wrong mode; invalid,
            empty or non-finite logits; invalid labels.
        TemperatureFitError
            If the temperature optimiser does not converge.

        Warns
        -----
        SelectionWarning
            When the fitted temperature lies on a bound of its search interval (e.g. logits that
            separate few labelled samples perfectly pin it at ``T_MIN``); also kept in
            :attr:`diagnostics`.
        """
        extract_mode = model is not None or loader is not None
        if X is not None and extract_mode:
            raise ValueError(
                "fit() takes either precomputed logits 'X' or 'model' and 'loader', not both. "
                "Got X and model/loader instead."
            )
        if X is None and not extract_mode:
            raise ValueError("fit() needs precomputed logits 'X' or a 'model' and a 'loader'. Got neither.")
        if extract_mode:
            if model is None or loader is None:
                missing = "model" if model is None else "loader"
                raise ValueError(f"fit() in extraction mode needs both 'model' and 'loader'. Got no '{missing}'.")
            if Y is not None:
                raise ValueError(
                    "The 'Y' parameter is only used with precomputed logits 'X'; with a model and "
                    "loader, labels come from the batches. Got Y together with model/loader instead."
                )
            if args:
                raise TypeError(f"fit() got {len(args)} unexpected positional argument(s).")
            from seapig_core.extract import extract_logits

            extraction = extract_logits(model, loader, outdir=outdir, prefix=prefix, **kwargs)
            if extraction.confidence_head != self.confidence_head:
                given = "returns" if extraction.confidence_head else "does not return"
                raise ValueError(
                    f"The 'model' parameter {given} a confidence logit beside its logits, but the score was "
                    f"built with confidence_head={self.confidence_head}. Build it with "
                    f"confidence_head={extraction.confidence_head}"
                    f"{' (e.g. ConfidenceScore)' if extraction.confidence_head else ''}."
                )
            X, Y = extraction.logits, extraction.labels
        else:
            unexpected = [*(f"positional #{i + 7}" for i in range(len(args))), *kwargs]
            if unexpected:
                raise TypeError(f"fit() got unexpected argument(s): {', '.join(unexpected)}.")
            if outdir is not None or prefix is not None:
                raise ValueError(
                    "The 'outdir' and 'prefix' parameters only apply with 'model' and 'loader'. "
                    "Got them with precomputed logits 'X' instead."
                )

        # Validated once; the temperature fit and the scores read the same canonical logits.
        canon = canonicalize(X, name="X", require_finite=True, **self.layout)
        labels = None if Y is None else check_labels(Y, canon, name="Y")
        self._fit_diagnostics = []
        if labels is not None:
            fit = fit_temperature(canon, labels)
            self.temperature_fit = fit
            self.temperature = fit.temperature
            found = temperature_diagnostic(fit.temperature, fit.at_bound, (T_MIN, T_MAX), canon.n_samples, canon.n_classes)
            if found is not None:
                self._fit_diagnostics.append(found)
                emit([found], stacklevel=3)
        self._store_calibration(canon, labels)
        return self

    def calibrate(self, X: Any, Y: Any = None) -> LogitScore:
        """Replace the calibration set with ``X`` (and ``Y``), scored at the current temperature.

        Unlike :meth:`fit`, labels never refit the temperature: this is the second half of the
        split protocol, ``score.fit(X_a, Y_a).calibrate(X_b, Y_b).set_threshold(q)``, where the
        temperature comes from one labelled split and the calibration scores, threshold and
        metrics from another (see the class docstring). It also serves a score built with a
        known temperature, ``SoftmaxScore(temperature=1.7).calibrate(X, Y)``.

        Parameters
        ----------
        X : torch.Tensor or numpy.ndarray
            Finite calibration logits; after :meth:`fit`, with the fitted number per sample.
        Y : torch.Tensor or numpy.ndarray, optional
            Their labels, kept for :meth:`set_risk_threshold` and the metrics.

        Returns
        -------
        self
            Any threshold is dropped: it belonged to the previous calibration set.
        """
        canon = canonicalize(X, name="X", n_units=self.n_units, require_finite=True, **self.layout)
        labels = None if Y is None else check_labels(Y, canon, name="Y")
        self._store_calibration(canon, labels)
        return self

    def _store_calibration(self, canon: CanonicalLogits, labels: torch.Tensor | None) -> None:
        self.logits = canon.input_logits()
        self.labels = labels
        self.n_units = canon.n_units
        self.scores = self._scores(canon)
        # A new calibration set invalidates a threshold taken from the old one.
        self.threshold = self.quantile = None
        self.risk_threshold = None
        self._threshold_diagnostics = []

    # ------------------------------------------------------------------ scoring

    def _canonical_query(self, query_logits: Any, name: str = "query_logits") -> CanonicalLogits:
        """Query logits validated once (shape, class count); zero samples are allowed."""
        return canonicalize(query_logits, name=name, n_units=self.n_units, allow_empty=True, **self.layout)

    def _pass(self, canon: CanonicalLogits, *, prediction: bool = False, runner: bool = False) -> PassOutputs:
        """This score (and labels) in one pass (:func:`seapig_core.kernels.score_pass`)."""
        return _run_pass(canon, [self.name], self.T, prediction=prediction, runner=runner, ratio=False)

    def _scores(self, canon: CanonicalLogits) -> torch.Tensor:
        return self._pass(canon).scores[self.name]

    def score(self, query_logits: Any) -> torch.Tensor:
        """Uncertainty score of each sample; higher means more uncertain.

        Parameters
        ----------
        query_logits : torch.Tensor or numpy.ndarray
            Logits shaped for the task; with the fitted number of logits per sample.

        Returns
        -------
        torch.Tensor
            ``(N,)`` scores in the logits' float dtype (float32 for half precision or integers);
            NaN for a sample with any non-finite logit; empty ``(0,)`` for zero samples.
        """
        return self._scores(self._canonical_query(query_logits))

    def predict(self, query_logits: Any) -> torch.Tensor:
        """Predicted labels (see :func:`seapig_core.kernels.predict`); -1 for non-finite samples."""
        return self._pass(self._canonical_query(query_logits), prediction=True).prediction

    def select(self, query_logits: Any) -> dict[str, torch.Tensor]:
        """Select samples whose score is below the threshold.

        If calibration scores exist but no threshold was set, the threshold is set at
        ``q=0.99`` with a warning. A sample with a non-finite logit is never selected.

        Returns
        -------
        dict[str, torch.Tensor]
            ``"score"``: ``(N,)`` scores; ``"selected"``: ``(N,)`` bool, True = predict (empty
            for zero samples). The logits are validated and read once.

        Raises
        ------
        ValueError
            If there is neither a threshold nor calibration scores.
        """
        if self.threshold is None:
            if self.scores is None:
                raise ValueError("select() needs a threshold: call fit() and set_threshold(q) first.")
            warnings.warn(
                f"{type(self).__name__} has no threshold; setting it with set_threshold(q=0.99).",
                UserWarning,
                stacklevel=2,
            )
            self.set_threshold(0.99)
        canon = self._canonical_query(query_logits)
        outputs = self._pass(canon, runner=self._select_runner_up)
        scores = outputs.scores[self.name]
        result = {"score": scores, "selected": scores < self.threshold}  # NaN < t is False
        result.update(self._extra_outputs(outputs))
        return result

    #: Whether :meth:`select` also returns the runner-up label (see :meth:`_extra_outputs`).
    _select_runner_up: ClassVar[bool] = False

    def _extra_outputs(self, outputs: PassOutputs) -> dict[str, torch.Tensor]:
        """Per-sample outputs a subclass adds to :meth:`select`, from the same pass."""
        return {}

    # ------------------------------------------------------------------ thresholds

    def set_threshold(self, q: float = 0.99, X: Any = None) -> LogitScore:
        """Set the threshold at the ``q``-quantile of the calibration scores (NaN-aware).

        About a fraction ``q`` of calibration samples then score below the threshold and
        would be selected.

        Parameters
        ----------
        q : float, default 0.99
            Quantile in the open interval (0, 1).
        X : torch.Tensor or numpy.ndarray, optional
            Finite logits to take the quantile of instead of the calibration scores, scored at
            the current temperature: the split protocol (see the class docstring), e.g. the
            temperature fitted on one labelled split and the threshold set on another.

        Returns
        -------
        self

        Raises
        ------
        ValueError
            If ``q`` is not in (0, 1) or is NaN, no calibration scores are available (and no
            ``X``), or ``X`` is invalid.

        Warns
        -----
        SelectionWarning
            When the achieved coverage differs from ``q`` by more than one point (ties, e.g. a
            softmax score saturated at -1.0 in float32; or too few samples), or nothing is
            selected; also kept in :attr:`diagnostics`.

        Notes
        -----
        Tied scores cannot be split. When the quantile falls on a tied group, the threshold is
        the group's value (rejecting it) or the next representable value above it (selecting
        it), whichever coverage is closer to ``q``, and never the one that selects nothing
        while the other selects something (see :func:`seapig_core.scores.thresholds.quantile_threshold`).
        Otherwise it is the plain (NaN-aware) quantile. The threshold is a value of the scores'
        dtype.
        """
        q = check_open_unit(q, "q")
        if X is not None:
            canon = canonicalize(X, name="X", n_units=self.n_units, require_finite=True, **self.layout)
            scores = self._scores(canon)
        elif self.scores is None:
            raise ValueError("set_threshold() needs calibration scores: call fit() first.")
        else:
            scores = self.scores
        choice = quantile_threshold(
            scores, q, score_name=self.name, saturation=self.saturation, temperature=self._message_temperature,
            remedy=self._saturation_remedy,
        )
        self.threshold = choice.threshold
        self.quantile = q
        self.risk_threshold = None
        self._threshold_diagnostics = list(choice.diagnostics)
        emit(choice.diagnostics, stacklevel=3)
        return self

    def set_risk_threshold(
        self,
        target_risk: float,
        delta: float = 0.05,
        X: Any = None,
        Y: Any = None,
        *,
        method: str = "sgr",
    ) -> LogitScore:
        """Set the threshold with the largest coverage whose selective risk is guaranteed.

        Chooses, on labelled logits, the threshold whose selective risk (the error rate of the
        selected samples, on new data from the same distribution) is at most ``target_risk``
        with probability at least ``1 - delta``, and the largest coverage among those
        (Selection with Guaranteed Risk, Geifman and El-Yaniv 2017; see
        :func:`seapig_core.risk.guaranteed_risk_threshold`). The loss is the 0-1 loss of
        :meth:`predict` (:func:`seapig_core.metrics.prediction_errors`; multilabel: a sample is
        wrong when any label is).

        Parameters
        ----------
        target_risk : float
            In (0, 1).
        delta : float, default 0.05
            In (0, 1).
        X, Y : torch.Tensor or numpy.ndarray, optional
            Labelled finite logits, scored at the current temperature: the split protocol (see
            the class docstring). Both or neither; by default the calibration logits and labels
            of :meth:`fit`, which then also fitted the temperature (biased; prefer a split).
        method : {"sgr", "ltt"}, default "sgr"
            ``"sgr"``: Selection with Guaranteed Risk (a binary search of a Clopper-Pearson bound);
            ``"ltt"``: Learn-then-Test with fixed-sequence testing from the most confident side,
            which does not assume the bound is monotone in coverage (see :mod:`seapig_core.risk`
            for when to choose which).

        Returns
        -------
        self
            With :attr:`threshold` and :attr:`risk_threshold` set, :attr:`quantile` None.

        Raises
        ------
        ValueError
            For ``target_risk``/``delta`` outside (0, 1); ``X`` without ``Y`` or the reverse; no
            labelled calibration data; invalid logits or labels; and, with the word
            "infeasible", when no threshold meets the target.
        """
        from seapig_core.metrics import prediction_errors
        from seapig_core.risk import guaranteed_risk_threshold

        target_risk = check_open_unit(target_risk, "target_risk")
        delta = check_open_unit(delta, "delta")
        if (X is None) != (Y is None):
            given, missing = ("X", "Y") if Y is None else ("Y", "X")
            raise ValueError(
                f"set_risk_threshold() needs both logits 'X' and labels 'Y', or neither. "
                f"Got '{given}' without '{missing}' instead."
            )
        if X is None:
            if self.logits is None:
                raise ValueError(
                    "set_risk_threshold() needs labelled logits: call fit(X, Y) first (with include_logits "
                    "when loading a saved score), or pass X and Y."
                )
            if self.labels is None:
                raise ValueError(
                    "set_risk_threshold() needs labels: the calibration set was fitted without 'Y'. "
                    "Call fit(X, Y) or pass X and Y."
                )
            X, Y = self.logits, self.labels
        canon = canonicalize(X, name="X", n_units=self.n_units, require_finite=True, **self.layout)
        labels = check_labels(Y, canon, name="Y")
        scores = self._scores(canon)
        errors = prediction_errors(canon, labels, temperature=self.T)
        result = guaranteed_risk_threshold(scores, errors, target_risk, delta, method=method)
        self.threshold = result.threshold
        self.quantile = None
        self.risk_threshold = result
        found = [
            saturation_diagnostic(
                scores, self.name, self.saturation, self._message_temperature, remedy=self._saturation_remedy
            )
        ]
        if result.n_selected == 0:
            found.append(nothing_selected_diagnostic(self.name, result.threshold, result.n_samples))
        self._threshold_diagnostics = [item for item in found if item is not None]
        emit(self._threshold_diagnostics, stacklevel=3)
        return self

    def get_threshold(self) -> float | None:
        """The current threshold, or None if none is set."""
        return self.threshold

    # ------------------------------------------------------------------ plots

    def plot(self, query_scores: Any = None, bins: int = 100) -> Figure:
        """Density plot of the calibration scores (and ``query_scores``) with the threshold.

        Parameters
        ----------
        query_scores : torch.Tensor or numpy.ndarray, optional
            Scores of query samples, e.g. ``score.score(query_logits)``.
        bins : int, default 100
            Histogram bins shared by both densities.

        Returns
        -------
        matplotlib.figure.Figure
            Never shown; display it in a notebook or save it with ``fig.savefig``.
        """
        if self.scores is None:
            raise ValueError("plot() needs calibration scores: call fit() first.")
        from seapig_core.plotting import plot_score_density

        return plot_score_density(
            self.scores,
            query_scores,
            threshold=self.threshold,
            bins=bins,
            title=f"{type(self).__name__} (T = {self.T:.3g}, task = {self.task})",
            score_name=f"{self.name} score",
            score=self.name,
        )

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Settings and fitted state as a JSON-able dict (no tensors).

        Returns
        -------
        dict
            ``class``, ``name``, ``settings`` (the constructor's arguments) and ``state``
            (``threshold``, ``quantile``, ``n_units``, ``temperature_fit``, ``risk_threshold``,
            ``diagnostics``, and ``logits_shape``, the calibration logits' shape, or None).
            The calibration tensors are :meth:`calibration_tensors`; both together rebuild the
            score with :meth:`from_state_dict`.
        """
        fit, risk = self.temperature_fit, self.risk_threshold
        return {
            "class": type(self).__name__,
            "name": self.name,
            "settings": {
                "temperature": self.temperature,
                "task": self.task,
                "per_member": self.per_member,
                "confidence_head": self.confidence_head,
            },
            "state": {
                "threshold": self.threshold,
                "quantile": self.quantile,
                "n_units": self.n_units,
                "temperature_fit": None if fit is None else fit.to_dict(),
                "risk_threshold": None if risk is None else risk.to_dict(),
                "diagnostics": self.diagnostics,
                "logits_shape": None if self.logits is None else list(self.logits.shape),
            },
        }

    def calibration_tensors(self) -> dict[str, torch.Tensor | None]:
        """The calibration tensors: ``scores``, ``logits`` and ``labels`` (each may be None)."""
        return {"scores": self.scores, "logits": self.logits, "labels": self.labels}

    @classmethod
    def from_state_dict(
        cls,
        state: dict[str, Any],
        scores: Any = None,
        logits: Any = None,
        labels: Any = None,
    ) -> LogitScore:
        """Rebuild a score from :meth:`state_dict` and (optionally) its calibration tensors.

        Parameters
        ----------
        state : dict
            As returned by :meth:`state_dict` (e.g. read back from JSON). Missing ``state``
            entries mean "not set", so states of earlier versions load.
        scores : torch.Tensor, optional
            Calibration scores ``(N,)``.
        logits : torch.Tensor, optional
            Calibration logits, in the shape ``state["state"]["logits_shape"]`` or flattened to
            ``(N, K * M)``. Leave out (with ``labels``) to load a score that only selects.
        labels : torch.Tensor, optional
            Canonical calibration labels (see :func:`seapig_core.layout.check_labels`).

        Returns
        -------
        LogitScore
            An instance of the class named by ``state["name"]``, which must be ``cls`` or a
            subclass.

        Raises
        ------
        ValueError
            For an unknown score, a class other than ``cls``, malformed settings or state, or
            tensors that do not fit the state (TypeError for wrong types).
        """
        if not isinstance(state, dict):
            raise TypeError(f"The 'state' parameter must be a dict. Got {type(state).__name__} instead.")
        name = state.get("name")
        if name not in SCORES:
            raise ValueError(f"The 'state' parameter names an unknown score {name!r}; known: {sorted(SCORES)}.")
        score_cls = SCORES[name]
        if not issubclass(score_cls, cls):
            raise ValueError(f"The 'state' parameter holds a {score_cls.__name__}, not a {cls.__name__}.")
        settings, fitted = state.get("settings") or {}, state.get("state") or {}
        if not isinstance(settings, dict) or not isinstance(fitted, dict):
            raise ValueError("The 'state' parameter must hold 'settings' and 'state' objects.")
        unknown = set(settings) - {"temperature", "task", "per_member", "confidence_head"}
        if unknown:
            raise ValueError(f"The 'state' parameter has unknown settings {sorted(unknown)}.")
        score = score_cls(**settings)
        score.threshold = _optional_float(fitted.get("threshold"), "threshold")
        quantile = fitted.get("quantile")
        score.quantile = None if quantile is None else check_open_unit(quantile, "quantile")
        n_units = fitted.get("n_units")
        if n_units is not None and (isinstance(n_units, bool) or not isinstance(n_units, int) or n_units < 1):
            raise ValueError(f"The state's 'n_units' must be a positive integer or None. Got {n_units!r} instead.")
        score.n_units = n_units
        try:
            if fitted.get("temperature_fit") is not None:
                score.temperature_fit = TemperatureFit(**fitted["temperature_fit"])
            if fitted.get("risk_threshold") is not None:
                from seapig_core.risk import RiskThreshold

                score.risk_threshold = RiskThreshold(**fitted["risk_threshold"])
        except TypeError as exc:
            raise ValueError(f"The 'state' parameter has a malformed temperature_fit or risk_threshold: {exc}") from exc
        diagnostics = fitted.get("diagnostics") or []
        if not isinstance(diagnostics, list) or not all(
            isinstance(item, dict) and all(isinstance(item.get(key), str) for key in ("code", "message", "severity"))
            for item in diagnostics
        ):
            raise ValueError("The state's 'diagnostics' must be a list of {'code', 'message', 'severity'} strings.")
        # The temperature's diagnostics belong to the fit, the others to the threshold.
        score._fit_diagnostics = [dict(i) for i in diagnostics if i["code"] in _FIT_CODES]
        score._threshold_diagnostics = [dict(i) for i in diagnostics if i["code"] not in _FIT_CODES]
        score._restore_tensors(scores, logits, labels, fitted.get("logits_shape"))
        return score

    def _restore_tensors(self, scores: Any, logits: Any, labels: Any, logits_shape: Any) -> None:
        if scores is None:
            if logits is not None or labels is not None:
                raise ValueError("Calibration logits and labels need their calibration 'scores'.")
            return
        if not isinstance(scores, torch.Tensor) or scores.ndim != 1 or not scores.is_floating_point():
            raise ValueError(f"The 'scores' parameter must be a 1-D float tensor. Got {_describe(scores)} instead.")
        n = int(scores.shape[0])
        if logits is not None:
            if not isinstance(logits, torch.Tensor) or logits.ndim < 1 or int(logits.shape[0]) != n:
                raise ValueError(
                    f"The 'logits' parameter must be a tensor with one row per score ({n}). Got {_describe(logits)} instead."
                )
            if logits_shape is not None and tuple(logits.shape) != tuple(logits_shape):
                if not (isinstance(logits_shape, list) and math.prod(logits_shape) == logits.numel()):
                    raise ValueError(
                        f"The 'logits' parameter ({_describe(logits)}) does not fit the state's logits_shape {logits_shape!r}."
                    )
                logits = logits.reshape(logits_shape)
            canon = canonicalize(logits, name="logits", n_units=self.n_units, **self.layout)
            self.logits = canon.input_logits()
            if labels is not None:
                self.labels = check_labels(labels, canon, name="labels")
        elif labels is not None:
            if not isinstance(labels, torch.Tensor) or int(labels.shape[0]) != n:
                raise ValueError(f"The 'labels' parameter must have one row per score ({n}). Got {_describe(labels)} instead.")
            self.labels = labels
        self.scores = scores

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path, *, include_logits: bool = True) -> Path:
        """Save settings and state to one schema-versioned Arrow IPC file (no pickle).

        See :mod:`seapig_core.scores.state_file` for the format and
        :func:`seapig_core.persistence.save_score`.

        Parameters
        ----------
        path : str or Path
            Destination file; its directory must exist. Replaced atomically.
        include_logits : bool, default True
            Store the calibration logits (needed to refit a threshold with labels, e.g.
            ``set_risk_threshold``; scores, threshold and selection do not need them).
        """
        tensors = self.calibration_tensors()
        state = self.state_dict()
        if not include_logits:
            tensors["logits"] = None
            state["state"]["logits_shape"] = None
        return state_file.write_state(path, state, **tensors)

    @classmethod
    def load(cls, path: str | Path, *, include_logits: bool = True) -> LogitScore:
        """Load a score saved with :meth:`save`; the file's class must be ``cls`` or a subclass.

        With ``include_logits=False`` the calibration logits and labels are not read (the score
        scores, selects and re-thresholds by quantile, but cannot :meth:`set_risk_threshold`).
        """
        state, tensors = state_file.read_state(path, include_logits=include_logits)
        name = state.get("name")
        if name in SCORES and not issubclass(SCORES[name], cls):
            raise ValueError(f"{str(path)!r} holds a {SCORES[name].__name__}, not a {cls.__name__}.")
        try:
            return cls.from_state_dict(state, **tensors)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{str(path)!r} holds an invalid score: {exc}") from exc


#: Diagnostic codes of the fit (kept by :meth:`LogitScore.calibrate`); the others belong to a threshold.
_FIT_CODES = frozenset({"temperature_at_bound"})


def _optional_float(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"The state's {name!r} must be a finite number or None. Got {value!r} instead.")
    return float(value)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"a {type(value).__name__}"


class SoftmaxScore(LogitScore):
    """Maximum softmax probability (MSP), negated.

    ``-max_k softmax(z / T)_k`` for multiclass and two-logit binary; ``-sigmoid(|z| / T)`` for
    single-logit binary; ``-min_c max(p_c, 1 - p_c)`` with ``p = sigmoid(z / T)`` for
    multilabel (the least confident label). In ``[-1, -1/K]``.

    Reference: Hendrycks and Gimpel, "A Baseline for Detecting Misclassified and
    Out-of-Distribution Examples in Neural Networks", ICLR 2017.

    Examples
    --------
    >>> import torch
    >>> SoftmaxScore(task="binary").score(torch.tensor([3.0, 0.0]))
    tensor([-0.9526, -0.5000])
    """

    name = "softmax"
    saturation = -1.0


class EntropyScore(LogitScore):
    """Predictive entropy of ``softmax(z / T)``, in nats.

    Binary: the Bernoulli entropy; multilabel: the largest per-label Bernoulli entropy. In
    ``[0, log K]`` (``[0, log 2]`` for Bernoulli outputs). Computed from logit differences with
    the non-top terms summed on their own, so near-certain samples keep distinct entropies in
    float32 (down to about 1e-38) where their top probability rounds to exactly 1.

    Reference: Shannon entropy of the predictive distribution, e.g. Lakshminarayanan et al.,
    "Simple and Scalable Predictive Uncertainty Estimation using Deep Ensembles", NeurIPS 2017.
    """

    name = "entropy"
    saturation = 0.0


class EnergyScore(LogitScore):
    """Free energy ``-T logsumexp(z / T)``.

    Single-logit binary: ``-T softplus(|z| / T)``; multilabel: ``-T sum_c softplus(z_c / T)``.
    Unbounded; lower energy means more in-distribution.

    Reference: Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020.
    """

    name = "energy"


class MarginScore(LogitScore):
    """Negative gap between the two largest scaled logits, ``-(z_(1) - z_(2)) / T``.

    Single-logit binary: ``-|z| / T``; multilabel: ``-min_c |z_c| / T`` (the label nearest its
    decision boundary). In ``(-inf, 0]``.
    """

    name = "margin"


class MaxLogitScore(LogitScore):
    """Negative maximum scaled logit, ``-max_k z_k / T``.

    Multilabel: ``-max_c z_c / T``. Single-logit binary: ``-|z| / T``, the logit's magnitude
    (the signed logit would call every confident negative uncertain).

    Reference: Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World
    Settings", ICML 2022.
    """

    name = "max_logit"


class CertaintyRatioScore(LogitScore):
    """Top-2 certainty ratio ("decision boundary score") ``p_(2) / p_(1)`` in ``(0, 1]``.

    1 means on the decision boundary. Computed from logits as ``exp(-(z_(1) - z_(2)) / T)``,
    never by dividing probabilities, so it stays distinct where float32 probabilities round
    to 1 (it underflows to 0 only beyond a gap of about ``103 T``). Binary and multilabel:
    ``min(p, 1 - p) / max(p, 1 - p) = exp(-|z| / T)``, the largest over labels.
    :meth:`select` also returns the runner-up class as ``"alternate_label"``.

    Reference: Renumics Spotlight playbook, "Detect decision boundaries based on certainty
    ratios".
    """

    name = "certainty_ratio"
    saturation = 0.0
    _select_runner_up = True

    def alternate_label(self, query_logits: Any) -> torch.Tensor:
        """The runner-up class of each sample (see :func:`seapig_core.kernels.runner_up`)."""
        return self._pass(self._canonical_query(query_logits), runner=True).runner_up

    def _extra_outputs(self, outputs: PassOutputs) -> dict[str, torch.Tensor]:
        return {"alternate_label": outputs.runner_up}


class ProbabilityMarginScore(LogitScore):
    """Negative gap between the two largest probabilities, ``-(p_(1) - p_(2))`` of ``softmax(z / T)``.

    The softmax lab's "confidence margin" (the seeds' Lab 03, "Logits and Softmax": "Small
    margin between top-1 and top-2 signals uncertainty. Use margin for escalation, not just
    top-1 probability"): ``sorted_probs[0] - sorted_probs[1]``, negated so that higher means
    more uncertain. In ``[-1, 0]``; 0 on the decision boundary. Unlike :class:`MarginScore`
    (the gap of the *logits*), it shrinks when the probability mass is spread over many
    classes, so it ranks samples differently.

    Computed from logits without forming the probabilities: with ``g = (z_(1) - z_(2)) / T``
    and ``S = sum_k exp((z_k - z_(1)) / T)``, ``p_(1) = 1 / S`` and ``p_(2) = exp(-g) / S``, so
    the score is ``expm1(-g) / S``.

    - multiclass and two-logit binary: as above (for two logits ``-tanh(g / 2)``);
    - single-logit binary: ``-|2 sigmoid(z / T) - 1| = -tanh(|z| / (2 T))``, the same gap
      between ``p`` and ``1 - p``;
    - multilabel: the label closest to its decision boundary,
      ``-min_c |2 sigmoid(z_c / T) - 1|``;
    - ``per_member=True``: computed per member and averaged, like every score.

    Like the softmax score it saturates at -1 in float32 once ``p_(2)`` is below about 6e-8
    (the value cannot be represented distinctly there); thresholds then warn (see
    :meth:`set_threshold`).

    Examples
    --------
    >>> import torch
    >>> ProbabilityMarginScore().score(torch.tensor([[2.0, 1.0, -1.0], [0.5, 0.5, 0.0]]))
    tensor([-0.4459,  0.0000])
    """

    name = "probability_margin"
    saturation = -1.0


class ConfidenceScore(LogitScore):
    """A learned confidence head's confidence, negated: ``-sigmoid(c)``, in ``[-1, 0]``.

    For a model trained to output its own confidence next to its class logits (DeVries and
    Taylor, "Learning Confidence for Out-of-Distribution Detection in Neural Networks", 2018:
    a sigmoid confidence branch trained with the "hint" loss, where the network may ask for
    the label at the price of a confidence penalty). The logits carry the branch's logit ``c``
    (pre-sigmoid) as their last unit, ``(N, C + 1)`` (``confidence_head=True``, always; see
    :mod:`seapig_core.layout`), so it is extracted, stored, calibrated and bundled like any
    logits. ``per_member=True``: ``-sigmoid(c_m)`` averaged over the members.

    Everything else reads the ``C`` class logits: :meth:`fit` with labels fits the class
    temperature ``T`` by NLL as for every score (it sets the predictions, the metrics and the
    other scores of a bundle), and :meth:`predict` is the arg-max class.

    **No confidence temperature.** The score is ``-sigmoid(c)`` at every ``T``: a temperature
    on ``c`` would not change the ranking of the samples, hence not which ones a quantile or
    guaranteed-risk threshold selects; and fitting one (as a probability that the prediction is
    right) runs to its lower bound on a calibration split that is almost all correct, which
    would saturate the score. ``sigmoid(c)`` keeps the meaning the hint loss gave it during
    training.

    Like the softmax score it saturates at -1, here once ``c`` exceeds about 17 in float32 (37
    in float64); thresholds then warn (see :meth:`set_threshold`).

    Parameters
    ----------
    temperature : float or None, default None
        The class temperature (see :class:`LogitScore`); it does not change this score.
    task : {"multiclass", "binary", "multilabel"}, default "multiclass"
        The task of the class logits.
    per_member : bool, default False
        A trailing member axis: ``(N, C + 1, M)``.
    confidence_head : bool, default True
        Must be True.

    Examples
    --------
    >>> import torch
    >>> logits = torch.tensor([[4.0, 0.0, 3.0], [4.0, 0.0, -1.0]])  # two classes and the confidence
    >>> ConfidenceScore().score(logits)
    tensor([-0.9526, -0.2689])
    """

    name = "confidence"
    saturation = -1.0
    reads_confidence = True
    _saturation_remedy = (
        "The confidence logits are so large there that sigmoid rounds to 1 (beyond about 17 in float32, 37 in "
        "float64): store float64 logits, or rank these samples with a score of the class logits (energy, margin or "
        "max_logit do not saturate)."
    )

    def __init__(
        self,
        temperature: float | None = None,
        task: str = "multiclass",
        per_member: bool = False,
        confidence_head: bool = True,
    ) -> None:
        if check_bool(confidence_head, "confidence_head") is not True:
            raise ValueError(
                "The 'confidence_head' parameter of ConfidenceScore must be True: the score reads the "
                "confidence logit, the last unit of (N, C + 1) logits. Got False instead."
            )
        super().__init__(temperature=temperature, task=task, per_member=per_member, confidence_head=True)

    @property
    def _message_temperature(self) -> float | None:
        return None  # the score does not depend on it


#: Score classes by registry name.
SCORES: dict[str, type[LogitScore]] = {
    cls.name: cls
    for cls in (
        SoftmaxScore,
        EntropyScore,
        EnergyScore,
        MarginScore,
        MaxLogitScore,
        CertaintyRatioScore,
        ProbabilityMarginScore,
        ConfidenceScore,
    )
}


def make_score(name: str, **settings: Any) -> LogitScore:
    """Create a score by registry name, e.g. ``make_score("entropy", task="binary")``.

    ``make_score("confidence")`` is a :class:`ConfidenceScore` (``confidence_head=True``).
    """
    if name not in SCORES:
        raise ValueError(f"The 'name' parameter must be one of {sorted(SCORES)}. Got {name!r} instead.")
    return SCORES[name](**settings)
