"""The model against Hugging Face transformers' Gemma 2 (eager attention), number for number.

Small random reference models are built and saved by the tests themselves (no downloads), with
prime-ish dimensions, norm weights randomised (the reference starts them at zero, which would
hide a (1 + w) bug), a query scale that differs from head_dim ** -0.5 (the 27B rule), and
sequences longer than twice the sliding window.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_reference import hf_logits, make_hf_model, save_hf_model
from tolerance import assert_close

from gemma2_lite import Gemma2, get_config
from gemma2_lite.attention import attention_mask, gqa_attention, sliding_window_mask
from gemma2_lite.checkpoint import load_hf
from gemma2_lite.layers import rms_norm, soft_cap
from gemma2_lite.model import positions_from_mask
from gemma2_lite.parity import compare_layers, format_report

ATOL = 1e-4
WINDOW = 7
SEQ = 23  # > 2 * WINDOW


@pytest.fixture(scope="module", params=[3, 4], ids=["odd-layers", "even-layers"])
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its safetensors)."""
    hf = make_hf_model(num_hidden_layers=request.param, sliding_window=WINDOW, seed=request.param)
    path = save_hf_model(hf, tmp_path_factory.mktemp(f"hf{request.param}"))
    return hf, load_hf(path)


def random_tokens(shape, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape)


def test_logits_match_reference(pair):
    hf, model = pair
    assert model.config.query_scale != pytest.approx(model.config.head_dim**-0.5)
    tokens = random_tokens((2, SEQ), model.config.vocab_size)
    ref = hf_logits(hf, tokens)
    ours = np.asarray(model(jnp.asarray(tokens)))
    assert ours.shape == ref.shape == (2, SEQ, model.config.vocab_size)
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


def test_logits_match_reference_with_left_padding(pair):
    hf, model = pair
    tokens = random_tokens((3, SEQ), model.config.vocab_size, seed=1)
    mask = np.ones_like(tokens)
    mask[1, :4] = 0
    mask[2, :9] = 0
    tokens[mask == 0] = 0
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    ref = hf_logits(hf, tokens, mask, positions)
    ours = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=ATOL, rtol=0)
    # A padded row's real tokens give the same logits as the unpadded sequence alone.
    alone = np.asarray(model(jnp.asarray(tokens[2:3, 9:])))
    assert_close(ours[2, 9:], alone[0], rel=1e-5, what="padded row vs alone")
    assert np.isfinite(ours).all()  # padding rows see no key but must not produce NaN


def test_per_layer_comparison_helper(pair):
    hf, model = pair
    tokens = random_tokens((1, SEQ), model.config.vocab_size, seed=2)
    diffs = compare_layers(model, hf, tokens)
    assert [d.name for d in diffs][:2] == ["embedding", "layer 0"]
    assert diffs[-1].name == "logits" and len(diffs) == model.config.num_layers + 2
    assert max(d.max_abs_diff for d in diffs) < 1e-4, format_report(diffs)
    # The helper must also *see* a break: perturb one norm of the last layer.
    last = model.layers[-1]
    last.post_ffw_norm.scale[...] = last.post_ffw_norm.scale[...] + 1.0
    try:
        broken = compare_layers(model, hf, tokens)
    finally:
        last.post_ffw_norm.scale[...] = last.post_ffw_norm.scale[...] - 1.0
    assert broken[1].max_abs_diff < 1e-4 and broken[-1].max_abs_diff > 1e-3


def test_without_soft_caps_and_all_global(tmp_path):
    hf = make_hf_model(
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
        layer_types=["full_attention"] * 3,
        seed=5,
    )
    model = load_hf(save_hf_model(hf, tmp_path))
    assert model.config.final_logit_softcap is None and model.config.sliding_window is None
    tokens = random_tokens((2, SEQ), model.config.vocab_size, seed=3)
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(tokens))), hf_logits(hf, tokens), atol=ATOL, rtol=0
    )


def test_bfloat16_within_stated_tolerance(pair, tmp_path):
    """bf16 (params and activations) stays as close to the fp32 reference as HF's own bf16 does."""
    import torch

    hf, model = pair
    tokens = random_tokens((2, SEQ), model.config.vocab_size, seed=4)
    ref32 = hf_logits(hf, tokens)
    path = save_hf_model(hf, tmp_path / "m")
    ours16 = np.asarray(load_hf(path, dtype=jnp.bfloat16)(jnp.asarray(tokens)))
    hf16 = hf_logits(hf.to(torch.bfloat16), tokens)
    hf.to(torch.float32)
    ours_err, hf_err = np.abs(ours16 - ref32).max(), np.abs(hf16 - ref32).max()
    # Stated tolerance: 0.05 absolute on logits of this scale, and no worse than 2x HF's bf16.
    assert ours_err < 0.05, ours_err
    assert ours_err <= 2 * hf_err + 1e-3, (ours_err, hf_err)


