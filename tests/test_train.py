"""Trainer: data order, schedule, learning, metrics, bf16, distillation, exact resume, atomic
saves."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma2_lite import Gemma2, get_config
from gemma2_lite.distill import cross_entropy_loss, kl_divergence
from gemma2_lite.train import (
    TokenBatcher,
    TrainConfig,
    TrainError,
    evaluate,
    latest_checkpoint_step,
    load_history,
    lr_schedule,
    make_optimizer,
    restore_checkpoint,
    save_checkpoint,
    train,
)

ROOT = Path(__file__).resolve().parent.parent
V = 61
CFG = get_config(
    "tiny",
    vocab_size=V,
    d_model=24,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=6,
    ffn_dim=40,
    sliding_window=5,
    max_seq_len=32,
)
TC = TrainConfig(
    steps=30,
    batch_size=3,
    seq_len=11,
    lr=1e-2,
    warmup=3,
    seed=0,
    progress=False,
    eval_every=10,
    eval_batches=4,
)


def synthetic_stream(n: int, seed: int = 0) -> np.ndarray:
    """A learnable stream: next = (7 * prev + 3) mod V, with 10% random resets."""
    rng = np.random.default_rng(seed)
    out = np.empty(n, np.int32)
    out[0] = 1
    for i in range(1, n):
        out[i] = rng.integers(V) if rng.random() < 0.1 else (7 * out[i - 1] + 3) % V
    return out


TRAIN_IDS = synthetic_stream(3001, 0)
forward = nnx.jit(lambda model, tokens: model(tokens))  # one compile instead of op-by-op
VALID_IDS = synthetic_stream(401, 1)


def test_batcher_is_deterministic_contiguous_and_resumable() -> None:
    stream = np.arange(200, dtype=np.int32)  # value = position: easy to check windows
    a = TokenBatcher(stream, 4, 7, seed=3)
    b = TokenBatcher(stream, 4, 7, seed=3)
    c = TokenBatcher(stream, 4, 7, seed=4)
    batches = [a.next() for _ in range(20)]  # ~3 epochs of 28 windows
    assert all(np.array_equal(x, b.next()) for x in batches)
    assert not all(np.array_equal(x, c.next()) for x in batches)
    for x in batches:
        assert x.shape == (4, 8) and x.dtype == np.int32
        assert np.all(np.diff(x, axis=1) == 1)  # contiguous windows of T + 1 tokens
    # one epoch visits each window once
    fresh = TokenBatcher(stream, 1, 7, seed=3)
    n = fresh.windows_per_epoch
    starts = [int(fresh.next()[0, 0]) for _ in range(n)]
    assert len(set(starts)) == n and fresh.epoch == 0
    # restoring the position continues the same sequence
    d = TokenBatcher(stream, 4, 7, seed=3)
    for _ in range(9):
        d.next()
    e = TokenBatcher(stream, 4, 7, seed=3)
    e.set_state(json.loads(json.dumps(d.state())))
    assert all(np.array_equal(d.next(), e.next()) for _ in range(5))
    with pytest.raises(TrainError, match="seq_len"):
        TokenBatcher(stream, 4, 5, seed=3).set_state(d.state())
    with pytest.raises(TrainError, match="1-D integer"):
        TokenBatcher(stream.reshape(10, 20), 4, 7)
    with pytest.raises(TrainError, match="too few"):
        TokenBatcher(stream[:10], 4, 7)


def test_schedule_warmup_then_cosine() -> None:
    tc = TrainConfig(steps=100, lr=2e-3, warmup=10, min_lr_ratio=0.1)
    sched = lr_schedule(tc)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(1e-3)
    assert float(sched(10)) == pytest.approx(2e-3)
    assert float(sched(55)) == pytest.approx(2e-4 + 0.5 * 1.8e-3, rel=1e-5)
    assert float(sched(100)) == pytest.approx(2e-4)
    lrs = [float(sched(i)) for i in range(10, 101)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))


def test_config_errors() -> None:
    with pytest.raises(TrainError, match="steps"):
        TrainConfig(steps=-1)
    with pytest.raises(TrainError, match="dtype"):
        TrainConfig(dtype="float16")
    with pytest.raises(TrainError, match="token ids"):
        train(CFG, TC, np.full(500, V, np.int32))
    with pytest.raises(TrainError, match="context"):
        train(CFG, TC.replace(seq_len=64), TRAIN_IDS)


def test_evaluate_matches_manual_loss() -> None:
    model = Gemma2(CFG, rngs=nnx.Rngs(5))
    ids = VALID_IDS[:100]  # 9 windows of 11 -> batches 4, 4, 1(+pad)
    got = evaluate(model, ids, batch_size=4, seq_len=11)
    windows = np.stack([ids[s : s + 12] for s in range(0, 99, 11)])
    logits = forward(model, jnp.asarray(windows[:, :-1]))
    ref = float(cross_entropy_loss(logits, jnp.asarray(windows[:, 1:])))
    assert got["tokens"] == 99
    assert got["loss"] == pytest.approx(ref, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)
    first = evaluate(model, ids, batch_size=4, seq_len=11, max_batches=1)
    assert first["tokens"] == 44


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Gemma2, dict, Path]:
    """TC.steps steps, uninterrupted, with checkpoints and metrics in a folder."""
    out = tmp_path_factory.mktemp("straight")
    model, hist = train(CFG, TC, TRAIN_IDS, VALID_IDS, out_dir=out)
    return model, hist, out


def test_training_learns_and_writes_metrics(straight_run: tuple[Gemma2, dict, Path]) -> None:
    model, hist, tmp_path = straight_run
    losses = [r["loss"] for r in hist["train"]]
    assert len(losses) == TC.steps and [r["step"] for r in hist["train"]] == list(range(1, 31))
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 1.0  # the bigram rule is learnable
    assert losses[0] == pytest.approx(math.log(V), abs=0.6)  # starts near uniform
    assert [e["step"] for e in hist["eval"]] == [10, 20, 30]
    assert hist["eval"][-1]["val_loss"] < hist["eval"][0]["val_loss"]
    assert hist["eval"][-1]["val_loss"] == pytest.approx(
        evaluate(model, VALID_IDS, batch_size=3, seq_len=11, max_batches=4)["loss"], rel=1e-5
    )
    rows = (tmp_path / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + TC.steps and rows[0].startswith("step,loss,grad_norm,lr")
    saved = load_history(tmp_path)
    assert saved["history"]["train"][-1]["loss"] == losses[-1]
    assert saved["train_config"]["steps"] == 30
    assert latest_checkpoint_step(tmp_path / "checkpoints") == 30
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    # resuming a finished run does nothing and returns the same weights
    again, hist2 = train(CFG, TC, TRAIN_IDS, VALID_IDS, out_dir=tmp_path)
    assert hist2 == hist
    for x, y in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(TrainError, match="different run"):
        train(CFG, TC.replace(lr=5e-3), TRAIN_IDS, VALID_IDS, out_dir=tmp_path)


def test_bfloat16_compute_keeps_fp32_params() -> None:
    m32, h32 = train(CFG, TC, TRAIN_IDS, stop_at=2)
    m16, h16 = train(CFG, TC.replace(dtype="bfloat16"), TRAIN_IDS, stop_at=2)
    assert m16.config.dtype == "bfloat16"
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(m16, nnx.Param)))
    l32 = [r["loss"] for r in h32["train"]]
    l16 = [r["loss"] for r in h16["train"]]
    assert all(np.isfinite(l16))
    assert l16 != l32  # bf16 really changed the arithmetic
    np.testing.assert_allclose(l16, l32, rtol=0.05)  # ... but not the result


def test_distillation_moves_student_towards_teacher() -> None:
    teacher = Gemma2(CFG, rngs=nnx.Rngs(42))
    tc = TC.replace(eval_every=0)
    x = jnp.asarray(VALID_IDS[:44].reshape(4, 11))
    t_logits = forward(teacher, x)
    before = Gemma2(CFG, rngs=nnx.Rngs(tc.seed))
    student, hist = train(CFG, tc, TRAIN_IDS, teacher=teacher, stop_at=12)
    kl_before = float(kl_divergence(forward(before, x), t_logits))
    kl_after = float(kl_divergence(forward(student, x), t_logits))
    assert kl_after < 0.75 * kl_before
    with pytest.raises(TrainError, match="vocabulary"):
        train(CFG, tc, TRAIN_IDS, teacher=Gemma2(CFG.replace(vocab_size=67), rngs=nnx.Rngs(0)))


RESUME_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_train import CFG, TC, TRAIN_IDS, VALID_IDS
from gemma2_lite.train import train
train(CFG, TC.replace(checkpoint_every=7), TRAIN_IDS, VALID_IDS, out_dir={out!r})
"""


