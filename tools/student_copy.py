"""Write the student copies of the chapters: every exercise's solution replaced by its stub.

    python tools/student_copy.py            # -> _build/student/NN_*.ipynb  (make student)
    python tools/student_copy.py OUT        # -> OUT/NN_*.ipynb

An exercise's solution is a code cell tagged ``solution`` whose metadata holds
``"exercise": {"id": "NN-k", "stub": "<student source>"}``; the copy gets the stub as the
cell's source, loses the ``solution`` and ``hide-cell`` tags (the student should see the cell)
and, like every code cell of the copy, has no outputs and no execution count. Everything else
is unchanged, so in the copy every check cell fails until the student solves the exercise.

The copies run from wherever they are written: the chapters find their files through the
``gemma2_lite`` package (``gemma2_lite.paths``; the tokenizer, the book's model and the corpus
ship inside it), never through the working directory, so open them in Jupyter in OUT with the package installed (``make venv``, or the
chapter's own setup cell on Colab). Standard library only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "_build" / "student"
HIDDEN = ("solution", "hide-cell")


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
    """The student source of a solution cell; ExerciseError when the metadata lacks it."""
    meta = cell.get("metadata", {}).get("exercise")
    if not isinstance(meta, dict) or not isinstance(meta.get("stub"), str) \
            or not meta["stub"].strip():
        raise ExerciseError(
            f"{where}: solution cell {cell.get('id', '?')!r} has no metadata "
            "'exercise': {'id': 'NN-k', 'stub': '<student source>'}; every cell tagged "
            "'solution' needs one (see tools/student_copy.py)")
    return meta["stub"]


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def student_notebook(nb: dict, where: str = "notebook") -> dict:
    """A copy of ``nb`` with solutions replaced by their stubs and every output cleared."""
    nb = json.loads(json.dumps(nb))
    for cell in nb["cells"]:
        if is_solution(cell):
            cell["source"] = _lines(stub_of(cell, where))
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
    notebooks = notebooks if notebooks is not None else \
        sorted((ROOT / "notebooks").glob("*.ipynb"))
    # Build every copy before writing any, so a bad notebook leaves no half-written set.
    copies = [(p, student_notebook(json.loads(p.read_text(encoding="utf-8")), p.name))
              for p in notebooks]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path, nb in copies:
        target = out / path.name
        target.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n",
                          encoding="utf-8")
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 or (argv and argv[0] in ("-h", "--help")):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    out = Path(argv[0]) if argv else DEFAULT_OUT
    try:
        written = write_student_copies(out)
    except ExerciseError as err:
        print(f"student_copy: {err}", file=sys.stderr)
        return 1
    n = sum(is_solution(c) for p in sorted((ROOT / "notebooks").glob("*.ipynb"))
            for c in json.loads(p.read_text(encoding="utf-8"))["cells"])
    print(f"wrote {len(written)} student notebooks to {out}/ "
          f"({n} solution cells left as stubs); open them there in Jupyter")
    return 0


if __name__ == "__main__":
    sys.exit(main())
