"""`arcfw plot` answers "did it learn?" (issue 14 item 5): smoothed curves over faint raw values, the
validation metrics (``val/...``) on their panels, the copy-input baseline of an evaluation beside the run.

Drawn from the files a real tiny run and a real evaluation of it write."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import train_tiny_run

from arcfw.core.commands.cli import main
from arcfw.core.commands.plot import curves_figure, find_baselines, parse_smooth, read_validation, smooth
from arcfw.core.errors import DataError

PNG = b"\x89PNG\r\n\x1a\n"


def test_smoothing_is_a_debiased_ema_or_a_trailing_mean():
    values = [1.0, 3.0, math.nan, 5.0]
    ema = smooth(values, "ema", 0.5)
    # debiased: 1; (0.5*0.5 + 1.5) / 0.75; the NaN carries the last value; then one more step
    assert ema[0] == 1.0 and ema[1] == pytest.approx((0.25 + 1.5) / 0.75) and ema[2] == ema[1]
    assert ema[3] == pytest.approx((0.5 * (0.25 + 1.5) + 2.5) / (0.5 * 0.75 + 0.5))
    assert smooth(values, "mean", 2) == [1.0, 2.0, 2.0, 4.0]
    assert smooth([math.nan, 2.0], "ema", 0.9)[0] != smooth([math.nan, 2.0], "ema", 0.9)[0]  # NaN until a value came
    assert smooth(values, "none", 0)[1] == 3.0
    assert parse_smooth("ema") == ("ema", 0.9) and parse_smooth("mean:25") == ("mean", 25.0) and parse_smooth("none") == ("none", 0.0)
    for bad in ("ema:1", "mean:0", "mean:x", "median", "ema:-0.1"):
        with pytest.raises(ValueError):
            parse_smooth(bad)


@pytest.fixture(scope="module")
def run_with_eval(tmp_path_factory):
    """A 6-step tiny run with its metrics logged every step, evaluated on 2 ARC-AGI-2 evaluation tasks through the
    CLI without --out (so eval.json lands beside the run, RUN/eval-arcagi2-evaluation/)."""
    root = tmp_path_factory.mktemp("plotted")
    train_tiny_run(root, 6)
    result = CliRunner().invoke(main, ["eval", str(root / "tiny.yaml"), "--checkpoint", str(root / "run"), "--max-tasks", "2",
                                       "--no-prompt-ablation", "-q"])
    assert result.exit_code == 0, result.output
    assert (root / "run" / "eval-arcagi2-evaluation" / "eval.json").is_file()
    return root / "run"


def add_validation(run, records):
    with (run / "metrics.jsonl").open("a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def lines(ax, gid):
    return [line for line in ax.lines if line.get_gid() == gid]


def test_real_run_smoothed_with_raw_values_faint(run_with_eval):
    pytest.importorskip("matplotlib")
    records = [json.loads(x) for x in (run_with_eval / "metrics.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in records if r.get("kind") == "batch"]
    assert len(loss) == 6
    fig = curves_figure(run_with_eval, "ema:0.6")
    ax = next(a for a in fig.axes if a.get_ylabel() == "loss")
    (raw,), (smoothed,) = lines(ax, "raw"), lines(ax, "smoothed")
    assert np.allclose(raw.get_ydata(), loss) and raw.get_alpha() < 0.5 and smoothed.get_alpha() in (None, 1.0)
    assert np.allclose(smoothed.get_ydata(), smooth(loss, "ema", 0.6)) and not np.allclose(smoothed.get_ydata(), loss)
    plain = next(a for a in curves_figure(run_with_eval, "none").axes if a.get_ylabel() == "loss")
    assert not lines(plain, "smoothed") and lines(plain, "raw")[0].get_alpha() in (None, 1.0)


def test_copy_input_baseline_of_the_evaluation_beside_the_run(run_with_eval):
    pytest.importorskip("matplotlib")
    ev = json.loads((run_with_eval / "eval-arcagi2-evaluation" / "eval.json").read_text())
    base = ev["copy_input_baseline"]
    (label, scores), = find_baselines(run_with_eval)
    assert scores == {"pass_at_2": base["pass_at_2"], "cell_acc": base["cell_acc"]} and "evaluation" in label
    ax = next(a for a in curves_figure(run_with_eval).axes if a.get_ylabel() == "cell accuracy")
    (line,) = lines(ax, "baseline")
    assert line.get_ydata()[0] == pytest.approx(base["cell_acc"]) and "copy input" in line.get_label()
    loss_ax = next(a for a in curves_figure(run_with_eval).axes if a.get_ylabel() == "loss")
    assert not lines(loss_ax, "baseline")  # no loss for copying the input


def test_validation_curves_on_their_panels(run_with_eval, tmp_path):
    """Validation values as the trainer logs them (``val/loss``, ``val/cell_acc``, ``val/pass@2``), in their own
    records or inside a batch record: val/loss on the loss panel, val/cell_acc on the cell accuracy panel,
    val/pass@2 on a panel of its own with the baseline's pass@2."""
    pytest.importorskip("matplotlib")
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_with_eval, run)
    add_validation(run, [{"kind": "val", "step": 3, "epoch": 0, "val/loss": 2.5, "val/cell_acc": 0.4, "val/pass@2": 0.0},
                         {"kind": "batch", "step": 6, "epoch": 0, "loss": 2.0, "val/loss": 2.25, "val/cell_acc": 0.5, "val/pass@2": 0.5}])
    assert read_validation(run) == {"val/cell_acc": [(3, 0.4), (6, 0.5)], "val/loss": [(3, 2.5), (6, 2.25)], "val/pass@2": [(3, 0.0), (6, 0.5)]}
    axes = {a.get_ylabel(): a for a in curves_figure(run).axes}
    assert list(axes)[-1] == "validation pass@2"
    for label, key in (("loss", "val/loss"), ("cell accuracy", "val/cell_acc"), ("validation pass@2", "val/pass@2")):
        (val,) = lines(axes[label], "val")
        assert list(val.get_xdata()) == [3, 6] and list(val.get_ydata()) == [v for _, v in read_validation(run)[key]]
    base = json.loads((run / "eval-arcagi2-evaluation" / "eval.json").read_text())["copy_input_baseline"]
    assert lines(axes["validation pass@2"], "baseline")[0].get_ydata()[0] == pytest.approx(base["pass_at_2"])
    result = CliRunner().invoke(main, ["plot", str(run), "--smooth", "mean:3"])
    assert result.exit_code == 0, result.output
    assert (run / "curves.png").read_bytes().startswith(PNG)


