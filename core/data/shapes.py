"""Output grid sizes: what a batch says, what the demonstration pairs suggest, ranked candidates.

At evaluation the size of the query's output grid is *predicted*, never read
from the answer (see the ``predict_shape`` hook).  This module holds the pieces
any size predictor can reuse:

- :func:`mask_shapes` - the ``(h, w)`` of each example's grid from a batch mask;
- :func:`rule_shape` - the size the demonstration pairs suggest, rows and
  columns each decided by the first rule that fits every demo pair: output
  side = input side; a constant output side; a constant ratio output/input
  (x2, /3, ...); otherwise the query input's side.  On ARC-AGI-2 evaluation this
  gets 74% of test output sizes right (the input size alone: 71%);
- :func:`top_shapes` - ranked ``(h, w)`` candidates from per-side logits.
"""

from __future__ import annotations

from fractions import Fraction

import torch

from arcfw.core.data.batch import Batch, Example
from arcfw.core.data.tasks import MAX_SIDE


def mask_shapes(mask: torch.Tensor) -> torch.Tensor:
    """``[B, 2]`` int64 ``(h, w)`` of the top-left-aligned grid each ``[B, H, W]`` bool mask marks."""
    return torch.stack([mask.any(2).sum(1), mask.any(1).sum(1)], dim=1).long()


def _side(ins: list[int], outs: list[int], query: int) -> int:
    if all(i == o for i, o in zip(ins, outs)):
        return query
    if len(set(outs)) == 1:
        return outs[0]
    ratios = {Fraction(o, i) for i, o in zip(ins, outs)}
    if len(ratios) == 1:
        side = query * ratios.pop()
        if side.denominator == 1 and 1 <= side <= MAX_SIDE:
            return int(side)
    return query


def rule_shape(example: Example) -> tuple[int, int]:
    """The output size the example's demonstration pairs suggest for its query (module docstring)."""
    demos = [(p.input, p.output) for p in example.demos if p.output is not None]
    shape = example.query.input.shape
    if not demos:
        return int(shape[0]), int(shape[1])
    h, w = (_side([i.shape[d] for i, _ in demos], [o.shape[d] for _, o in demos], int(shape[d])) for d in (0, 1))
    return h, w


def rule_shapes(batch: Batch) -> torch.Tensor:
    """:func:`rule_shape` of every example, ``[B, 2]`` int64 on the batch's device."""
    return torch.tensor([rule_shape(ex) for ex in batch.examples], dtype=torch.long, device=batch.inputs.device)


def top_shapes(logits: torch.Tensor, k: int = 2) -> torch.Tensor:
    """Ranked size candidates from side logits ``[B, 2, MAX_SIDE]`` (rows, columns; class i = side i+1).

    Rows and columns are independent, so a size's log-probability is the sum of
    theirs; returns the ``k`` most probable sizes, ``[B, k, 2]`` int64, best first.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    joint = (logp[:, 0, :, None] + logp[:, 1, None, :]).flatten(1)  # [B, S*S]
    idx = joint.topk(k, dim=1).indices
    return torch.stack([idx // MAX_SIDE + 1, idx % MAX_SIDE + 1], dim=-1)
