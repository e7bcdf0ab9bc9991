"""The CSA indexer on the device (docs/model.md steps 9-10) and a generic top-k.

Ops
---
``indexer.q_prep``
    Indexer queries ``(T, n_ih, d)`` after the F16 ``indexer.attn_q_b``
    matvec: RoPE of each head's tail at ``pos + t``, Hadamard transform,
    FP4 (E2M1) round trip in blocks of 32 (``ops.indexer_qat``).  One block
    per (head, token), thread ``p`` owning dims ``2p, 2p+1``; the butterflies
    of stride >= 2 go through shared memory (float64), one butterfly per
    thread per stage.  A 32-value FP4 block is 16 lanes: its amax is a
    16-lane reduction.
``indexer.scores``
    ``score[c] = (sum_h relu(row_c . q_h) * w_h) * w_scale`` over ``n_comp``
    index rows (``w`` the unscaled ``indexer.proj`` output, ``w_scale`` the
    float64 ``1/sqrt(d * n_ih)``).  Blocks loop over 16-row tiles (a grid of
    at most ~2 blocks per SM, so the 64 x 128 queries are loaded into shared
    memory once per block, padded by one word per row against bank
    conflicts); thread ``(row = tid / 16, lane16 = tid % 16)`` computes heads
    ``lane16 + 16 j`` of its row (dims outer, heads inner: each row value is
    widened to float64 once for its 4 heads), then a 16-lane reduction adds
    the heads.
``topk.select``
    Indices of the ``k`` largest float32 values, best first, ties to the
    lower index (``ops.top_k_stable``), ``k <= 1024``.  One block: radix
    select on 64-bit keys ``(order-preserving value bits << 32) | ~index``,
    which are all distinct (-0.0 keyed as +0.0), 8 bits per pass from the top (a 256-bin shared
    histogram, a suffix scan, usually done after 4 passes, at most 8), then
    every key >= the threshold is gathered (exactly k) and bitonic-sorted in
    shared memory.  Non-finite values get key 0 and are never chosen while
    ``k`` does not exceed the number of finite values.  Used by the indexer
    (``indexer_top_k`` of ``n_comp``) and by device sampling (top-k logits).

Simulator geometry: ``indexer.scores`` gives a row's heads to one thread
(``HEAD_LANES = 1``: no shuffle) and ``topk.select`` runs on one thread (its
many barriers then wait for no other thread).

Numerics (docs/model.md, "one rounding per value"): the RoPE rotation is
float64 rounded once (:func:`ds4nb.kernels.rope.rope_rotate`); the Hadamard
transform runs its butterflies and the ``1/sqrt(n)`` factor (a float64) in
float64 and rounds each value once before the FP4 round trip, which is an
exact function of that float32 value; scores are float64 dots (products of
float32 values are exact there), relu, the head sum and ``w_scale`` in
float64, rounded once, so they are bit-identical to the oracle except for
rare one-ulp differences of the summation order; the top-k selection is
exact.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import cuda

from ds4nb.kernels import _launch as L
from ds4nb.kernels.attention import pow2_scale, row_threads
from ds4nb.kernels.f16_matvec import group_max, group_sum
from ds4nb.kernels.intrinsics import SIMULATOR, device, float32, float64, int32, rint, uint64, wait_prior_grid
from ds4nb.kernels.parity import CONTRACT, Case
from ds4nb.kernels.registry import OpSpec, implementation
from ds4nb.kernels.rope import RopeArgs, rope_args, rope_cos_sin, rope_rotate
from ds4nb.kernels.step import NF, POS, ROWS, SELECT, group_offset, one_record, records

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_F2 = np.float32(2.0)
_F4 = np.float32(4.0)
_F6 = np.float32(6.0)
_HALF = np.float32(0.5)
_D0 = np.float64(0.0)
_FP4_AMAX_FLOOR = np.float32(7.052966104933725e-38)   # 6 * 2^-126
FP4_BLOCK = 32

# ---------------------------------------------------------------------------
# Hadamard + FP4 (shared with the compressor's indexer rows)
# ---------------------------------------------------------------------------


@device
def e2m1_round(v):
    """Nearest E2M1 value of v (|v| <= 6), ties to the even code (as ops.e2m1_round).

    The codes are multiples of 0.5 below 2, of 1 in [2, 4], of 2 in [4, 6]; in
    each range the multiple's parity is the code's parity.
    """
    a = abs(v)
    if a < _F2:
        q = float32(rint(a * _F2)) * _HALF
    elif a < _F4:
        q = float32(rint(a))
    else:
        q = float32(rint(a * _HALF)) * _F2
    return -q if v < _F0 else q


@device
def hadamard_fp4_pair(y0, y1, p, half, hs, inv_sqrt):
    """Hadamard transform of a float32 row held as pairs (thread p: dims 2p, 2p+1), then FP4 round trip.

    Butterflies and the ``inv_sqrt`` factor (float64 ``1/sqrt(n)``) in float64,
    each value rounded to float32 once before FP4.  ``hs``: shared float64
    scratch of >= 2*half values; ``half`` = head_dim/2 (a power of two);
    threads with ``p >= half`` take part in the barriers and reductions only.
    Every thread of the block must call.
    """
    valid = p < half
    a = float64(y0) + float64(y1)     # stride-1 butterfly stays inside the thread
    b = float64(y0) - float64(y1)
    if valid:
        hs[2 * p] = a
        hs[2 * p + 1] = b
    stride = 2
    while stride < 2 * half:
        cuda.syncthreads()
        if valid:
            i = (p // stride) * 2 * stride + p % stride
            u = hs[i]
            w = hs[i + stride]
            hs[i] = u + w
            hs[i + stride] = u - w
        stride *= 2
    cuda.syncthreads()
    z0 = _F0
    z1 = _F0
    if valid:
        z0 = float32(hs[2 * p] * inv_sqrt)
        z1 = float32(hs[2 * p + 1] * inv_sqrt)
    cuda.syncthreads()     # hs may be reused by the caller
    # FP4 blocks of 32 dims = 16 pairs = aligned groups of 16 lanes
    amax = group_max(max(abs(z0), abs(z1)), 16)
    if valid:
        scale = pow2_scale(max(amax, _FP4_AMAX_FLOOR), _F6)
        z0 = e2m1_round(min(max(z0 / scale, -_F6), _F6)) * scale
        z1 = e2m1_round(min(max(z1 / scale, -_F6), _F6)) * scale
    return z0, z1


def hadamard_scale(d: int) -> np.float64:
    """The oracle's float64 ``1 / sqrt(d)``."""
    return np.float64(1.0 / math.sqrt(d))


