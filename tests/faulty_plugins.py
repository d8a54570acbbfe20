"""Deliberately faulty plugins: each reproduces one of the original script's bugs.

Loaded by configs through import paths (``faulty_plugins:NoGradPolicy``), exactly
as a user's own plugin module would be.
"""

from __future__ import annotations

import torch

from arcfw.core.engine.context import LossOutput, Metric, TaskEncoding
from arcfw.core.engine.hookspecs import hookimpl
from arcfw.core.engine.plugin import Plugin
from arcfw.plugins.efe_loss import MaskedEFELoss
from arcfw.plugins.grid_transformer import GridTransformer
from arcfw.plugins.qwen import QwenPrompt
from arcfw.plugins.rl_policy import GaussianRefinePolicy


class SevenColourPredictor(GridTransformer):
    """Bug 1 (shape): logits over 7 colours -> 'size of tensor a (7) must match ... (10)' downstream."""

    name = "seven_colour_predictor"

    @hookimpl
    def predict(self, prompt, batch, ctx, encoding):
        return super().predict(prompt, batch, ctx, encoding)[..., :7]


class FloatTargetLoss(MaskedEFELoss):
    """Bug 1 (dtype): ``target.float()`` fed to the loss."""

    name = "float_target_loss"

    @hookimpl
    def compute_loss(self, logits, batch, ctx):
        batch.targets = batch.targets.float()
        return super().compute_loss(logits, batch, ctx)


class NoGradPolicy(GaussianRefinePolicy):
    """Bug 2: ``@torch.no_grad()`` on the policy's apply -> Qwen gradient exactly 0."""

    name = "no_grad_policy"

    @hookimpl
    @torch.no_grad()
    def refine(self, prompt, batch, ctx):
        return super().refine(prompt, batch, ctx)


class DetachingPolicy(GaussianRefinePolicy):
    """Bug 2, subtler: output still requires grad (through the policy's own parameter)
    but the path to the prompt is cut by ``.detach()``."""

    name = "detaching_policy"

    @hookimpl
    def refine(self, prompt, batch, ctx):
        return prompt.detach() + self.log_std  # requires_grad=True, yet Qwen gets nothing


class ZeroGradPrompt(QwenPrompt):
    """A prompt whose gradient is exactly zero every step (path exists, carries nothing)."""

    name = "zero_grad_prompt"

    @hookimpl
    def generate_prompt(self, batch, ctx):
        out = super().generate_prompt(batch, ctx)
        if isinstance(out, TaskEncoding):  # the cell encoding: prompt and token states, both zeroed
            return TaskEncoding(out.prompt * 0.0, out.tokens * 0.0, out.token_mask, out.meta)
        return out * 0.0


class BackwardAgainPolicy(GaussianRefinePolicy):
    """Bug 3: the RL update backpropagates through the main graph (kept from refine)."""

    name = "backward_again_policy"

    @hookimpl
    def refine(self, prompt, batch, ctx):
        out = super().refine(prompt, batch, ctx)
        self.kept = out  # NOT detached: a reference into the main graph
        return out

    @hookimpl
    def post_step_update(self, result, ctx):
        (self.kept ** 2).mean().backward()  # the graph was freed by the engine's backward
        return {}


class Fp16Qwen(QwenPrompt):
    """Bug 4: Qwen loaded in fp16 and trained with fp16-mixed -> 'Attempting to unscale FP16 gradients'."""

    name = "fp16_qwen"

    @hookimpl
    def configure(self, ctx):
        super().configure(ctx)
        self.model.half()


class NaNLoss(MaskedEFELoss):
    """Bug 5: a NaN loss at the given steps."""

    name = "nan_loss"

    def __init__(self, nan_steps: list = (1,), **kw):
        super().__init__(**kw)
        self.nan_steps = set(nan_steps)

    @hookimpl
    def compute_loss(self, logits, batch, ctx):
        out = super().compute_loss(logits, batch, ctx)
        if ctx.step in self.nan_steps:
            out.loss = out.loss * float("nan")
        return out


