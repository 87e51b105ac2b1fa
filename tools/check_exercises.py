"""Run a chapter's exercises the way the exercise contract says, without the rest of the chapter.

    python tools/check_exercises.py notebooks/02_rope.ipynb [more.ipynb ...]

Per notebook: a namespace gets ``pick`` (what the setup cell would have imported for the sizes
cell) and then the source of every cell tagged ``sizes`` or ``exercise-context``, in notebook
order. Then, for every exercise, on a fresh copy of that namespace: the solution and then the
check must run without an exception, and the check must print exactly ``Exercise N: correct``;
on another fresh copy the stub must run and the check after it must raise. Exit status 1 when
any exercise breaks the contract; each failure is printed. tests/test_exercises.py runs this
once per chapter, in a subprocess, with GEMMA2_LITE_PROFILE=ci and MPLBACKEND=Agg.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from student_copy import is_check, is_solution, source, stub_of, tags  # noqa: E402

CONTEXT_TAGS = ("sizes", "exercise-context")


def exercises(nb: dict, where: str) -> list[tuple[str, str, str, str]]:
    """(id, solution source, stub source, check source) per exercise, in notebook order."""
    cells = nb["cells"]
    out = []
    for i, cell in enumerate(cells):
        if not is_solution(cell):
            continue
        ex_id = cell["metadata"]["exercise"]["id"]
        check = cells[i + 1] if i + 1 < len(cells) else None
        if check is None or not is_check(check) \
                or check["metadata"].get("exercise", {}).get("id") != ex_id:
            raise ValueError(f"{where}: exercise {ex_id}: no check cell with that id right "
                             "after its solution")
        out.append((ex_id, source(cell), stub_of(cell, where), source(check)))
    return out


def context_source(nb: dict) -> list[tuple[str, str]]:
    return [(c.get("id", str(i)), source(c)) for i, c in enumerate(nb["cells"])
            if c["cell_type"] == "code" and set(CONTEXT_TAGS) & set(tags(c))]


def _run(src: str, name: str, ns: dict) -> str:
    """exec ``src`` in ``ns``; return what it printed."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(src, name, "exec"), ns)
    return buf.getvalue()


def check_notebook(path: Path) -> list[str]:
    """The contract violations of one notebook's exercises (empty: all good)."""
    from gemma2_lite.profile import pick

    nb = json.loads(path.read_text(encoding="utf-8"))
    problems = []
    base: dict = {"pick": pick, "__name__": "__exercises__"}
    t0 = time.perf_counter()
    for cell_id, src in context_source(nb):
        try:
            _run(src, f"{path.name}:{cell_id}", base)
        except Exception:
            return [f"context cell {cell_id} raised:\n{traceback.format_exc(limit=3)}"]
    print(f"{path.name}: context cells ran in {time.perf_counter() - t0:.1f} s")
    for ex_id, solution, stub, check in exercises(nb, path.name):
        k = ex_id.split("-")[-1]
        t0 = time.perf_counter()
        ns = dict(base)
        try:
            _run(solution, f"{path.name}:{ex_id}:solution", ns)
            printed = _run(check, f"{path.name}:{ex_id}:check", ns)
        except Exception:
            problems.append(f"{ex_id}: solution + check raised:\n"
                            f"{traceback.format_exc(limit=3)}")
        else:
            if printed.strip() != f"Exercise {k}: correct":
                problems.append(f"{ex_id}: the check printed {printed!r}; it must print "
                                f"exactly 'Exercise {k}: correct'")
        ns = dict(base)
        try:
            _run(stub, f"{path.name}:{ex_id}:stub", ns)
        except Exception:
            problems.append(f"{ex_id}: the stub itself raised (it must only define names):\n"
                            f"{traceback.format_exc(limit=3)}")
            continue
        try:
            _run(check, f"{path.name}:{ex_id}:check", ns)
        except Exception as err:
            outcome = f"stub fails as it should ({type(err).__name__}: {str(err)[:60]})"
        else:
            problems.append(f"{ex_id}: the check passed after the stub; it must fail")
            outcome = "stub PASSED"
        print(f"  {ex_id}: solution ok, {outcome}  [{time.perf_counter() - t0:.1f} s]")
    return problems


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print(__doc__)
        return 2
    os.environ.setdefault("MPLBACKEND", "Agg")
    failed = False
    for path in paths:
        problems = check_notebook(path)
        for p in problems:
            print(f"FAIL {path.name} {p}")
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
