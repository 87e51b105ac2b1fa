"""Build the book's small evaluation sets, ``gemma2_lite/assets/eval/*.jsonl``, from the corpus.

One command (from the repository root)::

    python data/build_eval.py            # writes gemma2_lite/assets/eval/*.jsonl (three sets)
    python data/build_eval.py --check    # rebuilds in memory, exit 1 if a committed file differs

The output is byte-for-byte the same on every run and machine: the inputs are the committed
corpus (``data/shakespeare.jsonl``, read with :mod:`gemma2_lite.data`) and
:func:`gemma2_lite.posttrain.speeches`, the draws come from ``numpy.random.default_rng`` with
fixed seeds, and the JSON is written with sorted keys. ``tests/test_evaluate.py`` rebuilds the
files and compares bytes.

The rules (the sets' whole provenance; ``data/README.md`` repeats them)
------------------------------------------------------------------------
A *speech* is what :func:`gemma2_lite.posttrain.speeches` accepts: a block of a play that
starts with a speaker heading (``HAMLET.``, ``Laer.``) followed by two lines, neither a stage
direction, each 16 to 72 characters: ``(title, speaker, line 1, line 2)``. Test items come
only from the ``valid`` split (the last ~5% of every play, never trained on); the few-shot
examples (``split: "shots"``) come from the ``train`` split by the same rule. Every item has
``{"id", "split", "title", "context", "options", "answer"}``; ``answer`` indexes ``options``,
whose order is shuffled with the set's generator, so the right option's position is uniform.

* **next_line** ("which line comes next", 4 options): context ``"{SPEAKER}.\\n{line 1}\\n"``;
  the right option is line 2; the three others are line 2 of three other speeches of the same
  play and split, drawn without replacement (none equal to the answer). Extra fields
  ``speaker`` and ``line`` let :func:`gemma2_lite.evaluate.next_line_formats` re-format it.
* **speaker** ("who speaks this line", 4 options): context = the block of text just before
  the speech in its document (at most its last 4 lines) and a blank line; option ``k`` is
  ``"{S_k}.\\n{line 1}"`` for a candidate speaker ``S_k``: the true one and three other
  speakers (as their headings are spelled) of speeches of the same play and split. Scored
  without normalisation, the option's log-likelihood is log p(speaker, line | before), whose
  arg-max over speakers is the most probable speaker *of this line* (Bayes' rule).
* **arithmetic** (exact match; synthetic, not from the corpus): prompt ``"{a} + {b} ="``,
  answer ``str(a + b)``, with ``(a, b)`` distinct pairs drawn uniformly from 0..49.

Sizes: next_line and speaker 300 test items (or all that qualify) and 8 shots each;
arithmetic 200 test items and 8 shots (shots and test share no pair).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gemma2_lite.data import Split, load_documents
from gemma2_lite.posttrain import speeches

OUT_DIR = Path(__file__).resolve().parents[1] / "gemma2_lite" / "assets" / "eval"
N_TEST, N_SHOTS, N_OPTIONS = 300, 8, 4
N_ARITHMETIC, MAX_OPERAND = 200, 49
SEEDS = {"next_line": 0, "speaker": 1, "arithmetic": 2}
BEFORE_LINES = 4


def _shuffled(options: list[str], rng: np.random.Generator) -> tuple[list[str], int]:
    """The options (right one first on input) in a random order, and the right one's index."""
    order = rng.permutation(len(options))
    return [options[int(i)] for i in order], int(np.argmax(order == 0))


def _draw(
    split: str,
    n: int,
    seed: int,
    prefix: str,
    make: Callable[[tuple[str, str, str, str], np.random.Generator], dict | None],
) -> list[dict]:
    """Visit the speeches of ``split`` in an order drawn from ``seed``; ``make`` turns one
    into an item (drawing from the same generator) or refuses it (None); stop at ``n``."""
    pool = speeches(split)
    rng = np.random.default_rng(seed)
    items: list[dict] = []
    for p in rng.permutation(len(pool)):
        item = make(pool[int(p)], rng)
        if item is not None:
            items.append({"id": f"{prefix}-{len(items):04d}", "split": prefix, **item})
            if len(items) == n:
                break
    return items


