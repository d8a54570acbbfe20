"""`arcfw generate`: synthetic task families - deterministic, valid, each rule holding on its pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from arcfw.core.commands.cli import main
from arcfw.core.data import generate as gen
from arcfw.core.data.tasks import load_tasks
from arcfw.core.errors import ConfigError


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# ------------------------------------------------ independent, cell-by-cell implementations of each rule


def _rot_cw(g):
    h, w = len(g), len(g[0])
    return [[g[h - 1 - c][r] for c in range(h)] for r in range(w)]


def _gravity_col(g, down):
    h, w = len(g), len(g[0])
    out = [[0] * w for _ in range(h)]
    for c in range(w):
        cells = [g[r][c] for r in range(h) if g[r][c]]
        rows = range(h - len(cells), h) if down else range(len(cells))
        for r, v in zip(rows, cells):
            out[r][c] = v
    return out


def _t(g):
    return [list(r) for r in zip(*g)]


def _infer_map(pairs):
    """The colour -> colour map the pairs show, or None if a colour maps to two colours."""
    seen = {}
    for p in pairs:
        for ri, ro in zip(p["input"], p["output"]):
            for a, b in zip(ri, ro):
                if seen.setdefault(a, b) != b:
                    return None
    return seen


def _infer_shift(pairs, wrap):
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            if all(_shifted(p["input"], dy, dx, wrap) == p["output"] for p in pairs):
                return dy, dx
    return None


def _shifted(g, dy, dx, wrap):
    h, w = len(g), len(g[0])
    out = [[0] * w for _ in range(h)]
    for r in range(h):
        for c in range(w):
            rr, cc = r + dy, c + dx
            if wrap:
                out[rr % h][cc % w] = g[r][c]
            elif 0 <= rr < h and 0 <= cc < w:
                out[rr][cc] = g[r][c]
    return out


def _crop(g):
    cells = [(r, c) for r, row in enumerate(g) for c, v in enumerate(row) if v]
    r0, r1 = min(r for r, _ in cells), max(r for r, _ in cells)
    c0, c1 = min(c for _, c in cells), max(c for _, c in cells)
    return [row[c0 : c1 + 1] for row in g[r0 : r1 + 1]]


def _scaled(g, k):
    return [[g[r // k][c // k] for c in range(len(g[0]) * k)] for r in range(len(g) * k)]


def _tiled(g, ry, rx):
    h, w = len(g), len(g[0])
    return [[g[r % h][c % w] for c in range(w * rx)] for r in range(h * ry)]


def _one_of(pairs, candidates):
    """The parameters (from ``candidates``) under which every pair holds, if exactly one kind fits."""
    fits = [k for k, f in candidates.items() if all(f(p["input"]) == p["output"] for p in pairs)]
    return fits


def check_rule(family: str, pairs: list[dict]) -> bool:
    """Whether every pair follows ``family``'s rule with one set of parameters (found from the pairs)."""
    same = lambda f: all(f(p["input"]) == p["output"] for p in pairs)  # noqa: E731
    if family == "copy":
        return same(lambda g: g)
    if family in ("swap12", "swap", "colour_map", "fill_bg"):
        m = _infer_map(pairs)
        if m is None:
            return False
        moved = {a: b for a, b in m.items() if a != b}
        if family == "swap12":
            return moved == {1: 2, 2: 1}
        if family == "swap":
            return len(moved) == 2 and set(moved) == set(moved.values())
        if family == "colour_map":
            return m.get(0, 0) == 0 and len(set(m.values())) == len(m) and all(a != b for a, b in m.items() if a)
        return set(moved) == {0} and moved[0] not in m  # fill_bg: only 0 changes, to a colour absent from the inputs
    simple = {
        "flip_h": lambda g: [row[::-1] for row in g],
        "flip_v": lambda g: g[::-1],
        "rot90": _rot_cw,
        "rot180": lambda g: _rot_cw(_rot_cw(g)),
        "rot270": lambda g: _rot_cw(_rot_cw(_rot_cw(g))),
        "transpose": _t,
        "gravity_down": lambda g: _gravity_col(g, True),
        "gravity_up": lambda g: _gravity_col(g, False),
        "gravity_left": lambda g: _t(_gravity_col(_t(g), False)),
        "gravity_right": lambda g: _t(_gravity_col(_t(g), True)),
        "crop": _crop,
    }
    if family in simple:
        return same(simple[family])
    if family in ("roll", "shift"):
        return _infer_shift(pairs, wrap=family == "roll") is not None
    if family == "scale":
        return any(same(lambda g, k=k: _scaled(g, k)) for k in (2, 3))
    if family == "tile":
        return any(same(lambda g, a=a, b=b: _tiled(g, a, b)) for a in (1, 2, 3) for b in (1, 2, 3) if (a, b) != (1, 1))
    raise AssertionError(f"no check for family {family}")


