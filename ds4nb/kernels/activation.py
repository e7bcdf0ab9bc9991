"""Activation quantization on the device: float32 rows -> Q8_0 or Q8_K, block-minor.

The dot-product kernels read activations as int8 quads for ``dp4a``:

* ``act.quantize_q8_0`` feeds the Q8_0 matvecs (attention projections, shared
  experts, output head): per 32 values ``d = amax / 127``,
  ``q = rint(x / d)``;
* ``act.quantize_q8_K`` feeds the routed experts (IQ2_XXS, Q2_K, Q4_K): per
  256 values ``d = m / -127`` with ``m`` the first value of largest
  magnitude, plus the 16 sums of 16 quants that the K-quants' ``dmin`` terms
  need.

Both are bit-identical to ``ds4nb.quants.quantize_q8_0`` / ``quantize_q8_K``
(same float32 operations, same round-half-to-even), written in the
block-minor layout of ``ds4nb.quants.repack`` (``pack_q8_*_activation``).

Launch geometry: one warp per 256 input values, lane ``l`` owning the 8
consecutive values ``8l .. 8l+7``, i.e. exactly one uint64 word of the
output, so every lane does one 8-byte store.  For Q8_0 a 32-value block is 4
lanes (amax by a 4-lane shuffle); for Q8_K the block is the whole warp.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from gguf.constants import GGMLQuantizationType
from numba import cuda

from ds4nb.kernels import _launch as L
from ds4nb.kernels.intrinsics import (SIMULATOR, as_i32, device, float32, int32, int64, rint, shfl_xor, uint64,
                                      wait_prior_grid, warp_max)
from ds4nb.kernels.parity import Case
from ds4nb.kernels.registry import OpSpec, implementation
from ds4nb.quants import quantize_q8_0, quantize_q8_K
from ds4nb.quants.repack import pack_q8_0_activation, pack_q8_K_activation

Q = GGMLQuantizationType

QK8_0 = 32
QK_K = 256
_WARPS = 1 if SIMULATOR else 4  # warps per block: tiny launches (K=4096 is 16 warps), keep many blocks
# Lanes per 256-value chunk (Q8_0) and per Q8_K block: a warp on the GPU.  The simulator, which
# pays for every thread and every shuffle, gives a whole chunk / block to one thread: its loops
# over the other words and blocks are constant-false branches on the GPU.
CHUNK_LANES = 1 if SIMULATOR else 32
Q8_0_LANES = 1 if SIMULATOR else 4    # lanes sharing a Q8_0 block (its amax: a Q8_0_LANES-lane max)
Q8_0_WORDS = 4 // Q8_0_LANES          # 8-value words per lane
Q8_K_LANES = 1 if SIMULATOR else 32
Q8_K_WORDS = 32 // Q8_K_LANES
Q8_0_LANE_VALS = 8 * Q8_0_WORDS       # values a lane quantizes (local array sizes must be single constants)
Q8_K_LANE_VALS = 8 * Q8_K_WORDS

_F127 = np.float32(127.0)
_FM127 = np.float32(-127.0)
_F1 = np.float32(1.0)
_F0 = np.float32(0.0)
_QMIN = np.float32(-128.0)
_QMAX = np.float32(127.0)
_U8 = np.uint64(0xFF)


class Q8_0Act(NamedTuple):
    """Q8_0 activations on the device (flat arrays): ``qs`` uint64 (n, 4, K/32), ``d`` fp32 (n, K/32)."""

    qs: Any
    d: Any


class Q8KAct(NamedTuple):
    """Q8_K activations on the device (flat arrays): ``qs`` uint64 (n, 32, K/256),
    ``d`` fp32 (n, K/256), ``bsums`` int32 pairs (n, 8, K/256)."""

    qs: Any
    d: Any
    bsums: Any


def alloc_q8_0(n: int, k: int, stream: Any = 0) -> Q8_0Act:
    nb = k // QK8_0
    return Q8_0Act(L.device_array(n * 4 * nb, np.uint64, stream), L.device_array(n * nb, np.float32, stream))


def alloc_q8_K(n: int, k: int, stream: Any = 0) -> Q8KAct:
    nb = k // QK_K
    return Q8KAct(L.device_array(n * 32 * nb, np.uint64, stream), L.device_array(n * nb, np.float32, stream),
                  L.device_array(n * 8 * nb, np.int32, stream))


def q8_0_to_device(x: np.ndarray, stream: Any = 0) -> Q8_0Act:
    """Quantize on the host with the numpy twin and upload (tests, benchmarks)."""
    xq, xd = pack_q8_0_activation(*quantize_q8_0(x))
    return Q8_0Act(L.to_device_flat(xq, stream), L.to_device_flat(xd, stream))


def q8_K_to_device(x: np.ndarray, stream: Any = 0) -> Q8KAct:
    yq, yd, ybs = pack_q8_K_activation(*quantize_q8_K(x))
    return Q8KAct(L.to_device_flat(yq, stream), L.to_device_flat(yd, stream), L.to_device_flat(ybs, stream))


@device
def _pack_byte(word, q, i):
    """word | (int8 q as a byte) << 8*i."""
    return word | ((uint64(int32(q) & 0xFF) & _U8) << uint64(8 * i))


@device
def _load8(x, base, valid, vals, o):
    """vals[o:o+8] = x[base:base+8] (0 when not valid); returns their largest magnitude."""
    amax = _F0
    for i in range(8):
        v = x[base + i] if valid else _F0
        vals[o + i] = v
        amax = max(amax, abs(v))
    return amax


@device
def _q8_0_word(vals, o, inv):
    """The int8 quants of vals[o:o+8] at 1/d = ``inv``, packed in a word."""
    word = uint64(0)
    for i in range(8):
        q = min(max(rint(vals[o + i] * inv), _QMIN), _QMAX)
        word = _pack_byte(word, q, i)
    return word


@device
def q8_0_lane(vals, o, amax, xq, xd, t, nb, b, j, valid):
    """Quantize this lane's share of Q8_0 block ``b`` of row ``t``: ``vals[o:o + Q8_0_LANE_VALS]`` (word ``j``
    and, in the simulator, the other three), ``amax`` their largest magnitude.  Every lane of the block's
    ``Q8_0_LANES`` calls (the block's amax is their max); only ``valid`` ones store."""
    amax = warp_max(amax, Q8_0_LANES)
    d = amax / _F127
    inv = _F1 / d if d != _F0 else _F0
    for w in range(Q8_0_WORDS):
        word = _q8_0_word(vals, o + 8 * w, inv)
        if valid:
            xq[(t * 4 + j + w) * nb + b] = word
    if valid and j == 0:
        xd[t * nb + b] = d


@device
def q8_0_lane_from(x, base, valid, xq, xd, t, nb, b, j):
    """This lane's share of Q8_0 block ``b`` of row ``t`` (word ``j`` and, in the simulator, the other three) from
    ``x[base:base + Q8_0_LANE_VALS]``; as :func:`q8_0_lane`, every lane of the block calls."""
    vals = cuda.local.array(Q8_0_LANE_VALS, float32)
    amax = _load8(x, base, valid, vals, 0)
    if Q8_0_WORDS > 1:  # the simulator: the block's other words (a constant-false branch on the GPU)
        for w in range(1, Q8_0_WORDS):
            amax = max(amax, _load8(x, base + 8 * w, valid, vals, 8 * w))
    q8_0_lane(vals, 0, amax, xq, xd, t, nb, b, j, valid)


@device
def _q8_0_block(x, k, nb, xq, xd, t, b, j):
    """This lane's share of Q8_0 block ``b`` of row ``t``: word ``j`` (and, in the simulator, the other three)."""
    q8_0_lane_from(x, t * k + b * QK8_0 + j * 8, b < nb, xq, xd, t, nb, b, j)


@cuda.jit
def _quantize_q8_0_kernel(x, n_tok, k, xq, xd):
    wait_prior_grid()
    nb = k // QK8_0
    chunks = (k + 255) // 256
    gw = (cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x) // CHUNK_LANES
    lane = cuda.threadIdx.x % CHUNK_LANES
    t = gw // chunks
    if t >= n_tok:  # whole warps only: no partner lane is missing in the shuffles
        return
    c = gw - t * chunks
    # the Q8_0 block this lane is in, and which of its 4 words
    _q8_0_block(x, k, nb, xq, xd, t, c * 8 + lane // Q8_0_LANES, lane % Q8_0_LANES)
    if CHUNK_LANES < 32:  # the simulator: the chunk's other blocks (a constant-false branch on the GPU)
        for e in range(1, 8 // CHUNK_LANES):
            _q8_0_block(x, k, nb, xq, xd, t, c * 8 + e, 0)


@device
def _q8_K_word(vals, o, iscale):
    """(word, sum) of the int8 quants of vals[o:o+8] at scale ``iscale``."""
    word = uint64(0)
    s = int32(0)
    for i in range(8):
        q = min(max(rint(iscale * vals[o + i]), _QMIN), _QMAX)
        s += int32(q)
        word = _pack_byte(word, q, i)
    return word, s


@device
def _xor_word(ws, w, m):
    """The sum of word ``(lane * Q8_K_WORDS + w) ^ m``: a shuffle when it is another lane's (the GPU)."""
    if Q8_K_WORDS > m:
        return ws[w ^ m]
    return shfl_xor(ws[w], m)


@device
def q8_K_lane(vals, o, lane, yq, yd, ybs, t, nb, b, valid):
    """Quantize ``vals[o:o + Q8_K_LANE_VALS]`` as lane ``lane``'s share of Q8_K block ``b`` of row ``t``
    (values ``lane * Q8_K_LANE_VALS ...`` of the block).  Every lane of the block's warp calls (the scale's
    value and the bsums cross lanes); only ``valid`` ones store."""
    # first value of largest magnitude: strict '>' keeps the first inside a
    # lane, the lane reduction breaks ties by the smaller index
    best_abs = np.float32(-1.0)
    best_val = _F0
    best_idx = int32(0)
    for i in range(Q8_K_LANE_VALS):
        v = vals[o + i]
        if abs(v) > best_abs:
            best_abs = abs(v)
            best_val = v
            best_idx = int32(lane * Q8_K_LANE_VALS + i)
    off = Q8_K_LANES // 2
    while off > 0:
        o_abs = shfl_xor(best_abs, off)
        o_val = shfl_xor(best_val, off)
        o_idx = shfl_xor(best_idx, off)
        if o_abs > best_abs or (o_abs == best_abs and o_idx < best_idx):
            best_abs = o_abs
            best_val = o_val
            best_idx = o_idx
        off //= 2
    iscale = _FM127 / best_val if best_val != _F0 else _F0
    d = _F1 / iscale if best_val != _F0 else _F0
    ws = cuda.local.array(Q8_K_WORDS, int64)   # the sum of each of this lane's words (int64 as numba
    #                                            types int32 sums)
    for w in range(Q8_K_WORDS):
        word, ws[w] = _q8_K_word(vals, o + 8 * w, iscale)
        if valid:
            yq[(t * 32 + lane * Q8_K_WORDS + w) * nb + b] = word
    # bsums: words 2i, 2i+1 hold the 16 values of bsum i; bsum word p packs
    # bsum 2p (words 4p, 4p+1) low and bsum 2p+1 (words 4p+2, 4p+3) high
    s2s = cuda.local.array(Q8_K_WORDS, int64)
    for w in range(Q8_K_WORDS):
        s2s[w] = ws[w] + _xor_word(ws, w, 1)
    for w in range(Q8_K_WORDS):
        g = lane * Q8_K_WORDS + w
        hi = _xor_word(s2s, w, 2)
        if valid and g % 4 == 0:
            ybs[(t * 8 + g // 4) * nb + b] = as_i32((s2s[w] & 0xFFFF) | ((hi & 0xFFFF) << 16))
    if valid and lane == 0:
        yd[t * nb + b] = d


@cuda.jit
def _quantize_q8_K_kernel(x, n_tok, k, yq, yd, ybs):
    wait_prior_grid()
    nb = k // QK_K
    gw = (cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x) // Q8_K_LANES
    lane = cuda.threadIdx.x % Q8_K_LANES
    t = gw // nb
    if t >= n_tok:
        return
    b = gw - t * nb
    base = t * k + b * QK_K + lane * Q8_K_LANE_VALS
    vals = cuda.local.array(Q8_K_LANE_VALS, float32)
    for i in range(Q8_K_LANE_VALS):
        vals[i] = x[base + i]
    q8_K_lane(vals, 0, lane, yq, yd, ybs, t, nb, b, True)


def _check_rows(x: Any, k: int | None = None) -> tuple[int, int]:
    n = tuple(x.shape)[0] if x.ndim == 2 else 1
    kk = tuple(x.shape)[-1]
    if k is not None and kk != k:
        raise ValueError(f"expected rows of {k}, got {kk}")
    return n, kk


@implementation("act.quantize_q8_0", "warp", layout="act.q8_0/block-minor")
def quantize_q8_0_device(x: Any, *, out: Q8_0Act, stream: Any = 0) -> Q8_0Act:
    """float32 (n, K) -> Q8_0 (K % 32 == 0), one warp per 256 values."""
    n, k = _check_rows(x)
    if k % QK8_0:
        raise ValueError(f"Q8_0 needs K % 32 == 0, got {k}")
    warps = n * L.cdiv(k, 256)
    L.launch(_quantize_q8_0_kernel, L.cdiv(warps, _WARPS), CHUNK_LANES * _WARPS, stream, L.flat(x), n, k, out.qs, out.d)
    return out


@implementation("act.quantize_q8_K", "warp", layout="act.q8_K/block-minor")
def quantize_q8_K_device(x: Any, *, out: Q8KAct, stream: Any = 0) -> Q8KAct:
    """float32 (n, K) -> Q8_K with bsums (K % 256 == 0), one warp per 256-value block."""
    n, k = _check_rows(x)
    if k % QK_K:
        raise ValueError(f"Q8_K needs K % 256 == 0, got {k}")
    warps = n * (k // QK_K)
    L.launch(_quantize_q8_K_kernel, L.cdiv(warps, _WARPS), Q8_K_LANES * _WARPS, stream, L.flat(x), n, k, out.qs, out.d,
                                                                           out.bsums)
    return out


# ---------------------------------------------------------------------------
# Parity cases
# ---------------------------------------------------------------------------


def _activation_rows(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Heavy-tailed rows with some exact zeros, ties of the max and an all-zero block."""
    x = (rng.standard_normal((n, k)) * rng.uniform(0.1, 10, size=(n, 1))).astype(np.float32)
    x[rng.random((n, k)) < 0.02] = 0
    if k >= 512:
        x[0, 256:512] = 0  # an all-zero Q8_K / Q8_0 block
    # a tie: -max and +max in one block; the first must win in Q8_K
    row = x[-1, :256]
    m = np.abs(row).max()
    row[3], row[200] = -m * 2, m * 2
    return x


def _case_q8_0(rng: np.random.Generator, scale: str) -> Case:
    n, k = (3, 320) if scale == "tiny" else (4, 4096)  # 320: a partial 256-chunk
    x = _activation_rows(rng, n, k)
    xq, xd = pack_q8_0_activation(*quantize_q8_0(x))
    out = alloc_q8_0(n, k)
    return Case((cuda.to_device(x),), out, (xq.reshape(-1), xd.reshape(-1)), (True, True),
                info={"shape": (n, k)})


def _case_q8_K(rng: np.random.Generator, scale: str) -> Case:
    n, k = (2, 512) if scale == "tiny" else (6, 4096)
    x = _activation_rows(rng, n, k)
    yq, yd, ybs = pack_q8_K_activation(*quantize_q8_K(x))
    out = alloc_q8_K(n, k)
    return Case((cuda.to_device(x),), out, (yq.reshape(-1), yd.reshape(-1), ybs.reshape(-1)),
                (True, True, True), info={"shape": (n, k)})


OPS = [
    OpSpec(
        "act.quantize_q8_0",
        "float32 rows -> Q8_0 activations (int8 x32 + fp32 scale), block-minor",
        "(x f32 (n, K), *, out: Q8_0Act, stream)",
        "ds4nb.quants.quantize_q8_0 + repack.pack_q8_0_activation",
        0.0,  # bit-identical: same float32 ops and rounding as the twin
        _case_q8_0,
    ),
    OpSpec(
        "act.quantize_q8_K",
        "float32 rows -> Q8_K activations (int8 x256 + fp32 scale + 16-sums), block-minor",
        "(x f32 (n, K), *, out: Q8KAct, stream)",
        "ds4nb.quants.quantize_q8_K + repack.pack_q8_K_activation",
        0.0,  # bit-identical
        _case_q8_K,
    ),
]
