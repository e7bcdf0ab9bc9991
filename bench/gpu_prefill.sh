#!/usr/bin/env bash
# One device call for the prefill issue: GPU tests of the Q8_0 matmul strategies, the kernels at the model's
# shapes against cuBLAS's measured peak, then prefill through the engine per strategy and chunk size.
# Usage (device tool, carry .whl): bash bench/gpu_prefill.sh [LAYERS] [STRATEGIES] [TESTS]
. bench/device_env.sh || exit 1
tests=${3:-}
if [ "$tests" != 0 ]; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_q8_0.py tests/test_kernels_parity.py \
    tests/test_kernels_model_ops.py tests/test_kernels_cublas.py tests/test_engine.py tests/test_engine_graph.py \
    tests/test_engine_cublas.py tests/test_dispatch_select.py tests/test_kernels_moe_grouped.py \
    tests/test_placement_engine.py -s ${tests:+-k "$tests"} 2>&1 \
    | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|Error|assert|tokens == oracle|rel. error|cublas vs" | tail -14
  timeout 60 python3 -m ds4nb dispatch 2>&1 | tail -12
fi
[ "${KERNELS:-1}" = 1 ] && timeout 150 python3 bench/prefill.py kernels --out "$OUT" 2>&1 | grep -v "Warning\|warn("
timeout 400 python3 bench/prefill.py engine --layers "${1:-4}" --strategies "${2:-warp8,mmq,cublas}" \
  --chunks ${CHUNKS:-512} --out "$OUT" 2>&1 \
  | grep -v "Warning\|warn("