def next_line_items(split: str, n: int, seed: int, prefix: str) -> list[dict]:
    """``n`` "which line comes next" items from the speeches of ``split`` (rule above)."""
    by_title: dict[str, list[str]] = defaultdict(list)
    for title, _, _, second in speeches(split):
        by_title[title].append(second)

    def make(speech: tuple[str, str, str, str], rng: np.random.Generator) -> dict | None:
        title, speaker, first, second = speech
        others = sorted({s for s in by_title[title] if s != second})
        if len(others) < N_OPTIONS - 1:
            return None
        picks = rng.choice(len(others), size=N_OPTIONS - 1, replace=False)
        options, answer = _shuffled([second] + [others[int(i)] for i in picks], rng)
        return {
            "title": title,
            "speaker": speaker,
            "line": first,
            "context": f"{speaker}.\n{first}\n",
            "options": options,
            "answer": answer,
        }

    return _draw(split, n, seed, prefix, make)


def _before(text: str, speaker: str, first: str, second: str) -> str | None:
    """The block just before the speech in ``text`` (its last lines), or None if none."""
    at = text.find(f"\n\n{speaker}.\n{first}\n{second}")
    if at < 0:
        return None
    block = text[:at].split("\n\n")[-1].split("\n")[-BEFORE_LINES:]
    return "\n".join(block) if any(line.strip() for line in block) else None


def speaker_items(split: Split, n: int, seed: int, prefix: str) -> list[dict]:
    """``n`` "who speaks this line" items from the speeches of ``split`` (rule above)."""
    texts = {doc["title"]: doc["text"] for doc in load_documents(split)}
    cast: dict[str, set[str]] = defaultdict(set)
    for title, speaker, _, _ in speeches(split):
        cast[title].add(speaker)

    def make(speech: tuple[str, str, str, str], rng: np.random.Generator) -> dict | None:
        title, speaker, first, second = speech
        others = sorted(cast[title] - {speaker})
        before = _before(texts[title], speaker, first, second)
        if len(others) < N_OPTIONS - 1 or before is None:
            return None
        picks = rng.choice(len(others), size=N_OPTIONS - 1, replace=False)
        names, answer = _shuffled([speaker] + [others[int(i)] for i in picks], rng)
        return {
            "title": title,
            "speaker": speaker,
            "line": first,
            "context": f"{before}\n\n",
            "options": [f"{s}.\n{first}" for s in names],
            "answer": answer,
        }

    return _draw(split, n, seed, prefix, make)


def arithmetic_items(seed: int) -> list[dict]:
    """Shots then test items ``{"id", "split", "prompt", "answer"}`` (rule above)."""
    side = MAX_OPERAND + 1
    rng = np.random.default_rng(seed)
    pairs = rng.choice(side * side, size=N_SHOTS + N_ARITHMETIC, replace=False)
    items = []
    for k, code in enumerate(pairs):
        a, b = divmod(int(code), side)
        split = "shots" if k < N_SHOTS else "test"
        number = k if k < N_SHOTS else k - N_SHOTS
        items.append(
            {
                "id": f"{split}-{number:04d}",
                "split": split,
                "prompt": f"{a} + {b} =",
                "answer": str(a + b),
            }
        )
    return items


def build() -> dict[str, str]:
    """Every set's file name and its exact text (one JSON object per line)."""
    sets = {
        "next_line": (
            next_line_items("train", N_SHOTS, SEEDS["next_line"], "shots")
            + next_line_items("valid", N_TEST, SEEDS["next_line"], "test")
        ),
        "speaker": (
            speaker_items("train", N_SHOTS, SEEDS["speaker"], "shots")
            + speaker_items("valid", N_TEST, SEEDS["speaker"], "test")
        ),
        "arithmetic": arithmetic_items(SEEDS["arithmetic"]),
    }
    return {
        f"{name}.jsonl": "".join(
            json.dumps(item, sort_keys=True, ensure_ascii=True) + "\n" for item in items
        )
        for name, items in sets.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare with the committed files instead of writing them",
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    stale = []
    for name, text in build().items():
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)  # atomic: a kill leaves the old file
        print(f"{path}: {text.count(chr(10))} items, {len(text.encode()):,} bytes")
    if stale:
        print(f"out of date: {stale}; run python data/build_eval.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
