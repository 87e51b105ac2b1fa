"""Hugging Face checkpoint folders: ``config.json`` + safetensors (one file, or shards + index).

Reading treats every file as untrusted (the book's page on untrusted weights): config fields,
the index's shard names, every safetensors header, then tensor names, shapes, dtypes and values
against the config. Tensors are memory-mapped and turned into parameters one at a time.

Writing is transactional (:mod:`gemma2_lite.folder_swap`): the folder holds the previous save
or the new one, never a mix. Each save leaves a manifest (:data:`MANIFEST_FILE`: the files it
wrote, their sizes and sha256) by which a later save knows the folder is its own, and
:func:`verify_hf_folder` can tell a damaged copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from .checks import check_int
from .config import Gemma2Config
from .folder_swap import carry_over, staged_folder
from .hf_config import config_from_hf, config_to_hf, declared_dtype, read_hf_config
from .model import Gemma2
from .params import Path_, Placer, check_arrays, from_arrays, to_arrays
from .quantize import is_quantized
from .safetensors_io import (
    WEIGHT_DTYPES,
    CheckpointError,
    fsync_dir,
    read_json,
    read_safetensors,
    write_safetensors,
)
from .weight_maps import HF, export_arrays, import_arrays

__all__ = [
    "INDEX_FILE",
    "SINGLE_FILE",
    "MANIFEST_FILE",
    "read_index",
    "read_hf_tensors",
    "hf_to_arrays",
    "hf_state_dict",
    "load_hf",
    "save_hf",
    "verify_hf_folder",
]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: What save_hf wrote: ``{"writer", "architecture", "files": {name: {"bytes", "sha256"}}}``.
MANIFEST_FILE = "gemma2_lite_save.json"
# The names save_hf gives shards (the hub's convention).
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_WRITER = "gemma2-lite save_hf"
# sha256 of the files already read, by (path, size, mtime, inode).
_DIGESTS: dict[tuple[str, int, int, int], str] = {}
# Config fields that make two models the same model (dtypes and name may differ).
_ARCHITECTURE = (
    "vocab_size",
    "d_model",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "ffn_dim",
)


# ----------------------------------------------------------------------------- reading
def _is_plain_shard_name(name: Any) -> bool:
    """A file name inside the checkpoint folder: no directory part, no '..', not absolute."""
    return (
        isinstance(name, str)
        and name.endswith(".safetensors")
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and Path(name).name == name
        and not os.path.isabs(name)
    )


def read_index(path: str | os.PathLike) -> dict[str, str]:
    """The ``weight_map`` of folder ``path``'s shard index, every shard name checked to stay
    in ``path``.

    An index is untrusted input: a shard called ``../elsewhere.safetensors`` or
    ``/etc/passwd`` would make the loader read a file outside the checkpoint.
    """
    path = Path(path)
    index = path / INDEX_FILE
    data = read_json(index, "shard index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"shard index {index} must be a JSON object with a non-empty "
            "'weight_map' of {tensor name: shard file name}"
        )
    for tensor, shard in weight_map.items():
        if not _is_plain_shard_name(shard):
            raise CheckpointError(
                f"shard index {index}: tensor {tensor!r} names shard {shard!r}; a shard must be "
                f"a plain *.safetensors file name inside {path} (no directories, no '..')"
            )
    return weight_map


def _hf_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint folder, and the index's weight_map if sharded."""
    index, single = path / INDEX_FILE, path / SINGLE_FILE
    if index.exists() and single.exists():
        raise CheckpointError(
            f"{path} holds both {SINGLE_FILE} and {INDEX_FILE}, two different saves: remove the "
            "stale one (save_hf never leaves both)"
        )
    if index.exists():
        weight_map = read_index(path)
        files = []
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).exists():
                first = next(t for t, s in weight_map.items() if s == shard)
                raise CheckpointError(
                    f"shard index {index} names shard {shard} (e.g. for "
                    f"{first!r}), but {path / shard} does not exist"
                )
            files.append(path / shard)
        return files, weight_map
    if single.exists():
        return [single], None
    found = sorted(path.glob("*.safetensors"))
    if not found:
        pickles = sorted(p.name for p in path.glob("*.bin"))
        hint = (
            f" (found {pickles}: pickle files are not loaded; convert them to safetensors)"
            if pickles
            else ""
        )
        raise CheckpointError(f"no *.safetensors files in {path}{hint}")
    return found, None


