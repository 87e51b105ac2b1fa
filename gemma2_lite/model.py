"""The Gemma 2 decoder: embedding, L blocks alternating local and global attention, final norm,
tied unembedding and final logit soft-cap.

    h = E[tokens] * sqrt(D)
    for each layer:  h = h + post_attn_norm(attn(pre_attn_norm(h)))
                     h = h + post_ffw_norm(mlp(pre_ffw_norm(h)))
    logits = c_f * tanh((final_norm(h) @ E.T) / c_f)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .attention import Attention, LayerCache
from .checks import check_token_ids
from .config import Gemma2Config
from .layers import Embedder, FeedForward, RMSNorm, soft_cap

__all__ = ["Block", "Gemma2", "positions_from_mask", "param_counts"]


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Absolute positions of a (left-)padded batch: cumsum(mask) - 1, int32 (B, T).

    Padding gets -1 before the first real token; real tokens count 0, 1, 2, ...
    """
    mask = attention_mask.astype(jnp.int32)
    return jnp.cumsum(mask, axis=-1) - 1


class Block(nnx.Module):
    """One decoder layer, with Gemma 2's four norms (pre and post, around each sub-block)."""

    def __init__(self, config: Gemma2Config, layer_index: int, *, rngs: nnx.Rngs):
        c = config
        pd = c.jnp_param_dtype
        self.kind = c.layer_types[layer_index]
        self.pre_attn_norm = RMSNorm(c.d_model, eps=c.rms_norm_eps, param_dtype=pd)
        self.attn = Attention(c, c.window_for_layer(layer_index), rngs=rngs)
        self.post_attn_norm = RMSNorm(c.d_model, eps=c.rms_norm_eps, param_dtype=pd)
        self.pre_ffw_norm = RMSNorm(c.d_model, eps=c.rms_norm_eps, param_dtype=pd)
        self.mlp = FeedForward(c.d_model, c.ffn_dim, rngs=rngs, param_dtype=pd, dtype=c.jnp_dtype)
        self.post_ffw_norm = RMSNorm(c.d_model, eps=c.rms_norm_eps, param_dtype=pd)

    def __call__(self, x: jax.Array, positions: jax.Array, valid: jax.Array,
                 cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
        """x: (B, T, D) -> (B, T, D), plus the layer's updated cache."""
        a, cache = self.attn(self.pre_attn_norm(x), positions, valid, cache)
        x = x + self.post_attn_norm(a)
        m = self.mlp(self.pre_ffw_norm(x))
        x = x + self.post_ffw_norm(m)
        return x, cache


class Gemma2(nnx.Module):
    """Gemma 2 as a Flax NNX module.

    >>> model = Gemma2(get_config("tiny"), rngs=nnx.Rngs(0))
    >>> logits = model(tokens)                 # int32 (B, T) -> float32 (B, T, V)
    """

    def __init__(self, config: Gemma2Config, *, rngs: nnx.Rngs):
        self.config = config
        self.embedder = Embedder(config.vocab_size, config.d_model, rngs=rngs,
                                 param_dtype=config.jnp_param_dtype)
        self.layers = nnx.List([Block(config, i, rngs=rngs) for i in range(config.num_layers)])
        self.final_norm = RMSNorm(config.d_model, eps=config.rms_norm_eps,
                                  param_dtype=config.jnp_param_dtype)

    def __repr__(self) -> str:
        n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(self, nnx.Param)))
        return f"Gemma2({self.config!r}, {n:,} parameters)"

    __str__ = __repr__  # nnx's tree view is one call away: nnx.display(model)

    # ------------------------------------------------------------------ input checks
    def _check_inputs(self, tokens: Any, positions: Any,
                      cache: list[LayerCache] | None) -> jax.Array:
        """Check the call's inputs; return ``tokens`` as a JAX integer array.

        Shapes are checked always (they are static, even under ``jit``); token ids and
        positions only when they are concrete (see :mod:`gemma2_lite.checks`): inside ``jit``
        an out-of-range id embeds as NaN (:meth:`Embedder.encode`) instead of being refused.
        """
        c = self.config
        if not hasattr(tokens, "ndim"):
            tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (B, T) integers, got shape {tokens.shape}")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        # Before jnp.asarray: with 64-bit mode off an int64 id of 2**32 + 5 would become 5.
        check_token_ids(tokens, c.vocab_size, name="tokens")
        b, t = tokens.shape
        if t == 0:
            raise ValueError(f"tokens has shape {tokens.shape}: every row needs at least one "
                             "token (T >= 1)")
        if cache is None and t > c.max_seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than the model's "
                             f"context ({c.max_seq_len}); truncate it or use a larger max_seq_len")
        if positions is not None:
            if np.shape(positions) != (b, t):
                raise ValueError(f"positions has shape {np.shape(positions)}, tokens {(b, t)}: "
                                 "pass one position per token")
            if not isinstance(positions, jax.core.Tracer):
                p = np.asarray(positions)
                if p.size and p.max() >= c.max_seq_len:
                    raise ValueError(f"position {int(p.max())} is past the model's context "
                                     f"({c.max_seq_len} positions, 0..{c.max_seq_len - 1})")
        if cache is not None:
            self._check_cache(cache, b, positions)
        return jnp.asarray(tokens)

    def _check_cache(self, cache: list[LayerCache], batch: int, positions: Any) -> None:
        """A cache must have one entry per layer, the batch's rows, and room for the positions.

        A layer whose cache has fewer slots than it attends to (a global layer: all positions;
        a local one: W) is a ring buffer that overwrites keys it still needs once a position
        reaches its size: refused here when positions are concrete, since the logits would be
        silently wrong.
        """
        c = self.config
        if len(cache) != c.num_layers:
            raise ValueError(f"cache has {len(cache)} layers, the model {c.num_layers}")
        for i, layer in enumerate(cache):
            if layer.k.shape[0] != batch:
                raise ValueError(f"cache[{i}] holds {layer.k.shape[0]} rows but tokens has "
                                 f"{batch}: make the cache with init_cache(batch={batch}, ...)")
        if positions is None or isinstance(positions, jax.core.Tracer):
            return
        p = np.asarray(positions)
        if not p.size:
            return
        for i, layer in enumerate(cache):
            window = c.window_for_layer(i)
            if (window is None or layer.size < window) and p.max() >= layer.size:
                raise ValueError(
                    f"position {int(p.max())} does not fit in the cache: layer {i} has "
                    f"{layer.size} slots (positions 0..{layer.size - 1}); make a larger cache "
                    "with init_cache(batch, max_len)")

    # ------------------------------------------------------------------ forward
    def __call__(self, tokens: jax.Array, attention_mask: jax.Array | None = None, *,
                 positions: jax.Array | None = None, cache: list[LayerCache] | None = None,
                 return_hidden: bool = False) -> Any:
        """Next-token logits.

        tokens: int (B, T), ids in [0, V): checked when concrete (a
        :class:`~gemma2_lite.checks.TokenIdError` names the bad ids); under ``jit`` they cannot
        be checked and an out-of-range id turns its position's logits into NaN. attention_mask: (B, T), 1 for real tokens and 0 for padding
        (left padding); default all ones. positions: int (B, T); default cumsum(mask) - 1.
        cache: a list of L :class:`LayerCache` (see :meth:`init_cache`) for incremental decoding.

        Returns float32 logits (B, T, V); ``(logits, new_cache)`` when a cache is given; and
        with ``return_hidden`` also the residual stream after the embedding and after every layer
        (L + 1 arrays (B, T, D); the last one after the final norm, as Hugging Face reports it).
        """
        tokens = self._check_inputs(tokens, positions, cache)
        c = self.config
        if attention_mask is None:
            valid = jnp.ones(tokens.shape, bool)
        else:
            valid = jnp.asarray(attention_mask).astype(bool)
            if valid.shape != tokens.shape:
                raise ValueError(f"attention_mask shape {valid.shape} != tokens shape {tokens.shape}")
        if positions is None:
            if cache is not None:
                raise ValueError("with a cache, pass the absolute positions of the new tokens")
            positions = positions_from_mask(valid)
        positions = jnp.asarray(positions, jnp.int32)

        x = self.embedder.encode(tokens, c.jnp_dtype)                        # (B, T, D)
        hidden = [x]
        new_cache = []
        for i, block in enumerate(self.layers):
            x, layer_cache = block(x, positions, valid, None if cache is None else cache[i])
            new_cache.append(layer_cache)
            hidden.append(x)
        x = self.final_norm(x)
        hidden[-1] = x
        logits = self.embedder.decode(x).astype(jnp.float32)                 # (B, T, V)
        logits = soft_cap(logits, c.final_logit_softcap)

        out: Any = logits if cache is None else (logits, new_cache)
        if return_hidden:
            out = (*out, hidden) if isinstance(out, tuple) else (out, hidden)
        return out

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> list[LayerCache]:
        """An empty cache for ``batch`` sequences of up to ``max_len`` positions.

        Global layers get ``max_len`` slots; local layers min(W, max_len) slots (a ring buffer).
        """
        c = self.config
        if max_len > c.max_seq_len:
            raise ValueError(f"max_len {max_len} is past the model's context ({c.max_seq_len})")
        dtype = dtype or c.jnp_dtype
        sizes = [max_len if w is None else min(w, max_len)
                 for w in (c.window_for_layer(i) for i in range(c.num_layers))]
        return [LayerCache.empty(batch, s, c.num_kv_heads, c.head_dim, dtype) for s in sizes]


def param_counts(config: Gemma2Config) -> dict[str, int]:
    """Embedding and non-embedding parameter counts, by abstract evaluation (no memory used).

    For the report's configs (256128-row embedding) this gives its table exactly, e.g.
    gemma2-2b: {"embedding": 590118912, "non_embedding": 2024517888}.
    """
    abstract = nnx.eval_shape(lambda: Gemma2(config, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)
    embedding = int(np.prod(abstract.embedder.embedding.shape))
    total = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(state))
    return {"embedding": embedding, "non_embedding": total - embedding}
