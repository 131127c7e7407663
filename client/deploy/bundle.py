"""The bundle check: a hospital runs a submitted Flower app bundle (FAB) only if it carries no code.

A FAB is a zip the coordinator submits with each run. Flower would install it, put its folder
first on `sys.path` and import the ClientApp it names: a dishonest coordinator could ship its own
`client/app.py` (or name another component, or ask for packages to be installed) and so replace
the site policy, the ledger, DP and secure aggregation with code of its choosing.

fedward's own app bundle (what `fedward run` submits, see server/deploy.py `app_pyproject`) is
`pyproject.toml` and Flower's `.info/CONTENT` manifest, nothing else: the code is the fedward
package installed at the hospital. `check_bundle` reads the FAB's bytes as data (zip listing,
TOML) and accepts only that shape: no other file, the two fedward components, no dependencies,
no other settings. What may differ between runs is the app's version and its config table (the
run spec, which the site policy checks). Nothing in the bundle is ever imported, accepted or not:
the hospital's ClientApp process (client/deploy/runtime.py) always loads `fedward.client.app:app`.
"""

from __future__ import annotations

import hashlib
import io
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

#: The only ClientApp a hospital runs: the one of the fedward installed here.
CLIENT_APP = "fedward.client.app:app"
#: The components fedward's app bundle names (server/deploy.py `app_pyproject`).
COMPONENTS = {"serverapp": "fedward.server.app:app", "clientapp": CLIENT_APP}
PYPROJECT = "pyproject.toml"
MANIFEST = ".info/CONTENT"
#: A pyproject.toml larger than this is refused unread (fedward's is a few KiB).
MAX_PYPROJECT_BYTES = 1 << 20

