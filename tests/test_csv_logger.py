"""The CSV logger plugin (`csv` extra) and the end-of-run hook `on_train_end` it closes its files in."""

from __future__ import annotations

import csv
import json

import pytest

from arcfw.core.engine.hookspecs import hookimpl
from arcfw.core.engine.plugin import Plugin
from arcfw.core.training.trainer import Trainer
from arcfw.plugins.csv_logger import flatten

CSV = {"plugins.extra": [{"name": "csv"}], "max_batches": 3}
ENDS: list[str] = []


class EndRecorder(Plugin):
    name = "end_recorder"
    role = "extra"

    @hookimpl
    def on_train_end(self, status, ctx):
        ENDS.append(status)


def rows(path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def jsonl(path) -> list[dict]:
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def test_flatten_nested_values():
    assert flatten({"kind": "batch", "step": 1, "grad_norms": {"qwen": 0.5, "agent": 1.0}}) == {
        "step": 1, "grad_norms/qwen": 0.5, "grad_norms/agent": 1.0}


def test_csv_holds_what_the_jsonl_log_holds_and_is_closed_at_the_end(tiny_config, tmp_path):
    ENDS.clear()
    cfg = tiny_config({**CSV, "plugins.extra": [{"name": "csv"}, {"name": "test_csv_logger:EndRecorder"}]})
    trainer = Trainer(cfg, tmp_path, quiet=True)
    trainer.fit()
    assert ENDS == ["finished"]
    assert trainer.engine.plugins["csv"].tables == {}  # on_train_end closed the files
    logged, records = rows(tmp_path / "metrics.csv"), jsonl(tmp_path)
    assert [int(r["step"]) for r in logged] == [r["step"] for r in records] == [1, 2, 3]
    for row, rec in zip(logged, records):
        assert float(row["loss"]) == pytest.approx(rec["loss"], rel=1e-12)
        assert float(row["grad_norms/agent"]) == pytest.approx(rec["grad_norms"]["agent"], rel=1e-12)
    epochs = rows(tmp_path / "epochs.csv")
    assert len(epochs) == 1 and epochs[0]["epoch"] == "0" and float(epochs[0]["avg_loss"]) > 0


def test_csv_after_a_resume_holds_each_step_once(tiny_config, tmp_path):
    Trainer(tiny_config({**CSV, "max_batches": 2}), tmp_path, quiet=True).fit()
    # rows a stopped run logged after its checkpoint (step 2) are dropped when it resumes
    with (tmp_path / "metrics.csv").open("a", newline="") as f:
        f.write("3" + "," * (len(rows(tmp_path / "metrics.csv")[0]) - 1) + "\n")
    Trainer(tiny_config({**CSV, "max_batches": 4}), tmp_path, quiet=True, resume=tmp_path).fit()
    assert [int(r["step"]) for r in rows(tmp_path / "metrics.csv")] == [1, 2, 3, 4]
    assert [r["step"] for r in jsonl(tmp_path)] == [1, 2, 3, 4]
    assert float(rows(tmp_path / "metrics.csv")[2]["loss"]) == pytest.approx(jsonl(tmp_path)[2]["loss"], rel=1e-12)
