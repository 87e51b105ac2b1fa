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
vocabulary; the attention weights enter the decode loop already in the layout its products
read (:data:`_DECODE_LAYOUT`), so they are not copied again for every token.
:class:`PromptCache` keeps a conversation's cache between calls, so a chat's next turn
prefills only its own tokens.

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
sizes and M are rounded up to buckets so that similar requests share programs too.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .attention import LayerCache
from .checks import (check_sampling_settings, check_seed, check_stop_tokens,
                     check_token_ids)
from .model import Gemma2, positions_from_mask

__all__ = ["generate", "PromptCache", "sample_logits", "check_sampling", "check_prompts", "pad_prompts",
           "prefill", "decode_step", "DecodeState", "SamplingSettings", "PAD_ID", "BAD_LOGITS",
           "NonFiniteLogitsError"]

#: Gemma's ``<pad>`` id: fills the left padding and the outputs of rows that have finished.
PAD_ID = 0
#: What the sampler returns, inside compiled code, for a row whose logits hold NaN or +inf or
#: no finite value; the public functions turn it into :class:`NonFiniteLogitsError`.
BAD_LOGITS = -1
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
    rows = np.flatnonzero(np.any(np.asarray(tokens).reshape(len(tokens), -1) == BAD_LOGITS,
                                 axis=1))
    if rows.size:
        raise NonFiniteLogitsError(
            f"{where}: the logits of row(s) {rows[:8].tolist()} contain NaN or +inf (or no "
            "finite value), so no token can be sampled; check the model's weights and inputs")


