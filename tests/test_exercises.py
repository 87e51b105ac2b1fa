"""The exercise contract (every chapter, no exemptions): solutions written once and folded in
the web book, a check cell after each that passes with the solution and fails with the
student's stub and with every stored wrong answer, and ``tools/student_copy.py``
(``make student``) writing copies with only the stubs left.

Format, per exercise: a markdown cell ``**Exercise N (kind).** ...``; a code cell tagged
``solution`` and ``hide-cell`` with metadata ``"exercise": {"id": "NN-N", "stub": "...",
"wrong": [...]}``; right after it a code cell tagged ``check`` with metadata
``"exercise": {"id": "NN-N"}`` that prints only ``Exercise N: correct``. ``wrong`` holds 1 to 3
plausible wrong answers (``{"name", "why", "source"}`` or ``{"name", "why", "edits": {old:
new}}``: the chapter's pitfalls, an off-by-one, a wrapper of the reference). Solutions, stubs,
wrong answers and checks see only the cells tagged ``sizes`` and ``exercise-context`` (run by
``tools/check_exercises.py``, here in one subprocess per chapter).

A check never hands the student its reference: value answers are compared with digests or
stored values (``gemma2_lite.exercises``), and a function compared with a reference must not
reach it (``assert_own_work``). Every question in an exercise's text is either answered by a
name the check reads, or follows the marker ``**Discuss (no check).**``.
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
import check_exercises  # noqa: E402
import student_copy  # noqa: E402

MIN_EXERCISES = 2
WRONG_ANSWERS = (1, 3)  # stored wrong answers per exercise: at least, at most
COLUMN = 88
DISCUSS = "**Discuss (no check).**"

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]*_*.ipynb"))
EXERCISE = re.compile(r"\*\*Exercise (\d+) \(([^)]+)\)\.\*\*")
INTRO = "`make student`"


def _params():
    for path in NOTEBOOKS:
        yield pytest.param(path, id=path.stem)


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _chapter(path: Path) -> str:
    return path.stem.split("_")[0]  # "03", or "06a" for a new chapter


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


def _questions_unchecked(prose: str, checked: set[str]) -> list[str]:
    """The questions of an exercise's text before ``DISCUSS`` that no checked name answers:
    a run of sentences ending in '?' must name (in backticks) something the solution binds and
    the check reads, in the run itself or in the sentence right after it."""
    task = prose.split(DISCUSS)[0]
    sentences = [x for x in re.split(r"(?<=[.?!])\s+", " ".join(task.split())) if x]
    problems, i = [], 0
    while i < len(sentences):
        if not sentences[i].endswith("?"):
            i += 1
            continue
        j = i
        while j < len(sentences) and sentences[j].endswith("?"):
            j += 1
        group = " ".join(sentences[i : j + 1])
        if not set(re.findall(r"`([A-Za-z_]\w*)", group)) & checked:
            problems.append(" ".join(sentences[i:j]))
        i = j + 1
    return problems


def _exercise_sources(cell: dict, solution: str) -> list[tuple[str, str]]:
    """(label, source) of a solution cell's stub and wrong answers."""
    out = [("stub", cell["metadata"]["exercise"]["stub"])]
    for w in student_copy.wrong_answers(cell):
        out.append(
            (f"wrong answer {w.get('name')!r}", check_exercises.wrong_source(w, solution, ""))
        )
    return out


def _check_wrong_answers(name: str, ex_id: str, cell: dict, solution: str) -> None:
    wrong = student_copy.wrong_answers(cell)
    low, high = WRONG_ANSWERS
    assert low <= len(wrong) <= high, (
        f"{name} {ex_id}: {len(wrong)} stored wrong answers, want {low} to {high}"
    )
    names = [w.get("name") for w in wrong]
    assert len(set(names)) == len(names), f"{name} {ex_id}: wrong answers share a name"
    for w in wrong:
        assert (
            isinstance(w.get("name"), str) and isinstance(w.get("why"), str) and w["why"].strip()
        ), f"{name} {ex_id}: a wrong answer needs a name and a why: {w}"
        assert ("source" in w) != ("edits" in w), (
            f"{name} {ex_id} {w['name']!r}: give either source or edits"
        )
    for label, src in _exercise_sources(cell, solution):
        ast.parse(src)
        assert src.strip() != solution.strip(), f"{name} {ex_id}: the {label} is the solution"


