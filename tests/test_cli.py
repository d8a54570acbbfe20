"""The command line, end to end: `arcfw run`, `arcfw plugins`, `arcfw check`, config errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner
from conftest import REPO, TINY

from arcfw.core.commands.cli import main


def sets(overrides: dict) -> list[str]:
    out = []
    for k, v in overrides.items():
        out += ["--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    return out


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_run_writes_metrics_summary_and_resolved_config(tmp_path):
    out = tmp_path / "run"
    res = invoke("run", str(REPO / "configs/default.yaml"), "--max-batches", "6", "--out", str(out),
                 "--seed", "3", "--qwen-lr", "0.001", "--agent-lr", "0.002", *sets(TINY), "--set", "log_every=2")
    assert res.exit_code == 0, res.output
    assert "[Batch 2] Reward:" in res.output and "| Loss:" in res.output and "| Qwen_grad:" in res.output
    assert "Epoch 0 summary" in res.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        assert {"step", "epoch", "loss", "reward", "qwen_grad", "mask_ratio", "cell_acc"} <= set(r)
    summary = json.loads((out / "summary.json").read_text())
    assert summary[0]["batches"] == 6 and {"avg_loss", "avg_reward", "avg_qwen_grad", "acc_improvement"} <= set(summary[0])
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["seed"] == 3 and resolved["max_batches"] == 6
    assert resolved["optimizer"]["lr"] == {"qwen": 0.001, "agent": 0.002}
    assert resolved["plugins"]["prompt"]["hidden_size"] == 32


def test_progress_bar_names_the_epoch(tmp_path):
    res = invoke("run", str(REPO / "configs/default.yaml"), "--max-batches", "2", "--out", str(tmp_path / "r"), *sets(TINY))
    assert res.exit_code == 0
    assert "Epoch 0:" in res.output and "2/2" in res.output


def test_config_errors_are_reported_all_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "epochs": "three",
        "batch_sise": 2,
        "optimizer": {"lr": {"qwen": -1.0}},
        "plugins": {"prompt": {"name": "qwen", "hidden_size": "big"}, "refine": {"name": "no_such_plugin"}},
        "data": {"source": str(tmp_path / "missing")},
    }))
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["run", str(bad), "--out", str(out)])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1, res.output
    line = lines[0]
    assert str(bad) in line and "6 problems" in line
    for key in ("epochs", "batch_sise", "optimizer.lr", "plugins.prompt.hidden_size", "plugins.refine.name", "data.source"):
        assert key in line, key
    assert "did you mean 'batch_size'" in line and "no_such_plugin" in line and ">= 0" in line
    assert not out.exists()


def test_missing_config_file_and_bad_override(tmp_path):
    res = CliRunner().invoke(main, ["run", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2 and "nope.yaml" in res.output and "does not exist" in res.output
    res = CliRunner().invoke(main, ["run", str(REPO / "configs/default.yaml"), "--set", "precision=fp8"])
    assert res.exit_code == 2 and "precision" in res.output and "fp8" in res.output


def test_unknown_learning_rate_group_is_named(tmp_path):
    res = CliRunner().invoke(main, ["run", str(REPO / "configs/default.yaml"), "--out", str(tmp_path / "r"),
                                    *sets(TINY), "--set", "optimizer.lr.qwenn=0.1"])
    assert res.exit_code == 2
    assert "optimizer.lr.qwenn" in res.output and "groups: qwen, agent" in res.output
    assert not (tmp_path / "r").exists()


def test_existing_run_is_not_overwritten_silently(tmp_path):
    out = tmp_path / "r"
    args = ["run", str(REPO / "configs/default.yaml"), "--max-batches", "1", "--out", str(out), *sets(TINY)]
    assert invoke(*args).exit_code == 0
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert invoke(*args, "--overwrite").exit_code == 0


def test_debug_shows_traceback_otherwise_one_line(tmp_path):
    cmd = [sys.executable, "-m", "arcfw", "run", str(tmp_path / "nope.yaml")]
    plain = subprocess.run(cmd, capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1
    debug = subprocess.run([sys.executable, "-m", "arcfw", "--debug", *cmd[3:]], capture_output=True, text=True)
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_plugins_lists_builtins_by_role():
    res = invoke("plugins")
    assert res.exit_code == 0
    text = res.output
    for role, name in (("prompt", "qwen"), ("refine", "rl_policy"), ("predictor", "grid_transformer"), ("loss", "efe_loss"), ("curriculum", "curriculum")):
        block = text.split(f"{role}:")[1].split(":\n")[0]  # the role's lines, up to the next role
        assert f"  {name} " in block, (role, name)


@pytest.mark.parametrize("encoding", ["cells", "text"])
def test_check_passes_on_the_default_pipeline(encoding):
    """Both encodings: with text (no token states) grid_transformer has no cross-attention left untrained."""
    res = invoke("check", str(REPO / "configs/default.yaml"), *sets(TINY), "--set", f"plugins.prompt.encoding={encoding}")
    assert res.exit_code == 0, res.output
    for item in ("in optimizer with lr", "in train mode", "gradient reaches group 'qwen'", "targets are int64",
                 "post-step hooks ran after the optimizer step", "loss is finite", "precision and parameter dtypes",
                 "no health warning"):
        assert any(line.startswith("PASS") and item in line for line in res.output.splitlines()), item
    assert "0 failed" in res.output


@pytest.mark.parametrize("policy", ["NoGradPolicy", "BackwardAgainPolicy"])
def test_check_fails_and_names_the_faulty_plugin(policy):
    res = CliRunner().invoke(main, ["check", str(REPO / "configs/default.yaml"), *sets(TINY),
                                    "--set", f"plugins.refine.name=faulty_plugins:{policy}"])
    assert res.exit_code == 1, res.output
    failed = [line for line in res.output.splitlines() if line.startswith("FAIL")]
    assert failed and any(policy in line for line in failed), res.output


def test_package_installs_under_one_name(tmp_path):
    code = ("import importlib.util as u, arcfw.core.engine.engine, arcfw.plugins.qwen; "
            "print(u.find_spec('core'), u.find_spec('plugins'), arcfw.plugins.qwen.__name__)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.stdout.split() == ["None", "None", "arcfw.plugins.qwen"], res.stderr


def test_python_dash_m_arcfw():
    res = subprocess.run([sys.executable, "-m", "arcfw", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "run" in res.stdout and "check" in res.stdout and "plugins" in res.stdout


def test_epoch_summary_qwen_grad_leaves_out_steps_without_qwen_gradient_by_design(tmp_path):
    """With the prompt cache, a step whose prompts all came from the cache gives Qwen no gradient on
    purpose: it is logged (qwen_grad 0) but the epoch's avg_qwen_grad averages the other steps only."""
    out = tmp_path / "run"
    # one task (3 pairs), 4 epochs: from the second epoch on, prompts younger than 10 steps are reused
    res = invoke("run", str(REPO / "configs/default.yaml"), "--out", str(out), *sets({**TINY, "data.max_tasks": 1}),
                 "--set", "epochs=4", "--set", "plugins.prompt.cache_every=10", "--quiet")
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    batches = [r for r in records if r.get("kind") == "batch"]
    assert len(batches) >= 8 and len(batches) % 4 == 0  # every pair of the task, 4 times
    cached = [r for r in batches if r["prompt_cached"] == 1.0]
    fresh = [r for r in batches if r["prompt_cached"] == 0.0]
    assert cached and fresh and all(r["qwen_grad"] == 0 for r in cached) and all(r["qwen_grad"] > 0 for r in fresh)
    summary = json.loads((out / "summary.json").read_text())
    for s in summary:
        mine = [r["qwen_grad"] for r in fresh if r["epoch"] == s["epoch"]]
        if mine:
            assert s["avg_qwen_grad"] == pytest.approx(sum(mine) / len(mine), rel=1e-9)
        else:
            assert str(s["avg_qwen_grad"]) == "nan"  # no step of this epoch gave Qwen gradient


