"""Example plugin (refine role): a residual MLP on the prompt, trained by the main loss.

The default refine plugin (``rl_policy``) is an RL policy that learns from its
own reward after the step.  This one is the other kind: an ordinary module in
the main graph, with its own parameter group and learning rate, trained by
backpropagation of the main loss like Qwen and the grid predictor::

    refined = prompt + MLP(LayerNorm(prompt))      # last layer starts at zero: refined == prompt

Use it by import path (the folder of this file on ``PYTHONPATH``)::

    PYTHONPATH=examples/residual_refine arcfw run examples/residual_refine/config.yaml
"""

from __future__ import annotations

import torch
from torch import nn

from arcfw.core.context import ParamGroup
from arcfw.core.hookspecs import hookimpl
from arcfw.core.plugin import Plugin


class ResidualMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        nn.init.zeros_(self.down.weight)  # starts as the identity map of the prompt
        nn.init.zeros_(self.down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class ResidualRefiner(Plugin):
    """Residual MLP refinement of the prompt, in the main graph (its own group ``residual_refine``)."""

    name = "residual_refine"
    role = "refine"
    description = "Residual MLP on the prompt, trained by the main loss (example plugin)"

    # Constructor keyword arguments are the YAML parameters; the config loader
    # checks names and types against this signature before anything is built.
    def __init__(self, hidden: int = 64, lr: float = 1e-3):
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.hidden = hidden
        self.lr = lr
        self.net: ResidualMLP | None = None

    @hookimpl
    def configure(self, ctx):
        # ctx.prompt_dim was set by the prompt plugin, configured before us (role order).
        self.net = ResidualMLP(ctx.prompt_dim, self.hidden).to(ctx.device)  # float32 parameters

    @hookimpl
    def parameter_groups(self, ctx):
        # The engine puts these in the one main optimizer, in train mode, watches their
        # gradient and saves the module in checkpoints. optimizer.lr.residual_refine overrides lr.
        return [ParamGroup(name="residual_refine", params=list(self.net.parameters()), lr=self.lr, modules=[self.net])]

    @hookimpl
    def refine(self, prompt, batch, ctx):
        # Same shape and dtype as the prompt, and differentiable in it: no torch.no_grad(), no .detach().
        return self.net(prompt.float()).to(prompt.dtype)
