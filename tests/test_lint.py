"""Lint, format and type checks (issue 20 item 6): ``ruff check``, ``ruff format --check`` and
``mypy gemma2_lite``, configured in ``pyproject.toml`` ([tool.ruff], [tool.mypy]).

Not enforced yet: the code is formatted and the findings fixed in one change after the
post-training branch merges (a mass reformat now would conflict with it). Until then each
check runs and reports, and an xfail records that it does not pass yet.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: What ruff reads: the package, tests, benchmarks, tools, notebooks and assignments.
TARGETS = ["gemma2_lite", "tests", "benchmarks", "tools", "notebooks", "assignments"]

pytestmark = pytest.mark.xfail(reason="enabled after the post-training merge", strict=False)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_ruff_check() -> None:
    result = _run("ruff", "check", *TARGETS)
    assert result.returncode == 0, result.stdout[-4000:]


def test_ruff_format() -> None:
    result = _run("ruff", "format", "--check", *TARGETS)
    assert result.returncode == 0, result.stdout[-4000:]


def test_mypy() -> None:
    result = _run("mypy", "gemma2_lite")
    assert result.returncode == 0, result.stdout[-4000:]
