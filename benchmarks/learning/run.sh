#!/usr/bin/env bash
# Does the default pipeline learn rules from the demonstrations?  (benchmarks/README.md, "Does it learn?")
#   benchmarks/learning/run.sh [FAMILY ...]     (default: the 13 families below)
# Writes 10 training tasks per family (seed 0) and 5 new tasks per family (seed 1, never trained on),
# trains benchmarks/learning/families.yaml on the first folder and scores both with arcfw eval.
set -euo pipefail
cd "$(dirname "$0")/../.."
families=("$@")
[ ${#families[@]} -gt 0 ] || families=(copy swap12 colour_map fill_bg flip_h flip_v rot180 gravity_down rot90 transpose scale tile crop)
arcfw generate "${families[@]}" --tasks 10 --seed 0 --out runs/learning/train --overwrite
arcfw generate "${families[@]}" --tasks 5 --seed 1 --out runs/learning/new --overwrite
/usr/bin/time -f "train: %e s wall, %M KiB peak" arcfw run benchmarks/learning/families.yaml --overwrite -q
arcfw eval benchmarks/learning/families.yaml --checkpoint runs/learning/run --data runs/learning/new --out runs/learning/eval-new --overwrite -q
arcfw eval benchmarks/learning/families.yaml --checkpoint runs/learning/run --data runs/learning/train --allow-overlap --out runs/learning/eval-own --overwrite -q
