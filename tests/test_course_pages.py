"""The course pages cannot go stale: what they say about the chapters is read from the chapters,
or checked against them here.

- exercise numbers are never typed: the pages write ``{exercise}`CH:name``` and the book renders
  the number the notebook gives that exercise (tools/sphinx_course.py); every such reference
  resolves, and no page names an exercise by a hand-typed number;
- a figure a page names exists in that chapter;
- no page, README or chapter calls a chapter that exists "in preparation";
- every chapter has its section in the instructor notes, its rows in the README and the intro,
  its run times in book/run-times.json (and the README's table is that record's), a week in the
  syllabus after every chapter it names as a prerequisite, and forward pointers where it uses a
  measure a later week derives;
- new chapters end with an open question, every chapter tags its slides, and one deck builds.

tests/test_book.py checks the numbers under *Expected outputs* against the executed chapters.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import course_pages  # noqa: E402
import slides  # noqa: E402

BOOK = ROOT / "book"
PAGES = sorted(BOOK.glob("*.md"))
CHAPTERS = course_pages.chapter_paths()
NOTES = (BOOK / "instructor-notes.md").read_text(encoding="utf-8")
SYLLABUS = (BOOK / "syllabus.md").read_text(encoding="utf-8")
# A measure used before the week that derives it must come with a pointer to that chapter.
FORWARD = {"perplexity": "06a", "temperature": "06b", "top_k": "06b"}
# Chapters written for the course, after the first ten: each ends with an open question.
ORIGINAL = {"01", "02", "03", "04", "05", "06", "07", "08", "09", "10"}
HAND_NUMBERED = re.compile(
    r"\b(?:[Ee]xercises? \d+|(?:first|second|third|fourth|fifth|sixth)"
    r" exercise|[Ee]xercise \d+'s)\b"
)


def _prose(text: str) -> str:
    """A page without its code blocks, inline code and exercise references."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = course_pages.EXERCISE_REF.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def _chapter_sections(text: str) -> dict[str, str]:
    return dict(re.findall(r"^### (\d\d[a-z]?) [^\n]*\n(.*?)(?=^### |^## |\Z)", text, re.S | re.M))


# ----------------------------------------------------------------------------- exercises


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_exercise_references_resolve(page: Path) -> None:
    for ref in course_pages.EXERCISE_REF.findall(page.read_text(encoding="utf-8")):
        course_pages.find_exercise(ref)  # raises, naming what is missing


def test_a_reference_to_a_missing_exercise_fails() -> None:
    with pytest.raises(LookupError, match="no exercise whose student cell defines"):
        course_pages.find_exercise("04:no_such_function")
    with pytest.raises(LookupError, match="no chapter"):
        course_pages.find_exercise("99:anything")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_page_numbers_an_exercise_by_hand(page: Path) -> None:
    found = HAND_NUMBERED.findall(_prose(page.read_text(encoding="utf-8")))
    assert not found, (
        f"{page.name} numbers exercises by hand {found}: write "
        "{exercise}`CH:name` (the name the student's cell defines) instead"
    )


def test_the_hand_numbering_check_catches_what_it_should() -> None:
    for text in ("In exercise 2, decode", "chapter 8's fourth exercise", "Exercise 3: the first"):
        assert HAND_NUMBERED.search(_prose(text)), text
    assert not HAND_NUMBERED.search(_prose("In {exercise}`04:flash_window`, `Exercise 2: ok`"))


# ------------------------------------------------------------------------------- figures


def test_figures_the_pages_name_exist() -> None:
    for page in (BOOK / "instructor-notes.md", BOOK / "syllabus.md"):
        text = page.read_text(encoding="utf-8")
        for chapter, body in _chapter_sections(text).items():
            named = {int(n) for n in re.findall(r"\bFigure (\d+)", body)}
            have = course_pages.figures(CHAPTERS[chapter]) if chapter in CHAPTERS else set()
            assert named <= have, (
                f"{page.name}, chapter {chapter} names Figure(s) "
                f"{sorted(named - have)}; the chapter has {sorted(have)}"
            )
        for chapter, n in re.findall(r"chapter (\d\d[a-z]?)'s Figure (\d+)", text):
            assert int(n) in course_pages.figures(CHAPTERS[chapter]), (chapter, n)


# --------------------------------------------------------------------- "in preparation"


def _in_preparation_mentions() -> list[tuple[str, str]]:
    """(where, the text before "(in preparation)") in every page, README and chapter."""
    sources = [(p.name, p.read_text(encoding="utf-8")) for p in PAGES]
    sources.append(("README.md", (ROOT / "README.md").read_text(encoding="utf-8")))
    sources += [(p.name, course_pages.markdown(p)) for p in CHAPTERS.values()]
    sources += [
        (str(p.relative_to(ROOT)), p.read_text(encoding="utf-8"))
        for p in sorted((ROOT / "assignments").rglob("*.md"))
    ]
    found = []
    for where, text in sources:
        for m in re.finditer(r"\(in preparation\)", text):
            found.append((where, text[max(0, m.start() - 160) : m.start()]))
    return found


