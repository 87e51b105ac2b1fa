"""A memory planner: bytes per device for training and serving Gemma 2 on a mesh.

For a config, a mesh ({"data": d, "fsdp": f, "model": m}), a global batch of B sequences of T
tokens and the sharding rules of :mod:`gemma2_lite.sharding`, it counts per device:

* parameters, gradients, AdamW's two fp32 moments (mu, nu) and, when the weights are kept in
  bfloat16, an optional fp32 master copy — all split exactly as the rules split the weights
  (ZeRO-3: everything is divided by f and by m);
* activations saved for the backward pass, from an explicit per-token, per-layer formula
  (:func:`activation_bytes`), with and without rematerialising each block;
* the KV cache for decoding, with a ring buffer of W slots for local layers or without.

The activation formula counts exactly the residuals JAX's autodiff saves for *this* package's
forward pass (tests check it against ``jax.ad_checkpoint``'s list). With a = activation bytes
(4 fp32, 2 bf16), S = keys per query (= T here: the sliding-window mask is applied to a full
T x T score matrix; a windowed kernel would have min(W, T) for local layers) and
m the ``model`` axis size (heads, F and V are split by it, D is not)::

    per token, per layer:  (48 + 2a) D                      four RMSNorms (fp32 inside) + residuals
                         + a (2 N H + 2 K H + 8 F) / m      q, k, v, attention out; GeGLU's 8 F-wide
                         + 32                               RMSNorm row statistics
                         + ((17 + a) S + 8) N / m           soft-capped scores: 4 fp32, mask, probs
    per token, once:       (12 + a) D + 12 V / m + 20       final norm; logits, soft-cap, softmax
                         + 4 H                              RoPE sin/cos, built once, shared
    per layer, once:       16 D                             the four norm scales, broadcast
    once:                  4 D                              final norm scale

With every block rematerialised only the block inputs are kept: a D per token per layer, plus
S bytes per token for each kind of layer (the bool masks, built once per forward, that the blocks
are called with), and, at the peak, one block's residuals while it is recomputed during the
backward pass.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from .config import Gemma2Config, get_config
from .params import param_infos, path_name
from .sharding import BATCH_AXES, MESH_AXES, Rule, ShardingError, logical_to_spec

__all__ = [
    "GiB",
    "Chip",
    "CHIPS",
    "Setup",
    "REPORT_SETUPS",
    "MemoryPlan",
    "param_shard_elements",
    "activation_bytes",
    "kv_cache_bytes",
    "plan_memory",
    "comm_bytes",
    "plan_table",
    "format_bytes",
]

GiB = 2**30


@dataclass(frozen=True)
class Chip:
    """An accelerator: its name and high-bandwidth memory per chip, in bytes."""

    name: str
    hbm_bytes: int


# HBM per chip from the vendors' specifications (How to Scale Your Model tabulates the TPUs).
CHIPS: dict[str, Chip] = {
    "tpu-v5e": Chip("TPU v5e", 16 * GiB),
    "tpu-v4": Chip("TPU v4", 32 * GiB),
    "tpu-v5p": Chip("TPU v5p", 95 * GiB),
    "h100": Chip("H100 (80 GB)", 80 * GiB),
}


@dataclass(frozen=True)
class Setup:
    """A training set-up: a preset on ``chips`` chips of a kind, laid out as ``mesh``."""

    config: str
    chip: str
    mesh: Mapping[str, int]
    batch: int
    seq: int
    note: str = ""

    @property
    def chips(self) -> int:
        return math.prod(self.mesh.values())


# The Gemma 2 report's training set-ups. Its "data" replicas shard optimizer state ZeRO-3
# style, which in this package's vocabulary is the fsdp axis. The report gives no per-chip
# batch: one 8192-token sequence per data-parallel rank is this book's assumption.
REPORT_SETUPS: tuple[Setup, ...] = (
    Setup(
        "gemma2-2b",
        "tpu-v5e",
        {"fsdp": 512},
        batch=512,
        seq=8192,
        note="512 TPUv5e, 512-way data (ZeRO-3)",
    ),
    Setup(
        "gemma2-9b",
        "tpu-v4",
        {"fsdp": 1024, "model": 4},
        batch=1024,
        seq=8192,
        note="4096 TPUv4, 1024 data x 4 model",
    ),
    Setup(
        "gemma2-27b",
        "tpu-v5p",
        {"fsdp": 768, "model": 8},
        batch=768,
        seq=8192,
        note="6144 TPUv5p, 768 data x 8 model",
    ),
)


def format_bytes(n: float) -> str:
    """Human-readable bytes in powers of 1024 ('1.50 GiB')."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def _mesh_sizes(mesh: Mapping[str, int] | Any) -> dict[str, int]:
    shape = (
        dict(mesh.shape) if hasattr(mesh, "shape") and not isinstance(mesh, Mapping) else dict(mesh)
    )
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ShardingError(
            f"unknown mesh axis name(s) {sorted(unknown)}; the axes are {MESH_AXES}"
        )
    for axis, size in shape.items():
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ShardingError(
                f"mesh axis {axis!r} must have a positive integer size, got {size!r}"
            )
    return {a: int(shape.get(a, 1)) for a in MESH_AXES}