@pytest.mark.parametrize("command", [["eval", "CONFIG", "--checkpoint", "nowhere"], ["bench", "CONFIG"], ["check", "CONFIG"]])
def test_commands_other_than_run_refuse_torchrun(monkeypatch, tmp_path, command):
    """Under torchrun every rank would run them and write the same files: one clear line instead."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    args = [str(REPO / "configs/default.yaml") if a == "CONFIG" else a for a in command]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        f"arcfw[rank 1/2]: distributed error: arcfw {command[0]} runs in one process, but torchrun started 2 "
        f"(WORLD_SIZE=2): start it as plain `arcfw {command[0]} ...`; only `arcfw run` and `arcfw eval --ttt` use several processes"]


@pytest.mark.parametrize(("args", "code"), [(["--version"], 0), (["check", "CONFIG"], 2)])
def test_under_torchrun_the_process_leaves_with_the_commands_exit_code_and_its_output(tmp_path, args, code):
    """`python -m arcfw` (what torchrun starts) with WORLD_SIZE > 1 ends through os._exit (entry()): the
    command's exit code and its flushed output survive it."""
    import os

    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1", "OMP_NUM_THREADS": "1"}
    argv = [str(REPO / "configs/default.yaml") if a == "CONFIG" else a for a in args]
    proc = subprocess.run([sys.executable, "-m", "arcfw", *argv], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == code, proc.stderr
    if code:
        assert proc.stderr.strip().splitlines() == [
            "arcfw[rank 1/2]: distributed error: arcfw check runs in one process, but torchrun started 2 (WORLD_SIZE=2): "
            "start it as plain `arcfw check ...`; only `arcfw run` and `arcfw eval --ttt` use several processes"]
    else:
        assert ", version " in proc.stdout, proc.stdout  # flushed before os._exit
