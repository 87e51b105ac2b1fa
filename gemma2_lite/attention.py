"""Grouped-query attention with Gemma 2's soft-capped logits and sliding-window / global masks.

Shapes (the book's Notation page, ``book/notation.md``): B batch, T queries, S keys, D width,
N query heads, K key/value heads, G = N / K query heads per key/value head, H head dimension.

Keys and values are never repeated to N heads: queries are viewed as (B, T, K, G, H) and each
group of G query heads attends to its one key/value head ('BTKGH,BSKH->BTKGS').

Masks are built from absolute *positions*, not array indices, so the same code serves padded
batches (positions = cumsum(mask) - 1) and key/value caches whose slots are a ring buffer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from .config import Gemma2Config
from .layers import dense_init, project, soft_cap
from .rope import rotate

__all__ = [
    "attention_mask",
    "causal_mask",
    "sliding_window_mask",
    "LayerCache",
    "Attention",
    "AttentionPlan",
    "Mode",
    "CAPTURES",
    "attention_logits",
    "gqa_attention",
    "banded_attention",
    "band_chunks",
    "band_keys",
    "band_mask",
    "cached_keys",
    "cached_key_positions",
]

# Masked logits get the most negative finite float rather than -inf, so that a row with no
# visible key (a padding query) yields a uniform softmax instead of NaN.
_MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None = None) -> jax.Array:
    """Which keys each query may see.

    q_pos: int (B, T) query positions; k_pos: int (B, S) key positions, negative for an empty
    or padding slot. Key k is visible from query q iff ``0 <= k <= q`` and, for a sliding
    window W, ``q - W < k`` (W keys including the current one). Returns bool (B, T, S).
    """
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    visible = (k >= 0) & (k <= q)
    if window is not None:
        visible &= (q - k) < window
    return visible


def causal_mask(length: int) -> jax.Array:
    """bool (T, T): the plain causal mask, lower triangle included."""
    pos = jnp.arange(length)[None]
    return attention_mask(pos, pos)[0]


def sliding_window_mask(length: int, window: int) -> jax.Array:
    """bool (T, T): causal and at most ``window`` keys back (the current key included)."""
    pos = jnp.arange(length)[None]
    return attention_mask(pos, pos, window)[0]


def attention_logits(q: jax.Array, k: jax.Array) -> jax.Array:
    """The raw attention scores, float32 (B, T, N, S): before the soft-cap and the mask.

    q: (B, T, N, H) (already scaled and rotated); k: (B, S, K, H). Each group of G = N / K query
    heads meets its one key/value head ('BTKGH,BSKH->BTKGS'); the result is viewed per head.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    if n % kv_heads:
        raise ValueError(f"{n} query heads cannot be grouped over {kv_heads} key/value heads")
    qg = q.reshape(b, t, kv_heads, n // kv_heads, h)  # (B, T, K, G, H)
    logits = jnp.einsum("BTKGH,BSKH->BTKGS", qg, k).astype(jnp.float32)
    return logits.reshape(b, t, n, -1)  # (B, T, N, S)


def gqa_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, softcap: float | None = None
) -> tuple[jax.Array, jax.Array]:
    """Soft-capped, masked grouped-query attention (queries already scaled and rotated).

    q: (B, T, N, H); k, v: (B, S, K, H); mask: bool (B, T, S).
    Returns the output (B, T, N, H) in q's dtype and the probabilities (B, T, N, S) float32.
    The cap is applied to the logits *before* the mask, as in Gemma 2.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    logits = attention_logits(q, k).reshape(b, t, kv_heads, n // kv_heads, -1)  # (B,T,K,G,S)
    logits = soft_cap(logits, softcap)
    logits = jnp.where(mask[:, :, None, None, :], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)  # (B, T, K, G, S)
    out = jnp.einsum("BTKGS,BSKH->BTKGH", probs.astype(v.dtype), v)
    return out.reshape(b, t, n, h), probs.reshape(b, t, n, -1)


def band_chunks(x: jax.Array, size: int, fill: Any = 0) -> jax.Array:
    """(B, T, ...) -> (B, n, size, ...), n = ceil(T / size): the columns in chunks of ``size``,
    the last chunk padded at the end with ``fill``."""
    b, t = x.shape[:2]
    n = -(-t // size)
    pad = [(0, 0), (0, n * size - t)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, pad, constant_values=fill).reshape(b, n, size, *x.shape[2:])


def band_keys(x: jax.Array, size: int, fill: Any = 0) -> jax.Array:
    """(B, T, ...) -> (B, n, 2 size, ...): chunk i's keys are the columns of chunks i - 1 and i
    (before chunk 0: ``fill``). With ``size >= W`` they hold every key a sliding window of W lets
    chunk i's queries see, when positions advance one per column."""
    c = band_chunks(x, size, fill)  # (B, n, C, ...)
    before = jnp.concatenate([jnp.full_like(c[:, :1], fill), c[:, :-1]], axis=1)
    return jnp.concatenate([before, c], axis=2)  # (B, n, 2C, ...)


