"""The layers a newcomer relies on: no import circles between fedward's modules (counting the
imports inside functions, which only hide a circle), `client/` and `server/` never import each
other, and nothing but the command line and the benchmarks imports `simulation/`."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"common": "common", "client": "client", "server": "server", "simulation": "simulation"}


def _modules() -> dict[str, Path]:
    """Module name (fedward.client.site) -> file, for every module of the package."""
    modules = {"fedward.cli": ROOT / "fedward" / "cli.py"}
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(("fedward", *parts))] = path
    return modules


def _imports(path: Path, known: set[str]) -> set[str]:
    """fedward modules that `path` imports, anywhere in it (a name imported from a package is
    taken as its submodule when there is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in known else node.module)
    return found & known


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        # A package's __init__ gathering its own submodules is not a circle.
        graph[name] = {other for other in _imports(path, set(modules)) if other != name}
        if path.name == "__init__.py":
            graph[name] = {other for other in graph[name] if not other.startswith(name + ".")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_imports_itself_back_through_others():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()) or [])


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(graph) == ["a", "b", "c", "a"]


def test_client_and_server_never_import_each_other_and_only_the_cli_imports_simulation():
    for name, imported in _graph().items():
        if name.startswith("fedward.client"):
            assert not any(other.startswith("fedward.server") for other in imported), name
        if name.startswith("fedward.server"):
            assert not any(other.startswith("fedward.client") for other in imported), name
        if not name.startswith(("fedward.simulation", "fedward.cli")):
            assert not any(other.startswith("fedward.simulation") for other in imported), name
