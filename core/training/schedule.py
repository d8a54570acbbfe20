"""When the training loop saves a checkpoint, and how a stop signal ends the run.

A checkpoint is saved every ``checkpoint.every`` steps, at the end of every
epoch, when ``max_batches`` stops the run inside an epoch, and after the step
during which a stop signal (Ctrl-C, SIGTERM) reached any rank; then the run
stops with :class:`~arcfw.core.errors.Interrupted`.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from arcfw.core.errors import Interrupted
from arcfw.core.training.checkpoint import Checkpointer, Position


class SaveSchedule:
    def __init__(self, checkpoints: Checkpointer, every: int, batches_per_epoch: int,
                 loop_state: Callable[[], dict[str, Any]], resume_command: Callable[[], str]):
        """``loop_state()``: the loop's own state to save (epoch statistics); ``resume_command()``:
        the command printed when a signal stops the run."""
        self.checkpoints = checkpoints
        self.every = every
        self.batches = batches_per_epoch
        self.loop_state = loop_state
        self.resume_command = resume_command
        self.last: Path | None = None  # the last checkpoint written
        self.stop_signum: int | None = None  # the stop signal any rank received (agreed after every step)

    def save(self, epoch: int, next_batch: int) -> Path:
        self.last = self.checkpoints.save(Position(epoch, next_batch), self.loop_state())
        return self.last

    def after_step(self, epoch: int, next_batch: int) -> None:
        """Periodic checkpoint (the epoch end saves its own), and a stop that a signal asked for."""
        step = self.checkpoints.engine.global_step
        if self.every and step % self.every == 0 and next_batch < self.batches:
            self.save(epoch, next_batch)
        if self.stop_signum is not None:
            self.save(epoch, next_batch)
            self.stop_if_asked()

    def cut_short(self, epoch: int, next_batch: int) -> None:
        """Before the epoch's summary: ``max_batches`` stopped it inside the epoch, the run can go on from here."""
        if next_batch < self.batches:
            self.save(epoch, next_batch)

    def epoch_done(self, epoch: int, next_batch: int) -> None:
        """After the epoch's summary is written: the epoch-end checkpoint, then a stop a signal asked for."""
        if next_batch == self.batches:
            self.save(epoch + 1, 0)
            self.stop_if_asked()

    def stop_if_asked(self) -> None:
        signum = self.stop_signum
        if signum is not None:
            raise Interrupted(
                signum,
                f"{signal.Signals(signum).name}: stopped after step {self.checkpoints.engine.global_step}, "
                + (f"checkpoint saved in {self.last}. Resume with: {self.resume_command()}"
                   if self.last else "no checkpoint written"),
            )
