"""Pictures: a run's training curves (``arcfw plot``) and a task with the model's attempts (``arcfw show``).

Drawing needs matplotlib, an optional extra (``pip install 'arcfw[plot]'``);
everything else here (reading the logs, the ARC palette) does not.  Figures
are drawn with matplotlib's object API (no pyplot state, no GUI backend).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from arcfw.core.data.batch import Task
from arcfw.core.errors import DataError, MissingExtra
from arcfw.core.training.metrics import read_metric_specs

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

#: the usual ARC colours, 0-9: black, blue, red, green, yellow, grey, magenta, orange, azure, maroon
PALETTE = ("#000000", "#0074D9", "#FF4136", "#2ECC40", "#FFDC00", "#AAAAAA", "#F012BE", "#FF851B", "#7FDBFF", "#870C25")
PALETTE_RGB = np.array([[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in PALETTE], dtype=np.uint8)



def curves(run_dir: Path) -> list[tuple[str, str]]:
    """``(metrics.jsonl key, axis label)`` of every panel: the run's declared metrics with a ``plot``
    label (``metric_specs.json``), the loss on top, then in the console line's order."""
    drawn = [m for m in read_metric_specs(run_dir) if m.plot]
    drawn.sort(key=lambda m: (m.name != "loss", m.console is None, m.console or 0))
    return [(m.name, m.plot or m.name) for m in drawn]


def _figure(**kw: Any) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtra("drawing needs matplotlib: pip install 'arcfw[plot]'") from None
    return Figure(**kw)


def grid_rgb(grid: np.ndarray) -> np.ndarray:
    """``[h, w]`` colours 0-9 -> ``[h, w, 3]`` uint8 RGB in the ARC palette."""
    rgb: np.ndarray = PALETTE_RGB[np.asarray(grid)]
    return rgb


# --------------------------------------------------------------------------- training curves


def _number(v: Any) -> float:
    """Logged values are numbers, or strings for non-finite floats ("nan", "inf")."""
    if isinstance(v, bool) or v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The batch records of ``run_dir/metrics.jsonl``, one per step (the last wins), by step.

    A torn last line (a killed run) is ignored; a broken line before it is a data error.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError("no metrics.jsonl here: not a run folder (arcfw run --out ...)", file=str(run_dir))
    lines = path.read_text(encoding="utf-8").splitlines()
    by_step: dict[int, dict[str, Any]] = {}
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                break
            raise DataError(f"line {n} is not valid JSON", file=str(path)) from None
        if isinstance(rec, dict) and rec.get("kind", "batch") == "batch" and "step" in rec:
            by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def epoch_ends(run_dir: Path) -> list[tuple[int, int]]:
    """``(epoch, last step)`` of every finished epoch, from ``summary.json`` (empty if none yet)."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return []
    try:
        summaries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise DataError("not valid JSON", file=str(path)) from None
    return [(int(s["epoch"]), int(s["step"])) for s in summaries if isinstance(s, dict) and "step" in s and "epoch" in s]


def curves_figure(run_dir: Path | str) -> Figure:
    """Every declared metric with a plot label against step (:func:`curves`), epoch ends marked."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise DataError("metrics.jsonl holds no batch record yet", file=str(run_dir))
    steps = [r["step"] for r in records]
    ends = [(epoch, step) for epoch, step in epoch_ends(run_dir) if step < steps[-1]]  # epochs followed by more steps
    panels = curves(run_dir)
    fig = _figure(figsize=(9, 1.9 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (key, label) in zip(axes, panels):
        ax.plot(steps, [_number(r.get(key)) for r in records], lw=1, marker="." if len(records) < 50 else None)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        for _, step in ends:
            ax.axvline(step + 0.5, color="grey", ls="--", lw=1)
    for epoch, step in ends:
        axes[0].annotate(f"end of epoch {epoch}", (step + 0.5, 0.97), xycoords=("data", "axes fraction"),
                         ha="right", va="top", fontsize=8, color="grey", rotation=90)
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"{run_dir.name}: {len(records)} logged steps up to step {steps[-1]}")
    return fig


def plot_curves(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Write :func:`curves_figure` to ``out`` (default ``run_dir/curves.png``) and return its path."""
    out = Path(out) if out is not None else Path(run_dir) / "curves.png"
    curves_figure(run_dir).savefig(out, dpi=100)
    return out


# --------------------------------------------------------------------------- a task with predictions


def _draw_grid(ax: Any, grid: np.ndarray | None, title: str, colour: str = "black") -> None:
    ax.set_title(title, fontsize=9, color=colour)
    ax.set_xticks([])
    ax.set_yticks([])
    if grid is None:
        ax.axis("off")
        ax.text(0.5, 0.5, title, ha="center", va="center", transform=ax.transAxes, fontsize=9)
        return
    h, w = grid.shape
    ax.imshow(grid_rgb(grid), interpolation="nearest")
    ax.set_xticks(np.arange(-0.5, w, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, h, 1), minor=True)
    ax.grid(which="minor", color="#555555", lw=0.5)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel(f"{h}x{w}", fontsize=8)


def task_figure(task: Task, attempts: list[list[np.ndarray]] | None) -> Figure:
    """One row per demonstration pair (input, output), then one per test (input, answer, attempt 1, attempt 2).

    Attempt titles say whether the attempt equals the answer (shape and every cell).
    """
    rows = len(task.train) + len(task.test)
    fig = _figure(figsize=(4 * 2.3, rows * 2.5), layout="constrained")
    axes = fig.subplots(rows, 4, squeeze=False)
    for i, pair in enumerate(task.train):
        _draw_grid(axes[i, 0], pair.input, f"demo {i + 1} input")
        _draw_grid(axes[i, 1], pair.output, f"demo {i + 1} output")
        axes[i, 2].axis("off")
        axes[i, 3].axis("off")
    for j, pair in enumerate(task.test):
        row = axes[len(task.train) + j]
        _draw_grid(row[0], pair.input, f"test {j + 1} input")
        _draw_grid(row[1], pair.output, "answer" if pair.output is not None else "answer unknown")
        for a in range(2):
            grid = attempts[j][a] if attempts is not None else None
            if grid is None or pair.output is None:
                _draw_grid(row[2 + a], grid, f"attempt {a + 1}" if grid is not None else "no prediction")
                continue
            right = grid.shape == pair.output.shape and bool(np.array_equal(grid, pair.output))
            _draw_grid(row[2 + a], grid, f"attempt {a + 1}: {'right' if right else 'wrong'}", "green" if right else "red")
    fig.suptitle(f"task {task.task_id}")
    return fig


def render_task(task: Task, attempts: list[list[np.ndarray]] | None, out: Path | str) -> Path:
    """Write :func:`task_figure` to ``out`` and return its path."""
    task_figure(task, attempts).savefig(out, dpi=100)
    return Path(out)
