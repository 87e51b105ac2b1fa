"""What decides a training run besides the model and the data: :class:`TrainConfig`, checked
field by field when it is made, and :class:`TrainError`, the trainer's error for a setup that
cannot work. Every training module builds on this one (it needs only the standard library and
numpy).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .checks import is_int

__all__ = ["TrainConfig", "TrainError", "check_int", "check_real"]

#: float32 is what the optimizer computes in: a larger "finite" Python float is inf there.
_F32_MAX = float(np.finfo(np.float32).max)
_SEED_LIMIT = 2**32  # the step's JAX key holds 32 bits of seed


class TrainError(ValueError):
    """A training setup that cannot work (bad sizes, too little data, mismatched resume)."""


def check_int(value: Any, name: str, *, low: int = 1, what: str = "") -> int:
    """``value`` as an ``int`` >= ``low``, else :class:`TrainError` naming ``name``.

    bool is refused (``True`` is not a step count) and so is a float, even a whole one:
    ``stop_at=2.5`` would otherwise run 3 steps.
    """
    if not is_int(value) or value < low:
        kind = "positive" if low == 1 else "non-negative" if low == 0 else f">= {low}"
        raise TrainError(f"{name}{what} must be a {kind} integer, got {value!r}")
    return int(value)


def check_real(
    value: Any,
    name: str,
    *,
    low: float,
    high: float = _F32_MAX,
    low_open: bool = False,
    high_open: bool = False,
    what: str = "",
) -> float:
    """``value`` as a finite ``float`` in the interval given, else :class:`TrainError`.

    The interval is ``[low, high]``, with either end excluded by ``low_open``/``high_open``;
    the message states it as the user would (``lr (the peak learning rate) must be a finite
    number > 0, got inf``).
    """
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ok = real and math.isfinite(value) and abs(value) <= _F32_MAX
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        if high == _F32_MAX:
            bound = f"> {low}" if low_open else f">= {low}"
        else:
            bound = ("(" if low_open else "[") + f"{low}, {high}" + (")" if high_open else "]")
            bound = f"in {bound}"
        raise TrainError(f"{name}{what} must be a finite number {bound}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run besides the model config and the data.

    steps: optimizer steps in the whole run (the schedule's length; also for a resumed run);
      0 trains nothing (the initial model is evaluated and returned).
    batch_size, seq_len: B sequences of T tokens per step (tokens per step = B * T).
    lr: peak learning rate, reached after ``warmup`` linear steps, then cosine decay to
      ``min_lr_ratio * lr`` at ``steps``.
    weight_decay: AdamW's decoupled decay, applied to matrices only (not norm scales).
    clip: global gradient-norm clip (None = off). b1, b2, eps: Adam moments.
    seed: initialises the model, the data order and the step rng.
    eval_every: evaluate every so many steps (0 = only at the end); eval_batches caps the
      validation batches (None = the whole validation stream).
    checkpoint_every: save every so many steps (0 = only at the end / at ``stop_at``);
      keep_checkpoints: how many to keep.
    dtype: activation dtype, "float32" or "bfloat16" (parameters stay as the model config says).
    distill_temperature, distill_alpha, distill_topk: the default loss with a teacher (see
      :func:`~gemma2_lite.train_step.make_loss_fn`): temperature tau, weight alpha of the
      distillation term (None = pure distillation) and top-k sparsification (None = the full
      distribution).
    progress: show a tqdm bar with the loss and tokens/s.

    Every field is checked when the config is made; a bad one raises :class:`TrainError`
    naming it, its meaning and the values it may take.
    """

    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    seed: int = 0
    eval_every: int = 0
    eval_batches: int | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    dtype: str = "float32"
    distill_temperature: float = 1.0
    distill_alpha: float | None = None
    distill_topk: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        check_int(self.steps, "steps", low=0, what=" (optimizer steps in the run)")
        check_int(self.batch_size, "batch_size", what=" (sequences per step)")
        check_int(self.seq_len, "seq_len", what=" (tokens per sequence)")
        check_int(self.keep_checkpoints, "keep_checkpoints", what=" (checkpoints kept)")
        for name in ("warmup", "eval_every", "checkpoint_every"):
            check_int(getattr(self, name), name, low=0)
        if check_int(self.seed, "seed", low=0) >= _SEED_LIMIT:
            raise TrainError(
                f"seed must be in [0, 2**32) (the step's JAX key holds 32 bits), got {self.seed}"
            )
        check_real(self.lr, "lr", low=0, low_open=True, what=" (the peak learning rate)")
        check_real(
            self.min_lr_ratio,
            "min_lr_ratio",
            low=0,
            high=1,
            what=" (the final learning rate as a share of lr)",
        )
        check_real(self.weight_decay, "weight_decay", low=0)
        if self.clip is not None:
            check_real(
                self.clip,
                "clip",
                low=0,
                low_open=True,
                what=" (the gradient-norm clip; None turns it off)",
            )
        check_real(
            self.b1,
            "b1",
            low=0,
            high=1,
            high_open=True,
            what=" (Adam's decay of the gradient's running mean)",
        )
        check_real(
            self.b2,
            "b2",
            low=0,
            high=1,
            high_open=True,
            what=" (Adam's decay of the squared gradient's running mean)",
        )
        check_real(self.eps, "eps", low=0, low_open=True, what=" (Adam's denominator guard)")
        if self.dtype not in ("float32", "bfloat16"):
            raise TrainError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.eval_batches is not None:
            check_int(self.eval_batches, "eval_batches", what=" (or None: every batch)")
        if self.distill_topk is not None:
            check_int(self.distill_topk, "distill_topk", what=" (or None: all logits)")
        check_real(self.distill_temperature, "distill_temperature", low=0, low_open=True)
        if self.distill_alpha is not None:
            check_real(
                self.distill_alpha,
                "distill_alpha",
                low=0,
                high=1,
                what=" (the weight of the distillation term; None = 1)",
            )
        if not isinstance(self.progress, bool):
            raise TrainError(f"progress must be True or False, got {self.progress!r}")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len
