"""Hyper-connections on the device (docs/model.md steps 2, 3, 14, 19, 20).

``hc.pre`` (steps 2-3, and 4/15 when a norm weight is given) turns the
streams ``hc (T, n_hc, n_embd)`` into a sublayer input in two launches:

1. ``_mix`` (grid ``n_split x T``, 128 threads): each block takes a slice of
   the flattened ``hc_dim = n_hc * n_embd`` values, accumulates its part of
   the sum of squares (float64, like the oracle) and of the ``n_mix`` dots
   ``fn[m] . hc`` (float32), and writes them as partials.  The HC state is
   read once and the F16 ``fn`` (24 x 16384 for DS4) once, spread over ~128
   blocks instead of 24 rows.
2. ``_finish`` (one block per token): adds the partials in split order,
   ``mix = (fn . hc) * rsqrt(mean(hc^2) + eps)`` (the oracle normalises
   ``hc`` first: same value up to one float32 rounding), then one thread runs
   the split + Sinkhorn in registers in exactly the oracle's operation order
   (``fmul_rn`` stops FMA contraction; exp/sigmoid in float64 rounded once),
   and all threads form ``x = sum_h pre[h] * hc[h]``; optionally also
   ``x_norm = rms(x; norm_w)`` (the sublayer's attn_norm / ffn_norm).

``hc.head`` (step 20) is the same pair of kernels with ``n_mix = n_hc`` and
``w_h = sigmoid(pre_h * scale[0] + base[h]) + eps`` instead of Sinkhorn.

``hc.post`` (steps 14, 19): ``new[j] = y * post[j] + sum_i comb[i, j] * hc[i]``,
one thread per output value.

The simulator runs one split (``SIM`` geometry), the GPU ~one split per 128
columns; it also runs 16 / 8 threads a block with one lane per reduction group
(``LANES = 1``: no shuffles) and ``hc.post`` with 8 threads a block, each
taking 128 outputs.  Parts that run on one thread per mix value loop over the
values in the simulator, in branches that are constant-false on the GPU.
Errors against the oracle: ~1e-7 (float32 summation order).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from numba import cuda

from ds4nb.kernels import _launch as L
from ds4nb.kernels.f16_matvec import group_sum
from ds4nb.kernels.intrinsics import SIMULATOR, device, float32, float64
from ds4nb.kernels.parity import Case
from ds4nb.kernels.registry import OpSpec, implementation
from ds4nb.kernels.rope import fmul_rn

LANES = 1 if SIMULATOR else 32     # lanes of a reduction group (a warp on the GPU)
MIX_THREADS = 16 if SIMULATOR else 128
MIX_WARPS = MIX_THREADS // LANES
FINISH_THREADS = 8 if SIMULATOR else 256
FINISH_WARPS = FINISH_THREADS // LANES
COLS_PER_SPLIT = 128        # GPU: one column per thread per split
POST_THREADS = 8 if SIMULATOR else 256
POST_ITEMS = 128 if SIMULATOR else 1   # hc.post outputs per thread
_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_F2 = np.float32(2.0)
_D0 = np.float64(0.0)
_D1 = np.float64(1.0)


@device
def _sigmoid64(z):
    """sigmoid of a float32 evaluated in float64 without overflow (as ops._sigmoid64)."""
    x = float64(z)
    e = math.exp(-abs(x))
    if x >= _D0:
        return _D1 / (_D1 + e)
    return e / (_D1 + e)


_KERNELS: dict[tuple[int, int], tuple[Any, Any]] = {}


def _kernels(n_hc: int, n_mix: int) -> tuple[Any, Any]:
    """(mix, finish) kernels specialised for ``n_hc`` streams and ``n_mix`` control values.

    ``n_mix == n_hc`` is the output head (sigmoid weights), otherwise the
    Sinkhorn split of ``2 n_hc + n_hc^2`` values.
    """
    key = (n_hc, n_mix)
    if key in _KERNELS:
        return _KERNELS[key]
    N_HC = n_hc
    N_MIX = n_mix
    N_C = n_hc * n_hc
    HEAD = n_mix == n_hc

    @device
    def mix_out(red, part_dot, t, n_split, s, m):
        d = _F0
        for w in range(MIX_WARPS):
            d += red[m, w]
        part_dot[(t * n_split + s) * N_MIX + m] = d

    @device
    def mix_value(part_dot, part_ss, t, n_split, hc_dim, rms_eps, mix, m):
        ss = _D0
        for s in range(n_split):
            ss += part_ss[t * n_split + s]
        rs = _F1 / math.sqrt(float32(ss / float64(hc_dim)) + rms_eps)
        d = _F0
        for s in range(n_split):
            d += part_dot[(t * n_split + s) * N_MIX + m]
        mix[m] = d * rs

    @cuda.jit
    def mix_kernel(x, fn, hc_dim, cols, part_dot, part_ss):
        s = cuda.blockIdx.x
        t = cuda.blockIdx.y
        n_split = cuda.gridDim.x
        tid = cuda.threadIdx.x
        lane = tid % LANES
        warp = tid // LANES
        acc = cuda.local.array(N_MIX, float32)
        for m in range(N_MIX):
            acc[m] = _F0
        ss = _D0
        c0 = s * cols
        c1 = min(c0 + cols, hc_dim)
        xb = t * hc_dim
        for c in range(c0 + tid, c1, MIX_THREADS):
            xv = x[xb + c]
            ss += float64(xv) * float64(xv)
            for m in range(N_MIX):
                acc[m] += float32(fn[m * hc_dim + c]) * xv
        red = cuda.shared.array((N_MIX, MIX_WARPS), float32)
        red_ss = cuda.shared.array(MIX_WARPS, float64)
        for m in range(N_MIX):
            v = group_sum(acc[m], LANES)
            if lane == 0:
                red[m, warp] = v
        v64 = group_sum(ss, LANES)
        if lane == 0:
            red_ss[warp] = v64
        cuda.syncthreads()
        if tid < N_MIX:
            mix_out(red, part_dot, t, n_split, s, tid)
        if MIX_THREADS < N_MIX:  # the simulator: fewer threads than mix values
            for m in range(tid + MIX_THREADS, N_MIX, MIX_THREADS):
                mix_out(red, part_dot, t, n_split, s, m)
        if tid == 0:
            d64 = _D0
            for w in range(MIX_WARPS):
                d64 += red_ss[w]
            part_ss[t * n_split + s] = d64

    @cuda.jit
    def finish_kernel(x, part_dot, part_ss, n_split, n_embd, scale, base, iters, hc_eps, rms_eps,
                      out, post, comb, norm_w, has_norm, norm_out):
        t = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        hc_dim = N_HC * n_embd
        mix = cuda.shared.array(N_MIX, float32)
        wts = cuda.shared.array(N_HC, float32)
        red = cuda.shared.array(FINISH_WARPS, float64)
        if tid < N_MIX:
            mix_value(part_dot, part_ss, t, n_split, hc_dim, rms_eps, mix, tid)
        if FINISH_THREADS < N_MIX:  # the simulator: fewer threads than mix values
            for m in range(tid + FINISH_THREADS, N_MIX, FINISH_THREADS):
                mix_value(part_dot, part_ss, t, n_split, hc_dim, rms_eps, mix, m)
        cuda.syncthreads()
        if HEAD:
            if tid < N_HC:
                z = fmul_rn(mix[tid], scale[0]) + base[tid]
                wts[tid] = float32(_sigmoid64(z)) + hc_eps
        elif tid == 0:
            for i in range(N_HC):
                z = fmul_rn(mix[i], scale[0]) + base[i]
                wts[i] = float32(_sigmoid64(z)) + hc_eps
                z = fmul_rn(mix[N_HC + i], scale[1]) + base[N_HC + i]
                post[t * N_HC + i] = float32(float64(_F2) * _sigmoid64(z))
            c = cuda.local.array(N_C, float32)
            for i in range(N_HC):  # row softmax + eps
                mx = fmul_rn(mix[2 * N_HC + i * N_HC], scale[2]) + base[2 * N_HC + i * N_HC]
                for j in range(N_HC):
                    v = fmul_rn(mix[2 * N_HC + i * N_HC + j], scale[2]) + base[2 * N_HC + i * N_HC + j]
                    c[i * N_HC + j] = v
                    mx = max(mx, v)
                rsum = _F0
                for j in range(N_HC):
                    e = float32(math.exp(float64(c[i * N_HC + j] - mx)))
                    c[i * N_HC + j] = e
                    rsum += e
                inv = _F1 / rsum
                for j in range(N_HC):
                    c[i * N_HC + j] = fmul_rn(c[i * N_HC + j], inv) + hc_eps
            for it in range(iters):
                if it > 0:  # rows (the first round's row step is the softmax above)
                    for i in range(N_HC):
                        rsum = _F0
                        for j in range(N_HC):
                            rsum += c[i * N_HC + j]
                        inv = _F1 / (rsum + hc_eps)
                        for j in range(N_HC):
                            c[i * N_HC + j] = c[i * N_HC + j] * inv
                for j in range(N_HC):  # columns
                    csum = _F0
                    for i in range(N_HC):
                        csum += c[i * N_HC + j]
                    inv = _F1 / (csum + hc_eps)
                    for i in range(N_HC):
                        c[i * N_HC + j] = c[i * N_HC + j] * inv
            for i in range(N_C):
                comb[t * N_C + i] = c[i]
        cuda.syncthreads()
        # x = sum_h w[h] * hc[h], h in order; its sum of squares for the optional norm
        xb = t * hc_dim
        ob = t * n_embd
        ss2 = _D0
        for d in range(tid, n_embd, FINISH_THREADS):
            acc = x[xb + d] * wts[0]
            for h in range(1, N_HC):
                acc += x[xb + h * n_embd + d] * wts[h]
            out[ob + d] = acc
            ss2 += float64(acc) * float64(acc)
        if has_norm:  # uniform branch: has_norm is a launch argument
            lane = tid % LANES
            v = group_sum(ss2, LANES)
            if lane == 0:
                red[tid // LANES] = v
            cuda.syncthreads()
            tot = _D0
            for w in range(FINISH_WARPS):
                tot += red[w]
            rs2 = _F1 / math.sqrt(float32(tot / float64(n_embd)) + rms_eps)
            for d in range(tid, n_embd, FINISH_THREADS):
                norm_out[ob + d] = fmul_rn(out[ob + d], rs2) * norm_w[d]

    _KERNELS[key] = (mix_kernel, finish_kernel)
    return _KERNELS[key]


class HcPreOut(NamedTuple):
    """Outputs of ``hc.pre``: x (T, n_embd), post (T, n_hc), comb (T, n_hc, n_hc), x_norm or None."""

    x: Any
    post: Any
    comb: Any
    x_norm: Any = None


class HcScratch(NamedTuple):
    part_dot: Any   # f32 (T, n_split, n_mix)
    part_ss: Any    # f64 (T, n_split)


def n_splits(hc_dim: int) -> int:
    return 1 if SIMULATOR else L.cdiv(hc_dim, COLS_PER_SPLIT)


def alloc_scratch(n_tok: int, hc_dim: int, n_mix: int, stream: Any = 0) -> HcScratch:
    ns = n_splits(hc_dim)
    return HcScratch(L.device_array(n_tok * ns * n_mix, np.float32, stream),
                     L.device_array(n_tok * ns, np.float64, stream))


def alloc_pre(n_tok: int, n_hc: int, n_embd: int, with_norm: bool = True, stream: Any = 0) -> HcPreOut:
    return HcPreOut(L.device_array(n_tok * n_embd, np.float32, stream),
                    L.device_array(n_tok * n_hc, np.float32, stream),
                    L.device_array(n_tok * n_hc * n_hc, np.float32, stream),
                    L.device_array(n_tok * n_embd, np.float32, stream) if with_norm else None)



def _launch(hc, fn, scale, base, n_hc, n_mix, iters, hc_eps, rms_eps, out_x, post, comb, norm_w, norm_out,
            scratch, stream):
    hc_dim = fn.shape[1]
    n_tok = hc.size // hc_dim
    n_embd = hc_dim // n_hc
    if fn.shape[0] != n_mix or hc_dim % n_hc or hc.size != n_tok * hc_dim:
        raise ValueError(f"hc: fn is {tuple(fn.shape)}, expected ({n_mix}, {hc_dim})")
    ns = n_splits(hc_dim)
    if scratch is None:
        scratch = alloc_scratch(n_tok, hc_dim, n_mix, stream)
    mix_k, fin_k = _kernels(n_hc, n_mix)
    cols = L.cdiv(hc_dim, ns)
    mix_k[(ns, n_tok), MIX_THREADS, stream](L.flat(hc), L.flat(fn), hc_dim, cols, scratch.part_dot,
                                           scratch.part_ss)
    d = L.placeholder(np.float32)
    fin_k[n_tok, FINISH_THREADS, stream](
        L.flat(hc), scratch.part_dot, scratch.part_ss, ns, n_embd, L.flat(scale), L.flat(base), int(iters),
        np.float32(hc_eps), np.float32(rms_eps), L.flat(out_x), d if post is None else L.flat(post),
        d if comb is None else L.flat(comb), d if norm_w is None else L.flat(norm_w), int(norm_w is not None),
        d if norm_out is None else L.flat(norm_out))


@implementation("hc.pre", "split_mix", layout="f16|f32 fn/row-major")
def hc_pre(hc: Any, fn: Any, scale: Any, base: Any, norm_w: Any | None = None, *, out: HcPreOut,
           n_hc: int, iters: int, hc_eps: float, rms_eps: float, scratch: HcScratch | None = None,
           stream: Any = 0) -> HcPreOut:
    """Steps 2-3 (+4/15): hc (T, n_hc, n_embd) -> x, post, comb (and x_norm = rms(x; norm_w))."""
    n_mix = 2 * n_hc + n_hc * n_hc
    if (norm_w is None) != (out.x_norm is None):
        raise ValueError("hc.pre: give norm_w and out.x_norm together")
    _launch(hc, fn, scale, base, n_hc, n_mix, iters, hc_eps, rms_eps, out.x, out.post, out.comb, norm_w,
            out.x_norm, scratch, stream)
    return out


@implementation("hc.head", "split_mix", layout="f16|f32 fn/row-major")
def hc_head(hc: Any, fn: Any, scale: Any, base: Any, *, out: Any, n_hc: int, hc_eps: float, rms_eps: float,
            scratch: HcScratch | None = None, stream: Any = 0) -> Any:
    """Step 20: final streams hc (T, n_hc, n_embd) -> x (T, n_embd) with sigmoid weights."""
    _launch(hc, fn, scale, base, n_hc, n_hc, 0, hc_eps, rms_eps, out, None, None, None, None, scratch, stream)
    return out


@device
def _post_one(y, hc, post, comb, n_tok, n_hc, n_embd, out, i):
    d = i % n_embd
    j = (i // n_embd) % n_hc
    t = i // (n_embd * n_hc)
    acc = y[t * n_embd + d] * post[t * n_hc + j]
    cb = t * n_hc * n_hc
    hb = t * n_hc * n_embd
    for h in range(n_hc):
        acc += comb[cb + h * n_hc + j] * hc[hb + h * n_embd + d]
    out[i] = acc


@cuda.jit
def _post_kernel(y, hc, post, comb, n_tok, n_hc, n_embd, out):
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if i >= n_tok * n_hc * n_embd:
        return
    _post_one(y, hc, post, comb, n_tok, n_hc, n_embd, out, i)
    if POST_ITEMS > 1:  # the simulator's further outputs (a constant-false branch on the GPU)
        for rep in range(1, POST_ITEMS):
            k = i + rep * cuda.gridDim.x * cuda.blockDim.x
            if k < n_tok * n_hc * n_embd:
                _post_one(y, hc, post, comb, n_tok, n_hc, n_embd, out, k)


@implementation("hc.post", "elementwise", layout="f32")
def hc_post(y: Any, hc: Any, post: Any, comb: Any, *, out: Any, n_hc: int, stream: Any = 0) -> Any:
    """Steps 14/19: y (T, n_embd), streams hc (T, n_hc, n_embd) -> new streams (T, n_hc, n_embd)."""
    n_tok = post.size // n_hc
    n_embd = y.size // n_tok
    n = n_tok * n_hc * n_embd
    _post_kernel[L.cdiv(n, POST_THREADS * POST_ITEMS), POST_THREADS, stream](
        L.flat(y), L.flat(hc), L.flat(post), L.flat(comb), n_tok, n_hc, n_embd, L.flat(out))
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
    flat = ops.rms_norm(hc.reshape(n_tok, hc_dim), None, eps)
    mix = flat @ fn.astype(np.float32).T
    split = ops.hc_split_sinkhorn(mix, sc, bs, n_hc, iters, eps)
    x = ops.hc_weighted_sum(hc, split.pre)
    xn = ops.rms_norm(x, nw, eps)
    out = alloc_pre(n_tok, n_hc, n_embd, True)
    return Case((cuda.to_device(hc), cuda.to_device(fn), cuda.to_device(sc), cuda.to_device(bs),
                 cuda.to_device(nw)), out,
                (x.reshape(-1), split.post.reshape(-1), split.comb.reshape(-1), xn.reshape(-1)),
                (False, False, False, False),
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
    flat = ops.rms_norm(hc.reshape(n_tok, hc_dim), None, eps)
    pre = flat @ fn.astype(np.float32).T
    w = ops.sigmoid(pre * sc[0] + bs) + np.float32(eps)
    x = ops.hc_weighted_sum(hc, w)
    out = L.device_array(n_tok * n_embd, np.float32)
    return Case((cuda.to_device(hc), cuda.to_device(fn), cuda.to_device(sc), cuda.to_device(bs)), out,
                (x.reshape(-1),), (False,), kwargs=dict(n_hc=n_hc, hc_eps=eps, rms_eps=eps),
                weight_bytes=fn.nbytes, info={"shape": (n_tok, n_hc, n_embd)})


def _case_post(rng: np.random.Generator, scale: str) -> Case:
    from ds4nb.reference import ops

    n_tok, n_hc, n_embd = _shape(scale)
    y = rng.standard_normal((n_tok, n_embd)).astype(np.float32)
    hc = _random_hc(rng, n_tok, n_hc, n_embd)
    post = rng.uniform(0, 2, (n_tok, n_hc)).astype(np.float32)
    comb = rng.uniform(0, 1, (n_tok, n_hc, n_hc)).astype(np.float32)
    ref = ops.hc_post(y, hc, post, comb)
    out = L.device_array(n_tok * n_hc * n_embd, np.float32)
    return Case((cuda.to_device(y), cuda.to_device(hc), cuda.to_device(post), cuda.to_device(comb)), out,
                (ref.reshape(-1),), (False,), kwargs=dict(n_hc=n_hc), info={"shape": (n_tok, n_hc, n_embd)})


OPS = [
    OpSpec("hc.pre", "HC pre: rms of the flat streams, F16 mix matvec, split + Sinkhorn, weighted sum "
           "(+ the sublayer RMSNorm)",
           "(hc f32 (T, n_hc, n_embd), fn f16 (n_mix, hc_dim), scale f32 (3,), base f32 (n_mix,), "
           "norm_w f32 (n_embd,) | None, *, out: HcPreOut, n_hc, iters, hc_eps, rms_eps, scratch=None, stream)",
           "ops.rms_norm + DenseMatrix.matvec + ops.hc_split_sinkhorn + ops.hc_weighted_sum + ops.rms_norm",
           # float32 dots in split order (16384 terms) and mix scaled after the dot: ~1e-7;
           # Sinkhorn itself runs in the oracle's order
           1e-5, _case_pre),
    OpSpec("hc.head", "output HC collapse: rms, F16 matvec to n_hc weights, sigmoid, weighted sum",
           "(hc f32 (T, n_hc, n_embd), fn f16 (n_hc, hc_dim), scale f32 (1,), base f32 (n_hc,), *, out f32 "
           "(T, n_embd), n_hc, hc_eps, rms_eps, scratch=None, stream)",
           "Reference.collapse_hc (ops.rms_norm, ops.sigmoid, ops.hc_weighted_sum)", 1e-5, _case_head),
    OpSpec("hc.post", "HC post: new[j] = y*post[j] + sum_i comb[i, j] hc[i]",
           "(y f32 (T, n_embd), hc f32 (T, n_hc, n_embd), post f32 (T, n_hc), comb f32 (T, n_hc, n_hc), *, "
           "out f32 (T, n_hc, n_embd), n_hc, stream)",
           "ops.hc_post", 1e-6, _case_post),  # same order as the twin, FMA contraction only
]
