"""Hyper-connections on the device (docs/model.md steps 2, 3, 14, 19, 20).

Numerics (docs/model.md, "one rounding per value"): every value the contract
lists is its formula evaluated in float64 from float32 (or F16) inputs and
rounded to float32 once, at the points where the oracle
(``Reference.hc_pre`` / ``collapse_hc``, ``ops.hc_post``) materialises it:
``flat = rms(hc)``, ``mix = fn . flat``, ``pre`` / ``post`` / ``comb``
(Sinkhorn entirely in float64), ``x = sum_h pre_h hc_h``, the optional
``x_norm = rms(x; w)``, the head's ``w_h = sigmoid(mix_h scale + base_h) + eps``
and ``new_j``.  Partial sums (scratch and shared arrays included) are
float64, so the outputs equal the oracle's bit for bit except where the two
float64 evaluations (other summation orders, libdevice's exp) straddle a
float32 rounding boundary (~1e-7 of the values, one ulp).  ``eps`` values
enter as ``float64(float32(eps))``, like the oracle's.

``hc.pre`` (steps 2-3, and 4/15 when a norm weight is given) turns the
streams ``hc (T, n_hc, n_embd)`` into a sublayer input in three launches:

1. ``_ss`` (grid ``n_split x T``, 128 threads): each block sums the squares
   of its slice of the flattened ``hc_dim = n_hc * n_embd`` values (float64
   partials).
2. ``mix`` (same grid): each thread reads its column's ``fn`` values (weights)
   before waiting for the prior grid, then its ``hc`` value beside the
   token's partials; each block adds those partials (every block in the same
   order, so all get the same ``1 / sqrt(mean + eps)``), forms its slice of
   ``flat = float32(hc / rms)`` and accumulates the ``n_mix`` dots
   ``fn[m] . flat`` in float64 (F16 ``fn`` values are exact).  The HC state
   is read twice and the F16 ``fn`` (24 x 16384 for DS4) once, spread over
   ~128 blocks instead of 24 rows.
3. ``finish`` (one block of 512 threads per token): each thread owns
   ``FINISH_VALS`` consecutive values of x (8 on the GPU: a Q8_0 word, a Q8_K
   lane's share) and loads its ``n_hc`` stream values (and, before the wait,
   its norm weights) up front, so one round of loads serves x, the norm and
   the quantization; x's values move 16 bytes a thread (``load_f32x4`` /
   ``store_f32x4``: with scalar accesses each warp instruction would touch
   eight cache lines), and the mix partials sit (token, value, split), so the
   lanes adding a value's partials read consecutive addresses.
   ``mix = float32(sum of the partials)``, then the split (``pre``, ``post``: a thread each) and the Sinkhorn
   normalisation in float64 with the oracle's operations (divisions, not
   reciprocals; products not contracted into FMAs; every row and column sum
   added in index order): on the GPU the ``n_hc^2`` entries sit in the first
   lanes of warp 0, one each, and each lane reads its row's (column's)
   entries by shuffles, so a round costs two dependent divisions instead of
   ``2 n_hc^2`` (the same values bit for bit as one thread doing it all, which
   is what the simulator runs); ``pre``, ``post``, ``comb`` are rounded once.
   Then ``x = float32(sum_h pre[h] * hc[h])`` and optionally
   ``x_norm = float32(x / rms(x) * norm_w)`` (the sublayer's attn_norm /
   ffn_norm, from the rounded ``x``), and x_norm as the Q8_0 and Q8_K
   activations of the sublayer's matmuls (``act.quantize``'s lane functions,
   so the same blocks; a decode step then launches no quantization of its
   own for them).  Without a ``comb`` output the finish
   skips the Sinkhorn and writes the ``mix`` values instead: ``hc.comb`` (one
   warp a token, the same Sinkhorn) then runs where nothing waits for it (a
   decode step's branch, beside the sublayer; only ``hc.post`` reads comb).

A prefill step (from ``gemm_f64.MIN_TOKENS`` tokens, sm_80+) replaces ``_mix``
by ``gemm_f64.hc_mix``: the mix of all the step's tokens as one GEMM on the
FP64 tensor cores (``flat`` formed the same way while widening hc into its
tiles), K split into ~8 parts whose partials ``_finish`` adds as it adds the
mix kernel's.

``hc.head`` (step 20) is the same kernels with ``n_mix = n_hc`` and
``w_h = sigmoid(mix_h * scale[0] + base[h]) + eps`` instead of Sinkhorn.

``hc.post`` (steps 14, 19): ``new[j] = y * post[j] + sum_i comb[i, j] * hc[i]``
in float64, one thread per output value; step 19's ``y = routed + shared``
(one float32 addition) is formed in the same kernel.  It can also leave the
float64 sum of squares of each block's outputs (``ss_out``, a token being whole
blocks): the next ``hc.pre`` reads those partials (``n_ss``) instead of
launching ``_ss``.

The simulator runs one split (``SIM`` geometry), the GPU ~one split per 128
columns; it also runs 16 / 8 threads a block with one lane per reduction group
(``LANES = 1``: no shuffles), a finish thread owning 256 consecutive values
(a Q8_K block), and ``hc.post`` with 8 threads a block, each taking 128
outputs.  Parts that run on one thread per mix value loop over the
values in the simulator, in branches that are constant-false on the GPU.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from numba import cuda

from ds4nb.kernels import _launch as L
from ds4nb.kernels import gemm_f64
from ds4nb.kernels.activation import (QK8_0, QK_K, Q8_0_LANE_VALS, Q8_K_LANE_VALS, Q8_0Act, Q8KAct, q8_0_lane,
                                      q8_K_lane)
from ds4nb.kernels.f16_matvec import group_sum
from ds4nb.kernels.intrinsics import (SIMULATOR, device, float32, float64, has_f64_mma, jit_kernel, load_f32x4,
                                     shfl_idx, store_f32x4, wait_prior_grid)
from ds4nb.kernels.parity import CONTRACT, Case
from ds4nb.kernels.registry import OpSpec, implementation

LANES = 1 if SIMULATOR else 32     # lanes of a reduction group (a warp on the GPU)
FINISH_THREADS = 8 if SIMULATOR else 512    # a block of one token
FINISH_WARPS = FINISH_THREADS // LANES
FINISH_VALS = Q8_K_LANE_VALS    # consecutive x values a finish thread owns a round: a Q8_K lane's share (8 on the GPU)
MIX_THREADS = 16 if SIMULATOR else 128
MIX_WARPS = MIX_THREADS // LANES
SINK_THREADS = 1 if SIMULATOR else 32       # hc.pre's finish: the threads that run the Sinkhorn (warp 0)
COLS_PER_SPLIT = 128        # GPU: one column per thread per split
POST_THREADS = 8 if SIMULATOR else 256
POST_ITEMS = 128 if SIMULATOR else 1   # hc.post outputs per thread
POST_BLOCK_VALUES = POST_THREADS * POST_ITEMS   # consecutive outputs of an hc.post block (its sum of squares)
POST_WARPS = POST_THREADS // LANES
_F0 = np.float32(0.0)
_D0 = np.float64(0.0)
_D1 = np.float64(1.0)
_D2 = np.float64(2.0)

# Every product below of two float32 (or F16) values is exact in float64, so an FMA contraction of
# ``a * b + c`` rounds exactly like the separate operations: the float64 values are the oracle's
# up to summation order (and libdevice's exp, within an ulp of float64).


@device
def _sigmoid64(x):
    """sigmoid of a float64 without overflow (as ops._sigmoid64)."""
    e = math.exp(-abs(x))
    if x >= _D0:
        return _D1 / (_D1 + e)
    return e / (_D1 + e)


@device
def _load4(src, base, d, n, vals, o, vec):
    """``vals[o:o + 4] = src[base + d:base + d + 4]``, 0 from ``d == n`` on: one 16-byte load when ``vec`` (the
    launcher checked the alignment) and all four are below ``n``."""
    if vec and d + 4 <= n:
        v0, v1, v2, v3 = load_f32x4(src, base + d)
        vals[o] = v0
        vals[o + 1] = v1
        vals[o + 2] = v2
        vals[o + 3] = v3
    else:
        for i in range(4):
            vals[o + i] = src[base + d + i] if d + i < n else _F0


@device
def _store4(dst, base, d, n, vals, o, vec):
    """``dst[base + d:base + d + 4] = vals[o:o + 4]`` below ``n``: one 16-byte store when ``vec`` and all four fit."""
    if vec and d + 4 <= n:
        store_f32x4(dst, base + d, vals[o], vals[o + 1], vals[o + 2], vals[o + 3])
    else:
        for i in range(4):
            if d + i < n:
                dst[base + d + i] = vals[o + i]


@device
def _block_total(v, red, n_warps):
    """The block's float64 sum of ``v`` for thread 0 (the warps' sums, through ``red``, added in warp order);
    every thread calls it (a barrier)."""
    w = group_sum(v, LANES)
    tid = cuda.threadIdx.x
    if tid % LANES == 0:
        red[tid // LANES] = w
    cuda.syncthreads()
    tot = _D0
    if tid == 0:
        for i in range(n_warps):
            tot += red[i]
    return tot


@cuda.jit
def _ss_kernel(x, hc_dim, cols, part_ss):
    """Float64 sum of squares of each split's slice of the flattened streams -> part_ss[t, s]."""
    wait_prior_grid()
    s = cuda.blockIdx.x
    t = cuda.blockIdx.y
    n_split = cuda.gridDim.x
    tid = cuda.threadIdx.x
    c0 = s * cols
    c1 = min(c0 + cols, hc_dim)
    xb = t * hc_dim
    ss = _D0
    for c in range(c0 + tid, c1, MIX_THREADS):
        v = float64(x[xb + c])
        ss += v * v
    red = cuda.shared.array(MIX_WARPS, float64)
    tot = _block_total(ss, red, MIX_WARPS)
    if tid == 0:
        part_ss[t * n_split + s] = tot


