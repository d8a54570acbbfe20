"""Every hook of arcfw, in one module: this page is the contract a plugin author needs.

How a step runs (the order lives in :mod:`arcfw.core.engine.steps` and nowhere else)::

    # data stage, before the step, training only, per example, before collation:
    example   = augment_example(example, rng, ctx)  # chained; rng seeded by (seed, epoch, example)
    # the step:
    threshold = hard_cell_threshold(...)          # curriculum
    prompt    = generate_prompt(batch, ctx)       # [B, D] float, carries gradient
                                                  #   (or a TaskEncoding: prompt + token states)
    refined   = refine(prompt, batch, ctx)        # [B, D] float, keeps the gradient path
    logits    = predict(refined, batch, ctx, encoding)  # [B, H, W, 10] float
    loss      = compute_loss(logits, batch, ctx)  # LossOutput, scalar loss
    engine: backward -> (unscale, clip) -> optimizer step -> scaler update
    post_step_update(result, ctx)                 # detached values only

With gradient accumulation (``accumulate: K``) a step takes K micro-batches: the threshold once,
then for each micro-batch ``generate_prompt`` .. ``compute_loss``, the engine's backward and that
micro-batch's ``post_step_update``; the optimizer steps once, after the last micro-batch's backward
and before its ``post_step_update`` (:mod:`arcfw.core.engine.steps`).

Evaluation (``arcfw eval``, :mod:`arcfw.core.commands.evaluate`) runs, without gradient and
with ``ctx.training`` False, for every test input and each of its views
(the input itself plus :func:`test_time_views`)::

    prompt  = refine(generate_prompt(batch))          # batch has no answer
    shapes  = predict_shape(prompt, batch, ctx)       # [B, K, 2] ranked output sizes
    logits  = predict(prompt, batch_k, ctx)           # batch_k's canvas covers size k

Plugins never call ``backward()`` and never step the main optimizer: the engine
does that.  A plugin contributes trainable modules through
:func:`parameter_groups`; the engine builds the one main optimizer from them.
With ``health.check_contracts`` on (the default) this is checked after every hook
call (:mod:`arcfw.core.engine.watch`): a backward that reaches a main-optimizer
parameter while a hook runs, or a change of such a parameter during a step outside
the engine's optimizer step, is an ``OrderError`` naming the plugin and the hook.
The batch belongs to the engine too: a hook may read ``batch.inputs``, ``targets``
and the masks but never replace them or write into them (a ``ContractError`` naming
the hook); work on a copy.  Any other exception inside a hook ends the run with one
line naming the plugin and the hook (``HookFailure``).

Implement a hook by writing a method of the same name decorated with
:data:`hookimpl` on your plugin class.  Argument names must match the spec
(you may take fewer arguments than the spec lists; pluggy passes only the ones
you name).  A misspelt hook name is an error when the plugin is registered.

How several implementations of one hook combine (exactly one, first non-None,
chained, summed, collected, all, per plugin) is stated in each hook and declared
once, for the engine and the docs, in :data:`arcfw.core.engine.roles.HOOK_TABLE`;
which role fills which hook is :data:`arcfw.core.engine.roles.ROLE_TABLE`.  The
engine calls implementations itself, in *role order* (prompt, refine, predictor,
loss, curriculum, then extra plugins in config order), not through pluggy's
caller (which calls last-registered-first and knows no chaining or summing), so
a config reads top to bottom.  pluggy validates the hook names and signatures
at registration; the specs carry no ``firstresult`` marker because pluggy's
caller is not used.

Every hook result is checked against its contract (dtype, shape, gradient)
where it is produced; a violation stops the run with an error naming the
plugin, the hook, what was expected and what came.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import numpy
    import torch

    from arcfw.core.data.batch import Batch, Example
    from arcfw.core.engine.context import Context, LossOutput, ParamGroup, StepResult, TaskEncoding, View

PROJECT = "arcfw"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------- setup


@hookspec
def configure(ctx: Context) -> None:
    """Called once, after every plugin is constructed and before the optimizer exists.

    Build modules here (on ``ctx.device``, trainable parameters in float32).
    Plugins are configured in role order, so the prompt plugin runs first and
    must set ``ctx.prompt_dim`` (the D of its prompt embedding); later plugins
    read it.  Returns nothing.  All implementations are called.
    """


@hookspec
def parameter_groups(ctx: Context) -> list[ParamGroup]:
    """Return this plugin's trainable parameters as named groups, each with its learning rate.

    Called once, after :func:`configure`.  Each :class:`~arcfw.core.engine.context.ParamGroup`
    has a unique ``name`` (e.g. ``"qwen"``, ``"agent"``), the parameters, the
    modules they belong to (the engine puts them in train mode and watches
    them) and a default ``lr``; ``optimizer.lr.<name>`` in the config overrides
    it.  A group with ``lr == 0`` is frozen (no gradient expected).  Set
    ``module_attr`` to the name of the attribute holding the group's module
    (``"net"`` for ``self.net``) and call the module through that attribute:
    in a multi-process run the engine puts a DistributedDataParallel wrapper
    there (see :class:`~arcfw.core.engine.context.ParamGroup`).
    Parameters a plugin optimises itself (like the RL policy) are *not*
    returned here.  All implementations are called; the lists are concatenated;
    duplicate names or parameters shared between groups are an error.
    """


# --------------------------------------------------------------------------- the step


@hookspec
def hard_cell_threshold(epoch: int, step: int, ctx: Context) -> float | None:
    """Return the hard-cell threshold for this step (a float in (0, 1]).

    Called at the start of every step, before :func:`generate_prompt`.  A cell
    is *hard* when the predicted probability of its right colour is below the
    threshold; the default loss (``efe_loss``, ``hard_cells: wrong_or_unsure``)
    also counts every cell whose most likely colour is wrong, whatever the
    threshold (``hard_cells: threshold``: the threshold alone).  The first
    non-None result wins (the curriculum role).  The value is stored in
    ``ctx.schedule["hard_cell_threshold"]`` (key
    :data:`~arcfw.core.engine.context.THRESHOLD_KEY`) for the loss to read; with
    no implementation the key is absent and the loss uses its own default.
    """


@hookspec
def generate_prompt(batch: Batch, ctx: Context) -> torch.Tensor | TaskEncoding:
    """Encode each example's demonstration pairs and query input into a prompt embedding.

    Called once per step, first.  Must not see the query's output
    (``batch.targets``; the size of the output grid, ``batch.target_mask``, is
    known in training and predicted at evaluation, and a prompt must not depend
    on it either, since evaluation encodes before it predicts the size).
    Returns a floating tensor of shape ``[B, ctx.prompt_dim]`` on ``ctx.device``,
    or a :class:`~arcfw.core.engine.context.TaskEncoding`: that prompt plus the
    encoder's token states at full resolution (``tokens`` ``[B, T, Dt]`` with
    ``token_mask`` ``[B, T]``), which the engine passes to :func:`predict` as
    ``encoding`` so that the predictor can read every demonstration cell.  If
    the plugin has trainable parameters (a group with ``lr > 0``) the prompt and
    the tokens must carry gradient to them: no ``torch.no_grad()``, no
    ``.detach()``.  Exactly one implementation (the prompt role).
    """


@hookspec
def refine(prompt: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
    """Refine the prompt embedding (for example an RL policy's residual action).

    Called after :func:`generate_prompt`; also at evaluation, where
    ``ctx.training`` is False and a stochastic policy should act
    deterministically (its mean action).  Receives ``prompt`` ``[B, D]`` and
    returns a tensor of the same shape and dtype.  The result must keep the
    gradient path to ``prompt`` (the prompt model learns through it): never
    compute it under ``torch.no_grad()`` or from ``prompt.detach()``.
    Implementations are chained in role order: each receives the previous
    one's output.  With no implementation the prompt passes through unchanged.
    Keep whatever the post-step update needs (detached!) on ``self``.
    """


@hookspec
def predict(prompt: torch.Tensor, batch: Batch, ctx: Context, encoding: TaskEncoding | None) -> torch.Tensor:
    """Predict the query's output grid from the refined prompt and the query input grid.

    Called after :func:`refine`.  ``encoding`` is the prompt plugin's
    :class:`~arcfw.core.engine.context.TaskEncoding` (token states of the
    demonstrations and the query input, with gradient in training) or None when
    the prompt plugin returns a bare tensor; the refined ``prompt`` replaces
    ``encoding.prompt``.  Returns logits over the 10 colours, floating,
    shape ``[B, H, W, 10]`` where ``(H, W) == batch.canvas``; the cells where
    ``batch.target_mask`` is True are scored.  Must carry gradient to
    ``prompt``.  Exactly one implementation (the predictor role).

    At evaluation the answer is unknown: ``batch.targets`` is all 0 and
    ``batch.target_mask`` marks the output size chosen by :func:`predict_shape`
    (each example's canvas covers it); the predicted grid is the argmax there.
    """


@hookspec
def predict_shape(prompt: torch.Tensor, batch: Batch, ctx: Context, encoding: TaskEncoding | None) -> torch.Tensor | None:
    """Predict the size of each query's output grid (evaluation only; the answer is never shown).

    Called at evaluation after :func:`refine`, on a batch whose queries carry
    no output.  Returns int64 ``[B, K, 2]``: for every example ``K >= 1``
    candidate sizes ``(h, w)``, each side in 1..30, most probable first; the
    first two become the sizes of the two attempts (or feed the vote over
    augmented views).  ``ctx.training`` is False and gradient is off.  A
    predictor that learns sizes trains them itself: as an auxiliary
    :func:`compute_loss` (losses add up) or, as the default agent does, in
    :func:`post_step_update` with an optimizer of its own.  The first non-None result wins;
    with no implementation the engine uses the demo-pair rule of
    :func:`arcfw.core.data.shapes.rule_shape`, then the input size.
    """


@hookspec
def compute_loss(logits: torch.Tensor, batch: Batch, ctx: Context) -> LossOutput:
    """Return the training loss for this batch as a :class:`~arcfw.core.engine.context.LossOutput`.

    Called after :func:`predict`.  ``logits`` is ``[B, H, W, 10]``;
    ``batch.targets`` is int64 ``[B, H, W]`` and ``batch.target_mask`` bool.
    ``LossOutput.loss`` is a floating scalar that carries gradient; ``metrics``
    are plain floats to log (e.g. ``mask_ratio``); declare the ones the console,
    the summaries and ``arcfw plot`` should show on the plugin class
    (``metrics = (Metric(...),)``, :class:`~arcfw.core.engine.context.Metric`).  The loss of a batch must be
    the mean of the per-example losses so that batch size does not change its
    scale: gradient accumulation relies on it (each micro-batch's loss is weighted by its
    share of the step's examples, which makes K accumulated micro-batches exactly one step
    on a batch of all of them; a loss averaged over a pooled count across the batch, such as
    all its cells, is equal only up to that weighting).  A loss is also computed at
    validation (``ctx.training`` False, no gradient).  All implementations are called; their losses are **summed**
    (auxiliary losses add up) and their metrics merged.  Never call
    ``backward()`` here.
    """


@hookspec
def post_step_update(result: StepResult, ctx: Context) -> dict[str, float] | None:
    """Called after the optimizer step (and scaler update), once per step - once per
    **micro-batch** with gradient accumulation.

    ``result`` holds the step's tensors **detached** from the main graph
    (prompt, refined prompt, logits, targets, loss, metrics) and a
    ``predict(prompt)`` callable that runs the predictor without gradient.
    Use it for updates with an optimizer of the plugin's own (the RL policy's
    REINFORCE step) or for bookkeeping.  The main graph is gone by now:
    backpropagating through it is a step-order error.  All implementations are
    called; returned dicts of floats are merged into the step's metrics.

    With ``accumulate: K`` it runs right after each micro-batch's backward, so what a
    plugin keeps from its own ``generate_prompt``/``refine`` call pairs with the batch it
    came from (the RL policy's rollout): for micro-batches ``0 .. K-2`` the optimizer has
    not stepped yet (``result.applied`` False, ``predict`` sees the weights before the step);
    the last one's (``result.micro_batch == result.micro_batches - 1``) runs after the step.
    A plugin that wants one call per optimizer step acts on that last one only.  The step's
    metrics are each metric's mean over its micro-batches, weighted by their examples.
    """


# --------------------------------------------------------------------------- data and evaluation views


@hookspec
def augment_example(example: Example, rng: numpy.random.Generator, ctx: Context) -> Example | None:
    """Transform a training example before it is collated (data augmentation).

    The data stage before the step: called for every example of every training
    batch, not at evaluation.  ``rng`` is a NumPy generator seeded by
    ``(seed, epoch, example index)`` only, so the same run (and a run resumed
    mid-epoch) draws the same augmentation; use it and no other randomness.
    Return a new :class:`~arcfw.core.data.batch.Example` with the same ``task_id``,
    ``pair_index`` and number of demonstration pairs, with *one* transformation
    applied consistently to every demonstration grid, the query input and the
    query output (the target), every grid int 0-9 with sides 1..30; or None to
    leave the example unchanged.  Implementations are chained in role order.
    """


@hookspec
def test_time_views(example: Example, ctx: Context) -> list[View] | None:
    """Extra views of an evaluation example to vote over (test-time augmentation).

    Called at evaluation for every test example (its query has no output).
    Return :class:`~arcfw.core.engine.context.View` objects: a transformed example
    and ``invert``, which maps a grid predicted for the view back to the
    original frame.  The evaluator always adds the untransformed example
    itself, predicts every view, inverts, and ranks the distinct grids by votes.
    Must be deterministic (derive randomness from ``ctx.seed`` and the example).
    All implementations are called; the lists are concatenated.
    """


# --------------------------------------------------------------------------- around the loop


@hookspec
def on_epoch_start(epoch: int, ctx: Context) -> None:
    """Called at the start of every epoch, before its first step. All implementations.

    A run resumed from a checkpoint taken inside an epoch does not call it again
    for that epoch (restore what it set up in :func:`load_state_dict`).
    """


@hookspec
def on_epoch_end(epoch: int, summary: dict[str, float], ctx: Context) -> dict[str, float] | None:
    """Called after the last step of every epoch with the epoch's summary.

    Returned dicts are merged into the summary. All implementations.
    """


@hookspec
def log_metrics(record: dict[str, Any], ctx: Context) -> None:
    """Called with every logged record (``kind`` is ``"batch"`` or ``"epoch"``).

    For logger plugins (JSONL is built in; TensorBoard is a plugin).  Rank 0 only.
    A resumed run logs again the steps after its checkpoint that the stopped run
    may have logged already: ``ctx.resumed_step`` (None for a fresh run) says
    from where, so that a logger keeping its own files can drop the old records
    (the JSONL log is cut back to it; TensorBoard uses ``purge_step``).
    """


@hookspec
def on_train_end(status: str, ctx: Context) -> None:
    """Called once when ``arcfw run`` ends, on every rank, after the last record was logged:
    ``status`` is ``"finished"`` (the epochs or ``max_batches`` are done), ``"stopped"`` (Ctrl-C or
    SIGTERM; the checkpoint is saved) or ``"failed"`` (an error ends the run; it is raised after
    this hook).  For loggers to flush and close their files.  All implementations; an
    implementation's own error is raised after every implementation was called.
    """


# --------------------------------------------------------------------------- state


@hookspec
def state_dict(ctx: Context) -> dict[str, Any] | None:
    """Return this plugin's state for a checkpoint, beyond its parameter groups.

    Modules listed in :func:`parameter_groups` are saved by the engine; return
    here anything else that a resumed run needs to be the same run (a policy's
    own module and optimizer, a reward baseline, a curriculum position).
    Tensors and plain Python values only (dict, list, tuple, str, int, float,
    bool, None): the checkpoint is read back with ``torch.load(weights_only=True)``,
    and anything else is an error naming the plugin.  Called per plugin at every
    checkpoint and every :meth:`Engine.state_dict <arcfw.core.engine.engine.Engine.state_dict>`
    snapshot (which copies the tensors: returning references is fine), and once
    before training so that such an error comes at once; keyed by plugin name.
    Return None for nothing to save.
    """


@hookspec
def load_state_dict(state: dict[str, Any], ctx: Context) -> None:
    """Restore what :func:`state_dict` returned, when a run resumes or an in-memory
    snapshot (:meth:`Engine.state_dict <arcfw.core.engine.engine.Engine.state_dict>`)
    is put back.

    Called after :func:`configure`, once the engine has loaded the parameter
    groups' modules and the main optimizer, with this plugin's own ``state``, a
    copy the plugin may keep (from a checkpoint tensors are on the CPU, from a
    snapshot on the device they were saved from: ``module.load_state_dict`` and
    ``optimizer.load_state_dict`` move them).  Restore everything the state
    covers: a snapshot may be put back into a plugin that has moved on.  Raise
    :class:`~arcfw.core.errors.CheckpointError` for a state you cannot use.
    """
