#!/usr/bin/env bash
# A short device call after changes that the long ones did not cover: whether early launches are on, the CLI's
# GPU paths on a `tiny` model (profile, generate), and the decode-step tests on `tiny`.
# Usage (device tool, carry .whl):  bash bench/gpu_smoke.sh
. bench/device_env.sh || exit 1
python3 -c "from ds4nb.kernels._launch import early_launch_requested as e; print('early launches:', e())"
python3 -c "from ds4nb.model.synth import write_synthetic as w; w('/tmp/tiny.gguf', 'tiny', seed=0)"
for _ in $(seq 20); do printf 'The ferryman counts the boats on the river each morning. '; done > /tmp/text.txt
python3 -m ds4nb profile -m /tmp/tiny.gguf --prompt-file /tmp/text.txt --gen 4 -o "$OUT/usage.json" 2>&1 | tail -1
python3 -m ds4nb generate -m /tmp/tiny.gguf -p "hello" -n 12 --backend cuda 2>&1 | tail -2
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_engine_step.py tests/test_engine_graph.py \
  tests/test_placement_engine.py -k "tiny or early or chained or branch or sampling" 2>&1 | tail -2
