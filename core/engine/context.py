"""Objects the engine hands to plugins: the run context, parameter groups, step results."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class Context:
    """What every hook can read.  Plugins may set ``prompt_dim`` (in ``configure``) and
    put shared values in ``shared``; everything else is the engine's."""

    device: torch.device
    precision: str = "fp32"
    seed: int = 0
    out_dir: Path | None = None
    prompt_dim: int | None = None
    epoch: int = 0
    step: int = 0  # optimizer steps attempted so far (0 during the first step)
    #: the step a resumed run continues from (None: a fresh run); a logger that keeps its own files
    #: drops what it logged after this step (the killed run may have logged beyond its checkpoint)
    resumed_step: int | None = None
    batch_index: int = 0  # index of the batch within the epoch
    threshold: float = 0.6
    training: bool = True
    rank: int = 0
    world_size: int = 1
    generator: torch.Generator | None = None
    #: names of parameter groups that are *expected* to get no gradient this step (e.g. the
    #: prompt model when its prompt came from a cache); set by plugins, cleared every step
    no_grad_groups: set[str] = field(default_factory=set)
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def fused_optimizers(self) -> bool:
        """Whether torch's fused Adam/AdamW kernels run on this device (CPU and CUDA): pass it as
        ``fused=`` to a plugin's own optimizer; one kernel beats the per-tensor loop several times."""
        return self.device.type in ("cpu", "cuda")

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}.get(self.precision)


@dataclass
class ParamGroup:
    """A named set of trainable parameters with its own learning rate.

    ``module_attr`` names the plugin attribute that holds the group's one module
    (e.g. ``"net"`` for ``self.net``).  With several processes and
    ``distributed.strategy: ddp`` the engine replaces that attribute with a
    ``DistributedDataParallel`` wrapper of the module, so the plugin's own
    ``self.net(...)`` calls go through DDP; code that needs the bare module
    (attributes, ``save_pretrained``) uses ``arcfw.core.engine.distributed.unwrap``.
    ``modules`` keep the bare modules.  Without ``module_attr`` the engine
    averages the group's gradients itself after backward (same result, no
    overlap of communication with the backward pass).
    """

    name: str
    params: list[nn.Parameter]
    lr: float
    modules: list[nn.Module] = field(default_factory=list)
    weight_decay: float | None = None
    module_attr: str | None = None
    plugin: str = ""  # filled in by the engine

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.params if p.requires_grad]


@dataclass
class TaskEncoding:
    """What a prompt plugin may return from :func:`generate_prompt` instead of a bare prompt tensor.

    - ``prompt``: ``[B, D]`` floating, the pooled prompt that :func:`refine` works on
      (``D == ctx.prompt_dim``), with gradient when the prompt plugin trains.
    - ``tokens``: ``[B, T, Dt]`` floating, the encoder's state at every token of
      every example (demonstration cells, query input cells, ...), at full
      resolution, with gradient when the prompt plugin trains; the predictor reads
      them in :func:`predict` (its ``encoding`` argument).
    - ``token_mask``: ``[B, T]`` bool, True on real tokens (the rest is padding).
    - ``meta``: anything else the prompt plugin wants the predictor to see (plain values).

    The engine keeps the encoding of the step and hands it, detached, to
    :class:`StepResult` (``result.encoding``) and to ``result.predict``.
    """

    prompt: torch.Tensor
    tokens: torch.Tensor
    token_mask: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def detach(self) -> "TaskEncoding":
        return TaskEncoding(self.prompt.detach(), self.tokens.detach(), self.token_mask, dict(self.meta))


@dataclass
class LossOutput:
    """What :func:`compute_loss` returns: a scalar loss with gradient and float metrics.

    ``per_example`` (optional, ``[B]``, detached) lets post-step hooks see each example's loss.
    """

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    per_example: torch.Tensor | None = None


@dataclass
class StepResult:
    """Detached view of one step, handed to :func:`post_step_update`.

    Every tensor here is detached from the main graph: a post-step hook can't
    backpropagate into Qwen or the predictor by accident.  ``predict(prompt)``
    runs the predictor again under ``torch.no_grad()`` with the weights as they
    are *after* the optimizer step.
    """

    batch: Any
    prompt: torch.Tensor
    refined: torch.Tensor
    logits: torch.Tensor
    loss: float
    metrics: dict[str, float]
    applied: bool  # False if the optimizer step was skipped (non-finite values, fp16 overflow)
    predict: Callable[[torch.Tensor], torch.Tensor]
    epoch: int = 0
    step: int = 0
    #: the step's :class:`TaskEncoding`, detached (None when the prompt plugin returned a bare tensor)
    encoding: TaskEncoding | None = None


@dataclass
class View:
    """One view of an evaluation example, returned by the ``test_time_views`` hook.

    ``example`` is the transformed example (its query has no output);
    ``invert(grid)`` maps a grid predicted for this view back to the original
    frame (int64 ``[h, w]`` numpy arrays in and out).  ``name`` is for logs.
    """

    example: Any
    invert: Callable[[Any], Any]
    name: str = ""
