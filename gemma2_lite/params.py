"""The model's parameters by path: names, shapes and logical axes without building the model,
and the model to and from a flat ``{path: array}`` mapping, every array checked.

A path is a tuple such as ``("layers", 0, "attn", "q")``; :func:`path_name` writes it
``layers.0.attn.q``. Every checkpoint format (see :mod:`gemma2_lite.weight_maps`) is read into
such a mapping and handed to :func:`from_arrays`, which checks names, shapes, dtypes and values
before a single parameter is placed.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from .config import Gemma2Config
from .model import Gemma2, abstract_model
from .safetensors_io import WEIGHT_DTYPES, CheckpointError, mapping_of, release_pages

__all__ = [
    "Path_",
    "Placer",
    "ParamInfo",
    "path_name",
    "param_infos",
    "param_shapes",
    "to_arrays",
    "check_arrays",
    "check_values",
    "host_param",
    "from_arrays",
]

Path_ = tuple[Any, ...]  # a parameter path in the model, e.g. ("layers", 0, "attn", "q")
Placer = Callable[[Path_, np.ndarray], jax.Array]

_FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
_CHUNK_BYTES = 1 << 24  # values are checked 16 MiB at a time
_TILE = (1024, 8)  # a transposed copy's tile (rows, columns)
_BAND = 1024  # rows per thread's share of a tensor
_THREADED_BYTES = 1 << 22  # smaller tensors are copied by one thread
_MAPPED_BYTES = 1 << 20  # larger host buffers: their own mmap
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_ALIGN = 64  # XLA:CPU uses 64-byte aligned memory in place
# A float is not finite when all its exponent bits are set: the bits without the sign are
# then at least the exponent mask. Per dtype: the unsigned and signed integers of its width,
# and that mask.
_EXPONENT = {
    np.dtype(ml_dtypes.bfloat16): (np.uint16, np.int16, 0x7F80),
    np.dtype(np.float16): (np.uint16, np.int16, 0x7C00),
    np.dtype(np.float32): (np.uint32, np.int32, 0x7F800000),
    np.dtype(np.float64): (np.uint64, np.int64, 0x7FF0000000000000),
}
_SCAN_BYTES = 1 << 20  # the two passes of _any_not_finite share a block this size in cache


def _any_not_finite(values: np.ndarray) -> bool:
    """Whether ``values`` (bf16, float16, float32 or float64) holds a NaN or an infinity.

    Two maxima over the raw bits, no temporary array: read as signed integers, a positive
    non-finite value is the largest there can be (at least the exponent mask); read as
    unsigned, a negative one is (at least sign bit | mask), above every finite negative.
    Each 1 MiB block is read twice while it is in cache: about memory speed, against a third
    of it for masking the exponent bits into a temporary and comparing.
    """
    unsigned, signed, mask = _EXPONENT[np.dtype(values.dtype)]
    flat = values.reshape(-1).view(unsigned)
    negative = (1 << (8 * values.itemsize - 1)) | mask  # the sign bit and the exponent mask
    step = max(1, _SCAN_BYTES // flat.itemsize)
    for start in range(0, flat.size, step):
        block = flat[start : start + step]
        if int(block.max()) >= negative or int(block.view(signed).max()) >= mask:
            return True
    return False


def path_name(path: Sequence[Any]) -> str:
    """``("layers", 0, "attn", "q")`` -> ``"layers.0.attn.q"``."""
    return ".".join(str(p) for p in path)


@dataclass(frozen=True)
class ParamInfo:
    """One parameter's shape and logical axis names (see :mod:`gemma2_lite.sharding`)."""

    shape: tuple[int, ...]
    logical_axes: tuple[str | None, ...]


def param_infos(config: Gemma2Config) -> dict[Path_, ParamInfo]:
    """Every parameter's path, shape and logical axes, from an abstract *one-layer* model (all
    layers share their shapes): cheap for any ``num_layers``, unlike tracing the whole model."""
    one = abstract_model(config.replace(num_layers=1))
    infos: dict[Path_, ParamInfo] = {}
    for path, var in nnx.to_flat_state(nnx.state(one, nnx.Param)):
        axes = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
        info = ParamInfo(tuple(var.shape), tuple(axes))
        if path[0] == "layers":
            infos.update({("layers", i, *path[2:]): info for i in range(config.num_layers)})
        else:
            infos[tuple(path)] = info
    return infos


