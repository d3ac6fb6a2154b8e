"""Evaluation metrics for calibration and selective prediction.

Two families of pure functions:

- **Calibration** of the predictive probabilities at a temperature ``T``:
  :func:`negative_log_likelihood`, :func:`brier_score`, :func:`expected_calibration_error`,
  :func:`maximum_calibration_error` (and the per-bin statistics behind them,
  :func:`calibration_bins`). Every task of :mod:`seapig_core.layout` is accepted.
- **Selective prediction**: :func:`prediction_errors` (the 0-1 loss of the prediction) and
  :func:`risk_coverage`, the risk-coverage curve of an uncertainty score with its AURC, E-AURC
  and AUGRC, for the 0-1 loss or any per-sample loss.

Conventions shared by the whole library: a score is higher when more uncertain, a sample is
selected when its score is *below* the threshold, and a sample with a non-finite score is
never selected.

Validated once
--------------
Every function that takes ``logits`` accepts either raw logits (a tensor or array, validated
and turned into the canonical layout by :func:`seapig_core.layout.canonicalize`, once per
call) or an already validated :class:`seapig_core.layout.CanonicalLogits`, which is used as
it is: not re-canonicalised and not scanned for non-finite values again. Canonicalise a
calibration set once and pass it to every metric::

    canon = canonicalize(logits, "multiclass")
    nll = negative_log_likelihood(canon, labels, temperature=T)
    ece = expected_calibration_error(canon, labels, temperature=T)

A :class:`~seapig_core.layout.CanonicalLogits` carries its task and member layout, so
``task`` and ``per_member`` may then be left out (given, they must match it). The calibration
metrics need finite logits. They do not run a separate finiteness pass (``torch.isfinite``
over every logit, which on 1M x 100 costs more than the metric): each tests the row blocks it
reads anyway, with one sum per block (finite unless the block holds a NaN or an infinity),
and raises the ``ValueError`` of :func:`~seapig_core.layout.canonicalize` naming the first
bad row. So raw logits and a ``CanonicalLogits`` built with or without ``require_finite``
behave the same. Labels are validated on every call (:func:`seapig_core.layout.check_labels`).

Predictive probabilities
------------------------
``p = softmax(z / T)`` for the categorical family (multiclass, two-logit binary) and
``p = sigmoid(z / T)`` per unit for the bernoulli family (single-logit binary, multilabel).
With ``per_member=True`` the member probabilities are averaged, ``p = mean_m p_m`` (the
ensemble's predictive distribution), and the prediction is ``argmax_k p_k``, or ``p > 0.5``
per label (:func:`seapig_core.kernels.predict`; the calibration metrics take the argmax of
the float64 probabilities they compute, :func:`prediction_errors` calls ``predict``).

Confidence and correctness (top-label calibration)
--------------------------------------------------
For ECE and MCE each decision has a *confidence* and is *correct* or not:

- multiclass and binary (either layout): confidence ``max_k p_k`` (binary: ``max(p, 1 - p)``),
  correct when the predicted class is the label; so a single-logit and a two-logit binary
  model with the same probabilities get the same numbers;
- multilabel: the same per label (confidence ``max(p_c, 1 - p_c)``, correct when
  ``1[p_c > 0.5] == y_c``); every label is a binary problem, with its own ECE. ``average=True``
  returns the unweighted mean over labels, ``average=False`` the per-label array.

Precision. NLL and Brier are computed in float64. For the categorical family with one member
(multiclass and two-logit binary, the common case) the confidence ``max_k p_k = 1 / sum_k
exp((z_k - z_max) / T)`` is computed in row blocks in the logits' own dtype, like the scores
(this is what makes ECE on 100 classes as fast as torchmetrics, which also works in float32).
For float32 logits its relative error is below ``4 (K + 2) 2^-23`` (typically ``1e-7``); every
sample whose confidence lies that close to a bin edge is recomputed in float64, so each sample
falls in the bin of its exact confidence and the ECE differs from an all-float64 computation
only by the float32 rounding of the confidences averaged in each bin. Float64 logits are
computed in float64 throughout. The other layouts (bernoulli, several members) compute the
probabilities in float64.

References
----------
- Guo, Pleiss, Sun and Weinberger, "On Calibration of Modern Neural Networks", ICML 2017 (ECE,
  reliability diagrams, temperature scaling).
- Naeini, Cooper and Hauskrecht, "Obtaining Well Calibrated Probabilities Using Bayesian
  Binning", AAAI 2015 (ECE and MCE).
- Nixon, Dusenberry, Zhang, Jerfel and Tran, "Measuring Calibration in Deep Learning", CVPR
  Workshops 2019 (equal-mass / adaptive binning).
- Brier, "Verification of Forecasts Expressed in Terms of Probability", Monthly Weather Review
  1950.
- Geifman and El-Yaniv, "Selective Classification for Deep Neural Networks", NeurIPS 2017
  (selective risk, coverage, risk-coverage curve).
- Geifman, Uziel and El-Yaniv, "Bias-Reduced Uncertainty Estimation for Deep Neural
  Classifiers", ICLR 2019 (AURC and E-AURC); Ding, Liu, Xiong and Shi, "Revisiting the
  Evaluation of Uncertainty Estimation and Its Application to Explore Model
  Complexity-Uncertainty Trade-Off", CVPR Workshops 2020 (E-AURC as the excess over the
  optimal ordering).
- Traub, Bungert, Lüth, Baumgartner, Maier-Hein, Jäger and Zimmerer, "Overcoming Common Flaws
  in the Evaluation of Selective Classification Systems", NeurIPS 2024 (AUGRC).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from seapig_core._validation import check_bool, check_positive_int, check_temperature
from seapig_core.kernels import predict
from seapig_core.layout import CanonicalLogits, canonicalize, check_labels, check_task, iter_row_blocks

__all__ = [
    "BINNINGS",
    "CalibrationBins",
    "RiskCoverage",
    "brier_score",
    "calibration_bins",
    "expected_calibration_error",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "prediction_errors",
    "risk_coverage",
]

#: Accepted values of the ``binning`` parameter.
BINNINGS: tuple[str, ...] = ("width", "mass")
#: Accepted values of the ``multilabel_loss`` parameter of :func:`prediction_errors`.
MULTILABEL_LOSSES: tuple[str, ...] = ("subset", "hamming")


# =========================================================================== validation


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"The '{name}' parameter must be one of {list(choices)}. Got {value!r} instead.")
    return value


def _canonical(logits: Any, task: Any, per_member: Any) -> CanonicalLogits:
    """Raw logits -> the validated canonical layout; a :class:`CanonicalLogits` is used as it is.

    ``task``/``per_member`` None mean "multiclass"/False for raw logits and "the
    CanonicalLogits' own" otherwise; given with a CanonicalLogits, they must match it.
    """
    if isinstance(logits, CanonicalLogits):
        if task is not None and check_task(task) != logits.task:
            raise ValueError(
                f"The 'task' parameter must be left out or match the task of the CanonicalLogits "
                f"({logits.task!r}). Got {task!r} instead."
            )
        if per_member is not None and check_bool(per_member, "per_member") != logits.per_member:
            raise ValueError(
                f"The 'per_member' parameter must be left out or match the CanonicalLogits "
                f"(per_member={logits.per_member}). Got {per_member!r} instead."
            )
        return logits
    task = "multiclass" if task is None else task
    per_member = False if per_member is None else check_bool(per_member, "per_member")
    return canonicalize(logits, task, per_member, name="logits")


def _prepare(
    logits: Any, labels: Any, task: Any, temperature: Any, per_member: Any
) -> tuple[CanonicalLogits, torch.Tensor, float]:
    """Validate the shared arguments once: canonical logits, canonical labels, temperature.

    Raw logits are canonicalised without the finiteness pass: the metrics that need finite
    logits test the blocks they read (:func:`_check_finite_block`).
    """
    T = check_temperature(temperature)
    canon = _canonical(logits, task, per_member)
    y = check_labels(labels, canon, name="labels")
    return canon, y, T


def _check_finite_block(block: torch.Tensor, canon: CanonicalLogits) -> None:
    """Raise if the CPU ``block`` (rows of ``canon``) holds a NaN or an infinity.

    The sum of a block is finite unless it holds a non-finite value (or overflows), so one
    reduction clears a block in the usual case; only then is the exact test run. On failure
    the whole input is scanned once to name the count and the first bad row, in the words of
    :func:`seapig_core.layout.canonicalize`.
    """
    if math.isfinite(float(block.sum())) or bool(torch.isfinite(block).all()):
        return
    finite = canon.finite_rows().to("cpu")
    bad = int((~finite).sum())
    first = int(torch.nonzero(~finite)[0, 0])
    raise ValueError(
        f"The 'logits' parameter must contain only finite values. "
        f"Got {bad} sample(s) with NaN or infinite logits (first at row {first}) instead."
    )


def _as_1d_float(values: Any, name: str) -> np.ndarray:
    """A 1-D float64 numpy copy of a tensor/array/sequence of real numbers."""
    if isinstance(values, torch.Tensor):
        if values.dtype == torch.bool or values.is_complex():
            raise TypeError(f"The '{name}' parameter must hold real numbers. Got dtype {values.dtype} instead.")
        array = values.detach().to("cpu", dtype=torch.float64).numpy()
    elif isinstance(values, (np.ndarray, list, tuple)):
        array = np.asarray(values)
        if array.dtype.kind not in "iuf":
            raise TypeError(f"The '{name}' parameter must hold real numbers. Got an array of dtype {array.dtype} instead.")
        array = array.astype(np.float64)
    else:
        raise TypeError(
            f"The '{name}' parameter must be a torch.Tensor or numpy.ndarray. Got {type(values).__name__} instead."
        )
    if array.ndim != 1:
        raise ValueError(f"The '{name}' parameter must be 1-D, one value per sample. Got shape {array.shape} instead.")
    if array.size == 0:
        raise ValueError(f"The '{name}' parameter must contain at least one sample. Got shape {array.shape} instead.")
    return array


def _score_dtype(scores: Any) -> np.dtype:
    """float32 for float32/half scores, float64 otherwise: thresholds are stepped in this dtype."""
    if isinstance(scores, torch.Tensor):
        return np.dtype(np.float32) if scores.dtype in (torch.float32, torch.float16, torch.bfloat16) else np.dtype(np.float64)
    dtype = np.asarray(scores).dtype
    return np.dtype(np.float32) if dtype in (np.float32, np.float16) else np.dtype(np.float64)


# =========================================================================== probabilities


def _float64_rows(canon: CanonicalLogits, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of the canonical values as a float64 CPU tensor ``(B, K, M)``.

    A view of the caller's data when it already is float64 on the CPU: never modify in place.
    """
    return canon.values[start:stop].to(device="cpu", dtype=torch.float64)


