"""The training loop around the engine, in one screen (:meth:`Trainer._run`).

The pieces it calls each own one concern: :class:`~arcfw.core.engine.engine.Engine`
the step, :class:`~arcfw.core.training.logbook.Logbook` the records, console lines,
health warnings and epoch summaries, :class:`~arcfw.core.training.schedule.SaveSchedule`
when checkpoints are written and how a stop signal ends the run,
:class:`~arcfw.core.training.checkpoint.Checkpointer` how they are written.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from arcfw.core.config import RunConfig
from arcfw.core.data.batch import Batch
from arcfw.core.data.fingerprint import data_fingerprint
from arcfw.core.data.tasks import ExampleLoader, load_tasks, make_examples
from arcfw.core.engine.distributed import resolve_device
from arcfw.core.engine.distributed import setup as setup_distributed
from arcfw.core.engine.engine import Engine
from arcfw.core.engine.lr_schedule import LRSchedule, is_active
from arcfw.core.errors import ArcfwError, ConfigError, Interrupted
from arcfw.core.io import WriteError, is_disk_full, write_atomic
from arcfw.core.training import checkpoint
from arcfw.core.training.checkpoint import Checkpointer, Position
from arcfw.core.training.interrupt import StopSignals
from arcfw.core.training.logbook import Logbook
from arcfw.core.training.metrics import MetricsLog, NullLog, write_metric_specs
from arcfw.core.training.monitor import Monitor
from arcfw.core.training.runlock import RunLock
from arcfw.core.training.schedule import SaveSchedule
from arcfw.core.training.startup import startup_lines
from arcfw.core.training.validation import METRICS as VAL_METRICS
from arcfw.core.training.validation import Validator
from arcfw.core.training.validation import describe as describe_val

RUN_FILES = ("metrics.jsonl", "summary.json", "config.yaml", "metric_specs.json")


def check_out_dir(out: Path, overwrite: bool, files: tuple[str, ...] = (*RUN_FILES, checkpoint.DIR, checkpoint.BEST),
                  what: str = "a run") -> None:
    """Refuse an output folder that is a file, cannot be written, or already holds ``what`` (one of
    ``files``) unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", [("", f"output path exists and is not a folder: {out}")])
    if out.is_dir() and any((out / f).exists() for f in files) and not overwrite:
        raise ConfigError(
            "--out", [("out", f"{out} already holds {what}; pass --overwrite to replace it or use another --out")]
        )
    parent = out.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError("--out", [("", f"cannot create output folder {out}: {parent} is a file")])
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError("--out", [("", f"cannot write output folder {out}: no write permission in {parent}")])


def run_steps(cfg: dict[str, Any], batches_per_epoch: int) -> int:
    """The optimizer steps of a run: ``accumulate`` batches per step (the last step of an epoch may
    take fewer) over ``epochs`` epochs, at most ``max_batches`` steps (the default length of the
    learning-rate schedule, ``lr_schedule.steps``)."""
    total = int(cfg["epochs"]) * math.ceil(batches_per_epoch / int(cfg["accumulate"]))
    return total if cfg["max_batches"] is None else min(total, int(cfg["max_batches"]))


def resolve_schedule_steps(config: RunConfig) -> None:
    """``lr_schedule.steps`` of a fresh one-process run of ``config`` when the config leaves it null
    (``arcfw config`` prints what ``arcfw run`` saves)."""
    sec, d = config.data["lr_schedule"], config.data["data"]
    if sec["steps"] is None:
        examples = make_examples(load_tasks(d["source"], version=d["version"], split=d["split"], max_tasks=d["max_tasks"]))
        sec["steps"] = run_steps(config.data, math.ceil(len(examples) / config.data["batch_size"]))


