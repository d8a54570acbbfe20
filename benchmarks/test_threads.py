"""CPU threads: the default (``threads: null``, auto) against 1 and 2 threads, on the batches a run of
``configs/default.yaml`` sees; with ``--busy``, beside one competing busy process (``python -c 'while
True: pass'``, started before and killed after each benchmark).  Run without ``OMP_NUM_THREADS`` (it is
what ``threads: null`` defers to when set)::

    env -u OMP_NUM_THREADS .venv/bin/python -m pytest benchmarks/test_threads.py --benchmark-group-by=func --busy

The target (issue 14): with one busy process, the default within 1.3x of the best thread count.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from conftest import engine_for, run_order


@pytest.fixture
def busy(request: pytest.FixtureRequest) -> Iterator[subprocess.Popen[bytes] | None]:
    if not request.config.getoption("--busy"):
        yield None
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("threads", [None, 1, 2], ids=["auto", "threads1", "threads2"])
def test_threads(benchmark, steps_of, arc_examples, busy, threads):
    before = torch.get_num_threads()
    try:
        eng = engine_for(threads=threads)
        benchmark.extra_info.update({"threads": torch.get_num_threads(), "busy_process": busy is not None})
        steps_of(eng, run_order(arc_examples, 1), rounds=30, warmup=5)
    finally:
        torch.set_num_threads(before)
