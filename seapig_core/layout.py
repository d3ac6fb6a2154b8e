"""The one place that turns every task's logits into one canonical layout, and validates them.

Every score, the temperature fit, the predictions and the metrics work on
:class:`CanonicalLogits`: a float tensor of shape ``(N, K, M)`` (samples, units, members)
and a *family* that says how the K units turn into probabilities.

========================  ================  ===========================  ===================
task                      input shape       canonical ``(N, K, M)``      family
========================  ================  ===========================  ===================
multiclass                ``(N, C)``        ``(N, C, 1)``                categorical (softmax)
binary, two logits        ``(N, 2)``        ``(N, 2, 1)``                categorical (softmax)
binary, one logit         ``(N,)``/(N, 1)`` ``(N, 1, 1)``                bernoulli (sigmoid)
multilabel                ``(N, C)``        ``(N, C, 1)``                bernoulli (sigmoid)
*per_member=True*         trailing ``M``    ``(N, K, M)``                as above
binary, one logit, pm     ``(N, M)``        ``(N, 1, M)``                bernoulli
========================  ================  ===========================  ===================

The canonical tensor is a view of the input whenever possible (no copy). Scores read it in
row blocks (:func:`iter_row_blocks`), so no whole-tensor temporaries are created.

**A learned confidence head** (``confidence_head=True``; DeVries and Taylor, "Learning
Confidence for Out-of-Distribution Detection in Neural Networks", 2018): a model trained to
output its own confidence next to its class logits delivers it as **one extra trailing unit**,
the confidence head's logit (pre-sigmoid): ``(N, C + 1)``, or ``(N, C + 1, M)`` with a member
axis, where the first ``C`` units are the task's logits as in the table (binary: ``(N, 2)`` is
one logit and the confidence, ``(N, 3)`` two logits and the confidence). Logit files, the
logits store and bundles carry it unchanged as "logits"; :func:`canonicalize` splits it off:
:attr:`CanonicalLogits.values` are the class logits only (every score, the temperature, the
predictions and the metrics read them as usual) and :attr:`CanonicalLogits.confidence` the
confidence logits ``(N, M)``. A sample is finite only when its class logits *and* its
confidence are.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "TASKS",
    "CanonicalLogits",
    "Family",
    "Task",
    "as_float_tensor",
    "block_finite",
    "canonicalize",
    "check_labels",
    "check_task",
    "iter_row_blocks",
]

Task = Literal["multiclass", "binary", "multilabel"]
Family = Literal["categorical", "bernoulli"]
TASKS: tuple[str, ...] = ("multiclass", "binary", "multilabel")

# Rows per block: 2048 rows x 100 classes x 4 bytes = 800 KiB, which stays in L2 cache with
# its temporaries. Scaled with the row width so a block is about that size whatever K * M is.
_BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class CanonicalLogits:
    """Validated logits in the canonical ``(N, K, M)`` layout.

    Attributes
    ----------
    values : torch.Tensor
        Float tensor ``(N, K, M)``; a view of the caller's tensor where possible.
    family : {"categorical", "bernoulli"}
        ``categorical``: a softmax over the K units; ``bernoulli``: K independent sigmoids.
    task : {"multiclass", "binary", "multilabel"}
        The task the caller declared.
    single_logit : bool
        True for single-logit binary. Scores are symmetric in the sign of that logit, so they
        read ``|z|`` (see :meth:`scoring_block`); the temperature fit reads the signed logit.
    per_member : bool
        Whether the input carried a trailing member axis.
    input_shape : tuple of int
        The caller's shape, with the confidence unit when there is one;
        :meth:`input_logits` gives the caller's layout back.
    all_finite : bool
        True when validation established that every value is finite (``require_finite``), so
        that passes over the values need not test it again (the confidence included).
    confidence : torch.Tensor or None
        The confidence head's logits ``(N, M)`` (pre-sigmoid; a view of the caller's tensor),
        when validated with ``confidence_head=True``; else None.
    """

    values: torch.Tensor
    family: Family
    task: str
    single_logit: bool
    per_member: bool
    input_shape: tuple[int, ...]
    all_finite: bool = False
    confidence: torch.Tensor | None = None

    @property
    def n_samples(self) -> int:
        """N, the number of samples."""
        return int(self.values.shape[0])

    @property
    def n_units(self) -> int:
        """K, classes (categorical) or labels (bernoulli); 1 for single-logit binary."""
        return int(self.values.shape[1])

    @property
    def n_members(self) -> int:
        """M, ensemble members or stochastic passes (1 without ``per_member``)."""
        return int(self.values.shape[2])

    @property
    def n_classes(self) -> int:
        """The number of classes a prediction ranges over (2 for any binary layout)."""
        return 2 if self.single_logit else self.n_units

    @property
    def confidence_head(self) -> bool:
        """Whether the logits carry a confidence head's logit (see the module docstring)."""
        return self.confidence is not None

    def input_logits(self) -> torch.Tensor:
        """The logits in the caller's layout (``input_shape``), the confidence unit included.

        A view without a confidence head; with one, a copy (the class logits and the confidence
        joined again).
        """
        if self.confidence is None:
            return self.values.reshape(self.input_shape)
        joined = torch.cat((self.values, self.confidence.unsqueeze(1)), dim=1)
        return joined.reshape(self.input_shape)

    def class_logits(self) -> torch.Tensor:
        """The class logits in the caller's layout, without the confidence unit (a view).

        What a function that knows nothing of confidence heads accepts for the same task and
        ``per_member``; the logits themselves without a confidence head.
        """
        if self.confidence is None:
            return self.values.reshape(self.input_shape)
        shape = list(self.input_shape)
        shape[1] = self.n_units
        return self.values.reshape(shape)

    def block_rows(self, block_bytes: int = _BLOCK_BYTES) -> int:
        """Rows per block so that one block of float values is about ``block_bytes`` (1 MiB)."""
        row_bytes = self.n_units * self.n_members * self.values.element_size()
        return max(64, block_bytes // max(row_bytes, 1))

    def scoring_block(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:stop`` as a 2-D ``(rows * M, K)`` block, members unrolled row-major.

        With one member the block is a view. With several, unrolling is a copy, written into
        ``out`` (shape ``(rows * M, K)``, the values' dtype) when given, so that callers can
        reuse one buffer across blocks. Single-logit binary logits are folded to ``|z|``: every
        score of one logit depends only on its magnitude, and the multilabel formulas then give
        the binary ones.
        """
        block = self.values[start:stop]
        b, k, m = block.shape
        if out is None or m == 1:
            flat = flatten_members(block)
            return flat.abs() if self.single_logit else flat
        out.view(b, m, k).copy_(block.transpose(1, 2))
        return out.abs_() if self.single_logit else out

    def finite_rows(self) -> torch.Tensor:
        """Boolean ``(N,)``: True where every logit of the sample (all members) is finite.

        One fast reduction per block clears it in the usual case (see :func:`block_finite`).
        """
        out = torch.ones(self.n_samples, dtype=torch.bool, device=self.values.device)
        if self.all_finite:
            return out
        for start, stop in iter_row_blocks(self.n_samples, self.block_rows()):
            block = self.values[start:stop]
            finite = block_finite(block.reshape(block.shape[0], -1))
            if finite is not None:
                out[start:stop] = finite
            if self.confidence is not None:
                confident = block_finite(self.confidence[start:stop])
                if confident is not None:
                    out[start:stop] &= confident
        return out

    def rows(self, start: int, stop: int) -> CanonicalLogits:
        """Samples ``start:stop`` as canonical logits (a view; nothing is validated again)."""
        values = self.values[start:stop]
        shape = (int(values.shape[0]), *self.input_shape[1:])
        confidence = None if self.confidence is None else self.confidence[start:stop]
        return CanonicalLogits(
            values, self.family, self.task, self.single_logit, self.per_member, shape, self.all_finite, confidence
        )


def block_finite(block: torch.Tensor) -> torch.Tensor | None:
    """Per-row finiteness of a 2-D block: None when every value is finite, else a bool ``(rows,)``.

    The sum of a block is finite unless the block holds a NaN or an infinity (or the sum
    overflows), so on the CPU one fast reduction clears a block in the usual case; ``isfinite``
    on the block costs tens of times more. A block that fails it, and any block on another
    device (where a per-block test would synchronise), gets the exact per-row test.
    """
    if block.numel() == 0:
        return None
    if block.device.type == "cpu" and math.isfinite(float(block.sum())):
        return None
    return torch.isfinite(block).all(dim=1)


def flatten_members(block: torch.Tensor) -> torch.Tensor:
    """``(B, K, M)`` -> ``(B * M, K)``; a view when ``M == 1``, a small copy otherwise."""
    b, k, m = block.shape
    if m == 1:
        return block.reshape(b, k)
    return block.transpose(1, 2).reshape(b * m, k)


def iter_row_blocks(n_rows: int, block_rows: int) -> Iterator[tuple[int, int]]:
    """Yield ``(start, stop)`` pairs covering ``range(n_rows)`` in blocks of ``block_rows``."""
    for start in range(0, n_rows, block_rows):
        yield start, min(start + block_rows, n_rows)


def check_task(task: Any) -> str:
    """Validate the ``task`` parameter."""
    if not isinstance(task, str) or task not in TASKS:
        raise ValueError(f"The 'task' parameter must be one of {list(TASKS)}. Got {task!r} instead.")
    return task


def as_float_tensor(x: Any, name: str) -> torch.Tensor:
    """Return ``x`` as a floating-point tensor without copying when it already is one.

    Accepts a ``torch.Tensor``, a NumPy array or a (nested) sequence of real numbers. Half
    precision is promoted to float32 (the kernels accumulate in at least float32); float32 and
    float64 are kept; integers become float32.
    """
    if isinstance(x, torch.Tensor):
        tensor = x.detach()
    elif isinstance(x, np.ndarray) or isinstance(x, (list, tuple)):
        array = np.asarray(x)
        if array.dtype.kind not in "iuf":
            raise TypeError(
                f"The '{name}' parameter must hold real numbers. Got an array of dtype {array.dtype} instead."
            )
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    else:
        raise TypeError(
            f"The '{name}' parameter must be a torch.Tensor or numpy.ndarray. Got {type(x).__name__} instead."
        )
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"The '{name}' parameter must hold real numbers. Got dtype {tensor.dtype} instead.")
    if tensor.dtype in (torch.float16, torch.bfloat16) or not tensor.is_floating_point():
        tensor = tensor.to(torch.float32)
    return tensor


def canonicalize(
    logits: Any,
    task: str = "multiclass",
    per_member: bool = False,
    *,
    name: str = "logits",
    n_units: int | None = None,
    require_finite: bool = False,
    allow_empty: bool = False,
    confidence_head: bool = False,
) -> CanonicalLogits:
    """Validate logits for ``task`` and return them in the canonical layout.

    Parameters
    ----------
    logits : torch.Tensor or numpy.ndarray
        Logits, shaped as in the module table.
    task : {"multiclass", "binary", "multilabel"}
        The classification task.
    per_member : bool
        Whether the logits carry a trailing member axis.
    name : str
        Argument name used in error messages.
    n_units : int or None
        If given, the number of units (K) the logits must have, e.g. the fitted class count.
    require_finite : bool
        Raise if any logit is NaN or infinite (calibration data); query data may contain
        non-finite rows, which are scored NaN and never selected.
    allow_empty : bool
        Accept zero samples (query data: an empty batch scores to empty results). Calibration
        data must hold at least one sample.
    confidence_head : bool
        The last unit (axis 1) is a confidence head's logit: ``(N, C + 1)`` or ``(N, C + 1, M)``
        (see the module docstring). It is split off into :attr:`CanonicalLogits.confidence`;
        ``n_units`` then counts the class logits only.

    Returns
    -------
    CanonicalLogits

    Raises
    ------
    TypeError
        For a non-numeric input.
    ValueError
        For an unknown task, a shape that does not fit the task (with ``confidence_head``:
        no room for the class logits and the confidence unit), an input without samples
        (unless ``allow_empty``) or without logits, a unit count different from ``n_units``, or
        non-finite values when ``require_finite``.

    Examples
    --------
    >>> import torch
    >>> canon = canonicalize(torch.tensor([[2.0, 0.0, 1.5]]), confidence_head=True)
    >>> canon.values.shape, canon.confidence
    (torch.Size([1, 2, 1]), tensor([[1.5000]]))
    """
    task = check_task(task)
    x = as_float_tensor(logits, name)
    per_member = bool(per_member)
    if not isinstance(confidence_head, (bool, np.bool_)):
        raise TypeError(f"The 'confidence_head' parameter must be a bool. Got {type(confidence_head).__name__} instead.")
    member_note = "" if not per_member else " with a trailing member axis (per_member=True)"
    shape = tuple(x.shape)
    confidence = None
    if confidence_head:
        x, confidence = _split_confidence(x, task, per_member, name)

    single_logit = False
    if task == "binary":
        if not per_member:
            if x.ndim == 1:
                values, single_logit = x.reshape(-1, 1, 1), True
            elif x.ndim == 2 and x.shape[1] in (1, 2):
                values, single_logit = x.unsqueeze(-1), x.shape[1] == 1
            else:
                raise ValueError(
                    f"The '{name}' parameter must have shape (N,), (N, 1) or (N, 2) for task='binary'. "
                    f"Got shape {shape} instead."
                )
        else:
            if x.ndim == 2:
                values, single_logit = x.unsqueeze(1), True
            elif x.ndim == 3 and x.shape[1] in (1, 2):
                values, single_logit = x, x.shape[1] == 1
            else:
                raise ValueError(
                    f"The '{name}' parameter must have shape (N, M), (N, 1, M) or (N, 2, M) for task='binary'"
                    f"{member_note}. Got shape {shape} instead."
                )
        family: Family = "bernoulli" if single_logit else "categorical"
    else:
        want = 3 if per_member else 2
        layout = "(N, C, M)" if per_member else "(N, C)"
        if x.ndim != want:
            raise ValueError(
                f"The '{name}' parameter must have shape {layout} for task={task!r}{member_note}. "
                f"Got shape {shape} instead."
            )
        values = x if per_member else x.unsqueeze(-1)
        if task == "multiclass" and values.shape[1] < 2:
            raise ValueError(
                f"The '{name}' parameter must have at least 2 classes for task='multiclass'. "
                f"Got shape {shape} instead (use task='binary' for one logit)."
            )
        family = "categorical" if task == "multiclass" else "bernoulli"

    if values.shape[0] == 0 and not allow_empty:
        raise ValueError(f"The '{name}' parameter must contain at least one sample. Got shape {shape} instead.")
    if values.shape[1] == 0 or values.shape[2] == 0:
        what = "logit per sample" if values.shape[1] == 0 else "member per sample"
        raise ValueError(f"The '{name}' parameter must have at least one {what}. Got shape {shape} instead.")
    canon = CanonicalLogits(values, family, task, single_logit, per_member, shape, confidence=confidence)

    if n_units is not None and canon.n_units != n_units:
        if confidence is None:
            raise ValueError(
                f"The '{name}' parameter must have {n_units} logit(s) per sample, as the fitted score. "
                f"Got shape {shape} ({canon.n_units} per sample) instead."
            )
        raise ValueError(
            f"The '{name}' parameter must have {n_units} class logit(s) and the confidence logit per sample "
            f"({n_units + 1} units), as the fitted score. Got shape {shape} ({canon.n_units} class logit(s) "
            f"and the confidence) instead."
        )
    if require_finite:
        finite = canon.finite_rows()
        if not bool(finite.all()):
            bad = int((~finite).sum())
            first = int(torch.nonzero(~finite)[0, 0])
            raise ValueError(
                f"The '{name}' parameter must contain only finite values. "
                f"Got {bad} sample(s) with NaN or infinite logits (first at row {first}) instead."
            )
        canon = dataclasses.replace(canon, all_finite=True)
    return canon


def _split_confidence(x: torch.Tensor, task: str, per_member: bool, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(class logits, confidence (N, M))`` of logits whose last unit is a confidence head's.

    The unit axis is axis 1; the class logits keep the caller's layout without that unit, so
    the usual task branches of :func:`canonicalize` validate them.
    """
    shape = tuple(x.shape)
    ndim = 3 if per_member else 2
    members = ", M" if per_member else ""
    member_note = " and a trailing member axis (per_member=True)" if per_member else ""
    if task == "binary":
        fits = x.ndim == ndim and shape[1] in (2, 3)
        expected = f"(N, 2{members}) (one logit) or (N, 3{members}) (two logits)"
    else:
        least = 2 if task == "multiclass" else 1
        fits = x.ndim == ndim and shape[1] >= least + 1
        expected = f"(N, C + 1{members}) with C >= {least} class logit(s)"
    if not fits:
        raise ValueError(
            f"The '{name}' parameter must have shape {expected} for task={task!r} with confidence_head=True"
            f"{member_note}: the class logits followed by the confidence head's logit as the last unit of "
            f"axis 1. Got shape {shape} instead."
        )
    if per_member:
        return x[:, :-1, :], x[:, -1, :]
    return x[:, :-1], x[:, -1:]


def check_labels(labels: Any, canon: CanonicalLogits, name: str = "Y") -> torch.Tensor:
    """Validate labels against canonical logits and return them in canonical form.

    Canonical labels: ``int64 (N,)`` class indices for the categorical family; ``float64 (N, K)``
    0/1 targets for the bernoulli family (single-logit binary: ``(N, 1)``).

    Raises
    ------
    TypeError
        If ``labels`` is not numeric.
    ValueError
        Wrong length or shape, non-finite values, non-integer class indices, indices outside
        ``[0, n_classes)``, or bernoulli targets other than 0 and 1.
    """
    y = labels.detach() if isinstance(labels, torch.Tensor) else None
    if y is None:
        if not isinstance(labels, (np.ndarray, list, tuple)):
            raise TypeError(
                f"The '{name}' parameter must be a torch.Tensor or numpy.ndarray. Got {type(labels).__name__} instead."
            )
        array = np.asarray(labels)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"The '{name}' parameter must hold numbers. Got an array of dtype {array.dtype} instead.")
        y = torch.from_numpy(np.ascontiguousarray(array))
    if y.is_complex():
        raise TypeError(f"The '{name}' parameter must hold real numbers. Got dtype {y.dtype} instead.")
    y = y.to(device="cpu")
    n = canon.n_samples
    shape = tuple(y.shape)
    if shape[:1] != (n,):
        raise ValueError(
            f"The '{name}' parameter must have one entry per sample ({n}). Got shape {shape} instead."
        )
    yf = y.to(torch.float64)
    if not bool(torch.isfinite(yf).all()):
        raise ValueError(f"The '{name}' parameter must contain only finite values. Got NaN or infinity instead.")

    if canon.family == "categorical":
        if y.ndim == 2 and shape[1] == 1:
            yf = yf.reshape(-1)
        if yf.ndim != 1:
            raise ValueError(
                f"The '{name}' parameter must have shape (N,) with class indices for task={canon.task!r}. "
                f"Got shape {shape} instead."
            )
        if not bool((yf == torch.round(yf)).all()):
            raise ValueError(
                f"The '{name}' parameter must contain integer class indices for task={canon.task!r}. "
                f"Got non-integer values instead."
            )
        low, high = float(yf.min()), float(yf.max())
        if low < 0 or high >= canon.n_units:
            raise ValueError(
                f"The '{name}' parameter must contain class indices in [0, {canon.n_units - 1}]. "
                f"Got values in [{_fmt(low)}, {_fmt(high)}] instead."
            )
        return yf.to(torch.int64)

    # bernoulli family
    if canon.single_logit:
        if yf.ndim == 2 and shape[1] == 1:
            yf = yf.reshape(-1)
        if yf.ndim != 1:
            raise ValueError(
                f"The '{name}' parameter must have shape (N,) for single-logit binary. Got shape {shape} instead."
            )
        yf = yf.reshape(-1, 1)
    elif tuple(yf.shape) != (n, canon.n_units):
        raise ValueError(
            f"The '{name}' parameter must have shape ({n}, {canon.n_units}) with 0/1 targets for "
            f"task='multilabel'. Got shape {shape} instead."
        )
    if not bool(((yf == 0) | (yf == 1)).all()):
        low, high = float(yf.min()), float(yf.max())
        raise ValueError(
            f"The '{name}' parameter must contain only 0 and 1 for task={canon.task!r}. "
            f"Got values in [{_fmt(low)}, {_fmt(high)}] instead."
        )
    return yf


def _fmt(value: float) -> str:
    return str(int(value)) if math.isfinite(value) and value == int(value) else f"{value:g}"