def stale_in_preparation(before: str) -> str | None:
    """The existing chapter a text calls "in preparation", if any."""
    link = re.search(r"\]\(([\w./-]*?)(\d\d[a-z]?_\w+)\.ipynb\)\s*$", before)
    if link and link.group(2).split("_")[0] in CHAPTERS:
        return link.group(2)
    named = re.search(r"\*([^*]+)\*\s*$", before)
    if named:
        words = named.group(1).strip().lower()
        for path in CHAPTERS.values():
            title = course_pages.title(path).lower()
            if words in title or title in words:
                return path.stem
    return None


def test_no_chapter_that_exists_is_called_in_preparation() -> None:
    stale = [
        (where, chapter)
        for where, before in _in_preparation_mentions()
        if (chapter := stale_in_preparation(before))
    ]
    assert not stale, (
        "these call an existing chapter '(in preparation)'; link it instead "
        f"(or write {{chapter}}`Title </notebooks/NN_name>`): {stale}"
    )


def test_the_in_preparation_check_catches_both_forms() -> None:
    assert stale_in_preparation("the chapter *Training* ") == "06a_training"
    assert stale_in_preparation("the primer chapter *JAX and Flax NNX* ") == "00_jax_and_nnx"
    assert stale_in_preparation("see [the tokenizer](01_tokenizer.ipynb) ") == "01_tokenizer"
    assert stale_in_preparation("the chapter *Speculative sampling* ") is None


# ---------------------------------------------------------------- every chapter, everywhere


def test_every_chapter_has_its_section_in_the_instructor_notes() -> None:
    sections = _chapter_sections(NOTES)
    missing = sorted(set(CHAPTERS) - set(sections))
    assert not missing, f"instructor-notes.md has no '### NN Title' section for {missing}"
    expected = course_pages.expected_outputs(NOTES)
    for chapter in CHAPTERS:
        assert expected.get(chapter), f"instructor notes, {chapter}: no *Expected outputs.* list"
        assert "*Common mistakes.*" in sections[chapter], chapter


def test_every_chapter_has_its_quiz() -> None:
    quizzes = (BOOK / "quizzes.md").read_text(encoding="utf-8")
    have = re.findall(r"^## (\d\d[a-z]?) ", quizzes, re.M)
    missing = sorted(set(CHAPTERS) - set(have))
    assert not missing, f"book/quizzes.md has no '## NN Title' section for {missing}"
    for chapter, body in re.findall(
        r"^## (\d\d[a-z]?) [^\n]*\n(.*?)(?=^## |\Z)", quizzes, re.S | re.M
    ):
        assert len(re.findall(r"^\d\. ", body, re.M)) == body.count(":class: dropdown") >= 3, (
            f"quizzes, {chapter}: every question needs its folded answer"
        )


def test_readme_and_intro_list_every_chapter() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    read_it = readme[readme.index("## How to read it") : readme.index("## Run profiles")]
    rows = re.findall(r"^\| (\d\d[a-z]?) [^|]+\| `(notebooks/[^`]+)` \|", read_it, re.M)
    assert [c for c, _ in rows] == list(CHAPTERS), (
        f"README's 'How to read it' rows {[c for c, _ in rows]} are not the chapters"
    )
    for _, path in rows:
        assert (ROOT / path).is_file(), path
    intro = (BOOK / "intro.md").read_text(encoding="utf-8")
    pairing = intro[intro.index("| Chapter | Module(s)") :]
    listed = set(re.findall(r"\b(\d\d[a-z]?) [a-zA-Z]", pairing.split("\n\n")[0]))
    assert set(CHAPTERS) <= listed, f"the intro's module table lacks {set(CHAPTERS) - listed}"
    assert "```{chapter-table}" in intro, "the intro's chapter list is the generated table"


def test_run_times_are_recorded_for_every_chapter_and_the_readme_shows_the_record() -> None:
    record = course_pages.record()
    for key in (course_pages.CI, course_pages.COLAB):
        missing = [p.stem for p in CHAPTERS.values() if p.stem not in record.get(key, {})]
        assert not missing, (
            f"book/run-times.json has no '{key}' time for {missing}: run "
            "python tools/run_notebooks.py --record (with --profile colab "
            "--loop-cap 3 for the second column)"
        )
        for chapter, entry in record[key].items():
            assert {"seconds", "date", "machine", "load average"} <= set(entry), chapter
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert course_pages.readme_with_block(readme) == readme, (
        "README.md's run-time table is "
        "not book/run-times.json's: run "
        "python tools/course_pages.py --write"
    )
    assert "```{run-times}" in NOTES, "the instructor notes render the record"


# ---------------------------------------------------------------------------- sequencing


def _taught() -> dict[str, tuple[int, int]]:
    """Chapter -> (week, position in the week's reading)."""
    out = {}
    for week, _, chapters in course_pages.syllabus_weeks():
        for i, chapter in enumerate(chapters):
            out.setdefault(chapter, (week, i))
    return out


