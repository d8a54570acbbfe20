"""Cheap per-step guards that name the plugin and hook at fault (``health.check_contracts``).

- :class:`BatchWatch`: the batch belongs to the engine.  The identity and the version counter
  (``Tensor._version``, bumped by every in-place write) of the batch's tensors are recorded when
  the step starts and compared after every hook call of the step: a hook that replaces
  ``batch.targets`` (``batch.targets = batch.targets.float()``) or writes into it is named.
- :class:`ParamWatch`: the step order holds on the parameters.  The trainable parameters of the
  main optimizer's groups may change only in the engine's optimizer step, and receive gradient
  only in the engine's backward.  Version counters are compared after every hook call (snapshot
  after the engine's own step: fused optimizers do not bump them), and a gradient-accumulation
  hook on each parameter notices any backward that reaches it while a plugin's hook runs - which
  also catches a plugin's own fused optimizer, since it needs those gradients first.
  A write through ``p.data`` (``p.data.mul_(0.999)``) bumps no version counter: on sampled steps
  (the first two, then every ``SAMPLE_EVERY``-th) the parameters' norms are compared across the
  forward-and-backward and across ``post_step_update``; a change there turns on a hunt, where the
  norms are compared after every hook call of the next steps, which names the plugin and the hook.

Both read integers and flags only: no device sync, no tensor math - except the sampled norms
(one ``torch._foreach_norm`` over the parameters, four a sampled step, ~0.3 ms each on the default
config on CPU: ~25 us a step on average).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from arcfw.core.engine import contracts
from arcfw.core.engine.context import ParamGroup
from arcfw.core.engine.steps import order_text
from arcfw.core.errors import ContractError, OrderError, PrecisionError

#: The batch tensors a hook may read but never change.
BATCH_FIELDS = ("inputs", "input_mask", "targets", "target_mask", "canvas_mask")

_WHAT = {
    "inputs": "int64 query input grids [B, H, W]",
    "input_mask": "bool input mask [B, H, W]",
    "targets": "int64 class-index targets [B, H, W]",
    "target_mask": "bool target mask [B, H, W]",
    "canvas_mask": "bool canvas mask [B, H, W]",
}


class BatchWatch:
    """Identity and version of the batch's tensors, checked after each hook of the step."""

    __slots__ = ("batch", "stamp")

    def __init__(self, batch: Any):
        self.batch = batch
        self.stamp = [(f, t, t._version) for f in BATCH_FIELDS for t in (getattr(batch, f),)]

    def check(self, plugin: str, hook: str) -> None:
        for f, t, v in self.stamp:
            now = getattr(self.batch, f, None)
            if now is not t or now._version != v:
                how = (f"batch.{f} replaced by a {contracts.describe(now)} (it was {contracts.describe(t)})" if now is not t
                       else f"batch.{f} changed in place ({contracts.describe(t)})")
                raise ContractError(
                    plugin, hook, f"batch.{f} left as the engine made it ({_WHAT[f]}; the batch belongs to the engine)", how,
                    hint=f"Work on a copy (e.g. batch.{f}.clone() or .float() into a local variable); a loss consumes "
                    "batch.targets as int64 class indices",
                )