class Trainer:
    """Loads the data, builds the :class:`Engine`, and runs epochs with logging.

    Under ``torchrun`` every process builds a Trainer; it joins the process
    group (:func:`arcfw.core.engine.distributed.setup`), takes its shard of the data,
    and averages each step's metrics over ranks.  Only rank 0 prints and writes
    the run files.
    """

    def __init__(
        self,
        config: RunConfig,
        out_dir: Path | str,
        *,
        quiet: bool = False,
        overwrite: bool = False,
        resume: Path | str | None = None,
        overrides: Sequence[str] = (),
        init_from: Path | str | None = None,
    ):
        """``resume``: continue the run in ``out_dir`` from a checkpoint (``out_dir`` itself for its
        latest checkpoint, or one of its checkpoint folders).  ``overrides``: the command line's
        ``key=value`` overrides, repeated in the command printed to resume a stopped run.
        ``init_from``: a new run whose model starts from that checkpoint's module weights
        (:func:`arcfw.core.training.checkpoint.init_weights`; optimizer and plugin states fresh)."""
        self.config = config
        self.overrides = [o for o in overrides if not o.startswith("out=")]
        self.cfg = config.data
        self.out_dir = Path(out_dir)
        self.dist = setup_distributed(config, resolve_device(self.cfg["device"]))
        self.quiet = quiet or not self.dist.is_main
        # one run at a time in a folder: refused now if a live process trains there (rank 0 holds the lock)
        self.lock = RunLock(self.out_dir)
        if self.dist.is_main:
            self.lock.check()
        # Everything that can fail on bad input happens before the output folder is touched.
        if resume is None:
            if self.dist.is_main:  # the only rank that writes
                what = ("a run that stopped before its first checkpoint (nothing to resume)" if checkpoint.no_checkpoint_yet(self.out_dir)
                        else f"a run (--resume {self.out_dir} continues it)")
                check_out_dir(self.out_dir, overwrite, what=what)
            self.resumed = None
        else:
            self.resumed = checkpoint.open_for_resume(resume, self.out_dir, config)
        d = self.cfg["data"]
        self.tasks = load_tasks(d["source"], version=d["version"], split=d["split"], max_tasks=d["max_tasks"])
        self.examples = make_examples(self.tasks)
        self.engine = Engine.from_config(config, out_dir=self.out_dir, dist=self.dist)
        self.init_from = None
        if init_from is not None:
            if resume is not None:
                raise ConfigError("--init-from", [("", "cannot be combined with --resume (a resumed run has its own weights)")])
            self.init_from = checkpoint.init_weights(self.engine, init_from)
        augment = self.engine.augment_example if self.engine.implements("augment_example") else None
        self.loader = ExampleLoader(
            self.examples, batch_size=self.cfg["batch_size"], shuffle=d["shuffle"], seed=self.cfg["seed"],
            rank=self.dist.rank, world_size=self.dist.world_size, transform=augment,
        )
        c = self.cfg["checkpoint"]
        self.checkpoints = Checkpointer(self.out_dir, self.engine, self.loader, c["keep"], data_fingerprint(self.tasks))
        if self.dist.is_main:
            checkpoint.check_space(self.out_dir, self.engine, c["keep"] + (c["best"] is not None))
        self.checkpoints.check_plugin_states()
        self.accumulate: int = self.cfg["accumulate"]
        self.steps_per_epoch = math.ceil(len(self.loader) / self.accumulate)
        v, e = self.cfg["val"], self.cfg["early_stop"]
        self.validator = Validator(self.engine, v, self.tasks, config.source) if v["every"] is not None else None
        self.best = Monitor(c["best"], c["mode"]) if c["best"] is not None else None
        self.early = Monitor(e["metric"], e["mode"], e["min_delta"]) if e["metric"] is not None else None
        self.stopped_early = False
        self.lr_schedule = self._build_lr_schedule()
        self.book = Logbook(self.engine, NullLog(), self.cfg["log_every"], self.quiet, self.dist.is_main)
        if self.validator is not None:
            self.book.metrics += VAL_METRICS
        self.saves = SaveSchedule(self.checkpoints, c["every"], len(self.loader), self.loop_state, self.resume_command)
        self.start_epoch = self.start_batch = 0
        self._rng: dict[str, Any] | None = None
        start = f"fresh (seed {self.cfg['seed']})"
        notes: list[str] = []
        if self.resumed is not None:
            restored = self.checkpoints.restore(self.resumed)
            self.engine.ctx.resumed_step = self.resumed.step
            self.start_epoch, self.start_batch = restored.position.epoch, restored.position.batch
            self.load_loop_state(restored.loop)
            self._rng = restored.rng
            start = (f"resuming from {self.resumed.path} (step {self.engine.global_step}, "
                     f"epoch {self.start_epoch}, batch {self.start_batch})")
            notes = list(restored.notes)
        if self.init_from is not None:
            start = (f"model initialised from {self.init_from.path} (step {self.init_from.step}); "
                     "optimizer and plugin states start fresh")
        for line in startup_lines(self.engine, self.cfg, tasks=len(self.tasks), pairs=len(self.examples),
                                  batches=len(self.loader), out_dir=self.out_dir, start=start,
                                  world_size=self.dist.world_size):
            self.book.print(line)
        for line in self._feature_lines():
            self.book.print(line)
        for note in notes:
            self.book.print(f"warning: {note}")

    # ------------------------------------------------------------------ the loop

    def fit(self) -> list[dict[str, Any]]:
        try:
            created = self._open_outputs()
        except BaseException:
            self.lock.release()
            self.dist.close()
            raise
        try:
            with StopSignals(self._on_signal) as self._signals:
                if self._rng is not None:
                    checkpoint.set_rng_state(self._rng)  # last, so that nothing draws between restore and step
                self._run()
        except BaseException as exc:
            self._end("stopped" if isinstance(exc, Interrupted) else "failed", raise_errors=False)
            self.book.close()
            if created and self.engine.global_step == 0:  # failed before the first step: leave nothing behind
                shutil.rmtree(self.out_dir, ignore_errors=True)
            elif isinstance(exc, ArcfwError) and is_disk_full(exc) and self.dist.is_main:
                self._add_resume_hint(exc)
            raise
        finally:
            self.lock.release()
            self.dist.close()
        self._end("finished")
        self.book.close()
        return self.book.log.summaries

    def _add_resume_hint(self, exc: ArcfwError) -> None:
        """A full disk stopped the run: say which checkpoint is intact and how to go on once there is room."""
        latest = self.checkpoints.latest_name()
        if latest is None:
            hint = "no checkpoint was written yet: free some space and start the run again"
        else:
            intact = "" if "is intact" in str(exc) else f"the last checkpoint {latest} is intact; "
            hint = f"{intact}free some space, then resume with: {self.resume_command()}"
        if isinstance(exc, WriteError):
            exc.message = f"{exc.message}; {hint}"
        else:
            exc.args = (f"{exc}; {hint}",)

    def _end(self, status: str, raise_errors: bool = True) -> None:
        """``on_train_end(status)`` of every plugin (loggers close their files); the first error of an
        implementation is raised once all were called (not while another error is on its way)."""
        first: BaseException | None = None
        for impl in self.engine._impls.get("on_train_end", []):
            try:
                self.engine.call_plugin("on_train_end", impl.plugin, status=status)
            except Exception as exc:  # noqa: BLE001 - every logger gets to close its files
                first = first or exc
        if first is not None and raise_errors:
            raise first

    def _run(self) -> None:
        eng, epochs = self.engine, self.cfg["epochs"]
        if self.early is not None and self.early.bad >= self.cfg["early_stop"]["patience"]:
            self.stopped_early = True  # a run resumed from its early-stop checkpoint: nothing more to do
            self.book.print(self._early_stop_text())
        for epoch in range(self.start_epoch, epochs):
            if self._budget_spent():
                break
            start = self._start_epoch(epoch)
            bar = self._progress_bar(epoch, start)
            next_batch = start
            for batch_index, batches in self._steps(epoch, start):
                if self._budget_spent():
                    break
                metrics = eng.train_step([b.to(eng.device) for b in batches] if len(batches) > 1 else batches[0].to(eng.device))
                # averaged over ranks; a signal that reached any rank stops every rank after this step
                metrics, self.saves.stop_signum = self.dist.exchange(metrics, self._signals.signum)
                next_batch = batch_index + 1
                val = self._validate(epoch, next_batch) if self.validator and self.validator.due(eng.global_step) else {}
                self.book.step(epoch, batch_index, {**metrics, **val}, force=bool(val))
                if val:
                    self.book.print(self.validator.line(eng.global_step, val) if self.validator else "")
                bar.update(len(batches))
                self.saves.after_step(epoch, next_batch)
                if self.stopped_early:
                    self.book.print(self._early_stop_text())
                    break
            bar.close()
            self.saves.cut_short(epoch, next_batch)
            if self.book.end_epoch(epoch) is not None:
                self.saves.epoch_done(epoch, next_batch)

    def _start_epoch(self, epoch: int) -> int:
        """Set the epoch up; returns its first batch (a run resumed inside an epoch had its start already)."""
        self.engine.ctx.epoch = epoch
        start = self.start_batch if epoch == self.start_epoch else 0
        if start == 0:
            self.engine.call_all("on_epoch_start", epoch=epoch)
            self.book.start_epoch()
        return start

    def _steps(self, epoch: int, start: int) -> Iterator[tuple[int, list[Batch]]]:
        """The epoch's optimizer steps from batch ``start`` on: ``accumulate`` batches each (the last
        step of an epoch may have fewer), with the index of the step's last batch."""
        chunk: list[Batch] = []
        index = start - 1
        for index, batch in enumerate(self.loader.batches(epoch, start), start):
            chunk.append(batch)
            if len(chunk) == self.accumulate:
                yield index, chunk
                chunk = []
        if chunk:
            yield index, chunk

    def _budget_spent(self) -> bool:
        max_batches = self.cfg["max_batches"]
        return self.stopped_early or (max_batches is not None and self.engine.global_step >= max_batches)

    # ------------------------------------------------------------------ schedule, validation, best, early stop

    def _build_lr_schedule(self) -> LRSchedule | None:
        """The learning-rate schedule of every trainable group, installed in the engine; its length
        (``lr_schedule.steps``, null: the run's optimizer steps) goes into the resolved config. A
        resumed run keeps the length its checkpoint was made with unless the config sets one."""
        sec = self.cfg["lr_schedule"]
        groups = [g.name for g in self.engine.groups]
        unknown = sorted(set(sec["groups"]) - set(groups))
        if unknown:
            raise self.config.error([(f"lr_schedule.groups.{u}", f"no parameter group named '{u}' (groups: {', '.join(groups)})")
                                     for u in unknown])
        total = sec["steps"]
        if total is None:
            total = run_steps(self.cfg, len(self.loader))
            if self.resumed is not None:
                saved = self.resumed.meta["config"].get("lr_schedule", {}).get("steps")
                total = saved if isinstance(saved, int) else total
        sec["steps"] = total
        if not is_active(sec):
            return None
        schedule = LRSchedule(sec, {g.name: g.lr for g in self.engine.groups if g.lr > 0}, total)
        self.engine.lr_schedule = schedule
        return schedule

    def _validate(self, epoch: int, next_batch: int) -> dict[str, float]:
        """Validation after this step; the best checkpoint and the early-stop count follow it."""
        assert self.validator is not None
        step = self.engine.global_step
        val = self.validator.run()
        if self.best is not None and self.best.update(val, step):
            self.checkpoints.save_best(Position(epoch, next_batch), self.loop_state(),
                                       {"metric": self.best.metric, "mode": self.best.mode, "value": self.best.best, "step": step})
        if self.early is not None:
            self.early.update(val, step)
            self.stopped_early = self.early.bad >= self.cfg["early_stop"]["patience"]
        return val

    def _early_stop_text(self) -> str:
        e = self.early
        assert e is not None
        best = f"{e.best:.4g} at step {e.best_step}" if e.best is not None else "none (no finite value)"
        return (f"arcfw: early stop after step {self.engine.global_step}: {e.metric} has not improved for {e.bad} "
                f"validation(s) (early_stop.patience {self.cfg['early_stop']['patience']}); best {best}")

    def loop_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the loop: the epoch statistics, the schedule's length, the best
        value and the early-stop count."""
        out = self.book.state_dict()
        out["lr_schedule"] = {"total": self.cfg["lr_schedule"]["steps"]}
        if self.best is not None:
            out["best"] = self.best.state_dict()
        if self.early is not None:
            out["early_stop"] = self.early.state_dict()
        return out

    def load_loop_state(self, state: dict[str, Any]) -> None:
        self.book.load_state_dict(state)
        if self.best is not None and "best" in state:
            self.best.load_state_dict(state["best"])
        if self.early is not None and "early_stop" in state:
            self.early.load_state_dict(state["early_stop"])

    def _feature_lines(self) -> list[str]:
        """Start-up lines of the trainer's options that are on: accumulation, schedule, validation."""
        lines = []
        if self.accumulate > 1:
            world = self.dist.world_size
            lines.append(f"arcfw: gradient accumulation: an optimizer step every {self.accumulate} batches "
                         f"({self.cfg['batch_size'] * self.accumulate * world} examples per step), "
                         f"{self.steps_per_epoch} steps per epoch; max_batches, log_every, checkpoint.every and val.every count steps")
        sec = self.cfg["lr_schedule"]
        if self.lr_schedule is not None:
            over = "; ".join(f"{g}: {', '.join(f'{k} {v}' for k, v in o.items())}" for g, o in sec["groups"].items())
            lines.append(f"arcfw: lr schedule {sec['name']}, warmup {sec['warmup']} steps, over {sec['steps']} steps"
                         + (f" to {sec['min_ratio']:g} x lr" if sec["name"] != "constant" else "") + (f" ({over})" if over else ""))
        if self.validator is not None:
            v = self.cfg["val"]
            lines.append(f"arcfw: validation every {v['every']} steps on {describe_val(v)}: {len(self.validator.tasks)} tasks, "
                         f"{len(self.validator.examples)} test outputs"
                         + (f"; best checkpoint by {self.best.metric} ({self.best.mode}) in {self.out_dir / checkpoint.BEST}" if self.best else "")
                         + (f"; early stop after {self.cfg['early_stop']['patience']} validations without a better {self.early.metric}"
                            if self.early else ""))
            if self.validator.overlap:
                lines.append(f"warning: {len(self.validator.overlap)} of the {len(self.validator.tasks)} validation tasks are "
                             "training tasks too: their val/ scores measure memory (use another val.split or val.source)")
        return lines

    def _progress_bar(self, epoch: int, start: int) -> tqdm:
        total, max_batches = len(self.loader), self.cfg["max_batches"]
        if max_batches is not None:
            total = min(total, start + (max_batches - self.engine.global_step) * self.accumulate)
        return tqdm(total=total, initial=start, desc=f"Epoch {epoch}", disable=self.quiet, dynamic_ncols=True, file=sys.stderr)

    # ------------------------------------------------------------------ output and signals

    def _open_outputs(self) -> bool:
        if not self.dist.is_main:
            return False
        created = not self.out_dir.exists()
        r = self.resumed
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            stale = self.lock.acquire()  # before anything in the folder is deleted or written
            if stale:
                self.book.print(f"warning: {stale}")
            if r is None:
                for f in RUN_FILES:
                    (self.out_dir / f).unlink(missing_ok=True)
            self.checkpoints.start(r)
            write_atomic(self.out_dir / "config.yaml", self.config.dump())
            write_metric_specs(self.out_dir, self.book.metrics)
            # a resumed run drops what was logged after its checkpoint, and the unfinished epoch's summary
            if r is None:
                self.book.log = MetricsLog(self.out_dir)
            else:
                self.book.log = MetricsLog(self.out_dir, resume_step=r.step, resume_epoch=self.start_epoch)
        except OSError as exc:
            if created:
                shutil.rmtree(self.out_dir, ignore_errors=True)
            why = str(exc) if isinstance(exc, WriteError) else f"cannot write to {self.out_dir}: {exc.strerror or exc}"
            raise ConfigError("--out", [("", why)]) from None
        return created

    def _on_signal(self, signum: int) -> None:
        self.book.print(
            f"arcfw: {signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
            "(Ctrl-C again aborts at once, without saving)"
        )

    def resume_command(self) -> str:
        """The command that continues this run: the same config and overrides, ``--resume OUT``, and
        under torchrun the same number of processes."""
        args = ["run", self.config.source, *(a for o in self.overrides for a in ("--set", o)), "--resume", str(self.out_dir)]
        world = self.dist.world_size
        if world == 1:
            return shlex.join(["arcfw", *args])
        local = os.environ.get("LOCAL_WORLD_SIZE", str(world))
        nodes = "" if local == str(world) else " [the run's --nnodes and rendezvous options]"
        return f"torchrun --nproc-per-node {local}{nodes} -m arcfw {shlex.join(args)}"
