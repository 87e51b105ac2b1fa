"""Write the student copies of the chapters and assignments (solutions replaced by stubs), or
the instructor's copy of everything.

    python tools/student_copy.py            # -> _build/student/   (make student)
    python tools/student_copy.py OUT        # -> OUT/NN_*.ipynb and OUT/assignments/
    python tools/student_copy.py --instructor [OUT]   # -> _build/instructor/ (make instructor)

An exercise's solution is a code cell tagged ``solution`` whose metadata holds
``"exercise": {"id": "NN-k", "stub": "<student source>", "wrong": [...]}`` (``wrong``: the
plausible wrong answers its check must reject, see tools/check_exercises.py); the copy gets the
stub as the cell's source, loses the ``solution`` and ``hide-cell`` tags (the student should see
the cell) and the wrong answers (several are one edit away from the solution), and, like every
code cell of the copy, has no outputs and no execution count. Everything else is unchanged, so
in the copy every check cell fails until the student solves the exercise.

The copies run from wherever they are written: the chapters find their files through the
``gemma2_lite`` package (``gemma2_lite.paths``; the tokenizer, the book's model and the corpus
ship inside it), never through the working directory, so open them in Jupyter in OUT with the
package installed (``make venv``, or the chapter's own setup cell on Colab). Standard library only.

Assignments (``assignments/aN_name/``, see ``assignments/grading.py``): the student gets, per
assignment, the starter (the notebook with every answer cell replaced by its stub, metadata key
``"assignment"`` instead of ``"exercise"``), its public tests, ``conftest.py`` and ``rubric.md``,
plus ``assignments/grading.py`` and ``assignments/README.md``; never the ``instructor/`` folder
(hidden tests, wrong answers) nor the reference solution. ``--instructor`` copies everything
unchanged: the chapters with their solutions, every assignment file, and the course pages
(``book/syllabus.md``, ``book/instructor-notes.md``, ``book/course-guide.md``).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "_build" / "student"
INSTRUCTOR_OUT = ROOT / "_build" / "instructor"
HIDDEN = ("solution", "hide-cell")
ASSIGNMENTS = ROOT / "assignments"
# What a student gets of assignments/ besides each assignment's starter notebook.
STUDENT_SHARED = ("README.md", "grading.py")
STUDENT_FILES = ("conftest.py", "rubric.md")  # plus test_aN_public.py
COURSE_PAGES = ("syllabus.md", "instructor-notes.md", "course-guide.md", "policies.md")


class ExerciseError(ValueError):
    """A notebook's exercise cells do not follow the exercise contract."""


def source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def tags(cell: dict) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def is_solution(cell: dict) -> bool:
    return cell["cell_type"] == "code" and "solution" in tags(cell)


def is_check(cell: dict) -> bool:
    return cell["cell_type"] == "code" and "check" in tags(cell)


def stub_of(cell: dict, where: str) -> str:
    """The student source of a solution cell; ExerciseError when the metadata lacks it.

    A chapter's exercise keeps it under ``"exercise"``, an assignment's answer under
    ``"assignment"`` (same shape: ``{"id": ..., "stub": ...}``)."""
    metadata = cell.get("metadata", {})
    meta = metadata.get("exercise", metadata.get("assignment"))
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("stub"), str)
        or not meta["stub"].strip()
    ):
        raise ExerciseError(
            f"{where}: solution cell {cell.get('id', '?')!r} has no metadata "
            "'exercise': {'id': 'NN-k', 'stub': '<student source>'}; every cell tagged "
            "'solution' needs one (see tools/student_copy.py)"
        )
    return meta["stub"]


def wrong_answers(cell: dict) -> list[dict]:
    """The stored wrong answers of a chapter exercise's solution cell (``[]`` when none)."""
    wrong = cell.get("metadata", {}).get("exercise", {}).get("wrong", [])
    return list(wrong) if isinstance(wrong, list) else []


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def student_notebook(nb: dict, where: str = "notebook") -> dict:
    """A copy of ``nb`` with solutions replaced by their stubs and every output cleared."""
    nb = json.loads(json.dumps(nb))
    for cell in nb["cells"]:
        if is_solution(cell):
            cell["source"] = _lines(stub_of(cell, where))
            if isinstance(cell["metadata"].get("exercise"), dict):
                cell["metadata"]["exercise"].pop("wrong", None)
            kept = [t for t in tags(cell) if t not in HIDDEN]
            if kept:
                cell["metadata"]["tags"] = kept
            else:
                cell["metadata"].pop("tags", None)
        if cell["cell_type"] == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    return nb


