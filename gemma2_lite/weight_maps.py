"""Weight names and layouts of every checkpoint format, as tables read by one routine.

Each format is a :class:`Table` of rows "our path(s) <-> their key", with a small named
:class:`Transform` that turns their tensor into ours and back (split or merge heads, transpose,
stack, cut the vocabulary's unused rows). :func:`import_arrays` reads any table one way,
:func:`export_arrays` the other; nothing else knows a format's names. The tables:

* :data:`HF` -- Hugging Face safetensors (``model.layers.{i}.self_attn.q_proj.weight`` ...).
* :func:`flax_table` -- the official Flax tree (the gemma library's nested params) and the
  released Orbax tree (flat module-path keys, the MLP one level deeper, ``gating_einsum``
  (2, D, F) in the 2B and (2, F, D) in the 9B/27B); ``qkv_einsum`` when N == K.

Their keys are flat strings; a nested tree is flattened with '/' first (:func:`flatten`).
Our paths are written ``layers.{i}.attn.q``; ``{i}`` is the layer index.

=========================  ===========  ==============================  ===========
gemma2_lite                shape        Hugging Face                    shape
=========================  ===========  ==============================  ===========
embedder.embedding         (V, D)       model.embed_tokens.weight       (V, D)
attn.q                     (N, H, D)    self_attn.q_proj.weight         (N*H, D)
attn.k / attn.v            (K, H, D)    self_attn.k_proj / v_proj       (K*H, D)
attn.o                     (D, N, H)    self_attn.o_proj.weight         (D, N*H)
mlp.gate / mlp.up          (F, D)       mlp.gate_proj / up_proj         (F, D)
mlp.down                   (D, F)       mlp.down_proj.weight            (D, F)
pre_attn_norm.scale etc.   (D,)         input_layernorm.weight etc.     (D,)
=========================  ===========  ==============================  ===========

Our projections are stored as rows (out..., in...), as Hugging Face stores them, so reading a
Hugging Face file only splits the heads out of an axis (a view: the file's memory is used in
place); the official Flax layout (q (N, D, H), o (N, H, D), gate (D, F), down (F, D)) is
transposed on the way in and out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import Gemma2Config
from .params import Path_
from .safetensors_io import CheckpointError

__all__ = [
    "Transform",
    "Rule",
    "Table",
    "IDENTITY",
    "TRANSPOSE",
    "VOCAB_ROWS",
    "OUT_HEADS",
    "FLAX_OUT",
    "split_heads",
    "stack",
    "then",
    "HF",
    "flax_table",
    "import_arrays",
    "export_arrays",
    "flatten",
    "nest",
]

Arrays = list[np.ndarray]


@dataclass(frozen=True)
class Transform:
    """Their tensors -> ours (``load``) and back (``save``); each takes (arrays, config).

    Most rows are one-to-one; :func:`stack` turns one of theirs into several of ours. ``load``
    checks what it needs of the input's shape and raises :class:`CheckpointError` without the
    tensor's name (the routine adds it); it returns views where it can, so a memory-mapped
    tensor is not read until it is used.
    """

    name: str
    load: Callable[[Arrays, Gemma2Config], Arrays]
    save: Callable[[Arrays, Gemma2Config], Arrays]


def _shape_error(expected: Any, found: Any) -> CheckpointError:
    return CheckpointError(f"expected shape {expected}, found {found}")


IDENTITY = Transform("identity", lambda a, c: a, lambda a, c: a)
TRANSPOSE = Transform(
    "transpose", lambda a, c: [np.swapaxes(a[0], -1, -2)], lambda a, c: [np.swapaxes(a[0], -1, -2)]
)


def _vocab_load(a: Arrays, c: Gemma2Config) -> Arrays:
    w = a[0]
    if w.ndim != 2 or w.shape[0] < c.vocab_size:
        raise CheckpointError(
            f"expected (V, D) with at least {c.vocab_size} rows, found shape {w.shape}"
        )
    return [w[: c.vocab_size]]


#: The official Flax embedding has 256128 rows for a 256000-token vocabulary: rows past the
#: config's vocabulary are dropped on load (never looked up); the export writes ours.
VOCAB_ROWS = Transform("vocab rows", _vocab_load, lambda a, c: a)


def split_heads(count: str) -> Transform:
    """Theirs (count*H, D) <-> ours (count, H, D); ``count`` names the config field (N or K)."""

    def load(a: Arrays, c: Gemma2Config) -> Arrays:
        n, h, d = getattr(c, count), c.head_dim, c.d_model
        if a[0].shape != (n * h, d):
            raise _shape_error((n * h, d), a[0].shape)
        return [a[0].reshape(n, h, d)]

    def save(a: Arrays, c: Gemma2Config) -> Arrays:
        return [a[0].reshape(-1, c.d_model)]

    return Transform(f"split heads ({count})", load, save)


def _out_load(a: Arrays, c: Gemma2Config) -> Arrays:
    n, h, d = c.num_heads, c.head_dim, c.d_model
    if a[0].shape != (d, n * h):
        raise _shape_error((d, n * h), a[0].shape)
    return [a[0].reshape(d, n, h)]


#: The attention output: theirs (D, N*H) <-> ours (D, N, H).
OUT_HEADS = Transform("split heads (output)", _out_load, lambda a, c: [a[0].reshape(c.d_model, -1)])

#: The official Flax attention output (N, H, D) <-> ours, rows (D, N, H).
FLAX_OUT = Transform(
    "output rows",
    lambda a, c: [np.transpose(a[0], (2, 0, 1))],
    lambda a, c: [np.transpose(a[0], (1, 2, 0))],
)


def stack(count: int) -> Transform:
    """Theirs (count, ...) <-> ``count`` of ours, stacked on a new first axis."""

    def load(a: Arrays, c: Gemma2Config) -> Arrays:
        w = a[0]
        if np.ndim(w) < 2 or np.shape(w)[0] != count:
            raise CheckpointError(
                f"expected {count} tensors stacked on the first axis, found shape {np.shape(w)}"
            )
        return [w[j] for j in range(count)]

    return Transform(f"stack {count}", load, lambda a, c: [np.stack(a)])


def then(first: Transform, each: Transform) -> Transform:
    """``first``, then ``each`` applied to every one of its outputs (e.g. unstack, transpose)."""

    def load(a: Arrays, c: Gemma2Config) -> Arrays:
        return [out for part in first.load(a, c) for out in each.load([part], c)]

    def save(a: Arrays, c: Gemma2Config) -> Arrays:
        return first.save([each.save([part], c)[0] for part in a], c)

    return Transform(f"{first.name}, {each.name}", load, save)


@dataclass(frozen=True)
class Rule:
    """Our path(s) <-> their key, through ``transform``. ``{i}`` in both: the layer index."""

    ours: tuple[str, ...]
    theirs: str
    transform: Transform = IDENTITY

    def layer_in(self, key: str) -> tuple[bool, int | None]:
        """Whether ``key`` is this row's key of theirs, and the layer index it names (None for
        a row without ``{i}``). Read with string operations: the index is the decimal digits
        between the key's fixed head and tail."""
        head, braces, tail = self.theirs.partition("{i}")
        if not braces:
            return key == self.theirs, None
        middle = key[len(head) : len(key) - len(tail)]
        ok = (
            len(key) > len(head) + len(tail)
            and key.startswith(head)
            and key.endswith(tail)
            and middle.isdecimal()
        )
        return ok, int(middle) if ok else None

    def our_paths(self, layer: int | None) -> list[Path_]:
        return [
            tuple(int(p) if p.isdigit() else p for p in name.replace("{i}", str(layer)).split("."))
            for name in self.ours
        ]

    def their_key(self, layer: int | None) -> str:
        return self.theirs.replace("{i}", str(layer))


