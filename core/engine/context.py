"""Objects the engine hands to plugins: the run context, parameter groups, step results."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from arcfw.core.data.batch import tile

#: The key of :attr:`Context.schedule` that the ``hard_cell_threshold`` hook (curriculum role) fills.
THRESHOLD_KEY = "hard_cell_threshold"


@dataclass
class Context:
    """What every hook can read: the run's fixed facts, where the loop stands, and the two
    values plugins hand each other.  The engine writes every field except the three marked
    *plugins write*; a plugin never assigns to the others.
    """

    #: the device every module and tensor of the step lives on
    device: torch.device
    #: the run's seed (``seed`` in the config): derive deterministic randomness from it
    seed: int = 0
    #: the run folder (None outside ``arcfw run``, e.g. in ``arcfw check``); loggers write under it
    out_dir: Path | None = None
    #: *plugins write*: the D of the prompt embedding ``[B, D]``; the prompt plugin sets it in ``configure``
    prompt_dim: int | None = None
    #: *plugins write*: the width Dt of the token states the prompt plugin returns in a
    #: :class:`TaskEncoding`, set in ``configure``; 0: it returns a bare prompt (no token states);
    #: None: not said (a predictor then assumes ``prompt_dim``)
    token_dim: int | None = None
    #: the epoch being trained (0-based)
    epoch: int = 0
    #: optimizer steps attempted so far (0 during the first step)
    step: int = 0
    #: the step a resumed run continues from (None: a fresh run); a logger that keeps its own files
    #: drops what it logged after this step (the killed run may have logged beyond its checkpoint)
    resumed_step: int | None = None
    #: what the schedule hooks decided for this step, by hook name: ``schedule["hard_cell_threshold"]``
    #: is the curriculum's result (:data:`THRESHOLD_KEY`), set before ``generate_prompt``; absent when
    #: no plugin fills the curriculum role, so a reader keeps its own default:
    #: ``ctx.schedule.get(THRESHOLD_KEY, default)``
    schedule: dict[str, float] = field(default_factory=dict)
    #: False at evaluation (``arcfw eval``): no gradient, a stochastic policy acts deterministically
    training: bool = True
    #: this process's rank and the number of processes (1 without ``torchrun``)
    rank: int = 0
    world_size: int = 1
    #: the engine's random generator on ``device``, seeded per rank; checkpointed, so noise drawn
    #: from it (not from the global RNG) resumes exactly
    generator: torch.Generator | None = None
    #: *plugins write*: names of parameter groups that are *expected* to get no gradient this step
    #: (e.g. the prompt model when its prompt came from a cache); cleared by the engine every step
    no_grad_groups: set[str] = field(default_factory=set)

    @property
    def fused_optimizers(self) -> bool:
        """Whether torch's fused Adam/AdamW kernels run on this device (CPU and CUDA): pass it as
        ``fused=`` to a plugin's own optimizer; one kernel beats the per-tensor loop several times."""
        return self.device.type in ("cpu", "cuda")


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


#: How an epoch summarises a metric: the mean of its finite values (``avg_<name>``); the means of
#: its first and last 50 values (``<name>_first``, ``<name>_last``); their sum (``<name>_sum``);
#: the last value (``<name>_last``); or not at all.
EPOCH_AGGREGATES = ("mean", "edges", "sum", "last", "none")


