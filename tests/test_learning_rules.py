"""Does the default pipeline learn a task's rule from its demonstrations?

Two families whose query inputs are drawn identically (copy, and swapping colours 1 and 2):
only the demonstrations tell a task's rule.  The default pipeline (qwen cell encoding, RL
refinement, grid_transformer, masked EFE loss, curriculum), shrunk, trains on generated tasks of
both and is scored on *new* tasks (another seed) whose test outputs it never saw.  A model that
ignored the demonstrations could not beat 0.5 here.  Then each task is given the other family's
demonstrations: its answer must follow them.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import REPO

from arcfw.core.commands.evaluate import predict, score
from arcfw.core.config import load_config
from arcfw.core.data.batch import Task
from arcfw.core.data.generate import generate, write_tasks
from arcfw.core.data.tasks import load_tasks
from arcfw.core.training.trainer import Trainer

SMALL = {
    "device": "cpu", "threads": 1, "log_every": 1000, "checkpoint.every": None, "epochs": 2,
    "plugins.prompt.hidden_size": 32, "plugins.prompt.num_layers": 2, "plugins.prompt.num_heads": 2,
    "plugins.prompt.num_kv_heads": 1, "plugins.prompt.intermediate_size": 64, "plugins.prompt.cache_every": 1,
    "plugins.predictor.dim": 32, "plugins.predictor.heads": 2, "plugins.predictor.layers": 1,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("rules")
    write_tasks(root / "train", generate(["copy", "swap12"], 40, seed=0, max_side=6))
    write_tasks(root / "test", generate(["copy", "swap12"], 10, seed=1, max_side=6))
    cfg = load_config(REPO / "configs" / "default.yaml", {**SMALL, "data.source": str(root / "train"), "out": str(root / "run")})
    trainer = Trainer(cfg, root / "run", quiet=True)
    trainer.fit()
    return trainer.engine, load_tasks(str(root / "test"))


def test_held_out_tasks_are_solved_by_their_demonstrations(trained):
    engine, tasks = trained
    result = score(tasks, predict(engine, tasks))
    assert result.pass_at_2 >= 0.9, result.per_task


def test_the_other_familys_demonstrations_flip_the_answer(trained):
    engine, tasks = trained
    by_id = {t.task_id: t for t in tasks}
    flipped = right = 0
    for t in tasks:
        family, rest = t.task_id.split("-", 1)
        other = by_id.get(("swap12" if family == "copy" else "copy") + "-" + rest)
        if other is None:
            continue
        # the same query, the other rule's demonstrations: the answer must follow the demonstrations
        swapped = Task(t.task_id, train=other.train, test=t.test)
        guess = predict(engine, [swapped])[t.task_id][0][0]
        inp = t.test[0].input
        want = inp if family == "swap12" else np.where(inp == 1, 2, np.where(inp == 2, 1, inp))
        flipped += 1
        right += bool(np.array_equal(guess, want))
    assert flipped >= 10
    assert right / flipped >= 0.9, (right, flipped)
