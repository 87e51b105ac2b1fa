"""Replace a folder's contents all at once: write a new sibling folder, then swap it in.

A save written file by file into the folder it replaces can be interrupted half-way (a kill, a
full disk) and leave a mix of old and new files that still loads. Here the new files go into a
hidden sibling (``.NAME.saving-PID-XXXX``), are flushed to disk, and the sibling is then
exchanged with the folder in one ``renameat2(RENAME_EXCHANGE)`` (Linux); elsewhere the old
folder is renamed aside first, then the new one into place. Either way the folder holds the old
files or the new ones, never a mix; an interrupted save leaves only a hidden sibling behind,
which the next save into the same folder removes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .safetensors_io import fsync_dir

__all__ = ["staged_folder", "carry_over"]

_STAGING = "saving"
_REPLACED = "replaced"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` atomically; False where the OS or file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(path: Path) -> None:
    """Remove hidden siblings left by saves into ``path`` whose process is gone."""
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            pid = _staging_pid(entry.name, path.name)
            if pid is not None and entry.is_dir() and not entry.is_symlink() and not _alive(pid):
                shutil.rmtree(entry, ignore_errors=True)


def _staging_pid(name: str, target: str) -> int | None:
    """The process id in ``name`` when it is one of our hidden siblings of ``target``
    (``.{target}.saving-{pid}-{random}`` or ``.{target}.replaced-{pid}-{random}``), else None.
    Read with string operations, not a regex built from the folder's name."""
    prefix = f".{target}."
    if not name.startswith(prefix):
        return None
    kind, _, rest = name[len(prefix) :].partition("-")
    pid, _, suffix = rest.partition("-")
    if kind not in (_STAGING, _REPLACED) or not pid.isdigit() or not suffix:
        return None
    return int(pid)


def _swap_in(staging: Path, path: Path) -> None:
    if not path.exists():
        os.rename(staging, path)
    elif _exchange(staging, path):
        shutil.rmtree(staging, ignore_errors=True)  # now the old folder
    else:
        aside = Path(
            tempfile.mkdtemp(prefix=f".{path.name}.{_REPLACED}-{os.getpid()}-", dir=path.parent)
        )
        os.rename(path, aside / "old")
        os.rename(staging, path)
        shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(path.parent)


def _check_movable(path: Path) -> None:
    """Refuse a folder that cannot (or must not) be swapped: a file system's root or mount
    point (it cannot be renamed, and carrying its contents over would copy the whole file
    system), or the folder this process works in or one above it (the process would be left
    in the replaced, deleted folder)."""
    if os.path.ismount(path):
        raise OSError(
            errno.EBUSY,
            f"{path} is the root of a file system (a mount point); "
            "it cannot be replaced: save into a folder inside it",
            str(path),
        )
    cwd = Path.cwd().resolve()
    if cwd == path or path in cwd.parents:
        raise OSError(
            errno.EBUSY,
            f"{path} is the folder this program works in (or holds "
            "it); replacing it would leave the program in a deleted folder: save "
            "into a folder of its own",
            str(path),
        )


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # no bytes copied
    except OSError:
        shutil.copy2(src, dst)


def carry_over(old: Path, new: Path, skip: Callable[[str], bool]) -> None:
    """Put every entry of folder ``old`` whose name ``skip`` does not claim into ``new``:
    files as hard links where the file system allows (else copies), folders likewise,
    symbolic links as links. A sub-folder that is another file system's mount point is
    refused before anything is carried (it would be copied byte by byte, ``/proc`` forever)."""
    if not old.is_dir():
        return
    device = old.stat().st_dev
    for entry in old.iterdir():
        if not entry.is_symlink() and entry.is_dir() and entry.stat().st_dev != device:
            raise OSError(
                errno.EXDEV,
                f"{old} holds {entry.name}/, another file system's "
                "mount point, which cannot be moved with the folder; save into a "
                "folder of its own",
                str(entry),
            )
    for entry in old.iterdir():
        if skip(entry.name) or (new / entry.name).exists():
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(new / entry.name))


@contextlib.contextmanager
def staged_folder(path: str | os.PathLike) -> Iterator[Path]:
    """``with staged_folder(path) as new:`` write into ``new``; on a clean exit ``new``
    replaces ``path`` atomically (``path`` need not exist); on an exception ``path`` is left
    as it was and ``new`` is removed. ``path`` is resolved first, so a symbolic link to a
    folder keeps pointing where it did and the folder it points to gets the new files.
    """
    path = Path(path).resolve()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a folder")
    _check_movable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{path.name}.{_STAGING}-{os.getpid()}-", dir=path.parent)
    )
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, path.stat().st_mode & 0o7777 if path.exists() else 0o777 & ~umask)
        yield staging
        fsync_dir(staging)
        _swap_in(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
