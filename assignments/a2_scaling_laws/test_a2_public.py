"""Public tests of assignment 2 (a scaling law): run them on your notebook with

    pytest test_a2_public.py                     # grades a2_scaling_laws.ipynb next to it
    ASSIGNMENT_NOTEBOOK=mine.ipynb pytest test_a2_public.py

Each test receives ``impl``, what your notebook's imports cell and *Your answer* cells define.
Grading adds hidden tests of the same functions on harder data. The helpers below are shared
with them.
"""

from __future__ import annotations

import numpy as np

CHINCHILLA = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}
KEYS = ("E", "A", "alpha", "B", "beta")


def law(params: dict, n, d) -> np.ndarray:
    """L(N, D) = E + A / N^alpha + B / D^beta, in float64."""
    n, d = np.asarray(n, np.float64), np.asarray(d, np.float64)
    return params["E"] + params["A"] / n ** params["alpha"] + params["B"] / d ** params["beta"]


def grid(
    params: dict,
    n_range: tuple[float, float],
    d_range: tuple[float, float],
    noise: float = 0.0,
    seed: int = 0,
    shape: tuple[int, int] = (5, 4),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs on a log-spaced (N, D) grid, losses from ``params`` times exp(noise * normal)."""
    n = np.repeat(np.geomspace(*n_range, shape[0]), shape[1])
    d = np.tile(np.geomspace(*d_range, shape[1]), shape[0])
    loss = law(params, n, d) * np.exp(noise * np.random.default_rng(seed).normal(size=n.size))
    return n, d, loss


def check_params(params) -> None:
    assert isinstance(params, dict) and set(params) >= set(KEYS), (
        f"fit_law must return a dict with keys {KEYS}, got {params!r}"
    )
    assert all(np.isfinite(float(params[k])) for k in KEYS), f"not finite: {params}"


def relative_error(params: dict, want: dict, n, d) -> float:
    return float(np.max(np.abs(law(params, n, d) / law(want, n, d) - 1)))


# ----------------------------------------------------------------------------- the tests
def test_fit_recovers_a_noiseless_law(impl) -> None:
    """A2-1: exact data from Chinchilla's law: the fit reproduces it, in and 10x beyond the
    grid in N."""
    n, d, loss = grid(CHINCHILLA, (1e6, 1e8), (1e8, 1e10))
    params = impl.fit_law(n, d, loss)
    check_params(params)
    assert relative_error(params, CHINCHILLA, n, d) < 0.002, f"fit {params}"
    far = relative_error(params, CHINCHILLA, 1e9, 2e10)
    assert far < 0.02, f"at N = 1e9, D = 2e10 the fit is off by {far:.1%}: {params}"


def test_compute_optimal_spends_the_budget(impl) -> None:
    """A2-2: 6 N D = C, and a larger budget buys a larger model and more tokens."""
    budgets = np.asarray([1e18, 1e20, 1e22])
    n, d = (np.asarray(x, np.float64) for x in impl.compute_optimal(CHINCHILLA, budgets))
    assert n.shape == d.shape == budgets.shape, f"shapes {n.shape}, {d.shape}"
    np.testing.assert_allclose(6 * n * d, budgets, rtol=1e-6)
    assert np.all(np.diff(n) > 0) and np.all(np.diff(d) > 0)


def test_bootstrap_interval_is_ordered(impl) -> None:
    """A2-3: (lo, mid, hi) finite and ordered."""
    n, d, loss = grid(CHINCHILLA, (1e6, 1e8), (1e8, 1e10), noise=0.01)
    lo, mid, hi = (
        float(x) for x in impl.bootstrap_interval(n, d, loss, 1e9, 2e10, reps=4, level=0.8, seed=0)
    )
    assert np.isfinite([lo, mid, hi]).all() and lo <= mid <= hi, (lo, mid, hi)