def _read_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Path]]:
    """Every tensor of the folder (memory-mapped) and the file each one is in."""
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
            raise CheckpointError(
                f"shard index {path / INDEX_FILE} puts {name!r} in {shard}, "
                f"but it is in {origin.get(name, 'no shard')}"
            )
        if name not in origin:
            raise CheckpointError(
                f"shard index {path / INDEX_FILE} puts {name!r} in {shard}, "
                "but that shard does not hold it"
            )
    return tensors, origin


def read_hf_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a Hugging Face checkpoint folder (memory-mapped), by its HF name.

    A tensor found in two files, or missing from the shard the index names for it, is a
    :class:`CheckpointError`: which copy is meant would be a guess.
    """
    return _read_tensors(Path(path))[0]


def hf_to_arrays(
    config: Gemma2Config, tensors: Mapping[str, np.ndarray]
) -> dict[Path_, np.ndarray]:
    """Hugging Face tensors in our parameter layout (views where possible; shapes checked
    later), by the :data:`gemma2_lite.weight_maps.HF` table."""
    return import_arrays(HF, config, tensors)[0]


def hf_state_dict(model: Gemma2) -> dict[str, np.ndarray]:
    """Our parameters renamed and reshaped into Hugging Face's layout (numpy, model dtype)."""
    sd = export_arrays(HF, model.config, to_arrays(model))
    return {name: np.ascontiguousarray(v) for name, v in sd.items()}


def _first_float_dtype(tensors: Mapping[str, np.ndarray]) -> str | None:
    for value in tensors.values():
        if value.dtype in WEIGHT_DTYPES and value.dtype.name in ("float32", "bfloat16", "float16"):
            return value.dtype.name
    return None


def load_hf(
    path: str | os.PathLike,
    dtype: Any = None,
    *,
    param_dtype: Any = None,
    place: Placer | None = None,
    check_values: bool = True,
    **config_overrides: Any,
) -> Gemma2:
    """Load a Hugging Face Gemma 2 checkpoint directory (``config.json`` + safetensors).

    Single-file (``model.safetensors``) and sharded (``model.safetensors.index.json``) layouts
    are both read, as are the released folders (bf16 shards, a transformers-4.42 config.json,
    vocabulary 256000). ``dtype`` is the activation dtype and, unless ``param_dtype`` is given,
    the parameter dtype; ``None`` (the default) is transformers' ``dtype="auto"``: the dtype
    ``config.json`` declares, else the weights' own. ``model.config`` holds the config read from
    ``config.json``.

    Everything read is treated as untrusted and checked before the model is built: config
    fields, the index's shard names, every safetensors header, then tensor names, shapes and
    dtypes against the config, then every value (finite; within float16's range when the model
    computes in float16), naming the tensor and its file. The files are memory-mapped and
    read tensor by tensor, in their own dtype: a tensor already in our layout and dtype is used
    in place, any other is converted once, and no tensor is ever held twice.

    Checking the values reads every weight once (the 2B's 5.2 GB: about 0.8 s here, at the
    speed memory is read); ``check_values=False`` skips only that (everything else is still
    checked), for a file you trust: the load then reads no weight at all, as transformers' does.
    """
    path = Path(path)
    config = read_hf_config(path, dtype, param_dtype, **config_overrides)
    tensors, origin = _read_tensors(path)
    if dtype is None and declared_dtype(read_json(path / "config.json", "config")) is None:
        own = _first_float_dtype(tensors)
        if own and own != config.dtype:
            config = config.replace(dtype=own, param_dtype=jnp.dtype(param_dtype or own).name)
    arrays, names = import_arrays(HF, config, tensors, source=str(path))
    origins = {p: f"{key} in {origin[key]}" for p, key in names.items()}
    return from_arrays(
        config, arrays, source=str(path), place=place, check=check_values, origins=origins
    )


