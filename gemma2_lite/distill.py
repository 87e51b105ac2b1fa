"""Knowledge distillation: train a student on a teacher's next-token *distribution*.

A one-hot target says only which token came next; a teacher's distribution also says how
plausible every other token was (Hinton et al., 2015). Gemma 2's 2B and 9B models were trained
this way from a larger teacher (Gemma Team, 2024). Per position the loss is the cross-entropy
from the teacher distribution P_T to the student distribution P_S,

    loss = - sum_x P_T(x | ctx) log P_S(x | ctx)  =  KL(P_T || P_S) + H(P_T),

which has the same gradient as the KL divergence (H(P_T) does not depend on the student).
With a temperature tau both distributions are softmax(logits / tau), and the loss is multiplied
by tau^2 so that its gradient keeps the same scale as tau changes (the gradient of the softened
loss w.r.t. the logits shrinks like 1 / tau^2 for large tau).

Storing a 256k-way distribution per training token is impossible, so the teacher's top-k logits
are stored (values + ids) and both distributions are renormalised over those k ids
(:func:`topk_distillation_loss`); :func:`save_teacher_topk` writes them compactly.

Shapes: B batch, T positions, V vocabulary, k kept logits per position.
"""

from __future__ import annotations

import functools
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .batching import padded_batches
from .checks import check_int

# The hard-label loss and the masked mean live in the one loss module (re-exported here).
from .losses import check_logits, cross_entropy_loss, masked_mean

__all__ = [
    "cross_entropy_loss",
    "distillation_loss",
    "topk_distillation_loss",
    "mixed_loss",
    "kl_divergence",
    "masked_mean",
    "compute_teacher_topk",
    "save_teacher_topk",
    "load_teacher_topk",
    "topk_bytes_per_token",
]


# ----------------------------------------------------------------------------- helpers
def _check_temperature(temperature: float) -> None:
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")


def _soft_cross_entropy(
    student_logits: jax.Array, teacher_logits: jax.Array, temperature: float
) -> jax.Array:
    """Per-position tau^2 * sum_x -P_T log P_S over the last axis: (B, T, X) -> (B, T)."""
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    p_t = jax.nn.softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    # where(p_t > 0): a teacher logit of -inf gives p_t = 0 and must contribute 0, not 0 * -inf.
    ce = -jnp.sum(jnp.where(p_t > 0, p_t * s, 0.0), axis=-1)
    return ce * (temperature**2)


# ----------------------------------------------------------------------------- losses
def distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float = 1.0,
    mask: jax.Array | None = None,
    alpha: float | None = None,
    targets: jax.Array | None = None,
) -> jax.Array:
    """Cross-entropy from the teacher's to the student's distribution, mean over positions.

    student_logits, teacher_logits: float (B, T, V). mask: (B, T), 1 = count the position.
    Both distributions use ``temperature`` tau and the loss is scaled by tau^2.
    The teacher is treated as a constant (its gradient is stopped).

    With ``alpha`` (and ``targets`` int (B, T)), returns
    ``alpha * distillation + (1 - alpha) * hard-label cross-entropy`` (the hard loss at tau = 1),
    as in Hinton et al. (2015); ``alpha=None`` (default) is pure distillation.
    Returns a float32 scalar.
    """
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    _check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same (B, T, V) shape; "
            "for a stored top-k teacher use topk_distillation_loss"
        )
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    soft = masked_mean(_soft_cross_entropy(student_logits, teacher_logits, temperature), mask)
    return _mix(soft, student_logits, alpha, targets, mask)


