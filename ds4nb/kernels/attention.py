"""Attention and the row kernels around it (docs/model.md steps 5, 7, 8, 11, 12).

Ops
---
``attn.q_norm_rope``
    Per-head unweighted RMSNorm of q, then RoPE on each head's tail
    (steps 5.4 and 7 fused; one block per (head, token)).
``attn.kv_store``
    The KV row of a token: ``rms(kv; attn_kv_a_norm)``, RoPE, FP8 (E4M3)
    round trip of the non-rotated dims in blocks of 64, F16 rounding, stored
    into row ``row`` of the window cache (steps 6-8, one block per token).
``attn.decode``
    The step's query tokens (one when decoding, a chunk when prefilling):
    ``n_head`` heads over each token's ``N_RAW`` window rows (read from the
    ring in position order) plus its visible compressed rows (the first
    ``VISIBLE``, or its own indexer selection), with the per-head sink logit
    in the denominator (step 11), optionally followed by the inverse RoPE of
    the output (step 12).  Each token reads only the rows its step record
    counts, so a chunk attends causally in one launch.

Row-kernel geometry ("pair per thread"): a block of ``max(32, head_dim/2)``
threads rounded to whole warps, thread ``p`` owning dims ``2p, 2p+1``.  A
64-dim FP8 block is then exactly one warp (32 pairs), so its amax is one
warp reduction; the rotary tail pairs are the last ``n_rot/2`` threads.

``split_heads8`` below is ``attn.decode`` on GPUs without float64 MMA (and
in the simulator); from sm_90 ``attention_mma.heads_mma`` takes every step.

Attention geometry (flash-decoding): grid ``(n_head / HPB, n_split, T)``,
256 threads (a prefill chunk has blocks enough with one split a token).  A block owns ``HPB`` heads (their queries in shared memory)
and walks chunks of ``CH`` rows (chunk ``c`` goes to split ``c mod n_split``):
each warp scores rows (lane ``l`` holds dims ``l + 32 j`` of the row, one
shuffle reduction per head), one warp per head turns the chunk's scores into
``exp(s - m)`` with a running max, and every thread accumulates
``HPB x (head_dim / 256)`` output dims in registers, rescaled when the max
grows.  A second kernel (one block per head) merges the splits with the sink:
``out = sum_s acc_s e^(m_s - M) / (e^(sink - M) + sum_s l_s e^(m_s - M))``.
Each KV row is read from memory once per head group (8 heads), not per head.
Rows may be F16 (the cache format: values are F16-rounded anyway) or F32.

Simulator geometry (the simulator pays for every thread and barrier): the
decode kernels use one-lane "warps" (``LANES = 1``: a thread scores a whole
row, no shuffles) and ``hpb`` threads; ``attn.q_norm_rope`` and the combine
step run one thread per row that walks every pair (``PAIRS``), in branches
that are constant-false on the GPU.  ``attn.kv_store`` keeps its warp-wide
FP8 blocks (32 threads).

Numerics (docs/model.md, "one rounding per value"): every float32 value the
oracle materialises is the float32 rounding of a float64 evaluation here too,
so outputs are bit-identical to the oracle except where two float64 evaluations
in different orders straddle a float32 rounding boundary (~1e-7 of values,
one ulp):

* the RMS norms (``q_norm_rope`` per head, unweighted; ``kv_store`` with its
  weight): sum of squares, ``ss / n + eps`` (``eps`` = float64(float32 eps)),
  square root and ``x * (1 / sqrt(...)) [* w]`` in float64, one rounding per
  value;
* RoPE (:func:`ds4nb.kernels.rope.rope_rotate`): the rotation of the float32
  normed value, in float64, one rounding;
* the FP8 (E4M3) round trip and F16 are exact functions of their float32
  inputs;
* decode attention: scores ``s_c = (q . row_c) * (1 / sqrt(d))`` with
  ``1 / sqrt(d)`` a float64, the running max, ``exp`` and every sum in
  float64 (the chunk scores and weights in shared memory, the register
  accumulators and the per-split ``part_m / part_l / part_acc`` scratch are
  float64), so nothing is rounded before the head output ``sum_c e^(s_c - m)
  row_c / (e^(sink - m) + sum_c e^(s_c - m))``, which is rounded to float32
  once; the inverse RoPE then rotates that float32 value (as the oracle's
  step 12 does).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from numba import cuda

from ds4nb.kernels import _launch as L
from ds4nb.kernels.activation import Q8_0_LANE_VALS, Q8_0Act, QK8_0, q8_0_lane_from
from ds4nb.kernels.f16_matvec import block_sum, group_max, group_sum
from ds4nb.kernels.intrinsics import SIMULATOR, device, float32, float64, rint, wait_prior_grid
from ds4nb.kernels.parity import CONTRACT, Case
from ds4nb.kernels.registry import OpSpec, implementation
from ds4nb.kernels.rope import RopeArgs, rope_args, rope_cos_sin, rope_rotate
from ds4nb.kernels.step import GROUP0, N_RAW, NF, POS, RAW_ROW, SELECT, VISIBLE, group_offset, records

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_D0 = np.float64(0.0)
_D1 = np.float64(1.0)
NEG_INF = np.float32(-1.0e30)       # the reference's "minus infinity" for masked scores
_HALF_NEG_INF = np.float32(-0.5e30)
_NEG_INF64 = np.float64(NEG_INF)
_HALF_NEG_INF64 = np.float64(_HALF_NEG_INF)
_E4M3_MAX = np.float32(448.0)
_E4M3_MIN_NORMAL = np.float32(2.0 ** -6)
_E4M3_SUB_STEP = np.float32(2.0 ** -9)
_FP8_AMAX_FLOOR = np.float32(1.0e-4)
FP8_BLOCK = 64
LANES = 1 if SIMULATOR else 32      # lanes of a warp-level reduction in the decode and q-norm kernels
PAIRS = 512 if SIMULATOR else 1     # pairs a thread takes in the one-thread-per-row simulator kernels

# ---------------------------------------------------------------------------
# Device helpers (also used by the compressor)
# ---------------------------------------------------------------------------


@device
def pow2_scale(amax, top):
    """2^ceil(log2f(amax / top)), log2 rounded to float32 once (as ops._pow2_scale)."""
    ratio = amax / top
    e = math.ceil(float32(math.log2(float64(ratio))))
    return float32(math.ldexp(_F1, int(e)))


@device
def e4m3_round(v):
    """Nearest E4M3FN value of v (|v| <= 448), ties to the even code (as ops.e4m3_round).

    Codes are consecutive multiples of the binade's step (2^-9 below 2^-6,
    else 2^(floor(log2 |v|) - 3)) and the code's parity is the multiple's
    parity, so round-half-even of ``|v| / step`` is the tie rule.
    """
    a = abs(v)
    if a < _E4M3_MIN_NORMAL:
        step = _E4M3_SUB_STEP
    else:
        _, e = math.frexp(a)
        step = float32(math.ldexp(_F1, int(e) - 4))
    q = min(float32(rint(a / step)) * step, _E4M3_MAX)
    return -q if v < _F0 else q


@device
def fp8_pair(y0, y1, active):
    """FP8 round trip of one pair of a 64-dim block that is exactly this warp's lanes.

    ``active``: this lane's pair belongs to the block (inactive lanes add 0 to
    the amax and return their values unchanged).  All lanes must call.
    """
    a = max(abs(y0), abs(y1)) if active else _F0
    amax = group_max(a, 32)
    if not active:
        return y0, y1
    scale = pow2_scale(max(amax, _FP8_AMAX_FLOOR), _E4M3_MAX)
    v0 = min(max(y0 / scale, -_E4M3_MAX), _E4M3_MAX)
    v1 = min(max(y1 / scale, -_E4M3_MAX), _E4M3_MAX)
    return e4m3_round(v0) * scale, e4m3_round(v1) * scale


@device
def f16_round(y):
    """float32 -> nearest float16 (ties to even) -> float32."""
    return float32(np.float16(y))


@device
def rms_inv(ss, n, eps):
    """``1 / sqrt(ss / n + eps)`` in float64 (``ss`` float64 sum of squares, ``eps`` float64(float32 eps))."""
    return _D1 / float64(math.sqrt(ss / float64(n) + eps))


@device
def rms_value(x, w, inv):
    """One weighted RMSNorm output ``float32(x * inv * w)`` (the oracle's order), in float64, rounded once."""
    return float32(float64(x) * inv * float64(w))


def eps64(eps: float) -> np.float64:
    """The contract's ``eps``: the float32 epsilon widened to float64 (as the oracle takes it)."""
    return np.float64(np.float32(eps))


def row_threads(head_dim: int) -> int:
    """Threads of a pair-per-thread row block: head_dim/2 rounded up to whole warps."""
    return max(32, L.cdiv(head_dim // 2, 32) * 32)


def pair_threads(head_dim: int) -> int:
    """Threads of the q-norm and combine row blocks: ``row_threads``, one in the simulator."""
    return 1 if SIMULATOR else row_threads(head_dim)


# ---------------------------------------------------------------------------
# attn.q_norm_rope
# ---------------------------------------------------------------------------


@device
def _q_norm_rope_pair(out, base, x0, x1, inv, p, valid, head_dim, do_rope, pos, n_rot, ts, fscale, ext, low,
                      denom, msc):
    y0 = float32(float64(x0) * inv)
    y1 = float32(float64(x1) * inv)
    k = p - (head_dim - n_rot) // 2
    if valid and do_rope and k >= 0:
        c, s = rope_cos_sin(k, pos, ts, fscale, ext, low, denom, msc)
        y0, y1 = rope_rotate(y0, y1, c, s, False)
    if valid:
        out[base] = y0
        out[base + 1] = y1


@cuda.jit
def _q_norm_rope_kernel(q, out, n_head, head_dim, eps, steps, rec, do_rope, n_rot, ts, fscale, ext, low, denom,
                        msc):
    wait_prior_grid()
    h = cuda.blockIdx.x
    t = cuda.blockIdx.y
    p = cuda.threadIdx.x
    pos = steps[rec + t * NF + POS]
    half = head_dim // 2
    valid = p < half
    base = (t * n_head + h) * head_dim + 2 * p
    x0 = _F0
    x1 = _F0
    if valid:
        x0 = q[base]
        x1 = q[base + 1]
    sq = float64(x0) * float64(x0) + float64(x1) * float64(x1)
    if PAIRS > 1:  # the simulator: this thread's further pairs (a constant-false branch on the GPU)
        for e in range(1, PAIRS):
            if p + e * cuda.blockDim.x >= half:
                break
            v0 = q[base + 2 * e * cuda.blockDim.x]
            v1 = q[base + 2 * e * cuda.blockDim.x + 1]
            sq += float64(v0) * float64(v0) + float64(v1) * float64(v1)
    red = cuda.shared.array(32, float64)
    ss = block_sum(sq, red, cuda.blockDim.x // LANES, _D0, LANES)
    inv = rms_inv(ss, head_dim, eps)
    _q_norm_rope_pair(out, base, x0, x1, inv, p, valid, head_dim, do_rope, pos, n_rot, ts, fscale, ext, low,
                      denom, msc)
    if PAIRS > 1:
        for e in range(1, PAIRS):
            if p + e * cuda.blockDim.x >= half:
                break
            b = base + 2 * e * cuda.blockDim.x
            _q_norm_rope_pair(out, b, q[b], q[b + 1], inv, p + e * cuda.blockDim.x, True, head_dim, do_rope,
                              pos, n_rot, ts, fscale, ext, low, denom, msc)


@implementation("attn.q_norm_rope", "pair_per_thread", layout="f32")
def q_norm_rope(q: Any, *, out: Any, n_head: int, head_dim: int, eps: float, rope: Any | None, steps: Any,
                rec: int = 0, stream: Any = 0) -> Any:
    """q (T, n_head*head_dim): per-head RMSNorm (no weight), then RoPE of each tail at token t's position.

    Token ``t``'s position is the ``POS`` of its step record ``steps[rec + t * NF:]``
    (``ds4nb.kernels.step``).  ``rope=None`` skips the rotation; ``out`` may be ``q``.
    """
    n_tok = q.size // (n_head * head_dim)
    ra = _rope(rope, head_dim)
    L.launch(_q_norm_rope_kernel, (n_head, n_tok), pair_threads(head_dim), stream,
             L.flat(q), L.flat(out), n_head, head_dim, eps64(eps), steps, int(rec), int(rope is not None), *ra)
    return out


def _rope(rope: Any | None, head_dim: int) -> RopeArgs:
    if rope is None:
        return RopeArgs(0, _F1, _F1, _F0, _F0, _F1, _F1)
    ra = rope if isinstance(rope, RopeArgs) else rope_args(rope)
    if ra.n_rot > head_dim or ra.n_rot % 2:
        raise ValueError(f"n_rot {ra.n_rot} does not fit head_dim {head_dim}")
    return ra


# ---------------------------------------------------------------------------
# attn.kv_store
# ---------------------------------------------------------------------------


@cuda.jit
def _kv_store_kernel(kv, w, eps, out, head_dim, steps, rec, n_rot, ts, fscale, ext, low, denom, msc):
    wait_prior_grid()
    t = cuda.blockIdx.x
    p = cuda.threadIdx.x
    pos = steps[rec + t * NF + POS]
    row = steps[rec + t * NF + RAW_ROW]
    half = head_dim // 2
    valid = p < half
    base = t * head_dim + 2 * p
    x0 = _F0
    x1 = _F0
    if valid:
        x0 = kv[base]
        x1 = kv[base + 1]
    red = cuda.shared.array(32, float64)
    ss = block_sum(float64(x0) * float64(x0) + float64(x1) * float64(x1), red, cuda.blockDim.x // 32, _D0, 32)
    inv = rms_inv(ss, head_dim, eps)
    y0 = _F0
    y1 = _F0
    if valid:
        y0 = rms_value(x0, w[2 * p], inv)
        y1 = rms_value(x1, w[2 * p + 1], inv)
    k = p - (head_dim - n_rot) // 2
    if valid and k >= 0:
        c, s = rope_cos_sin(k, pos, ts, fscale, ext, low, denom, msc)
        y0, y1 = rope_rotate(y0, y1, c, s, False)
    # FP8 blocks of 64 dims = 32 pairs = this warp (a trailing partial block is its own block)
    y0, y1 = fp8_pair(y0, y1, valid and k < 0)
    if valid:
        ob = row * head_dim + 2 * p
        out[ob] = f16_round(y0)
        out[ob + 1] = f16_round(y1)


@implementation("attn.kv_store", "pair_per_thread", layout="cache f16|f32 (cap, head_dim)")
def kv_store(kv: Any, weight: Any, *, out: Any, rope: Any, eps: float, steps: Any, rec: int = 0,
             stream: Any = 0) -> Any:
    """kv (T, head_dim) -> the window cache ``out (cap, head_dim)``, token t into row ``RAW_ROW`` of its record.

    rms(kv; weight) -> RoPE at the record's ``POS`` -> FP8 round trip of the
    first head_dim - n_rot dims -> F16 rounding.  ``out`` may be F16 or F32.
    """
    head_dim = out.shape[1]
    ra = _rope(rope, head_dim)
    n_tok = kv.size // head_dim
    L.launch(_kv_store_kernel, n_tok, row_threads(head_dim), stream,
             L.flat(kv), L.flat(weight), eps64(eps), L.flat(out), head_dim, steps, int(rec), *ra)
    return out


# ---------------------------------------------------------------------------
# attn.decode
# ---------------------------------------------------------------------------

@device
def step_token(t, q, sel, sel_stride, part_m, part_l, part_acc, n_split, n_head, head_dim, steps, rec, grp, ring):
    """Token ``t`` of an ``attn.decode`` step: its query, selection and partials (slices of the step's arrays),
    and from its step record (``ds4nb.kernels.step``) its window rows, the ring row of the window's oldest
    position (+ ``ring``), all its rows (window + visible compressed) and whether the indexer's selection
    applies."""
    rec += t * NF
    n_raw = steps[rec + N_RAW]
    return (q[t * n_head * head_dim:], sel[t * sel_stride:], part_m[t * n_split * n_head:],
            part_l[t * n_split * n_head:], part_acc[t * n_split * n_head * head_dim:], n_raw,
            steps[rec + RAW_ROW] + ring - n_raw + 1, n_raw + steps[rec + grp + VISIBLE],
            steps[rec + grp + SELECT] != 0)


@device
def running_softmax(run_m, run_l, alpha, h, m_old, m_new, l_chunk):
    """Head ``h``'s running softmax after a chunk of rows whose ``e^(s - m_new)`` sum to ``l_chunk``: the
    accumulators' rescale factor ``alpha[h] = e^(m_old - m_new)``, the running sum and max (float64)."""
    a = float64(math.exp(m_old - m_new))
    alpha[h] = a
    run_l[h] = run_l[h] * a + l_chunk
    run_m[h] = m_new


@device
def visible_row(r, n_raw, first, ring, sel, use_sel, hd):
    """(in comp, offset) of a token's visible row ``r``: window rows first (ring rows from ``first``), then
    compressed rows (the indexer's selection ``sel`` when ``use_sel``)."""
    if r >= n_raw:
        c = r - n_raw
        if use_sel:
            c = sel[c]
        return True, c * hd
    return False, ((first + r) % ring) * hd


ATTN_THREADS = 256
SHARED_BYTES = 48 * 1024            # static shared memory of a block
MAX_SPLITS = 32
FIRST_SPLITS = 8    # splits whose partials a combine thread loads before their factors are known
TARGET_BLOCKS = 160
@L.kernel_factory
def _partial_kernel(hpb: int, head_dim: int, ch: int, nt: int) -> Any:
    HPB, HD, CH, NT = hpb, head_dim, ch, nt
    NW = NT // LANES
    DPL = HD // LANES               # dims per lane when a warp scores one row
    DPT = max(1, L.cdiv(HD, NT))    # dims per thread in the weighted sum
    RPL = L.cdiv(CH, LANES)         # chunk rows per lane in the softmax step
    HPB_W = L.cdiv(HPB, NW) * NW    # heads padded to whole rounds of warps
    CH_W = L.cdiv(CH, NW) * NW      # chunk rows padded likewise
    QS, SCN, ACCN = HPB * HD, HPB * CH, HPB * DPT   # array sizes must be single constants
    # q widened to float64 once when it fits the 48 KiB of static shared memory next to the float64
    # scores (the default 8 heads x 512 dims: 35 KiB), else kept float32 and widened at each use
    QT = float64 if 8 * (QS + SCN + 3 * HPB) <= SHARED_BYTES else float32

    @cuda.jit
    def partial_kernel(q, raw, ring, comp, sel, sel_stride, steps, rec, grp, kq_scale, n_head, part_m, part_l,
                       part_acc):
        wait_prior_grid()
        g = cuda.blockIdx.x
        sp = cuda.blockIdx.y
        n_split = cuda.gridDim.y
        q, sel, part_m, part_l, part_acc, n_raw, first, n_total, use_sel = step_token(
            cuda.blockIdx.z, q, sel, sel_stride, part_m, part_l, part_acc, n_split, n_head, HD, steps, rec, grp,
            ring)
        tid = cuda.threadIdx.x
        lane = tid % LANES
        warp = tid // LANES
        h0 = g * HPB
        n_chunks = (n_total + CH - 1) // CH
        q_s = cuda.shared.array(QS, QT)
        sc = cuda.shared.array(SCN, float64)
        run_m = cuda.shared.array(HPB, float64)
        run_l = cuda.shared.array(HPB, float64)
        alpha = cuda.shared.array(HPB, float64)
        for i in range(tid, HPB * HD, NT):
            q_s[i] = q[h0 * HD + i]
        if tid < HPB:
            run_m[tid] = _NEG_INF64
            run_l[tid] = _D0
        acc = cuda.local.array(ACCN, float64)
        for i in range(HPB * DPT):
            acc[i] = _D0
        vals = cuda.local.array(DPL, float64)
        cuda.syncthreads()
        for chunk in range(sp, n_chunks, n_split):
            r0 = chunk * CH
            # 1. scores: warp per row, lane holds dims lane + 32 j
            for rr in range(warp, CH_W, NW):
                r = r0 + rr
                valid = rr < CH and r < n_total
                if valid:
                    in_comp, b = visible_row(r, n_raw, first, ring, sel, use_sel, HD)
                    src = comp if in_comp else raw
                    for j in range(DPL):
                        vals[j] = float64(src[b + lane + LANES * j])
                else:
                    for j in range(DPL):
                        vals[j] = _D0
                for h in range(HPB):
                    d = _D0
                    for j in range(DPL):
                        d += vals[j] * float64(q_s[h * HD + lane + LANES * j])   # exact product
                    d = group_sum(d, LANES)
                    if lane == 0 and rr < CH:
                        sc[h * CH + rr] = d * kq_scale if valid else _NEG_INF64
            cuda.syncthreads()
            # 2. softmax step: warp per head, running max and sum
            for hh in range(warp, HPB_W, NW):
                h = min(hh, HPB - 1)
                mx = _NEG_INF64
                for k in range(RPL):
                    rr = lane + LANES * k
                    if rr < CH:
                        mx = max(mx, sc[h * CH + rr])
                mx = group_max(mx, LANES)
                m_old = run_m[h]
                m_new = max(m_old, mx)
                lsum = _D0
                for k in range(RPL):
                    rr = lane + LANES * k
                    if rr < CH:
                        s = sc[h * CH + rr]
                        e = float64(math.exp(s - m_new)) if s > _HALF_NEG_INF64 else _D0
                        if hh < HPB:
                            sc[h * CH + rr] = e
                        lsum += e
                lsum = group_sum(lsum, LANES)
                if lane == 0 and hh < HPB:
                    running_softmax(run_m, run_l, alpha, h, m_old, m_new, lsum)
            cuda.syncthreads()
            # 3. weighted sum of the chunk's rows into the register accumulators
            for h in range(HPB):
                a = alpha[h]
                for j in range(DPT):
                    acc[h * DPT + j] *= a
            n_rows = min(CH, n_total - r0)
            for rr in range(n_rows):
                in_comp, b = visible_row(r0 + rr, n_raw, first, ring, sel, use_sel, HD)
                src = comp if in_comp else raw
                for j in range(DPT):
                    d = tid + NT * j
                    if d < HD:
                        v = float64(src[b + d])
                        for h in range(HPB):
                            acc[h * DPT + j] += sc[h * CH + rr] * v
            cuda.syncthreads()
        for h in range(HPB):
            o = (sp * n_head + h0 + h)
            for j in range(DPT):
                d = tid + NT * j
                if d < HD:
                    part_acc[o * HD + d] = acc[h * DPT + j]
        if tid < HPB:
            part_m[sp * n_head + h0 + tid] = run_m[tid]
            part_l[sp * n_head + h0 + tid] = run_l[tid]

    return partial_kernel


@L.kernel_factory
def _combine_kernel(head_dim: int) -> Any:
    """The merge of ``attn.decode``'s per-split partials (one block per (head, token)), for ``head_dim``."""
    HD = head_dim

    @device
    def split_factors(part_m, part_l, n_split, n_head, h, sink, fs):
        """``fs[s] = e^(m_s - M)`` with ``M = max(sink, m_s)``; returns ``den = e^(sink - M) + sum_s l_s fs[s]``
        (added in split order).  GPU: warp 0 computes the factors, lane s loading split s's m and l together,
        lane 0 adds; every thread calls."""
        tid = cuda.threadIdx.x
        den_s = cuda.shared.array(1, float64)
        if SIMULATOR:          # one thread a block (a constant-false branch on the GPU)
            mx = sink
            for s in range(n_split):
                mx = max(mx, part_m[s * n_head + h])
            den = float64(math.exp(sink - mx))
            for s in range(n_split):
                f = float64(math.exp(part_m[s * n_head + h] - mx))
                fs[s] = f
                den += part_l[s * n_head + h] * f
            return den
        ls = cuda.shared.array(MAX_SPLITS, float64)
        if tid < 32:
            m = _NEG_INF64
            if tid < n_split:
                m = part_m[tid * n_head + h]
                ls[tid] = part_l[tid * n_head + h]
            mx = max(group_max(m, 32), sink)
            if tid < n_split:
                fs[tid] = float64(math.exp(m - mx))
            cuda.syncwarp()
            if tid == 0:
                den = float64(math.exp(sink - mx))
                for s in range(n_split):
                    den += ls[s] * fs[s]
                den_s[0] = den
        cuda.syncthreads()
        return den_s[0]

    @device
    def load_first(part_acc, n_split, n_head, p, u, v):
        """Pair ``p``'s values in the first ``FIRST_SPLITS`` splits, loaded before their factors are known."""
        b = cuda.blockIdx.x * HD + 2 * p
        step = n_head * HD
        for s in range(FIRST_SPLITS):
            if s < n_split:
                u[s] = part_acc[b + s * step]
                v[s] = part_acc[b + s * step + 1]

    @device
    def combine_pair(part_acc, n_split, n_head, fs, den, out, do_rope, pos, n_rot, ts, fscale, ext, low, denom,
                     msc, p, u, v, ybuf):
        h = cuda.blockIdx.x
        a0 = _D0
        a1 = _D0
        for s in range(FIRST_SPLITS):   # added in split order, as the splits past them
            if s < n_split:
                a0 += u[s] * fs[s]
                a1 += v[s] * fs[s]
        b = h * HD + 2 * p
        step = n_head * HD
        s = FIRST_SPLITS
        while s + 4 <= n_split:         # four splits' loads in flight
            u0 = part_acc[b + s * step]
            v0 = part_acc[b + s * step + 1]
            u1 = part_acc[b + (s + 1) * step]
            v1 = part_acc[b + (s + 1) * step + 1]
            u2 = part_acc[b + (s + 2) * step]
            v2 = part_acc[b + (s + 2) * step + 1]
            u3 = part_acc[b + (s + 3) * step]
            v3 = part_acc[b + (s + 3) * step + 1]
            a0 += u0 * fs[s]
            a1 += v0 * fs[s]
            a0 += u1 * fs[s + 1]
            a1 += v1 * fs[s + 1]
            a0 += u2 * fs[s + 2]
            a1 += v2 * fs[s + 2]
            a0 += u3 * fs[s + 3]
            a1 += v3 * fs[s + 3]
            s += 4
        while s < n_split:
            a0 += part_acc[b + s * step] * fs[s]
            a1 += part_acc[b + s * step + 1] * fs[s]
            s += 1
        y0 = float32(a0 / den)      # the head output: the one rounding of step 11
        y1 = float32(a1 / den)
        k = p - (HD - n_rot) // 2
        if do_rope and k >= 0:
            c, s_ = rope_cos_sin(k, pos, ts, fscale, ext, low, denom, msc)
            y0, y1 = rope_rotate(y0, y1, c, s_, True)
        out[h * HD + 2 * p] = y0
        out[h * HD + 2 * p + 1] = y1
        ybuf[2 * p] = y0
        ybuf[2 * p + 1] = y1

    @device
    def head_q8_0(ybuf, t, n_head, xq, xd, q8_row):
        """The head's outputs (``ybuf``) as Q8_0 blocks of rows of ``q8_row`` values (the flat (token, head, dim)
        index split into rows), ``Q8_0_LANE_VALS`` consecutive values a thread.  Every thread of the block runs
        every round: the 4 lanes of a block share its amax by shuffles."""
        units = HD // Q8_0_LANE_VALS
        i = cuda.threadIdx.x
        while i - cuda.threadIdx.x < units:
            f = (t * n_head + cuda.blockIdx.x) * HD + i * Q8_0_LANE_VALS
            row = f // q8_row
            c = f - row * q8_row
            q8_0_lane_from(ybuf, i * Q8_0_LANE_VALS, i < units, xq, xd, row, q8_row // QK8_0, c // QK8_0,
                           (c % QK8_0) // 8)
            i += cuda.blockDim.x

    @cuda.jit
    def combine_kernel(part_m, part_l, part_acc, n_split, n_head, sinks, out, do_rope, steps, rec,
                       n_rot, ts, fscale, ext, low, denom, msc, xq, xd, q8_row):
        wait_prior_grid()
        t = cuda.blockIdx.y                 # the step's token t
        part_m = part_m[t * n_split * n_head:]
        part_l = part_l[t * n_split * n_head:]
        part_acc = part_acc[t * n_split * n_head * HD:]
        out = out[t * n_head * HD:]
        pos = steps[rec + t * NF + POS]
        h = cuda.blockIdx.x
        p = cuda.threadIdx.x
        fs = cuda.shared.array(MAX_SPLITS, float64)
        ybuf = cuda.shared.array(HD, float32)
        u = cuda.local.array(FIRST_SPLITS, float64)
        v = cuda.local.array(FIRST_SPLITS, float64)
        if 2 * p < HD:
            load_first(part_acc, n_split, n_head, p, u, v)
        den = split_factors(part_m, part_l, n_split, n_head, h, float64(sinks[h]), fs)
        if 2 * p < HD:
            combine_pair(part_acc, n_split, n_head, fs, den, out, do_rope, pos, n_rot, ts, fscale, ext, low, denom,
                         msc, p, u, v, ybuf)
        if PAIRS > 1:  # the simulator: this thread's further pairs (a constant-false branch on the GPU)
            for e in range(1, PAIRS):
                if 2 * (p + e * cuda.blockDim.x) >= HD:
                    break
                load_first(part_acc, n_split, n_head, p + e * cuda.blockDim.x, u, v)
                combine_pair(part_acc, n_split, n_head, fs, den, out, do_rope, pos, n_rot, ts, fscale, ext, low,
                             denom, msc, p + e * cuda.blockDim.x, u, v, ybuf)
        if q8_row:                          # the same for every thread of the block
            cuda.syncthreads()
            head_q8_0(ybuf, t, n_head, xq, xd, q8_row)

    return combine_kernel


class AttnScratch(NamedTuple):
    """Per-split partial results of ``attn.decode`` (float64: nothing is rounded before the merge)."""

    part_m: Any     # f64 (rows, n_head): running max of the split's scores (a row per token and split)
    part_l: Any     # f64 (rows, n_head): sum of e^(s - m)
    part_acc: Any   # f64 (rows, n_head, head_dim): sum of e^(s - m) row


def alloc_attn_scratch(n_head: int, head_dim: int, stream: Any = 0, tokens: int = 1) -> AttnScratch:
    """Partials for a decode step's ``MAX_SPLITS`` splits, or one split per token of a ``tokens``-token step."""
    rows = max(MAX_SPLITS, tokens)
    return AttnScratch(L.device_array(rows * n_head, np.float64, stream),
                       L.device_array(rows * n_head, np.float64, stream),
                       L.device_array(rows * n_head * head_dim, np.float64, stream))


def heads_per_block(n_head: int) -> int:
    for hpb in (8, 4, 2, 1):
        if n_head % hpb == 0:
            return hpb
    return 1


def attn_geometry(n_head: int, head_dim: int, n_total: int, hpb: int | None = None, chunk: int = 32,
                  splits: int | None = None, tokens: int = 1) -> tuple[int, int, int, int]:
    """(heads per block, chunk rows, threads, splits) for one attention launch over ``tokens`` queries.

    Splits: enough blocks for ~1.2 waves on 132 SMs (the simulator: 1 unless
    forced), never more than there are chunks or ``MAX_SPLITS``; a step of
    many tokens has blocks enough with one split each.
    """
    hpb = hpb or heads_per_block(n_head)
    nt = ATTN_THREADS if head_dim >= ATTN_THREADS else max(64, head_dim)
    if SIMULATOR:
        nt = hpb        # one-lane warps; tid < hpb threads keep the per-head state
    n_chunks = max(1, L.cdiv(n_total, chunk))
    if splits is None:
        splits = 1 if SIMULATOR else max(1, TARGET_BLOCKS // (tokens * n_head // hpb))
    return hpb, chunk, nt, max(1, min(n_chunks, splits, MAX_SPLITS))


@implementation("attn.decode", "split_heads8", layout="rows f16|f32 (n, head_dim)")
def attention_decode(q: Any, raw: Any, comp: Any | None, sinks: Any, sel: Any | None = None, *, out: Any,
                     steps: Any, rec: int = 0, grp: int = GROUP0, max_rows: int, rope: Any | None = None,
                     scratch: AttnScratch | None = None, hpb: int | None = None, chunk: int = 32,
                     splits: int | None = None, q8_0: Q8_0Act | None = None, q8_0_row: int = 0,
                     stream: Any = 0) -> Any:
    """Attention of the step's queries q (T, n_head, head_dim) over their window rows and compressed rows.

    Token ``t``'s step record (``steps[rec + t * NF:]``, ``ds4nb.kernels.step``)
    says which: the ``N_RAW`` window rows of positions up to its own (ring rows
    ``(RAW_ROW - N_RAW + 1 ..  RAW_ROW) mod ring``, ``ring = raw.shape[0]``),
    then ``VISIBLE`` compressed rows of compression group ``grp`` (a field
    offset, ``group_offset(g)``): ``comp[sel[t, i]]`` while the group's
    ``SELECT`` is set (the indexer top-k; ``sel`` (T, k)), else
    ``comp[0:VISIBLE]``.  A prefill chunk attends causally in one launch: its
    window rows are all stored first (the ring holds ``n_swa + T - 1`` rows)
    and each token reads only the rows its record counts.  ``max_rows`` bounds ``N_RAW + VISIBLE`` over the
    session and fixes the launch geometry (blocks past the token's rows exit
    at once).  ``sinks`` f32 (n_head,).  ``rope`` given: the output tails are
    rotated back by the angle of ``POS`` (step 12).  ``raw`` and ``comp`` must
    share a dtype (F16 or F32).  ``hpb``/``chunk``/``splits`` override the
    geometry (heads per block, rows per chunk, row splits) for tests and
    benchmarks.  ``q8_0`` given: the outputs' Q8_0 blocks too, as
    ``act.quantize_q8_0`` of ``out`` seen as rows of ``q8_0_row`` values (the
    grouped output projection's activation).
    """
    n_head, head_dim = sinks.size, raw.shape[1]
    if q.size % (n_head * head_dim) or head_dim % 32:
        raise ValueError(f"attn.decode: q has {q.size} values, not tokens of {n_head} x {head_dim} "
                         f"(head_dim % 32 == 0)")
    if comp is None:
        comp = raw
    if comp.dtype != raw.dtype:
        raise ValueError("attn.decode: raw and comp rows must have the same dtype")
    n_tok = q.size // (n_head * head_dim)
    hpb, ch, nt, n_split = attn_geometry(n_head, head_dim, max_rows, hpb, chunk, splits, n_tok)
    if scratch is None:
        scratch = alloc_attn_scratch(n_head, head_dim, stream, n_tok)
    n_split = scratch_splits(scratch, n_head, n_tok, n_split)
    kq = np.float64(1.0 / math.sqrt(head_dim))    # 1/sqrt(d) in float64 (the contract's score scale)
    sel_arr = sel if sel is not None else L.placeholder(np.int32)
    sel_stride = sel.size // n_tok if sel is not None else 0
    L.launch(_partial_kernel(hpb, head_dim, ch, nt), (n_head // hpb, n_split, n_tok), nt, stream,
             L.flat(q), L.flat(raw), raw.shape[0], L.flat(comp), L.flat(sel_arr), sel_stride, steps, int(rec),
             int(grp), kq, n_head, scratch.part_m, scratch.part_l, scratch.part_acc)
    combine_splits(scratch, n_split, sinks, out=out, n_tok=n_tok, head_dim=head_dim, rope=rope, steps=steps,
                   rec=rec, q8_0=q8_0, q8_0_row=q8_0_row, stream=stream)
    return out


def scratch_splits(scratch: AttnScratch, n_head: int, n_tok: int, n_split: int) -> int:
    """``n_split`` capped by the (token, split) partials ``scratch`` holds for ``n_tok`` tokens."""
    n_split = min(n_split, scratch.part_m.size // (n_head * n_tok))
    if n_split < 1:
        raise ValueError(f"attn.decode: the scratch holds partials for {scratch.part_m.size // n_head} "
                         f"(token, split) pairs, not {n_tok} tokens")
    return n_split


def combine_splits(scratch: AttnScratch, n_split: int, sinks: Any, *, out: Any, n_tok: int, head_dim: int,
                   rope: Any | None, steps: Any, rec: int = 0, q8_0: Q8_0Act | None = None, q8_0_row: int = 0,
                   stream: Any = 0) -> None:
    """The second kernel of ``attn.decode``: each (head, token)'s ``n_split`` partials merged with the sink,
    divided and rounded once into ``out``, then the inverse RoPE of the tail when ``rope`` is given; with
    ``q8_0``, out's Q8_0 blocks as rows of ``q8_0_row`` values."""
    n_head = sinks.size
    if q8_0 is None:
        xq, xd, q8_0_row = L.placeholder(np.uint64), L.placeholder(np.float32), 0
    elif q8_0_row <= 0 or q8_0_row % QK8_0 or (n_tok * n_head * head_dim) % q8_0_row \
            or q8_0.d.size < n_tok * n_head * head_dim // QK8_0:
        raise ValueError(f"attn.decode: a Q8_0 output needs rows of whole 32-value blocks that tile the "
                         f"{n_tok} x {n_head} x {head_dim} outputs, and room for them (q8_0_row={q8_0_row})")
    else:
        xq, xd = q8_0.qs, q8_0.d
    L.launch(_combine_kernel(head_dim), (n_head, n_tok), pair_threads(head_dim), stream,
             scratch.part_m, scratch.part_l, scratch.part_acc, n_split, n_head, L.flat(sinks), L.flat(out),
             int(rope is not None), steps, int(rec), *_rope(rope, head_dim), xq, xd, int(q8_0_row))


# ---------------------------------------------------------------------------
# Parity cases
# ---------------------------------------------------------------------------


def _case_q(rng: np.random.Generator, scale: str) -> Case:
    from ds4nb.kernels.rope import make_test_rope
    from ds4nb.reference import ops

    n_tok, n_head, head_dim, n_rot = (2, 4, 64, 16) if scale == "tiny" else (1, 64, 512, 64)
    rope = make_test_rope(n_rot, bool(rng.integers(0, 2)))
    pos = int(rng.integers(0, 100000))
    q = (rng.standard_normal((n_tok, n_head * head_dim)) * rng.uniform(0.1, 10)).astype(np.float32)
    ref = np.stack([ops.apply_rope_tail(ops.head_rms_norm(q[t], n_head, head_dim, 1e-6).reshape(n_head, head_dim),
                                        rope, pos + t).reshape(-1) for t in range(n_tok)])
    out = L.device_array(q.size, np.float32)
    return Case((cuda.to_device(q),), out, (ref.reshape(-1),), (CONTRACT,),
                kwargs=dict(n_head=n_head, head_dim=head_dim, eps=1e-6, rope=rope,
                            steps=cuda.to_device(records(pos, n_tok))),
                info={"shape": (n_tok, n_head, head_dim), "pos": pos})


def kv_store_reference(kv: np.ndarray, weight: np.ndarray, rope: Any, pos: int, eps: float,
                       n_rot: int) -> np.ndarray:
    """The oracle's window row: rms -> RoPE -> FP8 -> F16 (docs/model.md steps 6-8)."""
    from ds4nb.reference import ops

    rows = []
    for t in range(kv.shape[0]):
        r = ops.rms_norm(kv[t], weight, eps)
        r = ops.apply_rope_tail(r, rope, pos + t)
        rows.append(ops.f16_round(ops.fp8_kv_round(r, n_rot)))
    return np.stack(rows)


def _case_kv(rng: np.random.Generator, scale: str) -> Case:
    from ds4nb.kernels.rope import make_test_rope

    n_tok, head_dim, n_rot = (2, 64, 16) if scale == "tiny" else (1, 512, 64)
    rope = make_test_rope(n_rot, bool(rng.integers(0, 2)))
    pos = int(rng.integers(0, 100000))
    kv = (rng.standard_normal((n_tok, head_dim)) * rng.uniform(0.01, 100)).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(head_dim)).astype(np.float32)
    ref = np.empty((n_tok, head_dim), np.float32)    # a ring of n_tok rows: token t lands in (pos + t) % n_tok
    ref[(pos + np.arange(n_tok)) % n_tok] = kv_store_reference(kv, w, rope, pos, 1e-6, n_rot)
    out = L.device_array((n_tok, head_dim), np.float32)
    return Case((cuda.to_device(kv), cuda.to_device(w)), out, (ref,), (CONTRACT,),
                kwargs=dict(rope=rope, eps=1e-6, steps=cuda.to_device(records(pos, n_tok, n_swa=n_tok))),
                info={"shape": (n_tok, head_dim), "pos": pos})


def _case_decode(rng: np.random.Generator, scale: str) -> Case:
    """A step of T tokens attending causally: window rows in a ring of ``n_swa + T - 1``, compressed rows
    (ratio 4) selected per token by its own top-k once there are more than k."""
    from ds4nb.kernels.rope import make_test_rope
    from ds4nb.reference import ops

    if scale == "tiny":
        n_head, head_dim, n_rot, n_swa, n_tok, top = 4, 64, 16, 8, 3, 2
        pos0 = int(rng.integers(4, 40))
    else:
        n_head, head_dim, n_rot, n_swa, n_tok, top = 64, 512, 64, 128, 4, 512
        pos0 = int(rng.integers(2100, 4000))
    ratio, ring = 4, n_swa + n_tok - 1
    steps = records(pos0, n_tok, n_swa, [(ratio, top)], ring=ring).reshape(n_tok, NF)
    grp = group_offset(1)
    n_comp = int(steps[-1, grp + 1])                        # ROWS of the last token: every row any token sees
    raw = ops.f16_round(rng.standard_normal((ring, head_dim))).astype(np.float32)
    comp = ops.f16_round(rng.standard_normal((max(n_comp, 1), head_dim))).astype(np.float32)
    q = (rng.standard_normal((n_tok, n_head, head_dim)) * 2).astype(np.float32)
    sinks = (0.5 * rng.standard_normal(n_head)).astype(np.float32)
    rope = make_test_rope(n_rot, True)
    sel = np.zeros((n_tok, top), np.int32)
    ref = np.empty((n_tok, n_head, head_dim), np.float32)
    for t in range(n_tok):
        pos, n_raw, rows, k = (int(steps[t, f]) for f in (POS, N_RAW, grp + 1, grp + SELECT))
        window = raw[(pos - n_raw + 1 + np.arange(n_raw)) % ring]
        if k:
            sel[t] = np.sort(rng.choice(rows, k, replace=False))
            seen = comp[sel[t]]
        else:
            seen = comp[:rows]
        out_t = ops.attention_with_sinks(q[t], np.concatenate([window, seen]), sinks, np.ones(n_raw + len(seen), bool))
        ref[t] = ops.apply_rope_tail(out_t, rope, pos, inverse=True)
    out = L.device_array(q.size, np.float32)
    return Case((cuda.to_device(q), cuda.to_device(raw.astype(np.float16)), cuda.to_device(comp.astype(np.float16)),
                 cuda.to_device(sinks), cuda.to_device(sel)),
                out, (ref.reshape(-1),), (CONTRACT,),
                kwargs=dict(rope=rope, steps=cuda.to_device(steps.reshape(-1)), grp=grp, max_rows=n_swa + top),
                info={"shape": (n_tok, n_head, head_dim), "pos": pos0})


OPS = [
    OpSpec("attn.q_norm_rope", "per-head RMSNorm of q (no weight) + RoPE of each head's tail",
           "(q f32 (T, n_head*head_dim), *, out, n_head, head_dim, eps, rope, steps, rec=0, stream)",
           "ops.head_rms_norm + ops.apply_rope_tail", 1e-6, _case_q),  # CONTRACT (rms and rotation rounded once)
    OpSpec("attn.kv_store", "KV row: rms(kv; w), RoPE, FP8 round trip of the non-rotated dims, F16, into the "
           "window cache",
           "(kv f32 (T, head_dim), weight f32 (head_dim,), *, out f16|f32 (cap, head_dim), rope, eps, steps, "
           "rec=0, stream)",
           "ops.rms_norm + ops.apply_rope_tail + ops.fp8_kv_round + ops.f16_round",
           # CONTRACT: rms and rotation rounded once like the oracle, FP8/F16 exact functions of those; the
           # tolerance only applies to non-contract callers (a rare 1-ulp difference before FP8 can flip one
           # E4M3 rounding, 1/16 of a value in a 64-block)
           2e-3, _case_kv),
    OpSpec("attn.decode", "attention with sinks of a step's tokens over their window + (selected) compressed "
           "rows, causal within the step, optional inverse RoPE",
           "(q f32 (T, n_head, head_dim), raw (ring, head_dim), comp (n, head_dim) | None, sinks f32 (n_head,), "
           "sel int32 (T, k) | None, *, out f32 (T, n_head, head_dim), steps, rec=0, grp, max_rows, rope=None, "
           "scratch=None, q8_0: Q8_0Act | None = None, q8_0_row=0, stream)",
           "ops.attention_with_sinks (+ ops.apply_rope_tail inverse)", 1e-5, _case_decode),  # CONTRACT
]