def param_shapes(config: Gemma2Config) -> dict[Path_, tuple[int, ...]]:
    """Every parameter's path and shape (see :func:`param_infos`)."""
    return {path: info.shape for path, info in param_infos(config).items()}


def to_arrays(model: Gemma2) -> dict[Path_, np.ndarray]:
    """Every parameter of ``model`` as numpy, keyed by its path, e.g. ("layers", 0, "attn", "q")."""
    state = nnx.state(model, nnx.Param)
    return {
        tuple(path): np.asarray(var.get_value() if hasattr(var, "get_value") else var.value)
        for path, var in nnx.to_flat_state(state)
    }


def _listing(names: list[str]) -> str:
    return f"{names[:8]}{' ...' if len(names) > 8 else ''}"


def check_arrays(
    config: Gemma2Config, arrays: Mapping[Path_, Any], *, source: str = "checkpoint"
) -> None:
    """Check parameter arrays against ``config`` without building the model.

    In this order, each step cheap whatever the config claims: the layer indices (a
    config.json claiming 200 layers over a 2-layer file is refused before anything is traced),
    then every name and shape, then the dtypes (weights must be floating point: an integer or
    bool tensor would be cast silently). Raises :class:`CheckpointError` naming ``source``
    and the tensors. Values are checked as the arrays are placed (:func:`check_values`).
    """
    layers = sorted({p[1] for p in arrays if p and p[0] == "layers"}, key=str)
    if len(layers) != config.num_layers or not all(
        isinstance(i, int) and 0 <= i < config.num_layers for i in layers
    ):
        found = f"layers {layers[0]}..{layers[-1]}" if layers else "no layers"
        raise CheckpointError(
            f"{source} does not match {config!r}: the config has num_layers="
            f"{config.num_layers}, the checkpoint holds {len(layers)} ({found})"
        )
    shapes = param_shapes(config)
    missing = sorted(path_name(p) for p in shapes.keys() - arrays.keys())
    extra = sorted(path_name(p) for p in arrays.keys() - shapes.keys())
    problems = []
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if extra:
        problems.append(f"unexpected tensors: {_listing(extra)}")
    for path in sorted(shapes.keys() & arrays.keys(), key=path_name):
        want, got = shapes[path], tuple(np.shape(arrays[path]))
        if want != got:
            problems.append(f"{path_name(path)}: expected shape {want}, found {got}")
        dtype = getattr(arrays[path], "dtype", None)
        dtype = np.asarray(arrays[path]).dtype if dtype is None else np.dtype(dtype)
        if dtype not in WEIGHT_DTYPES:
            problems.append(
                f"{path_name(path)}: dtype {dtype} is not a floating-point weight "
                f"(expected one of {sorted(str(d) for d in WEIGHT_DTYPES)})"
            )
    if problems:
        raise CheckpointError(f"{source} does not match {config!r}:\n  " + "\n  ".join(problems))


def check_values(values: np.ndarray, where: str, *, float16: bool = False, offset: int = 0) -> None:
    """Refuse non-finite weights (and, with ``float16``, any beyond float16's +-65504).

    One inf in a norm weight would otherwise load, and the final soft-cap would turn the
    resulting +-inf logits into +-30 that no guard sees. Two passes over the raw bits at
    about memory speed (:func:`_any_not_finite`); the slow search for the first bad value runs
    only when there is one. ``offset`` is the flat index of ``values[0]`` in its tensor (for
    chunks), ``where`` names the tensor.
    """
    dtype = np.dtype(values.dtype)
    if dtype in _EXPONENT and values.size:
        bad = _any_not_finite(np.ascontiguousarray(values))
    else:
        bad = not bool(np.all(np.isfinite(values)))
    wide = float16 and dtype != np.float16
    if not bad and not (wide and float(np.max(np.abs(values), initial=0)) > _FLOAT16_MAX):
        return
    as32 = values.astype(np.float32).reshape(-1)
    finite = np.isfinite(as32)
    if not finite.all():
        first = int(np.argmin(finite))
        raise CheckpointError(
            f"{where}: {int((~finite).sum())} value(s) are not finite (first: "
            f"{as32[first]} at flat index {offset + first}); weights must be finite numbers"
        )
    first = int(np.argmax(np.abs(as32) > _FLOAT16_MAX))
    raise CheckpointError(
        f"{where}: value {as32[first]} at flat index {offset + first} is beyond float16's "
        f"range (+-{_FLOAT16_MAX:g}) and the model computes in float16"
    )


