"""Base class for plugins.

A plugin is a class with a registry ``name``, a ``role`` and a one-line
``description`` (roles: :mod:`arcfw.core.engine.roles`).  Its constructor's keyword arguments are its YAML
parameters: the config loader binds them to the signature (unknown keys and
wrong types are config errors).  It implements hooks from
:mod:`arcfw.core.engine.hookspecs` as methods decorated with ``@hookimpl``.
"""

from __future__ import annotations

from typing import ClassVar

from arcfw.core.engine.context import Metric
from arcfw.core.engine.roles import EXTRA_ROLE, REQUIRED_ROLES, ROLES  # noqa: F401  (the roles live in roles.py)


class Plugin:
    """Optional base class: gives a plugin the attributes the registry and engine read."""

    name: ClassVar[str] = ""
    role: ClassVar[str] = EXTRA_ROLE
    description: ClassVar[str] = ""

    #: the metrics this plugin makes (see :class:`~arcfw.core.engine.context.Metric`): what the
    #: console line, the epoch summary, ``arcfw plot`` and the health checks show of it
    metrics: ClassVar[tuple[Metric, ...]] = ()

    #: set by the engine to the name it registered this instance under
    instance_name: str = ""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.instance_name or self.name!r}>"