def test_every_family_has_an_independent_check():
    for family in gen.FAMILIES:
        check_rule(family, [{"input": [[1, 2], [0, 0]], "output": [[1, 2], [0, 0]]}])  # raises if unchecked


@pytest.mark.parametrize("family", list(gen.FAMILIES))
def test_each_familys_rule_holds_on_all_its_pairs_with_one_parameter_set(family):
    tasks = gen.generate([family], 12, seed=5, train_pairs=3, test_pairs=2)
    for task_id, task in tasks.items():
        pairs = task["train"] + task["test"]
        assert len(task["train"]) == 3 and len(task["test"]) == 2
        assert check_rule(family, pairs), task_id
        for p in pairs:
            for grid in (p["input"], p["output"]):
                arr = np.asarray(grid)
                assert arr.ndim == 2 and 1 <= arr.shape[0] <= 30 and 1 <= arr.shape[1] <= 30
                assert arr.dtype.kind == "i" and arr.min() >= 0 and arr.max() <= 9
            if family != "copy":
                assert p["input"] != p["output"], task_id  # degenerate pairs are redrawn
        assert all(3 <= len(p["input"]) <= 10 for p in pairs)


def test_checks_catch_a_wrong_rule():
    """The independent checks are not vacuous: another family's pairs fail them."""
    tasks = gen.generate(["flip_h", "swap12", "rot90", "gravity_down", "roll", "scale"], 3, seed=1)
    wrong = {"flip_h": "flip_v", "swap12": "copy", "rot90": "rot270", "gravity_down": "gravity_up", "roll": "shift", "scale": "tile"}
    for task_id, task in tasks.items():
        family = task_id.split("-")[0]
        assert not check_rule(wrong[family], task["train"] + task["test"]), task_id


