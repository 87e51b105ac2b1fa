"""int8 weight-only quantization and the rows layout (issue 22): the numbers, the bytes, the
sampler and the CLI take a quantized model, and the decode loop never holds a float32 copy of a
weight (XLA hoisted the conversions out of the loop until the decode program was compiled
without loop-invariant code motion)."""

from __future__ import annotations

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from random_models import random_model
from tolerance import assert_close

from gemma2_lite import __main__ as cli
from gemma2_lite import get_config
from gemma2_lite.chat import ChatSession
from gemma2_lite.checkpoint import save_hf
from gemma2_lite.decoding import DecodeState, SamplingSettings, decode_program
from gemma2_lite.layers import RowProjection, project, rows_axes
from gemma2_lite.quantize import (
    Int8Scale,
    Int8Values,
    is_quantized,
    quantize,
    quantize_int8,
    weight_bytes,
)
from gemma2_lite.sampler import PromptCache, generate
from gemma2_lite.tokenizer import default_tokenizer

CONFIG = get_config(
    "tiny",
    vocab_size=97,
    d_model=48,
    num_layers=4,
    num_heads=6,
    num_kv_heads=2,
    head_dim=14,
    ffn_dim=88,
    query_pre_attn_scalar=23,
    sliding_window=5,
    max_seq_len=64,
    name="quantize-test",
)
PROMPTS = [[2, 11, 23, 5, 71, 13, 41, 7, 19, 3, 88], [2, 31, 17]]


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, seed=3)


@pytest.fixture(scope="module")
def small(model):
    return quantize(model, "int8")


@pytest.mark.parametrize(
    "spec,shape",
    [
        ("BTD,NHD->BTNH", (3, 5, 8)),
        ("BTNH,DNH->BTD", (8, 3, 5)),
        ("MD,FD->MF", (12, 8)),
        ("MD,VD->MV", (12, 8)),
    ],
)
def test_int8_is_per_output_channel_and_within_half_a_step(spec: str, shape) -> None:
    rng = np.random.default_rng(len(spec))
    w = rng.normal(size=shape).astype(np.float32) * rng.uniform(0.1, 10, size=shape[-1])
    values, scale = quantize_int8(jnp.asarray(w), spec)
    rows = w  # stored as rows: (out..., in...)
    assert values.dtype == jnp.int8 and values.shape == rows.shape
    assert scale.shape == rows.shape[: rows_axes(spec)]
    flat, q = rows.reshape(scale.size, -1), np.asarray(values, np.float32).reshape(scale.size, -1)
    s = np.asarray(scale).reshape(-1, 1)
    np.testing.assert_allclose(s[:, 0], np.abs(flat).max(axis=1) / 127, rtol=1e-6)
    assert np.abs(q).max() == 127  # each channel's max
    assert np.all(np.abs(flat - q * s) <= s / 2 + 1e-6)  # round to nearest
    zero, _ = quantize_int8(jnp.zeros(shape), spec)
    assert not np.any(np.asarray(zero))


def test_quantized_model_is_close_and_half_the_bytes_of_bf16(model, small) -> None:
    tokens = jnp.asarray([PROMPTS[0]], jnp.int32)
    full, quant = np.asarray(model(tokens)), np.asarray(small(tokens))
    assert_close(quant, full, 0.05, "int8 logits")
    assert np.mean(quant.argmax(-1) == full.argmax(-1)) >= 0.8
    assert not np.array_equal(quant, full)  # it did quantize
    # Every projection, the embedding included, is int8 rows with a float32 scale.
    for weight in (small.embedder.embedding, small.layers[0].attn.q, small.layers[1].mlp.down):
        assert isinstance(weight.values, Int8Values) and isinstance(weight.scale, Int8Scale)
        assert weight.values.dtype == jnp.int8 and weight.scale.dtype == jnp.float32
    bf16 = random_model(CONFIG.replace(param_dtype="bfloat16"), seed=3)
    ratio = weight_bytes(quantize(bf16)) / weight_bytes(bf16)
    assert 0.5 < ratio < 0.65, ratio  # int8 + one float32 per row of 48..97 entries


