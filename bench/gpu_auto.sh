#!/usr/bin/env bash
# One device call after a change to prefill or decode kernels: the full flash preset's ds4nb bench at ctx 2048
# with DS4_CUDA_PREFILL_PATH=auto (the dispatcher's choice; bench/prefill_flash.py), the engine's GPU tests
# against the oracle, the HC / attention kernels at model shapes, then a 4-layer flash prefill with its GPU time
# per op family and kernel (bench/prefill.py engine, chunk ${CHUNK:-1024}).
# Usage (device tool, carry .whl): bash bench/gpu_auto.sh
. bench/device_env.sh || exit 1
timeout 200 python3 bench/prefill_flash.py --strategies auto --no-tables --out "$OUT" 2>&1 \
  | grep -E "synth|rc |^ctx|decode:" | cut -c1-200
timeout 230 python3 -m pytest -q -p no:cacheprovider -s tests/test_engine.py tests/test_engine_graph.py \
  "tests/test_kernels_parity.py::test_parity_model_shapes" -k "not parity or hc or attn or grouped" 2>&1 \
  | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|Error|assert|oracle" | tail -12
timeout 120 python3 bench/prefill.py engine --layers 4 --strategies cublas --chunks "${CHUNK:-1024}" --out "$OUT" 2>&1 \
  | grep -v "Warn\|warn("
