"""Dense float64 GEMMs on the FP64 tensor cores, for prefill steps (sm_90+).

Two prefill-step products follow the numerics contract (docs/model.md, "one
rounding per value") with float64 sums of exact float64 products, and at
several tokens a step they are GEMMs:

* ``f16.matvec`` (the router, compressor and indexer projections):
  ``out[t, r] = sum_i w[r, i] x[t, i] (+ bias[r])``, F16 / F32 weights times
  float32 activations, optionally a second matrix on the same input;
* the HC mix of ``hc.pre``: ``part[t, m, s] = sum_{i in split s} fn[m, i]
  flat[t, i]`` with ``flat = float32(hc / rms(hc))`` formed on the fly from the
  token's partial sums of squares (split K: ``hc.pre``'s finish kernel adds
  the splits' partials, as it does for its own mix kernel).

One kernel does both: ``mma.sync.m16n8k16`` float64 MMAs
(``intrinsics.mma_f64_k16``, sm_90's FP64 tensor-core instruction, 8x the
work of sm_80's m8n8k4) whose A operand is a tile of weight rows and whose B operand a tile of
tokens, both widened to float64 in shared memory (F16, F32 and float32
values are exact in float64, every MMA product is exact and every sum a
float64 sum, so the result is the contract's float64 evaluation in some
order, rounded once at the store).

Geometry.  A block of 4 warps (2 x 2) owns 32 rows and 32 tokens, a warp a
16 x 16 quadrant: one A fragment (16 rows) times two 8-token B fragments, 2
MMAs a k-step and 8 float64 accumulators a lane (a tuple).  The K dimension
is walked ``BK = 32`` values at a time: every thread loads 8 weights and 8
activations into registers, all in flight together (branch-free: a load
behind a branch is waited for where the branches join, which made the first
version 2-5x slower), while the MMAs consume the previous tile, then widens
them into shared memory.  Shared rows are ``BK + 4`` float64 apart, so the
16 lanes of a fragment load's half-warp (4 rows x 4 k) hit distinct banks.
``gridDim.z`` splits K.  (64 x 64 block tiles, four quadrants a warp, took
255 registers and spilled: no faster on an H200.)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import cuda

from ds4nb.kernels import _launch as L
from ds4nb.kernels.intrinsics import device, float32, float64, mma_f64_k16, wait_prior_grid, warp_sum

WARPS_M, WARPS_N = 2, 2
THREADS = 32 * WARPS_M * WARPS_N
BK = 32                       # K values a block widens into shared memory at a time
STRIDE = BK + 4               # float64 row stride of the shared tiles: conflict-free fragment loads
MIN_TOKENS = 8                # steps from which the launchers of f16.matvec and hc.pre take these kernels
TARGET_BLOCKS = 132           # ~one wave on an H100 / H200: the HC mix splits K to launch ~1.5 of them
_F0 = np.float32(0.0)
_D0 = np.float64(0.0)
_D1 = np.float64(1.0)


@device
def _a_frag(ws, row, k):
    """A fragment of the m16n8k16 MMA: rows ``row``, ``row + 8`` (the lane's ``g`` included), k ``k + 4 i``
    (its ``t`` included) of the weight tile."""
    r0 = row * STRIDE + k
    r1 = r0 + 8 * STRIDE
    return (ws[r0], ws[r1], ws[r0 + 4], ws[r1 + 4], ws[r0 + 8], ws[r1 + 8], ws[r0 + 12], ws[r1 + 12])


@device
def _b_frag(xs, tok, k):
    """B fragment: token ``tok`` (the lane's ``g`` included), k ``k + 4 i`` of the activation tile."""
    r = tok * STRIDE + k
    return (xs[r], xs[r + 4], xs[r + 8], xs[r + 12])


@device
def _mma_quad(a, b0, b1, q):
    """A 16 x 16 quadrant of the warp tile: 16 rows (``a``) by two 8-token tiles (``b0``, ``b1``); ``q`` holds
    this lane's 8 accumulators, token tile ``j``'s D fragment at ``4 j``."""
    d0, d1, d2, d3 = mma_f64_k16(a, b0, (q[0], q[1], q[2], q[3]))
    d4, d5, d6, d7 = mma_f64_k16(a, b1, (q[4], q[5], q[6], q[7]))
    return d0, d1, d2, d3, d4, d5, d6, d7


@device
def _store_quad(q, row0, t0, n_out, n_out2, n_tok, bias, has_bias, out, bias2, has_bias2, out2, split_out, part,
                split, n_split):
    """Writes a quadrant's outputs: accumulator ``4 j + c`` is row ``row0 + 8 (c // 2)`` (the lane's ``g``
    included) and token ``t0 + 8 j + c % 2`` (its ``2 t`` included)."""
    n_rows = n_out + n_out2
    for e in range(8):
        row = row0 + 8 * ((e >> 1) & 1)
        t = t0 + 8 * (e >> 2) + (e & 1)
        if row < n_rows and t < n_tok:
            s = q[e]
            if split_out:
                part[(t * n_rows + row) * n_split + split] = s
            elif row < n_out:
                if has_bias:
                    s += float64(float32(bias[row]))
                out[t * n_out + row] = s        # the output's type: float32 rounds once
            else:
                if has_bias2:
                    s += float64(float32(bias2[row - n_out]))
                out2[t * n_out2 + row - n_out] = s


BM, BN = WARPS_M * 16, WARPS_N * 16       # a block's rows and tokens: a 16 x 16 quadrant a warp


@L.kernel_factory
def _make_gemm(scaled: bool):
    """The GEMM kernel; ``scaled``: B is ``float32(x / rms(x))`` (the HC mix), else ``x``.

    A lane's 8 accumulators are a tuple in straight-line code, never an
    array, so that they stay in registers."""
    W_ITEMS, X_ITEMS = BM * BK // THREADS, BN * BK // THREADS
    WS, XS = BM * STRIDE, BN * STRIDE       # array sizes must be single constants

    @device
    def _load_tiles(w, w2, n_out, n_rows, x, n_tok, n_in, k0, k_end, m0, n0, tid, wv, xv):
        """This thread's share of the weight and activation tiles at ``k0`` into registers: consecutive threads
        take consecutive k of a row (coalesced).  Branch-free, so that all the loads are in flight at once (a
        load behind a branch is waited for at the join): indices past the rows, tokens or the split's end are
        clamped to valid ones and :func:`_store_tiles` writes zeros there."""
        for j in range(W_ITEMS):
            e = tid + THREADS * j
            row = min(m0 + e // BK, n_rows - 1)
            k = min(k0 + e % BK, k_end - 1)
            src = w if row < n_out else w2
            r = row if row < n_out else row - n_out
            wv[j] = float32(src[r * n_in + k])
        for j in range(X_ITEMS):
            e = tid + THREADS * j
            t = min(n0 + e // BK, n_tok - 1)
            k = min(k0 + e % BK, k_end - 1)
            xv[j] = float32(x[t * n_in + k])

    @device
    def _store_tiles(wv, xv, ws, xs, inv, n_rows, n_tok, k0, k_end, m0, n0, tid):
        """The registers of :func:`_load_tiles` widened into the shared tiles (zeros past the rows, tokens and
        the split's end; B is ``float32(x / rms)`` when ``scaled``)."""
        for j in range(W_ITEMS):
            e = tid + THREADS * j
            ok = m0 + e // BK < n_rows and k0 + e % BK < k_end
            ws[(e // BK) * STRIDE + e % BK] = float64(wv[j]) if ok else _D0
        for j in range(X_ITEMS):
            e = tid + THREADS * j
            v = _D0
            if n0 + e // BK < n_tok and k0 + e % BK < k_end:
                v = float64(xv[j])
                if scaled:
                    v = float64(float32(v * inv[e // BK]))    # flat = rms(hc), rounded once
            xs[(e // BK) * STRIDE + e % BK] = v

    @cuda.jit
    def kernel(w, w2, n_out, n_out2, x, n_tok, n_in, k_len, bias, has_bias, out, bias2, has_bias2, out2,
               split_out, part, part_ss, ns_ss, rms_eps, gate, gate_at):
        """``split_out``: write each split's float64 sums to ``part[(t * n_rows + r) * n_split + split]``,
        else the (bias-added) sums to ``out`` / ``out2`` in their dtype (float32: rounded once)."""
        wait_prior_grid()
        if gate_at >= 0 and gate[gate_at] == 0:   # a step-record flag says this step needs no result
            return
        tid = cuda.threadIdx.x
        warp = tid // 32
        lane = tid % 32
        g = lane // 4                 # the MMA's row (A) / token (B) of this lane
        kq = lane % 4                 # its k within each group of 4
        m0 = cuda.blockIdx.x * BM
        n0 = cuda.blockIdx.y * BN
        wr = (warp % WARPS_M) * (BM // WARPS_M) + g      # the lane's first row / token in the block's tiles
        wt = (warp // WARPS_M) * (BN // WARPS_N) + g
        split = cuda.blockIdx.z
        k_begin = split * k_len
        k_end = min(k_begin + k_len, n_in)
        n_rows = n_out + n_out2
        ws = cuda.shared.array(WS, float64)
        xs = cuda.shared.array(XS, float64)
        inv = cuda.shared.array(BN, float64)
        if scaled:   # 1 / rms of each token from its partial sums of squares (a warp a token, fixed order)
            for j in range(warp, BN, WARPS_M * WARPS_N):
                ss = _D0
                if n0 + j < n_tok:
                    for i in range(lane, ns_ss, 32):
                        ss += part_ss[(n0 + j) * ns_ss + i]
                ss = warp_sum(ss, 32)
                if lane == 0:
                    inv[j] = _D1 / math.sqrt(ss / float64(n_in) + rms_eps)
        acc = (_D0, _D0, _D0, _D0, _D0, _D0, _D0, _D0)
        # software pipeline: tile k0 + BK is loaded into registers (float32: F16 and float32 values are exact
        # there) while the MMAs consume tile k0 from shared memory
        wv = cuda.local.array(W_ITEMS, float32)
        xv = cuda.local.array(X_ITEMS, float32)
        _load_tiles(w, w2, n_out, n_rows, x, n_tok, n_in, k_begin, k_end, m0, n0, tid, wv, xv)
        for k0 in range(k_begin, k_end, BK):
            cuda.syncthreads()                   # the previous tile's fragment loads are done
            _store_tiles(wv, xv, ws, xs, inv, n_rows, n_tok, k0, k_end, m0, n0, tid)
            cuda.syncthreads()
            if k0 + BK < k_end:
                _load_tiles(w, w2, n_out, n_rows, x, n_tok, n_in, k0 + BK, k_end, m0, n0, tid, wv, xv)
            for ks in range(kq, BK, 16):         # k-steps of 16: the lane's k are ks + 4 i
                acc = _mma_quad(_a_frag(ws, wr, ks), _b_frag(xs, wt, ks), _b_frag(xs, wt + 8, ks), acc)
        # a lane's D values: rows g, g + 8 of the quadrant, tokens 2 kq, 2 kq + 1 of each 8-token tile
        r0 = m0 + wr
        t0 = n0 + wt - g + 2 * kq
        n_split = cuda.gridDim.z
        _store_quad(acc, r0, t0, n_out, n_out2, n_tok, bias, has_bias, out, bias2, has_bias2, out2, split_out,
                    part, split, n_split)

    return kernel


def matmul(w: Any, x: Any, n_tok: int, *, out: Any, bias: Any | None = None, w2: Any | None = None,
           bias2: Any | None = None, out2: Any | None = None, gate: tuple[Any, int] | None = None,
           stream: Any = 0) -> None:
    """``out (T, n_out) = x (T, n_in) @ w.T (+ bias)`` and optionally ``out2 = x @ w2.T (+ bias2)``: the
    ``f16.matvec`` contract (see ``f16_matvec.f16_matvec``) for a step of ``n_tok`` tokens."""
    n_out, n_in = w.shape
    n_out2 = 0 if w2 is None else w2.shape[0]
    if w2 is not None and w2.dtype != w.dtype:
        raise ValueError(f"gemm_f64.matmul: w2 is {w2.dtype}, w {w.dtype}: one dtype (f16_matvec's scalar "
                         f"kernel takes mixed pairs)")
    d = L.placeholder(np.float32)
    d64 = L.placeholder(np.float64)
    gate_arr, gate_at = gate if gate is not None else (L.placeholder(np.int32), -1)
    grid = (L.cdiv(n_out + n_out2, BM), L.cdiv(n_tok, BN), 1)
    L.launch(_make_gemm(False), grid, THREADS, stream,
             L.flat(w), L.flat(w if w2 is None else w2), n_out, n_out2, L.flat(x), n_tok, n_in, n_in,
             d if bias is None else L.flat(bias), int(bias is not None), L.flat(out),
             d if bias2 is None else L.flat(bias2), int(bias2 is not None), d if out2 is None else L.flat(out2),
             0, d64, d64, 1, np.float64(0.0), gate_arr, int(gate_at))


def hc_mix_splits(hc_dim: int, n_tok: int, max_splits: int) -> int:
    """K splits of the HC mix GEMM: enough 32 x 32 blocks for ~1.5 waves, at most ``max_splits``, each split a
    whole number of ``BK`` values."""
    want = L.cdiv(TARGET_BLOCKS * 3 // 2, L.cdiv(n_tok, BN))
    return max(1, min(want, max_splits, L.cdiv(hc_dim, BK)))


def hc_mix(hc: Any, fn: Any, n_tok: int, part_ss: Any, ns_ss: int, rms_eps: np.float64, *, part: Any,
           splits: int, stream: Any = 0) -> int:
    """``part[(t * n_mix + m) * n_split + s] = sum over split s of fn[m, i] * float32(hc[t, i] / rms(hc[t]))``
    (float64), ``1 / rms`` from the ``ns_ss`` partial sums of squares of each token in ``part_ss``.  Returns
    ``n_split``: ``splits`` or fewer (each split a whole number of ``BK`` values)."""
    n_mix, hc_dim = fn.shape
    k_len = L.cdiv(L.cdiv(hc_dim, splits), BK) * BK
    n_split = L.cdiv(hc_dim, k_len)
    d = L.placeholder(np.float32)
    grid = (L.cdiv(n_mix, BM), L.cdiv(n_tok, BN), n_split)
    L.launch(_make_gemm(True), grid, THREADS, stream,
             L.flat(fn), L.flat(fn), n_mix, 0, L.flat(hc), n_tok, hc_dim, k_len, d, 0, d, d, 0, d,
             1, part, part_ss, ns_ss, rms_eps, L.placeholder(np.int32), -1)
    return n_split
