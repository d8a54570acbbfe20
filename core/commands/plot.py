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


#: the default of ``arcfw plot --smooth``: an exponential moving average of weight 0.9 (TensorBoard's, debiased)
DEFAULT_SMOOTH = "ema:0.9"
#: the prefix of validation metrics in ``metrics.jsonl`` (``val/loss``, ``val/cell_acc``, ``val/pass@2``)
VAL_PREFIX = "val/"
#: a copy-input baseline's score (``eval.json``) -> the metric whose panel shows it
BASELINE_METRICS = {"pass_at_2": "pass@2", "cell_acc": "cell_acc"}


def parse_smooth(text: str) -> tuple[str, float]:
    """``--smooth``: ``ema`` / ``ema:W`` (exponential moving average, weight W in [0, 1), default 0.9),
    ``mean:N`` (mean of the last N logged values) or ``none``.  Raises ValueError."""
    kind, _, amount = text.strip().lower().partition(":")
    if kind == "none" and not amount:
        return "none", 0.0
    if kind == "ema":
        w = float(amount) if amount else 0.9
        if not 0 <= w < 1:
            raise ValueError(f"the EMA weight must be in [0, 1), got {amount}")
        return "ema", w
    if kind == "mean" and amount.isdigit() and int(amount) >= 1:
        return "mean", float(int(amount))
    raise ValueError(f"expected ema, ema:WEIGHT (0 <= WEIGHT < 1), mean:N (N >= 1) or none, got {text!r}")


def smooth(values: list[float], kind: str, amount: float) -> list[float]:
    """``values`` smoothed as :func:`parse_smooth` says; non-finite values are skipped (NaN where no
    finite value came yet).  ``ema`` is debiased, so its first points are not pulled towards 0."""
    out: list[float] = []
    if kind == "none":
        return list(values)
    if kind == "ema":
        acc = norm = 0.0
        for v in values:
            if math.isfinite(v):
                acc, norm = amount * acc + (1 - amount) * v, amount * norm + (1 - amount)
            out.append(acc / norm if norm > 0 else math.nan)
        return out
    window: list[float] = []
    for v in values:
        if math.isfinite(v):
            window = (window + [v])[-int(amount):]
        out.append(sum(window) / len(window) if window else math.nan)
    return out


