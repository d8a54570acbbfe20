"""Run outputs: ``metrics.jsonl`` (one JSON object per logged batch), ``summary.json``
(the epoch summaries) and the console lines."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from arcfw.core import io as fileio  # fileio.append, looked up at each call (tests make the disk full)
from arcfw.core.engine.context import Metric
from arcfw.core.io import WriteError, write_atomic

#: the run file that lists the declared metrics (``arcfw plot`` draws from it)
METRIC_SPECS = "metric_specs.json"

#: keys of every batch record; the declared metrics (``Metric``) come beside them, NaN when a step has none
BATCH_KEYS = ("step", "epoch", "batch", "loss", "loss_avg")


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep the fact visible
    return v


class MetricsLog:
    """Append-only JSONL writer. Each line is flushed so a killed run keeps what it logged."""

    def __init__(self, out_dir: Path, resume_step: int | None = None, resume_epoch: int | None = None):
        """A resumed run passes the checkpoint's step and the epoch it continues: records after
        that step and summaries of that epoch or later (written before the run was stopped) go."""
        self.path = out_dir / "metrics.jsonl"
        self.summary_path = out_dir / "summary.json"
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        # unbuffered appends, one write per record: a full disk fails the record being written, not a later flush
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.summaries: list[dict[str, Any]] = []
        if resume_epoch is not None and self.summary_path.exists():
            self.summaries = [s for s in json.loads(self.summary_path.read_text()) if s.get("epoch", 0) < resume_epoch]

    def _truncate_after(self, step: int) -> None:
        """Drop records written after the checkpoint we resume from (no duplicated steps)."""
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                break  # a torn last line from a killed process
        write_atomic(self.path, "".join(k + "\n" for k in keep))

    def write(self, record: dict[str, Any]) -> None:
        if self._fd is None:
            raise ValueError(f"{self.path}: the metrics log is closed")
        line = json.dumps({k: _clean(v) for k, v in record.items()}) + "\n"
        try:
            fileio.append(self._fd, line.encode("utf-8"))
        except OSError as exc:  # a full disk: the records before this one are whole; a resume drops a torn last line
            raise WriteError(self.path, exc, f"the record of step {record.get('step', '?')}") from exc

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.summaries.append({k: _clean(v) for k, v in summary.items()})
        write_atomic(self.summary_path, json.dumps(self.summaries, indent=2), what=f"the summary of epoch {summary.get('epoch', '?')}")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class NullLog:
    """The log of ranks other than 0 in a multi-process run: writes nothing, keeps the summaries."""

    def __init__(self) -> None:
        self.summaries: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        pass

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.summaries.append({k: _clean(v) for k, v in summary.items()})

    def close(self) -> None:
        pass


def _console(metrics: Sequence[Metric]) -> list[Metric]:
    return sorted((m for m in metrics if m.console is not None), key=lambda m: m.console or 0)


def _value(v: Any, fmt: str) -> str:
    try:
        return format(float(v), fmt)
    except (TypeError, ValueError):
        return str(v)


def batch_line(rec: dict[str, Any], metrics: Sequence[Metric]) -> str:
    """``[Batch N] Name: value | ...`` for the declared metrics with a console position, in its order."""
    parts = [f"{m.name.capitalize()}: {_value(rec.get(m.name, math.nan), m.fmt)}" for m in _console(metrics)]
    return f"[Batch {rec['step']}] " + " | ".join(parts)


def epoch_line(s: dict[str, Any], metrics: Sequence[Metric]) -> str:
    """The epoch summary: every declared metric's aggregate (console-line metrics first)."""
    shown = _console(metrics) + [m for m in metrics if m.console is None]
    parts = [f"batches {s['batches']}"]
    for m in shown:
        keys = m.summary_keys()
        if not keys or not all(k in s for k in keys):
            continue
        parts.append(f"{keys[0] if len(keys) == 1 else m.summary or m.name} " + " -> ".join(_value(s[k], m.fmt) for k in keys))
    parts.append(f"skipped steps {s.get('skipped_steps', 0)}")
    return f"Epoch {s['epoch']} summary: " + " | ".join(parts)


def write_metric_specs(out_dir: Path, metrics: Sequence[Metric]) -> None:
    """The run's declared metrics, for ``arcfw plot`` (which builds no plugin)."""
    write_atomic(out_dir / METRIC_SPECS, json.dumps([dataclasses.asdict(m) for m in metrics], indent=1))


def read_metric_specs(out_dir: Path) -> list[Metric]:
    """The metrics a run declared; the loss alone for a run folder without the file."""
    path = Path(out_dir) / METRIC_SPECS
    if not path.is_file():
        return [Metric("loss", plot="loss", console=0)]
    fields = {f.name for f in dataclasses.fields(Metric)}
    out = []
    for d in json.loads(path.read_text(encoding="utf-8")):
        d = {k: v for k, v in d.items() if k in fields}
        d["grad_norm_of"] = tuple(d.get("grad_norm_of", ()))
        out.append(Metric(**d))
    return out
