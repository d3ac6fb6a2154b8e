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

__all__ = ["check_bool", "check_open_unit", "check_positive_int", "check_temperature"]


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
