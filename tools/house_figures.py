"""The house's size figures (issue 43), measured on the source tree rather than claimed.

    python tools/house_figures.py        # the counts
    python tools/house_figures.py -v     # and every place counted

Counted over the package folders and bench/, and for lengths also tests/ and tools/ (never the
virtualenv):
- files over 550 lines (simulation/synthetic/ is data, not code, and is left out);
- functions over 80 lines;
- parameters annotated with the whole configuration (`RunSpec`, `LocalRun`, `RunConfig`)
  outside common/config.py, each with what the function reads of it: the groups, or WHOLE
  where the object is passed on as it is;
- of those, the ones whose function reads a single group and nothing else of it (the issue's
  "16 of those read a single group": they should take the group);
- calls of `task_named` (a task is resolved once, by its group: `TaskSpec.definition`).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("client", "server", "common", "simulation", "bench")
#: Where lengths are measured too (their parameters are not the product's interfaces).
LENGTH_ONLY = ("tests", "tools")
WHOLE = {"RunSpec", "LocalRun", "RunConfig"}
#: What a configuration holds as groups (`spec.<group>`, or beside the spec).
GROUPS = (
    {"local", "data_schema", "simulation"}
    | {
        f"spec.{group}"
        for group in ("task", "model", "privacy", "federation", "training", "secagg")
    }
    | {"task", "model", "privacy", "federation", "training", "secagg"}
)
MAX_FILE_LINES, MAX_FUNCTION_LINES = 550, 80


def sources(folders: tuple[str, ...] = FOLDERS) -> list[Path]:
    return sorted(path for folder in folders for path in (ROOT / folder).rglob("*.py"))


def annotated_whole(argument: ast.arg) -> bool:
    if argument.annotation is None:
        return False
    names = {node.id for node in ast.walk(argument.annotation) if isinstance(node, ast.Name)}
    strings = {
        node.value
        for node in ast.walk(argument.annotation)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    return bool((names | strings) & WHOLE)


def what_is_read(function: ast.AST, name: str) -> str:
    """The groups `function` reads through `name` (`spec.privacy`, `local`), or WHOLE."""
    parents = {child: node for node in ast.walk(function) for child in ast.iter_child_nodes(node)}
    groups: set[str] = set()
    for node in ast.walk(function):
        if not (isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, ast.Load)):
            continue
        chain, current = [], node
        while isinstance(parents.get(current), ast.Attribute):
            current = parents[current]
            chain.append(current.attr)
        if not chain or chain == ["spec"]:
            return "WHOLE"
        groups.add(".".join(chain[:2]) if chain[0] == "spec" else chain[0])
    return ",".join(sorted(groups)) or "-"


def main(verbose: bool) -> None:
    long_files, long_functions, whole, one_group, task_lookups = [], [], [], [], []
    for path in sources(FOLDERS + LENGTH_ONLY):
        relative = path.relative_to(ROOT)
        text = path.read_text(encoding="utf-8")
        lines = text.count("\n")
        if lines > MAX_FILE_LINES and "synthetic" not in relative.parts:
            long_files.append(f"{relative} ({lines} lines)")
        tree = ast.parse(text)
        product = relative.parts[0] not in LENGTH_ONLY
        for node in ast.walk(tree):
            called = isinstance(node, ast.Call) and getattr(node.func, "id", "") == "task_named"
            if called and product:
                task_lookups.append(f"{relative}:{node.lineno}")
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                long_functions.append(f"{relative}:{node.lineno} {node.name} ({length} lines)")
            if str(relative) == "common/config.py" or not product:
                continue
            arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            for argument in filter(annotated_whole, arguments):
                read = what_is_read(node, argument.arg)
                whole.append(f"{relative}:{node.lineno} {node.name}({argument.arg}) -> {read}")
                if read in GROUPS:
                    one_group.append(whole[-1])
    for title, rows in (
        (f"files over {MAX_FILE_LINES} lines", long_files),
        (f"functions over {MAX_FUNCTION_LINES} lines", long_functions),
        ("parameters typed as the whole configuration", whole),
        ("  of which read a single group and nothing else", one_group),
        ("task_named calls", task_lookups),
    ):
        print(f"{title}: {len(rows)}")
        if verbose:
            print("".join(f"  {row}\n" for row in rows), end="")


if __name__ == "__main__":
    main("-v" in sys.argv[1:])