def _prob_blocks(canon: CanonicalLogits, T: float):
    """Yield ``(start, stop, p)``: float64 member-averaged probabilities ``(B, K)`` of a row block.

    Categorical: ``softmax(z / T)`` over the K units; bernoulli: ``sigmoid(z / T)`` per unit
    (single-logit binary: ``K = 1``, the probability of class 1).
    """
    block_rows = max(64, canon.block_rows() // 2)  # float64 doubles the bytes per row
    single = canon.n_members == 1
    for start, stop in iter_row_blocks(canon.n_samples, block_rows):
        z = _float64_rows(canon, start, stop)
        _check_finite_block(z, canon)
        z = z[:, :, 0] / T if single else z / T  # (B, K) or (B, K, M)
        p = z.softmax(dim=1) if canon.family == "categorical" else torch.sigmoid(z)
        yield start, stop, (p if single else p.mean(dim=2))


def _categorical_top_label(canon: CanonicalLogits, y: torch.Tensor, T: float) -> tuple[np.ndarray, np.ndarray]:
    """Confidence ``max_k softmax(z / T)_k`` and correctness of ``argmax_k z_k``, one member.

    One pass over row blocks in the logits' dtype: ``z_max``, the count of maxima (so that a
    tied maximum is resolved like ``argmax``: first index), ``1 / sum exp((z - z_max) / T)``.
    Returns float64 numpy arrays ``(N,)``. Raises for non-finite logits.
    """
    n, k = canon.n_samples, canon.n_units
    beta = 1.0 / T
    conf = torch.empty(n, dtype=canon.values.dtype)
    correct = torch.empty(n, dtype=torch.bool)
    block_rows = canon.block_rows()
    scratch = torch.empty((min(block_rows, n), k), dtype=canon.values.dtype)
    for start, stop in iter_row_blocks(n, block_rows):
        z = canon.values[start:stop, :, 0].to("cpu")
        _check_finite_block(z, canon)
        buf = scratch[: stop - start]
        z_max = z.amax(dim=1, keepdim=True)
        n_max = torch.eq(z, z_max, out=buf).sum(dim=1)  # 1.0 where z equals the row max
        shifted = torch.sub(z, z_max, out=buf)
        if beta != 1.0:
            shifted.mul_(beta)
        conf[start:stop] = shifted.exp_().sum(dim=1).reciprocal_()
        yb = y[start:stop]
        label_is_max = z.gather(1, yb.view(-1, 1))[:, 0] == z_max[:, 0]
        ok = label_is_max & (n_max == 1)
        tied = torch.nonzero(label_is_max & (n_max > 1))[:, 0]
        if tied.numel():  # a repeated maximum: the prediction is the first maximal index
            ok[tied] = z[tied].argmax(dim=1) == yb[tied]
        correct[start:stop] = ok
    return conf.to(torch.float64).numpy(), correct.to(torch.float64).numpy()


def _exact_confidence(canon: CanonicalLogits, rows: np.ndarray, T: float) -> np.ndarray:
    """``max_k softmax(z / T)_k`` of the given rows (one member), in float64."""
    z = canon.values[torch.from_numpy(rows), :, 0].to(device="cpu", dtype=torch.float64)
    z_max = z.amax(dim=1, keepdim=True)
    return (z - z_max).mul_(1.0 / T).exp_().sum(dim=1).reciprocal_().numpy()


def _refine_near_edges(conf: np.ndarray, canon: CanonicalLogits, T: float, n_bins: int, binning: str) -> None:
    """Recompute in float64, in place, the confidences within rounding of a bin edge.

    ``conf`` came from :func:`_categorical_top_label` in a dtype below float64; its relative
    error is below ``(K + 2) eps`` (``exp`` and the row sum each add at most a few ``eps``;
    the bound keeps a factor 4 of margin). A sample farther from every edge than that is in the
    bin of its exact confidence. Equal-mass edges are themselves sample confidences: the edges
    are recomputed after each refinement until no unrefined sample is near one (refinement
    only moves an edge by less than the tolerance, so this ends after one or two rounds).
    """
    tol = 4.0 * (canon.n_units + 2) * float(torch.finfo(canon.values.dtype).eps)
    refined = np.zeros(conf.size, dtype=bool)
    while True:
        inner = _bin_edges(conf, n_bins, binning)[1:-1]
        if inner.size == 0:
            return
        position = np.searchsorted(inner, conf)
        below = inner[np.clip(position - 1, 0, inner.size - 1)]
        above = inner[np.clip(position, 0, inner.size - 1)]
        near = (np.abs(conf - below) <= tol * below) | (np.abs(conf - above) <= tol * above)
        near &= ~refined
        if not near.any():
            return
        rows = np.flatnonzero(near)
        conf[rows] = _exact_confidence(canon, rows, T)
        refined[rows] = True
        if binning == "width":
            return


def _confidence_correct(
    canon: CanonicalLogits, y: torch.Tensor, T: float, n_bins: int, binning: str
) -> tuple[np.ndarray, np.ndarray]:
    """Top-label confidence and correctness, ``(N, L)`` float64 each (L = 1, or K for multilabel).

    ``n_bins`` and ``binning`` say where the bin edges are, near which a float32 confidence is
    recomputed in float64 (see the module docstring).
    """
    if canon.family == "categorical" and canon.n_members == 1:
        conf, correct = _categorical_top_label(canon, y, T)
        if canon.values.dtype != torch.float64:
            _refine_near_edges(conf, canon, T, n_bins, binning)
        return conf.reshape(-1, 1), correct.reshape(-1, 1)

    multilabel = canon.family == "bernoulli" and not canon.single_logit
    n_cols = canon.n_units if multilabel else 1
    conf = np.empty((canon.n_samples, n_cols))
    correct = np.empty((canon.n_samples, n_cols))
    for start, stop, p in _prob_blocks(canon, T):
        if canon.family == "categorical":
            # Several members: the argmax of the float64 member-averaged probabilities.
            top, pred = p.max(dim=1)
            conf[start:stop, 0] = top.numpy()
            correct[start:stop, 0] = (pred == y[start:stop]).numpy()
        else:
            # p > 0.5 predicts 1 (as kernels.predict); confidence max(p, 1 - p).
            conf[start:stop] = torch.maximum(p, 1.0 - p).numpy()
            predicted = (p > 0.5).to(torch.float64)
            correct[start:stop] = (predicted == y[start:stop]).numpy()
    return conf, correct


# =========================================================================== NLL and Brier


def negative_log_likelihood(
    logits: Any,
    labels: Any,
    task: str | None = None,
    temperature: float = 1.0,
    per_member: bool | None = None,
) -> float:
    """Mean negative log-likelihood of the labels, in nats per sample.

    ``NLL = -(1/N) sum_n log p(y_n | x_n)`` with the predictive distribution at temperature
    ``T`` (see the module docstring), computed in float64:

    - categorical: ``-log softmax(z_n / T)_{y_n}`` (cross-entropy);
    - single-logit binary: ``-[y log sigmoid(z/T) + (1 - y) log sigmoid(-z/T)]``;
    - multilabel: the summed per-label binary cross-entropies, i.e. the log-likelihood of the
      label vector under independent labels (the quantity :func:`seapig_core.temperature.fit_temperature`
      minimises).

    With ``per_member=True`` the likelihood is that of the member-averaged distribution,
    ``-log mean_m p_m(y)`` (the ensemble's NLL, computed as a ``logsumexp`` over members), which
    is at most the mean of the members' NLLs that the temperature fit minimises (Jensen).

    Parameters
    ----------
    logits : torch.Tensor, numpy.ndarray or CanonicalLogits
        Finite logits shaped for ``task`` (see :mod:`seapig_core.layout`), or an already
        validated :class:`~seapig_core.layout.CanonicalLogits` (used as it is; see the module
        docstring).
    labels : torch.Tensor or numpy.ndarray
        ``(N,)`` class indices, or ``(N, C)`` 0/1 targets for multilabel.
    task : {"multiclass", "binary", "multilabel"} or None, default None
        None: "multiclass" for raw logits, the CanonicalLogits' own task otherwise.
    temperature : float, default 1.0
        ``T > 0``; logits are divided by it.
    per_member : bool or None, default None
        Logits carry a trailing member axis. None: False for raw logits, the CanonicalLogits'
        own layout otherwise.

    Returns
    -------
    float

    Raises
    ------
    TypeError, ValueError
        For invalid logits, labels, task, temperature or ``per_member``.
    """
    canon, y, T = _prepare(logits, labels, task, temperature, per_member)
    beta = 1.0 / T
    m = canon.n_members
    losses = torch.empty(canon.n_samples, dtype=torch.float64)
    block_rows = max(64, canon.block_rows() // 2)  # float64 doubles the bytes per row
    for start, stop in iter_row_blocks(canon.n_samples, block_rows):
        z = _float64_rows(canon, start, stop)
        _check_finite_block(z, canon)
        z = z * beta  # (B, K, M); a new tensor, never the caller's
        yb = y[start:stop]
        if canon.family == "categorical" and m == 1:
            z2 = z[:, :, 0]
            loss = torch.logsumexp(z2, dim=1) - z2.gather(1, yb.view(-1, 1))[:, 0]
        elif canon.family == "categorical":
            log_p = z.log_softmax(dim=1)  # (B, K, M)
            log_py = log_p.gather(1, yb.view(-1, 1, 1).expand(-1, 1, m))[:, 0, :]  # (B, M)
            loss = math.log(m) - torch.logsumexp(log_py, dim=1)
        else:
            # log p(y_c) = logsigmoid(+-z): +z for y = 1, -z for y = 0; per label, then summed.
            signed = torch.where(yb.unsqueeze(-1) > 0.5, z, -z)
            log_pc = F.logsigmoid(signed)[:, :, 0] if m == 1 else torch.logsumexp(F.logsigmoid(signed), dim=2) - math.log(m)
            loss = -log_pc.sum(dim=1)
        losses[start:stop] = loss
    return float(losses.sum()) / canon.n_samples


def brier_score(
    logits: Any,
    labels: Any,
    task: str | None = None,
    temperature: float = 1.0,
    per_member: bool | None = None,
    average: bool = True,
) -> float | np.ndarray:
    """Brier score (mean squared error of the predicted probabilities).

    - multiclass: ``(1/N) sum_n sum_k (p_nk - 1[y_n = k])^2``, in ``[0, 2]`` (Brier 1950);
    - binary (either layout): ``(1/N) sum_n (p_n - y_n)^2`` with ``p_n`` the probability of
      class 1, in ``[0, 1]`` (the convention of ``sklearn.metrics.brier_score_loss``); a
      two-logit model gets the same value as the equivalent one-logit model;
    - multilabel: the binary Brier score of each label; their mean when ``average=True``,
      else the ``(C,)`` per-label array.

    Computed in float64.

    Parameters
    ----------
    logits, labels, task, temperature, per_member
        As in :func:`negative_log_likelihood` (raw logits or a CanonicalLogits).
    average : bool, default True
        Multilabel only: average the per-label scores (ignored for the other tasks).

    Returns
    -------
    float or numpy.ndarray
    """
    canon, y, T = _prepare(logits, labels, task, temperature, per_member)
    average = check_bool(average, "average")
    multilabel = canon.family == "bernoulli" and not canon.single_logit
    two_logit_binary = canon.family == "categorical" and canon.task == "binary"
    per_sample = torch.empty((canon.n_samples, canon.n_units if multilabel else 1), dtype=torch.float64)
    for start, stop, p in _prob_blocks(canon, T):
        yb = y[start:stop]
        if two_logit_binary:
            sq = (p[:, 1] - yb.to(torch.float64)).square().unsqueeze(1)
        elif canon.family == "categorical":
            onehot = F.one_hot(yb, canon.n_units).to(torch.float64)
            sq = (p - onehot).square().sum(dim=1, keepdim=True)
        else:
            sq = (p - yb).square()
        per_sample[start:stop] = sq
    per_column = per_sample.sum(dim=0).numpy() / canon.n_samples
    if multilabel and not average:
        return per_column
    return float(per_column.mean())


# =========================================================================== calibration error


@dataclass(frozen=True, eq=False)
class CalibrationBins:
    """Per-bin statistics of a reliability diagram, for one binary problem or one pooled set.

    Attributes
    ----------
    edges : numpy.ndarray
        ``(B + 1,)`` bin edges on the confidence axis; bin ``b`` is ``(edges[b], edges[b+1]]``
        (the first bin also holds ``edges[0]``). Equal-width: ``linspace(0, 1, B + 1)``;
        equal-mass: data-dependent, repeated edges give empty bins.
    counts : numpy.ndarray
        ``(B,)`` samples per bin (int).
    confidence : numpy.ndarray
        ``(B,)`` mean confidence per bin (NaN for an empty bin).
    accuracy : numpy.ndarray
        ``(B,)`` fraction correct per bin (NaN for an empty bin).
    """

    edges: np.ndarray
    counts: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray

    @property
    def gap(self) -> np.ndarray:
        """``|accuracy - confidence|`` per bin (NaN for an empty bin)."""
        return np.abs(self.accuracy - self.confidence)

    @property
    def ece(self) -> float:
        """``sum_b (n_b / N) |acc_b - conf_b|``."""
        n = self.counts.sum()
        nonempty = self.counts > 0
        return float(np.sum(self.counts[nonempty] * self.gap[nonempty]) / n)

    @property
    def mce(self) -> float:
        """``max_b |acc_b - conf_b|`` over non-empty bins."""
        return float(np.max(self.gap[self.counts > 0]))


def _bin_edges(conf: np.ndarray, n_bins: int, binning: str) -> np.ndarray:
    if binning == "width":
        return np.linspace(0.0, 1.0, n_bins + 1)
    # Equal mass: bin b ends at the order statistic of rank round((b + 1) N / B); ties stay in
    # one bin because bins are (edge_b, edge_{b+1}], so a repeated edge leaves an empty bin.
    s = np.sort(conf)
    n = s.size
    ends = np.round(np.arange(1, n_bins + 1) * n / n_bins).astype(np.int64)
    upper = s[np.clip(ends - 1, 0, n - 1)]
    upper[-1] = s[-1]
    return np.concatenate([[s[0]], upper])


def _binned(conf: np.ndarray, correct: np.ndarray, n_bins: int, binning: str) -> CalibrationBins:
    edges = _bin_edges(conf, n_bins, binning)
    # Bin of c: number of inner upper edges strictly below c, i.e. bins (e_b, e_{b+1}].
    index = np.searchsorted(edges[1:-1], conf, side="left")
    counts = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(index, weights=conf, minlength=n_bins) / counts
        accuracy = np.bincount(index, weights=correct, minlength=n_bins) / counts
    return CalibrationBins(edges, counts, confidence, accuracy)


def calibration_bins(
    logits: Any,
    labels: Any,
    task: str | None = None,
    temperature: float = 1.0,
    per_member: bool | None = None,
    n_bins: int = 15,
    binning: str = "width",
    pooled: bool = True,
) -> CalibrationBins | list[CalibrationBins]:
    """The per-bin statistics behind ECE, MCE and the reliability diagram.

    Parameters
    ----------
    logits, labels, task, temperature, per_member
        As in :func:`negative_log_likelihood` (raw logits or a CanonicalLogits).
    n_bins : int, default 15
        Number of bins ``B``.
    binning : {"width", "mass"}, default "width"
        ``"width"``: ``B`` equal-width bins on ``[0, 1]`` (Guo et al. 2017); ``"mass"``: ``B``
        bins holding (nearly) equal numbers of samples (Nixon et al. 2019), tied confidences
        never split across bins.
    pooled : bool, default True
        Multilabel only: one set of bins over all ``N * C`` label decisions (True), or a list
        with one per label (False). Ignored for the other tasks.

    Returns
    -------
    CalibrationBins or list of CalibrationBins
    """
    canon, y, T = _prepare(logits, labels, task, temperature, per_member)
    n_bins = check_positive_int(n_bins, "n_bins")
    binning = _check_choice(binning, "binning", BINNINGS)
    pooled = check_bool(pooled, "pooled")
    conf, correct = _confidence_correct(canon, y, T, n_bins, binning)
    if conf.shape[1] == 1 or pooled:
        return _binned(conf.reshape(-1), correct.reshape(-1), n_bins, binning)
    return [_binned(conf[:, c], correct[:, c], n_bins, binning) for c in range(conf.shape[1])]


def _calibration_error(kind: str, logits, labels, task, temperature, per_member, n_bins, binning, average):
    canon, y, T = _prepare(logits, labels, task, temperature, per_member)
    n_bins = check_positive_int(n_bins, "n_bins")
    binning = _check_choice(binning, "binning", BINNINGS)
    average = check_bool(average, "average")
    conf, correct = _confidence_correct(canon, y, T, n_bins, binning)
    values = np.array(
        [getattr(_binned(conf[:, c], correct[:, c], n_bins, binning), kind) for c in range(conf.shape[1])]
    )
    if conf.shape[1] > 1 and not average:
        return values
    return float(values.mean())


def expected_calibration_error(
    logits: Any,
    labels: Any,
    task: str | None = None,
    temperature: float = 1.0,
    per_member: bool | None = None,
    n_bins: int = 15,
    binning: str = "width",
    average: bool = True,
) -> float | np.ndarray:
    """Expected calibration error (top-label, binned, L1).

    ``ECE = sum_b (|B_b| / N) |acc(B_b) - conf(B_b)|``, where the bins ``B_b`` partition the
    samples by confidence, ``acc`` is the fraction of correct predictions and ``conf`` the
    mean confidence in a bin (Naeini et al. 2015; Guo et al. 2017). Bins are
    ``(e_b, e_{b+1}]`` (the first also holds ``e_0``); empty bins contribute nothing.

    Confidence and correctness are defined in the module docstring (top-label; per label for
    multilabel), which also says in which precision they are computed.

    Parameters
    ----------
    logits, labels, task, temperature, per_member
        As in :func:`negative_log_likelihood` (raw logits or a CanonicalLogits).
    n_bins : int, default 15
        Number of bins (15 as in Guo et al. 2017).
    binning : {"width", "mass"}, default "width"
        Equal-width bins on ``[0, 1]`` or equal-mass bins (see :func:`calibration_bins`).
    average : bool, default True
        Multilabel: the unweighted mean of the per-label ECEs (True) or the ``(C,)`` array
        (False). Ignored for the other tasks.

    Returns
    -------
    float or numpy.ndarray
        In ``[0, 1]``.

    Raises
    ------
    TypeError, ValueError
        For invalid logits, labels, task, temperature, ``per_member``, ``n_bins``, ``binning``
        or ``average``.
    """
    return _calibration_error("ece", logits, labels, task, temperature, per_member, n_bins, binning, average)


def maximum_calibration_error(
    logits: Any,
    labels: Any,
    task: str | None = None,
    temperature: float = 1.0,
    per_member: bool | None = None,
    n_bins: int = 15,
    binning: str = "width",
    average: bool = True,
) -> float | np.ndarray:
    """Maximum calibration error: ``MCE = max_b |acc(B_b) - conf(B_b)|`` over non-empty bins.

    Naeini et al. 2015; Guo et al. 2017. Same parameters and bins as
    :func:`expected_calibration_error`; multilabel ``average=True`` averages the per-label MCEs.
    MCE weighs a bin of one sample like a bin of thousands, so it is noisy on small data.

    Returns
    -------
    float or numpy.ndarray
        In ``[0, 1]``.
    """
    return _calibration_error("mce", logits, labels, task, temperature, per_member, n_bins, binning, average)


# =========================================================================== selective prediction


def prediction_errors(
    logits: Any,
    labels: Any,
    task: str | None = None,
    temperature: float = 1.0,
    per_member: bool | None = None,
    multilabel_loss: str = "subset",
) -> np.ndarray:
    """Per-sample 0-1 loss of the prediction, the default loss of :func:`risk_coverage`.

    ``e_n = 1[prediction_n != y_n]`` with the prediction of :func:`seapig_core.kernels.predict`
    at ``temperature`` (which matters only with ``per_member=True``, where the members'
    probabilities are averaged before the argmax).

    Multilabel: ``multilabel_loss="subset"`` (default) counts a sample as wrong when *any* of its
    labels is wrong (the subset 0-1 loss, ``1 - exact match``): the selective risk is then the
    fraction of accepted samples with at least one wrong label. ``"hamming"`` gives the
    fraction of wrong labels, in ``[0, 1]``.

    Parameters
    ----------
    logits, labels, task, temperature, per_member
        As in :func:`negative_log_likelihood` (raw logits or a CanonicalLogits), except that
        non-finite logits are allowed.
    multilabel_loss : {"subset", "hamming"}, default "subset"
        Multilabel only (ignored for the other tasks).

    Returns
    -------
    numpy.ndarray
        ``(N,)`` float64 losses; NaN for a sample with a non-finite logit (it has no
        prediction; its score is NaN too, so it is never selected).
    """
    canon, y, T = _prepare(logits, labels, task, temperature, per_member)
    multilabel_loss = _check_choice(multilabel_loss, "multilabel_loss", MULTILABEL_LOSSES)
    pred = predict(canon, T).to("cpu")
    if canon.family == "categorical":
        missing = pred < 0
        wrong = (pred != y).to(torch.float64)
    elif canon.single_logit:
        missing = pred < 0
        wrong = (pred.to(torch.float64) != y[:, 0]).to(torch.float64)
    else:
        missing = (pred < 0).any(dim=1)
        mismatch = (pred.to(torch.float64) != y).to(torch.float64)
        wrong = mismatch.amax(dim=1) if multilabel_loss == "subset" else mismatch.mean(dim=1)
    errors = wrong.numpy().astype(np.float64)
    errors[missing.numpy()] = np.nan
    return errors


@dataclass(frozen=True, eq=False)
class RiskCoverage:
    """A risk-coverage curve with its summary areas; build it with :func:`risk_coverage`.

    The curve has one point per distinct finite score ``u_1 < ... < u_d``: point ``j`` selects
    the samples with score ``<= u_j`` (a threshold cannot split tied scores), i.e.
    ``score < thresholds[j]``.

    Attributes
    ----------
    coverage : numpy.ndarray
        ``(d,)`` increasing fractions of *all* ``N`` samples selected, ``phi_j = n_j / N``.
    risk : numpy.ndarray
        ``(d,)`` selective risk ``R_j = (1 / n_j) sum_{selected} loss``.
    thresholds : numpy.ndarray
        ``(d,)``: the smallest value of the scores' dtype above ``u_j``; ``score < thresholds[j]``
        selects point ``j``'s samples.
    aurc : float
        Area under the risk-coverage curve, sample-wise (see :func:`risk_coverage`).
    eaurc : float
        ``aurc - oracle_aurc`` (>= 0).
    augrc : float
        Area under the generalized risk-coverage curve (see :func:`risk_coverage`).
    oracle_aurc : float
        AURC of the oracle ordering, which selects the samples with the smallest loss first.
    oracle_coverage, oracle_risk : numpy.ndarray
        The oracle's curve, one point per selectable sample: ``i / N`` and the mean of the
        ``i`` smallest losses.
    n_samples : int
        ``N``, all samples.
    n_selectable : int
        Samples with a finite score; the largest coverage is ``n_selectable / N``.
    """

    coverage: np.ndarray
    risk: np.ndarray
    thresholds: np.ndarray
    aurc: float
    eaurc: float
    augrc: float
    oracle_aurc: float
    oracle_coverage: np.ndarray = field(repr=False)
    oracle_risk: np.ndarray = field(repr=False)
    n_samples: int
    n_selectable: int

    @property
    def generalized_risk(self) -> np.ndarray:
        """``coverage * risk``: the fraction of all samples that are selected and wrong."""
        return self.coverage * self.risk

    def selective_risk_at(self, coverage: Any) -> float | np.ndarray:
        """Selective risk of the first curve point whose coverage reaches ``coverage``.

        Ties can make a coverage unreachable exactly; the point returned keeps at least the
        requested fraction (the smallest achievable coverage ``>= coverage``).

        Parameters
        ----------
        coverage : float or array-like
            In ``(0, 1]``.

        Returns
        -------
        float or numpy.ndarray

        Raises
        ------
        ValueError
            For a coverage outside ``(0, 1]``, or above the largest achievable coverage
            (``n_selectable / N`` when some scores are not finite).
        """
        c = _check_fractions(coverage, "coverage", low_open=True)
        index = np.searchsorted(self.coverage, c - 1e-12, side="left")
        if np.any(index >= self.coverage.size):
            worst = float(np.max(c))
            raise ValueError(
                f"The 'coverage' parameter must be at most the largest achievable coverage "
                f"{self.coverage[-1]:.6g} ({self.n_selectable} of {self.n_samples} samples have a finite score). "
                f"Got {worst!r} instead."
            )
        out = self.risk[index]
        return float(out) if np.ndim(coverage) == 0 else out

    def coverage_at(self, risk: Any) -> float | np.ndarray:
        """Largest coverage whose selective risk is at most ``risk`` (0.0 when none is).

        This is the in-sample (hindsight) answer on the data the curve was built from; for a
        threshold with a guarantee on new data see :func:`seapig_core.risk.guaranteed_risk_threshold`.

        Parameters
        ----------
        risk : float or array-like
            Non-negative target risks.

        Returns
        -------
        float or numpy.ndarray
        """
        r = np.asarray(risk, dtype=np.float64) if _is_real_array(risk) else None
        if r is None:
            raise TypeError(f"The 'risk' parameter must be a real number or array. Got {type(risk).__name__} instead.")
        if np.any(~np.isfinite(r)) or np.any(r < 0):
            raise ValueError(f"The 'risk' parameter must be finite and >= 0. Got {risk!r} instead.")
        flat = r.reshape(-1)
        out = np.zeros(flat.shape)
        for i, value in enumerate(flat):
            ok = np.flatnonzero(self.risk <= value)
            out[i] = self.coverage[ok[-1]] if ok.size else 0.0
        return float(out[0]) if r.ndim == 0 else out.reshape(r.shape)

    def to_dict(self) -> dict[str, float | int]:
        """The scalar summaries, JSON-serialisable."""
        return {
            "aurc": self.aurc,
            "eaurc": self.eaurc,
            "augrc": self.augrc,
            "oracle_aurc": self.oracle_aurc,
            "n_samples": self.n_samples,
            "n_selectable": self.n_selectable,
            "max_coverage": float(self.coverage[-1]),
            "risk_at_max_coverage": float(self.risk[-1]),
        }


def _is_real_array(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Real):
        return True
    try:
        array = np.asarray(value)
    except Exception:  # pragma: no cover - defensive
        return False
    return array.dtype.kind in "iuf"


def _check_fractions(value: Any, name: str, low_open: bool) -> np.ndarray:
    if not _is_real_array(value):
        raise TypeError(f"The '{name}' parameter must be a real number or array. Got {type(value).__name__} instead.")
    array = np.asarray(value, dtype=np.float64)
    low_ok = array > 0.0 if low_open else array >= 0.0
    if not np.all(low_ok & (array <= 1.0)):  # also rejects NaN
        raise ValueError(f"The '{name}' parameter must be in {'(0' if low_open else '[0'}, 1]. Got {value!r} instead.")
    return array


def _check_scores_errors(scores: Any, errors: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated float64 scores and losses, and the mask of selectable (finite-score) samples."""
    s = _as_1d_float(scores, "scores")
    e = _as_1d_float(errors, "errors")
    if e.shape != s.shape:
        raise ValueError(
            f"The 'errors' parameter must have one loss per score ({s.size}). Got shape {e.shape} instead."
        )
    selectable = np.isfinite(s)
    if not selectable.any():
        raise ValueError("The 'scores' parameter must contain at least one finite score. Got none.")
    bad = selectable & ~np.isfinite(e)
    if bad.any():
        raise ValueError(
            f"The 'errors' parameter must be finite wherever the score is finite. "
            f"Got {int(bad.sum())} non-finite loss(es) (first at index {int(np.flatnonzero(bad)[0])}) instead."
        )
    return s, e, selectable


def _sorted_groups(s: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sort finite scores ascending; return distinct scores, group ends (counts), cumulative losses, sorted losses."""
    order = np.argsort(s, kind="stable")
    s_sorted, e_sorted = s[order], e[order]
    last = np.flatnonzero(np.diff(s_sorted) != 0)
    ends = np.append(last, s_sorted.size - 1)  # index of each tie group's last sample
    cum = np.cumsum(e_sorted)
    return s_sorted[ends], ends + 1, cum[ends], e_sorted


def risk_coverage(scores: Any, errors: Any) -> RiskCoverage:
    """Risk-coverage curve of an uncertainty score, with AURC, E-AURC and AUGRC.

    Samples are selected in increasing order of score (most confident first); a sample with a
    non-finite score is never selected. With ``N`` samples, ``n`` of them with a finite score,
    sorted so that ``s_(1) <= ... <= s_(n)`` with losses ``l_(i)``:

    - coverage and selective risk of threshold ``t`` (Geifman and El-Yaniv 2017):
      ``phi(t) = |{s < t}| / N`` and ``R(t) = sum_{s_i < t} l_i / |{s < t}|``; the curve has one
      point per distinct score (tied scores are selected together);
    - ``AURC = (1/N) sum_{i=1}^{n} R_i`` with ``R_i = (1/i) sum_{j<=i} l_(j)``, the sample-wise
      area of Geifman et al. (2019). Within a group of tied scores the order is undefined;
      ``R_i`` is its expectation under a uniformly random order of the tied samples, i.e. the
      cumulative loss ``sum_{j<=i} l_(j)`` is interpolated linearly inside each tie group. So
      the AURC does not depend on how ties happen to be sorted, and it is unchanged by any
      strictly increasing transformation of the scores;
    - ``E-AURC = AURC - AURC*``, where ``AURC*`` orders the samples by their loss, smallest
      first (the oracle; Geifman et al. 2019, Ding et al. 2020). Sorting by loss minimises every
      prefix sum, so ``E-AURC >= 0`` for any loss;
    - ``AUGRC = integral_0^{n/N} G(phi) dphi`` with the generalized risk
      ``G = (1/N) sum_{selected} l`` (the fraction of all samples that are selected *and* wrong;
      Traub et al. 2024), ``G`` linear between consecutive samples and inside tie groups
      (trapezoid rule). For the 0-1 loss with all scores finite, this is
      ``AUGRC = (1 - AUROC) acc (1 - acc) + (1 - acc)^2 / 2``, with ``AUROC`` the probability that
      a wrong sample scores above a correct one (ties count 1/2).

    When some scores are not finite, the curves stop at coverage ``n / N`` and the areas are
    those of the reachable part.

    Parameters
    ----------
    scores : torch.Tensor or numpy.ndarray
        ``(N,)`` uncertainty scores, higher = more uncertain; NaN/inf never selected.
    errors : torch.Tensor or numpy.ndarray
        ``(N,)`` per-sample losses, e.g. :func:`prediction_errors` (0-1 loss) or any other
        loss; finite wherever the score is finite.

    Returns
    -------
    RiskCoverage

    Raises
    ------
    TypeError
        For non-numeric inputs.
    ValueError
        For shapes that are not ``(N,)`` or differ, no finite score, or a non-finite loss
        at a finite score.

    Examples
    --------
    >>> import numpy as np
    >>> rc = risk_coverage(np.array([0.1, 0.2, 0.2, 0.9]), np.array([0, 0, 1, 1]))
    >>> rc.coverage.tolist(), rc.risk.tolist()
    ([0.25, 0.75, 1.0], [0.0, 0.3333333333333333, 0.5])
    """
    s, e, selectable = _check_scores_errors(scores, errors)
    dtype = _score_dtype(scores)
    n_total = s.size
    s_fin, e_fin = s[selectable], e[selectable]
    n = s_fin.size

    distinct, counts, cum_at_ends, _ = _sorted_groups(s_fin, e_fin)
    coverage = counts / n_total
    risk = cum_at_ends / counts
    step_up = np.nextafter(distinct.astype(dtype), np.array(np.inf, dtype=dtype))
    thresholds = step_up.astype(np.float64)

    # Expected cumulative loss at every position i = 1..n: linear inside each tie group.
    starts = np.concatenate([[0], counts[:-1]])
    cum_starts = np.concatenate([[0.0], cum_at_ends[:-1]])
    sizes = counts - starts
    group_of = np.repeat(np.arange(distinct.size), sizes)
    position = np.arange(1, n + 1)
    slope = (cum_at_ends - cum_starts) / sizes
    expected_cum = cum_starts[group_of] + (position - starts[group_of]) * slope[group_of]

    aurc = float(np.sum(expected_cum / position) / n_total)
    previous = np.concatenate([[0.0], expected_cum[:-1]])
    augrc = float(np.sum(previous + expected_cum) / (2.0 * n_total * n_total))

    oracle_cum = np.cumsum(np.sort(e_fin))
    oracle_risk = oracle_cum / position
    oracle_aurc = float(np.sum(oracle_risk) / n_total)
    # Mathematically >= 0 (see above); clip float rounding of the two sums.
    eaurc = max(aurc - oracle_aurc, 0.0)

    return RiskCoverage(
        coverage=coverage,
        risk=risk,
        thresholds=thresholds,
        aurc=aurc,
        eaurc=eaurc,
        augrc=augrc,
        oracle_aurc=oracle_aurc,
        oracle_coverage=position / n_total,
        oracle_risk=oracle_risk,
        n_samples=n_total,
        n_selectable=n,
    )
