"""The compiled programs of text generation (chapter 6b), which :mod:`gemma2_lite.sampler`
drives: prefill and the first token, one decode step, and every remaining step in one
``while_loop``; and the traced token sampler. The decode loop reads the model's own weights,
stored as rows: the layout a matrix-vector product reads at memory speed
(:func:`gemma2_lite.layers.project`).

A generation's state is a :class:`DecodeState` (a pytree: the tokens so far, the next token
and its position, the cache); the sampling settings are a :class:`SamplingSettings` of arrays,
so changing them never recompiles. The model travels through ``jit`` as (graphdef, params).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .attention import LayerCache
from .model import Gemma2, positions_from_mask

__all__ = [
    "PAD_ID",
    "BAD_LOGITS",
    "SHORTLIST",
    "sample_tokens",
    "prefill",
    "decode_step",
    "SamplingSettings",
    "DecodeState",
    "start",
    "resume",
    "advance",
    "decode_loop",
    "decode_program",
]

#: Gemma's ``<pad>`` id: fills the left padding and the outputs of rows that have finished.
PAD_ID = 0
#: What the sampler returns, inside compiled code, for a row whose logits hold NaN or +inf or
#: no finite value; the public functions turn it into ``NonFiniteLogitsError``.
BAD_LOGITS = -1


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


# Top-k and top-p look at the SHORTLIST most likely tokens (``lax.top_k``, not a sort of the
# whole vocabulary); a nucleus that needs more (top_k > SHORTLIST, or top_p reaching past it)
# falls back to the full sort.
SHORTLIST = 256


#: A sampling setting: a numpy value when made (SamplingSettings.make), a traced array inside
#: the compiled programs.
Setting = jax.Array | np.ndarray | np.number


def sample_tokens(
    logits: jax.Array, key: jax.Array, temperature: Setting, top_k: Setting, top_p: Setting
) -> jax.Array:
    """:func:`~gemma2_lite.sampler.sample_logits` with the settings as arrays (top_k 0 = off,
    top_p 1 = off): logits float32 (B, V) -> int32 (B,), ``BAD_LOGITS`` for a row with NaN or
    +inf or nothing finite.

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
        keep = rank < jnp.where(top_k > 0, top_k, vocab)  # top-k by rank: ties
        values = jnp.where(keep, values, -jnp.inf)  # can't sneak in
        if log_norm is None:
            probs = jax.nn.softmax(values, axis=-1)  # renormalised on top-k
        else:  # no top-k: the whole
            probs = jnp.exp(values - log_norm)  # vocabulary's softmax
        # Probability mass of the strictly more likely tokens: keep a token while that mass is
        # still short of top_p. The first token has 0 before it, so it always survives.
        before = jnp.cumsum(probs, axis=-1) - probs
        values = jnp.where(before < top_p, values, -jnp.inf)
        noise = jax.random.gumbel(key, (b, vocab), jnp.float32)[:, :size]
        choice = jnp.argmax(values + noise, axis=-1)  # (B,) into sorted
        return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    def full() -> jax.Array:
        values, ids = jax.lax.top_k(logits / temperature, vocab)  # (B, V): a sort
        return nucleus(values, ids, None)

    def filtered() -> jax.Array:
        scaled = logits / temperature
        values, ids = jax.lax.top_k(scaled, short)  # (B, L)
        # Without top-k the nucleus is measured against the whole vocabulary's softmax; it fits
        # in the shortlist when the shortlist's mass reaches top_p in every row.
        log_norm = jax.nn.logsumexp(scaled, axis=-1, keepdims=True)  # (B, 1)
        mass = jnp.sum(jnp.exp(values - log_norm), axis=-1)  # (B,)
        fits = jnp.where(top_k > 0, top_k <= short, jnp.all(mass >= top_p))
        in_shortlist = lambda: jax.lax.cond(
            top_k > 0, lambda: nucleus(values, ids, None), lambda: nucleus(values, ids, log_norm)
        )
        return jax.lax.cond(fits, in_shortlist, full)

    branch = jnp.where(temperature == 0, 0, jnp.where((top_k > 0) | (top_p < 1), 2, 1))
    token = jax.lax.switch(branch, [greedy, plain, filtered])
    # A row with NaN or +inf, or nothing finite, has no distribution to sample from (argmax
    # would quietly answer token 0): mark it BAD_LOGITS for the caller to report.
    bad = jnp.any(jnp.isnan(logits) | (logits == jnp.inf), axis=-1) | jnp.all(
        logits == -jnp.inf, axis=-1
    )
    return jnp.where(bad, BAD_LOGITS, token)


# ---------------------------------------------------------------------------- model steps
def _checked_logits(out: Any) -> jax.Array:
    """The last column's logits (B, V), a row NaN where the model's logits overflowed before
    the final soft-cap (which would have turned +-inf into a finite +-c_f)."""
    return jnp.where(out.finite[:, -1:], out.logits[:, -1], jnp.nan)


