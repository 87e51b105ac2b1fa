"""Training Gemma 2 (and distilling into it): AdamW, a jitted step, evaluation, resumable runs.

    from gemma2_lite.train import TrainConfig, train, evaluate
    model, history = train(get_config("tiny"), TrainConfig(steps=300), train_ids, valid_ids,
                           out_dir="runs/tiny")

* **Optimizer**: global-norm gradient clipping, then AdamW (decoupled weight decay on matrices
  only, not on norm scales) with a linear warm-up and cosine decay to ``min_lr_ratio * lr``.
* **Step**: one ``jax.jit``-compiled pure function of (params, optimizer state, rng, batch).
  The model is split once into a static graph and a pytree of parameters (``nnx.split``): the
  whole training state is then a plain pytree, which Orbax saves and restores directly and
  which makes a resumed run reproduce an uninterrupted one bit for bit on CPU.
* **Data**: :class:`TokenBatcher` cuts (B, T + 1) windows from one 1-D token stream in an order
  fixed by the seed; its position is two integers, saved with every checkpoint.
* **Precision**: parameters and optimizer state stay float32; ``dtype="bfloat16"`` computes the
  activations in bfloat16 (``config.replace(dtype="bfloat16")``); losses are float32.
* **Checkpoints**: Orbax ``CheckpointManager`` (written to a temporary directory and renamed
  when complete, so a crash mid-save leaves the previous checkpoint intact), holding params,
  optimizer state, step, rng, the data position and the metrics so far.
* **Metrics**: ``metrics.csv`` (one row per step) and ``metrics.json`` (configs + all rows).

Shapes: B batch, T sequence length, V vocabulary.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from .checks import check_token_ids
from .config import Gemma2Config
from .distill import distillation_loss, topk_distillation_loss
from .losses import cross_entropy_loss, token_nll
from .model import Gemma2, abstract_model

__all__ = ["TrainConfig", "TokenBatcher", "train", "evaluate", "cross_entropy_loss",
           "make_optimizer", "lr_schedule", "make_loss_fn", "make_train_step", "save_checkpoint",
           "restore_checkpoint", "latest_checkpoint_step", "load_history", "TrainError",
           "checkpoint_steps", "verify_checkpoint", "data_fingerprint", "SkippedCheckpointWarning",
           "StepShardings"]

# loss_fn(student_logits (B,T,V) f32, targets (B,T) int32, teacher_logits (B,T,V) f32 | None,
#         rng uint32 (2,), mask (B,T) f32 | None: 1 = count the position) -> f32 scalar
LossFn = Callable[[jax.Array, jax.Array, "jax.Array | None", jax.Array, "jax.Array | None"],
                  jax.Array]


class TrainError(ValueError):
    """A training setup that cannot work (bad sizes, too little data, mismatched resume)."""


def _positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise TrainError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run besides the model config and the data.

    steps: optimizer steps in the whole run (the schedule's length; also for a resumed run).
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
      :func:`make_loss_fn`): temperature tau, weight alpha of the distillation term (None =
      pure distillation) and top-k sparsification (None = the full distribution).
    progress: show a tqdm bar with the loss and tokens/s.
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
        for name in ("steps", "batch_size", "seq_len", "keep_checkpoints"):
            _positive_int(getattr(self, name), name)
        for name in ("warmup", "eval_every", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TrainError(f"{name} must be a non-negative integer, got {value!r}")
        if not self.lr > 0:
            raise TrainError(f"lr must be positive, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise TrainError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.clip is not None and not self.clip > 0:
            raise TrainError(f"clip must be positive or None, got {self.clip!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise TrainError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.eval_batches is not None and self.eval_batches <= 0:
            raise TrainError(f"eval_batches must be positive or None, got {self.eval_batches!r}")
        if self.distill_topk is not None and self.distill_topk <= 0:
            raise TrainError(f"distill_topk must be positive or None, got {self.distill_topk!r}")
        if not self.distill_temperature > 0:
            raise TrainError(f"distill_temperature must be positive, got {self.distill_temperature}")

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


# ----------------------------------------------------------------------------- data
class TokenBatcher:
    """Deterministic (B, T + 1) windows from a 1-D token stream.

    Each epoch starts at a random offset in [0, T) (so window boundaries move between epochs)
    and visits the non-overlapping windows ``stream[o + i*T : o + (i+1)*T + 1]`` in a random
    order; both come from ``numpy.random.default_rng([seed, epoch])``. A batch may span two
    epochs. The position is ``{"epoch", "index"}``: :meth:`state` / :meth:`set_state` save and
    restore it, so a resumed run sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, tokens: Any, batch_size: int, seq_len: int, seed: int = 0):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise TrainError(f"tokens must be a 1-D integer array of token ids, got "
                             f"{tokens.dtype} {tokens.shape}")
        if tokens.size < 2 * seq_len + 1:
            raise TrainError(f"{tokens.size} tokens are too few for windows of seq_len + 1 = "
                             f"{seq_len + 1} (need at least {2 * seq_len + 1})")
        self.tokens = tokens.astype(np.int32)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.epoch, self.index = 0, 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        """Window start offsets of ``epoch``, in visiting order."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(self.seq_len))
            count = (self.tokens.size - 1 - offset) // self.seq_len
            starts = offset + self.seq_len * np.arange(count)
            self._order_cache = (epoch, starts[rng.permutation(count)])
        return self._order_cache[1]

    @property
    def windows_per_epoch(self) -> int:
        return len(self._order(self.epoch))

    def next(self) -> np.ndarray:
        """The next batch: int32 (B, T + 1); inputs are [:, :-1], targets [:, 1:]."""
        rows = []
        while len(rows) < self.batch_size:
            order = self._order(self.epoch)
            if self.index >= len(order):
                self.epoch, self.index = self.epoch + 1, 0
                continue
            start = int(order[self.index])
            rows.append(self.tokens[start:start + self.seq_len + 1])
            self.index += 1
        return np.stack(rows)

    __next__ = next

    def __iter__(self) -> "TokenBatcher":
        return self

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "batch_size": self.batch_size, "seq_len": self.seq_len,
                "num_tokens": int(self.tokens.size)}

    def set_state(self, state: Mapping[str, int]) -> None:
        for key in ("seed", "batch_size", "seq_len", "num_tokens"):
            mine = self.state()[key]
            if key in state and int(state[key]) != mine:
                raise TrainError(f"data state was saved with {key}={state[key]}, this batcher has "
                                 f"{key}={mine}: the checkpoint belongs to a different data setup")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


# ----------------------------------------------------------------------------- optimizer
def lr_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0 to ``lr`` over ``warmup`` steps, then cosine to ``min_lr_ratio*lr``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.lr, warmup_steps=tc.warmup,
        decay_steps=max(tc.steps, tc.warmup + 1), end_value=tc.lr * tc.min_lr_ratio)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(clip) then AdamW(schedule); weight decay only on >= 2-D parameters.

    Norm scales are left undecayed: decaying them pulls (1 + scale) towards 1, a prior the
    model never asked for (common practice since GPT-2/T5-era training recipes).
    """
    adamw = optax.adamw(lr_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps,
                        weight_decay=tc.weight_decay,
                        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
    return optax.chain(optax.clip_by_global_norm(tc.clip), adamw) if tc.clip else adamw


def make_loss_fn(tc: TrainConfig, has_teacher: bool) -> LossFn:
    """The default objective: cross-entropy on the next token without a teacher; with one,
    :func:`~gemma2_lite.distill.distillation_loss` (or its top-k form when
    ``tc.distill_topk`` is set, the teacher's top-k taken inside the step — the same numbers
    a stored top-k file would give), mixed with the hard labels when ``tc.distill_alpha`` is set.
    """
    if not has_teacher:
        return lambda logits, targets, teacher_logits, rng, mask=None: \
            cross_entropy_loss(logits, targets, mask)
    tau, alpha, k = tc.distill_temperature, tc.distill_alpha, tc.distill_topk

    def loss(logits: jax.Array, targets: jax.Array, teacher_logits: jax.Array | None,
             rng: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        assert teacher_logits is not None
        kw: dict[str, Any] = {"mask": mask}
        if alpha is not None:
            kw.update(alpha=alpha, targets=targets)
        if k is None:
            return distillation_loss(logits, teacher_logits, temperature=tau, **kw)
        values, ids = jax.lax.top_k(teacher_logits, k)                       # (B, T, k)
        return topk_distillation_loss(logits, values, ids, temperature=tau, **kw)

    return loss


_STEP_CACHE: dict[Any, Callable[..., Any]] = {}


def _optimizer_key(tc: TrainConfig) -> tuple[Any, ...]:
    return (tc.steps, tc.lr, tc.warmup, tc.min_lr_ratio, tc.weight_decay, tc.clip, tc.b1, tc.b2,
            tc.eps)


@dataclass(frozen=True)
class StepShardings:
    """Where the training state lives on a mesh (see :func:`gemma2_lite.sharding.train_shardings`).

    params, opt_state, rest: ``NamedSharding`` trees (prefixes of those pytrees); batch: the
    (B, ...) batch's sharding; replicated: for the rng and the metrics.
    """

    params: Any
    opt_state: Any
    rest: Any
    batch: Any
    replicated: Any


def make_train_step(graphdef: Any, tx: optax.GradientTransformation, loss_fn: LossFn,
                    teacher_graph: Any = None, *, shardings: StepShardings | None = None,
                    teacher_shardings: Any = None) -> Callable[..., Any]:
    """The one jitted training step, for one device or a mesh.

    For a model split as ``nnx.split(model, nnx.Param, ...)``:
    ``step(params, opt_state, rng, rest, teacher_state, batch int32 (B, T + 1), mask=None)``
    returns ``(params, opt_state, rng, {"loss", "grad_norm"})``; the first three inputs are
    donated (updated in place). ``mask`` (B, T), 1 = count the position, restricts the loss
    (e.g. to a chat's model turns). With ``teacher_graph`` the teacher (``nnx.merge(
    teacher_graph, teacher_state)``) runs inside the step and its logits, gradient stopped, go
    to ``loss_fn``.

    With ``shardings`` the same function is compiled with explicit in/out shardings: parameters
    and optimizer state go in and come out in their rule-given layout (so donation reuses the
    buffers), the batch is split over the data axes, and the gradients are constrained to the
    parameters' layout (fsdp-split weights get reduce-scattered gradients). XLA inserts the
    collectives; the arithmetic is the single-device step's.
    """

    def step_fn(params: Any, opt_state: Any, rng: jax.Array, rest: Any, teacher_state: Any,
                batch: jax.Array, mask: jax.Array | None = None
                ) -> tuple[Any, Any, jax.Array, dict[str, jax.Array]]:
        inputs, targets = batch[:, :-1], batch[:, 1:]                        # (B, T) each
        rng, sub = jax.random.split(rng)
        teacher_logits = None
        if teacher_graph is not None:
            t_model = nnx.merge(teacher_graph, teacher_state)
            teacher_logits = jax.lax.stop_gradient(t_model(inputs))          # (B, T, V)

        def objective(p: Any) -> jax.Array:
            logits = nnx.merge(graphdef, p, rest)(inputs)                    # (B, T, V) f32
            return loss_fn(logits, targets, teacher_logits, sub, mask)

        loss, grads = jax.value_and_grad(objective)(params)
        if shardings is not None:
            grads = jax.lax.with_sharding_constraint(grads, shardings.params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, rng, {"loss": loss, "grad_norm": grad_norm}

    if shardings is None:
        return jax.jit(step_fn, donate_argnums=(0, 1, 2))
    s = shardings
    return jax.jit(step_fn, donate_argnums=(0, 1, 2),
                   in_shardings=(s.params, s.opt_state, s.replicated, s.rest, teacher_shardings,
                                 s.batch, s.batch),
                   out_shardings=(s.params, s.opt_state, s.replicated, s.replicated))


# ----------------------------------------------------------------------------- evaluation
def _token_stream(tokens: Any, vocab_size: int, name: str) -> np.ndarray:
    """``tokens`` as a 1-D integer numpy stream of ids in [0, V), else :class:`TrainError`
    naming ``name`` (the shared check of :mod:`gemma2_lite.checks`, in the trainer's error)."""
    try:
        ids = check_token_ids(tokens, vocab_size, name=name)
    except (TypeError, ValueError) as exc:
        raise TrainError(str(exc)) from None
    if ids.ndim != 1:
        raise TrainError(f"{name} must be a 1-D integer array of token ids, got shape {ids.shape}")
    return ids



@nnx.jit
def _eval_batch(model: Gemma2, inputs: jax.Array, targets: jax.Array,
                weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed token NLL and token count of one batch (weights (B, T) 0/1 drop padding rows)."""
    nll = token_nll(model(inputs), targets)                                 # (B, T)
    return jnp.sum(nll * weights), jnp.sum(weights)


def evaluate(model: Gemma2, tokens: Any, *, batch_size: int = 8, seq_len: int = 128,
             max_batches: int | None = None) -> dict[str, float]:
    """Mean next-token loss and perplexity of ``model`` on a 1-D token stream.

    The stream is cut, in order, into non-overlapping windows of T + 1 tokens (stride T: every
    token except the first is predicted once, from up to T - 1 tokens of context); the last
    partial batch is padded with zero-weight rows so one compiled shape serves all batches.
    ``max_batches`` evaluates only the first so many batches. Returns
    ``{"loss": mean nats/token, "perplexity": exp(loss), "tokens": count}``. Raises
    :class:`TrainError` for ids outside the model's vocabulary or sizes that are not positive.
    """
    _positive_int(batch_size, "batch_size")
    _positive_int(seq_len, "seq_len")
    if max_batches is not None:
        _positive_int(max_batches, "max_batches")
    if seq_len > model.config.max_seq_len:
        raise TrainError(f"seq_len {seq_len} exceeds the model's context {model.config.max_seq_len}")
    # Out-of-vocabulary ids would be NaN inside the compiled batch: "val_loss: nan".
    tokens = _token_stream(tokens, model.config.vocab_size, "tokens")
    count = (tokens.size - 1) // seq_len
    if count == 0:
        raise TrainError(f"{tokens.size} tokens are fewer than one window of {seq_len + 1}")
    starts = seq_len * np.arange(count)
    batches = [starts[i:i + batch_size] for i in range(0, count, batch_size)]
    if max_batches is not None:
        batches = batches[:max_batches]
    total = 0.0
    n_tokens = 0.0
    for b in batches:
        rows = np.stack([tokens[s:s + seq_len + 1] for s in b]).astype(np.int32)
        weights = np.ones((batch_size, seq_len), np.float32)
        if len(b) < batch_size:
            weights[len(b):] = 0.0
            rows = np.concatenate([rows, np.zeros((batch_size - len(b), seq_len + 1), np.int32)])
        s, c = _eval_batch(model, jnp.asarray(rows[:, :-1]), jnp.asarray(rows[:, 1:]),
                           jnp.asarray(weights))
        total += float(s)
        n_tokens += float(c)
    loss = total / n_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(n_tokens)}


# ----------------------------------------------------------------------------- checkpoints
def _flat_names(tree: Any) -> tuple[list[str], list[Any], Any]:
    """Leaves of ``tree`` with readable unique names ('params.layers.0.attn.q.value')."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [re.sub(r"[^A-Za-z0-9_.]", "_", jax.tree_util.keystr(p, simple=True, separator="."))
             for p, _ in with_path]
    if len(set(names)) != len(names):
        raise TrainError("training state has leaves with clashing names")
    return names, [leaf for _, leaf in with_path], treedef


def _manager(directory: Path, keep: int) -> Any:
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory.absolute(), options=options)


CHECKSUMS_FILE = "checksums.json"
SKIPPED_DIR = "skipped"   # broken steps are moved here (not an integer: Orbax ignores it)
_EMPTY = "the step folder is empty"


class SkippedCheckpointWarning(UserWarning):
    """A saved step failed its integrity check and an older one was used instead."""


def _step_files(step_dir: Path) -> dict[str, str]:
    """sha256 of every file under ``step_dir`` (but the checksum file), by relative path."""
    out = {}
    for file in sorted(step_dir.rglob("*")):
        if file.is_file() and file.name != CHECKSUMS_FILE:
            out[file.relative_to(step_dir).as_posix()] = hashlib.sha256(file.read_bytes()).hexdigest()
    return out


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """Every step folder under ``directory`` (intact or not), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def verify_checkpoint(directory: str | os.PathLike, step: int) -> str | None:
    """Why step ``step`` under ``directory`` cannot be trusted, or None if it is intact.

    Intact means: every file listed in its ``checksums.json`` is there with the same sha256,
    and no file was added. A step saved before checksums existed (Orbax's commit metadata but
    no checksum file) cannot be verified and is accepted as Orbax committed it.
    """
    step_dir = Path(directory) / str(step)
    if not step_dir.is_dir() or not any(step_dir.iterdir()):
        return _EMPTY
    sums_file = step_dir / CHECKSUMS_FILE
    if not sums_file.is_file():
        if (step_dir / "_CHECKPOINT_METADATA").is_file():
            return None
        return f"it has no {CHECKSUMS_FILE} and no commit metadata (an unfinished save)"
    try:
        expected = json.loads(sums_file.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"its {CHECKSUMS_FILE} is unreadable"
    found = _step_files(step_dir)
    missing = sorted(set(expected) - set(found))
    changed = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
    extra = sorted(set(found) - set(expected))
    for what, names in (("missing", missing), ("changed (checksum differs)", changed),
                        ("not part of the save", extra)):
        if names:
            return f"file(s) {what}: {names[:3]}"
    return None


def _set_aside(directory: Path, step: int) -> Path:
    """Move step ``step`` into ``directory/skipped/`` (kept for inspection, out of the way of
    the step that will be saved under that number again). Returns its new place."""
    target = directory / SKIPPED_DIR / str(step)
    n = 1
    while target.exists():
        target, n = directory / SKIPPED_DIR / f"{step}-{n}", n + 1
    target.parent.mkdir(exist_ok=True)
    os.replace(directory / str(step), target)
    return target


def save_checkpoint(directory: str | os.PathLike, step: int, state: Any,
                    meta: Mapping[str, Any], *, keep: int = 2) -> Path:
    """Save a pytree of arrays ``state`` plus JSON ``meta`` as step ``step`` under ``directory``.

    Orbax writes into ``<step>.orbax-checkpoint-tmp-*`` and renames it to ``<step>`` only when
    everything is on disk, so an interrupted save never replaces a good checkpoint. Then the
    sha256 of every file goes into ``<step>/checksums.json`` (written to a temporary file and
    renamed), which :func:`verify_checkpoint` checks before a restore. A broken folder already
    holding this step number is moved to ``skipped/`` first. Returns the step's directory.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory)
    names, leaves, _ = _flat_names(state)
    flat = {n: np.asarray(leaf) for n, leaf in zip(names, leaves)}
    if (directory / str(step)).exists():
        _set_aside(directory, step)
    with _manager(directory, keep) as mgr:
        mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(flat),
                                               meta=ocp.args.JsonSave(dict(meta))), force=True)
        mgr.wait_until_finished()
    step_dir = directory / str(step)
    tmp = step_dir / (CHECKSUMS_FILE + ".tmp")
    tmp.write_text(json.dumps({"algorithm": "sha256", "files": _step_files(step_dir)}, indent=1))
    os.replace(tmp, step_dir / CHECKSUMS_FILE)
    return step_dir