# --------------------------------------------------------------------- pieces on their own
def test_rms_norm_uses_one_plus_scale_in_float32():
    x = jax.random.normal(jax.random.key(0), (3, 5, 11))
    scale = jax.random.normal(jax.random.key(1), (11,))
    expected = x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + 1e-6) * (1 + scale)
    np.testing.assert_allclose(rms_norm(x, scale), expected, rtol=1e-5, atol=1e-6)
    assert rms_norm(x.astype(jnp.bfloat16), scale).dtype == jnp.bfloat16


def test_soft_cap_bounds_and_identity_near_zero():
    x = jnp.linspace(-1000, 1000, 101)
    capped = soft_cap(x, 50.0)
    assert jnp.all(jnp.abs(capped) <= 50.0) and soft_cap(x, None) is x
    assert jnp.all(jnp.diff(soft_cap(jnp.linspace(-100, 100, 101), 50.0)) > 0)  # order kept
    np.testing.assert_allclose(soft_cap(jnp.array([1e-3]), 50.0), [1e-3], rtol=1e-6)


def test_gqa_equals_mha_with_repeated_kv():
    b, t, n, k, h = 2, 7, 6, 3, 5
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, t, n, h))
    kk = jax.random.normal(keys[1], (b, t, k, h))
    v = jax.random.normal(keys[2], (b, t, k, h))
    mask = jnp.broadcast_to(sliding_window_mask(t, 3), (b, t, t))
    out, probs = gqa_attention(q, kk, v, mask, softcap=50.0)
    # Reference: repeat each kv head for its G = n // k query heads (head j uses kv head j // G).
    kr, vr = jnp.repeat(kk, n // k, axis=2), jnp.repeat(v, n // k, axis=2)
    logits = soft_cap(jnp.einsum("BTNH,BSNH->BNTS", q, kr), 50.0)
    p = jax.nn.softmax(jnp.where(mask[:, None], logits, -jnp.inf), axis=-1)
    np.testing.assert_allclose(out, jnp.einsum("BNTS,BSNH->BTNH", p, vr), atol=1e-5)
    np.testing.assert_allclose(probs, p.transpose(0, 2, 1, 3), atol=1e-6)


def test_sliding_window_mask_edges():
    m = np.asarray(sliding_window_mask(10, 4))
    for q in range(10):
        for k in range(10):
            assert m[q, k] == (q - 4 < k <= q), (q, k)
    assert m.sum(1).max() == 4  # W keys including the current one, not W + 1


def test_masks_use_positions_not_slots():
    mask = jnp.array([[0, 0, 1, 1, 1]])
    pos = positions_from_mask(mask)
    np.testing.assert_array_equal(pos, [[-1, -1, 0, 1, 2]])
    kpos = jnp.where(mask.astype(bool), pos, -1)
    visible = np.asarray(attention_mask(pos, kpos, window=2))[0]
    assert visible[4].tolist() == [False, False, False, True, True]
    assert not visible[:2].any()


# --------------------------------------------------------------------- the model as a module
@pytest.fixture(scope="module")
def tiny():
    return Gemma2(
        get_config("tiny", vocab_size=257, max_seq_len=64, sliding_window=5), rngs=nnx.Rngs(0)
    )


def test_bad_inputs_fail_clearly(tiny):
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 257\); found \[300\]"):
        tiny(jnp.array([[1, 2, 300]]))
    with pytest.raises(ValueError, match="longer than the model's context"):
        tiny(jnp.zeros((1, 65), jnp.int32))
    with pytest.raises(ValueError, match=r"tokens must be \(B, T\)"):
        tiny(jnp.zeros((5,), jnp.int32))
    with pytest.raises(TypeError, match="integer ids"):
        tiny(jnp.zeros((1, 5)))
    with pytest.raises(ValueError, match="past the model's context"):
        tiny(jnp.zeros((1, 2), jnp.int32), positions=jnp.array([[63, 64]]))


