"""What the book's training experiments (:mod:`gemma2_lite.book.experiments`) write from their
results: ``results.json`` and ``curves.csv``, the figures (PNG), and the README of the book's
trained model.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "write_results",
    "pyplot",
    "distillation_figure",
    "window_figure",
    "ablation_figure",
    "loss_figure",
    "tiny_readme",
]


def write_results(
    out: Path, payload: dict[str, Any], curves: dict[str, list[dict[str, Any]]] | None = None
) -> None:
    """``out/results.json`` (the payload) and, with ``curves``, ``out/curves.csv`` (one row per
    run and evaluation)."""
    (out / "results.json").write_text(json.dumps(payload, indent=1, default=str))
    if curves:
        with open(out / "curves.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["run", "step", "tokens", "val_loss", "val_perplexity"])
            for run, rows in curves.items():
                for r in rows:
                    writer.writerow(
                        [run, r["step"], r["tokens"], r["val_loss"], r["val_perplexity"]]
                    )


def pyplot() -> Any:
    """matplotlib.pyplot, on the Agg backend unless a notebook (ipykernel) or pyplot is
    already in use."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules and "ipykernel" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def distillation_figure(payload: dict[str, Any], curves: dict[str, list[dict[str, Any]]]) -> None:
    """Validation perplexity of each student against its training tokens, beside the
    report's from-scratch vs distilled perplexities; written to ``payload["figure"]``."""
    plt = pyplot()
    final = payload["final_val_perplexity"]
    profile = payload["profile"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    for label, rows in curves.items():
        if label == "teacher":
            continue
        ax.plot(
            [r["tokens"] for r in rows],
            [r["val_perplexity"] for r in rows],
            "o-",
            label=f"student, {label}",
        )
    ax.axhline(final["teacher"], color="k", ls="--", label="teacher (final)")
    ax.set_xlabel("student training tokens")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.set_title(f"This run ({profile}): same student, same tokens")
    ax.legend(fontsize=8)
    rp = payload["report"]["distillation_perplexity"]
    x = np.arange(len(rp["sizes"]))
    ax2.bar(x - 0.2, rp["from_scratch"], 0.4, label="from scratch")
    ax2.bar(x + 0.2, rp["distilled"], 0.4, label="distilled")
    ax2.set_xticks(x, rp["sizes"])
    ax2.set_ylabel("perplexity")
    ax2.set_title("Gemma 2 report: students of a 7B teacher")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(payload["figure"], dpi=110)
    plt.close(fig)


def window_figure(payload: dict[str, Any], path: Path) -> None:
    ppl = [r["val_perplexity"] for r in payload["results"]]
    window = payload["model_config"]["sliding_window"]
    seq = payload["train_config"]["seq_len"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = ["W", "W/2", "W/4"]
    ax.plot(labels, [p / ppl[0] for p in ppl], "o-", label=f"this run (W={window}, T={seq})")
    rp = payload["report"]["perplexity"]
    ax.plot(labels, [p / rp[0] for p in rp], "s--", label="Gemma 2 9B (W=4096)")
    ax.set_ylabel("perplexity relative to W")
    ax.set_xlabel("sliding window at inference (trained with W)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ablation_figure(payload: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    for label, rows in payload["curves"].items():
        n = payload["params"][label]["non_embedding"]
        ax.plot(
            [r["tokens"] for r in rows],
            [r["val_perplexity"] for r in rows],
            "o-",
            label=f"{label} ({n / 1e6:.2f}M non-emb.)",
        )
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.set_title(
        f"This run ({payload['profile']})"
        if "replayed" not in payload
        else f"The recorded run ({payload['profile']}, seed {payload['seed']})"
    )
    ax.legend(fontsize=8)
    rep = payload["report"]
    ax2.bar(list(rep), list(rep.values()), color=["C0", "C1"])
    ax2.set_ylim(min(rep.values()) - 3, max(rep.values()) + 1)
    ax2.set_ylabel("average benchmark score")
    ax2.set_title("Gemma 2 report")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def loss_figure(hist: dict[str, list[dict[str, Any]]], path: str | Path) -> None:
    """Training loss per step and validation loss per evaluation of one run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        [r["step"] for r in hist["train"]],
        [r["loss"] for r in hist["train"]],
        lw=0.6,
        label="train (per step)",
    )
    ax.plot(
        [e["step"] for e in hist["eval"]],
        [e["val_loss"] for e in hist["eval"]],
        "o-",
        label="validation",
    )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tiny_readme(p: dict[str, Any]) -> str:
    """The README of the book's trained model (``gemma2_lite/assets/tiny-model/README.md``):
    what it is and how it was made, from run_train_tiny's payload."""
    tc, c = p["train_config"], p["model_config"]
    return f"""# tiny-model: the book's trained `tiny` Gemma 2

A {p["params"]["total"]:,}-parameter Gemma 2 ({p["params"]["embedding"]:,} embedding +
{p["params"]["non_embedding"]:,} non-embedding; V={c["vocab_size"]} D={c["d_model"]}
L={c["num_layers"]} N={c["num_heads"]} K={c["num_kv_heads"]} H={c["head_dim"]}
F={c["ffn_dim"]} W={c["sliding_window"]} C={c["max_seq_len"]}) trained on the book's Shakespeare
corpus (`shakespeare.jsonl`, train split) with the book's tokenizer
(`tokenizer.model`), both beside this folder in `gemma2_lite/assets/`. Hugging Face layout
(`config.json` + `model.safetensors`, float32): load it with `gemma2_lite.weights.book_model()`.

## Provenance

* command: `{p["command"]}` (seed {p["seed"]})
* steps: {tc["steps"]} x {tc["batch_size"]} sequences x {tc["seq_len"]} tokens =
  {p["tokens_trained"]:,} tokens ({p["epochs"]:.2f} epochs of the \
{p["train_tokens_in_corpus"]:,}-token
  train split)
* optimizer: AdamW, peak lr {tc["lr"]}, {tc["warmup"]} warm-up steps, cosine decay to
  {tc["min_lr_ratio"]} x peak, weight decay {tc["weight_decay"]}, clip {tc["clip"]}; float32
* final validation loss: {p["final_val_loss"]:.4f} nats/token (perplexity
  {p["final_val_perplexity"]:.2f}) on {p["val_tokens"]:,} tokens of the valid split
* wall time: {p["seconds"]:.0f} s on {p["devices"]} (jax {p["jax"]})
* folder size: {p["folder_bytes"]:,} bytes

## A sample (temperature 0.7, prompt `ROMEO:`)

```
{p["sample"]}
```
"""
