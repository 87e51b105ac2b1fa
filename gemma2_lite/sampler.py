"""Text generation with Gemma 2: prefill the prompt, then decode one token at a time from a cache.

Generating ``M`` tokens after a prompt of ``T`` tokens naively costs ``M`` forward passes over
ever longer sequences. With a key/value cache (one :class:`~gemma2_lite.attention.LayerCache`
per layer, from :meth:`Gemma2.init_cache`) the prompt is processed once (*prefill*) and every
later step feeds a single token that attends to the cached keys (*decode*):

    logits, cache = prefill(model, tokens, mask, cache)       # (B, V): next-token logits
    token = sample_logits(logits, key, temperature, top_k, top_p)
    logits, cache = decode_step(model, token, position, cache) # again and again

Global layers cache the whole context; local (sliding-window) layers keep only the last W
positions in a ring buffer, so their share of the cost and memory stays flat as the text grows.
Nothing is done twice: the prompt attends within itself and is copied into the empty cache;
each new token is written into its slot first (one ``dynamic_update_slice``, the same slot for
every row) and then attends to the cache in place; only the last position's logits are computed
after the prompt; top-k and top-p look at a ``lax.top_k`` shortlist, not a sort of the whole
vocabulary; the decode loop reads every weight once per token, in place (the model stores its
weights as rows (out, in), the layout a matrix-vector product reads at memory speed).
:class:`PromptCache` keeps a conversation's cache
between calls, so a chat's next turn prefills only its own tokens.

Batches mix prompt lengths by *left* padding them to a common length (positions
``cumsum(mask) - 1``), so the last column is every row's last prompt token and all rows then
advance in lock-step. Stop tokens end a row; a finished row's later outputs are ignored.

:func:`generate` compiles the prefill (and first token) as one program and all remaining
decode steps as another: a ``jax.lax.while_loop`` that stops early once every row has
finished, so the host never waits on the device between tokens. With a streaming ``callback``
the same step function runs from a Python loop instead (one jitted call per token, the cache
buffers donated so they are updated in place), so the callback sees each token as it is made.
Both paths give identical tokens. The sampling settings (temperature, top-k, top-p, stop
tokens, seed) are traced values, so changing them never recompiles; prompt lengths, cache
sizes and M are rounded up to buckets so that similar requests share programs too. Both
:func:`generate` and :class:`PromptCache` run one pipeline (``_run``), which starts from an
empty cache or, like the official gemma sampler's ``last_state``, from the previous call's
:class:`~gemma2_lite.decoding.DecodeState`. The compiled programs live in
:mod:`gemma2_lite.decoding`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .checks import (
    check_int,
    check_sampling_settings,
    check_seed,
    check_stop_tokens,
    check_token_ids,
)
from .decoding import (
    BAD_LOGITS,
    PAD_ID,
    SHORTLIST,
    DecodeState,
    SamplingSettings,
    advance,
    decode_loop,
    decode_step,
    prefill,
    resume,
    round_up,
    sample_tokens,
    start,
)
from .model import Gemma2

__all__ = [
    "generate",
    "PromptCache",
    "sample_logits",
    "check_sampling",
    "check_prompts",
    "pad_prompts",
    "NonFiniteLogitsError",
    # The compiled steps, from gemma2_lite.decoding:
    "prefill",
    "decode_step",
    "decode_loop",
    "DecodeState",
    "SamplingSettings",
    "PAD_ID",
    "BAD_LOGITS",
    "SHORTLIST",
]

# Prompt lengths are padded up to a multiple of this, and default cache sizes to a multiple of
# _CACHE_BUCKET, so that prompts of similar lengths (a chat growing turn by turn) reuse one
# compiled program instead of compiling a new one for every length.
_PROMPT_BUCKET = 16
_CACHE_BUCKET = 64
_OUT_BUCKET = 32


class NonFiniteLogitsError(FloatingPointError):
    """The model produced NaN or infinite logits: there is no distribution to sample from."""


def _raise_bad_logits(tokens: np.ndarray, where: str) -> None:
    """Raise :class:`NonFiniteLogitsError` if ``tokens`` (B,) or (B, M) holds ``BAD_LOGITS``."""
    rows = np.flatnonzero(np.any(np.asarray(tokens).reshape(len(tokens), -1) == BAD_LOGITS, axis=1))
    if rows.size:
        raise NonFiniteLogitsError(
            f"{where}: the logits of row(s) {rows[:8].tolist()} are not finite (NaN or +inf, "
            "or no finite value; or infinite before the final soft-cap), so no token can be "
            "sampled; check the model's weights and inputs"
        )


# ---------------------------------------------------------------------------- sampling
def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ``ValueError`` for sampling settings that mean nothing (the rules:
    :func:`gemma2_lite.checks.check_sampling_settings`)."""
    check_sampling_settings(temperature, top_k, top_p)


