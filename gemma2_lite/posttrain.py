"""Post-training in miniature: an instruction set built from the corpus, supervised fine-tuning
(SFT) on the chat format with a loss on the model's turns only, and model merging by averaging
weights.

The instruction set
-------------------
:func:`build_instructions` makes single-turn conversations from the book's corpus
(``gemma2_lite/assets/shakespeare.jsonl``, read with :mod:`gemma2_lite.data`); nothing is
downloaded or stored. The rule, which is the set's whole provenance:

1. Each play is cut into blocks at blank lines. A block is a *speech* when its first line is a
   speaker heading (a line such as ``HAMLET.``, ``Laer.`` or ``First Witch.``: at most
   :data:`MAX_SPEAKER_CHARS` characters, capitalised words, ending with ``.``) and it has at
   least two more lines, neither a stage direction (``[...]``), each between
   :data:`MIN_LINE_CHARS` and :data:`MAX_LINE_CHARS` characters after stripping. Poems have no
   speaker headings and give no speeches.
2. From the speeches of the split (``"train"``: the first ~95% of every document, ``"valid"``:
   the last ~5%, so the two sets share no line), ``numpy.random.default_rng(seed)`` draws
   ``n`` speeches without replacement, and example ``i`` gets the task ``KINDS[i % 3]``:

   * ``"speaker"``: user ``Who speaks this line?\\n{line 1}`` -> model ``{speaker}``
     (the heading without its final ``.``);
   * ``"play"``: user ``Which play is this line from?\\n{line 1}`` -> model ``{title}``;
   * ``"continue"``: user ``Continue: {line 1}`` -> model ``{line 2}``.

The same ``(seed, n, split)`` gives the same list on every machine.

SFT and merging
---------------
:func:`model_turn_mask` marks the tokens the model must learn to write (each model turn's
content and its ``<end_of_turn>``); :func:`sft_batch` packs examples into the trainer's
``(B, T + 1)`` batch and its ``(B, T)`` target mask, which
:func:`gemma2_lite.train.make_train_step`'s step takes as ``mask``. :func:`sft_eval` measures
the mean loss on masked tokens and the share of answers right token for token.
:func:`average_states` and :func:`interpolate_states` merge fine-tuned copies.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from gemma2_lite.batching import padded_batches
from gemma2_lite.chat import encode_chat
from gemma2_lite.checks import check_token_ids
from gemma2_lite.data import Split, load_documents
from gemma2_lite.losses import token_nll
from gemma2_lite.tokenizer import Tokenizer

__all__ = [
    "KINDS",
    "build_instructions",
    "speeches",
    "model_turn_mask",
    "sft_batch",
    "sft_eval",
    "average_states",
    "interpolate_states",
]

KINDS = ("speaker", "play", "continue")
MAX_SPEAKER_CHARS = 24
MIN_LINE_CHARS = 16
MAX_LINE_CHARS = 72
_SPEAKER = re.compile(r"^[A-Z][A-Za-z']*(?: [A-Z][A-Za-z']*)*\.$")


@lru_cache(maxsize=4)
def _speeches(split: Split) -> tuple[tuple[str, str, str, str], ...]:
    out = []
    for doc in load_documents(split):
        for block in doc["text"].split("\n\n"):
            lines = [line.strip() for line in block.split("\n")]
            if len(lines) < 3 or len(lines[0]) > MAX_SPEAKER_CHARS or not _SPEAKER.match(lines[0]):
                continue
            first, second = lines[1], lines[2]
            if all(
                MIN_LINE_CHARS <= len(x) <= MAX_LINE_CHARS and not x.startswith("[")
                for x in (first, second)
            ):
                out.append((doc["title"], lines[0][:-1], first, second))
    return tuple(out)


def speeches(split: str = "train") -> list[tuple[str, str, str, str]]:
    """Every speech of ``split`` the rule accepts: ``(title, speaker, line 1, line 2)``."""
    if split not in ("train", "valid"):
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
    return list(_speeches(split))


def build_instructions(seed: int = 0, n: int = 256, split: str = "train") -> list[dict[str, Any]]:
    """``n`` single-turn instruction examples drawn from ``split`` (see the module docstring).

    Returns dicts ``{"kind", "title", "messages": [user, model]}``, each message
    ``{"role", "content"}``, ready for :func:`~gemma2_lite.chat.encode_chat`.
    """
    pool = speeches(split)
    if not 0 < n <= len(pool):
        raise ValueError(f"n must be in [1, {len(pool)}] for split {split!r}, got {n}")
    picks = np.random.default_rng(seed).choice(len(pool), size=n, replace=False)
    out = []
    for i, p in enumerate(picks):
        title, speaker, first, second = pool[int(p)]
        kind = KINDS[i % len(KINDS)]
        question, answer = {
            "speaker": (f"Who speaks this line?\n{first}", speaker),
            "play": (f"Which play is this line from?\n{first}", title),
            "continue": (f"Continue: {first}", second),
        }[kind]
        out.append(
            {
                "kind": kind,
                "title": title,
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "model", "content": answer},
                ],
            }
        )
    return out


def model_turn_mask(
    tok: Tokenizer, messages: Sequence[Mapping[str, str]]
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)``, int32 of equal length: ``ids = encode_chat(tok, messages, False)`` and
    ``mask`` 1 exactly on each model turn's content tokens and its ``<end_of_turn>``; 0 on
    ``<bos>``, the user turns, every ``<start_of_turn>role\\n`` header and the newline after
    ``<end_of_turn>`` (the format's, not the model's to write).

    Built from the chat format's prefix property: the ids of the conversation up to a model
    turn's header extend to the ids up to the end of that turn.
    """
    ids = encode_chat(tok, messages, add_generation_prompt=False)
    mask = np.zeros(len(ids), np.int32)
    for i, message in enumerate(messages):
        if message["role"] not in ("model", "assistant"):
            continue
        start = len(encode_chat(tok, messages[:i], add_generation_prompt=True))
        stop = len(encode_chat(tok, messages[: i + 1], add_generation_prompt=False))
        assert ids[stop - 2] == tok.end_of_turn_id, "a model turn must end <end_of_turn>\\n"
        mask[start : stop - 1] = 1  # content + <end_of_turn>, not the "\n"
    return np.asarray(ids, np.int32), mask


