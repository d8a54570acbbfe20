"""The grid predictor: shapes, gradient to the prompt, exactness under padding."""

from __future__ import annotations

import numpy as np
import torch

from arcfw.core.data.batch import Example, Pair, collate
from arcfw.plugins.agent import AgentNet


def example(h_in, w_in, h_out, w_out, seed):
    rng = np.random.default_rng(seed)
    pair = Pair(rng.integers(0, 10, (h_in, w_in)), rng.integers(0, 10, (h_out, w_out)))
    return Example(task_id=f"t{seed}", pair_index=0, demos=(), query=pair)


def test_padding_never_changes_an_examples_logits():
    torch.manual_seed(0)
    net = AgentNet(prompt_dim=8, channels=8, layers=4)
    exs = [example(3, 4, 5, 2, 0), example(9, 7, 9, 7, 1), example(2, 2, 1, 1, 2)]
    prompts = torch.randn(3, 8)
    batch = collate(exs)
    together = net(prompts, batch.inputs, batch.canvas_mask)
    assert together.shape == (3, *batch.canvas, 10)
    for i, ex in enumerate(exs):
        single = collate([ex])
        alone = net(prompts[i : i + 1], single.inputs, single.canvas_mask)[0]
        h, w = single.canvas
        assert torch.allclose(together[i, :h, :w], alone, atol=1e-6)


def test_logits_depend_on_the_prompt():
    torch.manual_seed(0)
    net = AgentNet(prompt_dim=8, channels=8, layers=2)
    batch = collate([example(3, 3, 3, 3, 0)])
    prompt = torch.randn(1, 8, requires_grad=True)
    net(prompt, batch.inputs, batch.canvas_mask).sum().backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0  # non-zero from the very first step
