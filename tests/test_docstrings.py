"""The public API documents its parameters: every function a module exports (`__all__`) has a
docstring whose `Args:` section names each of its parameters, and a `Returns:` (or `Yields:`)
section when it returns something. The API reference (docs/reference.md) is generated from
these docstrings, so a parameter added without a line here is a hole in the manual.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("client", "server", "common", "simulation")
_SECTION = re.compile(r"^(Args|Returns|Yields|Raises|Example|Examples|Note|Attributes):\s*$")


def exported_functions() -> list[tuple[str, object]]:
    """(dotted name, function) for every function in a package module's `__all__`, once each."""
    found, seen = [], set()
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            if not any(
                isinstance(node, ast.Assign)
                and any(getattr(target, "id", "") == "__all__" for target in node.targets)
                for node in tree.body
            ):
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            module = importlib.import_module(
                ".".join(("fedward", *parts)).removesuffix(".__init__")
            )
            for name in module.__all__:
                function = getattr(module, name)
                if not inspect.isfunction(function):
                    continue
                key = (function.__module__, function.__qualname__)
                if key not in seen:
                    seen.add(key)
                    found.append((f"{function.__module__}.{function.__qualname__}", function))
    return found


def sections(docstring: str) -> dict[str, list[str]]:
    """A Google-style docstring's sections: title -> its indented lines."""
    result: dict[str, list[str]] = {}
    current = None
    for line in docstring.splitlines():
        match = _SECTION.match(line)
        if match:
            current = match.group(1)
            result[current] = []
        elif current is not None and (line.startswith(" ") or not line):
            result[current].append(line)
        else:
            current = None
    return result


def documentation_gaps(function) -> list[str]:
    """What `function`'s docstring leaves out: parameters without an Args line, a missing
    Returns section."""
    docstring = inspect.getdoc(function) or ""
    found = sections(docstring)
    named = {
        match.group(1)
        for line in found.get("Args", [])
        if (match := re.match(r"^\s{4}\*{0,2}(\w+)(?: \(.*?\))?:", line))
    }
    parameters = [name for name in inspect.signature(function).parameters if name != "self"]
    gaps = [f"Args: {name}" for name in parameters if name not in named]
    returns = inspect.signature(function).return_annotation
    if returns not in ("None", None, inspect.Signature.empty) and not (
        "Returns" in found or "Yields" in found
    ):
        gaps.append("Returns")
    return gaps


def test_sections_are_read_the_way_the_api_reference_reads_them():
    def documented(a: int, b: str) -> int:
        """Sum.

        Args:
            a: One.
            b (str): Two.

        Returns:
            The sum.
        """
        return a

    def undocumented(a: int, b: str) -> int:
        """Sum.

        Args:
            a: One.
        """
        return a

    assert documentation_gaps(documented) == []
    assert documentation_gaps(undocumented) == ["Args: b", "Returns"]


EXPORTED = exported_functions()


@pytest.mark.parametrize("name, function", EXPORTED, ids=[name for name, _ in EXPORTED])
def test_every_exported_function_documents_its_parameters_and_result(name, function):
    assert documentation_gaps(function) == [], f"{name}'s docstring lacks these sections"
