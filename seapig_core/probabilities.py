"""Probabilities as input: the one owner of turning predicted probabilities into logits.

Many models and tools hand out probabilities rather than logits (``predict_proba``, a
softmax layer baked into the model, Renumics Spotlight's ``probabilities`` column). Every
score, temperature fit, threshold and metric of seapig-core works on logits;
:func:`logits_from_probabilities` gives logits whose softmax (or sigmoid) is the given
probabilities, so that all of them apply unchanged. The DataFrame functions
(:mod:`seapig_core.dataframe`) and the pipeline's probability inputs call it.

The logits
----------
- categorical (``task="multiclass"``, or ``task="binary"`` with two columns):
  ``z_k = log p_k``. Softmax is shift-invariant, so ``softmax(z) = p / sum(p) = p``.
- bernoulli (``task="binary"`` with one probability per sample, the probability of class 1;
  ``task="multilabel"`` with one independent probability per label):
  ``z = log p - log(1 - p)``, the inverse of the sigmoid, so ``sigmoid(z) = p``.

Zeros (and ones, for the sigmoid) have no finite logit: ``log 0 = -inf``, and the library
treats a sample with a non-finite logit as invalid (its scores are NaN, it is never selected,
calibration refuses it). A probability of exactly 0 is common (float32 softmax underflows
below ``exp(-104)``) and is a valid prediction, so it is **clipped** to ``eps`` before the log
instead: by default the smallest positive normal number of the dtype (float32: ``1.2e-38``,
``log = -87.3``; float64: ``2.2e-308``, ``log = -708.4``). The clip adds at most ``K * eps`` to
a row's sum, far below the dtype's resolution, so the round trip gives ``p`` back to rounding
(a zero comes back as a value of order ``eps``). Keeping ``-inf`` was rejected: every score
kernel would have to special-case it, and a class of probability 0 would make the whole sample
unscorable.

Temperature on log-probabilities
--------------------------------
Dividing these logits by ``T`` raises the probabilities to the power ``1/T`` and renormalises:
``softmax(log p / T)_k = p_k^(1/T) / sum_j p_j^(1/T)`` (sigmoid:
``p^(1/T) / (p^(1/T) + (1 - p)^(1/T))``). ``T > 1`` flattens the distribution, ``T < 1``
sharpens it, and the ranking of the classes never changes; a temperature fitted on
``log p`` is the same power calibration. A clipped zero becomes ``eps^(1/T)`` before
renormalising: negligible for the default ``eps`` up to ``T`` of about 5 in float32 (``2e-8``)
and far beyond in float64 (``T = 10``: ``2e-31``); at ``T = 10`` in float32 it is ``1.6e-4``
per zero class, so pass float64 probabilities when fitting large temperatures on data with
many exact zeros.

Scores that need the model's own logits lose their meaning on ``log p``: the softmax
normalisation removes the logits' offset, which is what the energy score measures (energy of
``log p`` at ``T = 1`` is ``-log sum p = 0`` for every sample, and at other temperatures it
orders by a Rényi entropy with a sign that flips at ``T = 1``), and ``max_logit`` becomes
``-log p_(1)``, which ranks exactly like the softmax score. ``softmax``, ``entropy``,
``margin`` (``-log(p_(1) / p_(2)) / T``), ``certainty_ratio`` (``(p_(2) / p_(1))^(1/T)``) and
``probability_margin`` keep their meaning.

Validation
----------
Probabilities must be finite and in ``[0, 1]``; categorical rows (each member's, with
``per_member=True``) must sum to 1 within ``SUM_TOLERANCE`` = ``sqrt(float32 eps)`` (about
``3.5e-4``), the relative tolerance scikit-learn's ``log_loss`` uses for float32, applied to
float64 input as well because probabilities are often float32 values stored as float64. Rows
that sum to 1 only within that tolerance are used as ``p / sum(p)`` (softmax renormalises).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from seapig_core._validation import check_bool
from seapig_core.layout import as_float_tensor, canonicalize, check_task

__all__ = ["SUM_TOLERANCE", "check_probabilities", "logits_from_probabilities"]

#: Largest accepted ``|sum_k p_k - 1|`` of a categorical row: ``sqrt(float32 eps)``.
SUM_TOLERANCE: float = math.sqrt(float(torch.finfo(torch.float32).eps))


def _rows(mask: torch.Tensor) -> tuple[int, int]:
    """Count and first index of the samples (dim 0) with any True in ``mask``."""
    bad = mask.reshape(mask.shape[0], -1).any(dim=1)
    return int(bad.sum()), int(torch.nonzero(bad)[0, 0])


def check_probabilities(
    p: Any,
    task: str = "multiclass",
    per_member: bool = False,
    *,
    name: str = "p",
    what: str = "parameter",
) -> tuple[torch.Tensor, bool]:
    """Validate probabilities for ``task``; return them as a float tensor and the family flag.

    Parameters
    ----------
    p : torch.Tensor, numpy.ndarray or sequence
        Probabilities shaped like logits for ``task`` (see :mod:`seapig_core.layout`).
    task : {"multiclass", "binary", "multilabel"}
    per_member : bool
        A trailing member axis.
    name : str
        The argument (or column) named in error messages.
    what : str
        ``"parameter"`` or ``"column"``, for the messages.

    Returns
    -------
    tuple
        ``(probabilities, categorical)``: the input as a floating tensor (half precision and
        integers become float32; no copy otherwise) and whether rows sum to 1 (softmax
        family) rather than holding independent probabilities (sigmoid family).

    Raises
    ------
    TypeError
        For non-numeric input.
    ValueError
        For a shape that does not fit ``task``, NaN or infinite values, values outside
        ``[0, 1]``, or categorical rows that do not sum to 1 within :data:`SUM_TOLERANCE`.
    """
    task = check_task(task)
    per_member = check_bool(per_member, "per_member")
    x = as_float_tensor(p, name)
    canon = canonicalize(x, task, per_member, name=name)  # shape checks only
    label = f"The '{name}' {what}"
    low, high = torch.aminmax(x) if x.numel() else (x.new_zeros(()), x.new_zeros(()))
    if not (float(low) >= 0.0 and float(high) <= 1.0):  # NaN fails too; one pass when all is well
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            count, first = _rows(~finite)
            raise ValueError(
                f"{label} must contain only finite probabilities. "
                f"Got {count} sample(s) with NaN or infinite values (first at row {first}) instead."
            )
        count, first = _rows((x < 0) | (x > 1))
        raise ValueError(
            f"{label} must contain probabilities in [0, 1]. Got values in "
            f"[{float(low):.6g}, {float(high):.6g}] ({count} sample(s) outside, first at row {first}) instead. "
            f"Pass logits as logits, not as probabilities."
        )
    categorical = canon.family == "categorical"
    if categorical:
        # In the input's dtype: its rounding (K eps) is far below the tolerance.
        sums = canon.values.sum(dim=1)  # (N, M)
        off = (sums - 1.0).abs() > SUM_TOLERANCE
        if bool(off.any()):
            count, first = _rows(off)
            worst = float((sums - 1.0).abs().max())
            hint = (
                " For independent per-label probabilities use task='multilabel'."
                if task == "multiclass"
                else ""
            )
            raise ValueError(
                f"{label} must hold rows that sum to 1 (within {SUM_TOLERANCE:.2g}) for task={task!r}. "
                f"Got {count} row(s) off by up to {worst:.3g} (first at row {first}) instead.{hint}"
            )
    return x, categorical


def logits_from_probabilities(
    p: Any,
    task: str = "multiclass",
    *,
    eps: float | None = None,
    per_member: bool = False,
    name: str = "p",
) -> torch.Tensor:
    """Logits whose softmax (or sigmoid) gives the probabilities ``p`` back.

    Categorical (multiclass, or binary with two columns): ``log p``; bernoulli (binary with
    the probability of class 1 per sample, or multilabel): ``log p - log(1 - p)``. Zeros are
    clipped to ``eps`` first (see the module docstring for why, and for what a temperature
    means on these logits). The result has the shape of ``p``, so it is passed to every score,
    fit and metric with the same ``task`` and ``per_member``.

    Parameters
    ----------
    p : torch.Tensor, numpy.ndarray or sequence
        Probabilities shaped like the logits of ``task``: ``(N, C)`` multiclass/multilabel,
        ``(N,)``/``(N, 1)`` (probability of class 1) or ``(N, 2)`` binary; a trailing member
        axis with ``per_member=True``.
    task : {"multiclass", "binary", "multilabel"}, default "multiclass"
    eps : float or None, default None
        Probabilities below ``eps`` (and, for the sigmoid, above ``1 - eps``) are clipped to it
        before the log. None: the smallest positive normal number of the dtype.
    per_member : bool, default False
        A trailing member axis (ensemble members or stochastic passes).
    name : str, default "p"
        The argument named in error messages.

    Returns
    -------
    torch.Tensor
        Finite logits, the shape of ``p``, in its floating dtype (float32 for half precision
        and integer input).

    Raises
    ------
    TypeError, ValueError
        As :func:`check_probabilities`; and for an ``eps`` that is not a float in
        ``(0, 0.5)``.

    Examples
    --------
    >>> import torch
    >>> p = torch.tensor([[0.7, 0.2, 0.1], [0.0, 0.5, 0.5]], dtype=torch.float64)
    >>> z = logits_from_probabilities(p)
    >>> bool(torch.allclose(z.softmax(dim=1), p, atol=1e-300, rtol=1e-15))
    True
    >>> q = torch.tensor([0.0, 0.25, 1.0])
    >>> z = logits_from_probabilities(q, task="binary")
    >>> [round(v, 1) for v in z.tolist()], [round(v, 6) for v in z.sigmoid().tolist()]
    ([-87.3, -1.1, 87.3], [0.0, 0.25, 1.0])
    """
    x, categorical = check_probabilities(p, task, per_member, name=name)
    floor = _check_eps(eps, x.dtype)
    if categorical:
        return torch.log(torch.clamp(x, min=floor))
    # log p - log(1 - p); log1p(-p) is exact-er below 1/2, and 1 - p is exact above it.
    log_p = torch.log(torch.clamp(x, min=floor))
    log_q = torch.where(x < 0.5, torch.log1p(-x), torch.log(torch.clamp(1.0 - x, min=floor)))
    return log_p - log_q


def _check_eps(eps: Any, dtype: torch.dtype) -> float:
    if eps is None:
        return float(torch.finfo(dtype).tiny)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"The 'eps' parameter must be a float in (0, 0.5) or None. Got {type(eps).__name__} instead.")
    value = float(eps)
    if not (0.0 < value < 0.5):
        raise ValueError(f"The 'eps' parameter must be in (0, 0.5). Got {eps!r} instead.")
    return value
