"""Every kernel compiles for real GPUs, checked on machines without one.

The simulator runs kernels as Python, so it never types them the way the CUDA
target does: a float64 shared array fed a float32, an int where numba wants a
float, an unsupported builtin all pass in the simulator and fail on a GPU.
``tests/kernel_compile_check.py`` runs every op's parity cases through the
real launchers (GPU geometry, numba's CUDA target, host memory standing in for
the device) and compiles each launched kernel to PTX with NVIDIA's NVVM
(the ``nvidia-cuda-nvcc-cu12`` / ``nvidia-cuda-nvrtc-cu12`` wheels of the test
extras) for a consumer Ampere card (sm_86) and for Hopper (sm_90).  Skipped
when those libraries are missing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = Path(__file__).with_name("kernel_compile_check.py")


def _cuda_target_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}


def _compiler_available() -> bool:
    probe = ("from numba import cuda, float32\n"
             "def k(x):\n    x[0] = 1\n"
             "cuda.compile_ptx(k, (float32[::1],), cc=(9, 0))\n")
    return subprocess.run([sys.executable, "-c", probe], env=_cuda_target_env(), capture_output=True).returncode == 0


def test_every_kernel_compiles_for_gpus() -> None:
    if not _compiler_available():
        pytest.skip("NVVM/NVRTC not installed (pip install nvidia-cuda-nvcc-cu12 nvidia-cuda-nvrtc-cu12)")
    proc = subprocess.run([sys.executable, str(CHECK), "--cc", "8.6", "9.0"], env=_cuda_target_env(),
                          capture_output=True, text=True, timeout=1800)
    print(proc.stdout.splitlines()[0] if proc.stdout else proc.stderr[-2000:])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    ran, pairs = (int(n) for n in re.match(r"(\d+) launchers ran, (\d+) \(kernel", proc.stdout).groups())
    assert ran >= 35 and pairs >= 35                              # the check saw the whole kernel library
