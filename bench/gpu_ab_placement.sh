#!/usr/bin/env bash
# One device call that compares two trees' decode under placements on one machine start: bench/placement.py
# (full and the 70 GB share by default) in this tree, in BASE (another tree exported into the repo and carried,
# e.g. `git archive BRANCH | tar -x -C scratch/other`), and in this tree again (A B A: drift shows).
# Usage (carry .whl, BASE):  bash bench/gpu_ab_placement.sh BASE [LAYERS] [ONLY]
. bench/device_env.sh || exit 1
base=${1:?BASE tree}
layers=${2:-20}
only=${3:-full,70 GB}
for tree in . "$base" .; do
  name=$( [ "$tree" = . ] && echo this || echo "$base" )
  (cd "$tree" && PYTHONPATH=/tmp/site:$PWD timeout 200 python3 bench/placement.py --layers "$layers" --only "$only" \
     --out "$OUT/$(basename "$name")_$RANDOM") 2>&1 | grep -E "^placement|read bandwidth" | sed "s|^|$name: |"
done