def prefill(
    model: Gemma2,
    tokens: jax.Array,
    mask: jax.Array,
    cache: list[LayerCache],
    start: jax.Array | None = None,
) -> tuple[jax.Array, list[LayerCache]]:
    """Run the (left-padded) prompts through the model, filling an empty cache.

    tokens: int (B, T); mask: bool (B, T), real tokens True, padding on the left;
    cache: from ``model.init_cache(B, max_len)`` (or, with ``start``, one that already holds
    ``start`` (B,) positions per row: a chat's next turn). Returns the next-token logits of
    each row, float32 (B, V) (only the last column is unembedded; NaN for a row whose logits
    were not finite before the soft-cap), and the filled cache (padding columns hold position
    -1: never attended).
    """
    if not isinstance(mask, jax.core.Tracer) and not bool(np.asarray(mask)[:, -1].all()):
        raise ValueError(
            "prompts must be LEFT-padded: the last column must be a real token in "
            "every row (its logits predict the first new token); use pad_prompts"
        )
    positions = None  # the model's default, cumsum(mask) - 1
    if start is not None:
        positions = positions_from_mask(jnp.asarray(mask))  # (B, T), pads -1
        positions = jnp.where(positions >= 0, positions + jnp.asarray(start)[:, None], -1)
    out = model.forward(tokens, mask, positions=positions, cache=cache, last_only=True)
    assert out.cache is not None  # a cache in, a cache out
    return _checked_logits(out), out.cache  # (B, V)


def decode_step(
    model: Gemma2, tokens: jax.Array, positions: jax.Array, cache: list[LayerCache]
) -> tuple[jax.Array, list[LayerCache]]:
    """Feed one token per row at its absolute position; it is written, then attends the cache.

    tokens, positions: int32 (B,). Returns float32 logits (B, V) (NaN rows as in
    :func:`prefill`) and the updated cache.
    """
    out = model.forward(tokens[:, None], positions=positions[:, None], cache=cache)
    assert out.cache is not None  # a cache in, a cache out
    return _checked_logits(out), out.cache


# ---------------------------------------------------------------------------- decode loop
@jax.tree_util.register_dataclass
@dataclass
class SamplingSettings:
    """How to pick tokens, as arrays (a pytree), so changing them never recompiles.

    temperature: float32 () (0 = greedy); top_k: int32 () (0 = off); top_p: float32 ()
    (1 = off); stop_tokens: int32 (S,) padded with -1; max_new_tokens: int32 ().
    """

    temperature: Setting
    top_k: Setting
    top_p: Setting
    stop_tokens: Setting
    max_new_tokens: Setting

    @classmethod
    def make(
        cls,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        stop_tokens: Sequence[int],
        max_new_tokens: int,
    ) -> SamplingSettings:
        # Stop lists are padded to a multiple of 8 ids so their length rarely changes the shape.
        stops = np.full(round_up(max(len(stop_tokens), 1), 8), -1, np.int32)
        stops[: len(stop_tokens)] = stop_tokens
        return cls(
            temperature=np.float32(temperature),
            top_k=np.int32(top_k or 0),
            top_p=np.float32(1.0 if top_p is None else top_p),
            stop_tokens=stops,
            max_new_tokens=np.int32(max_new_tokens),
        )


