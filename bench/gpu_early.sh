#!/usr/bin/env bash
# One device call for early (programmatic dependent) launches: the kernel-boundary microbenchmark, the decode
# step of a LAYERS-layer flash model (default 20) timed with early launches off and on (A B A B, bench/engine.py),
# then the GPU tests that hold early launches to the oracle (graph == eager == oracle, the recorder's rule on a
# real stream, identical logits across placements).  Usage (carry .whl):  bash bench/gpu_early.sh [LAYERS]
. bench/device_env.sh || exit 1
layers=${1:-20}
timeout 120 python3 bench/launch_gap.py 2>&1 | tail -8
timeout 300 python3 bench/engine.py flash --layers "$layers" --ctx-start 2048 --ctx-max 2048 --gen 16 \
  --bw-bytes 1073741824 --out "$OUT/engine" 2>&1 | grep -E "^(decode|early launch|roofline|load|bandwidth)"
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_engine_step.py tests/test_engine_graph.py \
  tests/test_placement_engine.py 2>&1 | tail -4
