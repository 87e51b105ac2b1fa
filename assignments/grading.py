"""Load a student's answers from an assignment notebook, and run an assignment's tests on them.

An assignment notebook marks what the student writes with *answer cells*: code cells whose
metadata holds ``"assignment": {"id": "A1-2", "stub": "<the starter's source>"}``. In the
instructor's notebook they hold the reference solution (and carry the ``solution`` tag, so
``tools/student_copy.py`` replaces them by their stubs); in the student's copy they hold the stub
until the student fills it in. Cells tagged ``assignment-context`` hold the imports and helpers
the answers may use; they must be cheap (no training, no model loading).

The tests (``test_public.py``, shipped to students, and ``instructor/test_hidden.py``) are plain
functions of one argument, ``impl``: a namespace holding what the context and answer cells
define, in notebook order. ``conftest.py`` builds it from the notebook next to the tests
(``ASSIGNMENT_NOTEBOOK=path`` grades another one); ``tests/test_assignments.py`` calls the same
functions on the reference solution, on the untouched starter and on the wrong answers listed in
``instructor/wrong_answers.py``. Standard library only: the student copy ships this file.
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ANSWER_KEY = "assignment"
CONTEXT_TAG = "assignment-context"


def source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def answer_id(cell: dict) -> str | None:
    meta = cell.get("metadata", {}).get(ANSWER_KEY)
    return meta.get("id") if cell["cell_type"] == "code" and isinstance(meta, dict) else None


def is_context(cell: dict) -> bool:
    return cell["cell_type"] == "code" and CONTEXT_TAG in cell.get("metadata", {}).get("tags", [])


def read_notebook(nb: dict | str | Path) -> dict:
    if isinstance(nb, dict):
        return nb
    return json.loads(Path(nb).read_text(encoding="utf-8"))


def graded_cells(nb: dict | str | Path) -> list[tuple[str, str]]:
    """(name, source) of the context and answer cells, in notebook order."""
    out = []
    for i, cell in enumerate(read_notebook(nb)["cells"]):
        ident = answer_id(cell)
        if ident is not None:
            out.append((ident, source(cell)))
        elif is_context(cell):
            out.append((f"context-{cell.get('id', i)}", source(cell)))
    return out


def load_answers(
    nb: dict | str | Path, replace: dict[str, str] | None = None, where: str = "notebook"
) -> types.SimpleNamespace:
    """Run the notebook's context and answer cells in one fresh namespace; return it.

    ``replace`` maps an answer id to the source to run instead (a wrong answer's fixture).
    """
    replace = dict(replace or {})
    ns: dict[str, Any] = {"__name__": f"__assignment_{Path(str(where)).stem}__"}
    for name, src in graded_cells(nb):
        src = replace.pop(name, src)
        exec(compile(src, f"{where}:{name}", "exec"), ns)
    if replace:
        raise KeyError(f"{where}: no answer cell {sorted(replace)}")
    return types.SimpleNamespace(**ns)


def solution_sources(nb: dict | str | Path) -> dict[str, str]:
    """Answer id -> the cell's source (the reference solution in the instructor's notebook)."""
    return {answer_id(c): source(c) for c in read_notebook(nb)["cells"] if answer_id(c) is not None}


@dataclass(frozen=True)
class Wrong:
    """A plausible wrong answer to one part, and the tests that must reject it.

    Either ``edits`` (old -> new text, each ``old`` found exactly once in the reference
    solution's cell) or ``source`` (the whole cell's replacement) describes it.
    """

    name: str
    part: str
    why: str
    rejected_by: tuple[str, ...]
    edits: dict[str, str] = field(default_factory=dict)
    source: str | None = None

    def cell_source(self, reference: str) -> str:
        if self.source is not None:
            return self.source
        out = reference
        for old, new in self.edits.items():
            count = out.count(old)
            if count != 1:
                raise ValueError(
                    f"wrong answer {self.name!r}: {old!r} occurs {count} times in "
                    f"{self.part}'s solution; it must occur exactly once"
                )
            out = out.replace(old, new)
        return out


def run_test(test: Callable[[Any], None], impl: Any) -> BaseException | None:
    """Call one test on ``impl``; return the exception it raised (None when it passed)."""
    try:
        test(impl)
    except Exception as err:  # noqa: BLE001 - a failed test is any exception
        return err
    return None


def tests_of(module: types.ModuleType) -> dict[str, Callable[[Any], None]]:
    """The module's ``test_*`` functions, in definition order."""
    return {
        name: fn for name, fn in vars(module).items() if name.startswith("test_") and callable(fn)
    }


def notebook_for(test_file: str | Path) -> Path:
    """The notebook a test file grades: ``$ASSIGNMENT_NOTEBOOK``, else ``<dir>/<dir>.ipynb`` for
    the nearest folder above the test file that holds one."""
    import os

    chosen = os.environ.get("ASSIGNMENT_NOTEBOOK")
    if chosen:
        return Path(chosen)
    for folder in Path(test_file).resolve().parents:
        candidate = folder / f"{folder.name}.ipynb"
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"no <folder>/<folder>.ipynb above {test_file}; set ASSIGNMENT_NOTEBOOK=path/to/your.ipynb"
    )


try:
    import pytest
except ImportError:  # loading answers needs no pytest; only the fixture does
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def impl(request: Any) -> types.SimpleNamespace:
        """What the graded notebook's context and answer cells define (see the docstring)."""
        path = notebook_for(request.path)
        return load_answers(path, where=path.name)
