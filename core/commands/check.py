"""``arcfw check CONFIG``: the original script's hand-written verification checklist, run for real.

Builds everything from the config, runs two steps on a few pairs, and returns
one pass/fail row per item.  This is what a plugin author runs first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from arcfw.core.config import RunConfig
from arcfw.core.data.batch import Example
from arcfw.core.data.tasks import ExampleLoader, load_tasks, make_examples
from arcfw.core.engine.engine import Engine
from arcfw.core.engine.roles import step_hook
from arcfw.core.engine.steps import Stage
from arcfw.core.errors import ArcfwError


@dataclass
class Row:
    item: str
    ok: bool
    detail: str = ""


def _examples(cfg: RunConfig, pairs: int) -> list[Example]:
    d = cfg["data"]
    tasks = load_tasks(d["source"], version=d["version"], split=d["split"], max_tasks=d["max_tasks"])
    examples = make_examples(tasks)
    return examples[:pairs]


def run_check(cfg: RunConfig, pairs: int = 4, steps: int = 2) -> list[Row]:
    rows: list[Row] = []
    examples = _examples(cfg, max(pairs, 1))
    try:
        engine = Engine.from_config(cfg)
    except ArcfwError as exc:
        return [Row("plugins build and their hooks validate", False, str(exc))]
    rows.append(Row("plugins build and their hooks validate", True, ", ".join(f"{r}={n}" for n, r in engine.roles.items())))
    console = sorted((m for m in engine.metrics if m.console is not None), key=lambda m: m.console or 0)
    rows.append(Row("metrics declared (console line)", True, " | ".join(m.name.capitalize() for m in console) or "none"))

    # -- parameter groups: in the optimizer with their learning rate, in train mode
    in_opt = {id(p): pg["lr"] for pg in engine.optimizer.param_groups for p in pg["params"]}
    for g in engine.groups:
        if g.lr == 0:
            rows.append(Row(f"group '{g.name}' ({g.plugin}) frozen", not any(p.requires_grad for p in g.params), "lr 0: requires_grad off, not optimised"))
            continue
        missing = [p for p in g.trainable() if in_opt.get(id(p)) != g.lr]
        rows.append(Row(
            f"group '{g.name}' ({g.plugin}) in optimizer with lr {g.lr:g}",
            not missing and bool(g.trainable()),
            f"{sum(p.numel() for p in g.trainable()):,} parameters" if not missing else f"{len(missing)} parameter tensors missing or with another lr",
        ))
        not_training = [type(m).__name__ for m in g.modules for mm in m.modules() if not mm.training]
        rows.append(Row(f"group '{g.name}' ({g.plugin}) in train mode", not not_training, "" if not not_training else f"eval mode: {sorted(set(not_training))}"))

    # -- precision
    dtypes = sorted({str(p.dtype).replace("torch.", "") for g in engine.groups for p in g.trainable()})
    try:
        engine.precision.check_parameters(engine.groups)
        rows.append(Row("precision and parameter dtypes consistent", True, f"{engine.precision.mode}, trainable params {'/'.join(dtypes) or 'none'}"))
    except ArcfwError as exc:
        rows.append(Row("precision and parameter dtypes consistent", False, str(exc)))

    # -- run steps, recording the order
    events: list[tuple[str, str | None]] = []
    engine.add_listener(lambda e, p: events.append((e, p)))
    loader = ExampleLoader(examples, batch_size=min(cfg["batch_size"], len(examples)), shuffle=False, seed=cfg["seed"])
    losses, reached, error = [], {g.name: 0.0 for g in engine.groups if g.lr > 0}, None
    batches = list(loader.batches(0))
    target_dtype = batches[0].targets.dtype
    for i in range(steps):
        batch = batches[i % len(batches)].to(engine.device)
        try:
            metrics = engine.train_step(batch)
        except ArcfwError as exc:
            error = exc
            break
        losses.append(metrics.get("loss", float("nan")))
        for name, v in engine.last_norms.items():
            reached[name] = max(reached[name], v)
    rows.append(Row("targets are int64", target_dtype == torch.int64, str(target_dtype).replace("torch.", "")))
    rows.append(Row(f"{steps} steps run with every hook contract checked", error is None, "" if error is None else f"{error.kind}: {error}"))
    for g in engine.groups:
        if g.lr == 0:
            continue
        via = step_hook(engine.roles[g.plugin])
        path = "generate_prompt -> refine -> predict -> compute_loss" if via == "generate_prompt" else f"{via} -> compute_loss"
        ok = error is None and reached.get(g.name, 0.0) > 0
        rows.append(Row(f"gradient reaches group '{g.name}' ({g.plugin})", ok, f"through {path}; max grad norm {reached.get(g.name, 0.0):.3g}"))
    post = [i for i, (e, _) in enumerate(events) if e == Stage.POST_STEP_UPDATE.value]
    opt = [i for i, (e, _) in enumerate(events) if e == f"stage:{Stage.OPTIMIZER_STEP.value}"]
    ordered = bool(post) and all(any(o < p for o in opt) for p in post) and error is None
    who = sorted({p for e, p in events if e == Stage.POST_STEP_UPDATE.value and p})
    rows.append(Row("post-step hooks ran after the optimizer step", ordered if post else error is None, ", ".join(who) if who else "no post_step_update hook"))
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    rows.append(Row("loss is finite", finite, ", ".join(f"{x:.4g}" for x in losses)))
    return rows
