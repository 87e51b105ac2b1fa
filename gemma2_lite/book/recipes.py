"""What chapters 08b and 08c share: the short-answer tasks, a LoRA SFT run of the book's model,
and the SFT adapters the book ships (``gemma2_lite/assets/tiny-model-sft/``).

The tasks are chapter 08a's ``speaker`` and ``play`` questions
(:func:`gemma2_lite.posttrain.build_instructions`): their answers are a few tokens, one right
answer each, so exact match is a reward a program can check. (08a's third kind, ``continue``,
asks for a whole verse line, which a model of this size never gets exactly right.)

    python -m gemma2_lite.book.recipes sft --seed 0 --steps 1200 \
        --out gemma2_lite/assets/tiny-model-sft/seed-0

trains rank-8 adapters on every projection of the book's model (``weights.book_model``;
:func:`lora_sft`) and saves
them in Hugging Face PEFT's layout with a README of how they were made and what they score.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma2_lite.chat import encode_chat
from gemma2_lite.cmdline import Parser, UsageError, non_negative_int, positive_int, run
from gemma2_lite.lora import TARGETS, apply_lora, finetune, load_adapters, save_adapters
from gemma2_lite.model import Gemma2
from gemma2_lite.paths import require, sft_adapters_dir, shown
from gemma2_lite.posttrain import build_instructions, sft_batch, sft_eval
from gemma2_lite.tokenizer import Tokenizer, default_tokenizer
from gemma2_lite.train import TrainConfig, make_loss_fn
from gemma2_lite.weights import book_model

__all__ = [
    "TASK_KINDS",
    "SEQ",
    "RANK",
    "ALPHA",
    "task_examples",
    "prompt_ids",
    "answers",
    "lora_sft",
    "chat_tokens",
    "sft_adapters",
    "main",
]

TASK_KINDS = ("speaker", "play")
SEQ = 48  # T: a question, its answer and the chat template fit in T + 1 tokens
RANK, ALPHA = 8, 16.0


def task_examples(
    tok: Tokenizer, split: str, n: int, seed: int, seq_len: int = SEQ
) -> list[dict[str, Any]]:
    """The ``speaker`` and ``play`` examples among ``build_instructions(seed, n, split)`` whose
    chat encoding fits ``seq_len + 1`` tokens."""
    out = []
    for ex in build_instructions(seed=seed, n=n, split=split):
        if (
            ex["kind"] in TASK_KINDS
            and len(encode_chat(tok, ex["messages"], add_generation_prompt=False)) <= seq_len + 1
        ):
            out.append(ex)
    return out


def prompt_ids(tok: Tokenizer, examples: Sequence[dict[str, Any]]) -> list[list[int]]:
    """Each example's question as the model sees it before answering (ends ``<start_of_turn>
    model\\n``)."""
    return [encode_chat(tok, ex["messages"][:1], add_generation_prompt=True) for ex in examples]


def answers(examples: Sequence[dict[str, Any]]) -> list[str]:
    """Each example's true answer (the model turn's text)."""
    return [ex["messages"][1]["content"] for ex in examples]


def lora_sft(
    base: Gemma2,
    rows: np.ndarray,
    mask: np.ndarray,
    *,
    steps: int,
    seed: int,
    batch_size: int = 16,
    lr: float = 1e-2,
    rank: int = RANK,
    alpha: float = ALPHA,
    targets: Sequence[str] = tuple(TARGETS),
    trainable_tokens: Sequence[int] = (),
) -> tuple[Gemma2, list[float]]:
    """Supervised fine-tuning of rank-``rank`` adapters (and the embedding rows of
    ``trainable_tokens``) on ``(rows, mask)`` from :func:`~gemma2_lite.posttrain.sft_batch`:
    ``steps`` steps of ``batch_size`` rows in an order drawn from ``seed`` (which also draws the
    adapters' A), AdamW with warm-up and cosine decay, no weight decay. Returns the LoRA model
    and the per-step losses."""
    model = apply_lora(
        base, rank, alpha, targets, nnx.Rngs(seed), trainable_tokens=trainable_tokens
    )
    tc = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        seq_len=rows.shape[1] - 1,
        lr=lr,
        warmup=max(1, steps // 20),
        weight_decay=0.0,
        seed=seed,
        progress=False,
    )
    order = np.random.default_rng(seed).permutation(len(rows))

    def batches(i: int, _: Any) -> tuple[np.ndarray, jax.Array]:
        idx = np.take(order, np.arange(i * batch_size, (i + 1) * batch_size), mode="wrap")
        return rows[idx], jnp.asarray(mask[idx])

    model, history = finetune(model, batches, tc, make_loss_fn(tc, has_teacher=False))
    return model, [h["loss"] for h in history]


def chat_tokens(tok: Tokenizer) -> tuple[int, int]:
    """``<start_of_turn>`` and ``<end_of_turn>``: the book's model never saw them in
    pretraining, so their embedding rows train with the adapters."""
    return (tok.start_of_turn_id, tok.end_of_turn_id)


def sft_adapters(base: Gemma2 | None = None, seed: int = 0) -> Gemma2:
    """The book model (or ``base``) with its shipped SFT adapters
    ``gemma2_lite/assets/tiny-model-sft/seed-{seed}`` (:func:`gemma2_lite.paths.
    sft_adapters_dir`); works installed, without a checkout."""
    base = base if base is not None else book_model(verbose=False)[0]
    return load_adapters(base, require(sft_adapters_dir(seed), "adapter_config.json"))


def _readme(
    seed: int, args: argparse.Namespace, n_train: int, scores: dict[str, Any], seconds: float
) -> str:
    return f"""# tiny-model-sft/seed-{seed}: SFT adapters for the book's model

Rank-{RANK} LoRA adapters (alpha {ALPHA:g}) on q, k, v, o, gate, up and down of every layer of
`gemma2_lite/assets/tiny-model`, and new embedding rows for `<start_of_turn>` and
`<end_of_turn>` (ids 5 and 6, which pretraining never saw), in Hugging Face PEFT's layout
(`adapter_config.json`, `adapter_model.safetensors`): load them with
`gemma2_lite.book.recipes.sft_adapters(seed={seed})` (the book model, `weights.book_model()`, with
`lora.load_adapters` of this folder, `paths.sft_adapters_dir({seed})`).

## Provenance

* command: `python -m gemma2_lite.book.recipes sft --seed {seed} --steps {args.steps} --n {args.n}
  {"" if args.held == 384 else f"--held {args.held} "}--out {shown(args.out)}`
* data: the `speaker` and `play` examples of
  `build_instructions(seed=0, n={args.n}, split="train")` that fit {SEQ + 1} tokens
  ({n_train} examples; the rule is in `gemma2_lite/posttrain.py`), loss on the model turn only
* training: {args.steps} steps x 16 conversations, order and adapter init from seed {seed};
  AdamW, peak lr 0.01, warm-up {max(1, args.steps // 20)} steps, cosine decay to 0.1 x peak,
  no weight decay, clip 1.0; float32
* held-out (`build_instructions(seed=1, n={args.held}, split="valid")`, same kinds):
  {json.dumps(scores)}
* wall time: {seconds:.0f} s on {jax.devices()} (jax {jax.__version__}),
  {time.strftime("%Y-%m-%d")}
"""


def _main(argv: list[str] | None) -> int:
    parser = Parser(
        prog="python -m gemma2_lite.book.recipes",
        description="Train the shipped LoRA SFT adapters of the book's model.",
    )
    parser.add_argument("what", choices=["sft"])
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--steps", type=positive_int, default=1200)
    parser.add_argument(
        "--n", type=positive_int, default=6000, help="instructions drawn (train split)"
    )
    parser.add_argument(
        "--held",
        type=positive_int,
        default=384,
        help="instructions drawn (valid split) to score the adapters on",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: is a file; name a folder for the adapters")
    tok, base = default_tokenizer(), book_model(verbose=False)[0]
    train = task_examples(tok, "train", args.n, seed=0)
    held = task_examples(tok, "valid", args.held, seed=1)
    t0 = time.perf_counter()
    model, losses = lora_sft(
        base,
        *sft_batch(tok, train, SEQ),
        steps=args.steps,
        seed=args.seed,
        trainable_tokens=chat_tokens(tok),
    )
    seconds = time.perf_counter() - t0
    scores = {k: round(v, 4) for k, v in sft_eval(model, *sft_batch(tok, held, SEQ)).items()}
    scores["final train loss (mean of last 50 steps)"] = round(float(np.mean(losses[-50:])), 4)
    save_adapters(model, args.out, base_model_name_or_path="gemma2_lite/assets/tiny-model")
    (args.out / "README.md").write_text(_readme(args.seed, args, len(train), scores, seconds))
    print(json.dumps(scores))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gemma2_lite.book.recipes sft --seed S --out DIR`` trains one shipped adapter
    set, under the package's command-line policy (one line on stderr, exit 2 for bad input, 130
    on Ctrl-C). Returns the exit status."""
    return run(_main, None if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