def test_rule_parameters_are_per_task_and_consistent_across_pairs():
    tasks = gen.generate(["colour_map", "roll", "scale"], 8, seed=0)
    maps = {json.dumps(sorted(_infer_map(t["train"] + t["test"]).items())) for k, t in tasks.items() if k.startswith("colour_map")}
    shifts = {_infer_shift(t["train"] + t["test"], True) for k, t in tasks.items() if k.startswith("roll")}
    ks = {len(t["train"][0]["output"]) // len(t["train"][0]["input"]) for k, t in tasks.items() if k.startswith("scale")}
    assert len(maps) > 1 and len(shifts) > 1 and ks == {2, 3}


def test_deterministic_and_independent_of_the_other_families():
    a = gen.generate(["copy", "rot90", "crop"], 4, seed=7)
    b = gen.generate(["crop", "rot90"], 6, seed=7)
    assert a == gen.generate(["copy", "rot90", "crop"], 4, seed=7)
    assert all(a[k] == b[k] for k in a if not k.startswith("copy"))
    assert a != gen.generate(["copy", "rot90", "crop"], 4, seed=8)


@pytest.mark.parametrize("pair", gen.PAIRS)
def test_paired_families_share_their_inputs_and_differ_in_outputs(pair):
    f1, f2 = pair
    tasks = gen.generate(list(pair), 10, seed=3)
    same_inputs = differ = total = 0
    for i in range(10):
        t1, t2 = tasks[gen.task_id(f1, i, 3)], tasks[gen.task_id(f2, i, 3)]
        for p1, p2 in zip(t1["train"] + t1["test"], t2["train"] + t2["test"]):
            total += 1
            same_inputs += p1["input"] == p2["input"]
            differ += p1["input"] == p2["input"] and p1["output"] != p2["output"]
    assert same_inputs >= 0.9 * total  # only a pair one rule leaves unchanged is redrawn
    assert differ >= 0.9 * total


def test_bad_options_raise_config_errors():
    with pytest.raises(ConfigError, match="unknown family 'nope'; families: copy, swap12"):
        gen.generate(["copy", "nope"], 2)
    with pytest.raises(ConfigError, match="--tasks: must be at least 1"):
        gen.generate(["copy"], 0)
    with pytest.raises(ConfigError, match="min-side <= max-side"):
        gen.generate(["copy"], 1, min_side=5, max_side=4)
    with pytest.raises(ConfigError, match="family 'scale' needs input sides"):
        gen.generate(["scale"], 4, min_side=16, max_side=20)


def test_cli_writes_a_folder_the_loader_reads(tmp_path):
    out = tmp_path / "tasks"
    res = invoke("generate", "copy", "swap12", "crop", "--tasks", "3", "--out", str(out), "--seed", "2",
                 "--train-pairs", "4", "--test-pairs", "2", "--min-side", "4", "--max-side", "6")
    assert res.exit_code == 0, res.output
    tasks = load_tasks(str(out))
    assert [t.task_id for t in tasks] == sorted(f"{f}-s2-{i:04d}" for f in ("copy", "swap12", "crop") for i in range(3))
    assert all(len(t.train) == 4 and len(t.test) == 2 for t in tasks)
    assert all(4 <= min(p.input.shape) and max(p.input.shape) <= 6 for t in tasks for p in t.train + t.test)
    on_disk = {t.task_id: json.loads((out / f"{t.task_id}.json").read_text()) for t in tasks}
    assert on_disk == gen.generate(["copy", "swap12", "crop"], 3, seed=2, train_pairs=4, test_pairs=2, min_side=4, max_side=6)
    assert "seed: 2" in (out / gen.MANIFEST).read_text()
    in_memory = gen.as_tasks(gen.generate(["copy", "swap12", "crop"], 3, seed=2, train_pairs=4, test_pairs=2, min_side=4, max_side=6))
    assert [t.task_id for t in in_memory] == [t.task_id for t in tasks]
    assert all(np.array_equal(a.test[1].output, b.test[1].output) for a, b in zip(in_memory, tasks))


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
    out = tmp_path / "tasks"
    res = invoke("generate", "copy", "flipp", "--out", str(out))
    assert res.exit_code == 2 and not out.exists()
    assert res.output.count("\n") == 1 and "unknown family 'flipp'; families: copy," in res.output and "tile" in res.output
    res = invoke("generate", "copy")
    assert res.exit_code == 2 and "missing option '--out'" in res.output

    assert invoke("generate", "copy", "--tasks", "2", "--out", str(out)).exit_code == 0
    res = invoke("generate", "flip_h", "--tasks", "2", "--out", str(out))
    assert res.exit_code == 2 and "already holds files; pass --overwrite" in res.output
    assert sorted(p.name for p in out.glob("*.json")) == ["copy-s0-0000.json", "copy-s0-0001.json"]
    assert invoke("generate", "flip_h", "--tasks", "1", "--out", str(out), "--overwrite").exit_code == 0
    assert [t.task_id for t in load_tasks(str(out))] == ["flip_h-s0-0000"]  # the old tasks are gone


def test_cli_list_names_every_family_and_the_pairs():
    res = invoke("generate", "--list")
    assert res.exit_code == 0
    for family in gen.FAMILIES:
        assert any(line.startswith(family + " ") for line in res.output.splitlines())
    assert "copy/swap12" in res.output


def test_all_expands_to_every_family():
    assert gen.resolve_families(["flip_h", "all"]) == ["flip_h", *[f for f in gen.FAMILIES if f != "flip_h"]]
