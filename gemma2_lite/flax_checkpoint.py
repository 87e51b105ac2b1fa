"""The official Flax checkpoints of Gemma 2 (Orbax), read in every form they come in and written.

The names and layouts are the tables of :func:`gemma2_lite.weight_maps.flax_table`; this module
restores or saves the Orbax directory, tells which of the table's variants a tree is (released
or the library's remapped form, the ``gating_einsum`` orientation, ``qkv_einsum``), and picks
the 2B/9B/27B preset from the shapes when no config is given.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from .config import Gemma2Config, get_config
from .model import Gemma2
from .params import Placer, from_arrays, to_arrays
from .safetensors_io import CheckpointError
from .weight_maps import export_arrays, flatten, flax_table, import_arrays, nest

__all__ = [
    "to_flax_tree",
    "to_released_flax_tree",
    "is_orbax_checkpoint",
    "infer_flax_config",
    "load_flax",
    "save_flax",
]

_EMBEDDING = "transformer/embedder/input_embedding"
_GATING = re.compile(r"transformer/layer_\d+/mlp/gating_einsum(/w)?")


def _export(model: Gemma2, **variant: Any) -> dict[str, np.ndarray]:
    c = model.config
    table = flax_table(qkv=c.num_heads == c.num_kv_heads, **variant)
    return export_arrays(table, c, to_arrays(model))


def to_flax_tree(model: Gemma2) -> dict[str, Any]:
    """Our parameters as the official gemma library holds them (nested dicts of numpy arrays):
    ``{"transformer": {"layer_0": {"attn": {"q_einsum": {"w"}, "kv_einsum": {"w"}, ...},
    "mlp": {"gating_einsum": (2, F, D), "linear": (F, D)}, ...}, ...}}``."""
    return nest(_export(model, released=False, gating="FD"))


def to_released_flax_tree(model: Gemma2, *, gating: str = "DF") -> dict[str, dict[str, np.ndarray]]:
    """Our parameters exactly as the official Orbax checkpoints were released (numpy arrays).

    The released trees are flat: each key is a whole module path, each value that module's
    parameters, e.g. ``"transformer/layer_0/attn/q_einsum" -> {"w": (N, D, H)}`` and
    ``"transformer/embedder" -> {"input_embedding": (V, D)}``. The MLP weights sit one level
    deeper than the official Flax module declares them (``.../mlp/gating_einsum -> {"w": ...}``,
    ``.../mlp/linear -> {"w": (F, D)}``; the official library remaps them on load).
    ``gating`` picks the orientation of ``gating_einsum``: ``"DF"`` stores (2, D, F) as the 2B
    does, ``"FD"`` stores (2, F, D) as the 9B and 27B do.
    """
    return nest(_export(model, released=True, gating=gating), depth=1)


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an Orbax checkpoint directory (old or new Orbax: any of its files)."""
    markers = ("_METADATA", "checkpoint", "_CHECKPOINT_METADATA", "manifest.ocdbt")
    return Path(path).is_dir() and any((Path(path) / m).exists() for m in markers)


def _orbax_dir(path: Path) -> Path:
    """``path``, or the one Orbax checkpoint inside it (Kaggle's folder holds the checkpoint
    directory, e.g. ``gemma2-2b/``, next to ``tokenizer.model``)."""
    if not path.is_dir() or is_orbax_checkpoint(path):
        return path
    inner = [d for d in path.iterdir() if is_orbax_checkpoint(d)]
    return inner[0] if len(inner) == 1 else path


def infer_flax_config(flat: Mapping[str, Any]) -> Gemma2Config:
    """The 2B/9B/27B preset whose width and depth match a flat tree's (needed for the 27B's
    query scale, which the shapes alone do not give), with the tree's vocabulary."""
    emb = flat[_EMBEDDING]
    if len(emb.shape) != 2:
        raise CheckpointError(f"{_EMBEDDING}: expected shape (V, D), found {emb.shape}")
    n_layers = len({m.group(1) for k in flat if (m := re.match(r"transformer/layer_(\d+)/", k))})
    for name in ("gemma2-2b", "gemma2-9b", "gemma2-27b"):
        preset = get_config(name)
        if (preset.d_model, preset.num_layers) == (emb.shape[1], n_layers):
            return preset.replace(vocab_size=emb.shape[0])
    raise CheckpointError(
        f"checkpoint (D={emb.shape[1]}, {n_layers} layers) matches no Gemma 2 preset; "
        f"pass config= explicitly"
    )


