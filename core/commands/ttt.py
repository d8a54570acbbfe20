"""``arcfw eval --ttt``: test-time training - fit each task's demonstrations, then answer it.

**Per task** (:func:`solve_task`):

1. The engine goes back to where it started (:class:`Snapshot`, taken once
   after building and loading the checkpoint): the parameter groups' modules,
   the main optimizer, the precision scaler, every plugin's state (the RL
   policy and its optimizer, the size head, the prompt cache, ...), the step
   counter and fresh health counters.  The random generators are seeded from
   ``(seed, task id)``, so a task's answer does not depend on which rank
   trains it or on which tasks came before (same seed, same answers).
2. ``ttt.views`` views of the task are drawn (the task itself first, then
   dihedral transforms with colour permutations keeping 0, as
   :mod:`arcfw.plugins.augment` does); a view applies one transform to every
   grid of the task.  In every view each demonstration pair is in turn the
   query, the other pairs its context (leave-one-out): ``views x pairs``
   training examples.  A task with a single demonstration pair has no
   context to give: its examples are the pair's views with an empty context
   (a warning says so).
3. ``Engine.train_step`` - the same engine, step order and checks as
   ``arcfw run`` - on batches of ``ttt.batch_size`` of those examples (a
   shuffled pass after another) for ``ttt.steps`` steps and/or ``ttt.seconds``
   seconds, whichever ends first.  Test outputs are never read: only
   ``task.train`` is trained on, and the test inputs are predicted without
   their outputs.
4. Each test input is predicted in every view, mapped back and voted over
   (:func:`arcfw.core.commands.evaluate.choose_attempts`, as ``arcfw eval``).

**Results** go to ``OUT/ttt/<task>.json`` as each task finishes (written
atomically), so an interrupted evaluation continues with ``--resume``
(SIGTERM or Ctrl-C stop after the current step; the unfinished task is
dropped and the exit code is 128 + the signal).  When every task has a
result, ``eval.json`` and ``submission.json`` are written as ``arcfw eval``
writes them, with a ``ttt`` section (settings, seconds per task, steps, peak
memory).

**Several processes** (``torchrun --nproc-per-node N -m arcfw eval --ttt``):
rank 0 checks the output folder and hands out the unfinished tasks
round-robin (a gloo process group, used only for that and for gathering the
ranks' figures at the end); each rank trains its own tasks with a
one-process engine (no DDP: inside :func:`arcfw.core.engine.distributed.independent`
the plugins' collective helpers are no-ops), and rank 0 merges the per-task
files into one ``eval.json`` and ``submission.json``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import resource
import shlex
import signal
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from arcfw.core.commands.evaluate import (
    EVAL_FILES,
    Candidate,
    EvalReport,
    Predictions,
    _predict_views,
    choose_attempts,
    copy_baseline,
    score,
    write_eval,
)
from arcfw.core.config import RunConfig
from arcfw.core.data.batch import Example, Pair, Task, collate
from arcfw.core.engine import distributed
from arcfw.core.engine.context import View
from arcfw.core.engine.distributed import resolve_device
from arcfw.core.engine.engine import Engine, seed_everything
from arcfw.core.engine.health import GradientWatch, HealthMonitor, NonFiniteGuard
from arcfw.core.errors import ConfigError, DataError, DistributedError, Interrupted, TrainingHalted
from arcfw.core.io import write_atomic
from arcfw.core.training import checkpoint as ckpt
from arcfw.core.training.interrupt import StopSignals
from arcfw.plugins.augment import DIHEDRAL, Transform, random_colours

TASKS_DIR = "ttt"
SETTINGS = "settings.json"
#: config keys that decide a task's answer: a resumed TTT evaluation must not change them
FIXED_KEYS = ("seed", "precision", "grad_clip", "optimizer", "plugins", "ttt")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """The ``ttt:`` section of the config (validated by :mod:`arcfw.core.config`)."""

    steps: int | None = 60
    seconds: float | None = None
    lr: dict[str, float] = field(default_factory=dict)
    views: int = 8
    batch_size: int = 8
    augment: bool = True

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Settings:
        t = cfg["ttt"]
        return cls(t["steps"], t["seconds"], dict(t["lr"]), t["views"], t["batch_size"], t["augment"])


def build_engine(cfg: RunConfig, out_dir: Path | None = None, device: torch.device | None = None) -> Engine:
    """A one-process engine whose learning rates are ``ttt.lr`` over ``optimizer.lr``; an unknown
    group in ``ttt.lr`` is a config error naming ``ttt.lr.<group>``."""
    data = copy.deepcopy(cfg.data)
    data["optimizer"]["lr"] = {**data["optimizer"]["lr"], **data["ttt"]["lr"]}
    own = set(data["ttt"]["lr"]) - set(cfg["optimizer"]["lr"])
    try:
        return Engine(RunConfig(data=data, source=cfg.source, plugins=cfg.plugins), out_dir=out_dir, device=device)
    except ConfigError as exc:
        renamed = [(f"ttt.lr.{k.split('.', 2)[2]}" if k.startswith("optimizer.lr.") and k.split(".", 2)[2] in own else k, m)
                   for k, m in exc.problems]
        raise ConfigError(exc.source, renamed) from None


# --------------------------------------------------------------------------- the engine's state


class Snapshot:
    """Everything test-time training changes in an engine, copied in memory (:meth:`Engine.state_dict`);
    :meth:`restore` puts it back (:meth:`Engine.load_state_dict`).

    The modules of every parameter group (and group parameters outside them),
    the main optimizer, the precision scaler, every plugin's ``state_dict``
    hook (the RL policy with its optimizer, the size head, the prompt cache,
    ...) and the schedule (the curriculum's threshold); the step and epoch
    counters go back to 0 and the health counters start afresh.  The state
    holds copies: training never changes the snapshot.
    """

    def __init__(self, engine: Engine):
        self.state = engine.state_dict()

    def restore(self, engine: Engine) -> None:
        engine.load_state_dict(self.state, source="the test-time training snapshot")
        engine.optimizer.zero_grad(set_to_none=True)
        engine.global_step = 0
        ctx = engine.ctx
        ctx.step, ctx.epoch, ctx.no_grad_groups = 0, 0, set()
        reset_health(engine)


def reset_health(engine: Engine) -> None:
    """Fresh health counters (zero-gradient streaks, non-finite skips, red flags): each task starts clean."""
    w, g, h = engine.grad_watch, engine.guard, engine.health
    engine.grad_watch = GradientWatch(w.groups, w.patience)
    engine.guard = NonFiniteGuard(g.policy, g.max_consecutive)
    engine.health = HealthMonitor(h.watched_group, h.flat_window, h.flat_tolerance, h.stuck)


# --------------------------------------------------------------------------- one task


def task_seed(seed: int, task_id: str) -> int:
    """The seed of one task's training: depends on the run's seed and the task only."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{task_id}".encode()).digest()[:8], "little") % 2**63


