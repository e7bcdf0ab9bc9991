"""Greedy sampling: index of the largest logit per row (``sample.argmax``).

A vocabulary row (129280 logits) is split over many blocks so that the read
is spread over the GPU (one block per row took 25-38 us on H100 for one
row; the data is only 517 KB).  Grid ``(rows, parts)``, 256 threads, each
block scanning ``chunk`` values:

1. each thread keeps the first maximum of its strided slice, a shuffle
   reduction per warp and then every warp re-reducing the 8 warp winners from
   shared memory gives the block's (value, index) -- larger value wins, ties
   go to the smaller index, so any grouping gives numpy's first-occurrence
   argmax;
2. thread 0 stores the block's pair in the workspace, fences, and bumps the
   row's counter; the block that brings it to ``parts`` reduces the row's
   pairs the same way, writes the result and resets the counter to 0 (the
   workspace is reusable, no memset between calls).

NaN logits are never selected (numpy would return the first NaN); a row of all
-inf gives index 0.

The simulator runs one-thread blocks (``THREADS = LANES = 1``: no shuffles).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from numba import cuda

from ds4nb.kernels import _launch as L
from ds4nb.kernels.intrinsics import SIMULATOR, device, float32, int32, shfl_xor, wait_prior_grid
from ds4nb.kernels.parity import Case
from ds4nb.kernels.registry import OpSpec, implementation

THREADS = 1 if SIMULATOR else 256
LANES = 1 if SIMULATOR else 32   # lanes of a shuffle reduction (a warp on the GPU)
_WARPS = THREADS // LANES        # <= LANES: one warp re-reduces the warp winners
CHUNK = 2048  # values per block: 129280 logits -> 64 blocks
MAX_PARTS = 4096
_NEG_INF = np.float32(-np.inf)


class ArgmaxWorkspace(NamedTuple):
    """Per-row scratch: block winners (values, indices) and arrival counters (start at 0)."""

    values: Any
    indices: Any
    counters: Any


def parts_for(n: int) -> tuple[int, int]:
    """(chunk, parts) for rows of ``n`` values."""
    chunk = max(CHUNK, L.cdiv(n, MAX_PARTS))
    return chunk, L.cdiv(n, chunk)


def alloc_workspace(rows: int, n: int, stream: Any = 0) -> ArgmaxWorkspace:
    _, parts = parts_for(n)
    return ArgmaxWorkspace(L.device_array(rows * parts, np.float32, stream),
                           L.device_array(rows * parts, np.int32, stream),
                           cuda.to_device(np.zeros(rows, np.int32), stream=stream))


@device
def better_pair(ov, oi, best, idx):
    """Whether (value ov, index oi) beats (best, idx): larger value, then lower index."""
    return ov > best or (ov == best and oi < idx)


@device
def lane_argmax(best, idx, lanes):
    """Arg-max of the (value, index) pairs across a group of ``lanes`` lanes (butterfly shuffles), in every lane."""
    off = lanes // 2
    while off > 0:
        ov = shfl_xor(best, off)
        oi = shfl_xor(idx, off)
        if better_pair(ov, oi, best, idx):
            best = ov
            idx = oi
        off //= 2
    return best, idx


@device
def _block_argmax(best, idx, vals, idxs):
    """(value, index) of the whole block, returned to every thread (all threads must call)."""
    tid = cuda.threadIdx.x
    for stage in range(2):
        best, idx = lane_argmax(best, idx, LANES)
        if stage == 0:
            cuda.syncthreads()  # the previous use of vals/idxs is over
            if tid % LANES == 0:
                vals[tid // LANES] = best
                idxs[tid // LANES] = idx
            cuda.syncthreads()
            lane = tid % LANES
            if lane < _WARPS:
                best = vals[lane]
                idx = idxs[lane]
            else:
                best = _NEG_INF
                idx = int32(0x7FFFFFFF)
    return best, idx


@cuda.jit
def _argmax_kernel(x, n, chunk, part_v, part_i, counters, out, gate, gate_at):
    wait_prior_grid()
    if gate_at >= 0 and gate[gate_at] == 0:   # e.g. the sampling record says "not greedy": every block leaves
        return
    row = cuda.blockIdx.x
    part = cuda.blockIdx.y
    parts = cuda.gridDim.y
    tid = cuda.threadIdx.x
    vals = cuda.shared.array(_WARPS, float32)
    idxs = cuda.shared.array(_WARPS, int32)
    last = cuda.shared.array(1, int32)
    base = row * n
    best = _NEG_INF
    idx = int32(0x7FFFFFFF)  # loses every comparison
    i = part * chunk + tid
    stop = min(n, part * chunk + chunk)
    while i < stop:  # not range(): a run-time step costs a 64-bit division call
        v = x[base + i]
        if v > best or (idx == 0x7FFFFFFF and v == v):  # v == v: skip NaN
            best = v
            idx = int32(i)
        i += THREADS
    best, idx = _block_argmax(best, idx, vals, idxs)
    if tid == 0:
        part_v[row * parts + part] = best
        part_i[row * parts + part] = idx
        cuda.threadfence()
        last[0] = 1 if cuda.atomic.add(counters, row, 1) == parts - 1 else 0
    cuda.syncthreads()
    if last[0] == 1:  # block-uniform: the last block of this row reduces its parts
        best = _NEG_INF
        idx = int32(0x7FFFFFFF)
        k = tid
        while k < parts:
            ov = part_v[row * parts + k]
            oi = part_i[row * parts + k]
            if better_pair(ov, oi, best, idx):
                best = ov
                idx = oi
            k += THREADS
        best, idx = _block_argmax(best, idx, vals, idxs)
        if tid == 0:
            out[row] = idx if idx < n else 0
            counters[row] = 0


@implementation("sample.argmax", "multi_block", layout="f32")
def argmax(logits: Any, *, out: Any, stream: Any = 0, workspace: ArgmaxWorkspace | None = None,
           gate: tuple[Any, int] | None = None) -> Any:
    """out (rows,) int32 = argmax of each row of logits (rows, n); pass a workspace to avoid allocating.

    ``gate = (array, i)``: nothing runs when ``array[i] == 0``.
    """
    n = tuple(logits.shape)[-1]
    rows = logits.size // n
    chunk, parts = parts_for(n)
    ws = workspace if workspace is not None else alloc_workspace(rows, n, stream)
    gate_arr, gate_at = gate if gate is not None else (L.placeholder(np.int32), -1)
    L.launch(_argmax_kernel, (rows, parts), THREADS, stream, L.flat(logits), n, chunk, ws.values, ws.indices,
             ws.counters, L.flat(out), gate_arr, int(gate_at))
    return out


def _case(rng: np.random.Generator, scale: str) -> Case:
    rows, n = (2, 2100) if scale == "tiny" else (4, 129280)  # tiny: 2 blocks per row, the last one partial
    x = rng.standard_normal((rows, n)).astype(np.float32) * np.float32(3)
    # row 0: two equal maxima in different blocks, the first must win; row 1: the max is the last element
    x[0, 7] = x[0, n - 5] = x[0].max() + 1
    x[1, n - 1] = x[1].max() + 1
    x[1, 3] = np.nan  # never selected
    ref = np.nanargmax(x, axis=-1).astype(np.int32)
    out = L.device_array(rows, np.int32)
    return Case((cuda.to_device(x),), out, (ref,), (True,), info={"shape": (rows, n)})


OPS = [
    OpSpec("sample.argmax", "greedy token: first index of the row maximum (NaN never selected)",
           "(logits f32 (rows, n), *, out i32 (rows,), stream, workspace=None, gate=None)",
           "np.nanargmax(logits, axis=-1)", 0.0, _case),
]
