"""Grouped-query attention with Gemma 2's soft-capped logits and sliding-window / global masks.

Shapes (the book's Notation page, ``book/notation.md``): B batch, T queries, S keys, D width,
N query heads, K key/value heads, G = N / K query heads per key/value head, H head dimension.

Keys and values are never repeated to N heads: queries are viewed as (B, T, K, G, H) and each
group of G query heads attends to its one key/value head ('BTKGH,BSKH->BTKGS').

Masks are built from absolute *positions*, not array indices, so the same code serves padded
batches (positions = cumsum(mask) - 1) and key/value caches whose slots are a ring buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .config import Gemma2Config
from .layers import dense_init, soft_cap
from .rope import apply_rope

__all__ = ["attention_mask", "causal_mask", "sliding_window_mask", "LayerCache", "Attention",
           "gqa_attention"]

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


def gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                  softcap: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Soft-capped, masked grouped-query attention (queries already scaled and rotated).

    q: (B, T, N, H); k, v: (B, S, K, H); mask: bool (B, T, S).
    Returns the output (B, T, N, H) in q's dtype and the probabilities (B, T, N, S) float32.
    The cap is applied to the logits *before* the mask, as in Gemma 2.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    if n % kv_heads:
        raise ValueError(f"{n} query heads cannot be grouped over {kv_heads} key/value heads")
    qg = q.reshape(b, t, kv_heads, n // kv_heads, h)                        # (B, T, K, G, H)
    logits = jnp.einsum("BTKGH,BSKH->BTKGS", qg, k).astype(jnp.float32)
    logits = soft_cap(logits, softcap)
    logits = jnp.where(mask[:, :, None, None, :], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)                                 # (B, T, K, G, S)
    out = jnp.einsum("BTKGS,BSKH->BTKGH", probs.astype(v.dtype), v)
    return out.reshape(b, t, n, h), probs.reshape(b, t, n, -1)


@jax.tree_util.register_dataclass
@dataclass
class LayerCache:
    """One layer's key/value cache: ``S`` slots, written at slot = position mod S.

    k, v: (B, S, K, H); pos: int32 (B, S), the absolute position held by each slot, -1 if empty.
    A global layer gets S = the longest sequence to decode; a local (sliding-window) layer needs
    only S = W slots, a ring buffer, since older keys are outside its window anyway.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array

    @classmethod
    def empty(cls, batch: int, size: int, kv_heads: int, head_dim: int,
              dtype: Any = jnp.float32) -> "LayerCache":
        shape = (batch, size, kv_heads, head_dim)
        # Two distinct buffers: sharing one would make donating k and v donate it twice.
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   pos=jnp.full((batch, size), -1, jnp.int32))

    @property
    def size(self) -> int:
        return self.pos.shape[1]

    def __repr__(self) -> str:
        b, s, k, h = self.k.shape
        return f"LayerCache(B={b}, S={s}, K={k}, H={h}, dtype={self.k.dtype})"

    def update(self, k: jax.Array, v: jax.Array, pos: jax.Array) -> "LayerCache":
        """Write new keys/values k, v (B, T, K, H) at positions pos (B, T; -1 = padding).

        Of a chunk longer than the cache only the last S positions are kept; writing them at
        pos mod S never collides because S consecutive positions have distinct residues.
        """
        size = self.size
        last = jnp.max(pos, axis=1, keepdims=True)                           # (B, 1)
        keep = (pos >= 0) & (pos > last - size)
        slot = jnp.where(keep, pos % size, size)                             # size -> dropped
        rows = jnp.arange(pos.shape[0])[:, None]
        return LayerCache(
            k=self.k.at[rows, slot].set(k.astype(self.k.dtype), mode="drop"),
            v=self.v.at[rows, slot].set(v.astype(self.v.dtype), mode="drop"),
            pos=self.pos.at[rows, slot].set(pos.astype(jnp.int32), mode="drop"),
        )


class Attention(nnx.Module):
    """Gemma 2 self-attention for one layer (local if ``window`` is set, else global).

    Weights follow the official checkpoint's einsum layout:
    q (N, D, H), k (K, D, H), v (K, D, H), o (N, H, D).
    """

    def __init__(self, config: Gemma2Config, window: int | None, *, rngs: nnx.Rngs):
        c = config
        pd = c.jnp_param_dtype
        self.window = window
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.query_scale = c.query_scale
        self.softcap = c.attn_logit_softcap
        self.rope_base = c.rope_base
        self.dtype = c.jnp_dtype
        d, n, k, h = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
        self.q = nnx.Param(dense_init(1, (0, 2))(rngs.params(), (n, d, h), pd),
                           logical_axes=("heads", "embed", "head_dim"))
        self.k = nnx.Param(dense_init(1, (0, 2))(rngs.params(), (k, d, h), pd),
                           logical_axes=("kv_heads", "embed", "head_dim"))
        self.v = nnx.Param(dense_init(1, (0, 2))(rngs.params(), (k, d, h), pd),
                           logical_axes=("kv_heads", "embed", "head_dim"))
        self.o = nnx.Param(dense_init((0, 1), 2)(rngs.params(), (n, h, d), pd),
                           logical_axes=("heads", "head_dim", "embed"))

    def __call__(self, x: jax.Array, positions: jax.Array, valid: jax.Array,
                 cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
        """x: (B, T, D); positions: int (B, T); valid: bool (B, T), False for padding.

        With a cache, the new keys attend together with the cached ones, then are written into
        it. Returns the output (B, T, D) and the updated cache (or None).
        """
        dt = self.dtype
        x = x.astype(dt)
        q = jnp.einsum("BTD,NDH->BTNH", x, self.q[...].astype(dt))
        k = jnp.einsum("BSD,KDH->BSKH", x, self.k[...].astype(dt))
        v = jnp.einsum("BSD,KDH->BSKH", x, self.v[...].astype(dt))
        q = apply_rope(q, positions, self.rope_base) * jnp.asarray(self.query_scale, dt)
        k = apply_rope(k, positions, self.rope_base)

        k_pos = jnp.where(valid, positions, -1).astype(jnp.int32)            # (B, T)
        if cache is None:
            keys, values, key_pos, new_cache = k, v, k_pos, None
        else:
            keys = jnp.concatenate([cache.k.astype(dt), k], axis=1)           # (B, S+T, K, H)
            values = jnp.concatenate([cache.v.astype(dt), v], axis=1)
            key_pos = jnp.concatenate([cache.pos, k_pos], axis=1)            # (B, S+T)
            new_cache = cache.update(k, v, k_pos)

        mask = attention_mask(positions, key_pos, self.window)              # (B, T, S)
        out, _ = gqa_attention(q, keys, values, mask, softcap=self.softcap)  # (B, T, N, H)
        out = jnp.einsum("BTNH,NHD->BTD", out, self.o[...].astype(dt))
        return out, new_cache