def task_views(task: Task, settings: Settings, seed: int) -> list[Transform]:
    """The task itself, then ``views - 1`` transforms: distinct rotations/reflections (identity last
    of the eight), each with its own colour permutation keeping 0."""
    if not settings.augment:
        return [Transform()]
    rng = np.random.default_rng([seed % 2**63, zlib.crc32(task.task_id.encode())])
    dihedral = [0, *(int(k) for k in rng.permutation(np.arange(1, len(DIHEDRAL))))]
    return [Transform()] + [Transform(dihedral[v % len(DIHEDRAL)], random_colours(rng)) for v in range(1, settings.views)]


def training_examples(task: Task, views: list[Transform]) -> list[Example]:
    """Leave-one-out examples of every view: demonstration ``i`` is the query, the others its context.

    Built from ``task.train`` only.  Keys differ per view (``pair_index = (view + 1) * pairs + i``),
    so the prompt cache tells the views apart, and never equal a training run's keys (``i``), so a
    prompt cached by the run that made the checkpoint is never reused.  One demonstration: the
    context is empty.
    """
    n = len(task.train)
    out = []
    for v, t in enumerate(views):
        pairs = [t.pair(p) for p in task.train]  # demonstrations: both grids
        for i in range(n):
            out.append(Example(task.task_id, (v + 1) * n + i, tuple(pairs[:i] + pairs[i + 1 :]), pairs[i]))
    return out


