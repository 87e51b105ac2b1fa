"""Distillation losses: hand-computed values, top-k = full at k = V, masking, temperature."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma2_lite import Gemma2, get_config
from gemma2_lite.distill import (
    compute_teacher_topk,
    cross_entropy_loss,
    distillation_loss,
    kl_divergence,
    load_teacher_topk,
    masked_mean,
    mixed_loss,
    save_teacher_topk,
    topk_bytes_per_token,
    topk_distillation_loss,
)
from gemma2_lite.losses import token_nll

B, T, V = 3, 5, 13


def _logits(seed: int, shape: tuple[int, ...] = (B, T, V), scale: float = 2.0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _softmax(x: list[float]) -> list[float]:
    m = max(x)
    e = [math.exp(v - m) for v in x]
    return [v / sum(e) for v in e]


def test_hand_computed_cross_entropy_and_kl() -> None:
    s = [1.0, 2.0, 0.5]
    t = [0.2, 1.5, -1.0]
    ps, pt = _softmax(s), _softmax(t)
    ce = -sum(a * math.log(b) for a, b in zip(pt, ps))
    kl = sum(a * math.log(a / b) for a, b in zip(pt, ps))
    sl = jnp.asarray([[s]], jnp.float32)
    tl = jnp.asarray([[t]], jnp.float32)
    assert float(distillation_loss(sl, tl)) == pytest.approx(ce, rel=1e-6)
    assert float(kl_divergence(sl, tl)) == pytest.approx(kl, rel=1e-5)
    # With temperature 2: both softened, then times tau^2 = 4.
    ps2, pt2 = _softmax([v / 2 for v in s]), _softmax([v / 2 for v in t])
    ce2 = -4 * sum(a * math.log(b) for a, b in zip(pt2, ps2))
    assert float(distillation_loss(sl, tl, temperature=2.0)) == pytest.approx(ce2, rel=1e-6)


def test_hard_label_cross_entropy_by_hand() -> None:
    logits = _logits(0)
    targets = jnp.asarray(np.random.default_rng(1).integers(0, V, (B, T)), jnp.int32)
    ref = 0.0
    for b in range(B):
        for t in range(T):
            row = [float(v) for v in logits[b, t]]
            ref -= math.log(_softmax(row)[int(targets[b, t])])
    assert float(cross_entropy_loss(logits, targets)) == pytest.approx(ref / (B * T), rel=1e-5)


def test_token_nll_hand_written_gradient_equals_autodiff() -> None:
    """losses.token_nll carries a hand-written backward pass (softmax - onehot); it must equal
    jax.grad of the plain formula -log_softmax(z)[target], weighted per position."""
    logits = _logits(20, scale=4.0)
    targets = jnp.asarray(np.random.default_rng(21).integers(0, V, (B, T)), jnp.int32)
    weights = jnp.asarray(np.random.default_rng(22).uniform(0, 2, (B, T)), jnp.float32)

    def plain(z: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(z, axis=-1)
        return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

    ours = jax.jit(jax.grad(lambda z: jnp.sum(token_nll(z, targets) * weights)))(logits)
    ref = jax.grad(lambda z: jnp.sum(plain(z) * weights))(logits)
    assert float(jnp.max(jnp.abs(ours - ref))) < 1e-5 * float(jnp.max(jnp.abs(ref)))
    np.testing.assert_allclose(
        np.asarray(token_nll(logits, targets)), np.asarray(plain(logits)), rtol=1e-5, atol=1e-6
    )
    # each row's gradient sums to 0 (softmax sums to 1, the one-hot to 1)
    assert float(jnp.max(jnp.abs(jnp.sum(ours, -1)))) < 1e-5
    # a bfloat16 input gets a bfloat16 gradient
    g16 = jax.grad(lambda z: jnp.sum(token_nll(z, targets)))(logits.astype(jnp.bfloat16))
    assert g16.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(g16, np.float32),
        np.asarray(jax.grad(lambda z: jnp.sum(plain(z)))(logits)),
        atol=2e-2,
    )


def test_topk_with_k_equal_v_equals_full_loss() -> None:
    s, t = _logits(2), _logits(3)
    # ids in a shuffled order: the renormalisation must not care about order.
    perm = np.stack([np.random.default_rng(i).permutation(V) for i in range(B * T)])
    ids = jnp.asarray(perm.reshape(B, T, V), jnp.int32)
    t_k = jnp.take_along_axis(t, ids, axis=-1)
    mask = jnp.asarray(np.random.default_rng(4).integers(0, 2, (B, T)))
    for tau in (1.0, 2.5):
        full = distillation_loss(s, t, temperature=tau, mask=mask)
        sparse = topk_distillation_loss(s, t_k, ids, temperature=tau, mask=mask)
        np.testing.assert_allclose(float(sparse), float(full), rtol=1e-6)


def test_topk_renormalises_over_kept_ids() -> None:
    s, t = _logits(5), _logits(6)
    k = 4
    t_vals, ids = jax.lax.top_k(t, k)
    loss = topk_distillation_loss(s, t_vals, ids)
    # Reference: restrict both to the k ids, softmax over them, cross-entropy.
    ref = []
    for b in range(B):
        for p in range(T):
            i = [int(x) for x in ids[b, p]]
            pt = _softmax([float(t[b, p, j]) for j in i])
            ps = _softmax([float(s[b, p, j]) for j in i])
            ref.append(-sum(a * math.log(c) for a, c in zip(pt, ps)))
    assert float(loss) == pytest.approx(np.mean(ref), rel=1e-5)
    # and it differs from the full loss (the tail matters), so the test can tell them apart
    assert abs(float(loss) - float(distillation_loss(s, t))) > 1e-2


def test_minimum_at_student_equals_teacher() -> None:
    t = _logits(7)
    p = jax.nn.softmax(t, axis=-1)
    entropy = float(jnp.mean(-jnp.sum(p * jax.nn.log_softmax(t, axis=-1), axis=-1)))
    assert float(distillation_loss(t, t)) == pytest.approx(entropy, rel=1e-6)
    # One program with the same array on both sides: the terms cancel exactly (p log p - p log p),
    # and the gradient softmax(s) - softmax(t) is two identical computations; these bounds are
    # on a quantity that is 0 by symmetry, not a comparison of two compiled programs.
    assert abs(float(kl_divergence(t, t))) < 1e-6
    grad = jax.grad(lambda s: distillation_loss(s, t))(t)
    assert float(jnp.max(jnp.abs(grad))) < 1e-7
    # any other student does worse
    for seed in range(5):
        other = t + _logits(100 + seed, scale=0.3)
        assert float(distillation_loss(other, t)) > entropy


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.5, 4.0))
def test_property_ce_equals_kl_plus_entropy(seed: int, tau: float) -> None:
    s, t = _logits(seed), _logits(seed + 1)
    p = jax.nn.softmax(t / tau, axis=-1)
    entropy = jnp.mean(-jnp.sum(p * jax.nn.log_softmax(t / tau, axis=-1), axis=-1))
    lhs = float(distillation_loss(s, t, temperature=tau)) / tau**2
    rhs = float(kl_divergence(s, t, temperature=tau) + entropy)
    assert lhs == pytest.approx(rhs, rel=1e-5, abs=1e-5)
    assert float(kl_divergence(s, t, temperature=tau)) >= -1e-6


def test_temperature_scaling_keeps_gradient_scale() -> None:
    """For large tau the gradient of tau^2 * CE tends to (z_s - z_t) / V-ish: it stays O(1)
    instead of shrinking like 1 / tau^2. Check the exact large-tau limit on centred logits."""
    s, t = _logits(8, scale=0.5), _logits(9, scale=0.5)
    s = s - s.mean(-1, keepdims=True)
    t = t - t.mean(-1, keepdims=True)
    tau = 1000.0
    g = jax.grad(lambda x: distillation_loss(x, t, temperature=tau))(s) * (B * T)
    np.testing.assert_allclose(np.asarray(g), np.asarray((s - t) / V), atol=1e-4)
    # Without the tau^2 factor the gradient is ~|s - t| / (V B T tau^2), about 1e-9 here: the
    # bound states that it vanishes (a thousand times above its size), it compares no programs.
    g_unscaled = jax.grad(lambda x: distillation_loss(x, t, temperature=tau) / tau**2)(s)
    assert float(jnp.max(jnp.abs(g_unscaled))) < 1e-6


def test_masked_mean_and_fully_masked_rows_have_finite_grads() -> None:
    s, t = _logits(10), _logits(11)
    mask = np.ones((B, T), np.int32)
    mask[0] = 0  # a fully masked row
    mask[1, 3:] = 0
    mask = jnp.asarray(mask)
    per_pos = -jnp.sum(jax.nn.softmax(t, -1) * jax.nn.log_softmax(s, -1), -1)
    expected = float(jnp.sum(per_pos * mask) / jnp.sum(mask))
    assert float(distillation_loss(s, t, mask=mask)) == pytest.approx(expected, rel=1e-6)
    # garbage (inf) in a masked position must not leak
    s_bad = s.at[0, 0, 0].set(jnp.inf)
    assert float(distillation_loss(s_bad, t, mask=mask)) == pytest.approx(expected, rel=1e-6)
    for fn in (
        lambda x: distillation_loss(x, t, mask=mask),
        lambda x: topk_distillation_loss(x, *jax.lax.top_k(t, 3), mask=mask),
        lambda x: cross_entropy_loss(x, jnp.zeros((B, T), jnp.int32), mask),
    ):
        g = jax.grad(fn)(s)
        assert bool(jnp.all(jnp.isfinite(g)))
        assert float(jnp.max(jnp.abs(g[0]))) == 0.0  # masked row gets no gradient
    none = jnp.zeros((B, T))
    assert float(distillation_loss(s, t, mask=none)) == 0.0
    g = jax.grad(lambda x: distillation_loss(x, t, mask=none))(s)
    assert bool(jnp.all(g == 0))
    assert float(
        masked_mean(jnp.arange(6.0).reshape(2, 3), jnp.asarray([[1, 0, 1], [0, 0, 1]]))
    ) == pytest.approx((0 + 2 + 5) / 3)


def test_alpha_mixing() -> None:
    s, t = _logits(12), _logits(13)
    y = jnp.asarray(np.random.default_rng(14).integers(0, V, (B, T)), jnp.int32)
    soft = float(distillation_loss(s, t, temperature=2.0))
    hard = float(cross_entropy_loss(s, y))
    mixed = float(mixed_loss(s, t, y, alpha=0.3, temperature=2.0))
    assert mixed == pytest.approx(0.3 * soft + 0.7 * hard, rel=1e-6)
    assert float(distillation_loss(s, t, alpha=0.0, targets=y)) == pytest.approx(hard, rel=1e-6)
    with pytest.raises(ValueError, match="targets"):
        distillation_loss(s, t, alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(s, t, alpha=1.5, targets=y)


def test_bad_inputs_raise_clear_errors() -> None:
    s = _logits(0)
    with pytest.raises(ValueError, match="same"):
        distillation_loss(s, s[..., :7])
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(s, s, temperature=0.0)
    with pytest.raises(ValueError, match="mask shape"):
        distillation_loss(s, s, mask=jnp.ones((B, T + 1)))
    with pytest.raises(ValueError, match="3-D"):
        distillation_loss(s[0], s[0])
    with pytest.raises(ValueError, match="teacher_topk_ids"):
        topk_distillation_loss(s, s[..., :3], jnp.zeros((B, T, 2), jnp.int32))
    with pytest.raises(TypeError, match="integer"):
        cross_entropy_loss(s, jnp.zeros((B, T)))


def test_teacher_topk_compute_save_load_roundtrip(tmp_path) -> None:
    cfg = get_config(
        "tiny",
        vocab_size=97,
        d_model=24,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=6,
        ffn_dim=40,
        sliding_window=4,
        max_seq_len=32,
    )
    teacher = Gemma2(cfg, rngs=nnx.Rngs(3))
    tokens = np.random.default_rng(0).integers(0, 97, (5, 11)).astype(np.int32)
    k = 7
    values, ids = compute_teacher_topk(teacher, tokens, k, batch_size=2)
    assert values.shape == ids.shape == (5, 11, k)
    full = np.asarray(nnx.jit(lambda m, x: m(x))(teacher, jnp.asarray(tokens)))
    np.testing.assert_allclose(values, np.sort(full, -1)[..., ::-1][..., :k], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(full, ids, -1), values, rtol=1e-6)

    info = save_teacher_topk(tmp_path / "topk.npz", values, ids, vocab_size=97, chunk_rows=2)
    assert info["bytes_per_token"] == k * (2 + 2) == topk_bytes_per_token(k, 97)
    # file = payload + small zip/npy headers (6 chunks x ~100 B)
    payload = 5 * 11 * info["bytes_per_token"]
    assert payload <= info["file_bytes"] < payload + 4096
    v2, i2 = load_teacher_topk(tmp_path / "topk.npz")
    np.testing.assert_array_equal(i2, ids)
    # bfloat16 keeps 8 bits of mantissa: relative error <= 2^-8
    np.testing.assert_allclose(v2, values, rtol=2**-8, atol=1e-6)
    assert topk_bytes_per_token(128, 256_128) == 128 * (2 + 4)
    with pytest.raises(ValueError, match="k must"):
        compute_teacher_topk(teacher, tokens, 98)
    with pytest.raises(ValueError, match="tokens has no rows"):
        compute_teacher_topk(teacher, tokens[:0], k)
    with pytest.raises(ValueError, match="ids must be in"):
        save_teacher_topk(tmp_path / "bad.npz", values, ids + 97, vocab_size=97)


def test_teacher_topk_is_compiled_once_for_every_call() -> None:
    """The jitted forward + top-k is made once, not per call: a second call (and its padded
    last chunk) runs the program the first compiled, so the model is traced once."""
    traces = []

    class Counting(Gemma2):
        def __call__(self, *args, **kwargs):  # runs only while tracing
            traces.append(1)
            return super().__call__(*args, **kwargs)

    cfg = get_config(
        "tiny",
        vocab_size=31,
        d_model=8,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
        ffn_dim=16,
        max_seq_len=16,
    )
    teacher = Counting(cfg, rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(1).integers(0, 31, (3, 6)).astype(np.int32)
    first = compute_teacher_topk(teacher, tokens, 4, batch_size=2)  # chunks of 2 and 1 + pad
    second = compute_teacher_topk(teacher, tokens, 4, batch_size=2)
    assert len(traces) == 1
    np.testing.assert_array_equal(first[1], second[1])