@device
def zval(mix, scale, base, m, part):
    """float64 ``mix[m] * scale[part] + base[m]`` from the float32 values."""
    return float64(mix[m]) * float64(scale[part]) + float64(base[m])


@L.kernel_factory
def sinkhorn_fns(n_hc: int) -> tuple[Any, Any]:
    """(serial, warp) device functions: the ``n_hc x n_hc`` Sinkhorn normalisation of ``hc.pre``.

    Both read the control values ``mix[2 n_hc:]`` and write ``comb[t * n_hc^2:]``;
    ``warp`` holds entry ``e = i * n_hc + j`` in lane ``e`` of a warp (every
    lane calls; ``n_hc^2 <= 32``) and computes the same float64 values as
    ``serial`` on one thread: the same operations, every row and column sum
    added in index order.
    """
    N_HC = n_hc
    N_C = n_hc * n_hc

    @device
    def serial(mix, scale, base, iters, hc_eps, comb, t):
        """Row softmax + eps, then ``iters`` rounds of row / column normalisation, one thread."""
        c = cuda.local.array(N_C, float64)
        for i in range(N_HC):  # row softmax + eps
            mx = zval(mix, scale, base, 2 * N_HC + i * N_HC, 2)
            for j in range(N_HC):
                v = zval(mix, scale, base, 2 * N_HC + i * N_HC + j, 2)
                c[i * N_HC + j] = v
                mx = max(mx, v)
            rsum = _D0
            for j in range(N_HC):
                e = math.exp(c[i * N_HC + j] - mx)
                c[i * N_HC + j] = e
                rsum += e
            for j in range(N_HC):
                c[i * N_HC + j] = c[i * N_HC + j] / rsum + hc_eps
        for it in range(max(iters, 1)):
            if it > 0:  # rows (the first round's row step is the softmax above)
                for i in range(N_HC):
                    rsum = _D0
                    for j in range(N_HC):
                        rsum += c[i * N_HC + j]
                    den = rsum + hc_eps
                    for j in range(N_HC):
                        c[i * N_HC + j] = c[i * N_HC + j] / den
            for j in range(N_HC):  # columns
                csum = _D0
                for i in range(N_HC):
                    csum += c[i * N_HC + j]
                den = csum + hc_eps
                for i in range(N_HC):
                    c[i * N_HC + j] = c[i * N_HC + j] / den
        for i in range(N_C):
            comb[t * N_C + i] = float32(c[i])

    @device
    def line_sum(v, first, step):
        """Entries first, first + step, ... (N_HC of them) added in order, gathered by shuffles."""
        s = _D0
        for k in range(N_HC):
            s += shfl_idx(v, first + k * step)
        return s

    @device
    def warp(mix, scale, base, iters, hc_eps, comb, t, lane):
        own = lane < N_C
        e = lane if own else 0
        i = e // N_HC
        j = e % N_HC
        v = zval(mix, scale, base, 2 * N_HC + e, 2)
        mx = v
        for k in range(N_HC):
            mx = max(mx, shfl_idx(v, i * N_HC + k))
        v = math.exp(v - mx)
        v = v / line_sum(v, i * N_HC, 1) + hc_eps              # row softmax + eps
        for it in range(max(iters, 1)):
            if it > 0:
                v = v / (line_sum(v, i * N_HC, 1) + hc_eps)    # rows
            v = v / (line_sum(v, j, N_HC) + hc_eps)            # columns
        if own:
            comb[t * N_C + e] = float32(v)

    return serial, warp


