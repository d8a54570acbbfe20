"""Who makes each metric name: two makers of one name is an error naming both.

A name belongs to whoever declares it (``Plugin.metrics``; the engine's own
metrics and the batch record's keys belong to the engine), or, for a metric
nobody declares, to the first plugin that logs it.  A second plugin that
declares or logs the same name is a :class:`~arcfw.core.errors.PluginError`
naming both: at start-up for declarations, at the first step that logs it
otherwise.  A plugin that replaces another in its role (another loss plugin
logging ``cell_acc``) is no collision: the replaced one is not built.
"""

from __future__ import annotations

from collections.abc import Iterable

from arcfw.core.errors import PluginError

ENGINE = "the engine"

#: keys of a batch record the engine (or the trainer's log) writes itself: no plugin may make them
ENGINE_KEYS = (
    "kind", "step", "epoch", "batch", "loss", "loss_avg", "grad_norm", "grad_norms", "nonfinite_skipped",
    "nonfinite_skipped_total", "scaler_skipped_total", "warnings",
)

#: keys of an epoch summary the trainer writes itself (``on_epoch_end`` extras may not replace them)
SUMMARY_KEYS = ("kind", "epoch", "step", "batches", "seconds", "skipped_steps", "warnings")


def who(owner: str) -> str:
    return owner if owner == ENGINE else f"plugin '{owner}'"


class MetricOwners:
    """Metric name -> the plugin that makes it (:data:`ENGINE` for the engine's own)."""

    def __init__(self) -> None:
        self.owner: dict[str, str] = dict.fromkeys(ENGINE_KEYS, ENGINE)

    def declare(self, name: str, plugin: str) -> None:
        """``plugin`` declares ``name`` (``Plugin.metrics``); a name someone else has is refused."""
        held = self.owner.setdefault(name, plugin)
        if held != plugin:
            raise PluginError(f"metric '{name}' is declared twice: by {who(held)} and by {who(plugin)} "
                              "(two plugins cannot make one metric name: rename one of them)")

    def logged(self, plugin: str, names: Iterable[str], hook: str) -> None:
        """``plugin`` logged ``names`` from ``hook``; a name another plugin (or the engine) makes is refused."""
        for name in names:
            held = self.owner.setdefault(name, plugin)
            if held != plugin:
                raise PluginError(
                    f"metric '{name}' is logged by plugin '{plugin}' ({hook}) and also made by {who(held)}: two plugins "
                    "cannot log one metric name, the later would silently replace the other (rename one of them)"
                )

    def summary_owners(self, summary_keys: dict[str, tuple[str, ...]]) -> dict[str, str]:
        """Epoch-summary key -> its maker: the trainer's own keys, then each declared metric's (``summary_keys``
        by metric name)."""
        out = dict.fromkeys(SUMMARY_KEYS, ENGINE)
        for name, keys in summary_keys.items():
            for k in keys:
                out.setdefault(k, self.owner.get(name, ENGINE))
        return out


def check_summary_extra(owners: dict[str, str], plugin: str, extra: Iterable[str]) -> None:
    """``on_epoch_end`` of ``plugin`` returned ``extra`` keys: one another maker's summary already has is refused;
    the keys become ``plugin``'s (``owners`` is updated)."""
    for key in extra:
        held = owners.setdefault(key, plugin)
        if held != plugin:
            raise PluginError(
                f"epoch summary key '{key}' is returned by plugin '{plugin}' (on_epoch_end) and also made by {who(held)}: "
                "two plugins cannot write one summary key (rename one of them)"
            )