def check_qat_width(d: int) -> None:
    if d & (d - 1) or d % FP4_BLOCK:
        raise ValueError(f"indexer rows need a power-of-two width that is a multiple of 32, got {d}")


# ---------------------------------------------------------------------------
# indexer.q_prep
# ---------------------------------------------------------------------------

MAX_ROW = 512   # widest row the pair kernels stage in shared memory


@cuda.jit
def _q_prep_kernel(q, out, n_head, head_dim, steps, rec, gate_field, inv_sqrt, n_rot, ts, fscale, ext, low, denom,
                   msc):
    wait_prior_grid()
    h = cuda.blockIdx.x
    t = cuda.blockIdx.y
    p = cuda.threadIdx.x
    r = rec + t * NF
    if gate_field >= 0 and steps[r + gate_field] == 0:   # this token's indexer does not select
        return
    pos = steps[r + POS]
    half = head_dim // 2
    valid = p < half
    base = (t * n_head + h) * head_dim + 2 * p
    y0 = _F0
    y1 = _F0
    if valid:
        y0 = q[base]
        y1 = q[base + 1]
    k = p - (head_dim - n_rot) // 2
    if valid and k >= 0:
        c, s = rope_cos_sin(k, pos, ts, fscale, ext, low, denom, msc)
        y0, y1 = rope_rotate(y0, y1, c, s, False)
    hs = cuda.shared.array(MAX_ROW, float64)
    z0, z1 = hadamard_fp4_pair(y0, y1, p, half, hs, inv_sqrt)
    if valid:
        out[base] = z0
        out[base + 1] = z1


