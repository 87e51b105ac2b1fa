"""The book's training experiments, each one command that writes its numbers and its figure.

    python -m gemma2_lite.book.experiments distillation --profile ci
    python -m gemma2_lite.book.experiments window       --profile colab
    python -m gemma2_lite.book.experiments gqa-vs-mha
    python -m gemma2_lite.book.experiments deep-vs-wide
    python -m gemma2_lite.book.experiments train-tiny   --profile ci     # -> assets/tiny-model/

Each writes ``results/NAME/results.json`` (configs, seed, numbers, the report's numbers beside
them), ``results/NAME/curves.csv`` (validation curves) and ``results/NAME/NAME.png``.
Profiles size the runs: ``ci`` ~1-2 minutes on 2 CPU cores, ``colab`` one accelerator for
tens of minutes (the trends become visible), ``full`` larger still. ``smoke`` (not advertised)
runs each experiment in seconds for the tests. Every model trains on the Shakespeare corpus
tokenized with the book's tokenizer (``data/``).

The report's numbers (Gemma Team, 2024, "Gemma 2: Improving Open Language Models at a
Practical Size") are quoted in :data:`REPORT`; these tiny runs do not claim to reproduce them,
and each result says whether the tiny scale shows the same trend.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from gemma2_lite.cmdline import Parser, non_negative_int, run, utf8_argument
from gemma2_lite.config import Gemma2Config, get_config
from gemma2_lite.model import Gemma2, abstract_model, param_counts
from gemma2_lite.paths import data_path, repo_root
from gemma2_lite.profile import PROFILES, get_profile, pick
from gemma2_lite.train import TrainConfig, evaluate, train

from .experiment_outputs import (
    ablation_figure,
    distillation_figure,
    loss_figure,
    tiny_readme,
    window_figure,
    write_results,
)
from .seed_records import (
    SEED_RECORDS,
    final_numbers,
    record_file,
    replay_line,
    replay_payload,
    seed_record,
    seed_report,
    seed_summary,
    spread,
    write_record,
)

__all__ = [
    "REPORT",
    "EXPERIMENTS",
    "corpus_tokens",
    "run_distillation",
    "run_window",
    "run_gqa_vs_mha",
    "run_deep_vs_wide",
    "run_train_tiny",
    "main",
    "PROFILES",
    "small_config",
    "run_seeds",
    "seed_summary",
    "seed_report",
    "final_numbers",
    "ABLATIONS",
    "replay_line",
]


# Numbers quoted from the Gemma 2 report (arXiv 2408.00118).
REPORT: dict[str, Any] = {
    "distillation_2b_avg_benchmark": {"from_scratch": 60.3, "distilled": 67.7},
    "distillation_perplexity": {
        "sizes": ["200M", "400M", "1B"],
        "from_scratch": [23, 19, 17],
        "distilled": [21, 17, 15],
    },
    "window_9b_perplexity": {"windows": [4096, 2048, 1024], "perplexity": [1.63, 1.63, 1.64]},
    "gqa_vs_mha_avg": {"MHA": 50.3, "GQA": 50.8},
    "deep_vs_wide_avg": {"wide": 50.8, "deep": 52.0},
}


# ----------------------------------------------------------------------------- data
def corpus_tokens(split: str = "train", max_chars: int | None = None) -> np.ndarray:
    """The corpus split as one int32 token stream: ``<bos> document <eos>`` per play/poem.

    Tokenized with ``gemma2_lite/assets/tokenizer.model``; the full splits are cached under
    ``results/.cache/`` keyed by the tokenizer's and corpus' hashes (tokenizing the 4.8 MB
    train split takes ~10 s). ``max_chars`` keeps only the first characters of each document
    (for quick runs; not cached).
    """
    from gemma2_lite.data import corpus_path, load_documents
    from gemma2_lite.tokenizer import Tokenizer

    tok_file = Path(data_path("tokenizer.model"))
    key = hashlib.sha256(tok_file.read_bytes() + Path(corpus_path()).read_bytes()).hexdigest()[:16]
    cache = Path(repo_root()) / "results" / ".cache" / f"tokens-{split}-{key}.npy"
    if max_chars is None and cache.exists():
        return np.load(cache)
    tok = Tokenizer(tok_file)
    ids: list[int] = []
    for doc in load_documents(split):  # type: ignore[arg-type]
        text = doc["text"] if max_chars is None else doc["text"][:max_chars]
        ids.extend(tok.encode(text, add_bos=True, add_eos=True))
    out = np.asarray(ids, np.int32)
    if max_chars is None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")  # two processes may race here
        np.save(tmp, out)
        os.replace(tmp, cache)
    return out


def _data(profile: str) -> tuple[np.ndarray, np.ndarray]:
    size = partial(pick, profile=profile)
    chars = size(smoke=6_000, ci=None, colab=None, full=None)
    return corpus_tokens("train", chars), corpus_tokens("valid", None if chars is None else 2_000)


# ----------------------------------------------------------------------------- helpers
def small_config(
    d_model: int,
    layers: int,
    *,
    heads: int = 4,
    kv_heads: int = 2,
    ffn_dim: int | None = None,
    window: int = 64,
) -> Gemma2Config:
    """A book-vocabulary Gemma 2 of width D (H = D / N, F = 4 D unless given)."""
    head_dim = d_model // heads
    return get_config(
        "tiny",
        d_model=d_model,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        ffn_dim=ffn_dim or 4 * d_model,
        sliding_window=window,
        name=f"D{d_model}-L{layers}",
    )


def _results_dir(name: str, results_dir: str | os.PathLike | None) -> Path:
    base = Path(results_dir) if results_dir is not None else Path(repo_root()) / "results"
    out = base / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def _curve(history: dict[str, list[dict[str, Any]]], tc: TrainConfig) -> list[dict[str, Any]]:
    return [
        {
            "step": e["step"],
            "tokens": e["step"] * tc.tokens_per_step,
            "val_loss": e["val_loss"],
            "val_perplexity": e["val_perplexity"],
        }
        for e in history["eval"]
    ]


def _nparams(cfg: Gemma2Config) -> dict[str, int]:
    c = param_counts(cfg)
    return {**c, "total": c["embedding"] + c["non_embedding"]}


def _say(quiet: bool) -> Callable[[str], None]:
    return (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))


# ----------------------------------------------------------------------------- distillation
def run_distillation(
    profile: str | None = None,
    *,
    results_dir: str | os.PathLike | None = None,
    seed: int = 0,
    quiet: bool = False,
    topk: int | None = None,
    temperature: float = 1.0,
) -> dict[str, Any]:
    """A larger teacher is trained first; then one small student per objective, each on the
    same tokens in the same order: one-hot labels, the teacher's full distribution, and its
    top-k logits renormalised. Compares validation perplexity curves."""
    profile = profile or get_profile()
    size = partial(pick, profile=profile)
    say = _say(quiet)
    train_ids, valid_ids = _data(profile)
    teacher_cfg = size(
        smoke=small_config(32, 2),
        ci=small_config(128, 4),
        colab=small_config(256, 6),
        full=small_config(512, 8),
    )
    student_cfg = size(
        smoke=small_config(32, 1),
        ci=small_config(64, 2),
        colab=small_config(128, 4),
        full=small_config(256, 6),
    )
    base = TrainConfig(
        steps=1,
        seed=seed,
        progress=not quiet,
        lr=size(smoke=1e-2, ci=1e-2, colab=3e-3, full=2e-3),
        batch_size=size(smoke=4, ci=8, colab=32, full=64),
        seq_len=size(smoke=32, ci=64, colab=256, full=512),
        eval_batches=size(loop=True, smoke=2, ci=16, colab=64, full=None),
    )
    t_steps = size(loop=True, smoke=8, ci=300, colab=4000, full=20000)
    s_steps = size(loop=True, smoke=6, ci=200, colab=3000, full=15000)
    k = topk or size(smoke=8, ci=16, colab=64, full=128)
    tc_teacher = base.replace(
        steps=t_steps, warmup=max(1, t_steps // 20), eval_every=max(1, t_steps // 5)
    )
    tc_student = base.replace(
        steps=s_steps,
        warmup=max(1, s_steps // 20),
        eval_every=max(1, s_steps // 8),
        distill_temperature=temperature,
    )
    t0 = time.perf_counter()
    say(f"[distillation] teacher {teacher_cfg.name} for {t_steps} steps")
    teacher, t_hist = train(teacher_cfg, tc_teacher, train_ids, valid_ids)
    objectives = {
        "one-hot": (None, tc_student),
        "teacher (full)": (teacher, tc_student),
        f"teacher (top-{k})": (teacher, tc_student.replace(distill_topk=k)),
        # the renormalised top-k loss ignores the other V - k ids; labels pin them down
        f"teacher (top-{k}) + labels": (
            teacher,
            tc_student.replace(distill_topk=k, distill_alpha=0.5),
        ),
    }
    curves = {"teacher": _curve(t_hist, tc_teacher)}
    final: dict[str, float] = {"teacher": t_hist["eval"][-1]["val_perplexity"]}
    for label, (tchr, tc) in objectives.items():
        say(f"[distillation] student {student_cfg.name}, objective {label}, {s_steps} steps")
        _, hist = train(student_cfg, tc, train_ids, valid_ids, teacher=tchr)
        curves[label] = _curve(hist, tc)
        final[label] = hist["eval"][-1]["val_perplexity"]
    best = min((x for x in objectives if x != "one-hot"), key=lambda x: final[x])
    improved = final[best] < final["one-hot"]
    payload = {
        "experiment": "distillation",
        "profile": profile,
        "seed": seed,
        "topk": k,
        "temperature": temperature,
        "teacher_config": teacher_cfg.to_dict(),
        "student_config": student_cfg.to_dict(),
        "teacher_params": _nparams(teacher_cfg),
        "student_params": _nparams(student_cfg),
        "teacher_train_config": tc_teacher.to_dict(),
        "student_train_config": tc_student.to_dict(),
        "student_tokens": s_steps * tc_student.tokens_per_step,
        "final_val_perplexity": final,
        "report": {
            k2: REPORT[k2] for k2 in ("distillation_2b_avg_benchmark", "distillation_perplexity")
        },
        "same_trend_as_report": bool(improved),
        "note": (
            "distilled student beats the one-hot student, as in the report"
            if improved
            else "at this tiny scale distillation did NOT beat one-hot "
            "training; the report's gain needs a much stronger teacher and longer runs"
        ),
        "seconds": time.perf_counter() - t0,
    }
    out = _results_dir("distillation", results_dir)
    payload["figure"] = str(out / "distillation.png")
    write_results(out, payload, curves)
    distillation_figure(payload, curves)
    say(
        "[distillation] final val perplexity: "
        + ", ".join(f"{k2} {v:.2f}" for k2, v in final.items())
        + f" -> {out}"
    )
    return payload


# ----------------------------------------------------------------------------- window
def _with_window(model: Gemma2, window: int | None) -> Gemma2:
    """The same weights with the local layers' sliding window changed (for evaluation)."""
    cfg = model.config.replace(sliding_window=window)
    graph = nnx.graphdef(abstract_model(cfg))
    return nnx.merge(graph, nnx.state(model))


