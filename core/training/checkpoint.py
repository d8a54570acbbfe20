"""Checkpoints: everything a resumed run needs, written atomically and read back safely.

A run folder holds its checkpoints like this::

    OUT/checkpoints/
        step-00000020/
            modules/0-qwen.safetensors   # the modules of every parameter group (safetensors: data only)
            modules/1-agent.safetensors
            state.pt                     # Engine.state_dict(modules=False) (optimizer, GradScaler, step and
                                         # health counters, generators, every plugin's state_dict hook),
                                         # global RNG states, data position, the loop's epoch statistics
            meta.json                    # format, versions, step, config, plugin set, sha256 of each file
        step-00000040/
        latest                           # the name of the newest complete checkpoint

**Writing.**  Into ``.tmp-step-N-PID/``; every file is fsynced, then the
folder; the folder is renamed to ``step-N`` and ``latest`` is replaced
atomically (write, fsync, rename).  A process killed at any moment leaves the
previous checkpoint and ``latest`` intact; the next run in that folder removes
the stale temporary folder.  Only the last ``checkpoint.keep`` are kept.

**Reading.**  ``meta.json`` must name this format and version; every file's
sha256 must match (a truncated or modified file is refused); modules are read
with safetensors and ``state.pt`` with ``torch.load(weights_only=True)``, so a
checkpoint can never run code.  Resuming with a config that builds another
model, plugin set or data order is refused, naming the keys that differ.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from arcfw import __version__
from arcfw.core import io as fileio  # fileio.fsync_path, looked up at each call (tests interpose)
from arcfw.core.config import constructor
from arcfw.core.engine.distributed import all_gather_object, barrier
from arcfw.core.engine.registry import resolve
from arcfw.core.engine.state import RESUME_KEYS, check_plain, is_dtensor, load_module, loose_params
from arcfw.core.errors import ArcfwError, CheckpointError, PluginError
from arcfw.core.training import sharded
from arcfw.core.training.runlock import RunLock

if TYPE_CHECKING:  # pragma: no cover
    from arcfw.core.config import RunConfig
    from arcfw.core.data.tasks import ExampleLoader
    from arcfw.core.engine.engine import Engine

FORMAT = "arcfw-checkpoint"
FORMAT_VERSION = 1
#: a checkpoint whose modules and optimizer tensors are sharded (strategy fsdp; meta.json: "sharded")
SHARDED_VERSION = 2
DIR = "checkpoints"
#: the run folder's copy of the checkpoint with the best validation value (``checkpoint.best``)
BEST = "best"
LATEST = "latest"
META = "meta.json"
STATE = "state.pt"
MODULES = "modules"
#: parameters of a group that belong to none of its modules
LOOSE = "params.safetensors"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")

#: Config keys that must not change when a run resumes: they define the model, the plugin set and the
#: data order.  Everything else (epochs, max_batches, learning rates, logging, health, checkpoint
#: settings, device, precision, data location) may change.  Plugin parameters named ``lr`` or ``*_lr``
#: are learning rates and may change too.  The data itself is compared by content (a fingerprint).
FIXED_KEYS = ("seed", "batch_size", "data.shuffle", "optimizer.name", "plugins")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass(frozen=True)
class Position:
    """Where the data stands: the next batch to run is batch ``batch`` of epoch ``epoch``."""

    epoch: int
    batch: int


@dataclass
class Restored:
    """What :meth:`Checkpointer.restore` hands back to the training loop."""

    position: Position
    loop: dict[str, Any]  # the loop's own state (epoch statistics), as it gave it to save()
    rng: dict[str, Any]  # apply with set_rng_state() right before the first step
    notes: list[str]  # things the user should know (e.g. RNG not restored across devices)


# --------------------------------------------------------------------------- small file helpers


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _one_line(exc: BaseException | str) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# --------------------------------------------------------------------------- what goes in


def _modules(engine: Engine) -> list[tuple[str, nn.Module]]:
    return engine.named_modules()


def _module_file(index: int, name: str) -> str:
    return f"{MODULES}/{index}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.safetensors"


def _rng_state() -> dict[str, Any]:
    npstate = np.random.get_state(legacy=False)
    npstate["state"]["key"] = npstate["state"]["key"].tolist()  # plain ints: weights_only has no ndarray
    return {
        "python": random.getstate(),
        "numpy": npstate,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],  # type: ignore[no-untyped-call]
    }


def set_rng_state(rng: dict[str, Any]) -> None:
    """Put the global RNGs (python, numpy, torch, CUDA where present) back as they were saved."""
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


# --------------------------------------------------------------------------- reading


@dataclass
class Checkpoint:
    """A verified checkpoint folder: ``meta`` is read; tensors load on demand."""

    path: Path
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def sharded(self) -> bool:
        """Written sharded (strategy fsdp): the modules and optimizer tensors are in ``sharded/``."""
        return "sharded" in self.meta

    @property
    def module_names(self) -> list[str]:
        return sorted(self.meta["sharded"]["modules"] if self.sharded else self.meta["modules"])

    def load_state(self) -> dict[str, Any]:
        """``state.pt`` with ``weights_only=True`` (tensors and plain values only; never runs code)."""
        try:
            state = torch.load(self.path / STATE, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle.UnpicklingError, RuntimeError, EOFError, ...
            # torch's message opens with advice to retry with weights_only=False: keep only the reason
            lines = [x for x in str(exc).splitlines() if x.strip() and not x.startswith(("Weights only load failed", "Check the doc"))]
            raise CheckpointError(
                f"{self.path / STATE}: refused: not readable as tensors and plain values only "
                f"({_short(_one_line(lines[0]) if lines else type(exc).__name__)}); nothing in it was run"
            ) from None
        if not isinstance(state, dict) or not {"engine", "rng", "plugins", "position", "loop"} <= set(state):
            raise CheckpointError(f"{self.path / STATE}: refused: not an arcfw checkpoint state")
        return state


_META_TYPES = {"step": int, "epoch": int, "batch": int, "config": dict, "plugins": dict, "modules": dict, "files": dict, "data": dict}


#: files that only a run folder holds (a folder with one of them and no checkpoint is a run stopped before its first save)
_RUN_MARKS = ("config.yaml", "metrics.jsonl")


def no_checkpoint_yet(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run that stopped before its first checkpoint (nothing to resume)."""
    return any((run_dir / f).is_file() for f in _RUN_MARKS) and not (run_dir / DIR / LATEST).is_file()


