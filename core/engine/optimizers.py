"""The main optimizer, by the name in ``optimizer.name`` (:data:`OPTIMIZERS` is the schema's choice)."""

from __future__ import annotations

from typing import Any

import torch

#: ``optimizer.name`` choices
OPTIMIZERS = ("adamw", "adam", "sgd")


def build_optimizer(o: dict[str, Any], param_groups: list[dict[str, Any]], *, fused: bool) -> torch.optim.Optimizer:
    """``o``: the config's ``optimizer`` section; ``param_groups``: torch parameter groups, each with its lr."""
    if o["name"] == "adamw":
        return torch.optim.AdamW(param_groups, betas=tuple(o["betas"]), eps=o["eps"], weight_decay=o["weight_decay"], fused=fused)
    if o["name"] == "adam":
        return torch.optim.Adam(param_groups, betas=tuple(o["betas"]), eps=o["eps"], weight_decay=o["weight_decay"], fused=fused)
    if o["name"] == "sgd":
        return torch.optim.SGD(param_groups, lr=param_groups[0]["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"])
    raise ValueError(f"unknown optimizer {o['name']!r} (one of {OPTIMIZERS})")
