"""Routed-expert matvecs over the selected experts only (IQ2_XXS, Q2_K, Q4_K x Q8_K).

Expert tensors ``(E, N, K)`` are block-minor (``ds4nb.quants.repack``) and
activations are Q8_K from ``act.quantize_q8_K`` (block-minor too).  Per
quant type there are three ops, all taking the selected expert ids
``(n_used,)`` int32 on the device:

``<q>.moe_matvec``   ``out[s, r] = W[ids[s]][r] . x[s]`` (x: one row shared by
                     every slot, or one row per slot)
``<q>.moe_gate_up``  ``mid[s, r] = silu(min(g, c)) * clip(u, -c, c) * weight[s]``
                     with ``g, u`` the gate and up rows (DS4's clamped SwiGLU,
                     ds4.c ``swiglu``; no clamp when ``c <= 1e-6``), fused so
                     gate/up never reach memory
``<q>.moe_down_sum`` ``out[r] = sum_s W[ids[s]][r] . mid[s]`` (the expert sum,
                     deterministic: a fixed slot order, no atomics)

Launch geometry.  A row is handled by ``lpr`` lanes (a power of two, 4..32:
one per 256-value block, 16 for K=4096, 8 for K=2048, see
``default_lanes_per_row``), each lane owning whole
super-blocks ``b = lane, lane+lpr, ...``, so
the per-block scale arithmetic stays in one lane and a row costs one
``log2(lpr)``-step shuffle reduction, pairwise in lane order
(``warp_sum_pairwise``: so ``moe_mma`` can walk the super-blocks in order and
add them the same way).  Lanes owning consecutive blocks read
consecutive words of every block-minor field (coalesced).  ``moe_matvec``
and ``moe_gate_up`` use 256-thread blocks of ``256 / lpr`` rows with the slot
in ``blockIdx.y``.  ``moe_down_sum`` puts the slots in the block instead (warp
``s`` = slot ``s``, ``32 / lpr`` rows per block) and sums the per-slot rows
through shared memory: with only 4096 output rows, one warp per slot keeps
~6x more warps resident than looping over the slots in one warp.

Simulator geometry: one lane per row (``default_lanes_per_row``), blocks of 16
rows (``block_threads``; ``moe_down_sum``: 4 rows per slot) and a lane walking
4 (8) rows one after the other, the rows beyond the first in a branch that is
constant-false on the GPU, so the GPU kernels are unchanged.

IQ2_XXS decodes each 8-value grid point with two shared-memory table reads
and two ``byte_perm`` (PRMT) instructions (see the section below).  A first
version held the grid as uint64 magnitudes and the signs as uint64 byte masks
(two 64-bit random reads per grid point, ~7 bank-conflict wavefronts each):
the gate/up kernel took 29.7 us on H100, which a wavefront count attributes
mostly to those conflicts; this version takes 18.9 us (bench/results).

Numerics (docs/model.md, "Numerics: one rounding per value"): every
32/16-value dot is an exact integer (``dp4a``); the per-super-block terms are
float64: ``d_w * d_x * isum`` for IQ2_XXS (times 1/8), ``d_x * (d_w * isum -
dmin_w * summs)`` for the K-quants (``isum = sum sc * dot``, ``summs = sum m *
bsum``, both exact integers), and the lane sums and the shuffle reduction are
float64 too, so each expert product is the float32 rounding of the exactly
decoded weight row times the exact Q8_K activation, in any order.  Fused steps
round where docs/model.md's table says: ``moe_matvec`` rounds each product
once; ``moe_gate_up`` rounds gate and up to float32, then evaluates
``silu(min(g, c)) * clip(u, -c, c) * weight`` in float64 (sigmoid through a
float64 ``exp``) and rounds once; ``moe_down_sum`` rounds each slot's product
to float32 and sums the slots in float64, rounded once.  Against the float64
twins: bit-identical but for rare (~1e-7 per value) one-ulp differences.
float64 work is per 256-value super-block and per output, never per int8.
Array indices are cast to uint64 at each access (no signed wraparound code).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from gguf.constants import GGMLQuantizationType
from numba import cuda

from ds4nb.kernels import _launch as L
from ds4nb.kernels.activation import Q8KAct, q8_K_to_device
from ds4nb.kernels.intrinsics import (SIMULATOR, as_i32, byte_perm, device, dot8, dp4a, float32, float64, hi_i32, int32,
                                      jit_kernel, uint32, uint64, wait_prior_grid, warp_sum_pairwise)
from ds4nb.kernels.parity import CONTRACT, Case
from ds4nb.kernels.registry import OpSpec, implementation
from ds4nb.quants import dequantize, dequantize_q8_K_activation, quantize_q8_K, random_blocks
from ds4nb.quants.formats import iq2xxs_grid, iq2xxs_sign_bytes
from ds4nb.quants.repack import PackedWeight, layout_name, repack

Q = GGMLQuantizationType
QK_K = 256
THREADS = 256
MAX_SLOTS = 32  # moe_down_sum: one warp per slot, 1024 threads at most
# The simulator pays for every thread it starts and every barrier: one lane per row
# (default_lanes_per_row), 8 rows a block and several rows per lane, one after the other.
SIM_ROWS = 16
ROWS_PER_THREAD = 4 if SIMULATOR else 1        # matvec / gate_up
DOWN_ROWS_PER_THREAD = 8 if SIMULATOR else 1   # down_sum


def block_threads(lpr: int) -> int:
    """Threads of a matvec / gate_up block: 256 on the GPU, 16 rows of ``lpr`` lanes in the simulator."""
    return lpr * SIM_ROWS if SIMULATOR else THREADS


def down_warp(lpr: int) -> int:
    """moe_down_sum: lanes per slot (a warp on the GPU; 4 rows of ``lpr`` lanes in the simulator)."""
    return 4 * lpr if SIMULATOR else 32

_D0 = np.float64(0.0)
_D1 = np.float64(1.0)
_D_EIGHTH = np.float64(0.125)
_F_CLAMP_MIN = np.float32(1.0e-6)  # docs/model.md step 17: no clamp when c <= 1e-6 (compared in float32)
_U1 = np.uint64(1)
_U4 = np.uint64(4)
_UFF = np.uint64(0xFF)
_M2 = np.uint64(0x0303030303030303)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_M6_32 = np.uint64(0x3F3F3F3F)
_M4_32 = np.uint64(0x0F0F0F0F)
_M30_32 = np.uint64(0x30303030)
_U2 = np.uint64(2)
_U32 = np.uint64(32)


# ---------------------------------------------------------------------------
# Per-type partial dots: one lane's share of row ``wrow`` (= expert * N + row)
# against activation row ``yrow``.  Same signature for every type so the
# kernel factories below can take any of them.
# ---------------------------------------------------------------------------


@device
def _lo16(w):
    """Sign-extended low half of an int32 pair word (bsums[2p])."""
    return ((w & 0xFFFF) ^ 0x8000) - 0x8000


@device
def _q2_k_partial(qs, sc, dm, wrow, nb, yq, yd, ybs, yrow, lane, lpr, grid_s, sign_s):
    acc = _D0
    for b in range(lane, nb, lpr):
        qb = wrow * 8 * nb + b
        sb = wrow * 4 * nb + b
        yb = yrow * 32 * nb + b
        bb = yrow * 8 * nb + b
        isum = int32(0)
        for h in range(2):  # two halves of 128 values = 32 quant bytes = 4 words
            w0 = qs[uint64(qb + (4 * h) * nb)]
            w1 = qs[uint64(qb + (4 * h + 1) * nb)]
            w2 = qs[uint64(qb + (4 * h + 2) * nb)]
            w3 = qs[uint64(qb + (4 * h + 3) * nb)]
            for k in range(4):  # bit pair k: values h*128 + 32k + [0, 32) = sub-blocks j, j+1
                sh = uint64(2 * k)
                yk = yb + (16 * h + 4 * k) * nb
                d0 = dot8((w0 >> sh) & _M2, yq[uint64(yk)], int32(0))
                d0 = dot8((w1 >> sh) & _M2, yq[uint64(yk + nb)], d0)
                d1 = dot8((w2 >> sh) & _M2, yq[uint64(yk + 2 * nb)], int32(0))
                d1 = dot8((w3 >> sh) & _M2, yq[uint64(yk + 3 * nb)], d1)
                # scale bytes j = 8h + 2k and j + 1: word j // 4, byte j % 4 (low nibble)
                scw = sc[uint64(sb + (2 * h + k // 2) * nb)]
                bsh = 16 * (k % 2)
                isum = int32(isum + int32((scw >> bsh) & 0xF) * d0 + int32((scw >> (bsh + 8)) & 0xF) * d1)
        summs = int32(0)
        for p in range(8):  # bsum pair p = sub-blocks 2p, 2p+1; mins are the high nibbles
            scw = sc[uint64(sb + (p // 2) * nb)]
            bsh = 16 * (p % 2)
            bw = ybs[uint64(bb + p * nb)]
            lo = _lo16(bw)
            hi = bw >> 16  # arithmetic shift: the signed high half
            summs = int32(summs + int32((scw >> (bsh + 4)) & 0xF) * lo + int32((scw >> (bsh + 12)) & 0xF) * hi)
        d = float64(float32(dm[uint64(2 * wrow * nb + b)]))
        dmin = float64(float32(dm[uint64((2 * wrow + 1) * nb + b)]))
        acc += float64(yd[uint64(yrow * nb + b)]) * (d * float64(isum) - dmin * float64(summs))
    return acc


@device
def _q4_k_partial(qs, sc, dm, wrow, nb, yq, yd, ybs, yrow, lane, lpr, grid_s, sign_s):
    acc = _D0
    for b in range(lane, nb, lpr):
        qb = wrow * 16 * nb + b
        sb = wrow * 3 * nb + b
        yb = yrow * 32 * nb + b
        bb = yrow * 8 * nb + b
        lo = uint64(sc[uint64(sb)])
        hi = uint64(sc[uint64(sb + nb)])
        ex = uint64(sc[uint64(sb + 2 * nb)])
        # the 8 six-bit scales / mins, byte j = sub-block j (GGUF's get_scale_min_k4, word-wide)
        scs = (lo & _M6_32) | (((ex & _M4_32) | ((lo >> _U2) & _M30_32)) << _U32)
        mns = (hi & _M6_32) | ((((ex >> _U4) & _M4_32) | ((hi >> _U2) & _M30_32)) << _U32)
        isum = int32(0)
        summs = int32(0)
        for c in range(4):  # chunk c: 32 bytes; low nibbles = sub-block 2c, high = 2c + 1
            dlo = int32(0)
            dhi = int32(0)
            for pq in range(4):
                w = qs[uint64(qb + (4 * c + pq) * nb)]
                dlo = dot8(w & _M4, yq[uint64(yb + (8 * c + pq) * nb)], dlo)
                dhi = dot8((w >> _U4) & _M4, yq[uint64(yb + (8 * c + 4 + pq) * nb)], dhi)
            s0 = int32((scs >> uint64(16 * c)) & _UFF)
            s1 = int32((scs >> uint64(16 * c + 8)) & _UFF)
            m0 = int32((mns >> uint64(16 * c)) & _UFF)
            m1 = int32((mns >> uint64(16 * c + 8)) & _UFF)
            isum = int32(isum + s0 * dlo + s1 * dhi)
            b0 = ybs[uint64(bb + (2 * c) * nb)]
            b1 = ybs[uint64(bb + (2 * c + 1) * nb)]
            summs = int32(summs + m0 * (_lo16(b0) + (b0 >> 16)) + m1 * (_lo16(b1) + (b1 >> 16)))
        d = float64(float32(dm[uint64(2 * wrow * nb + b)]))
        dmin = float64(float32(dm[uint64((2 * wrow + 1) * nb + b)]))
        acc += float64(yd[uint64(yrow * nb + b)]) * (d * float64(isum) - dmin * float64(summs))
    return acc


# ---------------------------------------------------------------------------
# IQ2_XXS.  A group word holds 4 grid indices (low half) and 4 seven-bit sign
# indices plus a 4-bit scale (high half); each grid point is 8 magnitudes from
# {8, 25, 43}.  Decoding a grid point to 8 signed int8 for dp4a takes two
# shared-memory table reads and two PRMTs:
#   grid_s[g]  8 nibbles: the code 0/1/2 of each magnitude
#   sign_s[s]  8 nibbles: 4 where that value is negative (parity bit included)
# ``sel = grid_s[g] | sign_s[s]`` selects, per byte, one of the 8 bytes
# (8, 25, 43, 0, -8, -25, -43, 0): ``byte_perm(_POS, _NEG, sel)`` gives values
# 0..3 and ``byte_perm(_POS, _NEG, sel >> 16)`` values 4..7.
# The tables are read at random indices, so the reads conflict on shared-memory
# banks; ``R`` copies interleaved word by word (entry ``e`` of copy ``c`` at
# ``e * R + c``, lane ``l`` reading copy ``l % R``) spread the lanes of a warp
# over R times more banks -- but filling them costs more than it saves on H100
# (see IQ2_REPLICAS), so the default is one copy.
# ---------------------------------------------------------------------------

_POS = np.uint32(0x002B1908)  # bytes 8, 25, 43, 0
_NEG = np.uint32(0x00D5E7F8)  # bytes -8, -25, -43, 0
_U16 = np.uint32(16)
_U28 = np.uint32(28)
_U1_32 = np.uint32(1)
_U32_FF = np.uint32(0xFF)
_U32_7F = np.uint32(0x7F)
_ULO = np.uint64(0xFFFFFFFF)

@L.kernel_factory
def _iq2_partials(replicas: int) -> tuple[Any, Any]:
    """(single-row partial, gate/up pair partial) reading ``replicas``-way tables."""
    rep_n = np.uint32(replicas)

    @device
    def point(gw, sw, i, grid_l, sign_l, y, acc):
        """Grid point i of a group (gw: grid indices, sw: sign indices) . 8 activation int8 in y."""
        sel = grid_l[((gw >> uint32(8 * i)) & _U32_FF) * rep_n] | sign_l[((sw >> uint32(7 * i)) & _U32_7F) * rep_n]
        acc = dp4a(as_i32(byte_perm(_POS, _NEG, sel)), as_i32(y), acc)
        return dp4a(as_i32(byte_perm(_POS, _NEG, sel >> _U16)), hi_i32(y), acc)

    @device
    def group(w, yq, yb, j, nb, grid_l, sign_l):
        gw = uint32(w & _ULO)
        sw = uint32(w >> _U32)
        s = int32(0)
        for i in range(4):
            s = point(gw, sw, i, grid_l, sign_l, yq[uint64(yb + (4 * j + i) * nb)], s)
        return int32(s * as_i32(((sw >> _U28) << _U1_32) | _U1_32))  # 2 * scale + 1, in eighths of d

    @device
    def group_pair(gw64, uw64, yq, yb, j, nb, grid_l, sign_l):
        ggw = uint32(gw64 & _ULO)
        gsw = uint32(gw64 >> _U32)
        ugw = uint32(uw64 & _ULO)
        usw = uint32(uw64 >> _U32)
        gs = int32(0)
        us = int32(0)
        for i in range(4):
            y = yq[uint64(yb + (4 * j + i) * nb)]  # one activation load for gate and up
            gs = point(ggw, gsw, i, grid_l, sign_l, y, gs)
            us = point(ugw, usw, i, grid_l, sign_l, y, us)
        return (int32(gs * as_i32(((gsw >> _U28) << _U1_32) | _U1_32)),
                int32(us * as_i32(((usw >> _U28) << _U1_32) | _U1_32)))

    @device
    def partial(qs, sc, dm, wrow, nb, yq, yd, ybs, yrow, lane, lpr, grid_s, sign_s):
        rep = cuda.threadIdx.x % replicas  # this lane's table copy: a view starting at it
        grid_l = grid_s[rep:]
        sign_l = sign_s[rep:]
        acc = _D0
        for b in range(lane, nb, lpr):
            qb = wrow * 8 * nb + b
            yb = yrow * 32 * nb + b
            # all 8 group words first: 8 independent loads in flight per lane
            w0 = qs[uint64(qb)]
            w1 = qs[uint64(qb + nb)]
            w2 = qs[uint64(qb + 2 * nb)]
            w3 = qs[uint64(qb + 3 * nb)]
            w4 = qs[uint64(qb + 4 * nb)]
            w5 = qs[uint64(qb + 5 * nb)]
            w6 = qs[uint64(qb + 6 * nb)]
            w7 = qs[uint64(qb + 7 * nb)]
            isum = group(w0, yq, yb, 0, nb, grid_l, sign_l)
            isum += group(w1, yq, yb, 1, nb, grid_l, sign_l)
            isum += group(w2, yq, yb, 2, nb, grid_l, sign_l)
            isum += group(w3, yq, yb, 3, nb, grid_l, sign_l)
            isum += group(w4, yq, yb, 4, nb, grid_l, sign_l)
            isum += group(w5, yq, yb, 5, nb, grid_l, sign_l)
            isum += group(w6, yq, yb, 6, nb, grid_l, sign_l)
            isum += group(w7, yq, yb, 7, nb, grid_l, sign_l)
            acc += float64(int32(isum)) * (float64(float32(dm[uint64(wrow * nb + b)]))
                                           * float64(yd[uint64(yrow * nb + b)]))
        return acc * _D_EIGHTH

    @device
    def pair(gqs, gsc, gdm, uqs, usc, udm, wrow, nb, yq, yd, ybs, yrow, lane, lpr, grid_s, sign_s):
        """Gate and up rows together: 16 weight words in flight per lane, each activation word loaded once."""
        rep = cuda.threadIdx.x % replicas
        grid_l = grid_s[rep:]
        sign_l = sign_s[rep:]
        gacc = _D0
        uacc = _D0
        for b in range(lane, nb, lpr):
            qb = wrow * 8 * nb + b
            yb = yrow * 32 * nb + b
            g0 = gqs[uint64(qb)]
            g1 = gqs[uint64(qb + nb)]
            g2 = gqs[uint64(qb + 2 * nb)]
            g3 = gqs[uint64(qb + 3 * nb)]
            g4 = gqs[uint64(qb + 4 * nb)]
            g5 = gqs[uint64(qb + 5 * nb)]
            g6 = gqs[uint64(qb + 6 * nb)]
            g7 = gqs[uint64(qb + 7 * nb)]
            u0 = uqs[uint64(qb)]
            u1 = uqs[uint64(qb + nb)]
            u2 = uqs[uint64(qb + 2 * nb)]
            u3 = uqs[uint64(qb + 3 * nb)]
            u4 = uqs[uint64(qb + 4 * nb)]
            u5 = uqs[uint64(qb + 5 * nb)]
            u6 = uqs[uint64(qb + 6 * nb)]
            u7 = uqs[uint64(qb + 7 * nb)]
            gsum, usum = group_pair(g0, u0, yq, yb, 0, nb, grid_l, sign_l)
            a, c = group_pair(g1, u1, yq, yb, 1, nb, grid_l, sign_l)
            gsum += a
            usum += c
            a, c = group_pair(g2, u2, yq, yb, 2, nb, grid_l, sign_l)
            gsum += a
            usum += c
            a, c = group_pair(g3, u3, yq, yb, 3, nb, grid_l, sign_l)
            gsum += a
            usum += c
            a, c = group_pair(g4, u4, yq, yb, 4, nb, grid_l, sign_l)
            gsum += a
            usum += c
            a, c = group_pair(g5, u5, yq, yb, 5, nb, grid_l, sign_l)
            gsum += a
            usum += c
            a, c = group_pair(g6, u6, yq, yb, 6, nb, grid_l, sign_l)
            gsum += a
            usum += c
            a, c = group_pair(g7, u7, yq, yb, 7, nb, grid_l, sign_l)
            gsum += a
            usum += c
            ys = float64(yd[uint64(yrow * nb + b)])
            gacc += float64(int32(gsum)) * (float64(float32(gdm[uint64(wrow * nb + b)])) * ys)
            uacc += float64(int32(usum)) * (float64(float32(udm[uint64(wrow * nb + b)])) * ys)
        return gacc * _D_EIGHTH, uacc * _D_EIGHTH

    return partial, pair


def _pair_of(partial):
    """Gate/up pair from a single-row partial (two independent walks)."""

    @device
    def pair(gqs, gsc, gdm, uqs, usc, udm, wrow, nb, yq, yd, ybs, yrow, lane, lpr, grid_s, sign_s):
        g = partial(gqs, gsc, gdm, wrow, nb, yq, yd, ybs, yrow, lane, lpr, grid_s, sign_s)
        u = partial(uqs, usc, udm, wrow, nb, yq, yd, ybs, yrow, lane, lpr, grid_s, sign_s)
        return g, u

    return pair


_K_PAIRS = {Q.Q2_K: (_q2_k_partial, _pair_of(_q2_k_partial)), Q.Q4_K: (_q4_k_partial, _pair_of(_q4_k_partial))}
QTYPES = (Q.IQ2_XXS, Q.Q2_K, Q.Q4_K)

#: IQ2_XXS table copies per kind.  Measured on H100 (gate/up, 6 x 2048 x 4096):
#: 1 copy 19.3-19.8 us, 4 copies 20.3-21.5 us, 8 copies 20.1-22.3 us: filling
#: the copies costs more than the bank conflicts they remove, so one copy.  On
#: H200, blocks that fill the copies once and walk 2, 3 or 6 row tiles
#: (grid-stride) did not pay either: 1 copy 19.3 / 20.2 / 28.8 us, 8 copies
#: 21.4 / 22.7 / 32.6, 32 copies (a bank a lane) 27.3 / 28.7 / 39.1, against
#: 19.3 for one copy and one tile a block (fewer blocks: less in flight).
IQ2_REPLICAS = {"matvec": 1, "gate_up": 1, "down_sum": 1}

#: ``moe_down_sum``'s launch bounds: blocks (of 32 threads a slot) per SM asked of ptxas, 0 for none.  With 4,
#: ptxas keeps ~80 registers a thread and more of a row's loads in flight instead of 48 (it targets full
#: occupancy without bounds, which a grid of 512-1024 small blocks never reaches).  Measured on H200 (6 x 4096 x
#: 2048, 8 lanes a row): Q2_K 10.7 us with 4, 14.4 without, 12.6 with 5 (64 registers); IQ2_XXS 13.0 / 13.7;
#: Q4_K 13.7 / 17.0.  Against the former geometry (4 lanes a row, no bounds): 12.9, 14.6 and 15.1 us.
DOWN_MIN_BLOCKS = 4


def _partial_pair(qtype: GGMLQuantizationType, replicas: int) -> tuple[Any, Any]:
    return _iq2_partials(replicas) if qtype == Q.IQ2_XXS else _K_PAIRS[qtype]


@device
def _load_luts(grid_g, sign_g, grid_s, sign_s, replicas):
    # while loops: a range() with the run-time step blockDim.x costs a 64-bit division call
    k = cuda.threadIdx.x
    while k < 256 * replicas:
        grid_s[k] = grid_g[k // replicas]
        k += cuda.blockDim.x
    k = cuda.threadIdx.x
    while k < 128 * replicas:
        sign_s[k] = sign_g[k // replicas]
        k += cuda.blockDim.x


# ---------------------------------------------------------------------------
# Kernel factories, compiled per (kind, qtype, lanes per row, blocks per row,
# table copies).  ``nb`` is a compile-time constant: every block-minor offset
# ``j * nb`` then folds into the load instruction's immediate.
# ---------------------------------------------------------------------------


@L.kernel_factory
def _make_matvec(qtype, lpr: int, nb: int, replicas: int):
    partial, _ = _partial_pair(qtype, replicas)
    lut = qtype == Q.IQ2_XXS
    grid_words, sign_words = (256 * replicas, 128 * replicas) if lut else (1, 1)
    rows_per_block = block_threads(lpr) // lpr

    @device
    def row_out(qs, sc, dm, n_rows, ids, x_per_slot, yq, yd, ybs, grid_s, sign_s, out, slot, row, lane):
        r = min(row, n_rows - 1)  # tail lanes compute a real row and drop it: shuffles stay full-warp
        yrow = slot if x_per_slot else 0
        acc = partial(qs, sc, dm, ids[slot] * n_rows + r, nb, yq, yd, ybs, yrow, lane, lpr, grid_s, sign_s)
        acc = warp_sum_pairwise(acc, lpr)
        if lane == 0 and row < n_rows:
            out[slot * n_rows + row] = float32(acc)   # the one rounding

    @cuda.jit
    def kernel(qs, sc, dm, n_rows, ids, x_per_slot, yq, yd, ybs, grid_g, sign_g, out):
        wait_prior_grid()
        if ids[cuda.blockIdx.y] < 0:     # a slot whose expert another launch reads (split placement)
            return
        grid_s = cuda.shared.array(grid_words, uint32)
        sign_s = cuda.shared.array(sign_words, uint32)
        if lut:
            _load_luts(grid_g, sign_g, grid_s, sign_s, replicas)
            cuda.syncthreads()
        slot = cuda.blockIdx.y
        row = cuda.blockIdx.x * (rows_per_block * ROWS_PER_THREAD) + cuda.threadIdx.x // lpr
        lane = cuda.threadIdx.x % lpr
        row_out(qs, sc, dm, n_rows, ids, x_per_slot, yq, yd, ybs, grid_s, sign_s, out, slot, row, lane)
        if ROWS_PER_THREAD > 1:  # the simulator's further rows (a constant-false branch on the GPU)
            for rep in range(1, ROWS_PER_THREAD):
                if row + rep * rows_per_block >= n_rows:
                    break
                row_out(qs, sc, dm, n_rows, ids, x_per_slot, yq, yd, ybs, grid_s, sign_s, out, slot,
                        row + rep * rows_per_block, lane)

    return kernel


@device
def clamped_swiglu(g32, u32, clamp, w_route):
    """DS4's clamped SwiGLU of one expert row times its router weight (docs/model.md step 17):
    ``silu(min(g, c)) * clip(u, -c, c) * w`` in float64 (the sigmoid through a float64 exp), rounded once;
    no clamp when ``c <= 1e-6``."""
    gd = float64(g32)
    ud = float64(u32)
    if clamp > _F_CLAMP_MIN:
        cd = float64(clamp)
        gd = min(gd, cd)
        ud = min(max(ud, -cd), cd)
    return float32(gd / (_D1 + math.exp(-gd)) * ud * float64(w_route))


@L.kernel_factory
def _make_gate_up(qtype, lpr: int, nb: int, replicas: int, min_blocks: int = 0):
    _, pair = _partial_pair(qtype, replicas)
    lut = qtype == Q.IQ2_XXS
    grid_words, sign_words = (256 * replicas, 128 * replicas) if lut else (1, 1)
    rows_per_block = block_threads(lpr) // lpr

    @device
    def row_out(gqs, gsc, gdm, uqs, usc, udm, n_rows, ids, weights, clamp, x_per_slot, yq, yd, ybs, grid_s,
                sign_s, mid, slot, row, lane):
        r = min(row, n_rows - 1)
        yrow = slot if x_per_slot else 0
        g, u = pair(gqs, gsc, gdm, uqs, usc, udm, ids[slot] * n_rows + r, nb, yq, yd, ybs, yrow, lane, lpr,
                    grid_s, sign_s)
        g32 = float32(warp_sum_pairwise(g, lpr))   # gate_e, up_e: float32 values (docs/model.md step 17)
        u32 = float32(warp_sum_pairwise(u, lpr))
        if lane == 0 and row < n_rows:
            mid[slot * n_rows + row] = clamped_swiglu(g32, u32, clamp, weights[slot])

    @jit_kernel(launch_bounds=(THREADS, min_blocks) if min_blocks else None)
    def kernel(gqs, gsc, gdm, uqs, usc, udm, n_rows, ids, weights, clamp, x_per_slot,
               yq, yd, ybs, grid_g, sign_g, mid):
        wait_prior_grid()
        if ids[cuda.blockIdx.y] < 0:     # a slot whose expert another launch reads (split placement)
            return
        grid_s = cuda.shared.array(grid_words, uint32)
        sign_s = cuda.shared.array(sign_words, uint32)
        if lut:
            _load_luts(grid_g, sign_g, grid_s, sign_s, replicas)
            cuda.syncthreads()
        slot = cuda.blockIdx.y
        row = cuda.blockIdx.x * (rows_per_block * ROWS_PER_THREAD) + cuda.threadIdx.x // lpr
        lane = cuda.threadIdx.x % lpr
        row_out(gqs, gsc, gdm, uqs, usc, udm, n_rows, ids, weights, clamp, x_per_slot, yq, yd, ybs, grid_s,
                sign_s, mid, slot, row, lane)
        if ROWS_PER_THREAD > 1:  # the simulator's further rows (a constant-false branch on the GPU)
            for rep in range(1, ROWS_PER_THREAD):
                if row + rep * rows_per_block >= n_rows:
                    break
                row_out(gqs, gsc, gdm, uqs, usc, udm, n_rows, ids, weights, clamp, x_per_slot, yq, yd, ybs,
                        grid_s, sign_s, mid, slot, row + rep * rows_per_block, lane)

    return kernel


@L.kernel_factory
def _make_down_sum(qtype, lpr: int, nb: int, replicas: int, min_blocks: int = 0, threads: int = 0):
    partial, _ = _partial_pair(qtype, replicas)
    lut = qtype == Q.IQ2_XXS
    grid_words, sign_words = (256 * replicas, 128 * replicas) if lut else (1, 1)
    warp = down_warp(lpr)
    rows_per_warp = warp // lpr
    cols = rows_per_warp * DOWN_ROWS_PER_THREAD     # rows of a block

    @device
    def slot_row(qs, sc, dm, n_rows, ids, yq, yd, ybs, grid_s, sign_s, part, slot, row, col, lane):
        r = min(row, n_rows - 1)
        acc = partial(qs, sc, dm, ids[slot] * n_rows + r, nb, yq, yd, ybs, slot, lane, lpr, grid_s, sign_s)
        acc = warp_sum_pairwise(acc, lpr)
        if lane == 0:
            part[slot, col] = float32(acc)   # down_e: a float32 value (docs/model.md step 17)

    @device
    def slot_sum(part, n_rows, out, rr, col):
        if rr < n_rows:
            s = _D0
            for k in range(cuda.blockDim.x // warp):  # slot order: deterministic (and float64: any order)
                s += float64(part[k, col])
            out[rr] = float32(s)   # routed = sum_e down_e, rounded once

    @jit_kernel(launch_bounds=(threads, min_blocks) if min_blocks else None)
    def kernel(qs, sc, dm, n_rows, ids, yq, yd, ybs, grid_g, sign_g, out):
        wait_prior_grid()
        grid_s = cuda.shared.array(grid_words, uint32)
        sign_s = cuda.shared.array(sign_words, uint32)
        part = cuda.shared.array((MAX_SLOTS, cols), float32)   # each slot's product, rounded
        if lut:
            _load_luts(grid_g, sign_g, grid_s, sign_s, replicas)
            cuda.syncthreads()
        slot = cuda.threadIdx.x // warp
        sub = (cuda.threadIdx.x % warp) // lpr
        lane = cuda.threadIdx.x % lpr
        row = cuda.blockIdx.x * cols + sub
        slot_row(qs, sc, dm, n_rows, ids, yq, yd, ybs, grid_s, sign_s, part, slot, row, sub, lane)
        if DOWN_ROWS_PER_THREAD > 1:  # the simulator's further rows (a constant-false branch on the GPU)
            for rep in range(1, DOWN_ROWS_PER_THREAD):
                if row + rep * rows_per_warp >= n_rows:
                    break
                slot_row(qs, sc, dm, n_rows, ids, yq, yd, ybs, grid_s, sign_s, part, slot,
                         row + rep * rows_per_warp, rep * rows_per_warp + sub, lane)
        cuda.syncthreads()
        t = cuda.threadIdx.x
        if t < rows_per_warp:
            slot_sum(part, n_rows, out, cuda.blockIdx.x * cols + t, t)
            if DOWN_ROWS_PER_THREAD > 1:
                for rep in range(1, DOWN_ROWS_PER_THREAD):
                    slot_sum(part, n_rows, out, cuda.blockIdx.x * cols + rep * rows_per_warp + t,
                             rep * rows_per_warp + t)

    return kernel


_FACTORIES = {"matvec": _make_matvec, "gate_up": _make_gate_up, "down_sum": _make_down_sum}


def _kernel(kind: str, qtype: GGMLQuantizationType, lpr: int, nb: int, replicas: int | None = None,
            min_blocks: int = 0, threads: int = THREADS) -> Any:
    """``min_blocks``: launch bounds asking for that many blocks of ``threads`` per SM (gate_up, down_sum).
    Measured on H100 (IQ2_XXS gate/up, 4 blocks: 64 registers with a 24-byte spill instead of 70): no
    gain (18.8 vs 18.9 us), so the gate/up launcher leaves it at 0."""
    replicas = (replicas or IQ2_REPLICAS[kind]) if qtype == Q.IQ2_XXS else 1
    extra = () if not min_blocks else (min_blocks,) if kind == "gate_up" else (min_blocks, threads)
    return _FACTORIES[kind](qtype, lpr, nb, replicas, *extra)


def lanes_per_row(nb: int) -> int:
    """Lanes sharing a row: >= one per super-block, 4..32 (16 for K=4096, 8 for K=2048)."""
    return L.pow2_at_least(nb, 4, 32)


def default_lanes_per_row(nb: int) -> int:
    """One super-block per lane, every kind (16 lanes for K=4096, 8 for K=2048; one in the simulator).
    Measured on H100 (6 experts): IQ2_XXS 2048 x 4096 matvec 12.4 us (16 lanes) vs 14.8 (8), gate/up
    18.7 us (16) vs 18.8 (8).  ``moe_down_sum`` with its launch bounds (:data:`DOWN_MIN_BLOCKS`), on H200:
    Q2_K 4096 x 2048 10.7 us (8 lanes) vs 11.2 (4); without them 14.4 (8) vs 12.9 (4)."""
    return 1 if SIMULATOR else lanes_per_row(nb)


_DEVICE_CONST: dict[str, Any] = {}


def iq2_xxs_tables() -> tuple[np.ndarray, np.ndarray]:
    """(grid uint32 (256,), signs uint32 (128,)): the PRMT selector tables the kernels hold.

    Grid entry nibble ``i`` is the code (0, 1, 2) of magnitude ``i`` (8, 25, 43);
    sign entry nibble ``i`` is 4 when value ``i`` is negative.
    """
    grid = iq2xxs_grid().astype(np.int64)  # (256, 8) of 8 / 25 / 43
    codes = np.select([grid == 8, grid == 25, grid == 43], [0, 1, 2], default=-1)
    assert (codes >= 0).all()
    shifts = 4 * np.arange(8, dtype=np.int64)
    grid_sel = (codes << shifts).sum(axis=1).astype(np.uint32)
    neg = (iq2xxs_sign_bytes()[:, None].astype(np.int64) >> np.arange(8)) & 1  # (128, 8)
    sign_sel = ((neg * 4) << shifts).sum(axis=1).astype(np.uint32)
    return grid_sel, sign_sel


def _consts() -> dict[str, Any]:
    if not _DEVICE_CONST:
        grid, sign = iq2_xxs_tables()
        _DEVICE_CONST["grid"] = cuda.to_device(grid)
        _DEVICE_CONST["sign"] = cuda.to_device(sign)
        _DEVICE_CONST["no_sc"] = cuda.to_device(np.zeros(1, dtype=np.uint32))
    return _DEVICE_CONST


def _sc(w: PackedWeight, c: dict[str, Any]) -> Any:
    return c["no_sc"] if w.sc is None else w.sc


def _geometry(w: PackedWeight, qtype: GGMLQuantizationType, lpr: int | None) -> tuple[int, int, int]:
    if w.qtype != qtype:
        raise ValueError(f"expected a {qtype.name} expert tensor, got {w.qtype.name}")
    if len(w.shape) != 3:
        raise ValueError(f"expected an (E, N, K) expert tensor, got shape {w.shape}")
    nb = w.n_blocks
    return w.shape[-2], nb, lpr or default_lanes_per_row(nb)


def _moe_matvec(qtype: GGMLQuantizationType, w: PackedWeight, ids: Any, x: Q8KAct, *, out: Any,
                stream: Any = 0, lpr: int | None = None, replicas: int | None = None) -> Any:
    n_rows, nb, lpr = _geometry(w, qtype, lpr)
    n_slots = ids.size
    x_per_slot = 1 if x.d.size == n_slots * nb else 0
    c = _consts()
    nt = block_threads(lpr)
    grid = (L.cdiv(n_rows, nt // lpr * ROWS_PER_THREAD), n_slots)
    L.launch(_kernel("matvec", qtype, lpr, nb, replicas), grid, nt, stream,
        w.qs, _sc(w, c), w.dm, n_rows, ids, x_per_slot, x.qs, x.d, x.bsums, c["grid"], c["sign"], L.flat(out))
    return out


def _moe_gate_up(qtype: GGMLQuantizationType, gate: PackedWeight, up: PackedWeight, ids: Any, weights: Any,
                 x: Q8KAct, clamp: float, *, out: Any, stream: Any = 0, lpr: int | None = None,
                 replicas: int | None = None, min_blocks: int = 0) -> Any:
    n_rows, nb, lpr = _geometry(gate, qtype, lpr)
    if up.shape != gate.shape or up.qtype != gate.qtype:
        raise ValueError(f"gate {gate.shape} and up {up.shape} differ")
    n_slots = ids.size
    x_per_slot = 1 if x.d.size == n_slots * nb else 0
    c = _consts()
    nt = block_threads(lpr)
    grid = (L.cdiv(n_rows, nt // lpr * ROWS_PER_THREAD), n_slots)
    L.launch(_kernel("gate_up", qtype, lpr, nb, replicas, min_blocks), grid, nt, stream,
        gate.qs, _sc(gate, c), gate.dm, up.qs, _sc(up, c), up.dm, n_rows, ids, weights, np.float32(clamp),
        x_per_slot, x.qs, x.d, x.bsums, c["grid"], c["sign"], L.flat(out))
    return out


def _moe_down_sum(qtype: GGMLQuantizationType, w: PackedWeight, ids: Any, x: Q8KAct, *, out: Any,
                  stream: Any = 0, lpr: int | None = None, replicas: int | None = None,
                  min_blocks: int = DOWN_MIN_BLOCKS) -> Any:
    n_rows, nb, lpr = _geometry(w, qtype, lpr)
    n_slots = ids.size
    if not 1 <= n_slots <= MAX_SLOTS:
        raise ValueError(f"moe_down_sum takes 1..{MAX_SLOTS} experts, got {n_slots}")
    c = _consts()
    warp = down_warp(lpr)
    rows_per_block = warp // lpr * DOWN_ROWS_PER_THREAD
    L.launch(_kernel("down_sum", qtype, lpr, nb, replicas, min_blocks, warp * n_slots), L.cdiv(n_rows, rows_per_block),
             warp * n_slots, stream,
        w.qs, _sc(w, c), w.dm, n_rows, ids, x.qs, x.d, x.bsums, c["grid"], c["sign"], L.flat(out))
    return out


# ---------------------------------------------------------------------------
# Experts split between GPU memory and host-mapped memory; usage counts
# ---------------------------------------------------------------------------


@cuda.jit
def _split_ids_kernel(ids, n, slot_of, dev_ids, host_ids):
    wait_prior_grid()
    i = cuda.grid(1)
    if i < n:
        s = slot_of[ids[i]]
        dev_ids[i] = s if s >= 0 else -1
        host_ids[i] = -s - 1 if s < 0 else -1


@implementation("moe.split_ids", "thread_per_slot", layout="i32")
def split_ids(ids: Any, slot_of: Any, *, out: tuple[Any, Any], stream: Any = 0) -> tuple[Any, Any]:
    """Route each selected expert to the copy that holds it: ``out = (dev_ids, host_ids)``.

    ``slot_of[e]`` is expert ``e``'s index in the GPU-resident experts when
    ``>= 0``, else ``-1 - index`` in the host-mapped ones.  A slot gets its
    index in the copy that holds its expert and ``-1`` in the other, which the
    expert kernels skip.
    """
    n = ids.size
    L.launch(_split_ids_kernel, L.cdiv(n, 32), 32, stream, L.flat(ids), n, slot_of, L.flat(out[0]), L.flat(out[1]))
    return out


# Staging: a decode step copies its selected host-mapped experts into GPU memory with one wide, coalesced
# read of each expert (the copy streams at the bus's read-only rate, ``measure_read_bandwidth``'s host number),
# then runs the expert kernels over the copies.  Read in place, the expert kernels keep too few bytes in flight
# for the bus's latency (bench/kernels.py --only host).

STAGE_THREADS = 32 if SIMULATOR else 256
STAGE_BLOCKS = 1024     # per launch, across the slots: ~8 blocks an SM keep ~8 MB of loads in flight


@device
def _stage_field(src, dst, k, s, n, t, stride):
    """``dst[s * n + j] = src[k * n + j]`` for ``j = t, t + stride, ... < n``: one field of expert ``k`` into
    slot ``s``, four loads in flight a thread before their stores (all index arithmetic in uint64)."""
    a = uint64(k) * uint64(n)
    b = uint64(s) * uint64(n)
    j = uint64(t)
    m = uint64(n)
    s1 = uint64(stride)
    s2 = s1 + s1
    s3 = s2 + s1
    s4 = s2 + s2
    while j + s3 < m:
        v0 = src[a + j]
        v1 = src[a + j + s1]
        v2 = src[a + j + s2]
        v3 = src[a + j + s3]
        dst[b + j] = v0
        dst[b + j + s1] = v1
        dst[b + j + s2] = v2
        dst[b + j + s3] = v3
        j += s4
    while j < m:
        dst[b + j] = src[a + j]
        j += s1


@cuda.jit
def _stage_kernel(ids, split, slot_of, d_qs, d_sc, d_dm, h_qs, h_sc, h_dm, o_qs, o_sc, o_dm, n_qs, n_sc, n_dm):
    """Slot ``blockIdx.y``'s expert into slot ``blockIdx.y`` of ``o``: from ``d`` (``d``'s index ``k >= 0``) or
    ``h`` (index ``-1 - k``), ``k = slot_of[e]`` when ``split``, else ``e`` (one source); ``n_*``: words an expert."""
    wait_prior_grid()
    s = cuda.blockIdx.y
    e = ids[s]
    k = slot_of[e] if split else e
    t = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    stride = cuda.gridDim.x * cuda.blockDim.x
    if k >= 0:
        _stage_field(d_qs, o_qs, k, s, n_qs, t, stride)
        _stage_field(d_sc, o_sc, k, s, n_sc, t, stride)
        _stage_field(d_dm, o_dm, k, s, n_dm, t, stride)
    else:
        _stage_field(h_qs, o_qs, -1 - k, s, n_qs, t, stride)
        _stage_field(h_sc, o_sc, -1 - k, s, n_sc, t, stride)
        _stage_field(h_dm, o_dm, -1 - k, s, n_dm, t, stride)


def _expert_words(arr: Any, n_expert: int) -> tuple[Any, int]:
    """``arr`` (one field of ``n_expert`` experts) viewed in the widest words that tile an expert, and the number
    of words an expert takes (wide words: fewer, larger bus reads)."""
    per = arr.size * arr.dtype.itemsize // n_expert
    for width, dt in ((8, np.uint64), (4, np.uint32), (2, np.uint16)):
        if per % width == 0:
            return L.flat(arr).view(dt), per // width
    return L.flat(arr).view(np.uint8), per


def _fields_words(w: PackedWeight) -> list[tuple[Any, int]]:
    e = w.shape[0]
    return [_expert_words(a, e) if a is not None else (L.placeholder(np.uint64), 0) for a in (w.qs, w.sc, w.dm)]


@implementation("moe.stage_experts", "grid_stride_copy", layout="block-minor")
def stage_experts(w: PackedWeight, ids: Any, *, out: PackedWeight, w_host: PackedWeight | None = None,
                  slot_of: Any = None, max_blocks: int = 0, stream: Any = 0) -> PackedWeight:
    """``out``'s expert ``s`` = expert ``ids[s]`` of a routed-expert tensor, copied word for word.

    The tensor is ``w`` alone (in GPU or host-mapped memory), or split: expert
    ``e`` is ``w[slot_of[e]]`` when ``slot_of[e] >= 0``, else
    ``w_host[-1 - slot_of[e]]`` (``cache.residency.SplitExperts``).  ``out``
    holds ``ids.size`` experts of ``w``'s type and row shape.  ``max_blocks``
    (0: ``STAGE_BLOCKS``) caps the grid: a copy beside other work leaves it
    most of the GPU.
    """
    n = ids.size
    src = _fields_words(w)
    host = _fields_words(w_host) if w_host is not None else src
    dst = _fields_words(out)
    if [x[1] for x in src] != [x[1] for x in dst] or [x[1] for x in host] != [x[1] for x in dst]:
        raise ValueError(f"stage_experts: expert sizes differ ({w.shape}, {out.shape})")
    split = slot_of is not None
    words = sum(x[1] for x in dst)
    bx = max(1, min(L.cdiv(words, 4 * STAGE_THREADS), (max_blocks or STAGE_BLOCKS) // n))
    L.launch(_stage_kernel, (bx, n), STAGE_THREADS, stream, L.flat(ids), split,
             slot_of if split else L.placeholder(np.int32), *(x[0] for x in src), *(x[0] for x in host),
             *(x[0] for x in dst), *(x[1] for x in dst))
    return out


@cuda.jit
def _count_kernel(ids, n, counts):
    wait_prior_grid()
    i = cuda.grid(1)
    if i < n:
        cuda.atomic.add(counts, ids[i], 1)


def count_experts(ids: Any, *, out: Any, stream: Any = 0) -> Any:
    """``out[e] +=`` how many of ``ids`` are ``e``: the router's picks, counted for usage profiles
    (``ds4nb profile``; a tool of the engine's, not an op with alternatives)."""
    n = ids.size
    L.launch(_count_kernel, L.cdiv(n, 32), 32, stream, L.flat(ids), n, out)
    return out


# ---------------------------------------------------------------------------
# Registered launchers, one set per quant type
# ---------------------------------------------------------------------------


def _register_launchers(qtype: GGMLQuantizationType) -> dict[str, Any]:
    q = qtype.name.lower()
    layout = layout_name(qtype)

    @implementation(f"{q}.moe_matvec", "lanes_per_row", layout=layout, priority=10)
    def moe_matvec(w: PackedWeight, ids: Any, x: Q8KAct, *, out: Any, stream: Any = 0) -> Any:
        return _moe_matvec(qtype, w, ids, x, out=out, stream=stream)

    @implementation(f"{q}.moe_gate_up", "lanes_per_row", layout=layout, priority=10)
    def moe_gate_up(gate: PackedWeight, up: PackedWeight, ids: Any, weights: Any, x: Q8KAct, clamp: float,
                    *, out: Any, stream: Any = 0) -> Any:
        return _moe_gate_up(qtype, gate, up, ids, weights, x, clamp, out=out, stream=stream)

    @implementation(f"{q}.moe_down_sum", "warp_per_slot", layout=layout, priority=10)
    def moe_down_sum(w: PackedWeight, ids: Any, x: Q8KAct, *, out: Any, stream: Any = 0) -> Any:
        return _moe_down_sum(qtype, w, ids, x, out=out, stream=stream)

    moe_matvec.__doc__ = f"{qtype.name} experts x Q8_K activations, selected experts only."
    moe_gate_up.__doc__ = f"{qtype.name} gate+up fused with clamped SwiGLU and the router weight."
    moe_down_sum.__doc__ = f"{qtype.name} down projections of the selected experts, summed over slots."
    return {f"{q}_moe_matvec": moe_matvec, f"{q}_moe_gate_up": moe_gate_up, f"{q}_moe_down_sum": moe_down_sum}


for _qt in QTYPES:
    globals().update(_register_launchers(_qt))
del _qt


# ---------------------------------------------------------------------------
# Parity cases (twin: dequantize(W[e]) @ dequantize_q8_K_activation(quantize_q8_K(x)) in float64 from the
# exactly decoded operands, rounded to float32 where docs/model.md's "one rounding per value" table says)
# ---------------------------------------------------------------------------

#: tiny (simulator) and model-scale expert shapes per op kind: (E, N, K, n_used)
_TINY = {"matvec": (5, 12, 512, 3), "gate_up": (4, 10, 512, 3), "down_sum": (4, 12, 512, 3)}
_MODEL_GATE_UP = (8, 2048, 4096, 6)  # ffn_gate_exps / ffn_up_exps: 2048 x 4096
_MODEL_DOWN = (8, 4096, 2048, 6)  # ffn_down_exps: 4096 x 2048


def _experts(rng: np.random.Generator, qtype: GGMLQuantizationType, e: int, n: int, k: int):
    raw = random_blocks(qtype, (e, n, k), rng, rms=0.02)
    return raw, repack(raw, qtype, (e, n, k)).to_device()


def e_idx_slice(e: int, nbytes: int) -> slice:
    return slice(e * nbytes, (e + 1) * nbytes)


def expert_matvec_ref(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int, int],
                      ids: np.ndarray, x_deq: np.ndarray) -> np.ndarray:
    """float64 (n_used, N): row s = dequantize(W[ids[s]]) @ x_deq[s or 0], unrounded.

    The weights are decoded exactly (float64: Q2_K / Q4_K ``d*sc*q - dmin*m``
    is not always a float32); ``x_deq`` should be exact too
    (``dequantize_q8_K_activation(..., dtype=np.float64)``).
    """
    e_total, n, k = shape
    per = raw.size // e_total
    out = np.empty((len(ids), n))
    for s, e in enumerate(ids):
        w = dequantize(raw[e_idx_slice(int(e), per)], qtype, (n, k), dtype=np.float64)
        out[s] = w @ np.asarray(x_deq[s if x_deq.shape[0] > 1 else 0], dtype=np.float64)
    return out


