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
import math
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

from .checks import check_regular_file
from .config import ConfigError, Gemma2Config, get_config, rope_base_from_hf
from .model import Gemma2, abstract_model

__all__ = ["CheckpointError", "read_safetensors", "write_safetensors", "config_from_hf",
           "config_to_hf", "read_hf_config", "read_hf_tensors", "check_arrays", "load_hf", "save_hf", "load_flax", "save_flax", "to_flax_tree",
           "to_released_flax_tree", "is_orbax_checkpoint", "from_arrays", "to_arrays", "hf_state_dict", "hf_to_arrays"]

Path_ = tuple[Any, ...]   # a parameter path in the model, e.g. ("layers", 0, "attn", "q")
Placer = Callable[[Path_, np.ndarray], jax.Array]


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: missing, extra or mis-shaped tensors."""


# ----------------------------------------------------------------------------- safetensors
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "F64": np.float64, "I64": np.int64, "I32": np.int32, "I16": np.int16,
              "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
              "U8": np.uint8, "BOOL": np.bool_}
# The dtypes a weight may have: anything else (an int or bool tensor) would be cast to float
# without meaning anything.
_WEIGHT_DTYPES = {np.dtype(t) for t in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16)}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


_MAX_HEADER_BYTES = 100_000_000   # the reference implementation's limit


def _json_object_no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook: a name given twice (which one would win?) is an error."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise CheckpointError(f"the key {key!r} appears twice")
        seen[key] = value
    return seen


def _read_json(path: Path, what: str) -> Any:
    """The JSON value in ``path`` (a regular file, else :class:`CheckpointError` naming it)."""
    check_regular_file(path, what, CheckpointError)
    try:
        return json.loads(path.read_bytes(), object_pairs_hook=_json_object_no_duplicates)
    except CheckpointError as exc:
        raise CheckpointError(f"{what} {path}: {exc}") from None
    except RecursionError:
        raise CheckpointError(f"{what} {path} is nested too deeply to be a {what}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        # Not the exception's text: for a non-UTF-8 file it would quote the file's bytes.
        where = f" ({exc.msg}, line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise CheckpointError(f"{what} {path} is not valid JSON{where}") from None


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _read_header(path: Path) -> tuple[dict[str, tuple[np.dtype, tuple[int, ...], int, int]], int]:
    """The validated header of a safetensors file: ``{name: (dtype, shape, start, end)}`` with
    offsets relative to the data section, and where that section starts in the file.

    Every field is checked against the file before any byte of tensor data is used: dtype
    known, shape a list of non-negative integers, ``0 <= start <= end <=`` the data section's
    size, ``end - start`` exactly the bytes of that dtype and shape, no two tensors sharing
    bytes. A negative offset would otherwise hand back the file's own header as weights, and a
    truncated file would fail later with a bare ``cannot reshape``.
    """
    check_regular_file(path, "safetensors file", CheckpointError)
    size = path.stat().st_size
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        # The length is not quoted in the message: it is the file's first 8 bytes.
        if not 0 < header_len <= min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{path} is not a safetensors file or is truncated: its first 8 bytes are not "
                f"the length of a JSON header that fits in the file ({size} bytes)")
        header = f.read(header_len)
    try:
        info_all = json.loads(header, object_pairs_hook=_json_object_no_duplicates)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: header: {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is not a safetensors file: its header is not JSON") from None
    if not isinstance(info_all, dict):
        raise CheckpointError(f"{path}: the header must be a JSON object of tensors, got "
                              f"{type(info_all).__name__}")
    data_size = size - 8 - header_len
    entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    for name, info in info_all.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: expected {{'dtype', 'shape', 'data_offsets'}}, got "
                                  f"{type(info).__name__}")
        dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype_name, str) or dtype_name not in _ST_DTYPES:
            raise CheckpointError(f"{where} has unsupported dtype {dtype_name!r}; "
                                  f"expected one of {sorted(_ST_DTYPES)}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(f"{where}: shape must be a list of non-negative integers, "
                                  f"got {shape!r}")
        if not isinstance(offsets, list) or len(offsets) != 2 or \
                not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets):
            raise CheckpointError(f"{where}: data_offsets must be [start, end] integers, got "
                                  f"{offsets!r}")
        start, end = offsets
        if not 0 <= start <= end <= data_size:
            raise CheckpointError(
                f"{where}: data_offsets {offsets} lie outside the file's {data_size} data bytes "
                "(need 0 <= start <= end <= that); the file is truncated or corrupt")
        dtype = np.dtype(_ST_DTYPES[dtype_name])
        nbytes = math.prod(shape) * dtype.itemsize
        if end - start != nbytes:
            raise CheckpointError(
                f"{where}: data_offsets {offsets} span {end - start} bytes, but {dtype_name} "
                f"{shape} needs {nbytes}; the file is corrupt")
        entries[name] = (dtype, tuple(shape), start, end)
    spans = sorted((start, end, name) for name, (_, _, start, end) in entries.items()
                   if end > start)
    for (_, end1, name1), (start2, _, name2) in zip(spans, spans[1:]):
        if start2 < end1:
            raise CheckpointError(f"{path}: tensors {name1!r} and {name2!r} share bytes "
                                  "(overlapping data_offsets); the file is corrupt")
    return entries, 8 + header_len


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file as read-only, memory-mapped numpy arrays.

    The header is validated first (see :func:`_read_header`); any problem is a
    :class:`CheckpointError` naming the file and tensor. Tensors keep their stored dtype
    (integer and bool tensors too: :func:`from_arrays` refuses them as weights).
    """
    path = Path(path)
    entries, base = _read_header(path)
    if not entries:
        return {}
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    return {name: raw[base + start: base + end].view(dtype).reshape(shape)
            for name, (dtype, shape, start, end) in entries.items()}


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


