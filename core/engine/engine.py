"""The engine: builds plugins from a config, owns the optimizer, and runs the step.

The step order is :data:`arcfw.core.engine.steps.STEP_ORDER`; :meth:`Engine.train_step`
walks that list and nothing else decides the order.  Every hook result is
checked against its contract where it is produced (``health.check_contracts``).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pluggy
import torch

from arcfw.core.config import RunConfig
from arcfw.core.data import shapes
from arcfw.core.data.batch import Batch, Example, repeat_batch
from arcfw.core.engine import contracts, hookspecs, state
from arcfw.core.engine.context import THRESHOLD_KEY, Context, LossOutput, Metric, ParamGroup, StepResult, TaskEncoding, View
from arcfw.core.engine.distributed import Dist, all_gather_object, full_tensor, rank_seed, resolve_device, resolve_threads
from arcfw.core.engine.health import GradientWatch, HealthMonitor, NonFiniteGuard
from arcfw.core.engine.lr_schedule import LRSchedule
from arcfw.core.engine.metric_owners import ENGINE, MetricOwners
from arcfw.core.engine.optimizers import build_optimizer
from arcfw.core.engine.paths import GradientPaths, Link
from arcfw.core.engine.precision import Precision
from arcfw.core.engine.roles import HOOK_TABLE, Combine, step_hook
from arcfw.core.engine.steps import MICRO_STAGES, STEP_ORDER, Stage, order_text
from arcfw.core.engine.watch import BatchWatch, ParamWatch, TargetsAsFloat
from arcfw.core.errors import (
    ArcfwError,
    CheckpointError,
    ContractError,
    GradientPathError,
    HookFailure,
    OrderError,
    PluginError,
    PrecisionError,
    first_line,
)

Listener = Callable[[str, str | None], None]

#: The engine's own metrics (plugins declare theirs on their class: ``Plugin.metrics``).
ENGINE_METRICS: tuple[Metric, ...] = (Metric("loss", console=20, plot="loss"),)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class _Step:
    """Values flowing through one step (internal).  Each stage sets the fields it produces
    (a field read before its stage ran is an AttributeError, not a silent None)."""

    batch: Batch
    #: this micro-batch's share of the step's examples (gradient accumulation; 1.0 for a whole batch)
    weight: float = 1.0
    #: the last micro-batch of the step (its backward is followed by the optimizer step)
    last: bool = True
    index: int = 0  # its index among the step's micro-batches
    prompt: torch.Tensor = field(init=False)  # generate_prompt
    encoding: TaskEncoding | None = field(init=False)  # generate_prompt: token states, when the prompt plugin makes them
    refined: torch.Tensor = field(init=False)  # refine
    logits: torch.Tensor = field(init=False)  # predict
    loss: torch.Tensor = field(init=False)  # compute_loss; deleted once backward ran (the graph is gone)
    loss_value: float = field(init=False)  # optimizer_step: the loss averaged over ranks, as a float
    norms: dict[str, float] = field(init=False)  # optimizer_step: gradient norm per trainable group
    applied: bool = field(init=False)  # optimizer_step: False when the step was skipped
    metrics: dict[str, float] = field(default_factory=dict)
    #: hook inputs that carry gradient, probed in backward (health.check_contracts; see arcfw.core.engine.paths)
    links: list[Link] = field(default_factory=list)


@dataclass
class _Impl:
    plugin: str
    fn: Callable[..., Any]
    argnames: tuple[str, ...]

    def __call__(self, **kwargs: Any) -> Any:
        return self.fn(*[kwargs[a] for a in self.argnames])


class Engine:
    """Build with :meth:`Engine.from_config`, then :meth:`fit` or :meth:`train_step`."""

    def __init__(
        self, config: RunConfig, *, device: torch.device | None = None, out_dir: Path | None = None, dist: Dist | None = None
    ):
        """``dist`` (from :func:`arcfw.core.engine.distributed.setup`) places the engine in a multi-process run."""
        self.config = config
        cfg = config.data
        self.device = device or (dist.device if dist else resolve_device(cfg["device"]))
        self.dist = dist or Dist(device=self.device)
        self.check_contracts = bool(cfg["health"]["check_contracts"])
        self.threads_auto = cfg["threads"] is None
        threads = resolve_threads(cfg["threads"], self.device)  # null: 1 on CPU (see resolve_threads)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        cfg["threads"] = threads  # the resolved config names the count used
        self.precision = Precision(cfg["precision"], self.device)
        self.ctx = Context(device=self.device, seed=cfg["seed"], out_dir=out_dir, rank=self.dist.rank, world_size=self.dist.world_size)
        self.listeners: list[Listener] = []
        self.global_step = 0  # optimizer steps attempted
        self.last_norms: dict[str, float] = {}  # gradient norm per trainable group, last step (before clipping)
        self._first_step_checked = False
        self._batch_watch: BatchWatch | None = None  # set while a step runs (health.check_contracts)
        self._param_watch: ParamWatch | None = None  # built with the optimizer (health.check_contracts)
        #: the learning-rate schedule applied before every optimizer step (set by the trainer; None: the
        #: optimizer's learning rates stay as configured)
        self.lr_schedule: LRSchedule | None = None
        self._micro: list[_Step] = []  # the micro-batches of the step being run
        self._stages = {s: getattr(self, f"_stage_{s.name.lower()}") for s in STEP_ORDER}
        self._build_plugins()

    # ------------------------------------------------------------------ building

    @classmethod
    def from_config(cls, config: RunConfig, **kw: Any) -> Engine:
        return cls(config, **kw)

    def _build_plugins(self) -> None:
        seed_everything(self.ctx.seed)
        self.ctx.generator = torch.Generator(device=self.device)
        self.ctx.generator.manual_seed(rank_seed(self.ctx.seed, self.ctx.rank))
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, Any] = {}
        self.roles: dict[str, str] = {}  # instance name -> role
        problems = []
        for spec in self.config.plugins:
            try:
                plugin = spec.build()
            except ArcfwError:
                raise
            except Exception as exc:
                problems.append((spec.key, f"plugin '{spec.name}' rejected its parameters: {exc}"))
                continue
            name = spec.name
            if name in self.plugins:  # the same plugin class twice (e.g. two extras)
                name = f"{name}#{sum(1 for n in self.plugins if n.split('#')[0] == spec.name) + 1}"
            try:
                plugin.instance_name = name
            except AttributeError:
                pass
            try:
                self.pm.register(plugin, name=name)
            except pluggy.PluginValidationError as exc:
                raise PluginError(f"plugin '{name}' ({spec.key}): {exc}") from None
            self.plugins[name] = plugin
            self.roles[name] = spec.role
        if problems:
            raise self.config.error(problems)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"{exc} (hooks are listed in arcfw.core.engine.hookspecs)") from None
        order = list(self.plugins)  # role order, then extras in config order
        self._impls: dict[str, list[_Impl]] = {}
        for hook in HOOK_TABLE:  # every hook spec (tests/test_roles.py keeps the two equal)
            impls = {i.plugin_name: i for i in getattr(self.pm.hook, hook).get_hookimpls()}
            self._impls[hook] = [_Impl(n, impls[n].function, tuple(impls[n].argnames)) for n in order if n in impls]
        for hook, rule in HOOK_TABLE.items():
            if rule.combine is Combine.ONE and len(self._impls.get(hook, [])) != 1:
                names = [i.plugin for i in self._impls.get(hook, [])]
                raise PluginError(f"exactly one plugin must implement '{hook}', found {len(names)}: {names or 'none'}")

        # configure in role order, then collect parameter groups
        for impl in self._impls["configure"]:
            self._call("configure", impl, ctx=self.ctx)
        if self.ctx.prompt_dim is None:
            raise PluginError(f"prompt plugin '{self._impls['generate_prompt'][0].plugin}' did not set ctx.prompt_dim in configure()")
        self.groups = self._collect_groups()
        # the resolved config names every group's learning rate (OUT/config.yaml, checkpoints, `arcfw config`)
        self.config.set_learning_rates({g.name: g.lr for g in self.groups})
        self.metrics = self._collect_metrics()  # declared: the engine's, then every plugin's in role order
        self.dist.wrap(self.groups, self.plugins)  # DDP / FSDP before the optimizer sees the parameters
        self.precision.check_parameters(self.groups)
        if self.config["compile"]:
            self._compile_modules()
        self.optimizer = self._build_optimizer()
        if self.check_contracts and self.dist.strategy != "fsdp":  # FSDP2 swaps sharded/unsharded parameters
            self._param_watch = ParamWatch(self.groups)
        h = self.config["health"]
        trainable = {g.name: g.plugin for g in self.groups if g.lr > 0}
        self.grad_watch = GradientWatch(trainable, h["patience"])
        owner_hook = {name: step_hook(role) for name, role in self.roles.items()}
        self.paths = GradientPaths(self.groups, owner_hook, h["unused_after"], per_parameter=self.dist.strategy != "fsdp")
        self.guard = NonFiniteGuard(h["nonfinite"], h["max_consecutive_skips"])
        prompt_groups = [g.name for g in self.groups if g.plugin == self.prompt_plugin and g.lr > 0]
        stuck = {m.name: m.stuck_at for m in self.metrics if m.stuck_at is not None}
        self.health = HealthMonitor(prompt_groups[0] if prompt_groups else None, h["flat_window"], h["flat_tolerance"], stuck)

    @property
    def prompt_plugin(self) -> str:
        return self._impls["generate_prompt"][0].plugin

    def _collect_groups(self) -> list[ParamGroup]:
        groups: list[ParamGroup] = []
        for impl in self._impls.get("parameter_groups", []):
            result = self._call("parameter_groups", impl, ctx=self.ctx) or []
            if not isinstance(result, (list, tuple)) or not all(isinstance(g, ParamGroup) for g in result):
                raise ContractError(impl.plugin, "parameter_groups", "a list of ParamGroup", contracts.describe(result))
            for g in result:
                g.plugin = impl.plugin
                groups.append(g)
        names = [g.name for g in groups]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise PluginError(f"parameter group names must be unique, repeated: {sorted(dup)}")
        seen: dict[int, str] = {}
        for g in groups:
            for p in g.params:
                if id(p) in seen and seen[id(p)] != g.name:
                    raise PluginError(f"a parameter is in two groups: '{seen[id(p)]}' and '{g.name}'")
                seen[id(p)] = g.name
        overrides = self.config["optimizer"]["lr"]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise self.config.error(
                [(f"optimizer.lr.{u}", f"no parameter group named '{u}' (groups: {', '.join(names) or 'none'})") for u in unknown],
            )
        for g in groups:
            if g.name in overrides:
                g.lr = float(overrides[g.name])
            for m in g.modules:
                m.train()
            if g.lr == 0:  # frozen on purpose: no gradient, not in the optimizer
                for p in g.params:
                    p.requires_grad_(False)
        return groups

    def _collect_metrics(self) -> list[Metric]:
        """The engine's metrics, then every plugin's declared ones (``Plugin.metrics``), in role order."""
        metrics = list(ENGINE_METRICS)
        self.metric_owners = MetricOwners()  # every metric name's one maker (checked again as metrics are logged)
        for m in ENGINE_METRICS:
            self.metric_owners.declare(m.name, ENGINE)
        for name, plugin in self.plugins.items():
            declared = getattr(plugin, "metrics", ())
            if not isinstance(declared, (list, tuple)) or not all(isinstance(m, Metric) for m in declared):
                raise PluginError(f"plugin '{name}': 'metrics' must be a tuple of arcfw Metric, got {contracts.describe(declared)}")
            groups = [g.name for g in self.groups]
            for m in declared:
                self.metric_owners.declare(m.name, name)
                unknown = [g for g in m.grad_norm_of if g not in groups]
                if unknown:
                    raise PluginError(f"metric '{m.name}' of plugin '{name}': grad_norm_of names no parameter group "
                                      f"{unknown} (groups: {', '.join(groups) or 'none'})")
                metrics.append(m)
        return metrics

    def _compile_modules(self) -> None:
        """``compile: true``: compile the modules of every parameter group in place (``nn.Module.compile``).

        Shapes change from batch to batch (sequence lengths, canvases), so they are
        compiled as dynamic.  The first-step gradient-path check runs part of the
        backward with ``retain_graph``, which compiled backward functions with donated
        buffers refuse, so buffer donation is turned off.
        """
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
        for g in self.groups:
            for m in g.modules:
                m.compile(dynamic=True)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        param_groups = [
            {"params": g.trainable(), "lr": g.lr, "name": g.name, **({"weight_decay": g.weight_decay} if g.weight_decay is not None else {})}
            for g in self.groups
            if g.lr > 0 and g.trainable()
        ]
        if not param_groups:  # nothing to train: keep a valid optimizer so the loop stays uniform
            param_groups = [{"params": [torch.zeros(1, requires_grad=True)], "lr": 0.0, "name": "_none"}]
        # fused: one kernel for all parameters, ~5x faster than the loop on CPU
        return build_optimizer(self.config["optimizer"], param_groups, fused=self.ctx.fused_optimizers)

    # ------------------------------------------------------------------ state

    def named_modules(self) -> list[tuple[str, torch.nn.Module]]:
        """Every distinct module of the parameter groups, named after its group (``group.i`` for several)."""
        return state.named_modules(self.groups)

    def state_dict(self, *, modules: bool = True, optimizer: bool = True) -> dict[str, Any]:
        """Everything a resumed run needs from the engine, as copies (see :mod:`arcfw.core.engine.state`).

        ``modules=False`` leaves out the parameter groups' weights (a checkpoint writes
        them to safetensors files itself); ``optimizer=False`` the main optimizer (a sharded
        checkpoint writes its shards itself, never gathered).  In a multi-process run this is a collective:
        every rank calls it (generator states and FSDP2 shards are gathered).  Safe to
        keep in memory and restore later: nothing in it is shared with the live engine.
        """
        gen = self.ctx.generator
        out: dict[str, Any] = {
            "global_step": self.global_step,
            "epoch": self.ctx.epoch,
            "schedule": dict(self.ctx.schedule),
            "precision": state.copy_tree(self.precision.state_dict()),
            "grad_watch": state.copy_tree(self.grad_watch.state_dict()),
            "guard": state.copy_tree(self.guard.state_dict()),
            "health": state.copy_tree(self.health.state_dict()),
            "generator": {
                "states": all_gather_object(None if gen is None else gen.get_state()),
                "device": None if gen is None else gen.device.type,
            },
            "plugins": {name: state.copy_tree(s) for name, s in self.call_all("state_dict") if s is not None},
        }
        if optimizer:
            out["optimizer"] = state.optimizer_state(self.optimizer)
        if modules:
            out["modules"] = {name: state.copy_tree(state.full_module_state(m) if self.dist.strategy == "fsdp" else m.state_dict())
                              for name, m in self.named_modules()}
            out["loose"] = {k: p.detach().clone() for k, p in state.loose_params(self.groups).items()}
        return out

    def load_state_dict(self, saved: dict[str, Any], *, source: str = "saved state") -> list[str]:
        """Put the engine back in the state :meth:`state_dict` returned.  Returns notes for the user
        (e.g. random draws that cannot be the same on another device or number of processes).

        A key that is absent is left alone (``arcfw eval`` restores only the modules and the
        plugins' states).  ``source`` names the state in error messages (a checkpoint folder).
        The saved tensors are copied, never adopted: one snapshot can be restored many times.
        """
        notes: list[str] = []
        if "modules" in saved:
            names = sorted(n for n, _ in self.named_modules())
            if sorted(saved["modules"]) != names:
                raise CheckpointError(f"{source}: holds modules {sorted(saved['modules'])}, the config builds {names}")
            for name, module in self.named_modules():
                state.load_module(module, saved["modules"][name])
        if saved.get("loose"):
            with torch.no_grad():
                for key, p in state.loose_params(self.groups).items():
                    p.copy_(saved["loose"][key])
        if "optimizer" in saved:
            state.load_optimizer(self.optimizer, saved["optimizer"])
        if "global_step" in saved:
            self.global_step = int(saved["global_step"])
        if "epoch" in saved:
            self.ctx.epoch = int(saved["epoch"])
        if "schedule" in saved:
            self.ctx.schedule = {k: float(v) for k, v in saved["schedule"].items()}
        for key, part in (("precision", self.precision), ("grad_watch", self.grad_watch), ("guard", self.guard), ("health", self.health)):
            if key in saved:
                part.load_state_dict(state.copy_tree(saved[key]))
        if "generator" in saved:
            notes += self._load_generator(saved["generator"])
        if "plugins" in saved:
            self._load_plugin_states(saved["plugins"], source)
        return notes

    def _load_generator(self, saved: dict[str, Any]) -> list[str]:
        notes = []
        gens, gen = saved["states"], self.ctx.generator
        if len(gens) != self.ctx.world_size:
            notes.append(f"state saved by {len(gens)} process(es), restored by {self.ctx.world_size}: "
                         "the ranks' random draws differ from an uninterrupted run")
        own = gens[self.ctx.rank] if self.ctx.rank < len(gens) else None
        if gen is not None and own is not None:
            if saved["device"] == gen.device.type:
                gen.set_state(own.clone())
            else:
                notes.append(f"state saved on {saved['device']}, restored on {self.device.type}: "
                             "random draws differ from an uninterrupted run")
        return notes

    def _load_plugin_states(self, saved: dict[str, Any], source: str) -> None:
        loaders = self.implementers("load_state_dict")
        orphans = sorted(set(saved) - set(loaders))
        if orphans:
            raise CheckpointError(
                f"{source}: holds state of plugin(s) {orphans} that no plugin of this config loads (a load_state_dict hook is missing)"
            )
        for name in loaders:
            if name not in saved:
                continue
            try:
                self.call_plugin("load_state_dict", name, state=state.copy_tree(saved[name]))
            except HookFailure as failure:
                exc = failure.original
                text = " ".join(str(exc).split()) or type(exc).__name__
                text = text if len(text) <= 300 else text[:300].rsplit(" ", 1)[0] + " ..."
                raise CheckpointError(f"{source}: plugin '{name}' could not load its state: {text}") from None

    # ------------------------------------------------------------------ the step

    def add_listener(self, fn: Listener) -> None:
        """``fn(event, plugin)`` is called for every stage the engine enters and every hook call."""
        self.listeners.append(fn)

    def _emit(self, event: str, plugin: str | None = None) -> None:
        for fn in self.listeners:
            fn(event, plugin)

    def _call(self, hook: str, impl: _Impl, **kwargs: Any) -> Any:
        """Every call of a plugin's hook goes through here: an exception inside it is attributed
        to the plugin and the hook (:meth:`_attribute`); the engine's own ArcfwErrors pass unchanged."""
        if self.listeners:
            self._emit(hook, impl.plugin)
        return self._invoke(hook, impl, **kwargs)

    def _invoke(self, hook: str, impl: _Impl, **kwargs: Any) -> Any:
        """:meth:`_call` without the listener event (the predictor run inside post_step_update)."""
        pw = self._param_watch
        if pw is not None:
            outer, pw.current = pw.current, (impl.plugin, hook)
        try:
            out = impl(**kwargs)
        except ArcfwError as exc:
            self._after_hook(impl.plugin, hook, exc)  # a changed batch explains the hook's own error best
            raise
        except Exception as exc:
            self._after_hook(impl.plugin, hook, exc)
            raise self._attribute(impl.plugin, hook, exc) from exc
        finally:
            if pw is not None:
                pw.current = outer
        self._after_hook(impl.plugin, hook)
        return out

    def _after_hook(self, plugin: str, hook: str, cause: BaseException | None = None) -> None:
        """The batch and the main parameters as the engine left them (:mod:`arcfw.core.engine.watch`):
        inside a step, the batch's tensors and the parameters' versions; always, no backward into the
        main parameters while a hook runs."""
        try:
            if self._batch_watch is not None:
                self._batch_watch.check(plugin, hook)
                if self._param_watch is not None:
                    self._param_watch.check(plugin, hook)
            elif self._param_watch is not None:
                if self._param_watch.stray is not None:
                    self._param_watch.check(plugin, hook)
                self._param_watch.check_layout(plugin, hook)
        except ArcfwError as err:
            if cause is not None:
                raise err from cause
            raise

    def _attribute(self, plugin: str, hook: str, exc: Exception) -> ArcfwError:
        """One line for an exception raised inside ``plugin``'s ``hook``.  PyTorch's messages for the
        original script's failures are translated into the guarantee they break."""
        text = str(exc)
        if "backward through the graph a second time" in text or (
            hook == "post_step_update" and "does not require grad and does not have a grad_fn" in text
        ):
            if hook == "post_step_update":
                return OrderError(
                    f"plugin '{plugin}' tried to backpropagate through the main graph in post_step_update. "
                    f"The step order is {order_text()}: by post_step_update the engine has already run backward "
                    "and stepped the optimizer, and the graph is freed. Build the update from the detached values "
                    "in `result` (recompute what you need under your own graph), and keep only .detach()ed tensors "
                    "from refine/generate_prompt"
                )
            return OrderError(
                f"plugin '{plugin}' called backward() in hook '{hook}' through a graph that was already freed "
                f"(PyTorch: Trying to backward through the graph a second time). The step order is {order_text()}: "
                "only the engine runs backward on the main graph; keep no tensors of one step's graph for the next"
            )
        if "does not require grad and does not have a grad_fn" in text:
            return GradientPathError(
                f"plugin '{plugin}' called backward() in hook '{hook}' on a value with no gradient path (PyTorch: "
                "element 0 of tensors does not require grad): it was computed under torch.no_grad()/"
                "torch.inference_mode() or from .detach()ed/.item() values"
            )
        if "Attempting to unscale FP16 gradients" in text:
            return self._fp16_error(f"plugin '{plugin}' hook '{hook}'")
        if any(k in text for k in ("must have the same dtype", "expected scalar type", "Input type", "expected both inputs to have same dtype")):
            low = [g for g in self.groups if g.lr > 0 and any(p.dtype != torch.float32 for p in g.trainable())]
            if low:
                names = ", ".join(f"'{g.name}' (plugin '{g.plugin}')" for g in low)
                return PrecisionError(
                    f"plugin '{plugin}' failed in hook '{hook}' on mixed dtypes ({type(exc).__name__}: "
                    f"{' '.join(first_line(exc).split())[:200]}) because parameter group {names} no longer holds float32 "
                    "trainable parameters (cast after configure, e.g. .half() at epoch start). Keep trainable models "
                    "in float32; bf16-mixed/fp16-mixed autocast the math"
                )
        if "Inference tensors cannot be saved for backward" in text:
            return GradientPathError(
                f"plugin '{plugin}' made a tensor under torch.inference_mode() in hook '{hook}' that the backward "
                "needs (PyTorch: Inference tensors cannot be saved for backward): use torch.no_grad() for values "
                "that need no gradient, and nothing of the kind on the path to the loss"
            )
        return HookFailure(plugin, hook, exc)

    def _fp16_error(self, where: str) -> PrecisionError:
        """The precision error for GradScaler's "Attempting to unscale FP16 gradients", naming the
        plugin(s) whose trainable groups hold float16 parameters (the original script's bug)."""
        culprits = [g for g in self.groups if g.lr > 0 and any(p.dtype == torch.float16 for p in g.trainable())]
        if not culprits:
            return PrecisionError(
                f"{where}: GradScaler found float16 gradients (PyTorch: Attempting to unscale FP16 gradients): "
                "fp16-mixed trains float32 master weights; load every trainable model in float32"
            )
        names = ", ".join(f"'{g.name}' (plugin '{g.plugin}')" for g in culprits)
        return PrecisionError(
            f"parameter group {names} has float16 trainable parameters, which fp16-mixed cannot train "
            "(GradScaler cannot unscale FP16 gradients; PyTorch: Attempting to unscale FP16 gradients) - they were "
            "cast after configure (e.g. .half() at epoch start). Fix: keep the model in float32 (mixed precision "
            "keeps fp32 master weights and autocasts the math), or use precision: bf16-mixed"
        )

    def train_step(self, batch: Batch | Sequence[Batch]) -> dict[str, float]:
        """One optimizer step, stage by stage in :data:`STEP_ORDER`. Returns the step's metrics.

        ``batch``: one batch, or the micro-batches of one step (gradient accumulation,
        ``accumulate`` in the config): each runs :data:`MICRO_STAGES` in turn with its loss
        weighted by its share of the step's examples, so the gradients are those of one batch
        of all of them (``compute_loss`` is a mean over a batch's examples), then its own
        ``post_step_update``; the last one's runs after the one optimizer step.  A metric of
        the step is the mean over its micro-batches, weighted by their examples.
        """
        micro = [batch] if isinstance(batch, Batch) else list(batch)
        if not micro:
            raise ValueError("train_step needs at least one batch")
        self.ctx.training = True
        self.ctx.step = self.global_step
        self.ctx.no_grad_groups = set()
        total = sum(b.size for b in micro)
        steps = [_Step(batch=b, weight=b.size / total if len(micro) > 1 else 1.0, last=i == len(micro) - 1, index=i)
                 for i, b in enumerate(micro)]
        self._micro = steps
        if self.check_contracts and self._param_watch is not None:
            self._param_watch.start()  # as the engine left them (a checkpoint load, evaluation, ...)
            self._param_watch.begin_step(self.global_step)
        no_grad: set[str] | None = None
        try:
            self._run_stage(Stage.THRESHOLD, steps[0])
            for s in steps:
                self.ctx.no_grad_groups = set()
                with self.dist.no_sync() if not s.last else contextlib.nullcontext():
                    for stage in MICRO_STAGES:
                        if stage is Stage.BACKWARD and s.last and no_grad is not None:
                            # exempt only what no micro-batch of the step trained (the first-step check reads it)
                            self.ctx.no_grad_groups &= no_grad
                        self._run_stage(stage, s)
                no_grad = set(self.ctx.no_grad_groups) if no_grad is None else no_grad & self.ctx.no_grad_groups
                if s.last:
                    self._run_stage(Stage.OPTIMIZER_STEP, s)
                else:  # gradient accumulation: the optimizer steps after the last micro-batch
                    s.loss_value, s.applied, s.norms = float(s.loss.detach()), False, {}
                self._run_stage(Stage.POST_STEP_UPDATE, s)
        finally:
            self._batch_watch = None
            self._micro = []
        if self._param_watch is not None:
            self._param_watch.end_step()
        self.global_step += 1
        self._first_step_checked = True
        return steps[0].metrics if len(steps) == 1 else _combine([(s.weight, s.metrics) for s in steps])

    def _run_stage(self, stage: Stage, s: _Step) -> None:
        if self.check_contracts and (self._batch_watch is None or self._batch_watch.batch is not s.batch):
            self._batch_watch = BatchWatch(s.batch)
        if self.listeners:
            self._emit(f"stage:{stage.value}")
        self._stages[stage](s)

    def _stage_threshold(self, s: _Step) -> None:
        for impl in self._impls.get("hard_cell_threshold", []):
            value = self._call("hard_cell_threshold", impl, epoch=self.ctx.epoch, step=self.ctx.step, ctx=self.ctx)
            if value is not None:
                if self.check_contracts:
                    contracts.check_threshold(impl.plugin, value)
                self.ctx.schedule[THRESHOLD_KEY] = float(value)
                self.metric_owners.logged(impl.plugin, (THRESHOLD_KEY,), "hard_cell_threshold")
                break
        s.metrics.update(self.ctx.schedule)  # logged with the step

    def _stage_generate_prompt(self, s: _Step) -> None:
        impl = self._impls["generate_prompt"][0]
        with self.precision.autocast():
            out = self._call("generate_prompt", impl, batch=s.batch, ctx=self.ctx)
        s.prompt, s.encoding = self._split_encoding(impl.plugin, out, s.batch, training=True)

    def _split_encoding(self, plugin: str, out: Any, batch: Batch, training: bool) -> tuple[torch.Tensor, TaskEncoding | None]:
        """``generate_prompt``'s result as (prompt, encoding or None), contract-checked."""
        encoding = out if isinstance(out, TaskEncoding) else None
        prompt = encoding.prompt if encoding is not None else out
        if self.check_contracts:
            contracts.check_prompt(plugin, "generate_prompt", prompt, batch.size, self.ctx.prompt_dim, self.device)
            if encoding is not None:
                contracts.check_encoding(plugin, encoding, batch.size, self.device)
            trainable = [g for g in self.groups if g.plugin == plugin and g.lr > 0 and g.name not in self.ctx.no_grad_groups]
            if training and trainable:
                tensors = [("prompt", prompt)] + ([("tokens", encoding.tokens)] if encoding is not None else [])
                cut = [what for what, x in tensors if not x.requires_grad]
                if cut:
                    names = ", ".join(f"'{g.name}'" for g in trainable)
                    raise GradientPathError(contracts.cut_path_message(
                        plugin, "generate_prompt", f"its trainable parameter group {names} (no gradient on {' and '.join(cut)})"))
        return prompt, encoding

    def _stage_refine(self, s: _Step) -> None:
        x = s.prompt
        for impl in self._impls.get("refine", []):
            with self.precision.autocast():
                out = self._call("refine", impl, prompt=x, batch=s.batch, ctx=self.ctx)
            if self.check_contracts:
                contracts.check_prompt(impl.plugin, "refine", out, s.batch.size, self.ctx.prompt_dim, self.device)
                upstream = "the prompt it was given (and so on every parameter upstream, e.g. Qwen)"
                self._check_path(impl.plugin, "refine", out, x, upstream)
                s.links.append((x, impl.plugin, "refine", upstream))
            x = out
        s.refined = x

    def _stage_predict(self, s: _Step) -> None:
        impl = self._impls["predict"][0]
        with self.precision.autocast():
            out = self._call("predict", impl, prompt=s.refined, batch=s.batch, ctx=self.ctx, encoding=s.encoding)
        if self.check_contracts:
            contracts.check_logits(impl.plugin, out, s.batch.size, s.batch.canvas, self.device)
            upstream = "the refined prompt (so the prompt model would never learn)"
            self._check_path(impl.plugin, "predict", out, s.refined, upstream)
            s.links.append((s.refined, impl.plugin, "predict", upstream))
        s.logits = out

    def _check_path(self, plugin: str, hook: str, out: torch.Tensor, inp: torch.Tensor, upstream: str) -> None:
        if not inp.requires_grad:
            return
        cut = not out.requires_grad
        if not cut and not self._first_step_checked:  # full graph check once, at the first step
            cut = not contracts.reaches(out, [inp])
        if cut:
            raise GradientPathError(contracts.cut_path_message(plugin, hook, upstream))

    def _stage_compute_loss(self, s: _Step) -> None:
        total = None
        needs_grad = any(g.lr > 0 for g in self.groups)
        for impl in self._impls.get("compute_loss", []):
            # at the first step: does the loss turn the targets into floats? (watch.TargetsAsFloat)
            floats = TargetsAsFloat(s.batch.targets) if self.check_contracts and not self._first_step_checked else None
            with self.precision.autocast(), floats or contextlib.nullcontext():
                out: LossOutput = self._call("compute_loss", impl, logits=s.logits, batch=s.batch, ctx=self.ctx)
            if self.check_contracts:
                if floats is not None:
                    floats.check(impl.plugin)
                contracts.check_loss(impl.plugin, out, needs_grad)
            total = out.loss.float() if total is None else total + out.loss.float()
            self.metric_owners.logged(impl.plugin, out.metrics, "compute_loss")
            s.metrics.update(out.metrics)
        if total is None:
            raise PluginError("no plugin implements compute_loss")
        if self.check_contracts:
            losses = "', '".join(self.implementers("compute_loss"))
            s.links.append((s.logits, losses, "compute_loss", "the logits predict made (and so on every parameter upstream)"))
        s.loss = total

    def _stage_backward(self, s: _Step) -> None:
        probes = self.paths.arm(s.links) if s.links else []
        if s.loss.requires_grad:
            try:
                self.precision.backward(s.loss if s.weight == 1.0 else s.loss * s.weight)
            except RuntimeError as exc:
                if "backward through the graph a second time" not in str(exc):
                    raise
                raise OrderError(
                    "a plugin called backward() on the main graph before the engine did. Plugins never call "
                    f"backward or step the main optimizer; the step order is {order_text()}. Return the loss from "
                    "compute_loss and do extra updates in post_step_update"
                ) from exc
        if not s.last:  # more micro-batches add their gradients before the optimizer step
            return
        self.dist.sync_gradients()  # groups no DDP/FSDP wrapper owns; the wrappers reduced theirs in backward
        # every step: each probed hook input got a gradient, each trainable group too (arcfw.core.engine.paths)
        for key, message in self.paths.after_backward(probes, self.ctx.no_grad_groups, self.global_step + 1):
            self.health.note(key, message)

    def _stage_optimizer_step(self, s: _Step) -> None:
        if self._param_watch is not None and self._param_watch.norms is not None:  # sampled steps: no .data writes
            forward = ("hard_cell_threshold", "generate_prompt", "refine", "predict", "compute_loss")
            self._param_watch.window(f"during the forward hooks or the backward of step {self.global_step + 1}",
                                     sorted({i.plugin for h in forward for i in self._impls.get(h, [])}))
        opt = self.optimizer
        try:
            self.precision.unscale(opt)
        except ValueError as exc:
            if "Attempting to unscale FP16 gradients" not in str(exc):
                raise
            raise self._fp16_error("optimizer_step") from exc
        live = [g for g in self.groups if g.lr > 0]
        grads = [[p.grad for p in g.trainable() if p.grad is not None] for g in live]
        norms = [full_tensor(torch.nn.utils.get_total_norm(gs)) if gs else torch.zeros((), device=self.device) for gs in grads]
        own = s.loss.detach().float()
        earlier = self._micro[:-1]  # gradient accumulation: the micro-batches before this one
        # the step's loss: the micro-batches' losses weighted as in backward
        whole = own * s.weight + sum(mb.loss_value * mb.weight for mb in earlier) if earlier else own
        # gradients are already the same on every rank; the loss is averaged so that all ranks skip alike
        loss = self.dist.mean(whole)
        values = torch.stack([loss, *([own] if earlier else []), *[n.float().to(self.device) for n in norms]]).tolist()  # one sync
        if earlier:
            s.loss_value = values.pop(1)  # this micro-batch's own loss (its post_step_update sees it)
        else:
            s.loss_value = values[0]
        s.metrics["loss"] = values[0]
        s.norms = {g.name: v for g, v in zip(live, values[1:])}
        self.last_norms = s.norms
        total_norm = math.sqrt(sum(v * v for v in values[1:])) if all(math.isfinite(v) for v in values[1:]) else float("inf")
        if not math.isfinite(values[0]) or (not math.isfinite(total_norm) and self.precision.scaler is None):
            what = "loss" if not math.isfinite(values[0]) else "gradient"
            opt.zero_grad(set_to_none=True)
            if self.precision.scaler is not None:
                self.precision.scaler.update()
            s.applied = False
            s.metrics["nonfinite_skipped"] = 1.0
            self.guard.nonfinite(what, self.global_step)
        else:
            clip = self.config["grad_clip"]
            if clip and math.isfinite(total_norm):
                params = [p for g in live for p in g.trainable() if p.grad is not None]
                torch.nn.utils.clip_grads_with_norm_(params, clip, torch.tensor(total_norm, device=self.device))
            if self.lr_schedule is not None:
                for name, lr in self.lr_schedule.apply(opt, self.global_step).items():
                    s.metrics[f"lr/{name}"] = lr
            s.applied = self.precision.step(opt)
            opt.zero_grad(set_to_none=True)
            self.guard.ok()
            for key, message in self.grad_watch.update(s.norms, frozenset(self.ctx.no_grad_groups), values[0]):
                self.health.note(key, message)
        if self._param_watch is not None:  # the engine's own update (fused kernels may not bump versions)
            self._param_watch.snapshot()
            self._param_watch.window("", [], engine_step=True)
        s.metrics["grad_norm"] = total_norm
        for m in self.metrics:  # declared gradient norms of some groups (e.g. the prompt model's)
            if m.grad_norm_of:
                s.metrics[m.name] = math.sqrt(sum(s.norms.get(g, 0.0) ** 2 for g in m.grad_norm_of))

    def _stage_post_step_update(self, s: _Step) -> None:
        batch = s.batch
        encoding = s.encoding.detach() if s.encoding is not None else None
        result = StepResult(
            batch=batch,
            prompt=s.prompt.detach(),
            refined=s.refined.detach(),
            logits=s.logits.detach(),
            loss=s.loss_value,
            metrics=dict(s.metrics),
            applied=s.applied,
            predict=lambda prompt: self.predict_no_grad(prompt, batch, encoding),
            epoch=self.ctx.epoch,
            step=self.global_step,
            encoding=encoding,
            predict_many=lambda prompts: self.predict_many_no_grad(prompts, batch, encoding),
            micro_batch=s.index,
            micro_batches=max(1, len(self._micro)),
        )
        del s.loss  # the main graph is gone from here on
        for impl in self._impls.get("post_step_update", []):
            out = self._call("post_step_update", impl, result=result, ctx=self.ctx)
            if self.check_contracts:
                contracts.check_metrics(impl.plugin, "post_step_update", out)
            if out:
                self.metric_owners.logged(impl.plugin, out, "post_step_update")
                s.metrics.update(out)
        if self._param_watch is not None and self._param_watch.norms is not None:
            self._param_watch.window(f"in post_step_update of step {self.global_step + 1}", self.implementers("post_step_update"))

    def eval_loss(self, batch: Batch) -> float:
        """The summed ``compute_loss`` of ``batch`` (answers as targets) with the model as it is,
        contract-checked (use inside :meth:`evaluating`; validation during training)."""
        prompt, encoding = self.eval_encode(batch)
        logits = self.predict_no_grad(prompt, batch, encoding)
        total = torch.zeros((), device=self.device)
        for impl in self._impls.get("compute_loss", []):
            with self.precision.autocast():
                out: LossOutput = self._call("compute_loss", impl, logits=logits, batch=batch, ctx=self.ctx)
            if self.check_contracts:
                contracts.check_loss(impl.plugin, out, needs_grad=False)
            total = total + out.loss.detach().float()
        return float(total)

    def predict_no_grad(self, prompt: torch.Tensor, batch: Batch, encoding: TaskEncoding | None = None) -> torch.Tensor:
        """Run the predictor without gradient (post-step reward computation, evaluation).

        ``encoding``: the :class:`TaskEncoding` of ``batch``'s examples (from :meth:`eval_encode`),
        when the prompt plugin makes one; the batch's canvas may differ from the one it was made on."""
        impl = self._impls["predict"][0]
        with torch.no_grad(), self.precision.autocast():
            out = self._invoke("predict", impl, prompt=prompt, batch=batch, ctx=self.ctx, encoding=encoding)
        if self.check_contracts:
            contracts.check_logits(impl.plugin, out, batch.size, batch.canvas, self.device)
        logits: torch.Tensor = out.float()
        return logits

    def predict_many_no_grad(self, prompts: list[torch.Tensor], batch: Batch, encoding: TaskEncoding | None = None) -> list[torch.Tensor]:
        """:meth:`predict_no_grad` for several prompts of ``batch`` in one predictor call (the batch repeated)."""
        k = len(prompts)
        if k == 1:
            return [self.predict_no_grad(prompts[0], batch, encoding)]
        many = repeat_batch(batch, k)
        logits = self.predict_no_grad(torch.cat(prompts), many, encoding.repeat(k) if encoding is not None else None)
        return [logits[i * batch.size:(i + 1) * batch.size] for i in range(k)]

    # ------------------------------------------------------------------ helpers for the loop

    def call_all(self, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call every implementation of a non-step hook in role order."""
        out = []
        for impl in self._impls.get(hook, []):
            out.append((impl.plugin, self._call(hook, impl, ctx=self.ctx, **kwargs)))
        return out

    def implementers(self, hook: str) -> list[str]:
        """Names of the plugins that implement ``hook``, in role order."""
        return [impl.plugin for impl in self._impls.get(hook, [])]

    def call_plugin(self, hook: str, plugin: str, **kwargs: Any) -> Any:
        """Call one plugin's implementation of a non-step hook (``load_state_dict`` gets each plugin its own state)."""
        impl = next(i for i in self._impls.get(hook, []) if i.plugin == plugin)
        return self._call(hook, impl, ctx=self.ctx, **kwargs)

    def implements(self, hook: str) -> bool:
        """True if some plugin implements ``hook``."""
        return bool(self._impls.get(hook))

    # ------------------------------------------------------------------ data stage (before the step)

    def augment_example(self, example: Example, rng: np.random.Generator) -> Example:
        """Chain the ``augment_example`` hooks over one training example (None leaves it unchanged)."""
        for impl in self._impls.get("augment_example", []):
            out = self._call("augment_example", impl, example=example, rng=rng, ctx=self.ctx)
            if out is None:
                continue
            if self.check_contracts:
                contracts.check_example(impl.plugin, "augment_example", example, out)
            example = out
        return example

    # ------------------------------------------------------------------ evaluation (arcfw.core.commands.evaluate)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """No gradient, ``ctx.training`` False, the parameter groups' modules in eval mode; all restored after."""
        modules = [m for g in self.groups for m in g.modules]
        modes = [m.training for m in modules]
        was_training = self.ctx.training
        self.ctx.training = False
        try:
            for m in modules:
                m.eval()
            with torch.no_grad():
                yield
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
            self.ctx.training = was_training

    def eval_prompt(self, batch: Batch) -> torch.Tensor:
        """``generate_prompt`` then the ``refine`` chain, contract-checked (use inside :meth:`evaluating`)."""
        return self.eval_encode(batch)[0]

    def eval_encode(self, batch: Batch) -> tuple[torch.Tensor, TaskEncoding | None]:
        """The refined prompt and the prompt plugin's :class:`TaskEncoding` (None if it returns a bare
        tensor), contract-checked; use inside :meth:`evaluating` and pass both to :meth:`predict_no_grad`."""
        impl = self._impls["generate_prompt"][0]
        with self.precision.autocast():
            out = self._call("generate_prompt", impl, batch=batch, ctx=self.ctx)
            x, encoding = self._split_encoding(impl.plugin, out, batch, training=False)
            for impl in self._impls.get("refine", []):
                x = self._call("refine", impl, prompt=x, batch=batch, ctx=self.ctx)
                if self.check_contracts:
                    contracts.check_prompt(impl.plugin, "refine", x, batch.size, self.ctx.prompt_dim, self.device)
        prompt: torch.Tensor = x.float()
        return prompt, encoding

    def predict_shape(self, prompt: torch.Tensor, batch: Batch, encoding: TaskEncoding | None = None) -> torch.Tensor:
        """Ranked output sizes ``[B, K, 2]`` from the ``predict_shape`` hook, else the demo rule then the input size."""
        for impl in self._impls.get("predict_shape", []):
            out = self._call("predict_shape", impl, prompt=prompt, batch=batch, ctx=self.ctx, encoding=encoding)
            if out is not None:
                if self.check_contracts:
                    contracts.check_shapes(impl.plugin, out, batch.size)
                ranked: torch.Tensor = out
                return ranked
        return torch.stack([shapes.rule_shapes(batch), shapes.mask_shapes(batch.input_mask)], dim=1)

    def test_time_views(self, example: Example) -> list[View]:
        """Every plugin's extra views of an evaluation example, in role order."""
        views: list[View] = []
        for impl in self._impls.get("test_time_views", []):
            out = self._call("test_time_views", impl, example=example, ctx=self.ctx)
            if self.check_contracts:
                contracts.check_views(impl.plugin, example, out)
            views.extend(out or [])
        return views


def _combine(parts: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
    """The metrics of a step's micro-batches: each key's mean over the micro-batches that have it,
    weighted by their share of the examples (a key only one of them has keeps its value)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for w, metrics in parts:
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + w * float(v)
            weights[k] = weights.get(k, 0.0) + w
    return {k: sums[k] / weights[k] for k in sums}
