"""File writing shared by the run outputs, checkpoints, benchmarks and evaluation."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's contents (a folder: its entries, e.g. a rename) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path | str, data: str | bytes, *, durable: bool = False) -> None:
    """Write ``data`` to ``path`` so that a reader (or a crash) sees the old file or the new one,
    never half of one: write a temporary file beside it, then rename it over ``path``.
    ``durable``: also fsync the file and the folder (checkpoints: survive a power cut)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    if durable:
        fsync_path(tmp)
    os.replace(tmp, path)
    if durable:
        fsync_path(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system cannot (another OS, an old kernel or libc, a file system without it)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return int(renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)) == 0


def replace_dir(new: Path, dst: Path) -> None:
    """Put the complete folder ``new`` at ``dst`` in place of the folder there (``OUT/best``).

    On Linux one atomic exchange: a reader, or a crash, sees the old folder or the new one.
    Elsewhere two renames, the old folder first set aside as ``.NAME-old-PID`` (which
    :func:`recover_dir` puts back if a crash came between them).
    """
    import shutil

    if not dst.exists():
        os.rename(new, dst)
    elif _exchange(new, dst):
        shutil.rmtree(new, ignore_errors=True)  # it holds the old folder now
    else:
        old = dst.with_name(f".{dst.name}-old-{os.getpid()}")
        os.rename(dst, old)
        os.rename(new, dst)
        shutil.rmtree(old, ignore_errors=True)
    fsync_path(dst.parent)


def recover_dir(dst: Path) -> None:
    """After a crash inside :func:`replace_dir`: put a set-aside old folder back if ``dst`` is
    missing, and remove leftovers (temporary and old folders)."""
    import shutil

    old = sorted(dst.parent.glob(f".{dst.name}-old-*"))
    if old and not dst.exists():
        os.rename(old.pop(), dst)
    for p in [*old, *dst.parent.glob(f".{dst.name}-tmp-*")]:
        shutil.rmtree(p, ignore_errors=True)
