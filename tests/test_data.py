"""The Shakespeare corpus: committed file, reader API and the build script's rules."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma2_lite import data
from gemma2_lite.profile import data_path


def _build_module() -> ModuleType:
    path = Path(data_path("build_corpus.py"))
    spec = importlib.util.spec_from_file_location("build_corpus", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _build_module()


def test_corpus_file_is_committed_and_small() -> None:
    path = data.corpus_path()
    assert path == Path(data_path("shakespeare.jsonl"))
    assert path.is_file()
    assert 4_000_000 < path.stat().st_size < 6_000_000


def test_documents_per_split() -> None:
    train = data.load_documents("train")
    valid = data.load_documents("valid")
    assert len(train) == len(valid) == 42
    assert [d["source"] for d in train] == sorted(d["source"] for d in train)
    assert [d["source"] for d in train] == [d["source"] for d in valid]
    assert len({d["source"] for d in train}) == 42
    titles = {d["title"] for d in train}
    assert {"Hamlet", "Macbeth", "King Lear", "Sonnets", "The Tempest"} <= titles
    for doc in train + valid:
        assert set(doc) == {"title", "source", "split", "text"}
        assert all(isinstance(v, str) and v for v in doc.values())
    assert all(d["split"] == "train" for d in train) and all(d["split"] == "valid" for d in valid)
    assert len(data.load_documents("all")) == 84
    hamlet = next(d for d in train if d["title"] == "Hamlet")
    assert hamlet["text"].startswith("HAMLET, PRINCE OF DENMARK\n\nby William Shakespeare\n")


def test_text_is_clean() -> None:
    for doc in data.load_documents("all"):
        text = doc["text"]
        assert text.isascii(), doc["source"]
        assert "\r" not in text and "\t" not in text
        assert "\n\n\n" not in text, f"{doc['source']} has a run of blank lines"
        assert not re.search(r"[ ]+\n", text), f"{doc['source']} has trailing spaces"
        assert not re.search(r"gutenberg|\betext\b", text, re.IGNORECASE), doc["source"]
        assert text.endswith("\n") and not text.startswith("\n")


def test_split_is_about_five_percent_at_blank_lines() -> None:
    train = data.load_documents("train")
    valid = data.load_documents("valid")
    total_valid = sum(len(d["text"]) for d in valid)
    total = total_valid + sum(len(d["text"]) for d in train)
    assert 0.04 < total_valid / total < 0.07
    for t, v in zip(train, valid):
        whole = t["text"] + v["text"]
        assert t["text"].endswith("\n\n"), t["source"]
        # the committed split is exactly what the build rules give for the whole document
        assert build.split_document(whole) == (t["text"], v["text"])
        assert build.clean_text(whole) == whole  # cleaning is idempotent: already clean


def test_load_text_joins_documents() -> None:
    docs = data.load_documents("valid")
    text = data.load_text("valid")
    assert text == "\n".join(d["text"] for d in docs)
    assert data.load_text("valid", separator="") == "".join(d["text"] for d in docs)
    assert docs[0]["text"] in text and docs[-1]["text"] in text


def test_load_documents_returns_copies() -> None:
    first = data.load_documents("valid")
    first[0]["text"] = "changed"
    assert data.load_documents("valid")[0]["text"] != "changed"


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split must be one of"):
        data.load_documents("test")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="build_corpus"):
        data.load_documents("train", path=tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"title": "x", "split": "train", "text": "y"}) + "\n")
    with pytest.raises(ValueError, match="lacks field"):
        data.load_documents("train", path=bad)
    bad.write_text(json.dumps({"title": "x", "source": "s", "split": "dev", "text": "y"}) + "\n")
    with pytest.raises(ValueError, match="split 'dev'"):
        data.load_documents("train", path=bad)


def test_a_bad_jsonl_line_is_named_by_file_and_line(tmp_path: Path) -> None:
    good = json.dumps({"title": "x", "source": "s", "split": "train", "text": "y"})
    bad = tmp_path / "bad.jsonl"
    for line, message in (
        ('{"title": "x", oops}', r"not valid JSON \(Expecting property name"),
        ("[1, 2]", "a line must be a JSON object"),
        ('"title source split text"', "a line must be a JSON object"),
        (good.replace('"y"', "7"), r"field\(s\) \['text'\] must be strings"),
    ):
        bad.write_text(f"{good}\n\n{line}\n{good}\n")  # the bad line is line 3
        with pytest.raises(ValueError, match=f"bad.jsonl:3: {message}"):
            data.load_documents("train", path=bad)
    bad.write_bytes(good.encode() + b"\n" + good.encode().replace(b"y", b"\xff") + b"\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not UTF-8 text \(byte 58 of the line\)"):
        data.load_documents("all", path=bad)


def test_clean_text_rules() -> None:
    raw = (
        "\r\n\r\nTITLE  \r\n\r\n\r\n\r\nThe Project Gutenberg EBook of X\n"
        "\tIndented line\t \nline two   \rline three\n\n\n\n"
    )
    assert build.clean_text(raw) == "TITLE\n\n    Indented line\nline two\nline three\n"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="ab \n", max_size=30), min_size=1, max_size=30))
def test_split_document_partitions_text(paragraphs: list[str]) -> None:
    text = build.clean_text("\n\n".join(p or "x" for p in paragraphs) + "\nend")
    if text.count("\n") == 1:  # one line (cleaning removed the rest): nothing to cut at
        with pytest.raises(ValueError, match="no interior line break"):
            build.split_document(text)
        return
    train, valid = build.split_document(text)
    assert train + valid == text
    assert train and valid
    assert train.endswith("\n")
    late_blank = text.find("\n\n", int(len(text) * 0.95))
    if 0 <= late_blank < len(text) - 2:  # the normal case: cut at the first late blank line
        assert len(train) == late_blank + 2


def test_split_document_rejects_one_line() -> None:
    with pytest.raises(ValueError, match="no interior line break"):
        build.split_document("just one line\n")
    with pytest.raises(ValueError, match="valid_fraction"):
        build.split_document("a\nb\n", valid_fraction=1.5)


def test_build_records_is_deterministic_and_uses_metadata() -> None:
    files = {
        "metadata.txt": "[b_play_gut]\ntitle = The B Play\n\n[a_poem_gut]\ntitle = A Poem\n",
        "b_play_gut.txt": "B PLAY\r\n\r\n" + "".join(f"LINE {i}.\r\n\r\n" for i in range(40)),
        "a_poem_gut.txt": "A POEM\n\n" + "".join(f"verse {i}  \n\n\n" for i in range(40)),
        "b_play_gut_f.txt": "folio text is ignored",
    }
    records = build.build_records(files)
    assert records == build.build_records(dict(reversed(list(files.items()))))
    assert [(r["source"], r["split"], r["title"]) for r in records] == [
        ("a_poem_gut", "train", "A Poem"),
        ("a_poem_gut", "valid", "A Poem"),
        ("b_play_gut", "train", "The B Play"),
        ("b_play_gut", "valid", "The B Play"),
    ]
    assert records[2]["text"] + records[3]["text"] == build.clean_text(files["b_play_gut.txt"])
    assert records[3]["text"].startswith("LINE ")
    with pytest.raises(ValueError, match="metadata.txt"):
        build.build_records({"x_gut.txt": "text"})
