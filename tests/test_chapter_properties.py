"""Property tests of the ideas in chapters 2-4 (RoPE, grouped-query attention, sliding window).

These check what each mechanism is *for*, independently of any reference implementation:
RoPE scores depend only on relative position; query head n reads key/value head n // G and no
other; a local layer sees exactly min(q + 1, W) keys and its receptive field grows by W - 1 per
layer; a ring-buffer cache keeps exactly the last S positions. Dimensions are small and odd so that
a swapped axis fails instead of broadcasting.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma2_lite.attention import LayerCache, attention_mask, causal_mask, gqa_attention
from gemma2_lite.rope import apply_rope, rope_frequencies

# JAX compiles once per new array shape, so every strategy below varies *values* over a few fixed
# shapes; the example count stays modest and the per-example deadline is off (first call compiles).
FEW = settings(max_examples=15, deadline=None)


@jax.jit
def _rope_scores(q: jax.Array, k: jax.Array, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """q (B, T, N, H), k (B, S, N, H), positions (B, T) / (B, S) -> scores (B, N, T, S)."""
    return jnp.einsum("BTNH,BSNH->BNTS", apply_rope(q, q_pos), apply_rope(k, k_pos))


# ----------------------------------------------------------------------------- RoPE
@FEW
@given(offset=st.integers(0, 8000), seed=st.integers(0, 2**16))
def test_rope_scores_depend_only_on_relative_position(offset: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((1, 5, 3, 14)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 7, 3, 14)), jnp.float32)
    q_pos = jnp.arange(2, 7)[None]
    k_pos = jnp.arange(7)[None]
    base = _rope_scores(q, k, q_pos, k_pos)
    shifted = _rope_scores(q, k, q_pos + offset, k_pos + offset)
    scale = float(jnp.linalg.norm(q, axis=-1).max() * jnp.linalg.norm(k, axis=-1).max())
    # float32 rounds angles near 8000 rad to ~5e-4, hence a relative tolerance, not exactness.
    assert float(jnp.abs(shifted - base).max()) / scale < 1e-3


def test_rope_scores_do_change_with_distance() -> None:
    # The converse: without this, an identity "RoPE" would pass the test above.
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 1, 14))
    k = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, 14))
    s0 = _rope_scores(q, k, jnp.array([[5]]), jnp.array([[5]]))
    s3 = _rope_scores(q, k, jnp.array([[8]]), jnp.array([[5]]))
    assert float(jnp.abs(s3 - s0).max()) > 1e-2


@jax.jit
def _rope_and_complex_rotation(x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """apply_rope(x) and the same rotation written as z * exp(i * position * ω), (B, T, N, H)
    each."""
    half = x.shape[-1] // 2
    z = x[..., :half] + 1j * x[..., half:]
    z = z * jnp.exp(1j * positions[..., None, None] * rope_frequencies(2 * half))
    return apply_rope(x, positions), jnp.concatenate([z.real, z.imag], -1)


@FEW
@given(seed=st.integers(0, 2**16), half=st.sampled_from([1, 7, 19]))
def test_rope_is_a_rotation_of_split_half_pairs(seed: int, half: int) -> None:
    h = 2 * half
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((2, 3, 5, h)), jnp.float32)
    positions = jnp.asarray(rng.integers(0, 8192, (2, 3)), jnp.int32)
    out, expected = _rope_and_complex_rotation(x, positions)
    # Norm of every (x[i], x[i + H/2]) pair is kept: it is a rotation of that pair ...
    out, expected, x = np.asarray(out), np.asarray(expected), np.asarray(x)
    np.testing.assert_allclose(
        np.hypot(out[..., :half], out[..., half:]),
        np.hypot(x[..., :half], x[..., half:]),
        rtol=1e-5,
        atol=1e-6,
    )
    # ... and its angle is position x frequency (complex form).
    np.testing.assert_allclose(out, expected, atol=2e-3)


def test_rope_interleaved_layout_is_a_permutation_of_split_half() -> None:
    # RoFormer pairs (x[2i], x[2i+1]); Gemma pairs (x[i], x[i + H/2]). Same rotation after a
    # fixed permutation of features, computed here in NumPy float64 as an independent reference.
    h = 10
    x = np.random.default_rng(3).standard_normal((1, 6, 2, h))
    positions = np.arange(6)[None] * 11
    order = np.concatenate([np.arange(0, h, 2), np.arange(1, h, 2)])  # evens, then odds
    a, b = x[..., 0::2], x[..., 1::2]
    phi = positions[..., None, None] * 10_000.0 ** (-np.arange(0, h, 2) / h)  # (B, T, 1, H/2)
    inter = np.stack(
        [a * np.cos(phi) - b * np.sin(phi), b * np.cos(phi) + a * np.sin(phi)], -1
    ).reshape(x.shape)
    ours = apply_rope(jnp.asarray(x[..., order], jnp.float32), jnp.asarray(positions))
    np.testing.assert_allclose(np.asarray(ours), inter[..., order], atol=1e-4)


# ----------------------------------------------------------------------------- GQA
def _gqa_by_repeat(q, k, v, mask, softcap):
    """The obvious GQA: copy each kv head G times (0,0,1,1,...) and run multi-head attention."""
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)  # (B, S, N, H)
    logits = softcap * jnp.tanh(jnp.einsum("BTNH,BSNH->BNTS", q, k) / softcap)
    logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
    return jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(logits, -1), v)


LAYOUTS = [(6, 6), (6, 3), (6, 2), (6, 1), (12, 4)]  # (N, K): MHA, GQA .., MQA


@jax.jit
def _gqa_vs_repeat(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array):
    out, probs = gqa_attention(q, k, v, mask, softcap=50.0)
    return jnp.abs(out - _gqa_by_repeat(q, k, v, mask, 50.0)).max(), jnp.abs(
        probs.sum(-1) - 1
    ).max()


@FEW
@given(layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**16), data=st.data())
def test_gqa_equals_multi_head_attention_with_repeated_kv(layout, seed, data) -> None:
    n, kv = layout
    rng = np.random.default_rng(seed)
    q = jnp.asarray(3 * rng.standard_normal((2, 9, n, 6)), jnp.float32)
    k = jnp.asarray(3 * rng.standard_normal((2, 9, kv, 6)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 9, kv, 6)), jnp.float32)
    # Any causal mask with a window, on random (possibly padded, -1) key positions.
    window = data.draw(st.integers(1, 12), label="window")
    pos = jnp.asarray(np.sort(rng.integers(-1, 20, (2, 9)), axis=1))
    mask = attention_mask(pos, pos, window) | jnp.eye(9, dtype=bool)  # every row sees something
    out_err, prob_err = _gqa_vs_repeat(q, k, v, mask)
    assert float(out_err) < 1e-5 and float(prob_err) < 1e-5


@jax.jit
def _head_movement(q: jax.Array, k: jax.Array, v: jax.Array, j: jax.Array) -> jax.Array:
    """How much each query head's output moves when kv head j is perturbed: (N,)."""
    mask = jnp.broadcast_to(causal_mask(q.shape[1]), (1, q.shape[1], q.shape[1]))
    base, _ = gqa_attention(q, k, v, mask, softcap=50.0)
    moved, _ = gqa_attention(q, k.at[:, :, j].add(1.0), v.at[:, :, j].add(1.0), mask, softcap=50.0)
    return jnp.abs(moved - base).max(axis=(0, 1, 3))


