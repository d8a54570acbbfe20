"""Health warnings: printed once, recorded in metrics.jsonl and summary.json."""

from __future__ import annotations

import json

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
