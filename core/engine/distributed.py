"""Data-parallel training on PyTorch's own distributed stack (``torch.distributed``).

Start one process per GPU with ``torchrun``; it sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.  :func:`setup` reads them,
joins the process group and returns a :class:`Dist` that describes this
process.  With one process nothing is initialised and every helper here is a
no-op, so a single-process run takes exactly the path it took before.

Everything distributed lives in this module:

- the backend: ``nccl`` on CUDA, ``gloo`` on CPU (``distributed.backend``);
- wrapping the trainable modules (:meth:`Dist.wrap`): DistributedDataParallel
  (``strategy: ddp``, the default above one process) or FSDP2 ``fully_shard``
  (``strategy: fsdp``);
- averaging the gradients no wrapper owns (:func:`average_gradients`: the RL
  policy's own optimizer, groups that do not name their module attribute);
- averaging the loss and the logged metrics over ranks, and agreeing on a
  stop request (:meth:`Dist.exchange`), so that every rank takes the same
  decisions (skip a non-finite step, halt, stop) at the same step.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from arcfw.core.errors import ConfigError, DistributedError, PluginError, first_line

if TYPE_CHECKING:  # pragma: no cover
    from arcfw.core.config import RunConfig
    from arcfw.core.engine.context import ParamGroup

#: ``device`` choices
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "gloo", "nccl")
STRATEGIES = ("auto", "ddp", "fsdp")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without CUDA is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", [("", "cuda requested but torch.cuda.is_available() is False (use auto or cpu)")])
    return torch.device(name)


def resolve_threads(threads: int | None, device: torch.device) -> int:
    """The CPU threads of this process (``torch.set_num_threads``) for config ``threads``.

    ``null`` (auto): **1** on CPU, where the small models arcfw trains on a CPU gain little from a
    second thread on a quiet machine and lose several times over when another process wants the
    cores (benchmarks/README.md, "Threads"); the count ``OMP_NUM_THREADS`` gives when it is set; and
    torch's own default (one per core) on CUDA, where the CPU only feeds the GPU.  A number is used
    as given.
    """
    if threads is not None:
        return threads
    if "OMP_NUM_THREADS" in os.environ or device.type != "cpu":
        return torch.get_num_threads()
    return 1


# --------------------------------------------------------------------------- helpers plugins may call


_INDEPENDENT = False


def enabled() -> bool:
    """True when this process is one of several in an initialised process group (and not
    inside :func:`independent`)."""
    return not _INDEPENDENT and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def independent() -> Iterator[None]:
    """Inside, this process acts alone although a process group exists: every helper here is a
    no-op, as with one process.  For work in which the ranks do *different* things, such as
    test-time training (``arcfw eval --ttt``: each rank trains its own tasks); plugins that reach
    other ranks only through these helpers stay correct there.
    """
    global _INDEPENDENT
    before, _INDEPENDENT = _INDEPENDENT, True
    try:
        yield
    finally:
        _INDEPENDENT = before


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over all ranks, in place, and return it (unchanged with one process)."""
    if enabled():
        dist.all_reduce(tensor)
        tensor.div_(dist.get_world_size())
    return tensor


