"""RMSNorm over rows: ``out = x * (1 / sqrt(mean(x^2) + eps)) [* w]`` (ds4.c rms_norm_*).

One 256-thread block per row: each thread sums squares over a strided slice,
a shuffle reduction per warp, then every warp re-reduces the 8 warp sums from
shared memory (all warps do it, so no thread waits on another warp's
shuffle), and the row is scaled in a second strided pass.

Numerics (docs/model.md, "one rounding per value"): everything is float64 --
the sum of squares (its partial sums and the shuffle / shared-memory
reduction), ``ss / n + eps`` with ``eps`` taken as ``float64(float32(eps))``,
the square root and ``x * (1 / sqrt(...)) * w`` (the oracle's operation order)
-- and each output is rounded to float32 once, so it equals the oracle's value bit for bit except when the
two float64 evaluations (different summation orders) straddle a float32
rounding boundary (~1e-7 of the values, one ulp).
The unweighted form (``w=None``) is the per-head q norm and the HC-state norm:
reshape ``(n_tok * n_head, head_dim)`` and call the same op.

In the simulator a block is one thread (``THREADS = LANES = 1``): no shuffle,
and the one barrier waits for no other thread.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import cuda

from ds4nb.kernels import _launch as L
from ds4nb.kernels.intrinsics import SIMULATOR, float32, float64, wait_prior_grid, warp_sum
from ds4nb.kernels.parity import CONTRACT, Case
from ds4nb.kernels.registry import OpSpec, implementation

THREADS = 1 if SIMULATOR else 256
LANES = 1 if SIMULATOR else 32   # lanes of a reduction group (a warp on the GPU)
_WARPS = THREADS // LANES        # <= LANES: one group re-reduces the group sums
_D0 = np.float64(0.0)
_D1 = np.float64(1.0)
DS4_RMS_EPS = 1.0e-6


@cuda.jit
def _rms_norm_kernel(x, w, has_w, n, eps, out):
    wait_prior_grid()
    row = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    base = row * n
    ss = _D0
    for i in range(tid, n, THREADS):
        v = float64(x[base + i])
        ss += v * v
    ss = warp_sum(ss, LANES)
    red = cuda.shared.array(_WARPS, float64)
    if tid % LANES == 0:
        red[tid // LANES] = ss
    cuda.syncthreads()
    lane = tid % LANES
    total = red[lane] if lane < _WARPS else _D0
    total = warp_sum(total, LANES)
    inv = _D1 / float64(math.sqrt(total / float64(n) + eps))   # eps: float64(float32 eps), a launch argument
    for i in range(tid, n, THREADS):
        y = float64(x[base + i]) * inv
        if has_w:
            y *= float64(w[i])
        out[base + i] = float32(y)


@implementation("norm.rms", "block_per_row", layout="f32")
def rms_norm(x: Any, w: Any | None, eps: float = DS4_RMS_EPS, *, out: Any, stream: Any = 0) -> Any:
    """RMSNorm of each row of x (n_rows, n), optionally times weight w (n,)."""
    n = tuple(x.shape)[-1]
    rows = x.size // n
    if w is None:
        w, has_w = L.placeholder(np.float32), 0
    else:
        has_w = 1
    L.launch(_rms_norm_kernel, rows, THREADS, stream, L.flat(x), w, has_w, n, eps64(eps), L.flat(out))
    return out


def eps64(eps: float) -> np.float64:
    """The contract's ``eps``: the float32 epsilon widened to float64 (as the oracle takes it)."""
    return np.float64(np.float32(eps))


def _case(rng: np.random.Generator, scale: str) -> Case:
    from ds4nb.reference.ops import rms_norm as ref_rms_norm

    rows, n = (3, 700) if scale == "tiny" else (64, 4096)
    x = (rng.standard_normal((rows, n)) * rng.uniform(0.01, 30, size=(rows, 1))).astype(np.float32)
    weighted = bool(rng.integers(0, 2)) if scale == "model" else True
    w = rng.uniform(0.5, 1.5, n).astype(np.float32) if weighted else None
    ref = ref_rms_norm(x, w, DS4_RMS_EPS)
    out = L.device_array(rows * n, np.float32)
    return Case((cuda.to_device(x), None if w is None else cuda.to_device(w), DS4_RMS_EPS), out,
                (ref.reshape(-1),), (CONTRACT,), info={"shape": (rows, n), "weighted": weighted})


OPS = [
    OpSpec("norm.rms", "RMSNorm of rows, optional per-channel weight",
           "(x f32 (rows, n), w f32 (n,) | None, eps, *, out f32 (rows, n), stream)",
           "ds4nb.reference.ops.rms_norm", 1e-6, _case),  # CONTRACT: one float64 evaluation, one rounding
]
