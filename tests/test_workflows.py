"""The GitHub Actions workflows (.github/workflows/) lint clean, offline.

check-jsonschema validates them against GitHub's workflow schema (vendored in the package) and
zizmor runs its audits (pinned actions, no persisted credentials, permissions) without the
network. Both come from the test extra.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert path, f"{name} is not installed: make test installs it with the test extra"
    return path


def test_the_two_workflows_exist_and_build_and_test_as_the_makefile_does() -> None:
    names = {p.stem for p in WORKFLOWS}
    assert {"book", "tests"} <= names, names
    book = yaml.safe_load((ROOT / ".github/workflows/book.yml").read_text())
    steps = [s.get("run", "") + s.get("uses", "") for s in book["jobs"]["build"]["steps"]]
    assert any("make book" in s for s in steps)
    assert "actions/deploy-pages@" in book["jobs"]["deploy"]["steps"][0]["uses"]
    assert book["jobs"]["build"]["env"]["GEMMA2_LITE_PROFILE"] == "ci"
    assert any("jupyter_cache" in str(s.get("with", {})) for s in book["jobs"]["build"]["steps"])
    tests = yaml.safe_load((ROOT / ".github/workflows/tests.yml").read_text())
    assert any("make test" in s.get("run", "") for s in tests["jobs"]["test"]["steps"])


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_githubs_schema(path: Path) -> None:
    out = subprocess.run(
        [_tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_workflows_pass_the_linters_audits() -> None:
    out = subprocess.run(
        [_tool("zizmor"), "--offline", "--no-progress", *map(str, WORKFLOWS)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