class OverflowLoss(MaskedEFELoss):
    """Multiplies the loss so that fp16 gradients overflow at the given steps (GradScaler must skip)."""

    name = "overflow_loss"

    def __init__(self, overflow_steps: list = (1,), factor: float = 1e8, **kw):
        super().__init__(**kw)
        self.overflow_steps = set(overflow_steps)
        self.factor = factor

    @hookimpl
    def compute_loss(self, logits, batch, ctx):
        out = super().compute_loss(logits, batch, ctx)
        if ctx.step in self.overflow_steps:
            out.loss = out.loss * self.factor
        return out


class FlatLoss(Plugin):
    """A loss that never changes (health warning: loss flat)."""

    name = "flat_loss"
    role = "loss"
    metrics = (Metric("mask_ratio", stuck_at=1.0),)

    @hookimpl
    def compute_loss(self, logits, batch, ctx):
        return LossOutput(loss=logits.float().sum() * 0.0 + 1.0, metrics={"mask_ratio": 1.0})


class Recorder(Plugin):
    """Records every hook call it sees (an 'extra' plugin implementing all step hooks)."""

    name = "recorder"
    role = "extra"
    events: list = []

    def __init__(self):
        Recorder.events = []

    def _rec(self, name):
        Recorder.events.append(name)

    @hookimpl
    def configure(self, ctx):
        self._rec("configure")

    @hookimpl
    def hard_cell_threshold(self, epoch, step, ctx):
        self._rec("hard_cell_threshold")
        return None

    @hookimpl
    def refine(self, prompt, batch, ctx):
        self._rec("refine")
        return prompt

    @hookimpl
    def compute_loss(self, logits, batch, ctx):
        self._rec("compute_loss")
        return LossOutput(loss=logits.float().sum() * 0.0)

    @hookimpl
    def post_step_update(self, result, ctx):
        self._rec("post_step_update")
        assert not result.prompt.requires_grad and not result.logits.requires_grad
        return {"recorder_seen": 1.0}

    @hookimpl
    def on_epoch_start(self, epoch, ctx):
        self._rec("on_epoch_start")

    @hookimpl
    def on_epoch_end(self, epoch, summary, ctx):
        self._rec("on_epoch_end")

    @hookimpl
    def log_metrics(self, record, ctx):
        self._rec(f"log_metrics:{record['kind']}")


class EagerBackwardLoss(MaskedEFELoss):
    """Bug 3, the other way round: a plugin calls backward itself (the RL update before the engine's backward)."""

    name = "eager_backward_loss"

    @hookimpl
    def compute_loss(self, logits, batch, ctx):
        out = super().compute_loss(logits, batch, ctx)
        out.loss.backward()  # frees the graph; the engine's backward then fails
        return out


class FloatShapeAgent(GridTransformer):
    """predict_shape returns float sizes (a regression head's raw output)."""

    name = "float_shape_agent"

    @hookimpl
    def predict_shape(self, prompt, batch, ctx):
        return super().predict_shape(prompt, batch, ctx).float()


class ZeroShapeAgent(GridTransformer):
    """predict_shape returns a 0x0 size."""

    name = "zero_shape_agent"

    @hookimpl
    def predict_shape(self, prompt, batch, ctx):
        return torch.zeros(batch.size, 1, 2, dtype=torch.int64, device=prompt.device)


class DemoDroppingAugment(Plugin):
    """augment_example that loses a demonstration pair."""

    name = "demo_dropping_augment"
    role = "extra"

    @hookimpl
    def augment_example(self, example, rng, ctx):
        from dataclasses import replace

        return replace(example, demos=example.demos[1:])


class HalfTransformAugment(Plugin):
    """augment_example that rotates the query input but returns a colour 12 in its output (invalid grid)."""

    name = "half_transform_augment"
    role = "extra"

    @hookimpl
    def augment_example(self, example, rng, ctx):
        from arcfw.core.data.batch import Example, Pair

        q = example.query
        return Example(example.task_id, example.pair_index, example.demos, Pair(q.input.T.copy(), q.output * 0 + 12))


class FlatLossDeclaringLoss(FlatLoss):
    """Declares a metric the engine already declares."""

    metrics = (Metric("loss"),)


class GradOfNoGroup(Plugin):
    """Declares the gradient norm of a parameter group nobody has."""

    name = "grad_of_no_group"
    metrics = (Metric("g", grad_norm_of=("nope",)),)


