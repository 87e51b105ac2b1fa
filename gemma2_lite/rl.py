"""Reinforcement learning with a checkable reward, WARP's anchor and SLERP merge, and on-policy
distillation, on the instruction tasks of :mod:`gemma2_lite.posttrain`.

The loop (GRPO, Shao et al. 2024): for each of n prompts sample a group of G answers from the
current policy; score each with a reward a program checks (:func:`exact_rewards`: 1 for the
exact true answer closed by ``<end_of_turn>``, else 0); turn rewards into advantages relative to
the group (:func:`~gemma2_lite.posttrain.group_advantages`) or to the batch (REINFORCE with a
baseline, :func:`baseline_advantages`); take one gradient step on

    loss = mean_i [ (1 / |o_i|) sum_t ( -A_i log pi(o_it) + beta KL_t(pi || pi_ref) ) ]

(:func:`make_pg_loss`). With one step per batch of samples the policy that sampled is the one
being differentiated, so PPO's ratio is 1 and needs no clipping; KL_t is the exact KL between
the next-token distributions over the vocabulary (GRPO estimates it from the sampled token).
The reference is the SFT model, or (WARP, Ramé et al. 2024) an exponential moving average of
the policy (:func:`gemma2_lite.lora.finetune`'s ``anchor_rate``).

Merging (WARP): task vectors are a fine-tune's weights minus the weights it started from;
:func:`slerp_merge` interpolates two of them along the sphere (per weight matrix), keeping their
norm, where a linear average (chapter 08a) shrinks it when they point apart.

On-policy distillation (Agarwal et al. 2024, which the Gemma 2 report cites): the student samples
answers and the teacher's next-token distributions on *those* tokens are the targets of chapter
07's loss; :func:`completion_batch` builds the rows either way (the student's samples, or the
fixed true answers: off-policy).

Shapes: n prompts, G samples per prompt, B = n G rows, T positions, V vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .losses import token_nll
from .model import Gemma2
from .preference import kl_per_position
from .sampler import generate
from .tokenizer import Tokenizer

__all__ = [
    "sample_answers",
    "completion_batch",
    "exact_rewards",
    "length_rewards",
    "baseline_advantages",
    "make_pg_loss",
    "slerp",
    "slerp_merge",
    "task_vector",
]


def sample_answers(
    model: Gemma2,
    prompts: Sequence[Sequence[int]],
    group: int,
    *,
    max_new_tokens: int,
    stop_id: int,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[list[int]]:
    """``group`` samples for each prompt (ids ending in the generation prompt), consecutive:
    row ``i * group + g`` is sample g of prompt i. Each is the new ids up to and including
    ``stop_id`` (a sample cut at ``max_new_tokens`` has no stop id)."""
    rows = [list(p) for p in prompts for _ in range(group)]
    return generate(
        model,
        rows,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        stop_tokens=(stop_id,),
    )


def completion_batch(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    seq_len: int,
    pad_id: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Trainer rows for prompt + completion pairs: ``batch`` int32 (B, T + 1), right-padded, and
    ``mask`` float32 (B, T), 1 on the targets that are completion tokens. A completion that does
    not fit is cut (its mask with it); an empty completion gets an all-zero mask row."""
    batch = np.full((len(prompts), seq_len + 1), pad_id, np.int32)
    mask = np.zeros((len(prompts), seq_len), np.float32)
    for r, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        if len(p) > seq_len:
            raise ValueError(f"prompt {r} has {len(p)} tokens, more than T = {seq_len}")
        ids = (list(p) + list(c))[: seq_len + 1]
        batch[r, : len(ids)] = ids
        mask[r, len(p) - 1 : len(ids) - 1] = 1.0
    return batch, mask


