"""A type checker sees `fedward.*` as a user's install does (issue 43): `fedward.client` and
`fedward.common` live in the top-level folders `client/` and `common/`, mapped by package-dir,
which tools cannot follow; pyproject.toml's `[tool.mypy]` points mypy at the link tree
tools/import-root/fedward. Checked here by running mypy as a contributor would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINKS = ROOT / "tools" / "import-root" / "fedward"

PROBE = """\
from fedward.client.site import Site
from fedward.common.config import RunSpec

rounds: str = RunSpec().federation.rounds
site: int = Site
"""


def _mypy(tmp_path: Path, source: str) -> str:
    probe = tmp_path / "probe.py"
    probe.write_text(source, encoding="utf-8")
    command = [
        sys.executable,
        "-m",
        "mypy",
        "--config-file",
        str(ROOT / "pyproject.toml"),
        "--cache-dir",
        str(tmp_path / "cache"),
        str(probe),
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    return done.stdout + done.stderr


def test_mypy_follows_fedward_into_the_client_and_common_folders(tmp_path):
    report = _mypy(tmp_path, PROBE)
    assert "Cannot find implementation or library stub" not in report, report
    # Each error needs the real class behind the import: found, not taken as Any.
    assert 'expression has type "int", variable has type "str"' in report, report
    assert 'expression has type "type[Site]", variable has type "int"' in report, report


def test_the_link_tree_links_every_folder_package_dir_maps():
    import tomllib

    mapped = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"][
        "setuptools"
    ]["package-dir"]
    for name, folder in mapped.items():
        if name == "fedward":
            continue
        link = LINKS / name.removeprefix("fedward.")
        assert link.is_symlink() and link.resolve() == (ROOT / folder).resolve(), name
    for module in (ROOT / "fedward").glob("*.py"):
        assert (LINKS / module.name).resolve() == module.resolve(), module.name
