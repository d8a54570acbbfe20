"""The engine's state as plain data: what :meth:`Engine.state_dict` returns and
:meth:`Engine.load_state_dict` takes back.

The state is a dict of tensors and plain Python values (so a checkpoint can be
read with ``torch.load(weights_only=True)``), every tensor a *copy*: an
in-memory snapshot taken before some training can be restored after it, in
the same process (``snapshot = engine.state_dict(); ...; engine.load_state_dict(snapshot)``).

Keys::

    global_step      int                optimizer steps attempted
    epoch            int                ctx.epoch
    schedule         dict[str, float]   ctx.schedule (the curriculum's last values)
    optimizer        dict               the main optimizer's state_dict, FSDP2 moments gathered
    precision        dict               GradScaler state and its skip counter
    grad_watch       dict               zero-gradient streaks per group
    guard            dict               non-finite skip counters
    health           dict               red-flag memory (recent losses, streaks, flags raised)
    generator        dict               {"states": [every rank's ctx.generator state], "device": "cpu"|"cuda"}
    plugins          dict[str, Any]     every plugin's ``state_dict`` hook result, by plugin name
    modules          dict[str, dict]    (``modules=True`` only) every parameter group module's
                                        state_dict, FSDP2 shards gathered, by module name
    loose            dict[str, Tensor]  (``modules=True`` only) group parameters outside any module

The global RNGs (python, NumPy, torch) are the process's, not the engine's:
:mod:`arcfw.core.training.checkpoint` saves them beside this state.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from arcfw.core.errors import CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    from arcfw.core.engine.context import ParamGroup


#: What a resumed run needs besides the modules (a checkpoint without one of them is refused).
RESUME_KEYS = ("optimizer", "global_step", "precision", "grad_watch", "guard", "health", "generator", "plugins")


def is_dtensor(t: object) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "device_mesh")


def copy_tree(obj: Any, gather: bool = True) -> Any:
    """A copy of nested dicts/lists/tuples whose tensors are detached clones (shards gathered, unless
    ``gather`` is False: then a DTensor stays this rank's shard)."""
    if isinstance(obj, torch.Tensor):
        t = obj.full_tensor() if gather and is_dtensor(obj) else obj  # type: ignore[attr-defined]
        return t.detach().clone()
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, copy_tree(v, gather)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: copy_tree(v, gather) for k, v in obj.items()}
    if isinstance(obj, list):
        return [copy_tree(v, gather) for v in obj]
    if isinstance(obj, tuple):
        return tuple(copy_tree(v, gather) for v in obj)
    return obj


def named_modules(groups: list[ParamGroup]) -> list[tuple[str, nn.Module]]:
    """Every distinct module of every parameter group, named after its group (``group.i`` for several)."""
    seen: set[int] = set()
    out = []
    for g in groups:
        for i, module in enumerate(g.modules):
            if id(module) not in seen:
                seen.add(id(module))
                out.append((g.name if len(g.modules) == 1 else f"{g.name}.{i}", module))
    return out


def loose_params(groups: list[ParamGroup]) -> dict[str, nn.Parameter]:
    """Group parameters that belong to none of the groups' modules (saved on their own)."""
    covered = {id(p) for _, m in named_modules(groups) for p in m.parameters()}
    return {f"{g.name}.{i}": p for g in groups for i, p in enumerate(g.params) if id(p) not in covered}


def full_module_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict with every FSDP2 shard gathered into a full CPU tensor.

    A collective under strategy fsdp: every rank calls it, in the same order.
    """
    return {k: (v.full_tensor() if is_dtensor(v) else v).detach().cpu().contiguous() for k, v in module.state_dict().items()}


def optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """A copy of ``opt.state_dict()`` with FSDP2-sharded moments gathered (a collective under fsdp)."""
    sd = opt.state_dict()
    return {"state": copy_tree(sd["state"]), "param_groups": copy_tree(sd["param_groups"])}


def shard_like(value: Any, like: Any) -> Any:
    """``value`` (a full tensor) as a DTensor placed like ``like`` (an FSDP2 parameter or state
    tensor); anything else (a DTensor already: a sharded checkpoint's) unchanged."""
    if not is_dtensor(like) or not isinstance(value, torch.Tensor) or is_dtensor(value) or tuple(value.shape) != tuple(like.shape):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements)


def load_module(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a full state dict into ``module`` (sharding it where the module is FSDP2-sharded)."""
    current = module.state_dict()
    if any(is_dtensor(v) for v in current.values()):
        state = {k: shard_like(v, current.get(k)) for k, v in state.items()}
    module.load_state_dict(state, strict=True)


def load_optimizer(opt: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Restore the optimizer's per-parameter state, matching parameter groups by name.

    The hyperparameters (lr, weight decay, betas...) stay those of the current
    config, so learning rates may change on resume; a group frozen now drops
    its state, a group trainable only now starts fresh.
    """
    by_name = {g.get("name", str(i)): g for i, g in enumerate(saved["param_groups"])}
    state, groups, index = {}, [], 0
    for g in opt.param_groups:
        ids = list(range(index, index + len(g["params"])))
        index += len(ids)
        old = by_name.get(g.get("name"))
        if old is not None:
            if len(old["params"]) != len(ids):
                raise CheckpointError(
                    f"parameter group '{g.get('name')}' has {len(ids)} trainable tensors, the saved state's has "
                    f"{len(old['params'])}: the model differs from the one saved"
                )
            state.update({new: saved["state"][o] for new, o in zip(ids, old["params"]) if o in saved["state"]})
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
    params = [p for g in opt.param_groups for p in g["params"]]
    # load_state_dict keeps references to the tensors it is given (on the same device): copy, so that a
    # snapshot restored once can be restored again; then shard the moments like their parameters (FSDP2)
    # (a sharded checkpoint's moments arrive as DTensor shards already: kept as they are, never gathered)
    state = {i: {k: shard_like(v, params[i]) for k, v in copy_tree(s, gather=False).items()} for i, s in state.items()}
    opt.load_state_dict({"state": state, "param_groups": groups})


_PLAIN = (str, int, float, bool, type(None), torch.Size, torch.dtype, torch.device)


def check_plain(obj: Any, where: str) -> None:
    """Refuse what ``torch.load(weights_only=True)`` could not read back (checked at save time,
    where the culprit can still be named, not at resume time)."""
    kind = type(obj)
    if isinstance(obj, torch.Tensor):
        if kind not in (torch.Tensor, nn.Parameter):
            raise CheckpointError(f"{where}: a {kind.__name__} cannot go into a checkpoint; store a plain torch.Tensor")
    elif kind in (dict, OrderedDict):
        for k, v in obj.items():
            check_plain(k, f"{where} (a key)")
            check_plain(v, f"{where}[{k!r}]")
    elif kind in (list, tuple, set):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
    elif kind not in _PLAIN:
        raise CheckpointError(
            f"{where}: a {kind.__module__}.{kind.__name__} cannot go into a checkpoint (state_dict hooks return only "
            "tensors and plain Python values: dict, list, tuple, str, int, float, bool, None)"
        )
