"""Learning from preferences: preference pairs made by a stated rule, a reward model trained with
the Bradley–Terry loss, and direct preference optimisation (DPO).

The preference data
-------------------
:func:`preference_pairs` derives pairs from :func:`gemma2_lite.posttrain.build_instructions`'
examples at run time; nothing is stored or downloaded. The rule, which is the data's whole
provenance: for example ``i``, *chosen* is its true answer and *rejected* is the true answer of
another example ``j`` of the same kind (speaker, play or continuation) whose answer differs,
``j`` drawn uniformly by ``numpy.random.default_rng(seed)``. So the rejected answer is always
well formed (a real speaker, a real title, a real verse line) and always wrong for this
question: preferring the chosen one takes knowing the plays, not spotting bad form.

Losses and models
-----------------
``dpo_loss`` and ``bradley_terry_loss`` are in :mod:`gemma2_lite.posttrain` (the Public API);
:func:`make_dpo_loss` and :func:`make_bt_loss` wrap them for the one training step
(:func:`gemma2_lite.train.make_train_step`, driven by :func:`gemma2_lite.lora.finetune`), whose
batch then holds the P chosen rows first and the P rejected rows after them.
:class:`RewardModel` is a Gemma 2 backbone (any number of the book model's layers:
:func:`truncate`) with a scalar head on the last token's final hidden state.

Shapes: P pairs, B = 2P rows, T positions, V vocabulary, D width.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .chat import encode_chat
from .losses import token_nll
from .model import Gemma2
from .posttrain import bradley_terry_loss, dpo_loss, sft_batch
from .tokenizer import Tokenizer

__all__ = [
    "preference_pairs",
    "pair_batch",
    "response_logprobs",
    "make_dpo_loss",
    "dpo_metrics",
    "RewardModel",
    "truncate",
    "reward_rows",
    "make_bt_loss",
    "reward_scores",
    "pair_accuracy",
    "completion_rows",
    "kl_per_position",
]


def preference_pairs(examples: Sequence[Mapping[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """One pair per example, by the module's rule: ``{"kind", "prompt": [user message],
    "chosen": [user, model], "rejected": [user, model with another example's answer]}``.
    Examples with no other answer of their kind are left out."""
    rng = np.random.default_rng(seed)
    answers: dict[str, list[str]] = {}
    for ex in examples:
        answers.setdefault(ex["kind"], []).append(ex["messages"][1]["content"])
    out = []
    for ex in examples:
        user, model = ex["messages"]
        others = [a for a in answers[ex["kind"]] if a != model["content"]]
        if not others:
            continue
        wrong = others[int(rng.integers(len(others)))]
        out.append(
            {
                "kind": ex["kind"],
                "prompt": [user],
                "chosen": [user, model],
                "rejected": [user, {"role": "model", "content": wrong}],
            }
        )
    return out


def pair_batch(
    tok: Tokenizer, pairs: Sequence[Mapping[str, Any]], seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """The trainer's rows for P pairs: ``batch`` int32 (2P, T + 1), the P chosen conversations
    then the P rejected ones (right-padded, as :func:`~gemma2_lite.posttrain.sft_batch`), and
    ``mask`` float32 (2P, T), 1 on each response's targets (its tokens and ``<end_of_turn>``)."""
    chosen = [{"messages": p["chosen"]} for p in pairs]
    rejected = [{"messages": p["rejected"]} for p in pairs]
    return sft_batch(tok, chosen + rejected, seq_len)


def response_logprobs(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Summed log-probability of each row's masked targets, float32 (B,):
    ``sum_t mask * log p(target_t)`` for logits (B, T, V), targets (B, T), mask (B, T)."""
    return -jnp.sum(jnp.where(mask > 0, token_nll(logits, targets), 0.0), axis=-1)


@functools.cache
def make_dpo_loss(beta: float | None = None):
    """The DPO objective as the trainer's ``loss_fn``: rows are P chosen then P rejected, the
    reference model's logits come as the step's teacher logits. One function per beta (cached),
    so runs with the same beta share one compiled step. ``beta=None``: the step's mask is
    ``{"mask": (2P, T), "beta": float32 scalar}``, so one compiled step serves every beta."""

    def loss(logits, targets, ref_logits, rng, mask):
        b = beta
        if beta is None:
            mask, b = mask["mask"], mask["beta"]
        assert b is not None  # the fixed beta, or this step's from the mask
        lp = response_logprobs(logits, targets, mask)  # (2P,)
        ref = response_logprobs(ref_logits, targets, mask)
        p = lp.shape[0] // 2
        return dpo_loss(lp[:p], lp[p:], ref[:p], ref[p:], b)

    return loss


def kl_per_position(logits: jax.Array, ref_logits: jax.Array) -> jax.Array:
    """KL(policy || reference) of the next-token distributions at each position, float32
    (B, T), summed exactly over the vocabulary."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    lq = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


@nnx.jit
def _dpo_sums(
    policy: Any, reference: Any, batch: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits, ref_logits = policy(inputs), reference(inputs)
    kl = jnp.sum(jnp.where(mask > 0, kl_per_position(logits, ref_logits), 0.0), axis=-1)
    return (
        response_logprobs(logits, targets, mask),
        response_logprobs(ref_logits, targets, mask),
        kl,
    )


def dpo_metrics(
    policy: Any, reference: Any, batch: Any, mask: Any, beta: float, *, pairs_per_call: int = 16
) -> dict[str, float]:
    """DPO's numbers on pairs laid out by :func:`pair_batch`: ``{"loss", "margin": mean of
    beta * ((pi_c - ref_c) - (pi_r - ref_r)), "accuracy": share of pairs whose margin is > 0,
    "kl": mean KL(policy || reference) per response token (chosen and rejected rows),
    "chosen_logp", "rejected_logp": mean summed log-probabilities under the policy}``."""
    batch, mask = np.asarray(batch, np.int32), np.asarray(mask, np.float32)
    p = batch.shape[0] // 2
    parts: tuple[list[np.ndarray], ...] = ([], [], [])  # lp, ref, kl per chunk
    for rows in (slice(0, p), slice(p, 2 * p)):
        b, m = batch[rows], mask[rows]
        for i in range(0, p, pairs_per_call):
            n = min(pairs_per_call, p - i)
            pad = pairs_per_call - n  # one compiled shape for every chunk
            bb = np.concatenate([b[i : i + n], np.repeat(b[:1], pad, 0)])
            mm = np.concatenate([m[i : i + n], np.zeros((pad, m.shape[1]), np.float32)])
            out = _dpo_sums(policy, reference, jnp.asarray(bb), jnp.asarray(mm))
            for acc, x in zip(parts, out):
                acc.append(np.asarray(x)[:n])
    lp, ref, kl = (np.concatenate(x) for x in parts)
    margin = beta * ((lp[:p] - ref[:p]) - (lp[p:] - ref[p:]))
    return {
        "loss": float(dpo_loss(lp[:p], lp[p:], ref[:p], ref[p:], beta)),
        "margin": float(margin.mean()),
        "accuracy": float(np.mean(margin > 0)),
        "kl": float(kl.sum() / mask.sum()),
        "chosen_logp": float(lp[:p].mean()),
        "rejected_logp": float(lp[p:].mean()),
    }


# ----------------------------------------------------------------------------- reward model
def truncate(model: Gemma2, layers: int) -> Gemma2:
    """The first ``layers`` blocks of ``model`` with its embedding and final norm: a smaller
    backbone with the same pretraining (for a reward model, or a student)."""
    if not 1 <= layers <= model.config.num_layers:
        raise ValueError(f"layers must be in [1, {model.config.num_layers}], got {layers}")
    config = model.config.replace(num_layers=layers)
    small = nnx.eval_shape(lambda: Gemma2(config, rngs=nnx.Rngs(0), components=model.components))
    state = nnx.state(model)
    kept = nnx.state(small)
    flat = {path: var for path, var in nnx.to_flat_state(state)}
    for path, var in nnx.to_flat_state(kept):
        var.set_value(jnp.copy(flat[path].get_value()))
    return nnx.merge(nnx.graphdef(small), kept)


class RewardModel(nnx.Module):
    """A Gemma 2 backbone and a scalar head: the reward of a (left-padded) conversation is
    ``w . h + b``, h the final hidden state (after the final norm) at the last token.

    ``rm(tokens)`` -> float32 (B,); tokens int (B, T) left-padded with ``pad_id`` (0), so the
    last column is every row's last token. The head starts at zero: every reward starts at 0.
    """

    def __init__(self, backbone: Gemma2, *, pad_id: int = 0):
        self.backbone = backbone
        self.pad_id = pad_id
        d = backbone.config.d_model
        self.head = nnx.Param(jnp.zeros((d,), jnp.float32), logical_axes=("embed",))
        self.bias = nnx.Param(jnp.zeros((), jnp.float32), logical_axes=())

    def __call__(self, tokens: jax.Array) -> jax.Array:
        valid = tokens != self.pad_id  # (B, T)
        out = self.backbone.forward(tokens, valid, last_only=True, return_hidden=True)
        assert out.hidden is not None  # return_hidden=True
        h = out.hidden[-1][:, -1].astype(jnp.float32)  # (B, D)
        return h @ self.head[...] + self.bias[...]  # (B,)


def reward_rows(tok: Tokenizer, pairs: Sequence[Mapping[str, Any]], length: int) -> np.ndarray:
    """The reward model's trainer rows, int32 (2P, T + 1): each chosen, then each rejected
    conversation, encoded with the chat format (``<end_of_turn>\\n`` after the answer),
    *left*-padded to T = ``length`` columns; column T is padding (the trainer's target column,
    which a reward model does not read)."""
    rows = np.full((2 * len(pairs), length + 1), tok.pad_id, np.int32)
    for side, key in enumerate(("chosen", "rejected")):
        for i, p in enumerate(pairs):
            ids = encode_chat(tok, p[key], add_generation_prompt=False)
            if len(ids) > length:
                raise ValueError(
                    f"pair {i} ({key}) has {len(ids)} tokens, more than "
                    f"length = {length}: raise length"
                )
            rows[side * len(pairs) + i, length - len(ids) : length] = ids
    return rows


def completion_rows(
    tok: Tokenizer,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    length: int,
) -> np.ndarray:
    """Left-padded rows int32 (B, T) of prompt + sampled completion for a reward model, laid
    out as :func:`reward_rows` lays out a conversation: a completion closed by
    ``<end_of_turn>`` gets the ``\n`` the chat format puts after it. Rows longer than T keep
    their last T tokens."""
    newline = tok.encode("\n")
    rows = np.full((len(prompts), length), tok.pad_id, np.int32)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids = list(p) + list(c)
        if c and c[-1] == tok.end_of_turn_id:
            ids += newline
        ids = ids[-length:]
        rows[i, length - len(ids) :] = ids
    return rows


def make_bt_loss():
    """The Bradley–Terry loss as the trainer's ``loss_fn`` for a :class:`RewardModel`: its
    "logits" are the rewards (2P,), chosen rows first."""
    return _bt_loss


def _bt_loss(rewards, targets, teacher_logits, rng, mask):
    p = rewards.shape[0] // 2
    return bradley_terry_loss(rewards[:p], rewards[p:])


@nnx.jit
def _scores(rm: RewardModel, tokens: jax.Array) -> jax.Array:
    return rm(tokens)


def reward_scores(rm: RewardModel, rows: Any, *, batch_size: int = 32) -> np.ndarray:
    """Rewards float32 (R,) of left-padded rows (R, T) or trainer rows (R, T + 1) with their
    padding column (dropped here), ``batch_size`` rows per call."""
    rows = np.asarray(rows, np.int32)
    if np.all(rows[:, -1] == rm.pad_id):
        rows = rows[:, :-1]
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        n = len(chunk)
        if n < batch_size:  # one compiled shape for every chunk
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - n, 0)])
        out.append(np.asarray(_scores(rm, jnp.asarray(chunk)))[:n])
    return np.concatenate(out)


def pair_accuracy(rm: RewardModel, rows: Any) -> float:
    """Share of pairs (rows from :func:`reward_rows`) where the chosen answer scores higher."""
    r = reward_scores(rm, rows)
    p = len(r) // 2
    return float(np.mean(r[:p] > r[p:]))
