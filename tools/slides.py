"""Write a lecture slide deck per chapter from the cells it tags ``slide``: one HTML file each,
self-contained (styles, navigation script and figures inline), with math typeset offline.

    python tools/slides.py                         # every chapter -> _build/slides/ (make slides)
    python tools/slides.py notebooks/04_sliding_window.ipynb --out /tmp/decks

Each cell tagged ``slide`` becomes one slide, in notebook order: a markdown cell as it reads in
the book (a summary stops before its *Further reading*), a code cell as its printed output and
figures, with its code shown only when it drew no figure; a tagged figure caption (``**Figure
N.**``) right after a tagged figure goes under it on the same slide. Outputs come from an executed
copy of the chapter, when one matches the committed notebook's code (``_build/jupyter_execute``
after ``make book``, or ``_build/executed-ci`` after ``tools/run_notebooks.py``); otherwise the
slide shows the code and says the chapter has not been executed. The decks need no network:
MathJax comes from the ``sphinx-mathjax-offline`` package the book is built with, copied once into
``OUT/mathjax/``. Arrow keys, space and Page Up/Down move between slides; printing gives one slide
per page.

Standard library, plus ``markdown-it-py`` and ``mdit-py-plugins`` (installed with the book).
"""

from __future__ import annotations

import argparse
import base64
import html
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXECUTED = (ROOT / "_build" / "jupyter_execute" / "notebooks", ROOT / "_build" / "executed-ci")
TAG = "slide"

STYLE = """
html, body { margin: 0; height: 100%; background: #fff; color: #222;
  font-family: system-ui, -apple-system, "Segoe UI", sans-serif; }
section { display: none; box-sizing: border-box; height: 100vh; padding: 4vh 6vw 7vh;
  overflow: auto; font-size: clamp(16px, 2.2vw, 28px); line-height: 1.45; }
section.current { display: block; }
section h1 { font-size: 2em; margin-top: 18vh; } section h2 { font-size: 1.5em; }
section pre { font-size: 0.62em; background: #f5f5f5; padding: 0.6em; white-space: pre-wrap;
  overflow-wrap: anywhere; }
section code { background: #f2f2f2; padding: 0 0.2em; }
section img { max-width: 100%; max-height: 62vh; display: block; margin: 0.5em auto; }
section table { border-collapse: collapse; font-size: 0.8em; }
section td, section th { border-bottom: 1px solid #ccc; padding: 0.2em 0.6em; }
.note { color: #a33; font-size: 0.7em; }
.caption { font-size: 0.75em; }
section img + .caption, section .caption { margin-top: 0.3em; }
#counter { position: fixed; right: 2vw; bottom: 2vh; color: #888; font-size: 14px; }
@media print { section { display: block; height: auto; page-break-after: always; }
  #counter { display: none; } }
"""

SCRIPT = """
(function () {
  var slides = document.querySelectorAll("section"), i = 0;
  function show(k) {
    i = Math.max(0, Math.min(slides.length - 1, k));
    slides.forEach(function (s, j) { s.classList.toggle("current", j === i); });
    document.getElementById("counter").textContent = (i + 1) + " / " + slides.length;
    history.replaceState(null, "", "#" + (i + 1));
  }
  document.addEventListener("keydown", function (e) {
    if (["ArrowRight", "ArrowDown", "PageDown", " "].indexOf(e.key) >= 0) show(i + 1);
    else if (["ArrowLeft", "ArrowUp", "PageUp"].indexOf(e.key) >= 0) show(i - 1);
    else if (e.key === "Home") show(0); else if (e.key === "End") show(slides.length - 1);
    else return;
    e.preventDefault();
  });
  document.addEventListener("click", function (e) {
    if (e.target.closest("a")) return;
    show(e.clientX > window.innerWidth / 3 ? i + 1 : i - 1);
  });
  show((parseInt(location.hash.slice(1), 10) || 1) - 1);
})();
"""


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _markdown_renderer():
    from markdown_it import MarkdownIt
    from mdit_py_plugins.dollarmath import dollarmath_plugin

    md = MarkdownIt("commonmark").enable("table")
    md.use(dollarmath_plugin, double_inline=True)
    md.add_render_rule(
        "math_inline",
        lambda self, tokens, idx, options, env: "\\(" + html.escape(tokens[idx].content) + "\\)",
    )
    for rule in ("math_block", "math_block_label"):
        md.add_render_rule(
            rule,
            lambda self, tokens, idx, options, env: (
                "<p>\\[" + html.escape(tokens[idx].content) + "\\]</p>\n"
            ),
        )
    return md


def _plain_roles(text: str) -> str:
    """MyST roles the slides cannot resolve, as text: citations, cross-references."""
    text = re.sub(r"\{cite(?::\w+)?\}`([^`]+)`", lambda m: f"[{m.group(1)}]", text)
    text = re.sub(r"\{(?:doc|ref|numref)\}`([^`<]+?)\s*<[^`]+>`", r"\1", text)
    text = re.sub(r"\{(?:doc|ref|numref)\}`([^`]+)`", r"\1", text)
    return re.sub(r"\]\((?!https?:)[^)]*\.(?:ipynb|md)(#[^)]*)?\)", "]()", text)


