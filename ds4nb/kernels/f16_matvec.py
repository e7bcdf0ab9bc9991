"""Small dense matvecs: F16 (or F32) weights times float32 activations.

Used for the DS4 tensors stored as F16: the router ``ffn_gate_inp`` (256 x
4096), the compressor and indexer projections (up to 1024 x 4096 and 8192 x
1024), ``indexer.proj``.  The HC mixing matvec (24 x 16384) has its own fused
kernel in ``ds4nb.kernels.hc``.

``f16.matvec`` computes ``out[t, r] = sum_i w[r, i] * x[t, i] (+ bias[r])``,
and optionally a second matrix with the same input in the same launch
(``w2`` -> ``out2``, ``bias2``): the compressor's kv and gate projections of
one token are one launch that writes straight into the compressor's window
state rows, the gate row plus its ``ape`` bias.

Layout: weights row-major ``(n_out, n_in)`` exactly as in the GGUF file
(F16 or F32), activations float32 ``(T, n_in)``.

A step of at least ``gemm_f64.MIN_TOKENS`` tokens (prefill) on a GPU with float64
MMA (sm_80+) is a GEMM on the FP64 tensor cores (``ds4nb.kernels.gemm_f64``).
Other steps of several tokens run ``_matmul_kernel``: a warp owns 4
rows for a pass of up to 8 tokens (``blockIdx.y``); the block widens the
pass's activations to float64 in shared memory once for its 8 warps (256
columns at a time), and a lane loads each of its weight values once for the
8 tokens (the same sums, the weights read once per pass instead of once per
token).

Launch geometry: 256-thread blocks (8 warps); each output row gets
``wpr`` warps (1, 2, 4 or 8) so that narrow matrices still launch enough
blocks to fill the GPU (router: 256 rows -> one row per block, 8 warps
splitting the 4096 columns).  The simulator runs 16-thread blocks of
one-lane "warps" (``LANES = 1``), each summing 8 rows between two barriers
(``ROWS_PER_WARP``, a constant-false branch on the GPU), up to 4 times
(``rpw``).  A thread walks its columns with stride ``32 * wpr`` keeping 4
independent partial sums (4 loads in flight), a warp shuffle reduces them,
and the ``wpr`` warp sums of a row are added in warp order from shared memory.
F16 rows whose length is a multiple of 4 (every DS4 one) are read as 8-byte
words of 4 values (``intrinsics.half_bits`` takes them apart): a quarter of
the loads, and of their latency rounds, of reading 2-byte values (the
compressor's kv + gate pair: 26.0 -> 12.7 us on an H200).

Numerics (docs/model.md, "Numerics: one rounding per value"): each product
``float64(w) * float64(x)`` is exact (an F16 or F32 weight times a float32),
the partial sums, the shuffle reduction, the shared-memory warp sums and the
bias are float64, and the output is rounded to float32 once: the float32
rounding of ``sum_i w x (+ bias)`` in any order, bit-identical to a float64
numpy twin except, rarely (~1e-7 per value), one ulp.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda

from ds4nb.kernels import _launch as L
from ds4nb.kernels import gemm_f64
from ds4nb.kernels.intrinsics import (SIMULATOR, device, float32, float64, half_bits, has_f64_mma, uint64,
                                      wait_prior_grid, warp_max, warp_sum)
from ds4nb.kernels.parity import CONTRACT, Case
from ds4nb.kernels.registry import OpSpec, implementation

#: lanes of a reduction group: a warp on the GPU, one thread in the simulator (no shuffles there)
LANES = 1 if SIMULATOR else 32
THREADS = 16 if SIMULATOR else 256
WARPS = THREADS // LANES
ROWS_PER_WARP = 8 if SIMULATOR else 1   # rows a warp sums before the block's barrier
PARTS = WARPS * ROWS_PER_WARP
_D0 = np.float64(0.0)
# ~2 blocks per SM on a 132-SM H100/H200 (1056 blocks measured 9% slower on the compressor projections,
# bench/results/decode_graph_flash_h200.md); the simulator pays per block barrier, so it packs rows
TARGET_BLOCKS = 1 if SIMULATOR else 264

# ---------------------------------------------------------------------------
# Reductions shared by the model kernels (hc, attention, compressor, indexer, router, sample)
#
# On the GPU these are the xor-butterfly shuffles of ds4nb.kernels.intrinsics.
# In the simulator they are intrinsics' one-barrier group exchange, which
# combines the values in the same butterfly order (the float32 result is the
# GPU's) and costs nothing for a group of one lane.  As with real shuffles,
# every live thread of the block must make the same calls.
# ---------------------------------------------------------------------------


if SIMULATOR:
    group_sum = warp_sum
    group_max = warp_max
else:
    @device
    def group_sum(v, width):
        """Sum of ``v`` over aligned groups of ``width`` lanes (power of two <= 32); all lanes get it."""
        return warp_sum(v, width)

    @device
    def group_max(v, width):
        """Max of ``v`` over aligned groups of ``width`` lanes; all lanes get it."""
        return warp_max(v, width)


@device
def block_sum(v, red, n_warps, zero, width):
    """Sum of ``v`` over a block of ``n_warps`` warps of ``width`` lanes; every thread gets the total.

    Warp sums go to ``red`` (shared, >= n_warps entries), then every warp
    re-reduces them (``zero``: a 0 of ``v``'s type).  A caller that reuses
    ``red`` must sync first.  ``n_warps <= width``: ``width`` is 32 on the GPU;
    a simulator kernel with one-thread blocks passes 1.
    """
    lane = cuda.threadIdx.x % width
    v = group_sum(v, width)
    if lane == 0:
        red[cuda.threadIdx.x // width] = v
    cuda.syncthreads()
    w = zero
    if lane < n_warps:
        w = red[lane]
    return group_sum(w, width)


@device
def _strided_dot(w, wb, x, xb, n_in, i, stride):
    """float64 sum of w[wb + j] * x[xb + j] for j = i, i + stride, ... < n_in: 4 partial sums (4 loads in flight)."""
    a0 = _D0
    a1 = _D0
    a2 = _D0
    a3 = _D0
    while i + 3 * stride < n_in:
        a0 += float64(float32(w[wb + i])) * float64(x[xb + i])
        a1 += float64(float32(w[wb + i + stride])) * float64(x[xb + i + stride])
        a2 += float64(float32(w[wb + i + 2 * stride])) * float64(x[xb + i + 2 * stride])
        a3 += float64(float32(w[wb + i + 3 * stride])) * float64(x[xb + i + 3 * stride])
        i += 4 * stride
    while i < n_in:
        a0 += float64(float32(w[wb + i])) * float64(x[xb + i])
        i += stride
    return (a0 + a1) + (a2 + a3)


@device
def _row_out(part, col, wpr, bias, has_bias, out, bias2, has_bias2, out2, t, n_out, n_out2, row):
    """Adds the ``wpr`` float64 warp sums of ``row`` (at part[col ...]) (+ bias) and writes it, rounded once."""
    s = _D0
    for j in range(wpr):
        s += part[col + j]
    if row < n_out:
        if has_bias:
            s += float64(float32(bias[row]))
        out[t * n_out + row] = s           # the output's type: float32 rounds once, float64 keeps the sum
    else:
        r = row - n_out
        if has_bias2:
            s += float64(float32(bias2[r]))
        out2[t * n_out2 + r] = s


@device
def _word_dot(u, x, xc, acc):
    """acc + the 4 F16 values of weight word ``u`` (value k in bits 16k..16k+15) . x[xc .. xc + 3] (float64)."""
    for k in range(4):
        acc += half_bits(u >> uint64(16 * k)) * float64(x[uint64(xc + k)])
    return acc


@device
def _strided_words_dot(w, wb, x, xb, n_words, i, stride):
    """As ``_strided_dot`` over F16 weights read as 8-byte words of 4 values (``w`` uint64): words i, i +
    stride, ... < n_words of the row at word ``wb``; 4 words (16 values) in flight, 4 partial sums."""
    a0 = _D0
    a1 = _D0
    a2 = _D0
    a3 = _D0
    while i + 3 * stride < n_words:
        u0 = w[uint64(wb + i)]
        u1 = w[uint64(wb + i + stride)]
        u2 = w[uint64(wb + i + 2 * stride)]
        u3 = w[uint64(wb + i + 3 * stride)]
        a0 = _word_dot(u0, x, xb + 4 * i, a0)
        a1 = _word_dot(u1, x, xb + 4 * (i + stride), a1)
        a2 = _word_dot(u2, x, xb + 4 * (i + 2 * stride), a2)
        a3 = _word_dot(u3, x, xb + 4 * (i + 3 * stride), a3)
        i += 4 * stride
    while i < n_words:
        a0 = _word_dot(w[uint64(wb + i)], x, xb + 4 * i, a0)
        i += stride
    return (a0 + a1) + (a2 + a3)


@L.kernel_factory
def _matvec_kernel_for(words: bool) -> Any:
    """The one-token kernel reading weights as values (F16 or F32), or (``words``) F16 weights as uint64
    words of 4 values: 8 bytes a load instead of 2, a quarter of the loads and of their latency rounds."""
    # a row's length in the units the kernel reads (values or words) and its dot over them
    per = 4 if words else 1
    dot = _strided_words_dot if words else _strided_dot

    @device
    def row_dot(w, w2, x, xb, n_out, n_out2, n_in, row, sub, stride):
        """This lane's float64 share of output row ``row``: rows [0, n_out) read w, [n_out, n_out + n_out2) w2."""
        n = n_in // per
        if row >= n_out + n_out2:
            return _D0
        if row < n_out:
            return dot(w, row * n, x, xb, n, sub, stride)
        return dot(w2, (row - n_out) * n, x, xb, n, sub, stride)

    @cuda.jit
    def kernel(w, bias, has_bias, out, w2, bias2, has_bias2, out2, x, n_out, n_out2, n_in, wpr, rpw, gate, gate_at):
        wait_prior_grid()
        if gate_at >= 0 and gate[gate_at] == 0:   # a step-record flag says this step needs no result
            return
        tid = cuda.threadIdx.x
        warp = tid // LANES
        lane = tid % LANES
        rpb = WARPS // wpr
        t = cuda.blockIdx.y
        sub = (warp % wpr) * LANES + lane
        stride = LANES * wpr
        xb = t * n_in
        part = cuda.shared.array(PARTS, float64)
        for rep in range(rpw):   # rpw > 1 only in the simulator, where a block costs more than a row
            row = (cuda.blockIdx.x * rpw + rep) * (rpb * ROWS_PER_WARP) + warp // wpr
            acc = group_sum(row_dot(w, w2, x, xb, n_out, n_out2, n_in, row, sub, stride), LANES)  # every warp
            if lane == 0:                                                                     # reduces
                part[warp] = acc
            if ROWS_PER_WARP > 1:  # the simulator: each warp's further rows (a constant-false branch on the GPU)
                for e in range(1, ROWS_PER_WARP):
                    acc = group_sum(row_dot(w, w2, x, xb, n_out, n_out2, n_in, row + e * rpb, sub, stride), LANES)
                    if lane == 0:
                        part[warp + e * WARPS] = acc
            cuda.syncthreads()
            if sub == 0 and row < n_out + n_out2:
                _row_out(part, warp, wpr, bias, has_bias, out, bias2, has_bias2, out2, t, n_out, n_out2, row)
            if ROWS_PER_WARP > 1:
                for e in range(1, ROWS_PER_WARP):
                    if sub == 0 and row + e * rpb < n_out + n_out2:
                        _row_out(part, warp + e * WARPS, wpr, bias, has_bias, out, bias2, has_bias2, out2, t, n_out,
                                 n_out2, row + e * rpb)
            cuda.syncthreads()

    return kernel


#: tokens that share each weight load in the batched kernel (prefill steps), and rows a warp owns there
TOKENS_PER_PASS = 8
ROWS_PER_WARP_T = 4
_ACC_T = TOKENS_PER_PASS * ROWS_PER_WARP_T
X_TILE = 256                              # activation columns widened to float64 in shared memory at a time
_XS = TOKENS_PER_PASS * X_TILE


@cuda.jit
def _matmul_kernel(w, bias, has_bias, out, w2, bias2, has_bias2, out2, x, n_out, n_out2, n_in, n_tok, gate,
                   gate_at):
    """``out[t, r]`` for a pass of up to ``TOKENS_PER_PASS`` tokens (``blockIdx.y``) and ``ROWS_PER_WARP_T`` rows
    per warp.  The block widens each tile of ``X_TILE`` columns of the pass's activations to float64 once, in
    shared memory, for all its warps; a lane then loads each of its weight values once for the 8 tokens and
    each activation value once for its 4 rows.  float64 sums, one shuffle reduction per (row, token), rounded
    once at the store (the same values as the one-token kernel)."""
    wait_prior_grid()
    if gate_at >= 0 and gate[gate_at] == 0:   # a step-record flag says this step needs no result
        return
    tid = cuda.threadIdx.x
    warp = tid // LANES
    lane = tid % LANES
    t0 = cuda.blockIdx.y * TOKENS_PER_PASS
    row0 = (cuda.blockIdx.x * WARPS + warp) * ROWS_PER_WARP_T
    n_rows = n_out + n_out2
    xs = cuda.shared.array(_XS, float64)          # (TOKENS_PER_PASS, X_TILE) float64 activations
    acc = cuda.local.array(_ACC_T, float64)
    xv = cuda.local.array(TOKENS_PER_PASS, float64)
    for a in range(_ACC_T):
        acc[a] = _D0
    for c0 in range(0, n_in, X_TILE):
        cuda.syncthreads()                        # the previous tile's reads are done
        for i in range(tid, _XS, THREADS):
            k = i // X_TILE
            c = c0 + i % X_TILE
            xs[i] = float64(x[(t0 + k) * n_in + c]) if t0 + k < n_tok and c < n_in else _D0
        cuda.syncthreads()
        for j in range(lane, min(X_TILE, n_in - c0), LANES):
            for k in range(TOKENS_PER_PASS):
                xv[k] = xs[k * X_TILE + j]
            c = c0 + j
            for r in range(ROWS_PER_WARP_T):
                row = row0 + r
                if row < n_out:
                    wv = float64(float32(w[row * n_in + c]))
                elif row < n_rows:
                    wv = float64(float32(w2[(row - n_out) * n_in + c]))
                else:
                    wv = _D0
                for k in range(TOKENS_PER_PASS):
                    acc[r * TOKENS_PER_PASS + k] += wv * xv[k]       # exact product, float64 sum
    for r in range(ROWS_PER_WARP_T):
        row = row0 + r
        for k in range(TOKENS_PER_PASS):
            v = group_sum(acc[r * TOKENS_PER_PASS + k], LANES)    # every lane of the warp takes part
            if lane == 0 and row < n_rows and t0 + k < n_tok:
                if row < n_out:
                    if has_bias:
                        v += float64(float32(bias[row]))
                    out[(t0 + k) * n_out + row] = v              # the output's type: float32 rounds once
                else:
                    if has_bias2:
                        v += float64(float32(bias2[row - n_out]))
                    out2[(t0 + k) * n_out2 + row - n_out] = v


def warps_per_row(n_rows: int, n_tok: int = 1) -> int:
    """Smallest split (1, 2, 4, 8 warps a row) that gives ~TARGET_BLOCKS blocks, else 8."""
    for wpr in (1, 2, 4):
        if L.cdiv(n_rows, WARPS // wpr) * n_tok >= TARGET_BLOCKS:
            return wpr
    return 8


@implementation("f16.matvec", "warp_rows", layout="f16|f32/row-major")
def f16_matvec(w: Any, x: Any, bias: Any | None = None, *, out: Any, w2: Any | None = None,
               bias2: Any | None = None, out2: Any | None = None, wpr: int | None = None,
               gate: tuple[Any, int] | None = None, mma: bool | None = None, stream: Any = 0) -> Any:
    """out (T, n_out) = x (T, n_in) @ w.T (+ bias); optionally out2 = x @ w2.T (+ bias2) in the same launch.

    ``w``/``w2`` are F16 or F32 ``(n_out, n_in)``; ``bias`` F16/F32 ``(n_out,)``.
    ``out``/``out2`` may be any contiguous device buffer of ``T * n_out``
    float32 (the sum rounded once) or float64 (the sum itself) values.
    ``gate = (array, i)``: the launch does nothing when ``array[i] == 0`` (a
    step-record flag, e.g. the indexer's ``SELECT``).  ``mma``: a step of
    several tokens on the FP64 tensor cores (default: from ``gemm_f64.MIN_TOKENS``
    tokens where the GPU has them; tests ask for it in the simulator).
    """
    n_out, n_in = w.shape
    n_tok = x.size // n_in
    if x.size != n_tok * n_in:
        raise ValueError(f"f16.matvec: x has {x.size} values, not a multiple of n_in={n_in}")
    n_out2 = 0
    if w2 is not None:
        if w2.shape[1] != n_in or out2 is None:
            raise ValueError("f16.matvec: w2 needs the same n_in and an out2")
        n_out2 = w2.shape[0]
    wpr = wpr or warps_per_row(n_out + n_out2, n_tok)
    if wpr not in (1, 2, 4, 8):
        raise ValueError(f"f16.matvec: wpr must be 1, 2, 4 or 8, got {wpr}")
    d = L.placeholder(np.float32)
    gate_arr, gate_at = gate if gate is not None else (L.placeholder(np.int32), -1)
    if mma is None:
        mma = n_tok >= gemm_f64.MIN_TOKENS and has_f64_mma() and (w2 is None or w2.dtype == w.dtype)
    if n_tok > 1 and mma:                  # a prefill step: a GEMM on the FP64 tensor cores
        gemm_f64.matmul(w, x, n_tok, out=out, bias=bias, w2=w2, bias2=bias2, out2=out2, gate=gate, stream=stream)
        return out
    if n_tok > 1:                          # a prefill step: each weight value read once per 8 tokens
        grid = (L.cdiv(n_out + n_out2, WARPS * ROWS_PER_WARP_T), L.cdiv(n_tok, TOKENS_PER_PASS))
        L.launch(_matmul_kernel, grid, THREADS, stream,
                 L.flat(w), d if bias is None else L.flat(bias), int(bias is not None), L.flat(out),
                 d if w2 is None else L.flat(w2), d if bias2 is None else L.flat(bias2), int(bias2 is not None),
                 d if out2 is None else L.flat(out2), L.flat(x), n_out, n_out2, n_in, n_tok, gate_arr, int(gate_at))
        return out
    rows_per_pass = (WARPS // wpr) * ROWS_PER_WARP
    rpw = min(4, L.cdiv(n_out + n_out2, rows_per_pass)) if SIMULATOR else 1
    grid = (L.cdiv(n_out + n_out2, rows_per_pass * rpw), n_tok)
    words = _as_words(w, n_in) is not None and (w2 is None or _as_words(w2, n_in) is not None)
    wv = _as_words(w, n_in) if words else L.flat(w)
    if w2 is None:
        w2v = L.placeholder(np.uint64) if words else d
    else:
        w2v = _as_words(w2, n_in) if words else L.flat(w2)
    L.launch(_matvec_kernel_for(words), grid, THREADS, stream,
             wv, d if bias is None else L.flat(bias), int(bias is not None), L.flat(out),
             w2v, d if bias2 is None else L.flat(bias2), int(bias2 is not None),
             d if out2 is None else L.flat(out2), L.flat(x), n_out, n_out2, n_in, wpr, rpw, gate_arr, int(gate_at))
    return out


def _as_words(w: Any, n_in: int) -> Any | None:
    """F16 weights as a flat uint64 view (4 values a word), when rows are whole words and the data 8-byte
    aligned; None otherwise (F32 weights, odd shapes: the kernel reads values)."""
    if np.dtype(w.dtype) != np.float16 or n_in % 4:
        return None
    iface = getattr(w, "__cuda_array_interface__", None)    # (the simulator's arrays are host memory)
    if iface is not None and iface["data"][0] % 8:
        return None
    return L.flat(w).view(np.uint64)


# ---------------------------------------------------------------------------
# Parity cases
# ---------------------------------------------------------------------------


def _case(rng: np.random.Generator, scale: str) -> Case:
    # tiny: a router-like (8 x 256) plus a compressor-like pair; model: compressor kv+gate of a CSA layer
    if scale == "tiny":        # one token (decode), or a prefill step of 11 (a pass of 8 and a partial one)
        n_tok, n_out, n_out2, n_in = int(rng.choice([1, 11])), 8, 16, 256
    else:
        n_tok, n_out, n_out2, n_in = int(rng.choice([1, 24])), 1024, 1024, 4096
    w = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float16)
    w2 = (rng.standard_normal((n_out2, n_in)) / np.sqrt(n_in)).astype(np.float16)
    b2 = rng.standard_normal(n_out2).astype(np.float16)
    x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
    # float64 from the exact inputs, rounded once; the paired out2 is checked in test_kernels_model_ops
    ref = (x.astype(np.float64) @ w.astype(np.float64).T).astype(np.float32)
    out = L.device_array(n_tok * n_out, np.float32)
    out2 = L.device_array(n_tok * n_out2, np.float32)
    return Case((cuda.to_device(w), cuda.to_device(x)), out, (ref.reshape(-1),), (CONTRACT,),
                kwargs=dict(w2=cuda.to_device(w2), bias2=cuda.to_device(b2), out2=out2),
                weight_bytes=(w.nbytes + w2.nbytes), info={"shape": (n_tok, n_out, n_out2, n_in)})


OPS = [
    OpSpec("f16.matvec", "dense F16/F32 matvec (optional bias, optional second matrix on the same input)",
           "(w f16|f32 (n_out, n_in), x f32 (T, n_in), bias=None, *, out f32 (T, n_out), w2=None, "
           "bias2=None, out2=None, stream)",
           "float64 numpy x @ w.T (+ bias), rounded once to float32; the oracle's DenseMatrix.matvec",
           # checked under parity.CONTRACT (bit-identical but for rare one-ulp differences); the
           # tolerance is for relative-error checks (float32 rounding)
           1e-6, _case),
]