#: What fedward's app bundle holds besides the version and the config table.
EXPECTED_BUILD_SYSTEM = {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"}
EXPECTED_PROJECT_KEYS = {"name", "version", "description", "license", "dependencies"}
EXPECTED_APP_KEYS = {"publisher", "components", "config"}
APP_NAME = "fedward-deployment"
PUBLISHER = "fedward"

#: Reason codes of a refusal (what the coordinator is told; details stay in the audit log).
NOT_A_BUNDLE = "bundle.not-a-zip"
UNSAFE_PATH = "bundle.unsafe-path"
CARRIES_FILES = "bundle.carries-files"
BAD_PYPROJECT = "bundle.bad-pyproject"
FOREIGN_COMPONENT = "bundle.foreign-component"
DEPENDENCIES = "bundle.dependencies"
UNEXPECTED_SETTING = "bundle.unexpected-setting"
BAD_MANIFEST = "bundle.bad-manifest"


@dataclass(frozen=True)
class BundleRefusal:
    """Why a bundle was refused.

    Attributes:
        reason: One of the reason codes above (safe to send back to the coordinator).
        detail: What exactly was wrong, for the hospital's staff (the audit log only: it may
            quote names from the bundle).
    """

    reason: str
    detail: str


def check_bundle(fab: bytes) -> BundleRefusal | None:
    """None if `fab` is fedward's own app bundle (no code, fedward's components, no
    dependencies); otherwise the first reason to refuse it. Reads, never imports or extracts."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
        entries = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        return BundleRefusal(NOT_A_BUNDLE, f"not a zip archive ({type(exc).__name__})")
    names = [entry.filename for entry in entries]
    unsafe = [name for name in names if not _safe_name(name)]
    if unsafe:
        return BundleRefusal(UNSAFE_PATH, f"unsafe file names in the bundle: {unsafe[:5]}")
    extra = sorted(set(names) - {PYPROJECT, MANIFEST})
    if extra or len(names) != len(set(names)) or PYPROJECT not in names:
        return BundleRefusal(
            CARRIES_FILES,
            f"the bundle must hold only {PYPROJECT} and {MANIFEST}; it holds {len(names)} "
            f"entries, among them {extra[:10] or names[:10]}",
        )
    pyproject_entry = archive.getinfo(PYPROJECT)
    if pyproject_entry.file_size > MAX_PYPROJECT_BYTES:
        return BundleRefusal(BAD_PYPROJECT, f"{PYPROJECT} is {pyproject_entry.file_size} bytes")
    try:
        raw = archive.read(pyproject_entry)
        config = tomllib.loads(raw.decode("utf-8"))
    except (zipfile.BadZipFile, UnicodeDecodeError, tomllib.TOMLDecodeError, OSError) as exc:
        return BundleRefusal(BAD_PYPROJECT, f"{PYPROJECT} unreadable: {type(exc).__name__}")
    refusal = check_pyproject(config)
    if refusal is not None:
        return refusal
    if MANIFEST in names:
        return _check_manifest(archive, raw)
    return None


def check_pyproject(config: dict[str, Any]) -> BundleRefusal | None:
    """None if `config` (a parsed pyproject.toml) is fedward's app with some version and run
    config; else the first difference."""
    app = _table(_table(_table(config, "tool"), "flwr"), "app")
    components = app.get("components")
    if components != COMPONENTS:
        return BundleRefusal(
            FOREIGN_COMPONENT,
            f"[tool.flwr.app.components] is {components!r}; this hospital runs only {COMPONENTS!r}",
        )
    project = _table(config, "project")
    asked = {
        "project.dependencies": project.get("dependencies", []),
        "project.optional-dependencies": project.get("optional-dependencies", {}),
        "build-system.requires": _table(config, "build-system").get("requires", []),
    }
    for where, value in asked.items():
        expected = EXPECTED_BUILD_SYSTEM["requires"] if where.startswith("build") else []
        if value and value != expected:
            return BundleRefusal(DEPENDENCIES, f"{where} asks for {value!r}; nothing may be")
    unexpected = _unexpected_settings(config, project, app)
    if unexpected:
        return BundleRefusal(UNEXPECTED_SETTING, f"not in fedward's app bundle: {unexpected}")
    table = app.get("config", {})
    if not isinstance(table, dict) or any(
        not isinstance(value, (bool, int, float, str)) for value in table.values()
    ):
        return BundleRefusal(UNEXPECTED_SETTING, "[tool.flwr.app.config] holds non-scalar values")
    return None


def _unexpected_settings(
    config: dict[str, Any], project: dict[str, Any], app: dict[str, Any]
) -> list[str]:
    """Keys or values of the pyproject that fedward's own bundle does not have."""
    found = [key for key in config if key not in ("build-system", "project", "tool")]
    found += [f"tool.{key}" for key in _table(config, "tool") if key != "flwr"]
    found += [f"tool.flwr.{key}" for key in _table(_table(config, "tool"), "flwr") if key != "app"]
    found += [f"project.{key}" for key in project if key not in EXPECTED_PROJECT_KEYS]
    found += [f"tool.flwr.app.{key}" for key in app if key not in EXPECTED_APP_KEYS]
    build_system = _table(config, "build-system")
    if build_system and build_system != EXPECTED_BUILD_SYSTEM:
        found.append("build-system")
    if project.get("name") != APP_NAME:
        found.append("project.name")
    if app.get("publisher") != PUBLISHER:
        found.append("tool.flwr.app.publisher")
    return found


def _check_manifest(archive: zipfile.ZipFile, pyproject: bytes) -> BundleRefusal | None:
    """Flower's manifest must list exactly the pyproject, with its hash and size."""
    try:
        lines = archive.read(MANIFEST).decode("utf-8").split("\n")
    except (zipfile.BadZipFile, UnicodeDecodeError, OSError) as exc:
        return BundleRefusal(BAD_MANIFEST, f"{MANIFEST} unreadable: {type(exc).__name__}")
    expected = f"{PYPROJECT},{hashlib.sha256(pyproject).hexdigest()},{len(pyproject) * 8}"
    if [line for line in lines if line.strip()] != [expected]:
        return BundleRefusal(BAD_MANIFEST, f"{MANIFEST} lists {len(lines)} lines, not {PYPROJECT}")
    return None


def _safe_name(name: str) -> bool:
    """A plain relative POSIX path: no root, drive, backslash, '..', control characters."""
    if not name or name.startswith("/") or "\\" in name or ":" in name:
        return False
    if any(ord(char) < 32 for char in name):
        return False
    return ".." not in PurePosixPath(name).parts


def _table(config: Any, key: str) -> dict[str, Any]:
    value = config.get(key, {}) if isinstance(config, dict) else {}
    return value if isinstance(value, dict) else {}
