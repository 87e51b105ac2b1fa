"""The safetensors format, read and written by a small reader of our own (never pickle).

A file is an 8-byte little-endian header length, a JSON header ``{name: {"dtype", "shape",
"data_offsets": [start, end]}}`` (plus an optional ``"__metadata__"``), then the raw
little-endian tensor bytes. The header is untrusted input: every field is checked against
the file before a byte of tensor data is used (see :func:`read_header`).

Tensors are read zero-copy: :func:`read_safetensors` memory-maps the file and returns numpy
views of it in the file's dtype, so nothing is read until it is used, and
:func:`release_pages` hands the pages of a tensor that has been copied elsewhere back to the
page cache (a loader that reads tensor by tensor then never holds the whole file resident).
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from .checks import check_regular_file, is_int

__all__ = [
    "CheckpointError",
    "DTYPES",
    "WEIGHT_DTYPES",
    "read_json",
    "read_header",
    "read_safetensors",
    "write_safetensors",
    "mapping_of",
    "release_pages",
    "fsync_dir",
]


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: missing, extra or mis-shaped tensors, a
    corrupt file, a bad value."""


#: safetensors dtype name -> numpy dtype.
DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
#: The dtypes a weight may have: anything else (an int or bool tensor) would be cast to float
#: without meaning anything.
WEIGHT_DTYPES = frozenset(
    np.dtype(t) for t in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16)
)
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
_MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit
# Where the data section starts is padded to this, so that tensors whose sizes are multiples
# of it start aligned: the runtime can then use them in place (the format only asks for 8).
_ALIGN = 64

Entry = tuple[np.dtype, tuple[int, ...], int, int]  # dtype, shape, start, end
# The read-only file mappings read_safetensors made (the only ones release_pages touches).
_FILE_MAPPINGS: weakref.WeakSet[mmap.mmap] = weakref.WeakSet()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook: a name given twice (which one would win?) is an error."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise CheckpointError(f"the key {key!r} appears twice")
        seen[key] = value
    return seen


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The JSON value in ``path`` (a regular file), strictly: a key given twice, invalid JSON
    or a non-UTF-8 file is a :class:`CheckpointError` naming ``what`` and the file."""
    path = Path(path)
    check_regular_file(path, what, CheckpointError)
    try:
        return json.loads(path.read_bytes(), object_pairs_hook=_no_duplicates)
    except CheckpointError as exc:
        raise CheckpointError(f"{what} {path}: {exc}") from None
    except RecursionError:
        raise CheckpointError(f"{what} {path} is nested too deeply to be a {what}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        # Not the exception's text: for a non-UTF-8 file it would quote the file's bytes.
        where = f" ({exc.msg}, line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise CheckpointError(f"{what} {path} is not valid JSON{where}") from None


def _is_count(x: Any) -> bool:
    return is_int(x) and bool(x >= 0)


def _entry(where: str, info: Any, data_size: int) -> Entry:
    """One header entry, every field checked against the data section's size."""
    if not isinstance(info, dict):
        raise CheckpointError(
            f"{where}: expected {{'dtype', 'shape', 'data_offsets'}}, got {type(info).__name__}"
        )
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise CheckpointError(
            f"{where} has unsupported dtype {dtype_name!r}; expected one of {sorted(DTYPES)}"
        )
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(
            f"{where}: shape must be a list of non-negative integers, got {shape!r}"
        )
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) for o in offsets):
        raise CheckpointError(
            f"{where}: data_offsets must be [start, end] integers, got {offsets!r}"
        )
    start, end = offsets
    if not 0 <= start <= end <= data_size:
        raise CheckpointError(
            f"{where}: data_offsets {offsets} lie outside the file's {data_size} data bytes "
            "(need 0 <= start <= end <= that); the file is truncated or corrupt"
        )
    dtype = np.dtype(DTYPES[dtype_name])
    nbytes = math.prod(shape) * dtype.itemsize
    if end - start != nbytes:
        raise CheckpointError(
            f"{where}: data_offsets {offsets} span {end - start} bytes, but {dtype_name} "
            f"{shape} needs {nbytes}; the file is corrupt"
        )
    return dtype, tuple(shape), start, end


