#!/usr/bin/env bash
# One device call for the routed-expert tiles: the kernels at flash shapes (bench/moe_tiles.py), prefill of the
# full flash preset with cublas (bench/prefill_flash.py), then the GPU tests of the expert kernels and of the
# engine against the oracle.
# Usage (device tool, carry .whl): bash bench/gpu_moe_tiles.sh
. bench/device_env.sh || exit 1
timeout 120 python3 bench/moe_tiles.py --tokens 512 --skew 0 2>&1 | grep -v Warn | tee "$OUT/moe_tiles_uniform.txt"
timeout 200 python3 bench/prefill_flash.py --strategies cublas --no-tables --out "$OUT" 2>&1 \
  | grep -E "synth|ctx 2048|rc |^2048"
timeout ${TEST_SECONDS:-200} python3 -m pytest -q -p no:cacheprovider -s tests/test_kernels_intrinsics.py \
  tests/test_engine.py tests/test_engine_graph.py tests/test_kernels_moe_grouped.py tests/test_kernels_moe.py 2>&1 \
  | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|Error|assert|oracle|T=|  gate_up|  down" | tail -30
