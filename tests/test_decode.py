"""Decoding without waste gives the tokens decoding with waste gave (issue 13).

* ``generate`` on a fixed random model (V=701 > the sampler's shortlist) gives the tokens that
  the package gave before the rewrite (recorded in ``data/pinned_generate.json``: greedy and
  seeded sampling with top-k inside and outside the shortlist, and top-p inside and past it).
* The shortlist sampler picks the same token as a full sort of the vocabulary, from the same key.
* ``PromptCache`` / ``ChatSession`` keep the cache between turns, prefill only the new turn, and
  give the tokens ``generate`` gives for the whole conversation.
* The CLI's streamer decodes each token once (linear time) and prints exactly the full decode.
* A prefill attends in its local layers in bands of W columns (T·2W scores, not T²) and gives
  the logits and the cache the plain (B, T, T) path gives.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from random_models import random_model
from tolerance import assert_close

import gemma2_lite.attention as attention
from gemma2_lite import get_config
from gemma2_lite.attention import (
    AttentionPlan,
    attention_mask,
    band_mask,
    banded_attention,
    gqa_attention,
)
from gemma2_lite.model import positions_from_mask
from gemma2_lite.sampler import SHORTLIST, PromptCache, _sample_jit, generate, prefill

# One worker runs this file: the compiled programs are shared by its tests.
pytestmark = pytest.mark.xdist_group("decode")

PINNED = json.loads((Path(__file__).parent / "data" / "pinned_generate.json").read_text())
CONFIG = get_config(
    "tiny",
    vocab_size=701,
    d_model=48,
    num_layers=4,
    num_heads=6,
    num_kv_heads=2,
    head_dim=14,
    ffn_dim=88,
    query_pre_attn_scalar=23,
    sliding_window=5,
    max_seq_len=96,
    name="pin-test",
)
PROMPTS = [
    [2, 11, 23, 5, 71, 13, 41, 7, 19, 3, 88, 400, 650],
    [2, 31, 17],
    [2, 61, 29, 43, 37, 53, 59],
]


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, seed=5, qk_gain=3.0)


@pytest.mark.parametrize("settings", list(PINNED["generate"]))
def test_generate_gives_the_pinned_tokens(model, settings: str) -> None:
    got = generate(model, PROMPTS, max_new_tokens=21, **json.loads(settings))
    assert got == PINNED["generate"][settings]


def _full_sort_sample(logits, key, temperature, top_k, top_p):
    """The sampler before the shortlist: sort all V, filter, jax.random.categorical."""
    vocab = logits.shape[-1]
    values, ids = jax.lax.top_k(logits / temperature, vocab)
    keep = jnp.arange(vocab) < jnp.where(top_k > 0, top_k, vocab)
    values = jnp.where(keep, values, -jnp.inf)
    probs = jax.nn.softmax(values, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    values = jnp.where(before < top_p, values, -jnp.inf)
    choice = jax.random.categorical(key, values, axis=-1)
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]


@pytest.mark.parametrize(
    "top_k,top_p",
    [(7, 1.0), (SHORTLIST, 1.0), (SHORTLIST + 1, 1.0), (0, 0.5), (0, 0.999), (40, 0.9)],
)
def test_shortlist_picks_what_a_full_sort_picks(top_k: int, top_p: float) -> None:
    rng = np.random.default_rng(top_k)
    # Peaked rows (the nucleus fits in the shortlist) and flat ones (it does not).
    logits = rng.normal(size=(6, 1009)).astype(np.float32) * np.array(
        [[8], [8], [3], [1], [0.2], [0.05]]
    )
    reference = jax.jit(_full_sort_sample)
    for seed in range(20):
        key = jax.random.key(seed)
        args = (np.float32(0.9), np.int32(top_k), np.float32(top_p))
        got = np.asarray(_sample_jit(jnp.asarray(logits), key, *args))
        want = np.asarray(reference(jnp.asarray(logits), key, *args))
        np.testing.assert_array_equal(got, want)


def test_prompt_cache_prefills_only_the_new_turn(model) -> None:
    cache = PromptCache(model, size=96)
    conversation = list(PROMPTS[0])
    kw = dict(max_new_tokens=5, temperature=0.9, top_k=50, stop_tokens=[3])
    held = 0  # ids the cache holds after the last turn
    for turn in range(3):
        reply = cache.generate(conversation, seed=turn, **kw)
        # What generate gives for the whole conversation at once, with no cache kept.
        assert reply == generate(model, [conversation], seed=turn, **kw)[0]
        expected_prefill = len(conversation) - held
        assert cache.prefilled == expected_prefill
        held = len(cache.ids)
        assert cache.ids == conversation + reply[:-1]
        conversation = conversation + reply + [17 + turn, 5, 19]  # the next user turn
    # A conversation that is not a continuation starts over.
    cache.generate([2, 44, 45], seed=0, **kw)
    assert cache.prefilled == 3


class _Counting:
    """A tokenizer whose decode counts the ids it is given."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids):
        self.decoded += len(ids)
        return self.tok.decode(ids)


