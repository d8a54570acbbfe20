"""Building blocks that predictor plugins share: the output-size head and the learner that trains it.

A predictor answers ``predict_shape`` at evaluation (the output grid's size is
predicted, never read from the answer).  :class:`SizeLearner` gives any
predictor plugin a :class:`SizeHead` that learns after every step, in
``post_step_update``, from the detached refined prompt and the answer's size,
with an optimizer of its own (so the main loss and its gradients stay those of
the grid), and that goes into checkpoints through the plugin's ``state_dict``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from arcfw.core.data.shapes import mask_shapes, rule_candidate_shapes, rule_shapes, top_shapes
from arcfw.core.data.tasks import MAX_SIDE
from arcfw.core.engine.distributed import average_gradients, broadcast_
from arcfw.core.engine.hookspecs import hookimpl


class SizeHead(nn.Module):
    """Output size from the refined prompt: logits over sides 1..30 for rows and for columns, ``[B, 2, 30]``.

    ``logits = MLP(prompt) + w_rule * onehot(rule size) + w_input * onehot(input size)``.
    The MLP's last layer starts at zero, so an untrained head predicts the size the
    demonstration pairs suggest (:func:`arcfw.core.data.shapes.rule_shape`), the input size
    second; training learns the departures.  It reads the prompt and the input grid's
    size only, never the canvas, which in training would give the answer's size away.
    """

    def __init__(self, prompt_dim: int, hidden: int):
        super().__init__()
        first, last = nn.Linear(prompt_dim, hidden), nn.Linear(hidden, 2 * MAX_SIDE)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.mlp = nn.Sequential(first, nn.GELU(), last)
        self.prior = nn.Parameter(torch.tensor([4.0, 2.0]))  # weights of the rule size and the input size

    def forward(self, prompt: torch.Tensor, rule: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.mlp(prompt).view(prompt.shape[0], 2, MAX_SIDE).float()
        sides = torch.arange(1, MAX_SIDE + 1, device=prompt.device)
        return logits + self.prior[0] * (rule[..., None] == sides) + self.prior[1] * (inp[..., None] == sides)


class SizeLearner:
    """A :class:`SizeHead` with its own Adam: ``shapes`` for ``predict_shape``, ``update`` for
    ``post_step_update`` (logs ``size_loss`` and ``size_acc``, measured before the update)."""

    def __init__(self, prompt_dim: int, hidden: int, lr: float, device: torch.device, fused: bool):
        self.head = SizeHead(prompt_dim, hidden).to(device)
        broadcast_(self.head.parameters())  # same start on every rank (several processes)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=lr, fused=fused)

    def logits(self, prompt: torch.Tensor, batch: Any) -> torch.Tensor:
        """``[B, 2, 30]`` logits of the output's rows and columns (reads no answer, no canvas)."""
        logits: torch.Tensor = self.head(prompt.float(), rule_shapes(batch), mask_shapes(batch.input_mask))
        return logits

    def shapes(self, prompt: torch.Tensor, batch: Any) -> torch.Tensor:
        """The two attempts' sizes ``[B, 2, 2]``: the size the demonstrations imply first
        (:func:`~arcfw.core.data.shapes.rule_candidate_shapes`), then the head's best size if it differs,
        else the demonstrations' second candidate, else the head's runner-up.

        The rule goes first because the head, which learns absolute sides from the prompt, generalises
        worse than the rules do: after test-time training on one task's demonstrations it had learnt
        their sizes, not the rule behind them (transposed sizes, benchmarks/README.md)."""
        rule = rule_candidate_shapes(batch, 2)
        head = top_shapes(self.logits(prompt, batch), k=2)
        rows = []
        for r, h in zip(rule.tolist(), head.tolist()):
            second = h[0] if h[0] != r[0] else (r[1] if r[1] != r[0] else h[1])
            rows.append([r[0], second])
        return torch.tensor(rows, dtype=torch.long, device=rule.device)

    def update(self, result: Any) -> dict[str, float] | None:
        if not result.applied:  # a skipped step may carry non-finite values
            return None
        target = mask_shapes(result.batch.target_mask).clamp_min(1)  # [B, 2] the answer's size
        with torch.enable_grad():
            logits = self.logits(result.refined, result.batch)
            loss = F.cross_entropy(logits.reshape(-1, MAX_SIDE), (target - 1).reshape(-1)) * 2  # rows + columns
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
        average_gradients(self.head.parameters())  # the size head stays the same on every rank
        self.optimizer.step()
        right = (top_shapes(logits.detach(), k=1)[:, 0] == target).all(1).float().mean()
        size_loss, size_acc = torch.stack([loss.detach(), right]).tolist()
        return {"size_loss": size_loss, "size_acc": size_acc}

    def state_dict(self) -> dict[str, Any]:
        return {"size_head": self.head.state_dict(), "size_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["size_head"])
        self.optimizer.load_state_dict(state["size_optimizer"])


class SizePredictor:
    """Mixin for a predictor plugin with a :class:`SizeLearner` in ``self.sizes`` (built in its
    ``configure``): implements ``predict_shape``, the size head's ``post_step_update`` and the
    ``state_dict`` / ``load_state_dict`` that put it into checkpoints."""

    sizes: SizeLearner | None = None

    @property
    def size_head(self) -> SizeHead:
        assert self.sizes is not None, "configure() builds the size head"
        return self.sizes.head

    def size_logits(self, prompt: torch.Tensor, batch: Any) -> torch.Tensor:
        """``[B, 2, 30]`` logits of the output's rows and columns (reads no answer, no canvas)."""
        assert self.sizes is not None, "configure() builds the size head"
        return self.sizes.logits(prompt, batch)

    @hookimpl
    def predict_shape(self, prompt: torch.Tensor, batch: Any, ctx: Any) -> torch.Tensor:
        assert self.sizes is not None, "configure() builds the size head"
        return self.sizes.shapes(prompt, batch)

    @hookimpl
    def post_step_update(self, result: Any, ctx: Any) -> dict[str, float] | None:
        assert self.sizes is not None, "configure() builds the size head"
        return self.sizes.update(result)

    @hookimpl
    def state_dict(self, ctx: Any) -> dict[str, Any]:
        assert self.sizes is not None, "configure() builds the size head"
        return self.sizes.state_dict()

    @hookimpl
    def load_state_dict(self, state: dict[str, Any], ctx: Any) -> None:
        assert self.sizes is not None, "configure() builds the size head"
        self.sizes.load_state_dict(state)
