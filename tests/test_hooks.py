"""The step order: every hook call of a few steps is recorded and the exact sequence asserted
(after Lightning's test_hooks.py), in every precision mode."""

from __future__ import annotations

import pytest

from arcfw.core.engine.steps import STEP_ORDER, order_text

ONE_STEP = [
    ("stage:hard_cell_threshold", None),
    ("hard_cell_threshold", "curriculum"),  # first non-None wins: the recorder's is not reached
    ("stage:generate_prompt", None),
    ("generate_prompt", "qwen"),
    ("stage:refine", None),
    ("refine", "rl_policy"),  # refine implementations are chained in role order
    ("refine", "faulty_plugins:Recorder"),
    ("stage:predict", None),
    ("predict", "grid_transformer"),
    ("stage:compute_loss", None),
    ("compute_loss", "efe_loss"),  # all loss implementations are called and summed
    ("compute_loss", "faulty_plugins:Recorder"),
    ("stage:backward", None),
    ("stage:optimizer_step", None),
    ("stage:post_step_update", None),
    ("post_step_update", "qwen"),  # reports the prompt cache's use (prompt_cached, prompt_staleness)
    ("post_step_update", "rl_policy"),
    ("post_step_update", "grid_transformer"),  # the predictor's size head learns from detached values
    ("post_step_update", "faulty_plugins:Recorder"),
]


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "fp16-mixed"])
def test_exact_hook_sequence_of_three_steps(make_engine, batches, precision):
    eng = make_engine({"precision": precision, "plugins.extra": [{"name": "faulty_plugins:Recorder"}]})
    events = []
    eng.add_listener(lambda e, p: events.append((e, p)))
    for b in batches(3):
        eng.train_step(b)
    assert events == ONE_STEP * 3


def test_step_order_is_the_documented_one():
    assert [s.value for s in STEP_ORDER] == [
        "hard_cell_threshold", "generate_prompt", "refine", "predict", "compute_loss",
        "backward", "optimizer_step", "post_step_update",
    ]
    assert order_text().startswith("hard_cell_threshold -> generate_prompt -> refine -> predict")
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "generate_prompt -> refine -> predict -> compute_loss -> backward -> optimizer_step -> post_step_update" in readme


def test_loop_hooks_around_the_steps(tiny_config, tmp_path):
    from faulty_plugins import Recorder

    from arcfw.core.training.trainer import Trainer

    cfg = tiny_config({"plugins.extra": [{"name": "faulty_plugins:Recorder"}], "max_batches": 2, "log_every": 1})
    Trainer(cfg, tmp_path / "run", quiet=True).fit()
    ev = Recorder.events
    assert ev[0] == "configure"
    loop = [e for e in ev if e in ("on_epoch_start", "post_step_update", "log_metrics:batch", "on_epoch_end", "log_metrics:epoch")]
    assert loop == [
        "on_epoch_start",
        "post_step_update", "log_metrics:batch",
        "post_step_update", "log_metrics:batch",
        "on_epoch_end", "log_metrics:epoch",
    ]
