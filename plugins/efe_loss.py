"""Masked expected-free-energy loss over the hard cells of the predicted grid.

The math lives in :func:`efe_loss` (a pure function of tensors); the plugin
:class:`MaskedEFELoss` only reads the batch and the context and calls it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from arcfw.core.data.batch import NUM_COLOURS, Batch
from arcfw.core.engine.context import THRESHOLD_KEY, Context, LossOutput, Metric
from arcfw.core.engine.hookspecs import hookimpl
from arcfw.core.engine.plugin import Plugin
from arcfw.core.errors import ContractError

__all__ = ["MaskedEFELoss", "efe_loss"]

_PLUGIN = "efe_loss"
_HOOK = "compute_loss"


#: which cells are hard (see :func:`efe_loss`)
HARD_CELLS = ("wrong_or_unsure", "threshold")


def _check_params(label_smoothing: float, ambiguity_weight: float, min_scale: float, hard_cells: str = "wrong_or_unsure",
                  change_weight: float = 1.0) -> None:
    if not 0.0 < label_smoothing < 1.0:  # with 0 the smoothed target has zeros and KL(p||q) is infinite
        raise ValueError(f"efe_loss: label_smoothing must be in (0, 1), got {label_smoothing!r}")
    if not ambiguity_weight >= 0.0:  # also rejects NaN
        raise ValueError(f"efe_loss: ambiguity_weight must be >= 0, got {ambiguity_weight!r}")
    if not 0.0 <= min_scale <= 1.0:
        raise ValueError(f"efe_loss: min_scale must be in [0, 1], got {min_scale!r}")
    if hard_cells not in HARD_CELLS:
        raise ValueError(f"efe_loss: hard_cells must be one of {', '.join(HARD_CELLS)}, got {hard_cells!r}")
    if isinstance(change_weight, bool) or not isinstance(change_weight, (int, float)) or not change_weight > 0.0:
        raise ValueError(f"efe_loss: change_weight must be a number > 0, got {change_weight!r}")


def _contract(expected: str, got: str) -> ContractError:
    return ContractError(plugin=_PLUGIN, hook=_HOOK, expected=expected, got=got)


def _check_tensors(logits: torch.Tensor, targets: torch.Tensor, valid_mask: torch.Tensor) -> None:
    if not logits.is_floating_point() or logits.dim() != 4 or logits.shape[-1] != NUM_COLOURS:
        raise _contract(
            f"floating logits [B, H, W, {NUM_COLOURS}]", f"{logits.dtype} {tuple(logits.shape)}"
        )
    if targets.dtype != torch.int64:
        raise _contract("int64 class-index targets [B, H, W]", f"{targets.dtype} {tuple(targets.shape)}")
    if targets.shape != logits.shape[:-1]:
        raise _contract(
            f"int64 class-index targets [B, H, W] matching logits {tuple(logits.shape)}",
            f"{targets.dtype} {tuple(targets.shape)}",
        )
    if valid_mask.shape != targets.shape:
        raise _contract(
            f"valid mask [B, H, W] matching targets {tuple(targets.shape)}",
            f"{valid_mask.dtype} {tuple(valid_mask.shape)}",
        )


def efe_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid_mask: torch.Tensor,
    threshold: float,
    label_smoothing: float = 0.1,
    ambiguity_weight: float = 0.1,
    min_scale: float = 0.5,
    hard_cells: str = "wrong_or_unsure",
    changed: torch.Tensor | None = None,
    change_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    r"""Masked EFE loss; returns ``(loss, per_example_loss, stats)``.

    Shapes: logits ``[B,H,W,10]`` (any float dtype; computed in float32),
    targets y int64 ``[B,H,W]``, valid mask ``[B,H,W]`` (bool).

    Per cell c (ε = label_smoothing, w = ambiguity_weight, s = min_scale):

        p          = softmax(logits_c)                      (log p from log_softmax)
        q          = (1-ε)·onehot(y_c) + ε/10
        risk_c     = KL(p‖q) = Σ_k p_k (log p_k − log q_k)
        ambiguity_c = w · H(p) = −w Σ_k p_k log p_k
        EFE_c      = risk_c + ambiguity_c

    Hard cells (decided without gradient), by ``hard_cells``:

    - ``"wrong_or_unsure"`` (default): valid cells whose target is not the
      single most likely colour (``p_{y_c} <= max_{k != y_c} p_k``: a wrong
      argmax, or a tie such as a 50/50 split) *or* with ``p_{y_c} < threshold``.
      A wrong cell is always hard, whatever the threshold, so the loss cannot
      stall on cells the model gets wrong; the threshold adds the cells that
      are right but unsure.  A step has no hard cell only when every valid
      cell is right with ``p_{y_c} >= threshold``.
    - ``"threshold"``: valid cells with ``p_{y_c} < threshold`` only (the
      original rule).  Once the threshold is below 0.5 a cell split 50/50
      between its target and another colour is not hard and gets no loss.

    With a threshold above 0.5 the two rules coincide (a wrong cell has
    ``p_{y_c} <= 0.5``): under the default curriculum they differ from epoch 1
    on, where the threshold is 0.3.

    Per example b:

        n_valid_b, n_hard_b, mask_ratio_b = n_hard_b / n_valid_b
        L_b = (Σ_{hard c} v_c·EFE_c / max(Σ_{hard c} v_c, 1)) · (s + (1 − s)·mask_ratio_b)

    with cell weights v_c = ``change_weight`` on the cells of ``changed`` (bool
    ``[B,H,W]``: the cells whose target differs from the input cell at the same
    place) and 1 elsewhere - all 1 by default, a plain mean over hard cells.
    (L_b is 0, with the gradient path kept, when b has no hard cell.)

    Batch loss = mean over b of L_b.  An example with no valid cell is an error.

    Metrics (Python floats): mask_ratio and cell_acc (argmax == y over valid
    cells) are averaged over examples; hard_cells is the total count in the
    batch; risk and ambiguity are the means over all hard cells of the batch
    (0.0 when there is none).

    ``loss`` is a float32 scalar with gradient to ``logits``; ``per_example_loss``
    is float32 ``[B]`` (not detached); ``stats`` holds the metrics as Python
    floats, read with a single device sync.
    """
    _check_params(label_smoothing, ambiguity_weight, min_scale, hard_cells, change_weight)
    _check_tensors(logits, targets, valid_mask)
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"efe_loss: threshold must be in (0, 1], got {threshold!r}")

    dev_type = logits.device.type
    no_autocast = (
        torch.autocast(device_type=dev_type, enabled=False)
        if torch.amp.is_autocast_available(dev_type)
        else contextlib.nullcontext()
    )
    with no_autocast:
        x = logits.float()
        valid = valid_mask.to(dtype=torch.bool)
        eps = float(label_smoothing)

        # padded cells may hold any value: index with 0 there (they are never scored)
        y = torch.where(valid, targets, torch.zeros_like(targets))

        log_p = F.log_softmax(x, dim=-1)  # [B,H,W,10]
        p = torch.softmax(x, dim=-1)
        # onehot(y) built by comparison (F.one_hot would sync on CUDA to range-check y)
        classes = torch.arange(NUM_COLOURS, device=x.device)
        onehot = (classes == y.unsqueeze(-1)).to(torch.float32)
        q = (1.0 - eps) * onehot + eps / NUM_COLOURS
        log_q = torch.log(q)  # -inf off the target when eps == 0 (KL is then infinite)

        risk = (p * (log_p - log_q)).sum(dim=-1)  # [B,H,W]
        ambiguity = -float(ambiguity_weight) * (p * log_p).sum(dim=-1)  # [B,H,W]
        efe = risk + ambiguity

        with torch.no_grad():
            p_y = p.detach().gather(-1, y.unsqueeze(-1)).squeeze(-1)
            hard = valid & (p_y < float(threshold))
            if hard_cells == "wrong_or_unsure":
                rival = p.detach().masked_fill(classes == y.unsqueeze(-1), -1.0).amax(dim=-1)  # best other colour
                hard = hard | (valid & (p_y <= rival))
            n_valid = valid.sum(dim=(1, 2)).to(torch.float32)  # [B]
            n_hard = hard.sum(dim=(1, 2)).to(torch.float32)  # [B]
            mask_ratio = n_hard / n_valid.clamp_min(1.0)
            scale = min_scale + (1.0 - min_scale) * mask_ratio
            correct = ((x.detach().argmax(dim=-1) == y) & valid).sum(dim=(1, 2)).to(torch.float32)
            cell_acc = correct / n_valid.clamp_min(1.0)

        zero = efe.new_zeros(())
        if changed is not None and change_weight != 1.0:
            weight = torch.where(changed.to(torch.bool), float(change_weight), 1.0) * hard  # [B,H,W], 0 off the hard cells
            efe_sum = (efe * weight).sum(dim=(1, 2))
            per_example = efe_sum / weight.sum(dim=(1, 2)).clamp_min(1.0) * scale
        else:
            efe_sum = torch.where(hard, efe, zero).sum(dim=(1, 2))  # [B]; keeps the graph when no cell is hard
            per_example = efe_sum / n_hard.clamp_min(1.0) * scale
        loss = per_example.mean()

        with torch.no_grad():
            n_hard_total = n_hard.sum()
            denom = n_hard_total.clamp_min(1.0)
            risk_mean = torch.where(hard, risk.detach(), zero).sum() / denom
            amb_mean = torch.where(hard, ambiguity.detach(), zero).sum() / denom
            values = torch.stack(
                [
                    mask_ratio.mean(),
                    cell_acc.mean(),
                    n_hard_total,
                    risk_mean,
                    amb_mean,
                    n_valid.min(),
                ]
            ).tolist()  # the one device sync

    mr, acc, nh, r, a, min_valid = values
    if min_valid < 1:
        empty = (n_valid == 0).nonzero().flatten().tolist()
        raise ValueError(f"efe_loss: example(s) {empty} of the batch have no valid target cell")
    stats = {"mask_ratio": mr, "cell_acc": acc, "hard_cells": nh, "risk": r, "ambiguity": a}
    return loss, per_example, stats


class MaskedEFELoss(Plugin):
    """Loss plugin: expected free energy (KL risk + weighted entropy) over the hard cells.

    Parameters (YAML): ``label_smoothing`` ε in (0, 1), ``ambiguity_weight`` w >= 0,
    ``min_scale`` s in [0, 1], ``hard_cells``: ``wrong_or_unsure`` (default: a cell whose
    most likely colour is wrong is always hard, and the threshold adds the right but unsure
    ones) or ``threshold`` (only ``p(target) < threshold``).  Reads the hard-cell threshold
    from ``ctx.schedule["hard_cell_threshold"]`` (the curriculum's), :attr:`DEFAULT_THRESHOLD`
    when no plugin fills the curriculum role.
    ε must be > 0: with ε = 0, q has zeros and KL(p‖q) is +inf for any non-one-hot p.
    The formula is written out in :func:`efe_loss`.

    Parameters (YAML):

    - ``label_smoothing``: ε in (0, 1): the target distribution is ``(1-ε)·onehot + ε/10``.
    - ``ambiguity_weight``: w >= 0, the weight of the prediction's entropy beside the KL risk.
    - ``min_scale``: s in [0, 1]: an example's loss is scaled by ``s + (1-s)·mask_ratio`` (s = 1: no scaling).
    - ``hard_cells``: ``wrong_or_unsure`` (a wrong cell is always hard, the threshold adds the unsure ones) or ``threshold`` (only ``p(target) < threshold``).
    - ``change_weight``: v > 0, the weight of a hard cell whose target differs from the query input's
      cell at the same place (or lies outside the input) against 1 for a cell the rule keeps: the cells
      a rule changes are the ones that tell rules apart (1: a plain mean over hard cells).
    """

    name = "efe_loss"
    role = "loss"
    description = "Masked expected-free-energy loss (KL to smoothed target + entropy) on hard cells"
    metrics = (
        Metric("mask_ratio", console=40, fmt=".3f", plot="mask ratio", stuck_at=1.0),
        Metric("cell_acc", epoch="edges", console=50, fmt=".3f", plot="cell accuracy"),
    )
    #: the hard-cell threshold without a curriculum (the default curriculum's first value)
    DEFAULT_THRESHOLD = 0.6

    def __init__(
        self,
        label_smoothing: float = 0.1,
        ambiguity_weight: float = 0.1,
        min_scale: float = 0.5,
        hard_cells: str = "wrong_or_unsure",
        change_weight: float = 1.0,
    ) -> None:
        _check_params(label_smoothing, ambiguity_weight, min_scale, hard_cells, change_weight)
        self.hard_cells = hard_cells
        self.change_weight = float(change_weight)
        self.label_smoothing = float(label_smoothing)
        self.ambiguity_weight = float(ambiguity_weight)
        self.min_scale = float(min_scale)

    @hookimpl
    def compute_loss(self, logits: torch.Tensor, batch: Batch, ctx: Context) -> LossOutput:
        try:
            loss, per_example, stats = efe_loss(
                logits,
                batch.targets,
                batch.target_mask,
                float(ctx.schedule.get(THRESHOLD_KEY, self.DEFAULT_THRESHOLD)),
                label_smoothing=self.label_smoothing,
                ambiguity_weight=self.ambiguity_weight,
                min_scale=self.min_scale,
                hard_cells=self.hard_cells,
                changed=(batch.targets != batch.inputs) if self.change_weight != 1.0 else None,
                change_weight=self.change_weight,
            )
        except ContractError as exc:  # name the plugin as registered (a subclass, a second instance)
            name = getattr(self, "instance_name", "") or self.name
            if exc.plugin == name:
                raise
            raise ContractError(name, exc.hook, exc.expected, exc.got) from None
        return LossOutput(loss=loss, metrics=stats, per_example=per_example.detach())