def topk_distillation_loss(
    student_logits: jax.Array,
    teacher_topk_logits: jax.Array,
    teacher_topk_ids: jax.Array,
    *,
    temperature: float = 1.0,
    mask: jax.Array | None = None,
    alpha: float | None = None,
    targets: jax.Array | None = None,
) -> jax.Array:
    """Distillation from a stored sparse teacher: only its top-k logits per position.

    student_logits: float (B, T, V); teacher_topk_logits: float (B, T, k) (any float dtype, e.g.
    bfloat16 as stored); teacher_topk_ids: int (B, T, k), the vocabulary ids of those logits.
    Both distributions are renormalised over the k ids (softmax over k entries), at temperature
    tau, and the loss is scaled by tau^2. With k = V (all ids) this equals
    :func:`distillation_loss`. ``alpha``/``targets`` mix in the hard-label loss as there.
    Returns a float32 scalar, the mean over unmasked positions.
    """
    check_logits("student_logits", student_logits)
    check_logits("teacher_topk_logits", teacher_topk_logits)
    _check_temperature(temperature)
    if teacher_topk_ids.shape != teacher_topk_logits.shape:
        raise ValueError(
            f"teacher_topk_ids shape {tuple(teacher_topk_ids.shape)} must equal "
            f"teacher_topk_logits shape {tuple(teacher_topk_logits.shape)} (B, T, k)"
        )
    if not jnp.issubdtype(teacher_topk_ids.dtype, jnp.integer):
        raise TypeError(f"teacher_topk_ids must be integer ids, got {teacher_topk_ids.dtype}")
    if teacher_topk_logits.shape[:2] != student_logits.shape[:2]:
        raise ValueError(
            f"teacher top-k (B, T) = {tuple(teacher_topk_logits.shape[:2])} does not "
            f"match the student's (B, T) = {tuple(student_logits.shape[:2])}"
        )
    k, vocab = teacher_topk_logits.shape[-1], student_logits.shape[-1]
    if k > vocab:
        raise ValueError(
            f"k = {k} teacher logits per position but the student has only V = {vocab}"
        )
    ids = teacher_topk_ids.astype(jnp.int32)
    student_k = jnp.take_along_axis(student_logits, ids, axis=-1)  # (B, T, k)
    teacher_k = jax.lax.stop_gradient(teacher_topk_logits)
    soft = masked_mean(_soft_cross_entropy(student_k, teacher_k, temperature), mask)
    return _mix(soft, student_logits, alpha, targets, mask)


def _mix(
    soft: jax.Array,
    student_logits: jax.Array,
    alpha: float | None,
    targets: jax.Array | None,
    mask: jax.Array | None,
) -> jax.Array:
    if alpha is None:
        if targets is not None:
            raise ValueError(
                "targets were given without alpha; pass alpha in [0, 1] to mix the "
                "hard-label loss in (alpha weighs the distillation term)"
            )
        return soft
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(
            f"alpha must be in [0, 1] (weight of the distillation term), got {alpha!r}"
        )
    if targets is None:
        raise ValueError("alpha mixes in the hard-label loss, which needs targets (B, T) int")
    hard = cross_entropy_loss(student_logits, targets, mask)
    return alpha * soft + (1.0 - alpha) * hard


def mixed_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    targets: jax.Array,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    mask: jax.Array | None = None,
) -> jax.Array:
    """``alpha * distillation_loss + (1 - alpha) * cross_entropy_loss`` (float32 scalar)."""
    return distillation_loss(
        student_logits,
        teacher_logits,
        temperature=temperature,
        mask=mask,
        alpha=alpha,
        targets=targets,
    )


