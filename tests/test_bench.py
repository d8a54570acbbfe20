"""``arcfw bench`` and the ``compile`` switch (behaviour only: no timing is asserted)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import REPO, TINY

from arcfw.core.commands.cli import main
from arcfw.core.engine.steps import STEP_ORDER

CONFIG = str(REPO / "configs" / "default.yaml")
SETS = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]


def test_bench_prints_table_and_writes_the_same_as_json(tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(main, ["bench", CONFIG, *SETS, "--warmup", "1", "--steps", "3", "--batch-size", "2",
                                    "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["steps"] == 3 and data["warmup"] == 1 and data["batch_size"] == 2 and data["device"] == "cpu"
    assert len(data["step_ms"]) == 3 and data["p10_ms"] <= data["median_ms"] <= data["p90_ms"]
    assert data["pairs_per_s"] == pytest.approx(2 * data["steps_per_s"])
    assert data["peak_memory_mb"] > 0
    assert list(data["stage_share"]) == [s.value for s in STEP_ORDER] + ["other"]
    assert abs(sum(data["stage_share"].values()) - 1) < 1e-6
    assert data["stage_ms"]["backward"] > 0 and data["stage_ms"]["generate_prompt"] > 0
    assert "loss" in data["metrics_mean"] and "prompt_cached" in data["metrics_mean"]
    for text in (f"median {data['median_ms']:.2f}", f"{data['pairs_per_s']:.1f}", "generate_prompt", "peak mem"):
        assert text in res.output


def test_bench_refuses_a_json_path_in_a_missing_folder_before_running(tmp_path):
    target = tmp_path / "missing" / "bench.json"
    res = CliRunner().invoke(main, ["bench", CONFIG, *SETS, "--steps", "1", "--json", str(target)])
    assert res.exit_code == 2
    assert "folder does not exist" in res.output and "missing" in res.output
    assert "ms/step" not in res.output and not target.parent.exists()


def test_bench_bad_config_key_is_one_line_exit_2():
    res = CliRunner().invoke(main, ["bench", CONFIG, "--set", "batch_sise=4"])
    assert res.exit_code == 2
    assert "batch_sise" in res.output and "did you mean 'batch_size'" in res.output


def test_compile_switch_compiles_the_group_modules(make_engine):
    plain, compiled = make_engine(), make_engine({"compile": True})
    modules = [[m for g in e.groups for m in g.modules] for e in (plain, compiled)]
    assert len(modules[1]) == 2  # Qwen and the agent
    assert all(m._compiled_call_impl is None for m in modules[0])
    assert all(m._compiled_call_impl is not None for m in modules[1])
    for a, b in zip(*modules):  # same weights: compiling changes no parameter
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