def write_student_copies(out: Path, notebooks: list[Path] | None = None) -> list[Path]:
    """Write the student copy of every notebooks/*.ipynb into ``out``; return the paths."""
    notebooks = notebooks if notebooks is not None else sorted((ROOT / "notebooks").glob("*.ipynb"))
    # Build every copy before writing any, so a bad notebook leaves no half-written set.
    copies = [
        (p, student_notebook(json.loads(p.read_text(encoding="utf-8")), p.name)) for p in notebooks
    ]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path, nb in copies:
        target = out / path.name
        target.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(target)
    return written


def assignment_folders(root: Path = ASSIGNMENTS) -> list[Path]:
    """Every ``assignments/aN_name/`` that holds its notebook ``aN_name.ipynb``."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / f"{p.name}.ipynb").exists())


def _student_assignment(folder: Path) -> dict[str, bytes]:
    """Relative path -> content of what the student gets of one assignment."""
    name = folder.name
    nb = json.loads((folder / f"{name}.ipynb").read_text(encoding="utf-8"))
    starter = student_notebook(nb, f"{name}.ipynb")
    files = {
        f"{name}.ipynb": (json.dumps(starter, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    }
    public = sorted(folder.glob("test_*_public.py"))
    if len(public) != 1:
        raise ExerciseError(f"{folder}: want one test_aN_public.py, found {len(public)}")
    for path in [*public, *(folder / f for f in STUDENT_FILES)]:
        files[path.name] = path.read_bytes()
    return files


def write_student_assignments(out: Path, root: Path = ASSIGNMENTS) -> list[Path]:
    """Write every assignment's student files into ``out/assignments/``; return the starters."""
    planned = {
        f"{folder.name}/{rel}": data
        for folder in assignment_folders(root)
        for rel, data in _student_assignment(folder).items()
    }
    planned.update({f: (root / f).read_bytes() for f in STUDENT_SHARED if (root / f).exists()})
    target = out / "assignments"
    if target.exists():
        shutil.rmtree(target)  # a file left from an older build must not linger
    for rel, data in planned.items():
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / rel).write_bytes(data)
    return [target / rel for rel in planned if rel.endswith(".ipynb")]


def write_instructor_copy(out: Path) -> list[Path]:
    """Everything, solutions and hidden tests included: chapters as they are, assignments/,
    and the course pages. Returns the notebooks written."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        shutil.copyfile(path, out / path.name)
        written.append(out / path.name)
    if (out / "assignments").exists():
        shutil.rmtree(out / "assignments")
    if ASSIGNMENTS.is_dir():
        shutil.copytree(ASSIGNMENTS, out / "assignments", ignore=ignore)
        written += sorted((out / "assignments").rglob("*.ipynb"))
    (out / "book").mkdir(exist_ok=True)
    for page in COURSE_PAGES:
        shutil.copyfile(ROOT / "book" / page, out / "book" / page)
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    instructor = bool(argv) and argv[0] == "--instructor"
    argv = argv[1:] if instructor else argv
    if len(argv) > 1 or any(a.startswith("-") for a in argv):
        print(__doc__)
        return 2
    out = Path(argv[0]) if argv else (INSTRUCTOR_OUT if instructor else DEFAULT_OUT)
    if instructor:
        written = write_instructor_copy(out)
        print(
            f"wrote the instructor's copy to {out}/: {len(written)} notebooks with their "
            "solutions, assignments/ with reference solutions, hidden tests and wrong "
            "answers, book/ course pages"
        )
        return 0
    try:
        written = write_student_copies(out)
        starters = write_student_assignments(out)
    except ExerciseError as err:
        print(f"student_copy: {err}", file=sys.stderr)
        return 1
    n = sum(
        is_solution(c)
        for p in sorted((ROOT / "notebooks").glob("*.ipynb"))
        for c in json.loads(p.read_text(encoding="utf-8"))["cells"]
    )
    print(
        f"wrote {len(written)} student notebooks to {out}/ "
        f"({n} solution cells left as stubs) and {len(starters)} assignment starters to "
        f"{out}/assignments/; open them there in Jupyter"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
