#!/usr/bin/env bash
# One device-machine session: engine benchmark on a flash-shaped model, CLI generate and bench on `small`.
# Usage (device tool, carry .whl): bash bench/gpu_run.sh LAYERS
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
layers=${1:-20}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
df -h /dev/shm | tail -1; nproc
python3 bench/engine.py flash --layers "$layers" --ctx 4096 --prompt 512 --gen 32 --csv "$OUT/engine_flash.csv" 2>&1 \
  | grep -v "NumbaPerformanceWarning\|warn(err"
python3 -m ds4nb synth --preset small /tmp/small.gguf
python3 -m ds4nb generate -m /tmp/small.gguf -p "Tell me a story" -n 64 --temp 0 --backend cuda 2>&1 | tail -3
python3 -m ds4nb bench -m /tmp/small.gguf --backend cuda --ctx-start 256 --ctx-max 2048 --step-incr 256 \
  --gen-tokens 32 --csv "$OUT/bench_small.csv" 2>&1 | grep -v "NumbaPerformanceWarning\|warn(err" | tail -14
