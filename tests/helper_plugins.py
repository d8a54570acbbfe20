"""Well-behaved plugins the tests load by import path (``helper_plugins:SendSignal``), as a user's would be:
predictable evaluation results, and checkpoint helpers (a signal at an exact step, third-party state)."""

from __future__ import annotations

import os
import random
import signal

import numpy as np
import torch
from torch import nn

from arcfw.core.data.batch import NUM_COLOURS
from arcfw.core.data.shapes import mask_shapes
from arcfw.core.engine.context import LossOutput, Metric, ParamGroup
from arcfw.core.engine.hookspecs import hookimpl
from arcfw.core.engine.plugin import Plugin


class CopyInputPredictor(Plugin):
    """Predicts the query input itself at the input's size: the copy baseline, run through the model's path."""

    name = "copy_input_predictor"
    role = "predictor"

    @hookimpl
    def predict(self, prompt, batch, ctx):
        colours = torch.where(batch.input_mask, batch.inputs, torch.zeros_like(batch.inputs))
        logits = 10.0 * (colours[..., None] == torch.arange(NUM_COLOURS, device=prompt.device)).float()
        return logits + 0.0 * prompt.sum(-1)[:, None, None, None]  # keeps the gradient path to the prompt

    @hookimpl
    def predict_shape(self, prompt, batch, ctx):
        return mask_shapes(batch.input_mask)[:, None, :]


class RecolourPredictor(CopyInputPredictor):
    """The copy predictor, except that where the input is 1 it prefers 2, by 1.2 in log-probability."""

    name = "recolour_predictor"

    @hookimpl
    def predict(self, prompt, batch, ctx):
        logits = super().predict(prompt, batch, ctx)
        ones = (batch.inputs == 1) & batch.input_mask
        return logits + 11.2 * (ones[..., None] & (torch.arange(NUM_COLOURS, device=prompt.device) == 2)).float()


class SendSignal(Plugin):
    """Sends ``signal`` to its own process ``times`` times after optimizer step number ``after_step``
    (1-based), as a scheduler or a user pressing Ctrl-C would, at an exact step (with gradient
    accumulation: after its last micro-batch)."""

    name = "send_signal"
    role = "extra"

    def __init__(self, after_step: int, signal: str = "SIGINT", times: int = 1):
        self.after_step, self.signal, self.times = after_step, signal, times

    @hookimpl
    def post_step_update(self, result, ctx):
        if result.step + 1 == self.after_step and result.micro_batch == result.micro_batches - 1:
            for _ in range(self.times):
                os.kill(os.getpid(), getattr(signal, self.signal))
        return None


class StepCounter(Plugin):
    """A third-party plugin with state of its own (a count of its updates, reported as a metric) and a
    trainable parameter that belongs to no module (a ParamGroup without modules)."""

    name = "step_counter"
    role = "extra"

    def __init__(self):
        self.count = 0

    @hookimpl
    def configure(self, ctx):
        self.bias = nn.Parameter(torch.zeros((), device=ctx.device))

    @hookimpl
    def parameter_groups(self, ctx):
        return [ParamGroup("counter_bias", [self.bias], lr=1e-2)]

    @hookimpl
    def compute_loss(self, logits, batch, ctx):
        return LossOutput(loss=1e-3 * (self.bias - 1.0) ** 2)

    @hookimpl
    def post_step_update(self, result, ctx):
        self.count += 1
        return {"counter": float(self.count)}

    @hookimpl
    def state_dict(self, ctx):
        return {"count": self.count}

    @hookimpl
    def load_state_dict(self, state, ctx):
        self.count = int(state["count"])


class NumpyState(Plugin):
    """Returns a numpy array from state_dict: ``torch.load(weights_only=True)`` could not read it back."""

    name = "numpy_state"
    role = "extra"

    @hookimpl
    def state_dict(self, ctx):
        return {"table": np.zeros(3)}

    @hookimpl
    def load_state_dict(self, state, ctx):
        pass


class RandomDraws(Plugin):
    """Draws from the global python, numpy and torch RNGs every step and logs the draws, so a
    resumed run that did not restore those RNG states logs different numbers."""

    name = "random_draws"
    role = "extra"

    @hookimpl
    def post_step_update(self, result, ctx):
        return {"draw_python": random.random(), "draw_numpy": float(np.random.rand()), "draw_torch": torch.rand(()).item()}


class DemoColourPredictor(Plugin):
    """Answers every cell with the colour of the first demonstration output's top-left cell, at the
    query input's size: a predictor whose answer comes from the demonstrations alone."""

    name = "demo_colour_predictor"
    role = "predictor"

    @hookimpl
    def predict(self, prompt, batch, ctx):
        colours = torch.tensor([int(ex.demos[0].output[0, 0]) if ex.demos else 0 for ex in batch.examples], device=prompt.device)
        logits = 10.0 * (colours[:, None] == torch.arange(NUM_COLOURS, device=prompt.device)).float()  # [B, 10]
        return logits[:, None, None, :].expand(*batch.inputs.shape, NUM_COLOURS) + 0.0 * prompt.sum(-1)[:, None, None, None]

    @hookimpl
    def predict_shape(self, prompt, batch, ctx):
        return mask_shapes(batch.input_mask)[:, None, :]


class SignalOnTask(Plugin):
    """Sends SIGTERM to its own process at the first training step on task ``task_id`` (test-time
    training), once: not if the file ``once`` exists, which it then creates."""

    name = "signal_on_task"
    role = "extra"

    def __init__(self, task_id: str, once: str):
        self.task_id, self.once = task_id, once

    @hookimpl
    def post_step_update(self, result, ctx):
        if result.step == 0 and result.batch.examples[0].task_id == self.task_id and not os.path.exists(self.once):
            open(self.once, "w").close()
            os.kill(os.getpid(), signal.SIGTERM)
        return None


class HistogramPrompt(Plugin):
    """A prompt plugin other than Qwen: a linear map of the query input's colour histogram.  It
    declares its own metrics (its gradient norm, the prompt's size), which the console line,
    the summaries and the plot show in place of Qwen's."""

    name = "histogram_prompt"
    role = "prompt"
    metrics = (
        Metric("hist_grad", console=30, fmt=".4g", plot="histogram prompt gradient", grad_norm_of=("hist_prompt",)),
        Metric("prompt_norm", console=35, fmt=".3f", epoch="last"),
    )

    def __init__(self, dim: int = 16):
        self.dim = dim

    @hookimpl
    def configure(self, ctx):
        ctx.prompt_dim = self.dim
        self.net = nn.Linear(NUM_COLOURS, self.dim).to(ctx.device)

    @hookimpl
    def parameter_groups(self, ctx):
        return [ParamGroup(name="hist_prompt", params=list(self.net.parameters()), lr=1e-3, modules=[self.net])]

    @hookimpl
    def generate_prompt(self, batch, ctx):
        cells = torch.nn.functional.one_hot(batch.inputs.clamp_max(NUM_COLOURS - 1), NUM_COLOURS).float()
        hist = (cells * batch.input_mask[..., None]).sum(dim=(1, 2)) / batch.input_mask.sum(dim=(1, 2))[:, None]
        return self.net(hist)

    @hookimpl
    def post_step_update(self, result, ctx):
        return {"prompt_norm": float(result.prompt.norm(dim=-1).mean())}
