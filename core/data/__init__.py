"""ARC data: tasks and grids, batches, loading, output-size rules."""
