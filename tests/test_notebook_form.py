"""The chapters' form on the web: code fits the book's column, the setup cell is the shared one
(hidden in the web book, its output line kept), the sizes cell (profile plumbing) is folded the
same way, and notebooks are committed without outputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]*_*.ipynb"))
COLUMN = 88  # characters of code the rendered book shows without a horizontal scrollbar
SETUP = re.search(
    r"```python\n(.*?)```", (ROOT / "notebooks" / "SETUP_CELL.md").read_text(), re.S
).group(1)


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_code_fits_the_book_column(path: Path) -> None:
    wide = [
        (i, line)
        for i, c in enumerate(_cells(path))
        if c["cell_type"] == "code"
        for line in "".join(c["source"]).splitlines()
        if len(line) > COLUMN
    ]
    assert not wide, f"{path.name}: {len(wide)} code lines wider than {COLUMN}: {wide[:3]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_setup_cell_is_the_shared_one_and_hidden(path: Path) -> None:
    setup = next(c for c in _cells(path) if c["cell_type"] == "code")
    source = "".join(setup["source"])
    # Chapter 10 puts its emulated-device lines before the shared part and initialises
    # multi-host JAX before the package's first JAX call; the rest is the same.
    shared_from = SETUP.index("import os, subprocess, sys")
    own = "".join(
        l for l in source.splitlines(keepends=True) if "maybe_initialize_distributed" not in l
    )
    assert own.endswith(SETUP[shared_from:]), f"{path.name}: setup cell differs from SETUP_CELL.md"
    if not path.name.startswith("10_"):
        assert source == SETUP
    assert "hide-input" in setup["metadata"].get("tags", [])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_sizes_cell_is_folded_like_the_setup_cell(path: Path) -> None:
    """The profile's sizes are not the first code a reader sees: the cell is tagged hide-input
    (the web book folds its code behind a toggle, as it does the setup cell's)."""
    code = [c for c in _cells(path) if c["cell_type"] == "code"]
    sizes = [c for c in code if "sizes" in c["metadata"].get("tags", [])]
    assert len(sizes) == 1, f"{path.name}: {len(sizes)} cells tagged sizes, want one"
    assert sizes[0] is code[1], f"{path.name}: the sizes cell comes right after the setup cell"
    assert "hide-input" in sizes[0]["metadata"]["tags"], (
        f"{path.name}: tag the sizes cell hide-input, like the setup cell"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path: Path) -> None:
    dirty = [
        i
        for i, c in enumerate(_cells(path))
        if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count") is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; commit notebooks without them"