def band_mask(
    mask_fn: Callable[[jax.Array, jax.Array, int | None], jax.Array],
    positions: jax.Array,
    window: int,
) -> jax.Array:
    """bool (B, n, W, 2W): which of :func:`band_keys`' keys each chunk's queries may see.

    positions: int32 (B, T) of the sequence's columns, -1 for padding (queries and keys alike);
    mask_fn: the model's mask component, :func:`attention_mask`.
    """
    b = positions.shape[0]
    q_pos = band_chunks(positions, window, -1)  # (B, n, W)
    k_pos = band_keys(positions, window, -1)  # (B, n, 2W)
    n = q_pos.shape[1]
    mask = mask_fn(q_pos.reshape(b * n, window), k_pos.reshape(b * n, 2 * window), window)
    return mask.reshape(b, n, window, 2 * window)


def banded_attention(
    attention_fn: Callable[..., tuple[jax.Array, jax.Array]],
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    softcap: float | None = None,
) -> jax.Array:
    """Sliding-window self-attention over a whole sequence in chunks of C >= W columns: each
    chunk's queries against its own and the previous chunk's keys, 2C keys, not T.

    q: (B, T, N, H); k, v: (B, T, K, H) (the same columns as q); mask: bool (B, n, C, 2C), from
    :func:`band_mask` (the model builds it once per forward). Returns the output (B, T, N, H),
    equal to ``attention_fn`` on the full (B, T, T) problem, in T·2C scores instead of T².
    """
    b, t, n, h = q.shape
    _, chunks, size, _ = mask.shape
    qc = band_chunks(q, size).reshape(b * chunks, size, n, h)  # (B·n, C, N, H)
    kc = band_keys(k, size).reshape(b * chunks, 2 * size, *k.shape[2:])  # (B·n, 2C, K, H)
    vc = band_keys(v, size).reshape(b * chunks, 2 * size, *v.shape[2:])
    out, _ = attention_fn(qc, kc, vc, mask.reshape(b * chunks, size, 2 * size), softcap=softcap)
    return out.reshape(b, chunks * size, n, h)[:, :t]  # (B, T, N, H)


#: What a forward can capture from every layer's attention (``Gemma2.forward(capture=...)``):
#: the raw scores before the cap and the mask (:func:`attention_logits`) and the attention
#: probabilities the attention component returns, each (B, T, N, S) float32.
CAPTURES = ("attn_logits", "attn_probs")

#: How one forward attends, per kind of layer (see :class:`AttentionPlan`).
Mode = Literal["full", "banded", "decode", "append"]