def run_window(
    profile: str | None = None,
    *,
    results_dir: str | os.PathLike | None = None,
    seed: int = 0,
    quiet: bool = False,
    live: bool = False,
    fingerprint: bool = False,
) -> dict[str, Any]:
    """Train one model with sliding window W, then evaluate it with W, W/2 and W/4.

    With a seed record for this profile (and ``live`` false), seed 0 is replayed from it after
    its first steps are re-run and checked (see :func:`_replay`). ``fingerprint`` adds those
    first steps' losses to the result (``check``), for a record (:func:`run_seeds`)."""
    profile = profile or get_profile()
    size = partial(pick, profile=profile)
    say = _say(quiet)
    train_ids, valid_ids = _data(profile)
    window = size(smoke=8, ci=64, colab=128, full=512)
    cfg = size(
        smoke=small_config(32, 2, window=window),
        ci=small_config(128, 4, window=window),
        colab=small_config(256, 6, window=window),
        full=small_config(512, 8, window=window),
    )
    seq = size(smoke=32, ci=256, colab=512, full=2048)
    tc = TrainConfig(
        steps=size(loop=True, smoke=6, ci=150, colab=3000, full=20000),
        batch_size=size(smoke=2, ci=4, colab=16, full=32),
        seq_len=seq,
        lr=size(smoke=1e-2, ci=1e-2, colab=3e-3, full=2e-3),
        warmup=size(loop=True, smoke=1, ci=10, colab=150, full=1000),
        seed=seed,
        progress=not quiet,
    )
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, seq))
    windows = [window, window // 2, window // 4]
    check = lambda: _check_prefix(cfg, tc, train_ids, valid_ids, windows)
    replayed = None if live else _replay("window", profile, seed, results_dir, check)
    if replayed is not None:
        return replayed
    t0 = time.perf_counter()
    say(f"[window] training {cfg.name} with W={window}, T={seq}")
    model, _ = train(cfg, tc, train_ids)
    eval_batches = size(loop=True, smoke=2, ci=12, colab=64, full=None)
    rows = []
    for w in windows:
        r = evaluate(
            _with_window(model, w),
            valid_ids,
            batch_size=tc.batch_size,
            seq_len=seq,
            max_batches=eval_batches,
        )
        rows.append(
            {
                "window": w,
                "val_loss": r["loss"],
                "val_perplexity": r["perplexity"],
                "tokens": r["tokens"],
            }
        )
        say(f"[window] W={w}: perplexity {r['perplexity']:.3f}")
    ppl = [r["val_perplexity"] for r in rows]
    rel = [p / ppl[0] - 1 for p in ppl]
    payload = {
        "experiment": "window",
        "profile": profile,
        "seed": seed,
        "model_config": cfg.to_dict(),
        "train_config": tc.to_dict(),
        "results": rows,
        "relative_change": rel,
        "report": REPORT["window_9b_perplexity"],
        "note": (
            "the report's 9B loses 0.6% perplexity from W to W/4; here: "
            f"{rel[-1]:+.1%}"
            + (
                " (a much larger loss: with W only "
                f"{window} tokens, a quarter window removes most of the context)"
                if rel[-1] > 0.05
                else ""
            )
        ),
        "seconds": time.perf_counter() - t0,
    }
    if fingerprint:
        payload["check"] = check()
    return _finish(payload, results_dir)


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
    say = _say(quiet)
    train_ids, valid_ids = _data(profile)
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
    check = lambda: _check_prefix(first, tc, train_ids, valid_ids)
    replayed = None if live else _replay(name, profile, seed, results_dir, check)
    if replayed is not None:
        return replayed
    t0 = time.perf_counter()
    curves, final, params = {}, {}, {}
    for label, cfg in variants.items():
        params[label] = _nparams(cfg)
        say(f"[{name}] {label}: {cfg!r}")
        _, hist = train(cfg, tc, train_ids, valid_ids)
        curves[label] = _curve(hist, tc)
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
    return _finish(payload, results_dir)


# The first steps of a recorded run, re-run before the record is replayed: enough to catch a
# change to the model, the initialisation, the data order, the optimizer or the evaluation.
CHECK_STEPS = 8
CHECK_BATCHES = 2


def _check_prefix(
    cfg: Gemma2Config,
    tc: TrainConfig,
    train_ids: np.ndarray,
    valid_ids: np.ndarray,
    windows: list[int] | None = None,
) -> dict[str, Any]:
    """A run's fingerprint: its first CHECK_STEPS training losses (the same run, stopped early:
    the schedule still spans ``tc.steps``) and the validation loss of those weights on
    CHECK_BATCHES batches (with each of ``windows``, for the window experiment)."""
    model, hist = train(
        cfg, tc.replace(progress=False), train_ids, stop_at=min(CHECK_STEPS, tc.steps)
    )
    val = [
        evaluate(
            model if w is None else _with_window(model, w),
            valid_ids,
            batch_size=tc.batch_size,
            seq_len=tc.seq_len,
            max_batches=CHECK_BATCHES,
        )["loss"]
        for w in ([*windows] if windows else [None])
    ]
    return {
        "steps": len(hist["train"]),
        "train_loss": [r["loss"] for r in hist["train"]],
        "val_loss": val,
    }


def _replay(
    name: str, profile: str, seed: int, results_dir: Any, check: Callable[[], dict[str, Any]]
) -> dict[str, Any] | None:
    """The recorded run of ``seed`` (``data/ablations/<name>-<profile>.json``), after its first
    steps are re-run here and found equal to the record's; None when there is nothing to
    replay (no record for this profile, another seed, or capped loops), so the caller trains.

    The chapters show the ablations at the ``ci`` profile this way: the record was made by the
    command it names (every number in it is from that run, and its sha256 binds them), and the
    check re-runs the part that any change to the code or data would move. A mismatch raises:
    rerun the command."""
    record = seed_record(name, profile)
    if record is None:
        return None
    label = f"data/{SEED_RECORDS}/{record_file(name, profile)}"
    payload = replay_payload(record, label, seed, check)
    return None if payload is None else _finish(payload, results_dir)


def _finish(payload: dict[str, Any], results_dir: Any) -> dict[str, Any]:
    """Write ``results/<name>/`` (results.json, curves.csv, the figure); return the payload."""
    name = payload["experiment"]
    out = _results_dir(name, results_dir)
    payload["figure"] = str(out / f"{name}.png")
    write_results(out, payload, payload.get("curves"))
    (window_figure if name == "window" else ablation_figure)(payload, Path(payload["figure"]))
    return payload


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


# ----------------------------------------------------------------------------- train-tiny
def run_train_tiny(
    profile: str | None = None,
    *,
    results_dir: str | os.PathLike | None = None,
    seed: int = 0,
    quiet: bool = False,
    out: str | os.PathLike | None = None,
    steps: int | None = None,
) -> dict[str, Any]:
    """Train the book's ``tiny`` preset on the corpus and save it in Hugging Face layout to
    ``gemma2_lite/assets/tiny-model/`` (or ``out``), with a README recording how it was made.
    ``steps`` overrides the profile's step count (0 trains nothing: the initial model is saved)."""
    from gemma2_lite.checkpoint import save_hf
    from gemma2_lite.sampler import generate
    from gemma2_lite.tokenizer import Tokenizer

    profile = profile or get_profile()
    size = partial(pick, profile=profile)
    say = _say(quiet)
    train_ids, valid_ids = _data(profile)
    cfg = get_config("tiny") if profile != "smoke" else small_config(32, 2)
    command_steps = steps
    if steps is None:  # 0 is a number of steps, not "the default"
        steps = size(loop=True, smoke=6, ci=600, colab=6000, full=20000)
    tc = TrainConfig(
        steps=steps,
        batch_size=size(smoke=4, ci=16, colab=32, full=64),
        seq_len=size(smoke=32, ci=128, colab=256, full=512),
        lr=size(smoke=1e-2, ci=5e-3, colab=3e-3, full=2e-3),
        seed=seed,
        progress=not quiet,
    )
    tc = tc.replace(
        warmup=max(1, tc.steps // 20),
        eval_every=max(1, tc.steps // 6),
        eval_batches=size(loop=True, smoke=2, ci=None, colab=None, full=None),
    )
    t0 = time.perf_counter()
    say(f"[train-tiny] {cfg!r}: {tc.steps} steps of {tc.tokens_per_step} tokens")
    run_dir = _results_dir("train-tiny", results_dir)
    # Checkpoints per (profile, steps, seed): an interrupted command resumes where it stopped.
    ckpt = run_dir / f"run-{profile}-{tc.steps}-seed{seed}"
    model, hist = train(cfg, tc, train_ids, valid_ids, out_dir=ckpt, log=say)
    seconds = time.perf_counter() - t0
    final = hist["eval"][-1]
    target = Path(out) if out is not None else Path(data_path("tiny-model"))
    save_hf(model, target)
    folder_bytes = sum(p.stat().st_size for p in target.iterdir() if p.is_file())
    tok = Tokenizer(data_path("tokenizer.model"))
    prompt = tok.encode("ROMEO:\n", add_bos=True)
    sample_len = size(smoke=24, ci=128, colab=128, full=128)
    new = generate(
        model, [prompt], max_new_tokens=sample_len - len(prompt), temperature=0.7, seed=seed
    )[0]
    sample = tok.decode(prompt + new)
    command = f"python -m gemma2_lite.book.experiments train-tiny --profile {profile}"
    if command_steps is not None:
        command += f" --steps {command_steps}"
    epochs = tc.steps * tc.tokens_per_step / train_ids.size
    payload = {
        "experiment": "train-tiny",
        "profile": profile,
        "seed": seed,
        "command": command,
        "model_config": cfg.to_dict(),
        "train_config": tc.to_dict(),
        "params": _nparams(cfg),
        "train_tokens_in_corpus": int(train_ids.size),
        "tokens_trained": tc.steps * tc.tokens_per_step,
        "epochs": epochs,
        "final_val_loss": final["val_loss"],
        "final_val_perplexity": final["val_perplexity"],
        "val_tokens": final["val_tokens"],
        "seconds": seconds,
        "jax": jax.__version__,
        "devices": str(jax.devices()),
        "saved_to": str(target),
        "folder_bytes": folder_bytes,
        "sample": sample,
        "figure": str(run_dir / "train-tiny.png"),
    }
    write_results(run_dir, payload, {"tiny": _curve(hist, tc)})
    (target / "README.md").write_text(tiny_readme(payload))
    loss_figure(hist, payload["figure"])
    say(
        f"[train-tiny] val loss {final['val_loss']:.3f} (ppl {final['val_perplexity']:.1f}), "
        f"{seconds:.0f} s, saved {folder_bytes / 1e6:.1f} MB to {target}\n{sample}"
    )
    return payload


# ----------------------------------------------------------------------------- CLI
EXPERIMENTS: dict[str, Callable[..., dict[str, Any]]] = {
    "distillation": run_distillation,
    "window": run_window,
    "gqa-vs-mha": run_gqa_vs_mha,
    "deep-vs-wide": run_deep_vs_wide,
    "train-tiny": run_train_tiny,
}


# ----------------------------------------------------------------------------- seeds
ABLATIONS = ("distillation", "window", "gqa-vs-mha", "deep-vs-wide")


def run_seeds(
    name: str,
    seeds: tuple[int, ...] = (0, 1, 2),
    profile: str | None = None,
    *,
    out: str | os.PathLike | None = None,
    quiet: bool = True,
) -> dict[str, Any]:
    """Run one ablation once per seed and record every seed's numbers, their mean and spread
    (sample standard deviation, min, max) in ``data/ablations/<name>-<profile>.json``, sealed
    by the sha256 of its content (:mod:`gemma2_lite.book.seed_records`). Returns the record."""
    import tempfile

    if name not in ABLATIONS:
        raise ValueError(f"{name!r} is not an ablation; choose one of {ABLATIONS}")
    profile = profile or get_profile()
    t0 = time.perf_counter()
    per_seed: dict[int, dict[str, float]] = {}
    first: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            # Never replay a record here; fingerprint the first seed, for the chapters' replay.
            kw = {} if name == "distillation" else {"live": True, "fingerprint": not first}
            payload = EXPERIMENTS[name](profile, seed=seed, quiet=quiet, results_dir=tmp, **kw)
            per_seed[seed] = final_numbers(payload)
            first = first or payload
    record = {
        "experiment": name,
        "profile": profile,
        "seeds": list(seeds),
        "per_seed": {str(s): v for s, v in per_seed.items()},
        "summary": spread([per_seed[s] for s in seeds]),
        "command": f"python -m gemma2_lite.book.experiments {name} --profile {profile} "
        f"--seeds {' '.join(map(str, seeds))}",
        "loop_cap": os.environ.get("GEMMA2_LITE_LOOP_CAP"),
        "jax": jax.__version__,
        "devices": str(jax.devices()),
        "seconds": time.perf_counter() - t0,
    }
    if "check" in first:
        # The first seed's whole result, for the chapters to replay (see _replay).
        record["replay"] = {"payload": {k: v for k, v in first.items() if k != "figure"}}
    target = Path(out) if out is not None else Path(data_path(SEED_RECORDS))
    return write_record(target / record_file(name, profile), record)


def main(argv: list[str] | None = None) -> int:
    """``python -m gemma2_lite.book.experiments NAME``; errors follow :mod:`gemma2_lite.cmdline`."""
    return run(_main, argv)


def _main(argv: list[str] | None) -> int:
    parser = Parser(
        prog="python -m gemma2_lite.book.experiments",
        description="Run one of the book's training experiments.",
    )
    parser.add_argument("name", choices=sorted(EXPERIMENTS))
    # "smoke" (seconds, for the tests) is accepted but not advertised.
    parser.add_argument(
        "--profile",
        choices=PROFILES,
        default=None,
        metavar="{ci,colab,full}",
        help="run size (default: $GEMMA2_LITE_PROFILE or ci)",
    )
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument(
        "--seeds",
        type=non_negative_int,
        nargs="+",
        default=None,
        help="ablations: run these seeds and record mean and spread in data/ablations/",
    )
    parser.add_argument(
        "--results-dir",
        default=None,
        help="default: results/ in the checkout (else in this folder)",
    )
    parser.add_argument("--out", default=None, help="train-tiny only: where to save the model")
    parser.add_argument(
        "--steps", type=non_negative_int, default=None, help="train-tiny only: override steps"
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    for name in ("results_dir", "out"):  # Orbax cannot take a path that is not UTF-8
        utf8_argument(getattr(args, name) or "", "--" + name.replace("_", "-"))
    profile = args.profile or get_profile()
    kwargs: dict[str, Any] = {
        "results_dir": args.results_dir,
        "seed": args.seed,
        "quiet": args.quiet,
    }
    if args.name == "train-tiny":
        kwargs.update(out=args.out, steps=args.steps)
    elif args.out is not None or args.steps is not None:
        parser.error("--out and --steps apply to train-tiny only")
    elif args.name != "distillation":
        kwargs.update(live=True)  # the command trains; only the chapters replay
    if args.seeds:
        record = run_seeds(args.name, tuple(args.seeds), profile, quiet=args.quiet)
        print(json.dumps(record["summary"], indent=1))
        return 0
    result = EXPERIMENTS[args.name](profile, **kwargs)
    print(
        json.dumps(
            {
                k: v
                for k, v in result.items()
                if k
                in (
                    "experiment",
                    "profile",
                    "final_val_perplexity",
                    "results",
                    "note",
                    "final_val_loss",
                    "seconds",
                )
            },
            indent=1,
            default=str,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
