"""File writing shared by the run outputs, checkpoints, benchmarks and evaluation.

A write that fails (a full disk, a quota, a read-only file system) raises :class:`WriteError`:
one line naming the file and saying "disk full" when it is one.  It is an ``OSError`` too, so
code that catches ``OSError`` around a write keeps working, and an :class:`ArcfwError`, so the
command line prints it as one line with exit code 2.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import BinaryIO

from arcfw.core.errors import ArcfwError

#: errno values that mean "no room left": the file system is full, or the user's quota is spent
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
#: how libraries that do not raise OSError say the same (safetensors' Rust writer, torch's zip writer)
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122", "storagefull")


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from or during) says the disk is full.

    Walks ``__cause__`` and ``__context__``: ``torch.save`` into a full disk raises a RuntimeError
    ("unexpected pos ...") during the handling of the OSError(ENOSPC) of the file's write;
    safetensors raises a SafetensorError whose text carries the OS error.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return True
        if any(t in str(exc).lower() for t in _DISK_FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _os_error(exc: BaseException | None) -> OSError | None:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def describe_write_failure(exc: BaseException) -> str:
    """A few words for why a write failed: ``disk full (No space left on device)`` for a full disk or
    a spent quota, the OS's reason otherwise (``Permission denied``), else the error's first line."""
    os_exc = _os_error(exc)
    reason = (os_exc.strerror if os_exc is not None and os_exc.strerror else None) or " ".join(str(exc).split()) or type(exc).__name__
    if is_disk_full(exc):
        if os_exc is None or os_exc.errno not in DISK_FULL:
            reason = os.strerror(errno.ENOSPC)
        return f"disk full ({reason})"
    return reason


class WriteError(ArcfwError, OSError):
    """A file could not be written; names the file, says "disk full" when it is one.  The part of
    the file written so far is removed (an atomic write leaves the previous version in place)."""

    kind = "write error"

    def __init__(self, path: Path | str, exc: BaseException, what: str = "", after: str = ""):
        os_exc = _os_error(exc)
        code = errno.ENOSPC if is_disk_full(exc) else (os_exc.errno if os_exc is not None else None)
        OSError.__init__(self, code, os.strerror(code) if code else describe_write_failure(exc), str(path))
        self.path = Path(path)
        self.disk_full = is_disk_full(exc)
        self.message = f"cannot write {path}{f' ({what})' if what else ''}: {describe_write_failure(exc)}{'; ' + after if after else ''}"

    def __str__(self) -> str:
        return self.message


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's contents (a folder: its entries, e.g. a rename) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create(path: Path) -> BinaryIO:
    """A new file open for binary writing (looked up here, like :func:`write_bytes`, so tests can make the disk full)."""
    return open(path, "wb")


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (one ``write`` per call, looked up here so tests can make the disk full)."""
    with create(path) as f:
        f.write(data)


def append(fd: int, data: bytes) -> None:
    """Append ``data`` to the file open as ``fd`` (``O_APPEND``), unbuffered: nothing is left in a
    buffer to fail again later when the disk is full."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_atomic(path: Path | str, data: str | bytes, *, durable: bool = False, what: str = "") -> None:
    """Write ``data`` to ``path`` so that a reader (or a crash) sees the old file or the new one,
    never half of one: write a temporary file beside it, then rename it over ``path``.
    ``durable``: also fsync the file and the folder (checkpoints: survive a power cut).
    A failure (a full disk) removes the temporary file, leaves ``path`` as it was and raises
    :class:`WriteError` naming ``path`` (``what``: what the file is, for the message)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write_bytes(tmp, data.encode("utf-8") if isinstance(data, str) else data)
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, WriteError):
            raise
        raise WriteError(path, exc, what, "the previous version of the file is unchanged" if path.exists() else "") from exc


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
