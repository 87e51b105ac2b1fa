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

from gemma2_lite.checkpoint import save_hf
from gemma2_lite.cmdline import Parser, non_negative_int, run, utf8_argument
from gemma2_lite.config import Gemma2Config, get_config
from gemma2_lite.model import Gemma2
from gemma2_lite.paths import data_path
from gemma2_lite.profile import PROFILES, get_profile, pick
from gemma2_lite.train import TrainConfig, evaluate, train

from .ablations import run_deep_vs_wide, run_gqa_vs_mha
from .experiment_outputs import (
    distillation_figure,
    loss_figure,
    tiny_readme,
    write_results,
)
from .runs import (
    REPORT,
    check_prefix,
    corpus_tokens,
    count_params,
    eval_curve,
    finish_run,
    printer,
    profile_data,
    replay_record,
    results_folder,
    small_config,
    with_window,
)
from .seed_records import (
    SEED_RECORDS,
    final_numbers,
    record_file,
    replay_line,
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


# ----------------------------------------------------------------------------- distillation
def _distillation_sizes(
    profile: str, seed: int, quiet: bool, topk: int | None, temperature: float
) -> tuple[Gemma2Config, Gemma2Config, TrainConfig, TrainConfig, int]:
    """The distillation run's teacher and student configs, their training configs and k, at
    ``profile``."""
    size = partial(pick, profile=profile)
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
    return teacher_cfg, student_cfg, tc_teacher, tc_student, k


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
    say = printer(quiet)
    train_ids, valid_ids = profile_data(profile)
    teacher_cfg, student_cfg, tc_teacher, tc_student, k = _distillation_sizes(
        profile, seed, quiet, topk, temperature
    )
    t_steps, s_steps = tc_teacher.steps, tc_student.steps
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
    curves = {"teacher": eval_curve(t_hist, tc_teacher)}
    final: dict[str, float] = {"teacher": t_hist["eval"][-1]["val_perplexity"]}
    for label, (tchr, tc) in objectives.items():
        say(f"[distillation] student {student_cfg.name}, objective {label}, {s_steps} steps")
        _, hist = train(student_cfg, tc, train_ids, valid_ids, teacher=tchr)
        curves[label] = eval_curve(hist, tc)
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
        "teacher_params": count_params(teacher_cfg),
        "student_params": count_params(student_cfg),
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
    out = results_folder("distillation", results_dir)
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
def _window_rows(
    model: Gemma2,
    windows: list[int],
    valid_ids: np.ndarray,
    tc: TrainConfig,
    eval_batches: int | None,
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Validation loss and perplexity of ``model`` evaluated with each window in ``windows``."""
    rows = []
    for w in windows:
        r = evaluate(
            with_window(model, w),
            valid_ids,
            batch_size=tc.batch_size,
            seq_len=tc.seq_len,
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
    return rows


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
    its first steps are re-run and checked (see :func:`replay_record`). ``fingerprint`` adds those
    first steps' losses to the result (``check``), for a record (:func:`run_seeds`)."""
    profile = profile or get_profile()
    size = partial(pick, profile=profile)
    say = printer(quiet)
    train_ids, valid_ids = profile_data(profile)
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
    check = lambda: check_prefix(cfg, tc, train_ids, valid_ids, windows)
    replayed = None if live else replay_record("window", profile, seed, results_dir, check)
    if replayed is not None:
        return replayed
    t0 = time.perf_counter()
    say(f"[window] training {cfg.name} with W={window}, T={seq}")
    model, _ = train(cfg, tc, train_ids)
    eval_batches = size(loop=True, smoke=2, ci=12, colab=64, full=None)
    rows = _window_rows(model, windows, valid_ids, tc, eval_batches, say)
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
    return finish_run(payload, results_dir)


# ----------------------------------------------------------------------------- train-tiny
def _tiny_sample(model: Gemma2, sample_len: int, seed: int) -> str:
    """A sample of ``sample_len`` tokens (prompt included) from ``model``, after "ROMEO:"."""
    from gemma2_lite.sampler import generate
    from gemma2_lite.tokenizer import Tokenizer

    tok = Tokenizer(data_path("tokenizer.model"))
    prompt = tok.encode("ROMEO:\n", add_bos=True)
    new = generate(
        model, [prompt], max_new_tokens=sample_len - len(prompt), temperature=0.7, seed=seed
    )[0]
    return tok.decode(prompt + new)


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
    profile = profile or get_profile()
    size = partial(pick, profile=profile)
    say = printer(quiet)
    train_ids, valid_ids = profile_data(profile)
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
    run_dir = results_folder("train-tiny", results_dir)
    # Checkpoints per (profile, steps, seed): an interrupted command resumes where it stopped.
    ckpt = run_dir / f"run-{profile}-{tc.steps}-seed{seed}"
    model, hist = train(cfg, tc, train_ids, valid_ids, out_dir=ckpt, log=say)
    seconds = time.perf_counter() - t0
    final = hist["eval"][-1]
    target = Path(out) if out is not None else Path(data_path("tiny-model"))
    save_hf(model, target)
    folder_bytes = sum(p.stat().st_size for p in target.iterdir() if p.is_file())
    sample = _tiny_sample(model, size(smoke=24, ci=128, colab=128, full=128), seed)
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
        "params": count_params(cfg),
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
    write_results(run_dir, payload, {"tiny": eval_curve(hist, tc)})
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
        # The first seed's whole result, for the chapters to replay (see replay_record).
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
