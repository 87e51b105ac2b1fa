"""Load and save Gemma 2 weights: Hugging Face (safetensors) and the official Flax/Orbax layout.

Every tensor is shape-checked against the config before the model is built, and a missing,
extra or mis-shaped tensor is reported by name with the expected and found shapes.
Only safetensors are read for Hugging Face checkpoints (never pickle), with a small reader of
our own: an 8-byte header length, a JSON header, then raw little-endian tensor bytes.

Our parameter layout (the official einsum layout, per layer ``layers.{i}``):

=========================  ===========  ==============================  ===========
gemma2_lite                shape        Hugging Face                    shape
=========================  ===========  ==============================  ===========
embedder.embedding         (V, D)       model.embed_tokens.weight       (V, D)
attn.q                     (N, D, H)    self_attn.q_proj.weight         (N*H, D)
attn.k / attn.v            (K, D, H)    self_attn.k_proj / v_proj       (K*H, D)
attn.o                     (N, H, D)    self_attn.o_proj.weight         (D, N*H)
mlp.gate / mlp.up          (D, F)       mlp.gate_proj / up_proj         (F, D)
mlp.down                   (F, D)       mlp.down_proj.weight            (D, F)
pre_attn_norm.scale etc.   (D,)         input_layernorm.weight etc.     (D,)
=========================  ===========  ==============================  ===========
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from .config import Gemma2Config, get_config
from .model import Gemma2

__all__ = ["CheckpointError", "read_safetensors", "write_safetensors", "config_from_hf",
           "config_to_hf", "load_hf", "save_hf", "load_flax", "save_flax", "to_flax_tree",
           "from_arrays", "to_arrays", "hf_state_dict", "hf_to_arrays"]

Path_ = tuple[Any, ...]   # a parameter path in the model, e.g. ("layers", 0, "attn", "q")
Placer = Callable[[Path_, np.ndarray], jax.Array]


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: missing, extra or mis-shaped tensors."""


