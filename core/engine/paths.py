"""Gradient paths every step, per parameter group and per parameter (issue 13, item 3).

After the engine's backward, at every step:

- **Probes.**  The engine records, while the forward stages run, each hook's input tensor that
  carries gradient (the prompt a ``refine`` plugin was given, the refined prompt ``predict`` was
  given, the logits ``compute_loss`` was given).  Just before backward it puts a tensor hook on
  each (a flag set when a gradient arrives).  A flag left unset after backward means the hook
  consuming that tensor returned something that does not depend on it differentiably: that hook
  cut the path, at this step (the first-step autograd check only sees step 1).
- **Groups.**  Every trainable group of the main optimizer (``lr > 0``) that is not declared
  gradient-free for the step (``ctx.no_grad_groups``) must hold a gradient on at least one of its
  parameters; if none does and every probe fired, the group's own hook (``generate_prompt`` for
  the prompt plugin, ``predict`` for the predictor, ...) no longer uses it.
- **Parameters.**  Tensors of a group that have had no gradient in any of the group's first
  ``health.unused_after`` counted steps are reported once, by module name (a warning: a module
  never called, a branch detached or gated off).

Cost: a few tensor hooks a step and one ``p.grad is not None`` per group (it stops at the first
parameter that has one); the per-parameter pass runs only in the first ``unused_after`` steps.
No device sync.
"""

from __future__ import annotations

import torch

from arcfw.core.engine.context import ParamGroup
from arcfw.core.engine.contracts import cut_path_message
from arcfw.core.errors import GradientPathError


class Probe:
    """A tensor hook that records whether a gradient reached the tensor in this step's backward."""

    __slots__ = ("plugin", "hook", "upstream", "reached")

    def __init__(self, plugin: str, hook: str, upstream: str):
        self.plugin, self.hook, self.upstream = plugin, hook, upstream
        self.reached = False

    def __call__(self, grad: torch.Tensor) -> None:
        self.reached = True


#: A hook's input as the engine recorded it during the forward stages: (tensor, plugin, hook, what the tensor is).
Link = tuple[torch.Tensor, str, str, str]


def parameter_names(group: ParamGroup) -> dict[int, tuple[str, str]]:
    """id(parameter) -> (module path, parameter name) inside the group's modules; loose ones as ``(parameter i)``."""
    names: dict[int, tuple[str, str]] = {}
    several = len(group.modules) > 1
    for i, m in enumerate(group.modules):
        for full, p in m.named_parameters():
            mod, _, leaf = full.rpartition(".")
            prefix = f"{group.name}.{i}" if several else ""
            path = ".".join(x for x in (prefix, mod) if x) or "(the module itself)"
            names.setdefault(id(p), (path, leaf))
    for i, p in enumerate(group.params):
        names.setdefault(id(p), (f"(parameter {i}, in no module)", ""))
    return names


def describe_modules(params: list[tuple[str, str]], limit: int = 8) -> str:
    """``[(module, name), ...]`` as ``"net.gate (weight, bias), net.skip (weight)"``, at most ``limit`` modules."""
    by_module: dict[str, list[str]] = {}
    for mod, leaf in params:
        by_module.setdefault(mod, [])
        if leaf:
            by_module[mod].append(leaf)
    parts = [f"{m} ({', '.join(leaves)})" if leaves else m for m, leaves in by_module.items()]
    more = len(parts) - limit
    return ", ".join(parts[:limit]) + (f" and {more} more module{'s' if more > 1 else ''}" if more > 0 else "")