def broadcast_(tensors: Iterable[torch.Tensor]) -> None:
    """Copy rank 0's values of ``tensors`` (e.g. parameters) to every rank, in place."""
    if not enabled():
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data if isinstance(t, torch.nn.Parameter) else t, src=0)


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Average ``p.grad`` over ranks in one collective, as DDP does.

    Call it between ``backward()`` and ``optimizer.step()`` for parameters no
    wrapper owns, so that every replica takes the same step.  A rank without a
    gradient for a parameter contributes zeros; a parameter without a gradient
    on every rank keeps ``grad = None`` (so the optimizer skips it, as it would
    alone).
    """
    if not enabled():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    flat = torch.cat([*(g.reshape(-1).float() for g in grads), present])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    counts = flat[-len(params):].tolist()
    offset = 0
    for p, count in zip(params, counts):
        n = p.numel()
        if count > 0:
            avg = flat[offset : offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = avg.clone()
            else:
                p.grad.copy_(avg)
        offset += n


def barrier() -> None:
    """Wait until every rank gets here (nothing with one process)."""
    if enabled():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` with one process)."""
    if not enabled():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (FSDP2 gradients and their norms); other tensors unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or ``module`` itself)."""
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def rank_seed(seed: int, rank: int) -> int:
    """Seed of a rank's own random stream (the RL policy's exploration noise, ``ctx.generator``).

    Rank 0 keeps the run's seed, so a one-process run is unchanged; every other
    rank gets a seed derived from ``(seed, rank)``, so ranks explore with
    independent noise instead of repeating each other's.
    """
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed % 2**63, rank]).generate_state(1, np.uint64)[0] % 2**63)


# --------------------------------------------------------------------------- this process


@dataclass
class Dist:
    """This process's place in the run. ``Dist(device)`` is the one-process default."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    #: resolved strategy: ``none`` (one process), ``ddp`` or ``fsdp``
    strategy: str = "none"
    find_unused_parameters: bool = False
    owns_group: bool = False
    #: trainable groups that no wrapper owns; the engine averages their gradients after backward
    manual_groups: list[ParamGroup] = field(default_factory=list)
    #: the DistributedDataParallel wrappers made by :meth:`wrap` (gradient accumulation: :meth:`no_sync`)
    ddp_modules: list[torch.nn.Module] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that prints and writes run files."""
        return self.rank == 0

    # ------------------------------------------------------------------ wrapping

    def wrap(self, groups: list[ParamGroup], plugins: dict[str, Any]) -> None:
        """Make every trainable parameter group data-parallel; called before the optimizer exists.

        - ``fsdp``: each module of every group (frozen ones too) is sharded in place with FSDP2
          ``fully_shard`` (first every sub-module whose class the model lists in
          ``_no_split_modules``, e.g. transformers' decoder layers, then the
          module itself); the group's parameters become the sharded ones.
        - ``ddp`` and ``ParamGroup.module_attr`` set: the plugin's attribute is
          replaced by a :class:`~torch.nn.parallel.DistributedDataParallel`
          wrapper of the module, so the plugin's own ``self.<attr>(...)`` calls
          go through DDP (gradients all-reduced during backward).
        - a frozen group (``lr == 0``) is broadcast from rank 0;
        - otherwise the parameters are broadcast from rank 0 and the engine
          averages their gradients after backward (:func:`average_gradients`).
        """
        self.manual_groups = []
        if not self.enabled:
            return
        for g in groups:
            if self.strategy == "fsdp" and g.modules:
                _shard(g)  # frozen groups too: their memory is split like the rest
            elif g.lr == 0 or not g.trainable():
                broadcast_(g.params)  # frozen: the same values everywhere, no gradient to average
            elif self.strategy == "ddp" and g.module_attr:
                self._ddp(g, plugins[g.plugin])
            else:
                broadcast_(g.trainable())
                self.manual_groups.append(g)

    def _ddp(self, g: ParamGroup, owner: Any) -> None:
        attr = g.module_attr or ""
        module = getattr(owner, attr, None)
        if len(g.modules) != 1 or module is not g.modules[0]:
            raise PluginError(
                f"parameter group '{g.name}' of plugin '{g.plugin}': module_attr '{g.module_attr}' must name the "
                "plugin attribute that holds the group's one module (ParamGroup.modules[0])"
            )
        ddp = torch.nn.parallel.DistributedDataParallel
        # no hidden collective in forward (a rank-0-only evaluation must not hang); torch >= 2.13 names it
        # forward_sync_buffers (buffers are still synced once at init), older torch broadcast_buffers
        buffers = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters else "broadcast_buffers"
        options: dict[str, Any] = {buffers: False}
        wrapped = ddp(
            module,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.find_unused_parameters,
            **options,
        )
        setattr(owner, attr, wrapped)
        self.ddp_modules.append(wrapped)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Forward and backward of a micro-batch before the last of a step (gradient accumulation):
        the DDP wrappers keep their gradients local instead of all-reducing them; the last
        micro-batch's backward reduces the sum (``DistributedDataParallel.no_sync``).  FSDP2
        groups reduce at every backward and the engine averages the other groups once, after
        the last one (:meth:`sync_gradients`): the result is the same, the traffic larger."""
        with contextlib.ExitStack() as stack:
            for m in self.ddp_modules:
                stack.enter_context(m.no_sync())  # type: ignore[operator]
            yield

    def sync_gradients(self) -> None:
        """Average the gradients of the groups no wrapper owns (after backward, before clipping)."""
        if self.manual_groups:
            average_gradients(p for g in self.manual_groups for p in g.trainable())

    # ------------------------------------------------------------------ agreeing across ranks

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` averaged over ranks, as a new tensor (``t`` is left alone)."""
        return all_reduce_mean_(t.detach().clone()) if self.enabled else t

    def exchange(self, metrics: dict[str, float], stop: int | None) -> tuple[dict[str, float], int | None]:
        """Average a step's metrics over ranks and agree on stopping, in one collective.

        ``stop`` is this rank's stop request (the number of a signal it
        received) or None.  Returns the metrics, each averaged over the ranks
        that reported it, and the stop request of the lowest rank that made
        one, so that every rank stops after the same step.
        """
        if not self.enabled:
            return metrics, stop
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, (metrics, stop))
        out: dict[str, float] = {}
        for key in dict.fromkeys(k for m, _ in gathered for k in m):
            values = [m[key] for m, _ in gathered if key in m]
            out[key] = sum(values) / len(values)
        return out, next((s for _, s in gathered if s is not None), None)

    def close(self) -> None:
        """Leave the process group if :func:`setup` joined it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def _shard(g: ParamGroup) -> None:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # pragma: no cover - torch < 2.6
        raise ConfigError("distributed.strategy", [("", "fsdp needs torch >= 2.6 (FSDP2 fully_shard)")]) from None
    for module in g.modules:
        names = {id(p): n for n, p in module.named_parameters()}
        split = set(getattr(module, "_no_split_modules", None) or ())
        for sub in list(module.modules()):
            if sub is not module and type(sub).__name__ in split:
                fully_shard(sub)
        fully_shard(module)
        now = dict(module.named_parameters())  # fully_shard replaced them by sharded DTensor parameters
        g.params = [now[names[id(p)]] if id(p) in names else p for p in g.params]


# --------------------------------------------------------------------------- joining


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_backend(choice: str, device: torch.device, source: str) -> str:
    """``auto`` -> ``nccl`` on CUDA, ``gloo`` on CPU; ``nccl`` without CUDA is a config error."""
    if choice == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if choice == "nccl" and device.type != "cuda":
        raise ConfigError(source, [("distributed.backend", f"nccl needs CUDA but the device is {device.type} (use gloo or auto)")])
    return choice


def setup(config: RunConfig, device: torch.device) -> Dist:
    """Join the process group that ``torchrun`` describes in the environment (or one already joined).

    With ``WORLD_SIZE`` unset or 1 and no process group, returns the
    one-process :class:`Dist` on ``device``.  On CUDA each process takes the
    GPU ``LOCAL_RANK``.
    """
    opts = config["distributed"]
    joined = dist.is_available() and dist.is_initialized()
    if joined:
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        world, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world <= 1:
        return Dist(device=device)
    if config["precision"] == "fp16-mixed" and opts["strategy"] == "fsdp":
        raise ConfigError(
            config.source,
            [("distributed.strategy", "fsdp with precision fp16-mixed is not supported (sharded gradients need a "
              "sharded GradScaler); use precision: bf16-mixed or strategy: ddp")],
        )
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible: "
                "start at most one process per GPU (torchrun --nproc-per-node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = resolve_backend(opts["backend"], device, config.source)
    if joined:
        backend = dist.get_backend()
    else:
        try:
            dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(
                f"rank {rank} of {world} could not join the process group (backend {backend}): {first_line(exc)}. "
                "Start arcfw with torchrun, which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
            ) from None
    return Dist(
        device=device,
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        backend=backend,
        strategy="ddp" if opts["strategy"] == "auto" else opts["strategy"],
        find_unused_parameters=bool(opts["find_unused_parameters"]),
        owns_group=not joined,
    )