def latest_checkpoint_step(directory: str | os.PathLike) -> int | None:
    """The newest step under ``directory`` that passes :func:`verify_checkpoint` (None if none)."""
    return next((s for s in reversed(checkpoint_steps(directory))
                 if verify_checkpoint(directory, s) is None), None)


def restore_checkpoint(directory: str | os.PathLike, like: Any, step: int | None = None, *,
                       on_skip: Callable[[str], None] | None = None
                       ) -> tuple[Any, dict[str, Any], int]:
    """Restore ``(state, meta, step)``; ``like`` is a pytree with the state's structure, shapes
    and dtypes (arrays or ``jax.ShapeDtypeStruct``).

    Without ``step``, the newest *intact* step: a step that fails :func:`verify_checkpoint`
    (a flipped bit, a truncated or deleted file, an empty folder) is skipped with a
    :class:`SkippedCheckpointWarning` naming it and why (also passed to ``on_skip``), and the
    next older one is tried. An explicit ``step`` that fails is an error.

    Raises:
      FileNotFoundError: no step folder at all. TrainError: no intact step (each named with its
      problem), or an intact step whose arrays do not fit ``like`` (a different config).
    """
    import orbax.checkpoint as ocp

    directory = Path(directory)
    names, leaves, treedef = _flat_names(like)
    abstract = {n: jax.ShapeDtypeStruct(np.shape(x), x.dtype) for n, x in zip(names, leaves)}
    candidates = [step] if step is not None else list(reversed(checkpoint_steps(directory)))
    if not candidates:
        raise FileNotFoundError(f"no checkpoint under {directory}")
    problems = []
    for candidate in candidates:
        problem = verify_checkpoint(directory, candidate)
        if problem is not None:
            if problem != _EMPTY:   # an empty folder is no checkpoint, not a broken one
                problems.append(f"step {candidate}: {problem}")
            if step is None:
                message = (f"skipping checkpoint step {candidate} in {directory}: {problem}; "
                           "trying the previous step")
                warnings.warn(message, SkippedCheckpointWarning, stacklevel=2)
                if on_skip is not None:
                    on_skip(message)
            continue
        with _manager(directory, 1_000_000) as mgr:
            try:
                out = mgr.restore(candidate, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
            except (ValueError, KeyError) as exc:
                raise TrainError(f"checkpoint {directory}/{candidate} is intact but does not "
                                 f"match this model/optimizer (different config?): "
                                 f"{str(exc)[:300]}") from exc
        restored = [jnp.asarray(out["state"][n]) for n in names]
        return jax.tree_util.tree_unflatten(treedef, restored), dict(out["meta"]), int(candidate)
    if not problems:
        raise FileNotFoundError(f"no checkpoint under {directory} (only empty step folders)")
    raise TrainError(f"no intact checkpoint under {directory}: " + "; ".join(problems))


def data_fingerprint(tokens: np.ndarray) -> str:
    """sha256 of a token stream as int32 (what the batcher reads): resuming checks it."""
    return hashlib.sha256(np.ascontiguousarray(tokens, np.int32).tobytes()).hexdigest()


# ----------------------------------------------------------------------------- metrics
_TRAIN_FIELDS = ["step", "loss", "grad_norm", "lr", "tokens_seen", "tokens_per_s", "time_s"]
_EVAL_FIELDS = ["step", "val_loss", "val_perplexity", "val_tokens"]


def _write_metrics(out_dir: Path, history: dict[str, list[dict[str, Any]]],
                   meta: Mapping[str, Any]) -> None:
    evals = {row["step"]: row for row in history["eval"]}
    tmp = out_dir / "metrics.csv.tmp"
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=_TRAIN_FIELDS + _EVAL_FIELDS[1:])
        writer.writeheader()
        for row in history["train"]:
            e = evals.get(row["step"], {})
            writer.writerow({**row, **{k: e.get(k, "") for k in _EVAL_FIELDS[1:]}})
    os.replace(tmp, out_dir / "metrics.csv")
    tmp = out_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps({**meta, "history": history}, indent=1))
    os.replace(tmp, out_dir / "metrics.json")


