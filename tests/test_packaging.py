"""Packaging and the lock file (issue 8, items 7 and 1).

* The library installs without the Prefect server stack: ``pip install seapig-core`` needs only
  the library's dependencies; Prefect and the versions it needs (fastapi, SQLAlchemy) are the
  ``pipeline`` extra. The library imports and scores in a process where importing Prefect (or
  its server stack) is impossible.
* ``requirements/constraints.txt`` pins every requirement of ``pyproject.toml`` at a version it
  allows (including the pins that keep Prefect 3.8.8's scheduler working), the environment the
  suite runs in is the locked one, ``make install`` installs through it and is redone when it
  changes, and its checker names what is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import REPO

LOCK = REPO / "requirements" / "constraints.txt"
# The Prefect server stack: none of it may be a requirement of the library itself.
SERVER_STACK = {"prefect", "prefect-dask", "fastapi", "sqlalchemy", "starlette", "uvicorn", "alembic", "aiosqlite", "asyncpg"}
LIBRARY = {"numpy", "torch", "pandas", "pyarrow", "matplotlib", "scipy", "tqdm"}


def _lock_module():
    spec = importlib.util.spec_from_file_location("seapig_lock", REPO / "requirements" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lock = _lock_module()


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _names(requirements: list[str]) -> dict[str, Requirement]:
    parsed = [Requirement(text) for text in requirements]
    return {lock.canonical_name(r.name): r for r in parsed}


def _this_checkout_is_installed() -> bool:
    """Whether the installed seapig-core distribution is this checkout (its metadata is then current)."""
    dist = lock.installed_distribution("seapig-core")
    url = json.loads((dist and dist.read_text("direct_url.json")) or "{}").get("url", "")
    return url.removeprefix("file://").rstrip("/") == str(REPO)


# -- packaging (item 7) -------------------------------------------------------------------------


def test_the_library_requires_no_prefect_server_stack() -> None:
    core = _names(_project()["dependencies"])
    assert set(core).isdisjoint(SERVER_STACK), sorted(set(core) & SERVER_STACK)
    assert LIBRARY <= set(core), sorted(LIBRARY - set(core))


def test_the_pipeline_extra_carries_prefect_and_the_versions_it_needs() -> None:
    pipeline = _names(_project()["optional-dependencies"]["pipeline"])
    assert {"prefect", "fastapi", "sqlalchemy"} <= set(pipeline)
    assert pipeline["prefect"].specifier.contains("3.8.8") and not pipeline["prefect"].specifier.contains("3.9.0")
    # fastapi >= 0.151 refuses the nulls of Prefect 3.8.8's client; >= 0.155 breaks its server.
    assert pipeline["fastapi"].specifier.contains("0.150.0") and not pipeline["fastapi"].specifier.contains("0.151.0")
    # SQLAlchemy 2.1 crashes Prefect 3.8.8's scheduler: no scheduled run is ever created (issue 8).
    sqlalchemy = pipeline["sqlalchemy"].specifier
    assert sqlalchemy.contains("2.0.58") and not sqlalchemy.contains("2.1.0") and not sqlalchemy.contains("2.1.9")


@pytest.mark.skipif(not _this_checkout_is_installed(), reason="the installed seapig-core is not this checkout (its metadata may be stale)")
def test_the_installed_metadata_splits_library_and_pipeline() -> None:
    environment = default_environment()
    requires = [Requirement(text) for text in lock.installed_distribution("seapig-core").requires or []]

    def needed(extra: str) -> set[str]:
        return {lock.canonical_name(r.name) for r in requires
                if r.marker is None or r.marker.evaluate({**environment, "extra": extra})}

    assert needed("").isdisjoint(SERVER_STACK) and LIBRARY <= needed("")
    assert {"prefect", "fastapi", "sqlalchemy"} <= needed("pipeline") - needed("")


BLOCKED_IMPORTS = r"""
import importlib, importlib.abc, pkgutil, sys

BLOCKED = {blocked!r}

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"importing {{name!r}} is blocked in this test")

sys.meta_path.insert(0, Blocker())
try:
    import prefect  # noqa: F401  (installed here: the blocker must stop it)
except ImportError:
    pass
else:
    raise SystemExit("the import blocker did not block prefect")

import numpy as np
import pandas as pd
import torch

import seapig_core
from seapig_core import EnergyScore, SoftmaxScore

modules = [m.name for m in pkgutil.walk_packages(seapig_core.__path__, "seapig_core.")]
for name in modules:
    importlib.import_module(name)

g = torch.Generator().manual_seed(0)
labels = torch.randint(0, 10, (2000,), generator=g)
logits = 3.0 * torch.randn(2000, 10, generator=g)
logits[torch.arange(2000), labels] += 6.0
for cls in (SoftmaxScore, EnergyScore):
    score = cls().fit(logits[:1000], labels[:1000])
    score.set_threshold(q=0.9)
    out = score.select(logits[1000:])
    share = float(out["selected"].float().mean())
    assert 0.8 < share < 0.97, (cls.__name__, share)
