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

Given a Q8_0 activation (``q8_0``, the next Q8_0 matvec's input), the second
pass instead gives each thread 8 consecutive values (``activation.q8_0_lane``'s
share: 4 lanes a 32-value block) and writes their Q8_0 blocks beside the
float32 row, bit-identical to ``act.quantize_q8_0`` of it: one launch less.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import cuda

from ds4nb.kernels import _launch as L
from ds4nb.kernels.activation import Q8_0_LANE_VALS, Q8_0Act, QK8_0, q8_0_lane
from ds4nb.kernels.intrinsics import SIMULATOR, device, float32, float64, wait_prior_grid, warp_sum
from ds4nb.kernels.parity import CONTRACT, Case
from ds4nb.kernels.registry import OpSpec, implementation

THREADS = 1 if SIMULATOR else 256
LANES = 1 if SIMULATOR else 32   # lanes of a reduction group (a warp on the GPU)
_WARPS = THREADS // LANES        # <= LANES: one group re-reduces the group sums
_D0 = np.float64(0.0)
_D1 = np.float64(1.0)
_F0 = np.float32(0.0)
DS4_RMS_EPS = 1.0e-6


@device
def _scale_quantize(x, w, has_w, n, inv, out, xq, xd, row, tid):
    """The scaling pass, ``Q8_0_LANE_VALS`` consecutive values a thread, and their Q8_0 blocks (n % 32 == 0).
    Every thread runs every round (the lanes of a block share its amax by shuffles); past n, none stores."""
    base = row * n
    vals = cuda.local.array(Q8_0_LANE_VALS, float32)
    for r in range((n + Q8_0_LANE_VALS * THREADS - 1) // (Q8_0_LANE_VALS * THREADS)):
        first = (r * THREADS + tid) * Q8_0_LANE_VALS
        valid = first < n
        amax = _F0
        for i in range(Q8_0_LANE_VALS):
            v = _F0
            if valid:
                y = float64(x[base + first + i]) * inv
                if has_w:
                    y *= float64(w[first + i])
                v = float32(y)
                out[base + first + i] = v
            vals[i] = v
            amax = max(amax, abs(v))
        q8_0_lane(vals, 0, amax, xq, xd, row, n // QK8_0, first // QK8_0, (first % QK8_0) // 8, valid)


@cuda.jit
def _rms_norm_kernel(x, w, has_w, n, eps, out, xq, xd, has_q8):
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
    if has_q8:
        _scale_quantize(x, w, has_w, n, inv, out, xq, xd, row, tid)
        return
    for i in range(tid, n, THREADS):
        y = float64(x[base + i]) * inv
        if has_w:
            y *= float64(w[i])
        out[base + i] = float32(y)


@implementation("norm.rms", "block_per_row", layout="f32")
def rms_norm(x: Any, w: Any | None, eps: float = DS4_RMS_EPS, *, out: Any, q8_0: Q8_0Act | None = None,
             stream: Any = 0) -> Any:
    """RMSNorm of each row of x (n_rows, n), optionally times weight w (n,); ``q8_0`` given (rows of n / 32
    blocks, n % 32 == 0): out's Q8_0 blocks too, as ``act.quantize_q8_0`` would make them."""
    n = tuple(x.shape)[-1]
    rows = x.size // n
    if w is None:
        w, has_w = L.placeholder(np.float32), 0
    else:
        has_w = 1
    if q8_0 is None:
        xq, xd, has_q8 = L.placeholder(np.uint64), L.placeholder(np.float32), 0
    elif n % QK8_0 or q8_0.d.size < rows * (n // QK8_0):
        raise ValueError(f"norm.rms: a Q8_0 output needs rows of whole 32-value blocks and room for {rows} rows, "
                         f"got n={n} and {q8_0.d.size} blocks")
    else:
        xq, xd, has_q8 = q8_0.qs, q8_0.d, 1
    L.launch(_rms_norm_kernel, rows, THREADS, stream, L.flat(x), w, has_w, n, eps64(eps), L.flat(out), xq, xd, has_q8)
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
           "(x f32 (rows, n), w f32 (n,) | None, eps, *, out f32 (rows, n), q8_0: Q8_0Act | None, stream)",
           "ds4nb.reference.ops.rms_norm", 1e-6, _case),  # CONTRACT: one float64 evaluation, one rounding
]
