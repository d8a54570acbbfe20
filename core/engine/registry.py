"""Plugin registry: names -> plugin classes.

Built-in plugins are found exactly like third-party ones, through the
``arcfw.plugins`` entry-point group (see ``pyproject.toml``).  A config may
also name a class in the user's own module by import path,
``my_module:MyPlugin`` (or ``my_module.MyPlugin``).
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import inspect
import re
import typing
from dataclasses import dataclass

from arcfw.core.engine.roles import EXTRA_ROLE, HOOK_TABLE, ROLE_TABLE
from arcfw.core.errors import PluginError

ENTRY_POINT_GROUP = "arcfw.plugins"


@dataclass
class PluginInfo:
    name: str
    role: str
    description: str
    target: str  # "module:attr"
    error: str = ""  # why it could not be loaded, if it could not


def entry_points() -> dict[str, md.EntryPoint]:
    """Registered plugins by name. A later distribution does not silently shadow an earlier one."""
    found: dict[str, md.EntryPoint] = {}
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found


def is_import_path(spec: str) -> bool:
    return ":" in spec or ("." in spec and spec not in entry_points())


def resolve(spec: str) -> type:
    """Return the plugin class for a registry name or an import path. Raises PluginError."""
    if not isinstance(spec, str) or not spec:
        raise PluginError(f"plugin name must be a non-empty string, got {spec!r}")
    eps = entry_points()
    if spec in eps:
        try:
            obj = eps[spec].load()
        except Exception as exc:  # a broken third-party package must not look like a typo
            raise PluginError(f"plugin '{spec}' ({eps[spec].value}) failed to import: {type(exc).__name__}: {exc}") from exc
    elif is_import_path(spec):
        obj = _import_object(spec)
    else:
        known = ", ".join(sorted(eps)) or "none"
        raise PluginError(f"unknown plugin '{spec}' (available: {known}; or give an import path 'module:Class')")
    if not inspect.isclass(obj):
        raise PluginError(f"plugin '{spec}' is not a class (got {type(obj).__name__})")
    return obj


def _import_object(spec: str) -> object:
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise PluginError(f"plugin '{spec}': cannot import module '{module_name}' ({exc})") from exc
    except Exception as exc:
        raise PluginError(f"plugin '{spec}': importing '{module_name}' failed: {type(exc).__name__}: {exc}") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"plugin '{spec}': module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    return obj


def describe_all() -> list[PluginInfo]:
    """Every registered plugin with its role and one-line description (for ``arcfw plugins``)."""
    infos = []
    for name, ep in sorted(entry_points().items()):
        try:
            cls = ep.load()
            doc = getattr(cls, "description", "") or (inspect.getdoc(cls) or "").split("\n")[0]
            role = getattr(cls, "role", EXTRA_ROLE)
            if role not in ROLE_TABLE:
                infos.append(PluginInfo(name, "?", doc, ep.value, error=f"unknown role {role!r} (roles: {', '.join(ROLE_TABLE)})"))
                continue
            infos.append(PluginInfo(name, role, doc, ep.value))
        except Exception as exc:
            infos.append(PluginInfo(name, "?", "", ep.value, error=f"{type(exc).__name__}: {exc}"))
    return infos


# --------------------------------------------------------------------------- one plugin in detail (arcfw plugins NAME)


@dataclass
class ParamInfo:
    name: str
    default: str  # as YAML writes it; "(required)" when there is none
    type: str  # the annotation, "" when there is none
    help: str  # from the docstring's ``- ``name``: text`` line, "" when it has none


@dataclass
class PluginDetail:
    name: str
    role: str
    description: str
    target: str  # "module:Class"
    doc: str  # the class docstring
    params: list[ParamInfo]
    metrics: list[str]
    hooks: list[str]


_BULLET = re.compile(r"^(\s*)[-*]\s+(.*)$")
_PARAM_ITEM = re.compile(r"^((?:``\w+``(?:,\s*|\s+and\s+|\s+or\s+|\s*/\s*)?)+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def param_docs(*docs: str | None) -> dict[str, str]:
    """Parameter descriptions from docstrings: a bullet ``- ``name``: text`` (or ``- ``a``, ``b``: text`` for
    several), continued on the following more indented lines, gives each named parameter ``text``."""
    out: dict[str, str] = {}
    for doc in docs:
        lines = inspect.cleandoc(doc or "").splitlines()
        i = 0
        while i < len(lines):
            bullet = _BULLET.match(lines[i])
            i += 1
            if not bullet:
                continue
            indent, text = len(bullet.group(1)), [bullet.group(2).strip()]
            while i < len(lines) and lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) > indent and not _BULLET.match(lines[i]):
                text.append(lines[i].strip())
                i += 1
            item = _PARAM_ITEM.match(" ".join(text))
            if item:
                for name in re.findall(r"``(\w+)``", item.group(1)):
                    out.setdefault(name, item.group(2).strip())
    return out


def doc_without_params(doc: str) -> str:
    """``doc`` less its parameter bullets (:func:`param_docs`) and a ``Parameters ...:`` line before them."""
    lines, out, i = inspect.cleandoc(doc or "").splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        bullet = _BULLET.match(line)
        if bullet:
            j, text = i + 1, [bullet.group(2).strip()]
            indent = len(bullet.group(1))
            while j < len(lines) and lines[j].strip() and len(lines[j]) - len(lines[j].lstrip()) > indent and not _BULLET.match(lines[j]):
                text.append(lines[j].strip())
                j += 1
            if _PARAM_ITEM.match(" ".join(text)):
                i = j
                continue
        if not re.match(r"^Parameters\b[^:]*:\s*$", line.strip()):
            out.append(line)
        i += 1
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def _yaml_text(value: object) -> str:
    import yaml

    try:
        return str(yaml.safe_dump(value, default_flow_style=True, width=10**6)).strip().removesuffix("...").strip()
    except yaml.YAMLError:
        return repr(value)


def _hint_text(hint: object) -> str:
    if hint is inspect.Parameter.empty:
        return ""
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def close_matches(name: str, known: list[str]) -> list[str]:
    import difflib

    return difflib.get_close_matches(name, known, n=3, cutoff=0.6)


def describe(spec: str) -> PluginDetail:
    """One plugin (a registry name or an import path) in detail: role, description, every constructor parameter
    with its default, type and the docstring's description, declared metrics and implemented hooks.
    An unknown name is a PluginError suggesting close registered names."""
    eps = entry_points()
    if spec not in eps and not is_import_path(spec):
        near = close_matches(spec, sorted(eps))
        hint = f"did you mean {' or '.join(repr(n) for n in near)}? " if near else ""
        raise PluginError(f"unknown plugin '{spec}' ({hint}available: {', '.join(sorted(eps)) or 'none'}; `arcfw plugins` lists them)")
    cls = resolve(spec)
    from arcfw.core.engine import hookspecs

    init = next(vars(k)["__init__"] for k in cls.__mro__ if "__init__" in vars(k))
    docs = param_docs(inspect.getdoc(cls), None if init is object.__init__ else inspect.getdoc(init))
    params: list[ParamInfo] = []
    if init is not object.__init__:
        try:
            hints = typing.get_type_hints(init)
        except Exception:
            hints = {}
        for p in inspect.signature(init).parameters.values():
            if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            default = "(required)" if p.default is inspect.Parameter.empty else _yaml_text(p.default)
            params.append(ParamInfo(p.name, default, _hint_text(hints.get(p.name, p.annotation)), docs.get(p.name, "")))
    hooks = [h for h in HOOK_TABLE if hasattr(getattr(cls, h, None), f"{hookspecs.PROJECT}_impl")]  # the hook order
    metrics = [m.name for m in getattr(cls, "metrics", ()) if hasattr(m, "name")]
    role = getattr(cls, "role", EXTRA_ROLE)
    doc = doc_without_params(inspect.getdoc(cls) or "")
    description = getattr(cls, "description", "") or doc.split("\n")[0]
    target = eps[spec].value if spec in eps else spec
    return PluginDetail(spec, role, description, target, doc, params, metrics, hooks)
