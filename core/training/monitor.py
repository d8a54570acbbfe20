"""Watching a validation metric: the best value so far (``checkpoint.best``) and early stopping
(``early_stop``).  Both are plain state, saved in every checkpoint and restored on resume."""

from __future__ import annotations

import math
from typing import Any

#: the metrics validation logs (:mod:`arcfw.core.training.validation`), the choices of
#: ``checkpoint.best`` and ``early_stop.metric``
VAL_METRICS = ("val/loss", "val/cell_acc", "val/pass@2")
#: ``checkpoint.mode`` / ``early_stop.mode``: auto is min for a loss, max for the others
MODES = ("auto", "min", "max")


def resolve_mode(metric: str, mode: str) -> str:
    if mode != "auto":
        return mode
    return "min" if metric.endswith("loss") else "max"


class Monitor:
    """The best value of ``metric`` seen so far (``mode`` min or max, improvements larger than
    ``min_delta``) and how many values in a row did not improve on it."""

    def __init__(self, metric: str, mode: str, min_delta: float = 0.0):
        self.metric = metric
        self.mode = resolve_mode(metric, mode)
        self.min_delta = float(min_delta)
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad = 0  # values in a row that did not improve on the best

    def improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, metrics: dict[str, float], step: int) -> bool:
        """Account a validation's metrics; True when its value is the new best."""
        value = metrics.get(self.metric, math.nan)
        if self.improves(value):
            self.best, self.best_step, self.bad = float(value), step, 0
            return True
        self.bad += 1
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "best": self.best, "best_step": self.best_step, "bad": self.bad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A state saved for another metric or mode is not this monitor's: it starts afresh."""
        if state.get("metric") != self.metric or state.get("mode") != self.mode:
            return
        self.best = None if state.get("best") is None else float(state["best"])
        self.best_step = None if state.get("best_step") is None else int(state["best_step"])
        self.bad = int(state.get("bad", 0))
