"""One run at a time in a run folder: ``RUN/run.lock``, held with ``fcntl.flock`` for the run's lifetime.

Two processes training into the same folder (a second ``arcfw run --overwrite``, or a second
``--resume`` of a run that is still going) would interleave their checkpoints and metrics.  The
first holds an exclusive ``flock`` on ``run.lock`` while it trains (under torchrun rank 0 alone
holds it); any other is refused with one line naming the folder and the process holding it.  The
kernel drops the lock when its process ends, however it ends (SIGKILL, out of memory), so a lock
is never left behind; the file keeps the last holder's PID, which a run that takes it over
reports ("stale lock of process N, no longer running").  ``flock`` works on local file systems
and on NFS (Linux emulates it with POSIX locks there).
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from pathlib import Path

from arcfw.core.errors import ArcfwError

LOCK = "run.lock"


class RunLocked(ArcfwError):
    """Another live process trains in the run folder."""

    kind = "run folder in use"


class LockFailed(ArcfwError):
    """The run folder's lock file cannot be opened or locked (permissions, a file system without locks)."""

    kind = "lock error"


def _holder(path: Path) -> dict[str, str]:
    """What the lock file says about its last holder (``pid``, ``host``, ``since``, ``command``)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _describe(info: dict[str, str]) -> str:
    """``process 123 on host h (started 2026-12-02 10:12:03)``: the host only when it is another machine's."""
    pid = info.get("pid", "?")
    host = info.get("host")
    where = f" on host {host}" if host and host != socket.gethostname() else ""
    since = f" (started {info['since']})" if info.get("since") else ""
    return f"process {pid}{where}{since}"


class RunLock:
    """The lock of one run folder. :meth:`acquire` takes it (or refuses), :meth:`release` gives it back."""

    def __init__(self, run_dir: Path | str):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _lock(self) -> int:
        """The open lock file, locked; raises :class:`RunLocked` when another process holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LockFailed(f"cannot lock run folder {self.run_dir}: cannot open {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _holder(self.path)
            raise RunLocked(
                f"run folder {self.run_dir} is in use by {_describe(holder)}, which holds {self.path}: "
                "a second run or --resume there would mix two runs' checkpoints and metrics; wait for it to end, "
                f"stop it (kill {holder.get('pid', 'PID')}: it saves a checkpoint and exits), or use another --out"
            ) from None
        except OSError as exc:  # a file system without locks
            os.close(fd)
            raise LockFailed(
                f"cannot lock run folder {self.run_dir} ({self.path}): {exc.strerror or exc}; arcfw locks the run folder "
                "so that two runs cannot write into it at once: use an --out on a file system that supports flock"
            ) from None
        return fd

    def check(self) -> None:
        """Refuse now, before anything is loaded, when a live process holds the folder's lock (the
        lock is taken for real by :meth:`acquire`).  Nothing is created in a folder that does not exist."""
        if not self.path.is_file() or self.held:
            return
        fd = self._lock()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def acquire(self) -> str | None:
        """Take the lock for this process (the run folder must exist).  Returns a note when the lock
        file names an earlier holder that ended without releasing it (killed, or out of memory)."""
        if self.held:
            return None
        fd = self._lock()
        previous = _holder(self.path)
        note = None
        if previous.get("pid") and previous.get("pid") != str(os.getpid()):
            note = (f"took over the stale lock of run folder {self.run_dir}: {_describe(previous)} "
                    "ended without releasing it (killed or crashed)")
        record = (f"pid={os.getpid()}\nhost={socket.gethostname()}\nsince={time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  f"command={' '.join(sys.argv)}\n")
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode("utf-8"), 0)
        self._fd = fd
        return note

    def release(self) -> None:
        """Give the lock back; the emptied file tells the next run that this one ended cleanly."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:  # the folder was removed (a run that failed before its first step)
            pass
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
