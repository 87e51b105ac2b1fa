"""Meshes and sharding: spread Gemma 2's parameters, optimizer state and batch over many chips.

The recipe is GSPMD's (Xu et al. 2021): name the axes of a device *mesh*, say for every array
which of its dimensions is split over which mesh axis (a ``PartitionSpec``), and let XLA insert
the collectives. Three mesh axes, as in MaxText and *How to Scale Your Model*:

* ``data``  — plain data parallelism: each group holds whole parameters, sees its own batch slice.
* ``fsdp``  — fully-sharded data parallelism (ZeRO-3, Rajbhandari et al. 2020): the batch *and*
  every parameter / optimizer moment are split; weights are all-gathered just in time.
* ``model`` — tensor (Megatron) parallelism: heads, MLP width and vocabulary are split, so each
  matmul is computed in pieces and activations are all-reduced.

Parameters carry *logical* axis names in their ``nnx.Param`` metadata (``logical_axes``, e.g.
attn.q, stored as rows (N, H, D), is ("heads", "head_dim", "embed")); :data:`DEFAULT_RULES` maps
logical names to mesh axes (embed -> fsdp; heads, kv_heads, mlp, vocab -> model; head_dim, norm
-> replicated). In the book's notation (its Notation page, ``book/notation.md``) attn.q is then
``W[N_model, H, D_fsdp]`` = ``P("model", None, "fsdp")``.

This module annotates and places; it never re-implements the model or the training step.
Training on a mesh is :func:`gemma2_lite.train.train` (or its step) given the mesh: the same
step as on one device, with :func:`train_shardings` as its in/out shardings. Typical use
(8 devices)::

    mesh = make_mesh({"data": 2, "fsdp": 2, "model": 2})
    model = sharded_init(get_config("tiny"), mesh)          # never whole on one device
    model, history = train(cfg, TrainConfig(...), tokens, model=model, mesh=mesh)
    model = load_hf_sharded("/path/to/gemma-2-2b", mesh)     # each device reads its slice

Multi-host TPU slices must call :func:`maybe_initialize_distributed` first (before any other
JAX call); on one host it does nothing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .checks import is_int
from .config import Gemma2Config
from .hf_checkpoint import load_hf
from .hf_config import read_hf_config
from .model import Gemma2, abstract_model
from .params import host_param, path_name

__all__ = [
    "MESH_AXES",
    "BATCH_AXES",
    "DEFAULT_RULES",
    "ShardingError",
    "make_mesh",
    "resolve_rules",
    "logical_to_spec",
    "param_specs",
    "state_shardings",
    "shard_state",
    "shard_model",
    "make_sharded_init",
    "sharded_init",
    "tree_shardings",
    "sharded_opt_init",
    "StepShardings",
    "train_shardings",
    "batch_sharding",
    "shard_batch",
    "make_placer",
    "load_hf_sharded",
    "sharded_forward",
    "shard_shape",
    "maybe_initialize_distributed",
]

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "model")
# The batch dimension of activations is split over both data-parallel axes.
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")

Rule = str | tuple[str, ...] | None
# MaxText's conventions. A logical name absent from the rules is replicated (None).
DEFAULT_RULES: dict[str, Rule] = {
    "embed": "fsdp",  # D: the dimension every weight has -> ZeRO-3 style sharding
    "heads": "model",  # N: attention computed head-parallel
    "kv_heads": "model",  # K
    "mlp": "model",  # F: Megatron column/row split of the feed-forward
    "vocab": "model",  # V: the big table, split for the logits matmul
    "head_dim": None,  # H: contracted inside one head; splitting it costs an all-reduce
    "norm": None,  # (D,) vectors: tiny, replicated
}


class ShardingError(ValueError):
    """A mesh or sharding rule that cannot be applied (bad axis sizes, indivisible dimension)."""


# ----------------------------------------------------------------------------- meshes
def make_mesh(
    shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
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
        raise ShardingError(
            f"unknown mesh axis name(s) {sorted(unknown)}; the axes are {MESH_AXES}"
        )
    sizes = {a: shape.get(a, 1) for a in MESH_AXES}
    for axis, size in sizes.items():
        if not is_int(size) or (size < 1 and size != -1):
            raise ShardingError(f"mesh axis {axis!r} must have a positive size or -1, got {size!r}")
    rest = [a for a, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise ShardingError(f"only one mesh axis may be -1 ('the rest'), got {rest}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if rest:
        if n % known:
            raise ShardingError(
                f"cannot fill mesh axis {rest[0]!r}: the other axes use {known} "
                f"devices, which does not divide the {n} available"
            )
        sizes[rest[0]] = n // known
    total = math.prod(sizes.values())
    if total != n:
        raise ShardingError(
            f"mesh {sizes} needs {total} devices but {n} are available; the axis sizes must "
            f"multiply to the device count (use -1 for one axis to take the rest)"
        )
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
            raise ShardingError(
                f"rule {name!r} -> {target!r} names unknown mesh axis {bad}; "
                f"use one of {MESH_AXES} or None"
            )
        merged[name] = target
    return merged


def logical_to_spec(
    logical_axes: Sequence[str | None], rules: Mapping[str, Rule] | None = None
) -> P:
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


def _check_divisible(
    name: str, shape: Sequence[int], spec: P, mesh: Mesh, logical_axes: Sequence[str | None]
) -> None:
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
                f"{label!r} to another axis (or None) in the rules"
            )


def _logical_axes(var: nnx.Variable) -> tuple[str | None, ...] | None:
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    axes = meta.get("logical_axes")
    return None if axes is None else tuple(axes)


def _spec_for(
    path: Sequence[Any], var: nnx.Variable, mesh: Mesh | None, rules: Mapping[str, Rule]
) -> P:
    axes = _logical_axes(var)
    shape = tuple(getattr(var, "shape", ()))
    if axes is None:
        return P()  # no logical names (step counters, rng state): replicate
    if len(axes) != len(shape):
        raise ShardingError(
            f"{path_name(path)} has shape {shape} but logical_axes {axes} "
            f"({len(axes)} names for {len(shape)} dimensions)"
        )
    spec = logical_to_spec(axes, rules)
    if mesh is not None:
        _check_divisible(path_name(path), shape, spec, mesh, axes)
    return spec


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def param_specs(
    state: nnx.State, rules: Mapping[str, Rule] | None = None, mesh: Mesh | None = None
) -> nnx.State:
    """The PartitionSpec of every variable of ``state`` (same tree, a spec per variable).

    Variables with ``logical_axes`` metadata (parameters, and optimizer moments, which inherit
    it) follow the rules; others (step counters) are replicated. With ``mesh`` every sharded
    dimension is checked to divide by its mesh axis.
    """
    rules = resolve_rules(rules)
    flat = [(path, _spec_for(path, var, mesh, rules)) for path, var in nnx.to_flat_state(state)]
    return nnx.from_flat_state(flat)


def state_shardings(
    state: nnx.State, mesh: Mesh, rules: Mapping[str, Rule] | None = None
) -> nnx.State:
    """A ``NamedSharding`` for every variable of ``state`` (usable as jit's out_shardings)."""
    specs = param_specs(state, rules, mesh)
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P)
    )


