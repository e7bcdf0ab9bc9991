#!/usr/bin/env bash
# One device call: Nsight Compute counters of the decode step's main kernels (bench/ncu_decode.py), the raw CSV
# and a one-line-per-launch table in $OUT.  Usage (device tool, carry .whl):  bash bench/gpu_ncu.sh
. bench/device_env.sh || exit 1
ncu --version | tail -1
timeout 420 ncu --clock-control none --csv --page raw --section SpeedOfLight --section LaunchStats \
  --section Occupancy --section WarpStateStats --log-file "$OUT/ncu.csv" python3 bench/ncu_decode.py 2>&1 \
  | grep -E "^case|rror" | head -40
python3 bench/ncu_decode.py --summary "$OUT/ncu.csv" | tee "$OUT/ncu_table.md"
