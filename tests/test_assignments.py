"""The graded assignments (assignments/): each one's tests pass on the reference solution, fail on
the untouched starter, and reject the plausible wrong answers its instructor folder lists; the
student build leaves solutions and hidden tests out, the instructor build keeps them; the
syllabus releases each assignment only after the chapters it needs, and no due date shares a
week with the final report.

An assignment is a folder ``assignments/aN_name/`` holding ``aN_name.ipynb`` (the instructor's
notebook: answer cells hold the reference solution, their metadata the starter's stub),
``test_aN_public.py``, ``conftest.py``, ``rubric.md`` and ``instructor/`` (``test_aN_hidden.py``,
``wrong_answers.py``). ``assignments/grading.py`` says how a notebook becomes the ``impl`` the
tests receive.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "assignments"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tools"))
import grading  # noqa: E402
import student_copy  # noqa: E402

FOLDERS = sorted(p for p in HERE.iterdir() if p.is_dir() and (p / f"{p.name}.ipynb").exists())
IDS = [p.name for p in FOLDERS]
COLUMN = 88
SETUP = re.search(
    r"```python\n(.*?)```", (ROOT / "notebooks" / "SETUP_CELL.md").read_text(), re.S
).group(1)
# Chapters the syllabus's week plan must teach before an assignment is released (each
# assignment's notebook links them as its prerequisites: test_prerequisites_are_declared).
NEEDS = {
    "a1_flash_attention": {"00", "03", "04", "05"},
    "a2_scaling_laws": {"06", "06a"},
    "a3_speculative_decoding": {"06", "06a", "06b"},
}


def _number(folder: Path) -> str:
    return folder.name.split("_")[0][1:]  # "a2_scaling_laws" -> "2"


def _import(path: Path, name: str) -> types.ModuleType:
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@functools.cache
def _suite(name: str) -> tuple[dict, dict, list, dict]:
    """(public tests, hidden tests, wrong answers, the notebook) of one assignment."""
    folder = HERE / name
    n = _number(folder)
    public = _import(folder / f"test_a{n}_public.py", f"test_a{n}_public")
    hidden = _import(folder / "instructor" / f"test_a{n}_hidden.py", f"test_a{n}_hidden")
    wrong = _import(folder / "instructor" / "wrong_answers.py", f"wrong_answers_a{n}")
    nb = json.loads((folder / f"{name}.ipynb").read_text(encoding="utf-8"))
    return grading.tests_of(public), grading.tests_of(hidden), list(wrong.WRONG), nb


def _cells(nb: dict) -> list[dict]:
    return nb["cells"]


@functools.cache
def _reference(name: str) -> tuple[types.SimpleNamespace, dict[str, dict]]:
    """The reference solution's namespace, and a snapshot of it before each answer cell.

    A wrong answer to part P starts from the snapshot before P, so the earlier parts' functions
    are the reference's own objects: what they compiled (a jitted fit, say) is not compiled
    again for every wrong answer to a later part."""
    ns: dict = {"__name__": f"__assignment_{name}__"}
    before: dict[str, dict] = {}
    for cell, src in grading.graded_cells(_suite(name)[3]):
        if not cell.startswith("context-"):
            before[cell] = dict(ns)
        exec(compile(src, f"{name}:{cell}", "exec"), ns)
    return types.SimpleNamespace(**ns), before


def _wrong_impl(name: str, wrong: grading.Wrong) -> types.SimpleNamespace:
    """The reference solution with ``wrong``'s part replaced (and the later parts re-run, so
    they call the wrong version)."""
    _, before = _reference(name)
    cells = grading.graded_cells(_suite(name)[3])
    start = [cell for cell, _ in cells].index(wrong.part)
    ns = dict(before[wrong.part])
    for cell, src in cells[start:]:
        if cell == wrong.part:
            src = wrong.cell_source(src)
        exec(compile(src, f"{name}:{cell}:{wrong.name}", "exec"), ns)
    return types.SimpleNamespace(**ns)


# ----------------------------------------------------------------------------- form
@pytest.mark.parametrize("name", IDS)
def test_layout_and_form(name: str) -> None:
    folder, n = HERE / name, _number(HERE / name)
    for rel in (
        f"test_a{n}_public.py",
        "conftest.py",
        "rubric.md",
        f"instructor/test_a{n}_hidden.py",
        "instructor/wrong_answers.py",
    ):
        assert (folder / rel).is_file(), f"{name}: {rel} is missing"
    cells = _cells(_suite(name)[3])
    code = [c for c in cells if c["cell_type"] == "code"]
    assert grading.source(code[0]) == SETUP and "hide-input" in code[0]["metadata"]["tags"], (
        f"{name}: the first code cell must be notebooks/SETUP_CELL.md's, tagged hide-input"
    )
    assert "sizes" in code[1]["metadata"].get("tags", []), f"{name}: sizes cell second"
    wide = [l for c in code for l in grading.source(c).splitlines() if len(l) > COLUMN]
    assert not wide, f"{name}: code lines wider than {COLUMN}: {wide[:2]}"
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), (
        f"{name}: commit the notebook without outputs"
    )
    answers = [c for c in code if grading.answer_id(c)]
    assert [grading.answer_id(c) for c in answers] == [
        f"A{n}-{k}" for k in range(1, len(answers) + 1)
    ], f"{name}: answer ids A{n}-1, ..."
    for cell in answers:
        ident = grading.answer_id(cell)
        stub = cell["metadata"]["assignment"]["stub"]
        assert "solution" in cell["metadata"].get("tags", []), f"{ident}: tag it solution"
        for src in (stub, grading.source(cell)):
            assert src.startswith(f"# YOUR ANSWER ({ident})"), (
                f"{ident}: solution and stub start with '# YOUR ANSWER ({ident})'"
            )
        assert stub.strip() != grading.source(cell).strip(), f"{ident}: stub = solution"
        ast.parse(stub)
        prose = "\n".join(grading.source(c) for c in cells if c["cell_type"] == "markdown")
        assert f"**Your answer ({ident}).**" in prose, f"{ident}: say what to write, in bold"
    for c in code:
        if grading.is_context(c):
            magic = [l for l in grading.source(c).splitlines() if l.lstrip().startswith(("%", "!"))]
            assert not magic, f"{name}: the graded imports cell has magics {magic}"


@pytest.mark.parametrize("name", IDS)
def test_prerequisites_are_declared(name: str) -> None:
    """The notebook links every chapter the syllabus waits for before releasing it."""
    text = "\n".join(grading.source(c) for c in _cells(_suite(name)[3])[:2])
    linked = set(re.findall(r"notebooks/(\d\d[a-z]?)_", text))
    assert NEEDS[name] <= linked, f"{name}: prerequisites {NEEDS[name] - linked} not linked"


@pytest.mark.parametrize("name", IDS)
def test_rubric_adds_up(name: str) -> None:
    """rubric.md: a table whose Points column sums to 100, one row per answer part at least."""
    text = (HERE / name / "rubric.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\|\s*([^|]+?)\s*\|\s*(\d+)\s*\|", text, re.M)
    assert sum(int(p) for _, p in rows) == 100, f"{name}: rubric points {rows}"
    parts = {grading.answer_id(c) for c in _cells(_suite(name)[3]) if grading.answer_id(c)}
    missing = {p for p in parts if not any(p in label for label, _ in rows)}
    assert not missing, f"{name}: the rubric has no row for {sorted(missing)}"


# ----------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("name", IDS)
def test_reference_solution_passes_every_test(name: str) -> None:
    public, hidden, _, _ = _suite(name)
    impl = _reference(name)[0]
    failed = {
        t: repr(err)[:300]
        for t, fn in {**public, **hidden}.items()
        if (err := grading.run_test(fn, impl)) is not None
    }
    assert not failed, f"{name}: the reference solution fails {failed}"


@pytest.mark.parametrize("name", IDS)
def test_starter_fails_every_test(name: str) -> None:
    public, hidden, _, nb = _suite(name)
    starter = student_copy.student_notebook(nb, name)
    impl = grading.load_answers(starter, where=f"{name} (starter)")
    passed = [t for t, fn in {**public, **hidden}.items() if grading.run_test(fn, impl) is None]
    assert not passed, f"{name}: the untouched starter passes {passed}"


@pytest.mark.parametrize("name", IDS)
def test_each_wrong_answer_is_rejected(name: str) -> None:
    """Each fixture in instructor/wrong_answers.py fails every test it lists, on an assertion
    (not by crashing); every hidden test rejects at least one of them."""
    public, hidden, wrong, nb = _suite(name)
    solutions = grading.solution_sources(nb)
    assert len({w.name for w in wrong}) == len(wrong), f"{name}: wrong answers share a name"
    problems = []
    for w in wrong:
        assert w.part in solutions, f"{name}: {w.name!r} edits unknown part {w.part}"
        unknown = set(w.rejected_by) - set(public) - set(hidden)
        assert not unknown, f"{name}: {w.name!r} names unknown tests {unknown}"
        impl = _wrong_impl(name, w)
        for test in w.rejected_by:
            err = grading.run_test({**public, **hidden}[test], impl)
            if not isinstance(err, AssertionError):
                problems.append(f"{w.name!r}: {test} -> {'passed' if err is None else repr(err)}")
    assert not problems, f"{name}: wrong answers not rejected by an assertion: {problems}"
    unused = set(hidden) - {t for w in wrong for t in w.rejected_by}
    assert not unused, f"{name}: hidden tests that reject no listed wrong answer: {unused}"


def test_a_wrong_answer_edit_must_match_once() -> None:
    wrong = grading.Wrong("x", "A9-1", "", ("test_x",), edits={"a = 1": "a = 2"})
    assert wrong.cell_source("a = 1\n") == "a = 2\n"
    with pytest.raises(ValueError, match="exactly once"):
        wrong.cell_source("a = 1\na = 1\n")


# ----------------------------------------------------------------------------- builds
def _strings(tree) -> list[str]:
    """Every string in a JSON tree (a notebook's sources, outputs and metadata)."""
    if isinstance(tree, str):
        return [tree]
    items = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, list) else []
    return [s for item in items for s in _strings(item)]


