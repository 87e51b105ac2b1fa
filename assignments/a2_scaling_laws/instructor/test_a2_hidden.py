"""Hidden tests of assignment 2 (instructors only; never in the student copy).

    pytest assignments/a2_scaling_laws                  # public + hidden, reference solution
    ASSIGNMENT_NOTEBOOK=student.ipynb pytest assignments/a2_scaling_laws

Harder data for the same functions: noise and one diverged run (what the Huber loss is for), at
Chinchilla's scale and the book's; the compute-optimal point against a brute-force search; the
bootstrap's median, width and level. Every data set has 20 runs (a 5 x 4 grid), so a fit
compiled for one shape serves them all. ``wrong_answers.py`` lists the wrong answers each one
rejects (tests/test_assignments.py checks that it does).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_a2_public import CHINCHILLA, check_params, grid, law, relative_error  # noqa: E402

# A law of the book's scale: small N (non-embedding), few tokens, loss of a few nats.
BOOK = {"E": 3.2, "A": 60.0, "alpha": 0.3, "B": 900.0, "beta": 0.45}


def test_fit_survives_noise_and_a_diverged_run(impl) -> None:
    """A2-1: 0.5% noise and one run whose loss came out 40% too high, at Chinchilla's scale
    and at the book's: predictions 10x beyond the grid in N within 3% (a squared-error fit
    misses by ~12%, a law without E by as much)."""
    for params, n_range, d_range, far in (
        (CHINCHILLA, (1e6, 1e8), (1e8, 1e10), ([1e9, 1e9], [1e9, 2e10])),
        (BOOK, (3e4, 5e5), (2e3, 1e5), ([5e6, 5e6], [1e5, 4e5])),
    ):
        n, d, loss = grid(params, n_range, d_range, noise=0.005, seed=1)
        loss[3] *= 1.4
        fitted = impl.fit_law(n, d, loss)
        check_params(fitted)
        err = relative_error(fitted, params, *far)
        assert err < 0.03, f"10x beyond the grid the fit is off by {err:.1%}: {fitted}"


def test_compute_optimal_minimises_the_loss(impl) -> None:
    """A2-2: for two laws and three budgets, N_opt within 1% of a brute-force search along
    6 N D = C."""
    other = {"E": 2.0, "A": 50.0, "alpha": 0.5, "B": 2000.0, "beta": 0.25}
    for params in (CHINCHILLA, other):
        for c in (1e18, 1e21, 1e24):
            n_grid = np.geomspace(1e3, 1e15, 200_001)
            best = n_grid[np.argmin(law(params, n_grid, c / (6 * n_grid)))]
            n_opt, d_opt = (
                float(np.asarray(x).reshape(-1)[0])
                for x in impl.compute_optimal(params, np.asarray([c]))
            )
            assert abs(n_opt / best - 1) < 0.01, f"C = {c:.0e}: N_opt {n_opt:.4g}, best {best:.4g}"
            assert abs(6 * n_opt * d_opt / c - 1) < 1e-6


def test_bootstrap_interval_covers_and_has_the_level(impl) -> None:
    """A2-3: 2% noise: the 90% interval has width and its median is within 3% of the true
    value; the 50% interval from the same resamples lies inside it. (Whether one interval covers
    the truth is itself random, so it is not asserted.)"""
    n, d, loss = grid(CHINCHILLA, (1e6, 1e8), (1e8, 1e10), noise=0.02, seed=3)
    truth = float(law(CHINCHILLA, 3e8, 1e10))
    wide = [
        float(x) for x in impl.bootstrap_interval(n, d, loss, 3e8, 1e10, reps=10, level=0.9, seed=5)
    ]
    narrow = [
        float(x) for x in impl.bootstrap_interval(n, d, loss, 3e8, 1e10, reps=10, level=0.5, seed=5)
    ]
    assert abs(wide[1] / truth - 1) < 0.03, f"median {wide[1]:.4f}, true value {truth:.4f}"
    assert wide[2] - wide[0] > 1e-3 * truth, f"the interval {wide} has no width"
    assert wide[0] <= narrow[0] <= narrow[2] <= wide[2], (
        f"the 50% interval {narrow} is not inside the 90% one {wide}"
    )
    assert narrow[2] - narrow[0] < wide[2] - wide[0], (narrow, wide)