def test_bad_smooth_and_baseline_are_one_line_exit_2(run_with_eval, tmp_path):
    res = CliRunner().invoke(main, ["plot", str(run_with_eval), "--smooth", "ema:2"])
    assert res.exit_code == 2 and "--smooth" in res.stderr and "EMA weight must be in [0, 1)" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = CliRunner().invoke(main, ["plot", str(run_with_eval), "--baseline", str(tmp_path), "--out", str(tmp_path / "c.png")])
    assert res.exit_code == 2 and "no eval.json here" in res.stderr and not (tmp_path / "c.png").exists()
    with pytest.raises(DataError):
        find_baselines(run_with_eval, tmp_path / "nope.json")


def test_a_baseline_given_explicitly_is_drawn(run_with_eval, tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "ev").mkdir()
    ev = json.loads((run_with_eval / "eval-arcagi2-evaluation" / "eval.json").read_text())
    ev["data"] = {"source": "/data/my-tasks", "tasks": 5}
    ev["copy_input_baseline"]["cell_acc"] = 0.123
    (tmp_path / "ev" / "eval.json").write_text(json.dumps(ev))
    found = find_baselines(run_with_eval, tmp_path / "ev")
    assert [label for label, _ in found] == ["my-tasks, 5 tasks", "arcagi2/evaluation, 2 tasks"]
    ax = next(a for a in curves_figure(run_with_eval, baseline=tmp_path / "ev").axes if a.get_ylabel() == "cell accuracy")
    assert sorted(round(line.get_ydata()[0], 3) for line in lines(ax, "baseline"))[0] == 0.123
