"""Grid predictor ("agent"): query input grid + refined prompt -> logits over 10 colours per cell."""

from __future__ import annotations

import torch
from torch import nn

from arcfw.core.batch import NUM_COLOURS
from arcfw.core.context import ParamGroup
from arcfw.core.hookspecs import hookimpl
from arcfw.core.plugin import Plugin


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


class GridAgent(Plugin):
    """Predicts the query's output grid, cell by cell, from its input grid and the refined prompt."""

    name = "agent"
    role = "predictor"
    description = "Conv grid predictor conditioned on the refined prompt (FiLM); logits over 10 colours per cell"

    def __init__(self, channels: int = 64, layers: int = 4):
        if channels < 1 or layers < 1:
            raise ValueError("channels and layers must be >= 1")
        self.channels = channels
        self.layers = layers
        self.net: AgentNet | None = None

    @hookimpl
    def configure(self, ctx):
        self.net = AgentNet(ctx.prompt_dim, self.channels, self.layers).to(ctx.device)

    @hookimpl
    def parameter_groups(self, ctx):
        return [ParamGroup(name="agent", params=list(self.net.parameters()), lr=1e-3, modules=[self.net])]

    @hookimpl
    def predict(self, prompt, batch, ctx):
        return self.net(prompt, batch.inputs, batch.canvas_mask)
