"""Roles and hook combination are declared once (core/engine/roles.py); everything else agrees."""

from __future__ import annotations

import pluggy
import pytest
from conftest import REPO

from arcfw.core.engine import hookspecs
from arcfw.core.engine.roles import HOOK_TABLE, ROLE_TABLE, markdown_combine, markdown_roles
from arcfw.core.errors import PluginError


def _spec_names() -> set[str]:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return {n for n in dir(pm.hook) if isinstance(getattr(pm.hook, n), pluggy.HookCaller)}


def test_every_hook_spec_has_one_rule_and_every_role_hook_exists():
    assert set(HOOK_TABLE) == _spec_names()
    assert {h for r in ROLE_TABLE.values() for h in r.hooks} <= set(HOOK_TABLE)


def test_docs_show_the_tables_as_declared():
    text = (REPO / "docs" / "plugins.md").read_text()
    assert markdown_roles() in text, "regenerate the role table of docs/plugins.md from roles.markdown_roles()"
    assert markdown_combine() in text, "regenerate the hook table of docs/plugins.md from roles.markdown_combine()"


def test_no_spec_carries_a_pluggy_marker_the_engine_ignores():
    for name in _spec_names():
        opts = getattr(getattr(hookspecs, name), f"{hookspecs.PROJECT}_spec")
        assert not opts.get("firstresult"), name


def test_engine_enforces_exactly_one_from_the_table(make_engine):
    """A second predictor (as an extra) is refused because HOOK_TABLE says 'exactly one'."""
    with pytest.raises(PluginError, match="exactly one plugin must implement 'predict'"):
        make_engine({"plugins.extra": [{"name": "agent"}]})


def test_plugins_command_lists_every_role_of_the_table():
    from click.testing import CliRunner

    from arcfw.core.commands.cli import main

    out = CliRunner().invoke(main, ["plugins"]).output
    for role in ("prompt", "refine", "predictor", "loss", "curriculum", "extra"):
        assert f"{role}:" in out


def test_a_list_in_a_single_role_slot_is_a_config_error_from_the_table():
    from arcfw.core.config import load_config
    from arcfw.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"plugins.refine: the refine role takes 1 plugin; list more under plugins.extra"):
        load_config(REPO / "configs" / "default.yaml", {"plugins.refine": [{"name": "rl_policy"}]})
