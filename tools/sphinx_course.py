"""Sphinx extension: the course pages name exercises, chapters and run times from the notebooks.

Loaded by _config.yml (``sphinx: local_extensions``). In a page:

``{exercise}`04:flash_window```
    "exercise 3": the number, in chapter 04, of the exercise whose student cell defines
    ``flash_window``. The number is read from the notebook when the book is built, so it follows
    any renumbering; a chapter or name that does not exist is a build error.
``{chapter}`LoRA and preferences </notebooks/08b_lora_and_preferences>```
    a link to the chapter when its notebook exists; otherwise the title in italics and
    "(in preparation)". The page never calls an existing chapter "in preparation".
``{chapter-table}``
    every chapter in order, linked, with the first of its objectives.
``{exercise-table}``
    every chapter's exercises: number, kind and what the student writes.
``{run-times}``
    every chapter's recorded run times (book/run-times.json, written by
    ``tools/run_notebooks.py --record``).
``{weekly-hours}``
    the syllabus's weeks, their chapters' exercises and run times, and the hours estimate.
``{ablation-record} data/ablations/NAME.json``
    a seed record: per-seed results, mean and spread, the verdict, and the measured budget.

The reading of the notebooks is tools/course_pages.py's (standard library only), which the tests
use too.
"""

from __future__ import annotations

import sys
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import Directive
from docutils.statemachine import StringList
from sphinx import addnodes
from sphinx.util import logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
import course_pages  # noqa: E402

LOG = logging.getLogger(__name__)


def _error(inliner, lineno: int, rawtext: str, message: str):
    msg = inliner.reporter.error(message, line=lineno)
    problem = inliner.problematic(rawtext, rawtext, msg)
    return [problem], [msg]


def exercise_role(name, rawtext, text, lineno, inliner, options=None, content=None):
    """{exercise}`CH:name` -> "exercise N" (N read from the chapter's notebook)."""
    try:
        ex = course_pages.find_exercise(text)
    except (LookupError, ValueError) as err:
        return _error(inliner, lineno, rawtext, str(err))
    env = inliner.document.settings.env
    env.note_dependency(str(course_pages.chapter_paths()[ex.chapter]))
    return [nodes.inline(rawtext, f"exercise {ex.number}", classes=["exercise-ref"])], []


def chapter_role(name, rawtext, text, lineno, inliner, options=None, content=None):
    """{chapter}`Title </notebooks/NN_name>` -> a link, or "*Title* (in preparation)"."""
    if "<" not in text or not text.rstrip().endswith(">"):
        return _error(
            inliner,
            lineno,
            rawtext,
            f"{{chapter}}`{text}`: write {{chapter}}`Title </notebooks/NN_name>`",
        )
    label, target = text[: text.rindex("<")].strip(), text[text.rindex("<") + 1 : -1].strip()
    path = course_pages.ROOT / (target.lstrip("/") + ".ipynb")
    if path.exists():
        env = inliner.document.settings.env
        ref = addnodes.pending_xref(
            rawtext,
            refdomain="std",
            reftype="doc",
            reftarget=target,
            refexplicit=True,
            refwarn=True,
            refdoc=env.docname,
        )
        ref += nodes.inline(label, label, classes=["xref", "std", "std-doc"])
        return [ref], []
    return [nodes.emphasis(label, label), nodes.Text(" (in preparation)")], []


def _markdown(directive: Directive, lines: list[str]) -> list[nodes.Node]:
    """Parse generated MyST (a pipe table, a paragraph) as if it were written in the page."""
    container = nodes.container()
    directive.state.nested_parse(
        StringList(lines, source=directive.name), directive.content_offset, container
    )
    return container.children


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"


class ChapterTable(Directive):
    """Every chapter in notebooks/, linked, with its first objective (MyST in the cells)."""

    has_content = False

    def run(self):
        env = self.state.document.settings.env
        lines = ["| | chapter | after it you can, among other things, |", "|---|---|---|"]
        for chapter, path in course_pages.chapter_paths().items():
            env.note_dependency(str(path))
            lines.append(
                _row(
                    [
                        chapter,
                        f"{{doc}}`{course_pages.title(path)} </notebooks/{path.stem}>`",
                        course_pages.first_objective(path),
                    ]
                )
            )
        return _markdown(self, lines)


class ExerciseTable(Directive):
    """Every chapter's exercises, read from the notebooks when the book is built."""

    has_content = False

    def run(self):
        env = self.state.document.settings.env
        lines = [
            "| chapter | exercises | number, kind (what the student's cell defines) |",
            "|---|---:|---|",
        ]
        for chapter, path in course_pages.chapter_paths().items():
            env.note_dependency(str(path))
            found = course_pages.exercises(path)
            listed = "; ".join(
                f"**{ex.number}** {ex.title} ({', '.join(f'`{n}`' for n in ex.names)})"
                for ex in found
            )
            lines.append(
                _row([f"{chapter} {course_pages.title(path)}", str(len(found)), listed or "none"])
            )
        return _markdown(self, lines)


class WeeklyHours(Directive):
    """The syllabus's weeks with their exercises and the hours estimate of book/policies.md."""

    has_content = False

    def run(self):
        env = self.state.document.settings.env
        env.note_dependency(str(course_pages.SYLLABUS))
        env.note_dependency(str(course_pages.RECORD))
        lines = [
            _row(
                [
                    "week",
                    "chapters",
                    "exercises",
                    "`ci` run (min)",
                    "class (h)",
                    "reading (h)",
                    "exercises (h)",
                    "assignments (h)",
                    "project (h)",
                    "total (h)",
                ]
            ),
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in course_pages.weekly_hours():
            chapters = ", ".join(r["chapters"]) or "(project week)"
            if r["missing"]:
                chapters += f" ({r['missing']} in preparation)"
            h = r["hours"]
            lines.append(
                _row(
                    [
                        str(r["week"]),
                        chapters,
                        str(r["exercises"]),
                        f"{r['ci minutes']:.0f}",
                        f"{h['class']:g}",
                        f"{h['reading']:g}",
                        f"{h['exercise work']:g}",
                        f"{h['assignments']:g}",
                        f"{h['project']:g}",
                        f"**{r['total']:g}**",
                    ]
                )
            )
        return _markdown(self, lines)


class RunTimes(Directive):
    """book/run-times.json as a table, with where its numbers come from."""

    has_content = False

    def run(self):
        env = self.state.document.settings.env
        env.note_dependency(str(course_pages.RECORD))
        return _markdown(self, course_pages.run_time_table().splitlines())


class AblationRecord(Directive):
    """A seed record of data/ablations/ (the argument, from the repository root) as tables."""

    required_arguments = 1
    has_content = False

    def run(self):
        path = course_pages.ROOT / self.arguments[0]
        self.state.document.settings.env.note_dependency(str(path))
        return _markdown(self, course_pages.ablation_markdown(path))


def setup(app):
    app.add_role("exercise", exercise_role)
    app.add_role("chapter", chapter_role)
    app.add_directive("chapter-table", ChapterTable)
    app.add_directive("exercise-table", ExerciseTable)
    app.add_directive("run-times", RunTimes)
    app.add_directive("weekly-hours", WeeklyHours)
    app.add_directive("ablation-record", AblationRecord)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
