"""Sharded checkpoints under strategy fsdp, with ``torch.distributed.checkpoint`` (DCP).

Under FSDP2 every rank holds a shard of each parameter and of its optimizer moments.  A
checkpoint of such a run is written by every rank at once: each writes its own shards
(``sharded/__RANK_0.distcp``) and rank 0 the index of where each piece lies
(``sharded/.metadata``), so no rank ever holds a full copy of the model or of the optimizer
state.  The rest of the checkpoint (``state.pt``, ``meta.json``) is written by rank 0 as in any
other checkpoint.

Reading reshards: each tensor is loaded into a target shaped like the model being resumed, a
DTensor sharded over however many ranks run now (FSDP2 on another number of processes) or a plain
tensor (one process, DDP, ``arcfw eval``), and DCP reads just the pieces each rank needs.

What is in ``sharded/`` (tensors only; every other value stays in ``state.pt``)::

    modules/<module name>/<state_dict key>        every parameter group's module (its state_dict)
    loose/<group>.<i>                             group parameters outside any module
    optimizer/<group name>/<j>/<state key>        the main optimizer's tensors (moments, step) of the
                                                  j-th parameter of that group

DCP reads its index with ``pickle``; arcfw reads it with an unpickler that admits only the index's
own classes (:class:`_SafeReader`), so a forged index cannot run code, like ``state.pt`` which is
read with ``torch.load(weights_only=True)``.  The tensors themselves DCP reads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import gc
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from arcfw.core.engine.distributed import enabled
from arcfw.core.engine.state import loose_params, named_modules
from arcfw.core.errors import CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed.checkpoint.metadata import Metadata

    from arcfw.core.engine.engine import Engine

#: the folder of a checkpoint that holds the shards
SHARDED = "sharded"
MODULES, LOOSE, OPTIMIZER = "modules/", "loose/", "optimizer/"


@contextlib.contextmanager
def _one_process_is_meant() -> Iterator[None]:
    """DCP warns that it "assumes" one process when no process group is joined: that is what arcfw means."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch.distributed is (disabled, )?unavailable or uninitialized")
        yield


# --------------------------------------------------------------------------- what is saved


def _optimizer_keys(opt: torch.optim.Optimizer) -> list[tuple[int, str]]:
    """``(index in opt.state_dict()['state'], 'optimizer/<group>/<j>/')`` for every parameter of the optimizer."""
    out, index = [], 0
    for gi, g in enumerate(opt.param_groups):
        name = g.get("name", str(gi))
        for j in range(len(g["params"])):
            out.append((index, f"{OPTIMIZER}{name}/{j}/"))
            index += 1
    return out


def tensors(engine: Engine) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, by key, as the live engine holds them (DTensor shards, no copy)."""
    out: dict[str, torch.Tensor] = {}
    for name, module in named_modules(engine.groups):
        out.update({f"{MODULES}{name}/{k}": v for k, v in module.state_dict().items()})
    out.update({f"{LOOSE}{k}": p.detach() for k, p in loose_params(engine.groups).items()})
    state = engine.optimizer.state_dict()["state"]
    for index, prefix in _optimizer_keys(engine.optimizer):
        out.update({prefix + k: v for k, v in state.get(index, {}).items() if isinstance(v, torch.Tensor)})
    return out


def optimizer_rest(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The main optimizer's state without its tensors (they go to the shards): the param_groups
    (hyperparameters, names, indices) and any per-parameter value that is not a tensor."""
    sd = opt.state_dict()
    plain = {i: {k: v for k, v in s.items() if not isinstance(v, torch.Tensor)} for i, s in sd["state"].items()}
    groups = [{k: (list(v) if k == "params" else v) for k, v in g.items()} for g in sd["param_groups"]]
    return {"state": {i: s for i, s in plain.items() if s}, "param_groups": groups}


