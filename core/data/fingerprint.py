"""Content fingerprints of grids, tasks and data sets (sha256), one scheme for all of arcfw.

A grid contributes its shape and its int64 cells; a missing grid (a query
without output) contributes ``-``.  Used by checkpoints (a resumed run must see
the same data) and by ``arcfw eval`` (an evaluation task whose demonstrations
are in the training data, under any id).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from arcfw.core.data.batch import Task


def _update(h: Any, grid: np.ndarray | None) -> None:
    h.update(b"-" if grid is None else repr(np.shape(grid)).encode() + np.ascontiguousarray(grid, dtype=np.int64).tobytes())


def grids_fingerprint(grids: Iterable[np.ndarray | None]) -> str:
    """sha256 over a sequence of grids (shape and cells; None for a missing grid)."""
    h = hashlib.sha256()
    for g in grids:
        _update(h, g)
    return h.hexdigest()


def task_fingerprint(task: Task) -> str:
    """The task's demonstration pairs by content (not its id): the same task under another id matches."""
    return grids_fingerprint(g for p in task.train for g in (p.input, p.output))


def data_fingerprint(tasks: Sequence[Task]) -> str:
    """sha256 over every task id and every grid, in order: a resumed run must train on the same data."""
    h = hashlib.sha256()
    for t in tasks:
        h.update(t.task_id.encode())
        for p in (*t.train, *t.test):
            for g in (p.input, p.output):
                _update(h, g)
    return h.hexdigest()