# --------------------------------------------------------------------------- issue 13: every hook call attributed


class RaisingPolicy(GaussianRefinePolicy):
    """An ordinary bug inside a step hook: a ValueError in refine."""

    name = "raising_policy"

    @hookimpl
    def refine(self, prompt, batch, ctx):
        raise ValueError("policy scale must be positive, got -1.0\n(second line of the message)")


class RaisingConfigure(GaussianRefinePolicy):
    """An ordinary bug inside a setup hook: a KeyError in configure."""

    name = "raising_configure"

    @hookimpl
    def configure(self, ctx):
        raise KeyError("hidden_dim")


class RaisingEpochStart(Plugin):
    """An ordinary bug inside a loop hook: on_epoch_start."""

    name = "raising_epoch_start"

    @hookimpl
    def on_epoch_start(self, epoch, ctx):
        return {}["epoch"]


class RaisingShapeAgent(GridTransformer):
    """An ordinary bug inside an evaluation hook: predict_shape divides by zero."""

    name = "raising_shape_agent"

    @hookimpl
    def predict_shape(self, prompt, batch, ctx):
        return 1 // 0


class DetachedBackwardPolicy(GaussianRefinePolicy):
    """backward() in a hook on a value without a gradient path ("element 0 of tensors does not require grad")."""

    name = "detached_backward_policy"

    @hookimpl
    def refine(self, prompt, batch, ctx):
        (prompt.detach() ** 2).mean().backward()
        return super().refine(prompt, batch, ctx)


class StaleGraphPolicy(GaussianRefinePolicy):
    """Keeps its output (main graph) from one step and backpropagates it in the next one's refine
    ("Trying to backward through the graph a second time")."""

    name = "stale_graph_policy"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.kept = None

    @hookimpl
    def refine(self, prompt, batch, ctx):
        if self.kept is not None:
            self.kept.pow(2).mean().backward()
        out = super().refine(prompt, batch, ctx)
        self.kept = out
        return out


class HalfAtEpochStartQwen(QwenPrompt):
    """Qwen cast to fp16 at epoch start (after the engine checked dtypes at configure): under
    fp16-mixed the GradScaler fails with the original "Attempting to unscale FP16 gradients"."""

    name = "half_at_epoch_start_qwen"

    @hookimpl
    def on_epoch_start(self, epoch, ctx):
        self.model.half()


# --------------------------------------------------------------------------- issue 13: the batch belongs to the engine


class FloatTargetsPolicy(GaussianRefinePolicy):
    """Makes the batch's targets float in refine: the loss plugin downstream would be blamed."""

    name = "float_targets_policy"

    @hookimpl
    def refine(self, prompt, batch, ctx):
        batch.targets = batch.targets.float()
        return super().refine(prompt, batch, ctx)


class InputEditingPredictor(GridTransformer):
    """Writes into the batch's inputs in place (a 'normalisation' of colours) before predicting."""

    name = "input_editing_predictor"

    @hookimpl
    def predict(self, prompt, batch, ctx, encoding):
        batch.inputs.clamp_(max=5)
        return super().predict(prompt, batch, ctx, encoding)


class MaskWideningLoss(MaskedEFELoss):
    """Widens the target mask in place so that the loss counts padding cells too."""

    name = "mask_widening_loss"

    @hookimpl
    def compute_loss(self, logits, batch, ctx):
        batch.target_mask |= batch.canvas_mask
        return super().compute_loss(logits, batch, ctx)


class TargetEditingExtra(Plugin):
    """An extra plugin that changes the targets after the step (others' post-step metrics would read them)."""

    name = "target_editing_extra"

    @hookimpl
    def post_step_update(self, result, ctx):
        result.batch.targets.zero_()
        return {}


# --------------------------------------------------------------------------- issue 13: step order on the parameters


class HandDecayPredictor(GridTransformer):
    """Decays its own main-optimizer weights by hand in post_step_update (under no_grad)."""

    name = "hand_decay_predictor"

    @hookimpl
    def post_step_update(self, result, ctx):
        with torch.no_grad():
            for p in self.net.parameters():
                p.mul_(0.999)
        return super().post_step_update(result, ctx)