@pytest.mark.slow  # a second process imports JAX and compiles the step again
def test_resume_is_bit_exact_in_a_new_process(
    straight_run: tuple[Gemma2, dict, Path], tmp_path: Path
) -> None:
    """2N steps straight == N steps, checkpoint, a new process restores and runs N more."""
    straight, h_straight, _ = straight_run
    half = TC.steps // 2
    _, h_first = train(CFG, TC, TRAIN_IDS, VALID_IDS, out_dir=tmp_path, stop_at=half)
    assert latest_checkpoint_step(tmp_path / "checkpoints") == half
    assert len(h_first["train"]) == half
    script = RESUME_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path))
    subprocess.run(
        [sys.executable, "-c", script],
        check=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    resumed = load_history(tmp_path)["history"]
    assert [r["loss"] for r in resumed["train"]] == [r["loss"] for r in h_straight["train"]]
    assert [r["grad_norm"] for r in resumed["train"]] == [
        r["grad_norm"] for r in h_straight["train"]
    ]
    assert resumed["eval"] == h_straight["eval"]
    _, params, _ = nnx.split(straight, nnx.Param, ...)
    like = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    opt_like = jax.eval_shape(make_optimizer(TC).init, params)
    (p_res, _, _), meta, step = restore_checkpoint(
        tmp_path / "checkpoints", (like, opt_like, jax.random.PRNGKey(0))
    )
    assert step == TC.steps and meta["data_state"]["index"] > 0
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p_res)):
        assert np.array_equal(np.asarray(a), np.asarray(b))  # bit for bit


