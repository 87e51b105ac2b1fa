"""The exercise contract (every chapter): solutions written once and folded in the web book,
a check cell after each that passes with the solution and fails with the student's stub, and
``tools/student_copy.py`` (``make student``) writing copies with only the stubs left.

Format, per exercise: a markdown cell ``**Exercise N (kind).** ...``; a code cell tagged
``solution`` and ``hide-cell`` with metadata ``"exercise": {"id": "NN-N", "stub": "..."}``;
right after it a code cell tagged ``check`` with metadata ``"exercise": {"id": "NN-N"}`` that
prints only ``Exercise N: correct``. Solutions and checks see only the cells tagged ``sizes``
and ``exercise-context`` (run by ``tools/check_exercises.py``, here in one subprocess per
chapter).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import student_copy  # noqa: E402

# Chapters that may have no exercises yet (new chapters still being written).
NEW_CHAPTERS = {"00_jax_and_nnx", "06a_training", "06b_decoding", "08a_post_training"}
MIN_EXERCISES = 2

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]*_*.ipynb"))
EXERCISE = re.compile(r"\*\*Exercise (\d+) \(([^)]+)\)\.\*\*")
INTRO = "`make student`"


def _params():
    for path in NOTEBOOKS:
        yield pytest.param(path, id=path.stem)


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _chapter(path: Path) -> str:
    return path.stem.split("_")[0]          # "03", or "06a" for a new chapter


def _bound_names(src: str) -> set[str]:
    """Names a solution binds at its top level (assignments, defs, imports)."""
    names: set[str] = set()
    for node in ast.parse(src).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        else:
            for sub in ast.walk(node):
                if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                    names.add(sub.id)
    return names


def _printed_names(src: str) -> set[str]:
    """Names read inside the arguments of print(...) calls."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                names |= {n.id for n in ast.walk(arg) if isinstance(n, ast.Name)}
    return names


@pytest.mark.parametrize("path", list(_params()))
def test_exercise_structure(path: Path) -> None:
    cells = _cells(path)
    name, chapter = path.name, _chapter(path)
    solutions = [i for i, c in enumerate(cells) if student_copy.is_solution(c)]
    if path.stem not in NEW_CHAPTERS or solutions:
        assert len(solutions) >= MIN_EXERCISES, \
            f"{name}: {len(solutions)} exercises in the contract's form, want >= {MIN_EXERCISES}"
    if solutions:
        assert any(INTRO in student_copy.source(c) for c in cells
                   if c["cell_type"] == "markdown"), \
            f"{name}: the exercises' intro must say what {INTRO} does"
    for k, i in enumerate(solutions, start=1):
        cell = cells[i]
        ex_id = f"{chapter}-{k}"
        meta = cell["metadata"].get("exercise", {})
        assert meta.get("id") == ex_id, \
            f"{name}: solution {k} has id {meta.get('id')!r}, want {ex_id!r} (unique, in order)"
        stub = student_copy.stub_of(cell, name)
        solution = student_copy.source(cell)
        assert stub.strip() != solution.strip(), f"{name} {ex_id}: stub equals the solution"
        assert {"solution", "hide-cell"} <= set(student_copy.tags(cell)), \
            f"{name} {ex_id}: a solution cell is tagged solution and hide-cell"
        ast.parse(stub)
        # the task in a markdown cell before it, numbered the same
        prose = next(student_copy.source(c) for c in reversed(cells[:i])
                     if c["cell_type"] == "markdown")
        m = EXERCISE.match(prose)
        assert m and int(m.group(1)) == k, \
            f"{name} {ex_id}: the markdown cell before it must start '**Exercise {k} (kind).**'"
        # the check right after it
        assert i + 1 < len(cells), f"{name} {ex_id}: no check cell after the solution"
        check = cells[i + 1]
        assert student_copy.is_check(check) and \
            check["metadata"].get("exercise", {}).get("id") == ex_id, \
            f"{name} {ex_id}: the cell after the solution must be its check (tag, same id)"
        check_src = student_copy.source(check)
        leaked = _printed_names(check_src) & (_bound_names(solution) | _bound_names(stub))
        assert not leaked, f"{name} {ex_id}: the check prints the answer's names {leaked}"
        assert f"Exercise {k}: correct" in check_src, \
            f"{name} {ex_id}: the check should print 'Exercise {k}: correct'"
    checks = [c for c in cells if student_copy.is_check(c)]
    assert len(checks) == len(solutions), f"{name}: check cells without a solution"
    for c in cells:
        if set(student_copy.tags(c)) & {"sizes", "exercise-context"}:
            magic = [l for l in student_copy.source(c).splitlines()
                     if l.lstrip().startswith(("%", "!"))]
            assert not magic, f"{name}: context cell {c.get('id')} has magics {magic}"


