"""arcfw eval --ttt: per-task training on the demonstrations, restored state, determinism, unseen
test outputs, bad input, resume after SIGTERM, the config section; the prompt ablation of arcfw eval."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import REPO, TINY, train_tiny_run

from arcfw.core.commands.cli import main
from arcfw.core.commands.evaluate import score, swap_demonstrations
from arcfw.core.commands.ttt import (
    Settings,
    Snapshot,
    build_engine,
    result_path,
    solve_task,
    task_views,
    training_examples,
)
from arcfw.core.config import load_config
from arcfw.core.data.batch import Pair, Task
from arcfw.core.data.tasks import load_tasks
from arcfw.core.engine.engine import Engine
from arcfw.core.errors import ConfigError

TTT = {"ttt.steps": 2, "ttt.views": 2, "ttt.batch_size": 4}
SETS = [a for k, v in {**TINY, **TTT}.items() for a in ("--set", f"{k}={v}")]


def g(rows) -> np.ndarray:
    return np.array(rows, dtype=np.int64)


def flip_task(task_id: str, seed: int, demos: int = 3, tests: int = 1) -> dict:
    """A small task in ARC JSON: 3x3 grids, output = input flipped left-right."""
    rng = np.random.default_rng(seed)
    pair = lambda: (lambda x: {"input": x.tolist(), "output": x[:, ::-1].tolist()})(rng.integers(0, 4, size=(3, 3)))  # noqa: E731
    return {"train": [pair() for _ in range(demos)], "test": [pair() for _ in range(tests)]}


def write_tasks(folder: Path, n: int = 3, **kw) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"flip{i}.json").write_text(json.dumps(flip_task(f"flip{i}", i, **kw)))
    return folder


def config(**extra):
    return load_config(REPO / "configs" / "default.yaml", {**TINY, **TTT, **extra})


def predictor(engine: Engine):
    """The plugin in the predictor role (the default config's: grid_transformer)."""
    return engine.plugins[next(n for n, r in engine.roles.items() if r == "predictor")]


def state(engine: Engine) -> list[torch.Tensor]:
    """Every module parameter, the RL policy (weights, log_std, optimizer moments) and the size head."""
    out = [p.detach().clone() for g in engine.groups for m in g.modules for p in m.parameters()]
    rl = engine.plugins["rl_policy"]
    out += [p.detach().clone() for p in rl.params] + [p.detach().clone() for p in predictor(engine).size_head.parameters()]
    out += [v.clone() for s in rl.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return out


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return load_tasks(str(write_tasks(tmp_path_factory.mktemp("tasks"))))


def solve(engine, snapshot, task, seed=0):
    return solve_task(engine, snapshot, task, Settings.from_config(engine.config), seed=seed, predict_batch=4)


# --------------------------------------------------------------------------- one task


def test_leave_one_out_examples_of_every_view_come_from_the_demonstrations_only(tasks):
    t = tasks[0]
    views = task_views(t, Settings(views=3), seed=0)
    assert views[0].k == 0 and views[0].colours == tuple(range(10)) and len({v.k for v in views}) == 3
    assert all(v.colours[0] == 0 for v in views)
    pool = training_examples(t, views)
    assert len(pool) == 3 * len(t.train) and len({e.key for e in pool}) == len(pool)  # the prompt cache tells views apart
    assert all(e.pair_index >= len(t.train) for e in pool)  # and never takes a prompt cached by a training run
    first = pool[: len(t.train)]  # view 0: the task itself
    for i, ex in enumerate(first):
        assert np.array_equal(ex.query.output, t.train[i].output)
        assert [np.array_equal(d.input, p.input) for d, p in zip(ex.demos, t.train[:i] + t.train[i + 1 :])] == [True] * 2
    t1 = views[1]  # view 1: one transform on every grid
    assert all(np.array_equal(ex.query.input, t1.apply(p.input)) and np.array_equal(ex.query.output, t1.apply(p.output))
               for ex, p in zip(pool[len(t.train) : 2 * len(t.train)], t.train))
    assert len(task_views(t, Settings(views=5, augment=False), 0)) == 1


def test_every_task_starts_from_the_same_state_and_the_order_does_not_matter(tasks):
    eng = build_engine(config())
    snap = Snapshot(eng)
    before = state(eng)
    a_first = solve(eng, snap, tasks[0])
    b_after_a = solve(eng, snap, tasks[1])
    assert eng.global_step == 2 and a_first.steps == 2
    moved = state(eng)
    assert any(not torch.equal(x, y) for x, y in zip(before, moved))  # training changed the weights
    snap.restore(eng)
    assert all(torch.equal(x, y) for x, y in zip(before, state(eng)))  # weights, RL policy and its optimizer restored
    assert eng.global_step == 0 and eng.guard.skipped == 0 and not eng.health.raised
    fresh = build_engine(config())
    b_alone = solve(fresh, Snapshot(fresh), tasks[1])
    assert b_alone.loss_first == b_after_a.loss_first and b_alone.loss_last == b_after_a.loss_last
    assert all(np.array_equal(x, y) for p, q in zip(b_alone.attempts, b_after_a.attempts) for x, y in zip(p, q))


def test_same_seed_same_answers_and_another_seed_trains_differently(tasks):
    runs = []
    for seed in (0, 0, 1):
        eng = build_engine(config(seed=seed))
        snap = Snapshot(eng)
        runs.append([solve(eng, snap, t, seed=seed) for t in tasks])
    same = [(r.loss_first, r.loss_last, [a.tolist() for p in r.attempts for a in p]) for r in runs[0]]
    assert same == [(r.loss_first, r.loss_last, [a.tolist() for p in r.attempts for a in p]) for r in runs[1]]
    assert [r.loss_last for r in runs[0]] != [r.loss_last for r in runs[2]]


def test_test_outputs_are_never_seen(tasks):
    """Poisoned answers (other grids, other sizes) change nothing: not the training, not the answers."""
    poisoned = [replace(t, test=tuple(Pair(p.input, np.full((5, 7), 9, dtype=np.int64)) for p in t.test)) for t in tasks]
    out = []
    for ts in (tasks, poisoned):
        eng = build_engine(config())
        snap = Snapshot(eng)
        out.append([solve(eng, snap, t) for t in ts])
    for r, q in zip(*out):
        assert (r.loss_first, r.loss_last, r.cell_acc_last) == (q.loss_first, q.loss_last, q.cell_acc_last)
        assert all(np.array_equal(x, y) for p, s in zip(r.attempts, q.attempts) for x, y in zip(p, s))


def test_learning_rates_of_the_ttt_section(tasks):
    eng = build_engine(config(**{"ttt.lr": {"agent": 0.05}}))
    assert {g["name"]: g["lr"] for g in eng.optimizer.param_groups} == {"qwen": 3e-4, "agent": 0.05}
    with pytest.raises(ConfigError, match=r"ttt\.lr\.nosuch: no parameter group named 'nosuch'"):
        build_engine(config(**{"ttt.lr": {"nosuch": 0.1}}))


@pytest.mark.parametrize(
    "overrides, key",
    [({"ttt.steps": "many"}, "ttt.steps: expected int"), ({"ttt.stpes": 3}, "ttt.stpes: unknown key (did you mean 'steps'?)"),
     ({"ttt.steps": None}, "ttt: set ttt.steps or ttt.seconds"), ({"ttt.views": 0}, "ttt.views: must be > 0"),
     ({"ttt.lr": {"agent": -1}}, "ttt.lr: learning rate of group 'agent' must be >= 0")],
)
def test_the_ttt_section_is_validated_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        config(**overrides)
    assert key in str(err.value)


def test_a_single_demonstration_trains_on_its_views_alone_and_says_so(tmp_path):
    (task,) = load_tasks(str(write_tasks(tmp_path / "one", n=1, demos=1)))
    eng = build_engine(config())
    r = solve(eng, Snapshot(eng), task)
    assert r.steps == 2 and r.examples == 2 and len(r.attempts) == 1
    assert len(r.warnings) == 1 and "single demonstration pair" in r.warnings[0] and "flip0" in r.warnings[0]


def test_a_time_budget_ends_a_tasks_training(tasks):
    eng = build_engine(config(**{"ttt.steps": None, "ttt.seconds": 0.3}))
    r = solve(eng, Snapshot(eng), tasks[0])
    assert 1 <= r.steps < 1000 and len(r.attempts) == 1
    eng = build_engine(config(**{"ttt.steps": 3, "ttt.seconds": 1000.0}))
    assert solve(eng, Snapshot(eng), tasks[0]).steps == 3  # whichever limit comes first


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    return root, train_tiny_run(root, 3).engine


def test_every_task_starts_from_the_checkpoints_weights(pretrained, tasks, tmp_path):
    from arcfw.core.training.checkpoint import load_weights

    root, trained = pretrained
    eng = build_engine(config())
    load_weights(eng, root / "run")
    snap = Snapshot(eng)
    solve(eng, snap, tasks[0])
    snap.restore(eng)
    mods = lambda e: [p for g in e.groups for m in g.modules for p in m.parameters()]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(mods(eng), mods(trained)))
    assert torch.equal(eng.plugins["rl_policy"].mu[2].weight, trained.plugins["rl_policy"].mu[2].weight)
    assert torch.equal(predictor(eng).size_head.mlp[0].weight, predictor(trained).size_head.mlp[0].weight)
    # the command: from the checkpoint, recorded in eval.json
    data = write_tasks(tmp_path / "tasks")
    res = CliRunner().invoke(main, ttt_args(data, tmp_path / "out", "--checkpoint", str(root / "run")))
    assert res.exit_code == 0, res.output
    assert "step-00000003" in json.loads((tmp_path / "out" / "eval.json").read_text())["ttt"]["checkpoint"]


# --------------------------------------------------------------------------- the command


def ttt_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", str(REPO / "configs" / "default.yaml"), "--ttt", "--data", str(data), "--out", str(out), "-q", *SETS, *extra]


def test_ttt_command_writes_the_evaluation_with_seconds_per_task(tmp_path):
    data = write_tasks(tmp_path / "tasks")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ttt_args(data, out))
    assert res.exit_code == 0, res.output
    assert "s/task" in res.stdout and "pass@2 (mean over tasks)" in res.stdout
    report = json.loads((out / "eval.json").read_text())
    sub = json.loads((out / "submission.json").read_text())
    assert list(sub) == ["flip0", "flip1", "flip2"] == report["task_ids"]
    t = report["ttt"]
    assert t["seconds_per_task"] > 0 and t["steps_per_task"] == 2 and t["peak_rss_mib"] > 0 and t["processes"] == 1
    assert set(t["per_task"]) == set(sub) and all(v["examples"] == 6 for v in t["per_task"].values())
    tasks = load_tasks(str(data))
    preds = {k: [[np.array(e["attempt_1"]), np.array(e["attempt_2"])] for e in v] for k, v in sub.items()}
    assert report["model"]["pass_at_2"] == score(tasks, preds).pass_at_2
    again = CliRunner().invoke(main, ttt_args(data, out))
    assert again.exit_code == 2 and "already holds an evaluation" in again.stderr and "--resume" in again.stderr


