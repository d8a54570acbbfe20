"""Every hook of arcfw, in one module: this page is the contract a plugin author needs.

How a step runs (the order lives in :mod:`arcfw.core.steps` and nowhere else)::

    threshold = hard_cell_threshold(...)          # curriculum
    prompt    = generate_prompt(batch, ctx)       # [B, D] float, carries gradient
    refined   = refine(prompt, batch, ctx)        # [B, D] float, keeps the gradient path
    logits    = predict(refined, batch, ctx)      # [B, H, W, 10] float
    loss      = compute_loss(logits, batch, ctx)  # LossOutput, scalar loss
    engine: backward -> (unscale, clip) -> optimizer step -> scaler update
    post_step_update(result, ctx)                 # detached values only

Plugins never call ``backward()`` and never step the main optimizer: the engine
does that.  A plugin contributes trainable modules through
:func:`parameter_groups`; the engine builds the one main optimizer from them.

Implement a hook by writing a method of the same name decorated with
:data:`hookimpl` on your plugin class.  Argument names must match the spec
(you may take fewer arguments than the spec lists; pluggy passes only the ones
you name).  A misspelt hook name is an error when the plugin is registered.

How several implementations of one hook combine is stated in each hook.  The
engine calls implementations in *role order* (prompt, refine, predictor, loss,
curriculum, then extra plugins in config order), not pluggy's default
last-registered-first order, so a config reads top to bottom.

Every hook result is checked against its contract (dtype, shape, gradient)
where it is produced; a violation stops the run with an error naming the
plugin, the hook, what was expected and what came.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from arcfw.core.batch import Batch
    from arcfw.core.context import Context, LossOutput, ParamGroup, StepResult

PROJECT = "arcfw"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------- setup


@hookspec
def configure(ctx: "Context") -> None:
    """Called once, after every plugin is constructed and before the optimizer exists.

    Build modules here (on ``ctx.device``, trainable parameters in float32).
    Plugins are configured in role order, so the prompt plugin runs first and
    must set ``ctx.prompt_dim`` (the D of its prompt embedding); later plugins
    read it.  Returns nothing.  All implementations are called.
    """


@hookspec
def parameter_groups(ctx: "Context") -> "list[ParamGroup]":
    """Return this plugin's trainable parameters as named groups, each with its learning rate.

    Called once, after :func:`configure`.  Each :class:`~arcfw.core.context.ParamGroup`
    has a unique ``name`` (e.g. ``"qwen"``, ``"agent"``), the parameters, the
    modules they belong to (the engine puts them in train mode and watches
    them) and a default ``lr``; ``optimizer.lr.<name>`` in the config overrides
    it.  A group with ``lr == 0`` is frozen (no gradient expected).
    Parameters a plugin optimises itself (like the RL policy) are *not*
    returned here.  All implementations are called; the lists are concatenated;
    duplicate names or parameters shared between groups are an error.
    """


# --------------------------------------------------------------------------- the step


@hookspec
def hard_cell_threshold(epoch: int, step: int, ctx: "Context") -> "float | None":
    """Return the hard-cell threshold for this step (a float in (0, 1]).

    Called at the start of every step, before :func:`generate_prompt`.  A cell
    is *hard* when the predicted probability of its right colour is below the
    threshold.  The first non-None result wins (the curriculum role); with no
    implementation the threshold stays at ``ctx.threshold``.  The value is
    stored in ``ctx.threshold`` for the loss to read.
    """


@hookspec(firstresult=True)
def generate_prompt(batch: "Batch", ctx: "Context") -> "torch.Tensor":
    """Encode each example's demonstration pairs and query input into a prompt embedding.

    Called once per step, first.  Must not see the query's output
    (``batch.targets``).  Returns a floating tensor of shape
    ``[B, ctx.prompt_dim]`` on ``ctx.device``.  If the plugin has trainable
    parameters (a group with ``lr > 0``) the result must carry gradient to them:
    no ``torch.no_grad()``, no ``.detach()``.  Exactly one implementation (the
    prompt role); the first non-None result wins.
    """


@hookspec
def refine(prompt: "torch.Tensor", batch: "Batch", ctx: "Context") -> "torch.Tensor":
    """Refine the prompt embedding (for example an RL policy's residual action).

    Called after :func:`generate_prompt`.  Receives ``prompt`` ``[B, D]`` and
    returns a tensor of the same shape and dtype.  The result must keep the
    gradient path to ``prompt`` (the prompt model learns through it): never
    compute it under ``torch.no_grad()`` or from ``prompt.detach()``.
    Implementations are chained in role order: each receives the previous
    one's output.  With no implementation the prompt passes through unchanged.
    Keep whatever the post-step update needs (detached!) on ``self``.
    """


@hookspec(firstresult=True)
def predict(prompt: "torch.Tensor", batch: "Batch", ctx: "Context") -> "torch.Tensor":
    """Predict the query's output grid from the refined prompt and the query input grid.

    Called after :func:`refine`.  Returns logits over the 10 colours, floating,
    shape ``[B, H, W, 10]`` where ``(H, W) == batch.canvas``; the cells where
    ``batch.target_mask`` is True are scored.  Must carry gradient to
    ``prompt``.  Exactly one implementation (the predictor role).
    """


@hookspec
def compute_loss(logits: "torch.Tensor", batch: "Batch", ctx: "Context") -> "LossOutput":
    """Return the training loss for this batch as a :class:`~arcfw.core.context.LossOutput`.

    Called after :func:`predict`.  ``logits`` is ``[B, H, W, 10]``;
    ``batch.targets`` is int64 ``[B, H, W]`` and ``batch.target_mask`` bool.
    ``LossOutput.loss`` is a floating scalar that carries gradient; ``metrics``
    are plain floats to log (e.g. ``mask_ratio``).  The loss of a batch must be
    the mean of the per-example losses so that batch size does not change its
    scale.  All implementations are called; their losses are **summed**
    (auxiliary losses add up) and their metrics merged.  Never call
    ``backward()`` here.
    """


@hookspec
def post_step_update(result: "StepResult", ctx: "Context") -> "dict[str, float] | None":
    """Called after the optimizer step (and scaler update), once per step.

    ``result`` holds the step's tensors **detached** from the main graph
    (prompt, refined prompt, logits, targets, loss, metrics) and a
    ``predict(prompt)`` callable that runs the predictor without gradient.
    Use it for updates with an optimizer of the plugin's own (the RL policy's
    REINFORCE step) or for bookkeeping.  The main graph is gone by now:
    backpropagating through it is a step-order error.  All implementations are
    called; returned dicts of floats are merged into the step's metrics.
    """


# --------------------------------------------------------------------------- around the loop


@hookspec
def on_epoch_start(epoch: int, ctx: "Context") -> None:
    """Called at the start of every epoch, before its first step. All implementations."""


@hookspec
def on_epoch_end(epoch: int, summary: "dict[str, float]", ctx: "Context") -> "dict[str, float] | None":
    """Called after the last step of every epoch with the epoch's summary.

    Returned dicts are merged into the summary. All implementations.
    """


@hookspec
def log_metrics(record: "dict[str, Any]", ctx: "Context") -> None:
    """Called with every logged record (``kind`` is ``"batch"`` or ``"epoch"``).

    For logger plugins (JSONL is built in; TensorBoard is a plugin).  Rank 0 only.
    """


# --------------------------------------------------------------------------- state


@hookspec
def state_dict(ctx: "Context") -> "dict[str, Any] | None":
    """Return this plugin's state for a checkpoint, beyond its parameter groups.

    Modules listed in :func:`parameter_groups` are saved by the engine; return
    here anything else that a resumed run needs to be the same run (a policy's
    own module and optimizer, a reward baseline, a curriculum position).
    Tensors and plain Python values only.  Called per plugin; keyed by plugin name.
    """


@hookspec
def load_state_dict(state: "dict[str, Any]", ctx: "Context") -> None:
    """Restore what :func:`state_dict` returned. Called after :func:`configure`."""
