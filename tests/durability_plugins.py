"""Plugins for tests/test_durability.py, loaded by import path (``durability_plugins:Pause``) in a
subprocess too (PYTHONPATH=tests): they make a run pause, crash or fill its disk at an exact step."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from arcfw.core.engine.hookspecs import hookimpl
from arcfw.core.engine.plugin import Plugin


class Pause(Plugin):
    """After optimizer step ``at_step`` (1-based), touch ``marker`` and wait until ``release`` exists
    (at most ``timeout`` seconds): a run that is alive, holding its folder, for as long as a test needs."""

    name = "pause"
    role = "extra"

    def __init__(self, at_step: int, marker: str, release: str, timeout: float = 120.0):
        self.at_step, self.marker, self.release, self.timeout = at_step, marker, release, timeout

    @hookimpl
    def post_step_update(self, result, ctx):
        if result.step + 1 == self.at_step:
            Path(self.marker).touch()
            end = time.monotonic() + self.timeout
            while not os.path.exists(self.release) and time.monotonic() < end:
                time.sleep(0.05)
        return None


class Crash(Plugin):
    """Raises after optimizer step ``at_step``: a run that dies before its first checkpoint."""

    name = "crash"
    role = "extra"

    def __init__(self, at_step: int):
        self.at_step = at_step

    @hookimpl
    def post_step_update(self, result, ctx):
        if result.step + 1 == self.at_step:
            raise RuntimeError("crashed on purpose")
        return None


class FillDisk(Plugin):
    """After optimizer step ``at_step``, fills the file system of ``path`` by writing ``path`` until the
    OS answers ENOSPC: the disk becomes full while the run goes on, as when another job fills it.
    Once only: ``path.done`` marks it done, so a resumed run that passes the step again trains on."""

    name = "fill_disk"
    role = "extra"

    def __init__(self, at_step: int, path: str):
        self.at_step, self.path = at_step, path

    @hookimpl
    def post_step_update(self, result, ctx):
        done = Path(self.path + ".done")
        if result.step + 1 != self.at_step or done.exists():
            return None
        done.touch()
        chunk = b"\0" * 65536
        with open(self.path, "ab", buffering=0) as f:
            while True:
                try:
                    f.write(chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    if len(chunk) == 1:
                        break
                    chunk = chunk[: len(chunk) // 2]
        return None
