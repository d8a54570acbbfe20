"""Geometric views of an input grid, aligned to the cells of an output grid.

A neural net that reads a grid cell by cell, with learned positions, finds
colour rules easily (copy, recolour, swap) but learns flips, rotations or
scaling slowly or not at all: the output cell ``(r, c)`` of a horizontal flip
needs the input cell ``(r, w-1-c)``, a coordinate the net must compute.  So the
geometry is planned explicitly: for an output grid of size ``(ho, wo)`` and an
input grid of size ``(hi, wi)``, every *view* ``k`` maps each output cell
``(r, c)`` to one input cell (or to none, outside the input), and the view's
colour at ``(r, c)`` is that input cell's colour, :data:`NO_CELL` where there is
none.  A model reads all views at every output cell and learns, from the
demonstration pairs, which view (and which colour map on top) gives the answer.

The views (:data:`VIEW_NAMES`):

- the 8 symmetries of the square: ``identity``, ``flip_h`` (mirror left-right),
  ``flip_v`` (mirror top-bottom), ``rot180``, ``transpose``, ``anti_transpose``,
  ``rot90`` (clockwise), ``rot270``;
- ``scale``: nearest-neighbour resampling of the input onto the output size
  (upscaling x2, x3, ... and downscaling);
- ``tile``: the input repeated (``(r mod hi, c mod wi)``);
- ``crop``: the input read from the top-left corner of the bounding box of its
  non-zero cells (cropping an object out of a zero background);
- ``gravity_down``, ``gravity_up``, ``gravity_left``, ``gravity_right``: the
  non-zero cells of each column (row) slid to one end, in order, zeros behind
  them (operations along rows and columns).

All of it is plain NumPy on small grids; :func:`grid_views` of a 30x30 grid
takes well under a millisecond.
"""

from __future__ import annotations

import numpy as np

#: colour of a view at an output cell that maps to no input cell (never a colour 0-9)
NO_CELL = 10

VIEW_NAMES: tuple[str, ...] = (
    "identity", "flip_h", "flip_v", "rot180", "transpose", "anti_transpose", "rot90", "rot270",
    "scale", "tile", "crop", "gravity_down", "gravity_up", "gravity_left", "gravity_right",
)
NUM_VIEWS = len(VIEW_NAMES)


def _gravity(grid: np.ndarray, axis: int, to_end: bool) -> np.ndarray:
    """Non-zero cells of every column (``axis=0``) or row (``axis=1``) slid to the end (or the start), in order."""
    g = grid if axis == 0 else grid.T
    out = np.zeros_like(g)
    for c in range(g.shape[1]):
        col = g[:, c]
        nz = col[col != 0]
        if to_end:
            out[g.shape[0] - len(nz):, c] = nz
        else:
            out[: len(nz), c] = nz
    return out if axis == 0 else out.T


def _bbox_origin(grid: np.ndarray) -> tuple[int, int]:
    rows, cols = np.nonzero(grid)
    if len(rows) == 0:
        return 0, 0
    return int(rows.min()), int(cols.min())


def grid_views(grid: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
    """Every view of ``grid`` (int ``[hi, wi]``, colours 0-9) on an ``out_shape`` grid: int64 ``[NUM_VIEWS, ho, wo]``.

    Cells that map outside the input hold :data:`NO_CELL`.
    """
    g = np.asarray(grid, dtype=np.int64)
    hi, wi = g.shape
    ho, wo = int(out_shape[0]), int(out_shape[1])
    r = np.arange(ho)[:, None].repeat(wo, 1)
    c = np.arange(wo)[None, :].repeat(ho, 0)
    y0, x0 = _bbox_origin(g)
    maps = (
        (r, c),  # identity
        (r, wi - 1 - c),  # flip_h
        (hi - 1 - r, c),  # flip_v
        (hi - 1 - r, wi - 1 - c),  # rot180
        (c, r),  # transpose
        (hi - 1 - c, wi - 1 - r),  # anti_transpose
        (hi - 1 - c, r),  # rot90 clockwise: out[r][c] = in[hi-1-c][r]
        (c, wi - 1 - r),  # rot270
        (r * hi // ho, c * wi // wo),  # scale
        (r % hi, c % wi),  # tile
        (r + y0, c + x0),  # crop
    )
    out = np.full((NUM_VIEWS, ho, wo), NO_CELL, dtype=np.int64)
    for k, (ri, ci) in enumerate(maps):
        ok = (ri >= 0) & (ri < hi) & (ci >= 0) & (ci < wi)
        out[k][ok] = g[ri[ok], ci[ok]]
    for k, moved in enumerate(
        (_gravity(g, 0, True), _gravity(g, 0, False), _gravity(g, 1, False), _gravity(g, 1, True)), start=len(maps)
    ):
        h, w = min(hi, ho), min(wi, wo)
        out[k, :h, :w] = moved[:h, :w]
    return out