# ----------------------------------------------------------------------------- writing
def _is_model_file(name: str) -> bool:
    """A file a save writes (or an earlier save's leftover temporary of one)."""
    name = name.removesuffix(".tmp")
    return name in ("config.json", SINGLE_FILE, INDEX_FILE, MANIFEST_FILE) or bool(
        _SHARD_NAME.fullmatch(name)
    )


def _architecture(config: Gemma2Config) -> dict[str, Any]:
    return {f: getattr(config, f) for f in _ARCHITECTURE}


def _manifest_problems(path: Path, *, checksums: bool) -> list[str]:
    """What differs between ``path`` and the manifest save_hf left in it ([]: nothing)."""
    try:
        manifest = read_json(path / MANIFEST_FILE, "save manifest")
        files = manifest["files"]
        listed = {
            str(name): (int(info["bytes"]), str(info["sha256"])) for name, info in files.items()
        }
    except (CheckpointError, KeyError, TypeError, ValueError, AttributeError) as exc:
        return [f"its {MANIFEST_FILE} is not one save_hf wrote ({exc})"]
    problems = []
    for name, (size, digest) in sorted(listed.items()):
        file = path / name
        if not _is_plain_file_name(name) or not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != size:
            problems.append(f"{name} has {file.stat().st_size} bytes, {size} were written")
        elif checksums and _sha256(file) != digest:
            problems.append(f"{name} has changed since it was written (sha256 differs)")
    extra = sorted(
        p.name
        for p in path.iterdir()
        if _is_model_file(p.name) and p.name != MANIFEST_FILE and p.name not in listed
    )
    problems += [f"{name} was not written by that save" for name in extra]
    return problems


