"""Engine.state_dict / load_state_dict: an in-memory snapshot restores the engine exactly."""

from __future__ import annotations

import pytest
import torch

from arcfw.core.errors import CheckpointError


def _weights(engine) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().clone() for name, m in engine.named_modules() for k, v in m.state_dict().items()}


def _train(engine, batches) -> list[float]:
    return [engine.train_step(b)["loss"] for b in batches]


def test_snapshot_restores_the_engine_exactly_and_can_be_restored_twice(make_engine, batches):
    engine = make_engine()
    data = batches(6)
    _train(engine, data[:2])  # optimizer moments, health memory and the policy's baseline are not empty
    snapshot = engine.state_dict()
    torch_rng = torch.get_rng_state()
    first = _train(engine, data[2:])
    after_first = _weights(engine)
    counters = (engine.global_step, engine.guard.skipped, list(engine.health.losses))

    for _ in range(2):  # the snapshot is a copy: training after a restore must not change it
        notes = engine.load_state_dict(snapshot)
        torch.set_rng_state(torch_rng)
        assert notes == [] and engine.global_step == 2
        again = _train(engine, data[2:])
        assert again == first
        assert (engine.global_step, engine.guard.skipped, list(engine.health.losses)) == counters
        for k, v in _weights(engine).items():
            assert torch.equal(v, after_first[k]), k


def test_snapshot_holds_copies_not_references(make_engine, batches):
    engine = make_engine()
    engine.train_step(batches(1)[0])
    snapshot = engine.state_dict()
    live = {id(t) for _, m in engine.named_modules() for t in m.state_dict().values()}
    live |= {id(t) for s in engine.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)}

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from tensors(v)

    held = list(tensors(snapshot))
    assert held and not any(id(t) in live for t in held)
    assert set(snapshot) >= {"global_step", "optimizer", "precision", "grad_watch", "guard", "health", "generator",
                             "plugins", "modules", "schedule"}
    assert "rl_policy" in snapshot["plugins"]


def test_a_snapshot_of_another_model_is_refused(make_engine):
    engine = make_engine()
    snapshot = engine.state_dict()
    snapshot["modules"]["other"] = snapshot["modules"].pop("agent")
    with pytest.raises(CheckpointError, match="holds modules"):
        engine.load_state_dict(snapshot, source="snap")