# ---------------------------------------------------------------------------- sampling
def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ``ValueError`` for sampling settings that mean nothing (the rules:
    :func:`gemma2_lite.checks.check_sampling_settings`)."""
    check_sampling_settings(temperature, top_k, top_p)


# Top-k and top-p look at the SHORTLIST most likely tokens (``lax.top_k``, not a sort of the
# whole vocabulary); a nucleus that needs more (top_k > SHORTLIST, or top_p reaching past it)
# falls back to the full sort.
SHORTLIST = 256


def _sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
            top_p: jax.Array) -> jax.Array:
    """:func:`sample_logits` with the settings as arrays (top_k 0 = off, top_p 1 = off).

    Settings are traced values, not Python constants, so one compiled program serves every
    temperature / top-k / top-p: changing them never recompiles. ``lax.switch`` runs only the
    branch needed (greedy needs no random numbers and no sort).

    Sampling is ``argmax(values + gumbel noise)`` over the tokens in descending order (what
    ``jax.random.categorical`` does); the noise is drawn for all V ranks and cut to the
    shortlist, so the shortlist and the full sort pick the same token from the same key.
    """
    b, vocab = logits.shape
    short = min(SHORTLIST, vocab)

    def greedy() -> jax.Array:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def plain() -> jax.Array:
        return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)

    def nucleus(values: jax.Array, ids: jax.Array, log_norm: jax.Array | None) -> jax.Array:
        """Sample among the first L ranks of values/ids (B, L), descending."""
        size = values.shape[-1]
        rank = jnp.arange(size)
        keep = rank < jnp.where(top_k > 0, top_k, vocab)                   # top-k by rank: ties
        values = jnp.where(keep, values, -jnp.inf)                         # can't sneak in
        if log_norm is None:
            probs = jax.nn.softmax(values, axis=-1)                        # renormalised on top-k
        else:                                                              # no top-k: the whole
            probs = jnp.exp(values - log_norm)                             # vocabulary's softmax
        # Probability mass of the strictly more likely tokens: keep a token while that mass is
        # still short of top_p. The first token has 0 before it, so it always survives.
        before = jnp.cumsum(probs, axis=-1) - probs
        values = jnp.where(before < top_p, values, -jnp.inf)
        noise = jax.random.gumbel(key, (b, vocab), jnp.float32)[:, :size]
        choice = jnp.argmax(values + noise, axis=-1)                       # (B,) into sorted
        return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    def full() -> jax.Array:
        values, ids = jax.lax.top_k(logits / temperature, vocab)           # (B, V): a sort
        return nucleus(values, ids, None)

    def filtered() -> jax.Array:
        scaled = logits / temperature
        values, ids = jax.lax.top_k(scaled, short)                         # (B, L)
        # Without top-k the nucleus is measured against the whole vocabulary's softmax; it fits
        # in the shortlist when the shortlist's mass reaches top_p in every row.
        log_norm = jax.nn.logsumexp(scaled, axis=-1, keepdims=True)        # (B, 1)
        mass = jnp.sum(jnp.exp(values - log_norm), axis=-1)                # (B,)
        fits = jnp.where(top_k > 0, top_k <= short, jnp.all(mass >= top_p))
        in_shortlist = lambda: jax.lax.cond(top_k > 0, lambda: nucleus(values, ids, None),
                                            lambda: nucleus(values, ids, log_norm))
        return jax.lax.cond(fits, in_shortlist, full)

    branch = jnp.where(temperature == 0, 0, jnp.where((top_k > 0) | (top_p < 1), 2, 1))
    token = jax.lax.switch(branch, [greedy, plain, filtered])
    # A row with NaN or +inf, or nothing finite, has no distribution to sample from (argmax
    # would quietly answer token 0): mark it BAD_LOGITS for the caller to report.
    bad = jnp.any(jnp.isnan(logits) | (logits == jnp.inf), axis=-1) | \
        jnp.all(logits == -jnp.inf, axis=-1)
    return jnp.where(bad, BAD_LOGITS, token)


# Compiled once per logits shape: called eagerly, lax.switch would retrace its branches (new
# closures) and recompile on every call.
_sample_jit = jax.jit(_sample)


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None) -> jax.Array:
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
    token = _sample_jit(logits, key, np.float32(temperature), np.int32(top_k or 0),
                        np.float32(1.0 if top_p is None else top_p))
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
            raise TypeError(f"prompts[{i}] must be a list of token ids, got {type(p).__name__}"
                            " (tokenize text first)")
        if len(p) == 0:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token "
                             "(e.g. <bos>, id 2)")
        # Checked as given, before int(): a float id 7.9 must not quietly become token 7.
        ids = check_token_ids(p, vocab_size, name=f"prompts[{i}]")
        if ids.ndim != 1:
            raise ValueError(f"prompts[{i}] must be a flat list of token ids, got shape "
                             f"{ids.shape}")
        out.append([int(t) for t in ids])
    return out


def pad_prompts(prompts: Sequence[Sequence[int]], length: int | None = None,
                pad_id: int = PAD_ID) -> tuple[np.ndarray, np.ndarray]:
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
            tokens[row, length - len(p):] = p
            mask[row, length - len(p):] = True
    return tokens, mask


# ---------------------------------------------------------------------------- model steps
def prefill(model: Gemma2, tokens: jax.Array, mask: jax.Array, cache: list[LayerCache],
            start: jax.Array | None = None) -> tuple[jax.Array, list[LayerCache]]:
    """Run the (left-padded) prompts through the model, filling an empty cache.

    tokens: int (B, T); mask: bool (B, T), real tokens True, padding on the left;
    cache: from ``model.init_cache(B, max_len)`` (or, with ``start``, one that already holds
    ``start`` (B,) positions per row: a chat's next turn). Returns the next-token logits of
    each row, float32 (B, V) (only the last column is unembedded), and the filled cache (padding
    columns hold position -1: never attended).
    """
    if not isinstance(mask, jax.core.Tracer) and not bool(np.asarray(mask)[:, -1].all()):
        raise ValueError("prompts must be LEFT-padded: the last column must be a real token in "
                         "every row (its logits predict the first new token); use pad_prompts")
    positions = None                        # the model's default, cumsum(mask) - 1
    if start is not None:
        positions = positions_from_mask(jnp.asarray(mask))                  # (B, T), pads -1
        positions = jnp.where(positions >= 0, positions + jnp.asarray(start)[:, None], -1)
    out = model.forward(tokens, mask, positions=positions, cache=cache, last_only=True)
    return out.logits[:, -1], out.cache                                     # (B, V)


def decode_step(model: Gemma2, tokens: jax.Array, positions: jax.Array,
                cache: list[LayerCache]) -> tuple[jax.Array, list[LayerCache]]:
    """Feed one token per row at its absolute position; it is written, then attends the cache.

    tokens, positions: int32 (B,). Returns float32 logits (B, V) and the updated cache.
    """
    out = model.forward(tokens[:, None], positions=positions[:, None], cache=cache)
    return out.logits[:, 0], out.cache


# ---------------------------------------------------------------------------- decode loop
@jax.tree_util.register_dataclass
@dataclass
class SamplingSettings:
    """How to pick tokens, as arrays (a pytree), so changing them never recompiles.

    temperature: float32 () (0 = greedy); top_k: int32 () (0 = off); top_p: float32 ()
    (1 = off); stop_tokens: int32 (S,) padded with -1; max_new_tokens: int32 ().
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    stop_tokens: jax.Array
    max_new_tokens: jax.Array

    @classmethod
    def make(cls, temperature: float, top_k: int | None, top_p: float | None,
             stop_tokens: Sequence[int], max_new_tokens: int) -> "SamplingSettings":
        # Stop lists are padded to a multiple of 8 ids so their length rarely changes the shape.
        stops = np.full(_round_up(max(len(stop_tokens), 1), 8), -1, np.int32)
        stops[:len(stop_tokens)] = stop_tokens
        return cls(temperature=np.float32(temperature), top_k=np.int32(top_k or 0),
                   top_p=np.float32(1.0 if top_p is None else top_p), stop_tokens=stops,
                   max_new_tokens=np.int32(max_new_tokens))


@jax.tree_util.register_dataclass
@dataclass
class DecodeState:
    """The loop carry of generation (a pytree).

    out: int32 (B, M') the new tokens so far (``PAD_ID`` where not yet made or after a stop;
    M' >= M is M rounded up); last: int32 (B,) the token to feed next; positions: int32 (B,)
    its absolute position; done: bool (B,) rows that have produced a stop token; step: int32 ()
    tokens made so far; key: the base random key (step s samples with ``fold_in(key, s)``);
    cache: one :class:`LayerCache` per layer.
    """

    out: jax.Array
    last: jax.Array
    positions: jax.Array
    done: jax.Array
    step: jax.Array
    key: jax.Array
    cache: list[LayerCache]


def _record(state: DecodeState, logits: jax.Array, settings: SamplingSettings) -> DecodeState:
    """Sample the token of step ``state.step`` from logits (B, V) and append it."""
    key = jax.random.fold_in(state.key, state.step)
    token = _sample(logits, key, settings.temperature, settings.top_k, settings.top_p)
    token = jnp.where(state.done, PAD_ID, token)          # finished rows stop changing
    out = jax.lax.dynamic_update_slice(state.out, token[:, None], (0, state.step))
    # A row whose logits went bad (BAD_LOGITS) stops too; generate() reports it.
    done = state.done | jnp.isin(token, settings.stop_tokens) | (token == BAD_LOGITS)
    return dataclasses.replace(state, out=out, last=token, done=done, step=state.step + 1)


def _start(model: Gemma2, tokens: jax.Array, mask: jax.Array, key: jax.Array,
           settings: SamplingSettings, cache: list[LayerCache], start: jax.Array,
           out_len: int) -> DecodeState:
    """Prefill ``cache`` with the prompts (after ``start`` (B,) positions), sample a token."""
    b = tokens.shape[0]
    logits, cache = prefill(model, tokens, mask, cache, start)
    state = DecodeState(
        out=jnp.full((b, out_len), PAD_ID, jnp.int32),
        last=jnp.zeros((b,), jnp.int32),
        # The first new token sits right after the prompt: position = prompt length.
        positions=(jnp.sum(mask, axis=1) + start).astype(jnp.int32),
        done=jnp.zeros((b,), bool), step=jnp.zeros((), jnp.int32), key=key, cache=cache)
    return _record(state, logits, settings)


def _advance(model: Gemma2, state: DecodeState, settings: SamplingSettings) -> DecodeState:
    """Feed the last token, sample the next."""
    logits, cache = decode_step(model, state.last, state.positions, state.cache)
    state = dataclasses.replace(state, cache=cache, positions=state.positions + 1)
    return _record(state, logits, settings)


# The model travels through jit as (graphdef, params): graphdef is static (hashable), params a
# pytree of arrays, so a second model of the same architecture reuses the compiled programs.
# Programs are compiled once per (architecture, B, padded prompt length, cache size, padded M).
@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "out_len"))
def _start_jit(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, mask: jax.Array,
               key: jax.Array, settings: SamplingSettings, *, max_len: int,
               out_len: int) -> DecodeState:
    """Prefill and the first token, into a cache made inside the program (nothing to allocate
    on the host and transfer)."""
    model = nnx.merge(graphdef, params)
    cache = model.init_cache(tokens.shape[0], max_len)
    start = jnp.zeros((tokens.shape[0],), jnp.int32)
    return _start(model, tokens, mask, key, settings, cache, start, out_len)


