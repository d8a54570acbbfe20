"""TensorBoard logger: every logged record as scalars (``pip install 'arcfw[tensorboard]'``).

The JSONL log (``OUT/metrics.jsonl``) is always written by the trainer; this
plugin adds TensorBoard event files next to it::

    plugins:
      extra:
        - name: tensorboard      # writes OUT/tensorboard/ (or log_dir)

Batch records go under ``batch/<key>``, epoch summaries under ``epoch/<key>``,
per-group gradient norms under ``batch/grad_norms/<group>``, all against the
optimizer step.  Only rank 0 writes.  A resumed run hides what the stopped
run logged after its checkpoint (TensorBoard's ``purge_step``), and a fresh run
in an overwritten folder hides the old run's events: every step shows once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from arcfw.core.engine.hookspecs import hookimpl
from arcfw.core.engine.plugin import Plugin
from arcfw.core.errors import MissingExtra, PluginError
from arcfw.core.training.records import scalars


class TensorBoardLogger(Plugin):
    """Writes every logged record to TensorBoard event files.

    Parameters (YAML):

    - ``log_dir``: folder of the event files (default: ``OUT/tensorboard``).
    - ``flush_secs``: seconds between flushes to disk (>= 1).
    """

    name = "tensorboard"
    role = "extra"
    description = "TensorBoard logger (optional extra 'tensorboard'): batch and epoch records as scalars"

    def __init__(self, log_dir: str | None = None, flush_secs: int = 10):
        if flush_secs < 1:
            raise ValueError(f"flush_secs must be >= 1, got {flush_secs!r}")
        self.log_dir = log_dir
        self.flush_secs = flush_secs
        self.writer: Any = None

    @hookimpl
    def configure(self, ctx):
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
        except ImportError as exc:
            raise MissingExtra(f"plugin 'tensorboard' needs the tensorboard package ({exc}): pip install 'arcfw[tensorboard]'") from None
        if self.log_dir is None and ctx.out_dir is None:
            raise PluginError("plugin 'tensorboard': no log_dir given and the run has no output folder")

    def _open(self, ctx) -> Any:
        # Opened at the first record, not in configure: nothing is created before the run starts.
        from torch.utils.tensorboard import SummaryWriter

        path = Path(self.log_dir) if self.log_dir is not None else Path(ctx.out_dir) / "tensorboard"
        # events of earlier writers in this folder from this step on are hidden: those a stopped run
        # logged after the checkpoint this run resumed from, or all of an overwritten run's
        purge = (ctx.resumed_step or 0) + 1
        return SummaryWriter(log_dir=str(path), flush_secs=self.flush_secs, purge_step=purge)

    @hookimpl
    def log_metrics(self, record, ctx):
        if ctx.rank != 0:
            return
        if self.writer is None:
            self.writer = self._open(ctx)
        step = int(record.get("step", 0))
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        if record.get("kind") == "epoch":  # the end of an epoch (and of a run) is on disk
            self.writer.flush()