@implementation("indexer.q_prep", "pair_per_thread", layout="f32")
def q_prep(q: Any, *, out: Any, n_head: int, head_dim: int, rope: Any, steps: Any, rec: int = 0,
           gate_field: int = -1, stream: Any = 0) -> Any:
    """q (T, n_head*head_dim) -> RoPE at token t's ``POS`` -> Hadamard -> FP4 round trip, per head row.

    Token ``t``'s record is ``steps[rec + t * NF:]``; with ``gate_field`` >= 0
    a token whose record has 0 in that field is skipped (e.g. ``grp + SELECT``).
    """
    check_qat_width(head_dim)
    if head_dim > MAX_ROW:
        raise ValueError(f"indexer.q_prep: head_dim {head_dim} > {MAX_ROW}")
    ra = rope if isinstance(rope, RopeArgs) else rope_args(rope)
    n_tok = q.size // (n_head * head_dim)
    L.launch(_q_prep_kernel, (n_head, n_tok), row_threads(head_dim), stream,
             L.flat(q), L.flat(out), n_head, head_dim, steps, int(rec), int(gate_field), hadamard_scale(head_dim),
             *ra)
    return out


# ---------------------------------------------------------------------------
# indexer.scores
# ---------------------------------------------------------------------------

HEAD_LANES = 1 if SIMULATOR else 16      # lanes sharing a row's heads (the simulator: one thread a row)
TILE_ROWS = 16
SCORE_THREADS = TILE_ROWS * HEAD_LANES
@L.kernel_factory
def _scores_kernel(n_ih: int, d: int) -> Any:
    HPT = L.cdiv(n_ih, HEAD_LANES)  # heads per thread
    NH = HPT * HEAD_LANES           # heads padded to the 16 lanes
    DP = d + 1                      # padded row stride in shared memory
    QN, RN = NH * DP, TILE_ROWS * DP

    @cuda.jit
    def kernel(q, w, w_scale, rows, steps, rows_at, gate_at, out, out_stride):
        wait_prior_grid()
        t = cuda.blockIdx.y           # the step's token t: its record, query, weights and scores
        rows_at += t * NF
        gate_at += t * NF
        q = q[t * n_ih * d:]
        w = w[t * n_ih:]
        out = out[t * out_stride:]
        if steps[gate_at] == 0:       # the indexer does not select at this token
            return
        n_comp = steps[rows_at]
        tid = cuda.threadIdx.x
        r_loc = tid // HEAD_LANES
        hl = tid % HEAD_LANES
        q_s = cuda.shared.array(QN, float32)
        w_s = cuda.shared.array(NH, float64)
        r_s = cuda.shared.array(RN, float32)
        for i in range(tid, NH * d, SCORE_THREADS):
            h = i // d
            q_s[h * DP + i % d] = q[i] if h < n_ih else _F0
        for h in range(tid, NH, SCORE_THREADS):
            w_s[h] = float64(w[h]) if h < n_ih else _D0
        n_tiles = (n_comp + TILE_ROWS - 1) // TILE_ROWS
        for tile in range(cuda.blockIdx.x, n_tiles, cuda.gridDim.x):
            r0 = tile * TILE_ROWS
            cuda.syncthreads()          # previous tile's reads are done (and q_s is loaded)
            for i in range(tid, TILE_ROWS * d, SCORE_THREADS):
                rr = i // d
                r_s[rr * DP + i % d] = float32(rows[(r0 + rr) * d + i % d]) if r0 + rr < n_comp else _F0
            cuda.syncthreads()
            dots = cuda.local.array(HPT, float64)
            for j in range(HPT):
                dots[j] = _D0
            for kk in range(d):
                rv = float64(r_s[r_loc * DP + kk])     # widened once for this thread's HPT heads
                for j in range(HPT):
                    dots[j] += rv * float64(q_s[(hl + HEAD_LANES * j) * DP + kk])   # exact product
            part = _D0
            for j in range(HPT):
                part += max(dots[j], _D0) * w_s[hl + HEAD_LANES * j]
            tot = group_sum(part, HEAD_LANES)
            if hl == 0 and r0 + r_loc < n_comp:
                out[r0 + r_loc] = float32(tot * w_scale)

    return kernel


SCORE_BLOCKS = 1 if SIMULATOR else 264