@L.kernel_factory
def _kernels(n_hc: int, n_mix: int, rounds: int) -> tuple[Any, Any]:
    """(mix, finish) kernels specialised for ``n_hc`` streams, ``n_mix`` control values and ``rounds`` slices of
    ``FINISH_THREADS * FINISH_VALS`` values of x per token (``finish_rounds``).

    ``n_mix == n_hc`` is the output head (sigmoid weights), otherwise the
    Sinkhorn split of ``2 n_hc + n_hc^2`` values.
    """
    N_HC = n_hc
    N_MIX = n_mix
    HEAD = n_mix == n_hc
    N_VALS = rounds * FINISH_VALS       # x values a finish thread owns
    N_HC_VALS = n_hc * N_VALS           # (local array sizes must be single constants)
    MIX_PER_WARP = -(-n_mix // FINISH_WARPS)
    MIX_LOADS = 4 * MIX_PER_WARP
    sinkhorn_serial, sinkhorn_warp = sinkhorn_fns(n_hc)

    @device
    def mix_out(red, part_dot, t, n_split, s, m):
        d = _D0
        for w in range(MIX_WARPS):
            d += red[m, w]
        part_dot[(t * N_MIX + m) * n_split + s] = d

    @device
    def mix_values(part_dot, t, n_split, mix, tid):
        """mix = fn . flat from the splits' partials, rounded once: warp w adds the partials of values
        w, w + warps, ... (lane l taking splits l, l + 32, ...: a fixed order, consecutive addresses); the first
        four partials of each of the warp's values are loaded together, before any is added."""
        lane = tid % LANES
        w0 = tid // LANES
        p = cuda.local.array(MIX_LOADS, float64)
        for k in range(MIX_PER_WARP):
            m = w0 + k * FINISH_WARPS
            for q in range(4):
                s = lane + q * LANES
                p[4 * k + q] = part_dot[(t * N_MIX + m) * n_split + s] if m < N_MIX and s < n_split else _D0
        for k in range(MIX_PER_WARP):
            m = w0 + k * FINISH_WARPS
            d = _D0
            for q in range(4):
                d += p[4 * k + q]
            s = lane + 4 * LANES
            while m < N_MIX and s < n_split:    # more than 4 * LANES splits
                d += part_dot[(t * N_MIX + m) * n_split + s]
                s += LANES
            d = group_sum(d, LANES)
            if lane == 0 and m < N_MIX:
                mix[m] = float32(d)

    @device
    def early_fn(fn, hc_dim, cols, w):
        """``w[m] = fn[m, c]`` for the thread's first column ``c`` of its split, every ``m`` (weights: no grid of
        the step writes them, so this may run before ``wait_prior_grid``)."""
        c = cuda.blockIdx.x * cols + cuda.threadIdx.x
        ok = cuda.threadIdx.x < cols and c < hc_dim
        for m in range(N_MIX):
            w[m] = float32(fn[m * hc_dim + c]) if ok else _F0

    @device
    def mix_block(x, fn, hc_dim, cols, rms_eps, n_ss, part_ss, part_dot, w):
        """Split ``blockIdx.x`` of token ``blockIdx.y``: its ``n_mix`` partial dots ``fn . flat`` (float64) into
        ``part_dot``, the token's ``1 / rms`` from its ``n_ss`` partial sums of squares; ``w``: the fn values of
        each thread's first column (``early_fn``)."""
        s = cuda.blockIdx.x
        t = cuda.blockIdx.y
        n_split = cuda.gridDim.x
        tid = cuda.threadIdx.x
        lane = tid % LANES
        warp = tid // LANES
        red_ss = cuda.shared.array(MIX_WARPS, float64)
        red = cuda.shared.array((N_MIX, MIX_WARPS), float64)
        c0 = s * cols
        c1 = min(c0 + cols, hc_dim)
        xb = t * hc_dim
        x0 = x[xb + c0 + tid] if c0 + tid < c1 else _F0     # loaded beside the token's partials
        # 1 / rms of the token from its splits' partials (every block adds them in the same order)
        ss = _D0
        for i in range(tid, n_ss, MIX_THREADS):
            ss += part_ss[t * n_ss + i]
        v = group_sum(ss, LANES)
        if lane == 0:
            red_ss[warp] = v
        cuda.syncthreads()
        tot = _D0
        for i in range(MIX_WARPS):
            tot += red_ss[i]
        inv = _D1 / math.sqrt(tot / float64(hc_dim) + rms_eps)
        acc = cuda.local.array(N_MIX, float64)
        f = float64(float32(float64(x0) * inv))               # flat = rms(hc), rounded once
        for m in range(N_MIX):
            acc[m] = float64(w[m]) * f
        for c in range(c0 + tid + MIX_THREADS, c1, MIX_THREADS):   # the split's further columns (the simulator)
            f = float64(float32(float64(x[xb + c]) * inv))
            for m in range(N_MIX):
                acc[m] += float64(fn[m * hc_dim + c]) * f
        for m in range(N_MIX):
            v = group_sum(acc[m], LANES)
            if lane == 0:
                red[m, warp] = v
        cuda.syncthreads()
        for m in range(tid, N_MIX, MIX_THREADS):
            mix_out(red, part_dot, t, n_split, s, m)

    @device
    def value_index(k):
        """The position in x of this finish thread's value ``k``: round ``k // FINISH_VALS``'s slice of
        consecutive values (a Q8_K lane's share, a Q8_0 word on the GPU)."""
        r = k // FINISH_VALS
        return (r * FINISH_THREADS + cuda.threadIdx.x) * FINISH_VALS + k % FINISH_VALS

    @device
    def early_norm_w(norm_w, has_norm, n_embd, nw, vec):
        """The norm weights of this thread's values (weights: may run before ``wait_prior_grid``)."""
        if has_norm:
            for k in range(0, N_VALS, 4):
                _load4(norm_w, 0, value_index(k), n_embd, nw, k, vec)

    @device
    def finish_token(t, x, part_dot, n_split, n_embd, scale, base, iters, hc_eps, rms_eps, out, post, comb,
                     has_comb, mix_out, has_mix, has_norm, norm_out, xq, xd, has_q8_0, yq, yd, ybs, has_q8_K, nw, vec):
        """Token ``t``'s mix from its splits' partials, the weights (and Sinkhorn), x, x_norm and its Q8_0 / Q8_K
        forms, by the whole block; ``nw``: the norm weights of the thread's values (``early_norm_w``).  ``vec``:
        x's values move four at a time (16-byte loads and stores: a thread's values are consecutive, so scalar
        accesses would touch eight cache lines a warp instruction)."""
        tid = cuda.threadIdx.x
        hc_dim = N_HC * n_embd
        mix = cuda.shared.array(N_MIX, float32)
        wts = cuda.shared.array(N_HC, float32)
        red = cuda.shared.array(FINISH_WARPS, float64)
        # the thread's stream values first: their loads overlap the partials' and the weights' computation
        hv = cuda.local.array(N_HC_VALS, float32)
        xb = t * hc_dim
        for k in range(0, N_VALS, 4):
            d = value_index(k)
            for h in range(N_HC):
                _load4(x, xb + h * n_embd, d, n_embd, hv, h * N_VALS + k, vec)
        mix_values(part_dot, t, n_split, mix, tid)
        cuda.syncthreads()
        if has_mix:     # the control values for hc.comb (the Sinkhorn in a launch of its own)
            for i in range(tid, N_MIX, FINISH_THREADS):
                mix_out[t * N_MIX + i] = mix[i]
        if HEAD:
            if tid < N_HC:
                wts[tid] = float32(_sigmoid64(zval(mix, scale, base, tid, 0)) + hc_eps)
        else:
            for i in range(tid, 2 * N_HC, FINISH_THREADS):
                if i < N_HC:
                    wts[i] = float32(_sigmoid64(zval(mix, scale, base, i, 0)) + hc_eps)
                else:
                    post[t * N_HC + i - N_HC] = float32(_D2 * _sigmoid64(zval(mix, scale, base, i, 1)))
        cuda.syncthreads()
        if not HEAD and has_comb and tid < SINK_THREADS:    # the Sinkhorn group: warp 0 (one thread simulated)
            if SIMULATOR:   # one thread (a constant-false branch on the GPU)
                sinkhorn_serial(mix, scale, base, iters, hc_eps, comb, t)
            else:
                sinkhorn_warp(mix, scale, base, iters, hc_eps, comb, t, tid)
        # x = sum_h w[h] * hc[h] (float64, rounded once); the sum of squares of the rounded x for the norm
        xs = cuda.local.array(N_VALS, float32)
        ob = t * n_embd
        ss2 = _D0
        for k in range(N_VALS):
            acc = _D0
            for h in range(N_HC):
                acc += float64(wts[h]) * float64(hv[h * N_VALS + k])
            xv = float32(acc)
            xs[k] = xv
            ss2 += float64(xv) * float64(xv)        # 0 past n_embd
        for k in range(0, N_VALS, 4):
            _store4(out, ob, value_index(k), n_embd, xs, k, vec)
        if has_norm:  # uniform branch: has_norm is a launch argument
            v = group_sum(ss2, LANES)
            if tid % LANES == 0:
                red[tid // LANES] = v
            cuda.syncthreads()
            tot = _D0
            for w in range(FINISH_WARPS):
                tot += red[w]
            inv = _D1 / math.sqrt(tot / float64(n_embd) + rms_eps)
            for k in range(N_VALS):
                xs[k] = float32(float64(xs[k]) * inv * float64(nw[k]))
            for k in range(0, N_VALS, 4):
                _store4(norm_out, ob, value_index(k), n_embd, xs, k, vec)
            # x_norm as the activations of the sublayer's matmuls (the act.quantize kernels' lane functions)
            if has_q8_0:
                for o in range(0, N_VALS, Q8_0_LANE_VALS):
                    d = value_index(o)
                    amax = _F0
                    for i in range(Q8_0_LANE_VALS):
                        amax = max(amax, abs(xs[o + i]))
                    q8_0_lane(xs, o, amax, xq, xd, t, n_embd // QK8_0, d // QK8_0, d % QK8_0 // 8, d < n_embd)
            if has_q8_K:
                for o in range(0, N_VALS, Q8_K_LANE_VALS):
                    d = value_index(o)
                    q8_K_lane(xs, o, d % QK_K // Q8_K_LANE_VALS, yq, yd, ybs, t, n_embd // QK_K, d // QK_K,
                              d < n_embd)

    @jit_kernel(launch_bounds=MIX_THREADS)
    def mix_kernel(x, fn, hc_dim, cols, rms_eps, n_ss, part_ss, part_dot):
        w = cuda.local.array(N_MIX, float32)
        early_fn(fn, hc_dim, cols, w)
        wait_prior_grid()
        mix_block(x, fn, hc_dim, cols, rms_eps, n_ss, part_ss, part_dot, w)

    @jit_kernel(launch_bounds=FINISH_THREADS)     # ~110 registers: a 512-thread block needs them capped
    def finish_kernel(x, part_dot, n_split, n_embd, scale, base, iters, hc_eps, rms_eps, out, post, comb,
                      has_comb, mix_out, has_mix, norm_w, has_norm, norm_out, xq, xd, has_q8_0, yq, yd, ybs,
                      has_q8_K, vec):
        nw = cuda.local.array(N_VALS, float32)
        early_norm_w(norm_w, has_norm, n_embd, nw, vec)
        wait_prior_grid()
        finish_token(cuda.blockIdx.x, x, part_dot, n_split, n_embd, scale, base, iters, hc_eps, rms_eps, out, post,
                     comb, has_comb, mix_out, has_mix, has_norm, norm_out, xq, xd, has_q8_0, yq, yd, ybs, has_q8_K,
                     nw, vec)

    return mix_kernel, finish_kernel


@L.kernel_factory
def _comb_kernel(n_hc: int) -> Any:
    """``hc.comb``: one block (warp) a token runs the Sinkhorn of its control values."""
    N_MIX = 2 * n_hc + n_hc * n_hc
    sinkhorn_serial, sinkhorn_warp = sinkhorn_fns(n_hc)

    @cuda.jit
    def comb_kernel(mix, scale, base, iters, hc_eps, comb):
        wait_prior_grid()
        t = cuda.blockIdx.x
        m = mix[t * N_MIX:]
        if SIMULATOR:   # one thread (a constant-false branch on the GPU)
            sinkhorn_serial(m, scale, base, iters, hc_eps, comb, t)
        else:
            sinkhorn_warp(m, scale, base, iters, hc_eps, comb, t, cuda.threadIdx.x)

    return comb_kernel


class HcPreOut(NamedTuple):
    """Outputs of ``hc.pre``: x (T, n_embd), post (T, n_hc), comb (T, n_hc, n_hc) or None, x_norm or None, the
    mix (T, 2 n_hc + n_hc^2) or None (for ``hc.comb``, when comb is left to it), and x_norm quantized as the
    sublayer's matmuls read it, each or None: ``x_q8_0`` (Q8_0, the dense projections), ``x_q8_K`` (Q8_K, the
    routed experts)."""

    x: Any
    post: Any
    comb: Any
    x_norm: Any = None
    mix: Any = None
    x_q8_0: Q8_0Act | None = None
    x_q8_K: Q8KAct | None = None


class HcScratch(NamedTuple):
    part_dot: Any   # f64 (T, n_mix, n_split): a value's partials side by side
    part_ss: Any    # f64 (T, max(n_split, hc.post's blocks a token))


def n_splits(hc_dim: int) -> int:
    return 1 if SIMULATOR else L.cdiv(hc_dim, COLS_PER_SPLIT)


def post_ss_parts(hc_dim: int) -> int:
    """Partial sums of squares ``hc.post`` writes a token (its blocks of ``POST_BLOCK_VALUES`` outputs), or 0
    when its blocks would straddle tokens (then ``hc.pre`` sums the squares itself)."""
    return 0 if hc_dim % POST_BLOCK_VALUES else hc_dim // POST_BLOCK_VALUES


def alloc_scratch(n_tok: int, hc_dim: int, n_mix: int, stream: Any = 0) -> HcScratch:
    ns = n_splits(hc_dim)
    return HcScratch(L.device_array(n_tok * ns * n_mix, np.float64, stream),
                     L.device_array(n_tok * max(ns, post_ss_parts(hc_dim)), np.float64, stream))


def alloc_pre(n_tok: int, n_hc: int, n_embd: int, with_norm: bool = True, stream: Any = 0) -> HcPreOut:
    return HcPreOut(L.device_array(n_tok * n_embd, np.float32, stream),
                    L.device_array(n_tok * n_hc, np.float32, stream),
                    L.device_array(n_tok * n_hc * n_hc, np.float32, stream),
                    L.device_array(n_tok * n_embd, np.float32, stream) if with_norm else None)


def eps64(eps: float) -> np.float64:
    """The contract's ``eps``: the float32 epsilon widened to float64 (as the oracle takes it)."""
    return np.float64(np.float32(eps))


def finish_rounds(n_embd: int) -> int:
    """Slices of ``FINISH_THREADS * FINISH_VALS`` values of x a finish block forms (one for DS4 on the GPU)."""
    return L.cdiv(n_embd, FINISH_THREADS * FINISH_VALS)


def _launch(hc, fn, scale, base, n_hc, n_mix, iters, hc_eps, rms_eps, out_x, post, comb, norm_w, norm_out,
            scratch, stream, mma=None, mix=None, x_q8_0=None, x_q8_K=None, n_ss=0):
    hc_dim = fn.shape[1]
    n_tok = hc.size // hc_dim
    n_embd = hc_dim // n_hc
    if fn.shape[0] != n_mix or hc_dim % n_hc or hc.size != n_tok * hc_dim:
        raise ValueError(f"hc: fn is {tuple(fn.shape)}, expected ({n_mix}, {hc_dim})")
    if n_hc * n_hc > 32:
        raise ValueError(f"hc: {n_hc} streams: the Sinkhorn warp holds at most 32 entries")
    for q, qk, name in ((x_q8_0, QK8_0, "Q8_0"), (x_q8_K, QK_K, "Q8_K")):
        if q is not None and (norm_out is None or n_embd % qk):
            raise ValueError(f"hc.pre: x_norm as {name} needs a norm and n_embd % {qk} == 0 (n_embd {n_embd})")
    ns = n_splits(hc_dim)
    if scratch is None:
        scratch = alloc_scratch(n_tok, hc_dim, n_mix, stream)
    if np.dtype(scratch.part_dot.dtype) != np.float64 or np.dtype(scratch.part_ss.dtype) != np.float64:
        raise ValueError("hc: scratch partials must be float64 (alloc_scratch)")
    mix_k, fin_k = _kernels(n_hc, n_mix, finish_rounds(n_embd))
    vec = int(n_embd % 4 == 0 and all(L.aligned(a, 16) for a in (hc, out_x, norm_w, norm_out) if a is not None))
    cols = L.cdiv(hc_dim, ns)
    if not n_ss:
        n_ss = ns
        L.launch(_ss_kernel, (ns, n_tok), MIX_THREADS, stream, L.flat(hc), hc_dim, cols, scratch.part_ss)
    elif scratch.part_ss.size < n_tok * n_ss:
        raise ValueError(f"hc.pre: n_ss {n_ss} partial sums a token do not fit the scratch")
    if mma is None:
        mma = n_tok >= gemm_f64.MIN_TOKENS and has_f64_mma()
    d = L.placeholder(np.float32)
    u, i = L.placeholder(np.uint64), L.placeholder(np.int32)
    q0 = x_q8_0 or Q8_0Act(u, d)
    qk = x_q8_K or Q8KAct(u, d, i)
    outs = (L.flat(out_x), d if post is None else L.flat(post), d if comb is None else L.flat(comb),
            int(comb is not None), d if mix is None else L.flat(mix), int(mix is not None),
            d if norm_w is None else L.flat(norm_w), int(norm_w is not None),
            d if norm_out is None else L.flat(norm_out), q0.qs, q0.d, int(x_q8_0 is not None), qk.qs, qk.d,
            qk.bsums, int(x_q8_K is not None))
    if mma:    # a prefill step: the mix as a GEMM on the FP64 tensor cores, K split to fill the GPU
        splits = gemm_f64.hc_mix_splits(hc_dim, n_tok, scratch.part_dot.size // (n_tok * n_mix))
        n_mix_split = gemm_f64.hc_mix(hc, fn, n_tok, scratch.part_ss, n_ss, eps64(rms_eps), part=scratch.part_dot,
                                      splits=splits, stream=stream)
    else:
        L.launch(mix_k, (ns, n_tok), MIX_THREADS, stream, L.flat(hc), L.flat(fn), hc_dim, cols, eps64(rms_eps),
                 n_ss, scratch.part_ss, scratch.part_dot)
        n_mix_split = ns
    L.launch(fin_k, n_tok, FINISH_THREADS, stream, L.flat(hc), scratch.part_dot, n_mix_split, n_embd,
             L.flat(scale), L.flat(base), int(iters), eps64(hc_eps), eps64(rms_eps), *outs, vec)


@implementation("hc.pre", "split_mix", layout="f16|f32 fn/row-major")
def hc_pre(hc: Any, fn: Any, scale: Any, base: Any, norm_w: Any | None = None, *, out: HcPreOut,
           n_hc: int, iters: int, hc_eps: float, rms_eps: float, scratch: HcScratch | None = None,
           mma: bool | None = None, n_ss: int = 0, stream: Any = 0) -> HcPreOut:
    """Steps 2-3 (+4/15): hc (T, n_hc, n_embd) -> x, post, comb (and x_norm = rms(x; norm_w)).

    ``out.comb`` None: no Sinkhorn here; ``out.mix`` receives the control
    values instead and ``hc.comb`` turns them into comb, in a launch that can
    run beside the sublayer (a decode step's branch).  ``mma``: the mix of a
    step of several tokens as a GEMM on the FP64 tensor cores (default: from
    ``gemm_f64.MIN_TOKENS`` tokens where the GPU has them).  ``n_ss``: ``scratch.part_ss`` already holds each
    token's sum of squares in ``n_ss`` parts (``hc.post``'s ``ss_out``), so no launch of its own sums them."""
    n_mix = 2 * n_hc + n_hc * n_hc
    if n_ss and scratch is None:
        raise ValueError("hc.pre: n_ss needs the scratch whose part_ss holds them")
    if (norm_w is None) != (out.x_norm is None):
        raise ValueError("hc.pre: give norm_w and out.x_norm together")
    if out.comb is None and out.mix is None:
        raise ValueError("hc.pre: give out.comb, or out.mix for hc.comb")
    _launch(hc, fn, scale, base, n_hc, n_mix, iters, hc_eps, rms_eps, out.x, out.post, out.comb, norm_w,
            out.x_norm, scratch, stream, mma, out.mix, out.x_q8_0, out.x_q8_K, n_ss)
    return out


@implementation("hc.comb", "warp_sinkhorn", layout="f32")
def hc_comb(mix: Any, scale: Any, base: Any, *, out: Any, n_hc: int, iters: int, hc_eps: float,
            stream: Any = 0) -> Any:
    """Step 3's comb from ``hc.pre``'s control values mix (T, 2 n_hc + n_hc^2): the ``n_hc x n_hc`` Sinkhorn
    normalisation (float64, rounded once), a warp a token with one entry a lane."""
    n_mix = 2 * n_hc + n_hc * n_hc
    n_tok = mix.size // n_mix
    if mix.size != n_tok * n_mix or out.size != n_tok * n_hc * n_hc:
        raise ValueError(f"hc.comb: mix has {mix.size} values and out {out.size}, not tokens of {n_mix} and "
                         f"{n_hc * n_hc}")
    L.launch(_comb_kernel(n_hc), n_tok, SINK_THREADS, stream, L.flat(mix), L.flat(scale), L.flat(base),
             int(iters), eps64(hc_eps), L.flat(out))
    return out


@implementation("hc.head", "split_mix", layout="f16|f32 fn/row-major")
def hc_head(hc: Any, fn: Any, scale: Any, base: Any, *, out: Any, n_hc: int, hc_eps: float, rms_eps: float,
            scratch: HcScratch | None = None, stream: Any = 0) -> Any:
    """Step 20: final streams hc (T, n_hc, n_embd) -> x (T, n_embd) with sigmoid weights."""
    _launch(hc, fn, scale, base, n_hc, n_hc, 0, hc_eps, rms_eps, out, None, None, None, None, scratch, stream)
    return out


@device
def _post_one(y, y2, has_y2, hc, post, comb, n_tok, n_hc, n_embd, out, i):
    d = i % n_embd
    j = (i // n_embd) % n_hc
    t = i // (n_embd * n_hc)
    yv = y[t * n_embd + d]
    if has_y2:      # the FFN's routed + shared outputs (step 19's float32 sum)
        yv = float32(yv + y2[t * n_embd + d])
    acc = float64(yv) * float64(post[t * n_hc + j])
    cb = t * n_hc * n_hc
    hb = t * n_hc * n_embd
    for h in range(n_hc):
        acc += float64(comb[cb + h * n_hc + j]) * float64(hc[hb + h * n_embd + d])
    v = float32(acc)
    out[i] = v                                   # new_j, rounded once
    return v


@cuda.jit
def _post_kernel(y, y2, has_y2, hc, post, comb, n_tok, n_hc, n_embd, out, has_ss, part_ss):
    """Block b forms outputs ``b * POST_BLOCK_VALUES ...`` (consecutive), and with ``has_ss`` their float64 sum
    of squares into ``part_ss[b]``: the next ``hc.pre``'s partials, a token being whole blocks."""
    wait_prior_grid()
    tid = cuda.threadIdx.x
    n = n_tok * n_hc * n_embd
    ss = _D0
    for rep in range(POST_ITEMS):   # one item a thread on the GPU
        i = (cuda.blockIdx.x * POST_ITEMS + rep) * POST_THREADS + tid
        if i < n:
            v = float64(_post_one(y, y2, has_y2, hc, post, comb, n_tok, n_hc, n_embd, out, i))
            ss += v * v
    if has_ss:      # uniform branch: a launch argument
        red = cuda.shared.array(POST_WARPS, float64)
        tot = _block_total(ss, red, POST_WARPS)
        if tid == 0:
            part_ss[cuda.blockIdx.x] = tot


@implementation("hc.post", "elementwise", layout="f32")
def hc_post(y: Any, hc: Any, post: Any, comb: Any, *, out: Any, n_hc: int, y2: Any | None = None,
            ss_out: Any | None = None, stream: Any = 0) -> Any:
    """Steps 14/19: y (T, n_embd), streams hc (T, n_hc, n_embd) -> new streams (T, n_hc, n_embd).

    ``y2`` given: the sublayer output is ``float32(y + y2)`` (step 19's routed + shared sum, formed here
    instead of in a launch of its own).  ``ss_out`` given (an ``HcScratch.part_ss``): each token's float64 sum
    of squares of the new streams in ``post_ss_parts(n_hc * n_embd)`` parts, for the next ``hc.pre``'s
    ``n_ss`` (no launch of its own sums them)."""
    n_tok = post.size // n_hc
    n_embd = y.size // n_tok
    n = n_tok * n_hc * n_embd
    if ss_out is not None and (not post_ss_parts(n_hc * n_embd) or ss_out.size < n // POST_BLOCK_VALUES):
        raise ValueError(f"hc.post: sums of squares need whole blocks of {POST_BLOCK_VALUES} values a token "
                         f"(n_hc * n_embd = {n_hc * n_embd}) and room for them in ss_out")
    L.launch(_post_kernel, L.cdiv(n, POST_BLOCK_VALUES), POST_THREADS, stream,
             L.flat(y), L.flat(y if y2 is None else y2), int(y2 is not None), L.flat(hc), L.flat(post), L.flat(comb),
             n_tok, n_hc, n_embd, L.flat(out), int(ss_out is not None),
             L.placeholder(np.float64) if ss_out is None else ss_out)
    return out


# ---------------------------------------------------------------------------
# Parity cases
# ---------------------------------------------------------------------------


def _shape(scale: str) -> tuple[int, int, int]:
    return (2, 4, 256) if scale == "tiny" else (1, 4, 4096)   # (T, n_hc, n_embd)


def _random_hc(rng, n_tok, n_hc, n_embd):
    base = rng.standard_normal((n_tok, 1, n_embd))
    return (base + 0.3 * rng.standard_normal((n_tok, n_hc, n_embd))).astype(np.float32) * \
        np.float32(rng.uniform(0.1, 10))


def mix_reference(hc: np.ndarray, fn: np.ndarray, eps: float) -> np.ndarray:
    """The oracle's ``mix = fn . rms(hc)`` (Reference.hc_pre / collapse_hc): flat and mix each rounded once."""
    from ds4nb.reference import ops

    n_tok = hc.shape[0]
    flat = ops.rms_norm(hc.reshape(n_tok, -1), None, eps)
    return (flat.astype(np.float64) @ np.asarray(fn).astype(np.float64).T).astype(np.float32)


def _case_pre(rng: np.random.Generator, scale: str) -> Case:
    from ds4nb.reference import ops

    n_tok, n_hc, n_embd = _shape(scale)
    hc_dim, n_mix = n_hc * n_embd, 2 * n_hc + n_hc * n_hc
    hc = _random_hc(rng, n_tok, n_hc, n_embd)
    fn = (rng.standard_normal((n_mix, hc_dim)) / np.sqrt(hc_dim)).astype(np.float16)
    sc = (0.5 + 0.1 * rng.standard_normal(3)).astype(np.float32)
    bs = (0.1 * rng.standard_normal(n_mix)).astype(np.float32)
    nw = (1 + 0.1 * rng.standard_normal(n_embd)).astype(np.float32)
    iters, eps = 20, 1e-6
    split = ops.hc_split_sinkhorn(mix_reference(hc, fn, eps), sc, bs, n_hc, iters, eps)
    x = ops.hc_weighted_sum(hc, split.pre)
    xn = ops.rms_norm(x, nw, eps)
    out = alloc_pre(n_tok, n_hc, n_embd, True)
    return Case((cuda.to_device(hc), cuda.to_device(fn), cuda.to_device(sc), cuda.to_device(bs),
                 cuda.to_device(nw)), out,
                (x.reshape(-1), split.post.reshape(-1), split.comb.reshape(-1), xn.reshape(-1)),
                (CONTRACT, CONTRACT, CONTRACT, CONTRACT),
                kwargs=dict(n_hc=n_hc, iters=iters, hc_eps=eps, rms_eps=eps), weight_bytes=fn.nbytes,
                info={"shape": (n_tok, n_hc, n_embd)})


def _case_head(rng: np.random.Generator, scale: str) -> Case:
    from ds4nb.reference import ops

    n_tok, n_hc, n_embd = _shape(scale)
    hc_dim = n_hc * n_embd
    hc = _random_hc(rng, n_tok, n_hc, n_embd)
    fn = (rng.standard_normal((n_hc, hc_dim)) / np.sqrt(hc_dim)).astype(np.float16)
    sc = (0.5 + 0.1 * rng.standard_normal(1)).astype(np.float32)
    bs = (0.1 * rng.standard_normal(n_hc)).astype(np.float32)
    eps = 1e-6
    w = ops.hc_head_weights(mix_reference(hc, fn, eps), sc[0], bs, eps)
    x = ops.hc_weighted_sum(hc, w)
    out = L.device_array(n_tok * n_embd, np.float32)
    return Case((cuda.to_device(hc), cuda.to_device(fn), cuda.to_device(sc), cuda.to_device(bs)), out,
                (x.reshape(-1),), (CONTRACT,), kwargs=dict(n_hc=n_hc, hc_eps=eps, rms_eps=eps),
                weight_bytes=fn.nbytes, info={"shape": (n_tok, n_hc, n_embd)})


def _case_comb(rng: np.random.Generator, scale: str) -> Case:
    from ds4nb.reference import ops

    n_tok, n_hc = (3, 4) if scale == "tiny" else (1, 4)
    n_mix = 2 * n_hc + n_hc * n_hc
    mix = (rng.standard_normal((n_tok, n_mix)) * 3).astype(np.float32)
    sc = rng.uniform(0.5, 2, 3).astype(np.float32)
    bs = rng.standard_normal(n_mix).astype(np.float32)
    iters, eps = 20, 1e-6
    ref = ops.hc_split_sinkhorn(mix, sc, bs, n_hc, iters, eps).comb
    out = L.device_array(n_tok * n_hc * n_hc, np.float32)
    return Case((cuda.to_device(mix), cuda.to_device(sc), cuda.to_device(bs)), out, (ref.reshape(-1),),
                (CONTRACT,), kwargs=dict(n_hc=n_hc, iters=iters, hc_eps=eps), info={"shape": (n_tok, n_hc)})


def _case_post(rng: np.random.Generator, scale: str) -> Case:
    from ds4nb.reference import ops

    n_tok, n_hc, n_embd = _shape(scale)
    y = rng.standard_normal((n_tok, n_embd)).astype(np.float32)
    hc = _random_hc(rng, n_tok, n_hc, n_embd)
    post = rng.uniform(0, 2, (n_tok, n_hc)).astype(np.float32)
    comb = rng.uniform(0, 1, (n_tok, n_hc, n_hc)).astype(np.float32)
    kwargs: dict[str, Any] = dict(n_hc=n_hc)
    if rng.random() < 0.5:      # step 19: the routed and shared expert outputs, added in float32 first
        y2 = rng.standard_normal((n_tok, n_embd)).astype(np.float32)
        kwargs["y2"] = cuda.to_device(y2)
        ref = ops.hc_post(y + y2, hc, post, comb)
    else:
        ref = ops.hc_post(y, hc, post, comb)
    out = L.device_array(n_tok * n_hc * n_embd, np.float32)
    return Case((cuda.to_device(y), cuda.to_device(hc), cuda.to_device(post), cuda.to_device(comb)), out,
                (ref.reshape(-1),), (CONTRACT,), kwargs=kwargs, info={"shape": (n_tok, n_hc, n_embd)})


# Outputs are CONTRACT (bit-identical to the twin but for rare one-ulp differences); the tolerances
# apply to nothing in the cases and stay as a bound on the relative error.
OPS = [
    OpSpec("hc.pre", "HC pre: rms of the flat streams, F16 mix matvec, split + Sinkhorn, weighted sum "
           "(+ the sublayer RMSNorm); out.comb None: the mix into out.mix for hc.comb instead of the Sinkhorn",
           "(hc f32 (T, n_hc, n_embd), fn f16 (n_mix, hc_dim), scale f32 (3,), base f32 (n_mix,), "
           "norm_w f32 (n_embd,) | None, *, out: HcPreOut (x, post, comb | None, x_norm | None, mix | None, "
           "x_q8_0: Q8_0 of x_norm | None, x_q8_K: Q8_K of x_norm | None), "
           "n_hc, iters, hc_eps, rms_eps, scratch=None, mma=None, n_ss=0: partial sums of squares the scratch "
           "holds (hc.post's ss_out), stream)",
           "ops.rms_norm + DenseMatrix.matmul + ops.hc_split_sinkhorn + ops.hc_weighted_sum + ops.rms_norm",
           1e-5, _case_pre),
    OpSpec("hc.head", "output HC collapse: rms, F16 matvec to n_hc weights, sigmoid, weighted sum",
           "(hc f32 (T, n_hc, n_embd), fn f16 (n_hc, hc_dim), scale f32 (1,), base f32 (n_hc,), *, out f32 "
           "(T, n_embd), n_hc, hc_eps, rms_eps, scratch=None, stream)",
           "Reference.collapse_hc (ops.rms_norm, DenseMatrix.matvec, ops.hc_head_weights, ops.hc_weighted_sum)",
           1e-5, _case_head),
    OpSpec("hc.comb", "HC comb: the Sinkhorn normalisation of hc.pre's control values",
           "(mix f32 (T, 2 n_hc + n_hc^2), scale f32 (3,), base f32 (2 n_hc + n_hc^2,), *, out f32 (T, n_hc, n_hc), "
           "n_hc, iters, hc_eps, stream)",
           "ops.hc_split_sinkhorn (.comb)", 1e-5, _case_comb),
    OpSpec("hc.post", "HC post: new[j] = y*post[j] + sum_i comb[i, j] hc[i]",
           "(y f32 (T, n_embd), hc f32 (T, n_hc, n_embd), post f32 (T, n_hc), comb f32 (T, n_hc, n_hc), *, "
           "out f32 (T, n_hc, n_embd), n_hc, y2=None (T, n_embd): y + y2, ss_out=None: the next hc.pre's partial "
           "sums of squares, stream)",
           "ops.hc_post", 1e-6, _case_post),
]
