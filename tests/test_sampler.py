"""The sampler: cached decoding equals recomputing everything, sampling rules, stops, errors.

One small model with a tiny window (W=5, L=4: local, global, local, global) so prompts and
generations are longer than the window and the local layers' ring buffers wrap many times.
Every generate() call here uses the same batch size and length buckets, so the whole file
compiles the decode program only once (sampling settings are traced, not static).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from random_models import random_model

from gemma2_lite import Gemma2, get_config
from gemma2_lite.attention import LayerCache
from gemma2_lite.checkpoint import save_hf
from gemma2_lite.hf_checkpoint import read_hf_tensors
from gemma2_lite.safetensors_io import mapping_of
from gemma2_lite.sampler import (
    PAD_ID,
    check_prompts,
    decode_step,
    generate,
    pad_prompts,
    prefill,
    sample_logits,
)
from gemma2_lite.weight_maps import HF, import_arrays

W = 5
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
    sliding_window=W,
    max_seq_len=64,
    name="sampler-test",
)
# Different lengths, the longest longer than W, so rows are left-padded by different amounts.
PROMPTS = [[2, 11, 23, 5, 71, 13, 41, 7, 19, 3, 88], [2, 31, 17], [2, 61, 29, 43, 37, 53, 59]]
NEW = 13  # > W: generated tokens also push the prompts out of the local windows


@pytest.fixture(scope="module")
def model() -> Gemma2:
    return random_model(CONFIG, seed=3, qk_gain=3.0)


@pytest.fixture(scope="module")
def full_forward(model: Gemma2):
    """Logits of whole sequences with no cache and no padding tricks: the reference.

    Rows are RIGHT-padded to one length; causal attention means the real positions never see
    the padding, so row r's logits at t < len(r) are exactly those of the sequence alone.
    """
    forward = nnx.jit(lambda m, tokens: m(tokens))

    def run(seqs: list[list[int]]) -> list[np.ndarray]:
        length = 32  # one shape for every call: one compilation
        tokens = np.full((len(seqs), length), PAD_ID, np.int32)
        for r, s in enumerate(seqs):
            tokens[r, : len(s)] = s
        logits = np.asarray(forward(model, jnp.asarray(tokens)))
        return [logits[r, : len(s)] for r, s in enumerate(seqs)]

    return run


@pytest.fixture(scope="module")
def greedy(model: Gemma2) -> list[list[int]]:
    return generate(model, PROMPTS, max_new_tokens=NEW)


# ----------------------------------------------------------------------------- the cache
def test_ring_buffer_keeps_the_last_w_columns() -> None:
    """Rows advance in lock-step: column c of the stream sits in slot c mod W, and the slots hold
    exactly the last W columns, whether written one token at a time (decode), as a prompt into an
    empty cache (longer than the window), or as a chunk into a used one (whose padding, common
    to all rows, takes no column)."""
    b, k, h = 2, 3, 4
    cache = LayerCache.empty(b, W, k, h)
    rng = np.random.default_rng(0)
    columns: list[tuple[np.ndarray, np.ndarray]] = []  # (pos (B,), kv (2, B, K, H)) per column
    write = jax.jit(LayerCache.write, static_argnames="mode")
    # A left-padded prompt longer than the window (the plan's "full" mode), one token at a
    # time ("decode"), then a chunk longer than the window, then a chunk with two padding
    # columns on the left ("append").
    chunks = [("full", [[-1, -1] + list(range(9)), list(range(11))])]
    chunks += [("decode", [[p], [p + 2]]) for p in range(9, 12)]
    chunks += [("append", [list(range(12, 21)), list(range(14, 23))])]
    chunks += [("append", [[-1, -1, 21, 22], [-1, -1, 23, 24]])]
    for mode, pos in chunks:
        pos = np.array(pos, np.int32)
        kv = rng.normal(size=(2, b, pos.shape[1], k, h)).astype(np.float32)
        cache = write(cache, mode, jnp.asarray(kv[0]), jnp.asarray(kv[1]), jnp.asarray(pos))
        lead = 0 if mode == "full" else int(np.argmax((pos >= 0).any(axis=0)))
        columns += [(pos[:, t], kv[:, :, t]) for t in range(lead, pos.shape[1])]
        assert int(cache.end) == len(columns)
        for c in range(max(0, len(columns) - W), len(columns)):
            p, kv_c = columns[c]
            np.testing.assert_array_equal(np.asarray(cache.pos[:, c % W]), p)
            np.testing.assert_array_equal(np.asarray(cache.k[:, c % W]), kv_c[0])
            np.testing.assert_array_equal(np.asarray(cache.v[:, c % W]), kv_c[1])


def test_init_cache_sizes(model: Gemma2) -> None:
    sizes = [c.size for c in model.init_cache(2, 40)]
    assert sizes == [W, 40, W, 40]  # local ring buffers, global full


def test_cached_decoding_matches_full_forward(model: Gemma2, full_forward) -> None:
    """Teacher-forced: prefill the left-padded prompts, then feed a fixed continuation one token
    at a time through the cache; every step's logits equal the full forward's."""
    rng = np.random.default_rng(1)
    cont = rng.integers(0, CONFIG.vocab_size, (len(PROMPTS), NEW)).astype(np.int32)
    tokens, mask = pad_prompts(PROMPTS)
    lengths = jnp.asarray([len(p) for p in PROMPTS], jnp.int32)

    @nnx.jit
    def run(
        m: Gemma2, tokens: jax.Array, mask: jax.Array, cont: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        first, cache = prefill(m, tokens, mask, m.init_cache(len(PROMPTS), 32))

        def body(cache: list[LayerCache], step: jax.Array) -> tuple[list[LayerCache], jax.Array]:
            logits, cache = decode_step(m, cont[:, step], lengths + step, cache)
            return cache, logits

        _, logits = jax.lax.scan(body, cache, jnp.arange(NEW - 1))
        return first, jnp.swapaxes(logits, 0, 1)  # (B, NEW-1, V)

    first, steps = run(model, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(cont))
    cached = np.concatenate([np.asarray(first)[:, None], np.asarray(steps)], axis=1)
    refs = full_forward([p + cont[r].tolist() for r, p in enumerate(PROMPTS)])
    for r, p in enumerate(PROMPTS):
        expected = refs[r][len(p) - 1 : len(p) - 1 + NEW]  # predicts cont[r]
        np.testing.assert_allclose(
            cached[r],
            expected,
            atol=1e-4,
            rtol=1e-4,
            err_msg=f"row {r} (prompt of {len(p)} tokens)",
        )


def test_greedy_is_argmax_of_full_forward(greedy: list[list[int]], full_forward) -> None:
    refs = full_forward([p + g for p, g in zip(PROMPTS, greedy)])
    for r, (p, g) in enumerate(zip(PROMPTS, greedy)):
        assert len(g) == NEW
        expected = refs[r][len(p) - 1 : -1].argmax(-1).tolist()
        assert g == expected, f"row {r}"
    assert len({tuple(g) for g in greedy}) > 1  # rows really differ


def test_batch_equals_one_prompt_at_a_time(model: Gemma2, greedy: list[list[int]]) -> None:
    # Left padding is invisible: a row decodes the same alone as in the batch. (Alone with the
    # same batch size, so no new compilation: the other rows are copies.)
    for r, p in enumerate(PROMPTS):
        assert generate(model, [p] * 3, max_new_tokens=NEW)[0] == greedy[r]


def test_streaming_path_equals_fused_path(model: Gemma2, greedy: list[list[int]]) -> None:
    seen: list[tuple[int, list[int]]] = []
    out = generate(
        model,
        PROMPTS,
        max_new_tokens=NEW,
        callback=lambda step, toks: seen.append((step, toks.tolist())),
    )
    assert out == greedy
    assert [s for s, _ in seen] == list(range(NEW))
    assert [[toks[r] for _, toks in seen] for r in range(3)] == greedy


def test_weights_are_rows_and_a_hf_file_is_read_in_place(model: Gemma2, tmp_path) -> None:
    """The decode loop reads every projection as rows (out, in), the model's own layout:
    q (N, H, D), o (D, N, H), gate (F, D), down (D, F), the embedding (V, D). That is Hugging
    Face's layout with the heads split out of an axis, so every tensor of a saved folder comes
    in as a view of the memory-mapped file (contiguous: nothing to transpose or copy)."""
    n, d, h, f = CONFIG.num_heads, CONFIG.d_model, CONFIG.head_dim, CONFIG.ffn_dim
    attn, mlp = model.layers[0].attn, model.layers[0].mlp
    shapes = {"q": (n, h, d), "o": (d, n, h), "gate": (f, d), "down": (d, f)}
    for name, shape in shapes.items():
        assert getattr(attn if name in "qo" else mlp, name).shape == shape, name
    save_hf(model, tmp_path)
    tensors = read_hf_tensors(tmp_path)
    arrays, _ = import_arrays(HF, model.config, tensors)
    for path, array in arrays.items():
        assert array.flags.c_contiguous and mapping_of(array) is not None, path


# ----------------------------------------------------------------------------- sampling
def test_top_k_1_and_tiny_top_p_are_greedy(model: Gemma2, greedy: list[list[int]]) -> None:
    assert generate(model, PROMPTS, max_new_tokens=NEW, temperature=1.5, top_k=1, seed=4) == greedy
    assert (
        generate(model, PROMPTS, max_new_tokens=NEW, temperature=1.5, top_p=1e-6, seed=5) == greedy
    )


def test_seeded_sampling_reproducible_and_seed_dependent(
    model: Gemma2, greedy: list[list[int]]
) -> None:
    kw = dict(max_new_tokens=NEW, temperature=1.0)
    a = generate(model, PROMPTS, seed=7, **kw)
    assert generate(model, PROMPTS, seed=7, **kw) == a
    b = generate(model, PROMPTS, seed=8, **kw)
    assert a != b and a != greedy


def test_sampled_tokens_stay_in_top_k_and_nucleus() -> None:
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(64, 97)) * 3, jnp.float32)
    order = np.argsort(-np.asarray(logits), axis=-1)
    probs = np.asarray(jax.nn.softmax(logits / 0.7))
    for seed in range(5):
        key = jax.random.key(seed)
        got = np.asarray(sample_logits(logits, key, 0.7, top_k=7))
        assert all(g in order[r, :7] for r, g in enumerate(got))
        got = np.asarray(sample_logits(logits, key, 0.7, top_p=0.5))
        for r, g in enumerate(got):
            sorted_p = probs[r, order[r]]
            n_keep = int(np.searchsorted(np.cumsum(sorted_p), 0.5) + 1)  # smallest set >= 0.5
            assert g in order[r, :n_keep]
        got = np.asarray(sample_logits(logits, key, 0.7, top_k=5, top_p=0.9))
        assert all(g in order[r, :5] for r, g in enumerate(got))


def test_temperature_sampling_follows_softmax() -> None:
    """Draw many samples of one row: frequencies match softmax(logits / T), not softmax(logits)."""
    logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0]])
    t = 2.0
    n = 4000
    keys = jax.random.split(jax.random.key(0), n)
    draws = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, t)[0])(keys))
    freq = np.bincount(draws, minlength=4) / n
    expected = np.asarray(jax.nn.softmax(logits[0] / t))
    assert np.abs(freq - expected).max() < 0.03, (freq, expected)
    assert np.abs(freq - np.asarray(jax.nn.softmax(logits[0]))).max() > 0.1


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 10), st.floats(0.05, 3.0), st.integers(0, 2**31 - 1))
def test_property_top_k_never_leaves_top_k(k: int, temperature: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(3, 11)).astype(np.float32)
    logits[:, 5] = logits[:, 4]  # a tie at a top-k boundary is fine
    got = np.asarray(sample_logits(jnp.asarray(logits), jax.random.key(seed), temperature, top_k=k))
    values_at_k = np.sort(logits, axis=-1)[:, ::-1][:, k - 1]
    for r, g in enumerate(got):
        assert logits[r, g] >= values_at_k[r]  # among the k largest values


# ----------------------------------------------------------------------------- stops
def test_stop_tokens_end_rows(model: Gemma2, greedy: list[list[int]]) -> None:
    stop = greedy[0][1]  # row 0 makes it at step 1 (or 0)
    out = generate(model, PROMPTS, max_new_tokens=NEW, stop_tokens=[stop, 96])
    for r, g in enumerate(greedy):
        cut = next((i + 1 for i, t in enumerate(g) if t in (stop, 96)), len(g))
        assert out[r] == g[:cut], f"row {r}"
    assert out[0][-1] == stop and len(out[0]) <= 2
    assert any(len(o) == NEW for o in out) or all(o[-1] in (stop, 96) for o in out)
    # Streaming: a finished row reports -1 from the next step on.
    seen: list[list[int]] = []
    generate(
        model,
        PROMPTS,
        max_new_tokens=NEW,
        stop_tokens=[stop, 96],
        callback=lambda step, toks: seen.append(toks.tolist()),
    )
    assert seen[len(out[0]) - 1][0] == stop
    assert all(step[0] == -1 for step in seen[len(out[0]) :])


def test_all_rows_stopped_ends_early(model: Gemma2, greedy: list[list[int]]) -> None:
    stops = [g[0] for g in greedy]
    seen: list[int] = []
    out = generate(
        model,
        PROMPTS,
        max_new_tokens=NEW,
        stop_tokens=stops,
        callback=lambda step, toks: seen.append(step),
    )
    assert out == [[g[0]] for g in greedy]
    assert seen == [0]


# ----------------------------------------------------------------------------- errors
def test_errors(model: Gemma2) -> None:
    with pytest.raises(ValueError, match=r"11 tokens.*max_new_tokens \(30\).*max_len=32"):
        generate(model, PROMPTS, max_new_tokens=30, max_len=32)
    with pytest.raises(ValueError, match=r"context of 64"):
        generate(model, PROMPTS, max_new_tokens=60)
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        generate(model, [[2, 3], []])
    with pytest.raises(ValueError, match="at least one prompt"):
        generate(model, [])
    with pytest.raises(
        ValueError, match=r"prompts\[0\]: token ids must be in \[0, 97\); found \[97, -1\]"
    ):
        generate(model, [[2, 97, -1]])
    with pytest.raises(TypeError, match="tokenize text first"):
        generate(model, ["hello"])
    with pytest.raises(ValueError, match="temperature"):
        generate(model, PROMPTS, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, PROMPTS, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, PROMPTS, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="stop_tokens"):
        generate(model, PROMPTS, stop_tokens=[500])
    with pytest.raises(ValueError, match="LEFT-padded"):
        tokens, mask = pad_prompts([[1, 2], [3]])
        prefill(model, tokens[:, ::-1], mask[:, ::-1], [])


def test_pad_prompts_and_check_prompts() -> None:
    tokens, mask = pad_prompts([[5, 6, 7], [8]], 4)
    assert tokens.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert mask.tolist() == [[False, True, True, True], [False, False, False, True]]
    assert check_prompts(np.array([[1, 2]]), 3) == [[1, 2]]
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        check_prompts(np.array([1, 2]), 3)
    with pytest.raises(ValueError, match="longest prompt has 3"):
        pad_prompts([[5, 6, 7]], 2)