@dataclass
class TaskResult:
    task_id: str
    attempts: list[list[np.ndarray]]  # per test input, two attempts
    seconds: float  # training and prediction
    train_seconds: float
    steps: int
    examples: int  # training examples (views x demonstration pairs)
    loss_first: float
    loss_last: float
    cell_acc_last: float
    warnings: list[str] = field(default_factory=list)
    rank: int = 0  # the process that trained it
    prompt_cached: float = 0.0  # share of the training prompts taken from the prompt cache

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["attempts"] = [[np.asarray(a).tolist() for a in pair] for pair in self.attempts]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TaskResult:
        d = dict(d)
        d["attempts"] = [[np.asarray(a, dtype=np.int64) for a in pair] for pair in d["attempts"]]
        return cls(**d)


class Stop(Exception):
    """A stop signal arrived during a task (internal)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def solve_task(
    engine: Engine, snapshot: Snapshot, task: Task, settings: Settings, *, seed: int, predict_batch: int,
    stop: StopSignals | None = None,
) -> TaskResult:
    """Restore the engine, train on the task's demonstrations, answer its test inputs (module docstring)."""
    t0 = time.perf_counter()
    snapshot.restore(engine)
    s = task_seed(seed, task.task_id)
    seed_everything(s)
    if engine.ctx.generator is not None:
        engine.ctx.generator.manual_seed(s)
    warnings = []
    views = task_views(task, settings, seed)
    pool = training_examples(task, views)
    if len(task.train) == 1:
        warnings.append(f"task {task.task_id} has a single demonstration pair: it trains on its {len(views)} "
                        "augmented view(s) alone, without another pair as context")
    rng = np.random.default_rng([s, 1])
    size = min(settings.batch_size, len(pool))
    queue: list[int] = []
    losses: list[float] = []
    cached: list[float] = []
    cell_acc = float("nan")
    steps = 0
    while settings.steps is None or steps < settings.steps:
        if settings.seconds is not None and time.perf_counter() - t0 >= settings.seconds:
            break
        if stop is not None and stop.signum is not None:
            raise Stop(stop.signum)
        while len(queue) < size:
            queue.extend(int(i) for i in rng.permutation(len(pool)))
        chosen, queue = queue[:size], queue[size:]
        try:
            metrics = engine.train_step(collate([pool[i] for i in chosen]).to(engine.device))
        except TrainingHalted as exc:  # one task's trouble (e.g. its loss is 0 everywhere: all fit) ends its training only
            warnings.append(f"task {task.task_id}: training stopped at step {steps}: {exc}")
            break
        steps += 1
        losses.append(float(metrics.get("loss", float("nan"))))
        cell_acc = float(metrics.get("cell_acc", float("nan")))
        cached.append(float(metrics.get("prompt_cached", 0.0)))
    train_seconds = time.perf_counter() - t0
    attempts = predict_task(engine, task, views, predict_batch)
    return TaskResult(
        task.task_id, attempts, round(time.perf_counter() - t0, 4), round(train_seconds, 4), steps, len(pool),
        losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"), cell_acc, warnings,
        prompt_cached=round(float(np.mean(cached)), 4) if cached else 0.0,
    )