# Compiled once per logits shape: called eagerly, lax.switch would retrace its branches (new
# closures) and recompile on every call.
_sample_jit = jax.jit(sample_tokens)


def sample_logits(
    logits: jax.Array,
    key: jax.Array,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """Pick one token per row from next-token logits.

    logits: float (B, V). key: a ``jax.random`` key. Returns int32 (B,). Raises
    :class:`NonFiniteLogitsError` for a row with NaN or +inf logits or none finite (``-inf``
    alone is fine: it bans a token); under ``jit`` such a row gets ``BAD_LOGITS`` (-1) instead.

    * ``temperature == 0``: greedy, ``argmax`` (top_k/top_p are then irrelevant).
    * otherwise sample from ``softmax(logits / temperature)``, restricted to
      - the ``top_k`` largest logits (by rank, so never more than k tokens, ties included), and/or
      - the nucleus: the smallest set of most-likely tokens whose probability reaches ``top_p``
        (probabilities renormalised after top-k; Holtzman et al. 2020, "The Curious Case of
        Neural Text Degeneration"). The most likely token is always kept, so a tiny ``top_p``
        is greedy. ``top_p=1`` keeps everything.
    """
    check_sampling(temperature, top_k, top_p)
    logits = jnp.asarray(logits).astype(jnp.float32)
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, V), got shape {logits.shape}")
    token = _sample_jit(
        logits,
        key,
        np.float32(temperature),
        np.int32(top_k or 0),
        np.float32(1.0 if top_p is None else top_p),
    )
    if not isinstance(token, jax.core.Tracer):
        _raise_bad_logits(np.asarray(token), "sample_logits")
    return token


