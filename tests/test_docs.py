"""The README and the documentation site: short, and without a broken link.

The README is a five-minute read that points into `docs/`; the manual is the mkdocs site built
from `docs/` by `mkdocs.yml` (strict: a link to a missing page or anchor, or a page left out of
the nav, fails the build). Both are checked here, so the README's test command catches a broken
link the way it catches a broken function.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 200

_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def relative_links(markdown: str) -> list[str]:
    """The targets of the Markdown links and images in `markdown` that point to local files.

    Code (fenced blocks and inline spans) is not prose and its brackets are not links; external
    URLs and links to an anchor of the same page are left out. A target's `#anchor` is dropped.
    """
    prose = _INLINE_CODE.sub("", _FENCE.sub("", markdown))
    targets = []
    for target in _LINK.findall(prose):
        if _EXTERNAL.match(target) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def test_relative_links_finds_local_targets_only():
    text = (
        "See [privacy](docs/privacy.md#threat-model), [Flower](https://flower.ai), [top](#set-up)"
        " and ![logo](docs/img/logo.png).\n```\n[not a link](nowhere.md)\n```\n`[code](x.md)`\n"
    )
    assert relative_links(text) == ["docs/privacy.md", "docs/img/logo.png"]


def test_readme_is_a_five_minute_read():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail into docs/"
    )


def test_readme_links_point_to_existing_files():
    targets = relative_links(README.read_text(encoding="utf-8"))
    assert targets, "README.md links to no page of docs/"
    missing = [target for target in targets if not (ROOT / target).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_docs_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: a broken link, a missing anchor or a page outside the nav fails."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)]
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-4000:]}"
    assert (tmp_path / "index.html").is_file()
    # The API reference is rendered from the docstrings, fields included (mkdocstrings).
    reference = (tmp_path / "reference" / "index.html").read_text(encoding="utf-8")
    for name in (
        "common.config.RunSpec",
        "common.config.PrivacySpec",
        "common.model.build_model",
        "common.model.load_adapter_for_inference",
        "common.tasks.Task",
        "client.policy.SitePolicy",
    ):
        assert f'id="fedward.{name}"' in reference, name
    for documented in ("lifetime_epsilon", "max_grad_norm", "describe_prediction"):
        assert documented in reference, documented