def _param_shapes(config: Gemma2Config) -> dict[Path_, tuple[int, ...]]:
    """Every parameter's path and shape, from an abstract *one-layer* model (all layers share
    their shapes): cheap for any ``num_layers``, unlike tracing the whole model."""
    one = abstract_model(config.replace(num_layers=1))
    shapes: dict[Path_, tuple[int, ...]] = {}
    for path, var in nnx.to_flat_state(nnx.state(one, nnx.Param)):
        path = tuple(path)
        if path[0] == "layers":
            shapes.update({("layers", i, *path[2:]): tuple(var.shape)
                           for i in range(config.num_layers)})
        else:
            shapes[path] = tuple(var.shape)
    return shapes


def _listing(names: list[str]) -> str:
    return f"{names[:8]}{' ...' if len(names) > 8 else ''}"


def check_arrays(config: Gemma2Config, arrays: Mapping[Path_, Any], *,
                 source: str = "checkpoint") -> None:
    """Check parameter arrays against ``config`` without building the model.

    In this order, each step cheap whatever the config claims: the layer indices (a
    config.json claiming 200 layers over a 2-layer file is refused before anything is traced),
    then every name and shape, then the dtypes (weights must be floating point: an integer or
    bool tensor would be cast silently). Raises :class:`CheckpointError` naming ``source``
    and the tensors.
    """
    layers = sorted({p[1] for p in arrays if p and p[0] == "layers"}, key=str)
    if len(layers) != config.num_layers or not all(
            isinstance(i, int) and 0 <= i < config.num_layers for i in layers):
        found = f"layers {layers[0]}..{layers[-1]}" if layers else "no layers"
        raise CheckpointError(
            f"{source} does not match {config!r}: the config has num_layers="
            f"{config.num_layers}, the checkpoint holds {len(layers)} ({found})")
    shapes = _param_shapes(config)
    missing = sorted(_path_name(p) for p in shapes.keys() - arrays.keys())
    extra = sorted(_path_name(p) for p in arrays.keys() - shapes.keys())
    problems = []
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if extra:
        problems.append(f"unexpected tensors: {_listing(extra)}")
    for path in sorted(shapes.keys() & arrays.keys(), key=_path_name):
        want, got = shapes[path], tuple(np.shape(arrays[path]))
        if want != got:
            problems.append(f"{_path_name(path)}: expected shape {want}, found {got}")
        dtype = getattr(arrays[path], "dtype", None)
        dtype = np.asarray(arrays[path]).dtype if dtype is None else np.dtype(dtype)
        if dtype not in _WEIGHT_DTYPES:
            problems.append(f"{_path_name(path)}: dtype {dtype} is not a floating-point weight "
                            f"(expected one of {sorted(str(d) for d in _WEIGHT_DTYPES)})")
    if problems:
        raise CheckpointError(f"{source} does not match {config!r}:\n  " + "\n  ".join(problems))