@FEW
@given(layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**16), data=st.data())
def test_query_head_reads_only_its_groups_kv_head(layout, seed, data) -> None:
    n, kv = layout
    g = n // kv
    j = data.draw(st.integers(0, kv - 1), label="kv head perturbed")
    rng = np.random.default_rng(seed)
    q, k, v = (
        jnp.asarray(rng.standard_normal(shape), jnp.float32)
        for shape in [(1, 5, n, 4), (1, 5, kv, 4), (1, 5, kv, 4)]
    )
    # A touched head moves by about 1 (every value of head j grew by 1); an untouched one only by
    # rounding, which differs between CPUs and compilations (1e-6 and above has been seen). So a
    # head counts as moved when it moves by more than 1e-3 of the largest movement.
    movement = np.asarray(_head_movement(q, k, v, jnp.int32(j)))
    changed = np.flatnonzero(movement > 1e-3 * movement.max())
    assert changed.tolist() == list(range(j * g, (j + 1) * g))


# ----------------------------------------------------------------------------- sliding window
LENGTH = (
    45  # one sequence length: the property is per query, and queries 0..44 cover q < W and q >= W
)


@FEW
@given(window=st.integers(1, 50), shift=st.integers(0, 5000))
def test_each_query_sees_exactly_min_q_plus_1_w_keys(window: int, shift: int) -> None:
    length = LENGTH
    pos = jnp.arange(length)[None] + shift
    m = attention_mask(pos, pos, window)[0]
    assert np.asarray(m.sum(axis=1)).tolist() == [min(q + 1, window) for q in range(length)]
    # Only q - k matters: the same mask with the shift removed.
    assert bool(jnp.all(m == attention_mask(pos - shift, pos - shift, window)[0]))
    # The oldest visible key is q - W + 1 (the inclusive-bound form needs W - 1).
    q = jnp.arange(length)[:, None]
    k = jnp.arange(length)[None, :]
    assert bool(jnp.all(m == ((k <= q) & (k >= q - (window - 1)))))


@FEW
@given(window=st.integers(2, 12), layers=st.integers(1, 6))
def test_local_receptive_field_grows_by_w_minus_1_per_layer(window, layers) -> None:
    length = LENGTH
    pos = jnp.arange(length)[None]
    m = np.asarray(attention_mask(pos, pos, window)[0], dtype=np.int64)
    reach = np.eye(length, dtype=np.int64)  # reach[t, s]: input s can influence position t
    for depth in range(1, layers + 1):
        reach = (m @ reach > 0).astype(np.int64)
        assert int(reach[-1].sum()) == min(length, depth * (window - 1) + 1)


_update = jax.jit(lambda cache, k, v, pos: cache.update(k, v, pos))


@FEW
@given(size=st.sampled_from([1, 4, 7]), steps=st.integers(1, 30), chunk=st.sampled_from([1, 3]))
def test_ring_buffer_cache_keeps_exactly_the_last_positions(size, steps, chunk) -> None:
    cache = LayerCache.empty(2, size, 1, 3)
    p = 0
    while p < steps:
        t = min(chunk, steps - p)
        positions = jnp.broadcast_to(jnp.arange(p, p + t), (2, t))
        kv = jnp.broadcast_to(positions[..., None, None].astype(jnp.float32), (2, t, 1, 3))
        cache = _update(cache, kv, kv, positions)
        p += t
    held = sorted(int(x) for x in np.asarray(cache.pos[0]) if x >= 0)
    assert held == list(range(max(0, steps - size), steps))
    # Each slot's key is the one written for the position it records (slot = position mod S).
    for slot in range(size):
        pos_in_slot = int(cache.pos[0, slot])
        if pos_in_slot >= 0:
            assert pos_in_slot % size == slot
            assert float(cache.k[0, slot, 0, 0]) == pos_in_slot
