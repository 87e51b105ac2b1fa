"""Public tests of assignment 3 (speculative decoding): run them on your notebook with

    pytest test_a3_public.py                     # grades a3_speculative_decoding.ipynb
    ASSIGNMENT_NOTEBOOK=mine.ipynb pytest test_a3_public.py

Each test receives ``impl``, what your notebook's imports cell and *Your answer* cells define.
The "models" here are small tables whose distributions are known exactly: row t of a model's
logits depends on token t only (a bigram model), V = 4. Grading adds hidden tests, among them
statistical tests that the output follows the target's distribution; the helpers below are
shared with them.
"""

from __future__ import annotations

import math

import numpy as np

V = 4
# Target and drafter bigram logits: row = previous token. They disagree on purpose.
TARGET = np.asarray(
    [[2.0, 0.5, -1.0, 0.0], [-0.5, 1.5, 0.5, -1.0], [0.0, -1.0, 2.0, 1.0], [1.0, 0.0, -0.5, 1.5]]
)
DRAFT = np.asarray(
    [[0.0, 1.5, 0.5, -1.0], [1.0, -0.5, 0.0, 1.0], [1.5, 0.5, -1.0, 0.0], [-1.0, 1.0, 1.5, 0.0]]
)


def bigram(table: np.ndarray, calls: list[int] | None = None):
    """A model: tokens (list of ids) -> logits (len, V), row t = table[tokens[t]]; each call
    appends the length to ``calls`` when given."""

    def model(tokens):
        if calls is not None:
            calls.append(len(tokens))
        return table[np.asarray(tokens, int)]

    return model


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def greedy(table: np.ndarray, prompt: list[int], n: int) -> list[int]:
    out = list(prompt)
    for _ in range(n):
        out.append(int(np.argmax(table[out[-1]])))
    return out[len(prompt) :]


def assert_frequencies(
    counts: np.ndarray, probs: np.ndarray, what: str, z_max: float = 5.0
) -> None:
    """Observed counts against the exact probabilities: every cell within z_max binomial
    standard deviations (a correct sampler fails this about once in a million runs)."""
    counts, probs = np.asarray(counts, float).ravel(), np.asarray(probs, float).ravel()
    n = counts.sum()
    sd = np.sqrt(n * probs * (1 - probs)) + 1e-12
    z = (counts - n * probs) / sd
    worst = int(np.argmax(np.abs(z)))
    assert np.abs(z).max() < z_max, (
        f"{what}: outcome {worst} seen {int(counts[worst])} times in {int(n)}, expected "
        f"{n * probs[worst]:.0f} (z = {z[worst]:.1f})"
    )


# ----------------------------------------------------------------------------- the tests
def test_verify_accepts_everything_when_the_drafter_is_the_target(impl) -> None:
    """A3-1: q = p: every draft is kept and one more token is added; k = 0 emits one token."""
    rng = np.random.default_rng(0)
    p = softmax(TARGET[[0, 1, 2]])
    for _ in range(20):
        drafted = [int(rng.choice(V, p=p[0])), int(rng.choice(V, p=p[1]))]
        out = [int(t) for t in impl.verify(p, p[:2], drafted, rng)]
        assert out[:2] == drafted and len(out) == 3, f"drafts {drafted} -> {out}"
    assert len(impl.verify(p[:1], np.zeros((0, V)), [], rng)) == 1


def test_verify_rejects_a_token_the_target_never_makes(impl) -> None:
    """A3-1: p(x) = 0 for the draft x: rejected, and the replacement is never x."""
    p = np.asarray([[0.5, 0.5, 0.0, 0.0], [0.25] * 4])
    q = np.asarray([[0.0, 0.0, 1.0, 0.0]])
    rng = np.random.default_rng(1)
    for _ in range(20):
        out = [int(t) for t in impl.verify(p, q, [2], rng)]
        assert len(out) == 1 and out[0] in (0, 1), out


def test_greedy_equals_the_targets_greedy(impl) -> None:
    """A3-2 at temperature 0: the target's greedy tokens exactly, max_new of them; with the
    target as its own drafter every round keeps k + 1 tokens."""
    for prompt, k in (([0, 3], 2), ([1], 3), ([2, 2, 1], 1)):
        new, stats = impl.speculative_generate(
            bigram(TARGET), bigram(DRAFT), prompt, 9, k, temperature=0
        )
        assert [int(t) for t in new] == greedy(TARGET, prompt, 9), (prompt, k, new)
        new, stats = impl.speculative_generate(
            bigram(TARGET), bigram(TARGET), prompt, 9, k, temperature=0
        )
        assert [int(t) for t in new] == greedy(TARGET, prompt, 9)
        assert stats["target_calls"] == math.ceil(9 / (k + 1)), (k, stats)


def test_expected_tokens_per_call_at_the_ends(impl) -> None:
    """A3-3: alpha = 0 gives one token per call; alpha = 1/2, k = 1 gives 1.5."""
    for alpha, k, want in ((0.0, 4, 1.0), (0.5, 1, 1.5)):
        got = impl.expected_tokens_per_call(alpha, k)
        assert abs(got - want) < 1e-9, f"alpha={alpha}, k={k}: {got}, expected {want}"