def read_validation(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every ``val/...`` value of ``metrics.jsonl`` (any record kind) as ``{key: [(step, value), ...]}``, by step
    (the last record of a step wins)."""
    path = Path(run_dir) / "metrics.jsonl"
    found: dict[str, dict[int, float]] = {}
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # read_metrics reports a broken line
        if not isinstance(rec, dict) or "step" not in rec or rec.get("kind") == "epoch":
            continue
        for key, value in rec.items():
            if isinstance(key, str) and key.startswith(VAL_PREFIX) and math.isfinite(_number(value)):
                found.setdefault(key, {})[int(rec["step"])] = _number(value)
    return {k: sorted(v.items()) for k, v in sorted(found.items())}


def find_baselines(run_dir: Path, extra: Path | None = None) -> list[tuple[str, dict[str, float]]]:
    """The copy-input baselines known for a run: ``(label, {score: value})`` of each ``eval.json`` in the run
    folder or one folder below it (``arcfw eval`` writes ``RUN/eval-<data>/``), and of ``extra`` (an eval
    folder or its ``eval.json``); one per data set evaluated (the baseline does not depend on the model)."""
    files = sorted(Path(run_dir).glob("eval.json")) + sorted(Path(run_dir).glob("*/eval.json"))
    given = None
    if extra is not None:
        given = Path(extra) / "eval.json" if Path(extra).is_dir() else Path(extra)
        if not given.is_file():
            raise DataError("no eval.json here (arcfw eval writes one)", file=str(extra))
        files.insert(0, given)
    out: list[tuple[str, dict[str, float]]] = []
    seen: set[str] = set()
    for path in files:
        try:
            ev = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            if path == given:
                raise DataError("not valid JSON", file=str(path)) from None
            continue  # a broken evaluation beside the run: no baseline from it
        base = ev.get("copy_input_baseline") if isinstance(ev, dict) else None
        if not isinstance(base, dict):
            continue
        data = ev.get("data", {}) if isinstance(ev.get("data"), dict) else {}
        label = "/".join(str(data[k]) for k in ("version", "split") if k in data) or Path(str(data.get("source", path.parent.name))).name
        label = f"{label}, {data['tasks']} tasks" if "tasks" in data else label
        if label in seen:
            continue
        seen.add(label)
        out.append((label, {k: float(base[k]) for k in BASELINE_METRICS if isinstance(base.get(k), (int, float))}))
    return out


def panels(run_dir: Path, validation: dict[str, list[tuple[int, float]]]) -> list[tuple[str, str, list[str]]]:
    """``(metric key, axis label, validation keys drawn on it)`` of every panel: the declared metrics with a plot
    label (:func:`curves`), each with its ``val/<name>``; then a panel per other validation metric."""
    out = [(key, label, [f"{VAL_PREFIX}{key}"] if f"{VAL_PREFIX}{key}" in validation else []) for key, label in curves(run_dir)]
    drawn = {v for _, _, vs in out for v in vs}
    out += [(v[len(VAL_PREFIX):], f"validation {v[len(VAL_PREFIX):]}", [v]) for v in validation if v not in drawn]
    return out


def curves_figure(run_dir: Path | str, smoothing: str = DEFAULT_SMOOTH, baseline: Path | str | None = None) -> Figure:
    """Every declared metric with a plot label against step (:func:`curves`): the logged values faint, smoothed
    as ``smoothing`` says (:func:`parse_smooth`) on top; each ``val/<name>`` validation metric on its training
    metric's panel (or a panel of its own); the copy-input baseline of ``eval.json`` beside the run
    (:func:`find_baselines`) as a dashed line on the panels of its scores; epoch ends marked.

    Lines carry a ``gid``: ``raw``, ``smoothed``, ``val``, ``baseline``, ``epoch-end``."""
    run_dir = Path(run_dir)
    kind, amount = parse_smooth(smoothing)
    records = read_metrics(run_dir)
    if not records:
        raise DataError("metrics.jsonl holds no batch record yet", file=str(run_dir))
    steps = [r["step"] for r in records]
    ends = [(epoch, step) for epoch, step in epoch_ends(run_dir) if step < steps[-1]]  # epochs followed by more steps
    validation = read_validation(run_dir)
    baselines = find_baselines(run_dir, Path(baseline) if baseline is not None else None)
    rows = panels(run_dir, validation)
    fig = _figure(figsize=(9, 1.9 * len(rows) + 0.3), layout="constrained")
    axes = fig.subplots(len(rows), 1, sharex=True, squeeze=False)[:, 0]
    few = len(records) < 50
    for ax, (key, label, vals) in zip(axes, rows):
        raw = [_number(r.get(key)) for r in records]
        if any(math.isfinite(v) for v in raw):
            if kind == "none":
                ax.plot(steps, raw, lw=1, color="C0", marker="." if few else None, label="train", gid="raw")
            else:
                ax.plot(steps, raw, lw=1, color="C0", alpha=0.25, marker="." if few else None, gid="raw")
                ax.plot(steps, smooth(raw, kind, amount), lw=1.5, color="C0", label=f"train ({smoothing})", gid="smoothed")
        for v in vals:
            xs, ys = zip(*validation[v])
            ax.plot(xs, ys, lw=1.5, color="C1", marker="o", ms=4, label=v, gid="val")
        for i, (data, scores) in enumerate(baselines):
            for score, metric in BASELINE_METRICS.items():
                if score in scores and metric in (key, label):
                    ax.axhline(scores[score], color=f"C{2 + i}", ls=":", lw=1.5, label=f"copy input ({data}): {scores[score]:.3g}", gid="baseline")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        for _, step in ends:
            ax.axvline(step + 0.5, color="grey", ls="--", lw=1, gid="epoch-end")
        if len(ax.get_legend_handles_labels()[0]) > 1 or vals:
            ax.legend(fontsize=7, loc="best")
    for epoch, step in ends:
        axes[0].annotate(f"end of epoch {epoch}", (step + 0.5, 0.97), xycoords=("data", "axes fraction"),
                         ha="right", va="top", fontsize=8, color="grey", rotation=90)
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.get_major_locator().set_params(integer=True)
    smoothed = "raw values" if kind == "none" else f"smoothed {smoothing}, raw values faint"
    fig.suptitle(f"{run_dir.name}: {len(records)} logged steps up to step {steps[-1]} ({smoothed})")
    return fig


def plot_curves(run_dir: Path | str, out: Path | str | None = None, smoothing: str = DEFAULT_SMOOTH,
                baseline: Path | str | None = None) -> Path:
    """Write :func:`curves_figure` to ``out`` (default ``run_dir/curves.png``) and return its path."""
    out = Path(out) if out is not None else Path(run_dir) / "curves.png"
    curves_figure(run_dir, smoothing, baseline).savefig(out, dpi=100)
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
