"""The small pieces of a Gemma 2 block: logit soft-capping, RMSNorm, the GeGLU feed-forward and
the (tied) embedding table.

Parameters carry ``logical_axes`` metadata (names such as ``"embed"`` or ``"mlp"``) so that
:mod:`gemma2_lite.sharding` can map them onto a device mesh; nothing here depends on a mesh.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["soft_cap", "rms_norm", "gelu_tanh", "RMSNorm", "FeedForward", "Embedder",
           "dense_init"]


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)``: a smooth clip of ``x`` into (-cap, cap); identity if cap is None."""
    if cap is None:
        return x
    return cap * jnp.tanh(x / cap)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = 1e-6) -> jax.Array:
    """RMSNorm with Gemma's (1 + scale) weight, computed in float32 and cast back.

    x: (..., D) any float dtype; scale: (D,). Returns x's dtype.
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU with the tanh approximation (as Gemma is trained with)."""
    return jax.nn.gelu(x, approximate=True)


def dense_init(in_axis: int | tuple[int, ...], out_axis: int | tuple[int, ...]):
    """Fan-in truncated-normal initialiser for einsum weights of any rank."""
    return nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                             in_axis=in_axis, out_axis=out_axis)


class RMSNorm(nnx.Module):
    """Root-mean-square norm with a learned (1 + scale); scale starts at zero (identity)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype: Any = jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:  # (..., D) -> (..., D)
        return rms_norm(x, self.scale[...], self.eps)


class FeedForward(nnx.Module):
    """GeGLU: ``down(activation(x @ gate) * (x @ up))`` with D -> F -> D (tanh GELU)."""

    def __init__(self, d_model: int, ffn_dim: int, *, rngs: nnx.Rngs,
                 param_dtype: Any = jnp.float32, dtype: Any = jnp.float32,
                 activation: Callable[[jax.Array], jax.Array] = gelu_tanh):
        self.dtype = dtype
        self.activation = activation     # the seam chapter 5 swaps (Components.activation)
        init = dense_init(0, 1)
        self.gate = nnx.Param(init(rngs.params(), (d_model, ffn_dim), param_dtype),
                              logical_axes=("embed", "mlp"))
        self.up = nnx.Param(init(rngs.params(), (d_model, ffn_dim), param_dtype),
                            logical_axes=("embed", "mlp"))
        self.down = nnx.Param(init(rngs.params(), (ffn_dim, d_model), param_dtype),
                              logical_axes=("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:  # (..., D) -> (..., D)
        dt = self.dtype
        # Tokens as one axis M = B·T: the same products, but the backward pass's weight
        # gradients become plain 2-D matmuls, which XLA's CPU backend runs ~3x faster than a
        # contraction over both B and T.
        m = x.astype(dt).reshape(-1, x.shape[-1])                               # (M, D)
        gate = jnp.einsum("MD,DF->MF", m, self.gate[...].astype(dt))            # (M, F)
        up = jnp.einsum("MD,DF->MF", m, self.up[...].astype(dt))                # (M, F)
        out = jnp.einsum("MF,FD->MD", self.activation(gate) * up, self.down[...].astype(dt))
        return out.reshape(x.shape)                                             # (..., D)


class Embedder(nnx.Module):
    """The token table E (V, D): ``encode`` looks rows up, ``decode`` is the tied unembedding."""

    def __init__(self, vocab_size: int, d_model: int, *, rngs: nnx.Rngs,
                 param_dtype: Any = jnp.float32):
        # std 1/sqrt(D): after the sqrt(D) input scaling, embeddings have unit-variance entries.
        init = nnx.initializers.normal(stddev=d_model ** -0.5)
        self.embedding = nnx.Param(init(rngs.params(), (vocab_size, d_model), param_dtype),
                                   logical_axes=("vocab", "embed"))

    def encode(self, tokens: jax.Array, dtype: Any) -> jax.Array:
        """int (B, T) -> (B, T, D) in ``dtype``, times sqrt(D) rounded to ``dtype`` first.

        An id outside [0, V) gives a row of NaN (never another token's row).
        """
        vocab, d_model = self.embedding.shape
        # Ids outside [0, V) can only reach here under jit (concrete ids are checked by the
        # model): they embed as NaN, which poisons the output visibly, rather than wrapping
        # (numpy-style, id -1 would read row V-1) or clamping to another token's row.
        tokens = jnp.where(tokens < 0, vocab, tokens)
        x = jnp.take(self.embedding[...], tokens, axis=0, mode="fill",
                     fill_value=jnp.nan).astype(dtype)
        # The reference casts sqrt(D) to the activation dtype before multiplying
        # (48.0 for 2B in bfloat16, not 48.0000...).
        return x * jnp.asarray(d_model ** 0.5, dtype=dtype)

    def decode(self, x: jax.Array) -> jax.Array:
        """(B, T, D) -> (B, T, V) logits with the same table (no sqrt(D) factor)."""
        m = x.reshape(-1, x.shape[-1])                   # (M, D), M = B·T: see FeedForward
        logits = jnp.einsum("MD,VD->MV", m, self.embedding[...].astype(x.dtype))
        return logits.reshape(*x.shape[:-1], -1)                                # (B, T, V)
