"""The modules LoRA puts in place of a weight (part of :mod:`gemma2_lite.lora`, which
re-exports them): each is read like the weight it replaces, ``w[...]``, so the model core is
not touched.

* :class:`LoRAWeight`: a frozen weight plus ``(alpha / r) A B`` in the weight's own layout;
* :class:`Dequantized`: an int8 row projection read back as float32 (QLoRA's base);
* :class:`TokenRows`: an embedding table with a few rows made trainable (new chat markers).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .layers import RowProjection

__all__ = ["LoRAWeight", "Dequantized", "TokenRows", "logical_axes"]


class _OverBase(nnx.Module):
    """A module standing in for a weight ``base``: the same shape and dtype, read with ``[...]``."""

    base: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def dtype(self) -> Any:
        return self.base[...].dtype


class LoRAWeight(_OverBase):
    """A weight plus a low-rank update, read like the weight: ``w[...]`` is
    ``base[...] + scale * (A @ B)`` laid out as ``base`` (any rank, e.g. q's (N, H, D)).

    base: the frozen weight (an ``nnx.Param``, or any variable/module answering ``[...]`` and
    ``.shape``, e.g. a dequantizing int8 weight). in_axes: which of its axes are inputs.
    A (``lora_a``): in_shape + (r,), drawn U(-1/sqrt(d_in), 1/sqrt(d_in)) as PEFT does;
    B (``lora_b``): (r,) + out_shape, zeros. scale = alpha / r (``use_rslora``: alpha / sqrt(r)).
    The sum is computed in float32 and returned in the base's dtype.
    """

    def __init__(
        self,
        base: Any,
        in_axes: tuple[int, ...],
        rank: int,
        alpha: float,
        *,
        rngs: nnx.Rngs,
        use_rslora: bool = False,
    ):
        shape = tuple(base.shape)
        self.base = base
        self.in_axes = tuple(in_axes)
        self.out_axes = tuple(i for i in range(len(shape)) if i not in self.in_axes)
        self.rank, self.alpha, self.use_rslora = int(rank), float(alpha), bool(use_rslora)
        in_shape = tuple(shape[i] for i in self.in_axes)
        out_shape = tuple(shape[i] for i in self.out_axes)
        axes = logical_axes(base, len(shape))
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        self.lora_a = nnx.LoRAParam(
            jax.random.uniform(rngs.params(), in_shape + (self.rank,), jnp.float32, -bound, bound),
            logical_axes=tuple(axes[i] for i in self.in_axes) + (None,),
        )
        self.lora_b = nnx.LoRAParam(
            jnp.zeros((self.rank,) + out_shape, jnp.float32),
            logical_axes=(None,) + tuple(axes[i] for i in self.out_axes),
        )

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def delta(self) -> jax.Array:
        """scale * A @ B in the base's layout, float32."""
        a, b = self.lora_a[...], self.lora_b[...]
        prod = jnp.tensordot(a, b, axes=1) * self.scale  # in_shape + out_shape
        return jnp.transpose(prod, np.argsort(self.in_axes + self.out_axes).tolist())

    def __getitem__(self, index: Any) -> jax.Array:
        w = self.base[...]
        return (w.astype(jnp.float32) + self.delta()).astype(w.dtype)[index]


class Dequantized(_OverBase):
    """A quantized projection, :class:`~gemma2_lite.layers.RowProjection`, read like the
    model's weight: ``d[...]`` is ``values * scale`` (float32), in the weight's own layout (rows,
    e.g. q's (N, H, D)). The QLoRA seam: :func:`apply_lora` puts a :class:`LoRAWeight` over
    this, so the frozen base stays int8 in memory (its values and scales are not ``nnx.Param``,
    so no trainer filter picks them up) and is dequantized inside the forward pass."""

    def __init__(self, base: RowProjection):
        self.base = base

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.values.shape)

    def __getitem__(self, index: Any) -> jax.Array:
        w = self.base.values[...].astype(jnp.float32)  # (out..., in...)
        if self.base.scale is not None:
            scale = self.base.scale[...].astype(jnp.float32)  # (out...)
            w = w * scale.reshape(scale.shape + (1,) * len(self.base.in_shape))
        return w[index]


class TokenRows(_OverBase):
    """An embedding table with rows ``ids`` replaced by trainable ones: ``t[...]`` is the base
    table with those rows set to ``rows`` (an ``nnx.LoRAParam`` (k, D), float32, starting as a
    copy of the old rows, so the model starts unchanged). The tied unembedding reads the same
    table, so a token's new row changes how it is read and how likely it is to be written."""

    def __init__(self, base: Any, ids: Iterable[int]):
        self.base = base
        self.ids = tuple(int(i) for i in ids)
        table = base[...]
        self.rows = nnx.LoRAParam(
            jnp.asarray(table[np.asarray(self.ids)], jnp.float32),
            logical_axes=(None, logical_axes(base, 2)[1]),
        )

    def __getitem__(self, index: Any) -> jax.Array:
        w = self.base[...]
        return w.at[np.asarray(self.ids)].set(self.rows[...].astype(w.dtype))[index]


def logical_axes(var: Any, ndim: int) -> tuple[Any, ...]:
    """The logical axis names ``var`` carries in its metadata, else ``ndim`` Nones."""
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    return tuple(meta.get("logical_axes") or (None,) * ndim)
