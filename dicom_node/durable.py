"""Durable file writes: what "acknowledged means durable" rests on.

A write is durable only when the file's bytes and the directory entry that
names it are both on disk: write to a temp file in the same directory, fsync
it, rename it over the final name, fsync the directory.  A crash at any point
leaves either the old file or the new one, plus at most a temp file that the
start-up cleanup removes.
"""

from __future__ import annotations

import itertools
import os
import shutil
import threading
from pathlib import Path

TMP_SUFFIX = ".part"
_counter = itertools.count()


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename or create inside it survives power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path) -> None:
    """Create ``path`` and any missing parents, fsyncing each new entry's parent."""
    missing = []
    p = Path(path)
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        fsync_dir(d.parent)


def atomic_write(path: str | os.PathLike, data: bytes | memoryview, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically and durably (temp + fsync + rename + fsync dir)."""
    path = Path(path)
    ensure_dir(path.parent)
    move_into_place(write_temp(path.parent, data, mode), path)


def write_temp(directory: str | os.PathLike, data: bytes | memoryview,
               mode: int = 0o644) -> Path:
    """Write ``data`` to a new temp file in ``directory`` and fsync it; return its path.

    The first half of :func:`atomic_write`, split out so a caller can overlap
    the fsync with other work (parsing, hashing) and choose the final name
    later with :func:`move_into_place`.  ``directory`` must be on the same
    filesystem as the final name; the start-up cleanup removes a leftover.
    """
    directory = Path(directory)
    tmp = directory / f".{os.getpid()}.{threading.get_ident():x}.{next(_counter)}{TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    return tmp


def move_into_place(tmp: Path, path: str | os.PathLike) -> None:
    """Rename a fsynced temp file to ``path`` and fsync the directory that now names it."""
    path = Path(path)
    ensure_dir(path.parent)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def discard(tmp: Path) -> None:
    """Remove a temp file that will not be kept (invalid or duplicate input)."""
    _unlink_quietly(tmp)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_temp_files(root: str | os.PathLike) -> int:
    """Delete temp files left by a crash under ``root``; return how many."""
    removed = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.endswith(TMP_SUFFIX):
                _unlink_quietly(Path(dirpath) / name)
                removed += 1
    return removed


def free_mb(path: str | os.PathLike) -> float:
    """Free space for unprivileged writers at ``path``, in MiB."""
    usage = shutil.disk_usage(path)
    return usage.free / (1024 * 1024)
