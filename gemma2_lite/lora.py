"""Low-rank adaptation (LoRA): fine-tune a frozen Gemma 2 through small adapters.

Hu et al. (2021): instead of updating a weight :math:`W` (``d_in x d_out``), learn
:math:`A` (``d_in x r``) and :math:`B` (``r x d_out``) with ``r`` small and use

    W' = W + (alpha / r) * A @ B

:math:`B` starts at zero, so the adapted model starts *equal* to the base model; only A and B
train (they are ``nnx.LoRAParam``, a subclass of ``nnx.Param``), so the optimizer keeps moments
for ``r (d_in + d_out)`` numbers per projection instead of ``d_in d_out``.

    model = apply_lora(base, rank=8, alpha=16, targets=("q", "v"), rngs=nnx.Rngs(0))
    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)   # only adapters train
    plain = merge(model)                     # a plain Gemma2 with W' stored: same logits
    save_adapters(model, "out/")             # adapter_config.json + adapter_model.safetensors

How it hooks in. Every projection of the model core reads its weight as ``self.q[...]``
(:class:`~gemma2_lite.attention.Attention`, :class:`~gemma2_lite.layers.FeedForward`).
:func:`apply_lora` replaces such a weight by a :class:`LoRAWeight`, a module whose ``[...]``
returns ``W + (alpha / r) A B`` in the weight's own layout, so the core is not touched. The
low-rank product is formed once per forward (``2 r d_in d_out`` FLOPs per projection, whatever
the number of tokens) instead of per token (``x A B``: ``2 r (d_in + d_out)`` per token); the
two give the same logits (the chapter checks it).

A token the base model never learnt (the book's model never saw ``<start_of_turn>`` or
``<end_of_turn>`` in pretraining: their embedding rows are still random) is learnt badly through
low-rank updates of the projections alone: its frozen row of the tied embedding decides both how
the token is read and how likely it is to be written. ``apply_lora(..., trainable_tokens=ids)``
also trains those rows of the embedding, as PEFT's ``trainable_token_indices`` does
(:class:`TokenRows`).

The base weight can be anything that answers ``[...]`` with an array and has ``.shape``: a plain
``nnx.Param``, or (QLoRA, Dettmers et al. 2023) a projection of a model that
:func:`gemma2_lite.quantize.quantize` stored as int8 rows, which :func:`apply_lora` wraps in
:class:`Dequantized` (``values * scale``, formed in the forward pass; the int8 values stay as they
are and never train). :class:`LoRAWeight` reads ``base[...]`` and nothing else, and :func:`merge`
needs only that too (a merged QLoRA model is float32: quantize it again to serve it in int8).

Serving: ``generate`` takes an adapted model as it is (every projection reads its
``LoRAWeight`` through ``[...]``), and ``merge(model)`` first gives a plain model with the same
logits (faster to decode: nothing to add per step).

Adapters on disk use Hugging Face PEFT's layout for ``Gemma2ForCausalLM``: ``adapter_config.json``
(``peft_type: LORA``, ``r``, ``lora_alpha``, ``target_modules``) and
``adapter_model.safetensors`` with tensors
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` (r, d_in) and
``...lora_B.weight`` (d_out, r) (and, with trainable tokens,
``base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta`` (k, D): the new
rows, which PEFT copies over the old ones), rows and columns in Hugging Face's flattened order (see
:mod:`gemma2_lite.checkpoint`'s table), so ``PeftModel.from_pretrained`` reads what
:func:`save_adapters` writes, and :func:`load_adapters` reads PEFT's files.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .checkpoint import CheckpointError, read_safetensors, write_safetensors
from .layers import RowProjection
from .lora_weights import Dequantized, LoRAWeight, TokenRows, logical_axes
from .model import Gemma2
from .train import TrainConfig, make_optimizer, make_train_step, split_trainable

__all__ = [
    "TARGETS",
    "HF_NAMES",
    "LoRAWeight",
    "TokenRows",
    "Dequantized",
    "apply_lora",
    "merge",
    "lora_state",
    "count_lora_params",
    "adapter_state_dict",
    "adapter_config",
    "save_adapters",
    "load_adapters",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "finetune",
    "ema",
]

#: The projections an adapter can sit on: name -> (sub-module of a block, input axes of the
#: weight as the model stores it, rows (out..., in...); the other axes are outputs).
TARGETS: dict[str, tuple[str, tuple[int, ...]]] = {
    "q": ("attn", (2,)),  # (N, H, D): D in, (N, H) out
    "k": ("attn", (2,)),  # (K, H, D)
    "v": ("attn", (2,)),  # (K, H, D)
    "o": ("attn", (1, 2)),  # (D, N, H): (N, H) in, D out
    "gate": ("mlp", (1,)),  # (F, D)
    "up": ("mlp", (1,)),  # (F, D)
    "down": ("mlp", (1,)),  # (D, F)
}
#: Our names -> Hugging Face's module names inside ``model.layers.{i}`` (PEFT's target_modules).
HF_NAMES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model.model.layers."
_TOKENS_KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


def _resolve_targets(targets: Iterable[str]) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = (targets,)
    by_hf = {v.split(".")[-1]: k for k, v in HF_NAMES.items()}
    out = []
    for t in targets:
        name = by_hf.get(t, t)
        if name not in TARGETS:
            raise ValueError(
                f"unknown LoRA target {t!r}; choose from {list(TARGETS)} (or the "
                f"Hugging Face names {list(by_hf)})"
            )
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError("targets is empty: name at least one projection, e.g. ('q', 'v')")
    return tuple(out)


def _copy(model: Gemma2) -> Gemma2:
    """A new module tree holding the same (immutable) arrays."""
    return nnx.merge(*nnx.split(model))


def apply_lora(
    model: Gemma2,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Iterable[str] = tuple(TARGETS),
    rngs: nnx.Rngs | None = None,
    *,
    use_rslora: bool = False,
    trainable_tokens: Iterable[int] = (),
) -> Gemma2:
    """The model with a rank-``rank`` adapter on each of ``targets`` in every layer.

    targets: names from :data:`TARGETS` (``q k v o gate up down``) or Hugging Face's
    (``q_proj`` ...). alpha: the adapters are scaled by alpha / rank. rngs: draws A (default
    ``nnx.Rngs(0)``). trainable_tokens: token ids whose embedding rows train too
    (:class:`TokenRows`; e.g. chat markers the base never saw). The input model is left as it
    was; the returned one shares its base arrays (they are immutable) and, since B = 0 and the
    new rows start as copies, computes exactly the same logits until it is trained. Raises
    ``ValueError`` for a bad rank, an unknown target or token id, or a model that already has
    adapters.
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    names = _resolve_targets(targets)
    if count_lora_params(model):
        raise ValueError(
            "this model already has LoRA adapters; merge(model) first to stack "
            "another set on the merged weights"
        )
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    ids = sorted({int(i) for i in trainable_tokens})
    vocab = model.config.vocab_size
    if any(not 0 <= i < vocab for i in ids):
        raise ValueError(f"trainable_tokens must be ids in [0, {vocab}), got {ids}")
    out = _copy(model)
    if ids:
        if isinstance(out.embedder.embedding, RowProjection):
            raise ValueError(
                "trainable_tokens needs a float embedding table; this model's "
                "is stored as (int8) rows: add the rows before quantizing"
            )
        # TokenRows stands in for the Param (read with [...]); the model is typed for the Param
        out.embedder.embedding = TokenRows(out.embedder.embedding, ids)  # type: ignore[assignment]
    for block in out.layers:
        for name in names:
            module, in_axes = TARGETS[name]
            parent = getattr(block, module)
            base = getattr(parent, name)
            if isinstance(base, RowProjection):  # QLoRA: an int8 (or rows) base
                base = Dequantized(base)
            limit = min(
                math.prod(base.shape[i] for i in in_axes),
                math.prod(base.shape) // math.prod(base.shape[i] for i in in_axes),
            )
            if rank > limit:
                raise ValueError(f"rank {rank} exceeds the smaller side ({limit}) of {name}")
            setattr(
                parent,
                name,
                LoRAWeight(
                    base, in_axes, int(rank), float(alpha), rngs=rngs, use_rslora=use_rslora
                ),
            )
    return out


