"""Checks of scalar parameters, shared by every public function: one message style everywhere.

``TypeError`` when the value has the wrong type, ``ValueError`` when it has the right type but is
out of range; both name the parameter, the expectation and what was received, e.g. "The 'q'
parameter must be in (0, 1). Got 1.5 instead."
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

__all__ = ["check_bool", "check_open_unit", "check_positive_int", "check_sample_ids", "check_temperature"]


def _is_real(value: Any) -> bool:
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, numbers.Real)


def check_bool(value: Any, name: str) -> bool:
    """A ``bool`` (or NumPy bool)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"The '{name}' parameter must be a bool. Got {type(value).__name__} instead.")
    return bool(value)


def check_positive_int(value: Any, name: str) -> int:
    """An integer >= 1."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"The '{name}' parameter must be a positive integer. Got {type(value).__name__} instead.")
    if value < 1:
        raise ValueError(f"The '{name}' parameter must be a positive integer. Got {value!r} instead.")
    return int(value)


def check_open_unit(value: Any, name: str, *, allow_none: bool = False) -> float | None:
    """A float in the open interval (0, 1) (NaN is outside), or None when ``allow_none``."""
    if value is None and allow_none:
        return None
    if not _is_real(value):
        expected = "a float in (0, 1) or None" if allow_none else "a float in (0, 1)"
        raise TypeError(f"The '{name}' parameter must be {expected}. Got {type(value).__name__} instead.")
    number = float(value)
    if not (0.0 < number < 1.0):  # also rejects NaN
        raise ValueError(f"The '{name}' parameter must be in (0, 1). Got {number!r} instead.")
    return number


def check_temperature(value: Any, *, allow_none: bool = False, name: str = "temperature") -> float | None:
    """A positive finite float, or None when ``allow_none``."""
    if value is None and allow_none:
        return None
    if not _is_real(value):
        expected = "a positive float or None" if allow_none else "a positive float"
        raise TypeError(f"The '{name}' parameter must be {expected}. Got {type(value).__name__} instead.")
    number = float(value)
    if not (math.isfinite(number) and number > 0.0):
        raise ValueError(f"The '{name}' parameter must be a positive finite float. Got {value!r} instead.")
    return number


def check_sample_ids(values: Any, n: int, *, name: str = "sample_ids", start: int = 0) -> np.ndarray:
    """Sample ids, one per sample: the one normaliser of ids for files, tables and extraction.

    Parameters
    ----------
    values : array-like, torch.Tensor or None
        Integers or strings, one per sample; None gives the row index ``start, start + 1, ...``.
    n : int
        The number of samples.
    name : str
        The argument (or column) named in error messages.
    start : int
        First row index when ``values`` is None (a chunk's offset in its file).

    Returns
    -------
    numpy.ndarray
        ``(n,)`` int64, or an object array of ``str``.

    Raises
    ------
    ValueError
        For a shape other than ``(n,)``, or unsigned integers beyond int64.
    TypeError
        For ids that are neither all integers nor all strings (floats, booleans, nulls, bytes
        that are not ASCII, mixed types).
    """
    if values is None:
        return np.arange(start, start + n, dtype=np.int64)
    if hasattr(values, "detach") and hasattr(values, "numpy"):  # a torch.Tensor, without importing torch here
        values = values.detach().to("cpu").numpy()
    array = np.asarray(values, dtype=object) if isinstance(values, (list, tuple)) else np.asarray(values)
    if array.ndim != 1 or array.shape[0] != n:
        raise ValueError(
            f"The '{name}' parameter must be 1-D with one id per sample ({n}). Got shape {array.shape} instead."
        )
    kind = array.dtype.kind
    if kind in "iu":
        if kind == "u" and array.size and int(array.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"The '{name}' parameter must hold integers that fit int64. Got {int(array.max())}.")
        return array.astype(np.int64, copy=False)
    if kind == "U":
        return array.astype(object)
    if kind == "S":
        try:
            return np.char.decode(array, "ascii").astype(object)
        except UnicodeDecodeError as exc:
            raise TypeError(f"The '{name}' parameter must hold integers or strings. Got bytes that are not ASCII ({exc}).") from None
    if kind == "O":
        strings = [isinstance(v, str) for v in array]
        if all(strings):
            return array
        integers = [isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in array]
        if all(integers):
            return array.astype(np.int64)
        others = [v for v, s, i in zip(array, strings, integers, strict=True) if not (s or i)]
        got = f"a {type(others[0]).__name__} ({others[0]!r})" if others else "integers and strings mixed"
        raise TypeError(
            f"The '{name}' parameter must hold integers or strings (no nulls), all of one kind. Got {got} instead."
        )
    raise TypeError(f"The '{name}' parameter must hold integers or strings (no nulls). Got dtype {array.dtype} instead.")
