"""The validation loss of a model on a token stream, in fixed-shape batches (part of the trainer:
see :mod:`gemma2_lite.train`, which re-exports :func:`evaluate`).

Shapes: B batch, T sequence length, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .batching import padded_batches
from .checks import check_token_ids
from .losses import token_nll
from .model import Gemma2
from .train_config import TrainError, check_int

__all__ = ["evaluate", "token_stream"]


def token_stream(tokens: Any, vocab_size: int, name: str) -> np.ndarray:
    """``tokens`` as a 1-D int32 numpy stream of ids in [0, V), else :class:`TrainError`
    naming ``name`` (the shared check of :mod:`gemma2_lite.checks`, in the trainer's error)."""
    try:
        ids = check_token_ids(tokens, vocab_size, name=name)
    except (TypeError, ValueError) as exc:
        raise TrainError(str(exc)) from None
    if ids.ndim != 1:
        raise TrainError(f"{name} must be a 1-D integer array of token ids, got shape {ids.shape}")
    return ids.astype(np.int32)


@nnx.jit
def _eval_batch(
    model: Gemma2, inputs: jax.Array, targets: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Summed token NLL and token count of one batch (weights (B, T) 0/1 drop padding rows)."""
    nll = token_nll(model(inputs), targets)  # (B, T)
    return jnp.sum(nll * weights), jnp.sum(weights)


def evaluate(
    model: Gemma2,
    tokens: Any,
    *,
    batch_size: int = 8,
    seq_len: int = 128,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Mean next-token loss and perplexity of ``model`` on a 1-D token stream.

    The stream is cut, in order, into non-overlapping windows of T + 1 tokens (stride T: every
    token except the first is predicted once, from up to T - 1 tokens of context); the last
    partial batch is padded with zero-weight rows so one compiled shape serves all batches.
    ``max_batches`` evaluates only the first so many batches. Returns
    ``{"loss": mean nats/token, "perplexity": exp(loss), "tokens": count}``. Raises
    :class:`TrainError` for ids outside the model's vocabulary or sizes that are not positive.
    """
    check_int(batch_size, "batch_size")
    check_int(seq_len, "seq_len")
    if max_batches is not None:
        check_int(max_batches, "max_batches")
    if seq_len > model.config.max_seq_len:
        raise TrainError(
            f"seq_len {seq_len} exceeds the model's context {model.config.max_seq_len}"
        )
    # Out-of-vocabulary ids would be NaN inside the compiled batch: "val_loss: nan".
    tokens = token_stream(tokens, model.config.vocab_size, "tokens")
    count = (tokens.size - 1) // seq_len
    if count <= 0:
        raise TrainError(f"{tokens.size} tokens are fewer than one window of {seq_len + 1}")
    if max_batches is not None:
        count = min(count, max_batches * batch_size)
    windows = np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)[::seq_len][:count]
    weights = np.broadcast_to(np.ones(seq_len, np.float32), (count, seq_len))  # views
    total = n_tokens = 0.0
    for (rows, w), _ in padded_batches([windows, weights], batch_size, fill=(0, 0.0)):
        s, c = _eval_batch(
            model, jnp.asarray(rows[:, :-1]), jnp.asarray(rows[:, 1:]), jnp.asarray(w)
        )
        total += float(s)
        n_tokens += float(c)
    loss = total / n_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(n_tokens)}
