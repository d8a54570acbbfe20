"""Loggers: the JSONL log stays the default; TensorBoard is an optional plugin (extra 'tensorboard')."""

from __future__ import annotations

import json
import sys

import pytest

from arcfw.core.errors import MissingExtra
from arcfw.core.metrics import BATCH_KEYS
from arcfw.core.trainer import Trainer
from arcfw.plugins.tensorboard_logger import scalars

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
