"""Meshes and sharding: spread Gemma 2's parameters, optimizer state and batch over many chips.

The recipe is GSPMD's (Xu et al. 2021): name the axes of a device *mesh*, say for every array
which of its dimensions is split over which mesh axis (a ``PartitionSpec``), and let XLA insert
the collectives. Three mesh axes, as in MaxText and *How to Scale Your Model*:

* ``data``  — plain data parallelism: each group holds whole parameters, sees its own batch slice.
* ``fsdp``  — fully-sharded data parallelism (ZeRO-3, Rajbhandari et al. 2020): the batch *and* every
  parameter / optimizer moment are split; weights are all-gathered just in time.
* ``model`` — tensor (Megatron) parallelism: heads, MLP width and vocabulary are split, so each
  matmul is computed in pieces and activations are all-reduced.

Parameters carry *logical* axis names in their ``nnx.Param`` metadata (``logical_axes``, e.g.
attn.q is ("heads", "embed", "head_dim")); :data:`DEFAULT_RULES` maps logical names to mesh axes
(embed -> fsdp; heads, kv_heads, mlp, vocab -> model; head_dim, norm -> replicated). In the
book's notation (its Notation page, ``book/notation.md``) attn.q is then ``W[N_model, D_fsdp, H]``
= ``P("model", "fsdp", None)``.

Typical use (8 devices)::

    mesh = make_mesh({"data": 2, "fsdp": 2, "model": 2})
    model = sharded_init(get_config("tiny"), mesh)          # never whole on one device
    optimizer = make_optimizer(model, optax.adamw(1e-3), mesh)  # moments sharded like params
    step = make_train_step(model, optimizer, mesh)
    loss = step(model, optimizer, tokens, mask)              # batch split over (data, fsdp)
    model = load_hf_sharded("/path/to/gemma-2-2b", mesh)     # each device reads its slice

Multi-host TPU slices must call :func:`maybe_initialize_distributed` first (before any other
JAX call); on one host it does nothing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .config import Gemma2Config
from .model import Gemma2

__all__ = ["MESH_AXES", "BATCH_AXES", "DEFAULT_RULES", "ShardingError", "make_mesh",
           "resolve_rules", "logical_to_spec", "param_specs", "state_shardings", "shard_state",
           "shard_model", "make_sharded_init", "sharded_init", "make_optimizer", "batch_sharding", "shard_batch",
           "make_placer", "load_hf_sharded", "next_token_loss", "forward_with_remat",
           "make_train_step", "sharded_forward", "shard_shape", "maybe_initialize_distributed"]

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "model")
# The batch dimension of activations is split over both data-parallel axes.
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")

Rule = str | tuple[str, ...] | None
# MaxText's conventions. A logical name absent from the rules is replicated (None).
DEFAULT_RULES: dict[str, Rule] = {
    "embed": "fsdp",        # D: the dimension every weight has -> ZeRO-3 style sharding
    "heads": "model",       # N: attention computed head-parallel
    "kv_heads": "model",    # K
    "mlp": "model",         # F: Megatron column/row split of the feed-forward
    "vocab": "model",       # V: the big table, split for the logits matmul
    "head_dim": None,       # H: contracted inside one head; splitting it costs an all-reduce
    "norm": None,           # (D,) vectors: tiny, replicated
}


class ShardingError(ValueError):
    """A mesh or sharding rule that cannot be applied (bad axis sizes, indivisible dimension)."""


# ----------------------------------------------------------------------------- meshes
def make_mesh(shape: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes ("data", "fsdp", "model") over ``devices`` (default: all of them).

    ``shape`` gives each axis's size, e.g. ``{"data": 2, "fsdp": 2, "model": 2}``; axes left
    out get size 1 and one axis may be ``-1`` ("all the devices left"). The default is pure
    FSDP, ``{"fsdp": -1}``. The sizes must multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    shape = dict({"fsdp": -1} if shape is None else shape)
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ShardingError(f"unknown mesh axis name(s) {sorted(unknown)}; "
                            f"the axes are {MESH_AXES}")
    sizes = {a: shape.get(a, 1) for a in MESH_AXES}
    for axis, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (
                size < 1 and size != -1):
            raise ShardingError(f"mesh axis {axis!r} must have a positive size or -1, "
                                f"got {size!r}")
    rest = [a for a, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise ShardingError(f"only one mesh axis may be -1 ('the rest'), got {rest}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if rest:
        if n % known:
            raise ShardingError(f"cannot fill mesh axis {rest[0]!r}: the other axes use {known} "
                                f"devices, which does not divide the {n} available")
        sizes[rest[0]] = n // known
    total = math.prod(sizes.values())
    if total != n:
        raise ShardingError(
            f"mesh {sizes} needs {total} devices but {n} are available; the axis sizes must "
            f"multiply to the device count (use -1 for one axis to take the rest)")
    axis_shapes = tuple(int(sizes[a]) for a in MESH_AXES)
    # Auto axes: GSPMD propagates shardings through the program (jax.make_mesh also orders
    # devices by the physical torus on TPUs, so neighbours on an axis are neighbours in ICI).
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(axis_shapes, MESH_AXES, axis_types=auto)
    return Mesh(np.array(devices).reshape(axis_shapes), MESH_AXES, axis_types=auto)


# ----------------------------------------------------------------------------- rules and specs
def resolve_rules(rules: Mapping[str, Rule] | None = None) -> dict[str, Rule]:
    """:data:`DEFAULT_RULES` updated with ``rules`` (a dict overriding some logical names)."""
    merged = dict(DEFAULT_RULES)
    for name, target in (rules or {}).items():
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        bad = [t for t in targets if t not in MESH_AXES]
        if bad:
            raise ShardingError(f"rule {name!r} -> {target!r} names unknown mesh axis {bad}; "
                                f"use one of {MESH_AXES} or None")
        merged[name] = target
    return merged


def logical_to_spec(logical_axes: Sequence[str | None],
                    rules: Mapping[str, Rule] | None = None) -> P:
    """The PartitionSpec of an array with these logical axis names.

    ``("heads", "embed", "head_dim")`` -> ``P("model", "fsdp", None)`` with the default rules.
    A mesh axis may split only one dimension of an array: if two logical names map to the same
    mesh axis, the first dimension gets it and the later one is replicated.
    """
    rules = resolve_rules(rules)
    used: set[str] = set()
    spec: list[Rule] = []
    for name in logical_axes:
        target = rules.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(t for t in targets if t not in used)
        used.update(targets)
        spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return P(*spec)


def _axis_size(mesh: Mesh, entry: Rule) -> int:
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    return math.prod(mesh.shape[a] for a in names)


def _check_divisible(name: str, shape: Sequence[int], spec: P, mesh: Mesh,
                     logical_axes: Sequence[str | None]) -> None:
    for dim, (size, entry) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
        if entry is None:
            continue
        ways = _axis_size(mesh, entry)
        if size % ways:
            label = logical_axes[dim] if dim < len(logical_axes) else "?"
            axis = entry if isinstance(entry, str) else "x".join(entry)
            raise ShardingError(
                f"{name} dim {dim} ({label}={size}) is not divisible by mesh axis {axis!r} "
                f"({ways}); choose a mesh whose {axis!r} size divides {size}, or map "
                f"{label!r} to another axis (or None) in the rules")


def _path_name(path: Sequence[Any]) -> str:
    return ".".join(str(p) for p in path)


def _logical_axes(var: nnx.Variable) -> tuple[str | None, ...] | None:
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    axes = meta.get("logical_axes")
    return None if axes is None else tuple(axes)


def _spec_for(path: Sequence[Any], var: nnx.Variable, mesh: Mesh | None,
              rules: Mapping[str, Rule]) -> P:
    axes = _logical_axes(var)
    shape = tuple(getattr(var, "shape", ()))
    if axes is None:
        return P()                      # no logical names (step counters, rng state): replicate
    if len(axes) != len(shape):
        raise ShardingError(f"{_path_name(path)} has shape {shape} but logical_axes {axes} "
                            f"({len(axes)} names for {len(shape)} dimensions)")
    spec = logical_to_spec(axes, rules)
    if mesh is not None:
        _check_divisible(_path_name(path), shape, spec, mesh, axes)
    return spec


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def param_specs(state: nnx.State, rules: Mapping[str, Rule] | None = None,
                mesh: Mesh | None = None) -> nnx.State:
    """The PartitionSpec of every variable of ``state`` (same tree, a spec per variable).

    Variables with ``logical_axes`` metadata (parameters, and optimizer moments, which inherit
    it) follow the rules; others (step counters) are replicated. With ``mesh`` every sharded
    dimension is checked to divide by its mesh axis.
    """
    rules = resolve_rules(rules)
    flat = [(path, _spec_for(path, var, mesh, rules)) for path, var in nnx.to_flat_state(state)]
    return nnx.from_flat_state(flat)


def state_shardings(state: nnx.State, mesh: Mesh,
                    rules: Mapping[str, Rule] | None = None) -> nnx.State:
    """A ``NamedSharding`` for every variable of ``state`` (usable as jit's out_shardings)."""
    specs = param_specs(state, rules, mesh)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                        is_leaf=lambda x: isinstance(x, P))