# ---------------------------------------------------------------------------- prompts
def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    """Validate prompts (a non-empty list of non-empty lists of integer ids in [0, V)); return
    copies as lists of Python ints. Raises ``TypeError`` for non-integer ids and
    :class:`~gemma2_lite.checks.TokenIdError` (a ``ValueError``) naming the prompt for ids
    outside the vocabulary."""
    if isinstance(prompts, (np.ndarray, jax.Array)):
        if prompts.ndim != 2:
            raise ValueError(f"a prompt array must be (B, T) token ids, got shape {prompts.shape}")
        prompts = np.asarray(prompts).tolist()
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one prompt (a list of token ids)")
    out: list[list[int]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not isinstance(p, (Sequence, np.ndarray)):
            raise TypeError(
                f"prompts[{i}] must be a list of token ids, got {type(p).__name__}"
                " (tokenize text first)"
            )
        if len(p) == 0:
            raise ValueError(
                f"prompts[{i}] is empty: every prompt needs at least one token (e.g. <bos>, id 2)"
            )
        # Checked as given, before int(): a float id 7.9 must not quietly become token 7.
        ids = check_token_ids(p, vocab_size, name=f"prompts[{i}]")
        if ids.ndim != 1:
            raise ValueError(
                f"prompts[{i}] must be a flat list of token ids, got shape {ids.shape}"
            )
        out.append([int(t) for t in ids])
    return out


def pad_prompts(
    prompts: Sequence[Sequence[int]], length: int | None = None, pad_id: int = PAD_ID
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad prompts to a common ``length`` (default: the longest).

    Returns tokens int32 (B, T) and mask bool (B, T) (True for real tokens). Left padding puts
    every row's last prompt token in the last column, where its next-token logits are read.
    """
    longest = max(len(p) for p in prompts)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"cannot pad to length {length}: the longest prompt has {longest} tokens")
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, p in enumerate(prompts):
        if len(p):
            tokens[row, length - len(p) :] = p
            mask[row, length - len(p) :] = True
    return tokens, mask


# ---------------------------------------------------------------------------- the pipeline
def _truncate(row: np.ndarray, stop_tokens: Sequence[int]) -> list[int]:
    """A row of new tokens up to and including its first stop token."""
    ids = row.tolist()
    for i, t in enumerate(ids):
        if t in stop_tokens:
            return ids[: i + 1]
    return ids


@dataclass(frozen=True)
class _Request:
    """A checked generation request: the prompts (lists of ids), and how to sample."""

    prompts: list[list[int]]
    max_new_tokens: int
    stops: tuple[int, ...]
    settings: SamplingSettings
    key: jax.Array
    callback: Callable[[int, np.ndarray], Any] | None


def _check_request(
    model: Gemma2,
    prompts: Any,
    max_new_tokens: Any,
    temperature: Any,
    top_k: Any,
    top_p: Any,
    seed: Any,
    stop_tokens: Any,
    callback: Any,
) -> _Request:
    """Validate a generation request (raising with a message naming what is wrong)."""
    config = model.config
    prompts = check_prompts(prompts, config.vocab_size)
    check_int(max_new_tokens, "max_new_tokens", low=1)
    if max_new_tokens >= config.max_seq_len:  # before any int32 cast could overflow
        raise ValueError(
            f"max_new_tokens ({max_new_tokens}) must be less than the model's "
            f"context of {config.max_seq_len} positions (the prompt takes at "
            "least one); ask for fewer tokens"
        )
    check_sampling(temperature, top_k, top_p)
    stops = check_stop_tokens(stop_tokens, config.vocab_size)
    seed = check_seed(seed)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(step, tokens), got {callback!r}")
    m = int(max_new_tokens)
    return _Request(
        prompts,
        m,
        stops,
        SamplingSettings.make(temperature, top_k, top_p, stops, m),
        jax.random.key(seed),
        callback,
    )


def _run(
    model: Gemma2,
    request: _Request,
    *,
    max_len: int | None = None,
    last_state: DecodeState | None = None,
) -> tuple[list[list[int]], DecodeState]:
    """The one generation pipeline: pad, start, decode, check, truncate.

    Start: from an empty cache of ``max_len`` columns made inside the program, or (as the
    official gemma sampler's ``last_state``) after the positions ``last_state``'s cache holds,
    prefilling only ``request.prompts`` (the new tokens; its cache is donated). Returns each
    row's new tokens (up to and including a stop token) and the final state, which a next
    call may continue from."""
    m = request.max_new_tokens
    length = round_up(max(len(p) for p in request.prompts), _PROMPT_BUCKET)
    if last_state is None:
        # Padding beyond the longest prompt costs a little prefill work but is invisible to
        # the result: padded columns get position -1 and are never attended to. They do take
        # cache columns (rows advance in lock-step), so they never push prompt + M past
        # max_len. (Into a used cache, padding columns take none.)
        assert max_len is not None, "a fresh start needs max_len"
        length = min(length, max_len - m)
    tokens, mask = pad_prompts(request.prompts, length)
    out_len = round_up(m, _OUT_BUCKET)
    args = (model, tokens, mask, request.key, request.settings)
    if last_state is None:
        assert max_len is not None
        state = start(*args, max_len=max_len, out_len=out_len)
    else:
        state = resume(*args, last_state, out_len=out_len)
    state = _decode(model, state, request)
    out = np.asarray(state.out)[:, :m]
    _raise_bad_logits(out, "generate")
    return [_truncate(row, request.stops) for row in out], state


def _decode(model: Gemma2, state: DecodeState, request: _Request) -> DecodeState:
    """Every decode step after the first token: one while-loop program, or (streaming) one
    jitted step per token with the callback in between."""
    m, callback = request.max_new_tokens, request.callback
    if callback is None:
        # The first token came with the prefill: with one token there is nothing to decode.
        return state if m == 1 else decode_loop(model, state, request.settings)
    was_done = np.zeros(state.out.shape[0], bool)
    for step in range(m):
        if step:
            state = advance(model, state, request.settings)
        new = np.asarray(state.out[:, step])
        _raise_bad_logits(np.where(was_done, PAD_ID, new), f"generate, step {step}")
        callback(step, np.where(was_done, -1, new).astype(np.int32))
        was_done = np.asarray(state.done)
        if was_done.all():
            break
    return state


def generate(
    model: Gemma2,
    prompts: list[list[int]],
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_tokens: Sequence[int] = (),
    callback: Callable[[int, np.ndarray], Any] | None = None,
    max_len: int | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; return only the new tokens.

    Args:
      model: a :class:`Gemma2` (or a :func:`~gemma2_lite.quantize.quantize`-d one).
      prompts: B lists of token ids (any lengths >= 1; include ``<bos>`` yourself).
      max_new_tokens: M, tokens to generate per prompt (fewer if a stop token comes first).
      temperature, top_k, top_p: see :func:`sample_logits`; ``temperature=0`` is greedy.
      seed: seeds ``jax.random``: the same seed gives the same tokens.
      stop_tokens: ids that end a row (e.g. ``<eos>``, ``<end_of_turn>``). The stop token is
        included in that row's output; nothing after it is.
      callback: streaming hook, called after each step as ``callback(step, tokens)`` with the
        0-based step and the step's tokens, int32 numpy (B,); rows that finished at an earlier
        step show -1.
      max_len: cache size (positions it can hold). Default: the longest prompt + M, rounded up
        for program reuse and capped at the model's context ``max_seq_len``.

    Returns:
      B lists of new token ids (python ints).

    Raises:
      ValueError: an empty prompt list or prompt, ids outside the vocabulary, bad sampling
        settings, a seed outside [0, 2**32), or prompt + max_new_tokens longer than the cache /
        the model's context.
      TypeError: prompts that are not lists of integer ids (float ids are refused, not
        truncated).
      NonFiniteLogitsError: the model's logits became NaN/inf for some row (e.g. NaN or
        infinite weights), before or after the final soft-cap.
    """
    config = model.config
    request = _check_request(
        model, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, callback
    )
    longest = max(len(p) for p in request.prompts)
    needed = longest + request.max_new_tokens
    if needed > config.max_seq_len:
        raise ValueError(
            f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {needed} "
            f"exceeds the model's context of {config.max_seq_len} positions; shorten the prompt "
            "or ask for fewer tokens"
        )
    if max_len is None:
        max_len = min(round_up(needed, _CACHE_BUCKET), config.max_seq_len)
    elif needed > max_len:
        raise ValueError(
            f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {needed} "
            f"does not fit in a cache of max_len={max_len} positions; raise max_len (at most the "
            f"model's context, {config.max_seq_len}) or ask for fewer tokens"
        )
    return _run(model, request, max_len=max_len)[0]


class PromptCache:
    """One conversation's key/value cache, kept between calls so only new tokens are prefilled.

    ``generate(prompt)`` reuses the cache when the tokens it holds are a prefix of ``prompt``
    (a chat's next turn: history + the new user turn): only the rest is prefilled, at the
    positions after the cached ones (the last call's state is the next call's ``last_state``).
    Otherwise it starts over from an empty cache. After the call the cache holds the prompt and
    the new tokens that were fed back (all but the last). The tokens are those :func:`generate`
    gives for the whole prompt (same seed, same sampling), up to float rounding in the logits.
    Batch of one; ``size`` is the most cache columns (default the model's context).

    Attributes: ``ids`` the tokens the cache holds; ``prefilled`` how many tokens the last call
    had to prefill (the new turn, or everything after a restart).
    """

    def __init__(self, model: Gemma2, size: int | None = None):
        self.model = model
        context = model.config.max_seq_len
        self.size = (
            context
            if size is None
            else check_int(
                size,
                "size",
                low=1,
                high=context,
                what=f"an integer in [1, {context}] (the model's context) or None",
            )
        )
        self.state: DecodeState | None = None
        self.ids: list[int] = []
        self.prefilled = 0

    def reset(self) -> None:
        self.state, self.ids, self.prefilled = None, [], 0

    def generate(
        self,
        prompt: Sequence[int],
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        stop_tokens: Sequence[int] = (),
        callback: Callable[[int, np.ndarray], Any] | None = None,
    ) -> list[int]:
        """Continue ``prompt`` (one list of ids) as :func:`generate` would; return the new ids."""
        request = _check_request(
            self.model,
            [prompt],
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            stop_tokens,
            callback,
        )
        (prompt,), m = request.prompts, request.max_new_tokens
        if len(prompt) + m > self.size:
            raise ValueError(
                f"the prompt ({len(prompt)} tokens) + max_new_tokens ({m}) exceeds "
                f"the cache's {self.size} positions"
            )
        held = len(self.ids)
        columns = 0 if self.state is None else int(self.state.cache[0].end)
        last, self.state = self.state, None  # its cache is donated (or dropped)
        reuse = (
            last is not None
            and held < len(prompt)
            and prompt[:held] == self.ids
            and columns + (len(prompt) - held) + m <= self.size
        )
        new = prompt[held:] if reuse else prompt
        self.ids, self.prefilled = [], len(new)
        try:
            (reply,), state = _run(
                self.model,
                dataclasses.replace(request, prompts=[new]),
                max_len=self.size,
                last_state=last if reuse else None,
            )
        except NonFiniteLogitsError:
            self.reset()
            raise
        self.state = state
        self.ids = list(prompt) + reply[:-1]  # the last token was never fed
        return reply
