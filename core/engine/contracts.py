"""Checks of hook results against the contracts in :mod:`arcfw.core.engine.hookspecs`.

Each check raises :class:`ContractError` naming the plugin, the hook, what
was expected and what came - where the wrong value is produced, not three
calls later as "size of tensor a (7) must match the size of tensor b (10)".
The checks read tensor metadata only (no device sync).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from arcfw.core.data.batch import NUM_COLOURS, Example
from arcfw.core.data.tasks import MAX_SIDE
from arcfw.core.engine.context import LossOutput, TaskEncoding, View
from arcfw.core.errors import ContractError, GradientPathError


def describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        grad = ", requires_grad" if value.requires_grad else ""
        return f"{str(value.dtype).replace('torch.', '')} tensor of shape {tuple(value.shape)} on {value.device}{grad}"
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        inner = ", ".join(describe(v) for v in value[:3]) + (", ..." if len(value) > 3 else "")
        return f"{type(value).__name__} of {len(value)} ({inner})"
    return " ".join(f"{type(value).__name__} {value!r}".split())[:200]  # one line


def _tensor(plugin: str, hook: str, value: Any, shape: tuple[int | None, ...], what: str, device: torch.device) -> None:
    if not isinstance(value, torch.Tensor):
        raise ContractError(plugin, hook, f"a floating tensor {what}", describe(value))
    if not value.is_floating_point():
        raise ContractError(
            plugin, hook, f"a floating tensor {what}", describe(value),
            hint="Integer/bool results can't carry gradient",
        )
    if tuple(value.shape) != shape:
        raise ContractError(plugin, hook, f"shape {shape} {what}", describe(value))
    if value.device.type != device.type:
        raise ContractError(plugin, hook, f"a tensor on {device}", describe(value))


def check_prompt(plugin: str, hook: str, value: Any, batch_size: int, dim: int | None, device: torch.device) -> None:
    d = dim if dim is not None else (value.shape[-1] if isinstance(value, torch.Tensor) and value.ndim == 2 else -1)
    _tensor(plugin, hook, value, (batch_size, d), "[B, prompt_dim]", device)


def check_encoding(plugin: str, value: TaskEncoding, batch_size: int, device: torch.device) -> None:
    """The token part of a :class:`TaskEncoding` (its ``prompt`` is checked by :func:`check_prompt`)."""
    tokens, mask = value.tokens, value.token_mask
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3 or tokens.shape[0] != batch_size:
        raise ContractError(plugin, "generate_prompt", f"TaskEncoding.tokens as a floating tensor [B={batch_size}, T, Dt]", describe(tokens))
    _tensor(plugin, "generate_prompt", tokens, tuple(tokens.shape), "TaskEncoding.tokens [B, T, Dt]", device)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(tokens.shape[:2]):
        raise ContractError(
            plugin, "generate_prompt", f"TaskEncoding.token_mask as a bool tensor {tuple(tokens.shape[:2])} [B, T]", describe(mask)
        )


def check_logits(plugin: str, value: Any, batch_size: int, canvas: tuple[int, int], device: torch.device) -> None:
    _tensor(plugin, "predict", value, (batch_size, *canvas, NUM_COLOURS), "[B, H, W, 10] (batch.canvas)", device)


def check_loss(plugin: str, value: Any, needs_grad: bool) -> None:
    if not isinstance(value, LossOutput):
        raise ContractError(plugin, "compute_loss", "a LossOutput(loss=scalar tensor, metrics={...})", describe(value))
    loss = value.loss
    if not isinstance(loss, torch.Tensor) or not loss.is_floating_point() or loss.ndim != 0:
        raise ContractError(plugin, "compute_loss", "LossOutput.loss as a floating scalar tensor", describe(loss))
    if needs_grad and not loss.requires_grad:
        raise GradientPathError(
            f"plugin '{plugin}' returned a loss from compute_loss that carries no gradient although parameters "
            "are trainable: is it computed under torch.no_grad() or from .detach()ed/.item() values?"
        )
    for k, v in value.metrics.items():
        if isinstance(v, torch.Tensor) or not isinstance(v, (int, float)):
            raise ContractError(plugin, "compute_loss", f"LossOutput.metrics['{k}'] as a Python float", describe(v))


def check_threshold(plugin: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ContractError(plugin, "hard_cell_threshold", "a float in (0, 1]", describe(value))


def check_metrics(plugin: str, hook: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise ContractError(plugin, hook, "None or a dict of float metrics", describe(value))
    for k, v in value.items():
        if isinstance(v, torch.Tensor) or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ContractError(plugin, hook, f"metric '{k}' as a Python float", describe(v))


def check_shapes(plugin: str, value: Any, batch_size: int) -> None:
    """``predict_shape``: int64 ``[B, K, 2]``, K >= 1, every side in 1..MAX_SIDE."""
    expected = f"an int64 tensor [B={batch_size}, K>=1, 2] of (h, w) sizes in 1..{MAX_SIDE}"
    if (
        not isinstance(value, torch.Tensor)
        or value.dtype != torch.int64
        or value.ndim != 3
        or value.shape[0] != batch_size
        or value.shape[1] < 1
        or value.shape[2] != 2
    ):
        raise ContractError(plugin, "predict_shape", expected, describe(value))
    lo, hi = int(value.min()), int(value.max())
    if lo < 1 or hi > MAX_SIDE:
        raise ContractError(plugin, "predict_shape", expected, f"sizes from {lo} to {hi}")


def _grid_problem(grid: Any) -> str | None:
    if not isinstance(grid, np.ndarray) or grid.ndim != 2 or not np.issubdtype(grid.dtype, np.integer):
        return f"not a 2-D integer numpy array ({type(grid).__name__} {getattr(grid, 'shape', '')})"
    if not (1 <= grid.shape[0] <= MAX_SIDE and 1 <= grid.shape[1] <= MAX_SIDE):
        return f"shape {grid.shape}"
    if grid.min() < 0 or grid.max() >= NUM_COLOURS:
        return f"colours from {grid.min()} to {grid.max()}"
    return None


def check_example(plugin: str, hook: str, before: Example, after: Any) -> None:
    """An example returned by a hook: same identity and structure as ``before``, valid grids."""
    expected = (
        f"an Example for {before.key} with {len(before.demos)} demonstration pairs, "
        f"query output {'present' if before.query.output is not None else 'absent'}, grids int 0-9 of 1..{MAX_SIDE} cells a side"
    )
    if not isinstance(after, Example):
        raise ContractError(plugin, hook, expected, describe(after))
    if (after.task_id, after.pair_index, len(after.demos)) != (before.task_id, before.pair_index, len(before.demos)) or (
        (after.query.output is None) != (before.query.output is None)
    ):
        raise ContractError(plugin, hook, expected, f"an Example for {after.key} with {len(after.demos)} demonstration pairs")
    pairs = [("query", after.query)] + [(f"demo {i}", p) for i, p in enumerate(after.demos)]
    for where, pair in pairs:
        for side, grid in (("input", pair.input), ("output", pair.output)):
            problem = None if grid is None and (side == "output") else _grid_problem(grid)
            if problem:
                raise ContractError(plugin, hook, expected, f"{where} {side} grid: {problem}")


def check_views(plugin: str, before: Example, views: Any) -> None:
    """``test_time_views``: None or a list of :class:`View` of the same example."""
    if views is None:
        return
    if not isinstance(views, (list, tuple)) or not all(isinstance(v, View) and callable(v.invert) for v in views):
        raise ContractError(plugin, "test_time_views", "None or a list of View(example, invert)", describe(views))
    for v in views:
        check_example(plugin, "test_time_views", before, v.example)


# --------------------------------------------------------------------------- gradient paths


def reaches(output: torch.Tensor, inputs: list[torch.Tensor]) -> bool:
    """True if a gradient from ``output`` reaches at least one of ``inputs``.

    Uses ``torch.autograd.grad`` restricted to ``inputs``: only the part of the
    graph between them runs, and the main graph is kept for the real backward.
    """
    if not output.requires_grad:
        return False
    targets = [t for t in inputs if t.requires_grad]
    if not targets:
        return False
    grads = torch.autograd.grad(
        output, targets, grad_outputs=torch.ones_like(output), retain_graph=True, allow_unused=True
    )
    return any(g is not None for g in grads)


def cut_path_message(plugin: str, hook: str, upstream: str, step: int | None = None) -> str:
    """``step``: the step (counted from 1) at which the path was found cut after backward; None: before it."""
    at = f" at step {step}" if step is not None else ""
    return (
        f"plugin '{plugin}' cut the gradient path in hook '{hook}'{at}: its output does not depend differentiably on "
        f"{upstream}, so those parameters would never learn (the original bug: Qwen gradient exactly 0). "
        "Likely cause: the hook runs under @torch.no_grad()/torch.inference_mode() or uses .detach()/.item()/"
        ".numpy() on its input. Keep detached copies only for post_step_update"
    )