def test_the_syllabus_teaches_every_chapter_in_thirteen_weeks() -> None:
    taught = _taught()
    missing = sorted(set(CHAPTERS) - set(taught))
    assert not missing, f"chapters in no week's reading: {missing}"
    weeks = [w for w, name, _ in course_pages.syllabus_weeks() if "optional" not in name]
    assert weeks == list(range(1, 14)), f"the weekly plan's weeks are {weeks}"
    final = re.search(r"final report (?:end of )?week (\d+)", SYLLABUS)
    assert final and int(final.group(1)) == 13


def test_no_chapter_is_taught_before_a_chapter_it_needs() -> None:
    taught = _taught()
    for chapter, path in CHAPTERS.items():
        for need in course_pages.prerequisites(path):
            assert need in taught and taught[need] < taught[chapter], (
                f"chapter {chapter} (week {taught[chapter][0]}) needs {need}, taught in week "
                f"{taught.get(need, ('no', 0))[0]}"
            )


def test_a_measure_used_before_its_chapter_points_forward_to_it() -> None:
    taught = _taught()
    for term, definer in FORWARD.items():
        for chapter, path in CHAPTERS.items():
            if chapter == definer or taught[chapter] >= taught[definer]:
                continue
            text = path.read_text(encoding="utf-8")
            if term in text:
                link = CHAPTERS[definer].stem
                assert re.search(
                    rf"\]\({link}\.ipynb|<{link}>|`{link}`", course_pages.markdown(path)
                ), (
                    f"chapter {chapter} uses {term!r} before week "
                    f"{taught[definer][0]} derives it, with no link to {link}"
                )


def test_the_weekly_hours_cover_every_week() -> None:
    rows = course_pages.weekly_hours()
    assert [r["week"] for r in rows] == list(range(1, 14))
    for r in rows:
        assert 3 <= r["total"] <= 25, r


# ------------------------------------------------------------------- chapters' own parts


@pytest.mark.parametrize("chapter", [c for c in CHAPTERS if c not in ORIGINAL])
def test_new_chapters_end_with_an_open_question(chapter: str) -> None:
    assert "**To explore further (no check).**" in course_pages.markdown(CHAPTERS[chapter]), (
        f"{chapter}: add a '**To explore further (no check).**' paragraph before the summary"
    )


@pytest.mark.parametrize("chapter", list(CHAPTERS))
def test_every_chapter_tags_its_slides(chapter: str) -> None:
    nb = json.loads(CHAPTERS[chapter].read_text(encoding="utf-8"))
    tagged = slides.slide_cells(nb)
    assert len(tagged) >= 5, f"{chapter}: tag at least five cells 'slide' ({len(tagged)})"
    assert tagged[0] is nb["cells"][0], f"{chapter}: the title cell opens the deck"
    assert not any({"solution", "check"} & set(c["metadata"].get("tags", [])) for c in tagged)


def test_one_deck_builds_offline(tmp_path: Path) -> None:
    path = CHAPTERS["04"]
    assert slides.main([str(path), "--out", str(tmp_path)]) == 0
    page = (tmp_path / f"{path.stem}.html").read_text(encoding="utf-8")
    n = page.count("<section>")
    tagged = slides.slide_cells(json.loads(path.read_text(encoding="utf-8")))
    assert 5 <= n <= len(tagged)
    assert "Local sliding-window and global attention" in page
    assert "\\(" in page or "\\[" in page, "the math is left for MathJax"
    external = re.findall(r'(?:src|href)="(https?:[^"]+)"', page)
    assert not external, f"the deck loads from the network: {external}"
    if (tmp_path / "mathjax" / "tex-svg.js").exists():
        assert 'src="mathjax/tex-svg.js"' in page
    assert (tmp_path / "index.html").exists()


# ---------------------------------------------------------------------- the Sphinx side


def test_the_extension_renders_numbers_tables_and_chapters(tmp_path: Path) -> None:
    """A small Sphinx build with the extension: the numbers come from the notebooks."""
    ex = course_pages.find_exercise("04:flash_window")
    (tmp_path / "conf.py").write_text(
        textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "tools")!r})
        extensions = ["myst_parser", "sphinx_course"]
        """)
    )
    (tmp_path / "index.md").write_text(
        textwrap.dedent("""
        # Test

        In {exercise}`04:flash_window`, and *{chapter}`Never written </notebooks/99_nothing>`*.

        ```{exercise-table}
        ```

        ```{run-times}
        ```

        ```{weekly-hours}
        ```
        """)
    )
    out = tmp_path / "html"
    run = subprocess.run(
        [sys.executable, "-m", "sphinx", "-q", "-b", "html", str(tmp_path), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    html = (out / "index.html").read_text(encoding="utf-8")
    assert f"exercise {ex.number}" in html
    assert "Never written" in html and "(in preparation)" in html
    for path in CHAPTERS.values():
        assert course_pages.title(path).split(":")[0] in html, path.stem
    (tmp_path / "index.md").write_text("# Test\n\nIn {exercise}`04:no_such_exercise`.\n")
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-q",
            "-W",
            "-b",
            "html",
            str(tmp_path),
            str(tmp_path / "bad"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "no_such_exercise" in bad.stderr
