#!/usr/bin/env bash
# One device call for a decode-kernel change: its GPU tests, bench/kernels.py's table for it (ONLY; "-": none),
# then bench/gpu_ab_placement.sh BASE (decode t/s under `full` and the 70 GB share: this tree, BASE, this tree).
# Usage (device tool, carry .whl and BASE):  bash bench/gpu_decode_ab.sh ONLY "TESTS [-k EXPR]" BASE
. bench/device_env.sh || exit 1
only=$1; tests=$2; base=$3
eval "timeout 240 python3 -m pytest -q -p no:cacheprovider $tests" 2>&1 | tee "$OUT/gpu_tests.log" \
  | grep -E "passed|failed|Error|assert" | tail -6
[ "$only" = - ] || timeout 150 python3 bench/kernels.py --only $only --reps 20 --rounds 9 --out "$OUT/kernels" 2>&1 \
  | grep -E "^[a-z0-9_]+\.[a-z_0-9]+ |device|FAILED" | cut -c1-130
bash bench/gpu_ab_placement.sh "$base"
