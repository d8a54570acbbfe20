"""Issue 13: every hook call is attributed, the batch belongs to the engine, the step order holds on
the parameters.  Each case is a faulty plugin (tests/faulty_plugins.py) and asserts the one-line error
and the plugin it names."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO, TINY

from arcfw.core.engine.engine import Engine
from arcfw.core.errors import ContractError, GradientPathError, HookFailure, OrderError, PrecisionError


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text, text
    return text


# 1. every hook call is attributed ------------------------------------------------


def test_exception_in_a_step_hook_names_plugin_hook_and_error(make_engine, batches):
    eng = make_engine({"plugins.refine.name": "faulty_plugins:RaisingPolicy"})
    with pytest.raises(HookFailure) as err:
        eng.train_step(batches(1)[0])
    assert one_line(err.value) == ("plugin 'faulty_plugins:RaisingPolicy' failed in hook 'refine': "
                                   "ValueError: policy scale must be positive, got -1.0")
    assert isinstance(err.value.__cause__, ValueError)  # the traceback --debug prints


def test_exception_in_configure_names_the_plugin(tiny_config):
    with pytest.raises(HookFailure) as err:
        Engine.from_config(tiny_config({"plugins.refine.name": "faulty_plugins:RaisingConfigure"}))
    assert one_line(err.value) == "plugin 'faulty_plugins:RaisingConfigure' failed in hook 'configure': KeyError: 'hidden_dim'"


def test_exception_in_a_loop_hook_names_the_plugin(make_engine):
    eng = make_engine({"plugins.extra": [{"name": "faulty_plugins:RaisingEpochStart"}]})
    with pytest.raises(HookFailure, match=r"^plugin 'faulty_plugins:RaisingEpochStart' failed in hook 'on_epoch_start': KeyError: 'epoch'$"):
        eng.call_all("on_epoch_start", epoch=0)


def test_exception_in_an_evaluation_hook_names_the_plugin(make_engine, batches):
    eng = make_engine({"plugins.predictor.name": "faulty_plugins:RaisingShapeAgent"})
    b = batches(1)[0]
    with eng.evaluating():
        prompt, enc = eng.eval_encode(b)
        with pytest.raises(HookFailure) as err:
            eng.predict_shape(prompt, b, enc)
    assert one_line(err.value) == ("plugin 'faulty_plugins:RaisingShapeAgent' failed in hook 'predict_shape': "
                                   "ZeroDivisionError: integer division or modulo by zero")


def test_backward_on_a_detached_value_is_a_gradient_path_error(make_engine, batches):
    eng = make_engine({"plugins.refine.name": "faulty_plugins:DetachedBackwardPolicy"})
    with pytest.raises(GradientPathError) as err:
        eng.train_step(batches(1)[0])
    msg = one_line(err.value)
    assert "plugin 'faulty_plugins:DetachedBackwardPolicy' called backward() in hook 'refine'" in msg
    assert "does not require grad" in msg


def test_backward_through_a_freed_graph_in_a_hook_is_a_step_order_error(make_engine, batches):
    eng = make_engine({"plugins.refine.name": "faulty_plugins:StaleGraphPolicy"})
    bs = batches(2)
    eng.train_step(bs[0])
    with pytest.raises(OrderError) as err:
        eng.train_step(bs[1])
    msg = one_line(err.value)
    assert "plugin 'faulty_plugins:StaleGraphPolicy' called backward() in hook 'refine'" in msg
    assert "backward through the graph a second time" in msg


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "fp16-mixed"])
def test_a_trainable_model_cast_in_a_hook_is_a_precision_error_in_every_mode(make_engine, batches, precision):
    eng = make_engine({"precision": precision, "plugins.prompt.name": "faulty_plugins:HalfAtEpochStartQwen"})
    with pytest.raises(PrecisionError) as err:
        eng.call_all("on_epoch_start", epoch=0)
    msg = one_line(err.value)
    assert msg.startswith("plugin 'faulty_plugins:HalfAtEpochStartQwen' changed the trainable parameters of group 'qwen'")
    assert "in hook 'on_epoch_start' from float32 on cpu to float16 on cpu" in msg


def test_gradscaler_fp16_failure_is_translated_naming_the_plugin(make_engine, batches):
    # with the per-step checks off, the cast reaches GradScaler: its message is translated, not shown raw
    eng = make_engine({"precision": "fp16-mixed", "plugins.prompt.name": "faulty_plugins:HalfAtEpochStartQwen",
                       "health.check_contracts": False})
    eng.call_all("on_epoch_start", epoch=0)
    with pytest.raises(PrecisionError) as err:
        eng.train_step(batches(1)[0])
    msg = one_line(err.value)
    assert "'qwen' (plugin 'faulty_plugins:HalfAtEpochStartQwen') has float16 trainable parameters" in msg
    assert "Attempting to unscale FP16 gradients" in msg and "bf16-mixed" in msg


def test_a_dtype_mismatch_from_a_cast_model_names_the_cast_group(make_engine, batches):
    # checks off, fp32: the half model meets float inputs inside a hook; the raw "mat1 and mat2 must have
    # the same dtype" is translated into the precision error naming the group that is no longer float32
    eng = make_engine({"plugins.prompt.name": "faulty_plugins:HalfAtEpochStartQwen", "health.check_contracts": False})
    eng.call_all("on_epoch_start", epoch=0)
    with pytest.raises(PrecisionError) as err:
        eng.train_step(batches(1)[0])
    msg = one_line(err.value)
    assert "mixed dtypes" in msg and "parameter group 'qwen' (plugin 'faulty_plugins:HalfAtEpochStartQwen') no longer holds float32" in msg


def test_cli_prints_one_line_and_the_traceback_only_with_debug(tmp_path):
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "-m", "arcfw", "run", str(REPO / "configs/default.yaml"), "--max-batches", "1",
           "--out", str(tmp_path / "run"), *sets, "--set", "plugins.refine.name=faulty_plugins:RaisingPolicy"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "OMP_NUM_THREADS": "1"}
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert plain.returncode == 2, plain.stderr
    line = ("arcfw: plugin error: plugin 'faulty_plugins:RaisingPolicy' failed in hook 'refine': "
            "ValueError: policy scale must be positive, got -1.0\n")
    # the start-up summary's lines come first; of the error, exactly that one line (after the progress bar)
    errors = [x for x in plain.stderr.splitlines() if "error" in x or "Error" in x]
    assert line in plain.stderr and len(errors) == 1, plain.stderr
    assert "Traceback" not in plain.stderr
    debug = subprocess.run([*cmd[:3], "--debug", *cmd[3:]], capture_output=True, text=True, env=env)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "raise ValueError" in debug.stderr


# 2. the batch belongs to the engine -------------------------------------------------


@pytest.mark.parametrize(("over", "plugin", "hook", "field", "how"), [
    ({"plugins.refine.name": "faulty_plugins:FloatTargetsPolicy"}, "faulty_plugins:FloatTargetsPolicy", "refine",
     "targets", "replaced by a float32 tensor"),
    ({"plugins.predictor.name": "faulty_plugins:InputEditingPredictor"}, "faulty_plugins:InputEditingPredictor", "predict",
     "inputs", "changed in place"),
    ({"plugins.loss.name": "faulty_plugins:MaskWideningLoss"}, "faulty_plugins:MaskWideningLoss", "compute_loss",
     "target_mask", "changed in place"),
    ({"plugins.extra": [{"name": "faulty_plugins:TargetEditingExtra"}]}, "faulty_plugins:TargetEditingExtra",
     "post_step_update", "targets", "changed in place"),
])
def test_a_hook_that_changes_the_batch_is_named(make_engine, batches, over, plugin, hook, field, how):
    eng = make_engine(over)
    with pytest.raises(ContractError) as err:
        eng.train_step(batches(1)[0])
    msg = one_line(err.value)
    assert msg.startswith(f"plugin '{plugin}' broke the contract of hook '{hook}': expected batch.{field} left as the engine made it")
    assert f"got batch.{field} {how}" in msg
    assert "efe_loss" not in msg  # not the next plugin


def test_float_targets_blame_the_plugin_that_made_them_not_the_loss(make_engine, batches):
    b = batches(1)[0]
    eng = make_engine({"plugins.refine.name": "faulty_plugins:FloatTargetsPolicy"})
    with pytest.raises(ContractError, match="'faulty_plugins:FloatTargetsPolicy' broke the contract of hook 'refine'"):
        eng.train_step(b)
    # with the per-step checks off, the loss's own check is what is left (and names itself)
    b = batches(1)[0]
    eng = make_engine({"plugins.refine.name": "faulty_plugins:FloatTargetsPolicy", "health.check_contracts": False})
    with pytest.raises(ContractError, match="'efe_loss' broke the contract of hook 'compute_loss'"):
        eng.train_step(b)


# 3. the step order holds on the parameters --------------------------------------------


@pytest.mark.parametrize(("over", "plugin", "hook", "says"), [
    ({"plugins.predictor.name": "faulty_plugins:HandDecayPredictor"}, "faulty_plugins:HandDecayPredictor",
     "post_step_update", "changed trainable parameters of group 'agent'"),
    ({"plugins.predictor.name": "faulty_plugins:OwnFusedOptimizerPredictor"}, "faulty_plugins:OwnFusedOptimizerPredictor",
     "post_step_update", "reached the trainable parameters of group 'agent'"),
    ({"plugins.refine.name": "faulty_plugins:BackwardInRefinePolicy"}, "faulty_plugins:BackwardInRefinePolicy",
     "refine", "reached the trainable parameters of group 'qwen'"),
    ({"plugins.loss.name": "faulty_plugins:EagerBackwardLoss"}, "faulty_plugins:EagerBackwardLoss",
     "compute_loss", "reached the trainable parameters of group"),
])
def test_a_plugin_that_trains_main_parameters_itself_is_named(make_engine, batches, over, plugin, hook, says):
    eng = make_engine({**over, "plugins.prompt.cache_every": 1})
    with pytest.raises(OrderError) as err:
        eng.train_step(batches(1)[0])
    msg = one_line(err.value)
    assert msg.startswith(f"plugin '{plugin}'") and f"hook '{hook}'" in msg and says in msg, msg
    assert "the step order is hard_cell_threshold -> generate_prompt" in msg


@pytest.mark.parametrize(("predictor", "error", "says"), [
    ("OnceDecayPredictor", OrderError, "changed trainable parameters of group 'agent' (plugin "
     "'faulty_plugins:OnceDecayPredictor') in hook 'post_step_update'"),
    ("HalfOncePredictor", PrecisionError, "changed the trainable parameters of group 'agent' (plugin "
     "'faulty_plugins:HalfOncePredictor') in hook 'post_step_update' from float32 on cpu to float16 on cpu"),
])
def test_a_change_made_once_is_named_at_the_hook_call_that_made_it(make_engine, batches, predictor, error, says):
    """Versions and storage addresses are compared after every hook call of a step (one pass over the
    parameters): a change made once, in a stage where several plugins' hooks run (post_step_update), names
    the plugin and the hook that made it, at that step."""
    eng = make_engine({"plugins.predictor.name": f"faulty_plugins:{predictor}", "plugins.prompt.cache_every": 1})
    with pytest.raises(error) as err:
        for b in batches(3):
            eng.train_step(b)
    msg = one_line(err.value)
    assert msg.startswith(f"plugin 'faulty_plugins:{predictor}'") and says in msg, msg
    assert eng.global_step == 0


def test_the_engine_own_steps_and_a_checkpoint_load_are_not_violations(make_engine, batches):
    eng = make_engine({"plugins.prompt.cache_every": 1})
    saved = eng.state_dict()
    bs = batches(3)
    eng.train_step(bs[0])
    eng.load_state_dict(saved)  # the parameters change outside any step: the next step starts from them
    for b in bs:
        eng.train_step(b)
    assert eng.global_step == 3  # restored to 0, then three steps


def test_check_contracts_false_switches_the_per_step_checks_off(make_engine, batches):
    eng = make_engine({"plugins.predictor.name": "faulty_plugins:HandDecayPredictor", "health.check_contracts": False})
    for b in batches(2):
        eng.train_step(b)
    assert eng.global_step == 2


# arcfw check fails on each, naming the plugin -----------------------------------------


@pytest.mark.parametrize("key,plugin", [
    ("plugins.refine.name", "RaisingPolicy"),
    ("plugins.refine.name", "FloatTargetsPolicy"),
    ("plugins.refine.name", "BackwardInRefinePolicy"),
    ("plugins.predictor.name", "HandDecayPredictor"),
    ("plugins.predictor.name", "OwnFusedOptimizerPredictor"),
])
def test_arcfw_check_fails_naming_the_plugin(key, plugin):
    from click.testing import CliRunner

    from arcfw.core.commands.cli import main

    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    res = CliRunner().invoke(main, ["check", str(REPO / "configs/default.yaml"), *sets, "--set", f"{key}=faulty_plugins:{plugin}"])
    assert res.exit_code == 1, res.output
    failed = [line for line in res.output.splitlines() if line.startswith("FAIL")]
    assert failed and any(f"plugin 'faulty_plugins:{plugin}'" in line for line in failed), res.output
