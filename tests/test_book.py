"""The Jupyter Book builds cleanly, executes every chapter at the ci profile, and renders.

One session-scoped build (``jupyter-book build . -W -n --keep-going --all`` into the repository's
``_build``, the same flags as ``make book``) serves every test here. Executed notebook outputs
live in jupyter-cache (``_build/.jupyter_cache``), so a chapter whose code cells have not
changed since the last build is not executed again; ``--all`` still re-reads every page, so a
warning in an unchanged page is reported on every build, not only the first. This build is how
CI executes every notebook: a cell that raises fails it (``nb_execution_raise_on_error``).

The last test opens the index and the first notebook chapter in headless Chromium with the
network off, saves screenshots to ``_build/screenshots/`` and checks the rendered DOM: the math
is typeset by the MathJax the book ships (sphinx-mathjax-offline), not left as raw ``\\(W\\)``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from bs4 import BeautifulSoup

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import course_pages  # noqa: E402

BUILD = ROOT / "_build"
HTML = BUILD / "html"
SCREENSHOTS = BUILD / "screenshots"
LOG = BUILD / "book-build.log"
COLAB = "https://colab.research.google.com/github/gemma2-lite/gemma2-lite/blob/main/"

# Slow, and all in one process: make test's --dist loadscope keeps a file's tests on one worker
# (the xdist_group mark does the same under --dist loadgroup), and a file lock serialises the
# build if workers are split anyway.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("book")]

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Sphinx/docutils diagnostics look like "path:line: WARNING: message" (or ERROR/SEVERE/CRITICAL).
# "[IPKernelApp] WARNING | ..." from a kernel's own logger is not one.
DIAGNOSTIC = re.compile(r"\b(WARNING|ERROR|SEVERE|CRITICAL):")


# --------------------------------------------------------------------------- the table of contents


def _toc_files() -> list[str]:
    """Every `file:` in _toc.yml, in reading order (root first), without extension."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections"))
            walk(entry.get("chapters"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return files


def _toc_notebooks() -> list[str]:
    return [f for f in _toc_files() if f.startswith("notebooks/")]


def test_toc_lists_every_notebook_and_only_existing_files():
    listed = _toc_files()
    assert len(listed) == len(set(listed)), f"a file appears twice in _toc.yml: {listed}"
    for entry in listed:
        candidates = [ROOT / f"{entry}{ext}" for ext in (".ipynb", ".md")]
        assert any(c.exists() for c in candidates), f"_toc.yml lists {entry}, which does not exist"
    on_disk = sorted(f"notebooks/{p.stem}" for p in (ROOT / "notebooks").glob("*.ipynb"))
    missing = [nb for nb in on_disk if nb not in listed]
    assert not missing, (
        f"notebooks not in _toc.yml (add them, see the comment at its top): {missing}"
    )
    assert _toc_notebooks() == sorted(_toc_notebooks()), "chapters must be listed in file order"


# ------------------------------------------------------------------------------------ the build


@contextlib.contextmanager
def _build_lock():
    BUILD.mkdir(exist_ok=True)
    with open(BUILD / ".book-build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _jupyter_book() -> str:
    local = Path(sys.executable).with_name("jupyter-book")
    found = str(local) if local.exists() else shutil.which("jupyter-book")
    assert found, "jupyter-book is not installed (pip install -e '.[book]')"
    return found


@pytest.fixture(scope="session")
def book() -> dict:
    """Build the book once (executing every notebook at the ci profile); return rc and log."""
    env = dict(os.environ, GEMMA2_LITE_PROFILE="ci", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    cmd = [
        _jupyter_book(),
        "build",
        str(ROOT),
        "--path-output",
        str(ROOT),
        "--warningiserror",
        "--nitpick",
        "--keep-going",
        "--all",
    ]
    with _build_lock():
        start = time.monotonic()
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=3600,
        )
        seconds = time.monotonic() - start
    log = ANSI.sub("", proc.stdout)
    LOG.write_text(log)
    print(f"\nbook build: rc={proc.returncode} in {seconds:.1f} s (log: {LOG})")
    for line in log.splitlines():  # one line per notebook executed (cached ones are not listed)
        if "Executed notebook in" in line:
            print("  " + line.replace(str(ROOT) + os.sep, ""))
    return {"rc": proc.returncode, "log": log, "seconds": seconds}


def _page(name: str) -> Path:
    return HTML / f"{name}.html"


def _soup(path: Path) -> BeautifulSoup:
    return BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")


def _failure_summary(log: str) -> str:
    """Each diagnostic, with a failed notebook's cell and error, then the last lines of the log."""
    lines, out, i = log.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        if DIAGNOSTIC.search(line):
            out.append(line)
            if "Executing notebook failed" in line:  # skip nbclient's own stack, keep the cell's
                j = i + 1
                while (
                    j < len(lines)
                    and "An error occurred while executing" not in lines[j]
                    and "[mystnb.exec]" not in lines[j]
                ):
                    j += 1
                while j < len(lines) and len(out) < 300:
                    out.append(lines[j])
                    if "[mystnb.exec]" in lines[j]:
                        break
                    j += 1
                i = j
        i += 1
    return "\n".join(out + ["...", *lines[-6:]])


def _require_build(book) -> None:
    assert book["rc"] == 0, "the book did not build: see test_book_builds_with_no_warnings"


def test_book_builds_with_no_warnings(book):
    diagnostics = [line for line in book["log"].splitlines() if DIAGNOSTIC.search(line)]
    assert book["rc"] == 0, f"jupyter-book build failed (full log: {LOG}):\n" + _failure_summary(
        book["log"]
    )
    assert not diagnostics, "Sphinx warnings:\n" + "\n".join(diagnostics)
    assert "build succeeded" in book["log"]
    for name in _toc_files():
        assert _page(name).is_file(), f"no HTML page for {name}"


def test_the_book_has_chapters():
    assert _toc_notebooks(), "_toc.yml lists no notebooks/ chapter yet"


def test_every_chapter_has_a_page_with_its_colab_button(book):
    _require_build(book)
    for name in _toc_notebooks():
        soup = _soup(_page(name))
        links = {
            a["href"]
            for a in soup.find_all("a", href=True)
            if a["href"].startswith("https://colab.research.google.com/")
        }
        assert links == {f"{COLAB}{name}.ipynb"}, f"{name}: Colab links {links}"


def test_every_chapter_was_executed_at_the_ci_profile(book):
    """The setup cell (notebooks/SETUP_CELL.md) prints the profile; cached outputs must say ci."""
    _require_build(book)
    for name in _toc_notebooks():
        outputs = " ".join(div.get_text() for div in _soup(_page(name)).select("div.cell_output"))
        assert "profile=ci" in outputs, f"{name}: no 'profile=ci' line in its executed outputs"


def _error_outputs(soup: BeautifulSoup) -> list[str]:
    """Error output outside cells deliberately tagged raises-exception."""
    found = []
    for cell in soup.select("div.cell"):
        if "tag_raises-exception" in cell.get("class", []):
            continue
        for out in cell.select("div.cell_output div.output"):
            classes = set(out.get("class", []))
            text = out.get_text()
            if classes & {"traceback", "error"} or "Traceback (most recent call last)" in text:
                found.append(text.strip()[:500])
    return found


def test_no_chapter_renders_an_error(book):
    _require_build(book)
    for name in _toc_notebooks():
        errors = _error_outputs(_soup(_page(name)))
        assert not errors, f"{name} renders error output:\n" + "\n---\n".join(errors)


def test_math_is_marked_up_for_mathjax_served_with_the_book(book):
    """$...$ and $$...$$ become MathJax math on the intro and in the chapters, with its script,
    which the book ships (no CDN: the browser test below checks that it typesets offline)."""
    _require_build(book)
    soups = {name: _soup(_page(name)) for name in _toc_files()}
    assert soups["book/intro"].select("span.math"), "no inline math on the intro page"
    assert any(soups[name].select("div.math") for name in _toc_notebooks()), (
        "no chapter has display math ($$...$$)"
    )
    for name, soup in soups.items():
        if soup.select("span.math, div.math"):  # Sphinx adds MathJax only where there is math
            scripts = [
                tag.get("src", "")
                for tag in soup.find_all("script")
                if "mathjax" in tag.get("src", "").lower()
            ]
            assert scripts, f"{name}: no MathJax script"
            for src in scripts:
                assert not urlsplit(src).scheme, f"{name}: MathJax from the network ({src})"
                assert (_page(name).parent / unquote(urlsplit(src).path)).is_file(), src


def test_expected_outputs_are_printed_by_the_chapters(book):
    """Every number the instructor notes quote under *Expected outputs* is printed by the chapter
    as the book executed it (rounded as the notes round it; approximate and rounding-level
    numbers aside, see tools/course_pages.quoted_numbers)."""
    _require_build(book)
    notes = (ROOT / "book" / "instructor-notes.md").read_text(encoding="utf-8")
    stale = []
    for chapter, bullets in course_pages.expected_outputs(notes).items():
        path = course_pages.chapter_paths()[chapter]
        text = _soup(_page(f"notebooks/{path.stem}")).get_text(" ")
        stale += [
            f'{chapter}: {n} in "{b[:100]}..."'
            for n, b in course_pages.missing_numbers(bullets, text)
        ]
    assert not stale, (
        "the instructor notes quote numbers the chapters no longer print:\n" + "\n".join(stale)
    )


def test_sizes_cells_are_folded_and_outputs_stay_in_the_column(book):
    """The sizes cell's code is folded like the setup cell's, and the book's stylesheet (which
    sizes the code column for 88 characters and wraps longer printed lines) is on every page."""
    _require_build(book)
    for name in _toc_notebooks():
        soup = _soup(_page(name))
        sizes = soup.select("div.cell.tag_sizes")
        assert sizes and all("tag_hide-input" in c["class"] for c in sizes), name
        sheets = [l.get("href", "") for l in soup.find_all("link", rel="stylesheet")]
        assert any("book.css" in h for h in sheets), f"{name}: _static/book.css not linked"
    css = (HTML / "_static" / "book.css").read_text()
    assert "pre-wrap" in css and "font-size" in css


def test_bibliography_lists_every_entry_and_citations_link_to_it(book):
    _require_build(book)
    keys = re.findall(r"^@\w+\{([^,\s]+),", (ROOT / "references.bib").read_text(), re.M)
    refs = _soup(_page("book/references"))
    entries = refs.select('div.citation[role="doc-biblioentry"], div[role="doc-biblioentry"]')
    assert len(entries) == len(keys) >= 18, f"{len(entries)} rendered entries for {len(keys)} keys"
    text = " ".join(refs.get_text(" ").split()).lower()  # the style sentence-cases titles
    for needle in (
        "Gemma 2: Improving Open Language Models at a Practical Size",
        "RoFormer",
        "Distilling the Knowledge in a Neural Network",
        "2408.00118",
    ):
        assert needle.lower() in text, f"bibliography lacks {needle!r}"
    intro_citations = [
        a["href"]
        for a in _soup(_page("book/intro")).find_all("a", href=True)
        if a["href"].startswith("references.html#")
    ]
    assert intro_citations, "the intro's citations do not link to the references page"
    ids = {tag.get("id") for tag in refs.find_all(id=True)}
    assert all(href.split("#", 1)[1] in ids for href in intro_citations)


# ---------------------------------------------------------------------------- the real browser


def _chromium() -> str:
    found = os.environ.get("CHROMIUM") or next(
        (
            shutil.which(n)
            for n in ("chromium", "chromium-browser", "google-chrome")
            if shutil.which(n)
        ),
        None,
    )
    assert found, (
        "headless Chromium is needed: `make test` installs it as root "
        "(apt-get install chromium), or set CHROMIUM=/path/to/chrome"
    )
    return found


def _offline_prefix() -> list[str]:
    """Run Chromium in a fresh network namespace when the system allows it."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return [unshare, "-n"]
    if unshare and subprocess.run([unshare, "-rn", "true"], capture_output=True).returncode == 0:
        return [unshare, "-rn"]
    return []  # the flags below still keep it off the network


def _chromium_run(
    page: Path, *mode: str, profile: str, height: int = 2000
) -> subprocess.CompletedProcess:
    cmd = _offline_prefix() + [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--proxy-server=127.0.0.1:9",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--user-data-dir={profile}",
        "--hide-scrollbars",
        f"--window-size=1280,{height}",
        "--virtual-time-budget=5000",
        *mode,
        page.as_uri(),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def _screenshot(page: Path, shot: Path, height: int = 2000) -> None:
    # (Headless Chromium draws a blank image when the page is scrolled, e.g. to a #fragment, so
    # a figure further down is captured with a taller window instead.)
    with tempfile.TemporaryDirectory() as profile:
        run = _chromium_run(page, f"--screenshot={shot}", profile=profile, height=height)
    assert run.returncode == 0 and shot.is_file(), f"no screenshot of {page}:\n{run.stderr[-2000:]}"
    assert _png_size(shot) == (1280, height), f"{shot} has the wrong size"
    assert shot.stat().st_size > 20_000, f"{shot} is blank"


def _render(page: Path, shot: Path) -> BeautifulSoup:
    """The DOM after Chromium loaded the page (and ran its scripts); a screenshot of its top."""
    with tempfile.TemporaryDirectory() as profile:
        dom = _chromium_run(page, "--dump-dom", profile=profile)
    assert dom.returncode == 0, f"chromium --dump-dom failed on {page}:\n{dom.stderr[-2000:]}"
    _screenshot(page, shot)
    return BeautifulSoup(dom.stdout, "html.parser")


def _assert_math_typeset(dom: BeautifulSoup, where: str) -> None:
    """MathJax ran (offline) on the page: its output elements are there, no raw \\( \\) left."""
    math = dom.select("span.math, div.math")
    assert math, f"{where}: no math to typeset"
    assert dom.select("mjx-container"), f"{where}: MathJax produced nothing (not loaded offline?)"
    raw = [
        m.get_text()[:60]
        for m in math
        if not m.select("mjx-container") and ("\\(" in m.get_text() or "\\[" in m.get_text())
    ]
    assert not raw, f"{where}: math left as raw TeX: {raw[:3]}"


@pytest.mark.browser
def test_index_and_first_chapter_render_in_headless_chromium(book):
    _require_build(book)
    notebooks = _toc_notebooks()
    assert notebooks, "_toc.yml lists no notebooks/ chapter to open"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    # The index redirects to the root page; the browser must follow it and draw the theme.
    index = _render(HTML / "index.html", SCREENSHOTS / "index.png")
    title = yaml.safe_load((ROOT / "_config.yml").read_text())["title"]
    assert index.find("h1") and "Gemma 2" in index.find("h1").get_text(), "intro did not render"
    assert title in index.get_text(" "), "book title missing from the rendered index"
    sidebar = index.select_one("nav.bd-docs-nav, #bd-docs-nav, .bd-sidebar-primary")
    assert sidebar is not None, "no sidebar navigation: theme CSS/JS not loaded?"
    _assert_math_typeset(index, "the intro")

    chapter_name = notebooks[0]
    chapter_page = _page(chapter_name)
    chapter = _render(chapter_page, SCREENSHOTS / f"{Path(chapter_name).name}.png")
    figures = chapter.select("div.cell_output img")
    assert figures, f"{chapter_name}: no figure (img) among its executed outputs"
    for img in figures:
        src = unquote(urlsplit(img["src"]).path)
        target = (chapter_page.parent / src).resolve() if not src.startswith("/") else Path(src)
        assert target.is_file() and target.stat().st_size > 1000, f"figure {src} missing or empty"
    # A second, tall screenshot: the first part of the chapter, figures included.
    _screenshot(chapter_page, SCREENSHOTS / f"{Path(chapter_name).name}-long.png", height=10000)
    errors = _error_outputs(chapter)
    assert not errors, f"{chapter_name} renders error output:\n" + "\n---\n".join(errors)
    _assert_math_typeset(chapter, chapter_name)
    colab = {
        a["href"]
        for a in chapter.find_all("a", href=True)
        if a["href"].startswith("https://colab.research.google.com/github/")
    }
    assert colab == {f"{COLAB}{chapter_name}.ipynb"}, colab
