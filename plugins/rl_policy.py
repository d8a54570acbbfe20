"""Gaussian RL policy that refines the prompt with a residual action, trained by REINFORCE."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from arcfw.core.engine.context import Metric
from arcfw.core.engine.distributed import all_reduce_mean_, average_gradients, broadcast_
from arcfw.core.engine.hookspecs import hookimpl
from arcfw.core.engine.plugin import Plugin


def cell_accuracy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-example share of valid cells whose argmax colour is right: ``[B]``."""
    right = (logits.argmax(-1) == targets) & mask
    return right.flatten(1).sum(1).float() / mask.flatten(1).sum(1).clamp_min(1).float()


class GaussianRefinePolicy(Plugin):
    """Refines the prompt with a Gaussian residual action and learns it with REINFORCE.

    **Refine** (inside the main graph): for a prompt ``x`` (``[B, D]``)
    ``action = mu(x) + sigma * eps`` with ``eps ~ N(0, I)`` and
    ``refined = x + action_scale * action``.  ``mu`` is applied with its
    parameters *detached* (``torch.func.functional_call``), so the main loss
    sends gradient through the refined prompt to ``x`` (and on to Qwen) but
    never trains the policy: the policy learns only from its reward.  At
    evaluation (``ctx.training`` False) the action is the mean, ``mu(x)``.

    **Reward** (after the optimizer step, from detached values): the
    *improvement* of the query's cell accuracy that the action brought,

        reward_b = reward_scale * (acc(predict(refined_b)) - acc(predict(x_b)))

    where ``acc`` is the share of the query output's valid cells whose argmax
    colour is right, and both predictions run the predictor *after* this step's
    optimizer update, without gradient.  So the reward is > 0 exactly when the
    refinement made the prediction better than the unrefined prompt would have.

    **Update**: ``loss = -mean_b((reward_b - baseline) * log N(action_b; mu(x_b), sigma))
    - entropy_coef * H``, one step of the policy's own Adam optimizer, on a graph
    built here from detached tensors (the main graph is never touched).  The
    baseline is an exponential moving average of the batch mean reward.

    **Metrics**: ``reward``, ``acc_improvement`` (batch means), ``policy_loss``,
    ``reward_baseline``, ``policy_shift`` (the mean action's size relative to the
    prompt, ``mean_b(|mu(x_b)| / |x_b|)``: how far the refinement moves the prompt)
    and ``policy_std`` (mean ``sigma``).

    **Several processes**: the policy's gradients are averaged over ranks
    before its step and the baseline follows the reward averaged over ranks,
    so the policy and its baseline stay identical on every rank.  Each rank
    draws its own exploration noise (``ctx.generator`` is seeded per rank).

    Parameters (YAML):

    - ``hidden``: hidden width of the policy's mean network ``mu`` (an MLP D -> hidden -> D).
    - ``init_std``: the exploration noise's initial standard deviation sigma (> 0).
    - ``learn_std``: learn sigma with the policy (false: it stays ``init_std``).
    - ``lr``: learning rate of the policy's own Adam (0: the policy does not learn).
    - ``reward_scale``: the reward is this times the cell-accuracy improvement.
    - ``baseline_momentum``: momentum in [0, 1) of the reward baseline's moving average.
    - ``action_scale``: ``refined = prompt + action_scale * action``.
    - ``entropy_coef``: weight of the policy's entropy bonus in its loss.
    - ``update_every``: compute the reward and update the policy on every N-th step only (the
      reward's two predictor passes are a fifth of a default step; the steps between explore
      with the same policy and are not learned from).
    """

    name = "rl_policy"
    role = "refine"
    description = "Gaussian residual policy on the prompt; REINFORCE on the cell-accuracy improvement after each step"
    metrics = (Metric("reward", console=10, plot="reward"), Metric("acc_improvement", fmt="+.3f", summary="acc_improvement"))

    def __init__(
        self,
        hidden: int = 64,
        init_std: float = 0.05,
        learn_std: bool = True,
        lr: float = 1e-3,
        reward_scale: float = 5.0,
        baseline_momentum: float = 0.9,
        action_scale: float = 1.0,
        entropy_coef: float = 0.0,
        update_every: int = 2,
    ):
        if init_std <= 0:
            raise ValueError("init_std must be > 0")
        if lr < 0:
            raise ValueError("lr must be >= 0")
        if int(update_every) != update_every or update_every < 1:
            raise ValueError(f"update_every must be an integer >= 1, got {update_every!r}")
        if not 0 <= baseline_momentum < 1:
            raise ValueError("baseline_momentum must be in [0, 1)")
        self.hidden = hidden
        self.init_std = init_std
        self.learn_std = learn_std
        self.lr = lr
        self.reward_scale = reward_scale
        self.baseline_momentum = baseline_momentum
        self.action_scale = action_scale
        self.entropy_coef = entropy_coef
        self.update_every = int(update_every)
        self.baseline = 0.0
        self.updates = 0
        self._rollout: tuple[torch.Tensor, torch.Tensor] | None = None  # (policy input, action), detached

    @hookimpl
    def configure(self, ctx):
        d = ctx.prompt_dim
        self.mu = nn.Sequential(nn.Linear(d, self.hidden), nn.Tanh(), nn.Linear(self.hidden, d)).to(ctx.device)
        nn.init.zeros_(self.mu[2].weight)  # start as "add noise only"
        nn.init.zeros_(self.mu[2].bias)
        self.log_std = nn.Parameter(torch.full((d,), math.log(self.init_std), device=ctx.device), requires_grad=self.learn_std)
        self.params = list(self.mu.parameters()) + ([self.log_std] if self.learn_std else [])
        broadcast_([*self.mu.parameters(), self.log_std])  # same start on every rank
        self.optimizer = torch.optim.Adam(self.params, lr=self.lr, fused=ctx.fused_optimizers)

    @hookimpl
    def refine(self, prompt, batch, ctx):
        x = prompt.float()
        frozen = {k: v.detach() for k, v in self.mu.named_parameters()}
        mean = functional_call(self.mu, frozen, (x,))
        if not ctx.training:  # evaluation: act deterministically, nothing to learn from
            return (x + self.action_scale * mean).to(prompt.dtype)
        eps = torch.randn(x.shape, generator=ctx.generator, device=x.device, dtype=x.dtype)
        action = mean + self.log_std.detach().exp() * eps
        self._rollout = (x.detach(), action.detach())
        return (x + self.action_scale * action).to(prompt.dtype)

    @hookimpl
    def post_step_update(self, result, ctx):
        x, action = self._rollout
        self._rollout = None
        if result.step % self.update_every:  # not a learning step (update_every)
            return {}
        batch = result.batch
        if result.predict_many is not None:  # both predictions in one predictor call
            refined_logits, plain_logits = result.predict_many([result.refined, result.prompt])
        else:
            refined_logits, plain_logits = result.predict(result.refined), result.predict(result.prompt)
        acc_refined = cell_accuracy(refined_logits, batch.targets, batch.target_mask)
        acc_plain = cell_accuracy(plain_logits, batch.targets, batch.target_mask)
        improvement = acc_refined - acc_plain
        reward = self.reward_scale * improvement
        with torch.enable_grad():
            std = self.log_std.exp()
            dist = torch.distributions.Normal(self.mu(x), std)
            logp = dist.log_prob(action).sum(-1)
            loss = -((reward - self.baseline) * logp).mean() - self.entropy_coef * dist.entropy().sum(-1).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        average_gradients(self.params)
        self.optimizer.step()
        with torch.no_grad():  # the refinement's size relative to the prompt, and the exploration noise
            shift = (dist.mean.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).mean()
        means = all_reduce_mean_(torch.stack([reward.mean(), improvement.mean(), loss.detach(), shift, std.detach().mean()]))
        mean_reward, mean_improvement, loss_value, mean_shift, mean_std = means.tolist()
        self.baseline = self.baseline_momentum * self.baseline + (1 - self.baseline_momentum) * mean_reward
        self.updates += 1
        return {"reward": mean_reward, "acc_improvement": mean_improvement, "policy_loss": loss_value, "reward_baseline": self.baseline,
                "policy_shift": mean_shift, "policy_std": mean_std}

    @hookimpl
    def state_dict(self, ctx):
        return {
            "mu": self.mu.state_dict(),
            "log_std": self.log_std.detach().clone(),
            "optimizer": self.optimizer.state_dict(),
            "baseline": self.baseline,
            "updates": self.updates,
        }

    @hookimpl
    def load_state_dict(self, state, ctx):
        self.mu.load_state_dict(state["mu"])
        with torch.no_grad():
            self.log_std.copy_(state["log_std"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the config's learning rate wins: it may change on resume
            group["lr"] = self.lr
        self.baseline = float(state["baseline"])
        self.updates = int(state["updates"])