def locate(path: str | os.PathLike[str], *, resume: bool = False) -> Path:
    """The checkpoint folder meant by ``path``: a checkpoint folder, or a run folder (its latest checkpoint).
    ``resume``: the message for a folder without a checkpoint says how to start instead (``--resume``)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such folder")
    if not p.is_dir():
        raise CheckpointError(f"{p}: this is a file; expected a run folder or one of its checkpoint folders")
    if (p / META).exists():
        return p
    pointer = p / DIR / LATEST
    if not pointer.is_file():
        if resume:
            RunLock(p).check()  # a live run that has not saved yet: "in use by process N", not "nothing to resume"
        if no_checkpoint_yet(p):  # the fresh-run check says the same of this folder (trainer.check_out_dir)
            hint = "the run in this folder stopped before its first checkpoint" + (
                f", so there is nothing to resume: start it again with --out {p} --overwrite" if resume else "")
        else:
            hint = "is this an arcfw run folder?" + (f" (a fresh run there: arcfw run CONFIG --out {p})" if resume else "")
        raise CheckpointError(f"{p}: no checkpoint here ({DIR}/{LATEST} is missing); {hint}")
    name = pointer.read_text(encoding="utf-8", errors="replace").strip()
    if not _STEP_DIR.match(name) or not (p / DIR / name).is_dir():
        raise CheckpointError(f"{pointer}: damaged: it names {name[:40]!r}, which is not a checkpoint folder in {p / DIR}")
    return p / DIR / name


def run_folder(path: str | os.PathLike[str]) -> Path:
    """The run folder that ``--resume path`` continues (the checkpoint must sit in its ``checkpoints/``)."""
    folder = locate(path, resume=True)
    if folder.parent.name != DIR:
        raise CheckpointError(f"{folder}: cannot resume: a checkpoint folder must sit in RUN/{DIR}/ (the run folder it continues)")
    return folder.parent.parent


def results_folder(path: str | os.PathLike[str], prefix: str) -> Path:
    """Where an evaluation of checkpoint ``path`` writes by default, beside what it evaluated:
    ``RUN/PREFIX`` for a run folder (its latest checkpoint), ``RUN/PREFIX-step-N`` for one of its
    checkpoint folders, ``PARENT/PREFIX-NAME`` for a checkpoint folder outside a run."""
    p = Path(path)
    if not (p / META).exists():
        locate(p)  # a run folder with a checkpoint, or a clear error
        return p / prefix
    if p.parent.name == DIR:
        return p.parent.parent / f"{prefix}-{p.name}"
    return p.parent / f"{prefix}-{p.name}"


def read(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a checkpoint folder: check its format and every file's checksum. Loads no tensor."""
    path = Path(path)
    meta_file = path / META
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: not an arcfw checkpoint (no {META})")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{meta_file}: damaged: {_one_line(exc)}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path}: not an arcfw checkpoint ({META} has format {found!r}, expected {FORMAT!r})")
    if meta.get("format_version") not in (FORMAT_VERSION, SHARDED_VERSION):
        raise CheckpointError(
            f"{path}: checkpoint format version {meta.get('format_version')!r} (arcfw {meta.get('arcfw', '?')}); "
            f"this arcfw ({__version__}) reads version {FORMAT_VERSION} (and {SHARDED_VERSION}, sharded)"
        )
    if meta["format_version"] == SHARDED_VERSION and not (
            isinstance(meta.get("sharded"), dict) and isinstance(meta["sharded"].get("modules"), list)
            and meta["sharded"].get("folder") == sharded.SHARDED):
        raise CheckpointError(f"{meta_file}: damaged: a sharded checkpoint (format version {SHARDED_VERSION}) without its 'sharded' entry")
    for key, kind in _META_TYPES.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise CheckpointError(f"{meta_file}: damaged: '{key}' should be {kind.__name__}, got {type(meta.get(key)).__name__}")
    files = meta["files"]
    needed = {STATE, *meta["modules"].values()}
    if not needed <= set(files):
        raise CheckpointError(f"{meta_file}: damaged: no checksum for {sorted(needed - set(files))}")
    for rel, digest in files.items():
        if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(f"{meta_file}: damaged: file name {rel!r} points outside the checkpoint")
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{path}: incomplete checkpoint: {rel} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"{f}: checksum mismatch: the file is truncated or was changed after it was saved")
    return Checkpoint(path, meta)


