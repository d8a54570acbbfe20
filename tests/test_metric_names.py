"""Metric names cannot collide (issue 14 item 5): two plugins that declare or log one name, or a plugin that
makes a name the engine writes, is one error line naming both, exit 2; a plugin that replaces another in its
role is no collision."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import REPO, TINY

from arcfw.core.commands.cli import main
from arcfw.core.errors import PluginError
from arcfw.core.training.trainer import Trainer


def sets(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}")]


def extra(*names: str) -> dict:
    return {"plugins.extra": [{"name": f"collision_plugins:{n}"} for n in names]}


def test_two_plugins_declaring_one_name_is_refused_at_build(make_engine):
    with pytest.raises(PluginError, match="metric 'cell_acc' is declared twice: by plugin 'efe_loss' and by plugin 'collision_plugins:DeclaresCellAcc'"):
        make_engine(extra("DeclaresCellAcc"))


def test_a_plugin_declaring_a_record_key_of_the_engine_is_refused(make_engine):
    with pytest.raises(PluginError, match="metric 'step' is declared twice: by the engine and by plugin 'collision_plugins:DeclaresStep'"):
        make_engine(extra("DeclaresStep"))


def test_an_undeclared_metric_logged_over_another_plugins_is_refused_at_the_first_step(tiny_config, tmp_path):
    """The issue's case: an auxiliary loss logging cell_acc used to replace efe_loss's silently."""
    trainer = Trainer(tiny_config({**extra("AuxCellAccLoss"), "max_batches": 2}), tmp_path / "run", quiet=True)
    with pytest.raises(PluginError) as err:
        trainer.fit()
    text = str(err.value)
    assert "metric 'cell_acc' is logged by plugin 'collision_plugins:AuxCellAccLoss' (compute_loss)" in text
    assert "also made by plugin 'efe_loss'" in text and "\n" not in text
    assert trainer.engine.global_step == 0 and not (tmp_path / "run").exists()  # nothing half-written


def test_two_instances_logging_one_undeclared_name_collide(tiny_config, tmp_path):
    trainer = Trainer(tiny_config({**extra("LogsShared", "LogsShared"), "max_batches": 2}), tmp_path / "run", quiet=True)
    with pytest.raises(PluginError, match=r"metric 'shared' is logged by plugin 'collision_plugins:LogsShared#2' \(post_step_update\) "
                                          r"and also made by plugin 'collision_plugins:LogsShared'"):
        trainer.fit()


def test_an_epoch_summary_key_of_the_engine_is_refused_and_an_own_one_kept(tiny_config, tmp_path):
    with pytest.raises(PluginError, match="epoch summary key 'avg_loss' is returned by plugin 'collision_plugins:EpochAvgLoss' "
                                          r"\(on_epoch_end\) and also made by the engine"):
        Trainer(tiny_config({**extra("EpochAvgLoss"), "max_batches": 1}), tmp_path / "a", quiet=True).fit()
    summaries = Trainer(tiny_config({**extra("EpochExtra"), "max_batches": 1}), tmp_path / "b", quiet=True).fit()
    assert summaries[0]["my_epoch_value"] == 0.5


def test_a_plugin_replacing_another_in_its_role_is_no_collision(tiny_config, tmp_path):
    """A loss plugin in the loss slot logs cell_acc: efe_loss is not built, so the name is its alone."""
    run = tmp_path / "run"
    Trainer(tiny_config({"plugins.loss": {"name": "collision_plugins:OwnCellAccLoss"}, "max_batches": 2}), run, quiet=True).fit()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["cell_acc"] for r in records] == [0.125, 0.125]


def test_the_cli_names_both_plugins_in_one_line_with_exit_2(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["run", str(REPO / "configs/default.yaml"), "--out", str(out), "-q", "--max-batches", "2",
                                    *sets(TINY), "--set", 'plugins.extra=[{"name": "collision_plugins:AuxCellAccLoss"}]'])
    assert res.exit_code == 2, res.output
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("arcfw: plugin error: metric 'cell_acc' is logged by plugin "
                                                   "'collision_plugins:AuxCellAccLoss'") and "plugin 'efe_loss'" in lines[0], lines
    assert not out.exists()
    declared = ["--set", 'plugins.extra=[{"name": "collision_plugins:DeclaresCellAcc"}]']
    res = CliRunner().invoke(main, ["run", str(REPO / "configs/default.yaml"), "--out", str(out), "-q", *sets(TINY), *declared])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and not out.exists()
    assert "metric 'cell_acc' is declared twice: by plugin 'efe_loss' and by plugin 'collision_plugins:DeclaresCellAcc'" in res.stderr
    res = CliRunner().invoke(main, ["check", str(REPO / "configs/default.yaml"), *sets(TINY), *declared])  # check's checklist: FAIL, exit 1
    assert res.exit_code == 1 and "FAIL  plugins build" in res.output and "collision_plugins:DeclaresCellAcc" in res.output


def test_a_plugin_parameter_called_name_is_refused(tiny_config):
    """`name` in a plugin's YAML section names the plugin: a constructor parameter of that name could never be
    set, and the resolved config would record the plugin's name as the parameter's default."""
    from arcfw.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"plugins.extra\[0\].name: plugin 'collision_plugins:TakesName' takes a constructor parameter 'name'"):
        tiny_config({"plugins.extra": [{"name": "collision_plugins:TakesName"}]})
