"""A training run's files: checkpoints of its state (saved atomically, verified by checksums,
restored from the newest intact step) and its metrics (``metrics.csv``, ``metrics.json``).

* **Checkpoints**: Orbax ``CheckpointManager`` (written to a temporary directory and renamed
  when complete, so a crash mid-save leaves the previous checkpoint intact), holding a pytree
  of arrays (params, optimizer state, rng) and JSON metadata (step, data position, metrics so
  far); then the sha256 of every file goes into the step's ``checksums.json``. A step that
  fails its checksums, or has none, is never restored: it is skipped with a warning (and moved
  to ``skipped/`` by the trainer).
* **Metrics**: ``metrics.csv`` (one row per step) and ``metrics.json`` (configs + all rows),
  each written to a temporary file and renamed.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .train_config import TrainError

__all__ = [
    "CHECKSUMS_FILE",
    "SKIPPED_DIR",
    "SkippedCheckpointWarning",
    "checkpoint_steps",
    "verify_checkpoint",
    "save_checkpoint",
    "latest_checkpoint_step",
    "restore_checkpoint",
    "set_aside_step",
    "data_fingerprint",
    "write_metrics",
    "load_history",
]


def _flat_names(tree: Any) -> tuple[list[str], list[Any], Any]:
    """Leaves of ``tree`` with readable unique names ('params.layers.0.attn.q.value')."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [
        re.sub(r"[^A-Za-z0-9_.]", "_", jax.tree_util.keystr(p, simple=True, separator="."))
        for p, _ in with_path
    ]
    if len(set(names)) != len(names):
        raise TrainError("training state has leaves with clashing names")
    return names, [leaf for _, leaf in with_path], treedef


def _manager(directory: Path, keep: int) -> Any:
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(directory.absolute(), options=options)


CHECKSUMS_FILE = "checksums.json"
SKIPPED_DIR = "skipped"  # broken steps are moved here (not an integer: Orbax ignores it)
_EMPTY = "the step folder is empty"


class SkippedCheckpointWarning(UserWarning):
    """A saved step failed its integrity check and an older one was used instead."""


def _step_files(step_dir: Path) -> dict[str, str]:
    """sha256 of every file under ``step_dir`` (but the checksum file), by relative path."""
    out = {}
    for file in sorted(step_dir.rglob("*")):
        if file.is_file() and file.name != CHECKSUMS_FILE:
            digest = hashlib.sha256(file.read_bytes()).hexdigest()
            out[file.relative_to(step_dir).as_posix()] = digest
    return out


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """Every step folder under ``directory`` (intact or not), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def verify_checkpoint(directory: str | os.PathLike, step: int) -> str | None:
    """Why step ``step`` under ``directory`` cannot be trusted, or None if it is intact.

    Intact means: every file listed in its ``checksums.json`` is there with the same sha256,
    and no file was added. A step without ``checksums.json`` cannot be verified and is not
    trusted: an interrupted save (killed after Orbax committed the step, before the checksums
    were written), a step from before checksums existed, or a deleted checksum file.
    """
    step_dir = Path(directory) / str(step)
    if not step_dir.is_dir() or not any(step_dir.iterdir()):
        return _EMPTY
    sums_file = step_dir / CHECKSUMS_FILE
    if not sums_file.is_file():
        return (
            f"it has no {CHECKSUMS_FILE}, so its files cannot be verified (a save "
            "interrupted before its checksums were written, or from before checksums)"
        )
    try:
        expected = json.loads(sums_file.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"its {CHECKSUMS_FILE} is unreadable"
    if not isinstance(expected, dict):
        return f"its {CHECKSUMS_FILE} is unreadable (no table of files)"
    found = _step_files(step_dir)
    missing = sorted(set(expected) - set(found))
    changed = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
    extra = sorted(set(found) - set(expected))
    for what, names in (
        ("missing", missing),
        ("changed (checksum differs)", changed),
        ("not part of the save", extra),
    ):
        if names:
            return f"file(s) {what}: {names[:3]}"
    return None


def set_aside_step(directory: str | os.PathLike, step: int) -> Path:
    """Move step ``step`` into ``directory/skipped/`` (kept for inspection, out of the way of
    the step that will be saved under that number again). Returns its new place."""
    directory = Path(directory)
    target = directory / SKIPPED_DIR / str(step)
    n = 1
    while target.exists():
        target, n = directory / SKIPPED_DIR / f"{step}-{n}", n + 1
    target.parent.mkdir(exist_ok=True)
    os.replace(directory / str(step), target)
    return target


def save_checkpoint(
    directory: str | os.PathLike, step: int, state: Any, meta: Mapping[str, Any], *, keep: int = 2
) -> Path:
    """Save a pytree of arrays ``state`` plus JSON ``meta`` as step ``step`` under ``directory``.

    Orbax writes into ``<step>.orbax-checkpoint-tmp-*`` and renames it to ``<step>`` only when
    everything is on disk, so an interrupted save never replaces a good checkpoint. Then the
    sha256 of every file goes into ``<step>/checksums.json`` (written to a temporary file and
    renamed), which :func:`verify_checkpoint` checks before a restore. A broken folder already
    holding this step number is moved to ``skipped/`` first. Returns the step's directory.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory)
    names, leaves, _ = _flat_names(state)
    flat = {n: np.asarray(leaf) for n, leaf in zip(names, leaves)}
    if (directory / str(step)).exists():
        set_aside_step(directory, step)
    _check_room(directory, sum(a.nbytes for a in flat.values()))
    with _manager(directory, keep) as mgr:
        mgr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(dict(meta))
            ),
            force=True,
        )
        mgr.wait_until_finished()
    step_dir = directory / str(step)
    tmp = step_dir / (CHECKSUMS_FILE + ".tmp")
    tmp.write_text(json.dumps({"algorithm": "sha256", "files": _step_files(step_dir)}, indent=1))
    os.replace(tmp, step_dir / CHECKSUMS_FILE)
    return step_dir


