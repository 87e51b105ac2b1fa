"""Plausible wrong answers to assignment 2, each as a small edit of the reference solution, with
the tests that must reject it. tests/test_assignments.py applies each one to the instructor's
notebook and checks that every listed test fails on an assertion, and that every hidden test
rejects at least one of them."""

from grading import Wrong

WRONG = [
    Wrong(
        "squared error",
        "A2-1",
        "least squares on log L (a Huber delta so large it never turns linear): one diverged "
        "run drags the whole fit",
        ("test_fit_survives_noise_and_a_diverged_run",),
        edits={"HUBER_DELTA = 1e-3": "HUBER_DELTA = 10.0"},
    ),
    Wrong(
        "no irreducible loss",
        "A2-1",
        "Kaplan's separate power laws added, without E: the loss falls to 0 with scale",
        ("test_fit_survives_noise_and_a_diverged_run",),
        edits={
            "terms = jnp.stack([a - alpha * log_n, b - beta * log_d,\n"
            "                           jnp.broadcast_to(e, log_n.shape)])": (
                "terms = jnp.stack([a - alpha * log_n, b - beta * log_d])"
            ),
            '"E": math.exp(e)': '"E": 0.0',
        },
    ),
    Wrong(
        "exponents swapped",
        "A2-2",
        "N_opt grows as C^(alpha / (alpha + beta)), the exponent D_opt should have",
        ("test_compute_optimal_minimises_the_loss",),
        edits={"6.0) ** (beta / (alpha + beta))": "6.0) ** (alpha / (alpha + beta))"},
    ),
    Wrong(
        "G upside down",
        "A2-2",
        "G = (beta B / (alpha A))^(1 / (alpha + beta)): the first-order condition solved for 1 / N",
        ("test_compute_optimal_minimises_the_loss",),
        edits={
            'g = (alpha * params["A"] / (beta * params["B"]))': (
                'g = (beta * params["B"] / (alpha * params["A"]))'
            )
        },
    ),
    Wrong(
        "C = N D",
        "A2-2",
        "drops the 6 of C = 6 N D (in N_opt; D_opt then spends the budget as C = 6ND)",
        ("test_compute_optimal_minimises_the_loss",),
        edits={"np.asarray(c, np.float64) / 6.0) ** (beta": "np.asarray(c, np.float64)) ** (beta"},
    ),
    Wrong(
        "no resampling",
        "A2-3",
        "refits the same runs every time: an interval of width zero",
        ("test_bootstrap_interval_covers_and_has_the_level",),
        edits={"pick_ = rng.integers(0, n.size, n.size)": "pick_ = np.arange(n.size)"},
    ),
    Wrong(
        "level read as the tail",
        "A2-3",
        "takes the percentiles level / 2 and 1 - level / 2: a 90% interval narrower than the "
        "50% one",
        ("test_bootstrap_interval_covers_and_has_the_level",),
        edits={"tail = 100 * (1 - level) / 2": "tail = 100 * level / 2"},
    ),
]
