#!/usr/bin/env bash
# One device call that times the decode step of two trees side by side on one machine start: this tree and
# BASE (another tree exported into the repo, e.g. `git archive decode-folds | tar -x -C scratch/other`,
# carried), alternating A B A B so clock drift shows, on one synthetic flash model (LAYERS layers, default 20,
# written once to /dev/shm).  Prints each run's graph decode t/s and GPU ms a token.  Usage (carry .whl, BASE):
#   bash bench/gpu_ab.sh BASE [LAYERS]
. bench/device_env.sh || exit 1
base=${1:?BASE tree}
layers=${2:-20}
for round in 1 2; do
  for tree in . "$base"; do
    name=$( [ "$tree" = . ] && echo this || echo "$base" )
    (cd "$tree" && PYTHONPATH=/tmp/site:$PWD timeout 240 python3 bench/engine.py flash --layers "$layers" \
       --ctx-start 2048 --ctx-max 2048 --gen 16 --bw-bytes 1073741824 --out "$OUT/ab_${round}_$(basename "$name")") \
      2>&1 | grep -E "^decode" | sed "s|^|$name (round $round): |"
  done
done
