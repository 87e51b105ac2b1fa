"""Every command line's policy, written once: ``python -m gemma2_lite`` and the module programs
(``gemma2_lite.book.experiments``, ``gemma2_lite.book.tokenizer``,
``gemma2_lite.book.fixtures``).

* A problem the user can fix (a bad option, a missing or malformed file, an input the
  library refuses, a folder that cannot be written) is **one line on stderr**, starting with
  ``error:``, and **exit status 2**; never a traceback.
* **Ctrl-C** at any moment ends with status **130** and nothing but a line break, also while
  JAX is still being imported: :func:`arm` takes over SIGINT as soon as the package is
  imported by ``python -m``, before any heavy import, and :func:`run` turns the
  ``KeyboardInterrupt`` of the program itself into 130.
* A **closed output pipe** (``... | head``) ends quietly with status **141** (128 + SIGPIPE).
* **Nothing meant for stderr goes to stdout**: when the process starts with stderr (or
  stdout) closed, Python sets ``sys.stderr`` to ``None`` and ``print(..., file=sys.stderr)``
  would write to stdout; :func:`run` points the missing stream at ``os.devnull`` instead, and
  any closed standard file descriptor too, so a file opened later cannot become fd 2 and
  receive JAX's log lines.
* An unexpected exception (a bug) is one line naming its type and the status is 1;
  ``GEMMA2_LITE_DEBUG=1`` shows the traceback.

A program is written as ``def main(argv=None) -> int: return run(_main, argv)`` with its
argument parser a :class:`Parser` (``python -m`` then calls ``sys.exit(main())``). The module
needs only the standard library.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

__all__ = [
    "UsageError",
    "Parser",
    "run",
    "arm",
    "report",
    "one_line",
    "read_stdin",
    "utf8_argument",
    "positive_int",
    "non_negative_int",
    "EXIT_USAGE",
    "EXIT_INTERRUPTED",
    "EXIT_BROKEN_PIPE",
    "EXIT_BUG",
    "DEBUG_VAR",
]

EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE
DEBUG_VAR = "GEMMA2_LITE_DEBUG"

# What a bad input raises on its way through the library: checked values (ValueError and its
# children: ConfigError, CheckpointError, TokenIdError, UnicodeError), files (OSError), ids of
# the wrong type (TypeError, LookupError), a model whose logits are NaN (FloatingPointError),
# and the two a hostile input provokes in Python itself: a JSON file nested thousands deep
# (RecursionError) and a number too large for a C integer (OverflowError).
BAD_INPUT = (
    ValueError,
    TypeError,
    LookupError,
    OSError,
    FloatingPointError,
    RecursionError,
    OverflowError,
    EOFError,
)


class UsageError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line on stderr and exit status 2 (``SystemExit``,
    as argparse itself exits: ``--help`` is ``SystemExit(0)``)."""

    def error(self, message: str) -> NoReturn:
        report(f"{message} (see {self.prog} --help)")
        raise SystemExit(EXIT_USAGE)


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    return _whole(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number >= 0."""
    return _whole(text, 0)


def _whole(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid whole number: {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def one_line(error: BaseException) -> str:
    """The error's message on one line (multi-line reports joined with '; ')."""
    # (?<!\s): a run of blanks is matched from its start only; without it every position of a
    # long run of spaces began a scan to its end (quadratic: tests/test_bad_inputs.py).
    return re.sub(r"(?<!\s)\s*\n\s*", "; ", str(error).strip()) or type(error).__name__


def report(message: str) -> None:
    """Print ``error: message`` as one line on stderr (never on stdout)."""
    stream = sys.stderr
    if stream is not None:
        print(f"error: {message}", file=stream, flush=True)


def read_stdin(what: str, instead: str) -> str:
    """All of stdin as text, or a :class:`UsageError` when stdin is closed or not UTF-8.

    ``what`` names the text ("the prompt"), ``instead`` the option that gives it otherwise.
    """
    if sys.stdin is None:
        raise UsageError(f"stdin is closed, so there is no {what} to read; pass {instead}")
    try:
        return sys.stdin.read()
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"stdin is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
            f"offset {exc.start}); pass {what} as UTF-8 or with {instead}"
        ) from None


