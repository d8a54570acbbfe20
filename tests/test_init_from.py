"""arcfw run --init-from: a new run (its own data and output folder) starting from a checkpoint's weights."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import REPO, TINY, train_tiny_run

from arcfw.core.commands.cli import main
from arcfw.core.config import load_config
from arcfw.core.errors import CheckpointError
from arcfw.core.training.trainer import Trainer

SETS = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    return root, train_tiny_run(root, 3).engine


def modules(engine) -> dict[str, torch.Tensor]:
    return {f"{g.name}.{k}": v.clone() for g in engine.groups for m in g.modules for k, v in m.state_dict().items()}


def test_a_new_run_starts_from_the_checkpoints_weights_with_a_fresh_optimizer(pretrained, tmp_path):
    root, engine = pretrained
    cfg = load_config(REPO / "configs" / "default.yaml", {**TINY, "data.max_tasks": 5, "max_batches": 2})
    trainer = Trainer(cfg, tmp_path / "new", quiet=True, init_from=root / "run")
    new = trainer.engine
    start, trained = modules(new), modules(engine)
    assert start.keys() == trained.keys() and all(torch.equal(start[k], trained[k]) for k in start)
    assert new.optimizer.state_dict()["state"] == {} and new.global_step == 0
    rl, rl_trained = new.plugins["rl_policy"], engine.plugins["rl_policy"]  # plugin state starts fresh
    assert (rl.updates, rl_trained.updates) == (0, 2) and rl.optimizer.state_dict()["state"] == {}  # steps 0 and 2 (update_every: 2)
    trainer.fit()
    assert new.global_step == 2 and (tmp_path / "new" / "checkpoints" / "latest").is_file()
    assert (root / "run" / "checkpoints" / "latest").is_file()  # the pretrained run is left alone


def test_a_model_of_another_shape_is_refused_naming_the_keys(pretrained, tmp_path):
    root, _ = pretrained
    out = tmp_path / "new"
    args = ["run", str(REPO / "configs" / "default.yaml"), *SETS, "--set", "plugins.predictor.dim=8", "--max-batches", "1",
            "--out", str(out), "--init-from", str(root / "run"), "-q"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and res.stderr.count("\n") == 1, res.output
    assert "cannot initialise from it" in res.stderr and "agent.blocks.0.cross.q.weight (checkpoint: [16, 16], now: [8, 8])" in res.stderr
    assert not out.exists()  # nothing written


def test_init_from_needs_a_checkpoint_and_excludes_resume(pretrained, tmp_path):
    root, _ = pretrained
    base = ["run", str(REPO / "configs" / "default.yaml"), *SETS, "--max-batches", "1", "-q"]
    res = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "a"), "--init-from", str(tmp_path)])
    assert res.exit_code == 2 and "no checkpoint here" in res.stderr
    res = CliRunner().invoke(main, [*base, "--resume", str(root / "run"), "--init-from", str(root / "run")])
    assert res.exit_code == 2 and "--init-from" in res.stderr and "--resume" in res.stderr


def test_init_from_command_trains_on_new_data(pretrained, tmp_path):
    root, _ = pretrained
    out = tmp_path / "new"
    args = ["run", str(REPO / "configs" / "default.yaml"), *SETS, "--set", "data.max_tasks=2", "--max-batches", "2",
            "--out", str(out), "--init-from", str(root / "run")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "model initialised from" in res.stderr
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    with pytest.raises(CheckpointError):
        from arcfw.core.training.checkpoint import init_weights

        init_weights(Trainer(load_config(REPO / "configs" / "default.yaml", dict(TINY)), tmp_path / "x", quiet=True).engine, tmp_path / "nothing")
