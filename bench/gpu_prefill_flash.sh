#!/usr/bin/env bash
# The prefill issue's measurement on the full flash preset (43 layers): ds4nb bench at ctx 2048 per Q8_0
# strategy (DS4_CUDA_PREFILL_PATH), the dispatcher's measured table, the matmul kernels against cuBLAS's
# measured tensor-core peak, then the GPU tests not yet run on this version.
# Usage (device tool, carry .whl): bash bench/gpu_prefill_flash.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
MODEL=/dev/shm/flash-43L.gguf
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
t0=$(date +%s)
python3 -c "from ds4nb.model.synth import write_synthetic; write_synthetic('$MODEL', 'flash', seed=1)"
echo "synth: $(( $(date +%s) - t0 )) s"
for s in ${STRATEGIES:-cublas mmq warp8}; do
  t0=$(date +%s)
  DS4_CUDA_PREFILL_PATH=$s timeout 150 python3 -m ds4nb bench -m "$MODEL" --ctx-start 2048 --ctx-max 2048 \
    --gen-tokens 32 --csv "$OUT/bench_flash_$s.csv" 2>&1 | grep -v "Warning\|warn(" | tail -4
  echo "$s: $(( $(date +%s) - t0 )) s"; cat "$OUT/bench_flash_$s.csv"
done
timeout 30 python3 -m ds4nb dispatch -m "$MODEL" 2>&1 | tee "$OUT/dispatch.txt" | tail -12
timeout 60 python3 bench/prefill.py kernels --tokens 512 2048 --reps 5 --out "$OUT" 2>&1 | grep -v "Warning\|warn("
timeout ${TEST_SECONDS:-120} python3 -m pytest -q -p no:cacheprovider -s tests/test_kernels_model_ops.py \
  tests/test_engine_cublas.py tests/test_placement_engine.py tests/test_kernels_moe_grouped.py 2>&1 \
  | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|Error|assert|cublas vs" | tail -8