def utf8_argument(text: str, name: str) -> str:
    """``text`` (a command-line argument) after checking that it was valid UTF-8.

    Python keeps the bytes of an argument that is not UTF-8 as lone surrogates
    (``b"\\xff"`` becomes ``"\\udcff"``), which no text function can encode; this names the
    argument and the byte instead.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise UsageError(
            f"{name} is not valid UTF-8 text ({what} at character {exc.start})"
        ) from None
    return text


def _quit_silently(signum: int, frame: Any) -> None:
    """SIGINT before the program's own code runs (e.g. while JAX imports): status 130."""
    try:
        os.write(2, b"\n")
    except OSError:
        pass
    os._exit(EXIT_INTERRUPTED)


def _ensure_std_streams() -> None:
    """Open ``os.devnull`` on any closed standard descriptor (0, 1, 2) and stand it in for a
    missing ``sys.stdout`` / ``sys.stderr``, so neither output ever lands in the other or in a
    file opened later. ``sys.stdin`` stays ``None``: :func:`read_stdin` names that."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)
            if opened != fd:  # a lower descriptor was closed too: it took that one
                os.dup2(opened, fd)
                os.close(opened)
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))


def _quiet_library_logs() -> None:
    """Keep the libraries' own log records off stderr (unless ``GEMMA2_LITE_DEBUG``): Orbax
    logs, through absl, the full traceback of a failed write (a full disk) from its worker
    thread before the error reaches the program, which then reports it as its one line."""
    if not _debug():
        logging.getLogger("absl").setLevel(logging.CRITICAL + 1)


def _debug() -> bool:
    return os.environ.get(DEBUG_VAR, "").strip() not in ("", "0")


# True once arm() ran: this process is one of the package's programs (python -m ...), so it
# owns its standard streams.
_standalone = False


def _close_stderr() -> None:
    """After the program's one error line, send anything else for stderr to ``os.devnull``
    (a program run with ``python -m`` only): worker threads of the libraries (Orbax and
    tensorstore after a full disk) go on printing tracebacks while the process ends."""
    if not _standalone or _debug():
        return
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)


def _interrupt_or(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """An ``unraisablehook`` that ends the process with status 130 when the exception is a
    ``KeyboardInterrupt``: Ctrl-C landing in a garbage-collection callback (JAX has one) or
    a ``__del__`` is otherwise printed as "Exception ignored" and the program runs on."""

    def hook(unraisable: Any) -> None:
        if issubclass(unraisable.exc_type, KeyboardInterrupt):
            _quit_silently(signal.SIGINT, None)
        previous(unraisable)

    return hook


def arm() -> None:
    """Make Ctrl-C end the process quietly with status 130 until :func:`run` starts.

    Called by the package's ``__init__`` when Python runs one of its modules
    (``python -m gemma2_lite...``), before the module's imports (JAX takes seconds)."""
    global _standalone
    _standalone = True
    _ensure_std_streams()
    sys.unraisablehook = _interrupt_or(sys.unraisablehook)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _quit_silently)


def _stop_on_broken_pipe() -> int:
    # The reader went away: point stdout at /dev/null so the interpreter's final flush does
    # not complain about the pipe again.
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout not a real file (captured)
        pass
    return EXIT_BROKEN_PIPE


def run(body: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a program's ``body(argv)`` under the policy above; return its exit status.

    ``SystemExit`` passes through (argparse's ``--help`` and usage errors raise it, with one
    line on stderr for the latter)."""
    _ensure_std_streams()
    _quiet_library_logs()
    if signal.getsignal(signal.SIGINT) is _quit_silently:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        status = body(argv) or 0
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return status
    except KeyboardInterrupt:
        print(file=sys.stderr)  # end the half-written line, nothing else
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return _stop_on_broken_pipe()
    except (UsageError, *BAD_INPUT) as exc:
        report(
            one_line(exc)
            if not isinstance(exc, RecursionError)
            else "the input is nested too deeply to read (RecursionError)"
        )
        _close_stderr()
        return EXIT_USAGE
    except Exception as exc:  # a bug: still one line, unless asked
        if _debug():
            raise
        report(
            f"unexpected {type(exc).__name__}: {one_line(exc)} (a bug; set {DEBUG_VAR}=1 "
            "for the traceback)"
        )
        _close_stderr()
        return EXIT_BUG
