"""Independent float64 NumPy/SciPy references for every score, task and member layout.

Written per sample and per member with SciPy's special functions, on the caller's layout,
deliberately unlike the library's blocked canonical kernels.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit, logsumexp, softmax
from scipy.stats import entropy

SCORE_NAMES = ("softmax", "entropy", "energy", "margin", "max_logit", "certainty_ratio", "probability_margin")


def _categorical(z: np.ndarray, name: str, T: float) -> float:
    p = softmax(z / T)
    top = np.sort(z)[::-1]
    if name == "softmax":
        return -p.max()
    if name == "entropy":
        return float(entropy(p))
    if name == "energy":
        return -T * logsumexp(z / T)
    if name == "margin":
        return -(top[0] - top[1]) / T
    if name == "max_logit":
        return -z.max() / T
    if name == "certainty_ratio":
        return float(np.exp(-(top[0] - top[1]) / T))
    if name == "probability_margin":
        # The seeds' softmax lab: sorted_probs[0] - sorted_probs[1], negated.
        sorted_probs = np.sort(p)[::-1]
        return -(sorted_probs[0] - sorted_probs[1])
    raise KeyError(name)


def _bernoulli_label(z: float, name: str, T: float) -> float:
    """A per-label quantity for one signed logit; aggregated over labels by `_AGG`."""
    p = expit(z / T)
    if name == "softmax":
        return max(p, 1 - p)
    if name == "entropy":
        return float(entropy([p, 1 - p]))
    if name == "energy":
        return np.logaddexp(0.0, z / T)
    if name in ("margin", "certainty_ratio"):
        return abs(z) / T
    if name == "max_logit":
        return z / T
    if name == "probability_margin":
        return abs(2.0 * p - 1.0)  # |p(1) - p(0)|
    raise KeyError(name)


def _bernoulli(z: np.ndarray, name: str, T: float, single: bool) -> float:
    if single:
        z = np.abs(z)  # a single logit's scores depend on its magnitude only
    per_label = np.array([_bernoulli_label(float(v), name, T) for v in z])
    if name == "softmax":
        return -per_label.min()
    if name == "entropy":
        return per_label.max()
    if name == "energy":
        return -T * per_label.sum()
    if name == "margin":
        return -per_label.min()
    if name == "max_logit":
        return -per_label.max()
    if name == "certainty_ratio":
        return float(np.exp(-per_label.min()))
    if name == "probability_margin":
        return -per_label.min()  # the label closest to its decision boundary
    raise KeyError(name)


def member_vectors(logits: np.ndarray, task: str, per_member: bool) -> tuple[list[list[np.ndarray]], str, bool]:
    """Split the caller's layout into, per sample, a list of per-member logit vectors."""
    x = np.asarray(logits, dtype=np.float64)
    if task == "binary":
        if not per_member:
            if x.ndim == 1 or x.shape[1] == 1:
                return [[row.reshape(1)] for row in x.reshape(-1)], "bernoulli", True
            return [[row] for row in x], "categorical", False
        if x.ndim == 2:  # (N, M)
            return [[np.array([v]) for v in row] for row in x], "bernoulli", True
        family = "bernoulli" if x.shape[1] == 1 else "categorical"
        return [[x[i, :, m] for m in range(x.shape[2])] for i in range(len(x))], family, family == "bernoulli"
    family = "categorical" if task == "multiclass" else "bernoulli"
    if not per_member:
        return [[row] for row in x], family, False
    return [[x[i, :, m] for m in range(x.shape[2])] for i in range(len(x))], family, False


def reference_scores(logits: np.ndarray, name: str, task: str, per_member: bool = False, T: float = 1.0) -> np.ndarray:
    """Float64 reference scores: each member scored independently, then averaged."""
    samples, family, single = member_vectors(logits, task, per_member)
    out = []
    for members in samples:
        values = [
            _categorical(z, name, T) if family == "categorical" else _bernoulli(z, name, T, single) for z in members
        ]
        out.append(np.mean(values))
    return np.asarray(out)


def reference_nll(logits: np.ndarray, labels: np.ndarray, task: str, per_member: bool, T: float) -> float:
    """Float64 NLL per sample-member: cross-entropy, or summed per-label BCE."""
    samples, family, _ = member_vectors(logits, task, per_member)
    y = np.asarray(labels)
    total, rows = 0.0, 0
    for i, members in enumerate(samples):
        for z in members:
            if family == "categorical":
                total += logsumexp(z / T) - z[int(y[i])] / T
            else:
                target = np.reshape(y[i], -1).astype(np.float64)
                a = z / T
                total += float(np.sum(np.logaddexp(0.0, a) - target * a))
            rows += 1
    return total / rows


# Shapes for every task x member layout: (task, per_member, shape builder(n, c, m)).
LAYOUTS = [
    ("multiclass", False, lambda n, c, m: (n, c)),
    ("multiclass", True, lambda n, c, m: (n, c, m)),
    ("binary", False, lambda n, c, m: (n,)),
    ("binary", False, lambda n, c, m: (n, 1)),
    ("binary", False, lambda n, c, m: (n, 2)),
    ("binary", True, lambda n, c, m: (n, m)),
    ("binary", True, lambda n, c, m: (n, 1, m)),
    ("binary", True, lambda n, c, m: (n, 2, m)),
    ("multilabel", False, lambda n, c, m: (n, c)),
    ("multilabel", True, lambda n, c, m: (n, c, m)),
]


def layout_id(layout) -> str:
    task, per_member, shape = layout
    dims = "x".join("NCM"[i] if d in (7, 5, 3) else str(d) for i, d in enumerate(shape(7, 5, 3)))
    return f"{task}-{dims}{'-members' if per_member else ''}"


def random_labels(rng: np.random.Generator, task: str, shape: tuple[int, ...], per_member: bool) -> np.ndarray:
    """Labels matching a logit shape from LAYOUTS."""
    n = shape[0]
    if task == "multiclass":
        return rng.integers(0, shape[1], size=n)
    if task == "binary":
        return rng.integers(0, 2, size=n)
    return rng.integers(0, 2, size=(n, shape[1])).astype(np.float32)
