"""Training Gemma 2 (and distilling into it): the loop around an explicit training state,
resumable runs, evaluation.

    from gemma2_lite.train import TrainConfig, train, evaluate
    model, history = train(get_config("tiny"), TrainConfig(steps=300), train_ids, valid_ids,
                           out_dir="runs/tiny")

The trainer is six small modules; every public name is importable from here:

* :mod:`~gemma2_lite.train_config`: :class:`TrainConfig` (checked field by field), TrainError;
* :mod:`~gemma2_lite.batching`: :class:`TokenBatcher` (the data order; its position is two
  integers) and :func:`~gemma2_lite.batching.padded_batches`;
* :mod:`~gemma2_lite.train_step`: the optimizer (clip + AdamW, warm-up and cosine decay), the
  default loss, the one jitted step (one device or a mesh) and the step cache;
* :mod:`~gemma2_lite.train_checkpoint`: checkpoints saved atomically, verified by checksums and
  restored from the newest intact step; ``metrics.csv`` and ``metrics.json``;
* :mod:`~gemma2_lite.train_eval`: :func:`evaluate`, the validation loss of a token stream;
* here: :class:`TrainState` and :func:`train`.

* **State**: everything a run changes lives in one :class:`TrainState` (params, optimizer state,
  rng, step, data position, metrics); the loop's helpers take it and update it, so what a
  checkpoint saves is exactly what the loop carries, and a resumed run reproduces an
  uninterrupted one bit for bit on CPU.
* **Precision**: parameters and optimizer state stay float32; ``dtype="bfloat16"`` computes the
  activations in bfloat16 (``config.replace(dtype="bfloat16")``); losses are float32.

Shapes: B batch, T sequence length, V vocabulary.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .batching import TokenBatcher
from .config import Gemma2Config
from .losses import cross_entropy_loss
from .model import Gemma2, abstract_model
from .sharding import (
    StepShardings,
    shard_batch,
    shard_state,
    sharded_opt_init,
    train_shardings,
    tree_shardings,
)
from .train_checkpoint import (
    SkippedCheckpointWarning,
    checkpoint_steps,
    data_fingerprint,
    latest_checkpoint_step,
    load_history,
    restore_checkpoint,
    save_checkpoint,
    set_aside_step,
    verify_checkpoint,
    write_metrics,
)
from .train_config import TrainConfig, TrainError, check_int
from .train_eval import evaluate, token_stream
from .train_step import (
    STEP_CACHE,
    LossFn,
    StepCache,
    lr_schedule,
    make_loss_fn,
    make_optimizer,
    make_train_step,
    split_trainable,
)

__all__ = [
    "TrainConfig",
    "TokenBatcher",
    "train",
    "evaluate",
    "cross_entropy_loss",
    "make_optimizer",
    "lr_schedule",
    "make_loss_fn",
    "make_train_step",
    "save_checkpoint",
    "restore_checkpoint",
    "latest_checkpoint_step",
    "load_history",
    "TrainError",
    "checkpoint_steps",
    "verify_checkpoint",
    "data_fingerprint",
    "SkippedCheckpointWarning",
    "StepShardings",
    "TrainState",
    "StepCache",
    "STEP_CACHE",
    "split_trainable",
    "LossFn",
]


# ----------------------------------------------------------------------------- state
@dataclass
class TrainState:
    """Everything a run changes as it goes, in one object: the loop's helpers take it and
    update it in place.

    params: the trainable variables (``nnx.State``); opt_state: the optimizer's state; rng: the
    step's key (uint32 (2,)) — the three arrays the step updates and a checkpoint saves.
    step: completed updates (1 = after the first); data: the batcher's position ``{"epoch",
    "index"}``; history: the metric rows so far, ``{"train": [...], "eval": [...]}``;
    saved_step: the step this run last checkpointed (None: none yet).
    """

    params: Any
    opt_state: Any
    rng: jax.Array
    step: int = 0
    data: dict[str, int] = field(default_factory=lambda: {"epoch": 0, "index": 0})
    history: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {"train": [], "eval": []}
    )
    saved_step: int | None = None

    @property
    def arrays(self) -> tuple[Any, Any, jax.Array]:
        """``(params, opt_state, rng)``: what the step donates and a checkpoint holds."""
        return self.params, self.opt_state, self.rng


@dataclass(frozen=True)
class _Run:
    """What stays fixed during a run: the configs, the split model's frozen parts, the step,
    the data and where files go."""

    tc: TrainConfig
    graphdef: Any
    rest: Any
    teacher_state: Any
    step_fn: Callable[..., Any]
    batcher: TokenBatcher
    valid_tokens: np.ndarray | None
    meta: dict[str, Any]
    out_dir: Path | None
    mesh: Any
    shardings: StepShardings | None
    say: Callable[[str], None]
    schedule: Callable[[int], Any]

    @property
    def ckpt_dir(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "checkpoints"


# ----------------------------------------------------------------------------- training
def train(
    model_config: Gemma2Config,
    train_config: TrainConfig,
    train_tokens: Any,
    valid_tokens: Any = None,
    *,
    out_dir: str | os.PathLike | None = None,
    loss_fn: LossFn | None = None,
    teacher: Gemma2 | None = None,
    model: Gemma2 | None = None,
    resume: bool = True,
    stop_at: int | None = None,
    log: Callable[[str], None] | None = None,
    allow_data_change: bool = False,
    mesh: Any = None,
    rules: Mapping[str, Any] | None = None,
    trainable: Any = nnx.Param,
) -> tuple[Gemma2, dict[str, list[dict]]]:
    """Train a Gemma 2 model on a token stream; returns ``(model, history)``.

    Args:
      model_config: the architecture; its activation dtype is replaced by ``train_config.dtype``.
      train_config: see :class:`TrainConfig`.
      train_tokens, valid_tokens: 1-D int arrays of token ids (e.g. the tokenized corpus);
        ``valid_tokens=None`` skips evaluation.
      out_dir: where checkpoints (``checkpoints/``), ``metrics.csv`` and ``metrics.json`` go.
        If it already holds a checkpoint of the same run and ``resume`` is true, training
        continues from the newest intact step (a step failing its checksums, or without
        them, is skipped with a warning naming it; a different config, or different
        ``train_tokens``, raises :class:`TrainError`).
      loss_fn: ``loss_fn(logits (B,T,V), targets (B,T), teacher_logits (B,T,V) | None, rng)``
        -> scalar; default :func:`make_loss_fn`.
      teacher: a trained Gemma2 with the same vocabulary; its logits (gradient stopped) are
        computed inside the step and passed to ``loss_fn``.
      model: start from these weights instead of a fresh initialisation (seeded by ``seed``).
      stop_at: stop after this step, an int >= 0 (saving a checkpoint when ``out_dir`` is
        set) as if the run were interrupted; the schedule still spans ``steps``.
      log: where one-line messages go (default: nowhere).
      allow_data_change: resume even though ``train_tokens`` differ from the checkpoint's
        (their sha256 is saved with every step); the batcher's position is kept as saved.
      mesh, rules: train on a device mesh (:func:`gemma2_lite.sharding.make_mesh`): the same
        step, compiled with :func:`gemma2_lite.sharding.train_shardings` (parameters and
        optimizer moments laid out by the logical-axis ``rules``, the batch split over the
        data axes). ``batch_size`` must divide by the data axes' size.
      trainable: an nnx filter of the variables that train (default every ``nnx.Param``);
        the others are frozen. ``trainable=nnx.LoRAParam`` with a ``model`` holding LoRA
        adapters trains only the adapters (see :func:`split_trainable`).

    ``history`` is ``{"train": [{"step", "loss", "grad_norm", "lr", "tokens_seen",
    "tokens_per_s", "time_s"}, ...], "eval": [{"step", "val_loss", "val_perplexity",
    "val_tokens"}, ...]}``; ``step`` counts completed steps (1 = after the first update).
    Raises ``FloatingPointError`` naming the step whose loss, or whose updated parameters,
    are not finite.
    """
    _check_configs(model_config, train_config)
    tc = train_config
    stop = (
        tc.steps
        if stop_at is None
        else min(check_int(stop_at, "stop_at", low=0, what=" (the step to stop after)"), tc.steps)
    )
    run, state = _start(
        model_config,
        tc,
        train_tokens,
        valid_tokens,
        out_dir=out_dir,
        loss_fn=loss_fn,
        teacher=teacher,
        model=model,
        log=log,
        mesh=mesh,
        rules=rules,
        trainable=trainable,
    )
    if run.ckpt_dir is not None and resume and checkpoint_steps(run.ckpt_dir):
        state = _resume(run, state, allow_data_change)
    state = _loop(run, state, stop)
    return nnx.merge(run.graphdef, state.params, run.rest), state.history


def _check_configs(model_config: Any, train_config: Any) -> None:
    """TypeError naming the argument when either config is of the wrong type."""
    if not isinstance(train_config, TrainConfig):
        raise TypeError(f"train_config must be a TrainConfig, got {type(train_config).__name__}")
    if not isinstance(model_config, Gemma2Config):
        raise TypeError(
            f"model_config must be a Gemma2Config (e.g. get_config('tiny')), got "
            f"{type(model_config).__name__}"
        )


def _check_data(
    cfg: Gemma2Config, tc: TrainConfig, train_tokens: Any, valid_tokens: Any, teacher: Gemma2 | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Both token streams checked against the model (now, not after eval_every steps)."""
    if cfg.max_seq_len < tc.seq_len:
        raise TrainError(f"seq_len {tc.seq_len} exceeds the model's context {cfg.max_seq_len}")
    if teacher is not None and teacher.config.vocab_size != cfg.vocab_size:
        raise TrainError(
            f"teacher vocabulary {teacher.config.vocab_size} != student's "
            f"{cfg.vocab_size}: distillation needs the same token ids"
        )
    train_tokens = token_stream(train_tokens, cfg.vocab_size, "train_tokens")
    if valid_tokens is not None:
        valid_tokens = token_stream(valid_tokens, cfg.vocab_size, "valid_tokens")
        if valid_tokens.size < tc.seq_len + 1:
            raise TrainError(
                f"valid_tokens has {valid_tokens.size} tokens, fewer than one "
                f"window of seq_len + 1 = {tc.seq_len + 1}"
            )
    return train_tokens, valid_tokens


