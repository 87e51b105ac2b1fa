"""What the book's training experiments share: the corpus as tokens, the small configs, the
report's numbers, and the record-and-replay of a run (its first steps re-run and compared with a
sealed record before the record is shown).

Part of :mod:`gemma2_lite.book`, the machinery that drives the book's chapters; the programs are
in :mod:`gemma2_lite.book.experiments` and :mod:`gemma2_lite.book.ablations`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from gemma2_lite.config import Gemma2Config, get_config
from gemma2_lite.model import Gemma2, abstract_model, param_counts
from gemma2_lite.paths import data_path, repo_root
from gemma2_lite.profile import pick
from gemma2_lite.train import TrainConfig, evaluate, train

from .experiment_outputs import (
    ablation_figure,
    window_figure,
    write_results,
)
from .seed_records import (
    SEED_RECORDS,
    record_file,
    replay_payload,
    seed_record,
)

__all__ = [
    "REPORT",
    "corpus_tokens",
    "profile_data",
    "small_config",
    "results_folder",
    "eval_curve",
    "count_params",
    "printer",
    "with_window",
    "CHECK_STEPS",
    "CHECK_BATCHES",
    "check_prefix",
    "replay_record",
    "finish_run",
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


def profile_data(profile: str) -> tuple[np.ndarray, np.ndarray]:
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


def results_folder(name: str, results_dir: str | os.PathLike | None) -> Path:
    base = Path(results_dir) if results_dir is not None else Path(repo_root()) / "results"
    out = base / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def eval_curve(history: dict[str, list[dict[str, Any]]], tc: TrainConfig) -> list[dict[str, Any]]:
    return [
        {
            "step": e["step"],
            "tokens": e["step"] * tc.tokens_per_step,
            "val_loss": e["val_loss"],
            "val_perplexity": e["val_perplexity"],
        }
        for e in history["eval"]
    ]


def count_params(cfg: Gemma2Config) -> dict[str, int]:
    c = param_counts(cfg)
    return {**c, "total": c["embedding"] + c["non_embedding"]}


def printer(quiet: bool) -> Callable[[str], None]:
    return (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))


def with_window(model: Gemma2, window: int | None) -> Gemma2:
    """The same weights with the local layers' sliding window changed (for evaluation)."""
    cfg = model.config.replace(sliding_window=window)
    graph = nnx.graphdef(abstract_model(cfg))
    return nnx.merge(graph, nnx.state(model))


# The first steps of a recorded run, re-run before the record is replayed: enough to catch a
# change to the model, the initialisation, the data order, the optimizer or the evaluation.
CHECK_STEPS = 8
CHECK_BATCHES = 2


def check_prefix(
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
            model if w is None else with_window(model, w),
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


def replay_record(
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
    return None if payload is None else finish_run(payload, results_dir)


def finish_run(payload: dict[str, Any], results_dir: Any) -> dict[str, Any]:
    """Write ``results/<name>/`` (results.json, curves.csv, the figure); return the payload."""
    name = payload["experiment"]
    out = results_folder(name, results_dir)
    payload["figure"] = str(out / f"{name}.png")
    write_results(out, payload, payload.get("curves"))
    (window_figure if name == "window" else ablation_figure)(payload, Path(payload["figure"]))
    return payload
