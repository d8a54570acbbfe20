"""Pictures: training curves (arcfw plot) and tasks with predictions (arcfw show).

Reading logs and the palette need no extra; drawing needs the 'plot' extra (matplotlib)
and those tests are skipped without it.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import train_tiny_run

from arcfw.core.commands.cli import main
from arcfw.core.commands.plot import PALETTE_RGB, curves_figure, epoch_ends, grid_rgb, plot_curves, read_metrics, task_figure
from arcfw.core.errors import DataError, MissingExtra
from arcfw.core.training.metrics import write_metric_specs

PNG = b"\x89PNG\r\n\x1a\n"


def default_metrics():
    from arcfw.core.engine.engine import ENGINE_METRICS
    from arcfw.plugins.efe_loss import MaskedEFELoss
    from arcfw.plugins.qwen import QwenPrompt
    from arcfw.plugins.rl_policy import GaussianRefinePolicy

    return [*ENGINE_METRICS, *QwenPrompt.metrics, *GaussianRefinePolicy.metrics, *MaskedEFELoss.metrics]


def write_run(path, records, summaries=None, torn=False):
    """A run folder as the trainer writes it, declaring the default plugins' metrics."""
    path.mkdir(parents=True, exist_ok=True)
    write_metric_specs(path, default_metrics())
    text = "".join(json.dumps(r) + "\n" for r in records)
    (path / "metrics.jsonl").write_text(text + ('{"kind": "batch", "st' if torn else ""))
    if summaries is not None:
        (path / "summary.json").write_text(json.dumps(summaries))
    return path


def rec(step, epoch, **kw):
    return {"kind": "batch", "step": step, "epoch": epoch, "loss": 1.0 / step, "reward": 0.1, "qwen_grad": 0.5,
            "mask_ratio": 0.9, "cell_acc": 0.1 * epoch, **kw}


def test_palette_is_the_usual_arc_colours():
    assert PALETTE_RGB.tolist() == [
        [0, 0, 0], [0, 116, 217], [255, 65, 54], [46, 204, 64], [255, 220, 0],
        [170, 170, 170], [240, 18, 190], [255, 133, 27], [127, 219, 255], [135, 12, 37],
    ]
    assert grid_rgb(np.array([[0, 9], [1, 4]])).tolist() == [[[0, 0, 0], [135, 12, 37]], [[0, 116, 217], [255, 220, 0]]]


def test_metrics_are_read_per_step_with_non_finite_values_and_a_torn_last_line(tmp_path):
    run = write_run(tmp_path, [rec(1, 0), rec(2, 0, loss="nan"), rec(2, 0, loss=0.25), {"kind": "epoch", "step": 2}], torn=True)
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2] and records[1]["loss"] == 0.25  # the later record of a step wins


def test_a_broken_line_inside_the_log_is_a_data_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_metrics(tmp_path)
    with pytest.raises(DataError, match="not a run folder"):
        read_metrics(tmp_path / "missing")


def test_epoch_ends_come_from_the_summary(tmp_path):
    run = write_run(tmp_path, [rec(1, 0)], summaries=[{"kind": "epoch", "epoch": 0, "step": 5}, {"kind": "epoch", "epoch": 1, "step": 10}])
    assert epoch_ends(run) == [(0, 5), (1, 10)]
    assert epoch_ends(tmp_path / "nothing") == []


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    run = write_run(tmp_path / "run", [rec(1, 0)])
    with pytest.raises(MissingExtra, match=r"arcfw\[plot\]"):
        plot_curves(run)
    result = CliRunner().invoke(main, ["plot", str(run)])
    assert result.exit_code == 2 and "missing dependency" in result.stderr


# --------------------------------------------------------------------------- drawing (needs the plot extra)


def test_curves_png_with_epochs_marked(tmp_path):
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path, [rec(s, 0 if s <= 4 else 1) for s in range(1, 9)], [{"epoch": 0, "step": 4}, {"epoch": 1, "step": 8}])
    out = plot_curves(run)
    assert out == run / "curves.png" and out.read_bytes().startswith(PNG)
    axes = curves_figure(run).axes
    assert [a.get_ylabel() for a in axes] == ["loss", "reward", "Qwen gradient norm", "mask ratio", "cell accuracy"]
    loss = next(line for line in axes[0].lines if line.get_gid() == "raw").get_ydata()
    assert np.allclose(loss, [1.0 / s for s in range(1, 9)])
    marks = [line.get_xdata()[0] for line in axes[0].lines if line.get_gid() == "epoch-end"]
    assert marks == [4.5]  # the end of epoch 0; epoch 1 ends with the data


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A 2-step run, evaluated on 2 ARC-AGI-2 evaluation tasks through the CLI."""
    root = tmp_path_factory.mktemp("evaluated")
    train_tiny_run(root, 2)
    result = CliRunner().invoke(main, ["eval", str(root / "tiny.yaml"), "--checkpoint", str(root / "run"), "--max-tasks", "2", "--out", str(root / "eval"), "-q"])
    assert result.exit_code == 0, result.output
    return root


def test_plot_command_on_a_real_run(evaluated):
    pytest.importorskip("matplotlib")
    result = CliRunner().invoke(main, ["plot", str(evaluated / "run"), "--out", str(evaluated / "c.png")])
    assert result.exit_code == 0, result.output
    assert (evaluated / "c.png").read_bytes().startswith(PNG)


def test_show_command_draws_the_task_with_its_attempts(evaluated):
    pytest.importorskip("matplotlib")
    task_id = next(iter(json.loads((evaluated / "eval" / "submission.json").read_text())))
    result = CliRunner().invoke(main, ["show", str(evaluated / "eval"), task_id])
    assert result.exit_code == 0, result.output
    png = evaluated / "eval" / f"{task_id}.png"
    assert png.read_bytes().startswith(PNG)
    bad = CliRunner().invoke(main, ["show", str(evaluated / "eval"), "nope"])
    assert bad.exit_code == 2 and "no task nope in this evaluation" in bad.stderr


def test_show_marks_right_and_wrong_attempts():
    pytest.importorskip("matplotlib")
    from arcfw.core.data.batch import Pair, Task

    answer = np.array([[1, 2], [3, 4]])
    task = Task("t", train=(Pair(answer, answer),), test=(Pair(answer, answer),))
    fig = task_figure(task, [[np.array([[0]]), answer]])
    titles = [a.get_title() for a in fig.axes]
    assert "attempt 1: wrong" in titles and "attempt 2: right" in titles and "answer" in titles
    image = next(a for a in fig.axes if a.get_title() == "attempt 2: right").images[0].get_array()
    assert np.array_equal(np.asarray(image), grid_rgb(answer))  # drawn in the ARC palette