def _initial_model(cfg: Gemma2Config, tc: TrainConfig, model: Gemma2 | None) -> Gemma2:
    """A fresh model seeded by ``tc.seed``, or a copy of ``model`` (the step donates its
    inputs) computing in this run's activation dtype."""
    if model is None:
        return Gemma2(cfg, rngs=nnx.Rngs(params=tc.seed))
    if model.config.replace(dtype=tc.dtype) != cfg:
        raise TrainError(f"model's config {model.config!r} differs from model_config {cfg!r}")
    state = jax.tree.map(jnp.copy, nnx.state(model))
    if model.config == cfg:  # its own graph: keeps any extra variables (LoRA)
        return nnx.merge(nnx.graphdef(model), state)
    try:
        return nnx.merge(nnx.graphdef(abstract_model(cfg)), state)
    except (ValueError, KeyError, TypeError) as exc:
        raise TrainError(
            f"model holds variables a plain Gemma2 has not (adapters?): build it "
            f"with the run's dtype {tc.dtype!r} instead ({exc})"
        ) from None


def _start(
    model_config: Gemma2Config,
    tc: TrainConfig,
    train_tokens: Any,
    valid_tokens: Any,
    *,
    out_dir: Any,
    loss_fn: LossFn | None,
    teacher: Gemma2 | None,
    model: Gemma2 | None,
    log: Callable[[str], None] | None,
    mesh: Any,
    rules: Mapping[str, Any] | None,
    trainable: Any,
) -> tuple[_Run, TrainState]:
    """The run's fixed parts and its state at step 0 (placed on ``mesh`` when given)."""
    cfg = model_config.replace(dtype=tc.dtype)
    train_tokens, valid_tokens = _check_data(cfg, tc, train_tokens, valid_tokens, teacher)
    batcher = TokenBatcher(train_tokens, tc.batch_size, tc.seq_len, tc.seed)
    try:
        graphdef, params, rest = split_trainable(_initial_model(cfg, tc, model), trainable)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    tx = make_optimizer(tc)
    rng = jax.random.PRNGKey(tc.seed)
    teacher_graph, teacher_state = nnx.split(teacher) if teacher is not None else (None, None)
    shardings = teacher_shardings = None
    if mesh is None:
        opt_state = tx.init(params)
    else:
        params, rest = shard_state(params, mesh, rules), shard_state(rest, mesh, rules)
        opt_state = sharded_opt_init(tx, params, mesh, rules)
        shardings = train_shardings(params, opt_state, rest, mesh, rules)
        rng = jax.device_put(rng, shardings.replicated)
        if teacher_state is not None:
            teacher_state = shard_state(teacher_state, mesh, rules)
            teacher_shardings = tree_shardings(teacher_state, mesh, rules)
    if loss_fn is None and mesh is None:
        # The default objective is fixed by the config: reuse the compiled step of an earlier
        # run of the same model/optimizer in this process (notebooks and tests train often).
        step_fn = STEP_CACHE.get(graphdef, tc, teacher_graph, trainable)
    else:
        step_fn = make_train_step(
            graphdef,
            tx,
            loss_fn or make_loss_fn(tc, teacher is not None),
            teacher_graph,
            shardings=shardings,
            teacher_shardings=teacher_shardings,
        )
    meta = {
        "model_config": cfg.to_dict(),
        "train_config": tc.to_dict(),
        "teacher_config": None if teacher is None else teacher.config.to_dict(),
        "train_tokens": int(train_tokens.size),
        "train_tokens_sha256": data_fingerprint(batcher.tokens),
    }
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    run = _Run(
        tc,
        graphdef,
        rest,
        teacher_state,
        step_fn,
        batcher,
        valid_tokens,
        meta,
        None if out_dir is None else Path(out_dir),
        mesh,
        shardings,
        log or (lambda msg: None),
        lr_schedule(tc),
    )
    return run, TrainState(params, opt_state, rng)


