"""Command line: generate text or chat with a Gemma 2 checkpoint.

    python -m gemma2_lite generate --prompt "ROMEO:" --max-new-tokens 60 --temperature 0.8
    python -m gemma2_lite chat                     # interactive; an empty line or Ctrl-D ends,
                                                   # /reset forgets the conversation
    python -m gemma2_lite chat --prompt "Hello"    # one turn, then exit

By default both use the book's own small model and its tokenizer, which ship with the package
(:func:`gemma2_lite.weights.book_model`), so they work installed anywhere, offline.
``--checkpoint DIR`` loads any Gemma 2 checkpoint in the Hugging Face layout (``config.json`` +
``*.safetensors``), with the ``tokenizer.model`` in that folder or ``--tokenizer FILE``.

Every command line of the package follows one policy (:mod:`gemma2_lite.cmdline`): a problem
the user can fix (a missing or malformed file, a bad option, a prompt past the context) is
one line on stderr with exit status 2, never a traceback; Ctrl-C ends with status 130 and a
closed output pipe (``... | head``) with status 141, both silently.
In the interactive chat a line that fails (e.g. the conversation outgrew the context) is
reported and the conversation is kept. User text in the chat never becomes a turn marker
(see :class:`gemma2_lite.chat.ChatSession`); ``generate`` tokenizes its prompt as written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, TextIO

# Only the standard library at the top: numpy and JAX load inside run(), where Ctrl-C is handled.
from gemma2_lite.cmdline import (
    Parser,
    UsageError,
    one_line,
    positive_int,
    read_stdin,
    run,
    utf8_argument,
)

__all__ = ["main", "build_parser"]

# The former name of the error this program prints (kept for code that catches it).
CliError = UsageError


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m gemma2_lite",
        description="Generate text or chat with a Gemma 2 checkpoint (the book's tiny model by "
        "default).",
        epilog=__doc__.split("\n\n", 2)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,chat}")
    for name, help_text in (
        ("generate", "continue a prompt, streaming the text as it is made"),
        ("chat", "talk to the model in Gemma's chat format"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--checkpoint",
            type=Path,
            default=None,
            metavar="DIR",
            help="Hugging Face-layout folder (config.json + *.safetensors); "
            "default: the book's small model, shipped with the package",
        )
        p.add_argument(
            "--tokenizer",
            type=Path,
            default=None,
            metavar="FILE",
            help="SentencePiece .model file; default: the checkpoint's own "
            "tokenizer.model, else the book's tokenizer",
        )
        p.add_argument(
            "--prompt",
            default=None,
            metavar="TEXT",
            help="the prompt (generate: default reads stdin; chat: one turn, then exit)",
        )
        p.add_argument(
            "--max-new-tokens",
            type=positive_int,
            default=64 if name == "generate" else 128,
            metavar="N",
            help="most tokens to generate (per reply for chat)",
        )
        p.add_argument(
            "--temperature",
            type=float,
            default=0.0 if name == "generate" else 0.7,
            metavar="T",
            help="0 = greedy; higher = more random",
        )
        p.add_argument(
            "--top-k",
            type=int,
            default=None,
            metavar="K",
            help="sample only among the K most likely tokens",
        )
        p.add_argument(
            "--top-p",
            type=float,
            default=None,
            metavar="P",
            help="sample only from the smallest set of tokens with probability >= P",
        )
        p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed")
        p.add_argument(
            "--quantize",
            choices=["int8"],
            default=None,
            help="store the weights as int8 (about half of bf16's memory)",
        )
    return parser


def _load(checkpoint: Path | None, tokenizer_file: Path | None) -> tuple[Any, Any]:
    """The model and tokenizer, or a UsageError that says how to get them."""
    if checkpoint is None and tokenizer_file is None:
        from gemma2_lite.weights import book_model

        return book_model(verbose=False)
    from gemma2_lite import paths

    if checkpoint is None:
        checkpoint = paths.require(paths.book_model_dir(), "config.json")
    elif not (checkpoint / "config.json").is_file():
        what = "does not exist" if not checkpoint.exists() else "has no config.json"
        raise UsageError(
            f"checkpoint {checkpoint} {what}: --checkpoint must be a Hugging "
            "Face-layout Gemma 2 folder (config.json + *.safetensors)"
        )
    if tokenizer_file is None:
        own = checkpoint / "tokenizer.model"
        tokenizer_file = own if own.is_file() else paths.require(paths.tokenizer_file())
    elif not tokenizer_file.exists():  # other kinds of non-file are named by Tokenizer itself
        raise UsageError(
            f"tokenizer {tokenizer_file} not found; pass --tokenizer FILE (a "
            "SentencePiece .model file), or leave it out for the checkpoint's own "
            "tokenizer.model or the book's"
        )
    from gemma2_lite.checkpoint import CheckpointError, load_hf
    from gemma2_lite.tokenizer import Tokenizer

    try:
        model = load_hf(checkpoint)
    except CheckpointError as e:
        raise UsageError(f"cannot load {checkpoint}: {e}") from e
    tokenizer = Tokenizer(tokenizer_file)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UsageError(
            f"the tokenizer has {tokenizer.vocab_size} pieces but the model only "
            f"{model.config.vocab_size} embedding rows: they do not belong together"
        )
    return model, tokenizer


class _Streamer:
    """Prints the text of one row as tokens arrive, in time linear in the tokens.

    Each step decodes only the tokens not yet printed, after an *anchor*: the last group of
    tokens printed (SentencePiece drops a piece's leading space at the start of a decode, so
    text is taken as ``decode(anchor + new)`` minus ``decode(anchor)``). Tokens are held back
    while they end in an incomplete UTF-8 sequence (a byte-fallback character spans several).
    """

    def __init__(self, tokenizer: Any, stop: set[int], out: TextIO) -> None:
        self.tokenizer, self.stop, self.out = tokenizer, stop, out
        self.ids: list[int] = []
        self.anchor: list[int] = []
        self.pending: list[int] = []

    def __call__(self, step: int, tokens: Any) -> None:
        token = int(tokens[0])
        if token < 0 or token in self.stop:
            return
        self.ids.append(token)
        self.pending.append(token)
        head = self.tokenizer.decode(self.anchor) if self.anchor else ""
        text = self.tokenizer.decode(self.anchor + self.pending)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            return
        if text.startswith(head):
            new = text[len(head) :]
        else:  # never seen; decode everything to stay right
            before = self.tokenizer.decode(self.ids[: len(self.ids) - len(self.pending)])
            new = self.tokenizer.decode(self.ids)[len(before) :]
        self.out.write(new)
        self.out.flush()
        self.anchor, self.pending = self.pending, []


def _generate(args: argparse.Namespace, model: Any, tokenizer: Any, out: TextIO) -> None:
    from gemma2_lite.sampler import generate

    prompt = (
        utf8_argument(args.prompt, "--prompt")
        if args.prompt is not None
        else read_stdin("prompt", "--prompt TEXT")
    )
    ids = tokenizer.encode(prompt, add_bos=True)
    stop = {tokenizer.eos_id}
    streamer = _Streamer(tokenizer, stop, out)
    out.write(prompt)
    out.flush()
    start = time.perf_counter()
    new = generate(
        model,
        [ids],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_tokens=sorted(stop),
        callback=streamer,
    )[0]
    seconds = time.perf_counter() - start
    out.write("\n")
    print(f"[{len(new)} tokens in {seconds:.2f} s, prompt {len(ids)} tokens]", file=sys.stderr)


def _chat(args: argparse.Namespace, model: Any, tokenizer: Any, out: TextIO) -> None:
    from gemma2_lite.chat import ChatSession

    session = ChatSession(
        model,
        tokenizer,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        max_context=model.config.max_seq_len,
    )
    if args.prompt is not None:
        out.write(session.send(utf8_argument(args.prompt, "--prompt")) + "\n")
        return
    out.write("Chat with the model (an empty line or Ctrl-D ends, /reset starts over).\n")
    while True:
        out.write("you> ")
        out.flush()
        if sys.stdin is None:
            raise UsageError(
                "stdin is closed, so there is no conversation to read; pass "
                "--prompt TEXT for one turn"
            )
        line = sys.stdin.readline()
        if not line.strip():
            break
        if line.strip() == "/reset":
            session.reset()
            out.write("[conversation forgotten]\n")
            continue
        try:
            reply = session.send(line)
        except ValueError as e:
            # e.g. the conversation outgrew the context: send() changed nothing, so the
            # conversation so far is kept; the user may try a shorter line or /reset.
            print(f"error: {one_line(e)} [conversation kept; /reset starts over]", file=sys.stderr)
            continue
        out.write(f"model> {reply}\n")


def _check_args(args: argparse.Namespace) -> None:
    """The options argparse cannot check, in the user's terms (before any model is loaded)."""
    from gemma2_lite.checks import TOP_K_LIMIT, check_sampling_settings, check_seed

    check_seed(args.seed, name="--seed")
    if args.top_k is not None and args.top_k > TOP_K_LIMIT:  # not an OverflowError later
        raise UsageError(
            f"--top-k {args.top_k} is larger than any vocabulary; leave it out to keep every token"
        )
    try:
        check_sampling_settings(args.temperature, args.top_k, args.top_p)
    except ValueError as exc:
        raise UsageError("--" + str(exc).replace("_", "-", 1)) from None


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    model, tokenizer = _load(args.checkpoint, args.tokenizer)
    if args.quantize:
        from gemma2_lite.quantize import quantize

        model = quantize(model, args.quantize)
    if args.command == "generate":
        _generate(args, model, tokenizer, sys.stdout)
    else:
        _chat(args, model, tokenizer, sys.stdout)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m gemma2_lite`` and the ``gemma2-lite`` script.

    Returns the exit code: 0; 2 with one line on stderr for a problem the user can fix; 130
    after Ctrl-C; 141 when the output pipe was closed (both without a message); 1 for a bug.
    """
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