CRASH_SCRIPT = """
import os, sys
import numpy as np
from gemma2_lite.train import save_checkpoint
from orbax.checkpoint._src.path import atomicity
state = {{"w": np.full((3, 5), 2.0, np.float32)}}
save_checkpoint({d!r}, 1, state, {{"note": "good"}})
async def die(*args, **kwargs):        # the process is killed after writing the data,
    os._exit(17)                       # just before the commit rename
atomicity.async_path.rename = die
save_checkpoint({d!r}, 2, {{"w": np.full((3, 5), 9.0, np.float32)}}, {{"note": "torn"}})
"""


def test_interrupted_save_leaves_previous_checkpoint(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT.format(d=str(d))],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 17, proc.stderr[-2000:]
    leftovers = [p.name for p in d.iterdir()]
    assert any("tmp" in name for name in leftovers), leftovers  # the torn save is there...
    assert latest_checkpoint_step(d) == 1  # ...but not visible
    state, meta, step = restore_checkpoint(d, {"w": np.zeros((3, 5), np.float32)})
    assert step == 1 and meta["note"] == "good"
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full((3, 5), 2.0, np.float32))
    # and a later save still works next to the debris
    save_checkpoint(d, 3, {"w": np.ones((3, 5), np.float32)}, {"note": "after"})
    assert latest_checkpoint_step(d) == 3


def test_trainable_filter_trains_only_the_adapters() -> None:
    """trainable=nnx.LoRAParam: the optimizer updates only LoRA-typed variables (here the
    final norm's scale, retyped as an adapter would be) and every other weight stays bit for
    bit; the default filter (nnx.Param, of which LoRAParam is a kind) takes them all."""
    from gemma2_lite.train import split_trainable

    tc = TC.replace(steps=4, eval_every=0)
    base = Gemma2(CFG, rngs=nnx.Rngs(0))
    base.final_norm.scale = nnx.LoRAParam(base.final_norm.scale.get_value())
    before = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(base))}
    adapted, hist = train(CFG, tc, TRAIN_IDS, model=base, trainable=nnx.LoRAParam)
    after = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(adapted))}
    changed = sorted(p for p in before if not np.array_equal(before[p], after[p]))
    assert changed == [("final_norm", "scale")]
    assert isinstance(adapted.final_norm.scale, nnx.LoRAParam)
    assert len(hist["train"]) == 4 and all(np.isfinite(r["loss"]) for r in hist["train"])
    _, params, rest = split_trainable(base)
    assert ("final_norm", "scale") in dict(nnx.to_flat_state(params))
    assert not jax.tree.leaves(rest)
    with pytest.raises(TrainError, match="matches no variable"):
        train(CFG, tc, TRAIN_IDS, trainable=nnx.LoRAParam)