def shard_shape(shape: Sequence[int], spec: P, mesh: Mesh) -> tuple[int, ...]:
    """The per-device shape of a ``shape`` array laid out as ``spec`` on ``mesh``."""
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    return tuple(s // _axis_size(mesh, e) for s, e in zip(shape, entries))


def shard_state(state: nnx.State, mesh: Mesh, rules: Mapping[str, Rule] | None = None) -> nnx.State:
    """``state`` with every array moved to its sharding (a device-to-device reshard)."""
    return jax.device_put(state, state_shardings(state, mesh, rules))


def shard_model(model: Gemma2, mesh: Mesh, rules: Mapping[str, Rule] | None = None) -> Gemma2:
    """Place every parameter of ``model`` as the rules say; returns the (same) model.

    The model is updated in place. For a model too large for one device use
    :func:`sharded_init` or :func:`load_hf_sharded` instead, which never build it whole.
    """
    nnx.update(model, shard_state(nnx.state(model), mesh, rules))
    return model


def make_sharded_init(
    config: Gemma2Config, mesh: Mesh, rules: Mapping[str, Rule] | None = None, seed: int = 0
) -> tuple[nnx.GraphDef, Callable[[], nnx.State]]:
    """The pieces of :func:`sharded_init`: the model's graphdef and a jitted ``create()`` that
    returns its state already sharded (``create.lower().compile().memory_analysis()`` shows
    each device allocating only its shards)."""
    graphdef, abstract_state = nnx.split(abstract_model(config))
    shardings = state_shardings(abstract_state, mesh, rules)

    def create() -> nnx.State:
        return nnx.state(Gemma2(config, rngs=nnx.Rngs(seed)))

    return graphdef, jax.jit(create, out_shardings=shardings)


def sharded_init(
    config: Gemma2Config, mesh: Mesh, rules: Mapping[str, Rule] | None = None, seed: int = 0
) -> Gemma2:
    """A randomly initialised model created directly in its sharded layout.

    The constructor runs inside ``jax.jit`` whose ``out_shardings`` come from the abstract model
    (``nnx.eval_shape``) and the rules, so XLA partitions the random initialisation itself:
    each device generates only its own shard and no device ever holds a whole weight.
    Same values as ``Gemma2(config, rngs=nnx.Rngs(seed))`` up to float rounding (jit fuses the
    initialisers differently; the random bits are identical since threefry is partitionable).
    """
    graphdef, create = make_sharded_init(config, mesh, rules, seed)
    return nnx.merge(graphdef, create())


def tree_shardings(tree: Any, mesh: Mesh, rules: Mapping[str, Rule] | None = None) -> Any:
    """A ``NamedSharding`` for every array of any pytree holding nnx Variables: parameters,
    and an optax state built from them (AdamW's mu and nu are ``zeros_like`` copies of the
    parameters and keep their ``logical_axes``, so the rules shard them like the parameters:
    with ``embed -> fsdp`` that is ZeRO-3's partitioned optimizer state). Arrays without
    logical axes (a step counter, an rng key) are replicated. The result is a tree prefix of
    ``tree``, usable as ``jax.jit``'s in/out shardings."""
    rules = resolve_rules(rules)

    def one(path: Sequence[Any], x: Any) -> NamedSharding:
        spec = _spec_for(path, x, mesh, rules) if isinstance(x, nnx.Variable) else P()
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_var)