@jax.tree_util.register_dataclass
@dataclass
class DecodeState:
    """The loop carry of generation (a pytree), and what a next call continues from.

    out: int32 (B, M') the new tokens so far (``PAD_ID`` where not yet made or after a stop;
    M' >= M is M rounded up); last: int32 (B,) the token to feed next; positions: int32 (B,)
    its absolute position (so also how many positions the cache holds); done: bool (B,) rows
    that have produced a stop token; step: int32 () tokens made so far; key: the base random
    key (step s samples with ``fold_in(key, s)``); cache: one :class:`LayerCache` per layer.
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
    token = sample_tokens(logits, key, settings.temperature, settings.top_k, settings.top_p)
    token = jnp.where(state.done, PAD_ID, token)  # finished rows stop changing
    out = jax.lax.dynamic_update_slice(state.out, token[:, None], (0, state.step))
    # A row whose logits went bad (BAD_LOGITS) stops too; generate() reports it.
    done = state.done | jnp.isin(token, settings.stop_tokens) | (token == BAD_LOGITS)
    return dataclasses.replace(state, out=out, last=token, done=done, step=state.step + 1)


def _start(
    model: Gemma2,
    tokens: jax.Array,
    mask: jax.Array,
    key: jax.Array,
    settings: SamplingSettings,
    cache: list[LayerCache],
    start: jax.Array | None,
    out_len: int,
) -> DecodeState:
    """Prefill ``cache`` with the prompts (empty cache: ``start`` None; else after ``start``
    (B,) positions), sample the first token."""
    b = tokens.shape[0]
    logits, cache = prefill(model, tokens, mask, cache, start)
    held = jnp.zeros((b,), jnp.int32) if start is None else start
    state = DecodeState(
        out=jnp.full((b, out_len), PAD_ID, jnp.int32),
        last=jnp.zeros((b,), jnp.int32),
        # The first new token sits right after the prompt: position = prompt length.
        positions=(jnp.sum(mask, axis=1) + held).astype(jnp.int32),
        done=jnp.zeros((b,), bool),
        step=jnp.zeros((), jnp.int32),
        key=key,
        cache=cache,
    )
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
def _start_jit(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens: jax.Array,
    mask: jax.Array,
    key: jax.Array,
    settings: SamplingSettings,
    *,
    max_len: int,
    out_len: int,
) -> DecodeState:
    """Prefill and the first token, into a cache made inside the program (nothing to allocate
    on the host and transfer)."""
    model = nnx.merge(graphdef, params)
    cache = model.init_cache(tokens.shape[0], max_len)
    return _start(model, tokens, mask, key, settings, cache, None, out_len)


@functools.partial(jax.jit, static_argnames=("graphdef", "out_len"), donate_argnames=("cache",))
def _continue_jit(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens: jax.Array,
    mask: jax.Array,
    key: jax.Array,
    settings: SamplingSettings,
    cache: list[LayerCache],
    start: jax.Array,
    *,
    out_len: int,
) -> DecodeState:
    """Prefill only the new tokens into a cache that holds ``start`` positions; first token."""
    return _start(nnx.merge(graphdef, params), tokens, mask, key, settings, cache, start, out_len)


def _finish(
    graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState, settings: SamplingSettings
) -> DecodeState:
    """Every remaining decode step in one program: a ``while_loop`` that also stops as soon as
    every row has finished. The host does not wait on the device between tokens."""

    def keep_going(s: DecodeState) -> jax.Array:
        return (s.step < settings.max_new_tokens) & ~jnp.all(s.done)

    def step(s: DecodeState) -> DecodeState:
        return _advance(nnx.merge(graphdef, params), s, settings)

    return jax.lax.while_loop(keep_going, step, state)


# XLA's loop-invariant code motion would move every weight's conversion (bf16 or int8 to
# float32) out of the decode loop, since the weights do not change between steps: the loop
# would then hold a float32 copy of every weight, 3x the bf16 weights' memory (the real 2B
# was killed at 20 GB), and read twice the bytes per token. In the loop each conversion sits
# inside the product that reads it (layers.rows_product), where it costs nothing; so the
# decode program is compiled without that one pass. Nothing else in the loop is worth hoisting.
_DECODE_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
_finish_jit = jax.jit(
    _finish,
    static_argnames=("graphdef",),
    donate_argnames=("state",),
    compiler_options=_DECODE_OPTIONS,
)
_finish_kept_jit = jax.jit(_finish, static_argnames=("graphdef",), compiler_options=_DECODE_OPTIONS)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("state",))
def _advance_jit(
    graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState, settings: SamplingSettings
) -> DecodeState:
    """One decode step (the streaming path calls this once per token)."""
    return _advance(nnx.merge(graphdef, params), state, settings)


def start(
    model: Gemma2,
    tokens: np.ndarray,
    mask: np.ndarray,
    key: jax.Array,
    settings: SamplingSettings,
    *,
    max_len: int,
    out_len: int,
) -> DecodeState:
    """Prefill left-padded prompts tokens, mask (B, T) into a new cache of ``max_len`` columns
    and sample the first token (one compiled program); room for ``out_len`` tokens."""
    graphdef, params = nnx.split(model)
    return _start_jit(
        graphdef, params, tokens, mask, key, settings, max_len=max_len, out_len=out_len
    )


def resume(
    model: Gemma2,
    tokens: np.ndarray,
    mask: np.ndarray,
    key: jax.Array,
    settings: SamplingSettings,
    last_state: DecodeState,
    *,
    out_len: int,
) -> DecodeState:
    """:func:`start` after the positions ``last_state``'s cache holds (a chat's next turn:
    only the new tokens are prefilled). ``last_state``'s cache is donated (updated in place)."""
    graphdef, params = nnx.split(model)
    return _continue_jit(
        graphdef,
        params,
        tokens,
        mask,
        key,
        settings,
        last_state.cache,
        last_state.positions,
        out_len=out_len,
    )


def advance(model: Gemma2, state: DecodeState, settings: SamplingSettings) -> DecodeState:
    """One decode step (feed ``state.last``, sample the next token); ``state`` is donated."""
    graphdef, params = nnx.split(model)
    return _advance_jit(graphdef, params, state, settings)


def decode_loop(
    model: Gemma2, state: DecodeState, settings: SamplingSettings, *, donate: bool = True
) -> DecodeState:
    """Every remaining decode step after ``state`` in one compiled ``while_loop``, on ``model``
    as given. donate=True updates the cache in
    place (``state`` is consumed); donate=False keeps ``state`` usable, so that a benchmark
    can time the same program again and again."""
    graphdef, params = nnx.split(model)
    return (_finish_jit if donate else _finish_kept_jit)(graphdef, params, state, settings)


def decode_program(model: Gemma2, state: DecodeState, settings: SamplingSettings) -> Any:
    """The compiled program :func:`decode_loop` runs for these shapes (``jax.stages.Compiled``:
    ``as_text()`` its HLO, ``memory_analysis()`` its buffers), to inspect what XLA made of it."""
    graphdef, params = nnx.split(model)
    return _finish_kept_jit.lower(graphdef, params, state, settings).compile()
