#!/usr/bin/env bash
# One device call for placement and the decode step around it: GPU tests (graph == eager == oracle with early
# launches, chained decode == step by step, identical logits across full / partial / direct on `tiny` and
# `small` with staged and prefetched experts, stage / split / hash-selection kernels), then bench/placement.py.
# Usage (device tool, carry .whl):  bash bench/gpu_placement.sh [LAYERS] [PLACEMENT ARGS...]
. bench/device_env.sh || exit 1
layers=${1:-20}
shift || true
free -g | head -2
timeout 280 python3 -m pytest -q -x -p no:cacheprovider tests/test_engine_step.py tests/test_engine_graph.py \
  tests/test_placement_engine.py tests/test_kernels_parity.py tests/test_kernels_moe.py \
  -k "not parity or stage or split" 2>&1 | tee "$OUT/gpu_tests.log" | tail -3
timeout 420 python3 bench/placement.py --layers "$layers" --out "$OUT" "$@" 2>&1 | grep -v "Warning\|warn("
