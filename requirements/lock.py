"""Write and check the lock file (``requirements/constraints.txt``) that ``make install`` installs from.

The lock pins every distribution that ``pip install torch==2.13.0 -e ".[pipeline,test,demo]"``
installs, at the exact version the test suite passed with, so that a fresh clone resolves the same
environment (issue 8: a fresh install once took SQLAlchemy 2.1.9, with which Prefect 3.8.8's
scheduler never creates a run). ``make install`` passes it to pip as constraints (``-c``) and then
runs ``check``, which fails, naming the package, when ``pyproject.toml`` asks for a distribution
the lock does not pin (pip would otherwise resolve it silently to whatever is newest).

Usage (from the repository root; ``make lock`` and ``make install`` call these)::

    python3 requirements/lock.py write [--upgrade]   # rewrite the lock from a throw-away venv
    .venv/bin/python requirements/lock.py check      # the installed closure matches the lock

``write`` builds a new virtual environment in a temporary directory, installs the torch
specification and the project with its extras there (nothing else runs in it), and writes
``pip freeze --all`` of it without the project itself and pip. By default it keeps the versions already
locked (the old lock is passed as constraints), so adding a dependency adds it without moving
everything else; when the old pins conflict with ``pyproject.toml``, or with ``--upgrade``, it
resolves everything afresh. Either way, run the suite (``make test``) before committing the lock.

Only the standard library is used, except ``check``, which needs ``packaging`` (installed with
pytest; pip's vendored copy otherwise).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LOCK = ROOT / "requirements" / "constraints.txt"
DEFAULT_EXTRAS = "pipeline,test,demo"
DEFAULT_TORCH = "torch==2.13.0"
PROJECT = "seapig-core"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


def canonical_name(name: str) -> str:
    """The PEP 503 normalised form of a distribution name (``SQLAlchemy`` -> ``sqlalchemy``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str, source: str = "the lock file") -> dict[str, str]:
    """The pins of a lock file as ``{canonical name: version}``.

    Blank lines and ``#`` comments are ignored; every other line must be ``name==version``.

    Raises
    ------
    ValueError
        For any other line, or a name pinned twice, naming ``source`` and the line.
    """
    pins: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _PIN.match(line)
        if match is None:
            raise ValueError(f"{source}, line {number}: expected 'name==version', got {raw!r}")
        name = canonical_name(match.group(1))
        if name in pins:
            raise ValueError(f"{source}, line {number}: {match.group(1)} is pinned twice")
        pins[name] = match.group(2)
    return pins


def _packaging():
    try:
        from packaging.markers import default_environment
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:  # pragma: no cover - pytest brings packaging; pip always vendors it
        from pip._vendor.packaging.markers import default_environment
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.version import Version
    return Requirement, Version, default_environment


def installed_distribution(name: str):
    """The distribution ``name`` installed in this interpreter's site-packages, or None.

    Looks only in site-packages: a ``*.egg-info`` that an editable install leaves in the checkout
    (found first from the repository root) is not the installed metadata.
    """
    from importlib import metadata

    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    return next(iter(metadata.distributions(name=name, path=paths)), None)


def requirement_closure(project: str = PROJECT, extras: Iterable[str] = DEFAULT_EXTRAS.split(",")) -> dict[str, tuple[str, str]]:
    """Every installed distribution that ``project[extras]`` needs, transitively, on this interpreter.

    Returns ``{canonical name: (installed version, "required by ...")}`` (the project itself
    excluded). A needed distribution that is not installed has version ``""``.
    """
    Requirement, _, default_environment = _packaging()
    environment = default_environment()
    found: dict[str, tuple[str, str]] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    queue: list[tuple[str, frozenset[str], str]] = [(canonical_name(project), frozenset(extras), "")]
    while queue:
        name, wanted, parent = queue.pop()
        if (name, wanted) in seen:
            continue
        seen.add((name, wanted))
        dist = installed_distribution(name)
        if dist is None:
            found.setdefault(name, ("", parent))
            continue
        if name != canonical_name(project):
            found.setdefault(name, (dist.version, parent))
        for text in dist.requires or []:
            requirement = Requirement(text)
            marker = requirement.marker
            if marker is not None and not any(
                marker.evaluate({**environment, "extra": extra}) for extra in (*sorted(wanted), "")
            ):
                continue
            queue.append((canonical_name(requirement.name), frozenset(requirement.extras), f"{name}"))
    return found


def lock_problems(closure: Mapping[str, tuple[str, str]], pins: Mapping[str, str]) -> list[str]:
    """Sentences naming each needed distribution that the lock does not pin, or pins at another version."""
    _, Version, _ = _packaging()
    problems = []
    for name, (version, parent) in sorted(closure.items()):
        by = f" (required by {parent})" if parent else ""
        if name not in pins:
            problems.append(f"{name} {version or '(not installed)'}{by} is not in the lock")
        elif not version:
            problems.append(f"{name}{by} is pinned at {pins[name]} but not installed")
        elif Version(version) != Version(pins[name]):
            problems.append(f"{name}{by} is installed at {version}, the lock pins {pins[name]}")
    return problems


