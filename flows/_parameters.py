"""Parameter descriptions for the Prefect UI's "Run" form, from the flows' NumPy docstrings.

Prefect 3.8 builds a deployment's parameter schema (``parameter_openapi_schema``) with
``prefect.utilities.callables.parameter_schema``: the type and default from the signature, the
description from the docstring, parsed in the Google style only ("Args:"); a NumPy
"Parameters" section gives no description. (A description in ``Annotated[..., Field(...)]`` is
dropped too: Prefect passes its own ``Field(description=None)`` for every parameter, which wins.)
Both ``flow.parameters`` and ``prefect deploy`` (which imports the entrypoint and calls
``parameter_schema(flow)``) read the flow's ``__doc__``.

:func:`describe_parameters` keeps the NumPy docstring as the one place where a parameter is
documented, and appends to it a Google-style "Args:" section generated from it (one line per
parameter; reStructuredText roles and literals reduced to plain backticks), which is what
Prefect parses. A flow parameter without a description in the NumPy section is an error at
import time, so a new parameter cannot reach the UI undocumented.

Limitation: when ``prefect deploy`` cannot import a flow's module (a missing dependency), it
falls back to reading the source (``safe_load_flow_from_entrypoint``); this decorator still runs
there if its own import succeeds, otherwise the schema has no descriptions.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import TypeVar

from griffe import Docstring, DocstringSectionKind, Parser, parse
from prefect.logging.loggers import disable_logger

__all__ = ["describe_parameters", "numpy_parameter_descriptions"]

F = TypeVar("F", bound=Callable[..., object])

_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")


def _plain(text: str) -> str:
    """One line of text: ``x`` and :func:`a.b` become `x` and `a.b`, whitespace collapsed."""
    text = _ROLE.sub(lambda m: f"`{m.group(1)}`", text)
    text = _LITERAL.sub(r"`\1`", text)
    return " ".join(text.split())


def numpy_parameter_descriptions(fn: Callable[..., object]) -> dict[str, str]:
    """The descriptions of ``fn``'s parameters in its NumPy "Parameters" section (grouped names split)."""
    with disable_logger("griffe"):
        sections = parse(Docstring(inspect.getdoc(fn) or ""), Parser.numpy)
    found: dict[str, str] = {}
    for section in sections:
        if section.kind == DocstringSectionKind.parameters:
            found.update({p.name: _plain(p.description) for p in section.value if p.description.strip()})
    return found


def describe_parameters(fn: F) -> F:
    """Append a Google-style "Args:" section, generated from the NumPy one, to ``fn``'s docstring.

    Apply it under ``@flow`` (so that the flow is built from the described function).

    Raises
    ------
    TypeError
        If a parameter of ``fn`` has no description in its NumPy "Parameters" section.
    """
    descriptions = numpy_parameter_descriptions(fn)
    names = list(inspect.signature(fn).parameters)
    missing = [name for name in names if name not in descriptions]
    if missing:
        raise TypeError(
            f"The docstring of {fn.__qualname__} must describe every parameter in its 'Parameters' section "
            f"(the Prefect UI shows these descriptions). Missing: {missing}."
        )
    args = "\n".join(f"    {name}: {descriptions[name]}" for name in names)
    fn.__doc__ = f"{inspect.getdoc(fn)}\n\nArgs:\n{args}\n"
    return fn
