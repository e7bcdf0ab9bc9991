# Sourced by the bench/gpu_*.sh device calls: the carried numpy 2.4 wheel (and gguf, tokenizer) on the path
# (the image's numpy 2.5 breaks numba-cuda), quiet unbuffered Python, $OUT, and the device's name in
# $OUT/device.txt.  Returns non-zero when the wheels do not install.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || return 1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