def _aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised C-contiguous array whose data is 64-byte aligned.

    A large one is its own anonymous memory map, its pages made up front (``MAP_POPULATE``):
    measured here, filling 1.2 GB so took 1.5 s, against 5 s for numpy's own allocation,
    whose transparent huge pages the kernel compacts memory for on first touch.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes >= _MAPPED_BYTES and os.name == "posix":
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        return np.frombuffer(mmap.mmap(-1, nbytes, flags=flags), dtype).reshape(shape)
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = (-raw.ctypes.data) % _ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _same_bytes(dst: np.ndarray, src: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both as unsigned integers when no cast is needed: numpy copies its own integer types
    several times faster than a custom dtype such as bfloat16 (and without holding the GIL)."""
    if dst.dtype != src.dtype or dst.dtype.itemsize not in _UNSIGNED:
        return dst, src
    unsigned = _UNSIGNED[dst.dtype.itemsize]
    return dst.view(unsigned), src.view(unsigned)


def _copy_band(d: np.ndarray, s: np.ndarray, rows: range) -> None:
    for i in rows:
        for j in range(0, s.shape[1], _TILE[1]):
            np.copyto(
                d[i : i + _TILE[0], j : j + _TILE[1]],
                s[i : i + _TILE[0], j : j + _TILE[1]],
                casting="unsafe",
            )


def _copy_tiled(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` (with a cast) for a ``src`` whose last axis is not contiguous (a
    transposed view): per 2-D slice, in tall narrow tiles (each reads a few source rows in
    full, so both sides stay in cache), the bands of tiles shared among a few threads."""
    dst, src = _same_bytes(dst, src)
    if src.ndim < 2 or src.strides[-1] == src.itemsize:
        np.copyto(dst, src, casting="unsafe")
        return
    jobs = [
        (dst[index], src[index], range(start, min(start + _BAND, src.shape[-2]), _TILE[0]))
        for index in np.ndindex(*src.shape[:-2])
        for start in range(0, src.shape[-2], _BAND)
    ]
    if len(jobs) == 1 or src.nbytes < _THREADED_BYTES:
        for job in jobs:
            _copy_band(*job)
    else:
        list(_pool().map(lambda job: _copy_band(*job), jobs))


_WORKERS = max(1, min(4, os.cpu_count() or 1))


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_WORKERS, thread_name_prefix="load")


@functools.lru_cache(maxsize=1)
def _tensor_pool() -> ThreadPoolExecutor:
    """Whole tensors prepared side by side (a separate pool: a tensor's job may use
    :func:`_pool` for its transposed copy)."""
    return ThreadPoolExecutor(_WORKERS, thread_name_prefix="tensor")