class GradientPaths:
    """The checks after each backward (see the module docstring)."""

    def __init__(self, groups: list[ParamGroup], owner_hook: dict[str, str], unused_after: int, per_parameter: bool = True):
        """``owner_hook``: plugin -> the hook through which its groups enter the step (``roles.step_hook``).
        ``unused_after`` 0 or ``per_parameter`` False (FSDP: a rank's shard of a tensor may be empty):
        no per-parameter report."""
        self.live = [(g, g.trainable()) for g in groups if g.lr > 0 and g.trainable()]
        self.owner_hook = owner_hook
        self.unused_after = unused_after
        self.counted = {g.name: 0 for g, _ in self.live}
        self.pending: dict[str, list[torch.nn.Parameter]] | None = None
        if unused_after and per_parameter and self.live:
            self.pending = {g.name: list(ps) for g, ps in self.live}
        self.unused: dict[str, list[tuple[str, str]]] = {}  # group -> (module, parameter) never given a gradient

    @staticmethod
    def arm(links: list[Link]) -> list[Probe]:
        """Put a probe on every recorded hook input that carries gradient (just before backward)."""
        probes = []
        for tensor, plugin, hook, upstream in links:
            if tensor.requires_grad:
                probe = Probe(plugin, hook, upstream)
                tensor.register_hook(probe)  # type: ignore[no-untyped-call]
                probes.append(probe)
        return probes

    def after_backward(self, probes: list[Probe], exempt: set[str] | frozenset[str], step: int) -> list[tuple[str, str]]:
        """Raise :class:`GradientPathError` for a path cut at this step (``step`` counted from 1, as in
        metrics.jsonl); return warnings ``(key, message)`` about parameters that never had a gradient."""
        missing = [(g, ps) for g, ps in self.live if g.name not in exempt and not any(p.grad is not None for p in ps)]
        for probe in reversed(probes):  # from the loss back: the first input left without gradient is where it was lost
            if not probe.reached:
                groups = ", ".join(repr(g.name) for g, _ in missing)
                lost = f" (parameter group{'s' if len(missing) > 1 else ''} {groups} got no gradient)" if missing else ""
                raise GradientPathError(cut_path_message(probe.plugin, probe.hook, probe.upstream, step=step) + lost)
        if missing:
            raise GradientPathError(self._group_message(*missing[0], step))
        return self._coverage(exempt) if self.pending is not None else []

    def without_gradient(self) -> dict[str, str]:
        """Group -> its parameter tensors that have had no gradient in any counted step so far, by module
        (``arcfw check``; empty for a group not counted yet)."""
        out = {name: describe_modules(params) for name, params in self.unused.items()}
        for g, _ in self.live:
            left = (self.pending or {}).get(g.name)
            if left and self.counted[g.name]:
                names = parameter_names(g)
                out[g.name] = describe_modules([names[id(p)] for p in left])
        return out

    def _group_message(self, g: ParamGroup, params: list[torch.nn.Parameter], step: int) -> str:
        hook = self.owner_hook.get(g.plugin, "its hooks")
        where = f"hook '{hook}'" if hook != "its hooks" else "its hooks"
        head = (f"parameter group '{g.name}' of plugin '{g.plugin}' received no gradient at step {step} although its "
                f"learning rate is {g.lr:g} and it is not declared gradient-free (ctx.no_grad_groups)")
        if not any(p.requires_grad for p in params):
            return (f"{head}: its parameters no longer require grad (requires_grad_(False) after configure). Freeze a "
                    f"group with optimizer.lr.{g.name}: 0, never by hand")
        return (f"{head}: the output of plugin '{g.plugin}' in {where} no longer depends on it (every hook downstream "
                "passed the gradient on). Look for torch.no_grad(), .detach() or .item() in that hook, or a module it "
                f"stopped calling; set optimizer.lr.{g.name}: 0 to freeze the group on purpose, or add '{g.name}' to "
                "ctx.no_grad_groups on the steps where it is idle")

    def _coverage(self, exempt: set[str] | frozenset[str]) -> list[tuple[str, str]]:
        """The first ``unused_after`` counted steps of each group: which tensors got a gradient."""
        assert self.pending is not None
        warnings = []
        for g, ps in self.live:
            left = self.pending.get(g.name)
            if left is None or g.name in exempt:
                continue
            left = [p for p in left if p.grad is None]
            self.counted[g.name] += 1
            if left and self.counted[g.name] < self.unused_after:
                self.pending[g.name] = left
                continue
            del self.pending[g.name]
            if left:
                names = parameter_names(g)
                self.unused[g.name] = [names[id(p)] for p in left]
                frozen = sum(not p.requires_grad for p in left)
                note = f"; {frozen} of them no longer require grad (requires_grad_(False) after configure)" if frozen else ""
                warnings.append((f"unused_params_{g.name}", (
                    f"{len(left)} of the {len(ps)} trainable parameter tensors of group '{g.name}' (plugin '{g.plugin}') "
                    f"have had no gradient in {self.counted[g.name]} steps: {describe_modules(self.unused[g.name])}{note}. "
                    "They are in the optimizer but nothing on the path to the loss uses them (a module never called, a "
                    "branch detached or gated off): fix the path, or leave them out of the group (health.unused_after: 0 "
                    "turns this report off)")))
        if not self.pending:
            self.pending = None
        return warnings
