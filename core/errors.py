"""One exception family for everything a user can get wrong.

The CLI turns any :class:`ArcfwError` into one line on stderr and exit code 2
(``--debug`` shows the traceback).  Engine-detected bugs in plugins
(contract violations, cut gradient paths, order violations) are also
``ArcfwError`` subclasses so that they read as a diagnosis, not a crash.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name if it has none), without a final '.'."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__).rstrip(".")


class ArcfwError(Exception):
    """Base class. ``str(err)`` is the one line the user sees."""

    exit_code = 2
    kind = "error"

    def __str__(self) -> str:  # pragma: no cover - trivial
        return " ".join(str(a) for a in self.args)


class ConfigError(ArcfwError):
    """A configuration file or override is wrong.

    ``problems`` is a list of ``(key, message)``; all of them are reported at once.
    """

    kind = "config error"

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = list(problems)
        where = f"{source}: " if source else ""  # no source: each key names its own origin
        if len(self.problems) == 1:
            key, msg = self.problems[0]
            text = f"{where}{key}: {msg}" if key else f"{where}{msg}"
        else:
            parts = [f"({i}) {k}: {m}" if k else f"({i}) {m}" for i, (k, m) in enumerate(self.problems, 1)]
            text = f"{where}{len(self.problems)} problems: " + "; ".join(parts)
        super().__init__(text)


class DataError(ArcfwError):
    """ARC data is missing or malformed. Names the file, task and pair."""

    kind = "data error"

    def __init__(self, message: str, *, file: str | None = None, task: str | None = None, pair: str | None = None):
        self.file, self.task, self.pair = file, task, pair
        where = ", ".join(x for x in (file, f"task {task}" if task else None, pair) if x)
        super().__init__(f"{where}: {message}" if where else message)


class PluginError(ArcfwError):
    """A plugin cannot be found, loaded or constructed."""

    kind = "plugin error"


class HookFailure(PluginError):
    """An ordinary exception raised inside a plugin's hook: one line naming the plugin, the hook and the
    error (the original exception is chained, so ``--debug`` shows its full traceback)."""

    kind = "plugin error"

    def __init__(self, plugin: str, hook: str, exc: BaseException):
        self.plugin, self.hook, self.original = plugin, hook, exc
        text = " ".join(first_line(exc).split())
        text = text if len(text) <= 300 else text[:300].rsplit(" ", 1)[0] + " ..."
        super().__init__(f"plugin '{plugin}' failed in hook '{hook}': {type(exc).__name__}: {text}")


class ContractError(ArcfwError):
    """A hook implementation returned something that breaks the hook's contract."""

    kind = "contract violation"

    def __init__(self, plugin: str, hook: str, expected: str, got: str, hint: str = ""):
        self.plugin, self.hook, self.expected, self.got = plugin, hook, expected, got
        text = f"plugin '{plugin}' broke the contract of hook '{hook}': expected {expected}, got {got}"
        if hint:
            text += f". {hint}"
        super().__init__(text)


class GradientPathError(ArcfwError):
    """Trainable parameters upstream of a hook no longer receive gradient."""

    kind = "gradient path cut"


class OrderError(ArcfwError):
    """A plugin tried to do something outside its place in the step order."""

    kind = "step order violation"


class PrecisionError(ArcfwError):
    """An impossible precision / dtype / device combination."""

    kind = "precision error"


class TrainingHalted(ArcfwError):
    """Training was stopped by a health policy (non-finite values, dead gradients)."""

    kind = "training halted"


class CheckpointError(ArcfwError):
    """A checkpoint cannot be written, read or trusted."""

    kind = "checkpoint error"


class MissingExtra(ArcfwError):
    """A feature needs an optional dependency that is not installed (the message names the extra)."""

    kind = "missing dependency"


class DistributedError(ArcfwError):
    """A multi-process run cannot start or continue (process group, ranks, devices)."""

    kind = "distributed error"


class Interrupted(ArcfwError):
    """The run stopped on SIGINT/SIGTERM after saving a checkpoint.

    The exit code is the shell's for the signal (``128 + signum``: 130 for
    SIGINT, 143 for SIGTERM), so a scheduler sees an interrupted run, not a
    failed one; the message says how to resume.
    """

    kind = "interrupted"

    def __init__(self, signum: int, message: str):
        self.signum = signum
        self.exit_code = 128 + int(signum)
        super().__init__(message)
