"""Graceful stop on SIGINT / SIGTERM for the training loop.

While a :class:`StopSignals` block is active, the first SIGINT (Ctrl-C) or
SIGTERM (a scheduler's preemption) only *records* the request: the loop
finishes the current step, saves a checkpoint and exits with 128 + the signal
number.  A second SIGINT aborts at once (``KeyboardInterrupt``) for a user
who does not want to wait.  The previous handlers are restored when the block
ends, so library users and tests are left as they were.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager: ``signum`` is the first stop signal received, else ``None``.

    ``on_signal(signum)`` is called from the handler for the first signal (to
    print what happens next).  Outside the main thread Python cannot install
    handlers, and the block does nothing.
    """

    def __init__(self, on_signal: Callable[[int], None] | None = None):
        self.signum: int | None = None
        self._on_signal = on_signal
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:  # second Ctrl-C: the user does not want to wait for the save
                self._restore()
                raise KeyboardInterrupt
            return
        self.signum = signum
        if self._on_signal is not None:
            self._on_signal(signum)
