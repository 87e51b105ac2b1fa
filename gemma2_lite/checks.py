"""Checks shared by every public entry point: numbers, token ids, positions, seeds, sampling
settings and file paths.

Each check lives here once, so the config, the model call, the sampler, the chat session, the
tokenizer and the command lines reject the same bad input with the same words. The rules:

* A bool is never a number: ``True`` is not a layer count, a window, a token id or a seed
  (Python's ``bool`` is an ``int``, so a plain ``isinstance(x, int)`` lets it through).
* Every element of a sequence is checked, not the array numpy makes of it: ``[True, 5]``
  is refused as token ids, never read as ids ``[1, 5]``.
* A range is stated in the message in the caller's terms (``top_k must be ...``), before any
  cast could wrap or overflow.

The module needs only numpy (the tokenizer imports it without pulling in JAX).

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

import math
import numbers
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

__all__ = [
    "TokenIdError",
    "is_int",
    "check_int",
    "check_number",
    "check_token_ids",
    "check_positions",
    "check_seed",
    "turn_seed",
    "check_sampling_settings",
    "check_stop_tokens",
    "check_regular_file",
    "SEED_LIMIT",
    "MIN_TEMPERATURE",
    "TOP_K_LIMIT",
]

#: Seeds are turned into a JAX key of two uint32 words; with 64-bit mode off (the default) a
#: larger seed silently loses its high bits and aliases a small one, so it is refused.
SEED_LIMIT = 2**32
#: The smallest temperature other than 0 (greedy). Sampling divides the logits by T in
#: float32: below ~1e-37 that overflows to inf (a wrong token, whatever the seed), and long
#: before that the distribution is already greedy's. vLLM draws the same line (1e-5).
MIN_TEMPERATURE = 1e-5
#: top_k is an int32 on the device; any value at or above the vocabulary size already means
#: "every token", so a larger one is refused rather than wrapped.
TOP_K_LIMIT = 2**31 - 1


def is_int(value: Any) -> TypeGuard[int | np.integer]:
    """True for a Python or numpy integer; False for a bool (``True`` is not a count)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _what(low: float | None, high: float | None, kind: str) -> str:
    """'a positive integer', 'a number in [0, 1]', ... for a message."""
    if high is None and low == 1 and kind == "integer":
        return "a positive integer"
    if high is None and low == 0:
        return f"a non-negative {kind}"
    if low is None and high is None:
        return f"an {kind}" if kind == "integer" else f"a finite {kind}"
    if high is None:
        return f"{'an' if kind == 'integer' else 'a'} {kind} >= {low}"
    if low is None:
        return f"{'an' if kind == 'integer' else 'a'} {kind} <= {high}"
    return f"{'an' if kind == 'integer' else 'a'} {kind} in [{low}, {high}]"


def check_int(
    value: Any,
    name: str,
    *,
    low: int | None = None,
    high: int | None = None,
    what: str | None = None,
    error: type[Exception] = ValueError,
) -> int:
    """``value`` as an ``int`` after checking it is an integer (not a bool) in [low, high].

    ``what`` replaces the description in the message ("a positive integer or None"); the
    message always names ``name`` and shows the value given. ``error`` is the exception
    raised (``ConfigError`` for a config field).
    """
    if (
        not is_int(value)
        or (low is not None and value < low)
        or (high is not None and value > high)
    ):
        raise error(f"{name} must be {what or _what(low, high, 'integer')}, got {value!r}")
    return int(value)