def _ways(sizes: Mapping[str, int], entry: Rule) -> int:
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    return math.prod(sizes[a] for a in names)


@functools.lru_cache(maxsize=32)
def _weights(config: Gemma2Config) -> tuple[tuple[str, tuple[int, ...], tuple, int], ...]:
    """(name, shape, logical_axes, copies) of every weight: one layer's weights (from
    :func:`gemma2_lite.params.param_infos`) are counted L times, named ``layers.*.``."""
    out = []
    for path, info in param_infos(config.replace(num_layers=1)).items():
        copies = config.num_layers if path[0] == "layers" else 1
        name = path_name(path).replace("layers.0.", "layers.*.")
        out.append((name, info.shape, info.logical_axes, copies))
    return tuple(out)


def param_shard_elements(
    config: Gemma2Config, mesh: Mapping[str, int] | Any, rules: Mapping[str, Rule] | None = None
) -> tuple[int, list[str]]:
    """Parameters held per device under the rules, and which weights split unevenly.

    A dimension that its mesh axis does not divide is padded by XLA to the next multiple, so a
    device holds ceil(dim / ways) rows; such weights are listed ("embedder.embedding dim 1").
    """
    sizes = _mesh_sizes(mesh)
    total, uneven = 0, []
    for name, shape, axes, copies in _weights(config):
        spec = tuple(logical_to_spec(axes, rules))
        spec += (None,) * (len(shape) - len(spec))
        local = []
        for dim, (size, entry) in enumerate(zip(shape, spec)):
            ways = _ways(sizes, entry)
            if size % ways:
                uneven.append(f"{name} dim {dim} ({size} over {ways})")
            local.append(-(-size // ways))
        total += math.prod(local) * copies
    return total, uneven


def _bytes(dtype: str | Any) -> int:
    return int(np.dtype(jax.numpy.dtype(dtype)).itemsize)


def activation_bytes(
    config: Gemma2Config,
    tokens: int,
    seq: int,
    *,
    model_ways: int = 1,
    remat: bool = False,
    peak: bool = True,
    act_dtype: Any = None,
    flash: bool = False,
    logits_chunk: int | None = None,
) -> int:
    """Bytes of activations kept for the backward pass: ``tokens`` tokens (B x T on this device)
    of sequences with ``seq`` keys per query, ``model_ways``-way tensor parallelism.

    The formula is in the module docstring. Without remat all L layers' residuals are kept.
    With a checkpoint around each block only the L block inputs (and the mask and positions
    the blocks are called with) are saved; with ``peak`` the residuals of the one block being
    recomputed during the backward pass are added, since they are live at the same time.
    ``peak=False`` gives exactly what crosses from the forward to the backward pass.

    Two what-ifs for implementations this package does not have: ``flash`` — a fused attention
    kernel keeps only a per-row log-sum-exp (4 N / m bytes) instead of the S-wide scores;
    ``logits_chunk`` — the loss is computed over chunks of that many tokens, so only one
    chunk's (tokens, V) logits are alive at a time.
    """
    c = config
    a = _bytes(act_dtype or c.dtype)
    d, n, k, h, f, v, layers = (
        c.d_model,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.ffn_dim,
        c.vocab_size,
        c.num_layers,
    )
    m = model_ways
    scores = 4 * n / m if flash else ((17 + a) * seq + 8) * n / m
    per_token_layer = (48 + 2 * a) * d + a * (2 * n * h + 2 * k * h + 8 * f) / m + 32 + scores
    # The rotation table (sin, cos: 4 H bytes) is built once per forward and shared by layers.
    per_token_once = (12 + a) * d + 20 + 4 * h
    logit_tokens = tokens if logits_chunk is None else min(tokens, logits_chunk)
    logits = logit_tokens * 12 * v / m  # fp32 logits, soft-capped, softmax
    per_layer_once = 16 * d
    once = 4 * d + logits  # the final norm's broadcast scale
    if not remat:
        return int(
            round(
                tokens * (layers * per_token_layer + per_token_once)
                + layers * per_layer_once
                + once
            )
        )
    # Block inputs (a D per token per layer) + the bool masks the blocks are called with: one
    # (T, S) mask per kind of layer (global, local), built once per forward.
    kinds = len(set(c.layer_types))
    kept = tokens * (layers * a * d + per_token_once + kinds * seq) + once
    if peak:
        kept += tokens * per_token_layer + per_layer_once
    return int(round(kept))


def kv_cache_bytes(
    config: Gemma2Config,
    batch: int,
    length: int,
    *,
    ring_buffer: bool = True,
    cache_dtype: Any = None,
    batch_ways: int = 1,
    model_ways: int = 1,
) -> int:
    """Bytes per device of a KV cache for ``batch`` sequences of up to ``length`` positions.

    Each layer keeps k and v (B, S, K, H) plus int32 positions (B, S) and an int32 count of
    the columns written (4 bytes per layer, on every device); global layers have
    S = length, local layers S = min(W, length) with a ring buffer (S = length without).
    The batch is split ``batch_ways`` ways and the K heads ``model_ways`` ways.
    """
    c = config
    b = -(-batch // batch_ways)
    kv = -(-c.num_kv_heads // model_ways)
    itemsize = _bytes(cache_dtype or c.dtype)
    total = 0
    for i in range(c.num_layers):
        w = c.window_for_layer(i)
        slots = min(w, length) if (w is not None and ring_buffer) else length
        total += b * slots * (2 * kv * c.head_dim * itemsize + 4) + 4
    return total


@dataclass
class MemoryPlan:
    """Per-device bytes of one training / serving set-up (see :func:`plan_memory`)."""

    name: str
    mesh: dict[str, int]
    chip: Chip | None
    batch: int
    seq: int
    params: int
    grads: int
    optimizer: int
    master: int
    activations: int
    activations_remat: int
    kv_cache: int
    kv_cache_no_ring: int
    uneven: list[str] = field(default_factory=list)

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def state(self) -> int:
        """Parameters + gradients + optimizer state (+ master copy)."""
        return self.params + self.grads + self.optimizer + self.master

    @property
    def train(self) -> int:
        return self.state + self.activations

    @property
    def train_remat(self) -> int:
        return self.state + self.activations_remat

    def fits(self, remat: bool = True) -> bool | None:
        """Whether training fits in the chip's HBM (None without a chip)."""
        if self.chip is None:
            return None
        return (self.train_remat if remat else self.train) <= self.chip.hbm_bytes

    def row(self) -> dict[str, Any]:
        g = lambda x: round(x / GiB, 2)  # noqa: E731
        mesh = " x ".join(f"{s} {a}" for a, s in self.mesh.items() if s > 1) or "1 device"
        return {
            "model": self.name,
            "chip": self.chip.name if self.chip else "-",
            "devices": self.devices,
            "mesh": mesh,
            "B x T": f"{self.batch} x {self.seq}",
            "params GiB": g(self.params),
            "grads GiB": g(self.grads),
            "adam GiB": g(self.optimizer),
            "master GiB": g(self.master),
            "acts GiB": g(self.activations),
            "acts remat GiB": g(self.activations_remat),
            "train GiB": g(self.train),
            "train remat GiB": g(self.train_remat),
            "HBM GiB": g(self.chip.hbm_bytes) if self.chip else None,
            "fits": self.fits(remat=False),
            "fits remat": self.fits(remat=True),
            "KV cache GiB": g(self.kv_cache),
            "KV no ring GiB": g(self.kv_cache_no_ring),
        }


def plan_memory(
    config: Gemma2Config | str,
    mesh: Mapping[str, int] | Any,
    *,
    batch: int,
    seq: int,
    chip: str | Chip | None = None,
    rules: Mapping[str, Rule] | None = None,
    param_dtype: Any = None,
    act_dtype: Any = None,
    master_fp32: bool | None = None,
    kv_batch: int | None = None,
    kv_length: int | None = None,
    flash: bool = False,
    logits_chunk: int | None = None,
) -> MemoryPlan:
    """Per-device memory of training ``config`` on ``mesh`` with a global batch of ``batch``
    sequences of ``seq`` tokens (and of a KV cache for ``kv_batch`` x ``kv_length``, default
    the same batch and the model's context).

    Parameters and gradients take ``param_dtype`` (default the config's); AdamW keeps two fp32
    moments and 8 bytes of step counters (Adam's and the learning-rate schedule's);
    ``master_fp32`` (default: on when the parameters are not fp32) adds an fp32 copy for the
    update. ``flash`` and ``logits_chunk`` are passed to :func:`activation_bytes`.
    """
    cfg = get_config(config) if isinstance(config, str) else config
    sizes = _mesh_sizes(mesh)
    if isinstance(chip, str) and chip not in CHIPS:
        raise KeyError(f"unknown chip {chip!r}; choose one of {sorted(CHIPS)}")
    chip_ = CHIPS[chip] if isinstance(chip, str) else chip
    pdt = param_dtype or cfg.param_dtype
    pbytes = _bytes(pdt)
    master = (pbytes != 4) if master_fp32 is None else master_fp32
    elems, uneven = param_shard_elements(cfg, sizes, rules)
    batch_ways = _ways(sizes, BATCH_AXES)
    local_batch = -(-batch // batch_ways)
    m = sizes["model"]
    act = dict(
        config=cfg,
        tokens=local_batch * seq,
        seq=seq,
        model_ways=m,
        act_dtype=act_dtype,
        flash=flash,
        logits_chunk=logits_chunk,
    )
    kv = dict(batch_ways=batch_ways, model_ways=m, cache_dtype=act_dtype)
    kv_b, kv_len = kv_batch or batch, kv_length or cfg.max_seq_len
    return MemoryPlan(
        name=cfg.name,
        mesh=sizes,
        chip=chip_,
        batch=batch,
        seq=seq,
        params=elems * pbytes,
        grads=elems * pbytes,
        optimizer=elems * 2 * 4 + 8,
        master=elems * 4 if master else 0,
        activations=activation_bytes(**act),
        activations_remat=activation_bytes(**act, remat=True),
        kv_cache=kv_cache_bytes(cfg, kv_b, kv_len, **kv),
        kv_cache_no_ring=kv_cache_bytes(cfg, kv_b, kv_len, ring_buffer=False, **kv),
        uneven=uneven,
    )


def comm_bytes(
    config: Gemma2Config | str,
    mesh: Mapping[str, int] | Any,
    *,
    batch: int,
    seq: int,
    dtype_bytes: int = 2,
    rules: Mapping[str, Rule] | None = None,
) -> dict[str, float]:
    """Bytes each device sends (≈ receives) per training step, by collective (ring algorithms).

    * data (d ways, weights replicated across it): gradient all-reduce, 2 (d-1)/d of the
      device's gradient bytes.
    * fsdp (f ways): all-gather each weight before its forward use and again for the backward
      (it is not kept), reduce-scatter its gradient: 3 x (f-1)/f x the bytes of the weights
      split over fsdp, as a device holds them after gathering.
    * model (m ways): Megatron-style, an all-reduce of the (B_local, T, D) activations after
      the attention output and after the FFN down projection, forward and backward, plus the
      embedding lookup: (4 L + 2) x 2 (m-1)/m x B_local T D bytes.
    """
    cfg = get_config(config) if isinstance(config, str) else config
    s = _mesh_sizes(mesh)
    d, f, m = s["data"], s["fsdp"], s["model"]
    local, _ = param_shard_elements(cfg, s, rules)
    weights = local * dtype_bytes  # on a device, sharded
    # What a device receives when gathering over fsdp: the gathered weights minus its own
    # slices; weights not split over fsdp (the norms) are not gathered at all.
    unsplit, _ = param_shard_elements(cfg, {**s, "fsdp": 1}, rules)
    gathered = (unsplit - local) * dtype_bytes
    tokens = -(-batch // (d * f)) * seq
    act = tokens * cfg.d_model * dtype_bytes
    return {
        "data all-reduce": 2 * (d - 1) / d * weights,
        "fsdp all-gather": 2 * gathered,
        "fsdp reduce-scatter": gathered,
        "model all-reduce": (4 * cfg.num_layers + 2) * 2 * (m - 1) / m * act,
    }


def plan_table(
    setups: Sequence[Setup] = REPORT_SETUPS, *, print_it: bool = True, **kwargs: Any
) -> list[dict[str, Any]]:
    """One row per set-up (see :meth:`MemoryPlan.row`), optionally printed as a table.

    Extra keyword arguments (``param_dtype="bfloat16"``, ``act_dtype=...``) go to
    :func:`plan_memory`.
    """
    rows = []
    for s in setups:
        plan = plan_memory(s.config, s.mesh, batch=s.batch, seq=s.seq, chip=s.chip, **kwargs)
        rows.append(plan.row())
    if print_it and rows:
        cols = list(rows[0])
        widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
        print("  ".join(c.rjust(widths[c]) for c in cols))
        for r in rows:
            print("  ".join(str(r[c]).rjust(widths[c]) for c in cols))
    return rows


# ----------------------------------------------------------------------------- LoRA
__all__ += ["lora_param_count", "plan_lora"]


def lora_param_count(
    config: Gemma2Config | str,
    rank: int,
    targets: Sequence[str] = ("q", "k", "v", "o", "gate", "up", "down"),
) -> int:
    """Adapter parameters of :func:`gemma2_lite.lora.apply_lora` on ``config``: r (d_in + d_out)
    per targeted projection per layer, read from the model's own weight shapes."""
    from .lora import TARGETS

    cfg = get_config(config) if isinstance(config, str) else config
    total = 0
    for name, shape, _, copies in _weights(cfg):
        parts = name.split(".")
        if parts[0] != "layers" or parts[-1] not in targets or parts[-1] not in TARGETS:
            continue
        d_in = math.prod(shape[i] for i in TARGETS[parts[-1]][1])
        total += copies * rank * (d_in + math.prod(shape) // d_in)
    return total


def plan_lora(
    config: Gemma2Config | str,
    *,
    rank: int,
    batch: int,
    seq: int,
    targets: Sequence[str] = ("q", "k", "v", "o", "gate", "up", "down"),
    chip: str | Chip | None = None,
    param_dtype: Any = None,
    act_dtype: Any = None,
    base_bytes: float | None = None,
    flash: bool = False,
    logits_chunk: int | None = None,
) -> MemoryPlan:
    """Memory of LoRA fine-tuning ``config`` on one device: the frozen base weights (no
    gradients, no optimizer state; ``base_bytes`` per weight, default the ``param_dtype``'s
    size, e.g. 1 for an int8 base: QLoRA, its per-channel scales, under 0.2% at D >= 2304, not
    counted), and float32 adapters with float32 gradients and AdamW's two float32 moments
    (16 bytes per adapter parameter). Activations are full fine-tuning's
    (:func:`activation_bytes`): the input of every projection is kept either way, since the
    adapters' gradients need it. In the returned :class:`MemoryPlan`, ``params`` holds base +
    adapters, ``grads`` and ``optimizer`` the adapters' alone, ``master`` 0."""
    cfg = get_config(config) if isinstance(config, str) else config
    full = plan_memory(
        cfg,
        {},
        batch=batch,
        seq=seq,
        chip=chip,
        param_dtype=param_dtype,
        act_dtype=act_dtype,
        master_fp32=False,
        flash=flash,
        logits_chunk=logits_chunk,
    )
    weights = full.params // _bytes(param_dtype or cfg.param_dtype)
    base = int(
        round(
            weights
            * (base_bytes if base_bytes is not None else _bytes(param_dtype or cfg.param_dtype))
        )
    )
    adapters = lora_param_count(cfg, rank, targets)
    return MemoryPlan(
        name=f"{cfg.name} + LoRA r={rank}",
        mesh=full.mesh,
        chip=full.chip,
        batch=batch,
        seq=seq,
        params=base + 4 * adapters,
        grads=4 * adapters,
        optimizer=8 * adapters + 8,
        master=0,
        activations=full.activations,
        activations_remat=full.activations_remat,
        kv_cache=full.kv_cache,
        kv_cache_no_ring=full.kv_cache_no_ring,
    )
