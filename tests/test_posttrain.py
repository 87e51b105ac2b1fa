"""gemma2_lite.posttrain: the instruction set's rule, the model-turn mask, the trainer's batch
and mask, the held-out metrics and weight averaging (small and fast: a random tiny model)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from random_models import random_model

from gemma2_lite import get_config
from gemma2_lite.chat import encode_chat
from gemma2_lite.losses import token_nll
from gemma2_lite.posttrain import (
    KINDS,
    average_states,
    build_instructions,
    interpolate_states,
    model_turn_mask,
    sft_batch,
    sft_eval,
    speeches,
)
from gemma2_lite.tokenizer import default_tokenizer

TOK = default_tokenizer()
SEQ = 80
# A one-layer random model with the tokenizer's vocabulary: fast to build and compile.
SMALL = get_config("tiny").replace(
    num_layers=1, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, ffn_dim=64, name="small"
)


def test_instructions_are_deterministic_and_follow_the_rule() -> None:
    a = build_instructions(seed=3, n=30)
    assert a == build_instructions(seed=3, n=30)
    assert a != build_instructions(seed=4, n=30)
    pool = {(t, sp, l1, l2) for t, sp, l1, l2 in speeches("train")}
    by_line = {l1: (t, sp, l2) for t, sp, l1, l2 in pool}
    for i, ex in enumerate(a):
        assert ex["kind"] == KINDS[i % 3]
        user, model = ex["messages"]
        assert (user["role"], model["role"]) == ("user", "model")
        line = user["content"].split("\n")[-1].removeprefix("Continue: ")
        title, speaker, second = by_line[line]
        want = {"speaker": speaker, "play": title, "continue": second}[ex["kind"]]
        assert model["content"] == want and ex["title"] == title
        assert not speaker.endswith(".") and len(line) >= 16 and not line.startswith("[")


def test_train_and_valid_lines_are_disjoint() -> None:
    train = {l1 for _, _, l1, _ in speeches("train")}
    valid = build_instructions(seed=0, n=200, split="valid")
    lines = {
        ex["messages"][0]["content"].split("\n")[-1].removeprefix("Continue: ") for ex in valid
    }
    assert len(lines - train) >= 0.95 * len(lines)  # short stock lines may recur
    with pytest.raises(ValueError):
        build_instructions(seed=0, n=10**6)
    with pytest.raises(ValueError):
        speeches("test")


def test_model_turn_mask_marks_model_content_and_end_of_turn() -> None:
    msgs = [
        {"role": "user", "content": "Who speaks this line?\nTo be, or not to be"},
        {"role": "model", "content": "Ham"},
        {"role": "user", "content": "And next?"},
        {"role": "assistant", "content": " that is the question "},
    ]
    ids, mask = model_turn_mask(TOK, msgs)
    assert list(ids) == encode_chat(TOK, msgs, add_generation_prompt=False)
    want = (
        TOK.encode("Ham")
        + [TOK.end_of_turn_id]
        + TOK.encode("that is the question")
        + [TOK.end_of_turn_id]
    )
    assert list(ids[mask == 1]) == want
    assert mask[-1] == 0 and mask[0] == 0  # the final "\n" and <bos>
    ids1, mask1 = model_turn_mask(TOK, msgs[:1])
    assert not mask1.any()


def test_sft_batch_shifts_the_mask_onto_the_targets() -> None:
    exs = build_instructions(seed=0, n=5)
    batch, mask = sft_batch(TOK, exs, SEQ)
    every = sft_batch(TOK, exs, SEQ, everything=True)[1]
    assert batch.shape == (5, SEQ + 1) and mask.shape == every.shape == (5, SEQ)
    for row, ex in enumerate(exs):
        ids, m = model_turn_mask(TOK, ex["messages"])
        n = len(ids)
        assert np.array_equal(batch[row, :n], ids) and (batch[row, n:] == TOK.pad_id).all()
        assert np.array_equal(mask[row, : n - 1], m[1:]) and not mask[row, n - 1 :].any()
        assert every[row, : n - 1].all() and not every[row, n - 1 :].any()
        answer = TOK.encode(ex["messages"][1]["content"]) + [TOK.end_of_turn_id]
        assert list(batch[row, 1:][mask[row] == 1]) == answer
    with pytest.raises(ValueError, match="seq_len"):
        sft_batch(TOK, exs, 8)


def test_sft_eval_matches_a_direct_computation() -> None:
    model = random_model(SMALL, 0)
    exs = build_instructions(seed=1, n=5, split="valid")
    batch, mask = sft_batch(TOK, exs, SEQ)
    logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(batch[:, :-1]))
    nll = np.asarray(token_nll(logits, jnp.asarray(batch[:, 1:])))
    got = sft_eval(model, batch, mask, batch_size=4)  # two chunks, the last padded
    assert got["tokens"] == mask.sum()
    assert np.isclose(got["loss"], (nll * mask).sum() / mask.sum(), rtol=1e-5)
    hits = (np.asarray(jnp.argmax(logits, -1)) == batch[:, 1:]) | (mask == 0)
    assert np.isclose(got["exact"], hits.all(-1).mean())
    last = [np.nonzero(m)[0][-1] for m in mask]  # the closing <end_of_turn>
    assert all(batch[r, 1 + last[r]] == TOK.end_of_turn_id for r in range(5))
    ends = [np.argmax(np.asarray(logits[r, last[r]])) == TOK.end_of_turn_id for r in range(5)]
    assert np.isclose(got["ends"], np.mean(ends))


def test_average_and_interpolate() -> None:
    rng = np.random.default_rng(0)
    trees = [
        {
            "a": jnp.asarray(rng.standard_normal((2, 3)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(4), jnp.bfloat16),
        }
        for _ in range(3)
    ]
    avg = average_states(trees)
    assert np.allclose(avg["a"], sum(t["a"] for t in trees) / 3, atol=1e-6)
    assert avg["b"].dtype == jnp.bfloat16
    w = average_states(trees, [0.2, 0.3, 0.5])
    assert np.allclose(
        w["a"], 0.2 * trees[0]["a"] + 0.3 * trees[1]["a"] + 0.5 * trees[2]["a"], atol=1e-6
    )
    for t, ref in ((0.0, trees[0]), (1.0, trees[1])):
        out = interpolate_states(trees[0], trees[1], t)
        assert all(
            jnp.array_equal(x, y) for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(ref))
        )
    state = nnx.state(random_model(SMALL, 1), nnx.Param)
    same = average_states([state, state])
    assert jax.tree.structure(same) == jax.tree.structure(state)
    with pytest.raises(ValueError, match="sum to 1"):
        average_states(trees, [0.5, 0.5, 0.5])
    with pytest.raises(ValueError):
        average_states([])


def test_average_keeps_integer_leaves_exactly_or_refuses() -> None:
    """A step counter (int) is never averaged into a truncated value: kept when the states
    agree, refused by its name when they do not."""
    a = {"w": jnp.ones(3), "count": jnp.asarray(7, jnp.int32)}
    b = {"w": jnp.zeros(3), "count": jnp.asarray(7, jnp.int32)}
    out = average_states([a, b], [0.3, 0.7])
    assert out["count"].dtype == jnp.int32 and int(out["count"]) == 7
    np.testing.assert_allclose(out["w"], 0.3 * np.ones(3))
    with pytest.raises(ValueError, match="integer leaf count differs"):
        average_states([a, {**b, "count": jnp.asarray(8, jnp.int32)}])


def test_sft_eval_refuses_rows_without_a_model_turn() -> None:
    """An example with no model turn has nothing to score: it would count as loss 0 and
    exactly right; sft_eval names the row instead."""
    model = random_model(SMALL, 0)
    exs = build_instructions(seed=1, n=3, split="valid")
    exs[1] = {**exs[1], "messages": exs[1]["messages"][:1]}  # the user turn only
    batch, mask = sft_batch(TOK, exs, SEQ)
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] of mask have no masked target"):
        sft_eval(model, batch, mask)
    with pytest.raises(ValueError, match="no rows"):
        sft_eval(model, batch[:0], mask[:0])
