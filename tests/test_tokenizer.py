"""The Gemma-style tokenizer: settings, special ids, exact round trip, reproducible training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from gemma2_lite import paths
from gemma2_lite.config import get_config
from gemma2_lite.data import load_documents
from gemma2_lite.tokenizer import Tokenizer, default_tokenizer, train_tokenizer

TOK = default_tokenizer()
SPECIAL_STRINGS = [
    "<bos>",
    "<eos>",
    "<pad>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_turn",
    "end_of_turn>",
    "<<bos>>",
    "▁",
    "▁▁",
]


@pytest.fixture(scope="module")
def small_sample() -> list[str]:
    """About 150 KB of the train split (three documents) for quick training runs."""
    return [d["text"][:50_000] for d in load_documents("train")[:3]]


def _proto(tok: Tokenizer) -> model_pb2.ModelProto:
    proto = model_pb2.ModelProto()
    proto.ParseFromString(tok.model_proto)
    return proto


# ------------------------------------------------------------------ layout and settings
def test_committed_model_matches_tiny_config() -> None:
    assert paths.tokenizer_file().is_file()
    assert TOK.path == str(paths.tokenizer_file())
    assert TOK.vocab_size == len(TOK) == 4096 == get_config("tiny").vocab_size


def test_special_id_layout() -> None:
    assert (TOK.pad_id, TOK.eos_id, TOK.bos_id, TOK.unk_id) == (0, 1, 2, 3)
    assert (TOK.mask_id, TOK.start_of_turn_id, TOK.end_of_turn_id) == (4, 5, 6)
    assert [TOK.id_to_piece(i) for i in range(7)] == [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<mask>",
        "<start_of_turn>",
        "<end_of_turn>",
    ]
    assert TOK.special_ids["<end_of_turn>"] == 6
    assert all(TOK.is_control(i) for i in (0, 1, 2)) and not TOK.is_control(5)
    # the 256 byte-fallback pieces, in byte order
    byte_ids = [i for i in range(TOK.vocab_size) if TOK.is_byte(i)]
    assert len(byte_ids) == 256
    assert [TOK.id_to_piece(i) for i in byte_ids] == [f"<0x{b:02X}>" for b in range(256)]
    assert byte_ids == list(range(byte_ids[0], byte_ids[0] + 256))


def test_gemma_trainer_settings_are_in_the_model() -> None:
    proto = _proto(TOK)
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    assert norm.name == "identity" and norm.precompiled_charsmap == b""
    assert not norm.add_dummy_prefix and not norm.remove_extra_whitespaces
    assert trainer.model_type == model_pb2.TrainerSpec.BPE
    assert trainer.byte_fallback and trainer.split_digits and trainer.allow_whitespace_only_pieces
    assert trainer.character_coverage == 1.0
    assert (trainer.pad_piece, trainer.eos_piece, trainer.bos_piece) == ("<pad>", "<eos>", "<bos>")
    assert not trainer.input and not trainer.model_prefix  # no paths baked into the bytes


def test_repr_names_the_ids() -> None:
    text = repr(TOK)
    for part in (
        "vocab_size=4096",
        "bos=2",
        "eos=1",
        "start_of_turn=5",
        "end_of_turn=6",
        "tokenizer.model",
    ):
        assert part in text


# ------------------------------------------------------------------ Gemma's choices in action
def test_digits_are_split() -> None:
    assert TOK.pieces("2024 and 1564") == ["2", "0", "2", "4", "▁and", "▁", "1", "5", "6", "4"]
    normal = [
        p.piece for p in _proto(TOK).pieces if p.type == model_pb2.ModelProto.SentencePiece.NORMAL
    ]
    assert len(normal) > 3000  # (byte pieces like <0x30> and specials are not text pieces)
    for piece in normal:
        if any(c.isdigit() for c in piece):
            assert len(piece) == 1, f"piece {piece!r} merges a digit with something else"


def test_whitespace_is_kept_exactly() -> None:
    for text in ["  two leading", "trailing   ", "a\n\n\n\nb", "tab\there", " ", "\n"]:
        assert TOK.decode(TOK.encode(text)) == text
    assert TOK.pieces("a  b") == ["a", "▁▁", "b"] or TOK.pieces("a  b") == ["a", "▁", "▁b"]
    assert TOK.encode("hello") != TOK.encode(" hello")  # no dummy prefix: the space matters


def test_byte_fallback_for_unseen_characters() -> None:
    emoji = "🙂"  # 4 UTF-8 bytes, never seen in Shakespeare
    assert TOK.pieces(emoji) == [f"<0x{b:02X}>" for b in emoji.encode("utf-8")]
    ids = TOK.encode("日本語 é 🙂")
    assert TOK.unk_id not in ids
    assert TOK.decode(ids) == "日本語 é 🙂"


def test_newline_runs_are_atomic_pieces() -> None:
    for k in range(1, 9):
        assert TOK.encode("\n" * k) == [TOK.piece_to_id("\n" * k)]
    # a newline never merges with what follows, so a prefix ending in "\n" keeps its tokens
    prefix = "<start_of_turn>model\n"
    for follow in ["'Tis", "[Exit]", "Hello", ".", "\n"]:
        if not follow.startswith("\n"):
            assert TOK.encode(prefix + follow)[: len(TOK.encode(prefix))] == TOK.encode(prefix)


def test_special_strings_in_text() -> None:
    sot, eot = TOK.start_of_turn_id, TOK.end_of_turn_id
    assert TOK.encode("<start_of_turn>") == [sot]
    assert TOK.encode("<end_of_turn>") == [eot]
    assert TOK.encode("<mask>") == [TOK.mask_id]
    ids = TOK.encode("<start_of_turn>user\nhi<end_of_turn>\n")
    assert ids[0] == sot and eot in ids and ids.count(sot) == 1
    # control pieces are never matched in text: a typed "<bos>" cannot inject a BOS
    for literal in ["<bos>", "<eos>", "<pad>", "<unk>"]:
        ids = TOK.encode(literal)
        assert len(ids) > 1 and not set(ids) & {0, 1, 2, 3}
        assert TOK.decode(ids) == literal


def test_bos_eos_and_control_decoding() -> None:
    ids = TOK.encode("Hark!", add_bos=True, add_eos=True)
    assert ids[0] == TOK.bos_id and ids[-1] == TOK.eos_id
    assert ids[1:-1] == TOK.encode("Hark!")
    assert TOK.decode(ids) == "Hark!"  # control ids decode to ""
    assert TOK.encode("") == [] and TOK.encode("", add_bos=True) == [TOK.bos_id]
    assert TOK.decode(np.array(ids, dtype=np.int32)) == "Hark!"


def test_space_symbol_round_trips() -> None:
    # SentencePiece's own visible space; a plain SentencePiece model turns it into " "
    text = "a▁b ▁"
    assert TOK.sp.decode(TOK.sp.encode(text)) != text
    assert TOK.decode(TOK.encode(text)) == text


def test_piece_lookups() -> None:
    assert TOK.piece_to_id("<start_of_turn>") == TOK.start_of_turn_id
    assert TOK.id_to_piece(TOK.piece_to_id("▁the")) == "▁the"
    assert TOK.piece_to_id("<unk>") == 3
    with pytest.raises(KeyError, match="not a piece"):
        TOK.piece_to_id("definitely-not-a-piece")
    with pytest.raises(ValueError, match="out of range"):
        TOK.id_to_piece(4096)
    with pytest.raises(ValueError, match="out of range"):
        TOK.decode([1, -1])
    with pytest.raises(TypeError, match="flat sequence"):
        TOK.decode([[1, 2]])  # type: ignore[list-item]


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError, match="lone surrogate"):
        TOK.encode("ok \ud800 no")
    with pytest.raises(TypeError, match="expects a str"):
        TOK.encode(["a", "b"])  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer("/nonexistent/tokenizer.model")
    with pytest.raises(ValueError, match="exactly one"):
        Tokenizer()


# ------------------------------------------------------------------ round trip (hypothesis)
_pieces = st.sampled_from(
    SPECIAL_STRINGS
    + [
        "🙂",
        "👩‍👩‍👧",
        "日本語",
        "한국어",
        "\x00",
        "\x1b",
        "\x7f",
        "\u200b",
        "\ufeff",
        "\r\n",
        "\t",
        "   ",
        "\n\n\n\n\n\n\n\n\n\n",
        "0123456789",
        "١٢٣",
        "é",
        "e\u0301",
        "ﬁ",
        "Ａ",
        "\U0010ffff",
        " To be, or not to be",
        "KING.\n",
    ]
)
_mixed = st.lists(st.one_of(_pieces, st.text(max_size=8)), max_size=12).map("".join)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(), _mixed), st.booleans(), st.booleans())
def test_round_trip_any_text(text: str, add_bos: bool, add_eos: bool) -> None:
    ids = TOK.encode(text, add_bos=add_bos, add_eos=add_eos)
    assert all(isinstance(i, int) and 0 <= i < TOK.vocab_size for i in ids)
    assert TOK.unk_id not in ids
    assert TOK.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(_mixed, _mixed)
def test_special_pieces_are_boundaries(left: str, right: str) -> None:
    """Text on either side of <end_of_turn> tokenizes independently (the chat code relies on it)."""
    joined = TOK.encode(left + "<end_of_turn>" + right)
    assert joined == TOK.encode(left) + [TOK.end_of_turn_id] + TOK.encode(right)


# ------------------------------------------------------------------ training
def test_training_is_deterministic(small_sample: list[str], tmp_path: Path) -> None:
    a = train_tokenizer(small_sample, tmp_path / "a", vocab_size=600)
    b = train_tokenizer(small_sample, tmp_path / "sub_b", vocab_size=600)
    assert (tmp_path / "a.model").read_bytes() == a.model_proto
    assert a.model_proto == b.model_proto  # independent of the output path
    assert a.vocab_size == 600
    assert (a.start_of_turn_id, a.end_of_turn_id) == (5, 6)
    text = small_sample[0][:2000]
    assert a.decode(a.encode(text)) == text
    # training from a file gives the same model as from the same single string
    file = tmp_path / "corpus.txt"
    file.write_text(small_sample[0], encoding="utf-8")
    assert (
        train_tokenizer(file, None, vocab_size=600).model_proto
        == train_tokenizer([small_sample[0]], None, vocab_size=600).model_proto
    )


def test_committed_model_is_reproducible() -> None:
    """Retraining on the shipped corpus gives the shipped tokenizer.model byte for byte."""
    texts = [d["text"] for d in load_documents("train")]
    assert train_tokenizer(texts, None, vocab_size=4096).model_proto == TOK.model_proto


def test_bigger_vocab_compresses_more(small_sample: list[str]) -> None:
    text = small_sample[1][:20_000]
    small = train_tokenizer(small_sample, None, vocab_size=400)
    large = train_tokenizer(small_sample, None, vocab_size=1200)
    assert len(large.encode(text)) < len(small.encode(text)) < len(text)


def test_training_errors(small_sample: list[str]) -> None:
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer([], None)
    with pytest.raises(TypeError, match=r"texts_or_path\[1\] is bytes"):
        train_tokenizer(["ok", b"bytes"], None)  # type: ignore[list-item]
    for bad in (0, True, 4096.0):
        with pytest.raises(ValueError, match=rf"vocab_size must be a positive integer, got {bad}"):
            train_tokenizer(small_sample, None, vocab_size=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="training failed"):
        train_tokenizer(small_sample, None, vocab_size=100)  # smaller than specials + bytes
    with pytest.raises(FileNotFoundError, match="not a file"):
        train_tokenizer("/nonexistent/corpus.txt", None)


def test_loads_a_gemma_layout_model(small_sample: list[str]) -> None:
    """The real Gemma model puts <start_of_turn>/<end_of_turn> at 106/107; ids are looked up."""
    filler = ["[@BOS@]"] + [f"<unused{i}>" for i in range(100)]
    tok = train_tokenizer(
        small_sample,
        None,
        vocab_size=800,
        user_defined_symbols=["<mask>", *filler, "<start_of_turn>", "<end_of_turn>"],
    )
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (106, 107)
    assert tok.encode("<start_of_turn>user\n")[0] == 106


def test_rejects_a_non_gemma_layout(small_sample: list[str]) -> None:
    import io

    writer = io.BytesIO()
    lines = [line for text in small_sample for line in text.splitlines() if line]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=writer,
        vocab_size=400,
        model_type="bpe",
        minloglevel=2,
    )
    with pytest.raises(ValueError, match="not a Gemma-layout tokenizer"):
        Tokenizer(model_proto=writer.getvalue())


def test_repr_names_the_file_relative_to_the_package():
    """The same text installed or in a checkout, on every machine."""
    text = repr(default_tokenizer())
    assert "path='gemma2_lite/assets/tokenizer.model'" in text and "vocab_size=4096" in text, text


def test_missing_book_tokenizer_says_how_to_restore_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(paths, "ASSETS", tmp_path)
    with pytest.raises(
        paths.MissingDataError,
        match=r"the book's tokenizer is missing: .*"
        r"tokenizer.model is not there. It ships with gemma2-lite; restore it",
    ):
        default_tokenizer()


# ------------------------------------------------------------------ the command line
def test_cli_encode_and_its_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gemma2_lite.book.tokenizer import main

    assert main(["encode", "ROMEO:"]) == 0
    ids = TOK.encode("ROMEO:")
    assert capsys.readouterr().out == f"{ids}\n{[TOK.id_to_piece(i) for i in ids]}\n"
    # one line on stderr, status 2, nothing trained or written
    missing = tmp_path / "no" / "t.model"
    for args, message in [
        (["encode", "ab\udcff"], "TEXT is not valid UTF-8 text (byte 0xff at character 2)"),
        (
            ["train", "--out", str(missing)],
            f"--out {missing}: no folder {missing.parent} to write in",
        ),
        (["train", "--out", str(tmp_path)], f"--out {tmp_path}: is a folder; name a file"),
    ]:
        assert main(args) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
    for args, message in [
        (["train", "--vocab-size", "0"], "must be at least 1, got 0"),
        (["train", "--vocab-size", "many"], "invalid whole number: 'many'"),
        (["nonsense"], "invalid choice: 'nonsense'"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []
