"""Each guarantee, tested by reproducing the original script's bug as a faulty plugin."""

from __future__ import annotations

import math

import pytest
import torch

from arcfw.core.engine.engine import Engine
from arcfw.core.errors import ContractError, GradientPathError, OrderError, PrecisionError, TrainingHalted


def run_steps(engine: Engine, batches, n: int):
    out = []
    for i in range(n):
        out.append(engine.train_step(batches[i % len(batches)]))
    return out


# 1. contracts at hook boundaries ------------------------------------------------


def test_wrong_colour_count_is_stopped_at_predict(make_engine, batches):
    eng = make_engine({"plugins.predictor.name": "faulty_plugins:SevenColourPredictor"})
    with pytest.raises(ContractError) as err:
        eng.train_step(batches(1)[0])
    msg = str(err.value)
    assert "faulty_plugins:SevenColourPredictor" in msg and "'predict'" in msg
    assert ", 10)" in msg and ", 7)" in msg  # expected [.., 10], got [.., 7]


def test_float_targets_are_refused_naming_the_plugin(make_engine, batches):
    eng = make_engine({"plugins.loss.name": "faulty_plugins:FloatTargetLoss"})
    b = batches(1)[0]
    assert b.targets.dtype == torch.int64  # the batch is int64 from the start
    with pytest.raises(ContractError) as err:
        eng.train_step(b)
    msg = str(err.value)
    assert "FloatTargetLoss" in msg and "compute_loss" in msg and "int64" in msg and "float32" in msg


# 2. cut gradient paths ---------------------------------------------------------


@pytest.mark.parametrize("policy", ["NoGradPolicy", "DetachingPolicy"])
def test_cut_gradient_path_reported_at_first_step(make_engine, batches, policy):
    eng = make_engine({"plugins.refine.name": f"faulty_plugins:{policy}"})
    with pytest.raises(GradientPathError) as err:
        eng.train_step(batches(1)[0])
    msg = str(err.value)
    assert policy in msg and "'refine'" in msg and "torch.no_grad" in msg and "detach" in msg
    assert eng.global_step == 0  # stopped inside the first step, nothing applied


def test_zero_gradient_group_halts_after_patience(make_engine, batches):
    eng = make_engine({"plugins.prompt.name": "faulty_plugins:ZeroGradPrompt", "health.patience": 3})
    bs = batches(3)
    run_steps(eng, bs, 2)  # two zero-gradient steps are tolerated
    with pytest.raises(TrainingHalted) as err:
        eng.train_step(bs[2])
    assert "'qwen'" in str(err.value) and "3 consecutive steps" in str(err.value)


def test_frozen_group_is_not_an_error(make_engine, batches):
    eng = make_engine({"optimizer.lr.qwen": 0.0, "health.patience": 2})
    run_steps(eng, batches(3), 3)
    qwen = next(g for g in eng.groups if g.name == "qwen")
    assert not any(p.requires_grad for p in qwen.params)
    assert all(pg["name"] != "qwen" for pg in eng.optimizer.param_groups)


# 3. order ----------------------------------------------------------------------


def test_backward_through_main_graph_in_post_step_is_an_order_error(make_engine, batches):
    eng = make_engine({"plugins.refine.name": "faulty_plugins:BackwardAgainPolicy"})
    with pytest.raises(OrderError) as err:
        eng.train_step(batches(1)[0])
    msg = str(err.value)
    assert "BackwardAgainPolicy" in msg and "post_step_update" in msg
    assert "backward -> optimizer_step -> post_step_update" in msg


def test_post_step_update_gets_detached_values_after_the_step(make_engine, batches):
    eng = make_engine({"plugins.extra": [{"name": "faulty_plugins:Recorder"}]})
    events = []
    eng.add_listener(lambda e, p: events.append(e))
    metrics = eng.train_step(batches(1)[0])
    assert metrics["recorder_seen"] == 1.0  # its asserts on detached tensors passed
    assert events.index("stage:optimizer_step") < events.index("post_step_update")


# 4. precision ------------------------------------------------------------------


def test_fp16_trainable_weights_refused_with_fix(tiny_config):
    cfg = tiny_config({"precision": "fp16-mixed", "plugins.prompt.name": "faulty_plugins:Fp16Qwen"})
    with pytest.raises(PrecisionError) as err:
        Engine.from_config(cfg)
    msg = str(err.value)
    assert "'qwen'" in msg and "float16" in msg and "float32" in msg and "bf16-mixed" in msg


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "fp16-mixed"])
def test_precision_modes_train_with_finite_decreasing_loss(make_engine, batches, precision):
    eng = make_engine({"precision": precision, "plugins.refine": None, "data.max_tasks": 1})
    b = batches(1, max_tasks=1)[0]
    losses = [m["loss"] for m in run_steps(eng, [b], 20)]
    assert all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    assert (eng.precision.scaler is not None) == (precision == "fp16-mixed")


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "fp16-mixed"])
def test_grad_clip_applies_in_every_mode_on_unscaled_gradients(make_engine, batches, precision):
    eng = make_engine({"precision": precision, "grad_clip": 1e-3, "plugins.prompt.cache_every": 1})
    seen = []
    opt_step = eng.optimizer.step

    def spy(*a, **k):
        grads = [p.grad for pg in eng.optimizer.param_groups for p in pg["params"] if p.grad is not None]
        seen.append(torch.nn.utils.get_total_norm(grads).item())
        return opt_step(*a, **k)

    eng.optimizer.step = spy
    raw = []
    for b in batches(3) * 2:
        eng.train_step(b)
        raw.append(dict(eng.last_norms))
    # fp16-mixed: the first steps may overflow at GradScaler's initial scale; a fused optimizer is still
    # called then (with found_inf, so it skips the update), with non-finite gradients
    applied = [n for n in seen if math.isfinite(n)]
    assert applied, ("the optimizer never stepped", seen)
    assert all(n <= 1e-3 * 1.01 for n in applied), seen  # clipped, in real (unscaled) units
    assert any(all(1e-3 < v < math.inf for v in r.values()) for r in raw), raw  # the raw norms were above the clip


def test_fp16_overflow_steps_are_skipped_and_counted(make_engine, batches):
    eng = make_engine({"precision": "fp16-mixed", "plugins.loss.name": "faulty_plugins:OverflowLoss", "plugins.loss.overflow_steps": [1]})
    bs = batches(3)
    before = None
    for i in range(3):
        if i == 1:
            before = [p.detach().clone() for p in eng.groups[1].params]
        eng.train_step(bs[i])
        if i == 1:
            after = [p.detach() for p in eng.groups[1].params]
            assert all(torch.equal(a, b) for a, b in zip(before, after)), "an overflowing step was applied"
    assert eng.precision.scaler_skipped >= 1


# 5. non-finite values ----------------------------------------------------------


def test_nan_loss_is_skipped_and_counted(make_engine, batches):
    eng = make_engine({"plugins.loss.name": "faulty_plugins:NaNLoss", "plugins.loss.nan_steps": [1]})
    bs = batches(3)
    eng.train_step(bs[0])
    before = [p.detach().clone() for g in eng.groups for p in g.params]
    m = eng.train_step(bs[1])
    after = [p.detach() for g in eng.groups for p in g.params]
    assert m["nonfinite_skipped"] == 1.0 and eng.guard.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    eng.train_step(bs[2])  # training goes on
    assert eng.guard.consecutive == 0


def test_nan_loss_halts_with_halt_policy(make_engine, batches):
    eng = make_engine({"plugins.loss.name": "faulty_plugins:NaNLoss", "plugins.loss.nan_steps": [0], "health.nonfinite": "halt"})
    with pytest.raises(TrainingHalted, match="non-finite loss at step 0"):
        eng.train_step(batches(1)[0])


def test_consecutive_nan_halts_after_max_skips(make_engine, batches):
    eng = make_engine({"plugins.loss.name": "faulty_plugins:NaNLoss", "plugins.loss.nan_steps": [0, 1, 2], "health.max_consecutive_skips": 3})
    bs = batches(3)
    eng.train_step(bs[0])
    eng.train_step(bs[1])
    with pytest.raises(TrainingHalted, match="3 consecutive steps"):
        eng.train_step(bs[2])


def test_plugin_calling_backward_itself_is_an_order_error(make_engine, batches):
    eng = make_engine({"plugins.loss.name": "faulty_plugins:EagerBackwardLoss"})
    with pytest.raises(OrderError, match="called backward"):
        eng.train_step(batches(1)[0])