def save(engine: Engine, folder: Path) -> None:
    """Write the engine's tensors into ``folder``: a collective, every rank writes its own shards.

    A write that fails on any rank (a full disk) raises on every rank: DCP gathers the failures;
    the first rank's own exception is raised (an OSError for a full disk)."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    writer = FileSystemWriter(str(folder), sync_files=True, overwrite=True)
    failure: BaseException | None = None
    try:
        with _one_process_is_meant():
            dcp_save(tensors(engine), storage_writer=writer, no_dist=not enabled())
    except CheckpointException as exc:
        failure = _plain(exc)
    if failure is not None:
        # the failed write's frames hold the model's DTensors (and so the process group): free them now,
        # not while the interpreter shuts down (which can abort the process after the error is reported)
        gc.collect()
        raise failure


def _plain(exc: BaseException) -> BaseException:
    """The first rank's failure inside DCP's CheckpointException, as a new exception without its
    traceback (an OSError keeps its errno: a full disk stays one)."""
    failures = sorted(getattr(exc, "failures", {}).items())
    first = failures[0][1] if failures else None
    cause = first[0] if isinstance(first, tuple) and first and isinstance(first[0], BaseException) else None
    if isinstance(cause, OSError) and cause.errno is not None:
        return OSError(cause.errno, cause.strerror, cause.filename)
    text = " ".join(str(cause if cause is not None else exc).split())[:300]
    return OSError(f"torch.distributed.checkpoint could not write the shards: {text}")


# --------------------------------------------------------------------------- reading


class _Unpickler(pickle.Unpickler):
    """Admits what DCP's index holds (its metadata classes, torch.Size, dtypes, paths) and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            module == "torch.distributed.checkpoint.metadata"
            or (module, name) in {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                                  ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"),
                                  ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a checkpoint index")
        return super().find_class(module, name)


def _reader(folder: Path) -> Any:
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                metadata = _Unpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata  # type: ignore[no-any-return]

    return _SafeReader(str(folder))


def index(folder: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor in the shards: key -> (full shape, dtype).  Read safely (no code runs)."""
    try:
        md = _reader(folder).read_metadata()
    except (pickle.UnpicklingError, EOFError, OSError, AttributeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder}/.metadata: refused: not a checkpoint index of tensors only ({exc}); nothing in it was run") from None
    out = {}
    for key, meta in md.state_dict_metadata.items():
        if not hasattr(meta, "size"):
            raise CheckpointError(f"{folder}/.metadata: refused: '{key}' is not a tensor")
        out[key] = (tuple(meta.size), meta.properties.dtype)
    return out


def _load(folder: Path, targets: dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    if targets:
        with _one_process_is_meant():
            dcp_load(targets, storage_reader=_reader(folder), no_dist=not enabled())


def module_shapes(folder: Path, name: str) -> dict[str, tuple[int, ...]]:
    """The saved shapes of module ``name``'s state_dict (``--init-from`` compares them with the model)."""
    prefix = f"{MODULES}{name}/"
    return {k[len(prefix):]: shape for k, (shape, _) in index(folder).items() if k.startswith(prefix)}


def saved_modules(folder: Path) -> list[str]:
    return sorted({k[len(MODULES):].split("/", 1)[0] for k in index(folder) if k.startswith(MODULES)})


def load_modules(engine: Engine, folder: Path) -> None:
    """Every parameter group's module (and the loose parameters) from the shards, resharded to this
    run: into the FSDP2 shards of this rank, or into full tensors."""
    saved = index(folder)
    targets: dict[str, torch.Tensor] = {}
    modules = named_modules(engine.groups)
    for name, module in modules:
        sd = module.state_dict()
        keys = {k[len(f"{MODULES}{name}/"):] for k in saved if k.startswith(f"{MODULES}{name}/")}
        if keys != set(sd):
            missing, extra = sorted(set(sd) - keys), sorted(keys - set(sd))
            raise CheckpointError(
                f"module '{name}' does not fit the model the config builds: "
                + "; ".join(x for x in (f"missing in the checkpoint: {missing[:5]}" if missing else "",
                                        f"not in the model: {extra[:5]}" if extra else "") if x)
            )
        for k, v in sd.items():
            shape = saved[f"{MODULES}{name}/{k}"][0]
            if shape != tuple(v.shape):
                raise CheckpointError(f"module '{name}' does not fit the model the config builds: {k} "
                                      f"(checkpoint: {list(shape)}, now: {list(v.shape)})")
            targets[f"{MODULES}{name}/{k}"] = v
    loose = loose_params(engine.groups)
    for k, p in loose.items():
        targets[f"{LOOSE}{k}"] = torch.empty_like(p.detach())
    _load(folder, targets)
    for name, module in modules:
        prefix = f"{MODULES}{name}/"
        module.load_state_dict({k[len(prefix):]: v for k, v in targets.items() if k.startswith(prefix)}, strict=True)
    with torch.no_grad():
        for k, p in loose.items():
            p.copy_(targets[f"{LOOSE}{k}"])


def load_optimizer_tensors(engine: Engine, folder: Path, saved: dict[str, Any]) -> dict[str, Any]:
    """``saved`` (the optimizer part of ``state.pt``: param_groups and plain values) with its tensors
    read from the shards, each placed like the parameter it belongs to in this run (a DTensor shard
    under FSDP2): ready for :func:`arcfw.core.engine.state.load_optimizer`, which matches groups by name."""
    on_disk = index(folder)
    current = {g.get("name", str(i)): g["params"] for i, g in enumerate(engine.optimizer.param_groups)}
    targets: dict[str, torch.Tensor] = {}
    where: dict[str, tuple[int, str]] = {}  # key -> (saved index, state key)
    for gi, g in enumerate(saved["param_groups"]):
        name = g.get("name", str(gi))
        params = current.get(name)
        for j, index_ in enumerate(g["params"]):
            prefix = f"{OPTIMIZER}{name}/{j}/"
            for key, (shape, dtype) in on_disk.items():
                if not key.startswith(prefix) or "/" in key[len(prefix):]:
                    continue
                if params is None or j >= len(params):
                    continue  # a group frozen or gone now: load_optimizer drops its state
                p = params[j]
                like = p.detach()
                if shape == tuple(like.shape):  # a moment: shaped and sharded like its parameter
                    targets[key] = torch.zeros_like(like, dtype=dtype)
                else:  # a step count or another small tensor: whole on every rank
                    targets[key] = torch.zeros(shape, dtype=dtype)
                where[key] = (index_, key[len(prefix):])
    _load(folder, targets)
    state: dict[int, dict[str, Any]] = {int(i): dict(s) for i, s in saved.get("state", {}).items()}
    for key, (index_, k) in where.items():
        state.setdefault(index_, {})[k] = targets[key]
    return {"state": state, "param_groups": saved["param_groups"]}
