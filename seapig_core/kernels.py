"""Pure score kernels on the canonical logit layout.

Each score is a :class:`ScoreKernel`: two small functions of one 2-D block of logits (rows are
samples, or sample-member pairs), one for the categorical family (softmax over the K units)
and one for the bernoulli family (K independent sigmoids). :func:`compute_scores` walks the
canonical tensor in row blocks that stay in cache, applies the kernel, marks rows with a
non-finite logit as NaN and averages members.

Conventions: ``beta = 1 / T`` is the inverse temperature; every score is *higher when more
uncertain*. Bernoulli kernels receive ``|z|`` for single-logit binary (see
:meth:`seapig_core.layout.CanonicalLogits.scoring_block`) and signed logits for multilabel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seapig_core.layout import CanonicalLogits, iter_row_blocks

__all__ = [
    "KERNELS",
    "ScoreKernel",
    "compute_scores",
    "predict",
    "runner_up",
]

CategoricalFn = Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]
BernoulliFn = Callable[[torch.Tensor, float, float], torch.Tensor]


@dataclass(frozen=True)
class ScoreKernel:
    """A score as a pair of block functions.

    Attributes
    ----------
    name : str
        Registry name, e.g. ``"softmax"``.
    categorical : callable
        ``(z, z_max, beta, T) -> (R,)`` for a block ``z`` of shape ``(R, K)`` and its row max.
    bernoulli : callable
        ``(z, beta, T) -> (R,)`` for a block ``z`` of shape ``(R, K)``.
    """

    name: str
    categorical: CategoricalFn
    bernoulli: BernoulliFn


# --------------------------------------------------------------------------- helpers


def _scaled_shift(z: torch.Tensor, z_max: torch.Tensor, beta: float) -> torch.Tensor:
    """``beta * (z - max z)``: non-positive, so ``exp`` never overflows. One block temporary."""
    shifted = torch.sub(z, z_max.unsqueeze(1))
    return shifted if beta == 1.0 else shifted.mul_(beta)


def _top2_gap(z: torch.Tensor) -> torch.Tensor:
    """Gap between the largest and second-largest entry of each row (0 on ties)."""
    top = torch.topk(z, 2, dim=1, sorted=True).values
    return top[:, 0] - top[:, 1]


def _min_abs(z: torch.Tensor) -> torch.Tensor:
    """Smallest logit magnitude of each row: the label closest to its decision boundary."""
    return z.abs().amin(dim=1)


def _bernoulli_entropy_of_abs(a: torch.Tensor) -> torch.Tensor:
    """Entropy of ``Bernoulli(sigmoid(a))`` for ``a >= 0``, without cancellation.

    ``H = softplus(-a) + a * sigmoid(-a)``; both terms decay like ``a * exp(-a)``.
    """
    return F.softplus(-a) + a * torch.sigmoid(-a)


# --------------------------------------------------------------------------- softmax


def _softmax_categorical(z, z_max, beta, T):
    # -max_k softmax(beta z)_k = -1 / sum_k exp(beta (z_k - z_max))
    return torch.sum(_scaled_shift(z, z_max, beta).exp_(), dim=1).reciprocal_().neg_()


def _softmax_bernoulli(z, beta, T):
    # -min_c max(p_c, 1 - p_c) with p = sigmoid(beta z); max(p, 1 - p) = sigmoid(beta |z|)
    return torch.sigmoid(_min_abs(z) * beta).neg_()


# --------------------------------------------------------------------------- entropy


def _entropy_categorical(z, z_max, beta, T):
    # H = log S - sum_k e_k d_k / S, with d = beta (z - z_max), e = exp(d), S = sum e
    d = _scaled_shift(z, z_max, beta)
    e = torch.exp(d)
    total = e.sum(dim=1)
    weighted = e.mul_(d).sum(dim=1)
    return torch.log(total).sub_(weighted.div_(total))


def _entropy_bernoulli(z, beta, T):
    # Largest per-label Bernoulli entropy = entropy of the label with the smallest |z|.
    return _bernoulli_entropy_of_abs(_min_abs(z) * beta)


# --------------------------------------------------------------------------- energy


def _energy_categorical(z, z_max, beta, T):
    # -T logsumexp(beta z) = -(z_max + T log sum exp(beta (z - z_max)))
    log_total = torch.sum(_scaled_shift(z, z_max, beta).exp_(), dim=1).log_()
    return log_total.mul_(T).add_(z_max).neg_()


def _energy_bernoulli(z, beta, T):
    # -T sum_c softplus(beta z_c); single-logit binary receives |z|.
    return F.softplus(z * beta).sum(dim=1).mul_(-T)


# --------------------------------------------------------------------------- margin


def _margin_categorical(z, z_max, beta, T):
    # -(z_(1) - z_(2)) / T
    return _top2_gap(z).mul_(-beta)


def _margin_bernoulli(z, beta, T):
    # -min_c |z_c| / T: the logit of a label is its margin against the boundary.
    return _min_abs(z).mul_(-beta)


# --------------------------------------------------------------------------- max logit


def _max_logit_categorical(z, z_max, beta, T):
    return z_max * (-beta)


def _max_logit_bernoulli(z, beta, T):
    # -max_c z_c / T; single-logit binary receives |z|, so it scores -|z| / T.
    return z.amax(dim=1).mul_(-beta)


# --------------------------------------------------------------------------- certainty ratio


def _certainty_ratio_categorical(z, z_max, beta, T):
    # p_(2) / p_(1) = exp(-beta (z_(1) - z_(2))), never a division of probabilities.
    return _top2_gap(z).mul_(-beta).exp_()


def _certainty_ratio_bernoulli(z, beta, T):
    # min(p, 1 - p) / max(p, 1 - p) = exp(-beta |z|); the largest over labels.
    return _min_abs(z).mul_(-beta).exp_()


KERNELS: dict[str, ScoreKernel] = {
    kernel.name: kernel
    for kernel in (
        ScoreKernel("softmax", _softmax_categorical, _softmax_bernoulli),
        ScoreKernel("entropy", _entropy_categorical, _entropy_bernoulli),
        ScoreKernel("energy", _energy_categorical, _energy_bernoulli),
        ScoreKernel("margin", _margin_categorical, _margin_bernoulli),
        ScoreKernel("max_logit", _max_logit_categorical, _max_logit_bernoulli),
        ScoreKernel("certainty_ratio", _certainty_ratio_categorical, _certainty_ratio_bernoulli),
    )
}


# --------------------------------------------------------------------------- drivers


def compute_scores(canon: CanonicalLogits, kernel: ScoreKernel, temperature: float = 1.0) -> torch.Tensor:
    """Score every sample of ``canon`` with ``kernel`` at ``temperature``.

    Parameters
    ----------
    canon : CanonicalLogits
        Validated logits.
    kernel : ScoreKernel
        The score.
    temperature : float
        ``T > 0``; logits are divided by it.

    Returns
    -------
    torch.Tensor
        ``(N,)`` scores in the logits' float dtype and device; NaN for a sample with any
        non-finite logit; the mean over members when ``M > 1``.
    """
    T = float(temperature)
    beta = 1.0 / T
    n, m = canon.n_samples, canon.n_members
    out = torch.empty(n, dtype=canon.values.dtype, device=canon.values.device)
    categorical = canon.family == "categorical"
    for start, stop in iter_row_blocks(n, canon.block_rows()):
        z = canon.scoring_block(start, stop)
        z_min, z_max = torch.aminmax(z, dim=1)
        scores = kernel.categorical(z, z_max, beta, T) if categorical else kernel.bernoulli(z, beta, T)
        # NaN propagates through min/max, so this also catches NaN logits.
        scores = scores.masked_fill_(~(torch.isfinite(z_min) & torch.isfinite(z_max)), float("nan"))
        out[start:stop] = scores if m == 1 else scores.view(-1, m).mean(dim=1)
    return out


def _mean_probabilities(block: torch.Tensor, family: str, beta: float) -> torch.Tensor:
    """Member-averaged predictive probabilities of a ``(B, K, M)`` block: ``(B, K)``."""
    scaled = block * beta
    probs = scaled.softmax(dim=1) if family == "categorical" else scaled.sigmoid()
    return probs.mean(dim=2)


def _finite_samples(block: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(block).flatten(1).all(dim=1)


def predict(canon: CanonicalLogits, temperature: float = 1.0) -> torch.Tensor:
    """Predicted labels from the member-averaged probabilities.

    Returns
    -------
    torch.Tensor
        int64. Categorical and binary: ``(N,)`` class indices (single-logit binary: 1 where
        ``p > 0.5``). Multilabel: ``(N, K)`` 0/1. ``-1`` marks samples with non-finite logits.
    """
    beta = 1.0 / float(temperature)
    multilabel = canon.family == "bernoulli" and not canon.single_logit
    shape = (canon.n_samples, canon.n_units) if multilabel else (canon.n_samples,)
    out = torch.empty(shape, dtype=torch.int64, device=canon.values.device)
    for start, stop in iter_row_blocks(canon.n_samples, canon.block_rows()):
        block = canon.values[start:stop]
        if canon.family == "categorical":
            # With one member the argmax of the logits is the argmax of the probabilities.
            source = block[:, :, 0] if canon.n_members == 1 else _mean_probabilities(block, "categorical", beta)
            pred = source.argmax(dim=1)
        else:
            pred = (_mean_probabilities(block, "bernoulli", beta) > 0.5).to(torch.int64)
            if canon.single_logit:
                pred = pred[:, 0]
        finite = _finite_samples(block)
        out[start:stop] = pred.masked_fill_(~(finite.view(-1, 1) if multilabel else finite), -1)
    return out


def runner_up(canon: CanonicalLogits, temperature: float = 1.0) -> torch.Tensor:
    """The alternate label: the class a sample would flip to, ``(N,)`` int64.

    Categorical: the second most probable class of the member-averaged distribution.
    Single-logit binary: the class not predicted. Multilabel: the label closest to its
    decision boundary (largest ``min(p, 1 - p)``). ``-1`` marks non-finite samples.
    """
    beta = 1.0 / float(temperature)
    out = torch.empty(canon.n_samples, dtype=torch.int64, device=canon.values.device)
    for start, stop in iter_row_blocks(canon.n_samples, canon.block_rows()):
        block = canon.values[start:stop]
        if canon.family == "categorical":
            source = block[:, :, 0] if canon.n_members == 1 else _mean_probabilities(block, "categorical", beta)
            alt = torch.topk(source, 2, dim=1).indices[:, 1]
        else:
            probs = _mean_probabilities(block, "bernoulli", beta)
            if canon.single_logit:
                alt = (probs[:, 0] <= 0.5).to(torch.int64)
            else:
                alt = torch.minimum(probs, 1.0 - probs).argmax(dim=1)
        out[start:stop] = alt.masked_fill_(~_finite_samples(block), -1)
    return out
