"""Temperature scaling: the exact NLL-minimising temperature on labelled logits.

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017)
divides the logits by one scalar ``T > 0`` fitted by minimising the negative log-likelihood
(NLL) of held-out labels.

Why this is exact and deterministic: written in the inverse temperature ``beta = 1 / T``, the
NLL is *convex*:

- categorical (multiclass, two-logit binary): ``NLL(beta) = mean[logsumexp(beta z) - beta z_y]``,
  ``NLL' = mean[E_p z - z_y]`` and ``NLL'' = mean[Var_p z] >= 0`` with ``p = softmax(beta z)``;
- bernoulli (single-logit binary, multilabel): ``NLL(beta) = mean_n sum_c [softplus(beta z) - y beta z]``,
  ``NLL' = mean_n sum_c (sigmoid(beta z) - y) z`` and ``NLL'' = mean_n sum_c sigmoid(1 - sigmoid) z^2``.

So the minimiser on the bounded interval ``T in [T_MIN, T_MAX]`` is either a bound (when the
derivative has one sign on the interval) or the unique root of ``NLL'``, found by a safeguarded
Newton iteration (bisection on a log scale whenever Newton would leave the bracket). Everything
is computed in float64 in row blocks (shared out to threads like the score kernels). If the
iteration does not converge,
:class:`TemperatureFitError` is raised; there is no silent fallback.

Degenerate data stay finite: if the NLL does not depend on ``T`` (every row's logits equal),
``T = 1``; if it decreases all the way to a bound (perfectly separated data), ``T`` is that bound.

The multilabel NLL sums the per-label binary cross-entropies of a sample (the log-likelihood of
its label vector) and averages over samples; with ``per_member=True`` every member is one more
row with the same label, so the temperature is fitted on all members.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from seapig_core.kernels import run_blocks
from seapig_core.layout import CanonicalLogits, flatten_members

__all__ = [
    "T_MAX",
    "T_MIN",
    "TemperatureFit",
    "TemperatureFitError",
    "fit_temperature",
    "negative_log_likelihood",
]

#: Smallest temperature considered. Perfectly separated data end here.
T_MIN = 1e-3
#: Largest temperature considered.
T_MAX = 1e3

_MAX_ITER = 200
# Stop when the bracket on beta is this tight (relative); the NLL error is then ~1e-26 * NLL''.
_REL_TOL = 1e-13


class TemperatureFitError(RuntimeError):
    """The temperature optimiser did not converge; no temperature was set."""


@dataclass(frozen=True)
class TemperatureFit:
    """Result of :func:`fit_temperature`.

    Attributes
    ----------
    temperature : float
        The fitted ``T``.
    nll_before : float
        NLL at ``T = 1`` (the raw logits), in nats per sample.
    nll_after : float
        NLL at the fitted ``T``.
    iterations : int
        Newton/bisection steps taken.
    at_bound : bool
        True if the optimum lies on ``T_MIN`` or ``T_MAX`` (the NLL was still decreasing there).
    """

    temperature: float
    nll_before: float
    nll_after: float
    iterations: int
    at_bound: bool

    def to_dict(self) -> dict[str, float | int | bool]:
        """A JSON-serialisable copy."""
        return asdict(self)


def _rows_and_labels(canon: CanonicalLogits, labels: torch.Tensor, start: int, stop: int):
    """Float64 2-D block of rows ``start:stop`` (members unrolled) and the matching labels."""
    z = flatten_members(canon.values[start:stop]).to(device="cpu", dtype=torch.float64)
    y = labels[start:stop]
    if canon.n_members > 1:
        y = y.repeat_interleave(canon.n_members, dim=0)
    return z, y


def _nll_and_derivatives(canon: CanonicalLogits, labels: torch.Tensor, beta: float) -> tuple[float, float, float]:
    """``(NLL, dNLL/dbeta, d2NLL/dbeta2)`` at ``beta``, means over all rows, in float64.

    Row blocks are shared out to single-threaded workers (:func:`seapig_core.kernels.run_blocks`:
    robust on a busy host); the per-block sums are added exactly (``math.fsum``), so the result
    does not depend on the threads or the order.
    """
    n_rows = canon.n_samples * canon.n_members
    block = max(64, canon.block_rows() // 2)  # float64 doubles the bytes per row
    n_blocks = -(-canon.n_samples // block)
    partial = torch.zeros(max(n_blocks, 1), 3, dtype=torch.float64)

    def one_block(start: int, stop: int, work) -> None:
        z, y = _rows_and_labels(canon, labels, start, stop)
        if canon.family == "categorical":
            z_max = z.amax(dim=1, keepdim=True)
            d = z - z_max  # <= 0
            e = torch.exp(beta * d)
            total = e.sum(dim=1, keepdim=True)
            p = e / total
            mean_d = (p * d).sum(dim=1, keepdim=True)
            d_y = d.gather(1, y.view(-1, 1))
            nll = (torch.log(total) - beta * d_y).sum()
            grad = (mean_d - d_y).sum()
            curv = (p * (d - mean_d).square()).sum()
        else:
            bz = beta * z
            nll = (F.softplus(bz) - y * bz).sum()
            s = torch.sigmoid(bz)
            grad = ((s - y) * z).sum()
            curv = (s * (1.0 - s) * z.square()).sum()
        partial[start // block] = torch.stack((nll, grad, curv))

    run_blocks(canon.n_samples, block, one_block)
    nll, grad, curv = (math.fsum(column) for column in partial.T.tolist())  # exact: order-free
    return nll / n_rows, grad / n_rows, curv / n_rows


def negative_log_likelihood(canon: CanonicalLogits, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """NLL of canonical ``labels`` (see :func:`seapig_core.layout.check_labels`) at ``temperature``.

    Returns
    -------
    float
        Nats per sample (and per member): cross-entropy for categorical logits, the summed
        per-label binary cross-entropy for bernoulli logits.
    """
    return _nll_and_derivatives(canon, labels, 1.0 / float(temperature))[0]


def fit_temperature(
    canon: CanonicalLogits,
    labels: torch.Tensor,
    bounds: tuple[float, float] = (T_MIN, T_MAX),
) -> TemperatureFit:
    """Fit the NLL-minimising temperature within ``bounds``.

    Parameters
    ----------
    canon : CanonicalLogits
        Finite calibration logits.
    labels : torch.Tensor
        Canonical labels from :func:`seapig_core.layout.check_labels`.
    bounds : tuple of float
        ``(T_min, T_max)`` with ``0 < T_min < T_max``.

    Returns
    -------
    TemperatureFit

    Raises
    ------
    ValueError
        For invalid bounds.
    TemperatureFitError
        If the NLL is not finite or the iteration does not converge.
    """
    t_min, t_max = (float(b) for b in bounds)
    if not (0.0 < t_min < t_max < math.inf):
        raise ValueError(f"The 'bounds' parameter must satisfy 0 < T_min < T_max < inf. Got {bounds!r} instead.")
    lo, hi = 1.0 / t_max, 1.0 / t_min  # bracket on beta

    def evaluate(beta: float) -> tuple[float, float, float]:
        value = _nll_and_derivatives(canon, labels, beta)
        if not all(math.isfinite(v) for v in value):
            raise TemperatureFitError(
                f"The NLL is not finite at T={1.0 / beta:g}; cannot fit a temperature on these logits."
            )
        return value

    nll_before, grad, curv = evaluate(1.0)
    beta, iterations, at_bound = 1.0, 0, False

    if grad == 0.0 and curv == 0.0:
        # The NLL does not depend on T (all logits of every row are equal): keep T = 1.
        pass
    else:
        if not lo <= beta <= hi:
            beta = math.sqrt(lo * hi)
            _, grad, curv = evaluate(beta)
        if grad > 0.0:
            hi = beta
            _, g_lo, _ = evaluate(lo)
            if g_lo >= 0.0:
                beta, at_bound = lo, True
        elif grad < 0.0:
            lo = beta
            _, g_hi, _ = evaluate(hi)
            if g_hi <= 0.0:
                beta, at_bound = hi, True
        if not at_bound and grad != 0.0:
            beta, iterations = _newton_in_bracket(evaluate, beta, grad, curv, lo, hi)

    nll_after = nll_before if beta == 1.0 else evaluate(beta)[0]
    return TemperatureFit(1.0 / beta, nll_before, nll_after, iterations, at_bound)


def _newton_in_bracket(evaluate, beta: float, grad: float, curv: float, lo: float, hi: float) -> tuple[float, int]:
    """Root of the nondecreasing derivative in ``[lo, hi]`` (``grad(lo) < 0 < grad(hi)``)."""
    for iteration in range(1, _MAX_ITER + 1):
        step_ok = curv > 0.0
        candidate = beta - grad / curv if step_ok else math.nan
        if not (step_ok and lo < candidate < hi):
            candidate = math.sqrt(lo * hi)  # bisection on a log scale
        beta = candidate
        _, grad, curv = evaluate(beta)
        if grad > 0.0:
            hi = beta
        elif grad < 0.0:
            lo = beta
        else:
            return beta, iteration
        if hi - lo <= _REL_TOL * beta:
            return beta, iteration
        if curv > 0.0 and abs(grad / curv) <= _REL_TOL * beta:
            # The Newton step is below float64 resolution of beta: converged.
            return beta, iteration
    raise TemperatureFitError(
        f"Temperature fit did not converge in {_MAX_ITER} iterations (bracket on 1/T: [{lo:.6g}, {hi:.6g}])."
    )
