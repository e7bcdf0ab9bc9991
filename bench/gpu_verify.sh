#!/usr/bin/env bash
# Device-machine verification: every kernel test (simulator-shape and @gpu model-shape parity) on the real
# GPU, the CUDA engine tests (greedy tokens == oracle on tiny and small), and the engine-vs-oracle check.
# Usage (device tool, carry .whl): bash bench/gpu_verify.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  .whl/test/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
python3 -m pytest -q -p no:cacheprovider tests/test_kernels_*.py -k "not compiles_for_gpus" 2>&1 | tail -4
python3 -m pytest -q -s -p no:cacheprovider tests/test_engine.py 2>&1 | grep -E "rel. error|passed|failed|Error|assert" | tail -12
python3 bench/engine.py check --tokens 32 2>&1 | grep -v "NumbaPerformanceWarning\|warn(err" | tail -4
