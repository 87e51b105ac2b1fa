"""The losses every trainer in the book shares: next-token negative log-likelihood, its masked
mean, and the hard-label cross-entropy. Distillation's soft losses build on these in
:mod:`gemma2_lite.distill`; :mod:`gemma2_lite.train` uses them for training and evaluation.

Shapes: B batch, T positions, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["token_nll", "masked_mean", "cross_entropy_loss", "check_logits"]


def check_logits(name: str, x: jax.Array, ndim: int = 3) -> None:
    """Raise naming ``name`` unless ``x`` is a floating-point array of ``ndim`` dimensions
    ((B, T, V) logits, or (B, T, k) top-k logits): the check every loss runs first."""
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D (B, T, V or k), got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point, got dtype {x.dtype}")


def masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of ``values`` (B, T) over positions where ``mask`` (B, T) is true; float32 scalar.

    A fully masked batch gives 0 (not NaN), and its gradient is 0, so padding-only batches are
    harmless. Masked entries are zeroed with ``where`` (not multiplied), so even a NaN/inf in a
    masked position cannot leak into the result.
    """
    values = values.astype(jnp.float32)
    if mask is None:
        return jnp.mean(values)
    mask = jnp.asarray(mask)
    if mask.shape != values.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must equal the loss shape {tuple(values.shape)} (B, T)"
        )
    mask = mask.astype(bool)
    total = jnp.sum(jnp.where(mask, values, 0.0))
    count = jnp.sum(mask.astype(jnp.float32))
    return total / jnp.maximum(count, 1.0)


def cross_entropy_loss(
    logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Mean next-token cross-entropy (the one-hot / hard-label loss), float32 scalar.

    logits: float (B, T, V); targets: int (B, T) in [0, V); mask: (B, T), 1 = count the position.
    """
    check_logits("logits", logits)
    if targets.shape != logits.shape[:2]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must be logits' (B, T) = "
            f"{tuple(logits.shape[:2])}"
        )
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(f"targets must be integer token ids, got dtype {targets.dtype}")
    return masked_mean(token_nll(logits, targets), mask)


@jax.custom_vjp
def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-position negative log-likelihood -log softmax(logits)[target]: float (B, T, V) and
    int (B, T) -> float32 (B, T). Training's loss, evaluation's perplexity and the post-training
    loss on model turns are all masked means or sums of this.

    Computed as logsumexp(z) - z[target], with its gradient written out by hand
    (:func:`_token_nll_bwd`): d nll / dz = softmax(z) - onehot(target). Automatic
    differentiation gives the same numbers but keeps the (B, T, V) exponentials from the forward
    pass and scatters the -1 into a copy; the hand-written rule recomputes exp(z - lse) in one
    fused pass over the logits, which made the tiny preset's whole training step about 8%
    faster on a CPU (``benchmarks/train_step.py``). ``tests/test_distill.py`` checks it against
    ``jax.grad`` of the plain formula.
    """
    return _token_nll_fwd(logits, targets)[0]


def _token_nll_fwd(
    logits: jax.Array, targets: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    z = logits.astype(jnp.float32)  # (B, T, V)
    lse = jax.nn.logsumexp(z, axis=-1)  # (B, T)
    picked = jnp.take_along_axis(z, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse - picked, (logits, targets, lse)  # (B, T)


def _token_nll_bwd(
    saved: tuple[jax.Array, jax.Array, jax.Array], g: jax.Array
) -> tuple[jax.Array, None]:
    logits, targets, lse = saved
    z = logits.astype(jnp.float32)  # (B, T, V)
    vocab = jnp.arange(z.shape[-1], dtype=jnp.int32)  # (V,)
    onehot = targets[..., None].astype(jnp.int32) == vocab  # (B, T, V) bool
    grad = g[..., None] * (jnp.exp(z - lse[..., None]) - onehot)  # (B, T, V)
    return grad.astype(logits.dtype), None  # integer targets get no gradient


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)
