"""Checks shared by every public entry point that takes token ids, seeds or file paths.

Each check lives here once, so the model call, the sampler, the chat session, the tokenizer
and the trainer reject the same bad input with the same words. The module needs only numpy
(the tokenizer imports it without pulling in JAX).

What can and cannot be checked
------------------------------
Values are checked only when they are *concrete* (numpy arrays, Python lists, JAX arrays
outside a trace). Inside ``jax.jit`` the ids are tracers: their values do not exist yet, so
they cannot be checked, and the model documents what an out-of-range id does there (its
embedding row becomes NaN, it never reads another token's row). That is why every public,
non-traced entry point (``Gemma2.__call__`` on concrete arrays, ``generate``,
``ChatSession``, ``train``/``evaluate``) runs :func:`check_token_ids` before tracing.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TokenIdError", "check_token_ids", "check_seed", "check_regular_file", "SEED_LIMIT"]

#: Seeds are turned into a JAX key of two uint32 words; with 64-bit mode off (the default) a
#: larger seed silently loses its high bits and aliases a small one, so it is refused.
SEED_LIMIT = 2 ** 32


class TokenIdError(ValueError):
    """Token ids that are not integers in ``[0, vocab_size)``."""


def _is_tracer(x: Any) -> bool:
    """True for a JAX tracer (a value inside ``jit``/``grad``), whose contents are unknown."""
    jax = sys.modules.get("jax")   # if JAX was never imported, nothing can be a tracer
    return jax is not None and isinstance(x, jax.core.Tracer)


def check_token_ids(ids: Any, vocab_size: int, *, name: str = "tokens") -> Any:
    """Check that concrete ``ids`` are integer token ids in ``[0, vocab_size)``.

    Args:
      ids: any array-like of ids (list, numpy or JAX array, any shape), or a JAX tracer, which
        is returned unchecked (see the module docstring).
      vocab_size: V.
      name: what ``ids`` is called where the caller got it (``"prompts[1]"``, ``"tokens"``),
        so the message names the culprit.

    Returns:
      The ids as a numpy integer array of the input's shape (the tracer itself for a tracer).
      Checking happens *before* any cast: an int64 id of 2**32 + 5 is refused here, instead
      of wrapping to id 5 when it becomes int32 on the device.

    Raises:
      TypeError: the ids are not integers (floats, bools, strings): a float id would be
        truncated to some other token.
      TokenIdError (a ValueError): an id below 0 or at or above ``vocab_size``.
    """
    if _is_tracer(ids):
        return ids
    try:
        arr = np.asarray(ids)
    except (ValueError, OverflowError, TypeError) as exc:
        raise TypeError(f"{name} must be integer token ids (a (ragged?) sequence could not be "
                        f"read as an array: {exc})") from None
    if arr.size == 0:
        return arr.astype(np.int32)   # [] reads as float64: no id in it can be wrong
    if arr.dtype == object and all(
            isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in arr.flat):
        bad = [int(x) for x in arr.flat if not 0 <= x < vocab_size]   # Python ints past int64
        raise TokenIdError(_range_message(name, vocab_size, bad))
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be integer token ids, got dtype {arr.dtype} "
                        "(a float id would be truncated to another token; tokenize text first)")
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = arr[(arr < 0) | (arr >= vocab_size)]
        raise TokenIdError(_range_message(name, vocab_size, bad[:5].tolist()))
    return arr


def _range_message(name: str, vocab_size: int, bad: list[int]) -> str:
    return (f"{name}: token ids must be in [0, {vocab_size}); found {bad[:5]}, out of range — "
            "was the text tokenized with a different vocabulary?")


def check_seed(seed: Any, *, name: str = "seed") -> int:
    """``seed`` as an ``int`` in ``[0, 2**32)``; raises ``ValueError`` naming ``name`` otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"{name} must be an integer in [0, 2**32), got {seed!r}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name} must be in [0, 2**32) (a JAX key holds 32 bits of seed), "
                         f"got {seed}")
    return int(seed)


def check_regular_file(path: str | os.PathLike, what: str,
                       error: type[Exception] = ValueError) -> Path:
    """``path`` as a :class:`Path` after checking that it is a regular file.

    ``os.stat`` never opens the file, so a FIFO, socket or device put where a file should be
    is refused at once instead of hanging the reader (a FIFO blocks ``open`` until someone
    writes to it). ``what`` names the file's role in the message ("tokenizer", "shard").

    Raises:
      FileNotFoundError: nothing there. ``error`` (default ``ValueError``): something that is
      not a regular file (a directory, FIFO, device).
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} not found") from None
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)"
                if stat.S_ISFIFO(mode) else "not a regular file")
        raise error(f"{what} {path} is {kind}; expected a regular file")
    return path
