#!/usr/bin/env bash
# One device call for placement: GPU tests (tokens and logits equal to the oracle's, graph == eager, identical
# logits across full / partial / direct on `small`, the decode step's kernels at DS4 shapes: HC, norms,
# attention, routed experts and their staging), then bench/placement.py.  Usage (device tool, carry .whl):
#   bash bench/gpu_placement.sh [LAYERS]
. bench/device_env.sh || exit 1
free -g | head -2
timeout 330 python3 -m pytest -q -rA -p no:cacheprovider tests/test_engine_graph.py tests/test_engine.py \
  tests/test_placement_engine.py tests/test_kernels_model_ops.py tests/test_kernels_parity.py \
  -k "engine or graph or placements or hc or rms or norm or attn or attention or quantize or moe or stage or split" \
  2>&1 | tee "$OUT/gpu_tests.log" | grep -E "PASSED.*(small|placements)|passed|failed|FAILED|Error" | tail -12
timeout 300 python3 bench/placement.py --layers "${1:-20}" --out "$OUT" 2>&1 | grep -v "Warning\|warn("