@pytest.mark.parametrize("path", list(_params()))
def test_exercise_structure(path: Path) -> None:
    cells = _cells(path)
    name, chapter = path.name, _chapter(path)
    solutions = [i for i, c in enumerate(cells) if student_copy.is_solution(c)]
    assert len(solutions) >= MIN_EXERCISES, (
        f"{name}: {len(solutions)} exercises in the contract's form, want >= {MIN_EXERCISES}"
    )
    assert any(INTRO in student_copy.source(c) for c in cells if c["cell_type"] == "markdown"), (
        f"{name}: the exercises' intro must say what {INTRO} does"
    )
    for k, i in enumerate(solutions, start=1):
        cell = cells[i]
        ex_id = f"{chapter}-{k}"
        meta = cell["metadata"].get("exercise", {})
        assert meta.get("id") == ex_id, (
            f"{name}: solution {k} has id {meta.get('id')!r}, want {ex_id!r} (unique, in order)"
        )
        stub = student_copy.stub_of(cell, name)
        solution = student_copy.source(cell)
        assert stub.strip() != solution.strip(), f"{name} {ex_id}: stub equals the solution"
        assert {"solution", "hide-cell"} <= set(student_copy.tags(cell)), (
            f"{name} {ex_id}: a solution cell is tagged solution and hide-cell"
        )
        _check_wrong_answers(name, ex_id, cell, solution)
        # the task in a markdown cell before it, numbered the same
        prose = next(
            student_copy.source(c) for c in reversed(cells[:i]) if c["cell_type"] == "markdown"
        )
        m = EXERCISE.match(prose)
        assert m and int(m.group(1)) == k, (
            f"{name} {ex_id}: the markdown cell before it must start '**Exercise {k} (kind).**'"
        )
        # the check right after it
        assert i + 1 < len(cells), f"{name} {ex_id}: no check cell after the solution"
        check = cells[i + 1]
        assert (
            student_copy.is_check(check)
            and check["metadata"].get("exercise", {}).get("id") == ex_id
        ), f"{name} {ex_id}: the cell after the solution must be its check (tag, same id)"
        check_src = student_copy.source(check)
        leaked = _printed_names(check_src) & (_bound_names(solution) | _bound_names(stub))
        assert not leaked, f"{name} {ex_id}: the check prints the answer's names {leaked}"
        assert f"Exercise {k}: correct" in check_src, (
            f"{name} {ex_id}: the check should print 'Exercise {k}: correct'"
        )
        checked = {n for n in _bound_names(solution) if re.search(rf"\b{n}\b", check_src)}
        unchecked = _questions_unchecked(prose, checked)
        assert not unchecked, (
            f"{name} {ex_id}: questions no check answers {unchecked}: "
            f"check them, or put them after {DISCUSS}"
        )
        sources = [("solution", solution), ("check", check_src), *_exercise_sources(cell, solution)]
        wide = [(label, l) for label, src in sources for l in src.splitlines() if len(l) > COLUMN]
        assert not wide, f"{name} {ex_id}: lines wider than {COLUMN}: {wide[:2]}"
    checks = [c for c in cells if student_copy.is_check(c)]
    assert len(checks) == len(solutions), f"{name}: check cells without a solution"
    for c in cells:
        if set(student_copy.tags(c)) & {"sizes", "exercise-context"}:
            magic = [
                l for l in student_copy.source(c).splitlines() if l.lstrip().startswith(("%", "!"))
            ]
            assert not magic, f"{name}: context cell {c.get('id')} has magics {magic}"


@pytest.mark.parametrize("path", list(_params()))
def test_checks_pass_with_solution_and_reject_stub_and_wrong_answers(path: Path) -> None:
    env = {
        **os.environ,
        "GEMMA2_LITE_PROFILE": "ci",
        "MPLBACKEND": "Agg",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "check_exercises.py"), str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, f"{path.name}:\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
    assert "PASSED" not in run.stdout and "FAIL" not in run.stdout, run.stdout[-6000:]


def _strings(tree) -> list[str]:
    """Every string in a JSON tree (a notebook's sources, outputs and metadata)."""
    if isinstance(tree, str):
        return [tree]
    items = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, list) else []
    return [s for item in items for s in _strings(item)]


