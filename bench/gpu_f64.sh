#!/usr/bin/env bash
# One device call for the FP64 tensor-core kernels: the float64 products of a prefill chunk at flash shapes
# (bench/f64_mma.py) and their GPU tests; with FLASH=1 also the engine's GPU tests (bit-identical to the oracle)
# and the full flash preset's prefill (bench/prefill_flash.py, cublas); with ENGINE=1 a 4-layer flash prefill
# with its per-family GPU time (bench/prefill.py engine).
# Usage (device tool, carry .whl): [FLASH=1] [ENGINE=1] bash bench/gpu_f64.sh
. bench/device_env.sh || exit 1
timeout 150 python3 bench/f64_mma.py --out "$OUT" 2>&1 | grep -v "Warn\|warn("
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_intrinsics.py tests/test_kernels_model_ops.py \
  -k "mma or prefill_tiles or gemm or hc_pre" 2>&1 | tail -4
if [ -n "${FLASH:-}" ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider -s tests/test_engine.py tests/test_engine_graph.py 2>&1 \
    | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|Error|assert" | tail -8
  timeout 260 python3 bench/prefill_flash.py --strategies cublas --no-tables --out "$OUT" 2>&1 \
    | grep -E "synth|rc |^2048|ctx"
fi
if [ -n "${ENGINE:-}" ]; then
  timeout 200 python3 bench/prefill.py engine --layers 4 --strategies cublas --chunks 512 --out "$OUT" 2>&1 \
    | grep -v "Warn\|warn("
fi
exit 0
