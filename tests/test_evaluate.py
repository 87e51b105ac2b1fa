"""gemma2_lite.evaluate and the evaluation sets: multiple-choice arithmetic pinned on a model
whose every log-probability is known, padding that cannot change a score, few-shot prompts,
exact match, Bradley-Terry ratings, contamination, formatting robustness, and the committed
sets rebuilt byte for byte by their script."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from random_models import random_model

from gemma2_lite import evaluate as ev
from gemma2_lite import get_config
from gemma2_lite.posttrain import speeches
from gemma2_lite.profile import data_path
from gemma2_lite.tokenizer import default_tokenizer

TOK = default_tokenizer()
SMALL = get_config("tiny").replace(
    num_layers=2, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, ffn_dim=64, name="small"
)


# ----------------------------------------------------------------------------- a known model
class CharTok:
    """ids: 0 pad, 1 <bos>, 2.. the letters a, b, c, d."""

    bos_id = 1

    def encode(self, text: str) -> list[int]:
        return [2 + "abcd".index(c) for c in text]


# next-token probabilities after each id (rows sum to 1); other rows uniform
P = np.full((6, 6), 1 / 6)
P[2] = [1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 4, 1 / 4]  # after "a"
P[4] = [1 / 16, 1 / 16, 1 / 8, 1 / 8, 1 / 8, 1 / 2]  # after "c"


class TableModel(nnx.Module):
    """logits[b, t] = log P[tokens[b, t]]: the log-likelihood of any option is known."""

    def __init__(self) -> None:
        self.table = nnx.Param(jnp.asarray(np.log(P), jnp.float32))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.table[...][tokens]


TOY = [  # (context, options, answer); the log-probabilities below are worked out by hand
    {"context": "a", "options": ["b", "cd"], "answer": 1},
    {"context": "a", "options": ["cb", "d"], "answer": 1},
    {"context": "c", "options": ["d", "ab"], "answer": 1},
]
L2, L4, L8 = math.log(1 / 2), math.log(1 / 4), math.log(1 / 8)
HAND = [  # per item: summed log p of each option, and its number of tokens
    ([L4, L4 + L2], [1, 2]),  # b | a = 1/4; c | a = 1/4, d | c = 1/2
    ([L4 + L8, L4], [2, 1]),  # c | a = 1/4, b | c = 1/8; d | a = 1/4
    ([L2, L8 + L4], [1, 2]),  # d | c = 1/2; a | c = 1/8, b | a = 1/4
]


def _wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_toy_option_scores_equal_the_hand_computation() -> None:
    got = ev.option_scores(TableModel(), CharTok(), TOY)
    for (logp, tokens), (want_logp, want_tokens) in zip(got, HAND):
        np.testing.assert_allclose(logp, want_logp, rtol=1e-6)
        assert tokens.tolist() == want_tokens


def test_toy_accuracy_for_both_normalisations() -> None:
    # none: item 0 picks "b" (-1.39 > -2.08), wrong; item 1 "d", right; item 2 "d", wrong.
    # length: item 0 picks "cd" (-1.04 per token > -1.39), right; items 1, 2 as before.
    for normalize, right in (("none", 1), ("length", 2)):
        got = ev.multiple_choice(TableModel(), CharTok(), TOY, normalize)
        assert got["n"] == 3 and got["accuracy"] == pytest.approx(right / 3)
        np.testing.assert_allclose(got["interval"], _wilson(right, 3), rtol=1e-9)


def test_length_normalisation_flips_an_answer() -> None:
    ((logp, tokens),) = ev.option_scores(TableModel(), CharTok(), TOY[:1])
    assert ev.choose(logp, tokens, "none") == 0  # the short option: fewer factors
    assert ev.choose(logp, tokens, "length") == 1  # the better option per token
    assert ev.choose([-1.0, -1.0], [1, 1]) == 0  # ties: the lowest index


def test_scores_equal_a_from_scratch_forward_and_padding_cannot_change_them() -> None:
    model = random_model(SMALL, 0)
    items = [
        {
            "context": "HAMLET.\nTo be, or not to be,",
            "options": [
                " that is the question:",
                " no",
                " and a much longer option, with many more tokens than the others have",
            ],
            "answer": 0,
        },
        {"context": "O", "options": ["!", " Romeo, Romeo, wherefore art thou"], "answer": 1},
    ]
    forward = nnx.jit(lambda m, x: jax.nn.log_softmax(m(x), axis=-1))  # (1, T, V)
    alone = [ev.option_scores(model, TOK, [it], batch_size=1)[0] for it in items]
    together = ev.option_scores(model, TOK, items, batch_size=8)  # rows padded to 32
    for item, (lp1, n1), (lp2, n2) in zip(items, alone, together):
        ctx = [TOK.bos_id] + TOK.encode(item["context"])
        for k, option in enumerate(item["options"]):
            row = ctx + TOK.encode(option)
            logp = forward(model, jnp.asarray([row[:-1]]))[0]  # unpadded
            want = sum(float(logp[t - 1, row[t]]) for t in range(len(ctx), len(row)))
            assert n1[k] == n2[k] == len(row) - len(ctx)
            assert abs(lp1[k] - want) <= 1e-4 * abs(want) and abs(lp2[k] - want) <= 1e-4 * abs(want)
    # garbage instead of <pad> after a row: causal attention never looks at it
    row = [TOK.bos_id] + TOK.encode(items[1]["context"] + items[1]["options"][1])
    batch = np.zeros((8, 33), np.int32)  # the shape of `together`'s batch
    batch[:, : len(row)] = row
    batch[1, len(row) :] = np.random.default_rng(0).integers(3, SMALL.vocab_size, 33 - len(row))
    mask = np.zeros((8, 32), bool)
    mask[:, 1 : len(row) - 1] = True
    sums = np.asarray(ev._option_sums(model, jnp.asarray(batch), jnp.asarray(mask)))
    assert abs(sums[0] - sums[1]) <= 1e-5 * abs(sums[0])


def test_bad_items_are_refused_with_a_clear_error() -> None:
    model, tok = TableModel(), CharTok()
    with pytest.raises(ValueError, match="normalize"):
        ev.multiple_choice(model, tok, TOY, "chars")
    for bad, message in (
        ([], "empty"),
        ([{"context": "a", "options": ["b"]}], "answer"),
        ([{"context": "a", "options": ["b"], "answer": 0}], "at least 2"),
        ([{"context": "a", "options": ["b", "c"], "answer": 2}], "index"),
        ([{"context": "a", "options": ["b", ""], "answer": 0}], "no tokens"),
    ):
        with pytest.raises(ValueError, match=message):
            ev.multiple_choice(model, tok, bad)
    long = [{"context": "To be " * 300, "options": ["c", "d"], "answer": 0}]
    with pytest.raises(ValueError, match="context of 512"):
        ev.multiple_choice(random_model(SMALL, 0), TOK, long)
    with pytest.raises(ValueError, match="finite"):
        ev.choose([0.0, float("nan")], [1, 1])


def test_few_shot_prompt_building() -> None:
    shots = [
        {"context": "A:", "options": [" x", " y"], "answer": 1},
        {"context": "B:", "options": [" z", " w"], "answer": 0},
    ]
    items = [{"context": "C:", "options": [" u", " v"], "answer": 0}]
    assert ev.few_shot(items, shots, 0) == items
    assert ev.few_shot(items, shots, 2)[0]["context"] == "A: y\n\nB: z\n\nC:"
    assert ev.few_shot(items, shots, 1, separator="\n")[0]["options"] == [" u", " v"]
    em = ev.few_shot(
        [{"prompt": "1 + 1 =", "answer": "2"}],
        [{"prompt": "2 + 3 =", "answer": "5"}],
        1,
        separator="\n",
    )
    assert em == [{"prompt": "2 + 3 = 5\n1 + 1 =", "answer": "2"}]
    with pytest.raises(ValueError, match="k must be"):
        ev.few_shot(items, shots, 3)


def test_answer_extractors() -> None:
    assert ev.extract_number(" 46 12") == "46"
    assert ev.extract_number(" forty-six, or 046.") == "46"
    assert ev.extract_number("-7 apples") == "-7"
    assert ev.extract_number(" none") is None
    assert ev.extract_line("  Romeo. ") == "Romeo" and ev.extract_line("Romeo..") == "Romeo."
    assert ev.extract_line("") == ""


def test_exact_match_with_a_stub_generator_and_with_the_sampler() -> None:
    items = [
        {"prompt": "1 + 1 =", "answer": "2"},
        {"prompt": "2 + 2 =", "answer": "4"},
        {"prompt": "3 + 3 =", "answer": "6"},
    ]
    said = {"1 + 1 =": " 2\n3", "2 + 2 =": " 04 apples\n", "3 + 3 =": " five\n6"}
    seen = {}

    def fake(model, prompts, *, max_new_tokens, temperature, stop_tokens):
        seen.update(temperature=temperature, stop_tokens=stop_tokens)
        return [TOK.encode(said[TOK.decode(p)]) for p in prompts]

    got = ev.exact_match(None, TOK, items, generate_fn=fake, batch_size=2)
    assert got["predictions"] == ["2", "4", None] and got["accuracy"] == pytest.approx(2 / 3)
    assert got["outputs"] == [" 2", " 04 apples", " five"]  # cut before the newline
    assert seen == {"temperature": 0.0, "stop_tokens": TOK.encode("\n")}
    real = ev.exact_match(random_model(SMALL, 1), TOK, items, max_new_tokens=3)
    assert real["n"] == 3 and len(real["outputs"]) == 3


def test_bradley_terry_closed_forms() -> None:
    two = ev.bradley_terry([("A", "B")] * 3 + [("B", "A")])
    assert two["A"] - two["B"] == pytest.approx(400 * math.log10(3), rel=1e-9)
    assert two["A"] + two["B"] == pytest.approx(0.0, abs=1e-9)
    # strengths ln 3 apart: counts equal to their expectations, so the fit recovers them
    pairs = (
        [("B", "A")] * 75
        + [("A", "B")] * 25
        + [("C", "B")] * 75
        + [("B", "C")] * 25
        + [("C", "A")] * 90
        + [("A", "C")] * 10
    )
    got = ev.bradley_terry(pairs)
    step = 400 * math.log10(3)
    for name, want in (("A", -step), ("B", 0.0), ("C", step)):
        assert got[name] == pytest.approx(want, abs=1e-6)


def test_bradley_terry_is_the_maximum_likelihood_fit_on_an_unbalanced_schedule() -> None:
    rng = np.random.default_rng(0)
    truth = {"w": 150.0, "x": 0.0, "y": -80.0, "z": -300.0}
    names, pairs = list(truth), []
    for _ in range(600):
        a, b = rng.choice(4, 2, replace=False, p=[0.5, 0.3, 0.15, 0.05])
        p = 1 / (1 + 10 ** ((truth[names[b]] - truth[names[a]]) / 400))
        pairs.append((names[a], names[b]) if rng.random() < p else (names[b], names[a]))
    got = ev.bradley_terry(pairs)
    assert abs(sum(got.values())) < 1e-6
    theta = {n: r / ev.ELO for n, r in got.items()}
    for n in names:  # the likelihood's gradient is zero: observed wins = expected wins
        won = sum(w == n for w, _ in pairs)
        expected = sum(
            1 / (1 + math.exp(theta[l] - theta[w] if w == n else theta[w] - theta[l]))
            for w, l in pairs
            if n in (w, l)
        )
        assert won == pytest.approx(expected, abs=1e-6)
    assert max(abs(got[n] - got["x"] - (truth[n] - truth["x"])) for n in names) < 120


def test_bradley_terry_refuses_an_infinite_rating_unless_given_a_prior() -> None:
    pairs = [("A", "B"), ("B", "C"), ("A", "C")]  # A never lost: +infinity
    with pytest.raises(ValueError, match="infinite"):
        ev.bradley_terry(pairs)
    got = ev.bradley_terry(pairs, l2=0.1)
    assert got["A"] > got["B"] > got["C"] and abs(sum(got.values())) < 1e-6
    with pytest.raises(ValueError, match="different"):
        ev.bradley_terry([("A", "A")])


def test_bootstrap_intervals_contain_the_fit_and_shrink_with_data() -> None:
    pairs = [("A", "B")] * 6 + [("B", "A")] * 4 + [("B", "C")] * 7 + [("C", "B")] * 3
    small = ev.bootstrap_ratings(pairs, n_boot=100, seed=0, l2=0.01)
    assert small == ev.bootstrap_ratings(pairs, n_boot=100, seed=0, l2=0.01)
    large = ev.bootstrap_ratings(pairs * 10, n_boot=100, seed=0, l2=0.01)
    fit = ev.bradley_terry(pairs * 10, l2=0.01)
    for name in "ABC":
        assert large[name][0] <= fit[name] <= large[name][1]
        assert large[name][1] - large[name][0] < small[name][1] - small[name][0]


def test_judge_pairs_orders_and_position_bias() -> None:
    outputs = {"P": ["p1", "p2"], "Q": ["q1", "q2"], "R": ["r1", "r2"]}

    def first(i, a, b):  # a judge that always prefers the answer shown first
        return 1

    both = ev.judge_pairs(outputs, first, order="both")
    assert len(both) == 2 * 3 * 2
    assert all(abs(r) < 1e-6 for r in ev.bradley_terry(both).values())
    fixed = ev.judge_pairs(outputs, first, order="fixed")
    assert sorted(fixed) == sorted([("P", "Q"), ("P", "R"), ("Q", "R")] * 2)
    rand = ev.judge_pairs(outputs, first, order="random", seed=3)
    assert len(rand) == 6 and rand == ev.judge_pairs(outputs, first, order="random", seed=3)
    assert ev.judge_pairs(outputs, lambda i, a, b: 0) == []  # ties are dropped
    with pytest.raises(ValueError):
        ev.judge_pairs({"P": ["a"], "Q": ["a", "b"]}, first)


def test_char_ngram_f1() -> None:
    assert ev.char_ngram_f1("To be", "to be") == 1.0
    assert ev.char_ngram_f1("abc", "xyz") == 0.0
    # "abcd" has abc, bcd; "abce" has abc, bce: one shared of two each
    assert ev.char_ngram_f1("abcd", "abce") == pytest.approx(0.5)


def test_contamination_by_word_ngrams() -> None:
    train = "Now is the winter of our discontent\nMade glorious summer by this sun of York."
    texts = [
        "NOW is the winter, of our...",
        "the winter of their discontent",
        "glorious summer",
        "concat is the winter",
    ]
    got = ev.contamination(texts, train, n=4)
    assert got["flags"] == [True, False, False, False]  # word n-grams, not substrings
    assert got["contaminated"] == 1 and got["short"] == 1 and got["rate"] == 0.25
    assert got["ngram_rate"] == pytest.approx(3 / (3 + 2 + 0 + 1))
    again = ev.contamination(texts, ev.ngram_index(train, 4), n=4)
    assert again["flags"] == got["flags"]
    assert ev.word_ngrams("It's a dog's life!", 2) == [
        ("it's", "a"),
        ("a", "dog's"),
        ("dog's", "life"),
    ]


def test_format_robustness_has_twelve_combinations() -> None:
    items = ev.load_eval_set("next_line")[:6]
    formats = ev.next_line_formats()
    assert len(formats) * len(ev.NORMALIZATIONS) == 12
    lettered = formats["letters"](items[0])
    assert lettered["options"] == [" A", " B", " C", " D"]
    assert lettered["context"].endswith(f"D. {items[0]['options'][3]}\nAnswer:")
    for fmt in formats.values():
        shaped = fmt(items[0])
        assert shaped["answer"] == items[0]["answer"]
        assert TOK.encode(shaped["context"])  # every format is text the tokenizer takes
    got = ev.format_robustness(random_model(SMALL, 2), TOK, items, formats)
    values = np.array(list(got["scores"].values()))
    assert len(values) == 12 and got["n"] == 6
    assert got["std"] == pytest.approx(values.std()) and got["mean"] == pytest.approx(values.mean())
    assert np.allclose(values * 6 / 100, np.round(values * 6 / 100))


def test_score_variants_scores_every_variant_on_every_set() -> None:
    sets = {"toy": TOY}
    got = ev.score_variants(
        {"one": TableModel(), "two": TableModel()}, CharTok(), sets, normalize="none"
    )
    assert set(got) == {"one", "two"}
    assert got["one"]["toy"]["accuracy"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- the sets
def _builder():
    path = Path(data_path("build_eval.py"))
    spec = importlib.util.spec_from_file_location("build_eval", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_sets_are_rebuilt_byte_for_byte_and_small() -> None:
    built = _builder().build()
    assert sorted(built) == sorted(f"{name}.jsonl" for name in ev.EVAL_SETS)
    total = 0
    for name, text in built.items():
        path = Path(data_path("eval", name))
        assert path.read_text(encoding="utf-8") == text, (
            f"{name} is out of date: run python data/build_eval.py"
        )
        total += path.stat().st_size
    assert total < 400_000


@pytest.mark.parametrize("name", ["next_line", "speaker"])
def test_multiple_choice_sets_follow_their_rule(name: str) -> None:
    test, shots = ev.load_eval_set(name), ev.load_eval_set(name, "shots")
    assert len(test) == 300 and len(shots) == 8
    for split, items in (("valid", test), ("train", shots)):
        pool = {(t, s, l1): l2 for t, s, l1, l2 in speeches(split)}
        for item in items:
            assert len(item["options"]) == 4 == len(set(item["options"]))
            second = pool[(item["title"], item["speaker"], item["line"])]  # KeyError: wrong
            right = item["options"][item["answer"]]
            if name == "next_line":
                assert item["context"] == f"{item['speaker']}.\n{item['line']}\n"
                assert right == second
            else:
                assert right == f"{item['speaker']}.\n{item['line']}"
                assert all(o.endswith(f".\n{item['line']}") for o in item["options"])
                assert item["context"].endswith("\n\n")
    positions = np.bincount([item["answer"] for item in test], minlength=4)
    assert positions.min() > 50  # the right option is anywhere


def test_arithmetic_set() -> None:
    test, shots = ev.load_eval_set("arithmetic"), ev.load_eval_set("arithmetic", "shots")
    assert len(test) == 200 and len(shots) == 8
    prompts = [item["prompt"] for item in test + shots]
    assert len(set(prompts)) == len(prompts)
    for item in test + shots:
        a, b = (int(x) for x in item["prompt"].removesuffix(" =").split(" + "))
        assert 0 <= a <= 49 and 0 <= b <= 49 and item["answer"] == str(a + b)
    with pytest.raises(ValueError, match="unknown"):
        ev.load_eval_set("mmlu")
