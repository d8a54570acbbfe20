"""The commands built on the engine: the CLI and what its verbs run (check, bench, eval, plot)."""