@functools.partial(jax.jit, static_argnames=("graphdef", "out_len"), donate_argnames=("cache",))
def _continue_jit(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array,
                  mask: jax.Array, key: jax.Array, settings: SamplingSettings,
                  cache: list[LayerCache], start: jax.Array, *, out_len: int) -> DecodeState:
    """Prefill only the new tokens into a cache that holds ``start`` positions; first token."""
    return _start(nnx.merge(graphdef, params), tokens, mask, key, settings, cache, start,
                  out_len)


# The decode steps read the attention weights in the layout their products want.
# A matmul reads its weight as a matrix (contracted axis, kept axes). q, k and v are stored
# (N, D, H), as in the official checkpoints: the contracted D sits between N and H, so before
# every product XLA copies the weight into (D, N, H). On a CPU that copy sits inside the decode
# loop, and it costs one write and one read of every attention weight per token, which is
# about a third of the bytes a step moves. So the weights are put in (D, N, H) once per
# request; inside the loop each is transposed back, and XLA folds that transpose into the
# product's dimension numbers, with no copy. The same holds for o, (N, H, D): XLA:CPU reads it
# as (H, N, D), which was seen in the compiled program. The numbers do not change, since the
# same products are computed. ``benchmarks/generate.py`` prints how many weight copies are
# left in the loop.
_DECODE_LAYOUT = {"q": (1, 0, 2), "k": (1, 0, 2), "v": (1, 0, 2), "o": (1, 0, 2)}