def check(lock_text: str, source: str, extras: list[str]) -> int:
    """Exit status 0 when the installed closure of the project matches the pins; else explain and return 1."""
    pins = parse_lock(lock_text, source)
    problems = lock_problems(requirement_closure(PROJECT, extras), pins)
    if not problems:
        return 0
    print(
        f"error: the installed environment does not match {source}:\n  - " + "\n  - ".join(problems) + "\n"
        f"pyproject.toml asks for packages that {source} does not pin (or pins at other versions), so pip\n"
        "resolved them freshly instead of installing the versions the suite passed with. Run `make lock`\n"
        "(it rewrites the lock from pyproject.toml), run `make test`, and commit the lock; or install\n"
        "without it: `make install LOCK=`.",
        file=sys.stderr,
    )
    return 1


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(command), file=sys.stderr, flush=True)
    return subprocess.run(command, check=False, **kwargs)


def write(lock: Path, extras: list[str], torch_spec: str, *, upgrade: bool, python: str) -> int:
    """Rebuild ``lock`` from a throw-away virtual environment; return an exit status."""
    with tempfile.TemporaryDirectory(prefix="seapig-lock-") as scratch:
        venv = Path(scratch) / "venv"
        if _run([python, "-m", "venv", str(venv)]).returncode != 0:
            return 1
        pip = [str(venv / "bin" / "python"), "-m", "pip"]
        if _run([*pip, "install", "--quiet", "--upgrade", "pip"]).returncode != 0:
            return 1
        # --no-compile: nothing runs in this venv, so skip byte-compiling (most of torch's install time).
        install = [*pip, "install", "--quiet", "--no-compile", torch_spec, "-e", f"{ROOT}[{','.join(extras)}]"]
        keep = lock.is_file() and not upgrade
        result = _run([*install, "-c", str(lock)]) if keep else _run(install)
        if keep and result.returncode != 0:
            print(
                f"note: the versions in {lock.name} conflict with pyproject.toml (see above); resolving every "
                "package afresh: versions may move, run `make test` before committing.",
                file=sys.stderr,
            )
            result = _run(install)
        if result.returncode != 0:
            return 1
        # --all: setuptools is a requirement (of torch) too; pip itself is the installer, not locked.
        freeze = _run([*pip, "freeze", "--all", "--exclude-editable", "--exclude", PROJECT, "--exclude", "pip"],
                      capture_output=True, text=True)
        if freeze.returncode != 0:
            sys.stderr.write(freeze.stderr)
            return 1
        pins = parse_lock(freeze.stdout, "pip freeze")
        # The new pins must pass the check that `make install` runs (the whole closure, exact versions).
        status = _run([str(venv / "bin" / "python"), str(Path(__file__).resolve()), "check", "--lock", "-",
                       "--extras", ",".join(extras)], input=freeze.stdout, text=True).returncode
        if status != 0:
            return status
    header = (
        "# Lock file of seapig-core: the exact versions `make install` installs (pip -c) and the suite passed with.\n"
        "# Generated by `make lock` (python3 requirements/lock.py write); do not edit by hand. It covers\n"
        f"# {torch_spec} and .[{','.join(extras)}] on CPython {platform.python_version()}, "
        f"{platform.system()} {platform.machine()} ({datetime.date.today().isoformat()}).\n"
    )
    body = "".join(f"{line}\n" for line in freeze.stdout.splitlines() if line.strip())
    temporary = lock.with_name(f".{lock.name}.tmp")
    lock.parent.mkdir(parents=True, exist_ok=True)
    temporary.write_text(header + body)
    os.replace(temporary, lock)
    print(f"wrote {lock} ({len(pins)} pins)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("write", "check"):
        command = sub.add_parser(name)
        command.add_argument("--lock", default=str(DEFAULT_LOCK), help="the lock file ('-': read it from stdin; check only)")
        command.add_argument("--extras", default=DEFAULT_EXTRAS, help="comma-separated extras of the project")
    write_parser = sub.choices["write"]
    write_parser.add_argument("--torch", default=DEFAULT_TORCH, help="the torch requirement installed first")
    write_parser.add_argument("--upgrade", action="store_true", help="ignore the current pins; resolve everything afresh")
    write_parser.add_argument("--python", default=sys.executable, help="the interpreter of the throw-away venv")
    args = parser.parse_args(argv)
    extras = [extra.strip() for extra in args.extras.split(",") if extra.strip()]
    if args.command == "check":
        if args.lock == "-":
            return check(sys.stdin.read(), "the new pins (pip freeze)", extras)
        lock = Path(args.lock)
        return check(lock.read_text(), os.path.relpath(lock.resolve(), ROOT), extras)
    return write(Path(args.lock), extras, args.torch, upgrade=args.upgrade, python=args.python)


if __name__ == "__main__":
    sys.exit(main())
