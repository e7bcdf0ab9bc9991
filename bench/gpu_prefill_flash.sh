#!/usr/bin/env bash
# The prefill issue's measurement on the full flash preset (43 layers): ds4nb bench at ctx 2048 per Q8_0
# strategy (DS4_CUDA_PREFILL_PATH), the dispatcher's measured table, the matmul kernels against cuBLAS's
# measured tensor-core peak (bench/prefill_flash.py), then the GPU tests not yet run on this version.
# Usage (device tool, carry .whl): bash bench/gpu_prefill_flash.sh
. bench/device_env.sh || exit 1
MODEL=/dev/shm/flash-43L.gguf
timeout 330 python3 bench/prefill_flash.py --model "$MODEL" --out "$OUT" 2>&1 | grep -v "Warning\|warn("
timeout ${TEST_SECONDS:-240} python3 -m pytest -q -p no:cacheprovider -s tests/test_engine.py tests/test_engine_graph.py \
  tests/test_engine_cublas.py tests/test_placement_engine.py tests/test_kernels_moe_grouped.py \
  "tests/test_kernels_parity.py::test_parity_model_shapes" -k "not parity or grouped" 2>&1 \
  | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|Error|assert|cublas vs|oracle|T=|  gate_up|  down" | tail -40
