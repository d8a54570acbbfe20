"""``arcfw bench CONFIG``: time the steps of a config and show where the time goes.

Runs ``warmup`` untimed and ``steps`` timed training steps of the config on its
own data (the batches a run would see, in the same order) and reports:

- ms/step: median and spread (10th and 90th percentile) of ``Engine.train_step``;
  building the batch (and augmenting it) is the loader's work and is not counted;
- pairs/s: demonstration pairs trained per second over all timed steps (from the
  total time, not the median: with a prompt cache, steps are fast or slow);
- peak memory: the process's peak resident memory during the timed steps (CPU),
  or the peak of ``torch.cuda.max_memory_allocated`` (CUDA);
- the share of the step spent in each stage of :data:`arcfw.core.engine.steps.STEP_ORDER`
  (hooks and the engine's own backward / optimizer step), timed through the
  engine's ``stage:<name>`` listener events.

On CUDA every step and stage boundary is synchronised, so the figures are
device time, at the price of some overlap a real run would have.
"""

from __future__ import annotations

import json
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from arcfw.core.config import RunConfig
from arcfw.core.data.batch import Batch
from arcfw.core.data.tasks import ExampleLoader, load_tasks, make_examples
from arcfw.core.engine.engine import Engine
from arcfw.core.engine.steps import STEP_ORDER
from arcfw.core.errors import ConfigError
from arcfw.core.io import write_atomic

STAGE_EVENT = "stage:"


@dataclass
class BenchResult:
    """What ``arcfw bench`` prints, and writes with ``--json``."""

    config: str
    device: str
    threads: int  # torch.get_num_threads() while it ran
    batch_size: int
    warmup: int
    steps: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    pairs_per_s: float
    steps_per_s: float
    peak_memory_mb: float
    peak_memory_kind: str  # "process RSS" or "CUDA allocated"
    #: stage -> mean ms per step; "other" is the engine's time between stages
    stage_ms: dict[str, float] = field(default_factory=dict)
    #: stage -> share of the timed step time (sums to 1)
    stage_share: dict[str, float] = field(default_factory=dict)
    #: mean over the timed steps of every metric the steps returned (loss, prompt_cached, ...)
    metrics_mean: dict[str, float] = field(default_factory=dict)
    step_ms: list[float] = field(default_factory=list)

    def table(self) -> str:
        """The result as a few aligned lines of text."""
        lines = [
            f"{self.config}  ({self.device}, {self.threads} CPU thread{'s' if self.threads != 1 else ''}, batch size {self.batch_size}, "
            f"{self.warmup} warm-up + {self.steps} timed steps)",
            f"  ms/step    median {self.median_ms:.2f}  (p10 {self.p10_ms:.2f}, p90 {self.p90_ms:.2f})",
            f"  pairs/s    {self.pairs_per_s:.1f}  ({self.steps_per_s:.1f} steps/s)",
            f"  peak mem   {self.peak_memory_mb:.0f} MB ({self.peak_memory_kind})",
            f"  {'stage':<20} {'share':>6}  {'ms/step':>8}",
        ]
        for stage, share in self.stage_share.items():
            lines.append(f"  {stage:<20} {100 * share:5.1f}%  {self.stage_ms[stage]:8.2f}")
        return "\n".join(lines)

    def write_json(self, path: Path) -> None:
        """Write atomically: a half-written file is never left behind."""
        write_atomic(path, json.dumps(asdict(self), indent=2) + "\n")


