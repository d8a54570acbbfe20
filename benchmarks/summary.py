"""Print the derived figures (``extra_info``) of a pytest-benchmark JSON file, one benchmark a line.

    python benchmarks/summary.py .benchmarks/*/0001_*.json
"""

from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    data = json.load(open(path, encoding="utf-8"))
    machine = data.get("machine_info", {})
    print(f"{path}: {machine.get('cpu', {}).get('brand_raw', '?')}, {data.get('datetime', '?')}")
    for b in data["benchmarks"]:
        info = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in b["extra_info"].items())
        print(f"  {b['name']:<48} median {1e3 * b['stats']['median']:8.2f} ms  {info}")


if __name__ == "__main__":
    for arg in sys.argv[1:] or sys.exit(__doc__):
        main(arg)