@dataclass(frozen=True)
class Metric:
    """A metric a plugin makes, declared on its class so that the trainer can show it::

        class MyLoss(Plugin):
            metrics = (Metric("my_ratio", console=45, fmt=".3f", plot="my ratio"),)

    Core prints, summarises, plots and health-checks what is declared and nothing else
    (undeclared metrics still go to ``metrics.jsonl`` and the loggers).  The value comes
    from the plugin's ``compute_loss`` / ``post_step_update`` metrics, or, with
    ``grad_norm_of``, from the engine.
    """

    name: str
    #: how an epoch aggregates it (:data:`EPOCH_AGGREGATES`)
    epoch: str = "mean"
    #: position on the console line ``[Batch N] Name: value | ...`` (smaller first); None: not shown
    console: int | None = None
    #: format spec of the value on the console and in the epoch line
    fmt: str = ".4f"
    #: axis label of its panel in ``arcfw plot``; None: not drawn
    plot: str | None = None
    #: the key of its epoch summary, when not the default of its aggregate (see :data:`EPOCH_AGGREGATES`)
    summary: str | None = None
    #: the value is the gradient norm over these parameter groups (before clipping), computed by the
    #: engine; a step on which every one of them is in ``ctx.no_grad_groups`` logs it but stays out
    #: of the epoch aggregate (it describes the steps the groups learned from)
    grad_norm_of: tuple[str, ...] = ()
    #: health: a warning ``<name>_stuck`` when the value stays at this for ``health.flat_window`` batches
    stuck_at: float | None = None

    def __post_init__(self) -> None:
        if self.epoch not in EPOCH_AGGREGATES:
            raise ValueError(f"metric '{self.name}': epoch must be one of {EPOCH_AGGREGATES}, got {self.epoch!r}")

    def summary_keys(self) -> tuple[str, ...]:
        """The keys of its epoch summary."""
        if self.epoch == "edges":
            return (f"{self.summary or self.name}_first", f"{self.summary or self.name}_last")
        default = {"mean": f"avg_{self.name}", "sum": f"{self.name}_sum", "last": f"{self.name}_last"}.get(self.epoch)
        return () if default is None else (self.summary or default,)


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

    def detach(self) -> TaskEncoding:
        return TaskEncoding(self.prompt.detach(), self.tokens.detach(), self.token_mask, dict(self.meta))

    def repeat(self, k: int) -> TaskEncoding:
        """The encoding of a batch repeated ``k`` times (``Batch.repeat``): tensors, and ``meta`` tensors
        whose first dimension is the batch's, are tiled along it."""
        B = self.prompt.shape[0]
        meta = {key: tile(v, k) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == B else v for key, v in self.meta.items()}
        return TaskEncoding(tile(self.prompt, k), tile(self.tokens, k), tile(self.token_mask, k), meta)


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
    are *after* the optimizer step; ``predict_many`` runs it for several prompts at once.

    With gradient accumulation (``accumulate: K``) ``post_step_update`` runs once per
    micro-batch, right after that micro-batch's backward (so state a plugin keeps from its
    ``refine``/``generate_prompt`` call pairs with the right batch): for micro-batches
    ``0 .. K-2`` the optimizer has not stepped yet (``applied`` False, ``predict`` sees the
    weights before the step, ``metrics`` hold the micro-batch's own); the last one's runs
    after the optimizer step, as without accumulation.  ``loss`` is always the micro-batch's
    own loss.
    """

    batch: Any
    prompt: torch.Tensor
    refined: torch.Tensor
    logits: torch.Tensor
    loss: float
    metrics: dict[str, float]
    #: False if the optimizer step was skipped (non-finite values, fp16 overflow), or has not
    #: happened yet (a micro-batch before the last of a step: ``micro_batch < micro_batches - 1``)
    applied: bool
    predict: Callable[[torch.Tensor], torch.Tensor]
    epoch: int = 0
    step: int = 0
    #: the step's :class:`TaskEncoding`, detached (None when the prompt plugin returned a bare tensor)
    encoding: TaskEncoding | None = None
    #: ``predict_many([p1, p2, ...])`` == ``[predict(p1), predict(p2), ...]`` in *one* predictor call on
    #: the batch repeated (cheaper than separate calls where a step is dominated by per-call overhead)
    predict_many: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None
    #: gradient accumulation: this batch's index among the step's micro-batches, and their number
    micro_batch: int = 0
    micro_batches: int = 1


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