# ----------------------------------------------------------------------------- resuming
def _comparable(tc: TrainConfig) -> dict[str, Any]:
    """The fields that must match to resume (display and checkpoint-cadence fields excluded)."""
    d = tc.to_dict()
    for name in ("progress", "checkpoint_every", "keep_checkpoints"):
        d.pop(name)
    return d


def _check_resume(saved: Mapping[str, Any], run: _Run, allow_data_change: bool) -> None:
    """A checkpoint may be resumed only by the same run: configs equal, and the same training
    data (its sha256; same-length different data would otherwise go on silently)."""
    if (
        _comparable(TrainConfig(**saved["train_config"])) != _comparable(run.tc)
        or saved["model_config"] != run.meta["model_config"]
    ):
        raise TrainError(
            f"{run.out_dir} holds a checkpoint of a different run (train or model "
            "config differs); use another out_dir or resume=False"
        )
    before = saved.get("train_tokens_sha256")  # absent in checkpoints from before the check
    now = run.meta["train_tokens_sha256"]
    if before is not None and before != now and not allow_data_change:
        raise TrainError(
            f"{run.out_dir} was trained on different train_tokens (sha256 {before[:12]}..., now "
            f"{now[:12]}...): the data order would not continue; use another out_dir, "
            "resume=False, or allow_data_change=True to go on with the new data"
        )


