"""Grid predictor ("agent"): query input grid + refined prompt -> logits over 10 colours per cell,
and the output grid's size (a size head with its own optimizer, used at evaluation)."""

from __future__ import annotations

import torch
from torch import nn

from arcfw.core.data.batch import NUM_COLOURS
from arcfw.core.engine.context import ParamGroup
from arcfw.core.engine.hookspecs import hookimpl
from arcfw.core.engine.plugin import Plugin
from arcfw.core.nn import SizeLearner, SizePredictor


class _Block(nn.Module):
    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.mix = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h = h * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]  # FiLM from the prompt
        h = self.mix(torch.nn.functional.gelu(h))
        return (x + h) * mask  # cells outside the example's canvas stay exactly 0


class AgentNet(nn.Module):
    """Dilated residual conv net with FiLM conditioning on the prompt.

    Dilations 1, 2, 4, 8, ... give a receptive field that covers a 30x30 grid
    in a few layers.  Features are zeroed outside each example's own canvas
    after every layer, which makes zero padding of a batch exact: an example
    gives the same logits alone or padded in a batch.
    """

    def __init__(self, prompt_dim: int, channels: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(NUM_COLOURS + 1, channels)  # 10 colours + "no input cell"
        self.film = nn.Linear(prompt_dim, 2 * channels * layers)
        self.blocks = nn.ModuleList(_Block(channels, 2 ** (i % 4)) for i in range(layers))
        self.head = nn.Conv2d(channels, NUM_COLOURS, 1)
        # small, not zero: with a zero FiLM the prompt (and so Qwen) would get exactly no gradient at step 1
        nn.init.normal_(self.film.weight, std=0.02)
        nn.init.zeros_(self.film.bias)

    def forward(self, prompt: torch.Tensor, inputs: torch.Tensor, canvas_mask: torch.Tensor) -> torch.Tensor:
        mask = canvas_mask[:, None].to(self.embed.weight.dtype)
        x = self.embed(inputs).permute(0, 3, 1, 2) * mask
        film = self.film(prompt).view(prompt.shape[0], len(self.blocks), 2, -1)
        for i, block in enumerate(self.blocks):
            x = block(x, film[:, i, 0], film[:, i, 1], mask)
        return self.head(x).permute(0, 2, 3, 1)  # [B, H, W, 10]


class GridAgent(SizePredictor, Plugin):
    """Predicts the query's output grid, cell by cell, from its input grid and the refined prompt.

    Its :class:`SizeHead` predicts the output grid's size at evaluation
    (``predict_shape``).  The head learns after every step, in
    ``post_step_update``, from the detached refined prompt and the answer's
    size (cross-entropy of rows and columns, its own Adam with ``size_lr``),
    like the RL policy: the main loss and its gradients stay those of the grid.
    Logs ``size_loss`` and ``size_acc`` (before the update).

    Parameters (YAML):

    - ``channels``: width of the conv net (its parameter group is ``agent``).
    - ``layers``: residual blocks (dilations 1, 2, 4, 8, repeated).
    - ``size_lr``: learning rate of the size head's own Adam (0: the head does not learn).
    """

    name = "agent"
    role = "predictor"
    description = "Conv grid predictor conditioned on the refined prompt (FiLM); logits over 10 colours per cell"

    def __init__(self, channels: int = 64, layers: int = 4, size_lr: float = 1e-3):
        if channels < 1 or layers < 1:
            raise ValueError("channels and layers must be >= 1")
        if not size_lr >= 0:
            raise ValueError(f"size_lr must be >= 0, got {size_lr!r}")
        self.channels = channels
        self.layers = layers
        self.size_lr = float(size_lr)
        self.net: AgentNet | None = None
        self.sizes: SizeLearner | None = None  # the size head and its optimizer (configure)

    @hookimpl
    def configure(self, ctx):
        self.net = AgentNet(ctx.prompt_dim, self.channels, self.layers).to(ctx.device)
        self.sizes = SizeLearner(ctx.prompt_dim, 2 * self.channels, self.size_lr, ctx.device, ctx.fused_optimizers)

    @hookimpl
    def parameter_groups(self, ctx):
        return [ParamGroup(name="agent", params=list(self.net.parameters()), lr=1e-3, modules=[self.net], module_attr="net")]

    @hookimpl
    def predict(self, prompt, batch, ctx):
        return self.net(prompt, batch.inputs, batch.canvas_mask)