def test_student_copy(tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    out = tmp_path / "student"
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "student_copy.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    originals = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert sorted(p.name for p in out.glob("*.ipynb")) == [p.name for p in originals]
    for path in originals:
        cells = _cells(path)
        copy = out / path.name
        nbformat.validate(nbformat.read(copy, as_version=nbformat.NO_CONVERT))
        student = _cells(copy)
        assert len(student) == len(cells), f"{path.name}: cell count changed"
        text = "\n".join(_strings(student))  # every source and metadata string
        public = "\n".join(
            student_copy.source(c)
            for c in cells  # visible anyway
            if not student_copy.is_solution(c)
        )
        for orig, new in zip(cells, student):
            if student_copy.is_solution(orig):
                meta = orig["metadata"]["exercise"]
                assert student_copy.source(new) == meta["stub"]
                assert new["metadata"]["exercise"] == {"id": meta["id"], "stub": meta["stub"]}
                assert not {"solution", "hide-cell"} & set(student_copy.tags(new))
                assert student_copy.source(orig).strip() not in text, (
                    f"{path.name}: solution source left in the student copy"
                )
                solution = student_copy.source(orig)
                stub_lines = {l.strip() for l in meta["stub"].splitlines()}
                for label, src in _exercise_sources(orig, solution)[1:]:
                    lines = {l.strip() for l in src.splitlines() if len(l.strip()) > 24}
                    leaked = [l for l in lines - stub_lines if l in text and l not in public]
                    assert not leaked, f"{path.name} {meta['id']}: {label} shipped: {leaked[:2]}"
            else:
                assert student_copy.source(new) == student_copy.source(orig)
                assert new["metadata"] == orig["metadata"]
            if new["cell_type"] == "code":
                assert new["outputs"] == [] and new["execution_count"] is None


def test_student_copy_refuses_a_solution_without_stub(tmp_path: Path) -> None:
    nb = {
        "cells": [
            {
                "cell_type": "code",
                "id": "x",
                "metadata": {"tags": ["solution"]},
                "source": ["answer = 1\n"],
                "outputs": [],
                "execution_count": None,
            }
        ],
        "metadata": {},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    bad = tmp_path / "99_bad.ipynb"
    bad.write_text(json.dumps(nb))
    with pytest.raises(student_copy.ExerciseError, match="no metadata 'exercise'"):
        student_copy.write_student_copies(tmp_path / "out", [bad])
    assert not (tmp_path / "out").exists()


def _toy(check: str, wrong: list[dict] | None = None) -> dict:
    def code(src, tags, meta=None):
        return {
            "cell_type": "code",
            "id": tags[0],
            "execution_count": None,
            "outputs": [],
            "source": src,
            "metadata": {"tags": tags, **({"exercise": meta} if meta else {})},
        }

    meta = {"id": "99-1", "stub": "answer_1 = None  # your answer\n"}
    if wrong is not None:
        meta["wrong"] = wrong
    return {
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {},
        "cells": [
            code("two = 2\nseen = []\n", ["exercise-context"]),
            code("answer_1 = two\n", ["solution", "hide-cell"], meta),
            code(check, ["check"], {"id": "99-1"}),
        ],
    }


def test_runner_catches_a_check_that_cannot_fail(tmp_path: Path) -> None:
    good, bad, chatty = (tmp_path / f"{n}.ipynb" for n in ("good", "bad", "chatty"))
    good.write_text(json.dumps(_toy('assert answer_1 == 2\nprint("Exercise 1: correct")\n')))
    bad.write_text(json.dumps(_toy('print("Exercise 1: correct")\n')))
    chatty.write_text(
        json.dumps(_toy('assert answer_1 == 2\nprint("Exercise 1: correct", answer_1)\n'))
    )
    assert check_exercises.check_notebook(good) == []
    assert any("passed after the stub" in p for p in check_exercises.check_notebook(bad))
    assert any("printed" in p for p in check_exercises.check_notebook(chatty))


def test_runner_catches_a_check_that_accepts_a_wrong_answer(tmp_path: Path) -> None:
    """A check that only tests the answer's type lets a stored wrong answer through; a wrong
    answer that crashes by itself proves nothing; edits must match the solution once; and a
    wrong answer that mutates the context cannot leak into the next run."""
    loose = 'assert isinstance(answer_1, int)\nprint("Exercise 1: correct")\n'
    strict = 'assert answer_1 == 2 and seen == []\nprint("Exercise 1: correct")\n'
    off_by_one = {"name": "off by one", "why": "three", "edits": {"two": "two + 1"}}
    mutates = {
        "name": "mutates",
        "why": "changes the context",
        "source": "seen.append(1)\nanswer_1 = 3\n",
    }
    cases = {
        "loose": (loose, [off_by_one], "passed after the wrong answer 'off by one'"),
        "crash": (
            strict,
            [{"name": "crash", "why": "x", "source": "1 / 0\n"}],
            "wrong answer 'crash' itself raised",
        ),
        "edit": (
            strict,
            [{"name": "nowhere", "why": "x", "edits": {"three": "4"}}],
            "occurs 0 times",
        ),
    }
    for stem, (check, wrong, message) in cases.items():
        path = tmp_path / f"{stem}.ipynb"
        path.write_text(json.dumps(_toy(check, wrong)))
        assert any(message in p for p in check_exercises.check_notebook(path)), stem
    fine = tmp_path / "fine.ipynb"
    fine.write_text(json.dumps(_toy(strict, [off_by_one, mutates])))
    assert check_exercises.check_notebook(fine) == []


# ----------------------------------------------------------------------------- the helpers
def test_own_work_finds_the_reference_however_it_is_reached() -> None:
    import functools

    import jax
    import jax.numpy as jnp

    from gemma2_lite.exercises import assert_own_work
    from gemma2_lite.model import param_counts

    ns: dict = {"__name__": "__exercises__", "jax": jax, "jnp": jnp, "param_counts": param_counts}
    exec(
        compile(
            """
ref = param_counts
def direct(cfg): return param_counts(cfg)
def helper(cfg): return ref(cfg)
def via_helper(cfg): return helper(cfg) + 1
def imported(cfg):
    from gemma2_lite.model import param_counts as pc
    return pc(cfg)
def attribute(cfg):
    import gemma2_lite.model
    return gemma2_lite.model.param_counts(cfg)
def closure():
    f = param_counts
    return lambda cfg: f(cfg)
def default(cfg, f=param_counts): return f(cfg)
def wrapped_softmax(x): return jax.nn.softmax(x)
def own(cfg): return sum([1, 2]) + jnp.exp(0.0)
def own_softmax(x):
    z = jnp.exp(x - x.max())
    return z / z.sum()
""",
            "toy",
            "exec",
        ),
        ns,
    )
    rejected = [
        ns["direct"],
        ns["via_helper"],
        ns["imported"],
        ns["attribute"],
        ns["closure"](),
        ns["default"],
        param_counts,
        functools.partial(param_counts),
        jax.jit(param_counts),
    ]
    for fn in rejected:
        with pytest.raises(AssertionError, match="param_counts"):
            assert_own_work(fn, param_counts)
    with pytest.raises(AssertionError, match="softmax"):
        assert_own_work(jax.jit(jax.nn.softmax), jax.nn.softmax)
    with pytest.raises(AssertionError, match="softmax"):
        assert_own_work(ns["wrapped_softmax"], jax.nn.softmax)
    exec(compile("def copies(x): return jnp.repeat(x, 2)\n", "toy", "exec"), ns)
    with pytest.raises(AssertionError, match="repeat"):
        assert_own_work(ns["copies"], "repeat")
    assert_own_work(ns["own"], param_counts)
    assert_own_work(jax.jit(ns["own_softmax"]), jax.nn.softmax)


def test_own_work_tells_a_bound_method_from_its_name() -> None:
    from gemma2_lite.exercises import assert_own_work
    from gemma2_lite.tokenizer import default_tokenizer

    tok = default_tokenizer()
    ns: dict = {"__name__": "__exercises__", "TOK": tok}
    exec(
        compile(
            """
def wrapper(ids): return TOK.decode(ids)
def own(ids): return bytearray(ids).decode("latin-1")      # another object's decode
""",
            "toy",
            "exec",
        ),
        ns,
    )
    with pytest.raises(AssertionError, match="decode"):
        assert_own_work(ns["wrapper"], tok.decode)
    assert_own_work(ns["own"], tok.decode)


def test_digests_and_fingerprints() -> None:
    import numpy as np

    from gemma2_lite.exercises import assert_digest, assert_fingerprint, digest, fingerprint

    assert digest(3) != digest(3.0, sig=4) and digest(3) != digest(True)
    assert digest(4096, sig=5) == digest(4096.0, sig=5) == digest(np.float32(4096), sig=5)
    assert digest((2, 4)) == digest([2, 4]) == digest(np.array([2, 4]))
    assert digest({0.1: 3, 0.05: 2}) == digest({0.05: 2, 0.1: 3})
    assert digest(58469.57, sig=4) == digest(58470.1, sig=4) != digest(58480.0, sig=4)
    assert_digest(6, digest(6), "x")
    with pytest.raises(AssertionError, match="hint"):
        assert_digest(7, digest(6), "hint")
    x = np.random.default_rng(0).standard_normal((7, 5))
    shape, values = fingerprint(x)
    assert_fingerprint(x + 1e-7, shape, values, "x")
    for bad in (x[:, ::-1], 1.01 * x, x.T, np.full_like(x, np.nan)):
        with pytest.raises(AssertionError):
            assert_fingerprint(bad, shape, values, "x")
