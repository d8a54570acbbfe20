"""Where results go and what the messages say: an evaluation beside the run it evaluated, the
quickstart run twice, one prefix per message."""

from __future__ import annotations

import re

import pytest
import torch
from click.testing import CliRunner
from conftest import REPO, TINY, train_tiny_run

from arcfw.core.commands.cli import main

README = (REPO / "README.md").read_text()
DEFAULT = str(REPO / "configs" / "default.yaml")
SETS = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    train_tiny_run(root, 2)
    return root


def test_eval_writes_beside_the_run_it_evaluated(trained, tmp_path):
    elsewhere = tmp_path / "config-out"  # the config's `out` is not where the results go
    run = trained / "run"
    res = invoke("eval", str(trained / "tiny.yaml"), "--checkpoint", str(run), "--max-tasks", "1", "--no-prompt-ablation",
                 "--set", f"out={elsewhere}", "-q")
    assert res.exit_code == 0, res.output
    assert (run / "eval-arcagi2-evaluation" / "eval.json").is_file() and not elsewhere.exists()
    step = run / "checkpoints" / "step-00000002"
    res = invoke("eval", str(trained / "tiny.yaml"), "--checkpoint", str(step), "--max-tasks", "1", "--no-prompt-ablation", "-q")
    assert res.exit_code == 0, res.output
    assert (run / "eval-arcagi2-evaluation-step-00000002" / "submission.json").is_file()
    # --out still decides
    res = invoke("eval", str(trained / "tiny.yaml"), "--checkpoint", str(run), "--max-tasks", "1", "--no-prompt-ablation",
                 "--out", str(tmp_path / "mine"), "-q")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "mine" / "eval.json").is_file()


def test_the_quickstart_runs_twice_as_the_readme_says(tmp_path, monkeypatch):
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    main_command = next(c for c in commands if c.endswith("arcfw run configs/default.yaml"))
    again = commands[commands.index(main_command) + 1]
    assert again == ".venv/bin/arcfw run configs/default.yaml --overwrite"
    monkeypatch.chdir(tmp_path)  # its default out, runs/default, under a temporary folder
    args = ["run", DEFAULT, "--max-batches", "1", *SETS, "-q"]
    assert invoke(*args).exit_code == 0
    res = invoke(*args)  # run again as written: refused, saying how
    assert res.exit_code == 2 and "runs/default already holds a run" in res.output and "--overwrite" in res.output
    assert invoke(*args, "--overwrite").exit_code == 0
    assert (tmp_path / "runs" / "default" / "metrics.jsonl").is_file()


def test_messages_have_one_prefix(trained, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    res = invoke("run", DEFAULT, "--out", str(a_file), *SETS)
    assert res.exit_code == 2
    assert res.output.strip() == f"arcfw: config error: --out: output path exists and is not a folder: {a_file}"
    res = invoke("run", str(trained / "tiny.yaml"), "--resume", str(trained / "run"), "--overwrite")
    assert res.exit_code == 2
    assert res.output.strip() == "arcfw: config error: --overwrite: cannot be combined with --resume"
    if not torch.cuda.is_available():
        res = invoke("run", DEFAULT, "--device", "cuda", "--out", str(tmp_path / "r"))
        assert res.exit_code == 2
        assert res.output.strip().startswith("arcfw: config error: device: cuda requested but"), res.output
