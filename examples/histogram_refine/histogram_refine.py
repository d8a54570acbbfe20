"""Example plugin (refine role): condition the prompt on the query input's colours, trained by the main loss.

The default refine plugin (``rl_policy``) is an RL policy that learns from its
own reward after the step.  This one is the other kind: an ordinary module in
the main graph, with its own parameter group and learning rate, trained by
backpropagation of the main loss like Qwen and the grid predictor.  It reads
the batch as well as the prompt: the share of each colour among the query
input's cells (padding excluded) sets a per-dimension scale and shift::

    gamma, beta = MLP(colour shares of the query input)     # last layer starts at zero
    refined     = prompt * (1 + gamma) + beta               # refined == prompt at the start

The refined prompt stays differentiable in the prompt, so Qwen keeps learning
through it.  Loaded by import path (the config's folder is searched)::

    arcfw run examples/histogram_refine/config.yaml
"""

from __future__ import annotations

import torch
from torch import nn

from arcfw.core.data.batch import NUM_COLOURS
from arcfw.core.engine.context import ParamGroup
from arcfw.core.engine.hookspecs import hookimpl
from arcfw.core.engine.plugin import Plugin


def colour_shares(inputs: torch.Tensor, input_mask: torch.Tensor) -> torch.Tensor:
    """``[B, 10]``: the share of each colour among each query input's cells (padding cells excluded)."""
    colours = torch.arange(NUM_COLOURS, device=inputs.device)
    counts = ((inputs[..., None] == colours) & input_mask[..., None]).sum((1, 2)).float()
    return counts / input_mask.sum((1, 2)).clamp_min(1)[:, None]


class HistogramRefine(Plugin):
    """Scales and shifts the prompt by a function of the query input's colour shares (own group ``histogram_refine``)."""

    name = "histogram_refine"
    role = "refine"
    description = "FiLM of the prompt from the query input's colour histogram, trained by the main loss (example plugin)"

    # Constructor keyword arguments are the YAML parameters; the config loader
    # checks names and types against this signature before anything is built.
    def __init__(self, hidden: int = 32, lr: float = 1e-3):
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.hidden = hidden
        self.lr = lr
        self.net: nn.Sequential | None = None

    @hookimpl
    def configure(self, ctx):
        # ctx.prompt_dim was set by the prompt plugin, configured before us (role order).
        d = ctx.prompt_dim
        self.net = nn.Sequential(nn.Linear(NUM_COLOURS, self.hidden), nn.GELU(), nn.Linear(self.hidden, 2 * d)).to(ctx.device)
        nn.init.zeros_(self.net[2].weight)  # starts as the identity on the prompt
        nn.init.zeros_(self.net[2].bias)

    @hookimpl
    def parameter_groups(self, ctx):
        # The engine puts these in the one main optimizer, in train mode, watches their gradient
        # and saves the module in checkpoints. optimizer.lr.histogram_refine overrides lr.
        return [ParamGroup(name="histogram_refine", params=list(self.net.parameters()), lr=self.lr, modules=[self.net])]

    @hookimpl
    def refine(self, prompt, batch, ctx):
        # Reads the query input (never batch.targets); same shape and dtype as the prompt, and
        # differentiable in it: no torch.no_grad(), no .detach().
        gamma, beta = self.net(colour_shares(batch.inputs, batch.input_mask)).chunk(2, dim=-1)
        return (prompt.float() * (1 + gamma) + beta).to(prompt.dtype)