class ParamWatch:
    """The main optimizer's trainable parameters change only in the engine's step and get gradient
    only in the engine's backward."""

    def __init__(self, groups: list[ParamGroup]):
        self.params: list[tuple[str, str, torch.nn.Parameter]] = [
            (g.name, g.plugin, p) for g in groups if g.lr > 0 for p in g.trainable()
        ]
        self.tensors: list[torch.Tensor] = [p for _, _, p in self.params]
        self.seen: list[tuple[int, int]] = []  # (version, storage address) of each, as the engine left them
        self.current: tuple[str, str] | None = None  # (plugin, hook) running now, None while the engine runs
        self.stray: tuple[str, str, str] | None = None  # (group, plugin, hook) of a gradient outside the engine's backward
        self.layout = self._layout()  # dtype and device index, as the engine checked them at configure
        self.ptrs = self._ptrs()  # a cast or a move gives a parameter new storage: compared first, it is cheaper
        self.handles = [
            p.register_post_accumulate_grad_hook(self._on_grad(name, plugin))  # type: ignore[no-untyped-call]
            for name, plugin, p in self.params
        ]
        self.snapshot()
        self.norms: torch.Tensor | None = None  # on sampled steps: the parameters' norms as last compared
        self.hunt = 0  # steps left in which every hook call is compared (after a change seen on a sampled step)
        self.suspect: tuple[str, list[str], str, str] = ("", [], "", "")  # where, candidates, group, its plugin

    SAMPLE_EVERY = 50
    HUNT_STEPS = 2

    def _norms(self) -> torch.Tensor:
        return torch.stack(torch._foreach_norm(self.tensors)) if self.tensors else torch.zeros(0)

    def _scan(self) -> list[tuple[int, int]]:
        """(version, storage address) of every watched parameter in one pass: inside a real step the
        parameters' metadata is out of the CPU caches, and a second attribute read on the same tensor
        costs little beside the first."""
        return [(p._version, p.data_ptr()) for p in self.tensors]

    def start(self) -> None:
        """When a step starts: the layout as at configure (code outside the hooks may have run since the
        last step) and the versions as they are now (a checkpoint load, an evaluation: the reference)."""
        now = self._scan()
        self.check_layout(None, None, scan=now)
        self.seen, self.stray = now, None

    def begin_step(self, step: int) -> None:
        """At a step's start: is this step sampled (its norms compared)?"""
        self.norms = self._norms() if self.hunt or step < 2 or step % self.SAMPLE_EVERY == 0 else None

    def window(self, where: str, candidates: list[str], engine_step: bool = False) -> None:
        """On a sampled step, at the end of a stretch where only plugins' hooks (and the engine's backward)
        ran: did the parameters change?  ``engine_step``: the engine's own optimizer step just ran (the
        new reference, not a change)."""
        if self.norms is None:
            return
        now = self._norms()
        changed = not engine_step and not torch.equal(now, self.norms)
        group, owner = self._changed_group(now) if changed else ("", "")
        self.norms = now
        if not changed:
            return
        self.suspect = (where, candidates, group, owner)
        if self.hunt:  # every hook call was compared and none changed them: the engine's backward did (autograd hooks)
            raise self._data_error(hunted=True)
        self.hunt = self.HUNT_STEPS + 1  # the rest of this step, and the next HUNT_STEPS

    def end_step(self) -> None:
        """After a step: a change seen on a sampled step that the hunt did not see again is still an error."""
        if self.hunt:
            self.hunt -= 1
            if not self.hunt:
                raise self._data_error(hunted=False)

    def _changed_group(self, now: torch.Tensor) -> tuple[str, str]:
        assert self.norms is not None
        i = int((now != self.norms).nonzero()[0])
        return self.params[i][0], self.params[i][1]

    def _data_error(self, hunted: bool) -> OrderError:
        where, candidates, group, owner = self.suspect
        again = ("no hook call changed them, so a hook registered on a module or tensor did, while the engine ran "
                 "backward" if hunted else f"it did not happen again in the next {self.HUNT_STEPS} steps, where every hook "
                 "call was watched")
        return OrderError(
            f"trainable parameters of group '{group}' (plugin '{owner}') changed {where}, outside the engine's optimizer "
            f"step and without a version-counter bump (a write through .data); plugins whose hooks ran then: "
            f"{', '.join(repr(c) for c in candidates) or 'none'} ({again}). The step order is {order_text()}: the main "
            f"optimizer owns them. Freeze the group (optimizer.lr.{group}: 0) to update it yourself"
        )

    def _on_grad(self, group: str, owner: str) -> Any:
        def hook(_: torch.Tensor) -> None:
            if self.current is not None and self.stray is None:
                self.stray = (group, *self.current)

        return hook

    def _layout(self) -> list[tuple[torch.dtype, int]]:
        return [(p.dtype, p.get_device()) for p in self.tensors]

    def _ptrs(self) -> list[int]:
        return [p.data_ptr() for p in self.tensors]

    def check_layout(self, plugin: str | None, hook: str | None, scan: list[tuple[int, int]] | None = None) -> None:
        """The parameters' dtypes and devices as at configure (a module cast in a hook is named);
        ``plugin`` None: checked when a step starts, after code outside any hook ran.  Run after
        every hook call, so the storage addresses are compared first (a cast or a move always
        gives new storage) and the dtypes and devices only when one changed.  ``scan``: a
        :meth:`_scan` just taken."""
        ptrs = [a for _, a in scan] if scan is not None else self._ptrs()
        if ptrs == self.ptrs:
            return
        self.ptrs = ptrs
        layout = self._layout()
        if layout == self.layout:
            return
        i = next(i for i, (a, b) in enumerate(zip(layout, self.layout)) if a != b)
        group, owner, p = self.params[i]
        was = f"{str(self.layout[i][0]).replace('torch.', '')} on {'cpu' if self.layout[i][1] < 0 else f'device {self.layout[i][1]}'}"
        now = f"{str(p.dtype).replace('torch.', '')} on {p.device}"
        who = f"plugin '{plugin}' changed" if plugin else "something outside the plugins' hooks changed"
        where = f" in hook '{hook}'" if hook else " between two steps"
        self.layout = layout
        raise PrecisionError(
            f"{who} the trainable parameters of group '{group}' (plugin '{owner}'){where} from {was} to {now}: "
            "the engine checked them against the precision mode at configure; a trainable "
            "model cast to float16/bfloat16 trains low-precision master weights (or fails in fp16-mixed's GradScaler). "
            "Keep trainable models in float32 on the run's device; bf16-mixed/fp16-mixed autocast the math"
        )

    def snapshot(self) -> None:
        """The parameters as the engine left them (after its optimizer step, a load, between steps)."""
        self.seen = self._scan()
        self.stray = None

    def check(self, plugin: str, hook: str) -> None:
        if self.hunt and self.norms is not None:  # hunting a write through .data: compare after every hook call
            now = self._norms()
            if not torch.equal(now, self.norms):
                group, owner = self._changed_group(now)
                self.norms, self.hunt = now, 0
                raise OrderError(
                    f"plugin '{plugin}' changed trainable parameters of group '{group}' (plugin '{owner}') in hook '{hook}' "
                    f"through .data (no version-counter bump), outside the engine's optimizer step (the step order is "
                    f"{order_text()}): the main optimizer owns them. Return the loss from compute_loss, or freeze the "
                    f"group (optimizer.lr.{group}: 0) and update it yourself"
                )
        if self.stray is not None:
            group, plugin, hook = self.stray
            self.stray = None
            raise OrderError(
                f"plugin '{plugin}' called backward() in hook '{hook}' and it reached the trainable parameters of group "
                f"'{group}': "
                f"only the engine runs backward and steps the main optimizer (the step order is {order_text()}). "
                "Return the loss from compute_loss; for an update of your own, keep your own parameters out of the "
                "engine's groups (or detach the main model's outputs)"
            )
        scan = self._scan()
        if scan == self.seen:  # the common case: one pass, one comparison
            return
        self.check_layout(plugin, hook, scan=scan)
        changed = next((i for i, (a, b) in enumerate(zip(scan, self.seen)) if a[0] != b[0]), None)
        self.seen = scan
        if changed is not None:
            group, owner, _ = self.params[changed]
            raise OrderError(
                f"plugin '{plugin}' changed trainable parameters of group '{group}' (plugin '{owner}') in hook '{hook}', "
                f"outside the engine's optimizer step (the step order is {order_text()}): the main optimizer owns "
                "them. Return the loss from compute_loss, or freeze the group (optimizer.lr."
                f"{group}: 0) and update it yourself"
            )

    def close(self) -> None:
        for h in self.handles:
            h.remove()


