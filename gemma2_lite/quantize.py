"""int8 weight-only quantization for serving.

A decoding step multiplies one vector per row by every weight matrix, so its speed is the speed
at which the weights are read. Two things decide it on a CPU:

* **Layout.** XLA:CPU reads a weight at memory speed in a matrix-vector product only when the
  contracted axis is the last, contiguous one: the weight stored as *rows* (out, in), as
  PyTorch's ``nn.Linear`` and the Hugging Face checkpoints store it. The model stores every
  projection so (q (N, H, D), gate (F, D), the embedding (V, D), ...; see
  :func:`gemma2_lite.layers.project`), and decodes from its own weights, with no copy.
* **Bytes.** :func:`quantize` stores each row as int8 values and one float32 scale,
  ``w[o, :] ~= scale[o] * q[o, :]`` with ``scale[o] = max |w[o, :]| / 127`` (per-channel
  symmetric): a quarter of float32's bytes, half of bf16's. The product dequantizes on the fly:
  ``y[o] = scale[o] * sum_i x[i] q[o, i]``, the int8 values converted in registers.

:func:`quantize` returns a new :class:`~gemma2_lite.model.Gemma2` that ``generate``,
``PromptCache``, ``ChatSession`` and the CLI take like any other. Its projections are
:class:`~gemma2_lite.layers.RowProjection` modules whose values and scales are their own variable
types (:class:`Int8Values`, :class:`Int8Scale`), never ``nnx.Param``: a fine-tuning filter on
``nnx.Param`` trains the norms (and any adapter added on top, as QLoRA does) and leaves the
quantized weights frozen.

    >>> small = quantize(model, "int8")          # about half the bytes of a bf16 model
    >>> generate(small, [prompt], max_new_tokens=32)
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import Attention
from .layers import Embedder, FeedForward, RowProjection, Rows, RowScale, rows_axes
from .model import Gemma2

__all__ = [
    "quantize",
    "is_quantized",
    "quantize_int8",
    "Int8Values",
    "Int8Scale",
    "weight_bytes",
    "KINDS",
]

#: What :func:`quantize` can make.
KINDS = ("int8",)


class Int8Values(Rows):
    """The int8 values of a quantized projection, stored as rows (out..., in...)."""


class Int8Scale(RowScale):
    """The float32 scale of each output row of a quantized projection."""


def _projections(model: Gemma2) -> Iterator[tuple[nnx.Module, str, str]]:
    """Every projection weight of ``model``: (owning module, attribute, einsum spec)."""
    yield model.embedder, "embedding", Embedder.SPEC
    for block in model.layers:
        for name, spec in Attention.SPECS.items():
            yield block.attn, name, spec
        for name, spec in FeedForward.SPECS.items():
            yield block.mlp, name, spec


def is_quantized(model: Gemma2) -> bool:
    """Whether any of ``model``'s projections is a quantized :class:`RowProjection`."""
    return any(isinstance(getattr(m, n), RowProjection) for m, n, _ in _projections(model))


def _copy(model: Gemma2) -> Gemma2:
    """New modules and variables over the same arrays (no array is copied; setting a variable
    of the copy leaves ``model`` as it is)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))


@jax.jit
def _row_scales(rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """rows (R, I) of any float dtype -> float32 (R,) scales, ``max |row| / 127`` (1 for an
    all-zero row), and whether every value is finite (``max`` propagates a NaN, and an
    infinity is its own maximum)."""
    absmax = jnp.max(jnp.abs(rows), axis=1).astype(jnp.float32)
    return jnp.where(absmax > 0, absmax / 127.0, 1.0), jnp.all(jnp.isfinite(absmax))


@jax.jit
def _row_values(rows: jax.Array, scale: jax.Array) -> jax.Array:
    """rows (R, I), scale float32 (R,) -> int8 (R, I): each value over its row's scale, rounded
    to nearest (ties to even) and clipped to +-127."""
    return jnp.clip(jnp.round(rows.astype(jnp.float32) / scale[:, None]), -127, 127).astype(
        jnp.int8
    )


def quantize_int8(
    weight: jax.Array, spec: str, name: str = "the weight"
) -> tuple[jax.Array, jax.Array]:
    """Per-channel symmetric int8 of a weight stored as rows (out..., in...), used as ``spec``
    says (e.g. ``"MD,FD->MF"``: gate's (F, D), one output axis).

    Returns the values, int8, in the weight's shape, and the scales, float32 (out...): one
    per output channel (per token of the embedding, per (head, h) of q, per feature of gate),
    ``scale = max |w| / 127`` over the channel, ``w ~= values * scale``. Rounds to nearest;
    an all-zero channel gets scale 1 (its values are 0). Raises ``ValueError`` naming ``name``
    if the weight holds NaN or infinite values (a scale of inf would hide them).

    Two compiled passes over the weight, the row scales then the values, each reading it once
    and converting in registers: in one program XLA:CPU wrote a float32 copy of the weight
    first, for both passes to read (6x slower, and 2.4 GB at once for the 2B's embedding)."""
    n_out = rows_axes(spec)
    shape = weight.shape
    flat = weight.reshape(math.prod(shape[:n_out]), -1)  # (O, I)
    scale, finite = _row_scales(flat)  # (O,), ()
    if not bool(finite):
        raise ValueError(
            f"{name} holds NaN or infinite values: it cannot be quantized; check the checkpoint"
        )
    return _row_values(flat, scale).reshape(shape), scale.reshape(shape[:n_out])


def quantize(model: Gemma2, kind: str = "int8") -> Gemma2:
    """A copy of ``model`` whose projections (the embedding, and so the tied unembedding,
    included) are int8 values with one float32 scale per output channel; norms stay as they
    are. About half the bytes of a bf16 model, a quarter of a float32 one.

    Raises ``ValueError`` for an unknown ``kind``, a model that is already quantized, or
    weights that are not finite."""
    if kind not in KINDS:
        raise ValueError(f"unknown quantization {kind!r}; choose one of {list(KINDS)}")
    if not isinstance(model, Gemma2):
        raise TypeError(f"quantize takes a Gemma2 model, got {type(model).__name__}")
    if is_quantized(model):
        raise ValueError("this model is already quantized: quantize the original model")
    out = _copy(model)
    for module, name, spec in _projections(out):
        values, scale = quantize_int8(getattr(module, name)[...], spec, f"weight {name}")
        setattr(module, name, RowProjection(Int8Values(values), rows_axes(spec), Int8Scale(scale)))
    # The weights that stay (the norms) are copied: shared, they would keep the original's
    # memory alive after it is dropped (a loaded model's arrays are views of its files).
    kept = nnx.state(out, nnx.Param)
    nnx.update(out, jax.tree.map(lambda x: jnp.array(x, copy=True), kept))
    return out


def weight_bytes(model: Gemma2) -> int:
    """Bytes of every array the model holds (parameters, rows, values and scales)."""
    return sum(int(x.nbytes) for x in jax.tree.leaves(nnx.state(model)))