@dataclass(frozen=True)
class AttentionPlan:
    """How every layer of one forward attends and writes its cache: chosen once, before the
    layers run (:meth:`choose`, called by :meth:`~gemma2_lite.model.Gemma2.forward`), and handed
    to each layer. Static: a different plan is a different compiled program.

    mode, for the global layers (and the local ones unless ``band``):

    * ``"full"``: the chunk attends within itself, a (B, T, T) problem. Without a cache this is
      training and ``model(tokens)``; with one, a prompt from position 0 goes into an EMPTY cache,
      which is then filled with its last columns.
    * ``"decode"``: one token per row, written into its slot first, then attends to the whole
      cache in place (B, 1, S).
    * ``"append"``: a chunk after the columns a cache already holds (a chat's next turn): it
      attends to the old slots and to itself (B, T, S + T), then is written.

    band: the local layers of a ``"full"`` prompt attend in bands of W columns
    (:func:`banded_attention`, mode ``"banded"``): the same numbers in T·2W scores, not T².
    """

    mode: Literal["full", "decode", "append"] = "full"
    band: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("full", "decode", "append"):
            raise ValueError(
                f"AttentionPlan mode must be 'full', 'decode' or 'append', got {self.mode!r}"
            )
        if self.band and self.mode != "full":
            raise ValueError(f"band=True needs mode 'full' (a prompt), not {self.mode!r}")

    def for_window(self, window: int | None) -> Mode:
        """The mode of a layer with this window (None: global)."""
        return "banded" if self.band and window is not None else self.mode

    @classmethod
    def choose(
        cls, *, length: int, window: int | None, cached: bool, from_start: bool
    ) -> AttentionPlan:
        """The plan for T = ``length`` new columns. cached: a cache is given; from_start: the
        positions are the default ones, cumsum(mask) - 1 (so the columns start at position 0
        and advance one per column; with a cache, it must be empty). ``window``: the local
        layers' W (None if the model has none). Banding is chosen only when it is exact and
        saves work: a prompt into a cache, from position 0, longer than 2W (training and
        ``model(tokens)`` keep the plain path, whose saved activations
        :mod:`gemma2_lite.memory` counts)."""
        if not cached:
            return cls("full")
        if from_start:
            return cls("full", band=window is not None and length > 2 * window)
        return cls("decode") if length == 1 else cls("append")


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["k", "v", "pos", "end"], meta_fields=[]
)
@dataclass
class LayerCache:
    """One layer's key/value cache: ``S`` slots that every row fills in lock-step.

    k, v: (B, S, K, H); pos: int32 (B, S), the absolute position held by each slot, -1 if empty
    or padding; end: int32 (), how many columns have been written (the next goes to slot
    ``end mod S``). Rows advance together (a left-padded batch shares its columns), so a write is
    one ``dynamic_update_slice`` at a slot shared by all rows. A global layer gets S = the most
    columns to decode; a local (sliding-window) layer needs only S = W slots, a ring buffer,
    since older keys are outside its window anyway. How new columns are written is the
    forward's :class:`AttentionPlan` (:meth:`write`).
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    end: jax.Array

    @classmethod
    def empty(
        cls, batch: int, size: int, kv_heads: int, head_dim: int, dtype: Any = jnp.float32
    ) -> LayerCache:
        shape = (batch, size, kv_heads, head_dim)
        # Two distinct buffers: sharing one would make donating k and v donate it twice.
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            pos=jnp.full((batch, size), -1, jnp.int32),
            end=jnp.zeros((), jnp.int32),
        )

    @property
    def size(self) -> int:
        return self.pos.shape[1]

    def __repr__(self) -> str:
        b, s, k, h = self.k.shape
        return f"LayerCache(B={b}, S={s}, K={k}, H={h}, dtype={self.k.dtype})"

    def write(self, mode: Mode, k: jax.Array, v: jax.Array, pos: jax.Array) -> LayerCache:
        """Write new keys/values k, v (B, T, K, H) at positions pos (B, T; -1 = padding) as the
        plan's ``mode`` says: a prompt into an empty cache ("full", "banded"), one token
        ("decode"), or a chunk after the held columns ("append")."""
        k, v, pos = k.astype(self.k.dtype), v.astype(self.v.dtype), pos.astype(jnp.int32)
        if mode == "decode":
            return self._write_token(k, v, pos)
        if mode == "append":
            return self._write_chunk(k, v, pos)
        return self._write_prompt(k, v, pos)

    def update(self, k: jax.Array, v: jax.Array, pos: jax.Array) -> LayerCache:
        """Append columns k, v (B, T, K, H) at positions pos (B, T) after those already held,
        whatever the cache holds (empty or not): one column as a decode step writes it, more as
        a chat's next turn does (leading columns that are padding in every row take no slot).
        """
        return self.write("decode" if pos.shape[1] == 1 else "append", k, v, pos)

    def _write_token(self, k: jax.Array, v: jax.Array, pos: jax.Array) -> LayerCache:
        """One column: a ``dynamic_update_slice`` at slot ``end mod S``."""
        slot = self.end % self.size
        put = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new, slot, axis=1)
        return LayerCache(
            k=put(self.k, k), v=put(self.v, v), pos=put(self.pos, pos), end=self.end + 1
        )

    def _write_prompt(self, k: jax.Array, v: jax.Array, pos: jax.Array) -> LayerCache:
        """A prompt into an empty cache: its last min(T, S) columns, rolled into place (column c
        in slot c mod S) and copied; padding columns are kept, with position -1."""
        size, t = self.size, pos.shape[1]
        keep = min(t, size)  # static: the last `keep` columns survive
        shift = (t - keep) % size  # column t-keep lands in slot (t-keep) % S
        roll = lambda x: jnp.roll(x[:, t - keep :], shift, axis=1)
        put = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new, 0, axis=1)
        return LayerCache(
            k=put(self.k, roll(k)),
            v=put(self.v, roll(v)),
            pos=put(self.pos, roll(pos)),
            end=jnp.asarray(t, jnp.int32),
        )

    def _write_chunk(self, k: jax.Array, v: jax.Array, pos: jax.Array) -> LayerCache:
        """A chunk after the held columns: leading columns that are padding in every row are
        dropped, the rest scattered to their slots (of a chunk longer than S, the last S)."""
        size, t = self.size, pos.shape[1]
        lead = jnp.argmax(jnp.any(pos >= 0, axis=0))  # all-pad columns
        col = jnp.arange(t) - lead  # (T,)
        new = t - lead
        keep = (col >= 0) & (col >= new - size)
        slot = jnp.where(keep, (self.end + col) % size, size)  # size -> dropped
        return LayerCache(
            k=self.k.at[:, slot].set(k, mode="drop"),
            v=self.v.at[:, slot].set(v, mode="drop"),
            pos=self.pos.at[:, slot].set(pos, mode="drop"),
            end=self.end + new.astype(jnp.int32),
        )


def cached_keys(
    mode: Mode, cache: LayerCache | None, k: jax.Array, v: jax.Array, k_pos: jax.Array
) -> tuple[jax.Array, jax.Array, LayerCache | None]:
    """The keys and values a layer attends to, and its updated cache, as ``mode`` says.

    k, v: the new (B, T, K, H); k_pos: int32 (B, T), -1 for padding. "full" / "banded" (or no
    cache): the chunk attends to itself (never to empty slots), then fills the empty cache.
    "decode": the token is written first and attends to the cache (S keys, no copy). "append":
    the chunk attends to the old slots and itself (S + T keys), then is written. The keys'
    positions, for the mask, are :func:`cached_key_positions`.
    """
    if cache is None:
        return k, v, None
    new_cache = cache.write(mode, k, v, k_pos)
    if mode == "decode":
        return new_cache.k, new_cache.v, new_cache
    if mode == "append":
        keys = jnp.concatenate([cache.k.astype(k.dtype), k], axis=1)  # (B, S+T, K, H)
        values = jnp.concatenate([cache.v.astype(v.dtype), v], axis=1)
        return keys, values, new_cache
    return k, v, new_cache


def cached_key_positions(mode: Mode, cache: LayerCache | None, k_pos: jax.Array) -> jax.Array:
    """The positions (B, S') of the keys :func:`cached_keys` gives, -1 for empty or padding."""
    if cache is None or mode in ("full", "banded"):
        return k_pos
    if mode == "decode":
        return jax.lax.dynamic_update_slice_in_dim(
            cache.pos, k_pos.astype(jnp.int32), cache.end % cache.size, axis=1
        )
    return jnp.concatenate([cache.pos, k_pos], axis=1)


class Attention(nnx.Module):
    """Gemma 2 self-attention for one layer (local if ``window`` is set, else global).

    Weights are stored as rows (out..., in...), the layout Hugging Face ships:
    q (N, H, D), k (K, H, D), v (K, H, D), o (D, N, H) (the official Flax checkpoint's
    (N, D, H) and (N, H, D) are transposed on load). ``attention_fn`` (default
    :func:`gqa_attention`) and ``rotate_fn`` (default :func:`~gemma2_lite.rope.rotate`) are the
    seams a chapter swaps to try another version (see :class:`gemma2_lite.model.Components`).
    """

    #: Each weight's product, in the stored layout (see :func:`~gemma2_lite.layers.project`).
    SPECS = {"q": "BTD,NHD->BTNH", "k": "BSD,KHD->BSKH", "v": "BSD,KHD->BSKH", "o": "BTNH,DNH->BTD"}
    #: Each weight's stored axes as axes of the official layout it is drawn in: q, k, v
    #: (N|K, D, H), o (N, H, D) (see :func:`~gemma2_lite.layers.dense_init`).
    DRAWN = {"q": (0, 2, 1), "k": (0, 2, 1), "v": (0, 2, 1), "o": (2, 0, 1)}

    def __init__(
        self,
        config: Gemma2Config,
        window: int | None,
        *,
        rngs: nnx.Rngs,
        attention_fn: Callable[..., tuple[jax.Array, jax.Array]] = gqa_attention,
        rotate_fn: Callable[[jax.Array, Any], jax.Array] = rotate,
    ):
        c = config
        pd = c.jnp_param_dtype
        self.window = window
        self.attention_fn, self.rotate_fn = attention_fn, rotate_fn
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.query_scale = c.query_scale
        self.softcap = c.attn_logit_softcap
        self.rope_base = c.rope_base
        self.dtype = c.jnp_dtype
        d, n, k, h = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
        # Drawn in the official einsum layout ((N, D, H): fan-in D; (N, H, D): fan-in N·H) and
        # stored as rows, so a seed gives the values it always has (see dense_init).
        qkv_init = dense_init(1, (0, 2), stored=self.DRAWN["q"])
        self.q = nnx.Param(
            qkv_init(rngs.params(), (n, h, d), pd), logical_axes=("heads", "head_dim", "embed")
        )
        self.k = nnx.Param(
            qkv_init(rngs.params(), (k, h, d), pd), logical_axes=("kv_heads", "head_dim", "embed")
        )
        self.v = nnx.Param(
            qkv_init(rngs.params(), (k, h, d), pd), logical_axes=("kv_heads", "head_dim", "embed")
        )
        self.o = nnx.Param(
            dense_init((0, 1), 2, stored=self.DRAWN["o"])(rngs.params(), (d, n, h), pd),
            logical_axes=("embed", "heads", "head_dim"),
        )

    def __call__(
        self,
        x: jax.Array,
        rope: Any,
        mask: jax.Array,
        k_pos: jax.Array,
        cache: LayerCache | None = None,
        plan: AttentionPlan = AttentionPlan(),
        captured: dict[str, list[jax.Array]] | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """x: (B, T, D); rope: the forward's :func:`~gemma2_lite.rope.rope_table`;
        mask: bool (B, T, S') over the keys :func:`cached_keys` gives, or (B, n, C, 2C) for
        :func:`banded_attention` (built once per forward by the model); k_pos: int32 (B, T), the
        new keys' positions (-1 for padding); plan: the forward's :class:`AttentionPlan`;
        captured: the forward's intermediates, ``{name: [one array per layer so far]}`` with
        names from :data:`CAPTURES`, to which this layer appends its own (None: nothing kept,
        nothing extra computed).

        Returns the output (B, T, D) and the updated cache (or None).
        """
        dt = self.dtype
        mode = plan.for_window(self.window)
        x = x.astype(dt)
        q = project(x, self.q, self.SPECS["q"], dt)  # (B, T, N, H)
        k = project(x, self.k, self.SPECS["k"], dt)  # (B, T, K, H)
        v = project(x, self.v, self.SPECS["v"], dt)
        q = self.rotate_fn(q, rope) * jnp.asarray(self.query_scale, dt)  # (B, T, N, H)
        k = self.rotate_fn(k, rope)  # (B, T, K, H)
        keys, values, new_cache = cached_keys(mode, cache, k, v, k_pos)  # (B, S', K, H)
        if mode == "banded":  # a local layer over a whole prompt, in bands of W columns
            out = banded_attention(self.attention_fn, q, keys, values, mask, softcap=self.softcap)
        else:
            out, probs = self.attention_fn(q, keys, values, mask, softcap=self.softcap)
            if captured is not None:
                if "attn_probs" in captured:
                    captured["attn_probs"].append(probs)  # (B, T, N, S')
                if "attn_logits" in captured:
                    captured["attn_logits"].append(attention_logits(q, keys))
        out = project(out, self.o, self.SPECS["o"], dt)  # (B, T, D)
        return out, new_cache