def _is_plain_file_name(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _sha256(file: Path) -> str:
    """The file's sha256, computed once per version of the file (size, mtime, inode) in this
    process: a chapter that locates the same weights twice reads them once."""
    st = file.stat()
    key = (str(file.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def _check_replaceable(path: Path, config: Gemma2Config, overwrite: bool) -> None:
    """Refuse to replace a folder holding a model that save_hf did not write, or another
    model (another architecture), unless ``overwrite``."""
    held = sorted(p.name for p in path.iterdir() if _is_model_file(p.name)) if path.is_dir() else []
    if not held or overwrite:
        return
    how = "pass overwrite=True to replace it, or save into another folder"
    if MANIFEST_FILE not in held:
        raise CheckpointError(
            f"{path} holds a model that save_hf did not write ({held[:4]}); "
            f"refusing to replace it: {how}"
        )
    problems = _manifest_problems(path, checksums=False)
    if problems:
        raise CheckpointError(
            f"{path} holds a model that has changed since save_hf wrote it "
            f"({'; '.join(problems[:4])}); refusing to replace it: {how}"
        )
    theirs = read_json(path / MANIFEST_FILE, "save manifest").get("architecture")
    if theirs != _architecture(config):
        raise CheckpointError(
            f"{path} holds a different model ({theirs}, this one is "
            f"{_architecture(config)}); refusing to replace it: {how}"
        )


def _plan_shards(
    sd: Mapping[str, np.ndarray], max_shard_bytes: int | None
) -> dict[str, dict[str, np.ndarray]]:
    """{file name: tensors}: one file, or shards of at most ``max_shard_bytes`` (a tensor
    larger than that gets a shard of its own)."""
    if max_shard_bytes is None:
        return {SINGLE_FILE: dict(sd)}
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in sd.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    return {
        f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors": shard
        for j, shard in enumerate(shards)
    }


def _write_text(path: Path, text: str) -> dict[str, Any]:
    data = text.encode()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _write_model(
    folder: Path, model: Gemma2, hf_config: Mapping[str, Any], max_shard_bytes: int | None
) -> None:
    """config.json, the weights (and index), then the manifest, into a fresh ``folder``."""
    written = {
        "config.json": _write_text(folder / "config.json", json.dumps(hf_config, indent=2) + "\n")
    }
    sd = hf_state_dict(model)
    plan = _plan_shards(sd, max_shard_bytes)
    for name, tensors in plan.items():
        digest = write_safetensors(folder / name, tensors)
        written[name] = {"bytes": (folder / name).stat().st_size, "sha256": digest}
    if max_shard_bytes is not None:
        index = {
            "metadata": {"total_size": sum(a.nbytes for a in sd.values())},
            "weight_map": {t: name for name, tensors in plan.items() for t in tensors},
        }
        written[INDEX_FILE] = _write_text(folder / INDEX_FILE, json.dumps(index, indent=2))
    manifest = {"writer": _WRITER, "architecture": _architecture(model.config), "files": written}
    _write_text(folder / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    fsync_dir(folder)


def save_hf(
    model: Gemma2,
    path: str | os.PathLike,
    *,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
    hf_config: Mapping[str, Any] | None = None,
) -> None:
    """Write ``model`` as a Hugging Face checkpoint (config.json + safetensors).

    With ``max_shard_bytes`` the weights are split into several files with an index, as the
    hub does for large models. ``hf_config`` is the config.json to write (default
    :func:`gemma2_lite.hf_config.config_to_hf`); it must describe ``model.config``.

    Transactional: everything is written into a new sibling folder, flushed, and swapped in at
    once, so an interrupted save (a kill, a full disk) leaves the previous model whole and
    loadable. Other files in the folder (a tokenizer, a README) are carried over; the previous
    save's weights are not. A folder holding a model that save_hf did not write (a download),
    or a different model, is refused unless ``overwrite=True``: a save into the wrong folder
    cannot delete it.
    """
    if not isinstance(model, Gemma2):
        raise TypeError(f"save_hf saves a Gemma2 model, got {type(model).__name__}")
    if is_quantized(model):
        raise ValueError(
            "save_hf saves the model's own weights; this one is quantized: "
            "save the original model (quantize after loading)"
        )
    if max_shard_bytes is not None:
        check_int(
            max_shard_bytes,
            "max_shard_bytes",
            low=1,
            what="a positive number of bytes or None (one file)",
        )
    hf_config = dict(config_to_hf(model.config) if hf_config is None else hf_config)
    described = config_from_hf(
        hf_config,
        name=model.config.name,
        dtype=model.config.dtype,
        param_dtype=model.config.param_dtype,
    )
    if described != model.config:
        raise CheckpointError(
            f"hf_config describes {described!r}, not the model's {model.config!r}"
        )
    target = Path(path).resolve()
    _check_replaceable(target, model.config, overwrite)
    with staged_folder(target) as staging:
        _write_model(staging, model, hf_config, max_shard_bytes)
        carry_over(target, staging, skip=_is_model_file)


# ----------------------------------------------------------------------------- verifying
def verify_hf_folder(path: str | os.PathLike) -> list[str]:
    """What is wrong with a Hugging Face checkpoint folder, without loading it ([]: nothing).

    Checks config.json, the index (valid, every shard present), every shard's header, that
    every tensor is where the index says and the names and shapes fit the config; and where
    save_hf wrote the folder, every file's size and sha256 against its manifest. Reads the
    headers and, for a save of ours, the bytes; never builds the model.
    """
    path = Path(path)
    try:
        config = read_hf_config(path)
        tensors = read_hf_tensors(path)
        arrays, _ = import_arrays(HF, config, tensors, source=str(path))
        check_arrays(config, arrays, source=str(path))
    except (CheckpointError, OSError) as exc:
        return [str(exc)]
    if (path / MANIFEST_FILE).exists():
        return [f"{path}: {problem}" for problem in _manifest_problems(path, checksums=True)]
    return []
