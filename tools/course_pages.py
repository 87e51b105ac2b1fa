"""What the course pages say about the chapters, read from the chapters themselves.

The instructor notes and the syllabus name exercises, figures, chapters and run times. None of
those may be typed by hand, or they go stale the day a chapter changes:

- exercise numbers come from the notebooks: the pages write ``{exercise}`04:flash_window``` (the
  chapter and the name its solution defines) and the book renders "exercise 3", or whatever
  number that exercise has when the book is built (tools/sphinx_course.py); the
  ``{exercise-table}`` directive lists every chapter's exercises the same way;
- run times come from ``book/run-times.json``, which ``tools/run_notebooks.py --record`` writes
  (machine, date and load average with every number); the ``{run-times}`` directive renders it in
  the instructor notes, and ``python tools/course_pages.py --write`` writes the same table into
  the README between its ``run-times`` markers;
- tests/test_course_pages.py checks the rest against the notebooks (figures named, chapters
  "in preparation" that exist, the syllabus's order against each chapter's prerequisites), and
  tests/test_book.py checks the numbers quoted under *Expected outputs* against the executed
  chapters.

    python tools/course_pages.py            # show what the README's table would be
    python tools/course_pages.py --write    # write it into README.md
    python tools/course_pages.py --check    # exit 1 when README.md's table is stale

Standard library only.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
RECORD = ROOT / "book" / "run-times.json"
CI, COLAB = "ci", "colab, loops capped at 3"
MARKERS = (
    "<!-- run-times:start (python tools/course_pages.py --write) -->",
    "<!-- run-times:end -->",
)
EXERCISE_REF = re.compile(r"\{exercise\}`([^`]+)`")
TITLE = re.compile(r"\*\*Exercise (\d+) \(([^)]*(?:\([^)]*\)[^)]*)*)\)\.\*\*")


@dataclass(frozen=True)
class Exercise:
    chapter: str  # "04"
    id: str  # "04-3"
    number: int  # 3, the number the chapter prints
    names: tuple[str, ...]  # what the student's cell defines: "flash_window", ...
    title: str  # "porting"


def chapter_paths() -> dict[str, Path]:
    """ "04" -> notebooks/04_sliding_window.ipynb, for every chapter in notebooks/."""
    return {p.name.split("_")[0]: p for p in sorted(NOTEBOOKS.glob("[0-9][0-9]*_*.ipynb"))}


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def title(path: Path) -> str:
    """The chapter's title: its first markdown heading."""
    for cell in _cells(path):
        if cell["cell_type"] == "markdown":
            found = re.search(r"^# (.+)$", _source(cell), re.M)
            if found:
                return found.group(1).strip()
    raise ValueError(f"{path.name} has no '# title' heading")


def _defined_names(src: str) -> tuple[str, ...]:
    names: list[str] = []
    for node in ast.parse(src).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for leaf in ast.walk(target):
                    if isinstance(leaf, ast.Name):
                        names.append(leaf.id)
    return tuple(dict.fromkeys(names))


def exercises(path: Path) -> list[Exercise]:
    """Every exercise of a chapter, in order: a cell tagged ``solution`` with its metadata."""
    chapter = path.name.split("_")[0]
    cells, out = _cells(path), []
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "code" or "solution" not in cell["metadata"].get("tags", []):
            continue
        meta = cell["metadata"].get("exercise", {})
        ex_id = meta.get("id", "")
        number = int(ex_id.rsplit("-", 1)[-1])
        heading = next(
            (
                TITLE.search(_source(c))
                for c in reversed(cells[:i])
                if c["cell_type"] == "markdown" and TITLE.search(_source(c))
            ),
            None,
        )
        title_ = heading.group(2) if heading and int(heading.group(1)) == number else ""
        out.append(Exercise(chapter, ex_id, number, _defined_names(meta.get("stub", "")), title_))
    return out


def find_exercise(ref: str) -> Exercise:
    """``"04:flash_window"`` -> that chapter's exercise whose student cell defines the name."""
    chapter, _, name = ref.strip().partition(":")
    paths = chapter_paths()
    if chapter not in paths:
        raise LookupError(f"{{exercise}}`{ref}`: there is no chapter {chapter!r} in notebooks/")
    found = [ex for ex in exercises(paths[chapter]) if name in ex.names]
    if len(found) != 1:
        have = {ex.number: ex.names for ex in exercises(paths[chapter])}
        raise LookupError(
            f"{{exercise}}`{ref}`: chapter {chapter} has no exercise whose "
            f"student cell defines {name!r} (its exercises define {have})"
        )
    return found[0]


