"""arcfw: a plugin-based training framework for ARC-AGI grid puzzles.

What a plugin author needs is importable from here::

    from arcfw import Plugin, hookimpl, ParamGroup, LossOutput, Metric
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it (imported on first use, so ``import arcfw`` stays light)
_PUBLIC = {
    "Plugin": "arcfw.core.engine.plugin",
    "hookimpl": "arcfw.core.engine.hookspecs",
    "ParamGroup": "arcfw.core.engine.context",
    "LossOutput": "arcfw.core.engine.context",
    "Metric": "arcfw.core.engine.context",
    "StepResult": "arcfw.core.engine.context",
    "Context": "arcfw.core.engine.context",
    "View": "arcfw.core.engine.context",
    "Batch": "arcfw.core.data.batch",
    "Example": "arcfw.core.data.batch",
    "Pair": "arcfw.core.data.batch",
    "Task": "arcfw.core.data.batch",
    "ArcfwError": "arcfw.core.errors",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'arcfw' has no attribute {name!r}")
