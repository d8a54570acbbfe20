"""The plugin author's guide's worked examples, each run through its YAML config.

- ``examples/histogram_refine``: a refine plugin loaded by import path;
- ``examples/focal_loss``: a loss plugin in a package of its own, loaded by its
  entry point.  Instead of pip-installing the package, the test writes the
  ``*.dist-info`` that an install would write into a temporary folder on
  ``sys.path``, from the package's own ``pyproject.toml``:
  ``importlib.metadata`` finds it exactly as it finds an installed package.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import tomllib
import torch
from conftest import REPO, TINY

from arcfw.core.config import load_config
from arcfw.core.engine.registry import entry_points, resolve
from arcfw.core.training.trainer import Trainer

EXAMPLES = REPO / "examples"
#: TINY, without the sizes the example configs set themselves for the default plugins they replace
SMALL = {**TINY, "max_batches": 4, "log_every": 1}


def run(config, tmp_path, **extra):
    cfg = load_config(config, {**SMALL, **extra})
    trainer = Trainer(cfg, tmp_path / "run", quiet=True)
    trainer.fit()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return trainer, records


def test_histogram_refine_example_trains_its_own_group(tmp_path):
    # run as documented: the import path resolves next to the config, no PYTHONPATH
    trainer, records = run(EXAMPLES / "histogram_refine" / "config.yaml", tmp_path)
    eng = trainer.engine
    assert eng.roles["histogram_refine:HistogramRefine"] == "refine"
    assert {pg["name"]: pg["lr"] for pg in eng.optimizer.param_groups}["histogram_refine"] == 1.0e-3
    assert all(r["grad_norms"]["histogram_refine"] > 0 for r in records if r["mask_ratio"] > 0)  # the main loss trains it
    assert all(r["qwen_grad"] > 0 for r in records if r["mask_ratio"] > 0)  # Qwen still learns through it
    assert all(math.isfinite(r["loss"]) for r in records)


def test_histogram_refine_reads_colour_shares_without_padding():
    sys.path.insert(0, str(EXAMPLES / "histogram_refine"))
    try:
        from histogram_refine import colour_shares
    finally:
        sys.path.remove(str(EXAMPLES / "histogram_refine"))
    inputs = torch.tensor([[[1, 1, 10], [0, 2, 10]]])  # 10 = padding
    mask = inputs != 10
    assert colour_shares(inputs, mask).tolist() == [[0.25, 0.5, 0.25] + [0.0] * 7]


@pytest.fixture
def focal_package(tmp_path, monkeypatch):
    """Register examples/focal_loss as if pip-installed: its dist-info (entry points from its pyproject)."""
    project = tomllib.loads((EXAMPLES / "focal_loss" / "pyproject.toml").read_text())["project"]
    site = tmp_path / "site"
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = project["entry-points"]
    (info / "entry_points.txt").write_text(
        "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for group, eps in groups.items())
    )
    monkeypatch.syspath_prepend(str(EXAMPLES / "focal_loss"))  # where the package's code lives
    monkeypatch.syspath_prepend(str(site))
    yield
    sys.modules.pop("arcfw_focal", None)


def test_focal_loss_is_unknown_until_its_package_is_installed():
    assert "focal_loss" not in entry_points()


def test_focal_loss_example_is_found_through_its_entry_point(focal_package, tmp_path):
    assert entry_points()["focal_loss"].value == "arcfw_focal:FocalLoss"
    cls = resolve("focal_loss")
    assert cls.role == "loss" and cls.__module__ == "arcfw_focal"
    trainer, records = run(EXAMPLES / "focal_loss" / "config.yaml", tmp_path)
    assert trainer.engine.roles["focal_loss"] == "loss" and "efe_loss" not in trainer.engine.plugins
    assert all(r["mask_ratio"] == 1.0 and math.isfinite(r["loss"]) for r in records)
    ema = [r["focal_ema"] for r in records]
    assert ema[0] == records[0]["loss"] and ema[1] == pytest.approx(0.9 * ema[0] + 0.1 * records[1]["loss"])
    plugin = trainer.engine.plugins["focal_loss"]
    assert plugin.state_dict(trainer.engine.ctx) == {"ema": ema[-1]}
    # its declared metrics replace the default loss's in the summary (and on the console line)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())[0]
    assert summary["focal_ema_last"] == ema[-1] and "cell_acc_first" in summary and "avg_mask_ratio" not in summary


def test_focal_loss_parameters_are_checked_from_yaml(focal_package, tmp_path):
    from arcfw.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"plugins.loss.gamma: expected float, got str"):
        load_config(EXAMPLES / "focal_loss" / "config.yaml", {**SMALL, "plugins.loss.gamma": "two"})


def test_the_guides_first_plugin_runs_as_written(tmp_path, monkeypatch):
    import re

    from click.testing import CliRunner

    from arcfw.core.commands.cli import main

    guide = (REPO / "docs" / "plugins.md").read_text()
    blocks = {body.splitlines()[0]: body for body in re.findall(r"```(?:python|yaml)\n(.*?)```", guide, flags=re.S)}
    (tmp_path / "my_refine.py").write_text(blocks["# my_refine.py"])
    (tmp_path / "config.yaml").write_text(blocks["# config.yaml"])
    monkeypatch.chdir(tmp_path)
    small = ["--set", "data.max_tasks=2", "--set", "plugins.prompt.num_layers=1", "--set", "plugins.prompt.max_tokens=1024"]
    result = CliRunner().invoke(main, ["check", "config.yaml", *small])
    assert result.exit_code == 0, result.output
    assert "PASS  gradient reaches group 'scaled_refine'" in result.output