def _relayout(params: nnx.State, inverse: bool = False) -> nnx.State:
    """The attention weights of ``params`` permuted to the decode layout (``inverse``: back)."""
    def move(path: tuple[Any, ...], x: jax.Array) -> jax.Array:
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        perm = _DECODE_LAYOUT.get(names[-2]) if len(names) >= 3 and names[-3] == "attn" else None
        if perm is None or x.ndim != len(perm):
            return x
        return jnp.transpose(x, tuple(np.argsort(perm)) if inverse else perm)
    return jax.tree_util.tree_map_with_path(move, params)


_decode_layout_jit = jax.jit(_relayout)


def _decode_model(graphdef: nnx.GraphDef, laid: nnx.State) -> Gemma2:
    """The model, from parameters in the decode layout. The optimization barrier keeps XLA from
    moving the transposes back out of the loop body, where they would cancel the ones made
    before the loop and the copies would return."""
    return nnx.merge(graphdef, _relayout(jax.lax.optimization_barrier(laid), inverse=True))


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("state",))
def _advance_jit(graphdef: nnx.GraphDef, laid: nnx.State, state: DecodeState,
                 settings: SamplingSettings) -> DecodeState:
    """One decode step (the streaming path calls this once per token); ``laid``: the
    parameters in the decode layout (:func:`_relayout`)."""
    return _advance(_decode_model(graphdef, laid), state, settings)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("state",))