def _xdeq(x: np.ndarray) -> np.ndarray:
    """The exact float64 values of x's Q8_K quantisation."""
    return dequantize_q8_K_activation(*quantize_q8_K(x)[:2], dtype=np.float64)


def _ids(rng: np.random.Generator, e: int, n_used: int) -> np.ndarray:
    return rng.permutation(e)[:n_used].astype(np.int32)


def _x(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    return (rng.standard_normal((rows, k)) * rng.uniform(0.5, 2.0, size=(rows, 1))).astype(np.float32)


def _case_matvec(qtype: GGMLQuantizationType):
    def make(rng: np.random.Generator, scale: str) -> Case:
        e, n, k, n_used = _TINY["matvec"] if scale == "tiny" else (
            _MODEL_DOWN if qtype == Q.Q2_K else _MODEL_GATE_UP)
        raw, w = _experts(rng, qtype, e, n, k)
        ids = _ids(rng, e, n_used)
        x = _x(rng, n_used, k)  # one activation row per slot
        ref = expert_matvec_ref(raw, qtype, (e, n, k), ids, _xdeq(x)).astype(np.float32)   # one rounding
        out = L.device_array(n_used * n, np.float32)
        return Case((w, cuda.to_device(ids), q8_K_to_device(x)), out, (ref.reshape(-1),), (CONTRACT,),
                    weight_bytes=raw.size // e * n_used, info={"experts": (e, n, k), "ids": ids.tolist()})

    return make


def gate_up_ref(g: np.ndarray, u: np.ndarray, weights: np.ndarray, clamp: float) -> np.ndarray:
    """float32 (n_used, N) mids from the unrounded expert products ``g``, ``u`` (n_used, N).

    docs/model.md step 17: gate and up rounded to float32, then ``silu(min(g, c)) *
    clip(u, -c, c) * w`` in float64 (``c`` as the kernel's float32, no clamp when
    ``c <= 1e-6``), rounded once: ``reference.ops.swiglu_clamped(g, u, c, weight=w)``.
    """
    g = np.asarray(g).astype(np.float32).astype(np.float64)
    u = np.asarray(u).astype(np.float32).astype(np.float64)
    c = float(np.float32(clamp))
    if c > float(np.float32(1.0e-6)):
        g = np.minimum(g, c)
        u = np.clip(u, -c, c)
    with np.errstate(over="ignore"):
        silu = g / (1.0 + np.exp(-g))
    w = np.asarray(weights, dtype=np.float32).astype(np.float64)[:, None]
    return (silu * u * w).astype(np.float32)


def _case_gate_up(qtype: GGMLQuantizationType):
    def make(rng: np.random.Generator, scale: str) -> Case:
        e, n, k, n_used = _TINY["gate_up"] if scale == "tiny" else _MODEL_GATE_UP
        graw, gw = _experts(rng, qtype, e, n, k)
        uraw, uw = _experts(rng, qtype, e, n, k)
        ids = _ids(rng, e, n_used)
        weights = rng.uniform(0.05, 1.0, n_used).astype(np.float32)
        x = _x(rng, 1, k)  # one token's activation shared by every slot (decode)
        xd = _xdeq(x)
        g = expert_matvec_ref(graw, qtype, (e, n, k), ids, xd)
        u = expert_matvec_ref(uraw, qtype, (e, n, k), ids, xd)
        # a clamp that bites: ~30% of |gate|/|up| values are above it
        clamp = float(np.quantile(np.abs(np.concatenate([g.ravel(), u.ravel()])), 0.7))
        ref = gate_up_ref(g, u, weights, clamp)
        out = L.device_array(n_used * n, np.float32)
        return Case((gw, uw, cuda.to_device(ids), cuda.to_device(weights), q8_K_to_device(x), clamp), out,
                    (ref.reshape(-1),), (CONTRACT,), weight_bytes=2 * graw.size // e * n_used,
                    info={"experts": (e, n, k), "ids": ids.tolist(), "clamp": round(clamp, 4)})

    return make


def _case_down_sum(qtype: GGMLQuantizationType):
    def make(rng: np.random.Generator, scale: str) -> Case:
        e, n, k, n_used = _TINY["down_sum"] if scale == "tiny" else _MODEL_DOWN
        raw, w = _experts(rng, qtype, e, n, k)
        ids = _ids(rng, e, n_used)
        mid = _x(rng, n_used, k) * np.float32(0.1)
        per_slot = expert_matvec_ref(raw, qtype, (e, n, k), ids, _xdeq(mid)).astype(np.float32)  # down_e
        ref = per_slot.astype(np.float64).sum(axis=0).astype(np.float32)   # sum over slots, rounded once
        out = L.device_array(n, np.float32)
        return Case((w, cuda.to_device(ids), q8_K_to_device(mid)), out, (ref,), (CONTRACT,),
                    weight_bytes=raw.size // e * n_used, info={"experts": (e, n, k), "ids": ids.tolist()})

    return make


# Outputs are checked under parity.CONTRACT (bit-identical but for rare one-ulp differences); the
# tolerance is for relative-error checks of chained results (float32 rounding).
_TOL = 1e-6

def _case_split(rng: np.random.Generator, scale: str) -> Case:
    n_expert, n = (16, 6) if scale == "tiny" else (256, 6 * 64)
    on_gpu = rng.permutation(n_expert)[:int(rng.integers(1, n_expert))]
    slot_of = np.empty(n_expert, np.int32)
    host = np.setdiff1d(np.arange(n_expert), on_gpu)
    slot_of[np.sort(on_gpu)] = np.arange(on_gpu.size)
    slot_of[host] = -1 - np.arange(host.size)
    ids = rng.integers(0, n_expert, n).astype(np.int32)
    in_gpu = np.isin(ids, on_gpu)
    want_dev = np.where(in_gpu, np.searchsorted(np.sort(on_gpu), ids), -1).astype(np.int32)
    want_host = np.where(in_gpu, -1, np.searchsorted(host, ids)).astype(np.int32)
    out = (L.device_array(n, np.int32), L.device_array(n, np.int32))
    return Case((cuda.to_device(ids), cuda.to_device(slot_of)), out, (want_dev, want_host), (True, True))


def _case_stage(rng: np.random.Generator, scale: str) -> Case:
    qtype = [Q.IQ2_XXS, Q.Q2_K, Q.Q4_K][int(rng.integers(3))]
    # tiny: odd row counts and one-block rows too, so fields whose experts are not whole uint64 words are copied
    # as uint32 / uint16 words
    n_expert, n, k, n_used = ((6, int(rng.integers(3, 6)), 256 * int(rng.integers(1, 3)), 3) if scale == "tiny"
                              else (16, 2048, 4096, 6))
    host = repack(random_blocks(qtype, (n_expert, n, k), rng, rms=0.02), qtype, (n_expert, n, k))
    ids = rng.integers(0, n_expert, n_used).astype(np.int32)
    out = PackedWeight(qtype, (n_used, n, k), *(None if a is None else L.device_array(a.size // n_expert * n_used,
                                                                                       a.dtype)
                                                for a in (host.qs, host.sc, host.dm)))
    want = tuple(a.reshape(n_expert, -1)[ids].reshape(-1) for a in (host.qs, host.sc, host.dm) if a is not None)
    max_blocks = int(rng.choice([0, 1, 5, 128]))        # the default grid, or one capped (a copy beside others)
    if rng.integers(2):     # one tensor
        return Case((host.to_device(), cuda.to_device(ids)), out, want, (True,) * len(want),
                    kwargs={"max_blocks": max_blocks})
    on_gpu = np.sort(rng.permutation(n_expert)[:int(rng.integers(1, n_expert))])
    off = np.setdiff1d(np.arange(n_expert), on_gpu)
    slot_of = np.empty(n_expert, np.int32)
    slot_of[on_gpu], slot_of[off] = np.arange(on_gpu.size), -1 - np.arange(off.size)

    def part(experts: np.ndarray) -> PackedWeight:
        return PackedWeight(qtype, (experts.size, n, k), *(None if a is None else
                                                          a.reshape(n_expert, -1)[experts].reshape(-1)
                                                          for a in (host.qs, host.sc, host.dm))).to_device()

    return Case((part(on_gpu), cuda.to_device(ids)), out, want, (True,) * len(want),
                kwargs={"w_host": part(off), "slot_of": cuda.to_device(slot_of), "max_blocks": max_blocks})


OPS = [
    OpSpec("moe.split_ids", "selected experts -> their index in the GPU copy and in the host-mapped copy (-1: "
           "the other one)", "(ids i32 (n,), slot_of i32 (n_expert,), *, out (dev_ids, host_ids) i32 (n,), stream)",
           "numpy searchsorted over the resident / mapped expert ids", 0.0, _case_split),
    OpSpec("moe.stage_experts", "the selected experts of a routed-expert tensor (one copy, or split between "
           "GPU and host-mapped memory) copied into GPU memory, slot by slot",
           "(w: PackedWeight (E, N, K), ids i32 (n,), *, out: PackedWeight (n, N, K), w_host: PackedWeight | None, "
           "slot_of i32 (E,) | None, max_blocks=0, stream)",
           "numpy fancy indexing of each block-minor field by expert", 0.0, _case_stage),
]
for _qt in QTYPES:
    _q = _qt.name.lower()
    OPS += [
        OpSpec(f"{_q}.moe_matvec", f"{_qt.name} routed experts x Q8_K, selected experts only",
               "(w: PackedWeight (E, N, K), ids i32 (n_used,), x: Q8KAct (1 or n_used, K), *, "
               "out f32 (n_used, N), stream)",
               "dequantize(W[ids[s]]) @ dequantize_q8_K_activation(quantize_q8_K(x[s])) in float64 (exact "
               "operands), rounded once", _TOL, _case_matvec(_qt)),
        OpSpec(f"{_q}.moe_gate_up", f"{_qt.name} gate+up experts, clamped SwiGLU x router weight",
               "(gate, up: PackedWeight (E, N, K), ids i32 (n_used,), weights f32 (n_used,), x: Q8KAct, "
               "clamp: float, *, out f32 (n_used, N), stream)",
               "gate, up as in moe_matvec (each rounded), then silu(min(g, c)) * clip(u, -c, c) * weight "
               "in float64, rounded once (reference.ops.swiglu_clamped(g, u, c, weight=w))",
               _TOL, _case_gate_up(_qt)),
        OpSpec(f"{_q}.moe_down_sum", f"{_qt.name} down experts, summed over the selected slots",
               "(w: PackedWeight (E, N, K), ids i32 (n_used,), x: Q8KAct (n_used, K), *, out f32 (N,), stream)",
               "sum_s float32(dequantize(W[ids[s]]) @ dequantize_q8_K_activation(quantize_q8_K(mid[s]))), "
               "each product as in moe_matvec, the sum in float64, rounded once", _TOL, _case_down_sum(_qt)),
    ]
del _qt, _q
