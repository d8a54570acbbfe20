"""Example plugin package (loss role): focal cross-entropy over every cell of the answer.

The default loss (``efe_loss``) counts only the *hard* cells under the
curriculum threshold.  Focal loss weighs every valid cell instead by how wrong
it still is::

    cell loss = -(1 - p_y) ** gamma * log p_y        (p_y: predicted probability of the right colour)
    example loss = mean over the example's answer cells;  batch loss = mean over examples

It also keeps a little state that a resumed run needs to continue the same
run - an exponential moving average of the loss, logged as ``focal_ema`` -
to show the ``post_step_update`` / ``state_dict`` / ``load_state_dict`` hooks.

Registered by this package's entry point (see ``pyproject.toml``), so a
config names it ``focal_loss`` once the package is installed.
"""

from __future__ import annotations

import torch

from arcfw.core.engine.context import LossOutput, Metric
from arcfw.core.engine.hookspecs import hookimpl
from arcfw.core.engine.plugin import Plugin


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-example focal loss ``[B]`` over the cells where ``mask`` is True."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, H, W]
    cell = -((1 - logp.exp()) ** gamma) * logp
    m = mask.float()
    return (cell * m).sum((1, 2)) / m.sum((1, 2)).clamp_min(1.0)


class FocalLoss(Plugin):
    """Focal cross-entropy over all answer cells (example plugin package)."""

    name = "focal_loss"
    role = "loss"
    description = "Focal cross-entropy over every answer cell (example plugin package)"
    # what the console line, the epoch summary and `arcfw plot` show of this plugin's metrics
    metrics = (
        Metric("focal_ema", console=45, epoch="last", plot="focal loss (EMA)"),
        Metric("cell_acc", console=50, epoch="edges", fmt=".3f", plot="cell accuracy"),
    )

    def __init__(self, gamma: float = 2.0, ema_momentum: float = 0.9):
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if not 0 <= ema_momentum < 1:
            raise ValueError(f"ema_momentum must be in [0, 1), got {ema_momentum}")
        self.gamma = float(gamma)
        self.ema_momentum = float(ema_momentum)
        self.ema: float | None = None  # state: survives a resume through state_dict/load_state_dict

    @hookimpl
    def compute_loss(self, logits, batch, ctx):
        # targets are int64 [B, H, W]; target_mask marks the answer's cells. Never call backward() here.
        per_example = focal_loss(logits, batch.targets, batch.target_mask, self.gamma)
        with torch.no_grad():
            right = ((logits.argmax(-1) == batch.targets) & batch.target_mask).sum((1, 2))
            acc = (right.float() / batch.target_mask.sum((1, 2)).clamp_min(1)).mean()
        # metrics are plain floats; mask_ratio is 1: every valid cell counts
        return LossOutput(loss=per_example.mean(), metrics={"cell_acc": float(acc), "mask_ratio": 1.0}, per_example=per_example.detach())

    @hookimpl
    def post_step_update(self, result, ctx):
        # After the optimizer step, with detached values only.
        if result.applied:
            m = self.ema_momentum
            self.ema = result.loss if self.ema is None else m * self.ema + (1 - m) * result.loss
        return {"focal_ema": self.ema} if self.ema is not None else None

    @hookimpl
    def state_dict(self, ctx):
        return {"ema": self.ema}

    @hookimpl
    def load_state_dict(self, state, ctx):
        self.ema = state["ema"]
