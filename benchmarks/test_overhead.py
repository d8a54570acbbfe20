"""Engine overhead: the engine's step against the same step written out by hand (plain_loop.py).

Both run the default plugins on the same batches in lockstep, from the same seed
(so they do exactly the same computation; their weights are checked equal at the
end).  Each round runs one engine step and one plain step, alternating which
goes first; ``extra_info`` holds the median of each and the overhead
``engine / plain - 1`` (from the medians, and the median of the per-round ratios).
"""

from __future__ import annotations

import statistics
import time
from itertools import islice

import pytest
import torch
from conftest import engine_for, run_order
from plain_loop import plain_step


@pytest.mark.parametrize("check_contracts", [True, False], ids=["contracts-on", "contracts-off"])
def test_engine_vs_plain_loop(benchmark, arc_examples, check_contracts):
    rounds, warmup = 200, 5
    overrides = {"health.check_contracts": check_contracts}
    eng, plain = engine_for(**overrides), engine_for(**overrides)
    batches = list(islice(run_order(arc_examples, 1), warmup + rounds))
    times: dict[str, list[float]] = {"engine": [], "plain": []}
    cpu: dict[str, list[float]] = {"engine": [], "plain": []}  # the process's CPU time: less moved by a loaded machine
    step = 0

    def run(which: str) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        if which == "engine":
            eng.train_step(batches[step])
        else:
            plain_step(plain, batches[step], step)
        times[which].append(time.perf_counter() - t0)
        cpu[which].append(time.process_time() - c0)

    def both() -> None:
        nonlocal step
        for which in (("engine", "plain") if step % 2 else ("plain", "engine")):
            run(which)
        step += 1

    for _ in range(warmup):
        both()
    times, cpu = {"engine": [], "plain": []}, {"engine": [], "plain": []}
    benchmark.pedantic(both, rounds=rounds, iterations=1)

    for g, h in zip(eng.groups, plain.groups):  # the same computation, or the comparison means nothing
        assert all(torch.equal(p, q) for p, q in zip(g.params, h.params)), g.name
    if not times["engine"] or len(times["engine"]) != len(times["plain"]):
        return  # --benchmark-disable
    e, p = statistics.median(times["engine"]), statistics.median(times["plain"])
    benchmark.extra_info.update({
        "engine_median_ms": 1e3 * e,
        "plain_median_ms": 1e3 * p,
        "overhead_of_medians": e / p - 1,
        "overhead_paired_median": statistics.median(a / b for a, b in zip(times["engine"], times["plain"])) - 1,
        "overhead_paired_median_cpu": statistics.median(a / b for a, b in zip(cpu["engine"], cpu["plain"]) if b > 0) - 1,
    })
