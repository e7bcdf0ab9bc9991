"""Routed experts grouped by expert on the integer tensor cores (prefill; IQ2_XXS, Q2_K x Q8_K).

The same two ops as ``moe_grouped``'s ``expert_blocks`` implementations, with
the same outputs bit for bit: ``<q>.moe_gate_up_grouped`` (the clamped SwiGLU
of gate and up, times the router weight) and ``<q>.moe_matvec_grouped`` (the
down projection), for slots grouped by expert (``moe.group_slots``).  Those
kernels decode every weight word and then spend one ``dp4a`` per 4 values per
slot (~16 TOPS at flash shapes); here one ``m16n8k32`` int8 MMA multiplies
16 weight rows by 8 slots over 32 values, and a decoded weight word serves
every 8-slot tile of the pass.

Tiling.  A block (4 warps) owns one expert (``blockIdx.x``; it leaves at once
when the expert has no slots) and a tile of rows (``blockIdx.y``).  A warp
owns 16 MMA rows: for ``gate_up`` 8 gate rows (MMA rows 0-7) and the same 8
up rows (rows 8-15), so a lane's accumulators hold one output row's gate and
up for the same slots and the SwiGLU needs no exchange; for a matvec 16 rows.
The warp walks its expert's slots 16 at a time (two 8-slot tiles).  Per
super-block a lane loads every weight word its two rows need together (16
loads in flight), then per 32-value group decodes its A fragment into int8
quads.

Staged activations.  Before the tiles, :func:`stage_slot_acts` copies each
grouped slot's Q8_K row into :class:`~ds4nb.kernels.moe_grouped.StagedActs`:
grouped order (position ``p`` of ``order``, not slot ``s``) and the MMA's
fragment order, so the 8 B-fragment words a warp loads for one group of an
8-slot tile are 256 contiguous bytes (in a Q8_K row they are 8 rows apart and
``nb`` words apart within a row: 32 sectors a load), and a super-block's
scales of the slots are one row.  The copy is a few microseconds; it took
IQ2_XXS gate/up from 8.0 to 4.3 ms and Q2_K down from 3.4 to 2.0 ms at 1024
tokens (the activation loads were 60% of gate/up's time: "leave one stage
out" timings).  The room comes with the groups (``SlotGroups.acts``; the
engine allocates it with its scratch) or, without, from the launcher.

k order.  The MMA gives lane ``(g, t) = (lane / 4, lane % 4)`` rows ``g``
and ``g + 8`` of A and column ``g`` of B at two quarters of k (4 values
each), "logical" quarters ``t`` and ``t + 4``.  A dot over k does not depend
on which of the group's 32 values each k is, as long as A and B agree, so
each type maps logical quarters to values in the order cheapest to decode:

* IQ2_XXS: logical quarters ``t``, ``t + 4`` are values ``8t .. 8t + 7``,
  grid point ``t`` of the group.  Per row and group a lane decodes ONE whole
  point (``moe.py``'s decoding: one grid-table read in shared memory, its
  sign selector, two PRMTs for values ``8t..8t+3`` and ``8t+4..8t+7``), and
  its B quads are the two halves of ONE Q8_K word (word ``4 grp + t``).  (In
  the natural order a lane needs half of points ``t / 2`` and ``t / 2 + 2``:
  two grid and two sign reads and two activation loads per row and group.)
  The sign selector is ``sign_s[s]`` or, with ``iq2_signs="alu"``
  (:func:`iq2_sign_nibbles`), arithmetic on the 7 sign bits: the 8th bit is
  their parity (``popc``), spread to nibbles in three multiply-mask steps
  (8 instructions instead of an address and a read at a random shared-memory
  address).  The group multiplier is ``2 * scale + 1``.
* Q2_K, the natural order: 4 two-bit quants of quarter ``t`` (``t + 4``) from
  one 32-bit half of a quant word, times their 16-value sub-block's 4-bit
  scale (at most 3 * 15 = 45: still an int8, so the scales are inside the
  MMA and the group multiplier is 1); B: halves of two activation words.

Each MMA gives exact int32 group dots, which the lanes multiply by the group
multiplier (IQ2_XXS) and add into the super-block's exact ``isum``; Q2_K's
multiplier is 1, so its MMAs accumulate in place, and its ``summs`` (sub-block
mins times the activation's sub-block sums) is a second MMA chain on the same
B fragments with A = each sub-block's min in every byte: the same exact
integer as ``moe.py``'s sum over ``bsums``, without loading them.  Without integer
MMA (GPUs before sm_80, and by default the simulator, where the MMA's twin
costs a block barrier a call: tests ask for the MMA path with ``mma=True``)
a lane computes its own four dots of each group with ``dp4a`` from all four
logical quarter pairs of its two rows and slots: the same integers.

Numerics (docs/model.md, "Numerics: one rounding per value").  The per-slot
kernels (``moe.py``), whose bits the grouped ones reproduce, give super-block
``b`` of a row to lane ``b % lpr``, add each lane's float64 terms from 0.0 in
super-block order, and reduce the lanes pairwise in lane order
(``warp_sum_pairwise``: ``((l0 + l1) + (l2 + l3)) + ...``).  So here a lane
walks the per-slot kernel's lanes ("leaves") in order, sums each leaf's
super-block terms from 0.0 exactly as that lane did (the same float64
expressions of the same exact integers, ``x 1/8`` for IQ2_XXS), and combines
the leaves with a pairwise stack of partial sums (one per tree level and
accumulator, in shared memory: private to the thread, no barrier): the same
additions of the same values, hence the same bits as ``moe_gate_up`` /
``moe_matvec`` with the same ``lpr`` (which the tests check on the GPU at
flash shapes and in the simulator).  With one super-block a leaf (flash:
``lpr = nb``) the walk is in memory order, so each 32-byte sector of a
row's weight words serves four consecutive steps.  Gate and up are rounded to float32 and
passed to ``moe.clamped_swiglu``; a matvec product is rounded once.

A lane's 8 accumulators (2 rows x 2 slots x 2 tiles) are tuples in
straight-line code, never arrays, so that they stay in registers.  Knobs
(launcher arguments, never changing the outputs; the registered launchers'
values are module constants): ``min_blocks`` (launch bounds,
:data:`MIN_BLOCKS`: 4 blocks an SM, 10% faster for both types), ``mma`` and
``iq2_signs`` (:data:`IQ2_SIGNS`; the two selectors are within 1-2%).
Loading the next super-block's words while one computes (178 registers
instead of 142) was measured slower.

Measured on an H200 at flash shapes, a prefill chunk of 1024 tokens (6144
slots; ``bench/moe_tiles.py``, per launch, router-like picks, uniform / Zipf
popularity; bench/results/moe_tiles_h200.md): IQ2_XXS gate/up 3.87 / 4.90 ms
against 6.39 / 7.74 grouped with dp4a (``expert_blocks``) and 13.8 / 13.7 per
slot; Q2_K down 1.82 / 2.32 against 10.2 / 11.3 grouped and 6.3 / 6.0 per
slot: both register above ``expert_blocks`` (:data:`PRIORITY`).  What bounds
them now ("leave one stage out" timings before the staging): the weight-word
loads (each of a row's 4 lanes loads all 8 words of a super-block) and the
float64 terms, not the MMA.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gguf.constants import GGMLQuantizationType
from numba import cuda

from ds4nb.kernels import _launch as L
from ds4nb.kernels import moe as M
from ds4nb.kernels.activation import Q8KAct
from ds4nb.kernels.intrinsics import (SIMULATOR, as_i32, byte_perm, device, dp4a, float32, float64, has_int8_mma,
                                      hi_i32, int32, jit_kernel, mma_s8, uint32, uint64, wait_prior_grid)
from ds4nb.kernels.moe import _D0, _D_EIGHTH, _NEG, _POS, _U16, _U32, _U32_7F, _U32_FF, _ULO, clamped_swiglu
from ds4nb.kernels.moe_grouped import SlotGroups, StagedActs, _geometry, alloc_staged_acts, register_launchers
from ds4nb.quants.repack import PackedWeight

Q = GGMLQuantizationType
QTYPES = (Q.IQ2_XXS, Q.Q2_K)
WARPS = 1 if SIMULATOR else 4    # the simulator pays for every thread: one warp a block
THREADS = 32 * WARPS
NE = 8                           # accumulators a lane holds: 2 rows x 2 slots x 2 tiles of 8 slots
#: launch bounds (blocks an SM) of the registered launchers per type (0: none)
MIN_BLOCKS = {Q.IQ2_XXS: 4, Q.Q2_K: 4}
#: IQ2_XXS sign selectors of the registered launchers: "table" (``sign_s`` in shared memory, one read at a random
#: address a grid point) or "alu" (by arithmetic from the 7 sign bits, :func:`iq2_sign_nibbles`)
IQ2_SIGNS = "table"
SIGNS = ("table", "alu")

_M2_32 = np.uint64(0x03030303)   # the low two bits of each of 4 bytes
_U4BIT = np.uint32(0xF)
_U1 = np.uint32(1)
_U7 = np.uint32(7)
_QUAD_ONES = np.uint64(0x01010101)   # x * this: x (< 256) in each byte of a quad
_Z4 = (np.int32(0),) * 4             # a zero accumulator of the int8 MMA
_Z8 = (np.int32(0),) * 8
# iq2_sign_nibbles: x | x << k as x * (1 + 2^k) (disjoint bits: no carries), then a mask
_X4097 = np.uint32(4097)            # x | x << 12
_X65 = np.uint32(65)                # x | x << 6
_X36 = np.uint32(36)                # x << 2 | x << 5
_SPREAD_4 = np.uint32(0x000F000F)   # sign bits 0-3 stay, 4-7 at 16-19
_SPREAD_2 = np.uint32(0x03030303)   # bit pairs at the bytes' bottoms: 0-1, 8-9, 16-17, 24-25
_NIBBLE_4 = np.uint32(0x44444444)   # bit i at 4 i + 2: nibble i is 4


@device
def iq2_sign_nibbles(s):
    """IQ2_XXS sign selector of a grid point by arithmetic (``moe.iq2_xxs_tables()[1][s]``): nibble ``i`` is 4
    (the ``_NEG`` half of the PRMT's 8 bytes) where value ``i`` is negative.  ``s``: the point's 7 sign bits
    (uint32 < 128); the 8th sign is their parity (an even count of minus signs, GGUF's ``ksigns_iq2xs``).
    Spreads the 8 bits to nibbles in three steps of "x OR a shifted copy of x, masked"; the copies' bits are
    disjoint, so each OR is a sum and each step one IMAD and one LOP3 (8 instructions with the POPC)."""
    x = uint32(s + (uint32(cuda.popc(s)) << _U7))   # bit 7: popc's lowest bit (its higher ones are masked out)
    x = uint32(x * _X4097) & _SPREAD_4              # x < 2^10, then < 2^20, < 2^26: no step overflows
    x = uint32(x * _X65) & _SPREAD_2
    return uint32(x * _X36) & _NIBBLE_4


def _tree_levels(lpr: int) -> int:
    if lpr < 1 or lpr & (lpr - 1):
        raise ValueError(f"lanes per row must be a power of two, not {lpr}")
    return lpr.bit_length() - 1


@L.kernel_factory
def _make_stage(threads: int):
    """The kernel of :func:`stage_slot_acts`: grid ``(cdiv(4 n, threads), 8 nb)``, a thread per staged word."""

    @jit_kernel
    def kernel(order, offsets, n_expert, div, nb, xq, xd, sq, sd):
        wait_prior_grid()
        n = order.size
        i = cuda.blockIdx.x * threads + cuda.threadIdx.x
        p = i >> 2                      # grouped position
        w4 = i & 3                      # word of the group's 4
        bg = cuda.blockIdx.y            # 8 b + grp
        if p >= offsets[n_expert]:      # past the grouped slots (skipped ids): never read
            return
        b = bg >> 3
        grp = bg & 7
        row = order[p] // div
        sq[uint64((bg * n + p) * 4 + w4)] = xq[uint64(row * 32 * nb + (4 * grp + w4) * nb + b)]
        if grp == 0 and w4 == 0:
            sd[uint64(b * n + p)] = xd[uint64(row * nb + b)]

    return kernel


STAGE_THREADS = 32 if SIMULATOR else 256


def stage_slot_acts(groups: SlotGroups, x: Q8KAct, nb: int, div: int, out: StagedActs, stream: Any = 0) -> StagedActs:
    """``x``'s rows for the grouped slots (slot ``s`` reads row ``s // div``) in :class:`StagedActs`' order."""
    n = groups.order.size
    if out.qs.size < n * 32 * nb or out.d.size < n * nb:
        raise ValueError(f"staged activations hold {out.d.size} super-blocks, {n} slots x {nb} need more")
    n_expert = groups.offsets.size - 1
    L.launch(_make_stage(STAGE_THREADS), (L.cdiv(4 * n, STAGE_THREADS), 8 * nb), STAGE_THREADS, stream,
             L.flat(groups.order), L.flat(groups.offsets), n_expert, div, nb, x.qs, x.d, out.qs, out.d)
    return out


@L.kernel_factory
def _make_tiles(qtype: GGMLQuantizationType, kind: str, lpr: int, nb: int, use_mma: bool, min_blocks: int,
                signs: str):
    """The kernel for ``kind`` ("gate_up" or "matvec") on ``qtype`` rows of ``nb`` super-blocks, summing like the
    per-slot kernels with ``lpr`` lanes per row; ``signs``: IQ2_XXS's sign selectors (:data:`SIGNS`).

    A lane's 8 accumulators (2 rows x 2 slots x 2 tiles, the MMA's D layout:
    ``4 * tile + 2 * (hi row) + slot``) are 8-tuples in straight-line code, so
    they stay in registers."""
    if signs not in SIGNS:
        raise ValueError(f"signs must be one of {SIGNS}, not {signs!r}")
    iq2 = qtype == Q.IQ2_XXS
    sign_alu = iq2 and signs == "alu"
    gate_up = kind == "gate_up"
    levels = _tree_levels(lpr)
    per = L.cdiv(nb, lpr)                         # super-blocks a leaf (per-slot lane) holds, at most
    n_steps = lpr * per
    stack_words = max(levels, 1) * NE * THREADS   # the pairwise stack: (level, accumulator, thread)
    rows_per_warp = 8 if gate_up else 16
    rows_per_block = rows_per_warp * WARPS
    grid_words, sign_words = (256, 128) if iq2 else (1, 1)

    @device
    def decode(w0, w1, scw, grp, kq, grid_s, sign_s):
        """Values ``32 grp ..`` of a weight row: the int8 quads of logical k quarters ``kq`` and ``kq + 4`` (as
        int32; the type's k order, module doc) and the group multiplier, from the row's words (see
        :func:`load_words`)."""
        if iq2:   # w0: the group word: 4 grid indices, then 4 x 7 sign bits and the 4-bit scale
            gw = uint32(w0 & _ULO)
            sw = uint32(w0 >> _U32)
            p = uint32(kq)                                  # logical quarters kq, kq + 4 = grid point kq
            sbits = (sw >> (_U7 * p)) & _U32_7F
            sel = grid_s[(gw >> (uint32(8) * p)) & _U32_FF] | (iq2_sign_nibbles(sbits) if sign_alu
                                                               else sign_s[sbits])
            mult = as_i32(((sw >> uint32(28)) << _U1) | _U1)   # 2 * scale + 1, in eighths of d
            return as_i32(byte_perm(_POS, _NEG, sel)), as_i32(byte_perm(_POS, _NEG, sel >> _U16)), mult
        # Q2_K, natural k order: w0, w1 hold quarters kq and kq + 4 (bit pair grp % 4 of their 32-bit half
        # kq % 2); scw the scale word of sub-blocks 2 grp (quarters 0..3) and 2 grp + 1 (quarters 4..7), low nibbles
        sh = uint64(32 * (kq & 1) + 2 * (grp & 3))
        bsh = uint64(16 * (grp & 1))
        s0 = (scw >> bsh) & _U4BIT
        s1 = (scw >> (bsh + uint64(8))) & _U4BIT
        return as_i32(((w0 >> sh) & _M2_32) * s0), as_i32(((w1 >> sh) & _M2_32) * s1), int32(1)   # <= 45: no carry

    @device
    def load_words(qs, sc, wrow, b, kq):
        """The 8 words of super-block ``b`` of row ``wrow`` that quarters ``kq``, ``kq + 4`` of its groups need,
        loaded together.  IQ2_XXS: the 8 group words.  Q2_K: quant words 4h + kq // 2 and 4h + 2 + kq // 2 of
        each half h (group grp: words 2h, 2h + 1 here, h = grp // 4), then the 4 scale words."""
        if iq2:
            qb = wrow * 8 * nb + b
            return (qs[uint64(qb)], qs[uint64(qb + nb)], qs[uint64(qb + 2 * nb)], qs[uint64(qb + 3 * nb)],
                    qs[uint64(qb + 4 * nb)], qs[uint64(qb + 5 * nb)], qs[uint64(qb + 6 * nb)],
                    qs[uint64(qb + 7 * nb)])
        qb = wrow * 8 * nb + b + (kq >> 1) * nb
        sb = wrow * 4 * nb + b
        return (qs[uint64(qb)], qs[uint64(qb + 2 * nb)], qs[uint64(qb + 4 * nb)], qs[uint64(qb + 6 * nb)],
                uint64(sc[uint64(sb)]), uint64(sc[uint64(sb + nb)]), uint64(sc[uint64(sb + 2 * nb)]),
                uint64(sc[uint64(sb + 3 * nb)]))

    @device
    def decode_group(w, grp, kq, grid_s, sign_s):
        """:func:`decode` of group ``grp`` from :func:`load_words`' 8 words (``grp`` a constant at each call)."""
        if iq2:
            return decode(w[grp], w[grp], w[4], grp, kq, grid_s, sign_s)
        h = grp >> 2
        return decode(w[2 * h], w[2 * h + 1], w[4 + (grp >> 1)], grp, kq, grid_s, sign_s)

    @device
    def min_quads(w, grp):
        """Q2_K: group ``grp``'s sub-block mins (4 bits, the high nibbles of its scale bytes) as int8 quads for
        quarters 0..3 (sub-block 2 grp) and 4..7 (2 grp + 1): their dots with the activation are ``summs``."""
        scw = w[4 + (grp >> 1)]
        bsh = uint64(16 * (grp & 1) + 4)
        return (as_i32(((scw >> bsh) & _U4BIT) * _QUAD_ONES),
                as_i32(((scw >> (bsh + uint64(8))) & _U4BIT) * _QUAD_ONES))

    @device
    def y_quads(ya, n, p, b, grp, kq):
        """Staged activation of grouped position ``p`` (:class:`StagedActs`): its int8 quads of logical k quarters
        ``kq`` and ``kq + 4`` of values ``32 grp ..`` (:func:`decode`'s k order).  Word ``q`` of a group holds
        quarters ``2q`` (low half) and ``2q + 1``."""
        at = ((b * 8 + grp) * n + p) * 4
        if iq2:   # quarters 2 kq, 2 kq + 1: one word
            y = ya[uint64(at + kq)]
            return as_i32(y), hi_i32(y)
        at += kq >> 1
        sh = uint64(32 * (kq & 1))
        return as_i32(ya[uint64(at)] >> sh), as_i32(ya[uint64(at + 2)] >> sh)

    @device
    def mma_group(grp, wl, wh, ya, n, p0, p1, b, t, grid_s, sign_s, s, m):
        """Group ``grp`` of the step on the tensor cores, one m16n8k32 per 8-slot tile: ``s`` + its dots (x the
        IQ2_XXS multipliers), and for Q2_K ``m`` + the mins' dots (a second MMA chain on the same B)."""
        a0, a2, m_lo = decode_group(wl, grp, t, grid_s, sign_s)
        a1, a3, m_hi = decode_group(wh, grp, t, grid_s, sign_s)
        y0 = y_quads(ya, n, p0, b, grp, t)
        y1 = y_quads(ya, n, p1, b, grp, t)
        if iq2:
            c = mma_s8((a0, a1, a2, a3), y0, _Z4)
            e = mma_s8((a0, a1, a2, a3), y1, _Z4)
            return ((int32(s[0] + c[0] * m_lo), int32(s[1] + c[1] * m_lo), int32(s[2] + c[2] * m_hi),
                     int32(s[3] + c[3] * m_hi), int32(s[4] + e[0] * m_lo), int32(s[5] + e[1] * m_lo),
                     int32(s[6] + e[2] * m_hi), int32(s[7] + e[3] * m_hi)), m)
        ml0, ml1 = min_quads(wl, grp)
        mh0, mh1 = min_quads(wh, grp)
        c = mma_s8((a0, a1, a2, a3), y0, (s[0], s[1], s[2], s[3]))
        e = mma_s8((a0, a1, a2, a3), y1, (s[4], s[5], s[6], s[7]))
        cm = mma_s8((ml0, mh0, ml1, mh1), y0, (m[0], m[1], m[2], m[3]))
        em = mma_s8((ml0, mh0, ml1, mh1), y1, (m[4], m[5], m[6], m[7]))
        return ((c[0], c[1], c[2], c[3], e[0], e[1], e[2], e[3]), (cm[0], cm[1], cm[2], cm[3], em[0], em[1], em[2], em[3]))

    @device
    def step_mma(wl, wh, ya, n, p0, p1, b, t, grid_s, sign_s):
        """Super-block ``b``'s exact isums (and Q2_K summs) from its weight words ``wl``, ``wh`` (:func:`load_words`
        of the lo and hi rows, loaded together: 16 loads in flight a lane)."""
        s = _Z8
        m = _Z8
        s, m = mma_group(0, wl, wh, ya, n, p0, p1, b, t, grid_s, sign_s, s, m)
        s, m = mma_group(1, wl, wh, ya, n, p0, p1, b, t, grid_s, sign_s, s, m)
        s, m = mma_group(2, wl, wh, ya, n, p0, p1, b, t, grid_s, sign_s, s, m)
        s, m = mma_group(3, wl, wh, ya, n, p0, p1, b, t, grid_s, sign_s, s, m)
        s, m = mma_group(4, wl, wh, ya, n, p0, p1, b, t, grid_s, sign_s, s, m)
        s, m = mma_group(5, wl, wh, ya, n, p0, p1, b, t, grid_s, sign_s, s, m)
        s, m = mma_group(6, wl, wh, ya, n, p0, p1, b, t, grid_s, sign_s, s, m)
        return mma_group(7, wl, wh, ya, n, p0, p1, b, t, grid_s, sign_s, s, m)

    @device
    def slot_dots(ya, n, q, b, grp, kq, a0, a1, a2, a3, c_lo, c_hi):
        """The lo and hi rows' dots ``c_lo``, ``c_hi`` + their quads ``(a0, a2)``, ``(a1, a3)`` . position ``q``'s
        quads of quarters ``kq``, ``kq + 4`` (unchanged for a column past the expert's last slot, q < 0)."""
        if q < 0:
            return c_lo, c_hi
        x0, x1 = y_quads(ya, n, q, b, grp, kq)
        return dp4a(a2, x1, dp4a(a0, x0, c_lo)), dp4a(a3, x1, dp4a(a1, x0, c_hi))

    @device
    def group_dp4a(grp, wl0, wl1, wh0, wh1, ya, n, q0, q1, q2, q3, b, grid_s, sign_s, s, m):
        """Without MMA: group ``grp``'s dots of this lane's 8 accumulators with dp4a, all 8 k quarters (each
        quad decoded once for the 4 slots), ``s`` + dots x multipliers (and Q2_K's ``m`` + the mins' dots).
        ``wl0``/``wl1``: the lo row's words of quarters 0, 1 / 2, 3 (:func:`load_words`), ``wh0``/``wh1`` the
        hi row's."""
        c0 = int32(0)
        c1 = int32(0)
        c2 = int32(0)
        c3 = int32(0)
        c4 = int32(0)
        c5 = int32(0)
        c6 = int32(0)
        c7 = int32(0)
        m_lo = int32(1)
        m_hi = int32(1)
        for kq in range(4):   # columns past the expert's last slot (q < 0) are skipped
            a0, a2, m_lo = decode_group(wl0 if kq < 2 else wl1, grp, kq, grid_s, sign_s)
            a1, a3, m_hi = decode_group(wh0 if kq < 2 else wh1, grp, kq, grid_s, sign_s)
            c0, c2 = slot_dots(ya, n, q0, b, grp, kq, a0, a1, a2, a3, c0, c2)
            c1, c3 = slot_dots(ya, n, q1, b, grp, kq, a0, a1, a2, a3, c1, c3)
            c4, c6 = slot_dots(ya, n, q2, b, grp, kq, a0, a1, a2, a3, c4, c6)
            c5, c7 = slot_dots(ya, n, q3, b, grp, kq, a0, a1, a2, a3, c5, c7)
        s = (int32(s[0] + c0 * m_lo), int32(s[1] + c1 * m_lo), int32(s[2] + c2 * m_hi), int32(s[3] + c3 * m_hi),
             int32(s[4] + c4 * m_lo), int32(s[5] + c5 * m_lo), int32(s[6] + c6 * m_hi), int32(s[7] + c7 * m_hi))
        if iq2:
            return s, m
        ml0, ml1 = min_quads(wl0, grp)
        mh0, mh1 = min_quads(wh0, grp)
        d0, d2 = m[0], m[2]
        d1, d3 = m[1], m[3]
        d4, d6 = m[4], m[6]
        d5, d7 = m[5], m[7]
        for kq in range(4):
            d0, d2 = slot_dots(ya, n, q0, b, grp, kq, ml0, mh0, ml1, mh1, d0, d2)
            d1, d3 = slot_dots(ya, n, q1, b, grp, kq, ml0, mh0, ml1, mh1, d1, d3)
            d4, d6 = slot_dots(ya, n, q2, b, grp, kq, ml0, mh0, ml1, mh1, d4, d6)
            d5, d7 = slot_dots(ya, n, q3, b, grp, kq, ml0, mh0, ml1, mh1, d5, d7)
        return s, (d0, d1, d2, d3, d4, d5, d6, d7)

    @device
    def step_dp4a(qs_lo, sc_lo, qs_hi, sc_hi, wrow_lo, wrow_hi, ya, n, q0, q1, q2, q3, b, grid_s, sign_s):
        """The same isums (and summs) as :func:`step_mma`, a lane computing its own (``q0..q3``: its D columns'
        positions)."""
        wl0 = load_words(qs_lo, sc_lo, wrow_lo, b, 0)
        wl1 = load_words(qs_lo, sc_lo, wrow_lo, b, 2)
        wh0 = load_words(qs_hi, sc_hi, wrow_hi, b, 0)
        wh1 = load_words(qs_hi, sc_hi, wrow_hi, b, 2)
        s = _Z8
        m = _Z8
        for grp in range(8):
            s, m = group_dp4a(grp, wl0, wl1, wh0, wh1, ya, n, q0, q1, q2, q3, b, grid_s, sign_s, s, m)
        return s, m

    @device
    def row_scales(dm, wrow, b):
        """Super-block ``b``'s float64 scale of row ``wrow`` (IQ2_XXS: d; Q2_K: d and dmin)."""
        if iq2:
            return float64(float32(dm[uint64(wrow * nb + b)])), _D0
        return (float64(float32(dm[uint64(2 * wrow * nb + b)])),
                float64(float32(dm[uint64((2 * wrow + 1) * nb + b)])))

    @device
    def term(isum, summs, w, ys):
        """Super-block ``b``'s float64 term, moe.py's expression (IQ2_XXS: before the leaf's 1/8); ``w`` the row's
        :func:`row_scales`, ``ys`` the slot's activation scale."""
        if iq2:
            return float64(int32(isum)) * (w[0] * ys)
        return ys * (w[0] * float64(isum) - w[1] * float64(summs))

    @device
    def add_terms(acc, s, m, dm_lo, dm_hi, wrow_lo, wrow_hi, b, yd, n, q0, q1, q2, q3):
        """``acc`` + the step's terms; a skipped column (``q < 0``, dp4a path) keeps its 0.0s (never written)."""
        wl = row_scales(dm_lo, wrow_lo, b)
        wh = row_scales(dm_hi, wrow_hi, b)
        y0 = float64(yd[uint64(b * n + max(q0, 0))])
        y1 = float64(yd[uint64(b * n + max(q1, 0))])
        y2 = float64(yd[uint64(b * n + max(q2, 0))])
        y3 = float64(yd[uint64(b * n + max(q3, 0))])
        return (acc[0] + term(s[0], m[0], wl, y0) if q0 >= 0 else acc[0],
                acc[1] + term(s[1], m[1], wl, y1) if q1 >= 0 else acc[1],
                acc[2] + term(s[2], m[2], wh, y0) if q0 >= 0 else acc[2],
                acc[3] + term(s[3], m[3], wh, y1) if q1 >= 0 else acc[3],
                acc[4] + term(s[4], m[4], wl, y2) if q2 >= 0 else acc[4],
                acc[5] + term(s[5], m[5], wl, y3) if q3 >= 0 else acc[5],
                acc[6] + term(s[6], m[6], wh, y2) if q2 >= 0 else acc[6],
                acc[7] + term(s[7], m[7], wh, y3) if q3 >= 0 else acc[7])

    @device
    def stacked(stack, lvl, tid, q):
        return (lvl * NE + q) * THREADS + tid

    @device
    def pop_add(stack, lvl, tid, v):
        """The left partial sum of level ``lvl`` + ``v`` (float addition commutes: the shuffle's order too)."""
        return (stack[stacked(stack, lvl, tid, 0)] + v[0], stack[stacked(stack, lvl, tid, 1)] + v[1],
                stack[stacked(stack, lvl, tid, 2)] + v[2], stack[stacked(stack, lvl, tid, 3)] + v[3],
                stack[stacked(stack, lvl, tid, 4)] + v[4], stack[stacked(stack, lvl, tid, 5)] + v[5],
                stack[stacked(stack, lvl, tid, 6)] + v[6], stack[stacked(stack, lvl, tid, 7)] + v[7])

    @device
    def push(stack, lvl, tid, v):
        stack[stacked(stack, lvl, tid, 0)] = v[0]
        stack[stacked(stack, lvl, tid, 1)] = v[1]
        stack[stacked(stack, lvl, tid, 2)] = v[2]
        stack[stacked(stack, lvl, tid, 3)] = v[3]
        stack[stacked(stack, lvl, tid, 4)] = v[4]
        stack[stacked(stack, lvl, tid, 5)] = v[5]
        stack[stacked(stack, lvl, tid, 6)] = v[6]
        stack[stacked(stack, lvl, tid, 7)] = v[7]

    @device
    def write(out, n_rows, row, slot, lo, hi, weights, clamp):
        """One slot's outputs of this lane: gate_up the SwiGLU of (lo, hi) = (gate, up) at ``row``; a matvec rows
        ``row`` and ``row + 8``."""
        if slot < 0:
            return
        if gate_up:
            if row < n_rows:     # gate_e, up_e: float32 values (docs/model.md step 17)
                out[uint64(slot * n_rows + row)] = clamped_swiglu(float32(lo), float32(hi), clamp, weights[slot])
        else:
            if row < n_rows:
                out[uint64(slot * n_rows + row)] = float32(lo)   # the one rounding
            if row + 8 < n_rows:
                out[uint64(slot * n_rows + row + 8)] = float32(hi)

    @device
    def column(i, end):
        """Grouped position ``i`` as a D column's: itself, or past the expert's last slot the last slot (with
        MMA: every lane takes part, the result is dropped) or -1 (dp4a: skipped)."""
        if i < end:
            return i
        return end - 1 if use_mma else -1

    @device
    def slot_of(order, i, end):
        return order[i] if i < end else -1

    @jit_kernel(launch_bounds=(THREADS, min_blocks) if min_blocks else None)
    def kernel(qs_lo, sc_lo, dm_lo, qs_hi, sc_hi, dm_hi, n_rows, order, offsets, weights, clamp, ya, yd,
               grid_g, sign_g, out):
        wait_prior_grid()
        e = cuda.blockIdx.x
        start = offsets[e]
        end = offsets[e + 1]
        if start >= end:      # an expert without slots
            return
        n = order.size
        grid_s = cuda.shared.array(grid_words, uint32)
        sign_s = cuda.shared.array(sign_words, uint32)
        stack = cuda.shared.array(stack_words, float64)
        if iq2:               # (the alu variant never reads sign_s: 512 bytes loaded for nothing)
            M._load_luts(grid_g, sign_g, grid_s, sign_s, 1)
            cuda.syncthreads()
        tid = cuda.threadIdx.x
        lane = tid % 32
        g = lane // 4        # the MMA fragments' group: A row (and row + 8), B column
        t = lane % 4         # k quarters t and t + 4 of A and B; D columns 2t, 2t + 1
        row = cuda.blockIdx.y * rows_per_block + (tid // 32) * rows_per_warp + g
        row_hi = row if gate_up else row + 8       # gate_up: the up row of the same output row
        wrow_lo = e * n_rows + min(row, n_rows - 1)   # tail rows compute a real row and drop it: MMAs stay whole
        wrow_hi = e * n_rows + min(row_hi, n_rows - 1)
        for s0 in range(start, end, 16):        # passes of two 8-slot tiles
            p0 = min(s0 + g, end - 1)           # this lane's B columns (grouped positions)
            p1 = min(s0 + 8 + g, end - 1)
            i0 = s0 + 2 * t                     # its D columns: positions i0, i0 + 1, i0 + 8, i0 + 9
            q0 = column(i0, end)
            q1 = column(i0 + 1, end)
            q2 = column(i0 + 8, end)
            q3 = column(i0 + 9, end)
            acc = (_D0, _D0, _D0, _D0, _D0, _D0, _D0, _D0)
            for j in range(n_steps):   # step j: super-block m of leaf i, i.e. of the per-slot kernel's lane i
                i = j // per
                mi = j - i * per
                b = i + mi * lpr
                if mi == 0:
                    acc = (_D0, _D0, _D0, _D0, _D0, _D0, _D0, _D0)
                # a leaf without super-blocks adds nothing (a 0.0 leaf); without MMA a lane whose columns are all
                # past the expert's last slot has nothing to compute (with MMA every lane takes part)
                if b < nb and q0 >= 0:
                    if use_mma:
                        s, m = step_mma(load_words(qs_lo, sc_lo, wrow_lo, b, t),
                                        load_words(qs_hi, sc_hi, wrow_hi, b, t), ya, n, p0, p1, b, t, grid_s, sign_s)
                    else:
                        s, m = step_dp4a(qs_lo, sc_lo, qs_hi, sc_hi, wrow_lo, wrow_hi, ya, n, q0, q1, q2, q3, b,
                                         grid_s, sign_s)
                    acc = add_terms(acc, s, m, dm_lo, dm_hi, wrow_lo, wrow_hi, b, yd, n, q0, q1, q2, q3)
                if mi == per - 1:        # the leaf is complete
                    if iq2:
                        acc = (acc[0] * _D_EIGHTH, acc[1] * _D_EIGHTH, acc[2] * _D_EIGHTH, acc[3] * _D_EIGHTH,
                               acc[4] * _D_EIGHTH, acc[5] * _D_EIGHTH, acc[6] * _D_EIGHTH, acc[7] * _D_EIGHTH)
                    # the pairwise tree: leaf i closes the subtrees its trailing one bits end
                    lvl = 0
                    ii = i
                    while ii & 1:
                        acc = pop_add(stack, lvl, tid, acc)
                        ii >>= 1
                        lvl += 1
                    if lvl < levels:
                        push(stack, lvl, tid, acc)
            # acc: after the last leaf, the root of the tree
            write(out, n_rows, row, slot_of(order, i0, end), acc[0], acc[2], weights, clamp)
            write(out, n_rows, row, slot_of(order, i0 + 1, end), acc[1], acc[3], weights, clamp)
            write(out, n_rows, row, slot_of(order, i0 + 8, end), acc[4], acc[6], weights, clamp)
            write(out, n_rows, row, slot_of(order, i0 + 9, end), acc[5], acc[7], weights, clamp)

    return kernel


def _grid(kind: str, n_expert: int, n_rows: int) -> tuple[int, int]:
    return n_expert, L.cdiv(n_rows, (8 if kind == "gate_up" else 16) * WARPS)


def _tiles_kernel(qtype: GGMLQuantizationType, kind: str, lpr: int, nb: int, mma: bool | None,
                  min_blocks: int | None, iq2_signs: str) -> Any:
    """The launchers' kernel: ``mma`` None takes the int8 MMA where there is one (``has_int8_mma``: never in the
    simulator, whose twin costs a block barrier a call, so there only when asked for); ``min_blocks`` None:
    :data:`MIN_BLOCKS`; ``iq2_signs`` is ignored for Q2_K (one kernel)."""
    if min_blocks is None:
        min_blocks = MIN_BLOCKS[qtype]
    if mma is None:
        mma = has_int8_mma()
    elif mma and not (SIMULATOR or has_int8_mma()):
        raise ValueError("the int8 MMA needs compute capability 8.0")
    return _make_tiles(qtype, kind, lpr, nb, bool(mma), min_blocks, iq2_signs if qtype == Q.IQ2_XXS else "table")


def _staged(groups: SlotGroups, x: Q8KAct, nb: int, div: int, stream: Any) -> StagedActs:
    """``x`` staged for the tiles into ``groups.acts`` (allocated here when the caller keeps none)."""
    acts = groups.acts if groups.acts is not None else alloc_staged_acts(groups.order.size, 256 * nb, stream)
    return stage_slot_acts(groups, x, nb, div, acts, stream)


def _moe_matvec_tiles(qtype: GGMLQuantizationType, w: PackedWeight, groups: SlotGroups, x: Q8KAct, *, out: Any,
                      stream: Any = 0, lpr: int | None = None, min_blocks: int | None = None,
                      mma: bool | None = None, iq2_signs: str = IQ2_SIGNS) -> Any:
    """``out[s, r] = W[e][r] . x[s // div]`` for every slot ``s`` of every expert ``e`` in ``groups``.

    Stages ``x`` (:func:`stage_slot_acts`), then a grid ``(n_expert, cdiv(N, 64))`` of 4 warps (simulator: one
    warp, 16 rows); ``lpr`` (default ``moe.default_lanes_per_row(nb)``) is the per-slot kernel whose
    sums are reproduced.  Knobs that never change the outputs: ``min_blocks`` (launch bounds; None:
    :data:`MIN_BLOCKS`), ``mma`` (None: the int8 MMA where the GPU has it, False: dp4a, True: the MMA, in the
    simulator too) and ``iq2_signs`` (:data:`SIGNS`).
    """
    n_rows, nb, lpr, n_expert, div = _geometry(w, qtype, groups, x, lpr)
    acts = _staged(groups, x, nb, div, stream)
    c = M._consts()
    sc = M._sc(w, c)
    L.launch(_tiles_kernel(qtype, "matvec", lpr, nb, mma, min_blocks, iq2_signs),
             _grid("matvec", n_expert, n_rows), THREADS, stream,
             w.qs, sc, w.dm, w.qs, sc, w.dm, n_rows, L.flat(groups.order), L.flat(groups.offsets),
             L.placeholder(), np.float32(0.0), acts.qs, acts.d, c["grid"], c["sign"], L.flat(out))
    return out


def _moe_gate_up_tiles(qtype: GGMLQuantizationType, gate: PackedWeight, up: PackedWeight, groups: SlotGroups,
                       weights: Any, x: Q8KAct, clamp: float, *, out: Any, stream: Any = 0, lpr: int | None = None,
                       min_blocks: int | None = None, mma: bool | None = None, iq2_signs: str = IQ2_SIGNS) -> Any:
    """``out[s, r] = silu(min(g, c)) * clip(u, -c, c) * weights[s]``, ``g, u = gate[e][r], up[e][r] . x[s //
    div]``, for every slot ``s`` of every expert ``e`` in ``groups``.

    Stages ``x``, then a grid ``(n_expert, cdiv(N, 32))`` of 4 warps (simulator: one warp, 8 rows); knobs as
    :func:`_moe_matvec_tiles` (``lpr`` default: ``moe_gate_up``'s).
    """
    n_rows, nb, lpr, n_expert, div = _geometry(gate, qtype, groups, x, lpr)
    if up.shape != gate.shape or up.qtype != gate.qtype:
        raise ValueError(f"gate {gate.shape} and up {up.shape} differ")
    acts = _staged(groups, x, nb, div, stream)
    c = M._consts()
    L.launch(_tiles_kernel(qtype, "gate_up", lpr, nb, mma, min_blocks, iq2_signs),
             _grid("gate_up", n_expert, n_rows), THREADS, stream,
             gate.qs, M._sc(gate, c), gate.dm, up.qs, M._sc(up, c), up.dm, n_rows, L.flat(groups.order),
             L.flat(groups.offsets), L.flat(weights), np.float32(clamp), acts.qs, acts.d, c["grid"],
             c["sign"], L.flat(out))
    return out


#: registry priority per type, against moe_grouped's expert_blocks (10): above it where measured faster (module
#: doc: 1.6x for IQ2_XXS gate/up, 5x for Q2_K down; bench/moe_tiles.py prints which, with the IQ2_SIGNS and
#: MIN_BLOCKS of its fastest variant).
PRIORITY = {Q.IQ2_XXS: 20, Q.Q2_K: 20}


for _qt in QTYPES:
    globals().update(register_launchers(
        _qt, "mma_tiles", PRIORITY[_qt], _moe_gate_up_tiles, _moe_matvec_tiles,
        "gate+up (clamped SwiGLU x router weight) for slots grouped by expert, on int8 MMA.\n\n"
        "The slots' activations staged in fragment order (stage_slot_acts), then a grid (n_expert, row tiles of "
        "32), 4 warps of 8 gate rows + the same 8 up rows (one m16n8k32 per 32 values and 8 slots; dp4a without "
        "MMA); bit-identical to moe_gate_up (see the module doc).",
        "experts x Q8_K for slots grouped by expert (the prefill down projection), on int8 MMA.\n\n"
        "The slots' activations staged in fragment order, then a grid (n_expert, row tiles of 64), 4 warps of 16 "
        "rows (one m16n8k32 per 32 values and 8 slots; dp4a without MMA); bit-identical to moe_matvec (see the "
        "module doc)."))
del _qt
