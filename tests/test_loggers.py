"""Loggers: the JSONL log stays the default; TensorBoard is an optional plugin (extra 'tensorboard')."""

from __future__ import annotations

import json
import sys

import pytest

from arcfw.core.errors import MissingExtra
from arcfw.core.training.metrics import BATCH_KEYS
from arcfw.core.training.records import scalars
from arcfw.core.training.trainer import Trainer

TENSORBOARD = {"plugins.extra": [{"name": "tensorboard"}], "max_batches": 3}


def test_records_become_tagged_scalars():
    record = {"kind": "batch", "step": 3, "epoch": 0, "loss": 1.5, "reward": "nan", "grad_norms": {"qwen": 0.5}, "warnings": ["x"], "ok": True}
    out = scalars(record)
    assert out.keys() == {"batch/epoch", "batch/loss", "batch/reward", "batch/grad_norms/qwen"}
    assert out["batch/loss"] == 1.5 and out["batch/grad_norms/qwen"] == 0.5 and out["batch/reward"] != out["batch/reward"]
    assert scalars({"kind": "epoch", "step": 9, "avg_loss": 2}) == {"epoch/avg_loss": 2.0}


def test_jsonl_is_written_without_any_logger_plugin(tiny_config, tmp_path):
    Trainer(tiny_config({"max_batches": 2}), tmp_path, quiet=True).fit()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(set(BATCH_KEYS) <= line.keys() for line in lines)
    assert not (tmp_path / "tensorboard").exists()


def test_missing_tensorboard_names_the_extra(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(MissingExtra, match=r"arcfw\[tensorboard\]"):
        Trainer(tiny_config(TENSORBOARD), tmp_path / "run", quiet=True)


def test_tensorboard_logs_what_the_jsonl_log_holds(tiny_config, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(tiny_config(TENSORBOARD), tmp_path, quiet=True).fit()
    jsonl = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(set(BATCH_KEYS) <= r.keys() for r in jsonl)  # JSONL unchanged beside the plugin
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"batch/{k}" for k in BATCH_KEYS if k != "step"} <= tags
    assert {"epoch/avg_loss", "batch/grad_norms/agent"} <= tags
    logged = {e.step: e.value for e in events.Scalars("batch/loss")}
    assert logged == pytest.approx({r["step"]: r["loss"] for r in jsonl}, rel=1e-6)


def test_tensorboard_shows_each_step_once_after_a_resume_and_after_overwrite(tiny_config, tmp_path):
    """A run killed after logging steps 4-6 past its step-3 checkpoint, then resumed from it, logs
    4-6 again: TensorBoard shows them once, with the resumed run's values.  A fresh run with
    --overwrite in the same folder hides the old run's events entirely."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def loss_events():
        events = EventAccumulator(str(tmp_path / "tensorboard"))
        events.Reload()
        return [(e.step, e.value) for e in events.Scalars("batch/loss")]

    cfg = {**TENSORBOARD, "max_batches": 6, "checkpoint.every": 3}
    Trainer(tiny_config(cfg), tmp_path, quiet=True).fit()
    first = loss_events()
    assert [s for s, _ in first] == [1, 2, 3, 4, 5, 6]
    # a different learning rate after the resume, so that the resumed run's steps 4-6 differ from the first's
    resumed = Trainer(tiny_config({**cfg, "optimizer.lr.agent": 0.05}), tmp_path, quiet=True,
                      resume=tmp_path / "checkpoints" / "step-00000003")
    resumed.fit()
    again = loss_events()
    jsonl = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in again] == [1, 2, 3, 4, 5, 6]  # no step twice
    assert again[:3] == first[:3] and again[3:] != first[3:]
    batches = [r for r in jsonl if r["kind"] == "batch"]
    assert [r["step"] for r in batches] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in again] == pytest.approx([r["loss"] for r in batches], rel=1e-6)

    Trainer(tiny_config({**cfg, "max_batches": 2}), tmp_path, quiet=True, overwrite=True).fit()
    assert [s for s, _ in loss_events()] == [1, 2]
