"""The two architecture ablations of the report, at the book's scale: grouped-query against
multi-head attention (the report's table 8) and a deep against a wide model of about the same
size (table 9). Each trains both variants on the same data and budget and writes its numbers and
its figure; the chapters show them through a sealed record (see :mod:`gemma2_lite.book.runs`).

Part of :mod:`gemma2_lite.book`; ``python -m gemma2_lite.book.experiments gqa-vs-mha`` runs one.
"""

from __future__ import annotations

import os
import time
from functools import partial
from typing import Any

from gemma2_lite.config import Gemma2Config
from gemma2_lite.profile import get_profile, pick
from gemma2_lite.train import TrainConfig, train

from .runs import (
    REPORT,
    check_prefix,
    count_params,
    eval_curve,
    finish_run,
    printer,
    profile_data,
    replay_record,
    small_config,
)

__all__ = ["run_gqa_vs_mha", "run_deep_vs_wide"]


# ----------------------------------------------------------------------------- ablations
def _ablation(
    name: str,
    variants: dict[str, Gemma2Config],
    report_key: str,
    better: str,
    profile: str,
    results_dir: Any,
    seed: int,
    quiet: bool,
    live: bool,
    fingerprint: bool,
) -> dict[str, Any]:
    size = partial(pick, profile=profile)
    say = printer(quiet)
    train_ids, valid_ids = profile_data(profile)
    steps = size(loop=True, smoke=6, ci=150, colab=3000, full=20000)
    tc = TrainConfig(
        steps=steps,
        warmup=max(1, steps // 20),
        eval_every=max(1, steps // 6),
        batch_size=size(smoke=4, ci=8, colab=32, full=64),
        seq_len=size(smoke=32, ci=64, colab=256, full=512),
        lr=size(smoke=1e-2, ci=1e-2, colab=3e-3, full=2e-3),
        eval_batches=size(loop=True, smoke=2, ci=16, colab=64, full=None),
        seed=seed,
        progress=not quiet,
    )
    first = next(iter(variants.values()))
    check = lambda: check_prefix(first, tc, train_ids, valid_ids)
    replayed = None if live else replay_record(name, profile, seed, results_dir, check)
    if replayed is not None:
        return replayed
    t0 = time.perf_counter()
    curves, final, params = {}, {}, {}
    for label, cfg in variants.items():
        params[label] = count_params(cfg)
        say(f"[{name}] {label}: {cfg!r}")
        _, hist = train(cfg, tc, train_ids, valid_ids)
        curves[label] = eval_curve(hist, tc)
        final[label] = hist["eval"][-1]["val_perplexity"]
    winner = min(final, key=lambda x: final[x])
    payload = {
        "experiment": name,
        "profile": profile,
        "seed": seed,
        "train_config": tc.to_dict(),
        "configs": {k: c.to_dict() for k, c in variants.items()},
        "params": params,
        "final_val_perplexity": final,
        "report": REPORT[report_key],
        "report_better": better,
        "this_run_better": winner,
        "same_trend_as_report": winner == better,
        "note": _ablation_note(final, winner, better),
        "curves": curves,
        "seconds": time.perf_counter() - t0,
    }
    if fingerprint:
        payload["check"] = check()
    say(f"[{name}] final val perplexity {final}")
    return finish_run(payload, results_dir)


def _ablation_note(final: dict[str, float], winner: str, better: str) -> str:
    loser = next(k for k in final if k != winner)
    gap = final[loser] / final[winner] - 1
    verdict = "as in the report" if winner == better else f"unlike the report ({better} wins there)"
    caveat = (
        " - in this run; seed_report() compares the gap with the spread between seeds"
        if gap < 0.02
        else " - tiny models and few steps: a trend at this scale, not a "
        "reproduction of the report's ablation"
    )
    return f"{winner} wins here ({loser}'s perplexity is {gap:.1%} higher), {verdict}{caveat}"


def run_gqa_vs_mha(
    profile: str | None = None,
    *,
    results_dir: str | os.PathLike | None = None,
    seed: int = 0,
    quiet: bool = False,
    live: bool = False,
    fingerprint: bool = False,
) -> dict[str, Any]:
    """Multi-head (K = N) vs grouped-query attention (K = N/2) at equal parameter count: the
    key/value weights GQA saves go into a wider feed-forward block."""
    profile = profile or get_profile()
    size = partial(pick, profile=profile)
    d, layers = size(smoke=(32, 2), ci=(128, 4), colab=(256, 6), full=(512, 8))
    heads = 4
    mha = small_config(d, layers, heads=heads, kv_heads=heads)
    h = d // heads
    # GQA drops 2 * (N - K) * D * H weights per layer; 3 * D * dF of them come back in the FFN.
    extra_ffn = round(2 * (heads - heads // 2) * d * h / (3 * d))
    gqa = small_config(d, layers, heads=heads, kv_heads=heads // 2, ffn_dim=4 * d + extra_ffn)
    return _ablation(
        "gqa-vs-mha",
        {"MHA": mha, "GQA": gqa},
        "gqa_vs_mha_avg",
        "GQA",
        profile,
        results_dir,
        seed,
        quiet,
        live,
        fingerprint,
    )


def run_deep_vs_wide(
    profile: str | None = None,
    *,
    results_dir: str | os.PathLike | None = None,
    seed: int = 0,
    quiet: bool = False,
    live: bool = False,
    fingerprint: bool = False,
) -> dict[str, Any]:
    """A wide-shallow vs a narrow-deep model with the same non-embedding parameters
    (15 D^2 per layer with F = 4D, N = 4, K = 2: L D^2 is kept equal). The wide model's
    embedding table is larger (V x D), an advantage at this tiny scale where the embedding is a
    third of the parameters; at 2B it is a quarter."""
    profile = profile or get_profile()
    size = partial(pick, profile=profile)
    (dw, lw), (dd, ld) = size(
        smoke=((32, 1), (16, 4)),
        ci=((192, 2), (96, 8)),
        colab=((384, 2), (192, 8)),
        full=((768, 4), (384, 16)),
    )
    return _ablation(
        "deep-vs-wide",
        {"wide": small_config(dw, lw), "deep": small_config(dd, ld)},
        "deep_vs_wide_avg",
        "deep",
        profile,
        results_dir,
        seed,
        quiet,
        live,
        fingerprint,
    )
