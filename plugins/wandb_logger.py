"""Weights & Biases logger: every logged record to a W&B run (``pip install 'arcfw[wandb]'``).

The JSONL log (``OUT/metrics.jsonl``) is always written by the trainer; this plugin
sends the same records to W&B::

    plugins:
      extra:
        - name: wandb
          project: arc             # W&B project (default: arcfw)
          mode: offline            # online | offline | disabled (default: W&B's own, WANDB_MODE)

Batch records go under ``batch/<key>``, epoch summaries under ``epoch/<key>``, gradient
norms per group under ``batch/grad_norms/<group>``, validation metrics as they are
(``val/loss``), all at the optimizer step; the resolved config (``OUT/config.yaml``)
is the W&B run's config.  W&B writes its files under the run folder (``OUT/wandb/``,
or ``dir``); offline runs are uploaded later with ``wandb sync OUT/wandb/offline-run-*``.
Only rank 0 logs; ``on_train_end`` finishes the W&B run (exit code 0 when the run
finished, 1 when it was stopped or failed).  A resumed run continues the same W&B run
(its id is kept in ``OUT/wandb/arcfw-run-id``); W&B keeps one value per step, so the
steps the stopped run logged after its checkpoint keep their first values there
(``metrics.jsonl`` holds the resumed run's).
"""

from __future__ import annotations

import secrets
import string
from pathlib import Path
from typing import Any

from arcfw.core.engine.hookspecs import hookimpl
from arcfw.core.engine.plugin import Plugin
from arcfw.core.errors import MissingExtra, PluginError
from arcfw.core.training.records import scalars

MODES = ("online", "offline", "disabled")
RUN_ID_FILE = "arcfw-run-id"
ID_CHARS = string.ascii_lowercase + string.digits


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as exc:
        raise MissingExtra(f"plugin 'wandb' needs the wandb package ({exc}): pip install 'arcfw[wandb]'") from None
    return wandb


class WandbLogger(Plugin):
    """Sends every logged record to a Weights & Biases run.

    Parameters (YAML):

    - ``project``: the W&B project.
    - ``entity``: the W&B team or user (default: the logged-in user's default entity).
    - ``run_name``: the W&B run's display name (default: the run folder's name).
    - ``mode``: ``online``, ``offline`` (files only, ``wandb sync`` later) or ``disabled`` (default: W&B's own, which the ``WANDB_MODE`` environment variable sets).
    - ``dir``: the folder W&B writes its ``wandb/`` files under (default: the run folder ``OUT``).
    - ``tags``: tags of the W&B run.
    - ``group``: the W&B group to put the run in.
    """

    name = "wandb"
    role = "extra"
    description = "Weights & Biases logger (optional extra 'wandb'): batch and epoch records, the resolved config"

    def __init__(self, project: str = "arcfw", entity: str | None = None, run_name: str | None = None, mode: str | None = None,
                 dir: str | None = None, tags: list[str] = [], group: str | None = None):  # noqa: A002, B006 (YAML names; copied)
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)} (or null for W&B's own), got {mode!r}")
        self.project, self.entity, self.run_name, self.mode = project, entity, run_name, mode
        self.dir, self.tags, self.group = dir, list(tags), group
        self.run: Any = None
        self.min_step = 0  # a resumed W&B run takes steps from its own next step on

    @hookimpl
    def configure(self, ctx):
        _import_wandb()  # a missing package is said at start-up, not at the first record
        if self.dir is None and ctx.out_dir is None:
            raise PluginError("plugin 'wandb': no dir given and the run has no output folder")

    def _open(self, ctx) -> Any:
        """The W&B run, started at the first record (nothing is created before the run starts)."""
        import yaml

        wandb = _import_wandb()
        root = Path(self.dir) if self.dir is not None else Path(ctx.out_dir)
        (root / "wandb").mkdir(parents=True, exist_ok=True)
        id_file = root / "wandb" / RUN_ID_FILE
        resumed = ctx.resumed_step is not None and id_file.is_file()
        run_id = id_file.read_text().strip() if resumed else "".join(secrets.choice(ID_CHARS) for _ in range(8))
        config_file = Path(ctx.out_dir) / "config.yaml" if ctx.out_dir is not None else None
        config = yaml.safe_load(config_file.read_text()) if config_file is not None and config_file.is_file() else {}
        run = wandb.init(
            project=self.project, entity=self.entity, name=self.run_name or (Path(ctx.out_dir).name if ctx.out_dir else None),
            mode=self.mode, dir=str(root), tags=self.tags or None, group=self.group, id=run_id,
            resume="allow" if resumed else None, config=config, allow_val_change=resumed,
        )
        id_file.write_text(run_id + "\n")
        self.min_step = int(getattr(run, "step", 0) or 0) if resumed else 0
        return run

    @hookimpl
    def log_metrics(self, record, ctx):
        if ctx.rank != 0:
            return
        if self.run is None:
            self.run = self._open(ctx)
        step = int(record.get("step", 0))
        if step < self.min_step:  # W&B keeps one value per step, in step order: it has this one already
            return
        self.run.log(scalars(record), step=step)

    @hookimpl
    def on_train_end(self, status, ctx):
        if self.run is not None:
            self.run.finish(exit_code=0 if status == "finished" else 1)
            self.run = None
