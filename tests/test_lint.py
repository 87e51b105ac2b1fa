"""Lint, format and type checks (issue 20 item 6), configured in ``pyproject.toml``:
``ruff check .`` ([tool.ruff.lint]: the package, tests, benchmarks, tools, data scripts,
assignments and the notebooks), ``ruff format --check .`` ([tool.ruff.format]: every .py file;
the notebooks are hand-shaped prose and excluded) and ``mypy`` ([tool.mypy]: its ``files``).

Each fails with the tool's own report. To fix a failure: ``ruff format .`` and
``ruff check --fix .`` do the mechanical part; the rest (and every mypy error) by hand.
mypy keeps its cache in ``.mypy_cache`` (ignored by git): a cold run takes about 20 s of CPU.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def _report(result: subprocess.CompletedProcess[str]) -> str:
    return (result.stdout + result.stderr)[-6000:]


def test_ruff_check() -> None:
    result = _run("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, _report(result)


def test_ruff_format() -> None:
    result = _run("ruff", "format", "--check", "--no-cache", ".")
    assert result.returncode == 0, _report(result)


def test_mypy() -> None:
    result = _run("mypy")  # the files and the cache directory come from pyproject.toml
    assert result.returncode == 0, _report(result)