def read_header(path: str | os.PathLike) -> tuple[dict[str, Entry], int]:
    """The validated header of a safetensors file: ``{name: (dtype, shape, start, end)}`` with
    offsets relative to the data section, and where that section starts in the file.

    Every field is checked against the file before any byte of tensor data is used: dtype
    known, shape a list of non-negative integers, ``0 <= start <= end <=`` the data section's
    size, ``end - start`` exactly the bytes of that dtype and shape, no two tensors sharing
    bytes. A negative offset would otherwise hand back the file's own header as weights, and a
    truncated file would fail later with a bare ``cannot reshape``.
    """
    path = Path(path)
    check_regular_file(path, "safetensors file", CheckpointError)
    size = path.stat().st_size
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        # The length is not quoted in the message: it is the file's first 8 bytes.
        if not 0 < header_len <= min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{path} is not a safetensors file or is truncated: its first 8 bytes are not "
                f"the length of a JSON header that fits in the file ({size} bytes)"
            )
        header = f.read(header_len)
    try:
        info_all = json.loads(header, object_pairs_hook=_no_duplicates)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: header: {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path} is not a safetensors file: its header is not JSON") from None
    if not isinstance(info_all, dict):
        raise CheckpointError(
            f"{path}: the header must be a JSON object of tensors, got {type(info_all).__name__}"
        )
    data_size = size - 8 - header_len
    entries = {
        name: _entry(f"{path}: tensor {name!r}", info, data_size)
        for name, info in info_all.items()
        if name != "__metadata__"
    }
    spans = sorted(
        (start, end, name) for name, (_, _, start, end) in entries.items() if end > start
    )
    for (_, end1, name1), (start2, _, name2) in zip(spans, spans[1:]):
        if start2 < end1:
            raise CheckpointError(
                f"{path}: tensors {name1!r} and {name2!r} share bytes "
                "(overlapping data_offsets); the file is corrupt"
            )
    return entries, 8 + header_len


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file as read-only, memory-mapped numpy arrays.

    The header is validated first (see :func:`read_header`); any problem is a
    :class:`CheckpointError` naming the file and tensor. Tensors keep their stored dtype
    (integer and bool tensors too: :func:`gemma2_lite.params.from_arrays` refuses them as
    weights). Nothing is read until used: each array is a view of the file's mapping, which
    stays open as long as one of them is alive.
    """
    path = Path(path)
    entries, base = read_header(path)
    if not entries:
        return {}
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    _FILE_MAPPINGS.add(mapped)
    return {
        name: np.frombuffer(mapped, dtype, math.prod(shape), base + start).reshape(shape)
        for name, (dtype, shape, start, end) in entries.items()
    }


def mapping_of(array: np.ndarray) -> mmap.mmap | None:
    """The file mapping made by :func:`read_safetensors` that ``array`` is a view of, if any
    (following ``.base`` links); never another mapping (dropping the pages of an anonymous
    one would zero them)."""
    base: Any = array
    while base is not None:
        if isinstance(base, mmap.mmap):
            return base if base in _FILE_MAPPINGS else None
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return None


def release_pages(array: np.ndarray) -> None:
    """Drop the pages under ``array`` from this process's resident memory, if ``array`` is a
    view of a file mapping (else do nothing).

    The data stays in the file and the page cache: touching the array again reads it back.
    Whole pages are dropped, so a neighbour's partial page may be too; for a read-only file
    mapping that only means it is read back when next used.
    """
    mapped = mapping_of(array)
    if mapped is None or array.size == 0 or not hasattr(mapped, "madvise"):
        return
    start = np.frombuffer(mapped, np.uint8).ctypes.data
    low, high = np.lib.array_utils.byte_bounds(array)
    page = mmap.PAGESIZE
    first = (low - start) // page * page
    last = min(len(mapped), -(-(high - start) // page) * page)
    if 0 <= first < last:
        mapped.madvise(mmap.MADV_DONTNEED, first, last - first)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new file in directory ``path`` durable (where the OS allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write ``tensors`` to ``path`` in the safetensors format; return the file's sha256.

    Atomic: the bytes go to ``path + ".tmp"``, are flushed to disk, and only then renamed over
    ``path``, so a kill or a full disk leaves either the old file or the new one. Tensors are
    written straight from their memory (no copy), hashed on the way.
    """
    path = Path(path)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name, value in tensors.items():
        arr = np.ascontiguousarray(value)
        if arr.dtype not in _NAMES:
            raise CheckpointError(f"cannot store {name} of dtype {arr.dtype} in safetensors")
        header[name] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % _ALIGN)  # spaces: still JSON, still 8-aligned
    digest = hashlib.sha256()
    tmp = Path(str(path) + ".tmp")
    try:
        with open(tmp, "wb") as f:
            chunks: list[bytes | memoryview] = [
                len(blob).to_bytes(8, "little"),
                blob,
                *(a.reshape(-1).view(np.uint8).data for a in arrays if a.size),
            ]
            for chunk in chunks:
                f.write(chunk)
                digest.update(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest.hexdigest()