@dataclass(frozen=True)
class Table:
    """A checkpoint format: rows, and keys of theirs that are tied copies of another
    (``{their key: the key it must equal}``: checked on import, not written on export)."""

    name: str
    rules: tuple[Rule, ...]
    tied: Mapping[str, str] = field(default_factory=dict)


def _layer_rules(
    prefix: str, rows: Sequence[tuple[str | tuple[str, ...], str, Transform]]
) -> tuple[Rule, ...]:
    return tuple(
        Rule((ours,) if isinstance(ours, str) else ours, prefix + theirs, t)
        for ours, theirs, t in rows
    )


HF = Table(
    "Hugging Face",
    (
        Rule(("embedder.embedding",), "model.embed_tokens.weight"),
        Rule(("final_norm.scale",), "model.norm.weight"),
        *_layer_rules(
            "model.layers.{i}.",
            [
                ("layers.{i}.attn.q", "self_attn.q_proj.weight", split_heads("num_heads")),
                ("layers.{i}.attn.k", "self_attn.k_proj.weight", split_heads("num_kv_heads")),
                ("layers.{i}.attn.v", "self_attn.v_proj.weight", split_heads("num_kv_heads")),
                ("layers.{i}.attn.o", "self_attn.o_proj.weight", OUT_HEADS),
                ("layers.{i}.mlp.gate", "mlp.gate_proj.weight", IDENTITY),
                ("layers.{i}.mlp.up", "mlp.up_proj.weight", IDENTITY),
                ("layers.{i}.mlp.down", "mlp.down_proj.weight", IDENTITY),
                ("layers.{i}.pre_attn_norm.scale", "input_layernorm.weight", IDENTITY),
                ("layers.{i}.post_attn_norm.scale", "post_attention_layernorm.weight", IDENTITY),
                ("layers.{i}.pre_ffw_norm.scale", "pre_feedforward_layernorm.weight", IDENTITY),
                ("layers.{i}.post_ffw_norm.scale", "post_feedforward_layernorm.weight", IDENTITY),
            ],
        ),
    ),
    tied={"lm_head.weight": "model.embed_tokens.weight"},
)

