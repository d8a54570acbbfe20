"""arcfw: a plugin-based training framework for ARC-AGI grid puzzles."""

__version__ = "0.1.0"
