#!/usr/bin/env bash
# One device call for placement: GPU tests (identical logits across full / partial / direct on `small`, split
# experts, mapped loading), then bench/placement.py.  Usage (device tool, carry .whl):
#   bash bench/gpu_placement.sh [LAYERS]
. bench/device_env.sh || exit 1
free -g | head -2
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_placement_engine.py tests/test_residency.py \
  tests/test_kernels_moe.py -k "placements or split or load or repack" 2>&1 | tee "$OUT/gpu_tests.log" | tail -3
timeout 480 python3 bench/placement.py --layers "${1:-20}" --out "$OUT" 2>&1 | grep -v "Warning\|warn("
