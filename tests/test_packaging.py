"""What installing fedward puts into a hospital's site-packages: one import name and nothing else.

Four generic top-level modules (`common`, `client`, ...) would shadow, or be shadowed by, any
other module of those names in a hospital's environment; the built wheel must hold `fedward/`
and its metadata only.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools")
    out = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: build with the setuptools already installed (CI is offline-friendly).
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    result = subprocess.run(
        [*command, "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = out.glob("fedward-*.whl")
    return path


def test_the_wheel_installs_one_top_level_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    metadata = {name for name in top if name.endswith(".dist-info")}
    assert top - metadata == {"fedward"}
    for package in ("common", "client", "server", "simulation"):
        assert f"fedward/{package}/__init__.py" in names
    assert "fedward/cli.py" in names
    assert not any(name.startswith(("fedward/tests", "fedward/bench")) for name in names)


def test_the_wheel_names_the_fedward_command_and_the_flower_components(wheel):
    archive = zipfile.ZipFile(wheel)
    (entry_points,) = [n for n in archive.namelist() if n.endswith("entry_points.txt")]
    assert "fedward = fedward.cli:main" in archive.read(entry_points).decode()
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'serverapp = "fedward.simulation.app:server_app"' in pyproject


def test_the_installed_package_does_not_answer_to_the_old_names(tmp_path):
    # Run from an empty folder so the repository's own folders are not on sys.path.
    script = (
        "import importlib.util, fedward.common.config as c; "
        "print(all(importlib.util.find_spec(n) is None "
        "for n in ('common', 'client', 'server', 'simulation')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