def kl_divergence(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float = 1.0,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Mean KL(P_T || P_S) over unmasked positions (no tau^2 factor), float32 scalar.

    Equals ``distillation_loss / tau^2`` minus the teacher's mean entropy; zero iff the student
    matches the teacher. Shapes as in :func:`distillation_loss`.
    """
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    _check_temperature(temperature)
    log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    p_t = jnp.exp(log_t)
    kl = jnp.sum(jnp.where(p_t > 0, p_t * (log_t - log_s), 0.0), axis=-1)
    return masked_mean(kl, mask)


# ----------------------------------------------------------------------------- top-k storage
def topk_bytes_per_token(k: int, vocab_size: int, value_dtype: str = "bfloat16") -> int:
    """Bytes one position's stored top-k takes: k values + k ids.

    Ids fit uint16 when V <= 65536 (the book's V = 4096), otherwise int32 (Gemma's 256128).
    """
    value_bytes = np.dtype(_VALUE_DTYPES[value_dtype]).itemsize
    return k * (value_bytes + _id_dtype(vocab_size).itemsize)


_VALUE_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}


def _id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


@functools.lru_cache(maxsize=1)
def _teacher_topk_fn() -> Callable[..., tuple[jax.Array, jax.Array]]:
    """The jitted teacher forward + top-k, made once: ``nnx.jit`` then compiles once per
    model graph, chunk shape and k, however often :func:`compute_teacher_topk` is called."""
    from flax import nnx  # local: keep the loss functions importable without flax

    def top(model: Any, x: jax.Array, m: jax.Array, *, k: int) -> tuple[jax.Array, jax.Array]:
        return jax.lax.top_k(model(x, m), k)  # (b, T, k) x2

    return nnx.jit(top, static_argnames="k")


def compute_teacher_topk(
    teacher: Any, tokens: Any, k: int, *, batch_size: int = 8, attention_mask: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``teacher`` (a Gemma2 model) over ``tokens`` and keep its k largest logits per position.

    tokens: int (R, T) rows (run ``batch_size`` rows at a time so memory stays bounded; the
    last chunk is padded so one compiled shape serves them all).
    Returns ``(values float32 (R, T, k), ids int32 (R, T, k))``, values sorted descending.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be an int (R, T) array, got {tokens.dtype} {tokens.shape}")
    if tokens.shape[0] == 0:
        raise ValueError("tokens has no rows: there is nothing to run the teacher on")
    vocab = teacher.config.vocab_size
    k = check_int(k, "k", low=1, high=vocab, what=f"an int in [1, V = {vocab}]")
    batch_size = check_int(batch_size, "batch_size", low=1)
    mask = np.ones_like(tokens) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != tokens.shape:
        raise ValueError(
            f"attention_mask has shape {mask.shape}, tokens {tokens.shape}: they must match"
        )
    top = _teacher_topk_fn()
    values, ids = [], []
    for (x, m), n in padded_batches([tokens, mask], batch_size, fill=(0, 1)):
        v, i = top(teacher, jnp.asarray(x), jnp.asarray(m), k=k)
        values.append(np.asarray(v[:n], np.float32))
        ids.append(np.asarray(i[:n], np.int32))
    return np.concatenate(values), np.concatenate(ids)


def save_teacher_topk(
    path: str | os.PathLike,
    values: Any,
    ids: Any,
    *,
    vocab_size: int,
    value_dtype: str = "bfloat16",
    chunk_rows: int = 1024,
) -> dict[str, Any]:
    """Write a teacher's top-k to an uncompressed ``.npz``, in chunks of ``chunk_rows`` rows.

    values: float (R, T, k); ids: int (R, T, k). Values are stored as ``value_dtype``
    ("bfloat16" — kept as its raw 16 bits, since .npz has no bfloat16 —, "float16" or
    "float32"); ids as uint16 when V <= 65536, else int32. Chunks let a reader stream a large
    file one chunk at a time. Returns ``{"path", "file_bytes", "bytes_per_token", "tokens"}``.
    """
    values, ids = np.asarray(values), np.asarray(ids)
    if values.shape != ids.shape or values.ndim != 3:
        raise ValueError(f"values {values.shape} and ids {ids.shape} must both be (R, T, k)")
    if value_dtype not in _VALUE_DTYPES:
        raise ValueError(f"value_dtype must be one of {sorted(_VALUE_DTYPES)}, got {value_dtype!r}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(
            f"ids must be in [0, vocab_size={vocab_size}); found [{ids.min()}, {ids.max()}]"
        )
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"path must end in .npz, got {path.name!r}")
    id_dtype = _id_dtype(vocab_size)
    arrays: dict[str, np.ndarray] = {
        "meta": np.array([values.shape[0], values.shape[1], values.shape[2], vocab_size], np.int64),
        "value_dtype": np.array(value_dtype),
    }
    for j, start in enumerate(range(0, values.shape[0], chunk_rows)):
        v = values[start : start + chunk_rows].astype(_VALUE_DTYPES[value_dtype])
        if value_dtype == "bfloat16":
            v = v.view(np.uint16)  # .npz cannot name bfloat16; keep the bits
        arrays[f"values_{j:05d}"] = v
        arrays[f"ids_{j:05d}"] = ids[start : start + chunk_rows].astype(id_dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    # numpy's stub reads **arrays as possibly its allow_pickle: bool (no key here is)
    np.savez(path, **arrays)  # type: ignore[arg-type]
    tokens = int(values.shape[0] * values.shape[1])
    return {
        "path": str(path),
        "file_bytes": path.stat().st_size,
        "tokens": tokens,
        "bytes_per_token": topk_bytes_per_token(values.shape[2], vocab_size, value_dtype),
    }


def load_teacher_topk(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read :func:`save_teacher_topk`'s file: ``(values float32 (R, T, k), ids int32
    (R, T, k))``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no teacher top-k file at {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError) as exc:
        raise ValueError(f"{path} is not a teacher top-k .npz file: {exc}") from None
    with data:
        if "meta" not in data or "value_dtype" not in data:
            raise ValueError(f"{path} lacks 'meta'/'value_dtype': not written by save_teacher_topk")
        value_dtype = str(data["value_dtype"])
        chunks = sorted(name for name in data.files if name.startswith("values_"))
        values, ids = [], []
        for name in chunks:
            v = data[name]
            if value_dtype == "bfloat16":
                v = v.view(ml_dtypes.bfloat16)
            values.append(v.astype(np.float32))
            ids.append(data["ids_" + name.split("_", 1)[1]].astype(np.int32))
        rows, length, k, _ = (int(x) for x in data["meta"])
    out_v, out_i = np.concatenate(values), np.concatenate(ids)
    if out_v.shape != (rows, length, k):
        raise ValueError(
            f"{path}: chunks give shape {out_v.shape}, header says {(rows, length, k)}"
        )
    return out_v, out_i
