"""Q8_0 x Q8_0 matrix products for batches of tokens on the integer tensor cores (the ``mmq`` strategy).

``Y = X W^T`` for ``n`` tokens, ``W`` a block-minor packed Q8_0 weight
(``ds4nb.quants.repack``: per row, 64-bit word ``j`` of block ``b`` at
``j * nb + b``, the fp16 scale of block ``b`` at ``b``) and ``X`` Q8_0
activations in the same layout (``act.quantize_q8_0``).

Tiling.  A thread block (4 warps) owns a tile of ``BM = 64`` weight rows by
``BN = 32`` tokens and walks ``K`` in stages of ``KB = 4`` Q8_0 blocks.  Per
stage it copies the tile's weight and activation words into shared memory
(consecutive threads read consecutive blocks of one row, 8 bytes each: whole
32-byte sectors) with their scales, from registers loaded while the previous
stage computed (each thread's loads of a stage are independent and in flight
together), then each warp multiplies its 16 rows by
the 32 tokens, one Q8_0 block (``K = 32``) at a time: one ``m16n8k32`` int8
MMA per 8 tokens gives the exact int32 dot products of that block, which the
lanes scale and add to float64 accumulators (16 per lane: 2 rows x 2 tokens
x 4 token tiles).  A shared-memory row is ``KB * 8 + 4`` int32: the 4 spare
words put the 8 rows a fragment load touches in 8 different banks.

Numerics (docs/model.md, "one rounding per value"): the same per-block terms
as ``warp8``, ``float64(dot) * (float64(d_w) * float64(d_x))``, summed in
float64 and rounded to float32 once: bit-identical to the oracle but for a
rare one-ulp difference, like every Q8_0 path.

Without integer MMA (the simulator, GPUs before sm_80) a lane computes the
same four dots of each block from shared memory with ``dp4a``: the same
integers, so the same results.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gguf.constants import GGMLQuantizationType as Q
from numba import cuda

from ds4nb.kernels import _launch as L
from ds4nb.kernels.activation import Q8_0Act
from ds4nb.kernels.intrinsics import (as_i32, device, dp4a, float32, float64, has_int8_mma, hi_i32, int32, mma_s8,
                                      uint64, wait_prior_grid)
from ds4nb.kernels.q8_0 import _check
from ds4nb.kernels.registry import Requirements, implementation
from ds4nb.quants.repack import PackedWeight, layout_name

WARPS = 4
BM = 16 * WARPS          # weight rows per thread block (16 per warp: the MMA's M)
BN = 32                  # tokens per thread block (4 MMA tiles of N = 8)
N_TILES = BN // 8
KB = 4                   # Q8_0 blocks per shared-memory stage
ROW_WORDS = KB * 8 + 4   # int32 per shared-memory row: KB blocks of 8 words, 4 words of bank padding
THREADS = 32 * WARPS
# shared and local array sizes (numba needs them as plain constants)
A_WORDS, B_WORDS, A_SCALES, B_SCALES = BM * ROW_WORDS, BN * ROW_WORDS, BM * KB, BN * KB
N_ACC = 4 * N_TILES      # float64 accumulators a lane holds
# loads a thread makes per stage: weight words, weight scales, activation words, activation scales
A_WORD_ITS, A_SCALE_ITS = BM * 4 * KB // THREADS, -(-BM * KB // THREADS)
B_WORD_ITS, B_SCALE_ITS = BN * 4 * KB // THREADS, -(-BN * KB // THREADS)

_D0 = np.float64(0.0)


@L.kernel_factory
def _make_mmq(nb: int, use_mma: bool):
    """The tiled kernel for rows of ``nb`` blocks; ``use_mma`` picks tensor cores or the dp4a path."""

    @device
    def load_stage(src, scales, line0, n_max, kb0, words, d, n_lines, word_its, scale_its, tid):
        """Read ``n_lines`` lines' (weight rows or tokens) words of blocks ``kb0 .. kb0 + KB`` and their scales
        into registers: a constant number of independent loads per thread, all in flight together.

        Consecutive threads read consecutive blocks of one line's word ``j``;
        lines past ``n_max`` and blocks past ``nb`` read as zero (zero words,
        zero scale: exact zeros in the sums).
        """
        for it in range(word_its):
            i = tid + it * THREADS
            line = i // (4 * KB)
            j = (i // KB) % 4
            gl = line0 + line
            gb = kb0 + i % KB
            v = uint64(0)
            if line < n_lines and gl < n_max and gb < nb:
                v = src[uint64(gl * 4 * nb + j * nb + gb)]
            words[it] = v
        for it in range(scale_its):
            i = tid + it * THREADS
            gl = line0 + i // KB
            gb = kb0 + i % KB
            v = float32(0.0)
            if i < n_lines * KB and gl < n_max and gb < nb:
                v = float32(scales[uint64(gl * nb + gb)])
            d[it] = v

    @device
    def store_stage(words, d, n_lines, word_its, scale_its, s_words, s_scale, tid):
        """The registers of :func:`load_stage` into shared memory: word ``j`` of block ``b`` of a line at int32
        ``b * 8 + 2j`` (low half) and ``+ 1`` (high half) of the line's padded row."""
        for it in range(word_its):
            i = tid + it * THREADS
            line = i // (4 * KB)
            if line < n_lines:
                at = line * ROW_WORDS + (i % KB) * 8 + 2 * ((i // KB) % 4)
                s_words[at] = as_i32(words[it])
                s_words[at + 1] = hi_i32(words[it])
        for it in range(scale_its):
            i = tid + it * THREADS
            if i < n_lines * KB:
                s_scale[i] = d[it]

    @device
    def dots_dp4a(sa, sb, ra, tb, b):
        """The four block dots a lane's MMA would give: rows ``ra``, ``ra + 8`` x tokens ``tb``, ``tb + 1``."""
        c0 = int32(0)
        c1 = int32(0)
        c2 = int32(0)
        c3 = int32(0)
        for w in range(8):
            a_lo = sa[ra * ROW_WORDS + b * 8 + w]
            a_hi = sa[(ra + 8) * ROW_WORDS + b * 8 + w]
            x0 = sb[tb * ROW_WORDS + b * 8 + w]
            x1 = sb[(tb + 1) * ROW_WORDS + b * 8 + w]
            c0 = dp4a(a_lo, x0, c0)
            c1 = dp4a(a_lo, x1, c1)
            c2 = dp4a(a_hi, x0, c2)
            c3 = dp4a(a_hi, x1, c3)
        return c0, c1, c2, c3

    @cuda.jit
    def kernel(qs, dm, n_rows, n_tok, xq, xd, out):
        wait_prior_grid()
        sa = cuda.shared.array(A_WORDS, np.int32)
        sb = cuda.shared.array(B_WORDS, np.int32)
        sda = cuda.shared.array(A_SCALES, np.float32)
        sdb = cuda.shared.array(B_SCALES, np.float32)
        tid = cuda.threadIdx.x
        warp = tid // 32
        lane = tid % 32
        g = lane // 4                    # the MMA fragments' "group" (row of A, column of B)
        t = lane % 4                     # and thread in the group (k quarter of A and B, column pair of D)
        r0 = cuda.blockIdx.x * BM
        t0 = cuda.blockIdx.y * BN
        ra = warp * 16 + g               # this lane's tile rows: ra and ra + 8
        acc = cuda.local.array(N_ACC, np.float64)
        for i in range(N_ACC):
            acc[i] = _D0
        # registers of the next stage: its global loads are in flight while the current stage computes
        wa = cuda.local.array(A_WORD_ITS, np.uint64)
        da = cuda.local.array(A_SCALE_ITS, np.float32)
        wb = cuda.local.array(B_WORD_ITS, np.uint64)
        db = cuda.local.array(B_SCALE_ITS, np.float32)
        load_stage(qs, dm, r0, n_rows, 0, wa, da, BM, A_WORD_ITS, A_SCALE_ITS, tid)
        load_stage(xq, xd, t0, n_tok, 0, wb, db, BN, B_WORD_ITS, B_SCALE_ITS, tid)
        for kb0 in range(0, nb, KB):
            store_stage(wa, da, BM, A_WORD_ITS, A_SCALE_ITS, sa, sda, tid)
            store_stage(wb, db, BN, B_WORD_ITS, B_SCALE_ITS, sb, sdb, tid)
            cuda.syncthreads()
            if kb0 + KB < nb:
                load_stage(qs, dm, r0, n_rows, kb0 + KB, wa, da, BM, A_WORD_ITS, A_SCALE_ITS, tid)
                load_stage(xq, xd, t0, n_tok, kb0 + KB, wb, db, BN, B_WORD_ITS, B_SCALE_ITS, tid)
            for b in range(KB):
                dw0 = float64(sda[ra * KB + b])
                dw1 = float64(sda[(ra + 8) * KB + b])
                if use_mma:
                    a0 = sa[ra * ROW_WORDS + b * 8 + t]
                    a1 = sa[(ra + 8) * ROW_WORDS + b * 8 + t]
                    a2 = sa[ra * ROW_WORDS + b * 8 + 4 + t]
                    a3 = sa[(ra + 8) * ROW_WORDS + b * 8 + 4 + t]
                for nt in range(N_TILES):
                    tb = nt * 8 + 2 * t          # this lane's D columns: tokens tb, tb + 1
                    if use_mma:
                        col = nt * 8 + g         # this lane's B column
                        b0 = sb[col * ROW_WORDS + b * 8 + t]
                        b1 = sb[col * ROW_WORDS + b * 8 + 4 + t]
                        c0, c1, c2, c3 = mma_s8((a0, a1, a2, a3), (b0, b1),
                                                (int32(0), int32(0), int32(0), int32(0)))
                    else:
                        c0, c1, c2, c3 = dots_dp4a(sa, sb, ra, tb, b)
                    dx0 = float64(sdb[tb * KB + b])
                    dx1 = float64(sdb[(tb + 1) * KB + b])
                    acc[4 * nt] += float64(c0) * (dw0 * dx0)
                    acc[4 * nt + 1] += float64(c1) * (dw0 * dx1)
                    acc[4 * nt + 2] += float64(c2) * (dw1 * dx0)
                    acc[4 * nt + 3] += float64(c3) * (dw1 * dx1)
            cuda.syncthreads()
        for nt in range(N_TILES):
            for i in range(4):
                row = r0 + ra + 8 * (i // 2)
                tok = t0 + nt * 8 + 2 * t + i % 2
                if row < n_rows and tok < n_tok:
                    out[uint64(tok * n_rows + row)] = float32(acc[4 * nt + i])   # the one rounding

    return kernel


@implementation("q8_0.matmul", "mmq", layout=layout_name(Q.Q8_0), priority=20,
                requires=Requirements(min_batch=2))
def q8_0_matmul_mmq(w: PackedWeight, x: Q8_0Act, *, out: Any, stream: Any = 0) -> Any:
    """Y = X W^T for n tokens: 64 x 32 tiles, int8 tensor-core MMA per Q8_0 block (dp4a without MMA)."""
    n_rows, nb, n_tok = _check(w, x)
    grid = (L.cdiv(n_rows, BM), L.cdiv(n_tok, BN))
    L.launch(_make_mmq(nb, has_int8_mma()), grid, THREADS, stream, w.qs, w.dm, n_rows, n_tok, x.qs, x.d,
             L.flat(out))
    return out
