"""Plugin authors and users read the CLI (issue 14 item 6): every option's default in `--help`,
`arcfw plugins NAME` with parameters, defaults and descriptions, shell completion."""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from arcfw.core.commands.cli import main
from arcfw.core.engine.registry import ENTRY_POINT_GROUP, describe, doc_without_params, param_docs


def commands():
    return sorted(main.commands.items())


@pytest.mark.parametrize("name,command", commands(), ids=[n for n, _ in commands()])
def test_every_option_says_its_default_in_help(name, command):
    """An option with a value shows ``[default: ...]`` (click's show_default, or the help text's own for a
    default that comes from the config); flags are off unless given and say nothing."""
    ctx = click.Context(command, info_name=name, parent=click.Context(main, info_name="arcfw", show_default=True))
    missing = []
    for param in command.get_params(ctx):
        if not isinstance(param, click.Option) or param.is_flag and not param.secondary_opts or param.name == "help":
            continue
        record = param.get_help_record(ctx)
        text = " ".join(record[1].split()) if record else ""
        if "[default: " not in text and "[required" not in text:
            missing.append(f"{param.opts[0]}: {text!r}")
    assert not missing, f"arcfw {name}: options without their default in --help: {missing}"
    res = CliRunner().invoke(main, [name, "--help"])
    assert res.exit_code == 0 and "[default: " in res.output or not any(isinstance(p, click.Option) and not p.is_flag for p in command.params)


def test_help_shows_click_defaults_of_the_commands():
    out = " ".join(CliRunner().invoke(main, ["generate", "--help"]).output.split())
    assert "Tasks per family. [default: 10]" in out and "[default: 3]" in out
    out = " ".join(CliRunner().invoke(main, ["plot", "--help"]).output.split())
    assert "[default: ema:0.9]" in out
    out = " ".join(CliRunner().invoke(main, ["run", "--help"]).output.split())
    assert "Number of epochs [default: the config's epochs]" in out


def builtin_plugins():
    return sorted(ep.name for ep in md.entry_points(group=ENTRY_POINT_GROUP) if ep.value.startswith("arcfw.plugins."))


@pytest.mark.parametrize("name", builtin_plugins())
def test_plugins_name_shows_every_parameter_with_default_and_description(name):
    detail = describe(name)
    undocumented = [p.name for p in detail.params if not p.help]
    assert not undocumented, f"plugin {name}: parameters without a '- ``name``: text' line in its docstring: {undocumented}"
    res = CliRunner().invoke(main, ["plugins", name])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"{name} (role {detail.role}): {detail.description}")
    for p in detail.params:
        assert any(line.strip().startswith(f"{p.name}  ") and f"  default {p.default}" in line for line in res.output.splitlines()), (p, res.output)


def test_plugins_name_for_the_default_predictor_and_an_import_path():
    out = CliRunner().invoke(main, ["plugins", "agent"]).output
    assert "channels  default 64  (int)" in out and "width of the conv net" in out and "hooks it implements: configure, parameter_groups, predict" in out
    out = CliRunner().invoke(main, ["plugins", "efe_loss"]).output
    assert "hard_cells        default wrong_or_unsure  (str)" in out and "metrics it declares: mask_ratio, cell_acc" in out
    out = CliRunner().invoke(main, ["plugins", "helper_plugins:SendSignal"]).output
    assert "after_step  default (required)  (int)" in out and "signal      default SIGINT  (str)" in out


def test_unknown_plugin_name_is_one_line_with_a_suggestion():
    res = CliRunner().invoke(main, ["plugins", "grid_transfomer"])
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "unknown plugin 'grid_transfomer' (did you mean 'grid_transformer'?" in res.stderr
    res = CliRunner().invoke(main, ["plugins", "zzz"])
    assert res.exit_code == 2 and "did you mean" not in res.stderr and "available: agent" in res.stderr


def test_parameter_descriptions_come_from_docstring_bullets():
    doc = """Something.

    Parameters:

    - ``a``, ``b`` (ints): the sizes,
      continued here.
    - ``c``: one line.
    - not a parameter: text
    - ``d`` and ``e``: both
    """
    assert param_docs(doc) == {"a": "the sizes, continued here.", "b": "the sizes, continued here.", "c": "one line.", "d": "both", "e": "both"}
    assert doc_without_params(doc) == "Something.\n\n- not a parameter: text"  # `arcfw plugins NAME` shows them once


def test_shell_completion_as_the_readme_documents_it():
    """`_ARCFW_COMPLETE=bash_source arcfw` prints a bash completion script; the completion it drives
    (COMP_WORDS / COMP_CWORD) lists the commands."""
    arcfw = [sys.executable, "-c", "from arcfw.core.commands.cli import main; main(prog_name='arcfw')"]
    env = {**os.environ, "_ARCFW_COMPLETE": "bash_source"}
    script = subprocess.run(arcfw, env=env, capture_output=True, text=True, timeout=60)
    assert script.returncode == 0 and "complete -o nosort -F _arcfw_completion arcfw" in script.stdout
    env = {**os.environ, "_ARCFW_COMPLETE": "bash_complete", "COMP_WORDS": "arcfw pl", "COMP_CWORD": "1"}
    done = subprocess.run(arcfw, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and {"plain,plot", "plain,plugins"} <= set(done.stdout.split())
