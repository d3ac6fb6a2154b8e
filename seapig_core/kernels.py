"""Pure score kernels on the canonical logit layout.

Each score is a :class:`ScoreKernel`: two small functions of one 2-D block of logits (rows are
samples, or sample-member pairs), one for the categorical family (softmax over the K units)
and one for the bernoulli family (K independent sigmoids). :func:`compute_scores` walks the
canonical tensor in row blocks that stay in cache, applies the kernel, marks rows with a
non-finite logit as NaN and averages members.

Conventions: ``beta = 1 / T`` is the inverse temperature; every score is *higher when more
uncertain*. Bernoulli kernels receive ``|z|`` for single-logit binary (see
:meth:`seapig_core.layout.CanonicalLogits.scoring_block`) and signed logits for multilabel.

Performance notes (1M x 100 float32 on the project's 2-core machines; see
``benchmarks/bench_scores.py``): a fresh block-sized temporary costs more than the arithmetic on
it (a ~1 MiB allocation comes as new pages, i.e. page faults), so kernels write block
temporaries into a :class:`Workspace` that :func:`compute_scores` reuses across blocks
(slots 0 and 1: the kernels; slot 2: the driver's unrolled members). ``torch.topk``,
``torch.aminmax`` and ``torch.isfinite`` along rows each cost several plain float passes, so
the top-2 gap and the finiteness test are built from ``eq``/``sub``/``amax``/``sum`` instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seapig_core.layout import CanonicalLogits, iter_row_blocks

__all__ = [
    "KERNELS",
    "ScoreKernel",
    "Workspace",
    "compute_scores",
    "predict",
    "runner_up",
]


class Workspace:
    """Scratch buffers for block temporaries, reused across the row blocks of one call.

    Slot ``i`` is one flat buffer; :meth:`take` returns a contiguous view of it shaped like the
    requested block, growing the buffer only when a block is larger than any before.
    """

    def __init__(self) -> None:
        self._slots: dict[int, torch.Tensor] = {}

    def take(self, slot: int, like: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """A contiguous scratch tensor with the dtype and device of ``like`` and its shape (or
        ``shape``); its contents are undefined."""
        shape = tuple(like.shape) if shape is None else tuple(shape)
        n = math.prod(shape)
        buf = self._slots.get(slot)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(n, dtype=like.dtype, device=like.device)
            self._slots[slot] = buf
        return buf[:n].view(shape)


def _scratch(work: Workspace | None, slot: int, like: torch.Tensor) -> torch.Tensor:
    """Slot ``slot`` of ``work``, or a fresh tensor when a kernel is called on its own."""
    return torch.empty_like(like, memory_format=torch.contiguous_format) if work is None else work.take(slot, like)


CategoricalFn = Callable[..., torch.Tensor]
BernoulliFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class ScoreKernel:
    """A score as a pair of block functions.

    Attributes
    ----------
    name : str
        Registry name, e.g. ``"softmax"``.
    categorical : callable
        ``(z, z_max, beta, T, work=None) -> (R,)`` for a block ``z`` of shape ``(R, K)`` and its
        row max; ``work`` is an optional :class:`Workspace` for block temporaries.
    bernoulli : callable
        ``(z, beta, T, work=None) -> (R,)`` for a block ``z`` of shape ``(R, K)``.
    """

    name: str
    categorical: CategoricalFn
    bernoulli: BernoulliFn


# --------------------------------------------------------------------------- helpers


def _scaled_shift(z: torch.Tensor, z_max: torch.Tensor, beta: float, work: Workspace | None) -> torch.Tensor:
    """``beta * (z - max z)`` in scratch slot 0: non-positive, so ``exp`` never overflows."""
    shifted = torch.sub(z, z_max.unsqueeze(1), out=_scratch(work, 0, z))
    return shifted if beta == 1.0 else shifted.mul_(beta)


def _top2_gap(z: torch.Tensor, z_max: torch.Tensor, work: Workspace | None) -> torch.Tensor:
    """Gap between the largest and second-largest entry of each row (0 on ties).

    Float passes only (``torch.topk(z, 2)`` is ~10x slower here): mark the row maxima, push them
    to ``-finfo.max`` (``0 * finfo.max = 0`` leaves every other entry exact), and take the row max
    of ``z - z_max`` again, which is ``z_(2) - z_(1)``. A repeated maximum means a gap of 0.
    """
    is_max = torch.eq(z, z_max.unsqueeze(1), out=_scratch(work, 1, z))  # 1.0 at the row maxima
    n_max = is_max.sum(dim=1)
    shifted = torch.sub(z, z_max.unsqueeze(1), out=_scratch(work, 0, z))
    runner_up = shifted.sub_(is_max, alpha=torch.finfo(z.dtype).max).amax(dim=1)
    return runner_up.neg_().masked_fill_(n_max > 1, 0.0)


def _min_abs(z: torch.Tensor, work: Workspace | None) -> torch.Tensor:
    """Smallest logit magnitude of each row: the label closest to its decision boundary."""
    return torch.abs(z, out=_scratch(work, 0, z)).amin(dim=1)


def _bernoulli_entropy_of_abs(a: torch.Tensor) -> torch.Tensor:
    """Entropy of ``Bernoulli(sigmoid(a))`` for ``a >= 0``, without cancellation.

    ``H = softplus(-a) + a * sigmoid(-a)``; both terms decay like ``a * exp(-a)``.
    """
    return F.softplus(-a) + a * torch.sigmoid(-a)


# --------------------------------------------------------------------------- softmax


def _softmax_categorical(z, z_max, beta, T, work=None):
    # -max_k softmax(beta z)_k = -1 / sum_k exp(beta (z_k - z_max))
    return torch.sum(_scaled_shift(z, z_max, beta, work).exp_(), dim=1).reciprocal_().neg_()


def _softmax_bernoulli(z, beta, T, work=None):
    # -min_c max(p_c, 1 - p_c) with p = sigmoid(beta z); max(p, 1 - p) = sigmoid(beta |z|)
    return torch.sigmoid(_min_abs(z, work) * beta).neg_()


# --------------------------------------------------------------------------- entropy


def _entropy_categorical(z, z_max, beta, T, work=None):
    # H = log S - sum_k e_k d_k / S, with d = beta (z - z_max), e = exp(d), S = sum e
    d = _scaled_shift(z, z_max, beta, work)
    e = torch.exp(d, out=_scratch(work, 1, z))
    total = e.sum(dim=1)
    weighted = e.mul_(d).sum(dim=1)
    return torch.log(total).sub_(weighted.div_(total))


def _entropy_bernoulli(z, beta, T, work=None):
    # Largest per-label Bernoulli entropy = entropy of the label with the smallest |z|.
    return _bernoulli_entropy_of_abs(_min_abs(z, work) * beta)


# --------------------------------------------------------------------------- energy


def _energy_categorical(z, z_max, beta, T, work=None):
    # -T logsumexp(beta z) = -(z_max + T log sum exp(beta (z - z_max)))
    log_total = torch.sum(_scaled_shift(z, z_max, beta, work).exp_(), dim=1).log_()
    return log_total.mul_(T).add_(z_max).neg_()


def _energy_bernoulli(z, beta, T, work=None):
    # -T sum_c softplus(beta z_c); single-logit binary receives |z|.
    # softplus(x) = logaddexp(x, 0), which (unlike F.softplus) can write into scratch.
    scaled = z if beta == 1.0 else torch.mul(z, beta, out=_scratch(work, 0, z))
    softplus = torch.logaddexp(scaled, z.new_zeros(()), out=_scratch(work, 1, z))
    return softplus.sum(dim=1).mul_(-T)


# --------------------------------------------------------------------------- margin


def _margin_categorical(z, z_max, beta, T, work=None):
    # -(z_(1) - z_(2)) / T
    return _top2_gap(z, z_max, work).mul_(-beta)


def _margin_bernoulli(z, beta, T, work=None):
    # -min_c |z_c| / T: the logit of a label is its margin against the boundary.
    return _min_abs(z, work).mul_(-beta)


# --------------------------------------------------------------------------- max logit


def _max_logit_categorical(z, z_max, beta, T, work=None):
    return z_max * (-beta)


def _max_logit_bernoulli(z, beta, T, work=None):
    # -max_c z_c / T; single-logit binary receives |z|, so it scores -|z| / T.
    return z.amax(dim=1).mul_(-beta)


# --------------------------------------------------------------------------- certainty ratio


def _certainty_ratio_categorical(z, z_max, beta, T, work=None):
    # p_(2) / p_(1) = exp(-beta (z_(1) - z_(2))), never a division of probabilities.
    return _top2_gap(z, z_max, work).mul_(-beta).exp_()


def _certainty_ratio_bernoulli(z, beta, T, work=None):
    # min(p, 1 - p) / max(p, 1 - p) = exp(-beta |z|); the largest over labels.
    return _min_abs(z, work).mul_(-beta).exp_()


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
    work = Workspace()  # block temporaries, reused by every block of this call
    for start, stop in iter_row_blocks(n, canon.block_rows()):
        # Several members are unrolled by a copy: into scratch slot 2, reused by every block.
        unrolled = None if m == 1 else work.take(2, canon.values, ((stop - start) * m, canon.n_units))
        z = canon.scoring_block(start, stop, out=unrolled)
        if categorical:
            scores = kernel.categorical(z, z.amax(dim=1), beta, T, work)
        else:
            scores = kernel.bernoulli(z, beta, T, work)
        scores = _nan_where_not_finite(scores, z)
        out[start:stop] = scores if m == 1 else scores.view(-1, m).mean(dim=1)
    return out


def _nan_where_not_finite(scores: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Set ``scores`` to NaN, in place, on the rows of ``z`` that hold a NaN or an infinity.

    The sum of a block is finite unless it holds a non-finite value (or the sum overflows), so
    on the CPU one fast reduction clears a block in the usual case (``isfinite`` on the block,
    or ``amin``/``amax`` of it, costs several times more); a block that fails it gets the exact
    per-row test. Elsewhere the exact test runs always, to avoid a device sync per block.
    """
    if z.device.type == "cpu" and math.isfinite(float(z.sum())):
        return scores
    return scores.masked_fill_(~torch.isfinite(z).all(dim=1), float("nan"))


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
