"""Plugins that make a metric name another plugin (or the engine) already makes (issue 14 item 5).

Loaded by configs through import paths (``collision_plugins:AuxCellAccLoss``).
"""

from __future__ import annotations

from arcfw.core.engine.context import LossOutput, Metric
from arcfw.core.engine.hookspecs import hookimpl
from arcfw.core.engine.plugin import Plugin


class AuxCellAccLoss(Plugin):
    """An auxiliary loss (role extra) that logs ``cell_acc`` without declaring it: efe_loss's name."""

    name = "aux_cell_acc"

    @hookimpl
    def compute_loss(self, logits, batch, ctx):
        return LossOutput(loss=logits.float().mean() * 0.0, metrics={"cell_acc": 0.25})


class DeclaresCellAcc(Plugin):
    """Declares ``cell_acc``, which efe_loss declares too."""

    name = "declares_cell_acc"
    metrics = (Metric("cell_acc", plot="my cell accuracy"),)


class DeclaresStep(Plugin):
    """Declares ``step``, a key of every batch record the engine writes."""

    name = "declares_step"
    metrics = (Metric("step"),)


class LogsShared(Plugin):
    """Logs ``shared`` from post_step_update (undeclared): twice in one config, the instances collide."""

    name = "logs_shared"

    @hookimpl
    def post_step_update(self, result, ctx):
        return {"shared": 1.0}


class EpochAvgLoss(Plugin):
    """Returns ``avg_loss`` from on_epoch_end: the epoch summary's key of the engine's loss."""

    name = "epoch_avg_loss"

    @hookimpl
    def on_epoch_end(self, epoch, summary, ctx):
        return {"avg_loss": 0.0}


class EpochExtra(Plugin):
    """Returns a key of its own from on_epoch_end."""

    name = "epoch_extra"

    @hookimpl
    def on_epoch_end(self, epoch, summary, ctx):
        return {"my_epoch_value": float(epoch) + 0.5}


class OwnCellAccLoss(Plugin):
    """A loss plugin (role loss) that replaces efe_loss and declares ``cell_acc`` itself: no collision."""

    name = "own_cell_acc_loss"
    role = "loss"
    metrics = (Metric("cell_acc", console=50, fmt=".3f", plot="cell accuracy"),)

    @hookimpl
    def compute_loss(self, logits, batch, ctx):
        import torch

        target = batch.targets.masked_fill(~batch.target_mask, -100)
        loss = torch.nn.functional.cross_entropy(logits.float().permute(0, 3, 1, 2), target, ignore_index=-100)
        right = (logits.argmax(-1) == batch.targets) & batch.target_mask
        return LossOutput(loss=loss, metrics={"cell_acc": 0.125 + 0.0 * float(right.sum())})


class TakesName(Plugin):
    """A constructor parameter called ``name``: the YAML key ``name`` is the plugin's own."""

    def __init__(self, name: str = "x"):
        self.label = name