def test_quantized_weights_are_not_params(small) -> None:
    """A training filter on nnx.Param sees the norms only (QLoRA puts adapters on top)."""
    params = jax.tree_util.tree_leaves_with_path(nnx.state(small, nnx.Param))
    assert params and all(
        "scale" in jax.tree_util.keystr(p) and "norm" in jax.tree_util.keystr(p) for p, _ in params
    )
    assert jax.tree.leaves(nnx.state(small, Int8Values))
    tokens = jnp.asarray([PROMPTS[0]], jnp.int32)

    def loss(m):
        return jnp.mean(jax.nn.logsumexp(m(tokens), axis=-1))

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Param))(small)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_generate_prompt_cache_and_chat_take_a_quantized_model(small) -> None:
    out = generate(small, PROMPTS, max_new_tokens=9)
    assert [len(o) for o in out] == [9, 9]
    assert is_quantized(small)
    cache = PromptCache(small, size=64)
    assert cache.generate(PROMPTS[0], max_new_tokens=9) == out[0]
    streamed = []
    generate(small, PROMPTS, max_new_tokens=9, callback=lambda s, t: streamed.append(t.tolist()))
    assert [[row[r] for row in streamed] for r in range(2)] == out


def test_cli_quantize_flag(tmp_path, small) -> None:
    tok = default_tokenizer()
    cfg = CONFIG.replace(vocab_size=tok.vocab_size, max_seq_len=256)
    save_hf(random_model(cfg, seed=1), tmp_path)
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = cli.main(
            [
                "generate",
                "--checkpoint",
                str(tmp_path),
                "--prompt",
                "ROMEO:",
                "--max-new-tokens",
                "3",
                "--quantize",
                "int8",
            ]
        )
    assert code == 0, err.getvalue()
    assert out.getvalue().startswith("ROMEO:") and "3 tokens" in err.getvalue()
    chat = ChatSession(quantize(random_model(cfg, seed=1)), tok, max_new_tokens=3)
    assert isinstance(chat.send("Good morrow"), str)


def test_quantize_refuses_what_it_cannot_do(model, small) -> None:
    assert not is_quantized(model)
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        quantize(model, "int4")
    with pytest.raises(ValueError, match="already"):
        quantize(small)
    broken = nnx.merge(*nnx.split(model))
    broken.layers[2].mlp.up[...] = broken.layers[2].mlp.up[...].at[0, 0].set(jnp.inf)
    with pytest.raises(ValueError, match="weight up holds NaN or infinite"):
        quantize(broken)


@pytest.mark.parametrize("lead", [(1, 1), (1, 3), (5, 1)])  # one, a few, many rows
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize(
    "spec,shape",
    [
        ("BTD,NHD->BTNH", (3, 5, 7)),  # q, k, v: several out axes
        ("BTNH,DNH->BTD", (7, 3, 5)),  # o: contracted over two axes (a multiply and sums)
        ("MD,FD->MF", (11, 7)),
        ("MF,DF->MD", (7, 3100)),  # longer than MATVEC_PIECE: summed in pieces
    ],
)
def test_every_product_form_is_the_einsum(spec: str, shape, kind: str, lead) -> None:
    """``project`` picks a form per case (matrix-vector pieces, a multiply and sums, XLA's
    own product, the einsum for many rows): each is the einsum of the stored weight, with
    the weight's dtype and the quantized scale, whatever the number of rows."""
    rng = np.random.default_rng(len(spec) + shape[-1])
    n_out = rows_axes(spec)
    x_axes = spec.split(",")[0]
    lead = lead if len(x_axes) - (len(shape) - n_out) == 2 else (int(np.prod(lead)),)
    x = jnp.asarray(rng.normal(size=(*lead, *shape[n_out:])), jnp.float32)
    w = rng.normal(size=shape).astype(np.float32)
    if kind == "int8":
        values, scale = quantize_int8(jnp.asarray(w), spec)
        weight = RowProjection(Int8Values(values), n_out, Int8Scale(scale))
        dense = np.asarray(values, np.float32) * np.asarray(scale).reshape(
            *scale.shape, *[1] * (len(shape) - n_out)
        )
    else:
        weight = nnx.Param(jnp.asarray(w, kind))
        dense = np.asarray(weight[...], np.float32)
    want = np.einsum(spec, np.asarray(x, np.float64), dense.astype(np.float64))
    got = jax.jit(lambda x: project(x, weight, spec, jnp.float32))(x)
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert_close(got, want, 1e-5, f"{spec} {kind} {lead}")