def from_arrays(config: Gemma2Config, arrays: Mapping[Path_, np.ndarray], *,
                source: str = "checkpoint", place: Placer | None = None) -> Gemma2:
    """Build a :class:`Gemma2` from parameter arrays, checking every name and shape first.

    The arrays are checked by :func:`check_arrays` before the model is even traced; then the
    model is created abstractly (no random initialisation, no memory) and each array is
    placed on device by ``place`` (default: ``jnp.asarray``; :mod:`gemma2_lite.sharding` passes
    one that puts each shard where it belongs) and cast to ``config.param_dtype``.
    """
    check_arrays(config, arrays, source=source)
    abstract = abstract_model(config)
    graphdef, state = nnx.split(abstract)
    expected = dict(nnx.to_flat_state(state))
    dtype = config.jnp_param_dtype
    for path, var in expected.items():
        if isinstance(var, nnx.Param):
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


# Our config field <- the Hugging Face config.json field it is read from (required fields).
_HF_REQUIRED = {"vocab_size": "vocab_size", "d_model": "hidden_size",
                "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
                "ffn_dim": "intermediate_size", "query_pre_attn_scalar": "query_pre_attn_scalar"}
_HF_OPTIONAL = {"sliding_window": "sliding_window", "attn_logit_softcap": "attn_logit_softcapping",
                "final_logit_softcap": "final_logit_softcapping", "rope_base": "rope_theta",
                "max_seq_len": "max_position_embeddings", "rms_norm_eps": "rms_norm_eps"}


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> Gemma2Config:
    """A :class:`Gemma2Config` from a Hugging Face ``config.json`` (transformers 4.x or 5.x).

    Both generations of the file are read. The released Gemma 2 folders were written by
    transformers 4.42: ``rope_theta`` at the top level, no ``layer_types`` (the alternation is
    implied), ``hidden_act`` next to ``hidden_activation``, ``eos_token_id`` ``[1, 107]`` on the
    -it models, and keys the model does not need (``cache_implementation``, ``use_cache``,
    ``torch_dtype``...), which are ignored. transformers 5.x writes ``rope_parameters`` and
    ``layer_types`` instead.

    Raises :class:`CheckpointError` naming the config.json field that is missing or invalid.
    """
    if not isinstance(hf, Mapping):
        raise CheckpointError(f"config.json must be a JSON object of fields, got "
                              f"{type(hf).__name__}")
    if hf.get("model_type") not in (None, "gemma2"):
        raise CheckpointError(f"config.json is for model_type {hf.get('model_type')!r}, "
                              f"expected 'gemma2'")
    missing = [name for name in _HF_REQUIRED.values() if name not in hf]
    if missing:
        raise CheckpointError(f"config.json lacks the field(s) {missing} that a Gemma 2 "
                              "config needs")
    try:
        rope_base = rope_base_from_hf(hf)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    n_layers = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types")
    # sliding_window_size: the name some early Gemma 2 configs and ports used for it.
    window = hf.get("sliding_window", hf.get("sliding_window_size"))
    if layer_types is not None:
        if not isinstance(layer_types, list):
            raise CheckpointError(f"config.json field 'layer_types' must be a list, got "
                                  f"{type(layer_types).__name__}")
        if all(t == "full_attention" for t in layer_types):
            window = None
        else:
            alternating = ["sliding_attention" if i % 2 == 0 else "full_attention"
                           for i in range(len(layer_types))]
            if list(layer_types) != alternating or len(layer_types) != n_layers:
                raise CheckpointError(
                    "config.json layer_types must alternate sliding/full starting with sliding "
                    f"(Gemma 2's pattern), one per layer, or be all full; got {layer_types[:8]}")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise CheckpointError(f"activation {act!r} is not Gemma 2's tanh GELU")
    fields = {ours: hf[theirs] for ours, theirs in _HF_REQUIRED.items()}
    fields.update(
        sliding_window=window, attn_logit_softcap=hf.get("attn_logit_softcapping"),
        final_logit_softcap=hf.get("final_logit_softcapping"), rope_base=rope_base,
        max_seq_len=hf.get("max_position_embeddings", 8192),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), name=str(hf.get("_name_or_path") or "hf"))
    fields.update(overrides)
    try:
        return Gemma2Config(**fields)
    except ConfigError as exc:
        field = str(exc).split(" ", 1)[0]
        theirs = {**_HF_REQUIRED, **_HF_OPTIONAL}.get(field)
        where = f" (config.json field {theirs!r})" if theirs and field not in overrides else ""
        raise CheckpointError(f"config.json describes no valid Gemma 2: {exc}{where}") from None


