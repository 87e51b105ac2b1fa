"""The small pieces of a Gemma 2 block: logit soft-capping, RMSNorm, the GeGLU feed-forward and
the (tied) embedding table.

Parameters carry ``logical_axes`` metadata (names such as ``"embed"`` or ``"mlp"``) so that
:mod:`gemma2_lite.sharding` can map them onto a device mesh; nothing here depends on a mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "soft_cap",
    "rms_norm",
    "gelu_tanh",
    "RMSNorm",
    "FeedForward",
    "Embedder",
    "dense_init",
    "Rows",
    "RowScale",
    "RowProjection",
    "project",
    "rows_product",
    "rows_apply",
    "rows_axes",
    "drawn_shape",
    "shapes_only",
    "own_buffer",
]

# A product whose contracted vector is at least this many float32 bytes is not fused by
# XLA:CPU (its elemental matrix-vector emitter takes vectors under 16 KiB); longer ones are
# split into pieces of at most MATVEC_PIECE entries.
MATVEC_PIECE = 3072
# Up to this many rows (B·T) a product runs as that many matrix-vector products.
MATVEC_ROWS = 4


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


_SHAPES_ONLY = contextvars.ContextVar("shapes_only", default=False)


@contextlib.contextmanager
def shapes_only() -> Iterator[None]:
    """Inside, this module's initialisers draw nothing: they return zeros of the shape and
    dtype asked for. For a trace that keeps only shapes (:func:`gemma2_lite.model.abstract_model`):
    tracing the truncated-normal draws was half of the time of the 2B's abstract model (0.11 s
    of 0.2 s), which every load pays."""
    token = _SHAPES_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPES_ONLY.reset(token)


def _drawn(init: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """``init``, or zeros of the same shape and dtype inside :func:`shapes_only`."""

    def draw(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jnp.zeros(shape, dtype) if _SHAPES_ONLY.get() else init(key, shape, dtype)

    return draw


def dense_init(
    in_axis: int | tuple[int, ...],
    out_axis: int | tuple[int, ...],
    *,
    stored: tuple[int, ...] | None = None,
):
    """Fan-in truncated-normal initialiser for einsum weights of any rank.

    ``in_axis`` and ``out_axis`` index the layout the values are *drawn* in. With ``stored``,
    the initialiser is called with the stored shape and returns ``drawn.transpose(stored)``
    (stored axis j is drawn axis ``stored[j]``): the model stores its projections as rows
    (out..., in...) but draws them in the official einsum layout (q (N, D, H), gate (D, F),
    ...), so that a seed gives the numbers it always has (the book's recorded runs use them).
    """
    init = nnx.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis
    )
    if stored is None:
        return _drawn(init)

    def transposed(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jnp.transpose(init(key, drawn_shape(shape, stored), dtype), stored)

    return _drawn(transposed)


def drawn_shape(shape: tuple[int, ...], stored: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a weight stored with ``shape`` is drawn in, when stored axis j is drawn axis
    ``stored[j]`` (the model's ``DRAWN`` tables; see :func:`dense_init`)."""
    drawn = [0] * len(shape)
    for axis, size in zip(stored, shape):
        drawn[axis] = size
    return tuple(drawn)


# ---------------------------------------------------------------------------- products
class Rows(nnx.Variable):
    """A quantized projection's values, stored as rows (out..., in...) like every weight of
    the model, but outside the trained parameters: not an ``nnx.Param``, so optimisers and
    ``nnx.state(model, nnx.Param)`` leave them alone."""


class RowScale(nnx.Variable):
    """One scale per output row of a quantized :class:`Rows` weight (float32)."""


def own_buffer(x: jax.Array) -> jax.Array:
    """``x`` unchanged (``x + 0``), computed once into a buffer of its own shape.

    XLA:CPU fuses the cheap operations that make a matrix-vector product's vector (a norm's
    scaling, the GeGLU gate times up) into the product's loop, which then recomputes them
    for every row of the weight; and when the vector is a reshape of an array with more than
    one axis of length > 1 (an attention output (N, H) read as N·H), the loop converts every
    index between the two shapes, which stops it from vectorizing: 9x slower at the 2B's
    o-projection. A reduction is never fused into its consumer, so a sum over a stacked
    zero hands the product a plain vector, made once. (``-0.0`` becomes ``+0.0``: the same
    product.)
    """
    return jnp.sum(jnp.stack([x, jnp.zeros_like(x)]), axis=0)


def _matvec(x: jax.Array, values: jax.Array) -> jax.Array:
    """x (I,) float32 · values (O, I) of any dtype -> (O,) float32, in the one form XLA:CPU
    fuses with the conversion of ``values``: a row-major matrix-vector product that reads each
    weight once, converting it in registers (no float32 copy of the weight is ever made).

    Why this form: XLA:CPU computes a product with a bf16 or int8 weight by first writing a
    float32 copy of it (fresh memory every call, ~2 GB/s) unless the product is "vector ·
    transpose(convert(matrix))" with a vector under 16 KiB, which it emits as one loop. The
    contracted axis must be the weight's last (contiguous) one; longer vectors are cut into
    pieces whose partial products are concatenated and summed (summing them with ``+`` lets
    XLA fuse the addition into the product instead, which brings the copy back). ``x`` should
    be a buffer of its own (:func:`own_buffer`).
    """
    size = x.shape[0]
    if size <= MATVEC_PIECE:
        return jnp.dot(x, values.astype(jnp.float32).T)
    cuts = list(range(0, size, MATVEC_PIECE)) + [size]
    parts = [
        jnp.dot(x[a:b], values[:, a:b].astype(jnp.float32).T) for a, b in zip(cuts[:-1], cuts[1:])
    ]
    return jnp.concatenate(parts).reshape(len(parts), -1).sum(axis=0)


def rows_product(x: jax.Array, values: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """x (M, I) · values (O, I)^T [· scale (O,)] -> float32 (M, O).

    A few rows (decoding: M = B) of bf16 or int8 weights are matrix-vector products in
    float32 (:func:`_matvec`), which read the weights at memory speed; float32 weights, and many
    rows (a prompt, training), one matrix product in x's dtype with float32 accumulation (the
    weights converted to it once, when they are not already; XLA's own matrix-vector kernel
    reads float32 rows at memory speed, and faster than the fused loop at small sizes)."""
    if x.shape[0] <= MATVEC_ROWS and values.dtype != jnp.float32:
        x32 = own_buffer(x.astype(jnp.float32))  # (M, I), made once
        out = jnp.stack([_matvec(x32[r], values) for r in range(x.shape[0])])
    else:
        if jnp.issubdtype(values.dtype, jnp.integer):
            # The converted copy must not be made before x exists: XLA would otherwise convert
            # every layer's weights at the start of a prompt's program (they depend on nothing
            # else) and hold all the copies at once (4 GB for the 2B in int8). Adding a zero
            # computed from x (XLA converts NaN and inf to integer 0) makes the copy depend on
            # x without changing it; the addition is fused into the conversion.
            zero = (x[0, 0] * 0).astype(values.dtype)
            values = values + zero
        out = jax.lax.dot_general(
            x, values.astype(x.dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
    return out if scale is None else out * scale.astype(jnp.float32)


def rows_apply(
    x: jax.Array, values: jax.Array, n_out: int, dtype: Any, scale: jax.Array | None = None
) -> jax.Array:
    """x (..., in...) · values (out..., in...) [· scale (out...)] -> (..., out...) in ``dtype``:
    the in axes flattened to I, the out axes to O, one :func:`rows_product` (M, I)·(O, I)^T.

    Except for a few rows of a bf16 or int8 weight contracted over more than one axis (the
    attention output projection, (D, N, H)): flattening N and H inside XLA:CPU's fused
    matrix-vector loop converts every weight index between the two shapes, 9x slower than
    reading it. That product is a multiply and two sums instead, over the axes as stored
    (:func:`_rows_reduce`)."""
    out_shape, in_shape = values.shape[:n_out], values.shape[n_out:]
    o, i = math.prod(out_shape), math.prod(in_shape)
    lead = x.shape[: x.ndim - len(in_shape)]
    m = math.prod(lead)
    if len(in_shape) > 1 and m <= MATVEC_ROWS and values.dtype != jnp.float32:
        out = _rows_reduce(x.astype(dtype).reshape(m, *in_shape), values)  # (M, out...)
        if scale is not None:
            out = out * scale.astype(jnp.float32)
        return out.astype(dtype).reshape(*lead, *out_shape)
    scale = None if scale is None else scale.reshape(o)
    out = rows_product(x.astype(dtype).reshape(-1, i), values.reshape(o, i), scale)
    return out.astype(dtype).reshape(*lead, *out_shape)


def _rows_reduce(x: jax.Array, values: jax.Array) -> jax.Array:
    """x (M, in...) · values (out..., in...) -> float32 (M, out...), M small: for each row of
    x, ``values * x`` summed over the last axis, then over the other in axes (one sum over all
    of them at once ran 3x slower). The weight is converted in registers, never copied."""
    n_in = x.ndim - 1
    w = values.astype(jnp.float32)
    rows = []
    for r in range(x.shape[0]):
        prod = (w * x[r].astype(jnp.float32)).sum(axis=-1)  # (out..., in[:-1]...)
        rows.append(prod.sum(axis=tuple(range(prod.ndim - n_in + 1, prod.ndim))))
    return jnp.stack(rows)  # (M, out...)


@functools.cache
def rows_axes(spec: str) -> int:
    """How many leading axes of a weight are outputs, for a product ``spec`` ("x,w->y") whose
    weight is stored as rows: its output axes first, in the order y holds them, then its
    contracted axes, in the order x holds them (x's last ones). Anything else is refused."""
    (xs, ws), ys = spec.split("->")[0].split(","), spec.split("->")[1]
    out = [a for a in ys if a in ws]
    contracted = [a for a in xs if a in ws and a not in ys]
    if ws != "".join(out + contracted) or not xs.endswith("".join(contracted)):
        raise ValueError(
            f"{spec}: the weight must be stored as rows, its output axes (in the output's "
            "order) then the contracted ones (x's last axes)"
        )
    return len(out)


class RowProjection(nnx.Module):
    """A quantized weight: values stored as rows (out..., in...) and one float32 scale per
    output row; ``w = values * scale`` (per row).

    Made by :mod:`gemma2_lite.quantize` in place of a projection's ``nnx.Param`` (stored as
    rows already); the module that owns the weight calls :func:`project` either way.
    ``values`` and ``scale`` are their own variable types (:class:`Rows`, :class:`RowScale`, or
    subclasses), never ``nnx.Param``: a fine-tuning filter that takes ``nnx.Param`` leaves them
    frozen (adapters go on top).
    """

    def __init__(self, values: Rows, n_out: int, scale: RowScale | None = None):
        self.values = values
        self.scale = scale
        self.n_out = n_out

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape[: self.n_out])

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape[self.n_out :])

    def __call__(self, x: jax.Array, dtype: Any) -> jax.Array:
        """x (..., in...) -> (..., out...) in ``dtype``."""
        scale = None if self.scale is None else self.scale[...]
        return rows_apply(x, self.values[...], self.n_out, dtype, scale)


def project(x: jax.Array, weight: Any, spec: str, dtype: Any) -> jax.Array:
    """``einsum(spec, x, weight)`` in ``dtype`` (float32 accumulation), for a weight stored as
    rows (out..., in...): an ``nnx.Param`` (or anything read by ``weight[...]``) or a quantized
    :class:`RowProjection`.

    A few rows (decoding) go to :func:`rows_apply`: matrix-vector products that read a bf16 or
    int8 weight in place at memory speed (a multiply and sums for the attention output's
    weight, contracted over two axes), XLA's own kernel for a float32 one
    (the einsum over the weight's own axes copied a float32 weight's attention projections on
    every decoded token: 13.4 MiB a step on the 20M bench model, decode 2.3x transformers'
    against 3.5x). Anything else is the einsum itself (the weight converted to ``dtype``
    once), whose saved values for the backward pass are what :mod:`gemma2_lite.memory`
    counts."""
    if isinstance(weight, RowProjection):
        return weight(x, dtype)
    w = weight[...]
    n_out = rows_axes(spec)
    rows = math.prod(x.shape[: x.ndim - (w.ndim - n_out)])
    if rows <= MATVEC_ROWS:
        return rows_apply(x, w, n_out, dtype)
    out = jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    return out.astype(dtype)


class RMSNorm(nnx.Module):
    """Root-mean-square norm with a learned (1 + scale); scale starts at zero (identity)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype: Any = jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:  # (..., D) -> (..., D)
        return rms_norm(x, self.scale[...], self.eps)


class FeedForward(nnx.Module):
    """GeGLU: ``down(activation(x @ gate) * (x @ up))`` with D -> F -> D (tanh GELU).

    Weights are stored as rows (out, in), as Hugging Face ships them: gate and up (F, D),
    down (D, F).
    """

    #: Each weight's product, in the stored layout (see :func:`project`).
    SPECS = {"gate": "MD,FD->MF", "up": "MD,FD->MF", "down": "MF,DF->MD"}
    #: Each weight's stored axes as axes of the official layout it is drawn in, (D, F) and
    #: (F, D) (see :func:`dense_init`).
    DRAWN = {"gate": (1, 0), "up": (1, 0), "down": (1, 0)}

    def __init__(
        self,
        d_model: int,
        ffn_dim: int,
        *,
        rngs: nnx.Rngs,
        param_dtype: Any = jnp.float32,
        dtype: Any = jnp.float32,
        activation: Callable[[jax.Array], jax.Array] = gelu_tanh,
    ):
        self.dtype = dtype
        self.activation = activation  # the seam chapter 5 swaps (Components.activation)
        # Drawn as (in, out), fan-in over the first axis, stored transposed (see dense_init).
        init = {name: dense_init(0, 1, stored=axes) for name, axes in self.DRAWN.items()}
        self.gate = nnx.Param(
            init["gate"](rngs.params(), (ffn_dim, d_model), param_dtype),
            logical_axes=("mlp", "embed"),
        )
        self.up = nnx.Param(
            init["up"](rngs.params(), (ffn_dim, d_model), param_dtype),
            logical_axes=("mlp", "embed"),
        )
        self.down = nnx.Param(
            init["down"](rngs.params(), (d_model, ffn_dim), param_dtype),
            logical_axes=("embed", "mlp"),
        )

    def __call__(self, x: jax.Array) -> jax.Array:  # (..., D) -> (..., D)
        dt = self.dtype
        # Tokens as one axis M = B·T: the backward pass's weight gradients are then plain
        # 2-D matmuls, which XLA's CPU backend runs ~3x faster than a contraction over B and T.
        m = x.astype(dt).reshape(-1, x.shape[-1])  # (M, D)
        gate = project(m, self.gate, self.SPECS["gate"], dt)  # (M, F)
        up = project(m, self.up, self.SPECS["up"], dt)  # (M, F)
        out = project(self.activation(gate) * up, self.down, self.SPECS["down"], dt)  # (M, D)
        return out.reshape(x.shape)  # (..., D)


class Embedder(nnx.Module):
    """The token table E (V, D): ``encode`` looks rows up, ``decode`` is the tied unembedding.

    E is an ``nnx.Param`` (V, D), rows (out V, in D) like every projection, or a quantized
    :class:`RowProjection` (values (V, D), one scale per token): both directions read the same
    rows.
    """

    SPEC = "MD,VD->MV"  # the unembedding

    def __init__(
        self, vocab_size: int, d_model: int, *, rngs: nnx.Rngs, param_dtype: Any = jnp.float32
    ):
        # std 1/sqrt(D): after the sqrt(D) input scaling, embeddings have unit-variance entries.
        init = _drawn(nnx.initializers.normal(stddev=d_model**-0.5))
        self.embedding = nnx.Param(
            init(rngs.params(), (vocab_size, d_model), param_dtype), logical_axes=("vocab", "embed")
        )

    def encode(self, tokens: jax.Array, dtype: Any) -> jax.Array:
        """int (B, T) -> (B, T, D) in ``dtype``, times sqrt(D) rounded to ``dtype`` first.

        An id outside [0, V) gives a row of NaN (never another token's row).
        """
        table = self.embedding
        values = table.values[...] if isinstance(table, RowProjection) else table[...]
        vocab, d_model = values.shape
        # Ids outside [0, V) can only reach here under jit (concrete ids are checked by the
        # model): they embed as NaN, which poisons the output visibly, rather than wrapping
        # (numpy-style, id -1 would read row V-1) or clamping to another token's row.
        tokens = jnp.where(tokens < 0, vocab, tokens)
        if isinstance(table, RowProjection) and table.scale is not None:
            rows = jnp.take(values, tokens, axis=0, mode="fill", fill_value=0)
            scale = jnp.take(
                table.scale[...], tokens, axis=0, mode="fill", fill_value=jnp.nan
            )  # (B, T)
            x = (rows.astype(jnp.float32) * scale[..., None]).astype(dtype)
        else:
            x = jnp.take(values, tokens, axis=0, mode="fill", fill_value=jnp.nan).astype(dtype)
        # The reference casts sqrt(D) to the activation dtype before multiplying
        # (48.0 for 2B in bfloat16, not 48.0000...).
        return x * jnp.asarray(d_model**0.5, dtype=dtype)

    def decode(self, x: jax.Array) -> jax.Array:
        """(B, T, D) -> (B, T, V) logits with the same table (no sqrt(D) factor)."""
        m = x.reshape(-1, x.shape[-1])  # (M, D), M = B·T: see FeedForward
        logits = project(m, self.embedding, self.SPEC, x.dtype)  # (M, V)
        return logits.reshape(*x.shape[:-1], -1)  # (B, T, V)
