"""Rotary position embeddings (RoFormer, Su et al. 2021), split-half convention.

Feature i of the first half is paired with feature i + H/2 of the second half and the pair is
rotated by angle ``position * θ^(-2i/H)``. Gemma (official code and Hugging Face alike) uses this
"rotate-half" layout, so no weight permutation is needed between the two checkpoints.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["rope_frequencies", "rope_angles", "rope_table", "rotate", "apply_rope"]


def rope_frequencies(head_dim: int, base: float = 10_000.0) -> jax.Array:
    """The H/2 angular frequencies θ^(-2i/H), i = 0 .. H/2-1, float32."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    fraction = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    # 1 / θ^f rather than θ^-f: the same number, rounded as the reference rounds it, which
    # matters at long positions where the angle is position × frequency.
    return 1.0 / (base**fraction)


def rope_angles(positions: jax.Array, head_dim: int, base: float = 10_000.0) -> jax.Array:
    """Angles position × frequency: int (B, T) -> float32 (B, T, H/2)."""
    return positions.astype(jnp.float32)[..., None] * rope_frequencies(head_dim, base)


def rope_table(
    positions: jax.Array, head_dim: int, base: float = 10_000.0
) -> tuple[jax.Array, jax.Array]:
    """The rotation of every position, built once per forward and shared by all layers:
    int (B, T) -> (sin, cos), float32 (B, T, 1, H/2) each (the 1 broadcasts over heads)."""
    angles = rope_angles(positions, head_dim, base)[:, :, None, :]  # (B, T, 1, H/2)
    return jnp.sin(angles), jnp.cos(angles)


def rotate(x: jax.Array, table: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate queries or keys x (B, T, N, H) by a :func:`rope_table`; returns x's dtype.

    The rotation is computed in float32 (as the reference does) and cast back.
    """
    sin, cos = table  # (B, T, 1, H/2) each
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # (B, T, N, H/2) each
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
    """Rotate queries or keys by their positions: ``rotate(x, rope_table(positions, H, base))``.

    x: (B, T, N, H) any float dtype; positions: int (B, T). Returns (B, T, N, H) in x's dtype.
    """
    return rotate(x, rope_table(positions, x.shape[-1], base))
