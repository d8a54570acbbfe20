"""What the training loop writes and prints: batch records, console lines, epoch summaries.

Everything shown is what the engine and the plugins *declare*
(:class:`~arcfw.core.engine.context.Metric`): the console line shows the metrics
with a console position, an epoch summarises each declared metric as its
``epoch`` aggregate says, and the health checks watch what declares ``stuck_at``.
No metric name is written here.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from arcfw.core.engine.context import Metric
from arcfw.core.engine.metric_owners import check_summary_extra
from arcfw.core.training.metrics import MetricsLog, NullLog, batch_line, epoch_line

if TYPE_CHECKING:  # pragma: no cover
    from arcfw.core.engine.engine import Engine


class EpochStats:
    """Running aggregates of the declared metrics over an epoch (or a console window)."""

    EDGE = 50  #: "edges": the first and the last EDGE values

    def __init__(self) -> None:
        self.n = 0
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.last: dict[str, float] = {}
        self.head: dict[str, list[float]] = {}
        self.tail: dict[str, list[float]] = {}

    def add(self, metrics: dict[str, float], declared: Sequence[Metric], exempt: frozenset[str] = frozenset()) -> None:
        """One step.  A gradient-norm metric whose groups are all ``exempt`` (expected to get no
        gradient this step), or at a step whose loss is exactly 0 (no hard cell: no gradient anywhere),
        stays out: the aggregate describes the steps those groups learned from."""
        self.n += 1
        for m in declared:
            v = metrics.get(m.name)
            if v is None or not math.isfinite(v):
                continue
            if m.grad_norm_of and (set(m.grad_norm_of) <= exempt or metrics.get("loss") == 0.0):
                continue
            self.sums[m.name] = self.sums.get(m.name, 0.0) + v
            self.counts[m.name] = self.counts.get(m.name, 0) + 1
            self.last[m.name] = v
            if m.epoch == "edges":
                head, tail = self.head.setdefault(m.name, []), self.tail.setdefault(m.name, [])
                if len(head) < self.EDGE:
                    head.append(v)
                tail.append(v)
                if len(tail) > self.EDGE:
                    tail.pop(0)

    def mean(self, key: str) -> float:
        return self.sums[key] / self.counts[key] if self.counts.get(key) else math.nan

    def summary(self, declared: Sequence[Metric]) -> dict[str, float]:
        """``{summary key: value}`` for every declared metric (NaN where no step gave a value)."""
        out: dict[str, float] = {}
        for m in declared:
            keys = m.summary_keys()
            if m.epoch == "mean":
                values = [self.mean(m.name)]
            elif m.epoch == "sum":
                values = [self.sums.get(m.name, 0.0)]
            elif m.epoch == "last":
                values = [self.last.get(m.name, math.nan)]
            elif m.epoch == "edges":
                values = [_mean(self.head.get(m.name, [])), _mean(self.tail.get(m.name, []))]
            else:
                values = []
            out.update(zip(keys, values))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "sums": dict(self.sums), "counts": dict(self.counts), "last": dict(self.last),
                "head": {k: list(v) for k, v in self.head.items()}, "tail": {k: list(v) for k, v in self.tail.items()}}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EpochStats:
        stats = cls()
        for key in ("n", "sums", "counts", "last", "head", "tail"):
            if key in state:
                setattr(stats, key, state[key])
        return stats


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


class Logbook:
    """Batch records and console lines every ``log_every`` steps; the epoch summary at each epoch end."""

    def __init__(self, engine: Engine, log: MetricsLog | NullLog, log_every: int, quiet: bool, is_main: bool):
        self.engine = engine
        self.log = log
        self.log_every = log_every
        self.quiet = quiet
        self.is_main = is_main
        self.metrics: list[Metric] = list(engine.metrics)
        self.epoch, self.window = EpochStats(), EpochStats()
        self._t0 = time.perf_counter()

    def print(self, text: str) -> None:
        if not self.quiet:
            tqdm.write(text, file=sys.stderr)

    # ------------------------------------------------------------------ epochs

    def start_epoch(self) -> None:
        self.epoch, self.window = EpochStats(), EpochStats()
        self._t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def state_dict(self) -> dict[str, Any]:
        """The current epoch's statistics (a checkpoint's ``loop`` state)."""
        return {"acc": self.epoch.state_dict(), "window": self.window.state_dict(), "elapsed": self.elapsed()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = EpochStats.from_state(state["acc"])
        self.window = EpochStats.from_state(state["window"])
        self._t0 = time.perf_counter() - float(state["elapsed"])

    # ------------------------------------------------------------------ steps

    def step(self, epoch: int, batch_index: int, metrics: dict[str, float], force: bool = False) -> None:
        """Account one step; health-check it; write (and print) its record when due, when it warns or
        when ``force`` (a validation step: its record carries the ``val/`` metrics)."""
        eng = self.engine
        exempt = frozenset(eng.ctx.no_grad_groups)
        loss = metrics.get("loss", math.nan)
        warnings = eng.health.update(loss, eng.last_norms, metrics, exempt)
        for w in warnings:
            self.print(f"warning: {w}")
        self.epoch.add(metrics, self.metrics, exempt)
        self.window.add(metrics, self.metrics, exempt)
        step = eng.global_step
        if step % self.log_every and not warnings and not force:
            return
        rec: dict[str, Any] = {
            "kind": "batch",
            "step": step,
            "epoch": epoch,
            "batch": batch_index + 1,
            "loss": loss,
            "loss_avg": self.window.mean("loss"),
            **{m.name: math.nan for m in self.metrics},
            **metrics,
            "grad_norms": eng.last_norms,
            "nonfinite_skipped_total": eng.guard.skipped,
            "scaler_skipped_total": eng.precision.scaler_skipped,
        }
        if warnings:
            rec["warnings"] = warnings
        self._write(rec)
        if step % self.log_every == 0:  # the line: each metric's mean over the steps since the last line
            window = {m.name: self.window.mean(m.name) for m in self.metrics if self.window.counts.get(m.name)}
            self.print(batch_line({**rec, **window}, self.metrics))
            self.window = EpochStats()

    def end_epoch(self, epoch: int) -> dict[str, Any] | None:
        """Write and print the epoch's summary (None when the epoch ran no step)."""
        eng = self.engine
        if self.epoch.n == 0:
            return None
        summary: dict[str, Any] = {
            "kind": "epoch",
            "epoch": epoch,
            "step": eng.global_step,
            "batches": self.epoch.n,
            "seconds": round(self.elapsed(), 3),
            **self.epoch.summary(self.metrics),
            "skipped_steps": eng.guard.skipped + eng.precision.scaler_skipped,
            "warnings": sorted(eng.health.raised),
        }
        owners = eng.metric_owners.summary_owners({m.name: m.summary_keys() for m in self.metrics})
        for plugin, extra in eng.call_all("on_epoch_end", epoch=epoch, summary=dict(summary)):
            if extra:
                check_summary_extra(owners, plugin, extra)  # a key another plugin (or the trainer) writes is refused
                summary.update(extra)
        self.log.write_summary(summary)
        if self.is_main:
            eng.call_all("log_metrics", record=summary)
        self.print(epoch_line(summary, self.metrics))
        return summary

    def _write(self, rec: dict[str, Any]) -> None:
        self.log.write(rec)
        if self.is_main:
            self.engine.call_all("log_metrics", record=rec)

    def close(self) -> None:
        self.log.close()
