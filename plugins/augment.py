"""Data augmentation: the 8 rotations/reflections of a grid and colour permutations that keep 0 fixed.

One :class:`Transform` is drawn per training example and applied to *every*
grid of it - each demonstration pair, the query input and the query output -
so the task stays the same task, seen in another orientation and palette.
Colour 0 (the background in most ARC tasks) is never permuted.

Off by default; on when listed under ``plugins.extra`` in the YAML::

    plugins:
      extra:
        - name: augment
          dihedral: true      # the 8 rotations/reflections
          colours: true       # permute colours 1-9
          p: 1.0              # share of training examples augmented
          tta_views: 0        # evaluation: extra augmented views to vote over (0 = none)

With ``tta_views: N`` the evaluator predicts each test input in N augmented
views besides the original, maps each prediction back (:meth:`Transform.invert`)
and votes.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from arcfw.core.data.batch import NUM_COLOURS, Example, Pair
from arcfw.core.engine.context import Context, View
from arcfw.core.engine.hookspecs import hookimpl
from arcfw.core.engine.plugin import Plugin

#: names of the dihedral transforms, by index k: rotate k % 4 quarter turns counter-clockwise, then transpose if k >= 4
DIHEDRAL = ("identity", "rot90", "rot180", "rot270", "transpose", "rot90+transpose", "rot180+transpose", "rot270+transpose")
IDENTITY_COLOURS = tuple(range(NUM_COLOURS))


@dataclass(frozen=True)
class Transform:
    """A dihedral transform ``k`` (see :data:`DIHEDRAL`) followed by a colour map ``c -> colours[c]``."""

    k: int = 0
    colours: tuple[int, ...] = IDENTITY_COLOURS

    def __post_init__(self) -> None:
        if not 0 <= self.k < len(DIHEDRAL):
            raise ValueError(f"dihedral index must be in 0..7, got {self.k}")
        if sorted(self.colours) != list(IDENTITY_COLOURS) or self.colours[0] != 0:
            raise ValueError(f"colours must be a permutation of 0-9 that keeps 0, got {self.colours}")

    @property
    def name(self) -> str:
        return DIHEDRAL[self.k] + ("" if self.colours == IDENTITY_COLOURS else "+colours")

    def apply(self, grid: np.ndarray) -> np.ndarray:
        g = np.rot90(grid, self.k % 4)
        if self.k >= 4:
            g = g.T
        out: np.ndarray = np.asarray(self.colours, dtype=np.int64)[g]
        return out

    def invert(self, grid: np.ndarray) -> np.ndarray:
        g = np.argsort(self.colours)[grid]
        if self.k >= 4:
            g = g.T
        return np.ascontiguousarray(np.rot90(g, -(self.k % 4)), dtype=np.int64)

    def pair(self, p: Pair) -> Pair:
        """The transform on both grids of ``p`` (the output if known)."""
        return Pair(self.apply(p.input), None if p.output is None else self.apply(p.output))

    def example(self, ex: Example) -> Example:
        """The same transform on every grid of ``ex`` (demos, query input, query output if known)."""
        return Example(task_id=ex.task_id, pair_index=ex.pair_index, demos=tuple(self.pair(p) for p in ex.demos), query=self.pair(ex.query))


def random_colours(rng: np.random.Generator) -> tuple[int, ...]:
    """A uniform permutation of colours 1-9; 0 stays 0."""
    return (0, *(int(c) + 1 for c in rng.permutation(NUM_COLOURS - 1)))


class Augment(Plugin):
    """Rotations/reflections and colour permutations (0 fixed), one per example; optional voting views at evaluation.

    Parameters (YAML):

    - ``dihedral``: draw one of the 8 rotations/reflections per example.
    - ``colours``: permute colours 1-9 (0 stays) per example.
    - ``p``: share of training examples augmented (the others are left as they are).
    - ``tta_views``: at evaluation, extra augmented views of each test input whose predictions are mapped back and voted over (0: none).
    """

    name = "augment"
    role = "extra"
    description = "Augmentation: 8 rotations/reflections + colour permutations keeping 0; test-time views to vote over"

    def __init__(self, dihedral: bool = True, colours: bool = True, p: float = 1.0, tta_views: int = 0):
        if not (dihedral or colours):
            raise ValueError("at least one of dihedral and colours must be true")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p!r}")
        if tta_views < 0:
            raise ValueError(f"tta_views must be >= 0, got {tta_views!r}")
        self.dihedral = dihedral
        self.colours = colours
        self.p = float(p)
        self.tta_views = tta_views

    def draw(self, rng: np.random.Generator) -> Transform:
        k = int(rng.integers(len(DIHEDRAL))) if self.dihedral else 0
        return Transform(k, random_colours(rng) if self.colours else IDENTITY_COLOURS)

    @hookimpl
    def augment_example(self, example: Example, rng: np.random.Generator, ctx: Context) -> Example | None:
        if rng.random() >= self.p:
            return None
        return self.draw(rng).example(example)

    @hookimpl
    def test_time_views(self, example: Example, ctx: Context) -> list[View] | None:
        """``tta_views`` views: the 7 non-identity rotations/reflections in turn (each with its own
        colour permutation when ``colours``), seeded by the run seed and the example."""
        if not self.tta_views:
            return None
        rng = np.random.default_rng([ctx.seed, zlib.crc32(example.key.encode())])
        views = []
        for i in range(self.tta_views):
            k = 1 + i % (len(DIHEDRAL) - 1) if self.dihedral else 0
            t = Transform(k, random_colours(rng) if self.colours else IDENTITY_COLOURS)
            views.append(View(example=t.example(example), invert=t.invert, name=t.name))
        return views
