"""The bundle check (client/deploy/bundle.py): a hospital accepts exactly the app bundle `fedward
run` submits, and refuses one that carries code, names another component or asks for dependencies.

The bundles are real FABs, built by Flower's own builder from an app folder, like `flwr run` does.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from fedward.client.deploy import bundle
from fedward.common.config import RunConfig
from fedward.server.deploy import app_pyproject, write_app


def _fab(folder: Path) -> bytes:
    return build_fab_from_disk(folder)


@pytest.fixture
def app_dir(tmp_path) -> Path:
    """The app folder `fedward run` writes for a run."""
    return write_app(tmp_path, RunConfig(labels=["cardiac", "respiratory"], rounds=2).to_flower())


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def test_the_bundle_fedward_run_submits_is_accepted(app_dir):
    assert bundle.check_bundle(_fab(app_dir)) is None


def test_any_run_config_is_accepted(tmp_path):
    config = RunConfig(labels=["a", "b", "c"], task="classification", target_epsilon=2.0, rounds=7)
    assert bundle.check_bundle(_fab(write_app(tmp_path, config.to_flower()))) is None


def test_a_bundle_carrying_python_code_is_refused(app_dir):
    (app_dir / "client").mkdir()
    (app_dir / "client" / "__init__.py").write_text("", encoding="utf-8")
    (app_dir / "client" / "app.py").write_text("raise SystemExit('owned')\n", encoding="utf-8")
    refusal = bundle.check_bundle(_fab(app_dir))
    assert refusal is not None and refusal.reason == bundle.CARRIES_FILES
    assert "client/app.py" in refusal.detail


def test_a_bundle_carrying_any_other_file_is_refused(app_dir):
    (app_dir / "README.md").write_text("# hello\n", encoding="utf-8")
    refusal = bundle.check_bundle(_fab(app_dir))
    assert refusal is not None and refusal.reason == bundle.CARRIES_FILES


@pytest.mark.parametrize(
    "component",
    [
        'clientapp = "client.app:app"',  # the bundle's own module, first on sys.path in Flower
        'clientapp = "fedward.client.app:other"',
        'clientapp = "os:system"',
    ],
)
def test_a_bundle_naming_another_client_component_is_refused(app_dir, component):
    pyproject = app_dir / "pyproject.toml"
    text = pyproject.read_text(encoding="utf-8")
    pyproject.write_text(
        text.replace('clientapp = "fedward.client.app:app"', component), encoding="utf-8"
    )
    refusal = bundle.check_bundle(_fab(app_dir))
    assert refusal is not None and refusal.reason == bundle.FOREIGN_COMPONENT


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("dependencies = []", 'dependencies = ["evil-package==1.0"]'),
        ('requires = ["setuptools>=68"]', 'requires = ["setuptools>=68", "evil-build-hook"]'),
        (
            "dependencies = []",
            'dependencies = []\n[project.optional-dependencies]\nextra = ["evil"]',
        ),
    ],
)
def test_a_bundle_asking_for_dependencies_is_refused(app_dir, old, new):
    pyproject = app_dir / "pyproject.toml"
    text = pyproject.read_text(encoding="utf-8")
    assert old in text
    pyproject.write_text(text.replace(old, new, 1), encoding="utf-8")
    refusal = bundle.check_bundle(_fab(app_dir))
    assert refusal is not None and refusal.reason == bundle.DEPENDENCIES


def test_a_bundle_with_settings_fedward_does_not_write_is_refused(app_dir):
    pyproject = app_dir / "pyproject.toml"
    text = pyproject.read_text(encoding="utf-8")
    pyproject.write_text(text + '\n[tool.uv]\nindex-url = "https://evil.example"\n', "utf-8")
    refusal = bundle.check_bundle(_fab(app_dir))
    assert refusal is not None and refusal.reason == bundle.UNEXPECTED_SETTING
    assert "tool.uv" in refusal.detail


@pytest.mark.parametrize("name", ["../../evil.py", "/etc/cron.d/evil", "a/../../b", "x\\..\\y"])
def test_a_bundle_with_a_path_traversal_name_is_refused(name):
    pyproject = app_pyproject(RunConfig(labels=["a", "b"]).to_flower()).encode("utf-8")
    refusal = bundle.check_bundle(_zip({"pyproject.toml": pyproject, name: b"print(1)"}))
    assert refusal is not None and refusal.reason == bundle.UNSAFE_PATH


def test_a_hand_made_bundle_with_only_fedwards_pyproject_is_accepted():
    """No manifest needed; what matters is that there is no code."""
    pyproject = app_pyproject(RunConfig(labels=["a", "b"]).to_flower()).encode("utf-8")
    assert bundle.check_bundle(_zip({"pyproject.toml": pyproject})) is None


def test_a_manifest_that_does_not_match_is_refused():
    pyproject = app_pyproject(RunConfig(labels=["a", "b"]).to_flower()).encode("utf-8")
    manifest = b"pyproject.toml,0000,8\nclient/app.py,1111,8"
    refusal = bundle.check_bundle(_zip({"pyproject.toml": pyproject, ".info/CONTENT": manifest}))
    assert refusal is not None and refusal.reason == bundle.BAD_MANIFEST


def test_something_that_is_not_a_zip_is_refused():
    refusal = bundle.check_bundle(b"#!/bin/sh\nrm -rf /\n")
    assert refusal is not None and refusal.reason == bundle.NOT_A_BUNDLE
