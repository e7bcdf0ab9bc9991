"""Token embedding gather: F16 table rows -> float32 (``out[t] = table[ids[t]]``).

A grid of (column blocks, tokens); each thread converts one or more F16
values (exact: every half is a float32).  The table stays F16 on the device
(1 GiB for DS4's 129280 x 4096); only the gathered rows are read.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda

from ds4nb.kernels import _launch as L
from ds4nb.kernels.intrinsics import SIMULATOR, float32, wait_prior_grid
from ds4nb.kernels.parity import Case
from ds4nb.kernels.registry import OpSpec, implementation

THREADS = 8 if SIMULATOR else 256   # the simulator pays for every thread: 8 a row
MAX_COL_BLOCKS = 1 if SIMULATOR else 8  # a 4096-wide row is 16 blocks of 256: 2 values per thread


@cuda.jit
def _gather_f16_kernel(table, ids, dim, out):
    wait_prior_grid()
    t = cuda.blockIdx.y
    src = ids[t] * dim
    dst = t * dim
    i = cuda.blockIdx.x * THREADS + cuda.threadIdx.x
    while i < dim:
        out[dst + i] = float32(table[src + i])
        i += cuda.gridDim.x * THREADS


@implementation("embed.gather", "f16_rows", layout="f16")
def embed_gather(table: Any, ids: Any, dim: int, *, out: Any, stream: Any = 0) -> Any:
    """out (n, dim) f32 = table[ids] for an F16 table (V, dim) (flat or 2-D device array).

    Ids are not range-checked on the device (that would need a host sync).
    """
    n = ids.size
    grid = (min(MAX_COL_BLOCKS, L.cdiv(dim, THREADS)), n)
    L.launch(_gather_f16_kernel, grid, THREADS, stream, L.flat(table), ids, dim, L.flat(out))
    return out


def _case(rng: np.random.Generator, scale: str) -> Case:
    v, d, n = (50, 72, 5) if scale == "tiny" else (129280, 4096, 8)
    table = rng.standard_normal((v, d)).astype(np.float16)
    ids = rng.integers(0, v, n).astype(np.int32)
    ids[-1] = ids[0]  # a repeated token
    ids[1] = v - 1  # the last row
    ref = table[ids].astype(np.float64)
    out = L.device_array(n * d, np.float32)
    return Case((cuda.to_device(table.reshape(-1)), cuda.to_device(ids), d), out, (ref.reshape(-1),), (True,),
                info={"table": (v, d), "tokens": n})


OPS = [
    OpSpec("embed.gather", "gather F16 embedding rows as float32",
           "(table f16 (V, D), ids i32 (n,), dim, *, out f32 (n, D), stream)",
           "table[ids].astype(float32)", 0.0, _case),  # exact conversion
]