_FLAX_NORMS = {
    "pre_attn_norm": "pre_attention_norm",
    "post_attn_norm": "post_attention_norm",
    "pre_ffw_norm": "pre_ffw_norm",
    "post_ffw_norm": "post_ffw_norm",
}


def flax_table(*, released: bool = False, gating: str = "FD", qkv: bool = False) -> Table:
    """The official Flax layout (``released=False``: the gemma library's params, MLP weights
    directly under ``mlp``) or the released Orbax one (``released=True``: ``mlp/gating_einsum/w``,
    ``mlp/linear/w``). ``gating``: ``"FD"`` stores ``gating_einsum`` as (2, F, D) (the library,
    the 9B and 27B), ``"DF"`` as (2, D, F) (the released 2B). ``qkv``: one ``qkv_einsum`` (3, N,
    D, H), the layout the library uses when N == K, instead of ``q_einsum`` + ``kv_einsum``."""
    if gating not in ("DF", "FD"):
        raise ValueError(f"gating must be 'DF' (2B) or 'FD' (9B/27B), got {gating!r}")
    w = "/w" if released else ""
    # Ours are rows: q (N, H, D) from their (N, D, H), gate (F, D), down (D, F).
    gate = then(stack(2), TRANSPOSE) if gating == "DF" else stack(2)
    attn = (
        [
            (
                ("layers.{i}.attn.q", "layers.{i}.attn.k", "layers.{i}.attn.v"),
                "attn/qkv_einsum/w",
                then(stack(3), TRANSPOSE),
            )
        ]
        if qkv
        else [
            ("layers.{i}.attn.q", "attn/q_einsum/w", TRANSPOSE),
            (
                ("layers.{i}.attn.k", "layers.{i}.attn.v"),
                "attn/kv_einsum/w",
                then(stack(2), TRANSPOSE),
            ),
        ]
    )
    return Table(
        f"Flax ({'released' if released else 'official'}, gating {gating})",
        (
            Rule(("embedder.embedding",), "transformer/embedder/input_embedding", VOCAB_ROWS),
            Rule(("final_norm.scale",), "transformer/final_norm/scale"),
            *_layer_rules(
                "transformer/layer_{i}/",
                [
                    *attn,
                    ("layers.{i}.attn.o", "attn/attn_vec_einsum/w", FLAX_OUT),
                    (("layers.{i}.mlp.gate", "layers.{i}.mlp.up"), f"mlp/gating_einsum{w}", gate),
                    ("layers.{i}.mlp.down", f"mlp/linear{w}", TRANSPOSE),
                    *(
                        (f"layers.{{i}}.{ours}.scale", f"{theirs}/scale", IDENTITY)
                        for ours, theirs in _FLAX_NORMS.items()
                    ),
                ],
            ),
        ),
    )