@implementation("indexer.scores", "tile16_persistent", layout="rows f16|f32 (n_comp, d)")
def indexer_scores(q: Any, w: Any, rows: Any, *, out: Any, w_scale: float = 1.0, steps: Any, rec: int = 0,
                   grp: int, max_rows: int, n_tok: int = 1, stream: Any = 0) -> Any:
    """score[t, c] = (sum_h relu(rows[c] . q[t, h]) * w[t, h]) * w_scale for c < ROWS_t, float64, rounded once.

    ``ROWS_t`` is compression group ``grp``'s row count in token ``t``'s step
    record ``steps[rec + t * NF:]``; nothing runs for a token whose ``SELECT``
    is 0.  ``max_rows`` bounds ``ROWS`` (the grid) and is the row stride of
    ``out`` (n_tok, max_rows).  q f32 (n_tok, n_ih, d) after
    ``indexer.q_prep``; w f32 (n_tok, n_ih) from ``indexer.proj``, unscaled;
    ``w_scale`` a float64 factor (the model's ``1/sqrt(d * n_ih)``,
    ``ops.indexer_weight_scale``).
    """
    n_ih = w.size // n_tok
    d = q.size // (n_tok * n_ih)
    kern = _scores_kernel(n_ih, d)
    n_tiles = L.cdiv(max(max_rows, 1), TILE_ROWS)
    blocks = max(1, min(n_tiles, SCORE_BLOCKS // n_tok))
    L.launch(kern, (blocks, n_tok), SCORE_THREADS, stream, L.flat(q), L.flat(w), np.float64(w_scale),
             L.flat(rows), steps, int(rec + grp + ROWS), int(rec + grp + SELECT), L.flat(out), int(max_rows))
    return out


def indexer_w_scale(d: int, n_ih: int) -> np.float64:
    """The float64 ``1 / sqrt(d * n_ih)`` (as ``ops.indexer_weight_scale``)."""
    return np.float64(1.0 / math.sqrt(d * n_ih))


# ---------------------------------------------------------------------------
# topk.select
# ---------------------------------------------------------------------------

TOPK_MAX = 1024
_U0 = np.uint64(0)
_U1 = np.uint64(1)
_U8 = np.uint64(8)
_U32 = np.uint64(32)
_U255 = np.uint64(255)
_ULO = np.uint64(0xFFFFFFFF)
_USIGN = np.uint64(0x80000000)
_UEXP = np.uint64(0x7F800000)


@device
def topk_key(bits, i):
    """Distinct 64-bit sort key of float bits ``bits`` at index ``i``: larger value first, then lower index.

    -0.0 is keyed as +0.0: the two compare equal, so they tie and the lower index wins.
    """
    u = uint64(bits)
    if (u & _UEXP) == _UEXP:
        return _U0                                   # inf / nan: never selected
    if u == _USIGN:
        u = _U0                                      # -0.0 -> +0.0
    o = (~u & _ULO) if (u & _USIGN) != _U0 else (u | _USIGN)
    return (o << _U32) | (_ULO - uint64(i))


@cuda.jit
def _topk_kernel(bits, n, k, n_src, n_at, k_src, k_at, out, from_stride):
    wait_prior_grid()
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    t = cuda.blockIdx.x           # row t of a batch: values[t, 0:n], out[t, 0:k], counts at + t * from_stride
    bits = bits[t * n:]
    out = out[t * k:]
    if n_at >= 0:                 # n and k limited by counts in device memory (a step record, finite logits)
        n = min(n, n_src[n_at + t * from_stride])
    if k_at >= 0:
        k = min(k, k_src[k_at + t * from_stride])
    if k <= 0:
        return
    hist = cuda.shared.array(256, int32)
    suf = cuda.shared.array(256, int32)
    suf2 = cuda.shared.array(256, int32)
    st_u = cuda.shared.array(1, uint64)     # key prefix found so far
    st_i = cuda.shared.array(3, int32)      # remaining, done, gather count
    keys = cuda.shared.array(TOPK_MAX, uint64)
    if tid == 0:
        st_u[0] = _U0
        st_i[0] = k
        st_i[1] = 0
        st_i[2] = 0
    for ps in range(8):
        shift = uint64(56 - 8 * ps)
        for b in range(tid, 256, nt):
            hist[b] = 0
        cuda.syncthreads()
        pre = st_u[0]
        rem = st_i[0]
        for i in range(tid, n, nt):
            key = topk_key(bits[i], i)
            if ps == 0 or (key >> (shift + _U8)) == (pre >> (shift + _U8)):
                cuda.atomic.add(hist, int32((key >> shift) & _U255), 1)
        cuda.syncthreads()
        # suf[b] = sum of hist[b' > b] (Hillis-Steele on the reversed bins, ping-pong buffers)
        for b in range(tid, 256, nt):
            suf[b] = hist[b + 1] if b < 255 else 0
        step = 1
        while step < 256:
            cuda.syncthreads()
            for b in range(tid, 256, nt):
                v = suf[b]
                if b + step < 256:
                    v += suf[b + step]
                suf2[b] = v
            cuda.syncthreads()
            for b in range(tid, 256, nt):
                suf[b] = suf2[b]
            step *= 2
        cuda.syncthreads()
        for b in range(tid, 256, nt):
            above = suf[b]
            if above < rem and rem <= above + hist[b]:
                st_u[0] = pre | (uint64(b) << shift)
                st_i[0] = rem - above
                if hist[b] == rem - above:
                    st_i[1] = 1
        cuda.syncthreads()
        if st_i[1] != 0:
            break
    thr = st_u[0]
    for i in range(tid, n, nt):
        key = topk_key(bits[i], i)
        if key >= thr:
            slot = cuda.atomic.add(st_i, 2, 1)
            if slot < TOPK_MAX:
                keys[slot] = key
    sb = 1
    while sb < k:
        sb *= 2
    cuda.syncthreads()
    for j in range(k + tid, sb, nt):
        keys[j] = _U0
    # bitonic sort of keys[0:sb], descending
    size = 2
    while size <= sb:
        stride = size // 2
        while stride > 0:
            cuda.syncthreads()
            for i in range(tid, sb, nt):
                j = i ^ stride
                if j > i:
                    a = keys[i]
                    b2 = keys[j]
                    up = (i & size) == 0
                    if (a < b2) == up:
                        keys[i] = b2
                        keys[j] = a
            stride //= 2
        size *= 2
    cuda.syncthreads()
    for j in range(tid, k, nt):
        out[j] = int32(_ULO - (keys[j] & _ULO))


TOPK_THREADS = 1024


@implementation("topk.select", "radix_block", layout="f32")
def topk(values: Any, n: int, k: int, *, out: Any, n_from: tuple[Any, int] | None = None,
         k_from: tuple[Any, int] | None = None, n_rows: int = 1, from_stride: int = NF, stream: Any = 0) -> Any:
    """out[r, 0:k] = indices of the k largest of values[r, 0:n], best first, ties to the lower index.

    ``n_rows`` rows (one block each; values (n_rows, n), out (n_rows, k)).
    ``n_from = (array, i)`` / ``k_from = (array, i)``: row r's n and k are
    lowered to ``array[i + r * from_stride]`` on the device (the step records'
    row counts and the indexer's ``SELECT``, or the count of finite logits);
    k lowered to 0 does nothing.
    """
    if not 0 < k <= min(n, TOPK_MAX):
        raise ValueError(f"topk.select: need 0 < k <= min(n, {TOPK_MAX}), got k={k}, n={n}")
    nt = TOPK_THREADS if not SIMULATOR else 1   # the simulator: one thread, no waiting on others at barriers
    none = (L.placeholder(np.int32), -1)
    n_src, n_at = n_from or none
    k_src, k_at = k_from or none
    L.launch(_topk_kernel, n_rows, nt, stream, L.flat(values).view(np.uint32), int(n), int(k), n_src, int(n_at),
             k_src, int(k_at), L.flat(out), int(from_stride))
    return out


# ---------------------------------------------------------------------------
# Parity cases
# ---------------------------------------------------------------------------


def _case_q(rng: np.random.Generator, scale: str) -> Case:
    from ds4nb.kernels.rope import make_test_rope
    from ds4nb.reference import ops

    n_tok, n_head, d, n_rot = (2, 4, 32, 16) if scale == "tiny" else (1, 64, 128, 64)
    rope = make_test_rope(n_rot, True)
    pos = int(rng.integers(0, 100000))
    q = (rng.standard_normal((n_tok, n_head, d)) * rng.uniform(0.1, 10)).astype(np.float32)
    ref = np.stack([ops.indexer_qat(ops.apply_rope_tail(q[t], rope, pos + t)) for t in range(n_tok)])
    out = L.device_array(q.size, np.float32)
    return Case((cuda.to_device(q),), out, (ref.reshape(-1),), (CONTRACT,),
                kwargs=dict(n_head=n_head, head_dim=d, rope=rope, steps=cuda.to_device(records(pos, n_tok))),
                info={"shape": q.shape, "pos": pos})


def _case_scores(rng: np.random.Generator, scale: str) -> Case:
    """A step of T tokens, each scoring its own visible rows (the later tokens see more; one may not select)."""
    from ds4nb.reference import ops

    n_tok, n_ih, d, n_comp = (3, 4, 32, 40) if scale == "tiny" else (2, 64, 128, 8192)
    q = ops.indexer_qat(rng.standard_normal((n_tok, n_ih, d)).astype(np.float32))
    rows = ops.f16_round(ops.indexer_qat(rng.standard_normal((n_comp, d)).astype(np.float32)))
    w = rng.standard_normal((n_tok, n_ih)).astype(np.float32)
    ws = indexer_w_scale(d, n_ih)
    max_rows = n_comp + int(rng.integers(0, 3 * TILE_ROWS))
    g = group_offset(1)
    steps = records(0, n_tok).reshape(n_tok, NF)
    ref = np.full((n_tok, max_rows), np.nan, np.float32)   # scores a token does not compute are not written
    for t in range(n_tok):
        seen = n_comp - int(rng.integers(0, n_comp // 2)) if t < n_tok - 1 else n_comp
        selects = t > 0 or bool(rng.integers(0, 2))
        steps[t, g + ROWS], steps[t, g + SELECT] = seen, int(selects)
        if selects:
            ref[t, :seen] = ops.indexer_scores(q[t], w[t], rows[:seen], ws)
    out = L.device_array(n_tok * max_rows, np.float32)
    return Case((cuda.to_device(q), cuda.to_device(w), cuda.to_device(rows.astype(np.float16))), out,
                (ref.reshape(-1),), (CONTRACT,), kwargs=dict(w_scale=ws, steps=cuda.to_device(steps.reshape(-1)),
                                                             grp=g, max_rows=max_rows, n_tok=n_tok),
                info={"shape": (n_tok, n_ih, d, n_comp)})


def _case_topk(rng: np.random.Generator, scale: str) -> Case:
    from ds4nb.reference import ops

    n, k = (40, 4) if scale == "tiny" else (32768, 512)
    v = rng.standard_normal(n).astype(np.float32)
    v[rng.integers(0, n, n // 8)] = v[0]     # ties, resolved by index
    ref = ops.top_k_stable(v, k).astype(np.int32)
    out = L.device_array(k, np.int32)
    if rng.integers(0, 2):                   # n and k from a step record: a longer buffer, a larger launch k
        extra = int(rng.integers(1, 9))
        padded = np.concatenate([v, np.full(extra, 1e30, np.float32)])   # past ROWS: must never win
        rec = cuda.to_device(one_record(rows=n, select=k))
        g = group_offset(1)
        return Case((cuda.to_device(padded), n + extra, k + extra), out, (ref,), (True,),
                    kwargs=dict(n_from=(rec, g + ROWS), k_from=(rec, g + SELECT)), info={"n": n, "k": k, "rec": 1})
    return Case((cuda.to_device(v), n, k), out, (ref,), (True,), info={"n": n, "k": k})


OPS = [
    OpSpec("indexer.q_prep", "indexer queries: RoPE, Hadamard, FP4 round trip per head",
           "(q f32 (T, n_head*d), *, out, n_head, head_dim, rope, steps, rec=0, gate_field=-1, stream)",
           "ops.apply_rope_tail + ops.indexer_qat",
           # CONTRACT (rotation and Hadamard rounded once, FP4 exact); the tolerance is for non-contract callers:
           # a 1-ulp Hadamard difference can flip one E2M1 rounding in a block
           2e-3, _case_q),
    OpSpec("indexer.scores", "indexer scores sum_h relu(row . q_h) w_h over the compressed index rows",
           "(q f32 (T, n_ih, d), w f32 (T, n_ih), rows f16|f32 (n, d), *, out f32 (T, max_rows), w_scale, steps, "
           "rec=0, grp, max_rows, n_tok=1, stream)",
           "ops.indexer_scores", 1e-5, _case_scores),   # CONTRACT
    OpSpec("topk.select", "indices of the k largest values, best first, ties to the lower index",
           "(values f32 (n_rows, n), n, k, *, out int32 (n_rows, k), n_from=None, k_from=None, n_rows=1, "
           "from_stride=NF, stream)", "ops.top_k_stable", 0.0,
           _case_topk),
]