def _finish_jit(graphdef: nnx.GraphDef, laid: nnx.State, state: DecodeState,
                settings: SamplingSettings) -> DecodeState:
    """Every remaining decode step in one program: a ``while_loop`` that also stops as soon as
    every row has finished. The host does not wait on the device between tokens. ``laid``:
    the parameters in the decode layout (:func:`_relayout`)."""

    def keep_going(s: DecodeState) -> jax.Array:
        return (s.step < settings.max_new_tokens) & ~jnp.all(s.done)

    def step(s: DecodeState) -> DecodeState:
        return _advance(_decode_model(graphdef, laid), s, settings)

    return jax.lax.while_loop(keep_going, step, state)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _truncate(row: np.ndarray, stop_tokens: Sequence[int]) -> list[int]:
    """A row of new tokens up to and including its first stop token."""
    ids = row.tolist()
    for i, t in enumerate(ids):
        if t in stop_tokens:
            return ids[:i + 1]
    return ids


def generate(model: Gemma2, prompts: list[list[int]], *, max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, stop_tokens: Sequence[int] = (),
             callback: Callable[[int, np.ndarray], Any] | None = None,
             max_len: int | None = None) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; return only the new tokens.

    Args:
      model: a :class:`Gemma2`.
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
      NonFiniteLogitsError: the model's logits became NaN/inf for some row (e.g. NaN weights).
    """
    config = model.config
    prompts, stops, seed = _check_request(model, prompts, max_new_tokens, temperature, top_k,
                                          top_p, seed, stop_tokens, callback)
    longest = max(len(p) for p in prompts)
    needed = longest + int(max_new_tokens)
    if needed > config.max_seq_len:
        raise ValueError(
            f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {needed} "
            f"exceeds the model's context of {config.max_seq_len} positions; shorten the prompt "
            "or ask for fewer tokens")
    if max_len is None:
        max_len = min(_round_up(needed, _CACHE_BUCKET), config.max_seq_len)
    elif needed > max_len:
        raise ValueError(
            f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {needed} "
            f"does not fit in a cache of max_len={max_len} positions; raise max_len (at most the "
            f"model's context, {config.max_seq_len}) or ask for fewer tokens")

    # Padding beyond the longest prompt costs a little prefill work but is invisible to the
    # result: padded columns get position -1 and are never attended to. They do take cache
    # columns (rows advance in lock-step), so the padding never pushes prompt + M past max_len.
    tokens, mask = pad_prompts(prompts, min(_round_up(longest, _PROMPT_BUCKET),
                                            max_len - int(max_new_tokens)))
    settings = SamplingSettings.make(temperature, top_k, top_p, stops, max_new_tokens)
    key = jax.random.key(seed)
    graphdef, params = nnx.split(model)
    state = _start_jit(graphdef, params, tokens, mask, key, settings, max_len=max_len,
                       out_len=_round_up(max_new_tokens, _OUT_BUCKET))
    state = _decode(graphdef, params, state, settings, max_new_tokens, callback)
    out = np.asarray(state.out)[:, :max_new_tokens]
    _raise_bad_logits(out, "generate")
    return [_truncate(row, stops) for row in out]


def _check_request(model: Gemma2, prompts: Any, max_new_tokens: Any, temperature: Any,
                   top_k: Any, top_p: Any, seed: Any, stop_tokens: Any, callback: Any
                   ) -> tuple[list[list[int]], tuple[int, ...], int]:
    """Validate a generation request; return the prompts, stop ids and seed, checked."""
    config = model.config
    prompts = check_prompts(prompts, config.vocab_size)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)
    stops = check_stop_tokens(stop_tokens, config.vocab_size)
    seed = check_seed(seed)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(step, tokens), got {callback!r}")
    return prompts, stops, seed


def _decode(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState,
            settings: SamplingSettings, max_new_tokens: int,
            callback: Callable[[int, np.ndarray], Any] | None) -> DecodeState:
    """Every decode step after the first token: one while-loop program, or (streaming) one
    jitted step per token with the callback in between."""
    # The first token came with the prefill: with one token there is no decode step to lay out.
    laid = _decode_layout_jit(params) if max_new_tokens > 1 else None
    if callback is None:
        return state if laid is None else _finish_jit(graphdef, laid, state, settings)
    was_done = np.zeros(state.out.shape[0], bool)
    for step in range(max_new_tokens):
        if step:
            state = _advance_jit(graphdef, laid, state, settings)
        new = np.asarray(state.out[:, step])
        _raise_bad_logits(np.where(was_done, PAD_ID, new), f"generate, step {step}")
        callback(step, np.where(was_done, -1, new).astype(np.int32))
        was_done = np.asarray(state.done)
        if was_done.all():
            break
    return state


class PromptCache:
    """One conversation's key/value cache, kept between calls so only new tokens are prefilled.

    ``generate(prompt)`` reuses the cache when the tokens it holds are a prefix of ``prompt``
    (a chat's next turn: history + the new user turn): only the rest is prefilled, at the
    positions after the cached ones. Otherwise it starts over from an empty cache. After the
    call the cache holds the prompt and the new tokens that were fed back (all but the last).
    The tokens are those :func:`generate` gives for the whole prompt (same seed, same
    sampling), up to float rounding in the logits. Batch of one; ``size`` is the most cache
    columns (default the model's context).

    Attributes: ``ids`` the tokens the cache holds; ``prefilled`` how many tokens the last call
    had to prefill (the new turn, or everything after a restart).
    """

    def __init__(self, model: Gemma2, size: int | None = None):
        self.model = model
        self.size = int(size or model.config.max_seq_len)
        if not 0 < self.size <= model.config.max_seq_len:
            raise ValueError(f"size must be in [1, {model.config.max_seq_len}] (the model's "
                             f"context), got {size}")
        self.cache: list[LayerCache] | None = None
        self.ids: list[int] = []
        self.prefilled = 0

    def reset(self) -> None:
        self.cache, self.ids, self.prefilled = None, [], 0

    def generate(self, prompt: Sequence[int], *, max_new_tokens: int = 32,
                 temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, stop_tokens: Sequence[int] = (),
                 callback: Callable[[int, np.ndarray], Any] | None = None) -> list[int]:
        """Continue ``prompt`` (one list of ids) as :func:`generate` would; return the new ids."""
        (prompt,), stops, seed = _check_request(self.model, [prompt], max_new_tokens,
                                                temperature, top_k, top_p, seed, stop_tokens,
                                                callback)
        m = int(max_new_tokens)
        if len(prompt) + m > self.size:
            raise ValueError(f"the prompt ({len(prompt)} tokens) + max_new_tokens ({m}) exceeds "
                             f"the cache's {self.size} positions")
        held = len(self.ids)
        columns = 0 if self.cache is None else int(self.cache[0].end)
        reuse = (self.cache is not None and held < len(prompt) and prompt[:held] == self.ids
                 and columns + (len(prompt) - held) + m <= self.size)
        settings = SamplingSettings.make(temperature, top_k, top_p, stops, m)
        key = jax.random.key(seed)
        graphdef, params = nnx.split(self.model)
        out_len = _round_up(m, _OUT_BUCKET)
        if reuse:
            new = prompt[held:]
            # Left padding to a bucket (fewer programs); a used cache drops padding columns.
            tokens, mask = pad_prompts([new], _round_up(len(new), _PROMPT_BUCKET))
            cache, self.cache = self.cache, None          # donated to the program
            state = _continue_jit(graphdef, params, tokens, mask, key, settings, cache,
                                  np.full((1,), held, np.int32), out_len=out_len)
        else:
            new = prompt
            tokens, mask = pad_prompts([new], min(_round_up(len(new), _PROMPT_BUCKET),
                                                  self.size - m))
            state = _start_jit(graphdef, params, tokens, mask, key, settings,
                               max_len=self.size, out_len=out_len)
        self.prefilled = len(new)
        state = _decode(graphdef, params, state, settings, m, callback)
        out = np.asarray(state.out)[:, :m]
        try:
            _raise_bad_logits(out, "generate")
        except NonFiniteLogitsError:
            self.reset()
            raise
        reply = _truncate(out[0], stops)
        self.cache = state.cache
        self.ids = list(prompt) + reply[:-1]              # the last token was never fed
        return reply