table = pd.DataFrame({{"score": out["score"].numpy(), "selected": out["selected"].numpy()}})
table.to_parquet(sys.argv[1])
assert pd.read_parquet(sys.argv[1]).shape == (1000, 2)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(len(modules), "modules imported; leaked:", leaked)
raise SystemExit(1 if leaked else 0)
"""


def test_the_library_imports_and_scores_where_prefect_cannot_be_imported(tmp_path: Path) -> None:
    code = BLOCKED_IMPORTS.format(blocked=sorted(SERVER_STACK | {"prefect_dask", "distributed"}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "selections.parquet")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "leaked: []" in result.stdout


# -- the lock file (item 1) ---------------------------------------------------------------------


def test_the_lock_pins_every_requirement_at_a_version_pyproject_allows() -> None:
    pins = lock.parse_lock(LOCK.read_text(), str(LOCK))
    project = _project()
    environment = default_environment()
    groups = {"": project["dependencies"], **project["optional-dependencies"]}
    for extra, requirements in groups.items():
        for requirement in map(Requirement, requirements):
            if requirement.marker is not None and not requirement.marker.evaluate({**environment, "extra": extra}):
                continue
            name = lock.canonical_name(requirement.name)
            assert name in pins, f"{requirement} ({extra or 'core'}) is not in {LOCK.name}: run `make lock`"
            assert requirement.specifier.contains(pins[name], prereleases=True), (str(requirement), pins[name])
    assert Version(pins["sqlalchemy"]) < Version("2.1")  # the scheduler of Prefect 3.8.8 works
    assert Version(pins["fastapi"]) < Version("0.151")
    assert Version(pins["prefect"]).release[:2] == (3, 8)
    assert Version(pins["torch"]).base_version == "2.13.0"  # the CPU wheel on these machines
    assert "seapig-core" not in pins


@pytest.mark.skipif(not _this_checkout_is_installed(), reason="the installed seapig-core is not this checkout (its metadata may be stale)")
def test_the_suite_runs_on_the_locked_versions() -> None:
    pins = lock.parse_lock(LOCK.read_text(), str(LOCK))
    problems = lock.lock_problems(lock.requirement_closure("seapig-core", ["pipeline", "test", "demo"]), pins)
    assert not problems, "this environment is not the locked one (run `make install`):\n" + "\n".join(problems)


def test_the_lock_checker_names_what_the_lock_lacks() -> None:
    closure = {"xxhash": ("3.5.0", "seapig-core"), "sqlalchemy": ("2.1.9", "prefect"), "numpy": ("2.4.6", "seapig-core")}
    problems = lock.lock_problems(closure, {"sqlalchemy": "2.0.58", "numpy": "2.4.6"})
    assert problems == [
        "sqlalchemy (required by prefect) is installed at 2.1.9, the lock pins 2.0.58",
        "xxhash 3.5.0 (required by seapig-core) is not in the lock",
    ]
    with pytest.raises(ValueError, match=r"constraints.txt, line 2: expected 'name==version', got 'numpy>=2'"):
        lock.parse_lock("# header\nnumpy>=2\n", "constraints.txt")
    with pytest.raises(ValueError, match="line 2: SQLAlchemy is pinned twice"):
        lock.parse_lock("sqlalchemy==2.0.58\nSQLAlchemy==2.1.9\n", "constraints.txt")


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make not found")
def test_make_install_uses_the_lock_and_is_redone_when_it_changes(tmp_path: Path) -> None:
    venv, copy = tmp_path / "venv", tmp_path / "constraints.txt"
    venv.mkdir()
    shutil.copy(LOCK, copy)
    stamp = venv / ".seapig-installed"
    stamp.touch()
    now = time.time()
    os.utime(copy, (now - 60, now - 60))
    os.utime(stamp, (now + 60, now + 60))  # newer than every input: nothing to do
    make = ["make", "-C", str(REPO), f"VENV={venv}", f"LOCK={copy}"]

    assert subprocess.run([*make, "-q", "install"], capture_output=True, check=False).returncode == 0
    os.utime(copy, (now + 120, now + 120))  # the lock changed after the install
    assert subprocess.run([*make, "-q", "install"], capture_output=True, check=False).returncode == 1

    dry = subprocess.run([*make, "-n", "-B", "install"], capture_output=True, text=True, check=True).stdout
    install = next(line for line in dry.splitlines() if "pip install" in line and "-e" in line)
    assert f"-c {copy}" in install and "torch==2.13.0" in install and ".[pipeline,test,demo]" in install
    assert f"requirements/lock.py check --lock {copy}" in dry