def load_history(out_dir: str | os.PathLike) -> dict[str, Any]:
    """``metrics.json`` of a run: configs and ``history`` (``train`` and ``eval`` rows)."""
    return json.loads((Path(out_dir) / "metrics.json").read_text())


# ----------------------------------------------------------------------------- training
def _check_resume(saved: Mapping[str, Any], tc: TrainConfig, cfg: Gemma2Config,
                  meta: Mapping[str, Any], out_dir: Any, allow_data_change: bool) -> None:
    """A checkpoint may be resumed only by the same run: configs equal, and the same training
    data (its sha256; same-length different data would otherwise go on silently)."""
    if _comparable(TrainConfig(**saved["train_config"])) != _comparable(tc) or \
            saved["model_config"] != cfg.to_dict():
        raise TrainError(f"{out_dir} holds a checkpoint of a different run (train or model "
                         "config differs); use another out_dir or resume=False")
    before = saved.get("train_tokens_sha256")   # absent in checkpoints from before the check
    if before is not None and before != meta["train_tokens_sha256"] and not allow_data_change:
        raise TrainError(
            f"{out_dir} was trained on different train_tokens (sha256 {before[:12]}..., now "
            f"{meta['train_tokens_sha256'][:12]}...): the data order would not continue; use "
            "another out_dir, resume=False, or allow_data_change=True to go on with the new data")