#: conversions that turn class indices into numbers
_TO_FLOAT = frozenset({torch.Tensor.float, torch.Tensor.double, torch.Tensor.half, torch.Tensor.bfloat16, torch.Tensor.to,
                       torch.Tensor.type, torch.Tensor.type_as})


class TargetsAsFloat(TorchFunctionMode):
    """While a ``compute_loss`` hook runs (at the first step, and so in ``arcfw check``): does it convert
    ``batch.targets`` - or an integer tensor made from it (a view, a clone, a ``where``) - to a floating
    dtype?  A loss consumes targets as int64 class indices; a float copy trains silently (MSE on colour
    numbers, a soft target read as a value).  Comparisons and ``one_hot`` are not conversions of the
    targets and pass."""

    def __init__(self, targets: torch.Tensor):
        super().__init__()
        self.tracked: list[torch.Tensor] = [targets]
        self.seen: str | None = None  # "<function> to <dtype>" of the first conversion

    def _is_tracked(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and any(t is x for x in self.tracked)

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and any(self._is_tracked(a) for a in args[:3]):
            if out.is_floating_point() and func in _TO_FLOAT and self._is_tracked(args[0]):
                if self.seen is None:
                    self.seen = f"{getattr(func, '__name__', 'a conversion')}() to {str(out.dtype).replace('torch.', '')}"
            elif out.dtype == torch.int64 and len(self.tracked) < 64:
                self.tracked.append(out)
        return out

    def check(self, plugin: str) -> None:
        if self.seen is not None:
            raise ContractError(
                plugin, "compute_loss", "batch.targets consumed as int64 class indices",
                f"batch.targets converted with {self.seen}",
                hint="A loss over colours takes class indices (cross_entropy, gather, one_hot); a float copy of the "
                "targets trains on colour numbers as values",
            )