# --------------------------------------------------------------------------- config comparison


def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(node, dict):
        for k, v in node.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(node, list) and node and all(isinstance(x, dict) for x in node):
        for i, v in enumerate(node):
            _flatten(v, f"{prefix}[{i}]", out)
    else:
        out[prefix] = node
    return out


def _plugin_defaults(name: Any) -> dict[str, Any]:
    """The constructor defaults of a plugin class (so an omitted parameter equals its default)."""
    try:
        cls = resolve(name)
    except PluginError:
        return {}
    params = inspect.signature(constructor(cls)).parameters.values()
    return {p.name: p.default for p in params if p.name != "self" and p.default is not inspect.Parameter.empty}


def _with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    out = dict(config)
    plugins = dict(out.get("plugins") or {})

    def fill(entry: Any) -> Any:
        entry = {"name": entry} if isinstance(entry, str) else entry
        return {**_plugin_defaults(entry["name"]), **entry} if isinstance(entry, dict) and "name" in entry else entry

    for role, entry in plugins.items():
        plugins[role] = [fill(e) for e in entry] if isinstance(entry, list) else fill(entry)
    out["plugins"] = plugins
    filled: dict[str, Any] = _jsonable(out)
    return filled


def _is_fixed(key: str) -> bool:
    if not any(key == k or key.startswith((f"{k}.", f"{k}[")) for k in FIXED_KEYS):
        return False
    last = re.split(r"[.\]]", key)[-1]
    return not (key.startswith("plugins") and (last == "lr" or last.endswith("_lr")))


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The fixed keys (:data:`FIXED_KEYS`) whose values differ, as ``key (checkpoint: a, now: b)``."""
    a, b = _flatten(_with_defaults(saved), "", {}), _flatten(_with_defaults(current), "", {})
    missing = "<not set>"
    keys = list(a) + [k for k in b if k not in a]
    return [
        f"{k} (checkpoint: {json.dumps(a.get(k, missing))}, now: {json.dumps(b.get(k, missing))})"
        for k in keys
        if _is_fixed(k) and a.get(k, missing) != b.get(k, missing)
    ]


def open_for_resume(path: str | os.PathLike[str], run_dir: Path, config: RunConfig) -> Checkpoint:
    """Locate, verify and compare a checkpoint with the config, before anything is built or written."""
    folder, found_run = locate(path, resume=True), run_folder(path)
    if found_run.resolve() != Path(run_dir).resolve():
        raise CheckpointError(f"{folder}: belongs to run folder {found_run}, not to {run_dir}")
    ckpt = read(folder)
    diff = config_differences(ckpt.meta["config"], config.data)
    if diff:
        raise CheckpointError(
            f"cannot resume from {folder}: the config differs from the checkpoint's in what defines the model, "
            f"plugins or data: {'; '.join(diff)}. Only settings such as learning rates, epochs, max_batches, "
            "logging, health and checkpoint options may change"
        )
    return ckpt


# --------------------------------------------------------------------------- disk space


def estimate_bytes(engine: Engine) -> int:
    """About the size of one checkpoint: module weights plus two optimizer moments per trainable weight."""
    weights: int = sum(t.numel() * t.element_size() for _, m in _modules(engine) for t in m.state_dict().values())
    trainable = sum(p.numel() * p.element_size() for g in engine.groups if g.lr > 0 for p in g.trainable())
    return weights + 2 * trainable


def check_space(run_dir: Path, engine: Engine, keep: int = 1) -> None:
    """Refuse to start when the output's file system cannot hold the run's checkpoints: ``keep`` of
    them plus the one being written before the oldest is pruned.  Checkpoints already in the run
    folder count as room (a resumed run keeps them instead of writing new ones; a fresh run deletes
    them)."""
    probe = Path(run_dir).absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    one = estimate_bytes(engine)
    folder = Path(run_dir) / DIR
    present = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0
    need = max(one, (keep + 1) * one - present)
    if free < need:
        raise CheckpointError(
            f"{run_dir}: not enough free disk space for checkpoints: about {need / 2**20:.1f} MiB needed "
            f"({keep} kept (checkpoint.keep) and one more while saving, {one / 2**20:.1f} MiB each), "
            f"{free / 2**20:.1f} MiB free on that file system; free some space or lower checkpoint.keep"
        )


# --------------------------------------------------------------------------- the checkpointer


class Checkpointer:
    """Saves and restores the whole training state of one run folder."""

    def __init__(self, run_dir: Path, engine: Engine, loader: ExampleLoader, keep: int, fingerprint: str):
        self.dir = Path(run_dir) / DIR
        self.engine = engine
        self.loader = loader
        self.keep = keep
        self.fingerprint = fingerprint
        self._last: int | None = None  # the step saved or restored last
        self._writing: str | None = None  # the file of a checkpoint being written (for the message of a failed save)

    # ------------------------------------------------------------------ folder bookkeeping

    def _existing(self) -> list[tuple[int, Path]]:
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
        return sorted(found)

    def latest_name(self) -> str | None:
        pointer = self.dir / LATEST
        return pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None

    def start(self, resumed: Checkpoint | None) -> None:
        """Prepare the folder: a fresh run starts without checkpoints; a resumed one drops stale
        temporary folders and checkpoints newer than the one it continues (an abandoned future)."""
        best = self.dir.parent / BEST
        fileio.recover_dir(best)
        if resumed is None:
            shutil.rmtree(self.dir, ignore_errors=True)
            shutil.rmtree(best, ignore_errors=True)
            return
        if self.best_step() is not None and (self.best_step() or 0) > resumed.step:
            shutil.rmtree(best)  # made by the continuation this resume abandons
        for p in self.dir.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        for step, p in self._existing():
            if step > resumed.step:
                shutil.rmtree(p)
        if self.latest_name() != resumed.path.name:
            fileio.write_atomic(self.dir / LATEST, resumed.path.name + "\n", durable=True)

    def best_step(self) -> int | None:
        """The step of the checkpoint in ``OUT/best`` (None: there is none)."""
        meta = self.dir.parent / BEST / META
        try:
            return int(json.loads(meta.read_text(encoding="utf-8"))["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _prune(self) -> None:
        latest = self.latest_name()
        for _, p in self._existing()[: -self.keep]:
            if p.name != latest:
                shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ save

    def check_plugin_states(self) -> None:
        """Ask every plugin for its state once, before training, so a state that cannot be saved is
        an error now and not at the first checkpoint hours later."""
        states = {name: s for name, s in self.engine.call_all("state_dict") if s is not None}
        check_plain(states, "plugin state")  # names the plugin: plugin state['name']...

    def save(self, position: Position, loop: dict[str, Any]) -> Path:
        """Write a checkpoint for the current step; the data continues at ``position``.

        A step is saved once: a second save at the same step (a periodic save, then
        max_batches reached; the end of an epoch whose last step a signal saved) keeps
        the first, which resumes to the same run.  Under strategy fsdp every rank writes
        its own shards of the modules and of the optimizer state with
        torch.distributed.checkpoint (:mod:`arcfw.core.training.sharded`): no rank holds a
        full copy, and the checkpoint resumes on any number of processes, with any strategy.
        Every rank learns whether the save succeeded, and a failed one (a full disk) stops
        every rank with the same line.
        """
        eng = self.engine
        step = eng.global_step
        final = self.dir / step_dir_name(step)
        if self._last == step:
            return final
        main = eng.dist.is_main

        def publish(tmp: Path) -> None:
            if final.exists() and final.name != self.latest_name():  # a save killed before `latest` was updated
                shutil.rmtree(final)
            os.rename(tmp, final)
            fileio.fsync_path(self.dir)
            self._writing = LATEST
            fileio.write_atomic(self.dir / LATEST, final.name + "\n", durable=True)

        def undo() -> None:
            if final.exists() and final.name != self.latest_name():  # renamed, but `latest` could not be replaced
                shutil.rmtree(final, ignore_errors=True)

        self._save_as(final, self.dir / f".tmp-{final.name}-{os.getpid()}", position, loop, publish, undo)
        self._last = step
        if main:
            self._prune()
        return final

    def save_best(self, position: Position, loop: dict[str, Any], best: dict[str, Any]) -> Path:
        """Write the current state as ``OUT/best`` (a checkpoint like the others, with ``best``:
        metric, value and step in its ``meta.json``), replacing the previous best in one atomic
        exchange (:func:`arcfw.core.io.replace_dir`).  Evaluate it with ``arcfw eval --checkpoint
        OUT/best`` or start a run from it with ``--init-from OUT/best``."""
        final = self.dir.parent / BEST
        self._save_as(final, final.with_name(f".{BEST}-tmp-{os.getpid()}"), position, loop,
                      lambda tmp: fileio.replace_dir(tmp, final), lambda: None, extra={"best": best})
        return final

    def _save_as(self, final: Path, tmp: Path, position: Position, loop: dict[str, Any],
                 publish: Callable[[Path], None], undo: Callable[[], None], extra: dict[str, Any] | None = None) -> None:
        """Write the checkpoint of the current step into ``tmp`` (rank 0's name, on every rank) and
        ``publish(tmp)`` it (rank 0); on a failure remove ``tmp``, ``undo()`` and raise on every rank."""
        eng = self.engine
        main, shard = eng.dist.is_main, eng.dist.strategy == "fsdp"
        # every rank saves at the same steps (gathering generator states is a collective); the replicas
        # are identical, so rank 0 alone writes - under fsdp each rank writes its shards, rank 0 the rest
        engine_state = eng.state_dict(modules=False, optimizer=not shard)
        if shard:
            engine_state["optimizer"] = sharded.optimizer_rest(eng.optimizer)
        tmp = Path(all_gather_object(str(tmp))[0])  # rank 0's
        self._writing = None
        failure: CheckpointError | None = None
        try:
            if main:
                tmp.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            if shard:
                barrier()  # the folder exists
                self._writing = f"{sharded.SHARDED}/"
                sharded.save(eng, tmp / sharded.SHARDED)  # a failure on any rank raises on every rank
            if main:
                self._write(tmp, self._state(engine_state, position, loop), eng.global_step, position, shard, extra)
                publish(tmp)
        except BaseException as exc:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
                undo()
            if isinstance(exc, CheckpointError):
                failure = exc
            elif isinstance(exc, OSError) or fileio.is_disk_full(exc):  # safetensors and torch.save raise their own types
                failure = self._write_failed(final, exc)
            else:
                raise  # a second Ctrl-C, a bug: at once
        # every rank learns whether rank 0's write succeeded: a failure stops every rank, with rank 0's line
        outcome = all_gather_object(None if failure is None else str(failure))[0]
        if failure is not None:
            raise failure from None
        if outcome is not None:
            raise CheckpointError(outcome)

    def _state(self, engine_state: dict[str, Any], position: Position, loop: dict[str, Any]) -> dict[str, Any]:
        """What ``state.pt`` holds (rank 0's)."""
        plugins = engine_state.pop("plugins")
        check_plain(plugins, "plugin state")  # names the plugin: plugin state['name']...
        return {
            "engine": engine_state,
            "rng": _rng_state(),
            "plugins": plugins,
            "position": {"epoch": position.epoch, "batch": position.batch, "order": self.loader.order(position.epoch),
                         "batches": len(self.loader), "world_size": self.loader.world_size},
            "loop": loop,
        }

    def _write_failed(self, final: Path, exc: BaseException) -> CheckpointError:
        """One line for a save that failed (a full disk): the checkpoint and the file it was writing,
        why, and the checkpoint a resumed run would start from (untouched: `latest` still names it)."""
        previous = self.latest_name()
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        where = f" ({self._writing})" if self._writing else ""
        return CheckpointError(f"cannot write checkpoint {final}{where}: {fileio.describe_write_failure(exc)}; {kept}")

    def _write(self, tmp: Path, state: dict[str, Any], step: int, position: Position, shard: bool = False,
               extra: dict[str, Any] | None = None) -> None:
        """Rank 0's files; ``shard``: the modules (and the optimizer's tensors) are in ``sharded/`` already."""
        eng = self.engine
        modules: dict[str, str] = {}
        if not shard:
            (tmp / MODULES).mkdir(parents=True)
        for i, (name, module) in enumerate(_modules(eng) if not shard else []):
            modules[name] = self._writing = _module_file(i, name)
            save_model(module, str(tmp / modules[name]))
            fileio.fsync_path(tmp / modules[name])
        loose = loose_params(eng.groups) if not shard else {}
        if loose:
            self._writing = f"{MODULES}/{LOOSE}"
            save_file({k: p.detach().contiguous() for k, p in loose.items()}, str(tmp / MODULES / LOOSE))
            fileio.fsync_path(tmp / MODULES / LOOSE)
        self._writing = STATE
        with fileio.create(tmp / STATE) as f:
            torch.save(state, f)
        fileio.fsync_path(tmp / STATE)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        meta = {
            "format": FORMAT,
            "format_version": SHARDED_VERSION if shard else FORMAT_VERSION,
            "arcfw": __version__,
            "torch": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "step": step,
            "epoch": position.epoch,
            "batch": position.batch,
            "device": eng.device.type,
            "config_source": eng.config.source,
            "config": _jsonable(eng.config.data),
            "plugins": dict(eng.roles),
            "data": {"fingerprint": self.fingerprint, "examples": len(self.loader.examples)},
            "modules": modules,
            "files": {rel: _sha256(tmp / rel) for rel in files},
            **(extra or {}),
        }
        if shard:
            meta["sharded"] = {"folder": sharded.SHARDED, "modules": [n for n, _ in _modules(eng)], "world_size": eng.dist.world_size}
        self._writing = META
        fileio.write_bytes(tmp / META, json.dumps(meta, indent=1).encode("utf-8"))
        fileio.fsync_path(tmp / META)
        self._writing = None
        fileio.fsync_path(tmp / (sharded.SHARDED if shard else MODULES))
        fileio.fsync_path(tmp)

    # ------------------------------------------------------------------ restore

    def restore(self, ckpt: Checkpoint) -> Restored:
        """Load a checkpoint (see :func:`read`) into the engine and its plugins.

        The global RNG states come back in :attr:`Restored.rng`: apply them with
        :func:`set_rng_state` right before training continues.
        """
        if ckpt.meta["data"].get("fingerprint") != self.fingerprint:
            raise CheckpointError(
                f"{ckpt.path}: cannot resume: the training data differs from the checkpoint's "
                f"({ckpt.meta['data'].get('examples')} examples then, {len(self.loader.examples)} now, or their grids changed)"
            )
        state = ckpt.load_state()
        with _fitting(ckpt):
            return self._restore(ckpt, state)

    def _restore(self, ckpt: Checkpoint, state: dict[str, Any]) -> Restored:
        eng = self.engine
        _load_modules(eng, ckpt)
        saved = {**state["engine"], "plugins": state["plugins"]}
        missing = [key for key in RESUME_KEYS if key not in saved]  # load_state_dict leaves absent keys alone
        if missing:
            raise KeyError(missing[0])  # -> "does not fit the model the config builds (KeyError: ...)"
        if ckpt.sharded:  # the optimizer's tensors are in the shards: read into this run's placement
            saved["optimizer"] = sharded.load_optimizer_tensors(eng, ckpt.path / sharded.SHARDED, saved["optimizer"])
        notes = eng.load_state_dict(saved, source=str(ckpt.path))
        position = self._position(ckpt, state["position"], notes)
        self._last = eng.global_step
        return Restored(position=position, loop=state["loop"], rng=state["rng"], notes=notes)

    def _position(self, ckpt: Checkpoint, pos: dict[str, Any], notes: list[str]) -> Position:
        """The position to continue from; a checkpoint of another number of processes is converted.

        With ``W`` processes batch ``b`` of an epoch starts after ``b * batch_size * W``
        examples of the epoch's order (the same order for any ``W``).  Resumed on
        ``W'`` processes the run continues at the batch boundary at or before that
        point; examples between the two are trained again (a note says how many).
        """
        epoch, batch = int(pos["epoch"]), int(pos["batch"])
        saved_world, world = int(pos.get("world_size", 1)), self.loader.world_size
        if saved_world == world and pos["batches"] != len(self.loader):
            raise CheckpointError(
                f"{ckpt.path}: cannot resume: an epoch had {pos['batches']} batches, now {len(self.loader)}"
            )
        if pos["order"] != self.loader.order(epoch):
            raise CheckpointError(
                f"{ckpt.path}: cannot resume: the example order of epoch {epoch} differs from the checkpoint's "
                "(the data or the seed changed)"
            )
        if saved_world != world:
            done = batch * self.loader.batch_size * saved_world
            batch, again = divmod(done, self.loader.batch_size * world)
            if again:
                notes.append(f"checkpoint made by {saved_world} process(es), resumed by {world}: the {again} example(s) "
                             f"before it in epoch {epoch} are trained again, to start on a whole step")
        return Position(epoch, batch)


# --------------------------------------------------------------------------- weights (restore and arcfw eval)


@contextlib.contextmanager
def _fitting(ckpt: Checkpoint) -> Iterator[None]:
    """Turn a state that does not fit the engine (a forged file, another model) into one clear error."""
    try:
        yield
    except ArcfwError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{ckpt.path}: does not fit the model the config builds ({type(exc).__name__}: {_short(_one_line(exc))})"
        ) from None


def _load_modules(engine: Engine, ckpt: Checkpoint) -> None:
    """The parameter groups' modules from the checkpoint's safetensors files (or its shards)."""
    names = [n for n, _ in _modules(engine)]
    if sorted(names) != ckpt.module_names:
        raise CheckpointError(f"{ckpt.path}: holds modules {ckpt.module_names}, the config builds {sorted(names)}")
    if ckpt.sharded:
        try:
            sharded.load_modules(engine, ckpt.path / sharded.SHARDED)
        except CheckpointError as exc:
            raise CheckpointError(f"{ckpt.path}: {exc}") from None
        return
    for name, module in _modules(engine):
        file = str(ckpt.path / ckpt.meta["modules"][name])
        try:
            if any(is_dtensor(v) for v in module.state_dict().values()):  # FSDP2: every rank shards the full tensors
                load_module(module, load_file(file, device="cpu"))
            else:
                load_model(module, file, strict=True, device=str(engine.device))
        except RuntimeError as exc:
            raise CheckpointError(f"{ckpt.path}: module '{name}' does not fit the model the config builds: {_short(_one_line(exc))}") from None
    loose = loose_params(engine.groups)
    if loose:
        saved = load_file(str(ckpt.path / MODULES / LOOSE), device=str(engine.device))
        with torch.no_grad():
            for key, p in loose.items():
                p.copy_(saved[key])


def load_weights(engine: Engine, path: str | os.PathLike[str]) -> Checkpoint:
    """Load a checkpoint's trained model into a freshly built engine (``arcfw eval``).

    ``path`` is a run folder (its latest checkpoint) or a checkpoint folder.
    Loaded: every parameter group's modules and every plugin's state (the RL
    policy, the size head...); not the optimizer, RNG states or data position.
    The file checks of :func:`read` apply.
    """
    ckpt = read(locate(path))
    state = ckpt.load_state()
    with _fitting(ckpt):
        _load_modules(engine, ckpt)
        engine.load_state_dict({"plugins": state["plugins"]}, source=str(ckpt.path))
    return ckpt


def _saved_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def init_weights(engine: Engine, path: str | os.PathLike[str]) -> Checkpoint:
    """Start a new run from a checkpoint's weights (``arcfw run --init-from``).

    Loaded: the modules of every parameter group (and group parameters outside
    them), nothing else - the optimizer, the plugins' own state (RL policy, size
    head, prompt cache), RNG states and step counters start fresh.  A model that
    differs from the checkpoint's (modules, parameter names or shapes) is refused
    with every difference named, before anything is loaded.
    """
    ckpt = read(locate(path))
    saved_modules = ckpt.module_names
    problems: list[str] = []
    current = dict(_modules(engine))
    for name in sorted(set(saved_modules) - set(current)):
        problems.append(f"module '{name}' is in the checkpoint, not in the model the config builds")
    for name in sorted(set(current) - set(saved_modules)):
        problems.append(f"module '{name}' of the model is not in the checkpoint")
    for name, module in current.items():
        if name not in saved_modules:
            continue
        try:
            saved = (sharded.module_shapes(ckpt.path / sharded.SHARDED, name) if ckpt.sharded
                     else _saved_shapes(ckpt.path / ckpt.meta["modules"][name]))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{ckpt.path}: module '{name}' cannot be read: {_short(_one_line(exc))}") from None
        now = {k: tuple((v.full_tensor() if is_dtensor(v) else v).shape) for k, v in module.state_dict().items()}
        for key in sorted(set(saved) | set(now)):
            if key not in now:
                problems.append(f"{name}.{key} (checkpoint: {list(saved[key])}, now: absent)")
            elif key not in saved:
                problems.append(f"{name}.{key} (checkpoint: absent, now: {list(now[key])})")
            elif saved[key] != now[key]:
                problems.append(f"{name}.{key} (checkpoint: {list(saved[key])}, now: {list(now[key])})")
    loose = loose_params(engine.groups)
    if loose:
        file = ckpt.path / MODULES / LOOSE
        if ckpt.sharded:
            saved = {k[len(sharded.LOOSE):]: shape for k, (shape, _) in sharded.index(ckpt.path / sharded.SHARDED).items()
                     if k.startswith(sharded.LOOSE)}
        else:
            saved = _saved_shapes(file) if file.is_file() else {}
        for key, p in loose.items():
            if tuple(p.shape) != saved.get(key):
                problems.append(f"{key} (checkpoint: {list(saved[key]) if key in saved else 'absent'}, now: {list(p.shape)})")
    if problems:
        shown = "; ".join(problems[:12]) + (f"; and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise CheckpointError(f"{ckpt.path}: cannot initialise from it: the model the config builds differs from the checkpoint's: {shown}")
    with _fitting(ckpt):
        _load_modules(engine, ckpt)
    return ckpt