class OwnFusedOptimizerPredictor(GridTransformer):
    """Trains its main-optimizer weights a second time with its own fused optimizer in post_step_update
    (fused kernels do not bump version counters; the gradient it needs does show)."""

    name = "own_fused_optimizer_predictor"

    @hookimpl
    def configure(self, ctx):
        super().configure(ctx)
        self.own = torch.optim.Adam(self.net.parameters(), lr=1e-3, fused=True)

    @hookimpl
    def post_step_update(self, result, ctx):
        with torch.enable_grad():
            logits = self.predict(result.refined, result.batch, ctx, result.encoding)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 2), result.batch.targets.flatten())
            self.own.zero_grad(set_to_none=True)
            loss.backward()
            self.own.step()
            self.own.zero_grad(set_to_none=True)
        return super().post_step_update(result, ctx)


class BackwardInRefinePolicy(GaussianRefinePolicy):
    """Calls backward inside a forward hook (a 'prompt norm' penalty, applied eagerly) with retain_graph,
    so the engine's backward still works and nothing crashes: the gradient lands twice on Qwen."""

    name = "backward_in_refine_policy"

    @hookimpl
    def refine(self, prompt, batch, ctx):
        prompt.pow(2).mean().backward(retain_graph=True)
        return super().refine(prompt, batch, ctx)


class OnceDecayPredictor(GridTransformer):
    """Decays its own main-optimizer weights by hand once, in the first step's post_step_update: a
    change that does not come back, in a window of several hook calls."""

    name = "once_decay_predictor"

    @hookimpl
    def post_step_update(self, result, ctx):
        if ctx.step == 0:
            with torch.no_grad():
                for p in self.net.parameters():
                    p.mul_(0.999)
        return super().post_step_update(result, ctx)


class HalfOncePredictor(GridTransformer):
    """Casts its net to float16 in the first step's post_step_update (a 'memory saving' gone wrong)."""

    name = "half_once_predictor"

    @hookimpl
    def post_step_update(self, result, ctx):
        out = super().post_step_update(result, ctx)
        if ctx.step == 0:
            self.net.half()
        return out


# --------------------------------------------------------------------------- issue 13: gradient paths every step


class CutAfterStep2Policy(GaussianRefinePolicy):
    """Detaches the prompt from step 2 on (a warm-up gone wrong); its output still requires grad (the
    policy's own log_std), so the first-step autograd check passes and nothing else looks."""

    name = "cut_after_step2_policy"

    @hookimpl
    def refine(self, prompt, batch, ctx):
        out = super().refine(prompt, batch, ctx)
        return out.detach() + 0.0 * self.log_std if ctx.step >= 2 else out


class CutOnOddStepsPolicy(GaussianRefinePolicy):
    """Detaches the prompt on odd steps only (every other batch trains nothing upstream)."""

    name = "cut_on_odd_steps_policy"

    @hookimpl
    def refine(self, prompt, batch, ctx):
        out = super().refine(prompt, batch, ctx)
        return out.detach() + 0.0 * self.log_std if ctx.step % 2 else out


class NoGradNetPredictor(GridTransformer):
    """Runs its network under no_grad ('inference is cheaper') and keeps the prompt's path with a 0*prompt
    term: every hook's output still requires grad, the predictor's own group gets nothing."""

    name = "no_grad_net_predictor"

    @hookimpl
    def predict(self, prompt, batch, ctx, encoding):
        with torch.no_grad():
            logits = super().predict(prompt, batch, ctx, encoding)
        return logits + 0.0 * prompt.float().mean(-1)[:, None, None, None]


class GatedBranchPredictor(GridTransformer):
    """A gate module inside the main network whose branch is detached: the group trains, the gate never does."""

    name = "gated_branch_predictor"

    @hookimpl
    def configure(self, ctx):
        super().configure(ctx)
        self.net.gate = torch.nn.Linear(ctx.prompt_dim, 1, device=ctx.device)

    @hookimpl
    def predict(self, prompt, batch, ctx, encoding):
        gate = torch.sigmoid(self.net.gate(prompt.float())).detach()
        return super().predict(prompt, batch, ctx, encoding) * (0.5 + gate)[:, :, None, None]


