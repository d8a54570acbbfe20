"""The training loop around the engine: data, epochs, progress bar, logs, summaries."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from arcfw.core.config import RunConfig
from arcfw.core.data import ExampleLoader, load_tasks, make_examples
from arcfw.core.engine import Engine
from arcfw.core.errors import ConfigError
from arcfw.core.metrics import MetricsLog, batch_line, epoch_line

RUN_FILES = ("metrics.jsonl", "summary.json", "config.yaml")


def check_out_dir(out: Path, overwrite: bool, files: tuple[str, ...] = RUN_FILES, what: str = "a run") -> None:
    """Refuse an output folder that is a file or already holds ``what`` (one of ``files``) unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", [("out", f"output path exists and is not a folder: {out}")])
    if out.is_dir() and any((out / f).exists() for f in files) and not overwrite:
        raise ConfigError(
            "--out", [("out", f"{out} already holds {what}; pass --overwrite to replace it or use another --out")]
        )


class Trainer:
    """Loads the data, builds the :class:`Engine`, and runs epochs with logging."""

    def __init__(self, config: RunConfig, out_dir: Path | str, *, quiet: bool = False, overwrite: bool = False):
        self.config = config
        self.cfg = config.data
        self.out_dir = Path(out_dir)
        self.quiet = quiet
        check_out_dir(self.out_dir, overwrite)
        d = self.cfg["data"]
        # Everything that can fail on bad input happens before the output folder exists.
        self.tasks = load_tasks(d["source"], version=d["version"], split=d["split"], max_tasks=d["max_tasks"])
        self.examples = make_examples(self.tasks)
        self.engine = Engine.from_config(config, out_dir=self.out_dir)
        augment = self.engine.augment_example if self.engine.implements("augment_example") else None
        self.loader = ExampleLoader(
            self.examples, batch_size=self.cfg["batch_size"], shuffle=d["shuffle"], seed=self.cfg["seed"], transform=augment
        )
        self.start_epoch = 0
        self.start_batch = 0

    # ------------------------------------------------------------------ output

    def _print(self, text: str) -> None:
        if not self.quiet:
            tqdm.write(text, file=sys.stderr)

    def _open_outputs(self) -> bool:
        created = not self.out_dir.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for f in RUN_FILES:
            (self.out_dir / f).unlink(missing_ok=True)
        (self.out_dir / "config.yaml").write_text(self.config.dump(), encoding="utf-8")
        self.log = MetricsLog(self.out_dir)
        return created

    # ------------------------------------------------------------------ the loop

    def fit(self) -> list[dict[str, Any]]:
        created = self._open_outputs()
        try:
            self._run()
        except BaseException:
            self.log.close()
            if created and self.engine.global_step == 0:  # failed before the first step: leave nothing behind
                shutil.rmtree(self.out_dir, ignore_errors=True)
            raise
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
            eng.call_all("on_epoch_start", epoch=epoch)
            start = self.start_batch if epoch == self.start_epoch else 0
            total = len(self.loader)
            if max_batches is not None:
                total = min(total, start + max_batches - eng.global_step)
            acc = _EpochStats()
            window = _EpochStats()
            bar = tqdm(total=total, initial=start, desc=f"Epoch {epoch}", disable=self.quiet, dynamic_ncols=True, file=sys.stderr)
            t0 = time.perf_counter()
            for batch_index, batch in enumerate(self.loader.batches(epoch, start), start):
                if max_batches is not None and eng.global_step >= max_batches:
                    break
                eng.ctx.batch_index = batch_index
                metrics = eng.train_step(batch.to(eng.device))
                step = eng.global_step
                norms = eng.last_norms
                qwen_grad = self._qwen_grad(norms)
                warnings = eng.health.update(self._loss(metrics), norms, metrics, eng.ctx.no_grad_groups)
                acc.add(metrics, qwen_grad)
                window.add(metrics, qwen_grad)
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
                        "loss_avg": window.mean("loss"),
                        "reward": metrics.get("reward", float("nan")),
                        "qwen_grad": qwen_grad,
                        "mask_ratio": metrics.get("mask_ratio", float("nan")),
                        "cell_acc": metrics.get("cell_acc", float("nan")),
                        "threshold": eng.ctx.threshold,
                        **{k: v for k, v in metrics.items() if k not in ("loss",)},
                        "grad_norms": norms,
                        "nonfinite_skipped_total": eng.guard.skipped,
                        "scaler_skipped_total": eng.precision.scaler_skipped,
                    }
                    if warnings:
                        rec["warnings"] = warnings
                    self.log.write(rec)
                    eng.call_all("log_metrics", record=rec)
                    if step % log_every == 0:
                        self._print(batch_line(rec))
                        window = _EpochStats()
            bar.close()
            if acc.n == 0:
                continue
            summary = {
                "kind": "epoch",
                "epoch": epoch,
                "step": eng.global_step,
                "batches": acc.n,
                "seconds": round(time.perf_counter() - t0, 3),
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
            eng.call_all("log_metrics", record=summary)
            self._print(epoch_line(summary))

    def _qwen_grad(self, norms: dict[str, float]) -> float:
        prompt = self.engine.prompt_plugin
        vals = [v for g, v in norms.items() if self.engine.group_plugin(g) == prompt]
        return math.sqrt(sum(v * v for v in vals)) if vals else 0.0

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

    def add(self, metrics: dict[str, float], qwen_grad: float) -> None:
        self.n += 1
        for k in ("loss", "reward", "mask_ratio", "acc_improvement", "cell_acc"):
            v = metrics.get(k)
            if v is not None and math.isfinite(v):
                self.sums[k] = self.sums.get(k, 0.0) + v
                self.counts[k] = self.counts.get(k, 0) + 1
        self.sums["qwen_grad"] = self.sums.get("qwen_grad", 0.0) + qwen_grad
        self.counts["qwen_grad"] = self.counts.get("qwen_grad", 0) + 1
        ca = metrics.get("cell_acc")
        if ca is not None:
            if len(self.head) < self.EDGE:
                self.head.append(ca)
            self.tail.append(ca)
            if len(self.tail) > self.EDGE:
                self.tail.pop(0)

    def mean(self, key: str) -> float:
        return self.sums[key] / self.counts[key] if self.counts.get(key) else float("nan")

    def head_mean(self, key: str) -> float:
        return sum(self.head) / len(self.head) if self.head else float("nan")

    def tail_mean(self, key: str) -> float:
        return sum(self.tail) / len(self.tail) if self.tail else float("nan")


def load_summary(out_dir: Path) -> list[dict[str, Any]]:
    return json.loads((Path(out_dir) / "summary.json").read_text())
