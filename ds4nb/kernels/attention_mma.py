"""``attn.decode`` on the float64 tensor cores, for prefill and decode steps (``heads_mma``).

The op of ``attention.attention_decode`` (``split_heads8``) with its arguments,
partials and outputs: each of the step's T query tokens attends to its own
window rows and visible compressed rows (its step record), with the per-head
sink, then optionally the inverse RoPE (docs/model.md steps 11-12).  There the
scores and the weighted sum are float64 FMAs (~10 TFLOP/s on an H200 at flash
shapes, a quarter of a prefill step); here they are ``mma.sync.m8n8k4``
float64 MMAs (``intrinsics.mma_f64``).  All heads of a token attend to the same
rows (one KV head), so a group of heads is the MMA's M dimension:

* scores ``S = Q R^T`` (heads x rows, K = head_dim): A the queries, B the rows;
* weighted sum ``O += P R`` (heads x head_dim, K = rows): A the softmax weights
  ``e^(s - m)``, B the same rows.

Decode steps take this kernel too: one token's 64 heads against 640 rows (a
CSA layer at 2048 tokens) took 19.2 us with 8 heads a block against 52.7 us
for ``split_heads8`` (H200, bench/results/decode_kernels_h200.md; 16 heads a
block: 26.2 us in an earlier run), whose per-row float64 FMA chains and shuffle
reductions are latency-bound at one token.  Devices where
``intrinsics.has_f64_mma()`` is False (before sm_90, and the simulator, where
an MMA costs a block barrier) go to ``attention_decode``; ``mma=True`` asks for
the MMA kernel anyway (tests, the bench; the m8n8k4 it uses runs from sm_80).

Geometry.  Grid ``(n_head / HPB, n_split, T)``, ``NW`` warps: a block owns
``HPB`` heads of one token (16 = two 8-head MMA tiles; 8 for a decode step,
whose blocks come only from heads and splits, and when n_head is not a
multiple of 16; heads past n_head get zero queries and are not written) and
walks the token's rows in chunks of ``CH`` rows (16; 8 for F32 rows), chunk
``c`` in split ``c mod n_split`` (one split once the step has blocks enough).
The warps split head_dim: warp ``w`` owns dims ``D_w = [w DW, (w + 1) DW)``,
``DW = head_dim / NW`` (8 warps, DW = 64 at flash shapes; the simulator: one warp), for both products:

* its A fragments of the queries ``Q[heads][D_w]``, widened to float64 once,
  stay in registers for the whole block (``HPB DW / 32`` values a lane);
* per chunk it computes partial scores over its dims (``HPB / 8 x CH / 8``
  tiles, ``DW / 4`` k-steps, a row fragment feeding every head tile) into
  shared memory, and the softmax step adds the ``NW`` partials;
* its accumulators ``O[heads][D_w]`` stay in registers (``HPB DW / 32``
  float64 a lane), rescaled when a head's running max grows; a k-step of 4
  rows loads one weight fragment per head tile and one row fragment per 8 dims.

So every row value a block reads is widened to float64 twice (once per
product: 0.5 conversions an MMA with 16 heads), every query value once, and
only the float64 chunk scores and weights cross warps.

Shared memory.  A chunk's rows are copied as 8-byte words (``CH x head_dim``
values: 8 words a thread at flash shapes, coalesced) and read back as F16 /
F32 values, rows ``HDP`` values apart, ``HDP`` such that a row starts 4 words
(mod 32) after the previous one: the score fragments (8 rows x 4 dims) and,
for F16, the weighted-sum fragments (4 rows x 8 dims) touch distinct banks
(F32: the latter 2-way).  The weights are ``CH + 4`` float64 apart (a fragment
of 8 heads x 4 rows: two conflict-free half-warps).  Which rows a chunk holds
(window ring or compressed, ``sel``) is a table of ``CH`` word offsets built
one chunk ahead; with ``prefetch`` each thread loads the next chunk's words
into registers while the block computes the current one and stores them at
the top of the next iteration.  Four block barriers a chunk: rows stored,
partial scores stored, weights stored, weighted sum done.  Flash shapes (F16,
16 heads, 16 rows, 8 warps): rows 16.3 KiB, partial scores 16 KiB, weights
2.5 KiB, ~35 KiB in all.

The softmax step: thread ``(head, row)`` (``CH`` lanes a head, an aligned
group of a warp) adds the row's ``NW`` partial scores, scales by
``1/sqrt(d)`` (rows past the token's last, which repeat its last row, get the
masked score and weight 0) and with group max / sum reductions updates the
head's running max ``m`` and sum ``l`` and the rescale factor ``e^(m_old -
m_new)``: ``attention.py``'s running softmax.  The block leaves ``(m, l, acc)``
per head in the same scratch, and ``attention.combine_splits`` (``attn.decode``'s
merge) adds the sink, divides, rounds and rotates.

Timings: ``bench/attention_prefill.py`` (the knobs of :func:`mma_geometry` against
``split_heads8`` on a flash prefill chunk).  Measured on an H200
(bench/results/f64_mma_h200.md: 512 tokens at positions 1536..2047, 512-640
rows a token): 2.11 ms a launch at the defaults against 10.88 ms for
``split_heads8`` (18.3 against 3.6 TFLOP/s), the knobs' variants 2.16-2.51
ms, the merge alone 0.16 ms; outputs bit-identical to ``split_heads8``'s.  Registers (ptxas 13.0 for sm_90 on
numba's PTX, no spills): 240 a thread at
the defaults (one block of 8 warps an SM), 235 without ``prefetch``, 149 with
8 heads a block and no prefetch (``min_blocks=2`` caps it at 128 with a
12-byte spill: two blocks an SM).  Array indices are cast to uint64 at each
access: no negative-index code, and an unrolled loop's constant offsets fold
into the addresses (else each gets its own register pair).

Numerics (docs/model.md, "Numerics: one rounding per value"): query values
(float32) and row values (F16 / F32) are exact in float64, every MMA product
is exact and every sum a float64 sum; the running max, ``exp`` and sums are
float64 as in ``attention_decode``.  Each head's output is the float32
rounding of the same float64 formula summed in another order, so this kernel,
``split_heads8`` and the oracle agree bit for bit but for ~1e-7 of values, by
one ulp.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from numba import cuda

from ds4nb.kernels import _launch as L
from ds4nb.kernels import attention as A    # as a module: its launchers must not join this module's registrations
from ds4nb.kernels.intrinsics import (SIMULATOR, device, float64, has_f64_mma, int32, int64, jit_kernel, mma_f64,
                                      uint64, wait_prior_grid, warp_max, warp_sum)
from ds4nb.kernels.registry import Requirements, implementation
from ds4nb.kernels.step import GROUP0

#: Steps of fewer tokens (decode: one) take 8 heads a block: more, shorter blocks for a latency-bound step.
MIN_TOKENS = 2
#: Blocks a launch aims for before it splits each token's rows (~one wave at one block an SM on an H200).
TARGET_BLOCKS = 132
#: Rows a chunk, largest first: the launcher takes the first that fits the shared memory.
CHUNKS = (16, 8)
_D0 = np.float64(0.0)
_NEG_INF64 = np.float64(A.NEG_INF)              # the masked score, as attention.py's
_HALF_NEG_INF64 = np.float64(A.NEG_INF / 2)
#: The row dtypes (the window cache is F16; F32 rows for tests) as shared-array element types.
_ROW_TYPES = {"float16": np.float16, "float32": np.float32}


def row_stride(head_dim: int, itemsize: int) -> int:
    """Values from one shared row to the next: a row starts 4 words (mod 32) after the previous one."""
    words = head_dim * itemsize // 4
    return head_dim + (4 - words) % 32 * 4 // itemsize


def shared_bytes(hpb: int, head_dim: int, chunk: int, warps: int, itemsize: int) -> int:
    """Static shared memory of the kernel: rows, partial scores, weights, per-head state, row tables."""
    return (chunk * row_stride(head_dim, itemsize) * itemsize + 8 * warps * hpb * chunk + 8 * hpb * (chunk + 4)
            + 3 * 8 * hpb + 2 * chunk * (8 + 4))


class MmaGeometry(NamedTuple):
    """One launch of the MMA kernel (module doc)."""

    hpb: int            # heads a block, a multiple of 8
    chunk: int          # rows a chunk: 8, 16 or 32
    warps: int          # warps a block; head_dim / warps is a multiple of 8
    splits: int         # row splits a token
    prefetch: bool      # the next chunk's words loaded during this one
    min_blocks: int     # launch bounds' blocks an SM (0: none)


def mma_geometry(n_head: int, head_dim: int, max_rows: int, itemsize: int, tokens: int, *, hpb: int | None = None,
                 chunk: int | None = None, warps: int | None = None, splits: int | None = None,
                 prefetch: bool = True, min_blocks: int = 0) -> MmaGeometry:
    """The launch geometry: defaults as the module doc (the simulator: one warp, one split), or the given knobs."""
    if head_dim % 32:
        raise ValueError(f"attn.decode heads_mma: head_dim {head_dim} is not a multiple of 32")
    hpb = hpb or (16 if n_head % 16 == 0 and tokens >= MIN_TOKENS else 8)
    if warps is None:
        warps = 1 if SIMULATOR else next(w for w in (8, 4, 2, 1) if head_dim % (8 * w) == 0)
    if hpb % 8 or head_dim % (8 * warps):
        raise ValueError(f"attn.decode heads_mma: {hpb} heads a block (a multiple of 8) or {warps} warps "
                         f"(head_dim / warps a multiple of 8) do not fit head_dim {head_dim}")
    if chunk is None:
        chunk = next((c for c in CHUNKS if shared_bytes(hpb, head_dim, c, warps, itemsize) <= A.SHARED_BYTES),
                     CHUNKS[-1])
    need = shared_bytes(hpb, head_dim, chunk, warps, itemsize)
    if chunk not in (8, 16, 32) or need > A.SHARED_BYTES:
        raise ValueError(f"attn.decode heads_mma: chunks of {chunk} rows (8, 16 or 32) need {need} bytes of "
                         f"shared memory (at most {A.SHARED_BYTES})")
    if splits is None:
        splits = 1 if SIMULATOR else TARGET_BLOCKS // (tokens * L.cdiv(n_head, hpb))
    splits = max(1, min(L.cdiv(max(max_rows, 1), chunk), splits, A.MAX_SPLITS))
    return MmaGeometry(hpb, chunk, warps, splits, prefetch, min_blocks)


@device
def _row_entry(tab_off, tab_comp, i, r, n_raw, first, ring, use_sel, sel, row_words):
    """Row table entry ``i``: where row ``r`` of the token's rows (its window, then its visible compressed
    rows: ``attention_decode``'s order) starts: ``tab_comp[i]`` 1 in ``comp``, 0 in the ring ``raw``;
    ``tab_off[i]`` its first 8-byte word (``row_words`` a row).  ``first`` is the ring row of the window's oldest
    position plus ``ring``, so ``first + r < 2 ring`` for a window row."""
    if r < n_raw:
        b = first + r
        if b >= ring:
            b -= ring
        tab_comp[i] = 0
        tab_off[i] = b * row_words
    else:
        c = r - n_raw
        if use_sel:
            c = sel[c]
        tab_comp[i] = 1
        tab_off[i] = c * row_words


@L.kernel_factory
def _mma_kernel(hpb: int, head_dim: int, ch: int, warps: int, row_dtype: str, prefetch: bool,
                min_blocks: int) -> Any:
    """The partial kernel of :class:`MmaGeometry` ``(hpb, ch, warps, -, prefetch, min_blocks)`` for rows of
    ``row_dtype`` (``"float16"`` or ``"float32"``) and ``head_dim``."""
    HPB, HD, CH, NW, PF = hpb, head_dim, ch, warps, prefetch
    NT = 32 * NW
    NHT = HPB // 8                  # head tiles (the MMAs' M = 8 heads)
    DW = HD // NW                   # dims of a warp
    KQ = DW // 4                    # k-steps of a warp's partial scores (4 dims each)
    NDT = DW // 8                   # dim tiles of a warp's accumulators (8 dims each)
    NRT = CH // 8                   # row tiles of the scores (8 rows each)
    NKR = CH // 4                   # k-steps of the weighted sum (4 rows each)
    ISZ = np.dtype(row_dtype).itemsize
    HDP = row_stride(HD, ISZ)       # values from one shared row to the next (a multiple of 8 bytes)
    WPR, HDW = HD * ISZ // 8, HDP * ISZ // 8     # 8-byte words of a row, in memory and in shared memory
    CHP = CH + 4                    # float64 stride of the weights: conflict-free (8 heads x 4 rows) fragments
    CW = CH * WPR                   # words of a chunk
    LOADS = L.cdiv(CW, NT)          # words of a chunk a thread loads
    EXACT = CW % NT == 0            # ... each thread the same number (else the last round is partial)
    SMR = L.cdiv(HPB * CH, NT)      # (head, row) entries of the softmax step a thread takes
    ROW_T = _ROW_TYPES[row_dtype]
    RS_W, SP_N, P_N = CH * HDW, NW * HPB * CH, HPB * CHP       # array sizes must be single constants
    QA_N, O_N, S_N, TAB_N = NHT * KQ, 2 * NHT * NDT, 2 * NHT * NRT, 2 * CH

    @device
    def load_rows(stage, raw_w, comp_w, tab_off, tab_comp, tb, tid):
        """This thread's words of the chunk whose row table starts at ``tb``: word ``tid + NT j`` (coalesced)."""
        for j in range(LOADS):
            i = tid + NT * j
            if EXACT or i < CW:
                rr = i // WPR
                off = uint64(tab_off[uint64(tb + rr)] + i - rr * WPR)
                stage[j] = comp_w[off] if tab_comp[uint64(tb + rr)] else raw_w[off]

    @device
    def store_rows(stage, rs_w, tid):
        """The words of :func:`load_rows` into the shared rows."""
        for j in range(LOADS):
            i = tid + NT * j
            if EXACT or i < CW:
                rr = i // WPR
                rs_w[uint64(rr * HDW + i - rr * WPR)] = stage[j]

    @jit_kernel(launch_bounds=(NT, min_blocks) if min_blocks else NT)
    def partial_kernel(q, raw, ring, comp, sel, sel_stride, steps, rec, grp, kq_scale, n_head, part_m, part_l,
                       part_acc):
        wait_prior_grid()
        hg = cuda.blockIdx.x                # the head group: heads hg HPB ..
        sp = cuda.blockIdx.y
        n_split = cuda.gridDim.y
        q, sel, part_m, part_l, part_acc, n_raw, first, n_total, use_sel = A.step_token(
            cuda.blockIdx.z, q, sel, sel_stride, part_m, part_l, part_acc, n_split, n_head, HD, steps, rec, grp,
            ring)
        n_chunks = (n_total + CH - 1) // CH
        tid = cuda.threadIdx.x
        w = tid >> 5
        g = (tid & 31) >> 2                 # fragment row (A: head) / column (B: row or dim) of this lane
        tq = tid & 3                        # fragment k (A, B); accumulator columns 2 tq, 2 tq + 1
        h0 = hg * HPB
        d0 = w * DW                         # this warp's dims
        raw_w = raw.view(np.uint64)                     # rows are copied as 8-byte words
        comp_w = comp.view(np.uint64)
        rs_w = cuda.shared.array(RS_W, uint64)          # the chunk's rows, HDP values apart
        rs = rs_w.view(ROW_T)
        sp_s = cuda.shared.array(SP_N, float64)         # partial scores (warp, head, row)
        p_s = cuda.shared.array(P_N, float64)           # weights e^(s - m) (head, row), CHP apart
        run_m = cuda.shared.array(HPB, float64)
        run_l = cuda.shared.array(HPB, float64)
        alpha = cuda.shared.array(HPB, float64)
        tab_off = cuda.shared.array(TAB_N, int64)       # row tables of this chunk and the next
        tab_comp = cuda.shared.array(TAB_N, int32)
        qa = cuda.local.array(QA_N, float64)            # A fragments of the queries: (head tile, k-step)
        oacc = cuda.local.array(O_N, float64)           # accumulators: (head tile, dim tile, 2)
        sacc = cuda.local.array(S_N, float64)           # partial scores: (head tile, row tile, 2)
        pa = cuda.local.array(NHT, float64)
        stage = cuda.local.array(LOADS, uint64)         # chunk words on their way to shared memory
        rs_sc = g * HDP + d0 + tq           # rs index of this lane's score B fragment (row g, dim tq of a tile)
        rs_pv = tq * HDP + d0 + g           # ... of its weighted-sum B fragment (row tq, dim g)
        p_pv = g * CHP + tq                 # p_s index of its weighted-sum A fragment (head g, row tq)
        sp_w = (w * HPB + g) * CH + 2 * tq  # sp_s index of its partial scores (head g, rows 2 tq, 2 tq + 1)
        for ht in range(NHT):
            h = h0 + 8 * ht + g
            for kk in range(KQ):
                qa[ht * KQ + kk] = float64(q[uint64(h * HD + d0 + 4 * kk + tq)]) if h < n_head else _D0
        for i in range(O_N):
            oacc[i] = _D0
        if tid < HPB:
            run_m[tid] = _NEG_INF64
            run_l[tid] = _D0
        if tid < CH and sp < n_chunks:
            _row_entry(tab_off, tab_comp, tid, sp * CH + min(tid, n_total - sp * CH - 1), n_raw, first, ring,
                       use_sel, sel, WPR)
        cuda.syncthreads()
        if PF and sp < n_chunks:
            load_rows(stage, raw_w, comp_w, tab_off, tab_comp, 0, tid)
        it = 0
        for c in range(sp, n_chunks, n_split):
            tb = (it & 1) * CH              # this chunk's row table; the next chunk's is the other half
            n_rows = min(CH, n_total - c * CH)
            nxt = c + n_split
            # 1. the chunk's values into shared memory, the next chunk's row table (rows past the token's
            #    last repeat its last row: their weights are 0)
            if not PF:
                load_rows(stage, raw_w, comp_w, tab_off, tab_comp, tb, tid)
            store_rows(stage, rs_w, tid)
            if tid < CH and nxt < n_chunks:
                _row_entry(tab_off, tab_comp, CH - tb + tid, nxt * CH + min(tid, n_total - nxt * CH - 1), n_raw,
                           first, ring, use_sel, sel, WPR)
            cuda.syncthreads()
            if PF and nxt < n_chunks:       # in flight while the block computes this chunk
                load_rows(stage, raw_w, comp_w, tab_off, tab_comp, CH - tb, tid)
            # 2. partial scores over this warp's dims: S[head][row] += Q[head][d] R[row][d]
            for i in range(S_N):
                sacc[i] = _D0
            for kk in range(KQ):
                for rt in range(NRT):
                    b = float64(rs[uint64(rs_sc + 8 * rt * HDP + 4 * kk)])
                    for ht in range(NHT):
                        a = 2 * (ht * NRT + rt)
                        sacc[a], sacc[a + 1] = mma_f64(qa[ht * KQ + kk], b, sacc[a], sacc[a + 1])
            for ht in range(NHT):
                for rt in range(NRT):
                    a = 2 * (ht * NRT + rt)
                    sp_s[uint64(sp_w + 8 * ht * CH + 8 * rt)] = sacc[a]
                    sp_s[uint64(sp_w + 8 * ht * CH + 8 * rt + 1)] = sacc[a + 1]
            cuda.syncthreads()
            # 3. softmax step: thread (head hh, row rr), CH lanes a head
            for e0 in range(0, SMR * NT, NT):
                e = e0 + tid
                hh = min(e // CH, HPB - 1)  # entries past the last head compute the last one's, unwritten
                rr = e & (CH - 1)
                s = _D0
                for ww in range(NW):
                    s += sp_s[uint64((ww * HPB + hh) * CH + rr)]
                s = s * kq_scale if rr < n_rows else _NEG_INF64
                m_old = run_m[hh]
                m_new = max(m_old, warp_max(s, CH))
                p = float64(math.exp(s - m_new)) if s > _HALF_NEG_INF64 else _D0
                l_sum = warp_sum(p, CH)
                if e < HPB * CH:
                    p_s[uint64(hh * CHP + rr)] = p
                    if rr == 0:
                        A.running_softmax(run_m, run_l, alpha, hh, m_old, m_new, l_sum)
            cuda.syncthreads()
            # 4. weighted sum: O[head][d] = O[head][d] e^(m_old - m_new) + sum_row P[head][row] R[row][d]
            for ht in range(NHT):
                f = alpha[uint64(8 * ht + g)]
                for i in range(2 * NDT):
                    oacc[2 * ht * NDT + i] *= f
            for kr in range(NKR):
                for ht in range(NHT):
                    pa[ht] = p_s[uint64(p_pv + 8 * ht * CHP + 4 * kr)]
                for nd in range(NDT):
                    b = float64(rs[uint64(rs_pv + 4 * kr * HDP + 8 * nd)])
                    for ht in range(NHT):
                        a = 2 * (ht * NDT + nd)
                        oacc[a], oacc[a + 1] = mma_f64(pa[ht], b, oacc[a], oacc[a + 1])
            cuda.syncthreads()
            it += 1
        for ht in range(NHT):
            h = h0 + 8 * ht + g
            if h < n_head:
                o = (sp * n_head + h) * HD + d0 + 2 * tq
                for nd in range(NDT):
                    part_acc[uint64(o + 8 * nd)] = oacc[2 * (ht * NDT + nd)]
                    part_acc[uint64(o + 8 * nd + 1)] = oacc[2 * (ht * NDT + nd) + 1]
        if tid < HPB and h0 + tid < n_head:
            part_m[sp * n_head + h0 + tid] = run_m[tid]
            part_l[sp * n_head + h0 + tid] = run_l[tid]

    return partial_kernel


@implementation("attn.decode", "heads_mma", layout="rows f16|f32 (n, head_dim)", requires=Requirements(min_cc=(8, 0)),
                priority=10)
def attention_mma(q: Any, raw: Any, comp: Any | None, sinks: Any, sel: Any | None = None, *, out: Any, steps: Any,
                  rec: int = 0, grp: int = GROUP0, max_rows: int, rope: Any | None = None,
                  scratch: Any | None = None, mma: bool | None = None, hpb: int | None = None,
                  chunk: int | None = None, warps: int | None = None, splits: int | None = None,
                  prefetch: bool = True, min_blocks: int = 0, q8_0: Any | None = None, q8_0_row: int = 0,
                  stream: Any = 0) -> Any:
    """Attention of a step's queries on float64 MMAs (heads x rows tiles); ``attention_decode`` without them.

    Arguments, partials (``scratch``) and outputs as ``attention.attention_decode``.
    ``mma``: None takes the MMA kernel where ``has_f64_mma()``, True always (the
    simulator's twin in tests), False never.  ``hpb``/``chunk``/``warps``/``splits``/``prefetch``/``min_blocks``
    override the MMA kernel's geometry (:func:`mma_geometry`; tests and benchmarks).
    """
    n_head, head_dim = sinks.size, raw.shape[1]
    n_tok = q.size // (n_head * head_dim)
    if mma is None:
        mma = has_f64_mma()
    if not mma:
        return A.attention_decode(q, raw, comp, sinks, sel, out=out, steps=steps, rec=rec, grp=grp,
                                  max_rows=max_rows, rope=rope, scratch=scratch, q8_0=q8_0, q8_0_row=q8_0_row,
                                  stream=stream)
    if q.size % (n_head * head_dim) or head_dim % 32:
        raise ValueError(f"attn.decode: q has {q.size} values, not tokens of {n_head} x {head_dim} "
                         f"(head_dim % 32 == 0)")
    if comp is None:
        comp = raw
    if comp.dtype != raw.dtype or raw.dtype.name not in _ROW_TYPES:
        raise ValueError(f"attn.decode: raw ({raw.dtype}) and comp ({comp.dtype}) rows must both be F16 or F32")
    geo = mma_geometry(n_head, head_dim, max_rows, raw.dtype.itemsize, n_tok, hpb=hpb, chunk=chunk, warps=warps,
                       splits=splits, prefetch=prefetch, min_blocks=min_blocks)
    if scratch is None:
        scratch = A.alloc_attn_scratch(n_head, head_dim, stream, n_tok)
    n_split = A.scratch_splits(scratch, n_head, n_tok, geo.splits)
    kernel = _mma_kernel(geo.hpb, head_dim, geo.chunk, geo.warps, raw.dtype.name, geo.prefetch, geo.min_blocks)
    kq = np.float64(1.0 / math.sqrt(head_dim))    # 1/sqrt(d) in float64 (the contract's score scale)
    sel_arr = sel if sel is not None else L.placeholder(np.int32)
    sel_stride = sel.size // n_tok if sel is not None else 0
    L.launch(kernel, (L.cdiv(n_head, geo.hpb), n_split, n_tok), 32 * geo.warps, stream,
             L.flat(q), L.flat(raw), raw.shape[0], L.flat(comp), L.flat(sel_arr), sel_stride, steps, int(rec),
             int(grp), kq, n_head, scratch.part_m, scratch.part_l, scratch.part_acc)
    A.combine_splits(scratch, n_split, sinks, out=out, n_tok=n_tok, head_dim=head_dim, rope=rope, steps=steps,
                     rec=rec, q8_0=q8_0, q8_0_row=q8_0_row, stream=stream)
    return out
