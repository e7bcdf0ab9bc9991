#!/usr/bin/env bash
# One device call for the CUDA-graph decode step: GPU correctness (graph == eager == oracle, kernel parity at
# DS4 shapes), then the flash benchmark (bench/engine.py flash).  Usage (device tool, carry .whl):
#   bash bench/gpu_decode.sh [LAYERS] [TESTS]     LAYERS: flash layers (default 43); TESTS: a pytest -k expression
#   selecting the GPU tests to run first (default: all of them), 0 to skip them
. bench/device_env.sh || exit 1
layers=${1:-43}
python3 -c "import numba_cuda, cuda.core, numpy; print('numba-cuda', numba_cuda.__version__, 'cuda.core', cuda.core.__version__, 'numpy', numpy.__version__)"
tests=${2:-}
if [ "$tests" != 0 ]; then
  timeout 330 python3 -m pytest -q -s -p no:cacheprovider tests/test_engine_graph.py tests/test_engine.py \
    tests/test_residency.py tests/test_kernels_model_gpu.py tests/test_kernels_parity.py tests/test_kernels_model_ops.py \
    ${tests:+-k "$tests"} 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "tokens == oracle|rel. error|passed|failed|Error|assert" | tail -12
fi
timeout 500 python3 bench/engine.py flash --layers "$layers" --out "$OUT" 2>&1 | grep -v "Warning\|warn("