def check_number(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    what: str | None = None,
    error: type[Exception] = ValueError,
) -> float:
    """``value`` as a ``float`` after checking it is a finite real number (not a bool) in
    [low, high] (``(low, high]`` with ``low_open``). NaN and infinities are refused: an
    infinite soft-cap or learning rate turns every result into NaN."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if ok:
        number = float(value)
        ok = (
            math.isfinite(number)
            and (low is None or (number > low if low_open else number >= low))
            and (high is None or number <= high)
        )
    if not ok:
        default = (
            f"a finite number > {low}"
            if low_open and high is None
            else f"a finite number in ({low}, {high}]"
            if low_open
            else _what(low, high, "number")
        )
        raise error(f"{name} must be {what or default}, got {value!r}")
    return float(value)


class TokenIdError(ValueError):
    """Token ids that are not integers in ``[0, vocab_size)``."""


def _is_tracer(x: Any) -> bool:
    """True for a JAX tracer (a value inside ``jit``/``grad``), whose contents are unknown."""
    jax = sys.modules.get("jax")  # if JAX was never imported, nothing can be a tracer
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
    arr = _read_integers(ids, name, "token ids", "a token id")
    if arr.size == 0:
        return arr.astype(np.int32)  # [] reads as float64: no id in it can be wrong
    if arr.dtype == object and all(is_int(x) for x in arr.flat):
        bad = [int(x) for x in arr.flat if not 0 <= x < vocab_size]  # Python ints past int64
        raise TokenIdError(_range_message(name, vocab_size, bad))
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(
            f"{name} must be integer token ids, got dtype {arr.dtype} "
            "(a float id would be truncated to another token; tokenize text first)"
        )
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        out_of_range = arr[(arr < 0) | (arr >= vocab_size)]
        raise TokenIdError(_range_message(name, vocab_size, out_of_range[:5].tolist()))
    return arr


def _read_integers(values: Any, name: str, what: str, one: str) -> np.ndarray:
    """``values`` as a numpy array (not yet checked to be integers), after refusing a bool
    anywhere in a (nested) list and a ragged list, naming ``name`` and ``what`` it holds."""
    if isinstance(values, (list, tuple)) and _holds_bool(values):
        raise TypeError(
            f"{name} must be integer {what}, found a bool (True/False) among "
            f"them; a bool is not {one}"
        )
    try:
        return np.asarray(values)
    except (ValueError, OverflowError, TypeError) as exc:
        raise TypeError(
            f"{name} must be integer {what} (a (ragged?) sequence could not be "
            f"read as an array: {exc})"
        ) from None


def _holds_bool(items: Sequence[Any]) -> bool:
    """True when a (nested) list or tuple holds a bool anywhere: numpy would read
    ``[True, 5]`` as the ids ``[1, 5]``."""
    stack: list[Any] = [items]
    while stack:
        for x in stack.pop():
            if isinstance(x, (bool, np.bool_)):
                return True
            if isinstance(x, (list, tuple)):
                stack.append(x)
    return False


def check_positions(
    positions: Any, max_seq_len: int, *, valid: Any = None, name: str = "positions"
) -> None:
    """Check concrete ``positions`` (B, T): integers in ``[0, max_seq_len)``.

    ``valid`` (B, T), 1 for real tokens and 0 for padding, exempts the padding: a left-padded
    row's positions from ``cumsum(mask) - 1`` are -1 there, and padding is never attended to.
    A tracer (inside ``jit``) is not checked. Raises ``TypeError`` for non-integer positions
    and ``ValueError`` naming the first bad one.
    """
    if _is_tracer(positions) or _is_tracer(valid):
        return
    p = _read_integers(positions, name, "positions", "a position")
    if p.dtype == object and all(is_int(x) for x in p.flat):  # Python ints past int64
        raise ValueError(
            f"{name} must be in [0, {max_seq_len}) (the model's context); found "
            f"{max((int(x) for x in p.flat), key=abs)}"
        )
    if p.dtype == np.bool_ or not np.issubdtype(p.dtype, np.integer):
        raise TypeError(f"{name} must be integer positions, got dtype {p.dtype}")
    real = np.ones(p.shape, bool) if valid is None else np.asarray(valid).astype(bool)
    low = np.argwhere((p < 0) & real)
    if low.size:
        where = tuple(int(i) for i in low[0])
        raise ValueError(
            f"{name} must be >= 0 at real tokens; found {int(p[where])} at {list(where)}"
        )
    if p.size and p.max() >= max_seq_len:
        raise ValueError(
            f"position {int(p.max())} is past the model's context "
            f"({max_seq_len} positions, 0..{max_seq_len - 1})"
        )


def _range_message(name: str, vocab_size: int, bad: list[int]) -> str:
    return (
        f"{name}: token ids must be in [0, {vocab_size}); found {bad[:5]}, out of range — "
        "was the text tokenized with a different vocabulary?"
    )


def check_seed(seed: Any, *, name: str = "seed") -> int:
    """``seed`` as an ``int`` in ``[0, 2**32)``; raises ``ValueError`` naming ``name`` otherwise."""
    if not is_int(seed):
        raise ValueError(f"{name} must be an integer in [0, 2**32), got {seed!r}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(
            f"{name} must be in [0, 2**32) (a JAX key holds 32 bits of seed), got {seed}"
        )
    return int(seed)


def turn_seed(seed: int, turn: int) -> int:
    """The seed of a session's ``turn`` (0-based): ``seed + turn`` wrapped into [0, 2**32),
    so every seed the user may give works on every turn (2**32 - 1 is followed by 0)."""
    return (check_seed(seed) + turn) % SEED_LIMIT


def check_sampling_settings(temperature: Any, top_k: Any, top_p: Any) -> None:
    """Raise ``ValueError`` for sampling settings that mean nothing or that the sampler's
    float32 / int32 arithmetic cannot carry out.

    temperature: 0 (greedy) or a finite number >= :data:`MIN_TEMPERATURE`. top_k: None or an
    integer in [1, :data:`TOP_K_LIMIT`] (at or above the vocabulary size it keeps every
    token). top_p: None or a number in (0, 1].
    """
    check_number(temperature, "temperature", low=0, what="a finite number >= 0 (0 = greedy)")
    if 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature {temperature!r} is too small to sample with: logits / "
            f"T overflows float32 below ~1e-37, and below {MIN_TEMPERATURE} "
            "sampling is greedy anyway; use temperature=0 for greedy decoding"
        )
    if top_k is not None:
        check_int(top_k, "top_k", low=1, what="a positive integer or None (no top-k)")
        if top_k > TOP_K_LIMIT:
            raise ValueError(
                f"top_k={top_k} is larger than any vocabulary (at most "
                f"2**31 - 1); use None to keep every token"
            )
    if top_p is not None:
        check_number(
            top_p,
            "top_p",
            low=0,
            high=1,
            low_open=True,
            what="in (0, 1] or None (no nucleus filter)",
        )


def check_stop_tokens(stop_tokens: Any, vocab_size: int) -> tuple[int, ...]:
    """``stop_tokens`` (a list or tuple of token ids, possibly empty) as a tuple of ints.

    A single id is refused with the fix in the message: ``stop_tokens=1`` would otherwise fail
    deep inside with Python's "'int' object is not iterable".
    """
    if isinstance(stop_tokens, (str, bytes)) or not isinstance(
        stop_tokens, (Sequence, np.ndarray, set, frozenset)
    ):
        hint = f" (for one id write [{int(stop_tokens)}])" if is_int(stop_tokens) else ""
        raise TypeError(
            f"stop_tokens must be a list of token ids{hint}, got "
            f"{type(stop_tokens).__name__} {stop_tokens!r}"
        )
    ids = np.asarray(check_token_ids(list(stop_tokens), vocab_size, name="stop_tokens"))
    if ids.ndim > 1:
        raise TypeError(
            f"stop_tokens must be a flat list of token ids, got shape {ids.shape} "
            "(a list of lists?)"
        )
    return tuple(int(t) for t in ids)


def check_regular_file(
    path: str | os.PathLike, what: str, error: type[Exception] = ValueError
) -> Path:
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
        kind = (
            "a directory"
            if stat.S_ISDIR(mode)
            else "a FIFO (named pipe)"
            if stat.S_ISFIFO(mode)
            else "not a regular file"
        )
        raise error(f"{what} {path} is {kind}; expected a regular file")
    return path
