"""Public tests of assignment 1 (attention in tiles): run them on your notebook with

    pytest test_a1_public.py                     # grades a1_flash_attention.ipynb next to it
    ASSIGNMENT_NOTEBOOK=mine.ipynb pytest test_a1_public.py

Each test receives ``impl``, what your notebook's imports cell and *Your answer* cells define.
Grading adds hidden tests of the same functions on harder inputs. The helpers below are shared
with them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gemma2_lite.attention import gqa_attention

MASK_VALUE = float(jnp.finfo(jnp.float32).min)


@functools.cache
def case(
    seed: int, b: int, t: int, n: int, kv: int, h: int, pad: int = 0, window: int | None = None
) -> tuple[jax.Array, ...]:
    """Self-attention inputs q (B, T, N, H), k, v (B, T, K, H), mask (B, T, T); the last row
    starts with ``pad`` padding tokens, whose queries see no key."""
    rng = np.random.default_rng(seed)
    q, k, v = (
        jnp.asarray(rng.standard_normal((b, t, heads, h)), jnp.float32) for heads in (n, kv, kv)
    )
    real = np.ones((b, t), bool)
    real[-1, :pad] = False
    pos = np.where(real, np.cumsum(real, 1) - 1, -1)
    qp, kp = pos[:, :, None], pos[:, None, :]
    mask = (kp >= 0) & (kp <= qp)
    if window is not None:
        mask &= qp - kp < window
    return q, k, v, jnp.asarray(mask)


def cotangent(seed: int, shape: tuple[int, ...], mask: jax.Array) -> jax.Array:
    """A random cotangent (B, T, N, H), zero on queries that see no key (padding: no loss)."""
    seen = np.asarray(mask).any(-1)[:, :, None, None]
    noise = np.random.default_rng(seed).standard_normal(shape)
    return jnp.asarray(np.where(seen, noise, 0.0), jnp.float32)


def attention_vjp(attention, q, k, v, dout):
    """(out, (dq, dk, dv)) of attention(q, k, v) -> (B, T, N, H), cotangent dout; one jit."""

    def run(q, k, v, dout):
        out, vjp = jax.vjp(attention, q, k, v)
        return out, vjp(dout)

    return jax.jit(run)(q, k, v, dout)


@functools.cache
def reference(key: tuple, softcap: float | None, seed: int) -> dict[str, jax.Array]:
    """gqa_attention on case(*key): its out, the lse of its logits, and (with cotangent
    ``seed``) its gradients; computed once per session, for every answer graded."""
    q, k, v, mask = case(*key)

    @jax.jit
    def run(q, k, v, mask, dout):
        out, vjp = jax.vjp(
            lambda q, k, v: gqa_attention(q, k, v, mask, softcap=softcap)[0], q, k, v
        )
        b, t, n, h = q.shape
        z = jnp.einsum("BTKGH,BSKH->BTKGS", q.reshape(b, t, k.shape[2], -1, h), k)
        z = z.reshape(b, t, n, -1).astype(jnp.float32)
        if softcap is not None:
            z = softcap * jnp.tanh(z / softcap)
        lse = jax.nn.logsumexp(jnp.where(mask[:, :, None], z, MASK_VALUE), axis=-1)
        return {"out": out, "lse": lse, "grads": vjp(dout), "dout": dout}

    return run(q, k, v, mask, cotangent(seed, q.shape, mask))


def assert_close(got: jax.Array, want: jax.Array, what: str, rtol: float = 2e-5) -> None:
    """|got - want| within rtol of want's largest magnitude (float32 rounding, summed in another
    order), and no NaN."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    assert np.isfinite(got).all(), f"{what}: not finite (NaN or inf)"
    err, scale = np.abs(got - want).max(), max(1.0, np.abs(want).max())
    assert err <= rtol * scale, f"{what}: max |error| {err:.2e} > {rtol * scale:.2e}"


def temp_bytes(attention, b: int, t: int, n: int, kv: int, h: int) -> int:
    """The graders' own measurement: XLA's temporary bytes of the compiled gradient of
    0.5 * sum(attention(q, k, v, mask)^2) with respect to q, k, v."""

    def loss(q, k, v, mask):
        return 0.5 * jnp.sum(jnp.square(attention(q, k, v, mask)))

    f32 = jax.ShapeDtypeStruct
    args = (
        f32((b, t, n, h), jnp.float32),
        f32((b, t, kv, h), jnp.float32),
        f32((b, t, kv, h), jnp.float32),
        f32((b, t, t), jnp.bool_),
    )
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


@functools.cache
def reference_temp_bytes(b: int, t: int, n: int, kv: int, h: int, softcap: float) -> int:
    return temp_bytes(
        lambda q, k, v, m: gqa_attention(q, k, v, m, softcap=softcap)[0], b, t, n, kv, h
    )


PLAIN = (1, 32, 2, 1, 8)  # case(seed, *PLAIN): B=1, T=S=32, N=2, K=1, H=8


# ----------------------------------------------------------------------------- the tests
def test_forward_on_a_plain_case(impl) -> None:
    """A1-1: no padding, no window, no cap, S a multiple of the block."""
    key = (0, *PLAIN)
    q, k, v, mask = case(*key)
    out, lse = jax.jit(impl.flash_forward, static_argnums=(4, 5))(q, k, v, mask, None, 8)
    want = reference(key, None, 0)
    assert_close(out, want["out"], "out")
    assert out.dtype == q.dtype, f"out is {out.dtype}, q {q.dtype}"
    assert_close(lse, want["lse"], "lse")


def test_backward_on_a_plain_case(impl) -> None:
    """A1-2 alone: given the reference's out and lse, the VJP of gqa_attention."""
    key = (1, *PLAIN)
    q, k, v, mask = case(*key)
    want = reference(key, None, 1)
    backward = jax.jit(impl.flash_backward, static_argnums=(4, 5))
    got = backward(q, k, v, mask, None, 8, want["out"], want["lse"], want["dout"])
    for name, g, w in zip(("dq", "dk", "dv"), got, want["grads"]):
        assert_close(g, w, name, rtol=1e-4)


def test_custom_vjp_gives_the_gradients(impl) -> None:
    """A1-3: jax.vjp through flash_attention equals jax.vjp through gqa_attention."""
    key = (2, *PLAIN)
    q, k, v, mask = case(*key)
    want = reference(key, 20.0, 2)
    out, got = attention_vjp(
        lambda q, k, v: impl.flash_attention(q, k, v, mask, 20.0, 8), q, k, v, want["dout"]
    )
    assert_close(out, want["out"], "out")
    for name, g, w in zip(("dq", "dk", "dv"), got, want["grads"]):
        assert_close(g, w, name, rtol=1e-4)


def test_grad_temp_bytes_sees_the_saving(impl) -> None:
    """A1-4: your measurement, your attention: the tiled gradient needs fewer temporary bytes."""
    ref = impl.grad_temp_bytes(
        lambda q, k, v, m: gqa_attention(q, k, v, m, softcap=50.0)[0], 1, 256, 4, 2, 16
    )
    ours = impl.grad_temp_bytes(
        lambda q, k, v, m: impl.flash_attention(q, k, v, m, 50.0, 64), 1, 256, 4, 2, 16
    )
    assert isinstance(ref, int) and ref > 0, f"grad_temp_bytes returned {ref!r}"
    assert ours < ref, f"flash_attention's gradient needs {ours:,} bytes, gqa_attention's {ref:,}"
