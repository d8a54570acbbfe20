"""Run outputs: ``metrics.jsonl`` (one JSON object per logged batch), ``summary.json``
(the epoch summaries) and the console lines."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

BATCH_KEYS = ("step", "epoch", "loss", "reward", "qwen_grad", "mask_ratio", "cell_acc")


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
        self._fh = open(self.path, "a", encoding="utf-8")
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
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._fh.flush()

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.summaries.append({k: _clean(v) for k, v in summary.items()})
        tmp = self.summary_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.summaries, indent=2), encoding="utf-8")
        os.replace(tmp, self.summary_path)

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


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


def batch_line(rec: dict[str, Any]) -> str:
    line = (
        f"[Batch {rec['step']}] Reward: {rec.get('reward', float('nan')):.4f} | Loss: {rec['loss']:.4f} | "
        f"Qwen_grad: {rec.get('qwen_grad', float('nan')):.4g} | Mask_ratio: {rec.get('mask_ratio', float('nan')):.3f}"
    )
    if "cell_acc" in rec:
        line += f" | Cell_acc: {rec['cell_acc']:.3f}"
    return line


def epoch_line(s: dict[str, Any]) -> str:
    return (
        f"Epoch {s['epoch']} summary: batches {s['batches']} | avg loss {s['avg_loss']:.4f} | "
        f"avg reward {s.get('avg_reward', float('nan')):.4f} | Qwen grad norm {s.get('avg_qwen_grad', float('nan')):.4g} | "
        f"cell acc {s.get('cell_acc_first', float('nan')):.3f} -> {s.get('cell_acc_last', float('nan')):.3f} "
        f"(accuracy improvement {s.get('acc_improvement', float('nan')):+.3f}) | skipped steps {s.get('skipped_steps', 0)}"
    )
