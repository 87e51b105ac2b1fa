"""Preferences and RL: the Public API losses (dpo_loss, bradley_terry_loss, group_advantages),
the preference-pair rule, the reward model, the policy-gradient loss, SLERP, WARP's anchor and
the sampling helpers (small random models: fast)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from random_models import random_model
from tolerance import assert_close

from gemma2_lite import get_config, lora, rl
from gemma2_lite import preference as pref
from gemma2_lite.book.recipes import TASK_KINDS, answers, prompt_ids, task_examples
from gemma2_lite.chat import encode_chat
from gemma2_lite.posttrain import (
    bradley_terry_loss,
    build_instructions,
    dpo_loss,
    group_advantages,
    sft_batch,
)
from gemma2_lite.tokenizer import default_tokenizer
from gemma2_lite.train import TrainConfig, make_optimizer, make_train_step

TOK = default_tokenizer()
SMALL = get_config("tiny").replace(
    num_layers=2, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, ffn_dim=64, name="small"
)
SEQ = 48


@pytest.fixture(scope="module")
def model():
    return random_model(SMALL, seed=0)


@pytest.fixture(scope="module")
def examples():
    return task_examples(TOK, "train", 300, seed=0, seq_len=SEQ)


def softplus(x):
    return np.logaddexp(0.0, x)


# ----------------------------------------------------------------------------- Public API
def test_dpo_loss_is_the_formula_and_finite_at_any_margin() -> None:
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-30, 10, 7).astype(np.float32) for _ in range(4))
    for beta in (0.01, 0.1, 1.0, 5.0):
        want = np.mean(softplus(-beta * ((pc - rc) - (pr - rr)).astype(np.float64)))
        got = dpo_loss(pc, pr, rc, rr, beta)
        assert got.shape == () and got.dtype == jnp.float32
        assert np.isclose(float(got), want, rtol=1e-5)
    z = np.zeros(3, np.float32)
    assert np.isclose(float(dpo_loss(z, z, z, z, 0.1)), np.log(2), rtol=1e-6)
    far = dpo_loss(np.array([-500.0]), np.array([0.0]), np.zeros(1), np.zeros(1), 1.0)
    assert np.isclose(float(far), 500.0, rtol=1e-6)  # not inf
    # swapping chosen and rejected is a different loss (the sign matters)
    assert not np.isclose(
        float(dpo_loss(pc, pr, rc, rr, 1.0)), float(dpo_loss(pr, pc, rr, rc, 1.0))
    )
    g = jax.grad(lambda c: dpo_loss(c, pr, rc, rr, 0.5))(jnp.asarray(pc))
    assert bool(jnp.all(g < 0))  # descent raises log pi(chosen)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, 0.0)


def test_bradley_terry_loss_is_the_formula() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=9).astype(np.float32), rng.normal(size=9).astype(np.float32)
    assert np.isclose(float(bradley_terry_loss(a, b)), np.mean(softplus(-(a - b))), rtol=1e-5)
    assert np.isclose(
        float(bradley_terry_loss(a + 7, b + 7)), float(bradley_terry_loss(a, b)), rtol=1e-5
    )
    assert float(bradley_terry_loss(a, b)) != pytest.approx(float(bradley_terry_loss(b, a)))


def test_group_advantages_normalise_within_each_group() -> None:
    r = np.array([1, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 1, 0, 3, 0, 1], np.float32)
    g = r.reshape(-1, 4).astype(np.float64)
    want = (g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-6)
    got = np.asarray(group_advantages(r, 4))
    np.testing.assert_allclose(got, want.reshape(-1), atol=1e-5)
    assert np.all(got[8:12] == 0)  # an all-equal group: no signal
    whole = (r - r.mean()) / (r.std(ddof=1) + 1e-6)  # the batch, not the groups
    assert not np.allclose(got, whole, atol=1e-3)
    assert np.allclose(np.asarray(group_advantages(r, 16)), whole, atol=1e-5)
    for bad in (1, 0, 3, True):
        with pytest.raises(ValueError, match="group_size"):
            group_advantages(r, bad)


# ----------------------------------------------------------------------------- pairs
def test_preference_pairs_follow_the_rule(examples) -> None:
    pairs = pref.preference_pairs(examples, seed=3)
    assert pairs == pref.preference_pairs(examples, seed=3)
    assert pairs != pref.preference_pairs(examples, seed=4)
    by_kind = {
        k: {a for ex in examples if ex["kind"] == k for a in [ex["messages"][1]["content"]]}
        for k in TASK_KINDS
    }
    assert len(pairs) == len(examples)
    for ex, p in zip(examples, pairs):
        assert p["chosen"] == ex["messages"] and p["prompt"] == ex["messages"][:1]
        wrong = p["rejected"][1]["content"]
        assert p["rejected"][0] == ex["messages"][0] and wrong != ex["messages"][1]["content"]
        assert wrong in by_kind[ex["kind"]]  # another answer of its kind
    rows, mask = pref.pair_batch(TOK, pairs[:5], SEQ)
    want_rows, want_mask = sft_batch(
        TOK,
        [{"messages": p["chosen"]} for p in pairs[:5]]
        + [{"messages": p["rejected"]} for p in pairs[:5]],
        SEQ,
    )
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(mask, want_mask)


def test_task_examples_are_short_answer_questions_that_fit() -> None:
    exs = task_examples(TOK, "valid", 120, seed=1, seq_len=SEQ)
    every = build_instructions(seed=1, n=120, split="valid")
    assert exs and {ex["kind"] for ex in exs} <= set(TASK_KINDS)
    assert len(exs) < len(every)
    for ex in exs:
        assert len(encode_chat(TOK, ex["messages"], add_generation_prompt=False)) <= SEQ + 1
    p = prompt_ids(TOK, exs[:1])[0]
    assert p == encode_chat(TOK, exs[0]["messages"][:1], add_generation_prompt=True)
    assert answers(exs[:1]) == [exs[0]["messages"][1]["content"]]


# ----------------------------------------------------------------------------- DPO
def test_dpo_through_the_trainer_raises_the_margin(model, examples) -> None:
    pairs = pref.preference_pairs(examples[:8], seed=0)
    rows, mask = pref.pair_batch(TOK, pairs, SEQ)
    policy = lora.apply_lora(model, 4, 8.0, ("q", "v", "up"), nnx.Rngs(0))
    before = pref.dpo_metrics(policy, model, rows, mask, 0.5, pairs_per_call=3)
    assert before["margin"] == pytest.approx(0.0, abs=1e-5)
    assert before["loss"] == pytest.approx(np.log(2), abs=1e-5) and before["kl"] < 1e-6
    # the trainer's loss_fn equals dpo_loss of separately computed log-probabilities
    logits = model(jnp.asarray(rows[:, :-1]))
    lp = pref.response_logprobs(logits, jnp.asarray(rows[:, 1:]), jnp.asarray(mask))
    ref = lp - jnp.arange(len(lp), dtype=jnp.float32) * 0.1
    fn = pref.make_dpo_loss(0.5)
    assert fn is pref.make_dpo_loss(0.5)  # cached: one compiled step
    # ref_logits shifted by a constant per row would not change log-softmax; use lp directly
    p = len(pairs)
    assert_close(
        dpo_loss(lp[:p], lp[p:], ref[:p], ref[p:], 0.5),
        np.mean(softplus(-0.5 * np.asarray((lp[:p] - ref[:p]) - (lp[p:] - ref[p:])))),
        1e-5,
    )
    assert_close(
        fn(logits, jnp.asarray(rows[:, 1:]), logits, None, jnp.asarray(mask)), np.log(2), 1e-6
    )
    as_data = jax.jit(pref.make_dpo_loss())  # beta read from the batch
    assert_close(
        as_data(
            logits,
            jnp.asarray(rows[:, 1:]),
            logits - 0.3 * jnp.arange(2 * p, dtype=jnp.float32)[:, None, None],
            None,
            {"mask": jnp.asarray(mask), "beta": jnp.float32(0.5)},
        ),
        fn(
            logits,
            jnp.asarray(rows[:, 1:]),
            logits - 0.3 * jnp.arange(2 * p, dtype=jnp.float32)[:, None, None],
            None,
            jnp.asarray(mask),
        ),
        1e-6,
    )
    tc = TrainConfig(
        steps=8, batch_size=2 * p, seq_len=SEQ, lr=1e-2, warmup=1, weight_decay=0.0, progress=False
    )
    trained, hist = lora.finetune(
        policy, lambda i, m: (rows, jnp.asarray(mask)), tc, fn, reference=model
    )
    after = pref.dpo_metrics(trained, model, rows, mask, 0.5, pairs_per_call=3)
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert after["margin"] > 0.05 and after["accuracy"] > 0.5 and after["kl"] > 0


# ----------------------------------------------------------------------------- reward model
def test_reward_model_reads_the_last_token_and_learns(model, examples) -> None:
    rm = pref.RewardModel(pref.truncate(model, 1))
    pairs = pref.preference_pairs(examples[:6], seed=0)
    rows = pref.reward_rows(TOK, pairs, SEQ + 4)  # (12, T + 1)
    assert np.all(rows[:, -1] == TOK.pad_id) and np.all(rows[:, -2] != TOK.pad_id)
    np.testing.assert_array_equal(pref.reward_scores(rm, rows), np.zeros(12))  # head = 0
    rm.head[...] = jnp.asarray(np.random.default_rng(0).normal(size=SMALL.d_model), jnp.float32)
    r1 = pref.reward_scores(rm, rows, batch_size=5)
    wider = pref.reward_rows(TOK, pairs, SEQ + 12)  # more left padding
    assert_close(pref.reward_scores(rm, wider), r1, 1e-4, "left padding changes nothing")
    graphdef, params, rest = nnx.split(rm, nnx.Param, ...)
    tc = TrainConfig(steps=10, batch_size=12, seq_len=SEQ + 4, lr=1e-2, warmup=1, progress=False)
    tx = make_optimizer(tc)
    step = make_train_step(graphdef, tx, pref.make_bt_loss())
    params, opt, key = jax.tree.map(jnp.copy, params), tx.init(params), jax.random.key(0)
    losses = []
    for _ in range(10):
        params, opt, key, m = step(params, opt, key, rest, None, jnp.asarray(rows))
        losses.append(float(m["loss"]))
    trained = nnx.merge(graphdef, params, rest)
    r = pref.reward_scores(trained, rows)
    assert float(bradley_terry_loss(r[:6], r[6:])) < 0.5 * losses[0]
    assert pref.pair_accuracy(trained, rows) > pref.pair_accuracy(rm, rows)


def test_truncate_keeps_the_first_layers(model) -> None:
    one = pref.truncate(model, 1)
    assert one.config.num_layers == 1 and len(one.layers) == 1
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 4096, (2, 9)))
    full = model.forward(tokens, return_hidden=True).hidden
    part = one.forward(tokens, return_hidden=True).hidden
    assert_close(part[1], model.final_norm(full[1]), 1e-5, "layer 0's output, normed")
    assert_close(part[0], full[0], 1e-6)
    with pytest.raises(ValueError, match="layers"):
        pref.truncate(model, 3)


# ----------------------------------------------------------------------------- RL
def test_completion_batch_and_rewards() -> None:
    eot = TOK.end_of_turn_id
    prompts = [[2, 5, 9], [2, 7]]
    comps = [TOK.encode("KING") + [eot], TOK.encode("Hamlet")]
    batch, mask = rl.completion_batch(prompts, comps, 8)
    assert batch.shape == (2, 9) and mask.shape == (2, 8)
    row = prompts[0] + comps[0]
    np.testing.assert_array_equal(batch[0, : len(row)], row)
    targets = batch[:, 1:]
    np.testing.assert_array_equal(targets[0][mask[0] == 1], comps[0])
    np.testing.assert_array_equal(targets[1][mask[1] == 1], comps[1])
    np.testing.assert_array_equal(rl.exact_rewards(TOK, comps, ["KING", "Hamlet"]), [1, 0])
    np.testing.assert_array_equal(rl.exact_rewards(TOK, comps, [" KING ", "KING"]), [1, 0])
    np.testing.assert_allclose(rl.length_rewards([[1] * 3, [1] * 20], 12), [0.25, 1.0])
    np.testing.assert_allclose(rl.baseline_advantages([1, 0, 0, 1]), [0.5, -0.5, -0.5, 0.5])
    with pytest.raises(ValueError, match="prompt 0"):
        rl.completion_batch([[1] * 10], [[2]], 8)


def test_policy_gradient_loss_is_the_formula() -> None:
    rng = np.random.default_rng(2)
    b, t, v = 4, 6, 11
    logits = jnp.asarray(rng.normal(size=(b, t, v)), jnp.float32)
    ref = jnp.asarray(rng.normal(size=(b, t, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    mask = np.zeros((b, t), np.float32)
    mask[0, 2:] = 1
    mask[1, 4:] = 1
    mask[2, :] = 1  # row 3: no completion
    adv = jnp.asarray([1.0, -2.0, 0.5, 9.0])
    lp = np.asarray(jax.nn.log_softmax(logits))
    lq = np.asarray(jax.nn.log_softmax(ref))
    picked = np.take_along_axis(lp, np.asarray(targets)[..., None], -1)[..., 0]
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    for beta in (0.0, 0.2):
        per = (-np.asarray(adv)[:, None] * picked + beta * kl) * mask
        want = np.mean([per[i].sum() / mask[i].sum() for i in range(3)])
        got = rl.make_pg_loss(beta)(
            logits, targets, ref, None, {"mask": jnp.asarray(mask), "advantages": adv}
        )
        assert np.isclose(float(got), want, rtol=1e-5)
    # no advantage and the policy equal to the reference: nothing to learn
    zero = rl.make_pg_loss(0.3)
    g = jax.grad(
        lambda z: zero(
            z, targets, logits, None, {"mask": jnp.asarray(mask), "advantages": jnp.zeros(b)}
        )
    )
    assert float(jnp.abs(g(logits)).max()) < 1e-6


def test_slerp_keeps_the_norm_and_its_ends() -> None:
    rng = np.random.default_rng(3)
    a = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    b = b * jnp.linalg.norm(a) / jnp.linalg.norm(b)
    assert_close(rl.slerp(a, b, 0.0), a, 1e-5)
    assert_close(rl.slerp(a, b, 1.0), b, 1e-5)
    for t in (0.25, 0.5, 0.9):
        assert np.isclose(
            float(jnp.linalg.norm(rl.slerp(a, b, t))), float(jnp.linalg.norm(a)), rtol=1e-5
        )
    assert float(jnp.linalg.norm(0.5 * (a + b))) < 0.99 * float(jnp.linalg.norm(a))
    assert_close(rl.slerp(a, 2 * a, 0.5), 1.5 * a, 1e-5)  # parallel: linear
    init = {"w": jnp.ones((4, 5)), "v": [jnp.zeros(3)]}
    x = {"w": init["w"] + a, "v": [jnp.arange(3.0)]}
    y = {"w": init["w"] + b, "v": [jnp.arange(3.0) * 2]}
    merged = rl.slerp_merge(init, x, y, 0.5)
    assert_close(merged["w"], init["w"] + rl.slerp(a, b, 0.5), 1e-5)
    assert_close(merged["v"][0], jnp.arange(3.0) * 1.5, 1e-5)
    assert_close(rl.task_vector(x, init)["w"], a, 1e-6)


def test_samples_come_in_groups_and_the_anchor_follows_the_policy(model, examples) -> None:
    prompts = prompt_ids(TOK, examples[:2])
    greedy = rl.sample_answers(
        model, prompts, 3, max_new_tokens=4, stop_id=TOK.end_of_turn_id, temperature=0.0
    )
    assert len(greedy) == 6 and greedy[0] == greedy[1] == greedy[2]
    assert all(1 <= len(s) <= 4 for s in greedy)
    anchor = {"a": jnp.zeros(3)}
    assert_close(lora.ema(anchor, {"a": jnp.ones(3)}, 0.25)["a"], 0.25 * np.ones(3), 1e-6)
    # Step 0 moves the policy (advantages +-1); step 1 has advantages 0, so its loss is the
    # KL term alone: 0 when the anchor followed the policy (anchor_rate = 1), > 0 for a
    # fixed anchor at the start.
    policy = lora.apply_lora(
        model, 2, 4.0, ("q", "v", "up", "down"), nnx.Rngs(0), trainable_tokens=(TOK.end_of_turn_id,)
    )
    batch, mask = rl.completion_batch(prompts, greedy[::3], SEQ)
    tc = TrainConfig(steps=2, batch_size=2, seq_len=SEQ, lr=0.1, warmup=0, progress=False)

    def batches(i, _):
        adv = jnp.asarray([1.0, -1.0]) if i == 0 else jnp.zeros(2)
        return batch, {"mask": jnp.asarray(mask), "advantages": adv}

    _, moving = lora.finetune(policy, batches, tc, rl.make_pg_loss(1.0), anchor_rate=1.0)
    _, fixed = lora.finetune(policy, batches, tc, rl.make_pg_loss(1.0), reference=model)
    assert moving[0]["loss"] == pytest.approx(fixed[0]["loss"], rel=1e-5)
    assert fixed[1]["loss"] > 1e-4 and abs(moving[1]["loss"]) < 1e-3 * fixed[1]["loss"]
    extra = {"mask": jnp.asarray(mask), "advantages": jnp.zeros(2)}
    with pytest.raises(ValueError, match="anchor_rate"):
        lora.finetune(
            policy,
            lambda i, m: (batch, extra),
            tc,
            rl.make_pg_loss(0.1),
            reference=model,
            anchor_rate=0.5,
        )


def test_shipped_sft_adapters_load_and_score_as_recorded() -> None:
    """gemma2_lite/assets/tiny-model-sft: each seed loads in PEFT's layout and gives the
    held-out numbers its README records (within one question and rounding)."""
    import json
    import re

    from gemma2_lite.book.recipes import SEQ, sft_adapters
    from gemma2_lite.paths import sft_adapters_dir
    from gemma2_lite.posttrain import sft_eval
    from gemma2_lite.weights import book_model

    base = book_model(verbose=False)[0]
    held = task_examples(TOK, "valid", 384, seed=1)
    rows, mask = sft_batch(TOK, held, SEQ)
    for seed in (0, 1, 2):
        readme = (sft_adapters_dir(seed) / "README.md").read_text()
        recorded = json.loads(re.search(r"^  (\{.*\})$", readme, re.M).group(1))
        model = lora.merge(sft_adapters(base, seed=seed))
        got = sft_eval(model, rows, mask)
        assert got["tokens"] == recorded["tokens"]
        assert abs(got["loss"] - recorded["loss"]) <= 1e-3 * recorded["loss"]
        assert abs(got["exact"] - recorded["exact"]) <= 1.01 / len(held)


def test_recipe_command_writes_a_loadable_adapter_folder(tmp_path) -> None:
    from gemma2_lite.book.recipes import main
    from gemma2_lite.weights import book_model

    assert (
        main(
            [
                "sft",
                "--steps",
                "2",
                "--n",
                "200",
                "--held",
                "24",
                "--seed",
                "3",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    readme = (tmp_path / "README.md").read_text()
    assert "--seed 3 --steps 2 --n 200" in readme and "held-out" in readme
    model = lora.load_adapters(book_model(verbose=False)[0], tmp_path)
    assert model.embedder.embedding.ids == (TOK.start_of_turn_id, TOK.end_of_turn_id)
    # The package's command-line policy: bad input is one line and exit 2, not a traceback.
    with pytest.raises(SystemExit) as usage:  # argparse's one-line usage error
        main(["sft", "--steps", "0", "--out", str(tmp_path)])
    assert usage.value.code == 2
    assert main(["sft", "--out", str(tmp_path / "README.md")]) == 2
