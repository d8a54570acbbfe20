"""The training loop around the engine: the trainer, checkpoints, metrics logs, stop signals."""