def _resume(run: _Run, state: TrainState, allow_data_change: bool) -> TrainState:
    """The state of the newest intact checkpoint of this run (``state`` when there is none);
    newer step folders, skipped as broken or empty, are moved aside."""
    ckpt = run.ckpt_dir
    assert ckpt is not None
    try:
        arrays, saved, step = restore_checkpoint(ckpt, state.arrays, on_skip=run.say)
    except FileNotFoundError:  # only empty step folders: nothing to resume
        saved = None
    if saved is not None:
        _check_resume(saved, run, allow_data_change)
        data_state = dict(saved["data_state"])
        if allow_data_change:  # a new stream: keep the position, not its size
            data_state.pop("num_tokens", None)
        params, opt_state, rng = arrays
        state = TrainState(
            params,
            opt_state,
            rng,
            step=step,
            data=run.batcher.check_state(data_state),
            history=saved["history"],
            saved_step=step,
        )
        if run.shardings is not None:  # a restored state comes back on one device
            s = run.shardings
            state.params = jax.device_put(state.params, s.params)
            state.opt_state = jax.device_put(state.opt_state, s.opt_state)
            state.rng = jax.device_put(state.rng, s.replicated)
        run.say(f"resumed from {ckpt}/{step}")
    # Newer step folders were skipped as broken (or are empty): move them out of the way of
    # the steps this run will save under the same numbers.
    for later in checkpoint_steps(ckpt):
        if later > state.step:
            run.say(f"moved the skipped step {later} to {set_aside_step(ckpt, later)}")
    return state


