"""It must learn: a short run of the default pipeline on a handful of real ARC-AGI-2 tasks."""

from __future__ import annotations

import json

from arcfw.core.training.trainer import Trainer


def mean(xs):
    return sum(xs) / len(xs)


def test_default_pipeline_learns_on_a_handful_of_tasks(tiny_config, tmp_path):
    # constant threshold, so a falling mask ratio means cells got easier, not a curriculum switch
    cfg = tiny_config({"data.max_tasks": 4, "epochs": 20, "max_batches": 120, "log_every": 1,
                       "plugins.curriculum.schedule": [[0, 0.6]]})
    Trainer(cfg, tmp_path / "run", quiet=True).fit()
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 120
    # Qwen learns on every batch that has a loss at all (a batch with no hard cell has loss 0) and
    # whose prompt was computed this step (a prompt reused from the cache carries no gradient)
    fresh = [r for r in recs if r["mask_ratio"] > 0 and r["prompt_cached"] == 0]
    assert len(fresh) > 60 and all(r["qwen_grad"] > 0 for r in fresh)
    loss = [r["loss"] for r in recs]
    mask = [r["mask_ratio"] for r in recs]
    acc = [r["cell_acc"] for r in recs]
    assert mean(loss[-30:]) < 0.8 * mean(loss[:30]), (mean(loss[:30]), mean(loss[-30:]))
    assert mean(mask[-30:]) < mean(mask[:30]), (mean(mask[:30]), mean(mask[-30:]))
    assert mean(acc[-30:]) > mean(acc[:30])