def predict_task(engine: Engine, task: Task, views: list[Transform], batch_size: int) -> list[list[np.ndarray]]:
    """Two attempts per test input: predicted in every view, mapped back, voted over. No test output is read.
    Decoded with keep margin ``decode.keep`` when it is a number, else 0: the model has just been trained
    on the demonstrations, so they can no longer choose it (evaluate.keep_margins)."""
    keep = engine.config["decode"]["keep"]
    margin = 0.0 if keep == "demos" else float(keep)
    tests = [Example(task.task_id, i, task.train, Pair(p.input, None)) for i, p in enumerate(task.test)]
    items = [(n, View(t.example(ex), t.invert, t.name)) for n, ex in enumerate(tests) for t in views]
    candidates: list[list[Candidate]] = [[] for _ in tests]
    with engine.evaluating():
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            for (n, _), found in zip(chunk, _predict_views(engine, [v for _, v in chunk], [margin] * len(chunk))):
                candidates[n].extend(found)
    return [choose_attempts(c) for c in candidates]


# --------------------------------------------------------------------------- the output folder


def _safe_name(task_id: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", task_id)
    return clean if clean == task_id else f"{clean}-{zlib.crc32(task_id.encode()):08x}"


def result_path(out_dir: Path, task_id: str) -> Path:
    return out_dir / TASKS_DIR / f"{_safe_name(task_id)}.json"


def write_result(out_dir: Path, result: TaskResult) -> None:
    write_atomic(result_path(out_dir, result.task_id), json.dumps(result.to_json()))


def read_result(out_dir: Path, task_id: str) -> TaskResult | None:
    """The finished task's result, or None (no file, or one that is not a complete result)."""
    path = result_path(out_dir, task_id)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        return TaskResult.from_json(d) if d.get("task_id") == task_id else None
    except (OSError, ValueError, TypeError, KeyError):
        return None


def settings_record(cfg: RunConfig, checkpoint: Path | None, data: dict[str, Any]) -> dict[str, Any]:
    """What decides the answers of a TTT evaluation; a resumed one must match it."""
    return {
        "config": {k: ckpt._jsonable(cfg[k]) for k in FIXED_KEYS},
        "checkpoint": None if checkpoint is None else str(checkpoint.resolve()),
        "data": data,
    }


def prepare_out_dir(out: Path, record: dict[str, Any], tasks: list[Task], *, resume: bool, overwrite: bool) -> list[str]:
    """Check (and with ``overwrite`` clear) the output folder; returns the ids of tasks already finished.

    Without ``resume`` a folder holding an evaluation or TTT results is refused unless
    ``overwrite``; with ``resume`` the folder's settings must match ``record``.
    """
    from arcfw.core.training.trainer import check_out_dir

    folder = out / TASKS_DIR
    if resume:
        if overwrite:
            raise ConfigError("--overwrite", [("", "cannot be combined with --resume")])
        try:
            saved = json.loads((folder / SETTINGS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise ConfigError("--resume", [("", f"{out} holds no test-time training evaluation to resume "
                                             f"({TASKS_DIR}/{SETTINGS} is missing or damaged)")]) from None
        diff = [k for k in ("checkpoint", "data") if saved.get(k) != record[k]]
        a, b = ckpt._flatten(saved.get("config", {}), "", {}), ckpt._flatten(record["config"], "", {})
        diff += [f"{k} (then: {json.dumps(a.get(k))}, now: {json.dumps(b.get(k))})" for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
        if diff:
            raise ConfigError("--resume", [("", f"{out}: cannot resume: the evaluation there was made with other "
                                             f"settings: {'; '.join(diff)}")])
    else:
        check_out_dir(out, overwrite, (*EVAL_FILES, TASKS_DIR), "an evaluation (--resume continues an unfinished one)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in EVAL_FILES:
                (out / name).unlink(missing_ok=True)
            for f in folder.glob("*.json"):
                f.unlink()
        for f in folder.glob("*.tmp"):
            f.unlink(missing_ok=True)
        write_atomic(folder / SETTINGS, json.dumps(record, indent=1))
    except OSError as exc:
        raise ConfigError("--out", [("", f"cannot write to {out}: {exc.strerror or exc}")]) from None
    return [t.task_id for t in tasks if read_result(out, t.task_id) is not None]


def check_tasks(tasks: list[Task]) -> None:
    """A task without test inputs has nothing to answer: a data error naming its file."""
    for t in tasks:
        if not t.test:
            raise DataError("task has no test inputs: nothing to answer (arcfw eval needs 'test' pairs)",
                            file=t.source or None, task=t.task_id)


# --------------------------------------------------------------------------- progress


class Progress:
    """A progress bar over all tasks (every rank's, read from the output folder) with pass@2 so far."""

    def __init__(self, out: Path, tasks: list[Task], quiet: bool):
        self.out, self.tasks = out, {t.task_id: t for t in tasks}
        self.seen: dict[str, float | None] = {}
        self.bar = tqdm(total=len(tasks), desc="ttt", unit="task", disable=quiet, dynamic_ncols=True, file=sys.stderr)
        self.poll()

    def poll(self) -> int:
        """Read the results that appeared since the last call; returns how many tasks are finished."""
        for task_id, task in self.tasks.items():
            if task_id in self.seen:
                continue
            r = read_result(self.out, task_id)
            if r is not None:
                s = score([task], {task_id: r.attempts})
                self.seen[task_id] = None if s is None else s.pass_at_2
                self.bar.update(1)
        known = [v for v in self.seen.values() if v is not None]
        if known:
            self.bar.set_postfix_str(f"pass@2 {np.mean(known):.3f} ({sum(known):g}/{len(known)})")
        return len(self.seen)

    def write(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


# --------------------------------------------------------------------------- the command


def peak_memory_mib(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process (and of the CUDA allocator on a GPU), MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = {"peak_rss_mib": round(rss, 1)}
    if device.type == "cuda":
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def rank_device(cfg: RunConfig, world: int) -> torch.device:
    """The config's device; on CUDA with several processes, GPU ``LOCAL_RANK`` (one per process)."""
    device = resolve_device(cfg["device"])
    if device.type == "cuda" and world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) are visible: "
                                   "start at most one process per GPU (torchrun --nproc-per-node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    return device


def _world() -> tuple[int, int]:
    try:
        return int(os.environ.get("RANK", "0")), max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 0, 1


def resume_command(args: list[str], world: int) -> str:
    """``arcfw eval ... --resume`` (under torchrun, with the same number of processes)."""
    args = [a for a in args if a not in ("--resume", "--overwrite")] + ["--resume"]
    if world == 1:
        return shlex.join(["arcfw", *args])
    local = os.environ.get("LOCAL_WORLD_SIZE", str(world))
    return f"torchrun --nproc-per-node {local} -m arcfw {shlex.join(args)}"


def run_ttt(
    cfg: RunConfig,
    tasks: list[Task],
    out: Path,
    *,
    checkpoint: Path | None,
    data: dict[str, Any],
    overlap: list[str],
    predict_batch: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    command: list[str] | None = None,
) -> EvalReport | None:
    """Test-time train on every task, write the per-task results, and (rank 0) ``eval.json`` and
    ``submission.json``.  Returns the report on rank 0, None on the other ranks.

    ``command``: the ``arcfw`` arguments of this evaluation, for the resume line printed on a stop.
    """
    check_tasks(tasks)
    settings = Settings.from_config(cfg)
    rank, world = _world()
    who = "arcfw" if world == 1 else f"arcfw[rank {rank}/{world}]"
    main = rank == 0
    record = settings_record(cfg, checkpoint, data)
    # bad config, plugins or checkpoint fail before anything is written
    engine = build_engine(cfg, out_dir=out, device=rank_device(cfg, world))
    loaded = ckpt.load_weights(engine, checkpoint) if checkpoint is not None else None
    if world > 1:
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo", timeout=timedelta(days=7))  # the ranks finish far apart
    done: list[str] | None = None
    if main:
        done = prepare_out_dir(out, record, tasks, resume=resume, overwrite=overwrite)
    if world > 1:
        box = [done]
        torch.distributed.broadcast_object_list(box, src=0)
        done = box[0]
    finished = set(done or [])
    todo = [t for t in tasks if t.task_id not in finished][rank::world]
    with distributed.independent():  # this rank's own engine: its state is not gathered from the others
        snapshot = Snapshot(engine)
    progress = Progress(out, tasks if main else [], quiet=quiet or not main)
    if main and finished:
        progress.write(f"{who}: resuming: {len(finished)} of {len(tasks)} tasks already finished")
    predict_batch = predict_batch or settings.batch_size
    mine: list[TaskResult] = []
    say = (lambda text: progress.write(text)) if main else (lambda text: tqdm.write(text, file=sys.stderr))
    try:
        with StopSignals(lambda signum: say(f"{who}: {signal.Signals(signum).name} received: stopping after this step; "
                                              "the finished tasks are saved")) as stop:
            with distributed.independent():
                for task in todo:
                    result = solve_task(engine, snapshot, task, settings, seed=cfg["seed"], predict_batch=predict_batch, stop=stop)
                    result.rank = rank
                    write_result(out, result)
                    mine.append(result)
                    for w in result.warnings:
                        say(f"{who}: warning: {w}")
                    if main:
                        progress.poll()
            while main and progress.poll() < len(tasks):  # the other ranks' tasks
                if stop.signum is not None:
                    raise Stop(stop.signum)
                time.sleep(0.5)
    except Stop as exc:
        progress.close()
        n = progress.poll() if main else len(finished) + len(mine)
        signum = exc.signum
        raise Interrupted(signum, f"{signal.Signals(signum).name}: stopped; {n} of {len(tasks)} tasks finished, "
                                  f"their results are in {out / TASKS_DIR}. Resume with: "
                                  f"{resume_command(command or [], world)}") from None
    progress.close()
    figures = {"rank": rank, "tasks": len(mine), **peak_memory_mib(engine.device)}
    gathered = [figures]
    if world > 1:
        every: list[Any] = [None] * world
        torch.distributed.all_gather_object(every, figures)
        torch.distributed.destroy_process_group()
        gathered = every
    if not main:
        return None
    results: dict[str, TaskResult] = {}
    for t in tasks:  # every one is there: Progress.poll read them all
        r = read_result(out, t.task_id)
        if r is None:
            raise DataError(f"the result of task {t.task_id} is missing or damaged; run the evaluation again with --resume",
                            file=str(result_path(out, t.task_id)), task=t.task_id)
        results[t.task_id] = r
    predictions: Predictions = {tid: r.attempts for tid, r in results.items()}
    seconds = [r.seconds for r in results.values()]
    section = {
        "ttt": {
            "settings": asdict(settings),
            "checkpoint": None if loaded is None else str(loaded.path),
            "seed": cfg["seed"],
            "processes": world,
            "seconds_per_task": round(float(np.mean(seconds)), 4),
            "seconds_total": round(float(np.sum(seconds)), 4),
            "steps_per_task": round(float(np.mean([r.steps for r in results.values()])), 2),
            "peak_rss_mib": max(g["peak_rss_mib"] for g in gathered),
            **({"peak_cuda_mib": max(g.get("peak_cuda_mib", 0) for g in gathered)} if engine.device.type == "cuda" else {}),
            "per_task": {tid: {k: v for k, v in r.to_json().items() if k not in ("attempts", "task_id")} for tid, r in results.items()},
        }
    }
    report = EvalReport(score(tasks, predictions), score(tasks, copy_baseline(tasks)), predictions, overlap, None, section)
    report.lines.append(
        f"test-time training: {section['ttt']['seconds_per_task']:.2f} s/task ({section['ttt']['steps_per_task']:g} steps, "
        f"{settings.views} views), peak memory {section['ttt']['peak_rss_mib']:.0f} MiB"
        + (f" per process, {world} processes" if world > 1 else "")
    )
    write_eval(cfg, out, tasks, report, data=data)
    return report