def _build(tmp_path: Path, which: str) -> Path:
    out = tmp_path / which
    flag = ["--instructor"] if which == "instructor" else []
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "student_copy.py"), *flag, str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return out


def test_student_build_has_starters_and_no_solutions(tmp_path: Path) -> None:
    out = _build(tmp_path, "student")
    for shared in student_copy.STUDENT_SHARED:
        assert (out / "assignments" / shared).is_file(), f"{shared} not shipped"
    assert not (out / "assignments" / "INSTRUCTORS.md").exists()
    for name in IDS:
        folder, n = out / "assignments" / name, _number(HERE / name)
        shipped = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        assert shipped == sorted(
            [f"{name}.ipynb", f"test_a{n}_public.py", "conftest.py", "rubric.md"]
        ), f"{name}: the student gets {shipped}"
        starter = json.loads((folder / f"{name}.ipynb").read_text(encoding="utf-8"))
        text = "\n".join(_strings(starter))  # every source and metadata string
        for ident, solution in grading.solution_sources(_suite(name)[3]).items():
            stub = next(
                c["metadata"]["assignment"]["stub"]
                for c in _cells(_suite(name)[3])
                if grading.answer_id(c) == ident
            )
            lines = {l.strip() for l in solution.splitlines() if len(l.strip()) > 24}
            leaked = [l for l in lines - {l.strip() for l in stub.splitlines()} if l in text]
            assert not leaked, f"{name}: {ident}'s solution shipped: {leaked[:2]}"
        assert not any("solution" in c["metadata"].get("tags", []) for c in starter["cells"])
    assert not list(out.rglob("instructor")) and not list(out.rglob("wrong_answers.py"))
    assert not list(out.rglob("test_*_hidden.py"))


