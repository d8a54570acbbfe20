"""Step curriculum for the hard-cell threshold: a piecewise-constant schedule over epochs."""

from __future__ import annotations

import bisect
from numbers import Real
from typing import Any

from arcfw.core.engine.context import Context
from arcfw.core.engine.hookspecs import hookimpl
from arcfw.core.engine.plugin import Plugin
from arcfw.core.errors import CheckpointError

__all__ = ["StepCurriculum"]


def _validate_schedule(schedule: Any) -> list[tuple[int, float]]:
    """Check a ``[[start_epoch, threshold], ...]`` schedule; return it as a list of tuples."""
    if not isinstance(schedule, (list, tuple)) or len(schedule) == 0:
        raise ValueError(
            f"curriculum: schedule must be a non-empty list of [start_epoch, threshold] pairs, got {schedule!r}"
        )
    out: list[tuple[int, float]] = []
    for i, entry in enumerate(schedule):
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise ValueError(f"curriculum: schedule[{i}] must be a [start_epoch, threshold] pair, got {entry!r}")
        start, thr = entry
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"curriculum: schedule[{i}] start_epoch must be an integer >= 0, got {start!r}")
        if isinstance(thr, bool) or not isinstance(thr, Real) or not 0.0 < float(thr) <= 1.0:
            raise ValueError(f"curriculum: schedule[{i}] threshold must be a number in (0, 1], got {thr!r}")
        if i == 0 and start != 0:
            raise ValueError(f"curriculum: the first schedule entry must start at epoch 0, got {start}")
        if out and start <= out[-1][0]:
            raise ValueError(
                f"curriculum: schedule start epochs must be strictly increasing, "
                f"got {out[-1][0]} then {start} at schedule[{i}]"
            )
        out.append((int(start), float(thr)))
    return out


class StepCurriculum(Plugin):
    """Curriculum plugin: hard-cell threshold from a step schedule over epochs.

    ``schedule`` is a list of ``[start_epoch, threshold]`` pairs; at epoch e the
    threshold is that of the last entry with ``start_epoch <= e``.  The default
    ``[[0, 0.6], [1, 0.3]]`` gives 0.6 during epoch 0 and 0.3 from epoch 1 on.

    Parameters (YAML):

    - ``schedule``: ``[[start_epoch, threshold], ...]``, start epochs increasing from 0, thresholds in (0, 1].
    """

    name = "curriculum"
    role = "curriculum"
    description = "Step schedule of the hard-cell threshold over epochs"

    def __init__(self, schedule: list[list[float]] = [[0, 0.6], [1, 0.3]]) -> None:  # noqa: B006 (copied, never mutated)
        self.schedule: list[tuple[int, float]] = _validate_schedule(schedule)
        self._starts = [s for s, _ in self.schedule]
        self.epoch: int = 0
        self.threshold: float = self.schedule[0][1]

    def threshold_at(self, epoch: int) -> float:
        """The scheduled threshold at ``epoch`` (pure; does not move the position)."""
        if epoch < 0:
            raise ValueError(f"curriculum: epoch must be >= 0, got {epoch}")
        return self.schedule[bisect.bisect_right(self._starts, epoch) - 1][1]

    @hookimpl
    def hard_cell_threshold(self, epoch: int, step: int, ctx: Context) -> float:
        self.threshold = self.threshold_at(epoch)
        self.epoch = int(epoch)
        return self.threshold

    @hookimpl
    def state_dict(self, ctx: Context) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "threshold": self.threshold,
            "schedule": [[s, t] for s, t in self.schedule],
        }

    @hookimpl
    def load_state_dict(self, state: dict[str, Any], ctx: Context) -> None:
        try:
            epoch, threshold = state["epoch"], state["threshold"]
        except (KeyError, TypeError) as err:
            raise CheckpointError(f"curriculum: state has no epoch/threshold ({state!r})") from err
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise CheckpointError(f"curriculum: bad epoch in checkpoint state: {epoch!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, Real) or not 0.0 < float(threshold) <= 1.0:
            raise CheckpointError(f"curriculum: bad threshold in checkpoint state: {threshold!r}")
        self.epoch = int(epoch)
        self.threshold = float(threshold)