def first_objective(path: Path) -> str:
    """The first bullet of the chapter's **Objectives.** list."""
    for cell in _cells(path):
        text = _source(cell)
        if cell["cell_type"] == "markdown" and "**Objectives.**" in text:
            found = re.search(r"^- (.+)$", text, re.M)
            if found:
                return found.group(1).strip().rstrip(";.")
    raise ValueError(f"{path.name} has no **Objectives.** list")


def figures(path: Path) -> set[int]:
    """The chapter's figure numbers: captions ``**Figure N.**``, or plot titles ``"Figure N: "``."""
    found = set()
    for cell in _cells(path):
        pattern = (
            r"\*\*Figure (\d+)\.\*\*" if cell["cell_type"] == "markdown" else r"[\"']Figure (\d+):"
        )
        found |= {int(n) for n in re.findall(pattern, _source(cell))}
    return found


def markdown(path: Path) -> str:
    return "\n\n".join(_source(c) for c in _cells(path) if c["cell_type"] == "markdown")


def prerequisites(path: Path) -> set[str]:
    """Chapters the chapter's **Prerequisites.** paragraph links to ("06a", ...)."""
    for cell in _cells(path):
        text = _source(cell)
        if cell["cell_type"] == "markdown" and "**Prerequisites.**" in text:
            para = text[text.index("**Prerequisites.**") :].split("\n\n")[0]
            return set(re.findall(r"\]\((\d\d[a-z]?)_[\w]+\.ipynb\)", para))
    return set()


# ------------------------------------------------------------------------------ run times


def record() -> dict:
    return json.loads(RECORD.read_text()) if RECORD.exists() else {}


def _label(path: Path) -> str:
    return f"{path.name.split('_')[0]} {title(path)}"


def run_time_rows() -> list[tuple[str, str, str]]:
    """(chapter, ci seconds, colab seconds) for every chapter; '' where not recorded."""
    rec, rows = record(), []
    for _, path in chapter_paths().items():
        cells = []
        for key in (CI, COLAB):
            entry = rec.get(key, {}).get(path.stem)
            cells.append(str(entry["seconds"]) if entry else "")
        rows.append((_label(path), cells[0], cells[1]))
    return rows


def total(column: list[str]) -> str:
    return str(sum(int(v) for v in column)) if all(column) else ""


def provenance() -> str:
    rec = record()
    parts = []
    for key in (CI, COLAB):
        entries = list(rec.get(key, {}).values())
        if not entries:
            continue
        dates = sorted({e["date"] for e in entries})
        machines = sorted({e["machine"] for e in entries})
        loads = [x for e in entries for x in e["load average"]]
        parts.append(
            f"`{key}`: {', '.join(dates)}, on {'; '.join(machines)}, load average "
            f"{min(loads):.1f} to {max(loads):.1f}"
        )
    return "; ".join(parts)


def run_time_table() -> str:
    """The Markdown table of every chapter's recorded times, and where they come from."""
    rows = run_time_rows()
    lines = [
        "| chapter | `ci` (s) | `colab`, loops capped at 3, on the CPU (s) |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {name} | {ci or 'not recorded'} | {colab or 'not recorded'} |"
        for name, ci, colab in rows
    ]
    lines.append(
        f"| all | {total([r[1] for r in rows]) or '-'} | {total([r[2] for r in rows]) or '-'} |"
    )
    return (
        "\n".join(lines) + "\n\nEach chapter on a fresh kernel, timed by "
        "`tools/run_notebooks.py --record` (`book/run-times.json` keeps every entry's date, "
        f"machine and load average): {provenance()}. On a shared machine these are upper "
        "bounds."
    )


def readme_block() -> str:
    return f"{MARKERS[0]}\n{run_time_table()}\n{MARKERS[1]}"


def readme_with_block(text: str) -> str:
    start, end = text.index(MARKERS[0]), text.index(MARKERS[1]) + len(MARKERS[1])
    return text[:start] + readme_block() + text[end:]


# ------------------------------------------------------------------------------- the weeks

SYLLABUS = ROOT / "book" / "syllabus.md"
# The weekly-hours estimate (book/policies.md states the same rule): hours per week of
# lecture and lab, of reading per chapter, per exercise, per open assignment, and of project.
HOURS = {
    "lecture": 1.5,
    "lab": 2.0,
    "reading": 1.5,
    "exercise": 0.5,
    "assignment": 4.0,
    "project": 2.0,
    "project week": 10.0,
}