def import_arrays(
    table: Table, config: Gemma2Config, theirs: Mapping[str, Any], *, source: str = "checkpoint"
) -> tuple[dict[Path_, Any], dict[Path_, str]]:
    """Their tensors -> ours, by ``table``: ``({our path: array}, {our path: their key})``.

    A key no row (or tie) knows is refused by name; a missing one is left to
    :func:`gemma2_lite.params.check_arrays`, which names our parameter. Shapes a transform
    needs are checked here, naming their key.
    """
    out: dict[Path_, Any] = {}
    names: dict[Path_, str] = {}
    unused = []
    for key, value in theirs.items():
        if key in table.tied:
            _check_tied(key, table.tied[key], theirs)
            continue
        match = next(
            ((rule, layer) for rule in table.rules for ok, layer in [rule.layer_in(key)] if ok),
            None,
        )
        if match is None:
            unused.append(key)
            continue
        rule, layer = match
        try:
            values = rule.transform.load([value], config)
        except CheckpointError as exc:
            raise CheckpointError(f"{key}: {exc}") from None
        paths = rule.our_paths(layer)
        for path, value in zip(paths, values):
            if path in names:  # e.g. "layers.1" and "layers.01": which is meant?
                raise CheckpointError(
                    f"{names[path]} and {key} both hold {'.'.join(map(str, path))}"
                )
            out[path], names[path] = value, key
    if unused:
        raise CheckpointError(f"unexpected tensors in {source}: {sorted(unused)[:8]}")
    return out, names


def _check_tied(key: str, original: str, theirs: Mapping[str, Any]) -> None:
    w, base = theirs[key], theirs.get(original)
    same = (
        base is not None
        and base.shape == w.shape
        and all(np.array_equal(base[i : i + 4096], w[i : i + 4096]) for i in range(0, len(w), 4096))
    )
    if not same:
        raise CheckpointError(
            f"{key} differs from {original}, but Gemma 2 ties them (the "
            "unembedding is the embedding)"
        )


def export_arrays(
    table: Table, config: Gemma2Config, ours: Mapping[Path_, Any]
) -> dict[str, np.ndarray]:
    """Our parameters -> their tensors, by ``table`` (tied copies are not written)."""
    out: dict[str, np.ndarray] = {}
    top = [(rule, None) for rule in table.rules if "{i}" not in rule.theirs]
    per_layer = [
        (rule, i) for i in range(config.num_layers) for rule in table.rules if "{i}" in rule.theirs
    ]
    for rule, layer in top + per_layer:  # layer by layer, as the hub's files
        values = [ours[path] for path in rule.our_paths(layer)]
        out[rule.their_key(layer)] = rule.transform.save(values, config)[0]
    return out


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts (or the released tree's 'a/b/c' keys) -> ``{'a/b/c/w': leaf}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def nest(flat: Mapping[str, Any], *, depth: int | None = None) -> dict[str, Any]:
    """``flatten``'s inverse: split every key on '/' (``depth=1``: only the last '/', which
    gives the released tree's ``{module path: {param: leaf}}``)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *path, leaf = key.rsplit("/", 1) if depth == 1 else key.split("/")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out