def _chunks(array: np.ndarray) -> list[tuple[int, slice]]:
    """(flat offset, rows) of the 16 MiB row blocks of ``array`` (the whole array if 0-d)."""
    if array.ndim == 0 or array.nbytes <= _CHUNK_BYTES:
        return [(0, slice(None))]
    row = math.prod(array.shape[1:])
    step = max(1, _CHUNK_BYTES // max(1, row * array.itemsize))
    return [(start * row, slice(start, start + step)) for start in range(0, len(array), step)]


def host_param(
    array: np.ndarray, dtype: Any, where: str, *, check: bool = True, float16: bool = False
) -> np.ndarray:
    """``array`` as a C-contiguous, 64-byte aligned array of ``dtype``, values checked.

    Made for arrays that are views of a memory-mapped file, read tensor by tensor: a view of a
    file mapping already in that form is returned as it is (the runtime can then use the
    file's pages in place: no copy at all); any other array is copied (transposed and cast as
    needed) into one new array, block by block (never aliased: the caller may change it).
    The file pages read are handed back as soon as they are used, so loading never holds a
    tensor twice. ``where`` names the tensor in errors.
    """
    array = np.asarray(array)
    dtype = np.dtype(dtype)
    in_place = (
        array.dtype == dtype
        and array.flags.c_contiguous
        and array.ctypes.data % _ALIGN == 0
        and mapping_of(array) is not None
    )
    out = array if in_place else _aligned_empty(array.shape, dtype)
    contiguous = array.flags.c_contiguous
    if not contiguous and not in_place:
        with np.errstate(all="ignore"):  # an overflow is reported below
            _copy_tiled(out, array)
    for offset, rows in _chunks(out):
        if contiguous and not in_place:
            with np.errstate(all="ignore"):
                np.copyto(*_same_bytes(out[rows], array[rows]), casting="unsafe")
        if check:
            try:
                check_values(out[rows], where, float16=float16, offset=offset)
            except CheckpointError:
                if not in_place:  # a cast's overflow: say so if the stored values are finite
                    check_values(array[rows], where, float16=dtype == np.float16, offset=offset)
                raise
        if contiguous:
            release_pages(array[rows])
    if not contiguous:
        release_pages(array)
    return out


def _set(var: Any, value: Any) -> None:
    var.set_value(value) if hasattr(var, "set_value") else setattr(var, "value", value)


def from_arrays(
    config: Gemma2Config,
    arrays: Mapping[Path_, np.ndarray],
    *,
    source: str = "checkpoint",
    place: Placer | None = None,
    check: bool = True,
    origins: Mapping[Path_, str] | None = None,
) -> Gemma2:
    """Build a :class:`Gemma2` from parameter arrays, checking every name, shape and value.

    The arrays are checked by :func:`check_arrays` before the model is even traced; then the
    model is created abstractly (no random initialisation, no memory) and each array becomes
    its parameter in ``config.param_dtype``, one at a time: by :func:`host_param` and
    ``jax.device_put`` (zero-copy where the array allows it), or by ``place`` when given
    (:func:`gemma2_lite.sharding.make_placer` puts each device's slice where it belongs).
    With ``check`` every value must be finite (and within float16's range when the model
    computes or stores in float16): a bad tensor is refused, named by its path and by
    ``origins[path]`` (e.g. the file's tensor name and file) when given.
    """
    check_arrays(config, arrays, source=source)
    dtype = np.dtype(config.jnp_param_dtype)
    float16 = "float16" in (config.dtype, config.param_dtype)
    origins = origins or {}

    def where(path: Path_) -> str:
        return f"{source}: {path_name(path)}" + (f" ({origins[path]})" if path in origins else "")

    def prepare(path: Path_) -> np.ndarray:
        return host_param(arrays[path], dtype, where(path), check=check, float16=float16)

    # Tensors are laid out and checked a few at a time on worker threads (numpy releases the
    # GIL), starting before the model is traced, so that reading the values overlaps the
    # tracing and each other: the load then runs at about the speed memory is read.
    ahead = 2 * _WORKERS if place is None else 0
    order = list(arrays)
    jobs = {path: _tensor_pool().submit(prepare, path) for path in order[:ahead]}
    try:
        graphdef, state = nnx.split(abstract_model(config))
        for index, path in enumerate(order):
            if index + ahead < len(order):
                nxt = order[index + ahead]
                jobs[nxt] = _tensor_pool().submit(prepare, nxt)
            if place is None:
                host = jobs.pop(path).result()
                _set(_param(state, path), jax.device_put(host))
            else:
                # The array as stored: a sharded placer reads (and checks) only each device's
                # slice.
                _set(_param(state, path), place(path, arrays[path]).astype(dtype))
    finally:
        for job in jobs.values():
            job.cancel()
    return nnx.merge(graphdef, state)


def _param(state: Any, path: Path_) -> Any:
    """The variable at ``path`` in an ``nnx.State``."""
    node = state
    for key in path:
        node = node[key]
    return node
