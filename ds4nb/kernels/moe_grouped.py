"""Routed experts grouped by expert, for prefill (IQ2_XXS, Q2_K, Q4_K x Q8_K).

``moe.py``'s per-slot kernels give every slot (token x selected expert) its
own matvec: a prefill chunk of ``T`` tokens reads up to ``n_used * T`` expert
matrices although a layer only has ``n_expert`` of them.  Here the slots are
first grouped by expert, and a block then owns one expert (and a tile of its
rows) and walks all of that expert's slots, reading each weight super-block
once for up to ``SLOTS`` (8) slots, like ``q8_0.matmul``'s ``warp8_t8`` reuses
its weight words for 8 tokens.

``moe.group_slots``
    ``sel`` int32 ``(n,)`` (the expert of each slot; ids outside ``[0,
    n_expert)``, e.g. the ``-1`` of a split placement, are not in this tensor
    and skipped) -> :class:`SlotGroups` ``(order, offsets)``: ``order`` int32
    ``(n,)`` the slot indices by expert, ascending within an expert (a stable
    counting sort), then ``-1`` for the skipped slots; ``offsets`` int32
    ``(n_expert + 1,)`` where each expert's run starts, ``offsets[n_expert]``
    the number of valid slots.
``<q>.moe_gate_up_grouped``
    ``mid[s, r] = silu(min(g, c)) * clip(u, -c, c) * weight[s]`` for every
    grouped slot, as ``<q>.moe_gate_up`` computes it, with ``x`` ONE Q8_K row
    per token: slot ``s`` reads row ``s // (n / rows(x))`` (``n_used`` slots a
    token; the activation is quantized once per token, not once per slot).
``<q>.moe_matvec_grouped``
    ``out[s, r] = W[sel[s]][r] . x[s // (n / rows(x))]`` as ``<q>.moe_matvec``
    (the down projection: one Q8_K row per slot; ``moe.slot_sum`` then adds a
    token's slots).

Slots that are not grouped (skipped ids) are not written, as the per-slot
kernels skip a ``-1`` slot.

Geometry.  ``group_slots`` is one block (512 threads; 16 in the simulator):
shared-memory counts (integer atomics: the counts do not depend on their
order), a Hillis-Steele prefix sum for the offsets, then the slots in chunks
of one slot a thread: a thread's place in its expert's run is the expert's
cursor, plus the count of that expert in the earlier 32-thread groups of the
chunk (a per-group count table, prefix-summed per expert), plus the equal ids
before it in its own group.  No placement depends on timing, so the result
is deterministic.  Cost: ``n / 512`` chunks of ~100 shared-memory steps.

The expert kernels keep ``moe.py``'s lane structure so their float64 sums are
the same operations in the same order: a row is handled by ``lpr`` lanes
(``moe.default_lanes_per_row``: 16 for K=4096, 8 for K=2048; one in the
simulator), lane ``l`` owning super-blocks ``l, l+lpr, ...``; 256-thread
blocks of ``256 / lpr`` rows (simulator: 16 rows of one lane, each lane
walking 4 rows one after the other).  Grid ``(n_expert, row tiles)``: block
``(e, t)`` reads ``offsets[e], offsets[e+1]`` and leaves at once when expert
``e`` has no slots.  Otherwise it takes the expert's slots 8 at a time; for
each super-block a lane owns, it loads the weight words once and

* IQ2_XXS: decodes each 32-value group once (grid / sign tables in shared
  memory and PRMT, as ``moe.py``) into 8 int32 words, and dots them with the
  group's activation words of each of the 8 slots (``dp4a``);
* Q2_K / Q4_K: keeps the super-block's quant and scale words in registers and
  evaluates ``moe.py``'s per-super-block integer dot for each of the 8 slots.

Each slot then gets the lane's float64 sum and ``moe.py``'s ``log2(lpr)``-step
shuffle reduction (``warp_sum_pairwise``).

Knobs (launcher arguments, never changing the outputs): ``slots`` (1..8)
and ``min_blocks`` (launch bounds).  Registers at the flash shapes, from
ptxas for sm_90 with the intrinsics inlined (not timings): IQ2_XXS gate/up
126 with 8 slots, 72 with 4 or 2 (the per-slot kernel: 70), 80 with 8 slots
and ``min_blocks=3`` (16 bytes spilled); Q2_K down 96 with 8 slots, 80 with
4 (per-slot: 56).  The defaults (8 slots, no launch bounds) are to be timed
against those (tests/test_kernels_moe_grouped.py prints them on a GPU).

Numerics (docs/model.md, "Numerics: one rounding per value"): identical to
``moe.py``'s per-slot kernels, operation for operation: the per-group and
per-super-block integer dots are the same exact integers (``dp4a``), the
per-super-block terms the same float64 expressions (``d_w * d_x * isum / 8``
for IQ2_XXS, ``d_x * (d_w * isum - dmin_w * summs)`` for the K-quants), added
per lane in the same super-block order from 0.0 and reduced by the same
butterfly; gate and up are rounded to float32, then ``silu(min(g, c)) *
clip(u, -c, c) * weight`` is evaluated in float64 and rounded once; a matvec
product is rounded once.  Only which thread computes which slot changes, so
the outputs are bit-identical to ``<q>.moe_gate_up`` / ``<q>.moe_matvec``
with the same lanes per row (and to their float64 twins but for rare one-ulp
differences).  Array indices are cast to uint64 at each access.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np
from gguf.constants import GGMLQuantizationType
from numba import cuda

from ds4nb.kernels import _launch as L
from ds4nb.kernels import moe as M
from ds4nb.kernels.activation import Q8KAct, q8_K_to_device
from ds4nb.kernels.moe import (_D0, _D_EIGHTH, _M2, _M4, _M4_32, _M6_32, _M30_32, _NEG, _POS,
                               _U1_32, _U2, _U4, _U16, _U28, _U32, _U32_7F, _U32_FF, _UFF, _ULO)
from ds4nb.kernels.intrinsics import (SIMULATOR, as_i32, byte_perm, device, dot8, dp4a, float32, float64, hi_i32, int32,
                                      jit_kernel, uint32, uint64, wait_prior_grid, warp_sum_pairwise)
from ds4nb.kernels.parity import CONTRACT, Case
from ds4nb.kernels.registry import OpSpec, implementation
from ds4nb.quants import dequantize, dequantize_q8_K_activation, quantize_q8_K
from ds4nb.quants.repack import PackedWeight, layout_name

Q = GGMLQuantizationType
QTYPES = M.QTYPES
ROWS_PER_THREAD = M.ROWS_PER_THREAD   # simulator: further rows a lane walks (1 on the GPU)
SLOTS = 8   # slots sharing one read (and, for IQ2_XXS, one decode) of a weight super-block
GATE_UP_MIN_BLOCKS = 3   # the registered gate/up launcher's launch bounds (tests/test_kernels_moe_grouped.py times it)

# group_slots: one block of GS_THREADS threads in groups of GS_GROUP (the simulator: fewer, so that
# its tiny cases still take several groups and chunks)
GS_THREADS = 16 if SIMULATOR else 512
GS_GROUP = 4 if SIMULATOR else 32
GS_SHARED_BYTES = 48 * 1024


class StagedActs(NamedTuple):
    """Q8_K activations of grouped slots in the int8 MMA's fragment order (``moe_mma.stage_slot_acts``), for
    ``n`` grouped positions (``order.size``) and ``nb`` super-blocks: ``qs`` uint64, word ``q`` of 32-value group
    ``grp`` of super-block ``b`` of the slot at position ``p`` at ``((8 b + grp) n + p) 4 + q`` (a Q8_K row's
    word ``4 grp + q``: eight slots' words of one group are 256 contiguous bytes); ``d`` float32, ``b n + p``."""

    qs: Any
    d: Any


def alloc_staged_acts(n_slots: int, k: int, stream: Any = 0) -> StagedActs:
    """Room to stage ``n_slots`` activation rows of ``k`` values (``k / 8`` words and ``k / 256`` scales each)."""
    return StagedActs(L.device_array(n_slots * (k // 8), np.uint64, stream),
                      L.device_array(n_slots * (k // 256), np.float32, stream))


class SlotGroups(NamedTuple):
    """Slots grouped by expert (``moe.group_slots``): ``order`` int32 (n,), ``offsets`` int32 (n_expert + 1,);
    ``acts``: room for the tensor-core kernels to stage the grouped slots' activations (None: they allocate it)."""

    order: Any
    offsets: Any
    acts: StagedActs | None = None


def alloc_slot_groups(n_slots: int, n_expert: int, stream: Any = 0, k: int = 0) -> SlotGroups:
    """Groups of ``n_slots`` slots over ``n_expert`` experts; with ``k``, room to stage rows of ``k`` values."""
    return SlotGroups(L.device_array(n_slots, np.int32, stream), L.device_array(n_expert + 1, np.int32, stream),
                      alloc_staged_acts(n_slots, k, stream) if k else None)


# ---------------------------------------------------------------------------
# moe.group_slots: a deterministic stable counting sort in one block
# ---------------------------------------------------------------------------


@L.kernel_factory
def _make_group_slots(n_expert: int):
    nt = GS_THREADS
    n_groups = nt // GS_GROUP
    per = L.cdiv(n_expert, nt)   # counts each thread prefix-sums
    table_size = n_groups * n_expert

    @cuda.jit
    def kernel(sel, n, order, offsets):
        wait_prior_grid()
        t = cuda.threadIdx.x
        cur = cuda.shared.array(n_expert, int32)                 # counts, then each expert's next place
        table = cuda.shared.array(table_size, int32)       # per chunk: (group, expert) count, then start
        ids = cuda.shared.array(nt, int32)                       # the chunk's expert ids (-1: skipped)
        scan = cuda.shared.array(nt, int32)
        e = t
        while e < n_expert:
            cur[e] = 0
            e += nt
        cuda.syncthreads()
        i = t
        while i < n:
            v = sel[uint64(i)]
            if v >= 0 and v < n_expert:
                cuda.atomic.add(cur, v, 1)    # integer counts: the same in any order
            i += nt
        cuda.syncthreads()
        # offsets: thread t sums counts [t * per, (t + 1) * per), then an inclusive scan over threads
        lo = t * per
        own = 0
        for q in range(per):
            if lo + q < n_expert:
                own += cur[lo + q]
        scan[t] = own
        cuda.syncthreads()
        step = 1
        while step < nt:
            add = scan[t - step] if t >= step else 0
            cuda.syncthreads()
            scan[t] += add
            cuda.syncthreads()
            step *= 2
        run = scan[t] - own
        for q in range(per):
            if lo + q < n_expert:
                c = cur[lo + q]
                offsets[lo + q] = run
                cur[lo + q] = run
                run += c
        total = scan[nt - 1]
        if t == 0:
            offsets[n_expert] = total
        i = total + t
        while i < n:           # the skipped slots' places
            order[uint64(i)] = -1
            i += nt
        cuda.syncthreads()
        g = t // GS_GROUP
        g0 = g * GS_GROUP
        base = 0
        while base < n:        # chunks of nt slots, one a thread
            i = base + t
            v = -1
            if i < n:
                v = sel[uint64(i)]
                if v < 0 or v >= n_expert:
                    v = -1
            ids[t] = v
            k = t
            while k < table_size:
                table[k] = 0
                k += nt
            cuda.syncthreads()
            rank = 0           # equal ids before this slot in its group
            if v >= 0:
                last = True
                for j in range(GS_GROUP):
                    if ids[g0 + j] == v:
                        if g0 + j < t:
                            rank += 1
                        elif g0 + j > t:
                            last = False
                if last:
                    table[g * n_expert + v] = rank + 1
            cuda.syncthreads()
            e = t
            while e < n_expert:   # per expert: exclusive scan over the groups, from its cursor
                run = cur[e]
                for gg in range(n_groups):
                    c = table[gg * n_expert + e]
                    table[gg * n_expert + e] = run
                    run += c
                cur[e] = run
                e += nt
            cuda.syncthreads()
            if v >= 0:
                order[uint64(table[g * n_expert + v] + rank)] = i
            cuda.syncthreads()
            base += nt

    return kernel


def _group_shared_bytes(n_expert: int) -> int:
    return 4 * (n_expert + GS_THREADS // GS_GROUP * n_expert + 2 * GS_THREADS)


@implementation("moe.group_slots", "counting_sort", layout="i32")
def group_slots(sel: Any, *, out: SlotGroups, stream: Any = 0) -> SlotGroups:
    """Slots grouped by expert: a stable counting sort of ``sel`` in one block (see the module doc).

    ``out = (order, offsets[, acts])`` (a :class:`SlotGroups`); ``n_expert = offsets.size - 1``.  Geometry: one
    block of 512 threads (16 in the simulator), shared-memory counts and a
    prefix sum, then chunks of 512 slots placed by a per-32-thread-group count
    table; deterministic (integer counts only, no order-dependent atomics).
    """
    order, offsets = out[0], out[1]
    n = sel.size
    n_expert = offsets.size - 1
    if order.size != n:
        raise ValueError(f"order has {order.size} entries for {n} slots")
    if n_expert < 1 or _group_shared_bytes(n_expert) > GS_SHARED_BYTES:
        raise ValueError(f"group_slots: {n_expert} experts do not fit one block's shared memory")
    L.launch(_make_group_slots(n_expert), 1, GS_THREADS, stream, L.flat(sel), n, L.flat(order), L.flat(offsets))
    return out


def group_slots_ref(sel: np.ndarray, n_expert: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy twin: (order, offsets) from a stable argsort of the valid ids, skipped slots last as -1."""
    sel = np.asarray(sel).reshape(-1).astype(np.int64)
    valid = (sel >= 0) & (sel < n_expert)
    n_valid = int(valid.sum())
    order = np.full(sel.size, -1, np.int32)
    order[:n_valid] = np.argsort(np.where(valid, sel, n_expert), kind="stable")[:n_valid]
    offsets = np.zeros(n_expert + 1, np.int32)
    offsets[1:] = np.cumsum(np.bincount(sel[valid], minlength=n_expert))
    return order, offsets


# ---------------------------------------------------------------------------
# Per-type super-block work for a batch of up to SLOTS slots.  ``yrows[k]``:
# slot k's activation row; ``m``: slots in the batch; ``acc[k] +=`` the slot's
# per-super-block float64 term, exactly as moe.py's partials add it.
#
# Per-slot values live in SLOTS-entry local arrays that must stay in
# registers: every index into them has to be a compile-time constant.  A
# ``for k in range(SLOTS)`` loop gives that only when the compiler unrolls it,
# which NVVM does not for the K-quants' long per-slot bodies (the arrays then
# go to local memory), so the per-slot steps are unrolled here by hand.
# ---------------------------------------------------------------------------


def _for_slots(step, n: int):
    """``run(m, args)``: ``step(k, args)`` for ``k = 0 .. m - 1`` (``m <= n <= 8``), each call with a constant
    ``k`` (``args``: a tuple, arrays included; ``n``, a compile-time constant, drops the calls past it)."""
    if not 1 <= n <= 8:
        raise ValueError(f"batches of 1..8 slots, not {n}")

    @device
    def run(m, args):
        step(0, args)
        if n > 1 and m > 1:
            step(1, args)
        if n > 2 and m > 2:
            step(2, args)
        if n > 3 and m > 3:
            step(3, args)
        if n > 4 and m > 4:
            step(4, args)
        if n > 5 and m > 5:
            step(5, args)
        if n > 6 and m > 6:
            step(6, args)
        if n > 7 and m > 7:
            step(7, args)

    return run


@device
def _iq2_decode(w, grid_s, sign_s):
    """One IQ2_XXS group word -> its 32 values as 8 int8x4 words (as moe.py's ``point``) and 2 * scale + 1."""
    gw = uint32(w & _ULO)
    sw = uint32(w >> _U32)
    s0 = grid_s[gw & _U32_FF] | sign_s[sw & _U32_7F]
    s1 = grid_s[(gw >> uint32(8)) & _U32_FF] | sign_s[(sw >> uint32(7)) & _U32_7F]
    s2 = grid_s[(gw >> uint32(16)) & _U32_FF] | sign_s[(sw >> uint32(14)) & _U32_7F]
    s3 = grid_s[(gw >> uint32(24)) & _U32_FF] | sign_s[(sw >> uint32(21)) & _U32_7F]
    return (as_i32(byte_perm(_POS, _NEG, s0)), as_i32(byte_perm(_POS, _NEG, s0 >> _U16)),
            as_i32(byte_perm(_POS, _NEG, s1)), as_i32(byte_perm(_POS, _NEG, s1 >> _U16)),
            as_i32(byte_perm(_POS, _NEG, s2)), as_i32(byte_perm(_POS, _NEG, s2 >> _U16)),
            as_i32(byte_perm(_POS, _NEG, s3)), as_i32(byte_perm(_POS, _NEG, s3 >> _U16)),
            as_i32(((sw >> _U28) << _U1_32) | _U1_32))


@device
def _iq2_group_dot(dec, yq, yb, j, nb):
    """A decoded group . the 32 activation int8 of group j (4 words), times 2 * scale + 1 (moe.py's ``group``)."""
    y0 = yq[uint64(yb + (4 * j) * nb)]
    y1 = yq[uint64(yb + (4 * j + 1) * nb)]
    y2 = yq[uint64(yb + (4 * j + 2) * nb)]
    y3 = yq[uint64(yb + (4 * j + 3) * nb)]
    s = dp4a(dec[0], as_i32(y0), int32(0))
    s = dp4a(dec[1], hi_i32(y0), s)
    s = dp4a(dec[2], as_i32(y1), s)
    s = dp4a(dec[3], hi_i32(y1), s)
    s = dp4a(dec[4], as_i32(y2), s)
    s = dp4a(dec[5], hi_i32(y2), s)
    s = dp4a(dec[6], as_i32(y3), s)
    s = dp4a(dec[7], hi_i32(y3), s)
    return int32(s * dec[8])


@device
def _iq2_dot_step(k, a):
    dec, yq, yrows, j, nb, b, isum = a
    isum[k] += _iq2_group_dot(dec, yq, yrows[k] * 32 * nb + b, j, nb)


@device
def _iq2_pair_dot_step(k, a):
    gdec, udec, yq, yrows, j, nb, b, gsum, usum = a
    yb = yrows[k] * 32 * nb + b
    gsum[k] += _iq2_group_dot(gdec, yq, yb, j, nb)
    usum[k] += _iq2_group_dot(udec, yq, yb, j, nb)


@device
def _iq2_acc_step(k, a):
    isum, acc, d, yd, yrows, nb, b = a
    acc[k] += float64(int32(isum[k])) * (d * float64(yd[uint64(yrows[k] * nb + b)]))


@device
def _iq2_pair_acc_step(k, a):
    gsum, usum, gacc, uacc, gd, ud, yd, yrows, nb, b = a
    ys = float64(yd[uint64(yrows[k] * nb + b)])
    gacc[k] += float64(int32(gsum[k])) * (gd * ys)
    uacc[k] += float64(int32(usum[k])) * (ud * ys)


@device
def _q2_k_load(qs, sc, dm, wrow, nb, b):
    """A Q2_K super-block's words: (8 quant words, 4 scale words, d, dmin)."""
    qb = wrow * 8 * nb + b
    sb = wrow * 4 * nb + b
    q = (qs[uint64(qb)], qs[uint64(qb + nb)], qs[uint64(qb + 2 * nb)], qs[uint64(qb + 3 * nb)],
         qs[uint64(qb + 4 * nb)], qs[uint64(qb + 5 * nb)], qs[uint64(qb + 6 * nb)], qs[uint64(qb + 7 * nb)])
    s = (sc[uint64(sb)], sc[uint64(sb + nb)], sc[uint64(sb + 2 * nb)], sc[uint64(sb + 3 * nb)])
    return (q, s, float64(float32(dm[uint64(2 * wrow * nb + b)])),
            float64(float32(dm[uint64((2 * wrow + 1) * nb + b)])))


@device
def _q2_k_term(w, yq, yd, ybs, yrow, nb, b):
    """moe.py's ``_q2_k_partial`` term of one super-block, from its loaded words."""
    q, s, d, dmin = w
    yb = yrow * 32 * nb + b
    bb = yrow * 8 * nb + b
    isum = int32(0)
    for h in range(2):
        w0 = q[4 * h]
        w1 = q[4 * h + 1]
        w2 = q[4 * h + 2]
        w3 = q[4 * h + 3]
        for k in range(4):
            sh = uint64(2 * k)
            yk = yb + (16 * h + 4 * k) * nb
            d0 = dot8((w0 >> sh) & _M2, yq[uint64(yk)], int32(0))
            d0 = dot8((w1 >> sh) & _M2, yq[uint64(yk + nb)], d0)
            d1 = dot8((w2 >> sh) & _M2, yq[uint64(yk + 2 * nb)], int32(0))
            d1 = dot8((w3 >> sh) & _M2, yq[uint64(yk + 3 * nb)], d1)
            scw = s[2 * h + k // 2]
            bsh = 16 * (k % 2)
            isum = int32(isum + int32((scw >> bsh) & 0xF) * d0 + int32((scw >> (bsh + 8)) & 0xF) * d1)
    summs = int32(0)
    for p in range(8):
        scw = s[p // 2]
        bsh = 16 * (p % 2)
        bw = ybs[uint64(bb + p * nb)]
        lo = M._lo16(bw)
        hi = bw >> 16
        summs = int32(summs + int32((scw >> (bsh + 4)) & 0xF) * lo + int32((scw >> (bsh + 12)) & 0xF) * hi)
    return float64(yd[uint64(yrow * nb + b)]) * (d * float64(isum) - dmin * float64(summs))


@device
def _q4_k_load(qs, sc, dm, wrow, nb, b):
    """A Q4_K super-block's words: (its 16 quant words as 4 chunks of 4, the 8 scales and the 8 mins as byte
    words, d, dmin)."""
    qb = wrow * 16 * nb + b
    sb = wrow * 3 * nb + b
    q = ((qs[uint64(qb)], qs[uint64(qb + nb)], qs[uint64(qb + 2 * nb)], qs[uint64(qb + 3 * nb)]),
         (qs[uint64(qb + 4 * nb)], qs[uint64(qb + 5 * nb)], qs[uint64(qb + 6 * nb)], qs[uint64(qb + 7 * nb)]),
         (qs[uint64(qb + 8 * nb)], qs[uint64(qb + 9 * nb)], qs[uint64(qb + 10 * nb)], qs[uint64(qb + 11 * nb)]),
         (qs[uint64(qb + 12 * nb)], qs[uint64(qb + 13 * nb)], qs[uint64(qb + 14 * nb)], qs[uint64(qb + 15 * nb)]))
    lo = uint64(sc[uint64(sb)])
    hi = uint64(sc[uint64(sb + nb)])
    ex = uint64(sc[uint64(sb + 2 * nb)])
    # the 8 six-bit scales / mins, byte j = sub-block j (GGUF's get_scale_min_k4, word-wide)
    scs = (lo & _M6_32) | (((ex & _M4_32) | ((lo >> _U2) & _M30_32)) << _U32)
    mns = (hi & _M6_32) | ((((ex >> _U4) & _M4_32) | ((hi >> _U2) & _M30_32)) << _U32)
    return (q, scs, mns, float64(float32(dm[uint64(2 * wrow * nb + b)])),
            float64(float32(dm[uint64((2 * wrow + 1) * nb + b)])))


@device
def _q4_k_chunk(qc, scs, mns, c, yq, ybs, yb, bb, nb):
    """Chunk c (32 bytes: sub-blocks 2c, 2c+1) of moe.py's ``_q4_k_partial``: its (isum, summs) shares."""
    dlo = int32(0)
    dhi = int32(0)
    for pq in range(4):
        w = qc[pq]
        dlo = dot8(w & _M4, yq[uint64(yb + (8 * c + pq) * nb)], dlo)
        dhi = dot8((w >> _U4) & _M4, yq[uint64(yb + (8 * c + 4 + pq) * nb)], dhi)
    s0 = int32((scs >> uint64(16 * c)) & _UFF)
    s1 = int32((scs >> uint64(16 * c + 8)) & _UFF)
    m0 = int32((mns >> uint64(16 * c)) & _UFF)
    m1 = int32((mns >> uint64(16 * c + 8)) & _UFF)
    b0 = ybs[uint64(bb + (2 * c) * nb)]
    b1 = ybs[uint64(bb + (2 * c + 1) * nb)]
    return (int32(s0 * dlo + s1 * dhi),
            int32(m0 * (M._lo16(b0) + (b0 >> 16)) + m1 * (M._lo16(b1) + (b1 >> 16))))


@device
def _q4_k_term(w, yq, yd, ybs, yrow, nb, b):
    """moe.py's ``_q4_k_partial`` term of one super-block, from its loaded words (the same exact integers)."""
    q, scs, mns, d, dmin = w
    yb = yrow * 32 * nb + b
    bb = yrow * 8 * nb + b
    i0, m0 = _q4_k_chunk(q[0], scs, mns, 0, yq, ybs, yb, bb, nb)
    i1, m1 = _q4_k_chunk(q[1], scs, mns, 1, yq, ybs, yb, bb, nb)
    i2, m2 = _q4_k_chunk(q[2], scs, mns, 2, yq, ybs, yb, bb, nb)
    i3, m3 = _q4_k_chunk(q[3], scs, mns, 3, yq, ybs, yb, bb, nb)
    isum = int32(i0 + i1 + i2 + i3)
    summs = int32(m0 + m1 + m2 + m3)
    return float64(yd[uint64(yrow * nb + b)]) * (d * float64(isum) - dmin * float64(summs))


_K_TERMS = {Q.Q2_K: (_q2_k_load, _q2_k_term), Q.Q4_K: (_q4_k_load, _q4_k_term)}


@L.kernel_factory
def _batch_fns(qtype: GGMLQuantizationType, n: int):
    """(single, pair) for batches of up to ``n`` slots: ``single(qs, sc, dm, wrow, nb, b, yq, yd, ybs, yrows, m,
    acc, grid_s, sign_s)`` adds super-block ``b`` of weight row ``wrow`` . each slot's activation row to
    ``acc[k]``; ``pair(gate fields, up fields, ..., gacc, uacc, ...)`` does gate and up together."""
    if qtype == Q.IQ2_XXS:
        dots = _for_slots(_iq2_dot_step, n)
        pair_dots = _for_slots(_iq2_pair_dot_step, n)
        accs = _for_slots(_iq2_acc_step, n)
        pair_accs = _for_slots(_iq2_pair_acc_step, n)

        @device
        def single(qs, sc, dm, wrow, nb, b, yq, yd, ybs, yrows, m, acc, grid_s, sign_s):
            """Each group decoded once, dotted with every slot's activation (moe.py's partial per slot)."""
            isum = cuda.local.array(n, int32)
            for k in range(n):
                isum[k] = 0
            qb = wrow * 8 * nb + b
            w = qs[uint64(qb)]
            for j in range(8):
                dec = _iq2_decode(w, grid_s, sign_s)
                if j < 7:
                    w = qs[uint64(qb + (j + 1) * nb)]   # the next group's word, in flight during these dots
                dots(m, (dec, yq, yrows, j, nb, b, isum))
            accs(m, (isum, acc, float64(float32(dm[uint64(wrow * nb + b)])), yd, yrows, nb, b))

        @device
        def pair(gqs, gsc, gdm, uqs, usc, udm, wrow, nb, b, yq, yd, ybs, yrows, m, gacc, uacc, grid_s, sign_s):
            """Each group of gate and up decoded once; every activation word loaded once per slot for both."""
            gsum = cuda.local.array(n, int32)
            usum = cuda.local.array(n, int32)
            for k in range(n):
                gsum[k] = 0
                usum[k] = 0
            qb = wrow * 8 * nb + b
            gw = gqs[uint64(qb)]
            uw = uqs[uint64(qb)]
            for j in range(8):
                gdec = _iq2_decode(gw, grid_s, sign_s)
                udec = _iq2_decode(uw, grid_s, sign_s)
                if j < 7:
                    gw = gqs[uint64(qb + (j + 1) * nb)]
                    uw = uqs[uint64(qb + (j + 1) * nb)]
                pair_dots(m, (gdec, udec, yq, yrows, j, nb, b, gsum, usum))
            pair_accs(m, (gsum, usum, gacc, uacc, float64(float32(gdm[uint64(wrow * nb + b)])),
                          float64(float32(udm[uint64(wrow * nb + b)])), yd, yrows, nb, b))

        return single, pair

    load, term = _K_TERMS[qtype]

    @device
    def step(k, a):
        w, yq, yd, ybs, yrows, nb, b, acc = a
        acc[k] += term(w, yq, yd, ybs, yrows[k], nb, b)

    terms = _for_slots(step, n)

    @device
    def k_single(qs, sc, dm, wrow, nb, b, yq, yd, ybs, yrows, m, acc, grid_s, sign_s):
        """The super-block's words loaded once, moe.py's per-super-block term for each slot."""
        terms(m, (load(qs, sc, dm, wrow, nb, b), yq, yd, ybs, yrows, nb, b, acc))

    @device
    def k_pair(gqs, gsc, gdm, uqs, usc, udm, wrow, nb, b, yq, yd, ybs, yrows, m, gacc, uacc, grid_s, sign_s):
        """Gate, then up (one matrix's words live at a time)."""
        terms(m, (load(gqs, gsc, gdm, wrow, nb, b), yq, yd, ybs, yrows, nb, b, gacc))
        terms(m, (load(uqs, usc, udm, wrow, nb, b), yq, yd, ybs, yrows, nb, b, uacc))

    return k_single, k_pair


# ---------------------------------------------------------------------------
# Kernel factories, per (kind, qtype, lanes per row, blocks per row)
# ---------------------------------------------------------------------------


@device
def _yrow_step(k, a):
    """The activation row of slot k of the batch starting at ``order[p]``."""
    order, p, div, yrows = a
    yrows[k] = order[uint64(p + k)] // div


@L.kernel_factory
def _make_matvec_grouped(qtype, lpr: int, nb: int, n: int, min_blocks: int = 0):
    single, _ = _batch_fns(qtype, n)
    iq2 = qtype == Q.IQ2_XXS
    grid_words, sign_words = (256, 128) if iq2 else (1, 1)
    rows_per_block = M.block_threads(lpr) // lpr
    one_block = nb <= lpr
    take = _for_slots(_yrow_step, n)

    @device
    def out_step(k, a):
        acc, order, p, n_rows, row, lane, out = a
        v = warp_sum_pairwise(acc[k] * _D_EIGHTH if iq2 else acc[k], lpr)
        if lane == 0 and row < n_rows:
            out[uint64(order[uint64(p + k)] * n_rows + row)] = float32(v)   # the one rounding

    outs = _for_slots(out_step, n)

    @device
    def row_out(qs, sc, dm, n_rows, order, start, end, div, yq, yd, ybs, grid_s, sign_s, out, e, row, lane):
        r = min(row, n_rows - 1)   # tail lanes compute a real row and drop it: shuffles stay full-warp
        wrow = e * n_rows + r
        yrows = cuda.local.array(n, int32)
        acc = cuda.local.array(n, float64)
        for p in range(start, end, n):
            m = min(n, end - p)
            take(m, (order, p, div, yrows))
            for k in range(n):
                acc[k] = _D0
            if one_block:       # a lane owns at most one super-block (the GPU's shapes): no loop
                if lane < nb:
                    single(qs, sc, dm, wrow, nb, lane, yq, yd, ybs, yrows, m, acc, grid_s, sign_s)
            else:
                for b in range(lane, nb, lpr):
                    single(qs, sc, dm, wrow, nb, b, yq, yd, ybs, yrows, m, acc, grid_s, sign_s)
            outs(m, (acc, order, p, n_rows, row, lane, out))

    @jit_kernel(launch_bounds=(M.THREADS, min_blocks) if min_blocks else None)
    def kernel(qs, sc, dm, n_rows, order, offsets, div, yq, yd, ybs, grid_g, sign_g, out):
        wait_prior_grid()
        e = cuda.blockIdx.x
        start = offsets[e]
        end = offsets[e + 1]
        if start >= end:      # an expert without slots
            return
        grid_s = cuda.shared.array(grid_words, uint32)
        sign_s = cuda.shared.array(sign_words, uint32)
        if iq2:
            M._load_luts(grid_g, sign_g, grid_s, sign_s, 1)
            cuda.syncthreads()
        row = cuda.blockIdx.y * (rows_per_block * ROWS_PER_THREAD) + cuda.threadIdx.x // lpr
        lane = cuda.threadIdx.x % lpr
        row_out(qs, sc, dm, n_rows, order, start, end, div, yq, yd, ybs, grid_s, sign_s, out, e, row, lane)
        if ROWS_PER_THREAD > 1:  # the simulator's further rows (a constant-false branch on the GPU)
            for rep in range(1, ROWS_PER_THREAD):
                if row + rep * rows_per_block >= n_rows:
                    break
                row_out(qs, sc, dm, n_rows, order, start, end, div, yq, yd, ybs, grid_s, sign_s, out, e,
                        row + rep * rows_per_block, lane)

    return kernel


@L.kernel_factory
def _make_gate_up_grouped(qtype, lpr: int, nb: int, n: int, min_blocks: int = 0):
    _, pair = _batch_fns(qtype, n)
    iq2 = qtype == Q.IQ2_XXS
    grid_words, sign_words = (256, 128) if iq2 else (1, 1)
    rows_per_block = M.block_threads(lpr) // lpr
    one_block = nb <= lpr
    take = _for_slots(_yrow_step, n)

    @device
    def out_step(k, a):
        gacc, uacc, order, p, weights, clamp, n_rows, row, lane, mid = a
        # gate_e and up_e are float32 values (docs/model.md step 17)
        g32 = float32(warp_sum_pairwise(gacc[k] * _D_EIGHTH if iq2 else gacc[k], lpr))
        u32 = float32(warp_sum_pairwise(uacc[k] * _D_EIGHTH if iq2 else uacc[k], lpr))
        if lane == 0 and row < n_rows:
            s = order[uint64(p + k)]
            mid[uint64(s * n_rows + row)] = M.clamped_swiglu(g32, u32, clamp, weights[uint64(s)])

    outs = _for_slots(out_step, n)

    @device
    def row_out(gqs, gsc, gdm, uqs, usc, udm, n_rows, order, start, end, div, weights, clamp, yq, yd, ybs,
                grid_s, sign_s, mid, e, row, lane):
        r = min(row, n_rows - 1)
        wrow = e * n_rows + r
        yrows = cuda.local.array(n, int32)
        gacc = cuda.local.array(n, float64)
        uacc = cuda.local.array(n, float64)
        for p in range(start, end, n):
            m = min(n, end - p)
            take(m, (order, p, div, yrows))
            for k in range(n):
                gacc[k] = _D0
                uacc[k] = _D0
            if one_block:       # a lane owns at most one super-block (the GPU's shapes): no loop
                if lane < nb:
                    pair(gqs, gsc, gdm, uqs, usc, udm, wrow, nb, lane, yq, yd, ybs, yrows, m, gacc, uacc, grid_s,
                         sign_s)
            else:
                for b in range(lane, nb, lpr):
                    pair(gqs, gsc, gdm, uqs, usc, udm, wrow, nb, b, yq, yd, ybs, yrows, m, gacc, uacc, grid_s,
                         sign_s)
            outs(m, (gacc, uacc, order, p, weights, clamp, n_rows, row, lane, mid))

    @jit_kernel(launch_bounds=(M.THREADS, min_blocks) if min_blocks else None)
    def kernel(gqs, gsc, gdm, uqs, usc, udm, n_rows, order, offsets, div, weights, clamp, yq, yd, ybs,
               grid_g, sign_g, mid):
        wait_prior_grid()
        e = cuda.blockIdx.x
        start = offsets[e]
        end = offsets[e + 1]
        if start >= end:      # an expert without slots
            return
        grid_s = cuda.shared.array(grid_words, uint32)
        sign_s = cuda.shared.array(sign_words, uint32)
        if iq2:
            M._load_luts(grid_g, sign_g, grid_s, sign_s, 1)
            cuda.syncthreads()
        row = cuda.blockIdx.y * (rows_per_block * ROWS_PER_THREAD) + cuda.threadIdx.x // lpr
        lane = cuda.threadIdx.x % lpr
        row_out(gqs, gsc, gdm, uqs, usc, udm, n_rows, order, start, end, div, weights, clamp, yq, yd, ybs,
                grid_s, sign_s, mid, e, row, lane)
        if ROWS_PER_THREAD > 1:  # the simulator's further rows (a constant-false branch on the GPU)
            for rep in range(1, ROWS_PER_THREAD):
                if row + rep * rows_per_block >= n_rows:
                    break
                row_out(gqs, gsc, gdm, uqs, usc, udm, n_rows, order, start, end, div, weights, clamp, yq, yd,
                        ybs, grid_s, sign_s, mid, e, row + rep * rows_per_block, lane)

    return kernel


def _geometry(w: PackedWeight, qtype: GGMLQuantizationType, groups: SlotGroups, x: Q8KAct,
              lpr: int | None) -> tuple[int, int, int, int, int]:
    """(n_rows, nb, lanes per row, n_expert, slots per activation row), checked."""
    n_rows, nb, lpr = M._geometry(w, qtype, lpr)
    n_expert = w.shape[0]
    if groups.offsets.size != n_expert + 1:
        raise ValueError(f"offsets has {groups.offsets.size} entries for {n_expert} experts")
    n_slots = groups.order.size
    x_rows = x.d.size // nb
    if x_rows < 1 or n_slots % x_rows:
        raise ValueError(f"{n_slots} slots do not split over {x_rows} activation rows")
    return n_rows, nb, lpr, n_expert, n_slots // x_rows


def _moe_matvec_grouped(qtype: GGMLQuantizationType, w: PackedWeight, groups: SlotGroups, x: Q8KAct, *,
                        out: Any, stream: Any = 0, lpr: int | None = None, slots: int = SLOTS,
                        min_blocks: int = 0) -> Any:
    """``out[s, r] = W[e][r] . x[s // div]`` for every slot ``s`` of every expert ``e`` in ``groups``.

    Grid ``(n_expert, cdiv(N, 256 / lpr))`` of 256-thread blocks (simulator: ``(n_expert, cdiv(N, 64))`` of
    16 threads, 4 rows a thread); ``div = n_slots / rows(x)``.  ``lpr`` (default
    ``moe.default_lanes_per_row(nb)``: the per-slot ``moe_matvec``'s, which the bit-identity
    needs), ``slots`` (1..8, slots a weight super-block is read for) and ``min_blocks`` (launch bounds:
    256-thread blocks per SM, 0: none) are tuning knobs that never change the outputs.
    """
    n_rows, nb, lpr, n_expert, div = _geometry(w, qtype, groups, x, lpr)
    c = M._consts()
    nt = M.block_threads(lpr)
    grid = (n_expert, L.cdiv(n_rows, nt // lpr * ROWS_PER_THREAD))
    L.launch(_make_matvec_grouped(qtype, lpr, nb, slots, min_blocks), grid, nt, stream,
             w.qs, M._sc(w, c), w.dm, n_rows, L.flat(groups.order), L.flat(groups.offsets), div, x.qs, x.d,
             x.bsums, c["grid"], c["sign"], L.flat(out))
    return out


def _moe_gate_up_grouped(qtype: GGMLQuantizationType, gate: PackedWeight, up: PackedWeight, groups: SlotGroups,
                         weights: Any, x: Q8KAct, clamp: float, *, out: Any, stream: Any = 0,
                         lpr: int | None = None, slots: int = SLOTS, min_blocks: int = 0) -> Any:
    """``out[s, r] = silu(min(g, c)) * clip(u, -c, c) * weights[s]``, ``g, u = gate[e][r], up[e][r] . x[s //
    div]``, for every slot ``s`` of every expert ``e`` in ``groups``.

    Geometry and knobs as :func:`_moe_matvec_grouped` (``lpr`` default: ``moe_gate_up``'s).
    """
    n_rows, nb, lpr, n_expert, div = _geometry(gate, qtype, groups, x, lpr)
    if up.shape != gate.shape or up.qtype != gate.qtype:
        raise ValueError(f"gate {gate.shape} and up {up.shape} differ")
    c = M._consts()
    nt = M.block_threads(lpr)
    grid = (n_expert, L.cdiv(n_rows, nt // lpr * ROWS_PER_THREAD))
    L.launch(_make_gate_up_grouped(qtype, lpr, nb, slots, min_blocks), grid, nt, stream,
             gate.qs, M._sc(gate, c), gate.dm, up.qs, M._sc(up, c), up.dm, n_rows, L.flat(groups.order),
             L.flat(groups.offsets), div, L.flat(weights), np.float32(clamp), x.qs, x.d, x.bsums, c["grid"],
             c["sign"], L.flat(out))
    return out


# ---------------------------------------------------------------------------
# Registered launchers, one set per quant type
# ---------------------------------------------------------------------------


def register_launchers(qtype: GGMLQuantizationType, name: str, priority: int, gate_up: Any, matvec: Any,
                       gate_up_doc: str, matvec_doc: str) -> dict[str, Any]:
    """Register ``gate_up(qtype, gate, up, groups, weights, x, clamp, out=, stream=)`` and ``matvec(qtype, w,
    groups, x, out=, stream=)`` as implementation ``name`` of ``<q>.moe_gate_up_grouped`` and
    ``<q>.moe_matvec_grouped``; returns the launchers by module-global name."""
    q = qtype.name.lower()
    layout = layout_name(qtype)

    @implementation(f"{q}.moe_gate_up_grouped", name, layout=layout, priority=priority)
    def moe_gate_up_grouped(gate: PackedWeight, up: PackedWeight, groups: SlotGroups, weights: Any, x: Q8KAct,
                            clamp: float, *, out: Any, stream: Any = 0) -> Any:
        return gate_up(qtype, gate, up, groups, weights, x, clamp, out=out, stream=stream)

    @implementation(f"{q}.moe_matvec_grouped", name, layout=layout, priority=priority)
    def moe_matvec_grouped(w: PackedWeight, groups: SlotGroups, x: Q8KAct, *, out: Any, stream: Any = 0) -> Any:
        return matvec(qtype, w, groups, x, out=out, stream=stream)

    moe_gate_up_grouped.__doc__ = f"{qtype.name} {gate_up_doc}"
    moe_matvec_grouped.__doc__ = f"{qtype.name} {matvec_doc}"
    return {f"{q}_moe_gate_up_grouped_{name}": moe_gate_up_grouped, f"{q}_moe_matvec_grouped_{name}": moe_matvec_grouped}


# 3 blocks an SM (launch bounds) for gate/up: 4.09 ms against 5.21 ms without, T=512 at flash shapes on an H200
for _qt in QTYPES:
    globals().update(register_launchers(
        _qt, "expert_blocks", 10, functools.partial(_moe_gate_up_grouped, min_blocks=GATE_UP_MIN_BLOCKS),
        _moe_matvec_grouped,
        "gate+up (clamped SwiGLU x router weight) for slots grouped by expert (prefill).\n\n"
        "Grid (n_expert, row tiles), 256-thread blocks of 256 / lpr rows (lpr = moe.default_lanes_per_row); a "
        "block leaves at once when its expert has no slots, else walks them 8 at a time, each weight "
        "super-block read (and decoded) once per 8 slots.  x: one Q8_K row per token (slot s reads row "
        "s // n_used).  Bit-identical to moe_gate_up (same integer dots, float64 sums, one rounding each for "
        "gate, up and mid); see the module doc.",
        "experts x Q8_K for slots grouped by expert (the prefill down projection).\n\n"
        "Grid (n_expert, row tiles), 256-thread blocks of 256 / lpr rows; a block leaves at once when its "
        "expert has no slots, else walks them 8 at a time, each weight super-block read once per 8 slots.  "
        "x: one Q8_K row per slot (or per token).  Bit-identical to moe_matvec (one rounding per product); see "
        "the module doc."))
del _qt


# ---------------------------------------------------------------------------
# Parity cases.  The groups are the numpy twin's (group_slots_ref), so each op is checked on its own.
# Twins: moe.py's, expert by expert: dequantize(W[e]) @ the exact Q8_K activations in float64, rounded
# where docs/model.md's table says; skipped slots stay unwritten (NaN in the poisoned output).
# ---------------------------------------------------------------------------

#: tiny (simulator) and model-scale shapes: (E, N, K, T, n_used)
_TINY = {"matvec": (5, 12, 512, 5, 3), "gate_up": (5, 10, 512, 5, 3)}
_MODEL_GATE_UP = (8, 2048, 4096, 16, 6)   # ~12 slots an expert: two batches of 8
_MODEL_DOWN = (8, 4096, 2048, 16, 6)
_TOL = 1e-6


def tiny_sel(rng: np.random.Generator, n_expert: int, n_slots: int) -> np.ndarray:
    """Slot experts with one expert on more than SLOTS slots, one on several, one on one, two experts on
    none and two skipped (-1) slots, in random places (a token may pick an expert twice here)."""
    e = rng.permutation(n_expert)
    several = n_slots - (SLOTS + 1) - 1 - 2
    if several < 2 or n_expert < 5:
        raise ValueError(f"tiny_sel needs >= {SLOTS + 5} slots and >= 5 experts")
    ids = np.concatenate([np.full(SLOTS + 1, e[0]), np.full(several, e[1]), [e[2], -1, -1]])
    return rng.permutation(ids).astype(np.int32)


def model_sel(rng: np.random.Generator, n_expert: int, n_tok: int, n_used: int, skew: float = 1.0) -> np.ndarray:
    """Router-like picks: ``n_used`` distinct experts per token from a skewed (Zipf-like) popularity."""
    p = 1.0 / np.arange(1, n_expert + 1) ** skew
    p = rng.permutation(p / p.sum())
    return np.stack([rng.choice(n_expert, n_used, replace=False, p=p) for _ in range(n_tok)]).reshape(-1) \
        .astype(np.int32)


def grouped_ref(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int, int], sel: np.ndarray,
                x_deq: np.ndarray) -> np.ndarray:
    """float64 (n_slots, N): row s = dequantize(W[sel[s]]) @ x_deq[s // (n_slots / rows)], unrounded; NaN rows
    for skipped slots (moe.expert_matvec_ref, each expert decoded once)."""
    e_total, n, _ = shape
    div = sel.size // x_deq.shape[0]
    out = np.full((sel.size, n), np.nan)
    for e in np.unique(sel[(sel >= 0) & (sel < e_total)]):
        slots = np.flatnonzero(sel == e)
        out[slots] = x_deq[slots // div] @ _expert_rows(raw, qtype, shape, int(e)).T
    return out


def _expert_rows(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int, int], e: int) -> np.ndarray:
    e_total, n, k = shape
    per = raw.size // e_total
    return dequantize(raw[M.e_idx_slice(e, per)], qtype, (n, k), dtype=np.float64)


def _xdeq(x: np.ndarray) -> np.ndarray:
    return dequantize_q8_K_activation(*quantize_q8_K(x)[:2], dtype=np.float64)


def _groups_on_device(sel: np.ndarray, n_expert: int) -> SlotGroups:
    order, offsets = group_slots_ref(sel, n_expert)
    return SlotGroups(cuda.to_device(order), cuda.to_device(offsets))


def _sel(rng: np.random.Generator, scale: str, e: int, t: int, n_used: int) -> np.ndarray:
    return tiny_sel(rng, e, t * n_used) if scale == "tiny" else model_sel(rng, e, t, n_used)


def _case_matvec(qtype: GGMLQuantizationType):
    def make(rng: np.random.Generator, scale: str) -> Case:
        e, n, k, t, n_used = _TINY["matvec"] if scale == "tiny" else (
            _MODEL_DOWN if qtype == Q.Q2_K else _MODEL_GATE_UP)
        raw, w = M._experts(rng, qtype, e, n, k)
        sel = _sel(rng, scale, e, t, n_used)
        per_slot = scale != "tiny" or bool(rng.integers(2))   # x: one row per slot (down) or per token
        x = M._x(rng, t * n_used if per_slot else t, k)
        ref = grouped_ref(raw, qtype, (e, n, k), sel, _xdeq(x)).astype(np.float32)   # one rounding
        out = L.device_array(sel.size * n, np.float32)
        return Case((w, _groups_on_device(sel, e), q8_K_to_device(x)), out, (ref.reshape(-1),), (CONTRACT,),
                    weight_bytes=raw.size // e * len(np.unique(sel[sel >= 0])),
                    info={"experts": (e, n, k), "slots": sel.size, "x_per_slot": per_slot})

    return make


def _case_gate_up(qtype: GGMLQuantizationType):
    def make(rng: np.random.Generator, scale: str) -> Case:
        e, n, k, t, n_used = _TINY["gate_up"] if scale == "tiny" else _MODEL_GATE_UP
        graw, gw = M._experts(rng, qtype, e, n, k)
        uraw, uw = M._experts(rng, qtype, e, n, k)
        sel = _sel(rng, scale, e, t, n_used)
        weights = rng.uniform(0.05, 1.0, sel.size).astype(np.float32)
        x = M._x(rng, t, k)   # one activation row per token
        xd = _xdeq(x)
        g = grouped_ref(graw, qtype, (e, n, k), sel, xd)
        u = grouped_ref(uraw, qtype, (e, n, k), sel, xd)
        # a clamp that bites: ~30% of |gate|/|up| values are above it
        clamp = float(np.nanquantile(np.abs(np.concatenate([g.ravel(), u.ravel()])), 0.7))
        with np.errstate(invalid="ignore"):
            ref = M.gate_up_ref(g, u, weights, clamp)
        out = L.device_array(sel.size * n, np.float32)
        return Case((gw, uw, _groups_on_device(sel, e), cuda.to_device(weights), q8_K_to_device(x), clamp), out,
                    (ref.reshape(-1),), (CONTRACT,),
                    weight_bytes=2 * graw.size // e * len(np.unique(sel[sel >= 0])),
                    info={"experts": (e, n, k), "slots": sel.size, "clamp": round(clamp, 4)})

    return make


def _case_group_slots(rng: np.random.Generator, scale: str) -> Case:
    if scale == "tiny":
        n_expert, t, n_used = 7, 9, 3      # 27 slots: two simulator chunks of 16
        sel = rng.integers(0, n_expert, t * n_used).astype(np.int32)
    else:
        n_expert, t, n_used = 256, 512, 6
        sel = model_sel(rng, n_expert, t, n_used)
    sel[rng.random(sel.size) < 0.15] = -1           # slots another launch reads (split placement)
    order, offsets = group_slots_ref(sel, n_expert)
    out = alloc_slot_groups(sel.size, n_expert)[:2]     # (order, offsets): the op's outputs (no staging room)
    return Case((cuda.to_device(sel),), out, (order, offsets), (True, True),
                info={"experts": n_expert, "slots": sel.size})


OPS = [
    OpSpec("moe.group_slots", "slots grouped by expert: a stable counting sort of the selected expert ids",
           "(sel i32 (n,), *, out SlotGroups(order i32 (n,), offsets i32 (n_expert + 1,)), stream)",
           "numpy stable argsort of the valid ids (skipped slots last, -1), offsets = cumsum(bincount)",
           0.0, _case_group_slots),
]
for _qt in QTYPES:
    _q = _qt.name.lower()
    OPS += [
        OpSpec(f"{_q}.moe_gate_up_grouped",
               f"{_qt.name} gate+up experts, clamped SwiGLU x router weight, slots grouped by expert (prefill)",
               "(gate, up: PackedWeight (E, N, K), groups: SlotGroups, weights f32 (n,), x: Q8KAct (n / r, K), "
               "clamp: float, *, out f32 (n, N), stream)",
               "as moe_gate_up, slot s with x[s // r]: gate, up each rounded, then silu(min(g, c)) * "
               "clip(u, -c, c) * weight in float64, rounded once", _TOL, _case_gate_up(_qt)),
        OpSpec(f"{_q}.moe_matvec_grouped", f"{_qt.name} routed experts x Q8_K, slots grouped by expert (prefill)",
               "(w: PackedWeight (E, N, K), groups: SlotGroups, x: Q8KAct (n / r, K), *, out f32 (n, N), stream)",
               "dequantize(W[sel[s]]) @ dequantize_q8_K_activation(quantize_q8_K(x[s // r])) in float64 (exact "
               "operands), rounded once", _TOL, _case_matvec(_qt)),
    ]
del _qt, _q