def _adapters(model: Gemma2) -> list[tuple[int, str, Any, LoRAWeight]]:
    """(layer, target name, parent module, weight) of every adapter, in layer order."""
    found = []
    for i, block in enumerate(model.layers):
        for name, (module, _) in TARGETS.items():
            parent = getattr(block, module)
            w = getattr(parent, name)
            if isinstance(w, LoRAWeight):
                found.append((i, name, parent, w))
    return found


def merge(model: Gemma2) -> Gemma2:
    """A plain :class:`~gemma2_lite.model.Gemma2` whose weights are ``W + (alpha / r) A B``
    (in the base weight's dtype; float32 over an int8 base, whose other projections stay int8
    rows): no adapters left, the same logits, the model core's speed. A model without adapters
    comes back as a copy."""
    out = _copy(model)
    for _, name, parent, w in _adapters(out):
        meta: dict[str, Any] = {"logical_axes": logical_axes(w.base, len(w.shape))}
        setattr(parent, name, nnx.Param(w[...], **meta))
    table = out.embedder.embedding
    if isinstance(table, TokenRows):
        out.embedder.embedding = nnx.Param(table[...], logical_axes=logical_axes(table.base, 2))
    return out


def lora_state(model: Gemma2) -> nnx.State:
    """The adapters alone (``nnx.state(model, nnx.LoRAParam)``): what trains and what is saved."""
    return nnx.state(model, nnx.LoRAParam)


