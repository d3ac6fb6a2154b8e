"""One number format for every table, report and plot, and markdown escaping.

Every number a person reads in seapig_core's review material goes through
:func:`format_value` (or one of the functions it dispatches to), so that the same quantity
looks the same everywhere:

- ``count``: an integer with thousands separators (``1,234``);
- ``rate``: a percentage with one decimal (rejection rate, coverage, accuracy, selective
  risk, q, delta): ``19.5%``, ``15.0%``, ``< 0.1%`` for a small non-zero rate;
- ``error``: a percentage with two decimals, for calibration errors (ECE, MCE), which are
  often below one percent: ``3.69%``, ``0.43%``;
- ``stat``: 3 significant digits, trailing zeros kept (temperature, NLL, Brier, KS, PSI,
  AURC, scores): ``0.195``, ``0.150``, ``1.53``; scientific below 0.001 (``2.10e-05``);
  integers with separators from 1,000 (``12,346``);
- ``threshold``: 4 significant digits, for thresholds and the scores compared with them
  (``-0.9123``);
- ``pvalue``: three decimals (``0.032``, ``1.000``); ``< 0.001`` below that;
- ``setting``: a value a person chose (a comparison temperature, a test's alpha, a drift
  threshold), as short as it was typed: ``1``, ``0.95``, ``0.001`` (``format(value, "g")``);
- ``text``: ``str(value)``.

Missing and non-finite values (None, NaN) read ``n/a``; infinities ``inf``/``-inf``.

Markdown: :func:`markdown_text` escapes a user-controlled string (batch and file names,
sample ids, class names, paths, anything from a file or a parameter) so that it renders as
literal text wherever it is placed in CommonMark/GitHub-flavoured markdown (the Prefect UI's
dialect): no links, images, emphasis, HTML or headings can be injected, and ``|`` cannot end a
table cell. :func:`markdown_cell` does the same for one table cell (and formats numbers),
:func:`markdown_table` builds a whole table from escaped cells.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "KINDS",
    "format_count",
    "format_pvalue",
    "format_rate",
    "format_stat",
    "format_value",
    "markdown_cell",
    "markdown_table",
    "markdown_text",
]

#: The kinds :func:`format_value` knows (see the module docstring).
KINDS = ("count", "rate", "error", "stat", "threshold", "pvalue", "setting", "text")

_MISSING = "n/a"


def _number(value: Any) -> float | None:
    """``value`` as a float; None for None, NaN and non-numbers."""
    if value is None or isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (numbers.Real, np.floating, np.integer)):
        number = float(value)
        return None if math.isnan(number) else number
    return None


def _infinite(number: float) -> str | None:
    if math.isinf(number):
        return "inf" if number > 0 else "-inf"
    return None


def format_count(value: Any) -> str:
    """An integer count with thousands separators: ``1,234``; ``n/a`` when missing."""
    number = _number(value)
    if number is None:
        return _MISSING
    return _infinite(number) or f"{int(round(number)):,}"


def format_rate(value: Any, decimals: int = 1) -> str:
    """A fraction as a percentage: ``0.195 -> 19.5%``.

    Parameters
    ----------
    value : float
        A fraction (1 = 100%).
    decimals : int, default 1
        Decimals of the percentage; 2 for calibration errors (kind ``"error"``).

    Notes
    -----
    A non-zero value that would round to zero reads ``< 0.1%`` (``> -0.1%`` when negative), so
    that a small rate is never shown as none.
    """
    number = _number(value)
    if number is None:
        return _MISSING
    special = _infinite(number)
    if special:
        return special
    smallest = 0.5 * 10.0 ** (-decimals) / 100.0
    if 0.0 < abs(number) < smallest:
        step = f"{10.0 ** (-decimals):.{decimals}f}%"
        return f"< {step}" if number > 0 else f"> -{step}"
    return f"{number:.{decimals}%}"


def format_stat(value: Any, digits: int = 3) -> str:
    """A statistic with ``digits`` significant digits: ``0.1502 -> 0.150``, ``1.5347 -> 1.53``.

    Trailing zeros are kept (``0.150``: three significant digits). Values below 0.001 in
    magnitude are written in scientific notation (``2.10e-05``), values of 1,000 and above as
    rounded integers with thousands separators (``12,346``).
    """
    number = _number(value)
    if number is None:
        return _MISSING
    special = _infinite(number)
    if special:
        return special
    if number == 0.0:
        return "0"
    magnitude = abs(number)
    if magnitude < 1e-3:
        return f"{number:.{max(digits - 1, 0)}e}"
    if magnitude >= 1e3:  # integers: 1,234 rather than 1.23e+03
        return f"{number:,.0f}"
    return format(number, f"#.{digits}g").rstrip(".")


def format_pvalue(value: Any) -> str:
    """A p-value: three decimals (``0.032``, ``1.000``), ``< 0.001`` below 0.001."""
    number = _number(value)
    if number is None:
        return _MISSING
    if number < 1e-3:
        return "< 0.001"
    return f"{number:.3f}"


def format_value(value: Any, kind: str = "stat") -> str:
    """Format ``value`` as a ``kind`` (one of :data:`KINDS`, see the module docstring)."""
    if kind == "count":
        return format_count(value)
    if kind == "rate":
        return format_rate(value, 1)
    if kind == "error":
        return format_rate(value, 2)
    if kind == "stat":
        return format_stat(value, 3)
    if kind == "threshold":
        return format_stat(value, 4)
    if kind == "pvalue":
        return format_pvalue(value)
    if kind == "setting":
        number = _number(value)
        return _MISSING if number is None else (_infinite(number) or format(number, "g"))
    if kind == "text":
        return _MISSING if value is None else str(value)
    raise ValueError(f"The 'kind' parameter must be one of {list(KINDS)}. Got {kind!r} instead.")


# ----------------------------------------------------------------------------- markdown

# ASCII punctuation that can start markdown syntax anywhere in a line (CommonMark allows a
# backslash before any ASCII punctuation; these are the ones with inline meaning, plus "|"
# for GFM table cells and "#" for headings). Python-Markdown knows these escapes too.
_INLINE = re.compile(r"([\\`*_\[\]{}()!|#])")
# As character references: "~" (GFM strikethrough; Python-Markdown has no "\~" escape) and
# the HTML specials. A reference is never markdown syntax, and "&" itself is escaped first.
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "~": "&#126;"}
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_NEWLINES = re.compile(r"\r\n|\r|\n|\t|\u2028|\u2029")
# Block markers that matter only at the start of a line (">" is already an entity, "*" and
# "#" are escaped everywhere): a bullet "- x" or "+ x", an ordered item "1. x" or "1) x", and
# a line of "-" or "=" (setext underline, thematic break). "-5.2" or "0.150" are left alone.
_BULLET = re.compile(r"^\s*[-+](?=\s|$)")
_ORDERED = re.compile(r"^\s*\d{1,9}(?=[.)](?:\s|$))")
_RULE = re.compile(r"^\s*[-=](?=[-=\s]*$)")


def markdown_text(value: Any) -> str:
    """Escape a user-controlled string so that markdown renders it as literal text.

    Parameters
    ----------
    value : Any
        Converted with ``str`` first (e.g. a path or an integer sample id).

    Returns
    -------
    str
        One line of markdown. ``&``, ``<``, ``>``, ``"`` and ``~`` become character references
        (no raw HTML, no entity injection, no strikethrough); ``\\ ` * _ [ ] { } ( ) ! | #`` are
        backslash-escaped (no links, images, emphasis, code spans, headings, and no table-cell
        breaks); a leading list, ordered-list or setext marker is escaped too; line breaks and
        tabs become spaces, other control characters U+FFFD.

    Examples
    --------
    >>> markdown_text("[x](javascript:alert(1)) | injected | cell.npy")
    '\\\\[x\\\\]\\\\(javascript:alert\\\\(1\\\\)\\\\) \\\\| injected \\\\| cell.npy'
    """
    text = str(value)
    text = _NEWLINES.sub(" ", text)
    text = _CONTROL.sub("\ufffd", text)
    text = _INLINE.sub(r"\\\1", text)
    text = "".join(_ENTITIES.get(ch, ch) for ch in text)  # after: "&#126;" keeps its "#"
    ordered = _ORDERED.match(text)
    if ordered:  # "1. x" -> "1\. x"
        return text[: ordered.end()] + "\\" + text[ordered.end() :]
    marker = _BULLET.match(text) or _RULE.match(text)
    if marker:  # "- x" -> "\- x"; "=" as a reference (Python-Markdown has no "\=" escape)
        at = marker.end() - 1
        return text[:at] + ("&#61;" if text[at] == "=" else "\\" + text[at]) + text[at + 1 :]
    return text


def markdown_cell(value: Any, kind: str | None = None) -> str:
    """One table cell: a number formatted as ``kind`` (:func:`format_value`), text escaped.

    Numbers without a ``kind`` use ``"count"`` for integers and ``"stat"`` for floats; None
    and NaN read ``n/a``. Text goes through :func:`markdown_text`, so no value can add a cell
    or a row to the table. An empty string becomes a single space (an empty cell).
    """
    if kind is not None:
        text = format_value(value, kind)
    elif value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        text = _MISSING
    elif isinstance(value, (bool, np.bool_)):
        text = "yes" if value else "no"
    elif isinstance(value, (int, np.integer)):
        text = format_count(value)
    elif isinstance(value, (float, np.floating)):
        text = format_stat(value)
    else:
        text = str(value)
    escaped = markdown_text(text)
    return escaped if escaped.strip() else " "


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[tuple[str, str] | tuple[str, str, str | None]],
) -> str:
    """A GFM table: one escaped header per column, one escaped cell per row and column.

    Parameters
    ----------
    rows : sequence of mappings
        One mapping per row; a missing key gives ``n/a``.
    columns : sequence of ``(key, header)`` or ``(key, header, kind)``
        The columns in order; ``kind`` formats the values (:func:`format_value`). A value that
        is already a string is escaped as text whatever the kind.

    Returns
    -------
    str
        The table's lines joined with newlines (no trailing newline).
    """
    specs = [(c[0], c[1], c[2] if len(c) > 2 else None) for c in columns]  # type: ignore[misc]
    lines = [
        "| " + " | ".join(markdown_cell(header) for _, header, _ in specs) + " |",
        "|" + "|".join("---" for _ in specs) + "|",
    ]
    for row in rows:
        cells = []
        for key, _, kind in specs:
            value = row.get(key)
            cells.append(markdown_cell(value, None if isinstance(value, str) else kind))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