def test_instructor_build_has_everything(tmp_path: Path) -> None:
    out = _build(tmp_path, "instructor")
    for name in IDS:
        for path in (HERE / name).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                copy = out / "assignments" / name / path.relative_to(HERE / name)
                assert copy.read_bytes() == path.read_bytes(), f"{copy} differs or is missing"
    chapters = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert sorted(p.name for p in out.glob("*.ipynb")) == chapters
    for path in (ROOT / "notebooks").glob("*.ipynb"):
        assert (out / path.name).read_bytes() == path.read_bytes(), f"{path.name} changed"
    for page in student_copy.COURSE_PAGES:
        assert (out / "book" / page).read_bytes() == (ROOT / "book" / page).read_bytes()


# ----------------------------------------------------------------------------- the syllabus
def _weeks() -> dict[str, int]:
    """Chapter ("06a") -> the week whose reading the syllabus's week plan gives it in."""
    text = (ROOT / "book" / "syllabus.md").read_text(encoding="utf-8")
    taught: dict[str, int] = {}
    for week, body in re.findall(r"^### Week (\d+)[^\n]*\n(.*?)(?=^### |^## )", text, re.S | re.M):
        reading = re.search(r"\*Reading\.\*(.*?)(?:\n\n|$)", body, re.S)
        for ch in re.findall(r"/notebooks/(\d\d[a-z]?)_", reading.group(1) if reading else ""):
            taught.setdefault(ch, int(week))
    return taught


def test_syllabus_releases_assignments_after_their_chapters() -> None:
    text = (ROOT / "book" / "syllabus.md").read_text(encoding="utf-8")
    rows = re.findall(
        r"^\| Assignment (\d): [^|]+\| *\d+% *\| *out week (\d+), due start of "
        r"week (\d+) *\|",
        text,
        re.M,
    )
    assert sorted(int(n) for n, _, _ in rows) == [int(_number(f)) for f in FOLDERS], rows
    taught = _weeks()
    report = re.search(r"final report (?:end of )?week (\d+)", text)
    assert report, "the assessment table names the final report's week"
    final_week = int(report.group(1))
    dues = []
    for n, out, due in rows:
        name = next(f.name for f in FOLDERS if _number(f) == n)
        missing = NEEDS[name] - set(taught)
        assert not missing, f"A{n}: chapters {missing} are in no week's reading"
        last = max(taught[ch] for ch in NEEDS[name])
        assert int(out) > last, f"A{n} is out in week {out}, its chapters are taught until {last}"
        assert int(due) > int(out) and int(due) != final_week, f"A{n} due week {due}"
        dues.append(int(due))
        for week, verb in ((out, "handed out"), (due, "due")):
            section = re.search(rf"^### Week {week}:.*?(?=^### |^## )", text, re.S | re.M)
            assert section and f"Assignment {n} is {verb}" in " ".join(section.group(0).split()), (
                f"week {week}'s plan must say 'Assignment {n} is {verb}'"
            )
    assert len(set(dues)) == len(dues), f"two assignments due the same week: {dues}"
