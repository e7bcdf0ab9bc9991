#!/usr/bin/env bash
# One device call for the decode step's latency-bound kernels: the engine's GPU tests (tokens and logits equal to
# the oracle's, graph == eager) and the kernels' GPU parity tests at DS4 shapes, the kernel
# table of bench/kernels.py (decode cases, and the routed-expert ones), for this tree and, given BASE (an
# exported older tree, e.g. `git archive HEAD | tar -x -C scratch/base`, carried), for that tree in the same
# call; then the engine's per-kernel decode profile on a LAYERS-layer flash model.  Usage (carry .whl):
#   bash bench/gpu_decode_kernels.sh [BASE] [LAYERS]
. bench/device_env.sh || exit 1
base=${1:-}
layers=${2:-8}
timeout 330 python3 -m pytest -q -s -p no:cacheprovider tests/test_engine_graph.py tests/test_engine.py \
  tests/test_kernels_model_gpu.py tests/test_kernels_model_ops.py tests/test_kernels_attention_mma.py \
  tests/test_kernels_q8_0.py tests/test_kernels_parity.py \
  -k "engine or graph or attn or attention or f16 or hc or sinkhorn or compressor or router or q8_0 or matvec" 2>&1 \
  | tee "$OUT/gpu_tests.log" | grep -E "tokens == oracle|passed|failed|Error|assert" | tail -8
for tree in . $base; do
  name=$( [ "$tree" = . ] && echo new || echo base )
  echo "== kernels: $name"
  extra=$( [ "$name" = new ] && echo q2_k )
  (cd "$tree" && PYTHONPATH=/tmp/site:$PWD timeout 150 python3 bench/kernels.py --only decode $extra --reps 20 \
     --rounds 9 --out "$OUT/kernels_$name") 2>&1 | grep -E "^[a-z0-9_]+\.[a-z_0-9]+ |device|FAILED" | cut -c1-200
done
if [ "$layers" != 0 ]; then
  echo "== engine, $layers layers"
  timeout 240 python3 bench/engine.py flash --layers "$layers" --ctx-start 2048 --ctx-max 2048 --gen 16 \
    --out "$OUT/engine" 2>&1 | grep -E "^ctx|^decode|^roofline|^\| [a-z_]+: " | head -40
fi