class UnusedModulePredictor(GridTransformer):
    """A module added to the main network (and so to its group and the optimizer) that predict never calls."""

    name = "unused_module_predictor"

    @hookimpl
    def configure(self, ctx):
        super().configure(ctx)
        self.net.spare = torch.nn.Sequential(torch.nn.Linear(ctx.prompt_dim, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10)).to(ctx.device)


class ZeroOnOddStepsPredictor(GridTransformer):
    """Multiplies its logits by 0 on odd steps: the path exists, the gradient is exactly zero every other
    step, never 100 steps in a row."""

    name = "zero_on_odd_steps_predictor"

    @hookimpl
    def predict(self, prompt, batch, ctx, encoding):
        logits = super().predict(prompt, batch, ctx, encoding)
        return logits * 0.0 if ctx.step % 2 else logits


class FreezeAtEpochStartPredictor(GridTransformer):
    """Freezes its main-optimizer weights by hand at epoch start (requires_grad_(False)), instead of lr 0."""

    name = "freeze_at_epoch_start_predictor"

    @hookimpl
    def on_epoch_start(self, epoch, ctx):
        for p in self.net.parameters():
            p.requires_grad_(False)


class Bf16AtEpochStartPredictor(GridTransformer):
    """Casts its trainable network to bfloat16 at epoch start, under fp32: low-precision master weights."""

    name = "bf16_at_epoch_start_predictor"

    @hookimpl
    def on_epoch_start(self, epoch, ctx):
        self.net.to(torch.bfloat16)


class NoGradEncoderPrompt(QwenPrompt):
    """Runs the whole prompt model under no_grad (the original bug, moved into the prompt plugin)."""

    name = "no_grad_encoder_prompt"

    @hookimpl
    def generate_prompt(self, batch, ctx):
        with torch.no_grad():
            return super().generate_prompt(batch, ctx)


class DetachedPromptQwen(QwenPrompt):
    """Detaches the pooled prompt but not the token states: half of Qwen's path is cut."""

    name = "detached_prompt_qwen"

    @hookimpl
    def generate_prompt(self, batch, ctx):
        out = super().generate_prompt(batch, ctx)
        return TaskEncoding(out.prompt.detach(), out.tokens, out.token_mask, out.meta)


class DetachedLogitsLoss(MaskedEFELoss):
    """Computes the loss on detached logits and scales it by a temperature of its own: the loss still
    requires grad, yet no model upstream gets any."""

    name = "detached_logits_loss"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.temperature = torch.nn.Parameter(torch.ones(()))

    @hookimpl
    def compute_loss(self, logits, batch, ctx):
        out = super().compute_loss(logits.detach(), batch, ctx)
        out.loss = out.loss * self.temperature
        return out


class FastWeightsPredictor(GridTransformer):
    """'Test-time training' inside predict: a backward and its own (non-fused) SGD step on its main weights
    in a forward hook."""

    name = "fast_weights_predictor"

    @hookimpl
    def configure(self, ctx):
        super().configure(ctx)
        self.fast = torch.optim.SGD(self.net.parameters(), lr=1e-3)

    @hookimpl
    def predict(self, prompt, batch, ctx, encoding):
        aux = super().predict(prompt.detach(), batch, ctx, encoding).pow(2).mean()
        self.fast.zero_grad(set_to_none=True)
        aux.backward(retain_graph=True)
        self.fast.step()
        self.fast.zero_grad(set_to_none=True)
        return super().predict(prompt, batch, ctx, encoding)


# --------------------------------------------------------------------------- issue 13: wrong types


class TupleLogitsPredictor(GridTransformer):
    """Returns (logits, aux) from predict, as a model's forward often does."""

    name = "tuple_logits_predictor"

    @hookimpl
    def predict(self, prompt, batch, ctx, encoding):
        return super().predict(prompt, batch, ctx, encoding), {"aux": 0.0}


class BareTensorLoss(MaskedEFELoss):
    """Returns the bare loss tensor from compute_loss instead of a LossOutput."""

    name = "bare_tensor_loss"

    @hookimpl
    def compute_loss(self, logits, batch, ctx):
        return super().compute_loss(logits, batch, ctx).loss


