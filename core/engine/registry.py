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
from dataclasses import dataclass

from arcfw.core.engine.roles import EXTRA_ROLE, ROLE_TABLE
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
