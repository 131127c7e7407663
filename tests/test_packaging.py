"""What installing fedward puts into a hospital's site-packages: one import name and nothing else.

Four generic top-level modules (`common`, `client`, ...) would shadow, or be shadowed by, any
other module of those names in a hospital's environment; the built wheel must hold `fedward/`
and its metadata only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fedward.simulation.synthetic import generate_notes

ROOT = Path(__file__).resolve().parents[1]
_NOT_SOURCE = (".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", "fedward-out")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools")
    out = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: build with the setuptools already installed (CI is offline-friendly).
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    # Build from a clean copy: setuptools reuses an in-tree build/ folder, whose leftovers
    # (say, a data file no longer declared) would otherwise slip into the wheel unnoticed.
    source = tmp_path_factory.mktemp("source") / "fedward"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*_NOT_SOURCE))
    result = subprocess.run(
        [*command, "-w", str(out), str(source)],
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


def test_the_wheel_carries_the_synthetic_notes_vocabulary(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for data in ("vocabulary.json", "profiles.json"):
        assert f"fedward/simulation/synthetic/data/{data}" in names


def test_notes_are_generated_from_the_wheel_alone(wheel, tmp_path):
    # A pure-Python wheel unpacked is an installation: generate notes from it, not the checkout.
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    script = (
        "import fedward.simulation.synthetic as s; "
        "print(s.__file__); print(s.generate_notes(2, 3, seed=5)[0]['text'][:20])"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(unpacked)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    where, text = result.stdout.splitlines()
    assert Path(where).is_relative_to(unpacked)
    assert text == generate_notes(2, 3, seed=5)[0]["text"][:20]


def test_the_installed_package_does_not_answer_to_the_old_names(tmp_path):
    # Run from an empty folder so the repository's own folders are not on sys.path.
    script = (
        "import importlib.util, fedward.common.config as c; "
        "print(all(importlib.util.find_spec(n) is None "
        "for n in ('common', 'client', 'server', 'simulation')))"
    )
    # Without PYTHONPATH: Flower's simulation sets it to the app folder (here the repository) in
    # the test process, which is not what a hospital's environment has.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
