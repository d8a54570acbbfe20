"""The training loop around the engine: data, epochs, progress bar, logs, summaries."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from arcfw.core.training import checkpoint
from arcfw.core.training.checkpoint import Checkpointer, Position
from arcfw.core.config import RunConfig
from arcfw.core.data.tasks import ExampleLoader, load_tasks, make_examples
from arcfw.core.engine.distributed import setup as setup_distributed
from arcfw.core.engine.context import THRESHOLD_KEY
from arcfw.core.engine.engine import Engine, resolve_device
from arcfw.core.errors import ConfigError, Interrupted
from arcfw.core.training.interrupt import StopSignals
from arcfw.core.training.metrics import MetricsLog, NullLog, batch_line, epoch_line

RUN_FILES = ("metrics.jsonl", "summary.json", "config.yaml")


def check_out_dir(out: Path, overwrite: bool, files: tuple[str, ...] = (*RUN_FILES, checkpoint.DIR), what: str = "a run") -> None:
    """Refuse an output folder that is a file, cannot be written, or already holds ``what`` (one of
    ``files``) unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", [("out", f"output path exists and is not a folder: {out}")])
    if out.is_dir() and any((out / f).exists() for f in files) and not overwrite:
        raise ConfigError(
            "--out", [("out", f"{out} already holds {what}; pass --overwrite to replace it or use another --out")]
        )
    parent = out.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError("--out", [("out", f"cannot create output folder {out}: {parent} is a file")])
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError("--out", [("out", f"cannot write output folder {out}: no write permission in {parent}")])


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
    ):
        """``resume``: continue the run in ``out_dir`` from a checkpoint (``out_dir`` itself for its
        latest checkpoint, or one of its checkpoint folders).  ``overrides``: the command line's
        ``key=value`` overrides, repeated in the command printed to resume a stopped run."""
        self.config = config
        self.overrides = [o for o in overrides if not o.startswith("out=")]
        self.cfg = config.data
        self.out_dir = Path(out_dir)
        self.dist = setup_distributed(config, resolve_device(self.cfg["device"]))
        self.quiet = quiet or not self.dist.is_main
        # Everything that can fail on bad input happens before the output folder is touched.
        if resume is None:
            if self.dist.is_main:  # the only rank that writes
                check_out_dir(self.out_dir, overwrite, what=f"a run (--resume {self.out_dir} continues it)")
            self.resumed = None
        else:
            self.resumed = checkpoint.open_for_resume(resume, self.out_dir, config)
        d = self.cfg["data"]
        self.tasks = load_tasks(d["source"], version=d["version"], split=d["split"], max_tasks=d["max_tasks"])
        self.examples = make_examples(self.tasks)
        self.engine = Engine.from_config(config, out_dir=self.out_dir, dist=self.dist)
        augment = self.engine.augment_example if self.engine.implements("augment_example") else None
        self.loader = ExampleLoader(
            self.examples, batch_size=self.cfg["batch_size"], shuffle=d["shuffle"], seed=self.cfg["seed"],
            rank=self.dist.rank, world_size=self.dist.world_size, transform=augment,
        )
        c = self.cfg["checkpoint"]
        self.checkpoints = Checkpointer(self.out_dir, self.engine, self.loader, c["keep"], checkpoint.data_fingerprint(self.tasks))
        if self.dist.is_main:
            checkpoint.check_space(self.out_dir, self.engine, c["keep"])
        self.checkpoints.check_plugin_states()
        self.start_epoch = 0
        self.start_batch = 0
        self.acc, self.window, self.elapsed = _EpochStats(), _EpochStats(), 0.0  # the current epoch's statistics
        self._rng: dict[str, Any] | None = None
        self.last_checkpoint: Path | None = None
        self._stop_signum: int | None = None  # the stop signal any rank received (agreed after every step)
        if self.resumed is not None:
            restored = self.checkpoints.restore(self.resumed)
            self.engine.ctx.resumed_step = self.resumed.step
            self.start_epoch, self.start_batch = restored.position.epoch, restored.position.batch
            self.acc = _EpochStats.from_state(restored.loop["acc"])
            self.window = _EpochStats.from_state(restored.loop["window"])
            self.elapsed = float(restored.loop["elapsed"])
            self._rng = restored.rng
            self._print(f"arcfw: resuming from {self.resumed.path} (step {self.engine.global_step}, "
                        f"epoch {self.start_epoch}, batch {self.start_batch})")
            for note in restored.notes:
                self._print(f"warning: {note}")

    # ------------------------------------------------------------------ output

    def _print(self, text: str) -> None:
        if not self.quiet:
            tqdm.write(text, file=sys.stderr)

    def _open_outputs(self) -> bool:
        if not self.dist.is_main:
            self.log = NullLog()
            return False
        created = not self.out_dir.exists()
        r = self.resumed
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if r is None:
                for f in RUN_FILES:
                    (self.out_dir / f).unlink(missing_ok=True)
            self.checkpoints.start(r)
            (self.out_dir / "config.yaml").write_text(self.config.dump(), encoding="utf-8")
            # a resumed run drops what was logged after its checkpoint, and the unfinished epoch's summary
            if r is None:
                self.log = MetricsLog(self.out_dir)
            else:
                self.log = MetricsLog(self.out_dir, resume_step=r.step, resume_epoch=self.start_epoch)
        except OSError as exc:
            if created:
                shutil.rmtree(self.out_dir, ignore_errors=True)
            raise ConfigError("--out", [("out", f"cannot write to {self.out_dir}: {exc.strerror or exc}")]) from None
        return created

    # ------------------------------------------------------------------ the loop

    def fit(self) -> list[dict[str, Any]]:
        created = self._open_outputs()
        try:
            with StopSignals(self._on_signal) as self._signals:
                if self._rng is not None:
                    checkpoint.set_rng_state(self._rng)  # last, so that nothing draws between restore and step
                self._run()
        except BaseException:
            self.log.close()
            if created and self.engine.global_step == 0:  # failed before the first step: leave nothing behind
                shutil.rmtree(self.out_dir, ignore_errors=True)
            raise
        finally:
            self.dist.close()
        self.log.close()
        return self.log.summaries

    def _run(self) -> None:
        eng, cfg = self.engine, self.cfg
        max_batches = cfg["max_batches"]
        log_every = cfg["log_every"]
        for epoch in range(self.start_epoch, cfg["epochs"]):
            if max_batches is not None and eng.global_step >= max_batches:
                break
            eng.ctx.epoch = epoch
            start = self.start_batch if epoch == self.start_epoch else 0
            if start == 0:  # a run resumed inside an epoch has had its epoch start already
                eng.call_all("on_epoch_start", epoch=epoch)
                self.acc, self.window, self.elapsed = _EpochStats(), _EpochStats(), 0.0
            acc = self.acc
            total = len(self.loader)
            if max_batches is not None:
                total = min(total, start + max_batches - eng.global_step)
            bar = tqdm(total=total, initial=start, desc=f"Epoch {epoch}", disable=self.quiet, dynamic_ncols=True, file=sys.stderr)
            self._t0 = time.perf_counter() - self.elapsed
            next_batch = start
            for batch_index, batch in enumerate(self.loader.batches(epoch, start), start):
                if max_batches is not None and eng.global_step >= max_batches:
                    break
                metrics = eng.train_step(batch.to(eng.device))
                # averaged over ranks; a signal that reached any rank stops every rank after this step
                metrics, self._stop_signum = self.dist.exchange(metrics, self._signals.signum)
                step = eng.global_step
                norms = eng.last_norms
                prompt_groups = self._prompt_groups(norms)
                qwen_grad = math.sqrt(sum(norms[g] ** 2 for g in prompt_groups))
                # a step that expected no gradient for the prompt model (every prompt from the cache)
                # logs its 0 but stays out of the averages, which describe the steps Qwen learned from
                expected_zero = bool(prompt_groups) and set(prompt_groups) <= eng.ctx.no_grad_groups
                counted = None if expected_zero else qwen_grad
                warnings = eng.health.update(self._loss(metrics), norms, metrics, eng.ctx.no_grad_groups)
                acc.add(metrics, counted)
                self.window.add(metrics, counted)
                for w in warnings:
                    self._print(f"warning: {w}")
                bar.update(1)
                if step % log_every == 0 or warnings:
                    rec = {
                        "kind": "batch",
                        "step": step,
                        "epoch": epoch,
                        "batch": batch_index + 1,
                        "loss": self._loss(metrics),
                        "loss_avg": self.window.mean("loss"),
                        "reward": metrics.get("reward", float("nan")),
                        "qwen_grad": qwen_grad,
                        "mask_ratio": metrics.get("mask_ratio", float("nan")),
                        "cell_acc": metrics.get("cell_acc", float("nan")),
                        "threshold": eng.ctx.schedule.get(THRESHOLD_KEY, float("nan")),
                        **{k: v for k, v in metrics.items() if k not in ("loss",)},
                        "grad_norms": norms,
                        "nonfinite_skipped_total": eng.guard.skipped,
                        "scaler_skipped_total": eng.precision.scaler_skipped,
                    }
                    if warnings:
                        rec["warnings"] = warnings
                    self.log.write(rec)
                    if self.dist.is_main:
                        eng.call_all("log_metrics", record=rec)
                    if step % log_every == 0:
                        self._print(batch_line(rec))
                        self.window = _EpochStats()
                next_batch = batch_index + 1
                self._after_step(epoch, next_batch)
            bar.close()
            if next_batch < len(self.loader):  # max_batches reached inside the epoch: the run can go on from here
                self._save(epoch, next_batch)
            if acc.n == 0:
                continue
            summary = {
                "kind": "epoch",
                "epoch": epoch,
                "step": eng.global_step,
                "batches": acc.n,
                "seconds": round(time.perf_counter() - self._t0, 3),
                "avg_loss": acc.mean("loss"),
                "avg_reward": acc.mean("reward"),
                "avg_qwen_grad": acc.mean("qwen_grad"),
                "avg_mask_ratio": acc.mean("mask_ratio"),
                "acc_improvement": acc.mean("acc_improvement"),
                "cell_acc_first": acc.head_mean("cell_acc"),
                "cell_acc_last": acc.tail_mean("cell_acc"),
                "skipped_steps": eng.guard.skipped + eng.precision.scaler_skipped,
                "warnings": sorted(eng.health.raised),
            }
            for _, extra in eng.call_all("on_epoch_end", epoch=epoch, summary=dict(summary)):
                if extra:
                    summary.update(extra)
            self.log.write_summary(summary)
            if self.dist.is_main:
                eng.call_all("log_metrics", record=summary)
            self._print(epoch_line(summary))
            if next_batch == len(self.loader):
                self._save(epoch + 1, 0)
                self._stop_if_asked()

    # ------------------------------------------------------------------ checkpoints and signals

    def _after_step(self, epoch: int, next_batch: int) -> None:
        """Periodic checkpoint (the epoch end saves its own), and a stop that a signal asked for."""
        every = self.cfg["checkpoint"]["every"]
        if every and self.engine.global_step % every == 0 and next_batch < len(self.loader):
            self._save(epoch, next_batch)
        if self._stop_signum is not None:
            self._save(epoch, next_batch)
            self._stop_if_asked()

    def _save(self, epoch: int, next_batch: int) -> Path | None:
        loop = {"acc": self.acc.state_dict(), "window": self.window.state_dict(), "elapsed": time.perf_counter() - self._t0}
        self.last_checkpoint = self.checkpoints.save(Position(epoch, next_batch), loop)
        return self.last_checkpoint

    def _on_signal(self, signum: int) -> None:
        self._print(
            f"arcfw: {signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
            "(Ctrl-C again aborts at once, without saving)"
        )

    def _stop_if_asked(self) -> None:
        signum = self._stop_signum
        if signum is not None:
            raise Interrupted(
                signum,
                f"{signal.Signals(signum).name}: stopped after step {self.engine.global_step}, "
                + (f"checkpoint saved in {self.last_checkpoint}. Resume with: {self.resume_command()}"
                   if self.last_checkpoint else "no checkpoint written"),
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

    def _prompt_groups(self, norms: dict[str, float]) -> list[str]:
        """The prompt model's parameter groups among ``norms`` (its gradient norm is logged as qwen_grad)."""
        prompt = self.engine.prompt_plugin
        return [g for g in norms if self.engine.group_plugin(g) == prompt]

    @staticmethod
    def _loss(metrics: dict[str, float]) -> float:
        return metrics.get("loss", float("nan"))


class _EpochStats:
    """Running sums for the epoch summary; keeps the first/last 50 cell accuracies."""

    EDGE = 50

    def __init__(self) -> None:
        self.n = 0
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.head: list[float] = []
        self.tail: list[float] = []

    def add(self, metrics: dict[str, float], qwen_grad: float | None) -> None:
        """``qwen_grad`` None: a step without gradient for the prompt model by design (prompt cache)."""
        self.n += 1
        for k in ("loss", "reward", "mask_ratio", "acc_improvement", "cell_acc"):
            v = metrics.get(k)
            if v is not None and math.isfinite(v):
                self.sums[k] = self.sums.get(k, 0.0) + v
                self.counts[k] = self.counts.get(k, 0) + 1
        if qwen_grad is not None:
            self.sums["qwen_grad"] = self.sums.get("qwen_grad", 0.0) + qwen_grad
            self.counts["qwen_grad"] = self.counts.get("qwen_grad", 0) + 1
        ca = metrics.get("cell_acc")
        if ca is not None:
            if len(self.head) < self.EDGE:
                self.head.append(ca)
            self.tail.append(ca)
            if len(self.tail) > self.EDGE:
                self.tail.pop(0)

    def state_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in vars(self).items()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "_EpochStats":
        stats = cls()
        stats.__dict__.update(state)
        return stats

    def mean(self, key: str) -> float:
        return self.sums[key] / self.counts[key] if self.counts.get(key) else float("nan")

    def head_mean(self, key: str) -> float:
        return sum(self.head) / len(self.head) if self.head else float("nan")

    def tail_mean(self, key: str) -> float:
        return sum(self.tail) / len(self.tail) if self.tail else float("nan")


def load_summary(out_dir: Path) -> list[dict[str, Any]]:
    return json.loads((Path(out_dir) / "summary.json").read_text())