def test_a_task_without_test_inputs_is_an_error_naming_the_file(tmp_path):
    data = write_tasks(tmp_path / "tasks", n=2)
    (data / "flip1.json").write_text(json.dumps({**flip_task("flip1", 1), "test": []}))
    res = CliRunner().invoke(main, ttt_args(data, tmp_path / "out"))
    assert res.exit_code == 2 and res.stderr.count("\n") == 1
    assert str(data / "flip1.json") in res.stderr and "no test inputs" in res.stderr
    assert not (tmp_path / "out").exists()


def test_sigterm_keeps_the_finished_tasks_and_resume_finishes_the_rest(tmp_path):
    data = write_tasks(tmp_path / "tasks")
    out = tmp_path / "out"
    signal_plugin = ["--set", f"plugins.extra=[{{name: 'helper_plugins:SignalOnTask', task_id: flip1, once: '{tmp_path / 'sent'}'}}]"]
    res = CliRunner().invoke(main, ttt_args(data, out, *signal_plugin))
    assert res.exit_code == 143, res.output
    assert "SIGTERM" in res.stderr and "1 of 3 tasks finished" in res.stderr and "--resume" in res.stderr
    assert result_path(out, "flip0").is_file() and not result_path(out, "flip1").exists() and not (out / "eval.json").exists()
    done = json.loads(result_path(out, "flip0").read_text())
    command = res.stderr.split("Resume with: ")[1].strip().split()
    assert command[:2] == ["arcfw", "eval"] and command[-1] == "--resume"
    # the resume must keep the settings that decide the answers: another seed is refused
    refused = CliRunner().invoke(main, ttt_args(data, out, *signal_plugin, "--set", "seed=5", "--resume"))
    assert refused.exit_code == 2 and "cannot resume" in refused.stderr and "seed" in refused.stderr
    resumed = CliRunner().invoke(main, ttt_args(data, out, *signal_plugin, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(result_path(out, "flip0").read_text()) == done  # not trained again
    sub = json.loads((out / "submission.json").read_text())
    assert list(sub) == ["flip0", "flip1", "flip2"]
    # the same answers as an uninterrupted evaluation
    whole = CliRunner().invoke(main, ttt_args(data, tmp_path / "whole", *signal_plugin))
    assert whole.exit_code == 0 and json.loads((tmp_path / "whole" / "submission.json").read_text()) == sub


def test_eval_without_checkpoint_needs_ttt(tmp_path):
    res = CliRunner().invoke(main, ["eval", str(REPO / "configs" / "default.yaml"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--checkpoint is required" in res.stderr


# --------------------------------------------------------------------------- prompt ablation


def colour_task(task_id: str, colour: int) -> Task:
    demo = Pair(g([[1, 2], [3, 4]]), g([[colour, colour], [colour, colour]]))
    return Task(task_id, train=(demo, demo), test=(Pair(g([[5, 6], [7, 8]]), g([[colour] * 2] * 2)),))


def test_prompt_ablation_gives_every_task_another_tasks_demonstrations():
    tasks = [colour_task(f"t{i}", i + 1) for i in range(4)]
    swapped = swap_demonstrations(tasks)
    assert [t.task_id for t in swapped] == [t.task_id for t in tasks] and all(s.test == t.test for s, t in zip(swapped, tasks))
    donors = [next(j for j, o in enumerate(tasks) if o.train is s.train) for s in swapped]
    assert sorted(donors) == [0, 1, 2, 3] and all(d != i for i, d in enumerate(donors))
    assert swap_demonstrations(tasks[:1]) == []


def test_prompt_ablation_scores_a_demonstration_reader_and_a_copier(make_engine, tmp_path):
    """A predictor that reads the demonstrations solves every task with its own and none with another's;
    a predictor that ignores them scores the same both ways."""
    from arcfw.core.commands.evaluate import run_eval

    tasks = [colour_task(f"t{i}", i + 1) for i in range(3)]
    for predictor, model, ablated in (("DemoColourPredictor", 1.0, 0.0), ("CopyInputPredictor", 0.0, 0.0)):
        eng = make_engine({"plugins.predictor": {"name": f"helper_plugins:{predictor}"}, "optimizer.lr": {}})
        report = run_eval(eng.config, eng, tasks, tmp_path / predictor, data={"source": "test"}, batch_size=4, overlap=[])
        assert (report.model.pass_at_2, report.ablation.pass_at_2) == (model, ablated)
        saved = json.loads((tmp_path / predictor / "eval.json").read_text())
        assert saved["prompt_ablation"]["pass_at_2"] == ablated


# --------------------------------------------------------------------------- several processes


def test_torchrun_two_processes_split_the_tasks_and_answer_as_one_process(tmp_path):
    """2 ranks (gloo on CPU) each train their own tasks; rank 0 merges; the answers are those of one
    process (each task's training depends on the seed and the task only).  Without the ranks acting
    independently while training, the RL policy's averaging would pair steps of different tasks
    (or wait forever: rank 0 has two tasks, rank 1 one)."""
    import os
    import subprocess
    import sys

    from test_distributed import TIMEOUT_S, free_port

    data = write_tasks(tmp_path / "tasks")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "arcfw", *ttt_args(data, tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("pass@2 (mean over tasks)") == 1 and "2 processes" in proc.stdout  # rank 0 reports
    two = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert {v["rank"] for v in two["ttt"]["per_task"].values()} == {0, 1} and two["ttt"]["processes"] == 2
    one = CliRunner().invoke(main, ttt_args(data, tmp_path / "one"))
    assert one.exit_code == 0, one.output
    assert json.loads((tmp_path / "two" / "submission.json").read_text()) == json.loads((tmp_path / "one" / "submission.json").read_text())
    assert two["model"] == json.loads((tmp_path / "one" / "eval.json").read_text())["model"]
