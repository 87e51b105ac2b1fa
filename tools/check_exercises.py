"""Run a chapter's exercises the way the exercise contract says, without the rest of the chapter.

    python tools/check_exercises.py notebooks/02_rope.ipynb [more.ipynb ...] [--only 02-3]

Per notebook: a namespace gets ``pick`` (what the setup cell would have imported for the sizes
cell) and then the source of every cell tagged ``sizes`` or ``exercise-context``, in notebook
order. Then, for every exercise, each on a fresh copy of that namespace:

* the solution and then the check run without an exception, and the check prints exactly
  ``Exercise N: correct``;
* the stub runs, and the check after it raises;
* every stored wrong answer (the solution cell's metadata ``exercise.wrong``: a list of
  ``{"name", "why", "source"}`` or ``{"name", "why", "edits": {old: new}}``, each ``old``
  found exactly once in the solution) runs without an exception, and the check after it
  raises.

Exit status 1 when any exercise breaks the contract; each failure is printed.
tests/test_exercises.py runs this once per chapter, in a subprocess, with
GEMMA2_LITE_PROFILE=ci and MPLBACKEND=Agg.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
# (E402) the sibling script is importable only once its folder is on sys.path
from student_copy import (  # noqa: E402
    ExerciseError,
    is_check,
    is_solution,
    source,  # noqa: E402
    stub_of,
    tags,
    wrong_answers,
)

CONTEXT_TAGS = ("sizes", "exercise-context")


def wrong_source(wrong: dict, solution: str, where: str) -> str:
    """The source of one stored wrong answer: its ``source``, or its ``edits`` applied to the
    solution (each ``old`` must occur exactly once)."""
    if isinstance(wrong.get("source"), str):
        return wrong["source"]
    out = solution
    for old, new in wrong.get("edits", {}).items():
        count = out.count(old)
        if count != 1:
            raise ExerciseError(
                f"{where}: wrong answer {wrong.get('name')!r}: {old!r} occurs "
                f"{count} times in the solution; it must occur exactly once"
            )
        out = out.replace(old, new)
    return out


def exercises(nb: dict, where: str) -> list[tuple[str, str, str, str, list[tuple[str, str]]]]:
    """(id, solution, stub, check, [(wrong name, wrong source), ...]) per exercise, in order."""
    cells = nb["cells"]
    out = []
    for i, cell in enumerate(cells):
        if not is_solution(cell):
            continue
        ex_id = cell["metadata"]["exercise"]["id"]
        check = cells[i + 1] if i + 1 < len(cells) else None
        if (
            check is None
            or not is_check(check)
            or check["metadata"].get("exercise", {}).get("id") != ex_id
        ):
            raise ValueError(
                f"{where}: exercise {ex_id}: no check cell with that id right after its solution"
            )
        solution = source(cell)
        wrong = [
            (w.get("name", "?"), wrong_source(w, solution, f"{where} {ex_id}"))
            for w in wrong_answers(cell)
        ]
        out.append((ex_id, solution, stub_of(cell, where), source(check), wrong))
    return out


def context_source(nb: dict) -> list[tuple[str, str]]:
    return [
        (c.get("id", str(i)), source(c))
        for i, c in enumerate(nb["cells"])
        if c["cell_type"] == "code" and set(CONTEXT_TAGS) & set(tags(c))
    ]


def fresh(base: dict) -> dict:
    """A copy of the context's namespace in which plain containers and numpy arrays are copies
    too, so an answer that mutates one (``chat_ex.append(...)``) cannot change what the next
    exercise sees. Other objects (models, modules, functions) are shared."""
    ns = dict(base)
    for name, value in base.items():
        if type(value) in (list, dict, set) or isinstance(value, np.ndarray):
            try:
                ns[name] = copy.deepcopy(value)
            except Exception:  # noqa: BLE001 - something inside cannot be copied: share it
                pass
    return ns


def _run(src: str, name: str, ns: dict) -> str:
    """exec ``src`` in ``ns``; return what it printed."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(src, name, "exec"), ns)
    return buf.getvalue()


def _must_fail(check: str, label: str, ns: dict) -> str | None:
    """Run the check; the outcome's description if it raised, None if it passed."""
    try:
        _run(check, label, ns)
    except Exception as err:  # noqa: BLE001 - any exception is a failed check
        return f"{type(err).__name__}: {' '.join(str(err).split())[:70]}"
    return None


def check_exercise(path: Path, base: dict, ex: tuple) -> tuple[list[str], str]:
    """The contract violations of one exercise, and a line saying what happened."""
    ex_id, solution, stub, check, wrong = ex
    k, name = ex_id.split("-")[-1], path.name
    problems = []
    ns = fresh(base)
    try:
        _run(solution, f"{name}:{ex_id}:solution", ns)
        printed = _run(check, f"{name}:{ex_id}:check", ns)
    except Exception:  # noqa: BLE001
        problems.append(f"{ex_id}: solution + check raised:\n{traceback.format_exc(limit=3)}")
    else:
        if printed.strip() != f"Exercise {k}: correct":
            problems.append(
                f"{ex_id}: the check printed {printed!r}; it must print "
                f"exactly 'Exercise {k}: correct'"
            )
    outcomes = []
    for label, src in [("stub", stub), *((f"wrong answer {w!r}", s) for w, s in wrong)]:
        ns = fresh(base)
        try:
            _run(src, f"{name}:{ex_id}:{label}", ns)
        except Exception:  # noqa: BLE001
            problems.append(
                f"{ex_id}: the {label} itself raised (it must run; the check "
                f"must reject it):\n{traceback.format_exc(limit=3)}"
            )
            continue
        outcome = _must_fail(check, f"{name}:{ex_id}:check after {label}", ns)
        if outcome is None:
            problems.append(f"{ex_id}: the check passed after the {label}; it must fail")
            outcomes.append(f"{label} PASSED")
        else:
            outcomes.append(f"{label} rejected ({outcome})")
    return problems, "".join(f"\n    {o}" for o in outcomes)


def check_notebook(path: Path, only: set[str] | None = None) -> list[str]:
    """The contract violations of one notebook's exercises (empty: all good)."""
    from gemma2_lite.profile import pick

    nb = json.loads(path.read_text(encoding="utf-8"))
    base: dict = {"pick": pick, "__name__": "__exercises__"}
    t0 = time.perf_counter()
    for cell_id, src in context_source(nb):
        try:
            _run(src, f"{path.name}:{cell_id}", base)
        except Exception:  # noqa: BLE001
            return [f"context cell {cell_id} raised:\n{traceback.format_exc(limit=3)}"]
    print(f"{path.name}: context cells ran in {time.perf_counter() - t0:.1f} s")
    try:
        found = exercises(nb, path.name)
    except ExerciseError as err:
        return [str(err)]
    problems = []
    for ex in found:
        if only and ex[0] not in only:
            continue
        t0 = time.perf_counter()
        more, said = check_exercise(path, base, ex)
        problems += more
        print(
            f"  {ex[0]}: {'solution ok' if not more else 'FAILED'} "
            f"[{time.perf_counter() - t0:.1f} s]{said}",
            flush=True,
        )
    return problems


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    only = None
    if "--only" in args:
        i = args.index("--only")
        only, args = set(args[i + 1].split(",")), args[:i] + args[i + 2 :]
    paths = [Path(p) for p in args]
    if not paths:
        print(__doc__)
        return 2
    os.environ.setdefault("MPLBACKEND", "Agg")
    failed = False
    for path in paths:
        problems = check_notebook(path, only)
        for p in problems:
            print(f"FAIL {path.name} {p}")
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