def test_streamer_is_linear_and_exact() -> None:
    from gemma2_lite.__main__ import _Streamer
    from gemma2_lite.tokenizer import default_tokenizer

    tok = default_tokenizer()
    text = "Shall I compare thee to a summer's day? Thou art more lovely: é, ß, 日本, 🙂. " * 8
    ids = tok.encode(text)
    counting, out = _Counting(tok), io.StringIO()
    stream = _Streamer(counting, set(), out)
    for step, t in enumerate(ids):
        stream(step, np.array([t]))
    assert out.getvalue() == tok.decode(ids)
    # Re-decoding everything each step would cost ~len(ids)**2 / 2 ids.
    assert counting.decoded < 8 * len(ids)


def test_chat_session_keeps_its_cache_and_its_replies() -> None:
    from gemma2_lite.chat import ChatSession
    from gemma2_lite.tokenizer import default_tokenizer

    tok = default_tokenizer()
    config = CONFIG.replace(vocab_size=tok.vocab_size, max_seq_len=128, name="chat-test")
    chat_model = random_model(config, seed=1, qk_gain=3.0)
    kw = dict(max_new_tokens=6, temperature=0.8, top_k=20, seed=7)
    cached = ChatSession(chat_model, tok, **kw)
    recomputed = ChatSession(chat_model, tok, generate_fn=generate, **kw)
    for line in ["Good morrow.", "What news?"]:
        held = list(cached._cache.ids) if cached._cache is not None else []
        prompt = cached.prompt_ids(line)
        assert cached.send(line) == recomputed.send(line)
        assert cached.history == recomputed.history
        # The cache is reused when it holds a prefix of the new prompt (the reply re-encodes
        # to the tokens generated); then only the rest is prefilled.
        reused = bool(held) and prompt[: len(held)] == held
        assert cached.prefilled == (len(prompt) - len(held) if reused else len(prompt))