def test_a_non_finite_update_is_caught_at_its_own_step() -> None:
    """A finite loss whose gradient is NaN (sqrt at 0) makes every weight NaN in step 1's
    update; the error names step 1, not step 2 whose loss is the first to show it."""

    def nan_gradient(logits, targets, teacher_logits, rng, mask=None):
        return jnp.sqrt(jnp.abs(logits[0, 0, 0] - logits[0, 0, 0]))  # 0, d/dx = NaN

    with pytest.raises(
        FloatingPointError,
        match=r"update of step 1 made parameter\(s\) "
        r"\['embed",
    ):
        train(CFG, TC.replace(eval_every=0), TRAIN_IDS, loss_fn=nan_gradient, stop_at=3)


def test_stop_at_and_zero_steps_mean_what_they_say() -> None:
    with pytest.raises(
        TrainError,
        match=r"stop_at \(the step to stop after\) must be a "
        r"non-negative integer, got 2.5",
    ):
        train(CFG, TC, TRAIN_IDS, stop_at=2.5)
    with pytest.raises(TrainError, match="stop_at"):
        train(CFG, TC, TRAIN_IDS, stop_at=True)
    # steps=0: no update; the initial weights come back, evaluated once at step 0
    model, hist = train(CFG, TC.replace(steps=0), TRAIN_IDS, VALID_IDS)
    assert hist["train"] == [] and [e["step"] for e in hist["eval"]] == [0]
    fresh = Gemma2(CFG, rngs=nnx.Rngs(params=TC.seed))
    for x, y in zip(jax.tree.leaves(nnx.state(fresh)), jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    _, hist = train(CFG, TC, TRAIN_IDS, stop_at=0)
    assert hist["train"] == []


def test_step_cache_keys_on_every_field_that_shapes_the_step() -> None:
    """The cache reuses a step only for configs that compile the same program: a field it
    does not list as ignored (here b2, or a future field) gives a new step."""
    from gemma2_lite.train import StepCache

    cache = StepCache()
    graphdef = nnx.graphdef(Gemma2(CFG, rngs=nnx.Rngs(0)))
    first = cache.get(graphdef, TC)
    assert cache.get(graphdef, TC.replace(seed=3, eval_every=5, progress=True)) is first
    assert cache.get(graphdef, TC.replace(b2=0.9)) is not first
    assert cache.get(graphdef, TC, trainable=nnx.LoRAParam) is not first
    assert len(cache) == 3
    cache.clear()
    assert len(cache) == 0


def test_the_split_trainer_keeps_every_public_name_of_gemma2_lite_train() -> None:
    """train.py became five modules; notebooks and other code import from gemma2_lite.train,
    so each public name of the one-module trainer is still there (and is the same object)."""
    import gemma2_lite.train as tr
    from gemma2_lite import sharding, train_checkpoint, train_step

    names = [
        "TrainConfig",
        "TokenBatcher",
        "train",
        "evaluate",
        "make_optimizer",
        "lr_schedule",
        "make_loss_fn",
        "make_train_step",
        "save_checkpoint",
        "restore_checkpoint",
        "latest_checkpoint_step",
        "load_history",
        "TrainError",
        "checkpoint_steps",
        "verify_checkpoint",
        "data_fingerprint",
        "SkippedCheckpointWarning",
        "StepShardings",
        "cross_entropy_loss",
    ]
    assert all(hasattr(tr, n) and n in tr.__all__ for n in names)
    assert tr.StepShardings is sharding.StepShardings
    assert tr.make_train_step is train_step.make_train_step
    assert tr.save_checkpoint is train_checkpoint.save_checkpoint