class PeakMemory:
    """Peak memory over a stretch of code: process RSS on CPU (Linux: reset through
    ``/proc/self/clear_refs``; elsewhere the peak since the process started), CUDA
    allocator peak on CUDA."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.kind = "CUDA allocated" if self.cuda else "process RSS"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # not Linux: ru_maxrss is the peak since the process started

    def peak_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB elsewhere


class StageTimer:
    """Engine listener that adds up wall time per stage of each step."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else None
        self.totals: dict[str, float] = {s.value: 0.0 for s in STEP_ORDER}
        self._stage: str | None = None
        self._since = 0.0

    def __call__(self, event: str, plugin: str | None) -> None:
        if event.startswith(STAGE_EVENT):
            self._switch(event[len(STAGE_EVENT):])

    def _switch(self, stage: str | None) -> None:
        if self.sync is not None:
            self.sync()
        now = time.perf_counter()
        if self._stage is not None:
            self.totals[self._stage] += now - self._since
        self._stage, self._since = stage, now

    def end_step(self) -> None:
        self._switch(None)

    def reset(self) -> None:
        self.totals = dict.fromkeys(self.totals, 0.0)


def _batches(cfg: RunConfig, engine: Engine) -> Iterator[Batch]:
    """The config's batches in run order (augmented if a plugin augments), epoch after epoch."""
    d = cfg["data"]
    tasks = load_tasks(d["source"], version=d["version"], split=d["split"], max_tasks=d["max_tasks"])
    augment = engine.augment_example if engine.implements("augment_example") else None
    loader = ExampleLoader(
        make_examples(tasks), batch_size=cfg["batch_size"], shuffle=d["shuffle"], seed=cfg["seed"], transform=augment
    )
    epoch = 0
    while True:
        yield from loader.batches(epoch)
        epoch += 1


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def run_bench(cfg: RunConfig, *, warmup: int = 5, steps: int = 20) -> BenchResult:
    """Build the engine of ``cfg``, run ``warmup`` + ``steps`` steps, and measure the timed ones."""
    if warmup < 0 or steps < 1:
        raise ConfigError("bench", [("steps", f"need warmup >= 0 and steps >= 1, got warmup={warmup}, steps={steps}")])
    engine = Engine.from_config(cfg)
    batches = _batches(cfg, engine)
    device = engine.device
    sync: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        engine.train_step(next(batches).to(device))
    timer = StageTimer(device)
    engine.add_listener(timer)
    memory = PeakMemory(device)
    memory.reset()
    times: list[float] = []
    metric_sums: dict[str, float] = {}
    metric_counts: dict[str, int] = {}
    pairs = 0
    for _ in range(steps):
        batch = next(batches).to(device)
        sync()
        t0 = time.perf_counter()
        metrics = engine.train_step(batch)
        timer.end_step()
        times.append(time.perf_counter() - t0)
        pairs += batch.size
        for k, v in metrics.items():
            if math.isfinite(v):
                metric_sums[k] = metric_sums.get(k, 0.0) + v
                metric_counts[k] = metric_counts.get(k, 0) + 1
    total = sum(times)
    stage_ms = {k: 1e3 * v / steps for k, v in timer.totals.items()}
    stage_ms["other"] = max(0.0, 1e3 * total / steps - sum(stage_ms.values()))
    ms = [1e3 * t for t in times]
    return BenchResult(
        config=cfg.source,
        device=str(device),
        threads=torch.get_num_threads(),
        batch_size=cfg["batch_size"],
        warmup=warmup,
        steps=steps,
        median_ms=statistics.median(ms),
        p10_ms=_percentile(ms, 0.1),
        p90_ms=_percentile(ms, 0.9),
        pairs_per_s=pairs / total,
        steps_per_s=steps / total,
        peak_memory_mb=memory.peak_mb(),
        peak_memory_kind=memory.kind,
        stage_ms=stage_ms,
        stage_share={k: v / (1e3 * total / steps) for k, v in stage_ms.items()},
        metrics_mean={k: metric_sums[k] / metric_counts[k] for k in sorted(metric_sums)},
        step_ms=ms,
    )


def check_json_target(path: Path | None) -> None:
    """Refuse a ``--json`` target that cannot be written, before anything runs."""
    if path is None:
        return
    if path.is_dir():
        raise ConfigError("--json", [("", f"is a folder, not a file: {path}")])
    if not path.parent.is_dir():
        raise ConfigError("--json", [("", f"folder does not exist: {path.parent}")])
