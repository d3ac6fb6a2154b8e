"""The shared scalar checks: type errors, range errors, accepted NumPy scalars."""

from __future__ import annotations

import numpy as np
import pytest

from seapig_core._validation import check_bool, check_open_unit, check_positive_int, check_temperature


@pytest.mark.parametrize("value", [0.5, np.float32(0.25), np.float64(0.999), 1e-9])
def test_open_unit_accepts_reals_inside(value):
    assert check_open_unit(value, "q") == pytest.approx(float(value))


@pytest.mark.parametrize("value", [0.0, 1.0, -0.1, 1.5, float("nan"), float("inf")])
def test_open_unit_rejects_values_outside(value):
    with pytest.raises(ValueError, match=r"The 'q' parameter must be in \(0, 1\)\. Got .* instead\."):
        check_open_unit(value, "q")


@pytest.mark.parametrize("value", [True, np.bool_(False), "0.5", None, [0.5]])
def test_open_unit_rejects_non_reals(value):
    with pytest.raises(TypeError, match=r"The 'q' parameter must be a float in \(0, 1\)\. Got \w+ instead\."):
        check_open_unit(value, "q")
    if value is None:
        assert check_open_unit(None, "q", allow_none=True) is None


def test_temperature():
    assert check_temperature(np.float32(2.0)) == 2.0
    assert check_temperature(None, allow_none=True) is None
    with pytest.raises(TypeError, match=r"The 'temperature' parameter must be a positive float\. Got NoneType"):
        check_temperature(None)
    with pytest.raises(ValueError, match=r"The 'T' parameter must be a positive finite float\. Got -1 instead"):
        check_temperature(-1, name="T")


def test_positive_int_and_bool():
    assert check_positive_int(np.int64(3), "n") == 3
    with pytest.raises(TypeError, match=r"The 'n' parameter must be a positive integer\. Got float instead"):
        check_positive_int(3.0, "n")
    with pytest.raises(TypeError, match=r"Got bool instead"):
        check_positive_int(True, "n")
    with pytest.raises(ValueError, match=r"The 'n' parameter must be a positive integer\. Got 0 instead"):
        check_positive_int(0, "n")
    assert check_bool(np.bool_(True), "flag") is True
    with pytest.raises(TypeError, match=r"The 'flag' parameter must be a bool\. Got int instead"):
        check_bool(1, "flag")
