"""Issue 13, item 3: gradient paths every step, per group and per parameter (core/engine/paths.py), and the
zero-gradient window of the gradient watch (core/engine/health.py).  The faulty plugins that trip them are
in tests/test_catalogue.py; these are the rules' edges."""

from __future__ import annotations

import json

from arcfw.core.engine.health import GradientWatch
from arcfw.core.training.trainer import Trainer


def test_a_group_zero_on_and_off_is_warned_once_at_the_20th_zero_step():
    watch = GradientWatch({"agent": "my_agent"}, patience=100)
    raised = []
    for i in range(200):
        raised += [(i, key) for key, _ in watch.update({"agent": 0.0 if i % 2 else 1.0}, loss=1.0)]
    assert raised == [(39, "zero_grad_often_agent")]  # the 20th zero step of 40, once


def test_zero_steps_that_do_not_count_and_one_long_run_are_not_warned():
    watch = GradientWatch({"qwen": "qwen"}, patience=0)
    for i in range(100):  # exempt (cached prompt) and loss-0 steps are not counted
        assert watch.update({"qwen": 0.0}, frozenset({"qwen"}) if i % 2 else frozenset(), loss=0.0 if i % 2 == 0 else 1.0) == []
    assert sum(watch.recent["qwen"]) == 0
    for _ in range(150):  # always zero: one run, the patience check's business (here off), not "on and off"
        assert watch.update({"qwen": 0.0}, loss=1.0) == []


def test_the_window_survives_a_state_round_trip():
    a = GradientWatch({"agent": "p"}, patience=100)
    for i in range(38):
        a.update({"agent": 0.0 if i % 2 else 1.0}, loss=1.0)
    b = GradientWatch({"agent": "p"}, patience=100)
    b.load_state_dict(a.state_dict())
    assert b.update({"agent": 1.0}, loss=1.0) == []
    assert [k for k, _ in b.update({"agent": 0.0}, loss=1.0)] == ["zero_grad_often_agent"]  # 20th zero step


def test_cached_prompt_steps_are_declared_gradient_free_not_errors(make_engine, batches):
    eng = make_engine({"plugins.prompt.cache_every": 10})
    b = batches(1)[0]
    for _ in range(4):  # the same pair: its prompt comes from the cache after the first step, without gradient
        eng.train_step(b)
    assert eng.ctx.no_grad_groups == {"qwen"}
    assert eng.health.update(1.0, eng.last_norms, {}, frozenset(eng.ctx.no_grad_groups)) == []


def test_unused_after_zero_turns_the_parameter_report_off(make_engine, batches):
    eng = make_engine({"plugins.predictor.name": "faulty_plugins:UnusedModulePredictor", "health.unused_after": 0})
    for b in batches(4):
        eng.train_step(b)
    assert eng.health.update(1.0, eng.last_norms, {}, frozenset()) == []
    eng = make_engine({"plugins.predictor.name": "faulty_plugins:UnusedModulePredictor", "health.unused_after": 2})
    for b in batches(2):
        eng.train_step(b)
    assert [w.split(":")[0] for w in eng.health.update(1.0, eng.last_norms, {}, frozenset())] == ["unused_params_agent"]


def test_a_run_prints_and_records_the_unused_parameters_once(tiny_config, tmp_path, capsys):
    cfg = tiny_config({"plugins.predictor.name": "faulty_plugins:UnusedModulePredictor", "max_batches": 5, "log_every": 100})
    Trainer(cfg, tmp_path / "run").fit()
    err = capsys.readouterr().err
    assert err.count("warning: unused_params_agent: 4 of the") == 1 and "spare.0 (weight, bias)" in err
    recs = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], w.split(":")[0]) for r in recs for w in r.get("warnings", [])] == [(3, "unused_params_agent")]
    assert "unused_params_agent" in json.loads((tmp_path / "run/summary.json").read_text())[0]["warnings"]