def sharded_opt_init(
    tx: optax.GradientTransformation,
    params: Any,
    mesh: Mesh,
    rules: Mapping[str, Rule] | None = None,
) -> Any:
    """``tx.init(params)`` computed on the mesh, each moment born in its parameter's layout."""
    shardings = tree_shardings(jax.eval_shape(tx.init, params), mesh, rules)
    return jax.jit(tx.init, out_shardings=shardings)(params)


@dataclass(frozen=True)
class StepShardings:
    """Where the training state lives on a mesh (made by :func:`train_shardings`).

    params, opt_state, rest: ``NamedSharding`` trees (prefixes of those pytrees); batch: the
    (B, ...) batch's sharding; replicated: for the rng and the metrics.
    """

    params: Any
    opt_state: Any
    rest: Any
    batch: Any
    replicated: Any


def train_shardings(
    params: Any, opt_state: Any, rest: Any, mesh: Mesh, rules: Mapping[str, Rule] | None = None
) -> StepShardings:
    """The :class:`StepShardings` that make :func:`~gemma2_lite.train.make_train_step` a
    sharded step: parameters and optimizer state in their rule-given layout (in and out, so
    the donated buffers are reused), the batch split over ("data", "fsdp"), the rng and the
    metrics replicated."""
    return StepShardings(
        params=tree_shardings(params, mesh, rules),
        opt_state=tree_shardings(opt_state, mesh, rules),
        rest=tree_shardings(rest, mesh, rules),
        batch=batch_sharding(mesh),
        replicated=NamedSharding(mesh, P()),
    )


# ----------------------------------------------------------------------------- batches
def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a (B, ...) batch: B split over ("data", "fsdp"), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(x: Any, mesh: Mesh) -> jax.Array:
    """Put a (B, ...) array on the mesh with B split over ("data", "fsdp")."""
    x = jnp.asarray(x) if not isinstance(x, (np.ndarray, jax.Array)) else x
    ways = _axis_size(mesh, BATCH_AXES)
    if x.shape[0] % ways:
        raise ShardingError(
            f"batch of {x.shape[0]} is not divisible by the data-parallel "
            f"mesh axes {BATCH_AXES} ({ways} ways); use a multiple of {ways}"
        )
    return jax.device_put(x, batch_sharding(mesh, x.ndim))


# ----------------------------------------------------------------------------- checkpoints
def make_placer(
    config: Gemma2Config, mesh: Mesh, rules: Mapping[str, Rule] | None = None
) -> Callable[[tuple[Any, ...], np.ndarray], jax.Array]:
    """A ``place(path, array)`` for :func:`gemma2_lite.checkpoint.from_arrays` / ``load_hf``.

    Each parameter becomes a global ``jax.Array`` in its sharded layout, built with
    ``jax.make_array_from_callback``: every device asks only for its own slice of the (possibly
    memory-mapped) numpy array, so a host reads only what its devices hold, and checks its
    values there (finite; within float16's range when the model computes in float16).
    """
    abstract = abstract_model(config)
    shardings = dict(
        nnx.to_flat_state(state_shardings(nnx.state(abstract, nnx.Param), mesh, rules))
    )
    dtype = config.jnp_param_dtype
    float16 = "float16" in (config.dtype, config.param_dtype)

    def place(path: tuple[Any, ...], array: np.ndarray) -> jax.Array:
        if tuple(path) not in shardings:
            raise ShardingError(
                f"no sharding for parameter {path_name(path)}; is the checkpoint for this config?"
            )
        sharding = shardings[tuple(path)]
        return jax.make_array_from_callback(
            array.shape,
            sharding,
            lambda index: host_param(array[index], dtype, path_name(path), float16=float16),
        )

    return place


def load_hf_sharded(
    path: str | os.PathLike,
    mesh: Mesh,
    rules: Mapping[str, Rule] | None = None,
    dtype: Any = None,
    *,
    param_dtype: Any = None,
    **config_overrides: Any,
) -> Gemma2:
    """:func:`gemma2_lite.checkpoint.load_hf` with every parameter put straight onto its shards."""
    config = read_hf_config(path, dtype, param_dtype, **config_overrides)
    return load_hf(
        path,
        dtype,
        param_dtype=param_dtype,
        place=make_placer(config, mesh, rules),
        **config_overrides,
    )


# ----------------------------------------------------------------------------- forward
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
