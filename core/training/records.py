"""The numbers of a logged record, for logger plugins that take scalars (W&B, MLflow).

``log_metrics`` gets records as :mod:`arcfw.core.training.logbook` writes them (their
fields are in docs/plugin-reference.md): this flattens one to ``{tag: float}``.
"""

from __future__ import annotations

import math
from typing import Any

#: keys that are not values to plot: the record's kind, and its step (the x axis)
NOT_VALUES = ("kind", "step")
#: the prefix of validation metrics, kept as they are (``val/loss``) in whatever record they come
VAL_PREFIX = "val/"


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """``{"<kind>/<key>[/<sub key>]": float}`` of every number in ``record`` (``batch/loss``,
    ``batch/grad_norms/qwen``, ``epoch/avg_loss``); ``val/...`` keys stay as they are.  Strings
    ``"nan"``/``"inf"``/``"-inf"`` become floats; booleans, lists and other strings are left out."""
    out: dict[str, float] = {}
    kind = str(record.get("kind", "batch"))
    for key, value in record.items():
        if key in NOT_VALUES:
            continue
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            if isinstance(v, str) and v in ("nan", "inf", "-inf"):
                v = float(v)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                tag = key if key.startswith(VAL_PREFIX) else f"{kind}/{key}"
                out[tag + (f"/{sub}" if sub is not None else "")] = float(v)
    return out


def finite(values: dict[str, float]) -> dict[str, float]:
    """The finite ones (MLflow refuses NaN in some stores; a skipped step's NaN carries no point anyway)."""
    return {k: v for k, v in values.items() if math.isfinite(v)}
