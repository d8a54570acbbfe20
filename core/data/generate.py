"""Synthetic ARC tasks from rule families: ``arcfw generate FAMILY... --tasks N --out DIR``.

Each *family* is a rule with parameters (a colour permutation, a shift, a scale
factor ...).  A generated task draws its rule parameters once and applies them
to every one of its pairs, so only its demonstrations say which rule (and which
parameters) hold; its test pairs are held out the same way as ARC's.  The output
is standard ARC JSON, one file per task (``FAMILY-sSEED-NNNN.json``), that
``data.source: DIR`` and ``arcfw eval --data DIR`` load as they load any folder.

**Deterministic.** Task ``i`` of family ``F`` depends only on ``(seed, F, i)``
and the size options, never on the other families asked for or on ``--tasks``:
``generate(["copy", "flip_h"], 10)`` holds the same ``copy`` tasks as
``generate(["copy"], 20)``'s first ten.

**Families with identical inputs.** The rule parameters and the input grids
come from two separate random streams; the inputs' stream is seeded by
``(seed, input generator, i)``.  So families that share an input generator (and
whose parameters do not constrain it) give task ``i`` *the same input grids*:
``copy-s0-0003`` and ``swap12-s0-0003`` have identical inputs and differ only in their
outputs.  (A pair whose output would equal its input is redrawn, from a stream of
its own, so such a pair - e.g. a left-right symmetric grid for ``flip_h`` - is
the only place where two such families' inputs can differ.)  :data:`PAIRS` lists such pairs of families; on them a model can only
tell the rule from the demonstrations.

Grids hold ints 0-9 (0 is the background), sides 1..30.  ``min_side`` and
``max_side`` bound the *input* sides; a family whose output grows (``scale``,
``tile``) draws smaller inputs so that the output still fits in 30x30, and
families that need room (``crop``) draw at least 3 cells a side.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from arcfw.core.data.batch import Task
from arcfw.core.data.tasks import MAX_SIDE, _parse_task
from arcfw.core.errors import ConfigError

Grid = np.ndarray
#: a family's parameters, drawn once per task (``Family.draw``)
Params = dict[str, Any]
#: a task as ARC JSON: ``{"train": [{"input": rows, "output": rows}, ...], "test": [...]}``
TaskJSON = dict[str, Any]
#: the file written beside the tasks; not ``*.json``, so the data loader never reads it as a task
MANIFEST = "generate.yaml"


# ---------------------------------------------------------------- input generators
# gen(rng, h, w, task_ctx, params) -> grid; task_ctx is drawn once per task by the generator's ``task``


def _palette(rng: np.random.Generator, params: Params) -> list[int]:
    """A task's non-background colours: 1 and 2 always, plus 1-2 others (``params['require']`` added,
    ``params['avoid']`` left out)."""
    avoid = set(params.get("avoid", ()))
    require = [c for c in params.get("require", ()) if c not in (1, 2)]
    others = [c for c in range(3, 10) if c not in avoid and c not in require]
    extra = [int(c) for c in rng.choice(others, size=int(rng.integers(1, 3)), replace=False)]
    return sorted({1, 2, *require, *extra})


def _scatter(rng: np.random.Generator, h: int, w: int, palette: list[int], density: float) -> Grid:
    """Background 0 with cells of ``palette`` at ``density``; every palette colour appears at least
    once when the grid has room for it."""
    g = np.where(rng.random((h, w)) < density, rng.choice(palette, size=(h, w)), 0)
    cells = rng.permutation(h * w)[: len(palette)]
    for colour, cell in zip(palette, cells):
        g[cell // w, cell % w] = colour
    return g.astype(np.int64)


@dataclass(frozen=True)
class InputGen:
    """How a family draws its input grids."""

    name: str
    doc: str
    min_side: int
    task: Callable[[np.random.Generator, Params], dict[str, Any]]
    grid: Callable[[np.random.Generator, int, int, dict[str, Any]], Grid]


def _noise_grid(rng: np.random.Generator, h: int, w: int, ctx: dict[str, Any]) -> Grid:
    return _scatter(rng, h, w, ctx["palette"], float(rng.uniform(0.3, 0.7)))


def _sparse_grid(rng: np.random.Generator, h: int, w: int, ctx: dict[str, Any]) -> Grid:
    return _scatter(rng, h, w, ctx["palette"][:2], float(rng.uniform(0.1, 0.35)))


def _object_grid(rng: np.random.Generator, h: int, w: int, ctx: dict[str, Any]) -> Grid:
    """One object: a bh x bw box (smaller than the grid) filled at 60% with palette colours, each of
    its border rows and columns touched, so the box is the bounding box of the non-background cells."""
    bh, bw = int(rng.integers(1, h)), int(rng.integers(1, w))
    top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    box = np.where(rng.random((bh, bw)) < 0.6, rng.choice(ctx["palette"], size=(bh, bw)), 0)
    for r, c in ((0, rng.integers(bw)), (bh - 1, rng.integers(bw)), (rng.integers(bh), 0), (rng.integers(bh), bw - 1)):
        box[r, c] = rng.choice(ctx["palette"])
    g = np.zeros((h, w), dtype=np.int64)
    g[top : top + bh, left : left + bw] = box
    return g


INPUT_GENS: dict[str, InputGen] = {
    g.name: g
    for g in (
        InputGen("noise", "random cells (30-70%) of 3-4 task colours, 1 and 2 always among them", 2,
                 lambda rng, p: {"palette": _palette(rng, p)}, _noise_grid),
        InputGen("sparse", "random cells (10-35%) of two task colours on background 0", 2,
                 lambda rng, p: {"palette": [int(c) for c in rng.permutation(np.arange(1, 10))[:2]]}, _sparse_grid),
        InputGen("object", "one object (a box 60% filled with task colours) on background 0", 3,
                 lambda rng, p: {"palette": _palette(rng, p)}, _object_grid),
    )
}


# ---------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    """A rule: ``apply(grid, params)`` with ``params = draw(rng)`` fixed per task."""

    name: str
    doc: str
    inputs: str  # an INPUT_GENS name
    apply: Callable[[Grid, Params], Grid]
    draw: Callable[[np.random.Generator], Params] = field(default=lambda rng: {})
    #: (rows, columns) an input may have at most so that the output fits in 30x30
    max_in: Callable[[Params], tuple[int, int]] = field(default=lambda p: (MAX_SIDE, MAX_SIDE))
    #: False only for the identity: a pair whose output equals its input is redrawn
    changes: bool = True


def _derangement(rng: np.random.Generator) -> Params:
    while True:
        perm = rng.permutation(np.arange(1, 10))
        if not (perm == np.arange(1, 10)).any():
            return {"map": [0, *(int(c) for c in perm)]}


def _recolour(g: Grid, table: Sequence[int]) -> Grid:
    out: Grid = np.asarray(table, dtype=np.int64)[g]
    return out


def _swap_table(a: int, b: int) -> list[int]:
    t = list(range(10))
    t[a], t[b] = b, a
    return t


def _gravity(g: Grid, axis: int, towards_end: bool) -> Grid:
    """Non-background cells slide along ``axis`` to one end, keeping their order."""
    moved = np.moveaxis(g, axis, -1)
    out = np.zeros_like(moved)
    for idx in np.ndindex(moved.shape[:-1]):
        line = moved[idx]
        cells = line[line != 0]
        if towards_end:
            out[idx][len(line) - len(cells) :] = cells
        else:
            out[idx][: len(cells)] = cells
    return np.moveaxis(out, -1, axis)


def _shift(g: Grid, dy: int, dx: int) -> Grid:
    """Move every cell by (dy, dx); cells that leave the grid are lost, uncovered cells become 0."""
    h, w = g.shape
    out = np.zeros_like(g)
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = g[max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)]
    return out


def _draw_shift(rng: np.random.Generator) -> Params:
    while True:
        dy, dx = (int(v) for v in rng.integers(-2, 3, size=2))
        if (dy, dx) != (0, 0):
            return {"dy": dy, "dx": dx}


def _crop(g: Grid) -> Grid:
    rows, cols = np.nonzero(g)
    return g[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def _draw_two(rng: np.random.Generator) -> Params:
    a, b = sorted(int(c) for c in rng.choice(np.arange(1, 10), size=2, replace=False))
    return {"a": a, "b": b, "require": [a, b]}


def _draw_tile(rng: np.random.Generator) -> Params:
    while True:
        ry, rx = (int(v) for v in rng.integers(1, 4, size=2))
        if (ry, rx) != (1, 1):
            return {"ry": ry, "rx": rx}


_FAMILIES: tuple[Family, ...] = (
    Family("copy", "output = input", "noise", lambda g, p: g.copy(), changes=False),
    Family("swap12", "colours 1 and 2 swapped (same inputs as copy)", "noise", lambda g, p: _recolour(g, _swap_table(1, 2))),
    Family("swap", "two colours a, b (drawn per task) swapped", "noise", lambda g, p: _recolour(g, _swap_table(p["a"], p["b"])), _draw_two),
    Family("colour_map", "a permutation of colours 1-9 without fixed points (drawn per task); 0 stays", "noise",
           lambda g, p: _recolour(g, p["map"]), _derangement),
    Family("fill_bg", "background cells (0) recoloured to colour c (drawn per task, absent from the inputs)", "noise",
           lambda g, p: np.where(g == 0, p["c"], g), lambda rng: {"c": (c := int(rng.integers(3, 10))), "avoid": [c]}),
    Family("flip_h", "mirrored left-right (columns reversed)", "noise", lambda g, p: g[:, ::-1].copy()),
    Family("flip_v", "mirrored top-bottom (rows reversed; same inputs as flip_h)", "noise", lambda g, p: g[::-1, :].copy()),
    Family("rot90", "rotated a quarter turn clockwise", "noise", lambda g, p: np.rot90(g, -1).copy()),
    Family("rot180", "rotated a half turn", "noise", lambda g, p: np.rot90(g, 2).copy()),
    Family("rot270", "rotated a quarter turn anticlockwise (same inputs as rot90)", "noise", lambda g, p: np.rot90(g, 1).copy()),
    Family("transpose", "rows become columns (mirrored along the main diagonal)", "noise", lambda g, p: g.T.copy()),
    Family("gravity_down", "non-background cells fall to the bottom of their column", "sparse", lambda g, p: _gravity(g, 0, True)),
    Family("gravity_up", "non-background cells rise to the top of their column (same inputs as gravity_down)", "sparse",
           lambda g, p: _gravity(g, 0, False)),
    Family("gravity_left", "non-background cells slide to the left end of their row", "sparse", lambda g, p: _gravity(g, 1, False)),
    Family("gravity_right", "non-background cells slide to the right end of their row", "sparse", lambda g, p: _gravity(g, 1, True)),
    Family("roll", "shifted by (dy, dx) in -2..2 (drawn per task), wrapping around the edges", "noise",
           lambda g, p: np.roll(g, (p["dy"], p["dx"]), axis=(0, 1)), _draw_shift),
    Family("shift", "shifted by (dy, dx) in -2..2 (drawn per task), not wrapping: cells that leave are lost, "
           "uncovered cells are 0", "noise", lambda g, p: _shift(g, p["dy"], p["dx"]), _draw_shift),
    Family("crop", "cropped to the bounding box of the non-background cells (one object)", "object", lambda g, p: _crop(g).copy()),
    Family("scale", "each cell becomes a k x k block, k in {2, 3} drawn per task", "noise",
           lambda g, p: np.kron(g, np.ones((p["k"], p["k"]), dtype=np.int64)), lambda rng: {"k": int(rng.integers(2, 4))},
           lambda p: (MAX_SIDE // p["k"], MAX_SIDE // p["k"])),
    Family("tile", "the input repeated ry x rx times, ry, rx in 1..3 (not both 1) drawn per task", "noise",
           lambda g, p: np.tile(g, (p["ry"], p["rx"])), _draw_tile, lambda p: (MAX_SIDE // p["ry"], MAX_SIDE // p["rx"])),
)
FAMILIES: dict[str, Family] = {f.name: f for f in _FAMILIES}

#: pairs of families with the same input generator and unconstrained inputs: task i of both has
#: identical input grids, so only the demonstrations tell the rules apart
PAIRS: tuple[tuple[str, str], ...] = (
    ("copy", "swap12"),
    ("flip_h", "flip_v"),
    ("rot90", "rot270"),
    ("gravity_down", "gravity_up"),
)


def describe() -> list[str]:
    """One line per family: name, input generator, rule."""
    width = max(map(len, FAMILIES))
    return [f"{f.name:<{width}}  [{f.inputs}] {f.doc}" for f in FAMILIES.values()]


# ---------------------------------------------------------------- generation


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


def resolve_families(names: Sequence[str]) -> list[str]:
    """Family names in the order given, ``all`` expanded, duplicates dropped; unknown names raise."""
    if not names:
        raise ConfigError("arcfw generate", [("FAMILY", f"name at least one family (or 'all'); families: {', '.join(FAMILIES)}")])
    out: list[str] = []
    for n in names:
        for name in (FAMILIES if n == "all" else [n]):
            if name not in FAMILIES:
                raise ConfigError("arcfw generate", [("FAMILY", f"unknown family '{name}'; families: {', '.join(FAMILIES)} (or 'all')")])
            if name not in out:
                out.append(name)
    return out


def _check_options(tasks: int, train_pairs: int, test_pairs: int, min_side: int, max_side: int) -> None:
    problems = []
    for key, value, lo in (("--tasks", tasks, 1), ("--train-pairs", train_pairs, 1), ("--test-pairs", test_pairs, 0)):
        if value < lo:
            problems.append((key, f"must be at least {lo}, got {value}"))
    if not 1 <= min_side <= max_side <= MAX_SIDE:
        problems.append(("--min-side/--max-side", f"need 1 <= min-side <= max-side <= {MAX_SIDE}, got {min_side} and {max_side}"))
    if problems:
        raise ConfigError("arcfw generate", problems)


def generate_task(
    family: str, index: int, *, seed: int = 0, train_pairs: int = 3, test_pairs: int = 1, min_side: int = 3, max_side: int = 10
) -> TaskJSON:
    """Task ``index`` of ``family`` as ARC JSON (``{"train": [...], "test": [...]}``, grids as lists).

    Raises :class:`ConfigError` when the family cannot draw inputs within the sides asked for.
    """
    fam = FAMILIES[family]
    gen = INPUT_GENS[fam.inputs]
    params = fam.draw(np.random.default_rng([seed, _seed(family), index, 1]))
    max_h, max_w = fam.max_in(params)
    lo = max(min_side, gen.min_side)
    hi_h, hi_w = min(max_side, max_h), min(max_side, max_w)
    if lo > min(hi_h, hi_w):
        raise ConfigError(
            "arcfw generate",
            [("--min-side/--max-side", f"family '{family}' needs input sides in {gen.min_side}..{min(max_h, max_w)} "
              f"(task {index}: {params}), but --min-side {min_side} --max-side {max_side} allow none of them")],
        )
    ctx = gen.task(np.random.default_rng([seed, _seed(gen.name), index, 0]), params)
    pairs = []
    for j in range(train_pairs + test_pairs):
        for attempt in range(50):  # a pair the rule leaves unchanged is redrawn (not for copy)
            rng = np.random.default_rng([seed, _seed(gen.name), index, 2, j, attempt])
            h, w = int(rng.integers(lo, hi_h + 1)), int(rng.integers(lo, hi_w + 1))
            grid = gen.grid(rng, h, w, ctx)
            out = fam.apply(grid, params)
            if not fam.changes or not np.array_equal(grid, out):
                break
        pairs.append({"input": grid.tolist(), "output": np.asarray(out, dtype=np.int64).tolist()})
    return {"train": pairs[:train_pairs], "test": pairs[train_pairs:]}


def generate(
    families: Sequence[str],
    tasks: int,
    *,
    seed: int = 0,
    train_pairs: int = 3,
    test_pairs: int = 1,
    min_side: int = 3,
    max_side: int = 10,
) -> dict[str, TaskJSON]:
    """``{task_id: task}`` for ``tasks`` tasks of each family (ids :func:`task_id`)."""
    names = resolve_families(families)
    _check_options(tasks, train_pairs, test_pairs, min_side, max_side)
    opts = dict(seed=seed, train_pairs=train_pairs, test_pairs=test_pairs, min_side=min_side, max_side=max_side)
    return {task_id(name, i, seed): generate_task(name, i, **opts) for name in names for i in range(tasks)}


def task_id(family: str, index: int, seed: int = 0) -> str:
    """``FAMILY-sSEED-NNNN``: the seed is in the id, so folders written with different seeds never share
    an id (``arcfw eval`` refuses evaluation tasks whose id is in the training data)."""
    return f"{family}-s{seed}-{index:04d}"


def write_tasks(out: Path, tasks: dict[str, TaskJSON], *, overwrite: bool = False, manifest: str = "") -> list[Path]:
    """Write each task to ``out/ID.json`` (and ``manifest`` to ``out/generate.yaml``).

    A folder that already holds files is refused unless ``overwrite``; then its
    ``*.json`` files and manifest are removed first, so the folder holds exactly these tasks.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", [("", f"output path exists and is not a folder: {out}")])
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError("--out", [("", f"{out} already holds files; pass --overwrite to replace its tasks or use another --out")])
        for old in [*out.glob("*.json"), out / MANIFEST]:
            if old.is_file():
                old.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError("--out", [("", f"cannot create output folder {out}: {e.strerror}")]) from None
    paths = []
    for task_id, task in tasks.items():
        path = out / f"{task_id}.json"
        path.write_text(json.dumps(task, separators=(",", ":")) + "\n", encoding="utf-8")
        paths.append(path)
    if manifest:
        (out / MANIFEST).write_text(manifest, encoding="utf-8")
    return paths


def as_tasks(tasks: dict[str, TaskJSON]) -> list[Task]:
    """:func:`generate`'s output as validated :class:`~arcfw.core.data.batch.Task` objects, sorted by id
    (what ``load_tasks`` would read back from the folder), without writing files."""
    return [_parse_task(task_id, tasks[task_id], f"generated:{task_id}") for task_id in sorted(tasks)]
