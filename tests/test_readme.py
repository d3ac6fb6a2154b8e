"""The README's library examples run as written."""

from __future__ import annotations

import re

import matplotlib.pyplot as plt
import pytest

from tests.conftest import REPO

SECTION = re.compile(r"^## Using the library\n(.*?)^## ", re.S | re.M)
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _library_blocks() -> list[str]:
    section = SECTION.search((REPO / "README.md").read_text())
    assert section, "README.md has no '## Using the library' section"
    return BLOCK.findall(section.group(1))


def test_the_readme_has_library_examples():
    assert len(_library_blocks()) >= 4


@pytest.mark.parametrize("index", range(len(_library_blocks())))
def test_readme_library_example_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # examples write files (density.png, demo_output/) relative to cwd
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    exec(compile(_library_blocks()[index], f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})
    plt.close("all")