# ----------------------------------------------------------------------------- safetensors
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "F64": np.float64, "I64": np.int64, "I32": np.int32, "I16": np.int16,
              "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file as read-only, memory-mapped numpy arrays."""
    path = Path(path)
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len <= 0 or header_len > 100_000_000:
            raise CheckpointError(f"{path} is not a safetensors file (header length {header_len})")
        header = json.loads(f.read(header_len))
    base = 8 + header_len
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        tensors[name] = raw[base + start: base + end].view(dtype).reshape(info["shape"])
    return tensors


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` in the safetensors format (atomically, via a temp file)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name, value in tensors.items():
        arr = np.ascontiguousarray(value)
        if arr.dtype not in _ST_NAMES:
            raise CheckpointError(f"cannot store {name} of dtype {arr.dtype} in safetensors")
        header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)   # the format asks for 8-byte alignment of the data
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- model <-> arrays
def to_arrays(model: Gemma2) -> dict[Path_, np.ndarray]:
    """Every parameter of ``model`` as numpy, keyed by its path, e.g. ("layers", 0, "attn", "q")."""
    state = nnx.state(model, nnx.Param)
    return {tuple(path): np.asarray(var.get_value() if hasattr(var, "get_value") else var.value)
            for path, var in nnx.to_flat_state(state)}


def _path_name(path: Path_) -> str:
    return ".".join(str(p) for p in path)


def from_arrays(config: Gemma2Config, arrays: Mapping[Path_, np.ndarray], *,
                source: str = "checkpoint", place: Placer | None = None) -> Gemma2:
    """Build a :class:`Gemma2` from parameter arrays, checking every name and shape first.

    The model is created abstractly (no random initialisation, no memory) and each array is
    placed on device by ``place`` (default: ``jnp.asarray``; :mod:`gemma2_lite.sharding` passes
    one that puts each shard where it belongs) and cast to ``config.param_dtype``.
    """
    abstract = nnx.eval_shape(lambda: Gemma2(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    expected = dict(nnx.to_flat_state(state))
    wanted = {p for p, v in expected.items() if isinstance(v, nnx.Param)}
    missing = sorted(_path_name(p) for p in wanted - set(arrays))
    extra = sorted(_path_name(p) for p in set(arrays) - wanted)
    problems = []
    if missing:
        problems.append(f"missing tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if extra:
        problems.append(f"unexpected tensors: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    for path in sorted(wanted & set(arrays), key=_path_name):
        want, got = tuple(expected[path].shape), tuple(np.shape(arrays[path]))
        if want != got:
            problems.append(f"{_path_name(path)}: expected shape {want}, found {got}")
    if problems:
        raise CheckpointError(f"{source} does not match {config!r}:\n  " + "\n  ".join(problems))
    dtype = config.jnp_param_dtype
    for path, var in expected.items():
        if path in wanted:
            if place is None:
                value = jnp.asarray(np.asarray(arrays[path]).astype(dtype))
            else:
                # The (possibly memory-mapped) array as stored: a sharded placer reads only each
                # device's slice and casts that, instead of copying the whole tensor first.
                value = place(path, arrays[path]).astype(dtype)
            var.set_value(value) if hasattr(var, "set_value") else setattr(var, "value", value)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- Hugging Face
_HF_NORMS = {"input_layernorm": "pre_attn_norm", "post_attention_layernorm": "post_attn_norm",
             "pre_feedforward_layernorm": "pre_ffw_norm",
             "post_feedforward_layernorm": "post_ffw_norm"}


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> Gemma2Config:
    """A :class:`Gemma2Config` from a Hugging Face ``config.json`` (transformers 4.x or 5.x)."""
    if hf.get("model_type") not in (None, "gemma2"):
        raise CheckpointError(f"config.json is for model_type {hf.get('model_type')!r}, "
                              f"expected 'gemma2'")
    rope = hf.get("rope_parameters") or {}
    rope_base = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
    n_layers = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types")
    window = hf.get("sliding_window")
    if layer_types is not None:
        if all(t == "full_attention" for t in layer_types):
            window = None
        else:
            alternating = ["sliding_attention" if i % 2 == 0 else "full_attention"
                           for i in range(n_layers)]
            if list(layer_types) != alternating:
                raise CheckpointError(
                    "config.json layer_types must alternate sliding/full starting with sliding "
                    f"(Gemma 2's pattern) or be all full; got {layer_types}")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise CheckpointError(f"activation {act!r} is not Gemma 2's tanh GELU")
    fields = dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=n_layers,
        num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"],
        head_dim=hf["head_dim"], ffn_dim=hf["intermediate_size"],
        query_pre_attn_scalar=hf["query_pre_attn_scalar"], sliding_window=window,
        attn_logit_softcap=hf.get("attn_logit_softcapping"),
        final_logit_softcap=hf.get("final_logit_softcapping"), rope_base=float(rope_base),
        max_seq_len=hf.get("max_position_embeddings", 8192),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), name=hf.get("_name_or_path") or "hf")
    fields.update(overrides)
    return Gemma2Config(**fields)


def config_to_hf(config: Gemma2Config) -> dict[str, Any]:
    """The Hugging Face ``config.json`` describing ``config``."""
    c = config
    layer_types = ["sliding_attention" if t == "local" else "full_attention"
                   for t in c.layer_types]
    return {
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
        "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": c.ffn_dim,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh",
        "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_base},
        "query_pre_attn_scalar": c.query_pre_attn_scalar,
        "sliding_window": c.sliding_window or c.max_seq_len, "layer_types": layer_types,
        "attn_logit_softcapping": c.attn_logit_softcap,
        "final_logit_softcapping": c.final_logit_softcap,
        "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": True,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
        "dtype": c.param_dtype, "torch_dtype": c.param_dtype,
    }


def hf_to_arrays(config: Gemma2Config, tensors: Mapping[str, np.ndarray]) -> dict[Path_, np.ndarray]:
    """Rename and reshape Hugging Face tensors into our parameter layout (shapes checked later)."""
    c = config
    n, k, h, d = c.num_heads, c.num_kv_heads, c.head_dim, c.d_model
    out: dict[Path_, np.ndarray] = {}
    unused = []

    def heads(w: np.ndarray, name: str, count: int) -> np.ndarray:   # (count*H, D) -> (count, D, H)
        if w.shape != (count * h, d):
            raise CheckpointError(f"{name}: expected shape {(count * h, d)}, found {w.shape}")
        return w.reshape(count, h, d).transpose(0, 2, 1)

    for name, w in tensors.items():
        if name == "model.embed_tokens.weight":
            out[("embedder", "embedding")] = w
        elif name == "model.norm.weight":
            out[("final_norm", "scale")] = w
        elif name == "lm_head.weight":
            emb = tensors.get("model.embed_tokens.weight")
            if emb is None or emb.shape != w.shape or not np.array_equal(emb, w):
                raise CheckpointError("lm_head.weight differs from model.embed_tokens.weight, "
                                      "but Gemma 2 ties its unembedding to the embedding")
        elif m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name):
            i, rest = int(m.group(1)), m.group(2)
            if rest == "self_attn.q_proj":
                out[("layers", i, "attn", "q")] = heads(w, name, n)
            elif rest in ("self_attn.k_proj", "self_attn.v_proj"):
                out[("layers", i, "attn", rest[-6])] = heads(w, name, k)
            elif rest == "self_attn.o_proj":
                if w.shape != (d, n * h):
                    raise CheckpointError(f"{name}: expected shape {(d, n * h)}, found {w.shape}")
                out[("layers", i, "attn", "o")] = w.T.reshape(n, h, d)
            elif rest in ("mlp.gate_proj", "mlp.up_proj"):
                out[("layers", i, "mlp", rest[4:-5])] = w.T
            elif rest == "mlp.down_proj":
                out[("layers", i, "mlp", "down")] = w.T
            elif rest in _HF_NORMS:
                out[("layers", i, _HF_NORMS[rest], "scale")] = w
            else:
                unused.append(name)
        else:
            unused.append(name)
    if unused:
        raise CheckpointError(f"unexpected tensors in the checkpoint: {sorted(unused)[:8]}")
    return out


def hf_state_dict(model: Gemma2) -> dict[str, np.ndarray]:
    """Our parameters renamed and reshaped into Hugging Face's layout (numpy, model dtype)."""
    c = model.config
    n, k, h, d = c.num_heads, c.num_kv_heads, c.head_dim, c.d_model
    sd: dict[str, np.ndarray] = {}
    for path, w in to_arrays(model).items():
        if path == ("embedder", "embedding"):
            sd["model.embed_tokens.weight"] = w
        elif path == ("final_norm", "scale"):
            sd["model.norm.weight"] = w
        else:
            _, i, module, name = path
            pre = f"model.layers.{i}."
            if module == "attn" and name == "o":
                sd[pre + "self_attn.o_proj.weight"] = w.reshape(n * h, d).T
            elif module == "attn":
                count = n if name == "q" else k
                sd[pre + f"self_attn.{name}_proj.weight"] = w.transpose(0, 2, 1).reshape(count * h, d)
            elif module == "mlp":
                sd[pre + f"mlp.{name}_proj.weight"] = w.T
            else:
                hf_name = {v: k_ for k_, v in _HF_NORMS.items()}[module]
                sd[pre + f"{hf_name}.weight"] = w
    return {name: np.ascontiguousarray(v) for name, v in sd.items()}


def _hf_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        pickles = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found {pickles}: pickle files are not loaded; convert them to safetensors)" \
            if pickles else ""
        raise CheckpointError(f"no *.safetensors files in {path}{hint}")
    return found


def load_hf(path: str | os.PathLike, dtype: Any = jnp.float32, *, param_dtype: Any = None,
            place: Placer | None = None, **config_overrides: Any) -> Gemma2:
    """Load a Hugging Face Gemma 2 checkpoint directory (``config.json`` + safetensors).

    Single-file (``model.safetensors``) and sharded (``model.safetensors.index.json``) layouts
    are both read. ``dtype`` is the activation dtype and, unless ``param_dtype`` is given, the
    parameter dtype. ``model.config`` holds the config read from ``config.json``.
    """
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path} has no config.json; is it a Hugging Face checkpoint?")
    dname = jnp.dtype(dtype).name
    pname = jnp.dtype(param_dtype or dtype).name
    config = config_from_hf(json.loads(cfg_file.read_text()), dtype=dname, param_dtype=pname,
                            **config_overrides)
    tensors: dict[str, np.ndarray] = {}
    for file in _hf_files(path):
        tensors.update(read_safetensors(file))
    return from_arrays(config, hf_to_arrays(config, tensors), source=str(path), place=place)


def save_hf(model: Gemma2, path: str | os.PathLike, *, max_shard_bytes: int | None = None) -> None:
    """Write ``model`` as a Hugging Face checkpoint (config.json + safetensors).

    With ``max_shard_bytes`` the weights are split into several files with an index, as the
    hub does for large models.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2))
    sd = hf_state_dict(model)
    if max_shard_bytes is None:
        write_safetensors(path / "model.safetensors", sd)
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in sd.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    weight_map = {}
    for j, shard in enumerate(shards):
        fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(path / fname, shard)
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": sum(a.nbytes for a in sd.values())},
             "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# ----------------------------------------------------------------------------- official Flax
_FLAX_NORMS = {"pre_attention_norm": "pre_attn_norm", "post_attention_norm": "post_attn_norm",
               "pre_ffw_norm": "pre_ffw_norm", "post_ffw_norm": "post_ffw_norm"}


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts (or the official checkpoint's 'a/b/c' keys) -> {'a/b/c/w': array}."""
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


def to_flax_tree(model: Gemma2) -> dict[str, Any]:
    """Our parameters in the official Flax checkpoint's nested layout (numpy arrays)."""
    arrays = to_arrays(model)
    layers: dict[str, Any] = {}
    for i in range(model.config.num_layers):
        a = lambda *p: arrays[("layers", i, *p)]  # noqa: E731
        layers[f"layer_{i}"] = {
            "attn": {"q_einsum": {"w": a("attn", "q")},
                     "kv_einsum": {"w": np.stack([a("attn", "k"), a("attn", "v")])},
                     "attn_vec_einsum": {"w": a("attn", "o")}},
            "mlp": {"gating_einsum": np.stack([a("mlp", "gate").T, a("mlp", "up").T]),  # (2, F, D)
                    "linear": a("mlp", "down")},
            **{theirs: {"scale": a(ours, "scale")} for theirs, ours in _FLAX_NORMS.items()},
        }
    return {"transformer": {"embedder": {"input_embedding": arrays[("embedder", "embedding")]},
                            **layers,
                            "final_norm": {"scale": arrays[("final_norm", "scale")]}}}


def _infer_flax_config(flat: Mapping[str, np.ndarray]) -> Gemma2Config:
    """Match the checkpoint's shapes against the presets (needed for the 27B query scale)."""
    emb = flat["transformer/embedder/input_embedding"]
    n_layers = len({m.group(1) for k in flat if (m := re.match(r"transformer/layer_(\d+)/", k))})
    for name in ("gemma2-2b", "gemma2-9b", "gemma2-27b"):
        preset = get_config(name)
        if (preset.d_model, preset.num_layers) == (emb.shape[1], n_layers):
            return preset.replace(vocab_size=emb.shape[0])
    raise CheckpointError(
        f"checkpoint (D={emb.shape[1]}, {n_layers} layers) matches no Gemma 2 preset; "
        f"pass config= explicitly")


def load_flax(path_or_tree: str | os.PathLike | Mapping[str, Any], *,
              config: Gemma2Config | None = None, dtype: Any = jnp.float32,
              param_dtype: Any = None, place: Placer | None = None) -> Gemma2:
    """Load the official Flax (Orbax) checkpoint of Gemma 2, or its already-restored params tree.

    Without ``config`` the shapes pick the 2B/9B/27B preset. If ``config.vocab_size`` is smaller
    than the checkpoint's 256128 rows (e.g. 256000 to pair with Hugging Face's tokenizer), the
    unused rows at the end are dropped.
    """
    if isinstance(path_or_tree, Mapping):
        tree = path_or_tree
        source = "params tree"
    else:
        import orbax.checkpoint as ocp

        source = str(path_or_tree)
        tree = ocp.PyTreeCheckpointer().restore(os.fspath(Path(path_or_tree).resolve()))
    flat = {k: np.asarray(v) for k, v in _flatten(tree).items()}
    flat = {k if k.startswith("transformer/") else f"transformer/{k}": v for k, v in flat.items()}
    if "transformer/embedder/input_embedding" not in flat:
        raise CheckpointError(f"{source} has no transformer/embedder/input_embedding; "
                              f"found {sorted(flat)[:5]} ...")
    config = config or _infer_flax_config(flat)
    config = config.replace(dtype=jnp.dtype(dtype).name,
                            param_dtype=jnp.dtype(param_dtype or dtype).name)
    c = config
    arrays: dict[Path_, np.ndarray] = {}
    unused = []
    for key, w in flat.items():
        if key == "transformer/embedder/input_embedding":
            if w.shape[0] < c.vocab_size:
                raise CheckpointError(f"{key}: {w.shape[0]} rows, config wants {c.vocab_size}")
            arrays[("embedder", "embedding")] = w[: c.vocab_size]
        elif key == "transformer/final_norm/scale":
            arrays[("final_norm", "scale")] = w
        elif m := re.fullmatch(r"transformer/layer_(\d+)/(.+)", key):
            i, rest = int(m.group(1)), m.group(2)
            if rest == "attn/q_einsum/w":
                arrays[("layers", i, "attn", "q")] = w
            elif rest == "attn/kv_einsum/w":
                arrays[("layers", i, "attn", "k")], arrays[("layers", i, "attn", "v")] = w[0], w[1]
            elif rest == "attn/qkv_einsum/w":   # the layout used when N == K
                for j, part in enumerate("qkv"):
                    arrays[("layers", i, "attn", part)] = w[j]
            elif rest == "attn/attn_vec_einsum/w":
                arrays[("layers", i, "attn", "o")] = w
            elif rest == "mlp/gating_einsum":
                # 2B stores (2, D, F), 9B/27B (2, F, D): orient by the config's D and F.
                if w.shape == (2, c.ffn_dim, c.d_model):
                    w = w.transpose(0, 2, 1)
                elif w.shape != (2, c.d_model, c.ffn_dim):
                    raise CheckpointError(f"{key}: expected (2, {c.ffn_dim}, {c.d_model}) or "
                                          f"(2, {c.d_model}, {c.ffn_dim}), found {w.shape}")
                arrays[("layers", i, "mlp", "gate")], arrays[("layers", i, "mlp", "up")] = w[0], w[1]
            elif rest == "mlp/linear":
                arrays[("layers", i, "mlp", "down")] = w
            elif (norm := rest.removesuffix("/scale")) in _FLAX_NORMS:
                arrays[("layers", i, _FLAX_NORMS[norm], "scale")] = w
            else:
                unused.append(key)
        else:
            unused.append(key)
    if unused:
        raise CheckpointError(f"unexpected tensors in {source}: {sorted(unused)[:8]}")
    return from_arrays(config, arrays, source=source, place=place)


def save_flax(model: Gemma2, path: str | os.PathLike) -> None:
    """Write ``model`` as an Orbax checkpoint in the official Flax layout."""
    import orbax.checkpoint as ocp

    ocp.PyTreeCheckpointer().save(os.fspath(Path(path).resolve()), to_flax_tree(model))
