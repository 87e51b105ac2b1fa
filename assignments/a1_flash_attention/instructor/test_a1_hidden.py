"""Hidden tests of assignment 1 (instructors only; never in the student copy).

    pytest assignments/a1_flash_attention                  # public + hidden, reference solution
    ASSIGNMENT_NOTEBOOK=student.ipynb pytest assignments/a1_flash_attention

The same functions on the inputs a plain case misses: left padding (queries that see no key),
a sliding window, the soft-cap, grouped heads, S not a multiple of the block; and the memory of
the compiled gradient. ``wrong_answers.py`` lists the wrong answers each one rejects
(tests/test_assignments.py checks that it does).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_a1_public import (
    assert_close,
    attention_vjp,
    case,  # noqa: E402
    reference,
    reference_temp_bytes,
    temp_bytes,
)

from gemma2_lite.attention import gqa_attention  # noqa: E402

CAP = 5.0  # small enough that the cap bends the logits (|z| reaches ~10 here)
# seed, B, T = S = 21 (2 blocks of 8 + 5), N, K, H, 4 padding tokens, window 6
HARD = (3, 2, 21, 4, 2, 8, 4, 6)
BLOCK = 8


def test_forward_on_the_hard_case(impl) -> None:
    """A1-1: padding rows, window, cap, G = 2, a short last block; lse where a key is seen."""
    q, k, v, mask = case(*HARD)
    out, lse = jax.jit(impl.flash_forward, static_argnums=(4, 5))(q, k, v, mask, CAP, BLOCK)
    want = reference(HARD, CAP, 4)
    assert_close(out, want["out"], "out")
    seen = np.asarray(mask.any(-1))
    assert_close(np.asarray(lse)[seen], np.asarray(want["lse"])[seen], "lse")


def test_gradients_on_the_hard_case(impl) -> None:
    """A1-2 and A1-3: jax.vjp through flash_attention on the hard case."""
    q, k, v, mask = case(*HARD)
    want = reference(HARD, CAP, 4)
    _, got = attention_vjp(
        lambda q, k, v: impl.flash_attention(q, k, v, mask, CAP, BLOCK), q, k, v, want["dout"]
    )
    for name, g, w in zip(("dq", "dk", "dv"), got, want["grads"]):
        assert_close(g, w, name, rtol=1e-4)


def test_training_memory_is_cut(impl) -> None:
    """A1-3: the graders' measurement at T = 512: at most 0.4 of gqa_attention's temporary
    bytes (the reference solution needs ~0.2; a wrapper or autodiff through the scan ~1)."""
    shape = (1, 512, 4, 2, 16)
    ours = temp_bytes(lambda q, k, v, m: impl.flash_attention(q, k, v, m, 50.0, 64), *shape)
    ref = reference_temp_bytes(*shape, 50.0)
    assert ours <= 0.4 * ref, f"gradient temporaries {ours:,} bytes, gqa_attention's {ref:,}"


def test_grad_temp_bytes_measures_the_gradient(impl) -> None:
    """A1-4: your measurement of gqa_attention agrees with the graders' within 10%."""
    shape = (1, 128, 4, 2, 16)
    got = impl.grad_temp_bytes(
        lambda q, k, v, m: gqa_attention(q, k, v, m, softcap=50.0)[0], *shape
    )
    want = reference_temp_bytes(*shape, 50.0)
    assert abs(got - want) <= 0.1 * want, f"grad_temp_bytes gave {got:,}, expected ~{want:,}"