class TensorMetricExtra(Plugin):
    """Returns a tensor as a metric from post_step_update (a device sync per step, and not a float)."""

    name = "tensor_metric_extra"

    @hookimpl
    def post_step_update(self, result, ctx):
        return {"logit_mean": result.logits.mean()}


class ThresholdAboveOneCurriculum(Plugin):
    """A curriculum whose hard-cell threshold is a percentage, not a probability."""

    name = "threshold_above_one_curriculum"
    role = "curriculum"

    @hookimpl
    def hard_cell_threshold(self, epoch, step, ctx):
        return 60.0


# --------------------------------------------------------------------------- issue 13: an exception in each hook kind


class RaisingLoss(MaskedEFELoss):
    """An ordinary bug in compute_loss."""

    name = "raising_loss"

    @hookimpl
    def compute_loss(self, logits, batch, ctx):
        raise RuntimeError("label smoothing needs 10 classes, got 0")


class RaisingPostStep(Plugin):
    """An ordinary bug in post_step_update."""

    name = "raising_post_step"

    @hookimpl
    def post_step_update(self, result, ctx):
        return {"first": [][0]}


class RaisingEpochEnd(Plugin):
    """An ordinary bug in on_epoch_end."""

    name = "raising_epoch_end"

    @hookimpl
    def on_epoch_end(self, epoch, summary, ctx):
        return {"ratio": summary["batches"] / 0}


class RaisingAugment(Plugin):
    """An ordinary bug in augment_example (the loader's side of the step)."""

    name = "raising_augment"

    @hookimpl
    def augment_example(self, example, rng, ctx):
        return example.rotate(1)


class RaisingStateDict(Plugin):
    """An ordinary bug in state_dict (what a checkpoint saves)."""

    name = "raising_state_dict"

    @hookimpl
    def state_dict(self, ctx):
        raise TypeError("cannot pickle 'generator' object")


# --------------------------------------------------------------------------- issue 13: the batch, other ways


class TargetRelabelPolicy(GaussianRefinePolicy):
    """Changes target values in place (relabels colour 0 as 1) inside refine."""

    name = "target_relabel_policy"

    @hookimpl
    def refine(self, prompt, batch, ctx):
        batch.targets[batch.targets == 0] = 1
        return super().refine(prompt, batch, ctx)


class MaskReplacingPredictor(GridTransformer):
    """Replaces the target mask by an all-true one (the loss would count padding cells)."""

    name = "mask_replacing_predictor"

    @hookimpl
    def predict(self, prompt, batch, ctx, encoding):
        batch.target_mask = torch.ones_like(batch.target_mask)
        return super().predict(prompt, batch, ctx, encoding)


class FloatCopyTargetLoss(MaskedEFELoss):
    """A loss on a float copy of the targets (the batch left alone): MSE between the expected colour and
    the target colour number - it trains, silently, on the wrong thing."""

    name = "float_copy_target_loss"

    @hookimpl
    def compute_loss(self, logits, batch, ctx):
        target = torch.where(batch.target_mask, batch.targets, 0).float()
        colours = torch.arange(10, dtype=logits.dtype, device=logits.device)
        expected = (logits.softmax(-1) * colours).sum(-1)
        return LossOutput(loss=((expected - target) ** 2)[batch.target_mask].mean())


class DataDecayPredictor(GridTransformer):
    """Decays its main-optimizer weights by hand through ``.data`` in post_step_update (the legacy idiom):
    no version counter moves."""

    name = "data_decay_predictor"

    @hookimpl
    def post_step_update(self, result, ctx):
        for p in self.net.parameters():
            p.data.mul_(0.999)
        return super().post_step_update(result, ctx)


class DataWriteOncePredictor(GridTransformer):
    """Writes into its main-optimizer weights through .data once, in predict at step 1 (a 'warm start'
    gone wrong): no hook call of a later step does it again."""

    name = "data_write_once_predictor"

    @hookimpl
    def predict(self, prompt, batch, ctx, encoding):
        if not getattr(self, "_written", False):
            self._written = True
            for p in self.net.parameters():
                p.data.add_(0.01)
        return super().predict(prompt, batch, ctx, encoding)
