"""Gemma's tokenizer: SentencePiece BPE with Gemma's choices, trained small or loaded real.

Gemma's tokenizer (Gemma 1 and 2 reports) is a SentencePiece model with 256000 pieces that
splits digits, keeps whitespace exactly, and falls back to UTF-8 bytes for anything it has no
piece for, so *every* string encodes and decodes back unchanged. The special pieces are::

    <pad> 0   <eos> 1   <bos> 2   <unk> 3   <mask> 4   <start_of_turn> 106   <end_of_turn> 107

The book's small tokenizer (``gemma2_lite/assets/tokenizer.model``, shipped with the package;
4096 pieces, trained on the Shakespeare corpus) uses the same choices and the same piece names,
with ``<mask>``, ``<start_of_turn>`` and ``<end_of_turn>`` right after ``<unk>`` (ids 4, 5, 6),
then the 256 byte pieces ``<0x00>``..``<0xFF>`` (ids 7..262), then the learned merges.
:class:`Tokenizer` loads either file; code must use the id properties (``tok.end_of_turn_id``),
never the numbers.

Special pieces written in text
------------------------------
``<start_of_turn>``, ``<end_of_turn>`` and ``<mask>`` are *user-defined* pieces: the encoder
matches them inside ordinary text, so ``encode("<start_of_turn>")`` is that single id (this is
how the chat format is tokenized, and how the real Gemma tokenizer behaves). ``<bos>``,
``<eos>`` and ``<pad>`` are *control* pieces: they are never matched in text, so a literal
``"<bos>"`` typed by a user encodes as ordinary characters (``<``, ``bos``, ``>``) and can never
inject a real BOS; it still decodes back to the same characters. Control ids themselves decode
to the empty string (``decode([bos_id]) == ""``), so ``decode(encode(s, add_bos=True)) == s``.

Round trip
----------
``decode(encode(s)) == s`` for every string that is valid Unicode (lone surrogates such as
``"\\ud800"`` cannot be written as UTF-8 and raise :class:`ValueError`). One wrinkle needs code
here: SentencePiece uses U+2581 LOWER ONE EIGHTH BLOCK (``▁``) as its visible space, so a literal
``▁`` in the input would come back as a space. :meth:`Tokenizer.encode` therefore encodes every
literal ``▁`` as its three UTF-8 byte pieces (``<0xE2><0x96><0x81>``), which decode to ``▁``.

Reproduce ``gemma2_lite/assets/tokenizer.model`` (byte-for-byte; training is single-threaded
and reads no file paths into the model)::

    python -m gemma2_lite.book.tokenizer train --out retrained.model   # then compare the bytes
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from gemma2_lite import paths
from gemma2_lite.checks import check_int, check_regular_file, check_token_ids

__all__ = [
    "Tokenizer",
    "train_tokenizer",
    "gemma_trainer_options",
    "SPECIAL_PIECES",
    "DEFAULT_MODEL_FILE",
    "default_tokenizer",
]

DEFAULT_MODEL_FILE = "tokenizer.model"
#: Control pieces (never matched in text) and their fixed ids, as in Gemma.
SPECIAL_PIECES = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
#: User-defined pieces (matched in text as one token), placed right after ``<unk>``.
USER_DEFINED_PIECES = ("<mask>", "<start_of_turn>", "<end_of_turn>")
#: Runs of 1..8 newlines, user-defined (atomic) as in Gemma's vocabulary: a newline never merges
#: with the text around it, so ``"model\n"`` tokenizes the same whatever follows it.
NEWLINE_PIECES = tuple("\n" * k for k in range(1, 9))
_SPACE_SYMBOL = "\u2581"  # ▁, SentencePiece's visible space
# What Tokenizer.encode spells as byte pieces (a capturing group: re.split keeps the matches).
_LITERAL = re.compile(f"({re.escape(_SPACE_SYMBOL)})")
_LITERAL_AND_SPECIAL = re.compile(
    "(" + "|".join(re.escape(p) for p in (_SPACE_SYMBOL, *USER_DEFINED_PIECES)) + ")"
)
# SentencePiece skips training "sentences" longer than this many bytes; we chunk below it.
_MAX_SENTENCE_BYTES = 8192
_CHUNK_CHARS = 2000


def gemma_trainer_options(vocab_size: int = 4096) -> dict[str, Any]:
    """The SentencePiece trainer settings that reproduce Gemma's tokenizer choices.

    BPE; byte fallback; digits split into single-digit pieces; identity normalisation (no NFKC),
    whitespace kept exactly (no dummy prefix, no collapsing of runs, whitespace-only pieces
    allowed); every character seen in training kept (``character_coverage=1.0``); Gemma's
    special-id layout. ``num_threads=1`` makes training deterministic.
    """
    return dict(
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=[*USER_DEFINED_PIECES, *NEWLINE_PIECES],
        max_sentence_length=_MAX_SENTENCE_BYTES,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )


def _chunks(text: str, size: int = _CHUNK_CHARS) -> Iterator[str]:
    """Training "sentences": runs of whole lines (newlines kept) of about ``size`` characters.

    SentencePiece treats each input sentence as a unit and never sees a newline in a file's
    lines; feeding multi-line chunks lets it learn ``"\\n"`` pieces as Gemma's vocabulary has.
    """
    start = 0
    while start < len(text):
        end = start + size
        if end < len(text):
            newline = text.find("\n", end)
            end = len(text) if newline < 0 else newline + 1
        chunk = text[start:end]
        while len(chunk.encode("utf-8")) > _MAX_SENTENCE_BYTES:  # very long line: hard cut
            chunk = chunk[: len(chunk) // 2]
        start += len(chunk)
        yield chunk


def train_tokenizer(
    texts_or_path: Iterable[str] | str | os.PathLike[str],
    model_prefix: str | os.PathLike[str] | None,
    vocab_size: int = 4096,
    **overrides: object,
) -> Tokenizer:
    """Train a Gemma-style SentencePiece BPE tokenizer.

    Args:
      texts_or_path: documents (an iterable of strings; newlines inside are learned) or the
        path of a UTF-8 text file, read as one document.
      model_prefix: writes ``{model_prefix}.model``; ``None`` keeps the model in memory only.
      vocab_size: total pieces, including the 7 special and 256 byte pieces (> 263 + the
        number of distinct characters in the text).
      **overrides: any other ``sentencepiece.SentencePieceTrainer`` option, replacing
        :func:`gemma_trainer_options`'s value.

    Returns:
      The trained :class:`Tokenizer`. The model bytes depend only on the texts and options
      (not on paths or the machine's thread count).
    """
    check_int(vocab_size, "vocab_size", low=1)
    if isinstance(texts_or_path, (str, os.PathLike)):
        path = Path(texts_or_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"texts_or_path={str(texts_or_path)[:80]!r} is not a file; pass a path to a UTF-8 "
                "text file or a list of strings"
            )
        texts: Iterable[str] = [path.read_text(encoding="utf-8")]
    else:
        texts = texts_or_path
    sentences: list[str] = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts_or_path[{i}] is {type(text).__name__}; expected str")
        sentences.extend(_chunks(text))
    if not sentences:
        raise ValueError("no training text: texts_or_path is empty")
    options = gemma_trainer_options(vocab_size)
    options.update(overrides)
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=writer, **options
        )
    except RuntimeError as exc:
        raise ValueError(f"SentencePiece training failed (vocab_size={vocab_size}): {exc}") from exc
    model = writer.getvalue()
    if model_prefix is not None:
        Path(f"{model_prefix}.model").write_bytes(model)
    return Tokenizer(model_proto=model)


class Tokenizer:
    """A Gemma-style SentencePiece tokenizer (the book's 4096-piece one or the real 256000 one).

    ``Tokenizer(path)`` loads a ``.model`` file; ``Tokenizer(model_proto=bytes)`` loads bytes.
    Ids are Python ``int``s; sequences are ``list[int]``.
    """

    def __init__(
        self, path: str | os.PathLike[str] | None = None, *, model_proto: bytes | None = None
    ) -> None:
        if (path is None) == (model_proto is None):
            raise ValueError("give exactly one of path (a .model file) or model_proto (its bytes)")
        where = "model_proto"
        if path is not None:
            file = Path(path)
            if not file.exists():
                raise FileNotFoundError(
                    f"tokenizer model {file} not found; the book's own is "
                    f"{paths.tokenizer_file()} (gemma2_lite.tokenizer.default_tokenizer())"
                )
            check_regular_file(file, "tokenizer model")  # a FIFO would hang read_bytes
            model_proto = file.read_bytes()
            where = f"tokenizer model {file}"
        self.path = None if path is None else str(path)
        self._proto = bytes(model_proto)  # type: ignore[arg-type]
        try:
            if not self._proto:
                raise RuntimeError("it is empty")
            self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        except RuntimeError as exc:  # sentencepiece's only complaint: the protobuf won't parse
            reason = str(exc) if str(exc) == "it is empty" else "it does not parse"
            raise ValueError(
                f"{where} is not a SentencePiece model ({reason}); expected a "
                ".model file such as gemma2_lite/assets/tokenizer.model"
            ) from None
        for piece, expected in SPECIAL_PIECES.items():
            got = self._sp.piece_to_id(piece)
            if got != expected:
                raise ValueError(
                    f"{piece} has id {got}, expected {expected}: this is not a "
                    "Gemma-layout tokenizer (pad 0, eos 1, bos 2, unk 3)"
                )
        for piece in USER_DEFINED_PIECES:
            if self._sp.id_to_piece(self._sp.piece_to_id(piece)) != piece:
                raise ValueError(
                    f"the model has no {piece} piece; a Gemma tokenizer needs {USER_DEFINED_PIECES}"
                )
        byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
        self._byte_ids = [int(self._sp.piece_to_id(p)) for p in byte_pieces]
        if any(self._sp.id_to_piece(i) != p for i, p in zip(self._byte_ids, byte_pieces)):
            raise ValueError(
                "the model has no byte-fallback pieces <0x00>..<0xFF>; "
                "train it with byte_fallback=True"
            )

    # ----------------------------------------------------------------- ids
    @property
    def vocab_size(self) -> int:
        """V, the number of pieces (4096 for the book's model, 256000 for Gemma's)."""
        return int(self._sp.get_piece_size())

    @property
    def pad_id(self) -> int:
        return int(self._sp.pad_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def unk_id(self) -> int:
        return int(self._sp.unk_id())

    @property
    def mask_id(self) -> int:
        return int(self._sp.piece_to_id("<mask>"))

    @property
    def start_of_turn_id(self) -> int:
        return int(self._sp.piece_to_id("<start_of_turn>"))

    @property
    def end_of_turn_id(self) -> int:
        return int(self._sp.piece_to_id("<end_of_turn>"))

    @property
    def special_ids(self) -> dict[str, int]:
        """Every special piece and its id, e.g. ``{"<pad>": 0, ..., "<end_of_turn>": 6}``."""
        return {p: int(self._sp.piece_to_id(p)) for p in (*SPECIAL_PIECES, *USER_DEFINED_PIECES)}

    @property
    def model_proto(self) -> bytes:
        """The serialized SentencePiece model (what ``tokenizer.model`` holds)."""
        return self._proto

    @property
    def sp(self) -> spm.SentencePieceProcessor:
        """The underlying ``sentencepiece.SentencePieceProcessor``."""
        return self._sp

    def id_to_piece(self, token_id: int) -> str:
        """The piece string of one id, e.g. ``"▁the"`` or ``"<0x0A>"``."""
        self._check_id(token_id)
        return str(self._sp.id_to_piece(int(token_id)))

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece; raises ``KeyError`` when the vocabulary has no such piece."""
        token_id = int(self._sp.piece_to_id(piece))
        if token_id == self.unk_id and piece != "<unk>":
            raise KeyError(f"{piece!r} is not a piece of this tokenizer")
        return token_id

    def is_control(self, token_id: int) -> bool:
        """True for ``<pad>``, ``<eos>``, ``<bos>`` (never produced from text, decode to "")."""
        self._check_id(token_id)
        return bool(self._sp.is_control(int(token_id)))

    def is_byte(self, token_id: int) -> bool:
        """True for the 256 byte-fallback pieces ``<0x00>``..``<0xFF>``."""
        self._check_id(token_id)
        return bool(self._sp.is_byte(int(token_id)))

    def _check_id(self, token_id: int) -> None:
        if np.ndim(token_id) != 0:
            raise TypeError(f"token id must be one int, got {type(token_id).__name__}")
        check_token_ids(token_id, self.vocab_size, name="token id")

    # ------------------------------------------------------- encode/decode
    def encode(
        self, text: str, add_bos: bool = False, add_eos: bool = False, *, parse_special: bool = True
    ) -> list[int]:
        """Token ids of ``text`` (a ``list[int]``, length ≥ 0), optionally framed by bos/eos.

        ``<start_of_turn>``/``<end_of_turn>``/``<mask>`` in the text become their single ids
        (``parse_special=True``, the default, as Gemma's tokenizer does); with
        ``parse_special=False`` they are encoded as the plain characters they are (byte
        pieces), so untrusted text can never produce those ids, and still decode to the same
        text. ``<bos>``/``<eos>``/``<pad>`` written in the text are always ordinary characters.
        """
        if not isinstance(text, str):
            raise TypeError(
                f"encode expects a str, got {type(text).__name__}"
                + ("; encode each text of a list on its own" if isinstance(text, list) else "")
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"text is not valid Unicode (it has a lone surrogate at index "
                f"{exc.start}: {text[exc.start]!r}); it cannot be written as UTF-8"
            ) from None
        ids: list[int] = [self.bos_id] if add_bos else []
        # Strings that must come back as written are cut out and spelled as UTF-8 byte pieces:
        # always a literal "▁" (else it decodes as a space), and with parse_special=False the
        # special pieces (else they become control ids). The text between is encoded normally.
        literal = _LITERAL if parse_special else _LITERAL_AND_SPECIAL
        for i, part in enumerate(literal.split(text)):
            if i % 2:
                ids.extend(self._byte_ids[b] for b in part.encode("utf-8"))
            elif part:
                ids.extend(int(t) for t in self._sp.encode(part, out_type=int))
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of a sequence of ids (control ids such as ``<bos>`` decode to "").

        Accepts a list of ints or a 1-D numpy/JAX integer array.
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = list(ids)
        for i, t in enumerate(ids):
            if isinstance(t, list):
                raise TypeError(
                    f"decode expects a flat sequence of ids; element {i} is a list "
                    "(decode each row separately)"
                )
        check_token_ids(ids, self.vocab_size, name="ids")
        return str(self._sp.decode([int(t) for t in ids]))

    def pieces(self, text: str) -> list[str]:
        """The piece strings :meth:`encode` produces for ``text`` (for inspection)."""
        return [self.id_to_piece(i) for i in self.encode(text)]

    # -------------------------------------------------------------- misc
    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        where = f"path={paths.shown(self.path)!r}, " if self.path else ""
        sha = hashlib.sha256(self._proto).hexdigest()[:12]
        return (
            f"Tokenizer({where}vocab_size={self.vocab_size}, pad={self.pad_id}, "
            f"eos={self.eos_id}, bos={self.bos_id}, unk={self.unk_id}, mask={self.mask_id}, "
            f"start_of_turn={self.start_of_turn_id}, end_of_turn={self.end_of_turn_id}, "
            f"sha256={sha})"
        )


def default_tokenizer() -> Tokenizer:
    """The book's trained tokenizer (vocab 4096), shipped with the package
    (:func:`gemma2_lite.paths.tokenizer_file`)."""
    return Tokenizer(paths.require(paths.tokenizer_file()))
