"""Metrics belong to the plugins that make them: core shows what is declared, and nothing else."""

from __future__ import annotations

import json
import math

import pytest

from arcfw.core.engine.context import Metric
from arcfw.core.errors import PluginError
from arcfw.core.training.logbook import EpochStats
from arcfw.core.training.metrics import batch_line, read_metric_specs
from arcfw.core.training.trainer import Trainer

OTHER_PROMPT = {"plugins.prompt": {"name": "helper_plugins:HistogramPrompt"}, "optimizer.lr": {}, "max_batches": 3}


def test_default_console_line_reads_as_before(tiny_config, tmp_path, capsys):
    Trainer(tiny_config({"max_batches": 2}), tmp_path / "run").fit()
    lines = [x for x in capsys.readouterr().err.replace("\r", "\n").splitlines() if x.startswith("[Batch")]
    assert lines and all(
        x.split(" | ")[0].startswith("[Batch ") and [p.split(":")[0] for p in x.split("] ", 1)[1].split(" | ")]
        == ["Reward", "Loss", "Qwen_grad", "Mask_ratio", "Cell_acc"] for x in lines
    ), lines


def test_another_prompt_plugin_shows_its_own_metrics(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    summaries = Trainer(tiny_config(OTHER_PROMPT), run).fit()
    err = capsys.readouterr().err.replace("\r", "\n")
    line = next(x for x in err.splitlines() if x.startswith("[Batch 1]"))
    assert "Hist_grad: " in line and "Prompt_norm: " in line and "Qwen_grad" not in err
    assert line.index("Loss:") < line.index("Hist_grad:") < line.index("Prompt_norm:") < line.index("Mask_ratio:")
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["hist_grad"] > 0 and "qwen_grad" not in r for r in records)
    assert records[0]["hist_grad"] == pytest.approx(records[0]["grad_norms"]["hist_prompt"])  # the engine's group norm
    s = summaries[0]
    assert s["avg_hist_grad"] == pytest.approx(sum(r["hist_grad"] for r in records) / 3)
    assert s["prompt_norm_last"] == records[-1]["prompt_norm"] and "avg_qwen_grad" not in s
    assert [m.plot for m in read_metric_specs(run) if m.plot] == ["loss", "histogram prompt gradient", "reward", "mask ratio", "cell accuracy"]


def test_epoch_aggregates_follow_the_declaration():
    declared = [Metric("a"), Metric("b", epoch="edges"), Metric("c", epoch="sum"), Metric("d", epoch="last"),
                Metric("g", grad_norm_of=("grp",)), Metric("n", epoch="none")]
    stats = EpochStats()
    for i in range(60):
        stats.add({"a": i, "b": i, "c": 1.0, "d": i, "g": 0.0 if i % 2 else 2.0, "n": 1.0},
                  declared, exempt=frozenset({"grp"}) if i % 2 else frozenset())
    out = stats.summary(declared)
    assert out == {"avg_a": 29.5, "b_first": sum(range(50)) / 50, "b_last": sum(range(10, 60)) / 50, "c_sum": 60.0,
                   "d_last": 59, "avg_g": 2.0}  # steps exempt for the group's gradient stay out of its mean
    assert batch_line({"step": 3, "a": 1.0}, [Metric("a", console=2), Metric("z", console=1, fmt=".2f")]) == "[Batch 3] Z: nan | A: 1.0000"
    with pytest.raises(ValueError, match="epoch must be one of"):
        Metric("x", epoch="median")
    assert math.isnan(EpochStats().summary([Metric("a")])["avg_a"])


def test_a_metric_declared_twice_is_refused(make_engine):
    with pytest.raises(PluginError, match="metric 'loss' is declared twice: by the engine and by plugin 'faulty_plugins:FlatLossDeclaringLoss'"):
        make_engine({"plugins.loss": {"name": "faulty_plugins:FlatLossDeclaringLoss"}})


def test_a_gradient_norm_of_an_unknown_group_is_refused(make_engine):
    with pytest.raises(PluginError, match=r"metric 'g' of plugin 'faulty_plugins:GradOfNoGroup': grad_norm_of names no parameter group \['nope'\]"):
        make_engine({"plugins.extra": [{"name": "faulty_plugins:GradOfNoGroup"}]})


def test_console_line_shows_means_since_the_last_line(tiny_config, tmp_path, capsys):
    """The RL reward is computed on every 2nd step: a line every 3 steps shows the mean of the steps
    that computed it (never the nan of a step that did not).  The same run logged at every step
    (same seed, same steps) gives each step's own values."""
    cfg = {"max_batches": 6, "plugins.refine.update_every": 2}
    Trainer(tiny_config({**cfg, "log_every": 1}), tmp_path / "each").fit()
    records = [json.loads(x) for x in (tmp_path / "each" / "metrics.jsonl").read_text().splitlines()]
    capsys.readouterr()
    Trainer(tiny_config({**cfg, "log_every": 3}), tmp_path / "run").fit()
    lines = [x for x in capsys.readouterr().err.replace("\r", "\n").splitlines() if x.startswith("[Batch")]
    assert [x.split("]")[0] for x in lines] == ["[Batch 3", "[Batch 6"]
    def computed(r):  # the record of a step without a reward holds NaN (written as a string)
        return isinstance(r.get("reward"), float) and math.isfinite(r["reward"])

    assert [r["step"] for r in records if computed(r)] == [1, 3, 5]  # steps counted from 1
    for line, last in zip(lines, (3, 6)):
        window = [r for r in records if last - 3 < r["step"] <= last]
        rewards = [r["reward"] for r in window if computed(r)]
        assert float(line.split("Reward: ")[1].split(" |")[0]) == pytest.approx(sum(rewards) / len(rewards), abs=1e-4)
        assert float(line.split("Loss: ")[1].split(" |")[0]) == pytest.approx(sum(r["loss"] for r in window) / 3, abs=1e-4)
