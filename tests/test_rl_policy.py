"""The RL refine policy: gradient path to the prompt, detached REINFORCE update, reward definition."""

from __future__ import annotations

import math

import pytest
import torch

from arcfw.core.data.batch import Batch
from arcfw.core.engine.context import Context, StepResult
from arcfw.plugins.rl_policy import GaussianRefinePolicy, cell_accuracy


def make_policy(d: int = 8, **kw) -> tuple[GaussianRefinePolicy, Context]:
    ctx = Context(device=torch.device("cpu"), prompt_dim=d, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    p = GaussianRefinePolicy(hidden=16, **kw)
    p.configure(ctx)
    return p, ctx


def tiny_batch() -> Batch:
    targets = torch.tensor([[[1, 2], [3, 0]], [[4, 4], [0, 0]]])
    mask = torch.tensor([[[True, True], [True, False]], [[True, True], [False, False]]])
    return Batch(examples=[None, None], inputs=targets.clone(), input_mask=mask, targets=targets,
                 target_mask=mask, canvas_mask=torch.ones_like(mask))


def onehot_logits(grid: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(grid, 10).float() * 10


def test_cell_accuracy_counts_valid_cells_only():
    b = tiny_batch()
    pred = b.targets.clone()
    pred[0, 0, 0] = 9  # one of 3 valid cells wrong
    pred[1, 1, 1] = 9  # an invalid cell: ignored
    acc = cell_accuracy(onehot_logits(pred), b.targets, b.target_mask)
    assert torch.allclose(acc, torch.tensor([2 / 3, 1.0]))


def test_refine_keeps_gradient_to_prompt_but_not_to_policy():
    policy, ctx = make_policy()
    prompt = torch.randn(2, 8, requires_grad=True)
    out = policy.refine(prompt, tiny_batch(), ctx)
    assert out.shape == prompt.shape and out.requires_grad
    out.sum().backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in policy.mu.parameters())  # the main loss never trains the policy
    assert policy.log_std.grad is None


def test_post_step_update_rewards_improvement_and_updates_only_the_policy():
    policy, ctx = make_policy(reward_scale=5.0, baseline_momentum=0.5)
    b = tiny_batch()
    prompt = torch.randn(2, 8, requires_grad=True)
    refined = policy.refine(prompt, b, ctx)
    # a predictor that is right everywhere on the refined prompt, wrong everywhere on the plain one
    refined_d, prompt_d = refined.detach(), prompt.detach()

    def predict(p):
        return onehot_logits(b.targets if torch.equal(p, refined_d) else (b.targets + 1) % 10)

    before = [q.detach().clone() for q in policy.mu.parameters()]
    result = StepResult(batch=b, prompt=prompt_d, refined=refined_d, logits=predict(refined_d), loss=1.0,
                        metrics={}, applied=True, predict=predict)
    out = policy.post_step_update(result, ctx)
    assert math.isclose(out["acc_improvement"], 1.0) and math.isclose(out["reward"], 5.0)
    assert math.isclose(out["reward_baseline"], 2.5)  # 0.5 * 0 + 0.5 * 5
    assert any(not torch.equal(a, q) for a, q in zip(before, policy.mu.parameters()))
    assert prompt.grad is None  # nothing flowed into the main graph


def test_state_round_trip():
    a, ctx = make_policy()
    a.baseline, a.updates = 0.7, 3
    b, _ = make_policy()
    with torch.no_grad():
        for p in b.mu.parameters():
            p.add_(1.0)
    b.load_state_dict(a.state_dict(ctx), ctx)
    assert b.baseline == 0.7 and b.updates == 3
    assert all(torch.equal(x, y) for x, y in zip(a.mu.parameters(), b.mu.parameters()))


def test_policy_shift_and_std_are_reported():
    """policy_shift = mean |mu(x)| / |x| over the batch (the refinement's size), policy_std = mean sigma."""
    policy, ctx = make_policy(init_std=0.2)
    with torch.no_grad():
        policy.mu[2].bias.fill_(0.5)  # mu(x) = 0.5 everywhere: |mu(x)| = 0.5 * sqrt(8)
    b = tiny_batch()
    prompt = torch.full((2, 8), 2.0)  # |x| = 2 * sqrt(8): shift 0.25
    refined = policy.refine(prompt, b, ctx)
    result = StepResult(batch=b, prompt=prompt, refined=refined.detach(), logits=onehot_logits(b.targets), loss=1.0,
                        metrics={}, applied=True, predict=lambda p: onehot_logits(b.targets))
    out = policy.post_step_update(result, ctx)
    assert math.isclose(out["policy_shift"], 0.25, rel_tol=1e-5)
    assert math.isclose(out["policy_std"], 0.2, rel_tol=1e-5)


def test_predict_many_equals_one_predict_per_prompt(make_engine, batches):
    """The reward's two predictions run as one predictor call on the batch repeated: same logits."""
    engine = make_engine({"batch_size": 2})
    batch = batches(1, batch_size=2)[0].to(engine.device)
    with engine.evaluating():
        prompt, encoding = engine.eval_encode(batch)
    assert encoding is not None
    torch.manual_seed(1)
    prompts = [prompt, prompt + 0.5 * torch.randn_like(prompt)]
    together = engine.predict_many_no_grad(prompts, batch, encoding)
    assert len(together) == 2
    for p, logits in zip(prompts, together):
        alone = engine.predict_no_grad(p, batch, encoding)
        assert logits.shape == alone.shape
        assert torch.allclose(logits, alone, atol=1e-5)
    assert not torch.allclose(together[0], together[1], atol=1e-3)  # the prompts do matter


def test_update_every_learns_on_every_nth_step_only():
    policy, ctx = make_policy(update_every=2)
    b = tiny_batch()
    calls = []

    def predict(p):
        calls.append(1)
        return onehot_logits(b.targets if len(calls) % 2 else (b.targets + 1) % 10)

    changed = []
    for step in range(4):
        refined = policy.refine(torch.randn(2, 8), b, ctx).detach()
        before = [q.detach().clone() for q in policy.mu.parameters()]
        out = policy.post_step_update(StepResult(batch=b, prompt=refined, refined=refined, logits=predict(refined),
                                                 loss=1.0, metrics={}, applied=True, predict=predict, step=step), ctx)
        changed.append(any(not torch.equal(a, q) for a, q in zip(before, policy.mu.parameters())))
        assert ("reward" in out) == (step % 2 == 0)
    assert changed == [True, False, True, False] and policy.updates == 2
    with pytest.raises(ValueError, match="update_every"):
        GaussianRefinePolicy(update_every=0)
