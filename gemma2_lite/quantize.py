"""Weights for serving: the projections stored as rows, and int8 weight-only quantization.

A decoding step multiplies one vector per row by every weight matrix, so its speed is the speed
at which the weights are read. Two things decide it on a CPU:

* **Layout.** XLA:CPU reads a weight at memory speed in a matrix-vector product only when the
  contracted axis is the last, contiguous one: the weight stored as *rows* (out, in), as
  PyTorch's ``nn.Linear`` and the Hugging Face checkpoints store it. The model keeps the official
  einsum layout (q (N, D, H), gate (D, F), ...), so :func:`as_rows` lays each projection out as
  rows once (the embedding (V, D) is rows already and is shared).
* **Bytes.** :func:`quantize` stores each row as int8 values and one float32 scale,
  ``w[o, :] ~= scale[o] * q[o, :]`` with ``scale[o] = max |w[o, :]| / 127`` (per-channel
  symmetric): a quarter of float32's bytes, half of bf16's. The product dequantizes on the fly:
  ``y[o] = scale[o] * sum_i x[i] q[o, i]``, the int8 values converted in registers.

Both return a new :class:`~gemma2_lite.model.Gemma2` that ``generate``, ``PromptCache``,
``ChatSession`` and the CLI take like any other. Its projections are
:class:`~gemma2_lite.layers.RowProjection` modules whose values and scales are their own
variable types (:class:`Int8Values`, :class:`Int8Scale`, or :class:`~gemma2_lite.layers.Rows`),
never ``nnx.Param``: a fine-tuning filter on ``nnx.Param`` trains the norms (and any adapter
added on top, as QLoRA does) and leaves the quantized weights frozen.

    >>> small = quantize(model, "int8")          # about half the bytes of a bf16 model
    >>> generate(small, [prompt], max_new_tokens=32)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import Attention
from .layers import Embedder, FeedForward, RowProjection, Rows, RowScale
from .model import Gemma2

__all__ = [
    "quantize",
    "as_rows",
    "is_rows",
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


def is_rows(model: Gemma2) -> bool:
    """Whether ``model``'s layers already hold their weights as rows (:func:`as_rows` or
    :func:`quantize`)."""
    return any(
        isinstance(getattr(m, n), RowProjection)
        for m, n, _ in _projections(model)
        if m is not model.embedder
    )


def _copy(model: Gemma2) -> Gemma2:
    """New modules over the same arrays (nothing is copied)."""
    return nnx.merge(*nnx.split(model))


def _values(weight: Any, name: str) -> jax.Array:
    """A weight's array, checked finite (a quantization scale of inf would hide it)."""
    values = weight[...]
    if not bool(jnp.all(jnp.isfinite(values))):
        raise ValueError(
            f"weight {name} holds NaN or infinite values: it cannot be stored "
            "as rows or quantized; check the checkpoint"
        )
    return values


def as_rows(model: Gemma2) -> Gemma2:
    """``model`` with every layer's projection weights stored as rows (out, in), in their own
    dtype: the same numbers, in the layout a decoding step reads fastest (see the module's
    docstring). The layers' weights are copied (once); norms and the embedding are shared.
    A model that is already stored as rows is returned as it is."""
    if is_rows(model):
        return model
    out = _copy(model)
    for module, name, spec in _projections(out):
        if module is not out.embedder:  # E (V, D) is rows already
            setattr(module, name, RowProjection.from_weight(getattr(module, name)[...], spec))
    return out


# Rows quantized per compiled call: bounds the float32 working copy (the 2B's 256000-row
# embedding would need 2.4 GB at once).
_CHUNK_ROWS = 8192


@jax.jit
def _quantize_rows(rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """rows (R, I) of any float dtype -> int8 values (R, I), float32 scale (R,)."""
    w = rows.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(w), axis=1, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale[:, 0]


def quantize_int8(weight: jax.Array, spec: str) -> tuple[jax.Array, jax.Array]:
    """Per-channel symmetric int8 of a weight in the model's layout, used as ``spec`` says.

    Returns the values as rows, int8 (out..., in...), and the scales, float32 (out...): one
    per output channel (per token of the embedding, per (head, h) of q, per feature of gate),
    ``scale = max |w| / 127`` over the channel, ``w ~= values * scale``. Rounds to nearest;
    an all-zero channel gets scale 1 (its values are 0)."""
    out, contracted = RowProjection.axes(spec)
    perm = out + contracted
    rows = weight if perm == tuple(range(weight.ndim)) else jnp.transpose(weight, perm)
    shape = rows.shape
    flat = rows.reshape(math.prod(shape[: len(out)]), -1)  # (O, I)
    parts = [
        _quantize_rows(flat[a : a + _CHUNK_ROWS]) for a in range(0, flat.shape[0], _CHUNK_ROWS)
    ]
    values = jnp.concatenate([v for v, _ in parts]).reshape(shape)
    scale = jnp.concatenate([s for _, s in parts]).reshape(shape[: len(out)])
    return values, scale


def quantize(model: Gemma2, kind: str = "int8") -> Gemma2:
    """A copy of ``model`` whose projections (the embedding, and so the tied unembedding,
    included) are int8 values with one float32 scale per output channel; norms stay as they
    are. About half the bytes of a bf16 model, a quarter of a float32 one.

    Raises ``ValueError`` for an unknown ``kind``, a model that is already quantized or
    stored as rows, or weights that are not finite."""
    if kind not in KINDS:
        raise ValueError(f"unknown quantization {kind!r}; choose one of {list(KINDS)}")
    if not isinstance(model, Gemma2):
        raise TypeError(f"quantize takes a Gemma2 model, got {type(model).__name__}")
    if isinstance(model.embedder.embedding, RowProjection) or is_rows(model):
        raise ValueError(
            "this model is already stored as rows or quantized: quantize the original model"
        )
    out = _copy(model)
    for module, name, spec in _projections(out):
        values, scale = quantize_int8(_values(getattr(module, name), name), spec)
        n_out = len(RowProjection.axes(spec)[0])
        setattr(module, name, RowProjection(Int8Values(values), n_out, Int8Scale(scale)))
    return out


def weight_bytes(model: Gemma2) -> int:
    """Bytes of every array the model holds (parameters, rows, values and scales)."""
    return sum(int(x.nbytes) for x in jax.tree.leaves(nnx.state(model)))
