"""Hidden tests of assignment 3 (instructors only; never in the student copy).

    pytest assignments/a3_speculative_decoding          # public + hidden, reference solution
    ASSIGNMENT_NOTEBOOK=student.ipynb pytest assignments/a3_speculative_decoding

Exactness, measured: the tokens verify and speculative_generate emit are counted over thousands
of seeded rounds and compared with the target's exact distribution (binomial z-scores under 5);
the statistics the loop reports against the theory for drafts accepted independently.
``wrong_answers.py`` lists the wrong answers each test rejects (tests/test_assignments.py
checks that it does).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_a3_public import (
    DRAFT,
    TARGET,
    V,
    assert_frequencies,
    bigram,  # noqa: E402
    softmax,
)


def test_verify_keeps_the_targets_distribution(impl) -> None:
    """A3-1: first token ~ p[0]; given the first draft kept, the second ~ p[1]; and with
    q = p every round keeps both drafts and adds a third token."""
    p = softmax(TARGET[[0, 2, 3]])
    q = softmax(DRAFT[[0, 2]])
    rng = np.random.default_rng(7)
    first, second = np.zeros(V), np.zeros(V)
    for _ in range(6_000):
        drafted = [int(rng.choice(V, p=q[0])), int(rng.choice(V, p=q[1]))]
        out = [int(t) for t in impl.verify(p, q, drafted, rng)]
        assert 1 <= len(out) <= 3, out
        first[out[0]] += 1
        if len(out) >= 2:  # the first draft was kept
            second[out[1]] += 1
    assert_frequencies(first, p[0], "first token")
    assert_frequencies(second, p[1], "second token, first draft kept")
    for _ in range(50):
        drafted = [int(rng.choice(V, p=p[0])), int(rng.choice(V, p=p[1]))]
        assert len(impl.verify(p, p[:2], drafted, rng)) == 3, "q = p must keep all, plus one"


def test_generate_samples_the_target_exactly(impl) -> None:
    """A3-2 at temperature 0.7: the two tokens after a two-token prompt, over 3,000 seeds,
    against the target's exact joint distribution (16 outcomes)."""
    temp, prompt = 0.7, [1, 3]
    exact = softmax(TARGET[prompt[-1]], temp)[:, None] * softmax(TARGET, temp)  # (x1, x2)
    counts = np.zeros((V, V))
    for seed in range(3_000):
        new, _ = impl.speculative_generate(
            bigram(TARGET), bigram(DRAFT), prompt, 2, 2, temperature=temp, seed=seed
        )
        assert len(new) == 2, new
        counts[int(new[0]), int(new[1])] += 1
    assert_frequencies(counts, exact, "(x1, x2)")


def test_stats_follow_the_acceptance_theory(impl) -> None:
    """A3-2's stats: target and drafter that ignore the context (alpha the same every draft):
    accepted / (accepted + rejected) within 0.03 of sum(min(p, q)), tokens per target call
    within 5% of (1 - alpha^(k+1)) / (1 - alpha); the calls counted are the calls made."""
    p_logits, q_logits = TARGET[0], DRAFT[0]
    alpha = float(np.minimum(softmax(p_logits), softmax(q_logits)).sum())
    target_calls, draft_calls = [], []
    unigram = np.tile(p_logits, (V, 1))
    new, stats = impl.speculative_generate(
        bigram(unigram, target_calls),
        bigram(np.tile(q_logits, (V, 1)), draft_calls),
        [0],
        4_000,
        3,
        temperature=1.0,
        seed=11,
    )
    assert len(new) == 4_000
    assert stats["target_calls"] == len(target_calls), (stats, len(target_calls))
    assert stats["draft_calls"] == len(draft_calls), (stats, len(draft_calls))
    rate = stats["accepted"] / (stats["accepted"] + stats["rejected"])
    assert abs(rate - alpha) < 0.03, f"acceptance rate {rate:.3f}, theory {alpha:.3f}"
    per_call = 4_000 / stats["target_calls"]
    theory = (1 - alpha**4) / (1 - alpha)
    assert abs(per_call / theory - 1) < 0.05, f"{per_call:.3f} tokens per call, {theory:.3f}"


def test_expected_tokens_per_call_values(impl) -> None:
    """A3-3: k + 1 at alpha = 1, and the sum of alpha^j for j <= k in between."""
    assert abs(impl.expected_tokens_per_call(1.0, 4) - 5.0) < 1e-9
    for alpha, k in ((0.8, 4), (0.3, 2), (0.95, 8)):
        want = sum(alpha**j for j in range(k + 1))
        got = impl.expected_tokens_per_call(alpha, k)
        assert abs(got - want) < 1e-9, f"alpha={alpha}, k={k}: {got}, expected {want}"