def syllabus_weeks(text: str | None = None) -> list[tuple[int, str, list[str]]]:
    """(week, title, chapters of its reading in order) for every week of the weekly plan."""
    text = SYLLABUS.read_text(encoding="utf-8") if text is None else text
    weeks = []
    for week, name, body in re.findall(
        r"^### Week (\d+)([^\n]*)\n(.*?)(?=^### |^## |\Z)", text, re.S | re.M
    ):
        reading = re.search(r"\*Reading\.\*(.*?)(?:\n\n|\Z)", body, re.S)
        chapters = re.findall(r"/notebooks/(\d\d[a-z]?)_", reading.group(1) if reading else "")
        weeks.append((int(week), name.strip(" :"), list(dict.fromkeys(chapters))))
    return weeks


def assignment_weeks(text: str | None = None) -> list[tuple[int, int, int]]:
    """(assignment, out week, due week) from the syllabus's assessment table."""
    text = SYLLABUS.read_text(encoding="utf-8") if text is None else text
    return [
        (int(n), int(a), int(b))
        for n, a, b in re.findall(
            r"^\| Assignment (\d): [^|]+\| *\d+% *\| *out week (\d+), due start of week (\d+)",
            text,
            re.M,
        )
    ]


def weekly_hours() -> list[dict]:
    """One row per week: chapters, their exercises and ci minutes, and the hours estimate."""
    text = SYLLABUS.read_text(encoding="utf-8")
    paths, rec = chapter_paths(), record().get(CI, {})
    proposal = re.search(r"proposal week (\d+)", text)
    final = re.search(r"final report (?:end of )?week (\d+)", text)
    first_project = int(proposal.group(1)) if proposal else 0
    last = int(final.group(1)) if final else 0
    rows = []
    for week, name, chapters in syllabus_weeks(text):
        if "optional" in name.lower() or week > last:
            continue
        found = [paths[c] for c in chapters if c in paths]
        n_ex = sum(len(exercises(p)) for p in found)
        minutes = sum(rec.get(p.stem, {}).get("seconds", 0) for p in found) / 60
        open_assignments = sum(out <= week < due for _, out, due in assignment_weeks(text))
        hours = {
            "class": (HOURS["lecture"] + HOURS["lab"]) if chapters else HOURS["lecture"],
            "reading": HOURS["reading"] * len(chapters),
            "exercise work": HOURS["exercise"] * n_ex,
            "assignments": HOURS["assignment"] * open_assignments,
            "project": (
                HOURS["project week"]
                if not chapters
                else HOURS["project"]
                if week >= first_project
                else 0.0
            ),
        }
        rows.append(
            {
                "week": week,
                "chapters": chapters,
                "missing": len(chapters) - len(found),
                "exercises": n_ex,
                "ci minutes": minutes,
                "hours": hours,
                "total": sum(hours.values()),
            }
        )
    return rows


# ------------------------------------------------------------------- a recorded experiment


def ablation_markdown(path: Path) -> list[str]:
    """A seed record of data/ablations/ as MyST: per-seed table, means, spread, verdict, budget."""
    rec = json.loads(path.read_text(encoding="utf-8"))
    variants = list(rec["summary"])
    seeds = sorted(rec["per_seed"], key=int)
    lines = [
        _table_row(["seed", *[f"`{v}`" for v in variants]]),
        "|---:|" + "---:|" * len(variants),
    ]
    for seed in seeds:
        lines.append(_table_row([seed, *[f"{rec['per_seed'][seed][v]:.2f}" for v in variants]]))
    summary = rec["summary"]
    lines.append(
        _table_row(
            [
                "mean ± std",
                *[f"{summary[v]['mean']:.2f} ± {summary[v]['std']:.2f}" for v in variants],
            ]
        )
    )
    means = [summary[v]["mean"] for v in variants]
    gap = max(means) - min(means)
    spread = max(summary[v]["std"] for v in variants)
    verdict = (
        "larger than two standard deviations of the seed-to-seed spread"
        if gap > 2 * spread
        else "within two standard deviations of the seed-to-seed spread"
    )
    base, paired = variants[0], []
    for v in variants[1:]:
        diffs = [rec["per_seed"][seed][v] - rec["per_seed"][seed][base] for seed in seeds]
        mean = sum(diffs) / len(diffs)
        std = (sum((d - mean) ** 2 for d in diffs) / max(1, len(diffs) - 1)) ** 0.5
        same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
        reading = (
            "the seeds disagree in sign"
            if not same_sign
            else "every seed agrees in sign, and the mean is over twice their spread"
            if abs(mean) > 2 * std
            else "every seed agrees in sign, but the mean is within twice their spread"
        )
        paired.append(
            f"`{v}` − `{base}`: {mean:+.2f} ± {std:.2f} "
            f"({', '.join(f'{d:+.2f}' for d in diffs)}; {reading})"
        )
    lines += [
        "",
        f"Validation perplexity, profile `{rec['profile']}`, {len(seeds)} seeds. "
        f"Unpaired, the largest gap between the variants' means is {gap:.2f}, {verdict} "
        f"(largest standard deviation {spread:.2f}). Paired by seed, the differences from "
        f"`{base}` are: " + "; ".join(paired) + ".",
    ]
    seconds = rec["seconds"]
    lines += [
        "",
        f"*Budget, measured:* `{rec['command']}` took {seconds:.0f} s for all "
        f"{len(seeds)} seeds ({seconds / len(seeds):.0f} s per seed, every variant included) "
        f"on {rec['devices']} with JAX {rec['jax']}, as recorded in "
        f"`{path.relative_to(ROOT)}`.",
    ]
    return lines


