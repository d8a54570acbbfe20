"""The README's promises: its plugin example runs as written, its commands match CI."""

from __future__ import annotations

import json
import re

from click.testing import CliRunner
from conftest import REPO

from arcfw.core.commands.cli import main

README = (REPO / "README.md").read_text()


def block(first_line: str) -> str:
    for _lang, body in re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S):
        if body.startswith(first_line):
            return body
    raise AssertionError(f"README has no code block starting with {first_line!r}")


def test_write_your_own_plugin_example_runs(tmp_path, monkeypatch):
    (tmp_path / "my_plugins.py").write_text(block("# my_plugins.py"))
    (tmp_path / "my_config.yaml").write_text(block("# my_config.yaml"))
    monkeypatch.chdir(tmp_path)
    small = ["--set", "data.max_tasks=2", "--set", "plugins.prompt.num_layers=1"]
    res = CliRunner().invoke(main, ["check", "my_config.yaml", *small])
    assert res.exit_code == 0, res.output
    assert any(line.startswith("PASS") and "gradient reaches group 'refiner'" in line for line in res.output.splitlines())
    res = CliRunner().invoke(main, ["run", "my_config.yaml", "--out", "runs/mine", "--max-batches", "3", "--set", "log_every=1", *small])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "runs/mine/metrics.jsonl").read_text().splitlines()[-1])
    assert rec["grad_norms"]["refiner"] > 0


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    test_cmd = next(c for c in commands if "pytest" in c)
    assert test_cmd in (REPO / ".ci" / "run").read_text()
    assert any("arcfw run configs/default.yaml" in c for c in commands[:2])
