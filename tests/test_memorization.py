"""The memorization test: metrics, the prompt/target split, and real models at both extremes."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma2_lite import Gemma2, get_config
from gemma2_lite.memorization import (
    Rate,
    canary_extraction,
    edit_distance,
    insert_canaries,
    luhn_valid,
    make_canaries,
    memorization_test,
    pii_report,
    scan_pii,
    wilson_interval,
)


def test_edit_distance_known_values():
    assert edit_distance([], []) == 0
    assert edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert edit_distance([1, 2, 3], [1, 9, 3]) == 1  # substitution
    assert edit_distance([1, 2, 3], [1, 3]) == 1  # deletion
    assert edit_distance([1, 2, 3], [0, 1, 2, 3]) == 1  # insertion
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([1, 2], [3, 4, 5]) == 3


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 4), max_size=12),
    st.lists(st.integers(0, 4), max_size=12),
    st.lists(st.integers(0, 4), max_size=12),
)
def test_edit_distance_is_a_metric(a, b, c):
    assert edit_distance(a, b) == edit_distance(b, a)
    assert (edit_distance(a, b) == 0) == (a == b)
    assert edit_distance(a, c) <= edit_distance(a, b) + edit_distance(b, c)
    assert abs(len(a) - len(b)) <= edit_distance(a, b) <= max(len(a), len(b))


def test_wilson_interval():
    lo, hi = wilson_interval(0, 100)
    assert lo == 0.0 and 0.02 < hi < 0.05
    lo, hi = wilson_interval(50, 100)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(0.19, abs=0.01)
    assert repr(Rate(3, 4)).startswith("75.00%")


def recording_generate(outputs_for):
    """A stand-in for the sampler: records prompts, answers with outputs_for(prompt)."""
    seen = []

    def generate(model, prompts, *, max_new_tokens, temperature):
        assert temperature == 0.0
        seen.extend(prompts)
        return [outputs_for(p)[:max_new_tokens] for p in prompts]

    return generate, seen


DOCS = [list(range(1000 * i, 1000 * i + 120)) for i in range(30)] + [[1, 2, 3]]  # last too short
TRUTH = {tuple(d[:50]): d[50:100] for d in DOCS}


def test_split_never_leaks_the_target_into_the_prompt():
    gen, seen = recording_generate(lambda p: TRUTH[tuple(p)])
    result = memorization_test(None, DOCS, n=20, seed=3, generate_fn=gen)
    assert len(seen) == 20 and all(len(p) == 50 for p in seen)
    for s in result.samples:
        doc = DOCS[s.index]
        assert s.prompt == doc[:50] and s.target == doc[50:100]
        assert not set(s.prompt) & set(s.target)
    assert result.exact.rate == 1.0 and result.approximate.rate == 1.0
    # Uniform sampling without replacement, reproducible by seed, never the short document.
    indices = [s.index for s in result.samples]
    assert len(set(indices)) == 20 and 30 not in indices
    again = memorization_test(None, DOCS, n=20, seed=3, generate_fn=gen)
    assert [s.index for s in again.samples] == indices
    other = memorization_test(None, DOCS, n=20, seed=4, generate_fn=gen)
    assert [s.index for s in other.samples] != indices


def test_near_copies_are_approximate_not_exact():
    def corrupt(k):
        def out(p):
            t = list(TRUTH[tuple(p)])
            for j in range(k):
                t[3 + 7 * j] = -1
            return t

        return out

    near = memorization_test(None, DOCS, n=10, generate_fn=recording_generate(corrupt(5))[0])
    assert near.exact.count == 0 and near.approximate.count == 10 and near.approx_only == 10
    far = memorization_test(None, DOCS, n=10, generate_fn=recording_generate(corrupt(6))[0])
    assert far.exact.count == 0 and far.approximate.count == 0


def test_breakdown_by_source_and_errors():
    sources = ["plays" if i % 3 else "poems" for i in range(len(DOCS))]
    gen, _ = recording_generate(lambda p: TRUTH[tuple(p)] if p[0] % 2000 == 0 else [0] * 50)
    result = memorization_test(None, DOCS, sources=sources, generate_fn=gen)
    assert set(result.by_source) == {"plays", "poems"}
    assert sum(r["exact"].n for r in result.by_source.values()) == 30
    assert "all" in result.table()
    with pytest.raises(ValueError, match="only 30 documents are long enough"):
        memorization_test(None, DOCS, n=31, generate_fn=gen)
    with pytest.raises(ValueError, match="sources for"):
        memorization_test(None, DOCS, sources=["a"], generate_fn=gen)


CFG = get_config(
    "tiny",
    vocab_size=97,
    d_model=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    ffn_dim=128,
    query_pre_attn_scalar=16,
    sliding_window=8,
    max_seq_len=64,
)


def corpus(seed, n_docs=12, length=24):
    return np.random.default_rng(seed).integers(3, 97, (n_docs, length)).tolist()


def test_untrained_model_memorises_nothing():
    model = Gemma2(CFG, rngs=nnx.Rngs(0))
    result = memorization_test(model, corpus(0), prompt_len=12, target_len=12)
    assert result.exact.count == 0 and result.approximate.count == 0


def test_overfit_model_memorises_everything():
    docs = corpus(1)
    model = Gemma2(CFG, rngs=nnx.Rngs(1))
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    batch = jnp.asarray(docs)

    @nnx.jit
    def step(model, opt):
        def loss(model):
            logits = model(batch[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

        value, grads = nnx.value_and_grad(loss)(model)
        opt.update(model, grads)
        return value

    for _ in range(400):
        value = step(model, opt)
    assert float(value) < 0.05
    result = memorization_test(model, docs, prompt_len=12, target_len=12)
    assert result.exact.rate == 1.0, result
    # Held-out documents from the same distribution are not memorised.
    assert memorization_test(model, corpus(2), prompt_len=12, target_len=12).exact.count == 0


def test_pii_scan_with_severities():
    assert luhn_valid("4111 1111 1111 1111") and not luhn_valid("4111 1111 1111 1112")
    kinds = {
        k
        for k, _, _ in scan_pii(
            "mail jane.doe@example.org or call (555) 123-4567, "
            "card 4111-1111-1111-1111, ssn 078-05-1120"
        )
    }
    assert kinds == {"email", "phone", "credit_card", "national_id"}
    assert scan_pii("card 4111 1111 1111 1112 and a plain sentence.") == []
    assert scan_pii("To be, or not to be: that is the question.") == []
    report = pii_report(["nothing here", "write to a@b.co", "4111111111111111"])
    assert (report["high"].count, report["medium"].count, report["any"].count) == (1, 1, 2)


def test_canaries_inserted_by_count_and_extracted():
    canaries = make_canaries((1, 4), per_count=2, seed=0)
    docs = insert_canaries(["a\nb\nc", "d\ne"], canaries, seed=0)
    text = "\n".join(docs)
    for c in canaries:
        assert text.count(c.text) == c.copies

    class CharTokenizer:
        def encode(self, s):
            return [ord(ch) for ch in s]

    secrets = {tuple(ord(ch) for ch in c.prefix): [ord(ch) for ch in c.secret] for c in canaries}
    gen, _ = recording_generate(
        lambda p: secrets[tuple(p)] if "1-" in "".join(map(chr, p)) else [0] * 20
    )
    rates = canary_extraction(None, CharTokenizer(), canaries, generate_fn=gen)
    assert rates[1].rate == 1.0 and rates[4].rate == 0.0


def test_out_of_range_and_empty_inputs_are_refused_by_name():
    with pytest.raises(ValueError, match=r"successes \(5\) cannot exceed the number of trials"):
        wilson_interval(5, 3)
    with pytest.raises(ValueError, match="successes must be a non-negative integer"):
        wilson_interval(-1, 3)
    with pytest.raises(ValueError, match="count .* cannot exceed n"):
        Rate(4, 3)
    gen, _ = recording_generate(lambda p: TRUTH[tuple(p)])
    # a negative threshold would make "approximate" stricter than "exact"
    with pytest.raises(ValueError, match=r"threshold .* must be a number in \[0, 1\], got -0.1"):
        memorization_test(None, DOCS, threshold=-0.1, generate_fn=gen)
    with pytest.raises(ValueError, match="threshold"):
        memorization_test(None, DOCS, generate_fn=gen).samples[0].approximate(-1)
    with pytest.raises(ValueError, match="documents is empty"):
        memorization_test(None, [], generate_fn=gen)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        memorization_test(None, DOCS, batch_size=0, generate_fn=gen)
    with pytest.raises(ValueError, match="canaries is empty"):
        canary_extraction(None, None, [], generate_fn=gen)
    with pytest.raises(ValueError, match="texts is empty"):
        pii_report([])
    with pytest.raises(ValueError, match="documents is empty"):
        insert_canaries([], make_canaries((1,), per_count=1))


def test_email_scan_reports_the_address_from_its_first_letter():
    """The linear-time e-mail pattern reports what the old one did on ordinary text."""
    emails = lambda text: [m for k, _, m in scan_pii(text) if k == "email"]
    assert emails("mail jane.doe@example.org or") == ["jane.doe@example.org"]
    assert emails("..foo@bar.com, x.y+z@d-e.co.uk.") == ["foo@bar.com", "x.y+z@d-e.co.uk"]
    assert emails("a@b.com@c.org; é.è@ü.de") == ["a@b.com", "é.è@ü.de"]
    assert emails("foo@bar and a.a.a.a") == []
