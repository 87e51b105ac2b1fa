"""The training step and its optimizer: AdamW with warm-up and cosine decay, the default loss,
and one jitted step for one device or a mesh.

* **Optimizer**: global-norm gradient clipping, then AdamW (decoupled weight decay on matrices
  only, not on norm scales) with a linear warm-up and cosine decay to ``min_lr_ratio * lr``.
* **Step**: one ``jax.jit``-compiled pure function of (params, optimizer state, rng, batch).
  The model is split once into a static graph, the variables that train (``nnx.Param`` by
  default, any nnx filter: e.g. only LoRA adapters) and the rest, which the step reads but
  never changes. The training state is then a plain pytree, which Orbax saves and restores
  directly and which makes a resumed run reproduce an uninterrupted one bit for bit on CPU.
* **Step cache**: :data:`STEP_CACHE` keeps the compiled step of the default objective, so
  runs of the same model and optimizer in one process (notebooks, tests) compile it once.

Shapes: B batch, T sequence length, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from .distill import distillation_loss, topk_distillation_loss
from .losses import cross_entropy_loss
from .sharding import StepShardings
from .train_config import TrainConfig

__all__ = [
    "LossFn",
    "lr_schedule",
    "make_optimizer",
    "make_loss_fn",
    "make_train_step",
    "split_trainable",
    "StepCache",
    "STEP_CACHE",
]

# loss_fn(student_logits (B,T,V) f32, targets (B,T) int32, teacher_logits (B,T,V) f32 | None,
#         rng uint32 (2,), mask (B,T) f32 | None: 1 = count the position) -> f32 scalar
LossFn = Callable[
    [jax.Array, jax.Array, "jax.Array | None", jax.Array, "jax.Array | None"], jax.Array
]


# ----------------------------------------------------------------------------- optimizer
def lr_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0 to ``lr`` over ``warmup`` steps, then cosine to ``min_lr_ratio*lr``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=tc.lr,
        warmup_steps=tc.warmup,
        decay_steps=max(tc.steps, tc.warmup + 1),
        end_value=tc.lr * tc.min_lr_ratio,
    )


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(clip) then AdamW(schedule); weight decay only on >= 2-D parameters.

    Norm scales are left undecayed: decaying them pulls (1 + scale) towards 1, a prior the
    model never asked for (common practice since GPT-2/T5-era training recipes).
    """
    adamw = optax.adamw(
        lr_schedule(tc),
        b1=tc.b1,
        b2=tc.b2,
        eps=tc.eps,
        weight_decay=tc.weight_decay,
        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
    )
    return optax.chain(optax.clip_by_global_norm(tc.clip), adamw) if tc.clip else adamw