def shard_shape(shape: Sequence[int], spec: P, mesh: Mesh) -> tuple[int, ...]:
    """The per-device shape of a ``shape`` array laid out as ``spec`` on ``mesh``."""
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    return tuple(s // _axis_size(mesh, e) for s, e in zip(shape, entries))


def shard_state(state: nnx.State, mesh: Mesh, rules: Mapping[str, Rule] | None = None
                ) -> nnx.State:
    """``state`` with every array moved to its sharding (a device-to-device reshard)."""
    return jax.device_put(state, state_shardings(state, mesh, rules))


def shard_model(model: Gemma2, mesh: Mesh, rules: Mapping[str, Rule] | None = None) -> Gemma2:
    """Place every parameter of ``model`` as the rules say; returns the (same) model.

    The model is updated in place. For a model too large for one device use
    :func:`sharded_init` or :func:`load_hf_sharded` instead, which never build it whole.
    """
    nnx.update(model, shard_state(nnx.state(model), mesh, rules))
    return model


def make_sharded_init(config: Gemma2Config, mesh: Mesh, rules: Mapping[str, Rule] | None = None,
                      seed: int = 0) -> tuple[nnx.GraphDef, Callable[[], nnx.State]]:
    """The pieces of :func:`sharded_init`: the model's graphdef and a jitted ``create()`` that
    returns its state already sharded (``create.lower().compile().memory_analysis()`` shows
    each device allocating only its shards)."""
    abstract = nnx.eval_shape(lambda: Gemma2(config, rngs=nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    def create() -> nnx.State:
        return nnx.state(Gemma2(config, rngs=nnx.Rngs(seed)))

    return graphdef, jax.jit(create, out_shardings=shardings)


def sharded_init(config: Gemma2Config, mesh: Mesh, rules: Mapping[str, Rule] | None = None,
                 seed: int = 0) -> Gemma2:
    """A randomly initialised model created directly in its sharded layout.

    The constructor runs inside ``jax.jit`` whose ``out_shardings`` come from the abstract model
    (``nnx.eval_shape``) and the rules, so XLA partitions the random initialisation itself:
    each device generates only its own shard and no device ever holds a whole weight.
    Same values as ``Gemma2(config, rngs=nnx.Rngs(seed))`` up to float rounding (jit fuses the
    initialisers differently; the random bits are identical since threefry is partitionable).
    """
    graphdef, create = make_sharded_init(config, mesh, rules, seed)
    return nnx.merge(graphdef, create())


def make_optimizer(model: Gemma2, tx: optax.GradientTransformation, mesh: Mesh,
                   rules: Mapping[str, Rule] | None = None) -> nnx.Optimizer:
    """``nnx.Optimizer(model, tx, wrt=nnx.Param)`` with its state sharded like the parameters.

    AdamW's moments mu and nu mirror each parameter (and inherit its ``logical_axes``), so the
    same rules shard them: with ``embed -> fsdp`` that is ZeRO-3's partitioned optimizer state.
    The moments start as ``zeros_like`` of already-sharded params, so they are born sharded.
    """
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    nnx.update(optimizer, shard_state(nnx.state(optimizer), mesh, rules))
    return optimizer


# ----------------------------------------------------------------------------- batches
def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a (B, ...) batch: B split over ("data", "fsdp"), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(x: Any, mesh: Mesh) -> jax.Array:
    """Put a (B, ...) array on the mesh with B split over ("data", "fsdp")."""
    x = jnp.asarray(x) if not isinstance(x, (np.ndarray, jax.Array)) else x
    ways = _axis_size(mesh, BATCH_AXES)
    if x.shape[0] % ways:
        raise ShardingError(f"batch of {x.shape[0]} is not divisible by the data-parallel "
                            f"mesh axes {BATCH_AXES} ({ways} ways); use a multiple of {ways}")
    return jax.device_put(x, batch_sharding(mesh, x.ndim))


# ----------------------------------------------------------------------------- checkpoints
def make_placer(config: Gemma2Config, mesh: Mesh, rules: Mapping[str, Rule] | None = None
                ) -> Callable[[tuple[Any, ...], np.ndarray], jax.Array]:
    """A ``place(path, array)`` for :func:`gemma2_lite.checkpoint.from_arrays` / ``load_hf``.

    Each parameter becomes a global ``jax.Array`` in its sharded layout, built with
    ``jax.make_array_from_callback``: every device asks only for its own slice of the (possibly
    memory-mapped) numpy array, so a host reads only what its devices hold.
    """
    abstract = nnx.eval_shape(lambda: Gemma2(config, rngs=nnx.Rngs(0)))
    shardings = dict(nnx.to_flat_state(state_shardings(nnx.state(abstract, nnx.Param), mesh,
                                                       rules)))
    dtype = config.jnp_param_dtype

    def place(path: tuple[Any, ...], array: np.ndarray) -> jax.Array:
        if tuple(path) not in shardings:
            raise ShardingError(f"no sharding for parameter {_path_name(path)}; "
                                f"is the checkpoint for this config?")
        sharding = shardings[tuple(path)]
        return jax.make_array_from_callback(
            array.shape, sharding, lambda index: np.asarray(array[index]).astype(dtype))

    return place


def load_hf_sharded(path: str | os.PathLike, mesh: Mesh, rules: Mapping[str, Rule] | None = None,
                    dtype: Any = jnp.float32, *, param_dtype: Any = None,
                    **config_overrides: Any) -> Gemma2:
    """:func:`gemma2_lite.checkpoint.load_hf` with every parameter put straight onto its shards."""
    from .checkpoint import load_hf, read_hf_config

    config = read_hf_config(path, dtype, param_dtype, **config_overrides)
    return load_hf(path, dtype, param_dtype=param_dtype,
                   place=make_placer(config, mesh, rules), **config_overrides)


# ----------------------------------------------------------------------------- training
def forward_with_remat(model: Gemma2, tokens: jax.Array, attention_mask: jax.Array | None = None,
                       ) -> jax.Array:
    """The model's forward pass with every block rematerialised (``nnx.remat``).

    Same logits as ``model(tokens, attention_mask)``; the backward pass keeps only each block's
    input (B, T, D) and recomputes the rest, trading ~1/3 more FLOPs for far less memory.
    """
    from .layers import soft_cap
    from .model import positions_from_mask

    c = model.config
    valid = (jnp.ones(tokens.shape, bool) if attention_mask is None
             else jnp.asarray(attention_mask).astype(bool))
    positions = positions_from_mask(valid)
    x = model.embedder.encode(tokens, c.jnp_dtype)                               # (B, T, D)

    @nnx.remat
    def run_block(block: nnx.Module, x: jax.Array) -> jax.Array:
        return block(x, positions, valid)[0]

    for block in model.layers:
        x = run_block(block, x)
    logits = model.embedder.decode(model.final_norm(x)).astype(jnp.float32)     # (B, T, V)
    return soft_cap(logits, c.final_logit_softcap)


def next_token_loss(model: Gemma2, tokens: jax.Array, mask: jax.Array,
                    remat: bool = False) -> jax.Array:
    """Mean cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1] (padding ignored).

    tokens: int (B, T); mask: (B, T), 1 for real tokens. Returns a float32 scalar.
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    in_mask, weights = mask[:, :-1], mask[:, 1:].astype(jnp.float32)
    logits = (forward_with_remat(model, inputs, in_mask) if remat
              else model(inputs, in_mask))                                       # (B, T-1, V)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)        # (B, T-1)
    return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_train_step(model: Gemma2, optimizer: nnx.Optimizer, mesh: Mesh,
                    rules: Mapping[str, Rule] | None = None, *, remat: bool = False,
                    ) -> Callable[[Gemma2, nnx.Optimizer, jax.Array, jax.Array], jax.Array]:
    """A jitted AdamW step with explicit shardings: ``step(model, optimizer, tokens, mask)``.

    Parameters and optimizer state go in and come out in their rule-given layout (the old
    buffers are donated); tokens/mask (B, T) are split over ("data", "fsdp"). XLA inserts the
    all-gathers of fsdp-sharded weights and the reduce-scatter of their gradients. The model and
    optimizer are updated in place; the step returns the loss (float32 scalar).
    """
    graphdef, state = nnx.split((model, optimizer))
    shardings = state_shardings(state, mesh, rules)
    grad_shardings = state_shardings(nnx.state(model, nnx.Param), mesh, rules)
    data = batch_sharding(mesh)

    def step(state: nnx.State, tokens: jax.Array, mask: jax.Array
             ) -> tuple[nnx.State, jax.Array]:
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(next_token_loss)(model, tokens, mask, remat)
        # Gradients in their parameters' layout: fsdp-split weights get reduce-scattered
        # gradients, and the partitioner is not left to guess an intermediate layout.
        grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    jitted = jax.jit(step, in_shardings=(shardings, data, data),
                     out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)

    def run(model: Gemma2, optimizer: nnx.Optimizer, tokens: jax.Array, mask: jax.Array
            ) -> jax.Array:
        tokens, mask = shard_batch(tokens, mesh), shard_batch(mask, mesh)
        new_state, loss = jitted(nnx.state((model, optimizer)), tokens, mask)
        nnx.update((model, optimizer), new_state)
        return loss

    run.jitted = jitted          # for .lower(...).compile().memory_analysis() / cost_analysis()
    run.shardings = shardings
    return run


@nnx.jit
def _forward(model: Gemma2, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    return model(tokens, mask)


def sharded_forward(model: Gemma2, tokens: Any, mesh: Mesh, mask: Any = None) -> jax.Array:
    """Logits (B, T, V) float32 of a sharded model, with the batch split over ("data", "fsdp")."""
    tokens = jnp.asarray(tokens)
    mask = jnp.ones(tokens.shape, jnp.int32) if mask is None else jnp.asarray(mask)
    return _forward(model, shard_batch(tokens, mesh), shard_batch(mask, mesh))


# ----------------------------------------------------------------------------- multi-host
_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def _multi_host_env(env: Mapping[str, str]) -> bool:
    """Whether the environment describes a job spanning several hosts."""
    if any(env.get(k) for k in _DISTRIBUTED_ENV):
        return True
    for key in ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        try:
            if int(env.get(key, "1")) > 1:
                return True
        except ValueError:
            pass
    # Cloud TPU VMs list every worker of the slice (comma separated) on each host.
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h.strip()]) > 1


def maybe_initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
    """Call ``jax.distributed.initialize()`` when (and only when) this is a multi-host job.

    A TPU pod slice (v5e-16 and up, v4-16 and up) runs one Python process per host; each must
    call ``jax.distributed.initialize()`` before any other JAX call so that ``jax.devices()``
    lists the whole slice (``jax.local_devices()`` stays this host's chips). On Cloud TPU it
    finds the coordinator by itself; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
    and JAX_PROCESS_ID (or run under SLURM / Open MPI). On one host (a laptop, Colab's v5e-1,
    Kaggle's v5e-8, this book's CPU emulation) it does nothing. Safe to call twice.
    Returns True if JAX is (now) running distributed.
    """
    env = os.environ if env is None else env
    is_init = getattr(jax.distributed, "is_initialized", lambda: False)
    if is_init():
        return True
    if not _multi_host_env(env):
        return False
    jax.distributed.initialize()
    return True