def test_decode_loop_converts_weights_inside_the_products() -> None:
    """With bf16 or int8 weights, the decode loop's working memory stays below half of one
    float32 copy of the largest weight matrix: every conversion happens inside the product that
    reads the weight, none is hoisted out of the loop (which would add a float32 copy of
    every weight)."""
    cfg = get_config(
        "tiny",
        vocab_size=512,
        d_model=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        ffn_dim=512,
        query_pre_attn_scalar=32,
        sliding_window=8,
        max_seq_len=64,
        param_dtype="bfloat16",
        dtype="bfloat16",
        name="hoist-test",
    )
    bf16 = random_model(cfg, seed=0)
    largest = max(x.size for x in jax.tree.leaves(nnx.state(bf16))) * 4  # float32 bytes
    settings = SamplingSettings.make(0.0, None, None, (), 8)
    for m in (bf16, quantize(bf16)):
        state = DecodeState(
            out=jnp.zeros((1, 8), jnp.int32),
            last=jnp.ones((1,), jnp.int32),
            positions=jnp.ones((1,), jnp.int32),
            done=jnp.zeros((1,), bool),
            step=jnp.zeros((), jnp.int32),
            key=jax.random.key(0),
            cache=m.init_cache(1, 16),
        )
        temp = decode_program(m, state, settings).memory_analysis().temp_size_in_bytes
        assert temp < largest / 2, (temp, largest)


def test_a_prompt_converts_one_layer_of_int8_weights_at_a_time(model) -> None:
    """A prompt's product converts int8 weights to the activation dtype (no fused kernel):
    each copy is made when its layer runs, never all layers' up front (4 GB for the 2B)."""
    cfg = get_config(
        "tiny",
        vocab_size=64,
        d_model=128,
        num_layers=6,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        ffn_dim=512,
        query_pre_attn_scalar=32,
        sliding_window=8,
        max_seq_len=64,
        param_dtype="bfloat16",
        dtype="bfloat16",
        name="prompt-int8",
    )
    small = quantize(random_model(cfg, seed=0))
    block = small.layers[0]
    one_layer = 2 * sum(  # bf16 copies of one layer's int8 weights
        getattr(m, n).values.size
        for m, names in ((block.attn, "qkvo"), (block.mlp, ("gate", "up", "down")))
        for n in names
    )
    tokens = jnp.ones((1, 16), jnp.int32)
    forward = jax.jit(lambda g, p, t: nnx.merge(g, p)(t))
    temp = forward.lower(*nnx.split(small), tokens).compile().memory_analysis().temp_size_in_bytes
    assert temp < 2 * one_layer, (temp, one_layer)


def test_quantize_leaves_the_original_alone_and_shares_nothing_with_it(model, small) -> None:
    assert not is_quantized(model)
    for a, b in (
        (model.final_norm, small.final_norm),
        (model.layers[1].pre_ffw_norm, small.layers[1].pre_ffw_norm),
    ):
        assert a.scale is not b.scale and a.scale[...] is not b.scale[...]
        np.testing.assert_array_equal(a.scale[...], b.scale[...])
