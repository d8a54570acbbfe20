"""``arcfw check CONFIG``: the original script's hand-written verification checklist, run for real.

Builds everything from the config, then goes through the lifecycle of a run on a few
pairs - epoch start, three steps through the engine's real step (every per-step check on,
the health checks after each), post-step hooks, epoch end, the evaluation hooks on one pair,
saving and restoring the state - and returns one pass/fail row per item, a failing row with the one-line error naming the
plugin.  This is what a plugin author runs first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from arcfw.core.config import RunConfig
from arcfw.core.data.batch import Batch, Example
from arcfw.core.data.tasks import ExampleLoader, load_tasks, make_examples
from arcfw.core.engine import contracts
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


def run_check(cfg: RunConfig, pairs: int = 4, steps: int = 3) -> list[Row]:
    rows: list[Row] = []
    examples = _examples(cfg, max(pairs, 1))
    try:
        engine = Engine.from_config(cfg)
    except ArcfwError as exc:
        return [Row("plugins build and their hooks validate", False, _line(exc))]
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

    # -- the lifecycle of a run, as the trainer goes through it: epoch start, steps on the loader's
    #    (augmented) batches with the health checks, epoch end, then the state a checkpoint saves and a
    #    resumed run loads.  Every check of the engine is on, as in training.
    events: list[tuple[str, str | None]] = []
    engine.add_listener(lambda e, p: events.append((e, p)))
    error: ArcfwError | None = None
    engine.ctx.epoch = 0
    try:
        engine.call_all("on_epoch_start", epoch=0)
        rows.append(Row("epoch start (on_epoch_start hooks)", True, ", ".join(engine.implementers("on_epoch_start")) or "no hook"))
    except ArcfwError as exc:
        error = exc
        rows.append(Row("epoch start (on_epoch_start hooks)", False, _line(exc)))

    augment = engine.augment_example if engine.implements("augment_example") else None
    loader = ExampleLoader(examples, batch_size=min(cfg["batch_size"], len(examples)), shuffle=False, seed=cfg["seed"], transform=augment)
    losses: list[float] = []
    warnings: list[str] = []
    live = [g for g in engine.groups if g.lr > 0]
    norms: dict[str, list[float]] = {g.name: [] for g in live}  # per counted step (not exempt, loss not 0)
    target_dtype: torch.dtype | None = None
    batches: list[Batch] = []
    step_item = f"{steps} steps through the engine's step, every check on"
    if error is None:
        try:
            batches = list(loader.batches(0))
            target_dtype = batches[0].targets.dtype
            for i in range(steps):
                batch = batches[i % len(batches)].to(engine.device)
                metrics = engine.train_step(batch)
                loss = metrics.get("loss", float("nan"))
                losses.append(loss)
                exempt = frozenset(engine.ctx.no_grad_groups)
                warnings += engine.health.update(loss, engine.last_norms, metrics, exempt)
                for g in live:
                    if g.name not in exempt and loss != 0.0:
                        norms[g.name].append(engine.last_norms.get(g.name, 0.0))
        except ArcfwError as exc:
            error = exc
        rows.append(Row(step_item, error is None, f"{len(losses)} steps" if error is None else _line(error)))
    else:
        rows.append(Row(step_item, False, "not run: the epoch start failed"))
    if target_dtype is not None:
        rows.append(Row("targets are int64", target_dtype == torch.int64, str(target_dtype).replace("torch.", "")))
    never = engine.paths.without_gradient()
    for g in live:
        via = step_hook(engine.roles[g.plugin])
        path = "generate_prompt -> refine -> predict -> compute_loss" if via == "generate_prompt" else f"{via} -> compute_loss"
        seen = norms[g.name]
        zero = [i + 1 for i, v in enumerate(seen) if v == 0.0]
        ok = error is None and bool(seen) and not zero and not never.get(g.name)
        if error is not None:
            detail = f"not checked: stopped at the error above after {len(losses)} step(s)"
        elif never.get(g.name):
            detail = f"parameter tensors without a gradient in {len(losses)} steps: {never[g.name]}"
        elif zero:
            detail = f"zero gradient at counted step(s) {zero} of {len(seen)} (loss not 0): a path cut or zeroed on some steps"
        else:
            detail = f"through {path}; grad norm {min(seen, default=0.0):.3g} to {max(seen, default=0.0):.3g} over {len(seen)} steps"
        rows.append(Row(f"gradient reaches group '{g.name}' ({g.plugin}) at every step", ok, detail))
    post = [i for i, (e, _) in enumerate(events) if e == Stage.POST_STEP_UPDATE.value]
    opt = [i for i, (e, _) in enumerate(events) if e == f"stage:{Stage.OPTIMIZER_STEP.value}"]
    ordered = bool(post) and all(any(o < p for o in opt) for p in post) and error is None
    who = sorted({p for e, p in events if e == Stage.POST_STEP_UPDATE.value and p})
    detail = ", ".join(who) if who else "no post_step_update hook"
    if error is not None:
        detail = f"not checked: stopped at the error above after {len(losses)} step(s)"
    rows.append(Row("post-step hooks ran after the optimizer step", ordered if post else error is None, detail))
    rows.append(Row("no health warning", not warnings, " | ".join(warnings)))

    end_item, state_item = "epoch end (on_epoch_end hooks)", "state saved and restored (state_dict / load_state_dict hooks)"
    if error is None:
        try:
            summary = {"kind": "epoch", "epoch": 0, "step": engine.global_step, "batches": len(losses)}
            for plugin, out in engine.call_all("on_epoch_end", epoch=0, summary=dict(summary)):
                contracts.check_metrics(plugin, "on_epoch_end", out)
            rows.append(Row(end_item, True, ", ".join(engine.implementers("on_epoch_end")) or "no hook"))
        except ArcfwError as exc:
            error = exc
            rows.append(Row(end_item, False, _line(exc)))
    eval_item = "evaluation hooks on one pair (prompt, predict, predict_shape, test_time_views)"
    if error is None:
        try:
            with engine.evaluating():
                batch = batches[0].to(engine.device)
                prompt, encoding = engine.eval_encode(batch)
                engine.predict_no_grad(prompt, batch, encoding)
                engine.predict_shape(prompt, batch, encoding)
            views = engine.test_time_views(examples[0])
            rows.append(Row(eval_item, True, f"{len(views)} extra view(s) of a pair"))
        except ArcfwError as exc:
            error = exc
            rows.append(Row(eval_item, False, _line(exc)))
    if error is None:
        try:
            engine.load_state_dict(engine.state_dict(), source="the state saved by the check")
            rows.append(Row(state_item, True, ", ".join(engine.implementers("state_dict")) or "engine only"))
        except ArcfwError as exc:
            rows.append(Row(state_item, False, _line(exc)))
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    rows.append(Row("loss is finite", finite, ", ".join(f"{x:.4g}" for x in losses) or "no step completed"))
    return rows


def _line(exc: ArcfwError) -> str:
    return f"{exc.kind}: {exc}"
