"""The one number format (issue 9 item 5) and markdown escaping of user strings (issue 8 item 6)."""

from __future__ import annotations

import html
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seapig_core.formatting import (
    KINDS,
    format_count,
    format_pvalue,
    format_rate,
    format_stat,
    format_value,
    markdown_cell,
    markdown_table,
    markdown_text,
)

HOSTILE = "[x](javascript:alert(1)) | injected | cell.npy"


def test_the_issues_numbers_get_one_format() -> None:
    # 0.195 vs 0.1502, ECE 0.03685 vs 2.43 %: one format per kind of number.
    assert [format_value(v, "stat") for v in (0.195, 0.1502)] == ["0.195", "0.150"]
    assert [format_value(v, "rate") for v in (0.195, 0.1502)] == ["19.5%", "15.0%"]
    assert [format_value(v, "error") for v in (0.03685, 0.0243)] == ["3.69%", "2.43%"]


@pytest.mark.parametrize(
    ("value", "kind", "expected"),
    [
        (1234567, "count", "1,234,567"),
        (np.int64(12), "count", "12"),
        (0.0004, "rate", "< 0.1%"),
        (0.0, "rate", "0.0%"),
        (1.0, "rate", "100.0%"),
        (0.00004, "error", "< 0.01%"),
        (1.5347, "stat", "1.53"),
        (-0.91234, "stat", "-0.912"),
        (2.1e-5, "stat", "2.10e-05"),
        (12345.6, "stat", "12,346"),
        (100.0, "stat", "100"),
        (0.0, "stat", "0"),
        (-0.91234, "threshold", "-0.9123"),
        (0.0321, "pvalue", "0.032"),
        (1.0, "pvalue", "1.000"),
        (1e-9, "pvalue", "< 0.001"),
        (None, "stat", "n/a"),
        (float("nan"), "rate", "n/a"),
        (float("inf"), "stat", "inf"),
        (-np.inf, "rate", "-inf"),
        ("softmax", "text", "softmax"),
        (1.0, "setting", "1"),
        (0.95, "setting", "0.95"),
        (0.001, "setting", "0.001"),
    ],
)
def test_format_value_by_kind(value, kind, expected) -> None:
    assert format_value(value, kind) == expected


def test_format_functions_and_bad_kind() -> None:
    assert set(KINDS) == {"count", "rate", "error", "stat", "threshold", "pvalue", "setting", "text"}
    assert format_count(None) == format_rate(None) == format_stat(None) == format_pvalue(None) == "n/a"
    assert format_rate(0.12345, decimals=2) == "12.35%" and format_stat(0.123456, digits=4) == "0.1235"
    with pytest.raises(ValueError, match=r"The 'kind' parameter must be one of \['count', .*\]. Got 'percent' instead."):
        format_value(0.5, "percent")


def test_markdown_text_escapes_every_markdown_and_html_construct() -> None:
    assert markdown_text(HOSTILE) == r"\[x\]\(javascript:alert\(1\)\) \| injected \| cell.npy"
    assert markdown_text("<script>&amp;") == "&lt;script&gt;&amp;amp;"
    assert markdown_text("~~gone~~") == "&#126;&#126;gone&#126;&#126;"
    assert markdown_text("a\nb\r\nc\td") == "a b c d"
    assert markdown_text("bell\x07") == "bell\ufffd"
    assert markdown_text("- item") == r"\- item" and markdown_text("12. item") == r"12\. item" and markdown_text("---") == r"\---"
    assert markdown_text("==") == "&#61;="
    assert markdown_text("-5.2") == "-5.2" and markdown_text("0.150") == "0.150"
    assert markdown_text("batch-002") == "batch-002" and markdown_text(42) == "42"
    assert markdown_cell("") == " " and markdown_cell(None) == "n/a" and markdown_cell(0.1502) == "0.150"
    assert markdown_cell(1500) == "1,500" and markdown_cell(0.25, "rate") == "25.0%" and markdown_cell(True) == "yes"


def _table() -> str:
    rows = [
        {"batch": HOSTILE, "samples": 250, "rate": 0.2},
        {"batch": "<img src=x onerror=alert(1)>", "samples": 1234, "rate": None},
        {"batch": "**b** `c` ![i](x.png) # h\n| new | row |", "samples": 3, "rate": 0.0004},
    ]
    return markdown_table(rows, [("batch", "batch | name"), ("samples", "samples", "count"), ("rate", "rejection rate", "rate")])


def test_markdown_table_keeps_hostile_names_in_one_cell() -> None:
    lines = _table().splitlines()
    assert len(lines) == 5  # header, rule, three rows: no row was added
    for line in lines:  # every line has exactly 3 cells: 4 unescaped pipes
        assert len(re.findall(r"(?<!\\)\|", line)) == 4, line
    assert lines[2].startswith(r"| \[x\]\(javascript:alert\(1\)\) \| injected \| cell.npy | 250 | 20.0% |")
    assert "n/a" in lines[3] and "&lt; 0.1%" in lines[4]  # renders as "< 0.1%"


def _cells(rendered: str) -> list[list[str]]:
    rows = re.findall(r"<tr>(.*?)</tr>", rendered, flags=re.S)
    return [[html.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", r, flags=re.S)] for r in rows]


@pytest.mark.parametrize("renderer", ["python-markdown", "markdown-it"])
def test_rendered_table_has_literal_text_and_no_links(renderer: str) -> None:
    text = _table()
    if renderer == "python-markdown":
        markdown = pytest.importorskip("markdown")
        rendered = markdown.markdown(text, extensions=["tables"])
    else:
        markdown_it = pytest.importorskip("markdown_it")
        rendered = markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(text)
    assert "<a " not in rendered and 'href="javascript:' not in rendered and "<img" not in rendered
    assert "<strong>" not in rendered and "<code>" not in rendered and "<h1>" not in rendered
    cells = _cells(rendered)
    assert [len(row) for row in cells] == [3, 3, 3, 3]
    assert cells[0][0] == "batch | name"
    assert cells[1] == [HOSTILE, "250", "20.0%"]
    assert cells[2][0] == "<img src=x onerror=alert(1)>"
    assert cells[3][0] == "**b** `c` ![i](x.png) # h | new | row |"


_PRINTABLE = "".join(chr(c) for c in range(32, 127)) + "éß中\u00a0"


def _render_with(renderer: str, text: str) -> str:
    if renderer == "python-markdown":
        return pytest.importorskip("markdown").markdown(text, extensions=["tables"])
    return pytest.importorskip("markdown_it").MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(text)


@pytest.mark.parametrize("renderer", ["python-markdown", "markdown-it"])
@settings(max_examples=300, deadline=None)
@given(value=st.text(alphabet=_PRINTABLE, max_size=40))
def test_any_text_renders_as_itself_in_one_cell(renderer: str, value: str) -> None:
    table = markdown_table([{"a": value, "b": "end"}], [("a", "a"), ("b", "b")])
    rendered = _render_with(renderer, table)
    cells = _cells(rendered)
    assert [len(row) for row in cells] == [2, 2]
    assert cells[1] == [value.strip(), "end"]  # cells are trimmed; everything else is literal
    assert "<a " not in rendered and "<img" not in rendered and "<code>" not in rendered
