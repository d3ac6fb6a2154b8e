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
  ``(N, M)`` for single-logit binary; the score is computed per member and averaged.

Examples
--------
>>> import torch
>>> from seapig_core.scores.logits import SoftmaxScore
>>> logits = torch.tensor([[4.0, 0.0, 0.0], [1.0, 0.9, 0.8]])
>>> SoftmaxScore().score(logits)
tensor([-0.9647, -0.3672])
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from matplotlib.figure import Figure

from seapig_core._validation import check_bool, check_open_unit, check_temperature
from seapig_core.kernels import KERNELS, ScoreKernel, compute_scores, predict, runner_up
from seapig_core.layout import CanonicalLogits, canonicalize, check_labels, check_task
from seapig_core.temperature import TemperatureFit, fit_temperature

if TYPE_CHECKING:
    from seapig_core.risk import RiskThreshold

__all__ = [
    "SCORES",
    "CertaintyRatioScore",
    "EnergyScore",
    "EntropyScore",
    "LogitScore",
    "MarginScore",
    "MaxLogitScore",
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
        Logits per sample (classes, labels, or 1 for single-logit binary) seen by :meth:`fit`;
        query logits must match it.
    risk_threshold : RiskThreshold or None
        Set by :meth:`set_risk_threshold`: the threshold with its bound on the selective risk,
        the coverage reached and the settings (see :class:`seapig_core.risk.RiskThreshold`).

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

    def __init__(self, temperature: float | None = None, task: str = "multiclass", per_member: bool = False) -> None:
        self.temperature = check_temperature(temperature, allow_none=True)
        self.task = check_task(task)
        self.per_member = check_bool(per_member, "per_member")
        self.logits: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.temperature_fit: TemperatureFit | None = None
        self.threshold: float | None = None
        self.quantile: float | None = None
        self.n_units: int | None = None
        self.risk_threshold: RiskThreshold | None = None

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

    def __repr__(self) -> str:
        args = [f"temperature={self.temperature!r}", f"task={self.task!r}"]
        if self.per_member:
            args.append("per_member=True")
        return f"{type(self).__name__}({', '.join(args)})"

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

        canon = canonicalize(X, self.task, self.per_member, name="X", require_finite=True)
        labels = None if Y is None else check_labels(Y, canon, name="Y")
        if labels is not None:
            self.temperature_fit = fit_temperature(canon, labels)
            self.temperature = self.temperature_fit.temperature
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
        canon = canonicalize(X, self.task, self.per_member, name="X", n_units=self.n_units, require_finite=True)
        labels = None if Y is None else check_labels(Y, canon, name="Y")
        self._store_calibration(canon, labels)
        return self

    def _store_calibration(self, canon: CanonicalLogits, labels: torch.Tensor | None) -> None:
        self.logits = canon.values.reshape(canon.input_shape)
        self.labels = labels
        self.n_units = canon.n_units
        self.scores = self._scores(canon)
        # A new calibration set invalidates a threshold taken from the old one.
        self.threshold = self.quantile = None
        self.risk_threshold = None

    # ------------------------------------------------------------------ scoring

    def _canonical_query(self, query_logits: Any, name: str = "query_logits") -> CanonicalLogits:
        return canonicalize(query_logits, self.task, self.per_member, name=name, n_units=self.n_units)

    def _scores(self, canon: CanonicalLogits) -> torch.Tensor:
        return compute_scores(canon, self.kernel, self.T)

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
            NaN for a sample with any non-finite logit.
        """
        return self._scores(self._canonical_query(query_logits))

    def predict(self, query_logits: Any) -> torch.Tensor:
        """Predicted labels (see :func:`seapig_core.kernels.predict`); -1 for non-finite samples."""
        return predict(self._canonical_query(query_logits), self.T)

    def select(self, query_logits: Any) -> dict[str, torch.Tensor]:
        """Select samples whose score is below the threshold.

        If calibration scores exist but no threshold was set, the threshold is set at
        ``q=0.99`` with a warning. A sample with a non-finite logit is never selected.

        Returns
        -------
        dict[str, torch.Tensor]
            ``"score"``: ``(N,)`` scores; ``"selected"``: ``(N,)`` bool, True = predict.

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
        scores = self._scores(canon)
        result = {"score": scores, "selected": scores < self.threshold}  # NaN < t is False
        result.update(self._extra_outputs(canon))
        return result

    def _extra_outputs(self, canon: CanonicalLogits) -> dict[str, torch.Tensor]:
        """Per-sample outputs a subclass adds to :meth:`select`."""
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
        """
        q = check_open_unit(q, "q")
        if X is not None:
            canon = canonicalize(X, self.task, self.per_member, name="X", n_units=self.n_units, require_finite=True)
            scores = self._scores(canon).detach().to("cpu", dtype=torch.float64).numpy()
        elif self.scores is None:
            raise ValueError("set_threshold() needs calibration scores: call fit() first.")
        else:
            scores = self.scores.detach().to("cpu", dtype=torch.float64).numpy()
        if not np.isfinite(scores).any():
            raise ValueError("set_threshold() needs at least one finite calibration score. Got none.")
        self.threshold = float(np.nanquantile(scores, q))
        self.quantile = q
        self.risk_threshold = None
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
        method : {"sgr"}, default "sgr"

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
        canon = canonicalize(X, self.task, self.per_member, name="X", n_units=self.n_units, require_finite=True)
        labels = check_labels(Y, canon, name="Y")
        scores = self._scores(canon)
        errors = prediction_errors(X, labels, task=self.task, temperature=self.T, per_member=self.per_member)
        result = guaranteed_risk_threshold(scores, errors, target_risk, delta, method=method)
        self.threshold = result.threshold
        self.quantile = None
        self.risk_threshold = result
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
        )

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path, *, include_logits: bool = True) -> Path:
        """Save settings and state to one schema-versioned Arrow IPC file (no pickle).

        See :func:`seapig_core.persistence.save_score`.
        """
        from seapig_core.persistence import save_score

        return save_score(self, path, include_logits=include_logits)

    @classmethod
    def load(cls, path: str | Path) -> LogitScore:
        """Load a score saved with :meth:`save`; the file's class must be ``cls`` or a subclass."""
        from seapig_core.persistence import load_score

        score = load_score(path)
        if not isinstance(score, cls):
            raise ValueError(f"{str(path)!r} holds a {type(score).__name__}, not a {cls.__name__}.")
        return score


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


class EntropyScore(LogitScore):
    """Predictive entropy of ``softmax(z / T)``, in nats.

    Binary: the Bernoulli entropy; multilabel: the largest per-label Bernoulli entropy. In
    ``[0, log K]`` (``[0, log 2]`` for Bernoulli outputs).

    Reference: Shannon entropy of the predictive distribution, e.g. Lakshminarayanan et al.,
    "Simple and Scalable Predictive Uncertainty Estimation using Deep Ensembles", NeurIPS 2017.
    """

    name = "entropy"


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
    never by dividing probabilities (in float32 it underflows to 0 beyond a gap of about
    ``87 T``). Binary and multilabel: ``min(p, 1 - p) / max(p, 1 - p) = exp(-|z| / T)``, the
    largest over labels. :meth:`select` also returns the runner-up class as
    ``"alternate_label"``.

    Reference: Renumics Spotlight playbook, "Detect decision boundaries based on certainty
    ratios".
    """

    name = "certainty_ratio"

    def alternate_label(self, query_logits: Any) -> torch.Tensor:
        """The runner-up class of each sample (see :func:`seapig_core.kernels.runner_up`)."""
        return runner_up(self._canonical_query(query_logits), self.T)

    def _extra_outputs(self, canon: CanonicalLogits) -> dict[str, torch.Tensor]:
        return {"alternate_label": runner_up(canon, self.T)}


#: Score classes by registry name.
SCORES: dict[str, type[LogitScore]] = {
    cls.name: cls
    for cls in (SoftmaxScore, EntropyScore, EnergyScore, MarginScore, MaxLogitScore, CertaintyRatioScore)
}


def make_score(name: str, **settings: Any) -> LogitScore:
    """Create a score by registry name, e.g. ``make_score("entropy", task="binary")``."""
    if name not in SCORES:
        raise ValueError(f"The 'name' parameter must be one of {sorted(SCORES)}. Got {name!r} instead.")
    return SCORES[name](**settings)
