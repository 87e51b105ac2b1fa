"""Plausible wrong answers to assignment 3, each as a small edit of the reference solution, with
the tests that must reject it. tests/test_assignments.py applies each one to the instructor's
notebook and checks that every listed test fails on an assertion, and that every hidden test
rejects at least one of them."""

from grading import Wrong

WRONG = [
    Wrong(
        "resample from p",
        "A3-1",
        "on rejection draws from p instead of the residual max(0, p - q): tokens q "
        "over-proposes come out too often",
        ("test_verify_keeps_the_targets_distribution",),
        edits={"residual = np.maximum(p[i] - q[i], 0.0)": "residual = p[i].copy()"},
    ),
    Wrong(
        "ratio upside down",
        "A3-1",
        "accepts with probability min(1, q / p)",
        ("test_verify_keeps_the_targets_distribution",),
        edits={"min(1.0, p[i, x] / q[i, x])": "min(1.0, q[i, x] / p[i, x])"},
    ),
    Wrong(
        "greedy acceptance",
        "A3-1",
        "keeps a draft only when it is the target's arg-max (right at temperature 0 only)",
        ("test_verify_keeps_the_targets_distribution",),
        edits={"if rng.random() < min(1.0, p[i, x] / q[i, x]):": "if x == int(np.argmax(p[i])):"},
    ),
    Wrong(
        "no free token",
        "A3-1",
        "when every draft is kept, returns the drafts alone (p[k] is scored and thrown away)",
        (
            "test_verify_accepts_everything_when_the_drafter_is_the_target",
            "test_verify_keeps_the_targets_distribution",
        ),
        edits={
            "    out.append(int(rng.choice(p.shape[1], p=p[-1])))   "
            "# all kept: one more, free\n": ""
        },
    ),
    Wrong(
        "rows off by one",
        "A3-2",
        "scores draft i with the target's row for the position before it (row t predicts "
        "token t + 1, not token t)",
        ("test_generate_samples_the_target_exactly",),
        edits={
            "target(tokens + drafted)[len(tokens) - 1:]": (
                "target(tokens + drafted)[len(tokens) - 2:]"
            )
        },
    ),
    Wrong(
        "greedy drafts",
        "A3-2",
        "drafts the drafter's arg-max but hands verify its softmax as q: the proposal is "
        "not the distribution verify corrects for",
        ("test_generate_samples_the_target_exactly",),
        edits={
            "drafted.append(int(rng.choice(row.size, p=row)))": "drafted.append(int(row.argmax()))"
        },
    ),
    Wrong(
        "the free token counted as accepted",
        "A3-2",
        "stats['accepted'] counts every token emitted, not the drafts kept",
        ("test_stats_follow_the_acceptance_theory",),
        edits={'stats["accepted"] += len(new) - 1': 'stats["accepted"] += len(new)'},
    ),
    Wrong(
        "unjudged drafts count as rejected",
        "A3-2",
        "counts every draft not kept as rejected, also those after the first rejection, "
        "which were never judged: the acceptance rate comes out too low",
        ("test_stats_follow_the_acceptance_theory",),
        edits={
            'stats["rejected"] += len(new) - 1 < todo ': (
                'stats["rejected"] += todo - (len(new) - 1) '
            )
        },
    ),
    Wrong(
        "a target call per draft",
        "A3-2",
        "scores each draft with its own target call (k + 1 calls a round): exact, but no saving",
        ("test_stats_follow_the_acceptance_theory",),
        edits={
            '        stats["target_calls"] += 1\n': '        stats["target_calls"] += 1 + todo\n'
            "        for j in range(todo):\n"
            "            target(tokens + drafted[:j + 1])\n"
        },
    ),
    Wrong(
        "off by one in the sum",
        "A3-3",
        "(1 - alpha^k) / (1 - alpha): forgets the token the round always emits",
        ("test_expected_tokens_per_call_values",),
        edits={
            "return (1 - alpha ** (k + 1)) / (1 - alpha)": "return (1 - alpha ** k) / (1 - alpha)",
            "return float(k + 1)": "return float(k)",
        },
    ),
]