def count_lora_params(model: Gemma2) -> int:
    """Number of adapter parameters (0 for a plain model)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lora_state(model)))


# ----------------------------------------------------------------------------- PEFT layout
def _flat_in_out(w: LoRAWeight) -> tuple[np.ndarray, np.ndarray]:
    """A as (d_in, r) and B as (r, d_out), inputs and outputs in Hugging Face's flat order."""
    a = np.asarray(w.lora_a[...], np.float32)
    b = np.asarray(w.lora_b[...], np.float32)
    return a.reshape(-1, w.rank), b.reshape(w.rank, -1)


def adapter_state_dict(model: Gemma2) -> dict[str, np.ndarray]:
    """The adapters as PEFT names them for ``Gemma2ForCausalLM``, float32:
    ``...layers.{i}.{module}.lora_A.weight`` (r, d_in) and ``lora_B.weight`` (d_out, r)."""
    out = {}
    for i, name, _, w in _adapters(model):
        a, b = _flat_in_out(w)
        key = f"{_PREFIX}{i}.{HF_NAMES[name]}"
        out[f"{key}.lora_A.weight"] = np.ascontiguousarray(a.T)
        out[f"{key}.lora_B.weight"] = np.ascontiguousarray(b.T)
    table = model.embedder.embedding
    if isinstance(table, TokenRows):
        out[_TOKENS_KEY] = np.asarray(table.rows[...], np.float32)
    return out


def adapter_config(model: Gemma2, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for the model's adapters (one rank and alpha for all)."""
    found = _adapters(model)
    if not found:
        raise ValueError("the model has no LoRA adapters (apply_lora first)")
    ranks = {(w.rank, w.alpha, w.use_rslora) for *_, w in found}
    if len(ranks) != 1:
        raise ValueError(f"adapters differ in (rank, alpha, use_rslora): {sorted(ranks)}")
    ((rank, alpha, rslora),) = ranks
    names = sorted({n for _, n, *_ in found}, key=list(TARGETS).index)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": [HF_NAMES[n].split(".")[-1] for n in names],
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": rslora,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "trainable_token_indices": list(model.embedder.embedding.ids)
        if isinstance(model.embedder.embedding, TokenRows)
        else None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
    }


def save_adapters(
    model: Gemma2, path: str | os.PathLike, *, base_model_name_or_path: str | None = None
) -> Path:
    """Write the adapters alone into folder ``path`` (created): ``adapter_config.json`` and
    ``adapter_model.safetensors`` in PEFT's layout (each written atomically). Returns ``path``."""
    path = Path(path)
    config = adapter_config(model, base_model_name_or_path)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / ADAPTER_WEIGHTS, adapter_state_dict(model))
    tmp = path / (ADAPTER_CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, path / ADAPTER_CONFIG)
    return path


