"""Health checks that turn the original script's silent failures into errors and warnings.

- :class:`GradientWatch` - every trainable parameter group's gradient norm is
  watched; a group with ``lr > 0`` whose gradient stays exactly zero for
  ``patience`` steps stops the run with an error naming the group.  A step
  whose loss is exactly 0 (the masked loss found no hard cell: every cell right
  and confident) gives every group a zero gradient by construction; it says
  nothing about the gradient path and is not counted (nor does it reset a
  streak), so a run that fits a small folder of tasks is not halted.
  It also keeps, per group, the last ``WINDOW`` (100) counted steps: a group whose gradient was
  exactly zero on ``OFTEN`` (20) of them - never ``patience`` in a row, or the run would have
  stopped - is warned about once (a path cut on some steps only: a gate, a condition on the step).
  The per-step checks that a gradient arrived at all are in :mod:`arcfw.core.engine.paths`.
- :class:`NonFiniteGuard` - a NaN/Inf loss or gradient is never applied.
- :class:`HealthMonitor` - red flags printed once and recorded in the metrics:
  the prompt model's gradient zero for 100+ batches (steps with loss 0 not
  counted), loss NaN/Inf, loss flat over a window (at 0: no hard cell in it), a declared metric stuck at its ``stuck_at`` value (the default
  loss declares ``mask_ratio`` stuck at 1.0).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from arcfw.core.errors import TrainingHalted


class GradientWatch:
    #: the counted steps kept per group, and how many of them with a zero gradient are warned about
    WINDOW = 100
    OFTEN = 20

    def __init__(self, groups: dict[str, str], patience: int):
        """``groups``: name -> plugin of every group with lr > 0. ``patience`` 0 disables."""
        self.groups = groups
        self.patience = patience
        self.zero_streak = {name: 0 for name in groups}
        self.recent: dict[str, deque[bool]] = {name: deque(maxlen=self.WINDOW) for name in groups}  # True: zero
        self.zeros = dict.fromkeys(groups, 0)  # zero steps in ``recent``
        self.warned: set[str] = set()

    def update(self, norms: dict[str, float], exempt: frozenset[str] = frozenset(), loss: float | None = None) -> list[tuple[str, str]]:
        """Count consecutive zero-gradient steps. ``exempt`` groups (e.g. a Qwen whose prompt
        came from the cache this step) are expected to have no gradient and don't count; nor does
        any group at a step whose ``loss`` is exactly 0 (no hard cell: zero gradient everywhere).
        Returns warnings ``(key, message)`` raised by this step (each once per run)."""
        warnings: list[tuple[str, str]] = []
        if loss == 0.0:
            return warnings
        for name in self.groups:
            if name in exempt:
                continue
            zero = norms.get(name, 0.0) == 0.0
            recent = self.recent[name]
            if len(recent) == recent.maxlen and recent[0]:
                self.zeros[name] -= 1
            recent.append(zero)
            self.zeros[name] += zero
            if zero:
                self.zero_streak[name] += 1
                if self.patience and self.zero_streak[name] >= self.patience:
                    raise TrainingHalted(
                        f"parameter group '{name}' (plugin '{self.groups[name]}') has had a zero gradient for "
                        f"{self.zero_streak[name]} consecutive steps although its learning rate is > 0: something "
                        "cuts its gradient path (torch.no_grad, .detach(), a frozen copy). Set optimizer.lr."
                        f"{name}: 0 to freeze it on purpose, or health.patience: 0 to disable this check"
                    )
            else:
                self.zero_streak[name] = 0
            # often zero, but not in one run (a single run is the patience check's, and the monitor's)
            if self.zeros[name] >= self.OFTEN and self.zero_streak[name] < self.zeros[name] and name not in self.warned:
                self.warned.add(name)
                warnings.append((f"zero_grad_often_{name}", (
                    f"parameter group '{name}' (plugin '{self.groups[name]}') had an exactly zero gradient on "
                    f"{self.zeros[name]} of its last {len(recent)} steps, on and off: something cuts or zeroes its path "
                    "on some steps only (a gate, a condition on the step or the batch, a branch multiplied by 0). "
                    "Steps with loss 0 and steps where the group is in ctx.no_grad_groups are not counted")))
        return warnings

    def state_dict(self) -> dict[str, Any]:
        return {"zero_streak": dict(self.zero_streak), "recent": {k: list(v) for k, v in self.recent.items()},
                "warned": sorted(self.warned)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.zero_streak.update(state.get("zero_streak", {}))
        for name, flags in state.get("recent", {}).items():
            if name in self.recent:
                self.recent[name].clear()
                self.recent[name].extend(bool(f) for f in flags)
                self.zeros[name] = sum(self.recent[name])
        self.warned = {w for w in state.get("warned", []) if w in self.groups}


class NonFiniteGuard:
    """Decides what happens to a step whose loss or gradient is NaN/Inf.

    ``skip`` (default): the step is not applied and counted; ``max_consecutive_skips``
    skips in a row halt the run.  ``halt``: the first one halts the run.
    """

    #: ``health.nonfinite`` choices
    POLICIES = ("skip", "halt")

    def __init__(self, policy: str, max_consecutive: int):
        self.policy = policy
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0

    def ok(self) -> None:
        self.consecutive = 0

    def nonfinite(self, what: str, step: int) -> None:
        self.skipped += 1
        self.consecutive += 1
        if self.policy == "halt":
            raise TrainingHalted(f"non-finite {what} at step {step} (health.nonfinite: halt); the step was not applied")
        if self.consecutive >= self.max_consecutive:
            raise TrainingHalted(
                f"non-finite {what} for {self.consecutive} consecutive steps (last at step {step}); "
                f"health.max_consecutive_skips is {self.max_consecutive}. Lower the learning rate, set grad_clip, "
                "or look for a plugin producing NaN"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))


class HealthMonitor:
    """Red flags, each printed once per run and recorded in the metrics."""

    ZERO_GRAD_AFTER = 100

    def __init__(self, watched_group: str | None, flat_window: int, flat_tolerance: float, stuck: dict[str, float] | None = None):
        """``stuck``: metric name -> the value it must not stay at (``Metric.stuck_at``)."""
        self.watched_group = watched_group  # the prompt model's group
        self.flat_window = flat_window
        self.flat_tolerance = flat_tolerance
        self.stuck = dict(stuck or {})
        self.raised: set[str] = set()
        self.zero_grad_streak = 0
        self.losses: deque[float] = deque(maxlen=flat_window)
        self.stuck_streak = {name: 0 for name in self.stuck}
        self.pending: list[str] = []  # warnings the engine raised during the step (gradient paths), not yet returned

    def note(self, key: str, message: str) -> None:
        """A warning found by the engine inside the step; returned by the next :meth:`update` (once per run)."""
        self._raise(key, message, self.pending)

    def update(self, loss: float, norms: dict[str, float], metrics: dict[str, float], exempt: frozenset[str]) -> list[str]:
        """Return the warnings raised *by this step* (each at most once per run)."""
        new, self.pending = self.pending, []
        g = self.watched_group
        if g is not None and g not in exempt and loss != 0.0:  # a loss of 0 has no gradient to give
            self.zero_grad_streak = self.zero_grad_streak + 1 if norms.get(g, 0.0) == 0.0 else 0
            if self.zero_grad_streak >= self.ZERO_GRAD_AFTER:
                self._raise("zero_grad", f"gradient of group '{g}' has been zero for {self.zero_grad_streak} batches", new)
        if not math.isfinite(loss):
            self._raise("nonfinite_loss", f"loss is {loss}", new)
        else:
            self.losses.append(loss)
            if len(self.losses) == self.flat_window:
                lo, hi = min(self.losses), max(self.losses)
                if hi == 0.0:
                    self._raise("flat_loss", f"loss 0 over the last {self.flat_window} batches: no hard cell in them (every "
                                "cell right with p(target) >= threshold); the model fits its training data", new)
                elif hi - lo <= self.flat_tolerance * max(1.0, abs(hi)):
                    self._raise("flat_loss", f"loss flat at {hi:.6g} over the last {self.flat_window} batches", new)
        for name, at in self.stuck.items():
            value = metrics.get(name)
            if value is not None:
                self.stuck_streak[name] = self.stuck_streak[name] + 1 if value == at else 0
                if self.stuck_streak[name] >= self.flat_window:
                    self._raise(f"{name}_stuck", f"{name} stuck at {at:g} for {self.stuck_streak[name]} batches", new)
        return new

    def _raise(self, key: str, message: str, new: list[str]) -> None:
        if key not in self.raised:
            self.raised.add(key)
            new.append(f"{key}: {message}")

    def state_dict(self) -> dict[str, Any]:
        return {
            "raised": sorted(self.raised),
            "zero_grad_streak": self.zero_grad_streak,
            "losses": list(self.losses),
            "stuck_streak": dict(self.stuck_streak),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.raised = set(state.get("raised", []))
        self.zero_grad_streak = int(state.get("zero_grad_streak", 0))
        self.losses.clear()
        self.losses.extend(state.get("losses", []))
        self.stuck_streak.update({k: int(v) for k, v in state.get("stuck_streak", {}).items() if k in self.stuck_streak})