def _comparable(tc: TrainConfig) -> dict[str, Any]:
    """The fields that must match to resume (display and checkpoint-cadence fields excluded)."""
    d = tc.to_dict()
    for name in ("progress", "checkpoint_every", "keep_checkpoints"):
        d.pop(name)
    return d


def train(model_config: Gemma2Config, train_config: TrainConfig, train_tokens: Any,
          valid_tokens: Any = None, *, out_dir: str | os.PathLike | None = None,
          loss_fn: LossFn | None = None, teacher: Gemma2 | None = None,
          model: Gemma2 | None = None, resume: bool = True, stop_at: int | None = None,
          log: Callable[[str], None] | None = None,
          allow_data_change: bool = False, mesh: Any = None,
          rules: Mapping[str, Any] | None = None) -> tuple[Gemma2, dict[str, list[dict]]]:
    """Train a Gemma 2 model on a token stream; returns ``(model, history)``.

    Args:
      model_config: the architecture; its activation dtype is replaced by ``train_config.dtype``.
      train_config: see :class:`TrainConfig`.
      train_tokens, valid_tokens: 1-D int arrays of token ids (e.g. the tokenized corpus);
        ``valid_tokens=None`` skips evaluation.
      out_dir: where checkpoints (``checkpoints/``), ``metrics.csv`` and ``metrics.json`` go.
        If it already holds a checkpoint of the same run and ``resume`` is true, training
        continues from the newest intact step (a step failing its checksums is skipped with a
        warning naming it; a different config, or different ``train_tokens``, raises
        :class:`TrainError`).
      loss_fn: ``loss_fn(logits (B,T,V), targets (B,T), teacher_logits (B,T,V) | None, rng)``
        -> scalar; default :func:`make_loss_fn`.
      teacher: a trained Gemma2 with the same vocabulary; its logits (gradient stopped) are
        computed inside the step and passed to ``loss_fn``.
      model: start from these weights instead of a fresh initialisation (seeded by ``seed``).
      stop_at: stop after this step (saving a checkpoint when ``out_dir`` is set) as if the run
        were interrupted; the schedule still spans ``steps``.
      log: where one-line messages go (default: nowhere).
      allow_data_change: resume even though ``train_tokens`` differ from the checkpoint's
        (their sha256 is saved with every step); the batcher's position is kept as saved.
      mesh, rules: train on a device mesh (:func:`gemma2_lite.sharding.make_mesh`): the same
        step, compiled with :func:`gemma2_lite.sharding.train_shardings` (parameters and
        optimizer moments laid out by the logical-axis ``rules``, the batch split over the
        data axes). ``batch_size`` must divide by the data axes' size.

    ``history`` is ``{"train": [{"step", "loss", "grad_norm", "lr", "tokens_seen",
    "tokens_per_s", "time_s"}, ...], "eval": [{"step", "val_loss", "val_perplexity",
    "val_tokens"}, ...]}``; ``step`` counts completed steps (1 = after the first update).
    """
    from tqdm import tqdm

    tc = train_config
    say = log or (lambda msg: None)
    cfg = model_config.replace(dtype=tc.dtype)
    if cfg.max_seq_len < tc.seq_len:
        raise TrainError(f"seq_len {tc.seq_len} exceeds the model's context {cfg.max_seq_len}")
    if teacher is not None and teacher.config.vocab_size != cfg.vocab_size:
        raise TrainError(f"teacher vocabulary {teacher.config.vocab_size} != student's "
                         f"{cfg.vocab_size}: distillation needs the same token ids")
    train_tokens = _token_stream(train_tokens, cfg.vocab_size, "train_tokens")
    if valid_tokens is not None:   # checked now, not after the first eval_every steps
        valid_tokens = _token_stream(valid_tokens, cfg.vocab_size, "valid_tokens")
        if valid_tokens.size < tc.seq_len + 1:
            raise TrainError(f"valid_tokens has {valid_tokens.size} tokens, fewer than one "
                             f"window of seq_len + 1 = {tc.seq_len + 1}")
    batcher = TokenBatcher(train_tokens, tc.batch_size, tc.seq_len, tc.seed)
    stop = tc.steps if stop_at is None else min(stop_at, tc.steps)

    # ---- model, optimizer, state
    if model is None:
        model = Gemma2(cfg, rngs=nnx.Rngs(params=tc.seed))
    elif model.config.replace(dtype=tc.dtype) != cfg:
        raise TrainError(f"model's config {model.config!r} differs from model_config {cfg!r}")
    else:
        # Same weights, this run's activation dtype; copied, because the step donates its inputs.
        model = nnx.merge(nnx.graphdef(abstract_model(cfg)),
                          jax.tree.map(jnp.copy, nnx.state(model)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(tc)
    rng = jax.random.PRNGKey(tc.seed)
    teacher_graph, teacher_state = nnx.split(teacher) if teacher is not None else (None, None)
    shardings = teacher_shardings = None
    if mesh is None:
        opt_state = tx.init(params)
    else:
        from . import sharding as sh

        params = sh.shard_state(params, mesh, rules)
        rest = sh.shard_state(rest, mesh, rules)
        opt_state = sh.sharded_opt_init(tx, params, mesh, rules)
        shardings = sh.train_shardings(params, opt_state, rest, mesh, rules)
        rng = jax.device_put(rng, shardings.replicated)
        if teacher_state is not None:
            teacher_state = sh.shard_state(teacher_state, mesh, rules)
            teacher_shardings = sh.tree_shardings(teacher_state, mesh, rules)

    meta: dict[str, Any] = {"model_config": cfg.to_dict(), "train_config": tc.to_dict(),
                            "teacher_config": None if teacher is None else
                            teacher.config.to_dict(), "train_tokens": int(train_tokens.size),
                            "train_tokens_sha256": data_fingerprint(batcher.tokens)}
    history: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    step = 0
    ckpt_dir = None if out_dir is None else Path(out_dir) / "checkpoints"
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    if ckpt_dir is not None and resume and checkpoint_steps(ckpt_dir):
        try:
            (params, opt_state, rng), saved, step = restore_checkpoint(
                ckpt_dir, (params, opt_state, rng), on_skip=say)
        except FileNotFoundError:              # only empty step folders: nothing to resume
            saved = None
        if saved is not None:
            _check_resume(saved, tc, cfg, meta, out_dir, allow_data_change)
            data_state = dict(saved["data_state"])
            if allow_data_change:               # a new stream: keep the position, not its size
                data_state.pop("num_tokens", None)
            batcher.set_state(data_state)
            history = saved["history"]
            say(f"resumed from {ckpt_dir}/{step}")
        # Newer step folders were skipped as broken (or are empty): move them out of the way
        # of the steps this run will save under the same numbers.
        for later in checkpoint_steps(ckpt_dir):
            if later > step:
                say(f"moved the skipped step {later} to {_set_aside(ckpt_dir, later)}")

    if shardings is not None:        # a restored state comes back on one device: lay it out
        params = jax.device_put(params, shardings.params)
        opt_state = jax.device_put(opt_state, shardings.opt_state)
        rng = jax.device_put(rng, shardings.replicated)
    if loss_fn is None and mesh is None:
        # The default objective is fixed by the config: reuse the compiled step of an earlier
        # run of the same model/optimizer in this process (notebooks and tests train often).
        key = (graphdef, teacher_graph, _optimizer_key(tc), tc.distill_temperature,
               tc.distill_alpha, tc.distill_topk)
        if key not in _STEP_CACHE:
            _STEP_CACHE[key] = make_train_step(graphdef, tx, make_loss_fn(tc, teacher is not None),
                                               teacher_graph)
        jit_step = _STEP_CACHE[key]
    else:
        jit_step = make_train_step(graphdef, tx,
                                   loss_fn or make_loss_fn(tc, teacher is not None),
                                   teacher_graph, shardings=shardings,
                                   teacher_shardings=teacher_shardings)
    schedule = lr_schedule(tc)

    def run_eval() -> None:
        if valid_tokens is None:
            return
        m = nnx.merge(graphdef, params, rest)
        result = evaluate(m, valid_tokens, batch_size=tc.batch_size, seq_len=tc.seq_len,
                          max_batches=tc.eval_batches)
        history["eval"].append({"step": step, "val_loss": result["loss"],
                                "val_perplexity": result["perplexity"],
                                "val_tokens": result["tokens"]})
        say(f"step {step}: val loss {result['loss']:.4f} (ppl {result['perplexity']:.2f})")

    saved_step = step if ckpt_dir is not None and step else None

    def checkpoint() -> None:
        nonlocal saved_step
        if ckpt_dir is None or saved_step == step:
            return
        saved_step = step
        save_checkpoint(ckpt_dir, step, (params, opt_state, rng),
                        {**meta, "step": step, "data_state": batcher.state(), "history": history},
                        keep=tc.keep_checkpoints)
        _write_metrics(Path(out_dir), history, meta)  # type: ignore[arg-type]

    bar = tqdm(total=stop, initial=step, disable=not tc.progress, unit="step",
               dynamic_ncols=True, mininterval=1.0)
    t_start = time.perf_counter()
    t_prev = t_start
    tokens_seen = history["train"][-1]["tokens_seen"] if history["train"] else 0
    while step < stop:
        batch = batcher.next()                                              # (B, T + 1)
        batch = jnp.asarray(batch) if mesh is None else sh.shard_batch(batch, mesh)
        params, opt_state, rng, metrics = jit_step(params, opt_state, rng, rest, teacher_state,
                                                   batch, None)
        loss = float(metrics["loss"])                   # syncs: the timing below is honest
        step += 1
        now = time.perf_counter()
        tokens_seen += tc.tokens_per_step
        row = {"step": step, "loss": loss, "grad_norm": float(metrics["grad_norm"]),
               "lr": float(schedule(step - 1)), "tokens_seen": tokens_seen,
               "tokens_per_s": tc.tokens_per_step / max(now - t_prev, 1e-9),
               "time_s": now - t_start}
        t_prev = now
        history["train"].append(row)
        if not math.isfinite(loss):
            bar.close()
            raise FloatingPointError(f"loss became {loss} at step {step}; lower lr "
                                     f"({tc.lr}) or check the data")
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
        bar.update(1)
        if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
            run_eval()
        if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < stop:
            checkpoint()
    bar.close()
    if step == tc.steps and (not history["eval"] or history["eval"][-1]["step"] != step):
        run_eval()
    checkpoint()
    if out_dir is not None:
        _write_metrics(Path(out_dir), history, meta)
    return nnx.merge(graphdef, params, rest), history
