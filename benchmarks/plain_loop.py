"""The default pipeline's training step written out by hand, for measuring the engine's overhead.

:func:`plain_step` calls the same plugin code, in the same order, with the same
random numbers as :meth:`arcfw.core.engine.engine.Engine.train_step` does for the
default plugins (qwen, rl_policy, agent, efe_loss, curriculum), and does the
same backward / clip / optimizer step.  What it leaves out is the engine's own
work: hook dispatch and listeners, contract checks, the first-step gradient-path
check, the non-finite guard and the zero-gradient watch.  Started from the same
config and seed, it ends with bitwise the same weights
(``tests/test_throughput.py::test_engine_step_equals_plain_loop_bitwise``);
``benchmarks/test_overhead.py`` times the two against each other.
"""

from __future__ import annotations

import math

import torch

from arcfw.core.data.batch import Batch, repeat_batch
from arcfw.core.engine.context import THRESHOLD_KEY, StepResult, TaskEncoding
from arcfw.core.engine.engine import Engine


def plain_step(engine: Engine, batch: Batch, step: int) -> float:
    """One training step of ``engine``'s default plugins without the engine. Returns the loss."""
    ctx, p = engine.ctx, engine.plugins
    by_role = {role: p[name] for name, role in engine.roles.items()}
    qwen, policy, agent, loss_fn, curriculum = (by_role[r] for r in ("prompt", "refine", "predictor", "loss", "curriculum"))
    ctx.training, ctx.step, ctx.no_grad_groups = True, step, set()

    ctx.schedule[THRESHOLD_KEY] = curriculum.hard_cell_threshold(ctx.epoch, step, ctx)
    encoding = qwen.generate_prompt(batch, ctx)
    prompt = encoding.prompt if isinstance(encoding, TaskEncoding) else encoding
    encoding = encoding if isinstance(encoding, TaskEncoding) else None
    refined = policy.refine(prompt, batch, ctx)
    logits = agent.predict(refined, batch, ctx, encoding)
    out = loss_fn.compute_loss(logits, batch, ctx)
    loss = out.loss.float()
    loss.backward()

    # clip by the total norm over the trainable groups, combined from per-group norms as the engine does
    optimizer = engine.optimizer
    live = [[q for q in g.trainable() if q.grad is not None] for g in engine.groups if g.lr > 0]
    norms = [torch.nn.utils.get_total_norm([q.grad for q in gs]) if gs else torch.zeros(()) for gs in live]
    values = torch.stack([loss.detach(), *norms]).tolist()
    total_norm = math.sqrt(sum(v * v for v in values[1:]))
    clip = engine.config["grad_clip"]
    if clip:
        params = [q for gs in live for q in gs]
        torch.nn.utils.clip_grads_with_norm_(params, clip, torch.tensor(total_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    detached = encoding.detach() if encoding is not None else None

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return agent.predict(x, batch, ctx, detached).float()

    def predict_many(xs: list[torch.Tensor]) -> list[torch.Tensor]:  # several prompts, one predictor call
        many = repeat_batch(batch, len(xs))
        with torch.no_grad():
            out = agent.predict(torch.cat(xs), many, ctx, detached.repeat(len(xs)) if detached is not None else None).float()
        return [out[i * batch.size:(i + 1) * batch.size] for i in range(len(xs))]

    result = StepResult(
        batch=batch, prompt=prompt.detach(), refined=refined.detach(), logits=logits.detach(), loss=values[0],
        metrics=dict(out.metrics), applied=True, predict=predict, epoch=ctx.epoch, step=step, encoding=detached,
        predict_many=predict_many,
    )
    qwen.post_step_update(result, ctx)  # role order, as the engine calls them
    policy.post_step_update(result, ctx)
    agent.post_step_update(result, ctx)  # the size head's own update
    return values[0]