def test_jit_grad_and_dtypes(tiny):
    tokens = jnp.asarray(random_tokens((2, 11), 257))

    @nnx.jit
    def loss(model, tokens):
        return jnp.mean(jax.nn.logsumexp(model(tokens), -1))

    grads = nnx.grad(lambda m: loss(m, tokens))(tiny)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    eager = tiny(tokens)
    assert_close(nnx.jit(lambda m, t: m(t))(tiny, tokens), eager, rel=1e-5, what="jit vs eager")
    bf = Gemma2(tiny.config.replace(dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert bf.layers[0].attn.q.dtype == jnp.bfloat16
    assert bf(tokens).dtype == jnp.float32


def test_embedding_scale_is_cast_to_activation_dtype():
    # sqrt(2304) = 48.0, sqrt(3584) = 59.866 -> 59.75 in bf16, sqrt(4608) = 67.88 -> 68.0.
    for name, expected in [("gemma2-2b", 48.0), ("gemma2-9b", 59.75), ("gemma2-27b", 68.0)]:
        d = get_config(name).d_model
        assert float(jnp.asarray(d**0.5, jnp.bfloat16)) == expected
    cfg = get_config("tiny", vocab_size=11, d_model=30, num_layers=1, dtype="bfloat16")
    model = Gemma2(cfg, rngs=nnx.Rngs(0))
    out = model.embedder.encode(jnp.array([[3]]), jnp.bfloat16)
    row = model.embedder.embedding[...][3].astype(jnp.bfloat16)
    np.testing.assert_array_equal(out[0, 0], row * jnp.asarray(30**0.5, jnp.bfloat16))


def test_cache_gives_the_same_logits_as_a_full_forward(tiny):
    """Prefill in chunks through the ring-buffer cache == one full forward (sequence > 2W)."""
    tokens = jnp.asarray(random_tokens((2, 17), 257, seed=7))
    full = tiny(tokens)
    cache = tiny.init_cache(2, 17)
    assert cache[0].size == 5 and cache[1].size == 17  # local ring buffer vs global
    outs = []
    for start, stop in [(0, 6), (6, 7), (7, 13), (13, 17)]:
        pos = jnp.broadcast_to(jnp.arange(start, stop), (2, stop - start))
        out = tiny.forward(tokens[:, start:stop], positions=pos, cache=cache)
        outs.append(out.logits)
        cache = out.cache
    assert_close(jnp.concatenate(outs, 1), full, rel=2e-5, what="chunked prefill vs full")
    assert sorted(np.asarray(cache[0].pos[0]).tolist()) == [12, 13, 14, 15, 16]


# ----------------------------------------------------------------------------- one model
def test_forward_gives_a_structured_output(tiny):
    tokens = jnp.asarray(random_tokens((2, 9), 257, seed=3))
    out = tiny.forward(tokens, return_hidden=True)
    assert out.cache is None and len(out.hidden) == tiny.config.num_layers + 1
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(tiny(tokens)))
    last = tiny.forward(tokens, last_only=True)
    assert last.logits.shape == (2, 1, 257) and last.hidden is None
    assert_close(last.logits[:, 0], out.logits[:, -1], rel=1e-6, what="last_only")
    with pytest.raises(TypeError, match="model.forward"):
        tiny(tokens, return_hidden=True)


def test_components_are_swapped_without_patching(tiny):
    """replace() keeps the weights (shared) and changes only the named component; the mask
    and the rotation table are built once per forward, not once per layer."""
    from gemma2_lite.attention import attention_mask
    from gemma2_lite.rope import rope_table

    tokens = jnp.asarray(random_tokens((1, 11), 257, seed=4))
    calls = {"mask": 0, "table": 0}

    def counting_mask(q, k, w):
        calls["mask"] += 1
        return attention_mask(q, k, w)

    def counting_table(p, h, b):
        calls["table"] += 1
        return rope_table(p, h, b)

    same = tiny.replace(mask=counting_mask, rope_table=counting_table)
    assert same.embedder.embedding[...] is tiny.embedder.embedding[...]
    assert_close(same(tokens), tiny(tokens), rel=1e-6, what="counting components")
    kinds = len(set(tiny.config.layer_types))
    assert calls == {"mask": kinds, "table": 1}, calls
    exact = tiny.replace(activation=lambda x: jax.nn.gelu(x, approximate=False))
    assert float(jnp.abs(exact(tokens) - tiny(tokens)).max()) > 1e-7
    assert tiny.components.activation is not exact.components.activation
    with pytest.raises(TypeError, match="unknown component"):
        tiny.replace(softmax=jax.nn.softmax)


def test_remat_gives_the_same_loss_and_gradients(tiny):
    tokens = jnp.asarray(random_tokens((2, 12), 257, seed=5))

    def loss(model):
        return jnp.mean(jax.nn.logsumexp(model(tokens), axis=-1))

    step = nnx.jit(nnx.value_and_grad(loss))
    plain = step(tiny)
    remat = step(tiny.replace(remat=True))
    assert_close(remat[0], plain[0], rel=1e-5, what="remat loss")
    for a, b in zip(jax.tree.leaves(remat[1]), jax.tree.leaves(plain[1])):
        assert_close(a, b, rel=1e-4, what="remat gradient")


def test_the_abstract_model_draws_nothing_and_has_the_models_shapes() -> None:
    """``abstract_model`` traces the constructor with initialisers that return zeros (what a
    load pays for is the shapes, not the draws); outside it the same initialisers draw."""
    from gemma2_lite.layers import dense_init, shapes_only
    from gemma2_lite.model import abstract_model

    cfg = get_config(
        "tiny", vocab_size=53, d_model=14, num_layers=3, num_heads=3, num_kv_heads=1,
        head_dim=6, ffn_dim=22, query_pre_attn_scalar=6, param_dtype="bfloat16",
    )  # fmt: skip
    init = dense_init(1, 0, stored=(1, 0))
    with shapes_only():
        assert not np.any(np.asarray(init(jax.random.key(1), (5, 7))))
    drawn = np.asarray(init(jax.random.key(1), (5, 7)))
    assert np.all(drawn != 0)  # the context ended: a draw again
    real = nnx.state(Gemma2(cfg, rngs=nnx.Rngs(0)))
    abstract = nnx.state(abstract_model(cfg))
    shape = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
    assert shape(abstract) == shape(real)
    assert any(np.any(np.asarray(x)) for x in jax.tree.leaves(real))