@pytest.mark.parametrize("length", [11, 15, 23])  # T = 2W + 1, a multiple of W, neither
def test_banded_attention_equals_the_full_window(length: int) -> None:
    window, (b, n, k, h) = 5, (3, 6, 2, 7)
    rng = np.random.default_rng(length)
    q, key, v = (
        jnp.asarray(rng.normal(0, 3, (b, length, heads, h)), jnp.float32) for heads in (n, k, k)
    )
    valid = np.ones((b, length), bool)
    valid[1, :4], valid[2, : length - 2] = False, False  # left padding
    pos = positions_from_mask(jnp.asarray(valid))
    k_pos = jnp.where(jnp.asarray(valid), pos, -1)
    full, _ = gqa_attention(q, key, v, attention_mask(pos, k_pos, window), softcap=5.0)
    band = band_mask(attention_mask, k_pos, window)  # (B, n, W, 2W)
    assert band.shape == (b, -(-length // window), window, 2 * window)
    got = banded_attention(gqa_attention, q, key, v, band, softcap=5.0)
    # Padding queries see no key (a uniform softmax over what each path holds): compare the
    # real ones, which are all that is ever read.
    assert_close(np.asarray(got)[valid], np.asarray(full)[valid], 1e-5, "banded vs full")


def test_prefill_attends_in_bands_and_fills_the_same_cache(model, monkeypatch) -> None:
    """The forward's attention plan bands the local layers of a prompt into a cache, whatever
    the attention function (a wrapped copy of the default takes the same path), and gives the
    logits and the cache of the plain (B, T, T) plan."""
    calls = []
    real = attention.banded_attention
    monkeypatch.setattr(
        attention, "banded_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    tokens = np.asarray(np.random.default_rng(0).integers(3, 700, (3, 17)), np.int32)
    valid = np.ones(tokens.shape, bool)
    valid[1, :6], valid[2, :12] = False, False
    got, got_cache = prefill(
        model, jnp.asarray(tokens), jnp.asarray(valid), model.init_cache(3, 40)
    )
    locals_ = sum(w is not None for w in map(CONFIG.window_for_layer, range(CONFIG.num_layers)))
    assert len(calls) == locals_ > 0  # every local layer, none of the global ones
    calls.clear()
    wrapped = model.replace(attention=lambda *a, **kw: gqa_attention(*a, **kw))
    again, _ = prefill(wrapped, jnp.asarray(tokens), jnp.asarray(valid), model.init_cache(3, 40))
    assert len(calls) == locals_
    assert_close(again, got, 1e-6, "a wrapped attention function")
    calls.clear()
    plain = model.forward(
        jnp.asarray(tokens),
        jnp.asarray(valid),
        cache=model.init_cache(3, 40),
        last_only=True,
        plan=AttentionPlan("full"),
    )
    assert not calls
    assert_close(got, plain.logits[:, -1], 1e-5, "last-position logits")
    for mine, theirs in zip(got_cache, plain.cache):
        np.testing.assert_array_equal(mine.pos, theirs.pos)
        real_slots = np.asarray(theirs.pos) >= 0
        assert_close(np.asarray(mine.k)[real_slots], np.asarray(theirs.k)[real_slots], 1e-5, "k")
        assert_close(np.asarray(mine.v)[real_slots], np.asarray(theirs.v)[real_slots], 1e-5, "v")
    # And the tokens generated from a long prompt are those of recomputing the whole sequence
    # at every step without a cache (the plain plan throughout).
    # (Right-padded to one length, so one compiled program: causal attention never sees it.)
    prompt = [2] + list(range(40, 70))
    seq = list(prompt)
    forward = nnx.jit(lambda m, t: m(t))
    for _ in range(12):
        padded = jnp.asarray([seq + [0] * (48 - len(seq))], jnp.int32)
        seq.append(int(np.argmax(np.asarray(forward(model, padded))[0, len(seq) - 1])))
    assert generate(model, [prompt], max_new_tokens=12) == [seq[len(prompt) :]]


def test_an_explicit_plan_is_checked(model) -> None:
    tokens = jnp.asarray([[2, 5, 7]], jnp.int32)
    cache = model.init_cache(1, 16)
    with pytest.raises(ValueError, match="needs a cache"):
        model.forward(tokens, plan=AttentionPlan("append"))
    with pytest.raises(ValueError, match="one token"):
        model.forward(
            tokens, positions=jnp.asarray([[0, 1, 2]]), cache=cache, plan=AttentionPlan("decode")
        )
    with pytest.raises(ValueError, match="band=True"):
        model.forward(tokens, plan=AttentionPlan("full", band=True))
    with pytest.raises(ValueError, match="needs mode 'full'"):
        AttentionPlan("decode", band=True)
    used = model.forward(tokens, cache=cache).cache
    with pytest.raises(ValueError, match="used cache"):
        model.forward(tokens, cache=used)
