"""Roles and hooks, declared once.

:data:`ROLE_TABLE` says, for every role, which hooks it is there to fill and how
many plugins may fill it; :data:`HOOK_TABLE` says, for every hook, how the
results of several implementations combine and how many implementations there
may be.  The engine (build-time checks, role order), ``arcfw check``, the
registry (``arcfw plugins``), the config validation and ``docs/plugins.md``
(checked against :func:`markdown_roles` and :func:`markdown_combine` by a test)
all read these tables; nothing else states these facts.

Implementations of a hook are always called in *role order*: the roles in the
order of :data:`ROLE_TABLE`, then the ``extra`` plugins in config order.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Combine(str, Enum):
    """How the results of several implementations of one hook combine."""

    ONE = "exactly one"  #: exactly one plugin implements it; its result is used
    FIRST = "first non-None"  #: called in role order until one returns something other than None
    CHAINED = "chained"  #: each implementation receives the previous one's output
    SUMMED = "summed"  #: losses add up, metrics merge
    COLLECTED = "collected"  #: lists are concatenated, dicts merged (later keys win)
    ALL = "all"  #: every implementation is called; results are ignored
    PER_PLUGIN = "per plugin"  #: called for each plugin on its own (its own state)


@dataclass(frozen=True)
class HookRule:
    name: str
    combine: Combine
    #: what the engine does when no plugin implements it
    when_none: str = "nothing"


@dataclass(frozen=True)
class Role:
    name: str
    #: the hooks a plugin of this role is there to implement (it may implement any other hook too)
    hooks: tuple[str, ...]
    #: the most plugins the role's config slot takes (None: a list, any number)
    at_most: int | None
    #: whether a config must fill it
    required: bool
    description: str


#: Every hook and how its implementations combine.
HOOK_TABLE: dict[str, HookRule] = {
    h.name: h
    for h in (
        HookRule("configure", Combine.ALL),
        HookRule("parameter_groups", Combine.COLLECTED, "no trainable group"),
        HookRule("augment_example", Combine.CHAINED, "the example is unchanged"),
        HookRule("hard_cell_threshold", Combine.FIRST, "ctx.schedule has no threshold; the loss uses its default"),
        HookRule("generate_prompt", Combine.ONE, "config error"),
        HookRule("refine", Combine.CHAINED, "the prompt passes through unchanged"),
        HookRule("predict", Combine.ONE, "config error"),
        HookRule("predict_shape", Combine.FIRST, "the demo-pair rule, then the input size"),
        HookRule("compute_loss", Combine.SUMMED, "error at the first step"),
        HookRule("post_step_update", Combine.COLLECTED),
        HookRule("test_time_views", Combine.COLLECTED, "the example itself only"),
        HookRule("on_epoch_start", Combine.ALL),
        HookRule("on_epoch_end", Combine.COLLECTED),
        HookRule("log_metrics", Combine.ALL),
        HookRule("on_train_end", Combine.ALL),
        HookRule("state_dict", Combine.PER_PLUGIN),
        HookRule("load_state_dict", Combine.PER_PLUGIN),
    )
}

#: Role of plugins listed under ``plugins.extra`` (loggers, augmentation, custom losses...).
EXTRA_ROLE = "extra"

#: Every role, in role order.
ROLE_TABLE: dict[str, Role] = {
    r.name: r
    for r in (
        Role("prompt", ("generate_prompt",), 1, True, "demonstrations + query input -> prompt embedding [B, D]"),
        Role("refine", ("refine",), 1, False, "prompt -> refined prompt [B, D], keeping the gradient path"),
        Role("predictor", ("predict", "predict_shape"), 1, True, "refined prompt + query input -> logits [B, H, W, 10]"),
        Role("loss", ("compute_loss",), 1, True, "logits + targets -> LossOutput"),
        Role("curriculum", ("hard_cell_threshold",), 1, False, "the hard-cell threshold of each step"),
        Role(EXTRA_ROLE, (), None, False, "anything else (loggers, augmentation, auxiliary losses), in config order"),
    )
}

#: The roles with a single config slot, in role order (``extra`` is a list and comes last).
ROLES: tuple[str, ...] = tuple(r for r in ROLE_TABLE if r != EXTRA_ROLE)
#: Roles a config must fill.
REQUIRED_ROLES: tuple[str, ...] = tuple(r.name for r in ROLE_TABLE.values() if r.required)


def role_order(role: str) -> int:
    """Position of ``role`` in role order (unknown roles last)."""
    names = list(ROLE_TABLE)
    return names.index(role) if role in names else len(names)


def step_hook(role: str) -> str:
    """The hook through which a plugin of ``role`` puts its parameter groups in the main graph
    (for messages about a cut gradient path); ``"its hooks"`` for roles without one."""
    hooks = ROLE_TABLE[role].hooks if role in ROLE_TABLE else ()
    return hooks[0] if hooks else "its hooks"


def markdown_roles() -> str:
    """The role table of ``docs/plugins.md`` (a test keeps the two identical)."""
    rows = ["| role | hooks it fills | plugins | required | what |", "|---|---|---|---|---|"]
    for r in ROLE_TABLE.values():
        hooks = ", ".join(f"`{h}`" for h in r.hooks) or "any"
        count = "a list, any number" if r.at_most is None else f"exactly {r.at_most}" if r.required else f"0 to {r.at_most}"
        rows.append(f"| `{r.name}` | {hooks} | {count} | {'yes' if r.required else 'no'} | {r.description} |")
    return "\n".join(rows)


def markdown_combine() -> str:
    """The hook-combination table of ``docs/plugins.md`` (a test keeps the two identical)."""
    rows = ["| hook | several implementations | with none |", "|---|---|---|"]
    for h in HOOK_TABLE.values():
        rows.append(f"| `{h.name}` | {h.combine.value} | {h.when_none} |")
    return "\n".join(rows)