def exact_rewards(
    tok: Tokenizer, completions: Sequence[Sequence[int]], answers: Sequence[str]
) -> np.ndarray:
    """float32 (B,): 1 where the completion is exactly the answer's text (surrounding spaces
    ignored) closed by ``<end_of_turn>``, else 0. The check is a program, not a model."""
    out = np.zeros(len(completions), np.float32)
    for i, (c, a) in enumerate(zip(completions, answers, strict=True)):
        if c and c[-1] == tok.end_of_turn_id and tok.decode(list(c[:-1])).strip() == a.strip():
            out[i] = 1.0
    return out


def length_rewards(completions: Sequence[Sequence[int]], cap: int) -> np.ndarray:
    """A weakened reward, float32 (B,): the answer's length in tokens over ``cap`` (at most 1),
    whatever it says. Long answers are what it pays for (a reward model that learned "correct
    continuations are long lines" would pay the same)."""
    return np.asarray([min(len(c), cap) / cap for c in completions], np.float32)


def baseline_advantages(rewards: Any) -> np.ndarray:
    """REINFORCE with a baseline, float32 (B,): each reward minus the batch's mean reward."""
    r = np.asarray(rewards, np.float32)
    return r - r.mean()


@functools.cache
def make_pg_loss(beta: float):
    """The policy-gradient loss as the trainer's ``loss_fn`` (one per beta, cached so runs
    share a compiled step). Its ``mask`` argument is ``{"mask": (B, T) completion targets,
    "advantages": (B,)}``; its teacher logits are the reference's. Per row, the mean over the
    completion's tokens of ``-A log pi(token) + beta KL(pi || pi_ref)``; then the mean over
    rows that have a completion."""

    def loss(logits, targets, ref_logits, rng, extra):
        mask, adv = extra["mask"], extra["advantages"]  # (B, T), (B,)
        keep = mask > 0
        logp = -token_nll(logits, targets)  # (B, T)
        per_tok = -adv[:, None] * logp
        if beta:
            per_tok = per_tok + beta * kl_per_position(logits, ref_logits)
        count = jnp.sum(keep, axis=-1)  # (B,)
        per_row = jnp.sum(jnp.where(keep, per_tok, 0.0), axis=-1) / jnp.maximum(count, 1)
        rows = jnp.sum(count > 0)
        return jnp.sum(jnp.where(count > 0, per_row, 0.0)) / jnp.maximum(rows, 1)

    return loss


# ----------------------------------------------------------------------------- merging
def task_vector(finetuned: Any, init: Any) -> Any:
    """``finetuned - init`` leaf by leaf (parameter pytrees of one structure)."""
    return jax.tree.map(lambda a, b: a - b, finetuned, init)


def slerp(a: jax.Array, b: jax.Array, t: float, eps: float = 1e-7) -> jax.Array:
    """Spherical interpolation of two arrays seen as vectors: ``sin((1-t) w)/sin(w) a +
    sin(t w)/sin(w) b``, w the angle between them; linear when they are (nearly) parallel.
    t = 0 gives a, t = 1 gives b; two vectors of one norm keep that norm all the way."""
    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    na, nb = jnp.linalg.norm(a32), jnp.linalg.norm(b32)
    cos = jnp.clip(jnp.vdot(a32, b32) / jnp.maximum(na * nb, eps), -1.0, 1.0)
    omega = jnp.arccos(cos)
    s = jnp.sin(omega)
    parallel = s < 1e-4
    ca = jnp.where(parallel, 1.0 - t, jnp.sin((1.0 - t) * omega) / jnp.where(parallel, 1, s))
    cb = jnp.where(parallel, t, jnp.sin(t * omega) / jnp.where(parallel, 1, s))
    return (ca * a32 + cb * b32).astype(a.dtype)


def slerp_merge(init: Any, a: Any, b: Any, t: float = 0.5) -> Any:
    """WARP's merge of two fine-tunes of ``init``: ``init + slerp(a - init, b - init, t)``,
    weight matrix by weight matrix (each leaf its own angle)."""
    return jax.tree.map(lambda i, x, y: i + slerp(x - i, y - i, t), init, a, b)