@pytest.mark.parametrize("path", list(_params()))
def test_checks_pass_with_solution_and_fail_with_stub(path: Path) -> None:
    if not any(student_copy.is_solution(c) for c in _cells(path)):
        assert path.stem in NEW_CHAPTERS, f"{path.name}: no exercises"
        pytest.skip("a new chapter without exercises yet")
    env = {**os.environ, "GEMMA2_LITE_PROFILE": "ci", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "check_exercises.py"),
                          str(path)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"{path.name}:\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"


def test_student_copy(tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    out = tmp_path / "student"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "student_copy.py"), str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    originals = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert sorted(p.name for p in out.glob("*.ipynb")) == [p.name for p in originals]
    for path in originals:
        cells = _cells(path)
        copy = out / path.name
        nbformat.validate(nbformat.read(copy, as_version=nbformat.NO_CONVERT))
        student = _cells(copy)
        assert len(student) == len(cells), f"{path.name}: cell count changed"
        text = "\n".join(student_copy.source(c) for c in student)
        for orig, new in zip(cells, student):
            if student_copy.is_solution(orig):
                assert student_copy.source(new) == orig["metadata"]["exercise"]["stub"]
                assert not {"solution", "hide-cell"} & set(student_copy.tags(new))
                assert student_copy.source(orig).strip() not in text, \
                    f"{path.name}: solution source left in the student copy"
            else:
                assert student_copy.source(new) == student_copy.source(orig)
                assert new["metadata"] == orig["metadata"]
            if new["cell_type"] == "code":
                assert new["outputs"] == [] and new["execution_count"] is None


def test_student_copy_refuses_a_solution_without_stub(tmp_path: Path) -> None:
    nb = {"cells": [{"cell_type": "code", "id": "x", "metadata": {"tags": ["solution"]},
                     "source": ["answer = 1\n"], "outputs": [], "execution_count": None}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    bad = tmp_path / "99_bad.ipynb"
    bad.write_text(json.dumps(nb))
    with pytest.raises(student_copy.ExerciseError, match="no metadata 'exercise'"):
        student_copy.write_student_copies(tmp_path / "out", [bad])
    assert not (tmp_path / "out").exists()


def test_runner_catches_a_check_that_cannot_fail(tmp_path: Path) -> None:
    import check_exercises

    def nb(check: str) -> dict:
        def code(src, tags, meta=None):
            return {"cell_type": "code", "id": tags[0], "execution_count": None,
                    "outputs": [], "source": src,
                    "metadata": {"tags": tags, **({"exercise": meta} if meta else {})}}
        return {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
            code("two = 2\n", ["exercise-context"]),
            code("answer_1 = two\n", ["solution", "hide-cell"],
                 {"id": "99-1", "stub": "answer_1 = None  # your answer\n"}),
            code(check, ["check"], {"id": "99-1"})]}

    good, bad, chatty = (tmp_path / f"{n}.ipynb" for n in ("good", "bad", "chatty"))
    good.write_text(json.dumps(nb('assert answer_1 == 2\nprint("Exercise 1: correct")\n')))
    bad.write_text(json.dumps(nb('print("Exercise 1: correct")\n')))
    chatty.write_text(json.dumps(nb('assert answer_1 == 2\nprint("Exercise 1: correct",'
                                    ' answer_1)\n')))
    assert check_exercises.check_notebook(good) == []
    assert any("passed after the stub" in p for p in check_exercises.check_notebook(bad))
    assert any("printed" in p for p in check_exercises.check_notebook(chatty))