def sft_batch(
    tok: Tokenizer, examples: Sequence[Mapping[str, Any]], seq_len: int, *, everything: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The trainer's inputs for ``examples``: ``batch`` int32 (B, T + 1), one example per row
    padded with ``pad_id``, and ``mask`` float32 (B, T) aligned with the targets
    ``batch[:, 1:]``: 1 where the target is a model-turn token (or, with ``everything=True``,
    any real token: the plain language-model loss on the whole conversation). An example
    longer than T + 1 tokens raises ``ValueError``.
    """
    batch = np.full((len(examples), seq_len + 1), tok.pad_id, np.int32)
    mask = np.zeros((len(examples), seq_len), np.float32)
    for row, example in enumerate(examples):
        ids, turn = model_turn_mask(tok, example["messages"])
        if len(ids) > seq_len + 1:
            raise ValueError(
                f"example {row} has {len(ids)} tokens, more than T + 1 = "
                f"{seq_len + 1}: raise seq_len"
            )
        batch[row, : len(ids)] = ids
        mask[row, : len(ids) - 1] = 1.0 if everything else turn[1:]
    return batch, mask


@nnx.jit
def _sft_sums(
    model: Any, batch: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Masked NLL sum, masked token count, per row 'every masked target is the argmax' and
    per row 'the last masked target (the closing <end_of_turn>) is the argmax'."""
    logits = model(batch[:, :-1])  # (B, T, V)
    targets = batch[:, 1:]
    nll = token_nll(logits, targets)  # (B, T)
    keep = mask > 0
    right = jnp.argmax(logits, axis=-1) == targets  # (B, T)
    last = jnp.argmax(jnp.where(keep, jnp.arange(keep.shape[1]), -1), axis=-1)  # (B,)
    ends = jnp.take_along_axis(right, last[:, None], axis=1)[:, 0] & jnp.any(keep, axis=-1)
    return (
        jnp.sum(jnp.where(keep, nll, 0.0)),
        jnp.sum(keep),
        jnp.all(right | ~keep, axis=-1),
        ends,
    )


def sft_eval(model: Any, batch: Any, mask: Any, *, batch_size: int = 32) -> dict[str, float]:
    """Held-out numbers of ``model`` on ``(batch, mask)`` from :func:`sft_batch`:
    ``{"loss": mean nats per masked target (the answer tokens, or every real token for a
    mask made with everything=True), "exact": share of rows whose masked targets are all the
    greedy choice given the true prefix (teacher forcing), "ends": share of rows whose last
    masked target (for a model-turn mask: the ``<end_of_turn>`` closing the last model turn)
    is the greedy choice, "tokens": masked targets}``.
    Rows are taken ``batch_size`` at a time; the last chunk is padded with rows of mask 0, so
    one compiled shape serves every chunk. Every row must have at least one masked target: a
    row without (an example with no model turn) has no answer to score, and would count as
    loss 0 and exactly right; it raises ``ValueError`` naming the rows."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None:  # checked as given: a float id 2.7 must not become token 2
        batch = check_token_ids(batch, vocab, name="batch")
    batch, mask = np.asarray(batch, np.int32), np.asarray(mask, np.float32)
    if not np.all((mask >= 0) & (mask <= 1)):  # NaN fails both
        raise ValueError(
            "sft_eval: mask must hold weights in [0, 1] (1 for a target to "
            "score), found values outside it"
        )
    if batch.ndim != 2 or mask.shape != (batch.shape[0], batch.shape[1] - 1):
        raise ValueError(
            f"want batch (B, T + 1) and mask (B, T), got {batch.shape} and {mask.shape}"
        )
    rows = batch.shape[0]
    if rows == 0:
        raise ValueError("sft_eval: batch has no rows (no examples to evaluate)")
    empty = np.flatnonzero(~(mask > 0).any(axis=1))
    if empty.size:
        raise ValueError(
            f"sft_eval: row(s) {empty[:5].tolist()} of mask have no masked target "
            "(an example with no model turn?): there is no answer to score"
        )
    total = count = 0.0
    right = ends = 0
    for (b, m), real in padded_batches([batch, mask], batch_size, fill=(0, 0.0)):
        s, c, hit, end = _sft_sums(model, jnp.asarray(b), jnp.asarray(m))
        total, count = total + float(s), count + float(c)
        right += int(np.sum(np.asarray(hit)[:real]))
        ends += int(np.sum(np.asarray(end)[:real]))
    return {"loss": total / count, "exact": right / rows, "ends": ends / rows, "tokens": count}


def average_states(states: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
    """The weighted average ``sum_i w_i * state_i`` of parameter pytrees of one structure
    (e.g. ``nnx.State`` from ``nnx.split``); uniform when ``weights`` is None. Weights must
    sum to 1, so averaging copies of one model gives that model back.

    Floating-point leaves are averaged (returned in their dtype). Integer and bool leaves
    (step counters, rng counts) cannot be averaged without truncating: they are kept when
    every state holds the same value and refused (``ValueError`` naming the leaf) otherwise."""
    if len(states) == 0:
        raise ValueError("average_states needs at least one state")
    w = [1.0 / len(states)] * len(states) if weights is None else [float(x) for x in weights]
    if len(w) != len(states):
        raise ValueError(f"{len(w)} weights for {len(states)} states")
    if not all(np.isfinite(w)):
        raise ValueError(f"weights must be finite numbers, got {w}")
    if not np.isclose(sum(w), 1.0):
        raise ValueError(f"weights must sum to 1, got {sum(w)}")

    keystr = lambda path: jax.tree_util.keystr(path, simple=True, separator=".")

    def mean(path: Any, *xs: Any) -> Any:
        if jnp.issubdtype(jnp.result_type(xs[0]), jnp.inexact):
            return sum(wi * x for wi, x in zip(w, xs)).astype(xs[0].dtype)
        if not all(np.array_equal(np.asarray(x), np.asarray(xs[0])) for x in xs[1:]):
            raise ValueError(
                f"average_states: integer leaf {keystr(path)} differs between "
                "the states; an average would truncate it (average the floating-"
                "point parameters only, e.g. nnx.state(model, nnx.Param))"
            )
        return xs[0]

    return jax.tree_util.tree_map_with_path(mean, *states)


def interpolate_states(a: Any, b: Any, t: float) -> Any:
    """``(1 - t) * a + t * b``: ``t = 0`` is ``a``, ``t = 1`` is ``b``."""
    return average_states([a, b], [1.0 - t, t])


# ----------------------------------------------------------------------------- preferences, RL
# The three losses of chapters 08b and 08c; the machinery around them (preference pairs, the
# reward model, sampling, the training loops) is in gemma2_lite.preference and gemma2_lite.rl.
__all__ += ["dpo_loss", "bradley_terry_loss", "group_advantages"]


def dpo_loss(
    policy_chosen: ArrayLike,
    policy_rejected: ArrayLike,
    ref_chosen: ArrayLike,
    ref_rejected: ArrayLike,
    beta: float,
) -> jax.Array:
    """Direct preference optimisation (Rafailov et al., 2023), float32 scalar: the mean over
    pairs of ``-log sigmoid(beta * ((policy_chosen - ref_chosen) - (policy_rejected -
    ref_rejected)))``. Each argument is (B,): a response's summed log-probability under the
    policy or the frozen reference; ``beta`` > 0 sets how far from the reference the policy
    may go (the implicit reward is ``beta * log(policy / reference)``)."""
    if not isinstance(beta, jax.core.Tracer) and not beta > 0:  # traced: beta as data
        raise ValueError(f"beta must be positive, got {beta!r}")
    margin = (jnp.asarray(policy_chosen, jnp.float32) - jnp.asarray(ref_chosen, jnp.float32)) - (
        jnp.asarray(policy_rejected, jnp.float32) - jnp.asarray(ref_rejected, jnp.float32)
    )
    return jnp.mean(-jax.nn.log_sigmoid(beta * margin))


def bradley_terry_loss(r_chosen: jax.Array, r_rejected: jax.Array) -> jax.Array:
    """The reward model's loss, float32 scalar: mean ``-log sigmoid(r_chosen - r_rejected)``
    over pairs (B,) (Bradley and Terry, 1952: P(chosen preferred) = sigmoid of the
    difference of the two scores)."""
    diff = jnp.asarray(r_chosen, jnp.float32) - jnp.asarray(r_rejected, jnp.float32)
    return jnp.mean(-jax.nn.log_sigmoid(diff))


def group_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
    """GRPO's advantages (Shao et al., 2024), float32 (G·n,): ``rewards`` holds consecutive
    groups of ``group_size`` samples of one prompt; each reward minus its group's mean, divided
    by its group's standard deviation + 1e-6. The standard deviation is the sample one
    (ddof = 1, as tunix and TRL compute it), so ``group_size`` must be at least 2. A group whose
    rewards are all equal gets advantages 0: nothing to learn from it."""
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, (int, np.integer))
        or group_size < 2
    ):
        raise ValueError(f"group_size must be an integer >= 2, got {group_size!r}")
    r = jnp.asarray(rewards, jnp.float32)
    if r.ndim != 1 or r.shape[0] % group_size:
        raise ValueError(
            f"rewards must be 1-D with a length divisible by group_size = "
            f"{group_size}, got shape {r.shape}"
        )
    groups = r.reshape(-1, group_size)  # (n, G)
    mean = groups.mean(axis=1, keepdims=True)
    std = groups.std(axis=1, ddof=1, keepdims=True)
    return ((groups - mean) / (std + 1e-6)).reshape(-1)
