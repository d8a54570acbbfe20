"""The step order, defined once.  The README lists the same order.

One training step (:meth:`arcfw.core.engine.engine.Engine.train_step`) is::

    THRESHOLD         ctx.schedule[...] = hard_cell_threshold(epoch, step) # curriculum
    GENERATE_PROMPT   prompt  = generate_prompt(batch)                      # autocast
    REFINE            refined = refine(prompt, batch)   (chained)           # autocast
    PREDICT           logits  = predict(refined, batch)                     # autocast
    COMPUTE_LOSS      loss    = sum(compute_loss(logits, batch))            # autocast
    BACKWARD          precision.backward(loss)          (scaled in fp16)
    OPTIMIZER_STEP    unscale -> non-finite check -> clip -> optimizer.step -> scaler.update
    POST_STEP_UPDATE  post_step_update(detached StepResult)                 # RL update, bookkeeping

Before the step, in the data stage (training only), every example of the batch
passes through the ``augment_example`` hooks (chained, with a NumPy generator
seeded by ``(seed, epoch, example index)``) and is then collated.  That stage
is not part of :data:`STEP_ORDER`: the step starts from a collated batch.

**Gradient accumulation** (``accumulate: K``): one step takes K micro-batches.
THRESHOLD runs once; GENERATE_PROMPT .. BACKWARD (:data:`MICRO_STAGES`) run for each
micro-batch in turn, its loss weighted by its share of the step's examples, so the
gradients add up to those of one batch K times bigger; then OPTIMIZER_STEP once; then
POST_STEP_UPDATE once per micro-batch, each with its own detached results (after the
optimizer step, as without accumulation).  With K = 1 this is exactly the list above.

Plugins implement the hook stages; BACKWARD and OPTIMIZER_STEP belong to the
engine alone.  Tests record the sequence of stages and hook calls and assert it.
"""

from __future__ import annotations

from enum import Enum


class Stage(str, Enum):
    THRESHOLD = "hard_cell_threshold"
    GENERATE_PROMPT = "generate_prompt"
    REFINE = "refine"
    PREDICT = "predict"
    COMPUTE_LOSS = "compute_loss"
    BACKWARD = "backward"
    OPTIMIZER_STEP = "optimizer_step"
    POST_STEP_UPDATE = "post_step_update"


#: The order of one step. ``Engine.train_step`` walks exactly this list.
STEP_ORDER: tuple[Stage, ...] = tuple(Stage)


#: The stages run once per micro-batch, in this order, before the one optimizer step.
MICRO_STAGES: tuple[Stage, ...] = (Stage.GENERATE_PROMPT, Stage.REFINE, Stage.PREDICT, Stage.COMPUTE_LOSS, Stage.BACKWARD)


def order_text() -> str:
    return " -> ".join(s.value for s in STEP_ORDER)