def read_hf_config(path: str | os.PathLike, dtype: Any = jnp.float32, param_dtype: Any = None,
                   **overrides: Any) -> Gemma2Config:
    """The :class:`Gemma2Config` of a Hugging Face checkpoint folder's ``config.json``.

    ``dtype`` is the activation dtype and, unless ``param_dtype`` is given, the parameter
    dtype. Every problem is a :class:`CheckpointError` naming the file and field.
    """
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path} has no config.json; is it a Hugging Face checkpoint?")
    hf = _read_json(cfg_file, "config")
    try:
        return config_from_hf(hf, dtype=jnp.dtype(dtype).name,
                              param_dtype=jnp.dtype(param_dtype or dtype).name, **overrides)
    except CheckpointError as exc:
        raise CheckpointError(f"{cfg_file}: {exc}") from None


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


INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# The names save_hf gives shards (the hub's convention); only such files are ever deleted.
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def _is_plain_shard_name(name: Any) -> bool:
    """A file name inside the checkpoint folder: no directory part, no '..', not absolute."""
    return (isinstance(name, str) and name.endswith(".safetensors") and name not in ("", ".", "..")
            and "/" not in name and "\\" not in name and Path(name).name == name
            and not os.path.isabs(name))


def _read_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index, every shard name checked to stay in ``path``.

    An index is untrusted input: a shard called ``../elsewhere.safetensors`` or
    ``/etc/passwd`` would make the loader read a file outside the checkpoint.
    """
    index = path / INDEX_FILE
    data = _read_json(index, "shard index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"shard index {index} must be a JSON object with a non-empty "
                              "'weight_map' of {tensor name: shard file name}")
    for tensor, shard in weight_map.items():
        if not _is_plain_shard_name(shard):
            raise CheckpointError(
                f"shard index {index}: tensor {tensor!r} names shard {shard!r}; a shard must be "
                f"a plain *.safetensors file name inside {path} (no directories, no '..')")
    return weight_map


def _hf_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint folder, and the index's weight_map if sharded."""
    index, single = path / INDEX_FILE, path / SINGLE_FILE
    if index.exists() and single.exists():
        raise CheckpointError(
            f"{path} holds both {SINGLE_FILE} and {INDEX_FILE}, two different saves: remove the "
            "stale one (save_hf removes it when it writes)")
    if index.exists():
        weight_map = _read_index(path)
        files = []
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).exists():
                first = next(t for t, s in weight_map.items() if s == shard)
                raise CheckpointError(f"shard index {index} names shard {shard} (e.g. for "
                                      f"{first!r}), but {path / shard} does not exist")
            files.append(path / shard)
        return files, weight_map
    if single.exists():
        return [single], None
    found = sorted(path.glob("*.safetensors"))
    if not found:
        pickles = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found {pickles}: pickle files are not loaded; convert them to safetensors)" \
            if pickles else ""
        raise CheckpointError(f"no *.safetensors files in {path}{hint}")
    return found, None


