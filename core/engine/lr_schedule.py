"""Learning-rate schedules with warmup, per parameter group (``lr_schedule`` in the config).

Every trainable group keeps its own peak learning rate (``optimizer.lr.<group>``); the
schedule multiplies it by a factor that depends only on the optimizer step ``t``
(0-based: the step being taken), the warmup ``W`` and the schedule's length ``T``::

    t < W       factor = (t + 1) / W                         # linear warmup, never 0
    t >= W      p = min(1, (t - W) / max(1, T - W))
                constant: 1
                linear:   1 - (1 - min_ratio) * p
                cosine:   min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2

``lr_schedule.groups.<group>`` overrides ``name``, ``warmup`` and ``min_ratio`` for one
group (e.g. a longer warmup for a pretrained prompt model).  The factor is a pure
function of the step, so a resumed run continues the schedule exactly once it has the
same ``T``: the checkpoint keeps the ``T`` the run started with
(:meth:`LRSchedule.state_dict`).  The engine applies it right before each optimizer step
(:meth:`arcfw.core.engine.engine.Engine.train_step`); without one (``arcfw eval --ttt``,
a bare engine) the optimizer's learning rates stay as configured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

#: ``lr_schedule.name`` choices
SCHEDULES = ("constant", "linear", "cosine")
#: the keys a group may override under ``lr_schedule.groups.<group>``
GROUP_KEYS = ("name", "warmup", "min_ratio")


@dataclass(frozen=True)
class Shape:
    name: str
    warmup: int
    min_ratio: float

    def factor(self, step: int, total: int | None) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.name == "constant" or total is None:
            return 1.0
        p = min(1.0, (step - self.warmup) / max(1, total - self.warmup))
        if self.name == "linear":
            return 1.0 - (1.0 - self.min_ratio) * p
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def is_active(section: dict[str, Any]) -> bool:
    """Whether ``lr_schedule`` changes any learning rate (otherwise the engine leaves them alone)."""
    shapes = [section, *section.get("groups", {}).values()]
    return any(s.get("name", section["name"]) != "constant" or s.get("warmup", section["warmup"]) > 0 for s in shapes)


class LRSchedule:
    """The factor of every optimizer parameter group at a step; ``base``: group name -> peak lr."""

    def __init__(self, section: dict[str, Any], base: dict[str, float], total: int | None):
        self.base = dict(base)
        self.total = total
        default = Shape(section["name"], int(section["warmup"]), float(section["min_ratio"]))
        overrides = section.get("groups") or {}
        self.shapes = {
            g: Shape(**{k: overrides.get(g, {}).get(k, getattr(default, k)) for k in GROUP_KEYS}) for g in self.base
        }

    def lrs(self, step: int) -> dict[str, float]:
        """The learning rate of every group at optimizer step ``step`` (0-based)."""
        return {g: lr * self.shapes[g].factor(step, self.total) for g, lr in self.base.items()}

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> dict[str, float]:
        """Set the optimizer's learning rates for step ``step``; returns them by group name."""
        lrs = self.lrs(step)
        for pg in optimizer.param_groups:
            name = pg.get("name")
            if name in lrs:
                pg["lr"] = lrs[name]
        return lrs

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        total = state.get("total")
        self.total = None if total is None else int(total)