def _gating(flat: Mapping[str, np.ndarray], c: Gemma2Config) -> str:
    """The orientation of the tree's ``gating_einsum``: "FD" (2, F, D) or "DF" (2, D, F)."""
    found = set()
    for key, w in flat.items():
        if _GATING.fullmatch(key):
            if w.shape == (2, c.ffn_dim, c.d_model):
                found.add("FD")
            elif w.shape == (2, c.d_model, c.ffn_dim):
                found.add("DF")
            else:
                raise CheckpointError(
                    f"{key}: expected (2, {c.ffn_dim}, {c.d_model}) or "
                    f"(2, {c.d_model}, {c.ffn_dim}), found {w.shape}"
                )
    if len(found) > 1:
        raise CheckpointError(
            "gating_einsum is stored (2, F, D) in some layers and (2, D, F) in others"
        )
    return found.pop() if found else "FD"


def _restore(
    path_or_tree: str | os.PathLike | Mapping[str, Any],
) -> tuple[dict[str, np.ndarray], str]:
    """The tree's leaves by '/'-joined key (``transformer/`` prefixed), and what to call it."""
    if isinstance(path_or_tree, Mapping):
        tree, source = path_or_tree, "params tree"
    else:
        import orbax.checkpoint as ocp

        directory = _orbax_dir(Path(path_or_tree).resolve())
        source = str(directory)
        if not directory.is_dir():
            raise CheckpointError(f"{source} is not a directory; expected an Orbax checkpoint")
        tree = ocp.PyTreeCheckpointer().restore(os.fspath(directory))
    flat = {
        k if k.startswith("transformer/") else f"transformer/{k}": np.asarray(v)
        for k, v in flatten(tree).items()
    }
    if not flat:
        raise CheckpointError(f"{source} holds no tensors")
    if _EMBEDDING not in flat:
        raise CheckpointError(f"{source} has no {_EMBEDDING}; found {sorted(flat)[:5]} ...")
    return flat, source


def load_flax(
    path_or_tree: str | os.PathLike | Mapping[str, Any],
    *,
    config: Gemma2Config | None = None,
    dtype: Any = None,
    param_dtype: Any = None,
    place: Placer | None = None,
) -> Gemma2:
    """Load the official Flax (Orbax) checkpoint of Gemma 2, or its already-restored params tree.

    Every form the official weights come in is read: the tree as released (flat module-path
    keys, ``"transformer/layer_0/mlp/gating_einsum" -> {"w": ...}``, see
    :func:`to_released_flax_tree`), the official library's remapped one (``.../mlp ->
    {"gating_einsum", "linear"}``), either of them nested, ``gating_einsum`` in both
    orientations ((2, D, F) in the 2B, (2, F, D) in the 9B/27B), and ``qkv_einsum``.
    ``path_or_tree`` is an Orbax directory (or Kaggle's folder holding one), or an in-memory
    tree of arrays.

    Without ``config`` the shapes pick the 2B/9B/27B preset. If ``config.vocab_size`` is smaller
    than the checkpoint's 256128 rows (e.g. 256000 to pair with Hugging Face's tokenizer), the
    unused rows at the end are dropped. ``dtype`` (activations, and parameters unless
    ``param_dtype`` is given) defaults to the checkpoint's own. Values are checked as in
    :func:`gemma2_lite.params.from_arrays`.
    """
    flat, source = _restore(path_or_tree)
    config = config or infer_flax_config(flat)
    stored = flat[_EMBEDDING].dtype.name
    own = stored if stored in ("float32", "bfloat16", "float16") else "float32"
    dtype = jnp.dtype(dtype or own).name
    config = config.replace(dtype=dtype, param_dtype=jnp.dtype(param_dtype or dtype).name)
    table = flax_table(
        released=any(re.search(r"/mlp/(gating_einsum|linear)/w$", k) for k in flat),
        gating=_gating(flat, config),
        qkv=any("/attn/qkv_einsum/" in k for k in flat),
    )
    arrays, names = import_arrays(table, config, flat, source=source)
    return from_arrays(config, arrays, source=source, place=place, origins=names)


def save_flax(model: Gemma2, path: str | os.PathLike) -> None:
    """Write ``model`` as an Orbax checkpoint in the official Flax layout."""
    import orbax.checkpoint as ocp

    ocp.PyTreeCheckpointer().save(os.fspath(Path(path).resolve()), to_flax_tree(model))