def executed_copy(path: Path, nb: dict) -> dict | None:
    """An executed copy of the chapter whose code cells are the committed ones, if any."""
    code = [_source(c) for c in nb["cells"] if c["cell_type"] == "code"]
    for folder in EXECUTED:
        candidate = folder / path.name
        if candidate.is_file():
            done = json.loads(candidate.read_text(encoding="utf-8"))
            if [_source(c) for c in done["cells"] if c["cell_type"] == "code"] == code:
                return done
    return None


def _outputs_html(cell: dict) -> tuple[str, bool]:
    """(HTML of a code cell's outputs, whether it holds a figure)."""
    parts, figure = [], False
    for out in cell.get("outputs", []):
        data = out.get("data", {})
        if "image/png" in data:
            png = "".join(data["image/png"]).replace("\n", "")
            parts.append(f'<img alt="figure" src="data:image/png;base64,{png}">')
            figure = True
        elif "image/svg+xml" in data:
            svg = "".join(data["image/svg+xml"]).encode()
            parts.append(
                f'<img alt="figure" src="data:image/svg+xml;base64,'
                f'{base64.b64encode(svg).decode()}">'
            )
            figure = True
        elif out.get("output_type") == "stream" and out.get("name") == "stdout":
            parts.append(f"<pre>{html.escape(''.join(out.get('text', '')))}</pre>")
        elif "text/plain" in data:
            parts.append(f"<pre>{html.escape(''.join(data['text/plain']))}</pre>")
    return "\n".join(parts), figure


def slide_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if TAG in c.get("metadata", {}).get("tags", [])]


def deck(path: Path, mathjax: str | None) -> tuple[str, int, bool]:
    """(HTML of the chapter's deck, number of slides, whether outputs were shown)."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    done = executed_copy(path, nb)
    by_id = {c.get("id"): c for c in (done or {"cells": []})["cells"]}
    md = _markdown_renderer()
    sections: list[str] = []
    after_figure = False
    for cell in slide_cells(nb):
        if cell["cell_type"] == "markdown":
            text = md.render(_plain_roles(_source(cell).split("## Further reading")[0]))
            if after_figure and _source(cell).lstrip().startswith("**Figure"):
                sections[-1] += f'\n<div class="caption">{text}</div>'  # under its figure
            else:
                sections.append(text)
            after_figure = False
            continue
        executed = by_id.get(cell.get("id"))
        body, figure = _outputs_html(executed) if executed else ("", False)
        code = f"<pre>{html.escape(_source(cell))}</pre>"
        if not executed:
            body = code + '<p class="note">(not executed: run make book for the outputs)</p>'
        elif not figure:
            body = code + body
        sections.append(body)
        after_figure = figure
    title = next(
        (
            re.sub(r"^#\s*", "", l)
            for c in nb["cells"]
            if c["cell_type"] == "markdown"
            for l in _source(c).splitlines()
            if l.startswith("# ")
        ),
        path.stem,
    )
    math = (
        f'<script>window.MathJax = {{tex: {{inlineMath: [["\\\\(", "\\\\)"]]}}}};</script>\n'
        f'<script defer src="{mathjax}"></script>'
        if mathjax
        else ""
    )
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n{math}\n</head><body>\n"
        + "\n".join(f"<section>\n{s}\n</section>" for s in sections)
        + f'\n<div id="counter"></div>\n<script>{SCRIPT}</script>\n</body></html>\n'
    )
    return page, len(sections), done is not None


def copy_mathjax(out: Path) -> str | None:
    """Copy MathJax (SVG output: no web fonts) from sphinx-mathjax-offline; its script's path."""
    spec = importlib.util.find_spec("sphinx-mathjax-offline")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(list(spec.submodule_search_locations)[0]) / "static" / "mathjax"
    target = out / "mathjax"
    if not (target / "tex-svg.js").exists():
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / "tex-svg.js", target / "tex-svg.js")
        shutil.copytree(
            source / "input" / "tex" / "extensions",
            target / "input" / "tex" / "extensions",
            dirs_exist_ok=True,
        )
    return "mathjax/tex-svg.js"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "notebooks", nargs="*", type=Path, help="default: every notebooks/NN_*.ipynb"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "_build" / "slides")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("[0-9][0-9]*_*.ipynb"))
    args.out.mkdir(parents=True, exist_ok=True)
    mathjax = copy_mathjax(args.out)
    if mathjax is None:
        print("sphinx-mathjax-offline is not installed: the decks show the TeX source of the math")
    links = []
    for path in paths:
        page, n, executed = deck(path, mathjax)
        if n == 0:
            print(f"{path.name}: no cell is tagged '{TAG}', no deck")
            continue
        (args.out / f"{path.stem}.html").write_text(page, encoding="utf-8")
        links.append(
            f'<li><a href="{path.stem}.html">{html.escape(path.stem)}</a> ({n} slides)</li>'
        )
        state = "with outputs" if executed else "code only (no matching executed copy)"
        print(f"{path.name}: {n} slides, {state} -> {args.out / (path.stem + '.html')}")
    (args.out / "index.html").write_text(
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Slides</title>'
        f"</head><body><h1>Slides, one deck per chapter</h1><ul>{''.join(links)}</ul>"
        "</body></html>\n",
        encoding="utf-8",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
