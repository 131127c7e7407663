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


def _defined_in(
    module: str, name: str, modules: dict[str, Path], seen: frozenset = frozenset()
) -> str:
    """The module that defines `name` when it is imported from `module`: a package's
    `__init__` that re-exports a name (`from .task import NER`) hands it on to the module
    it took it from, so `from fedward.common.tasks.ner import NER` is an edge to
    `fedward.common.tasks.ner.task`, not to a package whose own edges would then be dropped."""
    child = f"{module}.{name}"
    if child in modules:
        return child
    path = modules.get(module)
    if path is None or path.name != "__init__.py" or module in seen:
        return module
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                if (alias.asname or alias.name) == name and node.module in modules:
                    return _defined_in(node.module, alias.name, modules, seen | {module})
    return module


def _packages_run(importer: str, module: str, modules: dict[str, Path]) -> set[str]:
    """The packages whose `__init__` Python runs to import `module`: its parents, except those
    the importer sits in (their `__init__` is already running when it runs)."""
    parts = module.split(".")
    parents = {".".join(parts[:end]) for end in range(2, len(parts) + 1)}
    return {
        package
        for package in parents
        if modules.get(package, Path()).name == "__init__.py"
        and importer != package
        and not importer.startswith(package + ".")
    }


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """fedward modules that module `name` (at `path`) imports, anywhere in it: a name imported
    from a package is taken as its submodule when there is one, else as the module that defines
    it; and a package's `__init__` counts wherever Python runs it."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets.update(_defined_in(node.module, alias.name, modules) for alias in node.names)
    found = set(targets)
    for target in targets:
        found |= _packages_run(name, target, modules)
    return found & set(modules)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {other for other in _imports(name, path, modules) if other != name}
        for name, path in modules.items()
    }


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


def test_a_name_a_package_re_exports_leads_to_the_module_that_defines_it():
    modules = _modules()
    assert _defined_in("fedward.common.tasks.ner", "NER", modules) == (
        "fedward.common.tasks.ner.task"
    )
    assert _defined_in("fedward.common.tasks", "Task", modules) == "fedward.common.tasks"


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
