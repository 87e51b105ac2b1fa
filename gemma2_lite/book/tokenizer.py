"""Retrain the book's tokenizer, or show how it splits a text.

    python -m gemma2_lite.book.tokenizer train      # -> gemma2_lite/assets/tokenizer.model
    python -m gemma2_lite.book.tokenizer encode "ROMEO:"

``train`` reproduces the shipped ``tokenizer.model`` byte for byte (see
:mod:`gemma2_lite.tokenizer`). Errors follow :mod:`gemma2_lite.cmdline`'s policy.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Only the standard library at the top: numpy and SentencePiece load inside run().
from gemma2_lite import paths
from gemma2_lite.cmdline import Parser, UsageError, positive_int, run, utf8_argument

__all__ = ["main"]


def _train_default(out: Path, vocab_size: int) -> str:
    from gemma2_lite.data import load_documents
    from gemma2_lite.tokenizer import train_tokenizer

    texts = [doc["text"] for doc in load_documents("train")]
    tok = train_tokenizer(texts, None, vocab_size=vocab_size)
    out.write_bytes(tok.model_proto)
    return repr(tok)


def _main(argv: list[str] | None) -> int:
    parser = Parser(
        prog="python -m gemma2_lite.book.tokenizer",
        description="Retrain the book's tokenizer, or show how it splits a text.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="train on the corpus's train split and write the "
        "model (default: the package's tokenizer.model)",
    )
    train.add_argument("--vocab-size", type=positive_int, default=4096)
    train.add_argument("--out", type=Path, default=paths.tokenizer_file())
    show = sub.add_parser("encode", help="print the pieces of a text (the book's tokenizer)")
    show.add_argument("text")
    args = parser.parse_args(argv)
    if args.command == "train":
        if args.out.is_dir() or not args.out.parent.is_dir():
            raise UsageError(
                f"--out {args.out}: "
                + (
                    "is a folder; name a file"
                    if args.out.is_dir()
                    else f"no folder {args.out.parent} to write in"
                )
            )
        print(f"wrote {args.out}: {_train_default(args.out, args.vocab_size)}")
        return 0
    from gemma2_lite.tokenizer import default_tokenizer

    tok = default_tokenizer()
    ids = tok.encode(utf8_argument(args.text, "TEXT"))
    print(ids)
    print([tok.id_to_piece(i) for i in ids])
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m gemma2_lite.book.tokenizer train`` rebuilds the book's tokenizer;
    ``encode TEXT`` shows its pieces. Returns the exit status."""
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