def _check_room(directory: Path, nbytes: int) -> None:
    """Raise ``OSError(ENOSPC)`` before Orbax starts when the disk cannot hold a step of
    ``nbytes`` of arrays (plus a margin for metadata): a write that fails half-way leaves
    Orbax's worker threads printing tracebacks, and only a temporary folder behind."""
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    need = nbytes + nbytes // 10 + (1 << 20)
    if free < need:
        raise OSError(
            errno.ENOSPC,
            f"no room for a checkpoint in {directory}: a step needs "
            f"about {need / 1e6:.1f} MB, {free / 1e6:.1f} MB are free",
            str(directory),
        )


def latest_checkpoint_step(directory: str | os.PathLike) -> int | None:
    """The newest step under ``directory`` that passes :func:`verify_checkpoint` (None if none)."""
    return next(
        (
            s
            for s in reversed(checkpoint_steps(directory))
            if verify_checkpoint(directory, s) is None
        ),
        None,
    )


def restore_checkpoint(
    directory: str | os.PathLike,
    like: Any,
    step: int | None = None,
    *,
    on_skip: Callable[[str], None] | None = None,
) -> tuple[Any, dict[str, Any], int]:
    """Restore ``(state, meta, step)``; ``like`` is a pytree with the state's structure, shapes
    and dtypes (arrays or ``jax.ShapeDtypeStruct``).

    Without ``step``, the newest *intact* step: a step that fails :func:`verify_checkpoint`
    (a flipped bit, a truncated or deleted file, no checksums, an empty folder) is skipped with a
    :class:`SkippedCheckpointWarning` naming it and why (also passed to ``on_skip``), and the
    next older one is tried. An explicit ``step`` that fails is an error.

    Raises:
      FileNotFoundError: no step folder at all. TrainError: no intact step (each named with its
      problem), or an intact step whose arrays do not fit ``like`` (a different config).
    """
    import orbax.checkpoint as ocp

    directory = Path(directory)
    names, leaves, treedef = _flat_names(like)
    abstract = {n: jax.ShapeDtypeStruct(np.shape(x), x.dtype) for n, x in zip(names, leaves)}
    candidates = [step] if step is not None else list(reversed(checkpoint_steps(directory)))
    if not candidates:
        raise FileNotFoundError(f"no checkpoint under {directory}")
    problems = []
    for candidate in candidates:
        problem = verify_checkpoint(directory, candidate)
        if problem is not None:
            if problem != _EMPTY:  # an empty folder is no checkpoint, not a broken one
                problems.append(f"step {candidate}: {problem}")
            if step is None:
                message = (
                    f"skipping checkpoint step {candidate} in {directory}: {problem}; "
                    "trying the previous step"
                )
                warnings.warn(message, SkippedCheckpointWarning, stacklevel=2)
                if on_skip is not None:
                    on_skip(message)
            continue
        with _manager(directory, 1_000_000) as mgr:
            try:
                out = mgr.restore(
                    candidate,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                    ),
                )
            except (ValueError, KeyError) as exc:
                raise TrainError(
                    f"checkpoint {directory}/{candidate} is intact but does not "
                    f"match this model/optimizer (different config?): "
                    f"{str(exc)[:300]}"
                ) from exc
        restored = [jnp.asarray(out["state"][n]) for n in names]
        return jax.tree_util.tree_unflatten(treedef, restored), dict(out["meta"]), int(candidate)
    if not problems:
        raise FileNotFoundError(f"no checkpoint under {directory} (only empty step folders)")
    raise TrainError(f"no intact checkpoint under {directory}: " + "; ".join(problems))


def data_fingerprint(tokens: np.ndarray) -> str:
    """sha256 of a token stream as int32 (what the batcher reads): resuming checks it."""
    return hashlib.sha256(np.ascontiguousarray(tokens, np.int32).tobytes()).hexdigest()


# ----------------------------------------------------------------------------- metrics
_TRAIN_FIELDS = ["step", "loss", "grad_norm", "lr", "tokens_seen", "tokens_per_s", "time_s"]
_EVAL_FIELDS = ["step", "val_loss", "val_perplexity", "val_tokens"]


def write_metrics(
    out_dir: Path, history: dict[str, list[dict[str, Any]]], meta: Mapping[str, Any]
) -> None:
    """``out_dir/metrics.csv`` (a row per step, eval columns on eval steps) and
    ``metrics.json`` (``meta`` + ``history``), each written whole and renamed into place."""
    evals = {row["step"]: row for row in history["eval"]}
    tmp = out_dir / "metrics.csv.tmp"
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=_TRAIN_FIELDS + _EVAL_FIELDS[1:])
        writer.writeheader()
        for row in history["train"]:
            e = evals.get(row["step"], {})
            writer.writerow({**row, **{k: e.get(k, "") for k in _EVAL_FIELDS[1:]}})
    os.replace(tmp, out_dir / "metrics.csv")
    tmp = out_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps({**meta, "history": history}, indent=1))
    os.replace(tmp, out_dir / "metrics.json")


def load_history(out_dir: str | os.PathLike) -> dict[str, Any]:
    """``metrics.json`` of a run: configs and ``history`` (``train`` and ``eval`` rows)."""
    return json.loads((Path(out_dir) / "metrics.json").read_text())