def read_hf_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a Hugging Face checkpoint folder (memory-mapped), by its HF name.

    A tensor found in two files, or missing from the shard the index names for it, is a
    :class:`CheckpointError`: which copy is meant would be a guess.
    """
    path = Path(path)
    files, weight_map = _hf_files(path)
    tensors: dict[str, np.ndarray] = {}
    origin: dict[str, Path] = {}
    for file in files:
        for name, value in read_safetensors(file).items():
            if name in origin:
                raise CheckpointError(f"tensor {name!r} is in both {origin[name]} and {file}")
            tensors[name], origin[name] = value, file
    for name, shard in (weight_map or {}).items():
        if origin.get(name, path / shard) != path / shard:
            raise CheckpointError(f"shard index {path / INDEX_FILE} puts {name!r} in {shard}, "
                                  f"but it is in {origin.get(name, 'no shard')}")
        if name not in origin:
            raise CheckpointError(f"shard index {path / INDEX_FILE} puts {name!r} in {shard}, "
                                  "but that shard does not hold it")
    return tensors


def load_hf(path: str | os.PathLike, dtype: Any = jnp.float32, *, param_dtype: Any = None,
            place: Placer | None = None, **config_overrides: Any) -> Gemma2:
    """Load a Hugging Face Gemma 2 checkpoint directory (``config.json`` + safetensors).

    Single-file (``model.safetensors``) and sharded (``model.safetensors.index.json``) layouts
    are both read, as are the released folders (bf16 shards, a transformers-4.42 config.json,
    vocabulary 256000). ``dtype`` is the activation dtype and, unless ``param_dtype`` is given, the
    parameter dtype. ``model.config`` holds the config read from ``config.json``.

    Everything read is treated as untrusted and checked before the model is built (see the
    book's page on untrusted weights): config fields, the index's shard names, every
    safetensors header, then tensor names, shapes and dtypes against the config.
    """
    path = Path(path)
    config = read_hf_config(path, dtype, param_dtype, **config_overrides)
    tensors = read_hf_tensors(path)
    return from_arrays(config, hf_to_arrays(config, tensors), source=str(path), place=place)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _remove_stale(path: Path, keep: set[str]) -> None:
    """Delete files of an earlier save_hf that the new save does not use: the other layout's
    file or index and our own shard names not in ``keep``. Nothing else is touched."""
    for file in [path / SINGLE_FILE, path / INDEX_FILE, *path.glob("model-*-of-*.safetensors")]:
        if file.name in keep or not file.exists():
            continue
        if file.name in (SINGLE_FILE, INDEX_FILE) or _SHARD_NAME.fullmatch(file.name):
            file.unlink()


def save_hf(model: Gemma2, path: str | os.PathLike, *, max_shard_bytes: int | None = None) -> None:
    """Write ``model`` as a Hugging Face checkpoint (config.json + safetensors).

    With ``max_shard_bytes`` the weights are split into several files with an index, as the
    hub does for large models. Files of an earlier save into the same folder that this one does
    not use (a stale index, old shards, the other layout's file) are removed after the new
    files are in place, so the folder never loads the old weights.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_text_atomic(path / "config.json", json.dumps(config_to_hf(model.config), indent=2))
    sd = hf_state_dict(model)
    if max_shard_bytes is None:
        write_safetensors(path / SINGLE_FILE, sd)
        _remove_stale(path, keep={SINGLE_FILE})
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
    _write_text_atomic(path / INDEX_FILE, json.dumps(index, indent=2))
    _remove_stale(path, keep={INDEX_FILE, *weight_map.values()})


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


def _unstack(key: str, w: np.ndarray, count: int) -> list[np.ndarray]:
    """The ``count`` parts stacked on axis 0 of ``w`` (e.g. kv_einsum's k and v), or a
    :class:`CheckpointError` naming ``key`` when the tensor is not stacked that way."""
    if np.ndim(w) < 2 or np.shape(w)[0] != count:
        raise CheckpointError(f"{key}: expected {count} tensors stacked on the first axis, "
                              f"found shape {np.shape(w)}")
    return [w[j] for j in range(count)]


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
    if gating not in ("DF", "FD"):
        raise ValueError(f"gating must be 'DF' (2B) or 'FD' (9B/27B), got {gating!r}")
    flat: dict[str, dict[str, np.ndarray]] = {}
    for key, leaf in _flatten(to_flax_tree(model)).items():
        module, name = key.rsplit("/", 1)
        if module.endswith("/mlp"):
            if name == "gating_einsum" and gating == "DF":
                leaf = leaf.transpose(0, 2, 1)          # to_flax_tree writes (2, F, D)
            module, name = f"{module}/{name}", "w"
        flat.setdefault(module, {})[name] = leaf
    return flat


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


def _infer_flax_config(flat: Mapping[str, np.ndarray]) -> Gemma2Config:
    """Match the checkpoint's shapes against the presets (needed for the 27B query scale)."""
    emb = flat["transformer/embedder/input_embedding"]
    if len(emb.shape) != 2:
        raise CheckpointError(f"transformer/embedder/input_embedding: expected shape (V, D), "
                              f"found {emb.shape}")
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

    Every form the official weights come in is read: the tree as released (flat module-path
    keys, ``"transformer/layer_0/mlp/gating_einsum" -> {"w": ...}``, see
    :func:`to_released_flax_tree`), the official library's remapped one (``.../mlp ->
    {"gating_einsum", "linear"}``), either of them nested, and ``gating_einsum`` in both
    orientations ((2, D, F) in the 2B, (2, F, D) in the 9B/27B). ``path_or_tree`` is an Orbax
    directory (or Kaggle's folder holding one), or an in-memory tree of arrays.

    Without ``config`` the shapes pick the 2B/9B/27B preset. If ``config.vocab_size`` is smaller
    than the checkpoint's 256128 rows (e.g. 256000 to pair with Hugging Face's tokenizer), the
    unused rows at the end are dropped.
    """
    if isinstance(path_or_tree, Mapping):
        tree = path_or_tree
        source = "params tree"
    else:
        import orbax.checkpoint as ocp

        directory = _orbax_dir(Path(path_or_tree).resolve())
        source = str(directory)
        if not directory.is_dir():
            raise CheckpointError(f"{source} is not a directory; expected an Orbax checkpoint")
        tree = ocp.PyTreeCheckpointer().restore(os.fspath(directory))
    flat = {k: np.asarray(v) for k, v in _flatten(tree).items()}
    if not flat:
        raise CheckpointError(f"{source} holds no tensors")
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
            if w.ndim != 2 or w.shape[0] < c.vocab_size:
                raise CheckpointError(f"{key}: expected (V, D) with at least {c.vocab_size} rows, "
                                      f"found shape {w.shape}")
            arrays[("embedder", "embedding")] = w[: c.vocab_size]
        elif key == "transformer/final_norm/scale":
            arrays[("final_norm", "scale")] = w
        elif m := re.fullmatch(r"transformer/layer_(\d+)/(.+)", key):
            i, rest = int(m.group(1)), m.group(2)
            if rest == "attn/q_einsum/w":
                arrays[("layers", i, "attn", "q")] = w
            elif rest == "attn/kv_einsum/w":
                for part, value in zip("kv", _unstack(key, w, 2)):
                    arrays[("layers", i, "attn", part)] = value
            elif rest == "attn/qkv_einsum/w":   # the layout used when N == K
                for part, value in zip("qkv", _unstack(key, w, 3)):
                    arrays[("layers", i, "attn", part)] = value
            elif rest == "attn/attn_vec_einsum/w":
                arrays[("layers", i, "attn", "o")] = w
            elif rest in ("mlp/gating_einsum", "mlp/gating_einsum/w"):
                # 2B stores (2, D, F), 9B/27B (2, F, D): orient by the config's D and F.
                if w.shape == (2, c.ffn_dim, c.d_model):
                    w = w.transpose(0, 2, 1)
                elif w.shape != (2, c.d_model, c.ffn_dim):
                    raise CheckpointError(f"{key}: expected (2, {c.ffn_dim}, {c.d_model}) or "
                                          f"(2, {c.d_model}, {c.ffn_dim}), found {w.shape}")
                for part, value in zip(("gate", "up"), _unstack(key, w, 2)):
                    arrays[("layers", i, "mlp", part)] = value
            elif rest in ("mlp/linear", "mlp/linear/w"):
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
