"""Health warnings: printed once, recorded in metrics.jsonl and summary.json."""

from __future__ import annotations

import json

import pytest

from arcfw.core.engine.health import HealthMonitor
from arcfw.core.training.trainer import Trainer


def test_flat_loss_and_stuck_mask_ratio_are_warned_once(tiny_config, tmp_path, capsys):
    cfg = tiny_config({"plugins.loss": {"name": "faulty_plugins:FlatLoss"}, "health.patience": 0,
                       "health.flat_window": 5, "max_batches": 9, "log_every": 100})
    Trainer(cfg, tmp_path / "run").fit()
    err = capsys.readouterr().err
    assert err.count("warning: flat_loss") == 1 and err.count("warning: mask_ratio_stuck") == 1
    recs = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    warned = [(r["step"], w.split(":")[0]) for r in recs for w in r.get("warnings", [])]
    assert warned == [(5, "flat_loss"), (5, "mask_ratio_stuck")]  # recorded the batch it happened, once
    summary = json.loads((tmp_path / "run/summary.json").read_text())[0]
    assert summary["warnings"] == ["flat_loss", "mask_ratio_stuck"]


def test_no_warning_on_a_healthy_run(tiny_config, tmp_path, capsys):
    Trainer(tiny_config({"max_batches": 6}), tmp_path / "run").fit()
    assert "warning:" not in capsys.readouterr().err
    assert json.loads((tmp_path / "run/summary.json").read_text())[0]["warnings"] == []


def test_zero_qwen_gradient_for_100_batches_and_nan_loss():
    mon = HealthMonitor("qwen", flat_window=1000, flat_tolerance=0.0)
    raised = []
    for i in range(150):
        raised += mon.update(1.0 + i, {"qwen": 0.0}, {}, frozenset())
    assert len(raised) == 1 and raised[0].startswith("zero_grad") and "100 batches" in raised[0]
    assert mon.update(float("nan"), {"qwen": 1.0}, {}, frozenset())[0].startswith("nonfinite_loss")
    assert mon.update(float("inf"), {"qwen": 1.0}, {}, frozenset()) == []  # once per run


def test_cached_steps_do_not_count_as_zero_gradient():
    mon = HealthMonitor("qwen", flat_window=1000, flat_tolerance=0.0)
    raised = []
    for i in range(200):
        raised += mon.update(1.0 + i, {"qwen": 0.0}, {}, frozenset({"qwen"}))
    assert raised == []


def test_steps_with_loss_zero_do_not_count_as_zero_gradient():
    """A loss of exactly 0 (no hard cell) has no gradient to give: not a cut path, and no streak reset."""
    from arcfw.core.engine.health import GradientWatch
    from arcfw.core.errors import TrainingHalted

    watch = GradientWatch({"agent": "agent"}, patience=3)
    for _ in range(50):
        watch.update({"agent": 0.0}, loss=0.0)
    watch.update({"agent": 0.0}, loss=0.5)
    watch.update({"agent": 0.0}, loss=0.0)
    watch.update({"agent": 0.0}, loss=0.5)
    with pytest.raises(TrainingHalted, match="'agent'.*3 consecutive steps"):
        watch.update({"agent": 0.0}, loss=0.5)  # a loss > 0 with zero gradient still counts

    mon = HealthMonitor("qwen", flat_window=20, flat_tolerance=0.0)
    raised = [w for _ in range(150) for w in mon.update(0.0, {"qwen": 0.0}, {"mask_ratio": 0.0}, frozenset())]
    assert [w.split(":")[0] for w in raised] == ["flat_loss"] and "no hard cell" in raised[0]


def test_a_run_that_fits_a_small_generated_folder_is_not_halted(tiny_config, tmp_path):
    """Copy tasks are learnt in a few epochs; then most steps have no hard cell and a loss of 0. The
    gradient watch (patience 5 here) must not read that as a cut gradient path."""
    from arcfw.core.data.generate import generate, write_tasks

    write_tasks(tmp_path / "tasks", generate(["copy"], 3, min_side=3, max_side=4))
    cfg = tiny_config({"data.source": str(tmp_path / "tasks"), "data.max_tasks": None, "epochs": 12, "threads": 1,
                       "health.patience": 5, "plugins.curriculum.schedule": [[0, 0.3]], "log_every": 1})
    Trainer(cfg, tmp_path / "run", quiet=True).fit()  # raised TrainingHalted before the fix
    recs = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 12 * 9  # every epoch ran
    streak = longest = 0
    for r in recs:
        streak = streak + 1 if r["loss"] == 0.0 else 0
        longest = max(longest, streak)
    assert longest >= 5  # the case really has more steps in a row with no hard cell than the patience
    assert recs[-1]["cell_acc"] == 1.0
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    # Qwen's gradient is averaged over the steps that had a loss, not diluted by the zeros ('nan': none had)
    grads = [e["avg_qwen_grad"] for e in summary]
    assert grads[0] > 0 and all(g == "nan" or g > 0 for g in grads)