def make_loss_fn(tc: TrainConfig, has_teacher: bool) -> LossFn:
    """The default objective: cross-entropy on the next token without a teacher; with one,
    :func:`~gemma2_lite.distill.distillation_loss` (or its top-k form when
    ``tc.distill_topk`` is set, the teacher's top-k taken inside the step — the same numbers
    a stored top-k file would give), mixed with the hard labels when ``tc.distill_alpha`` is set.
    """
    if not has_teacher:

        def hard_labels(
            logits: jax.Array,
            targets: jax.Array,
            teacher_logits: jax.Array | None,
            rng: jax.Array,
            mask: jax.Array | None = None,
        ) -> jax.Array:
            return cross_entropy_loss(logits, targets, mask)

        return hard_labels
    tau, alpha, k = tc.distill_temperature, tc.distill_alpha, tc.distill_topk

    def loss(
        logits: jax.Array,
        targets: jax.Array,
        teacher_logits: jax.Array | None,
        rng: jax.Array,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        assert teacher_logits is not None
        kw: dict[str, Any] = {"mask": mask}
        if alpha is not None:
            kw.update(alpha=alpha, targets=targets)
        if k is None:
            return distillation_loss(logits, teacher_logits, temperature=tau, **kw)
        values, ids = jax.lax.top_k(teacher_logits, k)  # (B, T, k)
        return topk_distillation_loss(logits, values, ids, temperature=tau, **kw)

    return loss


# ----------------------------------------------------------------------------- the step
def split_trainable(
    model: nnx.Module, trainable: Any = nnx.Param
) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, params, rest)``: the variables matching the nnx filter ``trainable`` (what
    the optimizer updates; default every ``nnx.Param``) and everything else (read, frozen).

    ``trainable=nnx.LoRAParam`` trains only LoRA adapters; the base weights then sit in
    ``rest``. Raises ``ValueError`` when the filter matches no variable.
    """
    # flax types split's result as variadic; two filters give exactly three parts
    graphdef, params, rest = nnx.split(model, trainable, ...)  # type: ignore[misc]
    if not jax.tree.leaves(params):
        raise ValueError(
            f"the filter trainable={trainable!r} matches no variable of the model: "
            "nothing would train"
        )
    return graphdef, params, rest


def _all_finite(tree: Any) -> jax.Array:
    """One bool scalar: every element of every leaf of ``tree`` is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_train_step(
    graphdef: Any,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    teacher_graph: Any = None,
    *,
    shardings: StepShardings | None = None,
    teacher_shardings: Any = None,
) -> Callable[..., Any]:
    """The one jitted training step, for one device or a mesh.

    For a model split as ``split_trainable(model, trainable)`` (``nnx.split(model, nnx.Param,
    ...)`` by default): ``step(params, opt_state, rng, rest, teacher_state, batch int32
    (B, T + 1), mask=None)`` returns ``(params, opt_state, rng, {"loss", "grad_norm",
    "params_finite"})``; the first three inputs are donated (updated in place); only
    ``params`` is differentiated and updated, ``rest`` is read as it is. ``params_finite``
    says every updated parameter is finite (the loss is computed before the update, so it
    cannot tell). ``mask`` (B, T), 1 = count the position, restricts the loss (e.g. to a
    chat's model turns). With ``teacher_graph`` the teacher (``nnx.merge(teacher_graph,
    teacher_state)``) runs inside the step and its logits, gradient stopped, go to ``loss_fn``.

    With ``shardings`` the same function is compiled with explicit in/out shardings: parameters
    and optimizer state go in and come out in their rule-given layout (so donation reuses the
    buffers), the batch is split over the data axes, and the gradients are constrained to the
    parameters' layout (fsdp-split weights get reduce-scattered gradients). XLA inserts the
    collectives; the arithmetic is the single-device step's.
    """

    def step_fn(
        params: Any,
        opt_state: Any,
        rng: jax.Array,
        rest: Any,
        teacher_state: Any,
        batch: jax.Array,
        mask: jax.Array | None = None,
    ) -> tuple[Any, Any, jax.Array, dict[str, jax.Array]]:
        inputs, targets = batch[:, :-1], batch[:, 1:]  # (B, T) each
        rng, sub = jax.random.split(rng)
        teacher_logits = None
        if teacher_graph is not None:
            t_model = nnx.merge(teacher_graph, teacher_state)
            teacher_logits = jax.lax.stop_gradient(t_model(inputs))  # (B, T, V)

        def objective(p: Any) -> jax.Array:
            logits = nnx.merge(graphdef, p, rest)(inputs)  # (B, T, V) f32
            return loss_fn(logits, targets, teacher_logits, sub, mask)

        loss, grads = jax.value_and_grad(objective)(params)
        if shardings is not None:
            grads = jax.lax.with_sharding_constraint(grads, shardings.params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (
            params,
            opt_state,
            rng,
            {"loss": loss, "grad_norm": grad_norm, "params_finite": _all_finite(params)},
        )

    if shardings is None:
        return jax.jit(step_fn, donate_argnums=(0, 1, 2))
    s = shardings
    return jax.jit(
        step_fn,
        donate_argnums=(0, 1, 2),
        in_shardings=(
            s.params,
            s.opt_state,
            s.replicated,
            s.rest,
            teacher_shardings,
            s.batch,
            s.batch,
        ),
        out_shardings=(s.params, s.opt_state, s.replicated, s.replicated),
    )


# ----------------------------------------------------------------------------- step cache
class StepCache:
    """Compiled training steps of the default objective (:func:`make_loss_fn`), kept across
    runs in one process: notebooks and tests train the same model often, and each compile
    costs seconds.

    A step is keyed by the model's graph, the teacher's graph, the trainable filter and every
    :class:`TrainConfig` field except :attr:`IGNORED` (fields that cannot change the compiled
    arithmetic: shapes retrace by themselves). A field added to TrainConfig later is part of
    the key unless it is listed there, so a new setting can cost a compile but never reuse a
    step compiled for another value.
    """

    IGNORED = frozenset(
        {
            "seed",
            "batch_size",
            "seq_len",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
            "keep_checkpoints",
            "progress",
        }
    )

    def __init__(self) -> None:
        self._steps: dict[Any, Callable[..., Any]] = {}

    def key(
        self, graphdef: Any, tc: TrainConfig, teacher_graph: Any = None, trainable: Any = nnx.Param
    ) -> tuple[Any, ...]:
        fields = tuple(
            (f.name, getattr(tc, f.name))
            for f in dataclasses.fields(tc)
            if f.name not in self.IGNORED
        )
        return graphdef, teacher_graph, trainable, fields

    def get(
        self, graphdef: Any, tc: TrainConfig, teacher_graph: Any = None, trainable: Any = nnx.Param
    ) -> Callable[..., Any]:
        """The step for the default objective of ``tc``, compiled on first use."""
        key = self.key(graphdef, tc, teacher_graph, trainable)
        if key not in self._steps:
            self._steps[key] = make_train_step(
                graphdef,
                make_optimizer(tc),
                make_loss_fn(tc, teacher_graph is not None),
                teacher_graph,
            )
        return self._steps[key]

    def clear(self) -> None:
        self._steps.clear()

    def __len__(self) -> int:
        return len(self._steps)


#: The process's step cache, used by :func:`gemma2_lite.train.train` unless given another.
STEP_CACHE = StepCache()