# ----------------------------------------------------------------------------- the loop
def _loop(run: _Run, state: TrainState, stop: int) -> TrainState:
    """Steps until ``stop``, evaluating and checkpointing as the config says; then the final
    evaluation (at ``steps``), checkpoint and metrics files."""
    from tqdm import tqdm

    tc = run.tc
    bar = tqdm(
        total=stop,
        initial=state.step,
        disable=not tc.progress,
        unit="step",
        dynamic_ncols=True,
        mininterval=1.0,
    )
    clock = [time.perf_counter()] * 2  # [start, previous step's end]
    try:
        while state.step < stop:
            row = _advance(run, state, clock)
            bar.set_postfix(
                loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False
            )
            bar.update(1)
            if tc.eval_every and state.step % tc.eval_every == 0 and state.step < tc.steps:
                _evaluate_into(run, state)
            if tc.checkpoint_every and state.step % tc.checkpoint_every == 0 and state.step < stop:
                _checkpoint(run, state)
    finally:
        bar.close()
    evals = state.history["eval"]
    if state.step == tc.steps and (not evals or evals[-1]["step"] != state.step):
        _evaluate_into(run, state)
    _checkpoint(run, state)
    if run.out_dir is not None:
        write_metrics(run.out_dir, state.history, run.meta)
    return state


def _advance(run: _Run, state: TrainState, clock: list[float]) -> dict[str, Any]:
    """One optimizer step on the next batch: updates ``state``, appends and returns the
    metrics row. Raises FloatingPointError naming the step if the loss or any updated
    parameter is not finite."""
    tc = run.tc
    host_batch, state.data = run.batcher.take(state.data)  # (B, T + 1)
    batch = jnp.asarray(host_batch) if run.mesh is None else shard_batch(host_batch, run.mesh)
    state.params, state.opt_state, state.rng, metrics = run.step_fn(
        *state.arrays, run.rest, run.teacher_state, batch, None
    )
    loss = float(metrics["loss"])  # syncs: the timing below is honest
    state.step += 1
    now = time.perf_counter()
    rows = state.history["train"]
    row = {
        "step": state.step,
        "loss": loss,
        "grad_norm": float(metrics["grad_norm"]),
        "lr": float(run.schedule(state.step - 1)),
        "tokens_seen": (rows[-1]["tokens_seen"] if rows else 0) + tc.tokens_per_step,
        "tokens_per_s": tc.tokens_per_step / max(now - clock[1], 1e-9),
        "time_s": now - clock[0],
    }
    clock[1] = now
    rows.append(row)
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"loss became {loss} at step {state.step}; lower lr ({tc.lr}) or check the data"
        )
    if not bool(metrics["params_finite"]):
        raise FloatingPointError(
            f"the update of step {state.step} made parameter(s) {_non_finite(state.params)} "
            f"NaN or infinite (its loss, {loss}, was computed before the update); lower lr "
            f"({tc.lr}) or check the loss's gradient"
        )
    return row


def _non_finite(params: Any) -> list[str]:
    """Names of the (first three) leaves of ``params`` holding a NaN or an infinity."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    bad = [
        jax.tree_util.keystr(path, simple=True, separator=".")
        for path, leaf in flat
        if not np.isfinite(np.asarray(leaf)).all()
    ]
    return bad[:3] + (["..."] if len(bad) > 3 else [])


def _evaluate_into(run: _Run, state: TrainState) -> None:
    """Evaluate the current weights on the validation stream (if any): a row in history."""
    if run.valid_tokens is None:
        return
    tc = run.tc
    model = nnx.merge(run.graphdef, state.params, run.rest)
    result = evaluate(
        model,
        run.valid_tokens,
        batch_size=tc.batch_size,
        seq_len=tc.seq_len,
        max_batches=tc.eval_batches,
    )
    state.history["eval"].append(
        {
            "step": state.step,
            "val_loss": result["loss"],
            "val_perplexity": result["perplexity"],
            "val_tokens": result["tokens"],
        }
    )
    run.say(f"step {state.step}: val loss {result['loss']:.4f} (ppl {result['perplexity']:.2f})")


def _checkpoint(run: _Run, state: TrainState) -> None:
    """Save ``state`` as its step (once) and rewrite the metrics files; no-op without out_dir."""
    if run.ckpt_dir is None or run.out_dir is None or state.saved_step == state.step:
        return
    state.saved_step = state.step
    meta = {
        **run.meta,
        "step": state.step,
        "data_state": run.batcher.state(state.data),
        "history": state.history,
    }
    save_checkpoint(run.ckpt_dir, state.step, state.arrays, meta, keep=run.tc.keep_checkpoints)
    write_metrics(run.out_dir, state.history, run.meta)
