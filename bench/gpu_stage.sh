#!/usr/bin/env bash
# One device call for host-mapped experts: the routed-expert kernels reading them in place against
# moe.stage_experts copying them (bench/kernels.py --only host), bench/placement.py, then the GPU tests of
# placement and staging.  Usage (device tool, carry .whl):  bash bench/gpu_stage.sh [LAYERS]
. bench/device_env.sh || exit 1
timeout 120 python3 bench/kernels.py --only host --out "$OUT/kernels" 2>&1 | grep -v "Warning\|warn(" | tail -12
timeout 300 python3 bench/placement.py --layers "${1:-20}" --out "$OUT/placement" 2>&1 | grep -v "Warning\|warn("
rm -f /dev/shm/*.gguf
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_placement_engine.py tests/test_kernels_parity.py \
  -k "placements or stage or split" 2>&1 | tee "$OUT/gpu_tests.log" | tail -3