def _table_row(cells: list[str]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


# ------------------------------------------------------------------------ expected outputs

NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?%?")


def expected_outputs(notes: str) -> dict[str, list[str]]:
    """Chapter -> the bullets of its *Expected outputs.* list in the instructor notes."""
    out = {}
    for chapter, body in re.findall(
        r"^### (\d\d[a-z]?) [^\n]*\n(.*?)(?=^### |^## |\Z)", notes, re.S | re.M
    ):
        part = re.search(r"\*Expected outputs\.\*\n(.*?)(?=\n\*[A-Z][^*]*\.\*|\Z)", body, re.S)
        if part:
            out[chapter] = [
                " ".join(b.split()) for b in re.split(r"\n- ", "\n" + part.group(1).strip())[1:]
            ]
    return out


def quoted_numbers(bullet: str) -> list[str]:
    """The numbers a bullet quotes as outputs.

    Left out: single digits (they say nothing), numbers inside an ``{exercise}`` reference, and
    what the notes mark as approximate ("about 2e-07", "a few 1e-06") or as rounding (a number
    below 1e-4 in e-notation): those depend on the CPU and the library versions."""
    bullet = EXERCISE_REF.sub("", bullet)
    bullet = re.sub(r"(?:about|a few|~|≈)\s*[±-]?\d[\d.,e+-]*", "", bullet)
    found = []
    for n in NUMBER.findall(bullet):
        n = n.rstrip(",")
        digits = n.strip("-%").replace(",", "")
        if len(digits) <= 1:
            continue
        if "e-" in n and float(digits) < 1e-4:
            continue
        found.append(n)
    return found


def _as_printed(number: str, printed: str) -> bool:
    """Whether `printed` (a number in a chapter) rounds to the quoted `number`."""
    q, p = number.rstrip("%").replace(",", ""), printed.rstrip("%").replace(",", "")
    if q == p:
        return True
    try:
        qv, pv = float(q), float(p)
    except ValueError:
        return False
    if "e" in q:
        mantissa = q.lower().split("e")[0]
        places = len(mantissa.split(".")[1]) if "." in mantissa else 0
        return f"{pv:.{places}e}" == f"{qv:.{places}e}"
    places = len(q.split(".")[1]) if "." in q else 0
    p_places = len(p.split(".")[1]) if "." in p else 0
    return p_places >= places and abs(round(pv, places) - qv) < 0.5 * 10.0 ** -(places + 2)


def missing_numbers(bullets: list[str], chapter_text: str) -> list[tuple[str, str]]:
    """(number, bullet) for every quoted number the executed chapter does not print (a printed
    number with more decimals counts when it rounds to the quoted one)."""
    printed = NUMBER.findall(chapter_text.replace("\u2212", "-"))
    plain = {p.rstrip("%").replace(",", "") for p in printed}
    missing = []
    for bullet in bullets:
        for number in quoted_numbers(bullet):
            q = number.rstrip("%").replace(",", "")
            if q in plain or q.lstrip("-") in plain or "-" + q in plain:
                continue
            if not any(_as_printed(number, p) for p in printed):
                missing.append((number, bullet))
    return missing


def executed_text(path: Path) -> str:
    """Every cell's source and every text output of an executed notebook, as one string."""
    parts = []
    for cell in _cells(path):
        parts.append(_source(cell))
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append("".join(out.get("text", "")))
            for kind in ("text/plain", "text/markdown", "text/html"):
                data = out.get("data", {}).get(kind)
                if data:
                    parts.append("".join(data) if isinstance(data, list) else data)
            if out.get("output_type") == "error":
                parts.append(out.get("evalue", ""))
    return "\n".join(parts)


def main(argv: list[str]) -> int:
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    want = readme_with_block(text)
    if "--write" in argv:
        readme.write_text(want, encoding="utf-8")
        print("README.md: run-time table written from book/run-times.json")
    elif "--check" in argv:
        if want != text:
            print(
                "README.md's run-time table is not book/run-times.json's: run "
                "python tools/course_pages.py --write"
            )
            return 1
        print("README.md's run-time table is up to date")
    else:
        print(readme_block())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
