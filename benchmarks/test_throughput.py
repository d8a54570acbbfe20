"""Steps/s and pairs/s of the default pipeline on CPU: batch size, prompt cache, torch.compile.

Each benchmark is one training step per round, on the batches a run of
``configs/default.yaml`` sees; pairs/s (from the mean step time), the share of
prompts taken from the cache and the peak RSS are in ``extra_info``.
"""

from __future__ import annotations

import dataclasses

import pytest
from conftest import engine_for, repeated_order, run_order

NO_CACHE = {"plugins.prompt.cache_every": 1}


@pytest.mark.parametrize(
    "batch_size,batching,rounds",
    [(1, "auto", 100), (4, "auto", 30), (16, "auto", 10), (16, "padded", 6)],
    ids=["b1", "b4", "b16", "b16-padded"],
)
def test_batch_size(steps_of, arc_examples, batch_size, batching, rounds):
    """Uncached steps at batch size 1, 4, 16 (Qwen per example on CPU, and padded for comparison)."""
    eng = engine_for(batch_size=batch_size, **NO_CACHE, **{"plugins.prompt.batching": batching})
    steps_of(eng, run_order(arc_examples, batch_size), rounds=rounds, warmup=3)


@pytest.mark.parametrize("cache_every", [1, 10], ids=["uncached", "cache10"])
def test_cache_default_data(steps_of, arc_examples, cache_every):
    """Batch size 1 in the default config's own order: each of the 3232 pairs once per epoch, so no hit."""
    eng = engine_for(**{"plugins.prompt.cache_every": cache_every})
    steps_of(eng, run_order(arc_examples, 1), rounds=100, warmup=5)


@pytest.mark.parametrize("cache_every", [1, 10], ids=["uncached", "cache10"])
def test_cache_repeated_pairs(steps_of, arc_examples, cache_every):
    """Batch size 1, each pair 10 times in a row (20 pairs in run order): the cache's best case,
    one refresh and nine reuses per pair, as when a few pairs are trained over and over."""
    eng = engine_for(**{"plugins.prompt.cache_every": cache_every})
    steps_of(eng, repeated_order(arc_examples, 10), rounds=200, warmup=0)


def test_cache_demos_free(steps_of, arc_examples):
    """Ceiling of caching only the shared part, the demonstrations' encoding: batch size 1, uncached,
    each pair's demonstrations removed, so that Qwen reads the query input alone (189 tokens on average
    instead of 565).  A real demonstration cache can only be slower than this: its query still attends
    to the cached demonstrations, and stale entries have to be recomputed."""
    eng = engine_for(**NO_CACHE)
    queries = [dataclasses.replace(e, demos=()) for e in arc_examples]
    steps_of(eng, run_order(queries, 1), rounds=100, warmup=5)


#: a task of 3 pairs whose prompts are 555 tokens long on average (the data set's mean is 553)
ONE_TASK = "e681b708"


@pytest.mark.parametrize("cache_every", [1, 10], ids=["uncached", "cache10"])
def test_cache_one_task(steps_of, arc_examples, cache_every):
    """Batch size 1 on one task's 3 pairs, epoch after epoch (test-time training on a task):
    each pair comes back every few steps, so most prompts are reused two or three times."""
    eng = engine_for(**{"plugins.prompt.cache_every": cache_every})
    pairs = [e for e in arc_examples if e.task_id == ONE_TASK]
    steps_of(eng, run_order(pairs, 1), rounds=120, warmup=3)


@pytest.mark.compile
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_compile(steps_of, arc_examples, compiled):
    """``compile: true`` at batch size 1, uncached; the warm-up steps include compiling."""
    eng = engine_for(compile=compiled, **NO_CACHE)
    steps_of(eng, run_order(arc_examples, 1), rounds=60, warmup=30)