def _read_adapter_config(path: Path) -> dict[str, Any]:
    file = path / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {path}: not a PEFT adapter folder")
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{file}: peft_type must be 'LORA', got "
            f"{cfg.get('peft_type') if isinstance(cfg, dict) else cfg!r}"
        )
    unsupported = {
        "use_dora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    for key, want in unsupported.items():
        if cfg.get(key, want) not in (want, None) and not (want == {} and not cfg.get(key)):
            raise CheckpointError(f"{file}: {key}={cfg[key]!r} is not supported (want {want!r})")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise CheckpointError(f"{file}: r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise CheckpointError(f"{file}: lora_alpha must be a positive number, got {alpha!r}")
    return cfg


def load_adapters(model: Gemma2, path: str | os.PathLike) -> Gemma2:
    """``model`` (a plain Gemma2, the base) with the adapters saved in folder ``path`` (PEFT's
    layout, e.g. by :func:`save_adapters` or ``PeftModel.save_pretrained``).

    The config and every tensor's name and shape are checked before anything is built; a
    missing, extra or mis-shaped tensor raises :class:`~gemma2_lite.checkpoint.CheckpointError`
    naming it.
    """
    path = Path(path)
    cfg = _read_adapter_config(path)
    targets = cfg.get("target_modules")
    if isinstance(targets, str) or not isinstance(targets, list):
        raise CheckpointError(
            f"{path / ADAPTER_CONFIG}: target_modules must be a list of "
            f"module names, got {targets!r}"
        )
    try:
        names = _resolve_targets(targets)
    except ValueError as exc:
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: {exc}") from None
    tensors = (
        read_safetensors(path / ADAPTER_WEIGHTS) if (path / ADAPTER_WEIGHTS).is_file() else None
    )
    if tensors is None:
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {path}")
    ids = _token_indices(cfg, path)
    try:
        out = apply_lora(
            model,
            cfg["r"],
            float(cfg["lora_alpha"]),
            names,
            use_rslora=bool(cfg.get("use_rslora", False)),
            trainable_tokens=ids,
        )
    except ValueError as exc:
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: {exc}") from None
    expected: dict[str, tuple[Any, str, tuple[int, ...]]] = {}  # key: (module, attr, shape)
    if ids:
        table = out.embedder.embedding
        expected[_TOKENS_KEY] = (table, "rows", tuple(table.rows.shape))
    for i, name, _, w in _adapters(out):
        key = f"{_PREFIX}{i}.{HF_NAMES[name]}"
        a, b = _flat_in_out(w)
        expected[f"{key}.lora_A.weight"] = (w, "lora_a", a.T.shape)
        expected[f"{key}.lora_B.weight"] = (w, "lora_b", b.T.shape)
    tensors = {_strip_adapter_name(k): v for k, v in tensors.items()}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{path / ADAPTER_WEIGHTS}: missing {missing[:4]}, unexpected "
            f"{extra[:4]} (for a {model.config.num_layers}-layer model with "
            f"targets {list(names)})"
        )
    for key, (w, attr, shape) in expected.items():
        t = tensors[key]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{key}: expected shape {shape}, found {tuple(t.shape)}")
        if not np.issubdtype(t.dtype, np.floating) and t.dtype.name != "bfloat16":
            raise CheckpointError(f"{key}: a weight must be floating point, found {t.dtype}")
        var = getattr(w, attr)
        value = np.asarray(t, np.float32)
        var[...] = jnp.asarray(value if attr == "rows" else value.T.reshape(var.shape))
    return out


def _token_indices(cfg: dict[str, Any], path: Path) -> list[int]:
    """``trainable_token_indices`` of a PEFT config: a list, or {"embed_tokens": list}."""
    raw = cfg.get("trainable_token_indices")
    if raw is None:
        return []
    if isinstance(raw, dict):
        unknown = set(raw) - {"embed_tokens"}
        if unknown:
            raise CheckpointError(
                f"{path / ADAPTER_CONFIG}: trainable tokens on {sorted(unknown)}"
                " are not supported (only embed_tokens)"
            )
        raw = raw.get("embed_tokens", [])
    if not isinstance(raw, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in raw
    ):
        raise CheckpointError(
            f"{path / ADAPTER_CONFIG}: trainable_token_indices must be a "
            f"list of token ids, got {raw!r}"
        )
    if len(set(raw)) != len(raw):
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: trainable_token_indices repeats ids")
    return raw


def _strip_adapter_name(key: str) -> str:
    """PEFT strips the adapter name ('.default') when saving; accept files that kept it."""
    return re.sub(r"\.lora_([AB])\.[^.]+\.weight$", r".lora_\1.weight", key)


# ----------------------------------------------------------------------------- training
_STEPS: dict[Any, Callable[..., Any]] = {}


def ema(anchor: Any, params: Any, rate: float) -> Any:
    """``(1 - rate) * anchor + rate * params``, leaf by leaf (an exponential moving average)."""
    return jax.tree.map(lambda a, p: ((1.0 - rate) * a + rate * p).astype(a.dtype), anchor, params)


def finetune(
    model: Gemma2,
    batches: Callable[[int, Gemma2], tuple[Any, Any]],
    tc: TrainConfig,
    loss_fn: Callable[..., jax.Array],
    *,
    reference: Gemma2 | None = None,
    anchor_rate: float | None = None,
) -> tuple[Gemma2, list[dict[str, float]]]:
    """Train only the adapters of ``model`` for ``tc.steps`` steps through the one training
    step, :func:`gemma2_lite.train.make_train_step` (AdamW as ``tc`` says; the base weights are
    passed as the step's frozen ``rest``). Returns the trained model and per-step
    ``{"loss", "grad_norm"}``.

    batches(step, current_model) -> (batch int32 (B, T + 1), mask): the step's data; the
    current model is there for on-policy methods, which sample from it. ``mask`` reaches
    ``loss_fn(logits, targets, reference_logits, rng, mask)`` as it is (an array, or any pytree
    of arrays a loss needs, e.g. per-row advantages). reference: a frozen model whose logits
    (gradient stopped) are the loss's third argument (DPO's and GRPO's reference, a
    distillation teacher). anchor_rate: instead, the reference is the policy's own exponential
    moving average, updated after every step (WARP's anchor): its adapters become
    ``(1 - anchor_rate) * anchor + anchor_rate * policy``.
    """
    if not count_lora_params(model):
        raise ValueError("finetune trains adapters: apply_lora(model, ...) first")
    if anchor_rate is not None and (reference is not None or not 0 < anchor_rate <= 1):
        raise ValueError("anchor_rate must be in (0, 1], and only without a reference")
    graphdef, params, rest = split_trainable(model, nnx.LoRAParam)
    ref_graph: nnx.GraphDef | None = None  # neither: no reference logits
    ref_state: nnx.State | None = None
    if anchor_rate is not None:
        ref_graph, anchor = graphdef, jax.tree.map(jnp.copy, params)
    elif reference is not None:
        ref_graph, ref_state = nnx.split(reference)
    key = (graphdef, ref_graph, loss_fn, tc.replace(seed=0, progress=False))
    if key not in _STEPS:
        _STEPS[key] = make_train_step(graphdef, make_optimizer(tc), loss_fn, ref_graph)
    step, tx = _STEPS[key], make_optimizer(tc)
    params = jax.tree.map(jnp.copy, params)  # the step donates its inputs
    opt_state, rng = tx.init(params), jax.random.key(tc.seed)
    history = []
    for i in range(tc.steps):
        batch, mask = batches(i, nnx.merge(graphdef, params, rest))
        if anchor_rate is not None:
            ref_state = nnx.merge_state(anchor, rest)
        params, opt_state, rng, m = step(
            params, opt_state, rng, rest, ref_state, jnp.asarray(batch), mask
        )
        if anchor_rate is not None:
            anchor = ema(anchor, params, anchor_rate)
        history.append({k: float(v) for k, v in m.items()})
    return nnx.merge(graphdef, params, rest), history
